//! The event loop: one `mio::Poll` on one thread.
//!
//! Each turn: wait for readiness (or the next deadline), accept, read every
//! ready socket into one buffer shared by all connections and hand the bytes
//! to the handshake parser or the frame decoder, fire due timers, then flush
//! every connection that has output with one vectored write each, and only
//! then free the slots of connections that died this turn, so an event of
//! this turn can never reach a newcomer in a reused slot.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;

use crate::config::Config;
use crate::conn::{CloseReason, Connection, Phase};
use crate::handshake::{self, Outcome, Policy, Resource};
use crate::http::{self, Response, Status};
use crate::log;
use crate::outbound::{Chunk, Flushed};
use crate::timer::Timers;
use crate::ws::frame::{encode, Opcode};
use crate::ws::Message;

const LISTENER: Token = Token(usize::MAX);

/// The read buffer every connection shares.
const READ_BUFFER: usize = 64 * 1024;

/// Bytes read from one connection per turn before others get their turn.
const READ_BUDGET: usize = 256 * 1024;

/// How long to stop accepting when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

pub struct Server {
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Connection>,
    read_buf: Box<[u8]>,
    core: Core,
}

/// Everything but the connections and the read buffer, so both can be
/// borrowed beside it.
struct Core {
    config: Config,
    policy: Policy,
    max_connections: usize,
    registry: Registry,
    timers: Timers,
    /// Connections with output to flush this turn.
    flush_list: Vec<usize>,
    /// Connections to read again next turn (budget spent, or unpaused).
    read_again: Vec<(usize, u64)>,
    /// Dead connections whose slots are freed at the end of the turn.
    dead: Vec<usize>,
    next_id: u64,
    accept_paused_until: Option<Instant>,
    /// Log the first refusal of an episode only.
    refusing: bool,
}

impl Server {
    /// Binds the listener. The only fallible step before `run`.
    pub fn bind(config: Config, max_connections: usize) -> io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(config.listen)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let registry = poll.registry().try_clone()?;
        let policy = Policy {
            allowed_origins: config.allowed_origins.clone(),
        };
        Ok(Server {
            poll,
            listener,
            conns: Slab::new(),
            read_buf: vec![0; READ_BUFFER].into_boxed_slice(),
            core: Core {
                config,
                policy,
                max_connections,
                registry,
                timers: Timers::default(),
                flush_list: Vec::new(),
                read_again: Vec::new(),
                dead: Vec::new(),
                next_id: 1,
                accept_paused_until: None,
                refusing: false,
            },
        })
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            log::flush();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    Token(slot) => {
                        let Some(conn) = self.conns.get_mut(slot) else {
                            continue;
                        };
                        if conn.dead {
                            continue;
                        }
                        if event.is_writable() {
                            list_for_flush(&mut self.core.flush_list, slot, conn);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(slot, now);
                        }
                    }
                }
            }
            self.end_turn(now);
        }
    }

    /// How long the loop may sleep: until the next deadline, or forever.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.core.read_again.is_empty() {
            return Some(Duration::ZERO);
        }
        let next = match (self.core.timers.next(), self.core.accept_paused_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Round up so a deadline is never woken for a millisecond early.
        next.map(|at| at.saturating_duration_since(now) + Duration::from_micros(999))
    }

    fn end_turn(&mut self, now: Instant) {
        if self
            .core
            .accept_paused_until
            .is_some_and(|until| until <= now)
        {
            self.core.accept_paused_until = None;
            self.accept(now);
        }
        for (slot, id) in std::mem::take(&mut self.core.read_again) {
            if self.conns.get(slot).is_some_and(|c| c.id == id && !c.dead) {
                self.read(slot, now);
            }
        }
        self.core.fire_timers(&mut self.conns, now);
        self.core.flush(&mut self.conns, now);
        for slot in std::mem::take(&mut self.core.dead) {
            if self.conns.get(slot).is_some_and(|c| c.dead) {
                let conn = self.conns.remove(slot);
                log::info!("close #{} {}: {}", conn.id, conn.peer, conn.close_reason);
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        if self.core.accept_paused_until.is_some() {
            return;
        }
        loop {
            let (socket, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_out_of_resources(&e) => {
                    // Retrying at once would spin: the pending connection
                    // stays in the backlog and the listener stays readable.
                    if !self.core.refusing {
                        log::warn!(
                            "accept paused: {e}; retrying every {} ms",
                            ACCEPT_PAUSE.as_millis()
                        );
                        self.core.refusing = true;
                    }
                    self.core.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
                Err(e) => {
                    // ECONNABORTED, EINTR, EPROTO...: that one connection is gone.
                    log::debug!("accept: {e}");
                    continue;
                }
            };
            if self.conns.len() >= self.core.max_connections {
                if !self.core.refusing {
                    log::warn!(
                        "at --max-connections ({}): refusing new connections with 503",
                        self.core.max_connections
                    );
                    self.core.refusing = true;
                }
                // Best effort: the socket is fresh, so its buffer has room.
                let _ = (&socket).write(http::OVERLOADED);
                let _ = socket.shutdown(Shutdown::Both);
                continue;
            }
            if self.core.refusing {
                log::info!("accepting again");
                self.core.refusing = false;
            }
            self.core.admit(&mut self.conns, socket, peer, now);
        }
    }

    /// Reads until the socket is drained, the budget is spent, or the
    /// connection stops wanting input.
    fn read(&mut self, slot: usize, now: Instant) {
        let mut budget = READ_BUDGET;
        loop {
            let conn = &mut self.conns[slot];
            if conn.dead {
                return;
            }
            if conn.out.bytes() >= self.core.config.max_outbound {
                // Its own output is backed up: read again once it drains.
                conn.read_paused = true;
                return;
            }
            let room = match &conn.phase {
                // Never buffer more than one byte past the head limit.
                Phase::Handshake(head) => (handshake::MAX_HEAD + 1 - head.len()).min(READ_BUFFER),
                _ => READ_BUFFER,
            };
            match conn.socket.read(&mut self.read_buf[..room]) {
                Ok(0) => {
                    let why = match conn.phase {
                        Phase::Closing => conn.close_reason,
                        _ => CloseReason::ConnectionLost,
                    };
                    self.core.kill(conn, slot, why);
                    return;
                }
                Ok(n) => {
                    self.core
                        .on_bytes(&mut self.conns, slot, &mut self.read_buf[..n], now);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        let id = self.conns[slot].id;
                        self.core.read_again.push((slot, id));
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("read #{}: {e}", conn.id);
                    let why = match conn.phase {
                        Phase::Closing => conn.close_reason,
                        _ => CloseReason::ConnectionLost,
                    };
                    self.core.kill(conn, slot, why);
                    return;
                }
            }
        }
    }
}

impl Core {
    fn admit(
        &mut self,
        conns: &mut Slab<Connection>,
        mut socket: TcpStream,
        peer: std::net::SocketAddr,
        now: Instant,
    ) {
        // Small frames must not wait for Nagle's algorithm.
        let _ = socket.set_nodelay(true);
        let entry = conns.vacant_entry();
        let slot = entry.key();
        if let Err(e) = self
            .registry
            .register(&mut socket, Token(slot), Interest::READABLE)
        {
            log::warn!("register: {e}");
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let conn = entry.insert(Connection::new(id, peer, socket));
        log::info!("open #{id} {peer}");
        self.set_deadline(conn, slot, now + self.config.handshake_timeout);
    }

    /// Sets a connection's deadline, arming a timer only when it moves earlier.
    fn set_deadline(&mut self, conn: &mut Connection, slot: usize, at: Instant) {
        conn.deadline = Some(at);
        if conn.armed.is_none_or(|armed| at < armed) {
            conn.armed = Some(at);
            self.timers.push(at, slot, conn.id);
        }
    }

    fn fire_timers(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        while let Some((at, slot, id)) = self.timers.pop_due(now) {
            let Some(conn) = conns.get_mut(slot) else {
                continue;
            };
            if conn.id != id || conn.dead || conn.armed != Some(at) {
                continue; // a stale entry: its connection is gone or re-armed
            }
            conn.armed = None;
            match conn.deadline {
                Some(deadline) if deadline <= now => {
                    conn.deadline = None;
                    self.on_deadline(conn, slot);
                }
                Some(later) => {
                    conn.armed = Some(later);
                    self.timers.push(later, slot, id);
                }
                None => {}
            }
        }
    }

    fn on_deadline(&mut self, conn: &mut Connection, slot: usize) {
        match conn.phase {
            Phase::Handshake(_) => self.kill(conn, slot, CloseReason::HandshakeTimeout),
            Phase::Closing => {
                let why = if conn.close_reason == CloseReason::None {
                    CloseReason::CloseTimeout
                } else {
                    conn.close_reason
                };
                if !conn.write_shut {
                    log::debug!("#{}: closing handshake timed out", conn.id);
                }
                self.kill(conn, slot, why);
            }
            Phase::Open(_) | Phase::Decoding => {}
        }
    }

    /// Hands freshly read bytes to whatever the connection is doing.
    fn on_bytes(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        data: &mut [u8],
        now: Instant,
    ) {
        let conn = &mut conns[slot];
        match &mut conn.phase {
            Phase::Handshake(head) => {
                head.extend_from_slice(data);
                let mut head = std::mem::take(head);
                match handshake::parse(&head, &self.policy) {
                    Outcome::Partial => conn.phase = Phase::Handshake(head),
                    Outcome::Upgrade(upgrade) => {
                        conn.out.push(Chunk::Owned(upgrade.response));
                        conn.phase = Phase::Open(Box::default());
                        conn.deadline = None;
                        list_for_flush(&mut self.flush_list, slot, conn);
                        log::debug!("#{} upgraded ({})", conn.id, upgrade.query);
                        // Frames sent right behind the request head.
                        if head.len() > upgrade.head_len {
                            self.on_frames(conns, slot, &mut head[upgrade.head_len..], now);
                        }
                    }
                    Outcome::Get(resource) => {
                        let response = match resource {
                            Resource::Health => Response::text(Status::Ok, "ok"),
                        };
                        conn.respond_and_close(response.to_bytes(), CloseReason::Normal);
                        self.after_close_started(conns, slot, now);
                    }
                    Outcome::Reject(response) => {
                        let status = response.status.code();
                        log::debug!("#{} refused: {status}", conn.id);
                        conn.respond_and_close(
                            response.to_bytes(),
                            CloseReason::HandshakeRejected(status),
                        );
                        self.after_close_started(conns, slot, now);
                    }
                }
            }
            Phase::Open(_) => self.on_frames(conns, slot, data, now),
            // Input after our close is read only to find the peer's EOF.
            Phase::Closing | Phase::Decoding => {}
        }
    }

    /// Decodes frames and acts on each message.
    fn on_frames(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        data: &mut [u8],
        now: Instant,
    ) {
        let conn = &mut conns[slot];
        let Phase::Open(mut state) = std::mem::replace(&mut conn.phase, Phase::Decoding) else {
            return;
        };
        let max_message = self.config.max_message_size;
        let mut pos = 0;
        while pos < data.len() {
            match state.decoder.decode(&mut data[pos..], max_message) {
                Ok((used, message)) => {
                    pos += used;
                    if let Some(message) = message {
                        self.on_message(&mut conns[slot], slot, message);
                        if !matches!(conns[slot].phase, Phase::Decoding) {
                            break; // closing: the rest is ignored
                        }
                    }
                }
                Err(error) => {
                    let conn = &mut conns[slot];
                    log::debug!("#{} protocol error: {}", conn.id, error.reason());
                    conn.start_close(
                        error.close_code(),
                        error.reason(),
                        CloseReason::ProtocolError(error.close_code()),
                    );
                    self.after_close_started(conns, slot, now);
                    return;
                }
            }
        }
        let conn = &mut conns[slot];
        if matches!(conn.phase, Phase::Decoding) {
            conn.phase = Phase::Open(state);
        } else {
            self.after_close_started(conns, slot, now);
        }
    }

    fn on_message(&mut self, conn: &mut Connection, slot: usize, message: Message<'_>) {
        match message {
            Message::Text(text) => {
                conn.out
                    .push(Chunk::Owned(encode(Opcode::Text, text.as_bytes())));
            }
            Message::Binary(bytes) => {
                conn.out.push(Chunk::Owned(encode(Opcode::Binary, bytes)));
            }
            Message::Ping(payload) => conn
                .out
                .push_control(Chunk::Owned(encode(Opcode::Pong, payload))),
            Message::Pong(_) => return,
            Message::Close(frame) => {
                conn.answer_close(frame.map(|f| f.code));
            }
        }
        list_for_flush(&mut self.flush_list, slot, conn);
    }

    /// A connection has queued its last bytes: bound how long it may linger.
    fn after_close_started(&mut self, conns: &mut Slab<Connection>, slot: usize, now: Instant) {
        let conn = &mut conns[slot];
        list_for_flush(&mut self.flush_list, slot, conn);
        let at = now + self.config.close_timeout;
        self.set_deadline(conn, slot, at);
    }

    /// Writes every listed connection's queue, once per turn.
    fn flush(&mut self, conns: &mut Slab<Connection>, _now: Instant) {
        for slot in std::mem::take(&mut self.flush_list) {
            let Some(conn) = conns.get_mut(slot) else {
                continue;
            };
            conn.flush_listed = false;
            if conn.dead || conn.write_shut {
                continue;
            }
            match conn.out.write_to(&mut conn.socket) {
                Ok(Flushed::All) => {
                    if conn.wants_writable {
                        conn.wants_writable = false;
                        self.reregister(conn, slot, Interest::READABLE);
                    }
                    if matches!(conn.phase, Phase::Closing) {
                        // Last bytes out: say so with FIN, then wait for the peer's.
                        conn.write_shut = true;
                        let _ = conn.socket.shutdown(Shutdown::Write);
                    }
                    if conn.read_paused {
                        conn.read_paused = false;
                        self.read_again.push((slot, conn.id));
                    }
                }
                Ok(Flushed::Blocked) => {
                    if !conn.wants_writable {
                        conn.wants_writable = true;
                        self.reregister(conn, slot, Interest::READABLE | Interest::WRITABLE);
                    }
                    if conn.read_paused && conn.out.bytes() < self.config.max_outbound {
                        conn.read_paused = false;
                        self.read_again.push((slot, conn.id));
                    }
                }
                Err(e) => {
                    log::debug!("write #{}: {e}", conn.id);
                    let why = match conn.phase {
                        Phase::Closing => conn.close_reason,
                        _ => CloseReason::ConnectionLost,
                    };
                    self.kill(conn, slot, why);
                }
            }
        }
    }

    fn reregister(&mut self, conn: &mut Connection, slot: usize, interest: Interest) {
        if let Err(e) = self
            .registry
            .reregister(&mut conn.socket, Token(slot), interest)
        {
            log::debug!("reregister #{}: {e}", conn.id);
            self.kill(conn, slot, CloseReason::ConnectionLost);
        }
    }

    /// Ends a connection now; its slot is freed at the end of the turn.
    fn kill(&mut self, conn: &mut Connection, slot: usize, why: CloseReason) {
        if conn.dead {
            return;
        }
        conn.dead = true;
        if conn.close_reason == CloseReason::None {
            conn.close_reason = why;
        }
        let _ = self.registry.deregister(&mut conn.socket);
        self.dead.push(slot);
    }
}

fn list_for_flush(list: &mut Vec<usize>, slot: usize, conn: &mut Connection) {
    if !conn.flush_listed {
        conn.flush_listed = true;
        list.push(slot);
    }
}

/// Accept errors that mean "no resources now" rather than "this one connection failed".
fn is_out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
