//! Real-browser end-to-end test: the page served at `GET /` driven by
//! headless Chromium through `tests/browser/e2e.mjs` (playwright-core).
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium` package), Node, and
//! `npm ci` in `tests/browser`. Without them the test prints one `skipped:`
//! line and passes, except under `CI=true`, where it fails.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser run; it normally takes about ten seconds.
const E2E_TIMEOUT: Duration = Duration::from_secs(120);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

fn skip(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("browser test cannot run under CI: {why}");
    }
    println!("skipped: {why}");
}

/// The binary under test: `$WSCHAT_BIN` if set, else the one cargo built.
fn bin() -> String {
    std::env::var("WSCHAT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wschat").to_string())
}

/// `--data-dir none` where this build of the server has that option.
fn data_dir_args() -> Vec<&'static str> {
    let out = Command::new(bin())
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .expect("run wschat --help");
    let help =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if help.contains("--data-dir") {
        vec!["--data-dir", "none"]
    } else {
        Vec::new()
    }
}

/// A chat server on a free loopback port, killed on drop; its stderr is
/// drained by a thread for the whole run.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(bin())
            .args(["--listen", "127.0.0.1:0"])
            .args(data_dir_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the wschat binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread_log = Arc::clone(&log);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if let Some(at) = line.find("listening on ") {
                    let addr = line[at + "listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                    if let Some(addr) = addr {
                        let _ = tx.send(addr);
                    }
                }
                thread_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line);
            }
        });
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(addr) => Server { child, addr, log },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "wschat did not print `listening on ADDR` within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                    log.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
                );
            }
        }
    }

    fn logs(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[test]
fn chat_page_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/browser");
    if !Path::new(CHROMIUM).exists() {
        return skip("no chromium");
    }
    if !dir.join("node_modules/playwright-core").exists() {
        return skip("run npm ci in tests/browser");
    }

    let mut server = Server::start();
    let shots: PathBuf = root.join("target/browser");
    std::fs::create_dir_all(&shots).expect("create target/browser");

    let mut child = Command::new("node")
        .arg(dir.join("e2e.mjs"))
        .arg(format!("http://{}", server.addr))
        .arg(&shots)
        .current_dir(&dir)
        // its own process group, so a timeout can end node and Chromium together
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node (install nodejs): {e}"));
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));

    let deadline = Instant::now() + E2E_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status {
        None => panic!(
            "the browser test did not finish within {E2E_TIMEOUT:?}\nstdout:\n{out}\nstderr:\n{err}\nserver log:\n{}",
            server.logs()
        ),
        Some(s) if !s.success() => panic!(
            "the browser test failed ({s})\nstdout:\n{out}\nstderr:\n{err}\nserver log:\n{}",
            server.logs()
        ),
        Some(_) => print!("{out}"),
    }
    if let Ok(Some(status)) = server.child.try_wait() {
        panic!(
            "wschat exited during the browser test ({status}); stderr:\n{}",
            server.logs()
        );
    }
    assert!(
        !server.logs().contains("panicked"),
        "server logged a panic:\n{}",
        server.logs()
    );
}
