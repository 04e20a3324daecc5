//! Where read bytes go: the handshake parser while the connection is in its
//! handshake, the frame decoder once it is open; each complete message to
//! the router (or the echo), each HTTP request to [`crate::endpoints`].

use std::time::{Duration, Instant};

use slab::Slab;

use super::{wall_clock_ms, App, Core};
use crate::auth::{self, Refusal, TokenError};
use crate::budget::HeadBytes;
use crate::chat::ConnId;
use crate::conn::{CloseReason, Connection, OpenState, Phase};
use crate::delivery::{policy, Mailer};
use crate::endpoints::{self, Health};
use crate::handshake::{self, Outcome};
use crate::http::{Response, Status};
use crate::log;
use crate::persist::{self, Committed};
use crate::ws::{CloseCode, Message, Opcode, ProtocolError};

impl Core {
    /// Hands freshly read bytes to whatever the connection is doing.
    pub(super) fn on_bytes(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        data: &mut [u8],
        now: Instant,
    ) {
        let conn = &mut conns[slot];
        match &mut conn.phase {
            Phase::Handshake(head) => {
                head.extend(data, handshake::MAX_HEAD + 1);
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
        mut head: HeadBytes,
        now: Instant,
    ) {
        let conn = &mut conns[slot];
        let outcome = endpoints::by_entrance(
            handshake::parse(&head, &self.policy),
            conn.admin,
            self.config.metrics_listen.is_some(),
        );
        match outcome {
            Outcome::Partial => conn.phase = Phase::Handshake(head),
            Outcome::Upgrade(upgrade) => {
                if self.refuse_upgrade(conns, slot, upgrade.forwarded_for.as_deref(), now) {
                    return;
                }
                let conn = &mut conns[slot];
                let claims = match (&self.app, self.auth.is_on()) {
                    (App::Chat(_), true) => match auth::authenticate(
                        &self.auth,
                        upgrade.authorization.as_deref(),
                        &upgrade.query,
                        self.now_ms / 1000,
                    ) {
                        Ok(claims) => Some(claims),
                        Err(refusal) => {
                            // The reason, never the token.
                            log::info!("#{} refused: 401 ({refusal})", conn.id);
                            let challenge = match refusal {
                                Refusal::Token(TokenError::Missing) => r#"Bearer realm="wschat""#,
                                _ => r#"Bearer realm="wschat", error="invalid_token""#,
                            };
                            let response =
                                Response::text(Status::Unauthorized, &refusal.to_string())
                                    .with_header("WWW-Authenticate", challenge);
                            self.post.respond_and_close(
                                conn,
                                slot,
                                response.to_bytes(),
                                CloseReason::HandshakeRejected(401),
                            );
                            return;
                        }
                    },
                    _ => None,
                };
                self.post.upgrade(conn, slot, upgrade.response);
                let now_tick = self.clock.tick(now);
                let mut state = OpenState::new(now_tick);
                state.next_ping = now_tick + self.config.ping_interval;
                if let Some(claims) = &claims {
                    let until_ms = claims
                        .exp
                        .saturating_add(self.auth.leeway_secs())
                        .saturating_mul(1000);
                    let left = Duration::from_millis(until_ms.saturating_sub(self.now_ms));
                    conn.token_expires = Some(now_tick + left);
                }
                conn.phase = Phase::Open(state);
                conn.deadline = None;
                if let Some(next) = self.heartbeat_deadline(conn) {
                    self.set_deadline(conn, slot, next);
                }
                let verified = claims.as_ref().map(|c| c.sub.as_str());
                let early = head.get(upgrade.head_len..).unwrap_or_default();
                if self.join_via_cluster(conns, slot, &upgrade.query, verified, early, now) {
                    return; // joins when its name's lease is confirmed
                }
                if let App::Chat(router) = &mut self.app {
                    let mut mailer = Mailer {
                        conns,
                        post: &mut self.post,
                    };
                    let verified = claims.as_ref().map(|c| c.sub.as_str());
                    match router.join_as(ConnId(slot), &upgrade.query, verified, &mut mailer) {
                        Some(name) => log::info!(
                            "join #{} {} {}",
                            conns[slot].id,
                            conns[slot].peer,
                            log::quoted(&name)
                        ),
                        None => return, // refused: closing
                    }
                }
                // Frames sent right behind the request head.
                if head.len() > upgrade.head_len {
                    self.on_frames(conns, slot, &mut head[upgrade.head_len..], now);
                }
            }
            Outcome::Serve { resource, method } => {
                let open = conns.len();
                let health = if self.policy.shutting_down {
                    Health::ShuttingDown
                } else if self.disk.degraded() {
                    Health::Degraded
                } else {
                    Health::Ok
                };
                let response =
                    endpoints::respond(resource, method, health, || self.render_metrics(open));
                let conn = &mut conns[slot];
                self.post
                    .respond_and_close(conn, slot, response, CloseReason::Normal);
            }
            Outcome::Reject(response) => {
                let status = response.status.code();
                log::debug!("#{} refused: {status}", conn.id);
                self.post.respond_and_close(
                    conn,
                    slot,
                    response.to_bytes(),
                    CloseReason::HandshakeRejected(status),
                );
            }
        }
    }

    /// Decodes frames and acts on each message.
    pub(super) fn on_frames(
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
                        self.on_message(conns, slot, message);
                        if !matches!(conns[slot].phase, Phase::Decoding) {
                            break; // closing: the rest is ignored
                        }
                        let own_backlog = conns[slot].out.bytes();
                        if matches!(self.app, App::Chat(_))
                            && policy::asks_without_reading(own_backlog, self.post.marks())
                        {
                            log::debug!("#{}: replies piled up unread", conns[slot].id);
                            self.post.close(
                                conns,
                                slot,
                                CloseCode::Policy,
                                "slow consumer",
                                CloseReason::SlowConsumer,
                            );
                            break;
                        }
                    }
                }
                Err(error) => {
                    log::debug!("#{} protocol error: {error}", conns[slot].id);
                    if error == ProtocolError::OverBudget {
                        self.metrics.memory.partial_refused += 1;
                    }
                    let code = error.close_code();
                    self.post.close(
                        conns,
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
            // A completed message's buffer is not kept while the client idles.
            state.decoder.release_lent();
            if state.decoder.partial_message_untimed() {
                // A message began: its clock starts (and only a completed
                // message stops it, not pings).
                let due = self.clock.tick(now) + self.config.message_timeout;
                state.decoder.time_partial_message(due);
                conn.phase = Phase::Open(state);
                if let Some(next) = self.heartbeat_deadline(conn) {
                    self.set_deadline(conn, slot, next);
                }
            } else {
                conn.phase = Phase::Open(state);
            }
        }
    }

    fn on_message(&mut self, conns: &mut Slab<Connection>, slot: usize, message: Message<'_>) {
        let conn = &mut conns[slot];
        match message {
            Message::Ping(payload) => self.post.pong(conn, slot, payload),
            Message::Pong(_) => {}
            Message::Close(frame) => self.post.answer_close(conns, slot, frame.map(|f| f.code)),
            Message::Text(text) => match &mut self.app {
                App::Echo => self.post.echo(conn, slot, Opcode::Text, text.as_bytes()),
                App::Chat(router) => {
                    let mut mailer = Mailer {
                        conns,
                        post: &mut self.post,
                    };
                    router.handle(ConnId(slot), text, self.now_ms, &mut mailer);
                }
            },
            Message::Binary(bytes) => match self.app {
                App::Echo => self.post.echo(conn, slot, Opcode::Binary, bytes),
                App::Chat(_) => self.post.close(
                    conns,
                    slot,
                    CloseCode::Unsupported,
                    "binary messages are not supported",
                    CloseReason::UnsupportedData,
                ),
            },
        }
    }

    /// When the oldest held message expires, on the monotonic clock.
    pub(super) fn next_expiry(&self, now: Instant) -> Option<Instant> {
        let App::Chat(router) = &self.app else {
            return None;
        };
        let at_ms = router.next_expiry()?;
        Some(now + Duration::from_millis(at_ms.saturating_sub(wall_clock_ms())))
    }

    pub(super) fn expire_held(&mut self, conns: &mut Slab<Connection>) {
        if let App::Chat(router) = &mut self.app {
            if router.next_expiry().is_some_and(|at| at <= self.now_ms) {
                let mut mailer = Mailer {
                    conns,
                    post: &mut self.post,
                };
                router.expire(self.now_ms, &mut mailer);
            }
        }
    }

    /// Group commit (see [`persist`]), then the replies that promised
    /// durability go out, or are dropped if the log could not be written.
    pub(super) fn commit(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        let App::Chat(router) = &mut self.app else {
            return;
        };
        let mut mailer = Mailer {
            conns,
            post: &mut self.post,
        };
        let committed = persist::commit(
            router,
            self.log.as_mut(),
            &mut self.disk,
            now,
            self.config.compact_min_bytes,
            &mut mailer,
        );
        match committed {
            Committed::Durable => self.post.release_durable(conns),
            Committed::Refused => self.post.drop_durable(),
        }
    }

    /// Rewrites the log to just the live records (at a clean shutdown, so
    /// the next start reads little and skips no sequence numbers).
    pub(super) fn compact_log(&mut self) {
        if let (App::Chat(router), Some(log)) = (&mut self.app, &mut self.log) {
            if let Err(e) = persist::compact(router, log) {
                log::warn!("compacting the outbox log at shutdown: {e}");
            }
        }
    }
}
