//! One client connection: its socket, where it is in its life, its deadline
//! and its outbound queue.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use mio::net::TcpStream;

use crate::budget::HeadBytes;
use crate::delivery::outbound::Outbound;
use crate::timer::Tick;
use crate::ws::{CloseCode, Decoder};

/// Where a connection is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Receiving the HTTP request head (bounded by `handshake::MAX_HEAD`).
    Handshake(HeadBytes),
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
    /// When the last bytes arrived (the idle timeout runs from here).
    pub last_rx: Tick,
    /// When the server pings next.
    pub next_ping: Tick,
}

impl OpenState {
    pub fn new(now: Tick) -> OpenState {
        OpenState {
            decoder: Decoder::default(),
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
    ProtocolError(CloseCode),
    /// The client sent what the chat does not take (binary): 1003.
    UnsupportedData,
    /// The chat refused the client (bad or taken name); carries the close code.
    Refused(CloseCode),
    /// The TCP connection ended or failed without a closing handshake.
    ConnectionLost,
    HandshakeTimeout,
    /// The opening handshake was refused with this HTTP status.
    HandshakeRejected(u16),
    /// The peer did not finish the closing handshake in time.
    CloseTimeout,
    /// Nothing arrived for `--idle-timeout`.
    IdleTimeout,
    /// A message was not completed within `--message-timeout` (1008).
    MessageTimeout,
    /// The backlog made no progress for `--write-timeout`.
    WriteStall,
    /// Too slow a reader for a private message (see `delivery::policy`).
    SlowConsumer,
    /// The server is stopping.
    Shutdown,
    /// The token the connection was opened with expired unrenewed (4003).
    TokenExpired,
    /// A newer connection of the same user took over (4010).
    Replaced,
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
            CloseReason::MessageTimeout => f.write_str("message timeout (1008)"),
            CloseReason::WriteStall => f.write_str("write stall"),
            CloseReason::SlowConsumer => f.write_str("slow consumer"),
            CloseReason::Shutdown => f.write_str("shutdown"),
            CloseReason::TokenExpired => f.write_str("token expired (4003)"),
            CloseReason::Replaced => f.write_str("replaced by a newer session (4010)"),
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
    /// Since when the backlog has made no progress: set by a write that
    /// left bytes behind, moved on by each that took some, cleared when
    /// everything went out (see `delivery::policy`).
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
    /// The last write left bytes behind, and the socket has not said it is
    /// writable since: another write now would only say `WouldBlock`.
    pub blocked: bool,
    /// Not read while a reader it sent private messages to drains (the
    /// sender side of backpressure).
    pub held: bool,
    /// Senders held (not read) for this reader.
    pub holding: u32,
    /// Came in through `--metrics-listen`: `/metrics` and `/healthz` only.
    pub admin: bool,
    /// When its token (with the leeway) expires, unless renewed. Kept here,
    /// not in the open state, so a renewal read while the open state is lent
    /// to the decoder can set it.
    pub token_expires: Option<Tick>,
}

impl Connection {
    pub fn new(id: u64, peer: SocketAddr, socket: TcpStream) -> Connection {
        Connection {
            id,
            peer: Peer::from(peer),
            socket,
            phase: Phase::Handshake(HeadBytes::new()),
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
            blocked: false,
            held: false,
            holding: 0,
            admin: false,
            token_expires: None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_) | Phase::Decoding) && !self.dead
    }

    /// Whether it may be read now (see `delivery::policy::may_read`).
    pub fn wants_input(&self) -> bool {
        !self.dead && !self.read_paused && !self.held
    }

    /// Enters the closing phase (its last bytes are queued by the caller).
    /// Returns whether it was open, so the router must be told it left.
    pub fn enter_closing(&mut self, why: CloseReason) -> bool {
        let was_open = self.is_open();
        self.phase = Phase::Closing;
        if self.close_reason == CloseReason::None {
            self.close_reason = why;
        }
        was_open
    }
}

#[cfg(test)]
mod tests {
    /// Every connection carries these (the open state inline, its times as
    /// 8-byte ticks): growing them grows RSS per idle connection (the
    /// budget in docs/PERFORMANCE.md is 0.5 KiB in all, with the name, index and member
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
