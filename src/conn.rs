//! One client connection: its socket, where it is in its life, its deadline
//! and its outbound queue.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::outbound::{Chunk, Outbound};
use crate::ws::frame::encode_close;
use crate::ws::Decoder;

/// Where a connection is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Receiving the HTTP request head (bounded by `handshake::MAX_HEAD`).
    Handshake(Vec<u8>),
    /// Speaking WebSocket.
    Open(Box<OpenState>),
    /// Our last bytes (a close frame or an HTTP response) are queued: send
    /// them, shut our side, and discard input until the peer closes or the
    /// close deadline passes.
    Closing,
    /// The decoder is lent out while a batch of input is processed.
    Decoding,
}

/// State of an open WebSocket connection.
#[derive(Debug, Default)]
pub struct OpenState {
    pub decoder: Decoder,
}

/// Why a connection ended, for the log (and, later, the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Still open.
    None,
    /// The client closed (close frame), or the server answered HTTP and closed.
    Normal,
    /// The client broke RFC 6455; carries the close code sent.
    ProtocolError(u16),
    /// The TCP connection ended or failed without a closing handshake.
    ConnectionLost,
    HandshakeTimeout,
    /// The opening handshake was refused with this HTTP status.
    HandshakeRejected(u16),
    /// The peer did not finish the closing handshake in time.
    CloseTimeout,
    /// Refused because `--max-connections` was reached.
    AtCapacity,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::None => f.write_str("open"),
            CloseReason::Normal => f.write_str("normal"),
            CloseReason::ProtocolError(code) => write!(f, "protocol error ({code})"),
            CloseReason::ConnectionLost => f.write_str("connection lost"),
            CloseReason::HandshakeTimeout => f.write_str("handshake timeout"),
            CloseReason::HandshakeRejected(status) => write!(f, "handshake refused ({status})"),
            CloseReason::CloseTimeout => f.write_str("close timeout"),
            CloseReason::AtCapacity => f.write_str("at capacity"),
        }
    }
}

#[derive(Debug)]
pub struct Connection {
    /// Unique for the server's run: tells a reused slab slot from its old tenant.
    pub id: u64,
    pub peer: SocketAddr,
    pub socket: TcpStream,
    pub phase: Phase,
    pub out: Outbound,
    /// When this connection next needs attention (handshake or close timeout).
    pub deadline: Option<Instant>,
    /// The deadline of this connection's entry in the timer heap, if any.
    pub armed: Option<Instant>,
    pub close_reason: CloseReason,
    /// Removed from the poller; the slot is freed at the end of the turn.
    pub dead: bool,
    /// Listed for this turn's flush.
    pub flush_listed: bool,
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
            peer,
            socket,
            phase: Phase::Handshake(Vec::new()),
            out: Outbound::default(),
            deadline: None,
            armed: None,
            close_reason: CloseReason::None,
            dead: false,
            flush_listed: false,
            wants_writable: false,
            write_shut: false,
            read_paused: false,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_) | Phase::Decoding) && !self.dead
    }

    /// Queues a data frame, unless the connection is closing.
    pub fn send(&mut self, chunk: Chunk) -> bool {
        if self.is_open() {
            self.out.push(chunk);
            true
        } else {
            false
        }
    }

    /// Queues a control frame ahead of queued data, unless closing.
    pub fn send_control(&mut self, chunk: Chunk) {
        if self.is_open() {
            self.out.push_control(chunk);
        }
    }

    /// Starts the closing handshake with `code`: the close frame goes out
    /// after what is queued (data not yet started is dropped when the peer
    /// broke the protocol, since it will not read it anyway).
    pub fn start_close(&mut self, code: u16, reason: &str, why: CloseReason) {
        if !self.is_open() {
            return;
        }
        if matches!(why, CloseReason::ProtocolError(_)) {
            self.out.drop_unstarted_data();
        }
        self.out.push(Chunk::Owned(encode_close(code, reason)));
        self.enter_closing(why);
    }

    /// Answers a close frame from the peer: echo its code (RFC 6455 5.5.1).
    pub fn answer_close(&mut self, code: Option<u16>) {
        if !self.is_open() {
            return;
        }
        let frame = match code {
            Some(code) => encode_close(code, ""),
            None => vec![0x88, 0x00],
        };
        self.out.push(Chunk::Owned(frame));
        self.enter_closing(CloseReason::Normal);
    }

    /// Queues a final HTTP response.
    pub fn respond_and_close(&mut self, bytes: Vec<u8>, why: CloseReason) {
        self.out.push(Chunk::Owned(bytes));
        self.enter_closing(why);
    }

    fn enter_closing(&mut self, why: CloseReason) {
        self.phase = Phase::Closing;
        if self.close_reason == CloseReason::None {
            self.close_reason = why;
        }
    }
}
