//! The client side of WebSocket on one mio event loop: connect, the opening
//! handshake (with the `Sec-WebSocket-Accept` check), masked frames out,
//! server frames in through wschat's own decoder, pings answered, the
//! closing handshake.
//!
//! Reads are edge-triggered and drain a socket until `WouldBlock`; writes are
//! batched: frames queue on the connection and go out in one `write` per
//! socket per loop turn.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use wschat::handshake::accept_key;
use wschat::ws::frame::{encode_masked, Opcode};
use wschat::ws::{Decoder, Message};

use crate::os::{now_ns, Rng, TimerFd};

/// The largest server message accepted.
const MAX_MESSAGE: usize = 1 << 20;
/// The largest handshake response head.
const MAX_HEAD: usize = 16 * 1024;
const TIMER: Token = Token(usize::MAX - 1);
const READ_BUF: usize = 256 * 1024;

/// Where to connect: a loopback address and the request target.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    host: String,
    /// Path and query, to which `username=NAME` is appended.
    path: String,
}

impl Target {
    /// Parses `ws://HOST[:PORT][/PATH][?QUERY]`; only loopback hosts.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let mut path = path.to_owned();
        if path.starts_with('?') {
            path.insert(0, '/');
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or("bad IPv6 host")?;
            let port = v6[end + 1..].strip_prefix(':').unwrap_or("80");
            (&v6[..end], port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p),
                None => (authority, "80"),
            }
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{url}: bad port {port:?}"))?;
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {host}: {e}"))?
            .collect();
        let addr = addrs
            .iter()
            .copied()
            .find(|a| a.ip().is_loopback())
            .ok_or_else(|| {
                format!("{url}: refusing a non-loopback target (only 127.0.0.0/8 and ::1)")
            })?;
        if addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "{url}: refusing a non-loopback target (only 127.0.0.0/8 and ::1)"
            ));
        }
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str("username=");
        Ok(Target {
            addr,
            host: authority.to_owned(),
            path,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Handshake,
    Open,
    /// We sent a close frame and wait for the server's.
    Closing,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The closing handshake we started completed.
    Clean,
    /// The server closed first (with its close code, if any).
    ByServer(Option<u16>),
    /// TCP end of stream without a close frame.
    Eof,
    Io(ErrorKind),
    /// The server broke RFC 6455.
    Protocol(&'static str),
    /// The handshake failed (status line or why).
    Handshake(String),
}

pub struct Conn {
    stream: TcpStream,
    state: State,
    /// What the application calls this connection.
    pub tag: usize,
    name: String,
    key: [u8; 24],
    head: Vec<u8>,
    decoder: Decoder,
    out: Vec<u8>,
    out_pos: usize,
    /// The last write hit `WouldBlock`: wait for a writable event.
    blocked: bool,
    /// Listed in `Net::dirty`.
    dirty: bool,
    /// Connected to `Net::second`'s target.
    second: bool,
}

/// What a connection reports to the application.
pub trait App {
    fn on_open(&mut self, _net: &mut Net, _id: usize, _tag: usize, _now: u64) {}
    fn on_text(&mut self, net: &mut Net, id: usize, tag: usize, text: &[u8], now: u64);
    fn on_end(&mut self, _net: &mut Net, _id: usize, _tag: usize, _why: &Ended) {}
}

/// Counters the event loop keeps itself.
#[derive(Debug, Default, Clone)]
pub struct NetStats {
    pub opened: u64,
    pub handshake_failures: u64,
    pub protocol_errors: u64,
    pub io_errors: u64,
    pub closed_by_server: u64,
    pub eofs: u64,
    pub clean_closes: u64,
    pub pings: u64,
    pub binary: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub frames_out: u64,
    pub writes: u64,
    pub reads: u64,
    /// The first few failure descriptions, for the report.
    pub failures: Vec<String>,
}

impl NetStats {
    fn note(&mut self, what: String) {
        if self.failures.len() < 5 {
            self.failures.push(what);
        }
    }
}

pub struct Net {
    poll: Poll,
    events: Events,
    ready: Vec<(usize, bool, bool)>,
    pub conns: Slab<Conn>,
    dirty: Vec<usize>,
    flushing: Vec<usize>,
    rbuf: Vec<u8>,
    target: Target,
    /// Another server: connections with tags below the number go there
    /// (the receivers of `private --receiver-url`, on another cluster node).
    pub second: Option<(Target, usize)>,
    pub rng: Rng,
    timer: Option<TimerFd>,
    /// Handshakes started and not yet finished.
    pub handshaking: usize,
    pub stats: NetStats,
    scratch: Vec<u8>,
}

impl Net {
    pub fn new(target: Target) -> io::Result<Net> {
        Ok(Net {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            ready: Vec::with_capacity(1024),
            conns: Slab::new(),
            dirty: Vec::new(),
            flushing: Vec::new(),
            rbuf: vec![0; READ_BUF],
            target,
            second: None,
            rng: Rng::seeded(),
            timer: None,
            handshaking: 0,
            stats: NetStats::default(),
            scratch: Vec::new(),
        })
    }

    /// A timer fd in the poll, for precise schedules (see [`Net::wake_at`]).
    pub fn enable_timer(&mut self) -> io::Result<()> {
        let timer = TimerFd::new()?;
        self.poll.registry().register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&timer)),
            TIMER,
            Interest::READABLE,
        )?;
        self.timer = Some(timer);
        Ok(())
    }

    /// Wakes the poll at monotonic time `at_ns`, or at a sooner time asked
    /// for and still to come (needs [`Net::enable_timer`]).
    pub fn wake_at(&mut self, at_ns: u64) {
        if let Some(t) = &mut self.timer {
            t.arm_at(at_ns);
        }
    }

    /// Starts a connection as `name`; the handshake runs in the loop.
    pub fn connect(&mut self, name: &str, tag: usize) -> io::Result<usize> {
        let second = self.second.as_ref().is_some_and(|(_, below)| tag < *below);
        let addr = match &self.second {
            Some((target, _)) if second => target.addr,
            _ => self.target.addr,
        };
        let mut stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let id = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut raw = [0u8; 16];
        self.rng.fill(&mut raw);
        entry.insert(Conn {
            stream,
            state: State::Connecting,
            tag,
            name: name.to_owned(),
            key: base64_16(&raw),
            head: Vec::new(),
            decoder: Decoder::client(),
            out: Vec::new(),
            out_pos: 0,
            blocked: true,
            dirty: false,
            second,
        });
        self.handshaking += 1;
        Ok(id)
    }

    pub fn is_open(&self, id: usize) -> bool {
        self.conns.get(id).is_some_and(|c| c.state == State::Open)
    }

    /// Queues one masked frame; it goes out at the end of the loop turn.
    pub fn send(&mut self, id: usize, opcode: Opcode, payload: &[u8]) {
        let mask = self.rng.mask();
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if conn.state != State::Open && opcode != Opcode::Close {
            return;
        }
        let frame = encode_masked(opcode, payload, mask);
        conn.out.extend_from_slice(&frame);
        self.stats.frames_out += 1;
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(id);
        }
    }

    pub fn send_text(&mut self, id: usize, payload: &[u8]) {
        self.send(id, Opcode::Text, payload);
    }

    /// Starts the closing handshake (code 1000).
    pub fn close(&mut self, id: usize) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if conn.state != State::Open {
            return;
        }
        self.send(id, Opcode::Close, &1000u16.to_be_bytes());
        if let Some(conn) = self.conns.get_mut(id) {
            conn.state = State::Closing;
        }
    }

    /// One loop turn: wait for readiness (at most `timeout`; not at all while
    /// output is waiting), handle every ready socket, then flush.
    pub fn turn(&mut self, app: &mut impl App, timeout: Duration) -> io::Result<()> {
        let timeout = if self.dirty.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        for event in self.events.iter() {
            if event.token() == TIMER {
                if let Some(t) = &mut self.timer {
                    t.clear();
                }
                continue;
            }
            let readable = event.is_readable() || event.is_read_closed() || event.is_error();
            let writable = event.is_writable() || event.is_error();
            ready.push((event.token().0, readable, writable));
        }
        let mut rbuf = std::mem::take(&mut self.rbuf);
        for &(id, readable, writable) in &ready {
            if writable {
                self.on_writable(app, id);
            }
            if readable {
                self.on_readable(app, id, &mut rbuf);
            }
        }
        self.rbuf = rbuf;
        self.ready = ready;
        self.flush(app);
        Ok(())
    }

    fn on_writable(&mut self, app: &mut impl App, id: usize) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        conn.blocked = false;
        if conn.state == State::Connecting {
            if let Ok(Some(e)) | Err(e) = conn.stream.take_error() {
                self.end(app, id, Ended::Handshake(format!("connect: {e}")));
                return;
            }
            match conn.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => return,
                Err(e) => {
                    self.end(app, id, Ended::Handshake(format!("connect: {e}")));
                    return;
                }
            }
            conn.state = State::Handshake;
            let key = std::str::from_utf8(&conn.key).unwrap_or_default();
            let target = match &self.second {
                Some((target, _)) if conn.second => target,
                _ => &self.target,
            };
            let request = format!(
                "GET {}{} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
                target.path, conn.name, target.host
            );
            conn.out.extend_from_slice(request.as_bytes());
        }
        if conn.out.len() > conn.out_pos && !conn.dirty {
            conn.dirty = true;
            self.dirty.push(id);
        }
    }

    fn on_readable(&mut self, app: &mut impl App, id: usize, rbuf: &mut [u8]) {
        loop {
            let Some(conn) = self.conns.get_mut(id) else {
                return;
            };
            if conn.state == State::Connecting {
                return;
            }
            let n = match conn.stream.read(rbuf) {
                Ok(0) => {
                    let why = if conn.state == State::Handshake {
                        Ended::Handshake("connection closed during the handshake".into())
                    } else {
                        Ended::Eof
                    };
                    self.end(app, id, why);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.end(app, id, Ended::Io(e.kind()));
                    return;
                }
            };
            let now = now_ns();
            self.stats.reads += 1;
            self.stats.bytes_in += n as u64;
            if conn.state == State::Handshake {
                conn.head.extend_from_slice(&rbuf[..n]);
                match self.finish_handshake(id) {
                    Err(why) => {
                        self.end(app, id, Ended::Handshake(why));
                        return;
                    }
                    Ok(None) => continue,
                    Ok(Some(rest)) => {
                        let tag = self.conns[id].tag;
                        app.on_open(self, id, tag, now);
                        if !rest.is_empty() {
                            let mut rest = rest;
                            if !self.on_bytes(app, id, &mut rest, now) {
                                return;
                            }
                        }
                    }
                }
            } else if !self.on_bytes(app, id, &mut rbuf[..n], now) {
                return;
            }
        }
    }

    /// Checks the response head once complete; returns the bytes after it.
    fn finish_handshake(&mut self, id: usize) -> Result<Option<Vec<u8>>, String> {
        let conn = &mut self.conns[id];
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(&conn.head) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if conn.head.len() > MAX_HEAD => {
                return Err("response head too large".into())
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("bad response: {e}")),
        };
        if response.code != Some(101) {
            let line = conn.head.split(|&b| b == b'\r').next().unwrap_or_default();
            return Err(format!("status {}", String::from_utf8_lossy(line)));
        }
        let expected = accept_key(&conn.key);
        let accept = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|h| h.value.trim_ascii());
        if accept != Some(&expected[..]) {
            return Err("wrong or missing Sec-WebSocket-Accept".into());
        }
        let rest = conn.head[head_len..].to_vec();
        conn.head = Vec::new();
        conn.state = State::Open;
        self.handshaking -= 1;
        self.stats.opened += 1;
        Ok(Some(rest))
    }

    /// Decodes `bytes` from the server; false if the connection ended.
    fn on_bytes(&mut self, app: &mut impl App, id: usize, bytes: &mut [u8], now: u64) -> bool {
        let Some(conn) = self.conns.get_mut(id) else {
            return false;
        };
        let tag = conn.tag;
        let mut decoder = std::mem::take(&mut conn.decoder);
        let mut pos = 0;
        let mut ended = None;
        while pos < bytes.len() {
            let (used, message) = match decoder.decode(&mut bytes[pos..], MAX_MESSAGE) {
                Ok(ok) => ok,
                Err(e) => {
                    ended = Some(Ended::Protocol(e.reason()));
                    break;
                }
            };
            pos += used;
            match message {
                None => {}
                Some(Message::Text(text)) => app.on_text(self, id, tag, text.as_bytes(), now),
                Some(Message::Binary(_)) => self.stats.binary += 1,
                Some(Message::Ping(payload)) => {
                    self.stats.pings += 1;
                    self.scratch.clear();
                    self.scratch.extend_from_slice(payload);
                    let payload = std::mem::take(&mut self.scratch);
                    self.send(id, Opcode::Pong, &payload);
                    self.scratch = payload;
                }
                Some(Message::Pong(_)) => {}
                Some(Message::Close(frame)) => {
                    let code = frame.map(|f| f.code);
                    let closing = self.conns.get(id).map(|c| c.state) == Some(State::Closing);
                    if closing {
                        ended = Some(Ended::Clean);
                    } else {
                        // Echo the code, then let the server finish the TCP close.
                        let payload = code.unwrap_or(1000).to_be_bytes();
                        self.send(
                            id,
                            Opcode::Close,
                            if code.is_some() { &payload } else { &[] },
                        );
                        self.write_now(id);
                        ended = Some(Ended::ByServer(code));
                    }
                    break;
                }
            }
            if !self.conns.contains(id) {
                return false;
            }
        }
        if let Some(why) = ended {
            self.end(app, id, why);
            return false;
        }
        if let Some(conn) = self.conns.get_mut(id) {
            conn.decoder = decoder;
            true
        } else {
            false
        }
    }

    /// Drops a connection and tells the application why.
    fn end(&mut self, app: &mut impl App, id: usize, why: Ended) {
        let Some(mut conn) = self.conns.try_remove(id) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if matches!(conn.state, State::Connecting | State::Handshake) {
            self.handshaking -= 1;
        }
        let s = &mut self.stats;
        match &why {
            Ended::Clean => s.clean_closes += 1,
            Ended::ByServer(code) => {
                s.closed_by_server += 1;
                s.note(format!("{}: server closed ({code:?})", conn.name));
            }
            Ended::Eof => {
                s.eofs += 1;
                s.note(format!(
                    "{}: end of stream without a close frame",
                    conn.name
                ));
            }
            Ended::Io(kind) => {
                s.io_errors += 1;
                s.note(format!("{}: {kind}", conn.name));
            }
            Ended::Protocol(reason) => {
                s.protocol_errors += 1;
                s.note(format!("{}: protocol error: {reason}", conn.name));
            }
            Ended::Handshake(reason) => {
                s.handshake_failures += 1;
                s.note(format!("{}: handshake: {reason}", conn.name));
            }
        }
        app.on_end(self, id, conn.tag, &why);
    }

    fn write_now(&mut self, id: usize) {
        if let Some(conn) = self.conns.get_mut(id) {
            if conn.out.len() > conn.out_pos {
                if let Ok(n) = conn.stream.write(&conn.out[conn.out_pos..]) {
                    conn.out_pos += n;
                }
            }
        }
    }

    /// One write per connection with queued output.
    fn flush(&mut self, app: &mut impl App) {
        let list = std::mem::replace(&mut self.dirty, std::mem::take(&mut self.flushing));
        let mut failed = Vec::new();
        for &id in &list {
            let Some(conn) = self.conns.get_mut(id) else {
                continue;
            };
            conn.dirty = false;
            if conn.blocked || conn.out.len() == conn.out_pos {
                continue;
            }
            match conn.stream.write(&conn.out[conn.out_pos..]) {
                Ok(n) => {
                    self.stats.writes += 1;
                    self.stats.bytes_out += n as u64;
                    conn.out_pos += n;
                    if conn.out_pos == conn.out.len() {
                        conn.out.clear();
                        conn.out_pos = 0;
                    } else {
                        if conn.out_pos > conn.out.len() / 2 {
                            conn.out.drain(..conn.out_pos);
                            conn.out_pos = 0;
                        }
                        // Try again next turn (or on the writable edge).
                        conn.dirty = true;
                        self.dirty.push(id);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.blocked = true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {
                    conn.dirty = true;
                    self.dirty.push(id);
                }
                Err(e) => failed.push((id, e.kind())),
            }
        }
        let mut list = list;
        list.clear();
        self.flushing = list;
        for (id, kind) in failed {
            self.end(app, id, Ended::Io(kind));
        }
    }

    /// Connects `names` (tag = position) with at most `batch` handshakes in
    /// flight, until all are open or failed or `deadline_ns` passes. Returns
    /// the connection ids (`None` for failures).
    pub fn open_all(
        &mut self,
        app: &mut impl App,
        names: &[String],
        batch: usize,
        deadline_ns: u64,
    ) -> io::Result<Vec<Option<usize>>> {
        let mut ids = vec![None; names.len()];
        let mut next = 0;
        loop {
            while next < names.len() && self.handshaking < batch.max(1) {
                match self.connect(&names[next], next) {
                    Ok(id) => ids[next] = Some(id),
                    Err(e) => {
                        self.stats.handshake_failures += 1;
                        self.stats.note(format!("{}: connect: {e}", names[next]));
                    }
                }
                next += 1;
            }
            if next == names.len() && self.handshaking == 0 {
                break;
            }
            if now_ns() >= deadline_ns {
                break;
            }
            self.turn(app, Duration::from_millis(5))?;
        }
        for slot in &mut ids {
            if slot.is_some_and(|id| !self.is_open(id)) {
                *slot = None;
            }
        }
        Ok(ids)
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 of 16 bytes: a `Sec-WebSocket-Key`.
fn base64_16(raw: &[u8; 16]) -> [u8; 24] {
    let mut out = [b'='; 24];
    for (i, chunk) in raw.chunks(3).enumerate() {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for j in 0..=chunk.len() {
            out[i * 4 + j] = BASE64[(n >> (18 - 6 * j) & 63) as usize];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_base64_of_16_bytes() {
        assert_eq!(&base64_16(b"the sample nonce"), b"dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn urls() {
        let t = Target::parse("ws://127.0.0.1:9251/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9251".parse().unwrap());
        assert_eq!(t.path, "/ws?username=");
        assert_eq!(t.host, "127.0.0.1:9251");
        let t = Target::parse("ws://[::1]:80/ws?room=x").unwrap();
        assert_eq!(t.addr, "[::1]:80".parse().unwrap());
        assert_eq!(t.path, "/ws?room=x&username=");
        let t = Target::parse("ws://127.3.4.5:1").unwrap();
        assert_eq!(t.path, "/?username=");
        assert!(Target::parse("ws://10.0.0.1:80/ws").is_err());
        assert!(Target::parse("ws://8.8.8.8:80/ws").is_err());
        assert!(Target::parse("wss://127.0.0.1/ws").is_err());
        assert!(Target::parse("http://127.0.0.1/ws").is_err());
        assert!(Target::parse("ws://127.0.0.1:x/ws").is_err());
    }
}
