//! Real-browser end-to-end test: the page served at `GET /` driven by
//! headless Chromium through `tests/browser/e2e.mjs` (playwright-core).
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium` package), Node, and
//! `npm ci` in `tests/browser`. Without them the test prints one `skipped:`
//! line and passes, except under `CI=true`, where it fails.

mod support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::spawn::{self, Spawned};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser run; it normally takes about ten seconds.
const E2E_TIMEOUT: Duration = Duration::from_secs(120);

fn skip(why: &str) {
    support::skip::skip("chat_page_in_a_real_browser", why);
}

/// `--data-dir none` where this build of the server has that option.
fn data_dir_args() -> Vec<&'static str> {
    let out = Command::new(spawn::bin())
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
/// drained by a thread for the whole run. The page test sends to a user who
/// never connected, so those messages are held (`--offline-to-unknown`).
fn start_server() -> Spawned {
    spawn::start(
        &[
            &["--listen", "127.0.0.1:0", "--offline-to-unknown"][..],
            &data_dir_args(),
        ]
        .concat(),
    )
}

const SECRET: &[u8] = b"the browser test's secret, 40 bytes long";

/// A second server with `--auth jwt`, and a token for `Zoë` valid ten minutes.
fn start_auth_server(dir: &Path) -> (Spawned, String) {
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).expect("write the secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let secret = secret.to_str().expect("UTF-8 path").to_string();
    let server = spawn::start(
        &[
            &[
                "--listen",
                "127.0.0.1:0",
                "--auth",
                "jwt",
                "--auth-secret-file",
                &secret,
            ][..],
            &data_dir_args(),
        ]
        .concat(),
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 600;
    let claims = format!(r#"{{"sub":"Zoë","exp":{exp}}}"#);
    let token = support::token::mint(r#"{"alg":"HS256","typ":"JWT"}"#, &claims, SECRET);
    (server, token)
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

    let mut server = start_server();
    let shots: PathBuf = root.join("target/browser");
    std::fs::create_dir_all(&shots).expect("create target/browser");
    let (auth_server, token) = start_auth_server(&shots);

    let mut child = Command::new("node")
        .arg(dir.join("e2e.mjs"))
        .arg(format!("http://{}", server.addr))
        .arg(&shots)
        .arg(format!("http://{}", auth_server.addr))
        .arg(&token)
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
            server.log.text()
        ),
        Some(s) if !s.success() => panic!(
            "the browser test failed ({s})\nstdout:\n{out}\nstderr:\n{err}\nserver log:\n{}",
            server.log.text()
        ),
        Some(_) => print!("{out}"),
    }
    if let Ok(Some(status)) = server.child.try_wait() {
        panic!(
            "wschat exited during the browser test ({status}); stderr:\n{}",
            server.log.text()
        );
    }
    assert!(
        !server.log.text().contains("panicked"),
        "server logged a panic:\n{}",
        server.log.text()
    );
}
