//! The event loop: one `mio::Poll` on one thread.
//!
//! Each turn: wait for readiness (or the next deadline), accept, read every
//! ready socket into one buffer shared by all connections and hand the bytes
//! to the handshake parser or the frame decoder, fire due timers, then flush
//! every connection that has output with one vectored write each, and only
//! then free the slots of connections that died this turn, so an event of
//! this turn can never reach a newcomer in a reused slot.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;

use crate::chat::{protocol, Class, Delivery, Limits, Outbox, Router};
use crate::config::Config;
use crate::conn::{CloseReason, Connection, OpenState, Phase};
use crate::handshake::{self, Outcome, Policy, Resource};
use crate::http::{self, Response, Status};
use crate::log;
use crate::metrics::{Metrics, Snapshot};
use crate::outbound::{Chunk, Flushed, Spares};
use crate::presence::PresenceBatch;
use crate::store::log::Log;
use crate::store::Outboxes;
use crate::sys::ShutdownSignal;
use crate::timer::{Clock, Tick, Timers};
use crate::ws::frame::{encode, Opcode};
use crate::ws::Message;

const LISTENER: Token = Token(usize::MAX);
const SIGNAL: Token = Token(usize::MAX - 1);

/// The read buffer every connection shares.
const READ_BUFFER: usize = 64 * 1024;

/// Bytes read from one connection per turn before others get their turn.
const READ_BUDGET: usize = 256 * 1024;

/// Pending connections the kernel may hold for us (capped by somaxconn);
/// mio's default of 128 drops SYNs under a burst of handshakes.
const LISTEN_BACKLOG: i32 = 4096;

/// How long to stop accepting when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The chat page, served at `/`.
const PAGE: &[u8] = include_bytes!("web/index.html");

/// Unsent pongs a connection may have queued; beyond, the newest replaces the
/// last (see `Outbound::push_control_bounded`).
const PONGS_QUEUED: usize = 16;

/// Presence owed to a connection that gets something else is copied for it
/// up to this many bytes; more closes the window for everyone (see
/// `Post::settle_presence`).
const COPY_OWED_MAX: usize = 2048;

/// An empty ping: the server's heartbeat.
const PING: &[u8] = &[0x89, 0x00];

/// What the server does with WebSocket messages.
enum App {
    Echo,
    Chat(Box<Router>),
}

pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    signal: Option<ShutdownSignal>,
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
    /// Connection deadlines are kept as this clock's compact ticks.
    clock: Clock,
    timers: Timers,
    app: App,
    post: Post,
    /// Connections to read again next turn (budget spent, or unpaused).
    read_again: Vec<(usize, u64)>,
    /// Dead connections whose slots are freed at the end of the turn.
    dead: Vec<usize>,
    /// Connections in accept order that may still be in the handshake: at
    /// the connection limit the oldest is evicted for a newcomer, so
    /// half-sent requests (slowloris) cannot lock real clients out.
    handshakes: VecDeque<(usize, u64)>,
    next_id: u64,
    accept_paused_until: Option<Instant>,
    nodelay: Nodelay,
    /// Log the first refusal of an episode only.
    refusing: bool,
    /// Set once SIGINT/SIGTERM arrived: exit by then at the latest.
    shutdown_by: Option<Instant>,
    /// The outbox log; `None` keeps offline messages in memory only.
    log: Option<Log>,
    /// Wall-clock milliseconds, read once per turn for message timestamps.
    now_ms: u64,
    metrics: Metrics,
}

/// Where accepted sockets get TCP_NODELAY (small frames must not wait for
/// Nagle's algorithm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nodelay {
    /// `admit` sets it on each socket.
    PerSocket,
    /// Linux copies it from the listener to a connection when its handshake
    /// completes. Those completed before the listener had it wait in the
    /// accept queue, so until the queue is first found empty `admit` still
    /// sets it on each.
    FromListenerAfterFirstDrain,
    /// Copied from the listener: no `setsockopt` per connection.
    FromListener,
}

/// Bookkeeping that delivering a message touches beside the connections.
struct Post {
    flush_list: Vec<usize>,
    /// `join`/`leave` events of the current window (see `presence`).
    presence: PresenceBatch,
    /// Names whose connections stopped being open; the router forgets them
    /// in `settle`, within the same turn.
    departures: Vec<(usize, Rc<str>)>,
    /// Connections that began closing and need a close deadline.
    began_closing: Vec<usize>,
    /// Replies held until this turn's log records are on disk.
    after_sync: Vec<(usize, Chunk)>,
    max_outbound: usize,
    spares: Spares,
    /// Public messages are shed for a recipient whose backlog is above this.
    shed_above: usize,
}

impl Post {
    fn list_for_flush(&mut self, slot: usize, conn: &mut Connection) {
        if !conn.flush_listed {
            conn.flush_listed = true;
            self.flush_list.push(slot);
        }
    }

    /// Closes the presence window now: everyone owed events gets its part
    /// of the window's bytes, shared, behind what it already has queued.
    /// Returns the bytes, for a caller that set a connection's part aside.
    fn release_presence(&mut self, conns: &mut Slab<Connection>) -> Rc<[u8]> {
        let (shared, owed) = self.presence.close();
        let end = shared.len();
        for slot in owed {
            let Some(conn) = conns.get_mut(slot) else {
                continue;
            };
            // None: paid already, or a new connection in a reused slot.
            let Some(from) = conn.presence_from.take() else {
                continue;
            };
            if conn.is_open() {
                conn.out.push_reusing(
                    Chunk::part(shared.clone(), from as usize, end),
                    &mut self.spares,
                );
                self.list_for_flush(slot, conn);
            }
        }
        shared
    }

    /// Before anything else is queued for `slot`, what it is owed goes
    /// first: a small debt as its own copy, a large one by closing the window
    /// for everyone, shared. Releasing for every reader that gets something
    /// else would queue a part for all owed readers each time (a crowd
    /// leaving in one turn, each leave owed to the rest: quadratic memory);
    /// copying every debt would copy a growing window per reader. The bound
    /// keeps both linear.
    fn settle_presence(&mut self, conns: &mut Slab<Connection>, slot: usize) {
        let Some(conn) = conns.get_mut(slot) else {
            return;
        };
        let Some(from) = conn.presence_from else {
            return;
        };
        if self.presence.end() - from as usize <= COPY_OWED_MAX {
            self.pay_presence_copy(conn);
            // It goes out this turn even if nothing follows (a deadline
            // that settles but then sends nothing).
            self.list_for_flush(slot, conn);
        } else {
            self.release_presence(conns);
        }
    }

    /// Queues a copy of what one connection is owed (a small debt, or a
    /// path that holds only that connection: a close not settled first, a `gap`).
    fn pay_presence_copy(&mut self, conn: &mut Connection) {
        if let Some(from) = conn.presence_from.take() {
            let owed = self.presence.copy(from as usize, self.presence.end());
            if !owed.is_empty() {
                conn.out.push_reusing(Chunk::Owned(owed), &mut self.spares);
            }
        }
    }

    fn close(
        &mut self,
        conn: &mut Connection,
        slot: usize,
        code: u16,
        reason: &str,
        why: CloseReason,
    ) {
        if !conn.is_open() {
            return;
        }
        // What it is owed came before the close.
        self.pay_presence_copy(conn);
        if let Some(name) = conn.start_close(code, reason, why) {
            self.departures.push((slot, name));
        }
        self.began_closing.push(slot);
        self.list_for_flush(slot, conn);
    }
}

/// The router's view of the connections.
struct Mailer<'a> {
    conns: &'a mut Slab<Connection>,
    post: &'a mut Post,
}

impl Mailer<'_> {
    /// Applies the slow-reader policy to `len` more bytes for `slot`;
    /// returns the connection when the frame may be queued.
    fn admit<'c>(
        conns: &'c mut Slab<Connection>,
        post: &mut Post,
        slot: usize,
        len: usize,
        class: Class,
    ) -> Result<&'c mut Connection, Delivery> {
        let Some(conn) = conns.get_mut(slot) else {
            return Err(Delivery::Gone);
        };
        if !conn.is_open() {
            return Err(Delivery::Gone);
        }
        let backlog = conn.out.bytes();
        match class {
            Class::Public | Class::Presence if backlog > post.shed_above => {
                conn.shed = conn.shed.saturating_add(1);
                Err(Delivery::Shed)
            }
            Class::Private if backlog + len > post.max_outbound => {
                log::warn!(
                    "#{} {}: slow consumer disconnected ({backlog} bytes unsent)",
                    conn.id,
                    conn.peer
                );
                // The router forgets the name itself; don't report it twice.
                drop(conn.take_username());
                post.close(conn, slot, 1008, "slow consumer", CloseReason::SlowConsumer);
                Err(Delivery::Disconnected)
            }
            _ => Ok(conn),
        }
    }

    /// A presence event joins the window; the recipient is owed it.
    fn owe_presence(&mut self, slot: usize, frame: &Rc<[u8]>) -> Delivery {
        let start = self.post.presence.append(frame);
        let len = frame.len();
        let conn = match Self::admit(self.conns, self.post, slot, len, Class::Presence) {
            Ok(conn) => conn,
            Err(Delivery::Shed) => {
                // A hole in what it is owed: the window closes here, and this
                // connection's part ends before the shed frame (the others'
                // include it; later recipients find it in a new window).
                let owed = self
                    .conns
                    .get_mut(slot)
                    .and_then(|c| c.presence_from.take());
                if let Some(from) = owed {
                    let shared = self.post.release_presence(self.conns);
                    if let Some(conn) = self.conns.get_mut(slot) {
                        conn.out.push_reusing(
                            Chunk::part(shared, from as usize, start),
                            &mut self.post.spares,
                        );
                        self.post.list_for_flush(slot, conn);
                    }
                }
                return Delivery::Shed;
            }
            Err(delivery) => return delivery,
        };
        if conn.presence_from.is_none() {
            conn.presence_from = u32::try_from(start).ok();
            self.post.presence.owed.push(slot);
        }
        Delivery::Queued
    }
}

impl Outbox for Mailer<'_> {
    fn send(&mut self, slot: usize, frame: Chunk, class: Class) -> Delivery {
        if let (Class::Presence, Chunk::Shared(shared)) = (class, &frame) {
            return self.owe_presence(slot, shared);
        }
        self.post.settle_presence(self.conns, slot);
        let len = frame.as_bytes().len();
        let conn = match Self::admit(self.conns, self.post, slot, len, class) {
            Ok(conn) => conn,
            Err(delivery) => return delivery,
        };
        conn.out.push_reusing(frame, &mut self.post.spares);
        self.post.list_for_flush(slot, conn);
        Delivery::Queued
    }

    fn send_text(&mut self, slot: usize, json: &[u8], class: Class) -> Delivery {
        self.post.settle_presence(self.conns, slot);
        let len = json.len() + crate::ws::frame::header_len(json.len());
        let conn = match Self::admit(self.conns, self.post, slot, len, class) {
            Ok(conn) => conn,
            Err(delivery) => return delivery,
        };
        conn.out
            .push_frame(Opcode::Text, json, &mut self.post.spares);
        self.post.list_for_flush(slot, conn);
        Delivery::Queued
    }

    fn send_when_durable(&mut self, slot: usize, frame: Chunk) {
        self.post.after_sync.push((slot, frame));
    }

    fn close(&mut self, slot: usize, code: u16, reason: &'static str) {
        if let Some(conn) = self.conns.get_mut(slot) {
            self.post
                .close(conn, slot, code, reason, CloseReason::Refused(code));
        }
    }
}

impl Server {
    /// Binds the listening socket (first, so a port in use fails before
    /// anything else is touched).
    pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
        let listener = TcpListener::bind(addr)?;
        // As early as possible: only connections completed after this get it
        // from the listener (see `Nodelay`).
        crate::sys::set_listener_nodelay(&listener);
        crate::sys::set_listen_backlog(&listener, LISTEN_BACKLOG);
        Ok(listener)
    }

    /// Sets up the loop around `listener` and installs the signal handlers.
    /// `log` is the opened outbox log (none: memory only) and `outboxes`
    /// the state replayed from it.
    pub fn new(
        mut listener: TcpListener,
        config: Config,
        max_connections: usize,
        log: Option<Log>,
        outboxes: Outboxes,
    ) -> io::Result<Server> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        // Set again (it is idempotent) to learn whether the listener has it.
        let nodelay = if cfg!(target_os = "linux") && crate::sys::set_listener_nodelay(&listener) {
            Nodelay::FromListenerAfterFirstDrain
        } else {
            Nodelay::PerSocket
        };
        let signal = ShutdownSignal::install()?;
        poll.registry()
            .register(&mut SourceFd(&signal.fd()), SIGNAL, Interest::READABLE)?;
        let registry = poll.registry().try_clone()?;
        let policy = Policy {
            allowed_origins: config.allowed_origins.clone(),
        };
        let app = if config.echo {
            App::Echo
        } else {
            let mut router = Router::new(
                Limits {
                    max_body: config.max_body,
                    presence_limit: config.presence_limit,
                },
                outboxes,
            );
            router.start_ids_after(wall_clock_ms());
            App::Chat(Box::new(router))
        };
        let post = Post {
            flush_list: Vec::new(),
            presence: PresenceBatch::default(),
            departures: Vec::new(),
            began_closing: Vec::new(),
            after_sync: Vec::new(),
            max_outbound: config.max_outbound,
            spares: Spares::default(),
            shed_above: config.max_outbound / 4,
        };
        Ok(Server {
            poll,
            listener: Some(listener),
            signal: Some(signal),
            conns: Slab::new(),
            read_buf: Box::default(),
            core: Core {
                config,
                policy,
                max_connections,
                registry,
                clock: Clock::starting_now(),
                timers: Timers::default(),
                app,
                post,
                read_again: Vec::new(),
                dead: Vec::new(),
                handshakes: VecDeque::new(),
                next_id: 1,
                accept_paused_until: None,
                nodelay,
                refusing: false,
                shutdown_by: None,
                log,
                now_ms: 0,
                metrics: Metrics::default(),
            },
        })
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match &self.listener {
            Some(listener) => listener.local_addr(),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Runs until a shutdown signal has been handled.
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
            self.core.now_ms = wall_clock_ms();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    SIGNAL => self.begin_shutdown(now),
                    Token(slot) => {
                        let Some(conn) = self.conns.get_mut(slot) else {
                            continue;
                        };
                        if conn.dead {
                            continue;
                        }
                        if event.is_writable() {
                            self.core.post.list_for_flush(slot, conn);
                        }
                        if event.is_read_closed() || event.is_error() {
                            self.read(slot, Drain::UntilWouldBlock);
                        } else if event.is_readable() {
                            self.read(slot, Drain::UntilShortRead);
                        }
                        self.core.settle(&mut self.conns, now);
                    }
                }
            }
            self.end_turn(now)?;
            if let Some(by) = self.core.shutdown_by {
                if self.conns.is_empty() || Instant::now() >= by {
                    self.core.compact_log();
                    log::info!("shut down ({} connections left)", self.conns.len());
                    log::flush();
                    return Ok(());
                }
            }
        }
    }

    /// How long the loop may sleep: until the next deadline, or forever.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.core.read_again.is_empty() {
            return Some(Duration::ZERO);
        }
        let next = [
            self.core
                .timers
                .next()
                .map(|at| self.core.clock.instant(at)),
            self.core.accept_paused_until,
            self.core.post.presence.due,
            self.core.shutdown_by,
            self.core.next_expiry(now),
        ]
        .into_iter()
        .flatten()
        .min();
        // Round up so a deadline is never woken for a millisecond early.
        next.map(|at| at.saturating_duration_since(now) + Duration::from_micros(999))
    }

    fn end_turn(&mut self, now: Instant) -> io::Result<()> {
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
                self.read(slot, Drain::UntilWouldBlock);
                self.core.settle(&mut self.conns, now);
            }
        }
        self.core.fire_timers(&mut self.conns, now);
        self.core.expire_held(&mut self.conns);
        self.core.settle(&mut self.conns, now);
        self.core.commit(&mut self.conns)?;
        // A connection that dies in the flush departs, and its `leave`
        // must not wait for the next event: flush again (a few rounds at most).
        for _ in 0..3 {
            self.core.release_presence(&mut self.conns, now);
            self.core.flush(&mut self.conns, now);
            self.core.settle(&mut self.conns, now);
            if self.core.post.flush_list.is_empty() {
                break;
            }
        }
        // Events owed since the last release wait for the window's deadline.
        self.core.post.presence.arm(now);
        for slot in std::mem::take(&mut self.core.dead) {
            if self.conns.get(slot).is_some_and(|c| c.dead) {
                let conn = self.conns.remove(slot);
                self.core.metrics.count_close(conn.close_reason);
                log::info!("close #{} {}: {}", conn.id, conn.peer, conn.close_reason);
            }
        }
        Ok(())
    }

    fn accept(&mut self, now: Instant) {
        if self.core.accept_paused_until.is_some() {
            return;
        }
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            let (socket, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The queue was empty once: every later connection
                    // completed after the listener had TCP_NODELAY.
                    if self.core.nodelay == Nodelay::FromListenerAfterFirstDrain {
                        self.core.nodelay = Nodelay::FromListener;
                    }
                    return;
                }
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
                    // ECONNABORTED, EPROTO...: that one connection is gone.
                    log::debug!("accept: {e}");
                    continue;
                }
            };
            let live = self.conns.len() - self.core.dead.len();
            if live >= self.core.max_connections
                && !self.core.evict_oldest_handshake(&mut self.conns)
            {
                if !self.core.refusing {
                    log::warn!(
                        "at --max-connections ({}): refusing new connections with 503",
                        self.core.max_connections
                    );
                    self.core.refusing = true;
                }
                // Best effort: the socket is fresh, so its buffer has room.
                let _ = (&socket).write(http::OVERLOADED);
                self.core.metrics.count_refused_at_capacity();
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

    /// SIGINT/SIGTERM: stop accepting, close every client with 1001, and
    /// give them `--shutdown-timeout` to answer.
    fn begin_shutdown(&mut self, now: Instant) {
        if let Some(signal) = &self.signal {
            signal.drain();
        }
        if self.core.shutdown_by.is_some() {
            log::warn!("second signal: exiting now");
            self.core.shutdown_by = Some(now);
            return;
        }
        log::info!("shutting down: closing {} connections", self.conns.len());
        // Owed presence goes out shared now, not copied once per close.
        self.core.post.release_presence(&mut self.conns);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.core.registry.deregister(&mut listener);
        }
        self.core.shutdown_by = Some(now + self.core.config.shutdown_timeout);
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            let conn = &mut self.conns[slot];
            match conn.phase {
                Phase::Handshake(_) => self.core.kill(conn, slot, CloseReason::Shutdown),
                _ => self.core.post.close(
                    conn,
                    slot,
                    1001,
                    "server shutting down",
                    CloseReason::Shutdown,
                ),
            }
        }
        self.core.settle(&mut self.conns, now);
    }

    /// Reads until the socket is drained, the budget is spent, or the
    /// connection stops wanting input.
    fn read(&mut self, slot: usize, drain: Drain) {
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
            if self.read_buf.is_empty() {
                // Allocated at the first read, so a server nobody talks to
                // never touches it.
                self.read_buf = vec![0; READ_BUFFER].into_boxed_slice();
            }
            match conn.socket.read(&mut self.read_buf[..room]) {
                Ok(0) => {
                    let why = lost_or(conn);
                    self.core.kill(conn, slot, why);
                    return;
                }
                Ok(n) => {
                    self.core.metrics.bytes_in += n as u64;
                    // The routing-latency histogram starts at the read.
                    let read_at = Instant::now();
                    self.core
                        .on_bytes(&mut self.conns, slot, &mut self.read_buf[..n], read_at);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        let id = self.conns[slot].id;
                        self.core.read_again.push((slot, id));
                        return;
                    }
                    if n < room && drain == Drain::UntilShortRead {
                        // The receive queue was empty at this read: data
                        // arriving later raises a new edge, so the read that
                        // would only say WouldBlock is saved.
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("read #{}: {e}", conn.id);
                    let why = lost_or(conn);
                    self.core.kill(conn, slot, why);
                    return;
                }
            }
        }
    }
}

/// How far `Server::read` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Stop after a read that did not fill the buffer. Safe with
    /// edge-triggered epoll on Linux, where every arriving segment raises a
    /// new edge; not when the peer's FIN or an error may already be queued
    /// behind the data (those come with their own event flags).
    UntilShortRead,
    /// Read until `WouldBlock`.
    UntilWouldBlock,
}

/// A closing connection ends for the reason it was closing; any other was lost.
fn lost_or(conn: &Connection) -> CloseReason {
    match conn.phase {
        Phase::Closing => conn.close_reason,
        _ => CloseReason::ConnectionLost,
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
        if self.nodelay != Nodelay::FromListener {
            let _ = socket.set_nodelay(true);
        }
        self.forget_finished_handshakes(conns);
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
        self.metrics.connections_accepted += 1;
        let conn = entry.insert(Connection::new(id, peer, socket));
        log::info!("open #{id} {peer}");
        self.handshakes.push_back((slot, id));
        let at = self.clock.tick(now) + self.config.handshake_timeout;
        self.set_deadline(conn, slot, at);
    }

    /// Drops entries at the front of `handshakes` whose connection is past
    /// the handshake, so the queue holds about as many entries as there are
    /// handshakes in progress.
    fn forget_finished_handshakes(&mut self, conns: &Slab<Connection>) {
        while let Some(&(slot, id)) = self.handshakes.front() {
            let pending = conns
                .get(slot)
                .is_some_and(|c| c.id == id && !c.dead && matches!(c.phase, Phase::Handshake(_)));
            if pending {
                return;
            }
            self.handshakes.pop_front();
        }
    }

    /// At the connection limit: closes the oldest connection still in its
    /// handshake to make room. False if there is none.
    fn evict_oldest_handshake(&mut self, conns: &mut Slab<Connection>) -> bool {
        self.forget_finished_handshakes(conns);
        let Some((slot, _)) = self.handshakes.pop_front() else {
            return false;
        };
        let conn = &mut conns[slot];
        log::debug!(
            "#{} evicted: handshake unfinished at the connection limit",
            conn.id
        );
        self.kill(conn, slot, CloseReason::HandshakeTimeout);
        true
    }

    /// Sets a connection's deadline, arming a timer only when it moves earlier.
    fn set_deadline(&mut self, conn: &mut Connection, slot: usize, at: Tick) {
        conn.deadline = Some(at);
        if conn.armed.is_none_or(|armed| at < armed) {
            conn.armed = Some(at);
            self.timers.push(at, slot, conn.id);
        }
    }

    /// Lets the router forget departed names and bounds how long closing
    /// connections may linger. Runs after every piece of work in a turn.
    fn settle(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        while !self.post.departures.is_empty() || !self.post.began_closing.is_empty() {
            for (slot, name) in std::mem::take(&mut self.post.departures) {
                if let App::Chat(router) = &mut self.app {
                    let mut mailer = Mailer {
                        conns,
                        post: &mut self.post,
                    };
                    router.leave(slot, &name, &mut mailer);
                }
            }
            for slot in std::mem::take(&mut self.post.began_closing) {
                if let Some(conn) = conns.get_mut(slot) {
                    let at = self.clock.tick(now) + self.config.close_timeout;
                    self.set_deadline(conn, slot, at);
                }
            }
        }
    }

    fn fire_timers(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        let tick = self.clock.tick(now);
        while let Some((at, slot, id)) = self.timers.pop_due(tick) {
            let Some(conn) = conns.get_mut(slot) else {
                continue;
            };
            if conn.id != id || conn.dead || conn.armed != Some(at) {
                continue; // a stale entry: its connection is gone or re-armed
            }
            conn.armed = None;
            match conn.deadline {
                Some(deadline) if deadline <= tick => {
                    conn.deadline = None;
                    // It may close, and many idle users can time out in one turn.
                    self.post.settle_presence(conns, slot);
                    if let Some(conn) = conns.get_mut(slot) {
                        self.on_deadline(conn, slot, now);
                    }
                }
                Some(later) => {
                    conn.armed = Some(later);
                    self.timers.push(later, slot, id);
                }
                None => {}
            }
        }
    }

    fn on_deadline(&mut self, conn: &mut Connection, slot: usize, now: Instant) {
        let config = &self.config;
        let now = self.clock.tick(now);
        match &mut conn.phase {
            Phase::Handshake(_) => self.kill(conn, slot, CloseReason::HandshakeTimeout),
            Phase::Closing => {
                let why = match conn.close_reason {
                    CloseReason::None | CloseReason::Normal => CloseReason::CloseTimeout,
                    other => other,
                };
                self.kill(conn, slot, why);
            }
            Phase::Open(state) => {
                if now >= state.last_rx + config.idle_timeout {
                    log::debug!("#{}: idle timeout", conn.id);
                    self.post
                        .close(conn, slot, 1001, "idle timeout", CloseReason::IdleTimeout);
                    return;
                }
                if conn
                    .stalled_since
                    .is_some_and(|since| now >= since + config.write_timeout)
                {
                    // A close frame could not get through a full socket either.
                    self.kill(conn, slot, CloseReason::WriteStall);
                    return;
                }
                if now >= state.next_ping {
                    state.next_ping = now + config.ping_interval;
                    conn.out.push_control_bounded(Chunk::Static(PING), 1);
                    self.post.list_for_flush(slot, conn);
                }
                let next = self.heartbeat_deadline(conn);
                if let Some(next) = next {
                    self.set_deadline(conn, slot, next);
                }
            }
            Phase::Decoding => {}
        }
    }

    /// The next time an open chat connection needs a look: ping, idle or stall.
    fn heartbeat_deadline(&self, conn: &Connection) -> Option<Tick> {
        let Phase::Open(state) = &conn.phase else {
            return None;
        };
        if matches!(self.app, App::Echo) {
            return conn.stalled_since.map(|s| s + self.config.write_timeout);
        }
        let mut next = (state.last_rx + self.config.idle_timeout).min(state.next_ping);
        if let Some(since) = conn.stalled_since {
            next = next.min(since + self.config.write_timeout);
        }
        Some(next)
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
                let head = std::mem::take(head);
                self.on_request(conns, slot, head, now);
            }
            Phase::Open(state) => {
                state.last_rx = self.clock.tick(now);
                self.on_frames(conns, slot, data, now);
            }
            // Input after our close is read only to find the peer's EOF.
            Phase::Closing | Phase::Decoding => {}
        }
    }

    fn on_request(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        mut head: Vec<u8>,
        now: Instant,
    ) {
        let conn = &mut conns[slot];
        match handshake::parse(&head, &self.policy) {
            Outcome::Partial => conn.phase = Phase::Handshake(head),
            Outcome::Upgrade(upgrade) => {
                // Queued as a control entry: nothing (a pong to a ping sent
                // right behind the request) may overtake the 101.
                conn.out.push_control(Chunk::Owned(upgrade.response));
                let now_tick = self.clock.tick(now);
                let mut state = OpenState::new(now_tick);
                state.next_ping = now_tick + self.config.ping_interval;
                conn.phase = Phase::Open(state);
                conn.deadline = None;
                self.post.list_for_flush(slot, conn);
                if let Some(next) = self.heartbeat_deadline(conn) {
                    self.set_deadline(conn, slot, next);
                }
                if let App::Chat(router) = &mut self.app {
                    let mut mailer = Mailer {
                        conns,
                        post: &mut self.post,
                    };
                    let name = router.join(slot, &upgrade.query, &mut mailer);
                    let conn = &mut conns[slot];
                    match (&mut conn.phase, name) {
                        (Phase::Open(state), Some(name)) => {
                            log::debug!("#{} joined as {name}", conn.id);
                            state.username = Some(name);
                        }
                        _ => return, // refused: closing
                    }
                }
                // Frames sent right behind the request head.
                if head.len() > upgrade.head_len {
                    self.on_frames(conns, slot, &mut head[upgrade.head_len..], now);
                }
            }
            Outcome::Get(resource) => {
                let response = match resource {
                    Resource::Health => Response::text(Status::Ok, "ok"),
                    Resource::Page => {
                        Response::with_body(Status::Ok, "text/html; charset=utf-8", PAGE.to_vec())
                    }
                    Resource::Metrics => Response::with_body(
                        Status::Ok,
                        "text/plain; version=0.0.4; charset=utf-8",
                        self.metrics
                            .render(&self.snapshot(conns.len()))
                            .into_bytes(),
                    ),
                };
                let conn = &mut conns[slot];
                conn.respond_and_close(response.to_bytes(), CloseReason::Normal);
                self.post.began_closing.push(slot);
                self.post.list_for_flush(slot, conn);
            }
            Outcome::Reject(response) => {
                let status = response.status.code();
                log::debug!("#{} refused: {status}", conn.id);
                conn.respond_and_close(response.to_bytes(), CloseReason::HandshakeRejected(status));
                self.post.began_closing.push(slot);
                self.post.list_for_flush(slot, conn);
            }
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
        let mut routed = 0;
        while pos < data.len() {
            match state.decoder.decode(&mut data[pos..], max_message) {
                Ok((used, message)) => {
                    pos += used;
                    if let Some(message) = message {
                        routed += u64::from(matches!(message, Message::Text(_)));
                        self.on_message(conns, slot, state.username.as_deref(), message);
                        if !matches!(conns[slot].phase, Phase::Decoding) {
                            break; // closing: the rest is ignored
                        }
                        // A chat client that keeps asking without reading the
                        // answers (a `users` reply can be 100 times its request),
                        // within one read, before the read pause can act. Echo
                        // replies are never larger than what was read.
                        let piled_up =
                            conns[slot].out.bytes() > self.config.max_outbound.saturating_mul(2);
                        if piled_up && matches!(self.app, App::Chat(_)) {
                            log::debug!("#{}: replies piled up unread", conns[slot].id);
                            self.post.close(
                                &mut conns[slot],
                                slot,
                                1008,
                                "slow consumer",
                                CloseReason::SlowConsumer,
                            );
                            break;
                        }
                    }
                }
                Err(error) => {
                    log::debug!("#{} protocol error: {}", conns[slot].id, error.reason());
                    let code = error.close_code();
                    self.post.settle_presence(conns, slot);
                    self.post.close(
                        &mut conns[slot],
                        slot,
                        code,
                        error.reason(),
                        CloseReason::ProtocolError(code),
                    );
                    break;
                }
            }
        }
        if routed > 0 && matches!(self.app, App::Chat(_)) {
            self.metrics.observe_routing(now.elapsed(), routed);
        }
        let conn = &mut conns[slot];
        if matches!(conn.phase, Phase::Decoding) {
            conn.phase = Phase::Open(state);
        } else if let Some(name) = state.username.take() {
            self.post.departures.push((slot, name));
        }
    }

    fn on_message(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        username: Option<&str>,
        message: Message<'_>,
    ) {
        let conn = &mut conns[slot];
        match message {
            Message::Ping(payload) => {
                conn.out.push_control_bounded(
                    Chunk::Owned(encode(Opcode::Pong, payload)),
                    PONGS_QUEUED,
                );
                self.post.list_for_flush(slot, conn);
            }
            Message::Pong(_) => {}
            Message::Close(frame) => {
                // What it is owed came before its close.
                self.post.settle_presence(conns, slot);
                let conn = &mut conns[slot];
                if let Some(name) = conn.answer_close(frame.map(|f| f.code)) {
                    self.post.departures.push((slot, name));
                }
                self.post.began_closing.push(slot);
                self.post.list_for_flush(slot, conn);
            }
            Message::Text(text) => match &mut self.app {
                App::Echo => {
                    conn.out
                        .push_frame(Opcode::Text, text.as_bytes(), &mut self.post.spares);
                    self.post.list_for_flush(slot, conn);
                }
                App::Chat(router) => {
                    let Some(from) = username else {
                        return;
                    };
                    let mut mailer = Mailer {
                        conns,
                        post: &mut self.post,
                    };
                    router.handle(slot, from, text, self.now_ms, &mut mailer);
                }
            },
            Message::Binary(bytes) => match self.app {
                App::Echo => {
                    conn.out
                        .push_frame(Opcode::Binary, bytes, &mut self.post.spares);
                    self.post.list_for_flush(slot, conn);
                }
                App::Chat(_) => self.post.close(
                    conn,
                    slot,
                    1003,
                    "binary messages are not supported",
                    CloseReason::UnsupportedData,
                ),
            },
        }
    }

    /// When the oldest held message expires, on the monotonic clock.
    fn next_expiry(&self, now: Instant) -> Option<Instant> {
        let App::Chat(router) = &self.app else {
            return None;
        };
        let at_ms = router.outboxes.next_expiry()?;
        Some(now + Duration::from_millis(at_ms.saturating_sub(wall_clock_ms())))
    }

    fn expire_held(&mut self, conns: &mut Slab<Connection>) {
        if let App::Chat(router) = &mut self.app {
            if router
                .outboxes
                .next_expiry()
                .is_some_and(|at| at <= self.now_ms)
            {
                let mut mailer = Mailer {
                    conns,
                    post: &mut self.post,
                };
                router.expire(self.now_ms, &mut mailer);
            }
        }
    }

    /// Group commit: this turn's outbox records go to the log with one
    /// sync, then the replies that promised durability are released.
    fn commit(&mut self, conns: &mut Slab<Connection>) -> io::Result<()> {
        let App::Chat(router) = &mut self.app else {
            return Ok(());
        };
        let records = router.outboxes.take_pending();
        if let Some(log) = &mut self.log {
            if let Err(e) = log.append(&records) {
                log::error!("cannot write the outbox log: {e}");
                return Err(e);
            }
            let live = router.outboxes.live_log_bytes() as u64;
            if log.len() >= self.config.compact_min_bytes && log.len() > live.saturating_mul(2) {
                let before = log.len();
                log.compact(&router.outboxes.snapshot())?;
                log::info!("outbox log compacted: {before} -> {} bytes", log.len());
            }
        }
        for (slot, frame) in std::mem::take(&mut self.post.after_sync) {
            self.post.settle_presence(conns, slot);
            if let Some(conn) = conns.get_mut(slot) {
                if conn.is_open() {
                    conn.out.push_reusing(frame, &mut self.post.spares);
                    self.post.list_for_flush(slot, conn);
                }
            }
        }
        Ok(())
    }

    /// Rewrites the log to just the live records (at a clean shutdown, so
    /// the next start reads little and skips no sequence numbers).
    fn compact_log(&mut self) {
        if let (App::Chat(router), Some(log)) = (&mut self.app, &mut self.log) {
            if let Err(e) = log.compact(&router.outboxes.snapshot()) {
                log::warn!("compacting the outbox log at shutdown: {e}");
            }
        }
    }

    /// Figures for `/metrics` that live outside `Metrics`.
    fn snapshot(&self, open_connections: usize) -> Snapshot {
        let mut s = Snapshot {
            open_connections,
            ..Snapshot::default()
        };
        if let App::Chat(router) = &self.app {
            s.users_online = router.online();
            s.public_messages = router.stats.public;
            s.private_messages = router.stats.private;
            s.deliveries = router.stats.deliveries;
            s.public_shed = router.stats.shed;
            s.errors = router.stats.errors;
            (s.offline_messages, s.offline_bytes) = router.outboxes.held();
        }
        s
    }

    /// Closes the presence window when due (see `presence`).
    fn release_presence(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        if self.post.presence.should_close(now) {
            self.post.release_presence(conns);
        }
    }

    /// Writes every listed connection's queue, once per turn.
    fn flush(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        for slot in std::mem::take(&mut self.post.flush_list) {
            let Some(conn) = conns.get_mut(slot) else {
                continue;
            };
            conn.flush_listed = false;
            if conn.dead || conn.write_shut {
                continue;
            }
            let before = conn.out.bytes();
            let spares = &mut self.post.spares;
            let mut result = conn.out.write_to(&mut conn.socket, spares);
            self.metrics.bytes_out += (before - conn.out.bytes()) as u64;
            if matches!(result, Ok(Flushed::All)) && conn.shed > 0 && conn.is_open() {
                // The backlog drained: tell the reader what it missed.
                let mut json = Vec::with_capacity(40);
                self.post.pay_presence_copy(conn);
                let spares = &mut self.post.spares;
                protocol::encode::gap(&mut json, u64::from(conn.shed));
                conn.shed = 0;
                conn.out.push_frame(Opcode::Text, &json, spares);
                result = conn.out.write_to(&mut conn.socket, spares);
            }
            match result {
                Ok(Flushed::All) => {
                    conn.stalled_since = None;
                    if conn.wants_writable {
                        conn.wants_writable = false;
                        self.reregister(conn, slot, Interest::READABLE);
                    }
                    if matches!(conn.phase, Phase::Closing) {
                        // Last bytes out: say so with FIN, then wait for the peer's.
                        conn.write_shut = true;
                        let _ = conn.socket.shutdown(Shutdown::Write);
                    }
                    self.resume_reading(conn, slot);
                }
                Ok(Flushed::Blocked) => {
                    if conn.stalled_since.is_none() || conn.out.bytes() < before {
                        conn.stalled_since = Some(self.clock.tick(now));
                        if let Some(next) = self.heartbeat_deadline(conn) {
                            self.set_deadline(conn, slot, next);
                        }
                    }
                    if !conn.wants_writable {
                        conn.wants_writable = true;
                        self.reregister(conn, slot, Interest::READABLE | Interest::WRITABLE);
                    }
                    if conn.out.bytes() < self.config.max_outbound {
                        self.resume_reading(conn, slot);
                    }
                }
                Err(e) => {
                    log::debug!("write #{}: {e}", conn.id);
                    let why = lost_or(conn);
                    self.kill(conn, slot, why);
                }
            }
        }
    }

    fn resume_reading(&mut self, conn: &mut Connection, slot: usize) {
        if conn.read_paused {
            conn.read_paused = false;
            self.read_again.push((slot, conn.id));
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
        if let Some(name) = conn.take_username() {
            self.post.departures.push((slot, name));
        }
        conn.dead = true;
        if conn.close_reason == CloseReason::None {
            conn.close_reason = why;
        }
        // No deregister: the socket is closed at the end of the turn, which
        // takes it out of the epoll set, and until then its events find it dead.
        self.dead.push(slot);
    }
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Accept errors that mean "no resources now" rather than "this one connection failed".
fn is_out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    //! The presence window's bookkeeping, in process: real (idle) sockets
    //! only to build connections; queues are read back without sending.
    use super::*;

    fn open_connection(keep: &mut Vec<std::net::TcpStream>) -> Connection {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        keep.push(
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect"),
        );
        let (socket, peer) = listener.accept().expect("accept");
        socket.set_nonblocking(true).expect("nonblocking");
        let mut conn = Connection::new(1, peer, TcpStream::from_std(socket));
        // Its own clock: these tests never compare connection times.
        let now = Clock::starting_now().tick(Instant::now());
        conn.phase = Phase::Open(OpenState::new(now));
        conn
    }

    fn post(shed_above: usize) -> Post {
        Post {
            flush_list: Vec::new(),
            presence: PresenceBatch::default(),
            departures: Vec::new(),
            began_closing: Vec::new(),
            after_sync: Vec::new(),
            max_outbound: 1 << 20,
            spares: Spares::default(),
            shed_above,
        }
    }

    fn queued(conn: &mut Connection) -> Vec<u8> {
        let mut sink = Vec::new();
        conn.out
            .write_to(&mut sink, &mut Spares::default())
            .expect("a Vec takes everything");
        sink
    }

    fn event(text: &str) -> Rc<[u8]> {
        Rc::from(text.as_bytes())
    }

    #[test]
    fn presence_is_owed_then_released_in_order_and_a_shed_event_is_left_out() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let (a, b, c) = (
            conns.insert(open_connection(&mut keep)),
            conns.insert(open_connection(&mut keep)),
            conns.insert(open_connection(&mut keep)),
        );
        let mut post = post(4);
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        let (one, two, three) = (event("[1]"), event("[2]"), event("[3]"));
        for slot in [a, b] {
            let sent = mailer.send(slot, Chunk::Shared(one.clone()), Class::Presence);
            assert_eq!(sent, Delivery::Queued);
        }
        assert!(mailer.conns[a].out.is_empty(), "owed, not queued yet");

        // b falls behind: it is shed from event two, which a still gets.
        mailer.conns[b].out.push(Chunk::Static(b"backlog"));
        let to_a = mailer.send(a, Chunk::Shared(two.clone()), Class::Presence);
        let to_b = mailer.send(b, Chunk::Shared(two.clone()), Class::Presence);
        assert_eq!((to_a, to_b), (Delivery::Queued, Delivery::Shed));
        assert_eq!(queued(&mut mailer.conns[b]), b"backlog[1]");
        assert_eq!(queued(&mut mailer.conns[a]), b"[1][2]");

        // A new window: c is owed three; a message for c takes it along first.
        mailer.send(c, Chunk::Shared(three.clone()), Class::Presence);
        mailer.send_text(c, b"{}", Class::Reply);
        assert_eq!(queued(&mut mailer.conns[c]), b"[3]\x81\x02{}");

        // Owed events go out before a close frame.
        mailer.send(a, Chunk::Shared(event("[4]")), Class::Presence);
        let conn = &mut conns[a];
        post.close(conn, a, 1000, "", CloseReason::Normal);
        let bytes = queued(conn);
        assert!(bytes.starts_with(b"[4]\x88"), "{bytes:?}");
    }

    #[test]
    fn a_crowd_closing_in_one_turn_gets_its_presence_with_linear_bookkeeping() {
        let leavers = 200;
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let slots: Vec<usize> = (0..leavers)
            .map(|_| conns.insert(open_connection(&mut keep)))
            .collect();
        let mut post = post(usize::MAX);
        let text = r#"{"type":"leave","username":"someone","online":100}"#;
        // Each leaver closes, then its `leave` is owed to everyone still open.
        for (i, &slot) in slots.iter().enumerate() {
            let leave = event(text);
            post.settle_presence(&mut conns, slot);
            post.close(&mut conns[slot], slot, 1000, "", CloseReason::Normal);
            let mut mailer = Mailer {
                conns: &mut conns,
                post: &mut post,
            };
            for &other in &slots[i + 1..] {
                mailer.send(other, Chunk::Shared(leave.clone()), Class::Presence);
            }
        }
        let (chunks, copied) = slots
            .iter()
            .map(|&s| conns[s].out.footprint())
            .fold((0, 0), |(c, b), (chunks, owned)| (c + chunks, b + owned));
        // Releasing the window at every close would queue ~leavers²/2 parts
        // (20,100 here); copying every debt, ~leavers²/2 events (~1 MB).
        assert!(
            chunks < 10 * leavers,
            "{chunks} chunks for {leavers} leavers"
        );
        assert!(
            copied < 256 * 1024,
            "{copied} bytes copied for {leavers} leavers"
        );
        for (i, &slot) in slots.iter().enumerate() {
            let bytes = queued(&mut conns[slot]);
            let close_at = bytes
                .iter()
                .position(|&b| b == 0x88)
                .expect("a close frame");
            assert_eq!(
                bytes[..close_at].len(),
                i * text.len(),
                "leaver {i} gets every earlier leave before its close"
            );
        }
    }

    #[test]
    fn a_settled_debt_is_listed_for_this_turns_flush() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let slot = conns.insert(open_connection(&mut keep));
        let mut post = post(1 << 20);
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        mailer.send(slot, Chunk::Shared(event("[1]")), Class::Presence);
        post.settle_presence(&mut conns, slot);
        assert!(conns[slot].flush_listed);
        assert_eq!(post.flush_list, [slot]);
        assert_eq!(queued(&mut conns[slot]), b"[1]");
    }

    #[test]
    fn a_slow_consumer_gets_its_owed_presence_then_the_close_and_not_the_private() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let slot = conns.insert(open_connection(&mut keep));
        let mut post = post(1 << 20);
        post.max_outbound = 16;
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        mailer.send(slot, Chunk::Shared(event("[1]")), Class::Presence);
        let private = Chunk::Owned(b"\x81\x20 a private of 32 bytes .........".to_vec());
        let sent = mailer.send(slot, private, Class::Private);
        assert_eq!(sent, Delivery::Disconnected);
        let bytes = queued(&mut conns[slot]);
        assert!(bytes.starts_with(b"[1]\x88"), "{bytes:?}");
        assert!(!bytes.windows(9).any(|w| w == b"a private"), "{bytes:?}");
    }
}
