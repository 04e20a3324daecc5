//! The event loop: one `mio::Poll` on one thread.
//!
//! Each turn: wait for readiness (or the next deadline), accept, read every
//! ready socket into one buffer shared by all connections and hand the bytes
//! to the connection's phase ([`dispatch`]), fire due timers
//! ([`lifecycle`]), commit the outbox log ([`crate::persist`]), then flush
//! every connection that has output with one write each, and only then free
//! the slots of connections that died this turn, so an event of this turn
//! can never reach a newcomer in a reused slot. What goes into a
//! connection's queue is decided in [`crate::delivery`] alone.

mod admission;
mod cluster;
mod dispatch;
mod lifecycle;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;

use crate::auth::Auth;
use crate::budget;
use crate::chat::{Limits, Router};
use crate::config::Config;
use crate::conn::{CloseReason, Connection, Phase};
use crate::delivery::outbound::Flushed;
use crate::delivery::policy::{self, Marks, Times};
use crate::delivery::Post;
use crate::handshake::{self, Policy};
use crate::http;
use crate::log;
use crate::metrics::{Metrics, Snapshot};
use crate::persist;
use crate::store::log::Log;
use crate::store::Outboxes;
use crate::sys::ShutdownSignal;
use crate::timer::{Clock, Timers};
use crate::ws::CloseCode;

const LISTENER: Token = Token(usize::MAX);
const SIGNAL: Token = Token(usize::MAX - 1);
/// `--metrics-listen`: `/metrics` and `/healthz` only.
const ADMIN_LISTENER: Token = Token(usize::MAX - 2);

/// The read buffer every connection shares.
const READ_BUFFER: usize = 64 * 1024;

/// Bytes read from one connection per turn before others get their turn.
const READ_BUDGET: usize = 256 * 1024;

/// Pending connections the kernel may hold for us (capped by somaxconn);
/// mio's default of 128 drops SYNs under a burst of handshakes.
const LISTEN_BACKLOG: i32 = 4096;

/// How long to stop accepting when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// What the server does with WebSocket messages.
enum App {
    Echo,
    Chat(Box<Router>),
}

pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    /// `--metrics-listen`, when metrics are served apart from the chat.
    admin_listener: Option<TcpListener>,
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
    /// Whether the log can be written now.
    disk: persist::Disk,
    /// Wall-clock milliseconds, read once per turn for message timestamps.
    now_ms: u64,
    /// Who may connect as whom.
    auth: Auth,
    /// Per-address limits and trusted proxies.
    admission: admission::Admission,
    metrics: Metrics,
    /// `--cluster`: this process is one node of a chat shared over Redis.
    cluster: Option<crate::cluster::Cluster>,
    /// What the loop remembers of the memory ledger (see `budget`).
    memory: budget::Watch,
    /// The names of connections the router has let go of whose sockets are
    /// not yet freed (a closing connection lingers up to `--close-timeout`),
    /// by connection id: for their `close` log line. Filled only when `info`
    /// is logged.
    left_names: HashMap<u64, Rc<str>>,
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

impl Server {
    /// Binds the listening socket (first, so a port in use fails before
    /// anything else is touched).
    pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
        Self::listen_on(addr, false)
    }

    /// [`listen`](Self::listen), sharing the port with other processes
    /// when `reuseport` (`--reuseport`).
    pub fn listen_on(addr: std::net::SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
        let listener = if reuseport {
            crate::cluster::reuseport::bind(addr, LISTEN_BACKLOG)?
        } else {
            TcpListener::bind(addr)?
        };
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
        mut admin_listener: Option<TcpListener>,
        config: Config,
        auth: Auth,
        max_connections: usize,
        log: Option<Log>,
        outboxes: Outboxes,
    ) -> io::Result<Server> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        if let Some(admin) = &mut admin_listener {
            poll.registry()
                .register(admin, ADMIN_LISTENER, Interest::READABLE)?;
        }
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
            shutting_down: false,
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
            router.start_numbers_after(wall_clock_ms());
            if auth.is_on() {
                router.set_auth(auth.clone());
            }
            // With tokens, only names a valid token named are users.
            router.set_offline_to_unknown(config.offline_to_unknown && !auth.is_on());
            router.set_message_policy(config.limits.message_policy());
            App::Chat(Box::new(router))
        };
        budget::set_limits(budget::Limits {
            memory_budget: config.memory_budget,
            max_partial: config.max_partial_bytes,
        });
        let clock = Clock::starting_now();
        let post = Post::new(
            Marks::new(config.max_outbound),
            Times {
                slow_reader_after: config.slow_reader_after,
                write_timeout: config.write_timeout,
            },
            clock.tick(Instant::now()),
        );
        let admission = admission::Admission::new(&config.limits);
        let mut server = Server {
            poll,
            listener: Some(listener),
            admin_listener,
            signal: Some(signal),
            conns: Slab::new(),
            read_buf: Box::default(),
            core: Core {
                config,
                policy,
                max_connections,
                registry,
                clock,
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
                disk: persist::Disk::default(),
                now_ms: 0,
                auth,
                admission,
                metrics: Metrics::default(),
                cluster: None,
                memory: budget::Watch::default(),
                left_names: HashMap::new(),
            },
        };
        if let (Some(url), App::Chat(_)) = (&server.core.config.cluster, &server.core.app) {
            let limits = server.core.config.store_limits();
            let settings = crate::cluster::Settings {
                url: url.clone(),
                prefix: server.core.config.cluster_prefix.clone(),
                lease: server.core.config.cluster_lease,
                quotas: crate::cluster::store::Quotas {
                    max_per_user: limits.max_per_user,
                    max_bytes: limits.max_bytes,
                    max_per_sender: limits.max_per_sender,
                    max_bytes_per_sender: limits.max_bytes_per_sender,
                    ttl_ms: limits.ttl_ms,
                    known_only: !server.core.config.offline_to_unknown,
                },
                max_known: limits.max_known_users,
            };
            let addr = url.resolve()?;
            let cluster = crate::cluster::Cluster::new(settings, addr, Instant::now());
            log::info!("cluster: node {} using Redis at {addr}", cluster.node());
            server.core.start_cluster(cluster);
        }
        Ok(server)
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
            self.core.post.now = self.core.clock.tick(now);
            self.core.post.now_ms = self.core.now_ms;
            self.core.post.pressure = budget::current_pressure();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now, Entrance::Chat),
                    ADMIN_LISTENER => self.accept(now, Entrance::Admin),
                    SIGNAL => self.begin_shutdown(now),
                    token @ (crate::cluster::COMMAND_TOKEN | crate::cluster::SUBSCRIBER_TOKEN) => {
                        self.core.on_cluster_ready(&mut self.conns, token, now);
                        self.core.settle(&mut self.conns, now);
                    }
                    Token(slot) => {
                        let Some(conn) = self.conns.get_mut(slot) else {
                            continue;
                        };
                        if conn.dead {
                            continue;
                        }
                        if event.is_writable() {
                            conn.blocked = false;
                            self.core.post.list_for_flush(slot, conn);
                        }
                        if event.is_error() && conn.held {
                            // Reset: nothing it sent can be read any more,
                            // so its hold must not keep its name taken.
                            let why = lost_or(conn);
                            self.core.kill(conn, slot, why);
                        } else if event.is_read_closed() || event.is_error() {
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
        // Listed in the last flush round's settle: written next turn, now.
        if !self.core.read_again.is_empty() || !self.core.post.nothing_to_flush() {
            return Some(Duration::ZERO);
        }
        let clock = self.core.clock;
        let next = [
            self.core.timers.next().map(|at| clock.instant(at)),
            self.core.post.next_hold_due().map(|at| clock.instant(at)),
            self.core.accept_paused_until,
            self.core.post.presence.due,
            self.core.shutdown_by,
            self.core.next_expiry(now),
            self.core.disk.retry_at(),
            self.core.cluster.as_ref().and_then(|c| c.next_deadline()),
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
            self.accept(now, Entrance::Chat);
            self.accept(now, Entrance::Admin);
        }
        self.core.post.release_due_holds(&mut self.conns);
        self.core.take_released();
        for (slot, id) in std::mem::take(&mut self.core.read_again) {
            if self.conns.get(slot).is_some_and(|c| c.id == id && !c.dead) {
                self.read(slot, Drain::UntilWouldBlock);
                self.core.settle(&mut self.conns, now);
            }
        }
        self.core.fire_timers(&mut self.conns, now);
        self.core.expire_held(&mut self.conns);
        self.core.settle(&mut self.conns, now);
        self.core.cluster_turn(&mut self.conns, now);
        self.core.settle(&mut self.conns, now);
        self.core.commit(&mut self.conns, now);
        // A connection that dies in the flush departs, and its `leave`
        // must not wait for the next event: flush again (a few rounds at most).
        for _ in 0..3 {
            self.core.release_presence(&mut self.conns, now);
            self.core.flush(&mut self.conns);
            self.core.settle(&mut self.conns, now);
            if self.core.post.nothing_to_flush() {
                break;
            }
        }
        // Events owed since the last release wait for the window's deadline.
        self.core.post.presence.arm(now);
        self.core.take_released();
        for slot in std::mem::take(&mut self.core.dead) {
            if self.conns.get(slot).is_some_and(|c| c.dead) {
                if self.conns[slot].holding > 0 {
                    self.core.post.release_senders_of(&mut self.conns, slot);
                    self.core.take_released();
                }
                let conn = self.conns.remove(slot);
                self.core.admission.release(slot);
                self.core.metrics.count_close(conn.close_reason);
                match self.core.left_names.remove(&conn.id) {
                    Some(name) => log::info!(
                        "close #{} {} {}: {}",
                        conn.id,
                        conn.peer,
                        log::quoted(&name),
                        conn.close_reason
                    ),
                    None => log::info!("close #{} {}: {}", conn.id, conn.peer, conn.close_reason),
                }
            }
        }
        // Leaves announced in the flush rounds go now, not next turn.
        self.core.cluster_send(now);
        self.core.give_back_memory();
        Ok(())
    }

    /// The metrics listener's address, when there is one.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin_listener.as_ref()?.local_addr().ok()
    }

    fn accept(&mut self, now: Instant, entrance: Entrance) {
        if self.core.accept_paused_until.is_some() {
            return;
        }
        let listener = match entrance {
            Entrance::Chat => &self.listener,
            Entrance::Admin => &self.admin_listener,
        };
        let Some(listener) = listener else {
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
            // The operator's health checks and scrapes get in at the limit:
            // through the admin listener, or in the few sockets kept beyond
            // it (an upgrade there is refused at its handshake).
            if entrance == Entrance::Chat
                && live >= self.core.max_connections + crate::limits::HTTP_RESERVE
                && !self.core.evict_oldest_handshake(&mut self.conns, None)
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
            if entrance == Entrance::Chat && self.core.refuse_over_memory_mark(&socket) {
                continue;
            }
            let slot = self.conns.vacant_key();
            if entrance == Entrance::Chat && self.core.refuse_at_accept(&socket, peer, slot, now) {
                continue;
            }
            if self.core.refusing {
                log::info!("accepting again");
                self.core.refusing = false;
            }
            self.core
                .admit(&mut self.conns, socket, peer, now, entrance);
            if !self.conns.contains(slot) {
                // Not registered: nothing holds the count taken for it.
                self.core.admission.release(slot);
            }
        }
    }

    /// SIGINT/SIGTERM: close every client with 1001 and give them
    /// `--shutdown-timeout` to answer. Accepting goes on, so that health
    /// checks are told 503 (and new upgrades refused with 503) until the exit.
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
        self.core.policy.shutting_down = true;
        self.core.shutdown_by = Some(now + self.core.config.shutdown_timeout);
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            let conn = &mut self.conns[slot];
            match conn.phase {
                Phase::Handshake(_) => self.core.kill(conn, slot, CloseReason::Shutdown),
                _ => self.core.post.close(
                    &mut self.conns,
                    slot,
                    CloseCode::Away,
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
            if conn.dead || conn.held {
                // A held sender is read again when released (`take_released`).
                return;
            }
            if !policy::may_read(conn.out.bytes(), self.core.post.marks()) {
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

/// Which listener a connection came in through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entrance {
    /// The chat's address: the page, WebSocket, and (without
    /// `--metrics-listen`) `/metrics` and `/healthz`.
    Chat,
    /// `--metrics-listen`: `/metrics` and `/healthz` only.
    Admin,
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
    /// The `/metrics` text: the loop's counters and the figures kept by the
    /// router, the store and delivery.
    fn render_metrics(&self, open_connections: usize) -> String {
        let mut s = Snapshot {
            open_connections,
            senders_held: self.post.senders_held,
            bytes_out: self.post.bytes_out,
            replayed: self.log.as_ref().map(Log::replayed).unwrap_or_default(),
            held: budget::held(),
            memory_budget: self.config.memory_budget,
            max_partial_bytes: self.config.max_partial_bytes,
            per_ip_tracked: self.admission.tracked(),
            store_degraded: self.disk.degraded(),
            store_write_failures: self.disk.write_failures,
            store_recoveries: self.disk.recoveries,
            ..Snapshot::default()
        };
        if let App::Chat(router) = &self.app {
            s.users_online = router.online();
            s.public_messages = router.stats.public;
            s.private_messages = router.stats.private;
            s.deliveries = router.stats.deliveries;
            s.public_shed = router.stats.shed;
            s.errors = router.stats.errors;
            s.private_refused = router.stats.refused;
            s.known_users = router.known_users();
            s.known_users_full = router.stats.known_full;
            s.rate_limited = router.stats.rate_limited;
            s.rate_limit_closes = router.stats.rate_limit_closes;
            s.store_refused = router.stats.storage_refused;
            (s.offline_messages, s.offline_bytes) = router.held();
            s.offline_users = router.held_users();
        }
        let mut text = self.metrics.render(&s);
        if let Some(cluster) = &self.cluster {
            let remote = match &self.app {
                App::Chat(router) => router.remote(),
                App::Echo => None,
            };
            cluster.render_metrics(&mut text, remote);
        }
        text
    }

    /// Held senders released this turn are read again.
    fn take_released(&mut self) {
        self.read_again.append(&mut self.post.released);
    }

    /// Closes the presence window when due (see `delivery::presence`).
    fn release_presence(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        if self.post.presence.should_close(now) {
            self.post.release_presence(conns);
        }
    }

    /// Writes every listed connection's queue, once per turn.
    fn flush(&mut self, conns: &mut Slab<Connection>) {
        for slot in self.post.take_flush_list() {
            let Some(conn) = conns.get_mut(slot) else {
                continue;
            };
            if conn.dead || conn.write_shut {
                conn.flush_listed = false;
                continue;
            }
            let result = self.post.write(conns, slot);
            let conn = &mut conns[slot];
            match result {
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
                    self.resume_reading(conn, slot);
                }
                Ok(Flushed::Blocked) => {
                    if let Some(next) = self.heartbeat_deadline(conn) {
                        self.set_deadline(conn, slot, next);
                    }
                    if !conn.wants_writable {
                        conn.wants_writable = true;
                        self.reregister(conn, slot, Interest::READABLE | Interest::WRITABLE);
                    }
                    if policy::may_read(conn.out.bytes(), self.post.marks()) {
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
