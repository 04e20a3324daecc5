//! One client connection: its socket, where it is in its life, its deadline
//! and its outbound queue.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::rc::Rc;

use mio::net::TcpStream;

use crate::outbound::{Chunk, Outbound};
use crate::timer::Tick;
use crate::ws::frame::encode_close;
use crate::ws::Decoder;

/// Where a connection is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Receiving the HTTP request head (bounded by `handshake::MAX_HEAD`).
    Handshake(Vec<u8>),
    /// Speaking WebSocket.
    Open(OpenState),
    /// Our last bytes (a close frame or an HTTP response) are queued: send
    /// them, shut our side, and discard input until the peer closes or the
    /// close deadline passes.
    Closing,
    /// The open state is lent out while a batch of input is decoded.
    Decoding,
}

/// State of an open WebSocket connection.
#[derive(Debug)]
pub struct OpenState {
    pub decoder: Decoder,
    /// The chat name, once the router admitted it.
    pub username: Option<Rc<str>>,
    /// When the last bytes arrived (the idle timeout runs from here).
    pub last_rx: Tick,
    /// When the server pings next.
    pub next_ping: Tick,
}

impl OpenState {
    pub fn new(now: Tick) -> OpenState {
        OpenState {
            decoder: Decoder::default(),
            username: None,
            last_rx: now,
            next_ping: now,
        }
    }
}

/// Why a connection ended, for the log and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Still open.
    None,
    /// The client closed (close frame), or the server answered HTTP and closed.
    Normal,
    /// The client broke RFC 6455; carries the close code sent.
    ProtocolError(u16),
    /// The client sent what the chat does not take (binary): 1003.
    UnsupportedData,
    /// The chat refused the client (bad or taken name); carries the close code.
    Refused(u16),
    /// The TCP connection ended or failed without a closing handshake.
    ConnectionLost,
    HandshakeTimeout,
    /// The opening handshake was refused with this HTTP status.
    HandshakeRejected(u16),
    /// The peer did not finish the closing handshake in time.
    CloseTimeout,
    /// Nothing arrived for `--idle-timeout`.
    IdleTimeout,
    /// The backlog made no progress for `--write-timeout`.
    WriteStall,
    /// A private message would have passed `--max-outbound`.
    SlowConsumer,
    /// The server is stopping.
    Shutdown,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::None => f.write_str("open"),
            CloseReason::Normal => f.write_str("normal"),
            CloseReason::ProtocolError(code) => write!(f, "protocol error ({code})"),
            CloseReason::UnsupportedData => f.write_str("unsupported data (1003)"),
            CloseReason::Refused(code) => write!(f, "refused ({code})"),
            CloseReason::ConnectionLost => f.write_str("connection lost"),
            CloseReason::HandshakeTimeout => f.write_str("handshake timeout"),
            CloseReason::HandshakeRejected(status) => write!(f, "handshake refused ({status})"),
            CloseReason::CloseTimeout => f.write_str("close timeout"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::WriteStall => f.write_str("write stall"),
            CloseReason::SlowConsumer => f.write_str("slow consumer"),
            CloseReason::Shutdown => f.write_str("shutdown"),
        }
    }
}

/// The peer's address, for the log: 6 bytes inline for IPv4 rather than
/// the 32 of a `SocketAddr` (per connection, it adds up).
#[derive(Debug, Clone)]
pub enum Peer {
    V4(SocketAddrV4),
    V6(Box<SocketAddrV6>),
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Peer {
        match addr {
            SocketAddr::V4(v4) => Peer::V4(v4),
            SocketAddr::V6(v6) => Peer::V6(Box::new(v6)),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::V4(a) => a.fmt(f),
            Peer::V6(a) => a.fmt(f),
        }
    }
}

#[derive(Debug)]
pub struct Connection {
    /// Unique for the server's run: tells a reused slab slot from its old tenant.
    pub id: u64,
    pub peer: Peer,
    pub socket: TcpStream,
    pub phase: Phase,
    pub out: Outbound,
    /// When this connection next needs attention.
    pub deadline: Option<Tick>,
    /// The deadline of this connection's entry in the timer heap, if any.
    pub armed: Option<Tick>,
    /// Since when the backlog has made no progress.
    pub stalled_since: Option<Tick>,
    /// Public messages shed since the last `gap` event.
    pub shed: u32,
    pub close_reason: CloseReason,
    /// Removed from the poller; the slot is freed at the end of the turn.
    pub dead: bool,
    /// Listed for this turn's flush.
    pub flush_listed: bool,
    /// Owed the presence window's events from this offset on.
    pub presence_from: Option<u32>,
    /// Registered for WRITABLE because the socket was full.
    pub wants_writable: bool,
    /// Our side of the TCP connection is shut (after the last bytes).
    pub write_shut: bool,
    /// Not read while its own outbound queue is over the limit.
    pub read_paused: bool,
}

impl Connection {
    pub fn new(id: u64, peer: SocketAddr, socket: TcpStream) -> Connection {
        Connection {
            id,
            peer: Peer::from(peer),
            socket,
            phase: Phase::Handshake(Vec::new()),
            out: Outbound::default(),
            deadline: None,
            armed: None,
            stalled_since: None,
            shed: 0,
            close_reason: CloseReason::None,
            dead: false,
            flush_listed: false,
            presence_from: None,
            wants_writable: false,
            write_shut: false,
            read_paused: false,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_) | Phase::Decoding) && !self.dead
    }

    /// Starts the closing handshake with `code`: the close frame goes out
    /// after what is queued. Returns the chat name this releases.
    #[must_use]
    pub fn start_close(&mut self, code: u16, reason: &str, why: CloseReason) -> Option<Rc<str>> {
        if !self.is_open() {
            return None;
        }
        // What is queued still goes out first: replies to what came before (a
        // peer that breaks the protocol after a valid message gets that
        // message's echo) and messages replayed from an outbox, which count
        // as delivered once queued. The backlog is bounded by --max-outbound;
        // a peer that never reads it is dropped by the write-stall timeout.
        self.out.push(Chunk::Owned(encode_close(code, reason)));
        self.enter_closing(why)
    }

    /// Answers a close frame from the peer: echo its code (RFC 6455 5.5.1).
    #[must_use]
    pub fn answer_close(&mut self, code: Option<u16>) -> Option<Rc<str>> {
        if !self.is_open() {
            return None;
        }
        let frame = match code {
            Some(code) => encode_close(code, ""),
            None => vec![0x88, 0x00],
        };
        self.out.push(Chunk::Owned(frame));
        self.enter_closing(CloseReason::Normal)
    }

    /// Queues a final HTTP response (the handshake phase has no name).
    pub fn respond_and_close(&mut self, bytes: Vec<u8>, why: CloseReason) {
        self.out.push(Chunk::Owned(bytes));
        let _ = self.enter_closing(why);
    }

    /// Takes the chat name, if the connection is open and has one.
    pub fn take_username(&mut self) -> Option<Rc<str>> {
        match &mut self.phase {
            Phase::Open(state) => state.username.take(),
            _ => None,
        }
    }

    fn enter_closing(&mut self, why: CloseReason) -> Option<Rc<str>> {
        let released = self.take_username();
        self.phase = Phase::Closing;
        if self.close_reason == CloseReason::None {
            self.close_reason = why;
        }
        released
    }
}

#[cfg(test)]
mod tests {
    /// Every connection carries these (the open state inline, its times as
    /// 8-byte ticks): growing them grows RSS per idle connection (the
    /// README's budget is 0.5 KiB in all, with the name, index and member
    /// entries and a timer entry).
    #[test]
    fn per_connection_state_stays_small() {
        let (conn, open) = (
            std::mem::size_of::<super::Connection>(),
            std::mem::size_of::<super::OpenState>(),
        );
        assert!(
            conn <= 232 && open <= 96,
            "Connection {conn} B, OpenState {open} B"
        );
    }
}
