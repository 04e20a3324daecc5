//! Helpers for the black-box chat tests (`tests/chat.rs`): a `wschat`
//! process we can signal, tungstenite chat clients that speak JSON, and a
//! raw-socket client that reads frames by hand (for clients that must not
//! read or answer pings).

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tungstenite::handshake::HandshakeError;
use tungstenite::{Message, WebSocket};

use crate::support::eintr::{retry, Restarting};
use crate::support::spawn::{self, Spawned};

/// Read/write timeout of every test socket: a test that waits for an event
/// that never comes fails after this long instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// A running `wschat` (chat mode), killed on drop.
pub struct ChatServer {
    process: Spawned,
    pub addr: SocketAddr,
}

impl ChatServer {
    /// `wschat --listen 127.0.0.1:0 --data-dir none <extra...>`, once it
    /// says where it listens.
    pub fn start(extra: &[&str]) -> ChatServer {
        let process = spawn::start_test_server(extra);
        ChatServer {
            addr: process.addr,
            process,
        }
    }

    /// A server started some other way (see `support::spawn`).
    pub fn from_spawned(process: Spawned) -> ChatServer {
        ChatServer {
            addr: process.addr,
            process,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    pub fn logs(&self) -> String {
        self.process.log.text()
    }

    /// Sends a signal (`TERM`, `INT`) with the `kill` utility.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.process.child.id().to_string())
            .status()
            .expect("run the kill utility");
        assert!(status.success(), "kill -{sig} failed: {status}");
    }

    /// Waits for the process to exit by itself; fails after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.child.try_wait().expect("try_wait on wschat") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "wschat still running {timeout:?} after it was asked to stop; stderr:\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every stderr line, once the process has exited (stopped by SIGTERM)
    /// and its stderr has been read to the end.
    pub fn log_after_exit(&mut self) -> String {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(5));
        self.process.stop();
        self.logs()
    }

    /// Fails if the process died.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.process.child.try_wait().expect("try_wait on wschat") {
            panic!("wschat exited ({status}); stderr:\n{}", self.logs());
        }
    }
}

impl Drop for ChatServer {
    fn drop(&mut self) {
        // A process that has already exited (and been reaped by
        // `wait_exit`) is not signalled again.
        self.process.stop();
        if !thread::panicking() {
            let logs = self.logs();
            assert!(!logs.contains("panicked"), "server logged a panic:\n{logs}");
        }
    }
}

// ---------------------------------------------------------------------------
// URLs
// ---------------------------------------------------------------------------

/// Percent-encodes every byte outside the URL "unreserved" set.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/ws?username=<name, percent-encoded>`.
pub fn ws_path(name: &str) -> String {
    format!("/ws?username={}", percent_encode(name))
}

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to wschat");
    s.set_read_timeout(Some(IO_TIMEOUT))
        .expect("set read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("set write timeout");
    s.set_nodelay(true).expect("set TCP_NODELAY");
    s
}

// ---------------------------------------------------------------------------
// tungstenite chat client
// ---------------------------------------------------------------------------

/// A chat client over tungstenite. Reading answers the server's pings.
/// Its socket retries EINTR (see `support::eintr`).
pub struct Chat {
    pub ws: WebSocket<Restarting>,
    /// For failure messages.
    pub label: String,
}

/// What a read produced, for tests that expect the connection to end.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    Close(Option<(u16, String)>),
    Ping,
}

impl Chat {
    /// Opens `path` (handshake must succeed with 101). Reads nothing.
    pub fn open(addr: SocketAddr, path: &str) -> Chat {
        let url = format!("ws://{addr}{path}");
        match tungstenite::client(url.as_str(), Restarting(tcp(addr))) {
            Ok((ws, resp)) => {
                assert_eq!(resp.status().as_u16(), 101, "handshake status for {url}");
                Chat {
                    ws,
                    label: path.to_string(),
                }
            }
            Err(HandshakeError::Failure(e)) => panic!("handshake with {url} failed: {e}"),
            Err(HandshakeError::Interrupted(_)) => panic!("handshake with {url} timed out"),
        }
    }

    /// Joins as `name` and checks the welcome; returns the client and the welcome.
    pub fn join(addr: SocketAddr, name: &str) -> (Chat, Value) {
        let mut c = Chat::open(addr, &ws_path(name));
        c.label = name.to_string();
        let welcome = c.recv_type("welcome", "first message after joining");
        assert_eq!(welcome["username"], json!(name), "welcome names the user");
        (c, welcome)
    }

    /// Joins as `name`; the welcome must be the one for `name`.
    pub fn joined(addr: SocketAddr, name: &str) -> Chat {
        Chat::join(addr, name).0
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .unwrap_or_else(|e| panic!("{}: sending {text:?} failed: {e}", self.label));
    }

    pub fn send(&mut self, v: Value) {
        self.send_text(&v.to_string());
    }

    pub fn public(&mut self, body: &str) {
        self.send(json!({"type": "public", "body": body}));
    }

    pub fn private(&mut self, to: &str, body: &str) {
        self.send(json!({"type": "private", "to": to, "body": body}));
    }

    /// The next event (pings are reported, pongs skipped).
    pub fn event(&mut self, context: &str) -> Event {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!(
                            "{}: {context}: server sent invalid JSON {t:?}: {e}",
                            self.label
                        )
                    });
                    return Event::Json(v);
                }
                Ok(Message::Binary(b)) => {
                    panic!(
                        "{}: {context}: server sent a binary message {b:?}",
                        self.label
                    )
                }
                Ok(Message::Ping(_)) => return Event::Ping,
                Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {}
                Ok(Message::Close(frame)) => {
                    return Event::Close(frame.map(|f| (u16::from(f.code), f.reason.to_string())))
                }
                Err(e) => panic!("{}: {context}: read failed: {e}", self.label),
            }
        }
    }

    /// The next JSON message, skipping pings (within [`IO_TIMEOUT`], so a
    /// server that only pings cannot keep the test waiting forever).
    pub fn recv(&mut self, context: &str) -> Value {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "{}: {context}: only pings for {IO_TIMEOUT:?}, no message",
                self.label
            );
            match self.event(context) {
                Event::Json(v) => return v,
                Event::Ping => {}
                Event::Close(c) => panic!(
                    "{}: {context}: expected a message, the server closed with {c:?}",
                    self.label
                ),
            }
        }
    }

    /// The next JSON message, which must have `"type": kind`.
    pub fn recv_type(&mut self, kind: &str, context: &str) -> Value {
        let v = self.recv(context);
        assert_eq!(
            v["type"],
            json!(kind),
            "{}: {context}: expected a {kind} message, got {v}",
            self.label
        );
        v
    }

    /// The next message must be an error with `code` (and a message text).
    pub fn recv_error(&mut self, code: &str, context: &str) -> Value {
        let v = self.recv_type("error", context);
        assert_eq!(v["code"], json!(code), "{}: {context}: {v}", self.label);
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: {context}: error without a message text: {v}",
            self.label
        );
        v
    }

    /// Asks for the user list and returns the answer.
    pub fn users(&mut self, context: &str) -> Value {
        self.send(json!({"type": "users"}));
        self.recv_type("users", context)
    }

    /// The next thing must be a close frame with `code` (and `reason`, if
    /// given), after which the connection ends.
    pub fn expect_close(&mut self, code: u16, reason: Option<&str>, context: &str) {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "{}: {context}: only pings for {IO_TIMEOUT:?}, no close {code}",
                self.label
            );
            match self.event(context) {
                Event::Ping => {}
                Event::Json(v) => panic!(
                    "{}: {context}: expected close {code}, got message {v}",
                    self.label
                ),
                Event::Close(None) => panic!(
                    "{}: {context}: expected close {code}, got a close frame without a code",
                    self.label
                ),
                Event::Close(Some((got, why))) => {
                    assert_eq!(
                        got, code,
                        "{}: {context}: close code (reason {why:?})",
                        self.label
                    );
                    if let Some(reason) = reason {
                        assert_eq!(why, reason, "{}: {context}: close reason", self.label);
                    }
                    break;
                }
            }
        }
        // tungstenite answers the close; the server then ends the connection.
        for _ in 0..100 {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => return,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return
                }
                Err(e) => panic!(
                    "{}: {context}: after the close frame, expected the end of the connection, got {e}",
                    self.label
                ),
            }
        }
        panic!(
            "{}: {context}: server kept sending after its close",
            self.label
        );
    }

    /// Client-initiated close; waits for the server's answer.
    pub fn close(mut self) {
        self.ws
            .close(None)
            .unwrap_or_else(|e| panic!("{}: starting the close failed: {e}", self.label));
        for _ in 0..1000 {
            match self.ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed) => return,
                Err(e) => panic!("{}: closing handshake failed: {e}", self.label),
            }
        }
        panic!(
            "{}: server never finished the closing handshake",
            self.label
        );
    }
}

// ---------------------------------------------------------------------------
// Raw-socket client
// ---------------------------------------------------------------------------

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One frame from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn close_code(&self) -> Option<u16> {
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or(&[])).into_owned()
    }

    pub fn json(&self) -> Value {
        assert_eq!(self.opcode, OP_TEXT, "expected a text frame, got {self:?}");
        serde_json::from_slice(&self.payload).expect("server text frame is JSON")
    }
}

#[derive(Debug)]
pub enum RawRead {
    Frame(Frame),
    /// The server ended the TCP connection (EOF or reset) before a frame.
    Closed,
}

/// A client on a bare `TcpStream`: it does the opening handshake by hand and
/// then reads or writes only when the test says so (it never answers pings).
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    /// Handshakes on `path`, expecting 101.
    pub fn open(addr: SocketAddr, path: &str) -> Raw {
        let mut stream = tcp(addr);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .expect("write the upgrade request");
        // Byte by byte, so nothing after the head is consumed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = retry(|| stream.read(&mut byte)).expect("read the handshake response");
            assert_eq!(n, 1, "server closed during the handshake: {head:?}");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101 Switching Protocols, got {head:?}"
        );
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "wrong Sec-WebSocket-Accept in {head:?}"
        );
        Raw { stream }
    }

    /// Joins as `name` and reads the welcome.
    pub fn join(addr: SocketAddr, name: &str) -> Raw {
        let mut raw = Raw::open(addr, &ws_path(name));
        let welcome = raw.expect_json("welcome of a raw client");
        assert_eq!(
            welcome["type"], "welcome",
            "raw client's first message: {welcome}"
        );
        assert_eq!(welcome["username"], json!(name), "raw client's welcome");
        raw
    }

    fn read_exact(&mut self, buf: &mut [u8], first: bool) -> io::Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) if first && filled == 0 => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "EOF inside a frame",
                    ))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads one frame; EOF or reset before it is `Closed`. Panics on timeout.
    pub fn read(&mut self, context: &str) -> RawRead {
        let mut h = [0u8; 2];
        match self.read_exact(&mut h, true) {
            Ok(true) => {}
            Ok(false) => return RawRead::Closed,
            Err(e) if is_reset(&e) => return RawRead::Closed,
            Err(e) => panic!("{context}: reading a frame header failed: {e}"),
        }
        assert_eq!(h[1] & 0x80, 0, "{context}: server frame is masked");
        assert_eq!(h[0] & 0x70, 0, "{context}: server frame has RSV bits");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.read_exact(&mut b, false)
                    .unwrap_or_else(|e| panic!("{context}: frame length: {e}"));
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                self.read_exact(&mut b, false)
                    .unwrap_or_else(|e| panic!("{context}: frame length: {e}"));
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        assert!(len < 64 << 20, "{context}: absurd frame length {len}");
        let mut payload = vec![0u8; len as usize];
        match self.read_exact(&mut payload, false) {
            Ok(_) => {}
            Err(e) if is_reset(&e) => return RawRead::Closed,
            Err(e) => panic!("{context}: reading a {len}-byte payload failed: {e}"),
        }
        RawRead::Frame(Frame {
            fin: h[0] & 0x80 != 0,
            opcode: h[0] & 0x0f,
            payload,
        })
    }

    pub fn frame(&mut self, context: &str) -> Frame {
        match self.read(context) {
            RawRead::Frame(f) => f,
            RawRead::Closed => panic!("{context}: connection ended, expected a frame"),
        }
    }

    /// The next data message as JSON (pings skipped, never answered).
    pub fn expect_json(&mut self, context: &str) -> Value {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "{context}: only pings for {IO_TIMEOUT:?}, no message"
            );
            let f = self.frame(context);
            match f.opcode {
                OP_PING | OP_PONG => {}
                OP_TEXT => {
                    assert!(f.fin, "{context}: chat messages are single frames");
                    return f.json();
                }
                _ => panic!(
                    "{context}: expected a text frame, got opcode {:#x} (close code {:?} {:?})",
                    f.opcode,
                    f.close_code(),
                    f.close_reason()
                ),
            }
        }
    }

    /// Sends a masked frame.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.stream
            .write_all(&client_frame(opcode, payload))
            .expect("write a frame");
    }

    /// Waits (up to `timeout`) for the end of the TCP connection, ignoring
    /// whatever else arrives.
    pub fn expect_eof(&mut self, timeout: Duration, context: &str) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{context}: connection still open after {timeout:?}"
            );
            self.stream
                .set_read_timeout(Some(left))
                .expect("set read timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_reset(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("{context}: read failed while waiting for EOF: {e}"),
            }
        }
    }
}

/// One final, masked frame as a client sends it (to batch several into
/// one write).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x13, 0xc7, 0x2e];
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n <= 125 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}
