//! A `redis-server` of the test's own (free port, temporary directory,
//! killed on drop), and a blocking client that speaks RESP through the
//! crate's own codec.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wschat::cluster::resp::{encode_command, Decoder, Frame};

pub struct Redis {
    child: Child,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Redis {
    /// Starts one with `extra` arguments, or returns `None` (after a visible
    /// `skipped:` line) when there is no `redis-server` outside CI.
    pub fn start(test: &str, extra: &[&str]) -> Option<Redis> {
        if super::skip::find_program("redis-server").is_none() {
            super::skip::skip(test, "no redis-server");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!(
            "wschat-redis-store-test-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn(port, &dir, &extra);
        Some(Redis {
            child,
            port,
            dir,
            extra,
        })
    }

    /// `kill -9`, then the same server again on the same port and directory
    /// (what its persistence settings kept, it finds again).
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// `kill -9` (the port stays free until [`start_again`](Self::start_again)).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The same server again, on the same port and directory.
    pub fn start_again(&mut self) {
        self.child = spawn(self.port, &self.dir, &self.extra);
    }

    pub fn client(&self) -> Client {
        Client::connect(self.port).expect("connect to redis-server")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(port: u16, dir: &Path, extra: &[String]) -> Child {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answers(port) {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Whether a server answers a PING on `port`: `+PONG`, or `-NOAUTH` when it
/// wants a password. (`-LOADING`: it is still reading its append-only file
/// after a restart, and answers nothing else yet.)
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok()
        && s.read_exact(&mut head).is_ok()
        && (head[0] == b'+' || &head == b"-NOAUTH")
}

pub struct Client {
    stream: TcpStream,
    decoder: Decoder,
}

impl Client {
    fn connect(port: u16) -> Option<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let mut client = Client {
            stream,
            decoder: Decoder::default(),
        };
        matches!(client.try_call(&[b"PING"])?, Frame::Simple(_)).then_some(client)
    }

    fn try_call(&mut self, args: &[&[u8]]) -> Option<Frame> {
        let mut out = Vec::new();
        encode_command(&mut out, args);
        self.stream.write_all(&out).ok()?;
        self.try_next()
    }

    fn try_next(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some(frame) = self.decoder.next_frame().ok()? {
                return Some(frame);
            }
            let n = super::eintr::retry(|| self.stream.read(&mut buf)).ok()?;
            if n == 0 {
                return None;
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    /// Runs one command and returns its reply.
    pub fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Frame {
        let args: Vec<&[u8]> = args.iter().map(AsRef::as_ref).collect();
        self.try_call(&args).expect("a reply from redis-server")
    }

    /// The next frame without sending anything (a subscribed connection's
    /// messages).
    pub fn next(&mut self) -> Frame {
        self.try_next().expect("a frame from redis-server")
    }
}
