//! A connection's life in the loop: admitted, given deadlines (handshake,
//! heartbeat, idle, write stall, close), told to the router when it stops
//! being open, and killed.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use slab::Slab;

use super::{App, Core, Entrance, Nodelay};
use crate::budget;
use crate::chat::ConnId;
use crate::conn::{CloseReason, Connection, Phase};
use crate::delivery::{policy, Mailer};
use crate::http;
use crate::log;
use crate::timer::Tick;
use crate::ws::CloseCode;

/// Answers a socket just accepted, before anything is read from it, and
/// lets the caller drop it. Best effort: a fresh socket's buffer has room.
/// What already arrived is read, so that closing sends a FIN after the
/// answer rather than a reset that could destroy it.
pub(super) fn answer_fresh_and_close(socket: &TcpStream, answer: &[u8]) {
    let _ = (&*socket).write(answer);
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let _ = (&*socket).read(&mut [0; 4096]);
}

/// How long a refused request's socket stays after its answer was queued,
/// for the answer to leave and the client's FIN to come back.
const REFUSED_LINGER: Duration = Duration::from_millis(250);

impl Core {
    pub(super) fn admit(
        &mut self,
        conns: &mut Slab<Connection>,
        mut socket: TcpStream,
        peer: std::net::SocketAddr,
        now: Instant,
        entrance: Entrance,
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
        conn.admin = entrance == Entrance::Admin;
        log::info!("open #{id} {peer}");
        self.handshakes.push_back((slot, id));
        let at = self.clock.tick(now) + self.config.handshake_timeout;
        self.set_deadline(conn, slot, at);
    }

    /// Above the memory budget's high mark: answers a new connection 503
    /// (best effort: the socket is fresh, so its buffer has room) and says
    /// so; the caller drops it. Checked before the per-address limits, which
    /// count a connection they let in.
    pub(super) fn refuse_over_memory_mark(&mut self, socket: &TcpStream) -> bool {
        let held = budget::held();
        if budget::admits_connection(held, budget::limits()) {
            if self.memory.refusing {
                log::info!("memory below the high mark: accepting again");
                self.memory.refusing = false;
            }
            return false;
        }
        if !self.memory.refusing {
            log::warn!(
                "memory held by peers at {} of --memory-budget {} bytes: refusing new connections with 503",
                held.total(),
                self.config.memory_budget
            );
            self.memory.refusing = true;
        }
        answer_fresh_and_close(socket, http::BUSY);
        self.metrics.memory.connections_refused += 1;
        self.metrics.count_refused_at_capacity();
        true
    }

    /// At the end of a turn: gives freed memory back to the OS once what
    /// peers held fell far below its peak (a crowd left).
    pub(super) fn give_back_memory(&mut self) {
        if self.memory.note(budget::held().total()) {
            crate::sys::give_back_free_memory();
            self.metrics.memory.trims += 1;
        }
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
    /// handshake (but `except`) to make room. False if there is none.
    pub(super) fn evict_oldest_handshake(
        &mut self,
        conns: &mut Slab<Connection>,
        except: Option<usize>,
    ) -> bool {
        self.forget_finished_handshakes(conns);
        let oldest = self.handshakes.iter().position(|&(slot, id)| {
            Some(slot) != except
                && conns.get(slot).is_some_and(|c| {
                    c.id == id && !c.dead && matches!(c.phase, Phase::Handshake(_))
                })
        });
        let Some((slot, _)) = oldest.and_then(|i| self.handshakes.remove(i)) else {
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
    pub(super) fn set_deadline(&mut self, conn: &mut Connection, slot: usize, at: Tick) {
        conn.deadline = Some(at);
        if conn.armed.is_none_or(|armed| at < armed) {
            conn.armed = Some(at);
            self.timers.push(at, slot, conn.id);
        }
    }

    /// Lets the router forget departed connections (and their held senders
    /// go) and bounds how long closing connections may linger. Runs after
    /// every piece of work in a turn, so a name is free within the turn its
    /// connection stopped being open, before its slot can be reused.
    pub(super) fn settle(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        while !self.post.departures.is_empty() || !self.post.began_closing.is_empty() {
            for slot in std::mem::take(&mut self.post.departures) {
                if conns.get(slot).is_some_and(|c| c.holding > 0) {
                    self.post.release_senders_of(conns, slot);
                }
                if let App::Chat(router) = &mut self.app {
                    let mut mailer = Mailer {
                        conns,
                        post: &mut self.post,
                    };
                    let name = router.leave(ConnId(slot), &mut mailer);
                    if let (Some(name), Some(conn)) = (name, conns.get(slot)) {
                        if log::enabled(log::Level::Info) {
                            self.left_names.insert(conn.id, name);
                        }
                    }
                }
            }
            for slot in std::mem::take(&mut self.post.began_closing) {
                if let Some(conn) = conns.get_mut(slot) {
                    // A refused request (503 at the limit, 429, 4xx) holds
                    // a socket, perhaps one kept for health checks: its
                    // answer gets a moment to leave, not the close timeout,
                    // or a client that never closes would keep it.
                    let linger = match conn.close_reason {
                        CloseReason::HandshakeRejected(_) => {
                            REFUSED_LINGER.min(self.config.close_timeout)
                        }
                        _ => self.config.close_timeout,
                    };
                    let at = self.clock.tick(now) + linger;
                    self.set_deadline(conn, slot, at);
                }
            }
        }
        self.take_released();
    }

    pub(super) fn fire_timers(&mut self, conns: &mut Slab<Connection>, now: Instant) {
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
                    self.on_deadline(conns, slot, now);
                }
                Some(later) => {
                    conn.armed = Some(later);
                    self.timers.push(later, slot, id);
                }
                None => {}
            }
        }
    }

    fn on_deadline(&mut self, conns: &mut Slab<Connection>, slot: usize, now: Instant) {
        let config = &self.config;
        let now = self.clock.tick(now);
        let conn = &mut conns[slot];
        if matches!(conn.phase, Phase::Open(_))
            && policy::write_stalled(conn.stalled_since, now, self.post.times())
        {
            // Progress the kernel did not announce (see `Post::probe`).
            self.post.probe(conn, slot);
        }
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
                    self.post.close(
                        conns,
                        slot,
                        CloseCode::Away,
                        "idle timeout",
                        CloseReason::IdleTimeout,
                    );
                    return;
                }
                if state
                    .decoder
                    .partial_message_due()
                    .is_some_and(|at| now >= at)
                {
                    log::debug!("#{}: message timeout", conn.id);
                    self.metrics.memory.message_timeouts += 1;
                    self.post.close(
                        conns,
                        slot,
                        CloseCode::Policy,
                        "message timeout",
                        CloseReason::MessageTimeout,
                    );
                    return;
                }
                if conn.token_expires.is_some_and(|at| now >= at) {
                    log::debug!("#{}: token expired", conn.id);
                    self.post.close(
                        conns,
                        slot,
                        CloseCode::TokenExpired,
                        "token expired",
                        CloseReason::TokenExpired,
                    );
                    return;
                }
                if policy::write_stalled(conn.stalled_since, now, self.post.times()) {
                    // A close frame could not get through a full socket either.
                    self.kill(conn, slot, CloseReason::WriteStall);
                    return;
                }
                if now >= state.next_ping {
                    state.next_ping = now + config.ping_interval;
                    self.post.ping(conn, slot);
                }
                let next = self.heartbeat_deadline(conn);
                if let Some(next) = next {
                    self.set_deadline(conn, slot, next);
                }
            }
            Phase::Decoding => {}
        }
    }

    /// The next time an open connection needs a look: ping, idle, stall or
    /// an unfinished message.
    pub(super) fn heartbeat_deadline(&self, conn: &Connection) -> Option<Tick> {
        let Phase::Open(state) = &conn.phase else {
            return None;
        };
        let stall = policy::write_stall_deadline(conn.stalled_since, self.post.times());
        // An unfinished message is timed in echo mode too.
        let stall_or_message = [stall, state.decoder.partial_message_due()]
            .into_iter()
            .flatten()
            .min();
        if matches!(self.app, App::Echo) {
            return stall_or_message;
        }
        let mut next = (state.last_rx + self.config.idle_timeout).min(state.next_ping);
        if let Some(expires) = conn.token_expires {
            next = next.min(expires);
        }
        Some(stall_or_message.map_or(next, |at| at.min(next)))
    }

    /// Ends a connection now; its slot is freed at the end of the turn.
    pub(super) fn kill(&mut self, conn: &mut Connection, slot: usize, why: CloseReason) {
        if conn.dead {
            return;
        }
        self.post.killed(conn, slot);
        conn.dead = true;
        if conn.close_reason == CloseReason::None {
            conn.close_reason = why;
        }
        // No deregister: the socket is closed at the end of the turn, which
        // takes it out of the epoll set, and until then its events find it dead.
        self.dead.push(slot);
    }
}
