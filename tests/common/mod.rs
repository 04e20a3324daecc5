//! Shared helpers for the black-box integration tests of the `wschat` binary.
//!
//! Everything here talks to the real binary through real sockets: spawning
//! the server, building raw (masked) client frames, parsing server frames,
//! and doing raw HTTP exchanges.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

use crate::support::eintr::Restarting;
use crate::support::spawn::{self, Spawned};

pub use crate::support::spawn::bin;

/// Read/write timeout for every socket operation in the tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a process that is expected to fail may take to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The sample key from RFC 6455 section 1.3.
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The accept value RFC 6455 gives for [`SAMPLE_KEY`].
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Mask used by default for client frames (all bytes non-zero so an
/// implementation that ignores the mask produces garbage).
pub const DEFAULT_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

// ---------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------

/// A running `wschat` child process, killed on drop.
pub struct Server {
    process: Spawned,
    pub addr: SocketAddr,
    echo: bool,
}

impl Server {
    /// Starts `wschat --listen 127.0.0.1:0 --data-dir none <extra...>` and
    /// waits for the `listening on` line.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_in(&[], extra)
    }

    /// [`Server::start`] with these environment variables added to the
    /// server's environment.
    pub fn start_in(env: &[(&str, &str)], extra: &[&str]) -> Server {
        let mut cmd = Command::new(spawn::bin());
        cmd.args(spawn::TEST_FLAGS)
            .args(extra)
            .envs(env.iter().copied());
        let process = spawn::start_command(cmd, spawn::AfterListening::KeepReading);
        Server {
            addr: process.addr,
            process,
            echo: extra.contains(&"--echo"),
        }
    }

    /// `wschat --echo` plus extra flags.
    pub fn echo(extra: &[&str]) -> Server {
        let mut all = vec!["--echo"];
        all.extend_from_slice(extra);
        Server::start(&all)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Lines captured from the server's stderr so far.
    pub fn logs(&self) -> Vec<String> {
        self.process.log.lines()
    }

    /// Asserts the process is still running, answers `/healthz`, and (for
    /// `--echo` servers) that a fresh tungstenite client gets its echo.
    pub fn assert_serving(&mut self) {
        if let Some(status) = self.process.child.try_wait().expect("try_wait on wschat") {
            panic!(
                "wschat exited unexpectedly ({status}); stderr:\n{}",
                self.logs().join("\n")
            );
        }
        let resp = http_request(self.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(
            resp.status, 200,
            "server no longer answers /healthz after the previous client: {resp:?}"
        );
        if self.echo {
            assert_echo_works(self.addr);
        }
        let logs = self.logs();
        assert!(
            !logs.iter().any(|l| l.contains("panicked")),
            "server logged a panic:\n{}",
            logs.join("\n")
        );
    }
}

impl Server {
    /// Sends SIGTERM, as a service manager stopping the server does.
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.process.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill only sends a signal, to a child this test owns.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "kill -TERM {pid}: {}", io::Error::last_os_error());
    }

    /// The exit status, once the process exits by itself within `timeout`.
    pub fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.process.child.try_wait().expect("try_wait on wschat") {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.process.stop();
        if !thread::panicking() {
            let logs = self.logs();
            if logs.iter().any(|l| l.contains("panicked")) {
                panic!("server logged a panic:\n{}", logs.join("\n"));
            }
        }
    }
}

/// Result of a wschat run that is expected to terminate by itself.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stderr: String,
}

impl Exit {
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// Runs `wschat <args>` and waits for it to exit (killing it and failing if
/// it is still running after [`EXIT_TIMEOUT`]).
pub fn run_to_exit(args: &[&str]) -> Exit {
    run_to_exit_in(&[], args)
}

/// [`run_to_exit`] with these environment variables added to wschat's.
pub fn run_to_exit_in(env: &[(&str, &str)], args: &[&str]) -> Exit {
    let mut child = Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the wschat binary");
    let mut stderr = child.stderr.take().expect("child stderr is piped");
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stderr.read_to_end(&mut out);
        let _ = tx.send(());
        String::from_utf8_lossy(&out).into_owned()
    });
    if rx.recv_timeout(EXIT_TIMEOUT).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let text = reader.join().unwrap_or_default();
        panic!("wschat {args:?} did not exit within {EXIT_TIMEOUT:?}; stderr:\n{text}");
    }
    let stderr = reader.join().expect("stderr reader thread");
    let status = child.wait().expect("wait for wschat");
    Exit { status, stderr }
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to wschat");
    s.set_read_timeout(Some(IO_TIMEOUT))
        .expect("set read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("set write timeout");
    s.set_nodelay(true).expect("set TCP_NODELAY");
    s
}

/// Writes `bytes` one byte per `write` call (TCP_NODELAY is on, so each one
/// is its own segment), optionally pausing `pace` between bytes.
pub fn write_bytewise(stream: &mut TcpStream, bytes: &[u8], pace: Duration) {
    for (i, b) in bytes.iter().enumerate() {
        stream
            .write_all(std::slice::from_ref(b))
            .unwrap_or_else(|e| panic!("writing byte {i} of {} failed: {e}", bytes.len()));
        if !pace.is_zero() {
            thread::sleep(pace);
        }
    }
}

/// Like [`write_bytewise`] but stops at the first write error (the server
/// may legitimately close as soon as it has seen a bad byte).
pub fn try_write_bytewise(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    for b in bytes {
        stream.write_all(std::slice::from_ref(b))?;
    }
    Ok(())
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
    )
}

/// Reads until the peer closes (EOF or reset). Returns the bytes received.
/// Fails if nothing closes the connection within `timeout`.
pub fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!(
                "connection not closed by the server within {timeout:?} (received {} bytes: {:?})",
                out.len(),
                String::from_utf8_lossy(&out)
            );
        }
        stream
            .set_read_timeout(Some(left))
            .expect("set read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if is_reset(&e) => return out,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("read while waiting for the server to close: {e}"),
        }
    }
}

/// Asserts the server closes the TCP connection without sending anything
/// more (used after a close frame).
pub fn expect_eof(stream: &mut TcpStream) {
    let rest = read_until_closed(stream, IO_TIMEOUT);
    assert!(
        rest.is_empty(),
        "server sent {} unexpected bytes before closing the TCP connection: {:02x?}",
        rest.len(),
        &rest[..rest.len().min(64)]
    );
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub reason: String,
    pub version: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    /// True if some header `name` has a comma-separated token equal (case
    /// insensitively) to `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads a response head byte by byte (so no byte after the blank line is
/// consumed) and parses it. The body is left empty.
pub fn read_response_head(stream: &mut TcpStream) -> HttpResponse {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "server closed the connection before a complete response head; got {:?}",
                String::from_utf8_lossy(&head)
            ),
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "reading response head failed ({e}); got so far {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
        assert!(
            head.len() <= 64 * 1024,
            "response head larger than 64 KiB: {:?}",
            String::from_utf8_lossy(&head[..256])
        );
    }
    parse_head(&head)
}

fn parse_head(head: &[u8]) -> HttpResponse {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        other => panic!(
            "unparsable response head ({other:?}): {:?}",
            String::from_utf8_lossy(head)
        ),
    }
    HttpResponse {
        status: resp.code.expect("status code"),
        reason: resp.reason.unwrap_or("").to_string(),
        version: resp.version.expect("http version"),
        headers: resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).trim().to_string(),
                )
            })
            .collect(),
        body: Vec::new(),
    }
}

/// For a non-101 response whose head was already read: reads the body until
/// the server closes the socket and checks the `Connection: close` contract.
pub fn finish_error_response(stream: &mut TcpStream, mut resp: HttpResponse) -> HttpResponse {
    assert_ne!(resp.status, 101, "finish_error_response on a 101");
    let body = read_until_closed(stream, IO_TIMEOUT);
    if let Some(cl) = resp.header("Content-Length") {
        let cl: usize = cl
            .parse()
            .unwrap_or_else(|e| panic!("bad Content-Length {cl:?}: {e}"));
        assert_eq!(
            body.len(),
            cl,
            "body length differs from Content-Length in {resp:?} (body {:?})",
            String::from_utf8_lossy(&body)
        );
    }
    resp.body = body;
    assert!(
        resp.has_token("Connection", "close"),
        "{} response lacks `Connection: close`: {resp:?}",
        resp.status
    );
    resp
}

/// Sends `raw` on a fresh connection and reads the response. For any status
/// other than 101 it reads the body until EOF and asserts `Connection: close`
/// plus the server closing the socket.
pub fn http_request(addr: SocketAddr, raw: &[u8]) -> HttpResponse {
    let mut s = connect(addr);
    s.write_all(raw).expect("write HTTP request");
    let resp = read_response_head(&mut s);
    if resp.status == 101 {
        return resp;
    }
    finish_error_response(&mut s, resp)
}

/// Like [`http_request`] but expects a non-101 answer (fails otherwise).
pub fn http_error(addr: SocketAddr, raw: &[u8]) -> HttpResponse {
    let resp = http_request(addr, raw);
    assert_ne!(
        resp.status,
        101,
        "request was upgraded but should have been rejected: {:?}",
        String::from_utf8_lossy(raw)
    );
    resp
}

/// An upgrade request for `path` with the standard headers (key =
/// [`SAMPLE_KEY`]) plus `extra` raw header lines (each without CRLF).
pub fn upgrade_request(path: &str, extra: &[&str]) -> String {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Builds a request from a request line and a full list of header lines.
pub fn raw_request(request_line: &str, headers: &[&str]) -> String {
    let mut req = format!("{request_line}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Asserts `resp` is a correct 101 for a request made with `key`.
pub fn assert_switching(resp: &HttpResponse, key: &str) {
    assert_eq!(resp.status, 101, "expected 101, got {resp:?}");
    assert_eq!(resp.version, 1, "101 must be HTTP/1.1: {resp:?}");
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    assert_eq!(
        resp.header("Sec-WebSocket-Accept"),
        Some(expected.as_str()),
        "wrong or missing Sec-WebSocket-Accept: {resp:?}"
    );
    assert!(
        resp.has_token("Upgrade", "websocket"),
        "101 lacks `Upgrade: websocket`: {resp:?}"
    );
    assert!(
        resp.has_token("Connection", "upgrade"),
        "101 lacks `Connection: Upgrade`: {resp:?}"
    );
    assert!(
        !resp.has_header("Sec-WebSocket-Protocol"),
        "101 must not select a subprotocol: {resp:?}"
    );
    assert!(
        !resp.has_header("Sec-WebSocket-Extensions"),
        "101 must not accept extensions: {resp:?}"
    );
}

/// Opens a raw WebSocket connection on `/ws` (handshake verified).
pub fn ws_raw(addr: SocketAddr) -> TcpStream {
    ws_raw_request(addr, &upgrade_request("/ws", &[]))
}

/// Sends `request` (which must be a valid upgrade with [`SAMPLE_KEY`]) and
/// returns the upgraded stream.
pub fn ws_raw_request(addr: SocketAddr, request: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(request.as_bytes())
        .expect("write upgrade request");
    let resp = read_response_head(&mut s);
    assert_switching(&resp, SAMPLE_KEY);
    s
}

pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = [
            ALPHABET[(n >> 18) as usize & 63],
            ALPHABET[(n >> 12) as usize & 63],
            ALPHABET[(n >> 6) as usize & 63],
            ALPHABET[n as usize & 63],
        ];
        let keep = chunk.len() + 1;
        for (i, c) in chars.iter().enumerate() {
            out.push(if i < keep { *c as char } else { '=' });
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Client frames
// ---------------------------------------------------------------------------

/// How the payload length is encoded in a client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LenForm {
    /// The shortest legal encoding.
    Minimal,
    /// Always the 126 + 16-bit form.
    Len16,
    /// Always the 127 + 64-bit form.
    Len64,
}

/// A client frame with full control over every header bit.
#[derive(Debug, Clone)]
pub struct ClientFrame {
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits (RSV1 = 0b100).
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload: Vec<u8>,
    pub len_form: LenForm,
    /// Length written into the header instead of `payload.len()`.
    pub declared_len: Option<u64>,
}

impl ClientFrame {
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> Self {
        ClientFrame {
            fin: true,
            rsv: 0,
            opcode,
            mask: Some(DEFAULT_MASK),
            payload: payload.into(),
            len_form: LenForm::Minimal,
            declared_len: None,
        }
    }
    pub fn text(payload: impl Into<Vec<u8>>) -> Self {
        Self::new(OP_TEXT, payload)
    }
    pub fn binary(payload: impl Into<Vec<u8>>) -> Self {
        Self::new(OP_BINARY, payload)
    }
    pub fn cont(payload: impl Into<Vec<u8>>) -> Self {
        Self::new(OP_CONT, payload)
    }
    pub fn ping(payload: impl Into<Vec<u8>>) -> Self {
        Self::new(OP_PING, payload)
    }
    pub fn pong(payload: impl Into<Vec<u8>>) -> Self {
        Self::new(OP_PONG, payload)
    }
    /// Close frame with a code and reason.
    pub fn close(code: u16, reason: &[u8]) -> Self {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        Self::new(OP_CLOSE, p)
    }
    pub fn fin(mut self, fin: bool) -> Self {
        self.fin = fin;
        self
    }
    pub fn rsv(mut self, rsv: u8) -> Self {
        self.rsv = rsv;
        self
    }
    pub fn unmasked(mut self) -> Self {
        self.mask = None;
        self
    }
    pub fn mask(mut self, mask: [u8; 4]) -> Self {
        self.mask = Some(mask);
        self
    }
    pub fn len_form(mut self, form: LenForm) -> Self {
        self.len_form = form;
        self
    }
    pub fn declared_len(mut self, len: u64) -> Self {
        self.declared_len = Some(len);
        self
    }

    /// The frame header (including the masking key, if any).
    pub fn header(&self) -> Vec<u8> {
        let len = self.declared_len.unwrap_or(self.payload.len() as u64);
        let mut out = Vec::with_capacity(14);
        out.push(((self.fin as u8) << 7) | ((self.rsv & 0x7) << 4) | (self.opcode & 0xF));
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let form = match self.len_form {
            LenForm::Minimal if len <= 125 => 0,
            LenForm::Minimal if len <= 0xFFFF => 16,
            LenForm::Minimal => 64,
            LenForm::Len16 => 16,
            LenForm::Len64 => 64,
        };
        match form {
            0 => out.push(mask_bit | len as u8),
            16 => {
                assert!(len <= 0xFFFF, "length {len} does not fit the 16-bit form");
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        if let Some(m) = self.mask {
            out.extend_from_slice(&m);
        }
        out
    }

    /// The payload as it goes on the wire (masked if a mask is set).
    pub fn wire_payload(&self) -> Vec<u8> {
        match self.mask {
            Some(m) => self
                .payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ m[i % 4])
                .collect(),
            None => self.payload.clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header();
        out.extend_from_slice(&self.wire_payload());
        out
    }
}

/// Writes a frame in a single `write_all`.
pub fn send(stream: &mut TcpStream, frame: &ClientFrame) {
    stream
        .write_all(&frame.encode())
        .unwrap_or_else(|e| panic!("sending frame {frame:?} failed: {e}"));
}

/// Writes raw bytes in a single `write_all`.
pub fn send_raw(stream: &mut TcpStream, bytes: &[u8]) {
    stream
        .write_all(bytes)
        .unwrap_or_else(|e| panic!("sending {} raw bytes failed: {e}", bytes.len()));
}

// ---------------------------------------------------------------------------
// Server frames
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    /// The (unmasked) payload.
    pub payload: Vec<u8>,
    /// Header length on the wire (2, 4 or 10, +4 if masked).
    pub header_len: usize,
}

impl ServerFrame {
    pub fn close_code(&self) -> Option<u16> {
        if self.payload.len() >= 2 {
            Some(u16::from_be_bytes([self.payload[0], self.payload[1]]))
        } else {
            None
        }
    }
}

#[derive(Debug)]
pub enum ReadError {
    /// Clean EOF before the first byte of a frame.
    Eof,
    /// No (complete) frame within the read timeout.
    Timeout,
    Io(io::Error),
}

fn read_exact_mapped(stream: &mut TcpStream, buf: &mut [u8], first: bool) -> Result<(), ReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) if first && filled == 0 => return Err(ReadError::Eof),
            Ok(0) => {
                return Err(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF in the middle of a frame",
                )))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(ReadError::Timeout),
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

/// Reads one server frame (the stream's read timeout applies per read).
pub fn read_frame(stream: &mut TcpStream) -> Result<ServerFrame, ReadError> {
    let mut h = [0u8; 2];
    read_exact_mapped(stream, &mut h, true)?;
    let fin = h[0] & 0x80 != 0;
    let rsv = (h[0] >> 4) & 0x7;
    let opcode = h[0] & 0xF;
    let masked = h[1] & 0x80 != 0;
    let mut header_len = 2;
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            read_exact_mapped(stream, &mut b, false)?;
            header_len += 2;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            read_exact_mapped(stream, &mut b, false)?;
            header_len += 8;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    assert!(
        len <= 64 * 1024 * 1024,
        "server frame declares absurd length {len}"
    );
    let mut mask = [0u8; 4];
    if masked {
        read_exact_mapped(stream, &mut mask, false)?;
        header_len += 4;
    }
    let mut payload = vec![0u8; len as usize];
    read_exact_mapped(stream, &mut payload, false)?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(ServerFrame {
        fin,
        rsv,
        opcode,
        masked,
        payload,
        header_len,
    })
}

/// Reads one frame, failing with `context` if none arrives; also checks that
/// server frames are never masked and never set RSV bits.
pub fn expect_frame(stream: &mut TcpStream, context: &str) -> ServerFrame {
    let f = match read_frame(stream) {
        Ok(f) => f,
        Err(e) => panic!("{context}: expected a frame from the server, got {e:?}"),
    };
    assert!(!f.masked, "{context}: server frame is masked: {f:?}");
    assert_eq!(f.rsv, 0, "{context}: server frame has RSV bits set: {f:?}");
    f
}

/// Reads one complete data message (assembling fragments). Fails on any
/// control frame, so tests see exactly what arrives.
pub fn expect_message(stream: &mut TcpStream, context: &str) -> (u8, Vec<u8>) {
    let first = expect_frame(stream, context);
    assert!(
        first.opcode == OP_TEXT || first.opcode == OP_BINARY,
        "{context}: expected a text/binary frame, got opcode {:#x} (close code {:?}, payload {:?})",
        first.opcode,
        first.close_code(),
        String::from_utf8_lossy(&first.payload)
    );
    let opcode = first.opcode;
    let mut data = first.payload;
    let mut fin = first.fin;
    while !fin {
        let f = expect_frame(stream, context);
        assert_eq!(
            f.opcode, OP_CONT,
            "{context}: expected a continuation frame, got {f:?}"
        );
        data.extend_from_slice(&f.payload);
        fin = f.fin;
    }
    (opcode, data)
}

pub fn expect_text(stream: &mut TcpStream, expected: &[u8], context: &str) {
    let (op, data) = expect_message(stream, context);
    assert_eq!(op, OP_TEXT, "{context}: echo has the wrong opcode");
    assert!(
        data == expected,
        "{context}: text echo differs: got {} bytes {:?}, want {} bytes {:?}",
        data.len(),
        String::from_utf8_lossy(&data[..data.len().min(80)]),
        expected.len(),
        String::from_utf8_lossy(&expected[..expected.len().min(80)])
    );
}

pub fn expect_binary(stream: &mut TcpStream, expected: &[u8], context: &str) {
    let (op, data) = expect_message(stream, context);
    assert_eq!(op, OP_BINARY, "{context}: echo has the wrong opcode");
    assert!(
        data == expected,
        "{context}: binary echo differs: got {} bytes, want {} bytes",
        data.len(),
        expected.len()
    );
}

/// Expects the next frame to be a close frame with `code`, followed by the
/// server closing the TCP connection.
pub fn expect_close(stream: &mut TcpStream, code: u16, context: &str) {
    let f = expect_frame(stream, context);
    assert_eq!(
        f.opcode,
        OP_CLOSE,
        "{context}: expected close {code}, got frame with opcode {:#x} and payload {:?}",
        f.opcode,
        String::from_utf8_lossy(&f.payload)
    );
    assert!(f.fin, "{context}: close frame without FIN");
    assert_eq!(
        f.close_code(),
        Some(code),
        "{context}: wrong close code (payload {:?})",
        f.payload
    );
    if f.payload.len() > 2 {
        assert!(
            std::str::from_utf8(&f.payload[2..]).is_ok(),
            "{context}: server close reason is not UTF-8"
        );
    }
    expect_eof(stream);
}

/// Opens a raw connection, sends `frames` (one `write` per frame), and
/// expects a close with `code`.
pub fn expect_close_after(addr: SocketAddr, frames: &[ClientFrame], code: u16, context: &str) {
    let mut s = ws_raw(addr);
    for f in frames {
        // The server may close as soon as it has seen the offending header,
        // while the rest of a large payload is still being written: a write
        // error is fine, the close frame must still be readable.
        if s.write_all(&f.encode()).is_err() {
            break;
        }
    }
    expect_close(&mut s, code, context);
}

// ---------------------------------------------------------------------------
// tungstenite clients
// ---------------------------------------------------------------------------

/// A tungstenite client; its socket retries EINTR (see `support::eintr`).
pub type Client = WebSocket<Restarting>;

/// A tungstenite client connected to `path` (timeouts set).
pub fn ws_client(addr: SocketAddr, path: &str) -> Client {
    let stream = Restarting(connect(addr));
    let url = format!("ws://{addr}{path}");
    match tungstenite::client(url.as_str(), stream) {
        Ok((ws, resp)) => {
            assert_eq!(resp.status().as_u16(), 101, "tungstenite handshake status");
            ws
        }
        Err(HandshakeError::Failure(e)) => panic!("tungstenite handshake with {url} failed: {e}"),
        Err(HandshakeError::Interrupted(_)) => {
            panic!("tungstenite handshake with {url} timed out (no response within {IO_TIMEOUT:?})")
        }
    }
}

/// Reads the next text/binary message, skipping pings/pongs.
pub fn read_data(ws: &mut Client, context: &str) -> Message {
    loop {
        match ws.read() {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => return m,
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(other) => panic!("{context}: expected a data message, got {other:?}"),
            Err(e) => panic!("{context}: reading from the server failed: {e}"),
        }
    }
}

/// Performs a client-initiated close and waits for the server's close and
/// the end of the connection.
pub fn close_client(mut ws: Client) {
    let _ = ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }));
    for _ in 0..100 {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => return,
            Err(tungstenite::Error::Io(e)) if is_reset(&e) => return,
            Err(e) => panic!("closing handshake failed: {e}"),
        }
    }
    panic!("server kept sending after the client's close");
}

/// A fresh tungstenite client on `/ws` sends a text message and gets the
/// same text back.
pub fn assert_echo_works(addr: SocketAddr) {
    let mut ws = ws_client(addr, "/ws");
    let text = "still serving \u{2713}";
    ws.send(Message::text(text))
        .expect("send text with a fresh client");
    match read_data(&mut ws, "fresh client echo") {
        Message::Text(t) => assert_eq!(t.as_str(), text, "fresh client echo differs"),
        other => panic!("fresh client got {other:?} instead of a text echo"),
    }
    close_client(ws);
}
