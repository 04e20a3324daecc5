//! Who may come in, as the loop sees it: the per-address limits at accept
//! (or, for a connection from a trusted proxy, at its handshake, once
//! `X-Forwarded-For` is known), the connection cap for upgrades, and the
//! slots kept beyond it for health checks. The policies themselves are in
//! [`crate::limits`]; this is where the loop's sockets and clock meet them.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;
use slab::Slab;

use super::{lifecycle, Core};
use crate::conn::{CloseReason, Connection, Peer};
use crate::http;
use crate::limits::forwarded::TrustedProxies;
use crate::limits::per_ip::{ClientKey, PerIp};
use crate::limits::{self, Settings};
use crate::log;

/// The per-address table and the trusted proxies.
#[derive(Debug)]
pub(super) struct Admission {
    per_ip: PerIp,
    proxies: TrustedProxies,
    /// The per-address clock's zero.
    origin: Instant,
    /// A loopback peer was refused: said once, since it is most likely a
    /// reverse proxy on this host that is not `--trusted-proxy`.
    hinted_loopback: bool,
}

impl Admission {
    pub(super) fn new(settings: &Settings) -> Admission {
        Admission {
            per_ip: PerIp::new(settings.per_ip_policy()),
            proxies: settings.trusted_proxies.clone(),
            origin: Instant::now(),
            hinted_loopback: false,
        }
    }

    fn micros(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_micros()).unwrap_or(u64::MAX)
    }

    /// Addresses tracked (for `/metrics`).
    pub(super) fn tracked(&self) -> usize {
        self.per_ip.tracked()
    }

    /// The connection in `slot` is gone.
    pub(super) fn release(&mut self, slot: usize) {
        self.per_ip.release(slot);
    }

    fn hint(&mut self, client: IpAddr) {
        if client.is_loopback() && !self.hinted_loopback {
            self.hinted_loopback = true;
            log::warn!(
                "refusing a loopback client for its per-address limit; a reverse proxy on \
                 this host needs --trusted-proxy {client}"
            );
        }
    }
}

fn peer_ip(peer: &Peer) -> IpAddr {
    match peer {
        Peer::V4(a) => IpAddr::V4(*a.ip()),
        Peer::V6(a) => IpAddr::V6(*a.ip()),
    }
}

impl Core {
    /// A chat socket just accepted from `peer`, to be admitted into `slot`:
    /// counted against its address, or answered 429 and closed at once
    /// (true). A trusted proxy's connections are counted at their handshake
    /// instead, against the client it names. Refused here, before anything
    /// is read, an address over its limit costs no slot and no buffer.
    pub(super) fn refuse_at_accept(
        &mut self,
        socket: &TcpStream,
        peer: SocketAddr,
        slot: usize,
        now: Instant,
    ) -> bool {
        let admission = &mut self.admission;
        if admission.per_ip.is_off() || admission.proxies.trusts(peer.ip()) {
            return false;
        }
        let now_us = admission.micros(now);
        let Err(refusal) = admission
            .per_ip
            .admit(ClientKey::of(peer.ip()), slot, now_us)
        else {
            return false;
        };
        admission.hint(peer.ip());
        log::debug!("{peer} refused: 429 ({refusal:?})");
        self.metrics.count_refused_per_ip(refusal, true);
        lifecycle::answer_fresh_and_close(socket, limits::too_many_requests(refusal));
        true
    }

    /// An upgrade request on the connection in `slot`: refused (true, the
    /// answer queued) when the chat is at `--max-connections` (503), or when
    /// it came through a trusted proxy and the client named by
    /// `forwarded_for` is over its per-address limit (429).
    pub(super) fn refuse_upgrade(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        forwarded_for: Option<&str>,
        now: Instant,
    ) -> bool {
        // This connection is among the live ones; the others are the chat.
        // Unfinished handshakes make room, oldest first, as at accept.
        let others = |core: &Core, conns: &Slab<Connection>| conns.len() - core.dead.len() - 1;
        while others(self, conns) >= self.max_connections {
            if self.evict_oldest_handshake(conns, Some(slot)) {
                continue;
            }
            let conn = &mut conns[slot];
            log::debug!("#{} refused: 503 (at --max-connections)", conn.id);
            self.post.respond_and_close(
                conn,
                slot,
                http::OVERLOADED.to_vec(),
                CloseReason::HandshakeRejected(503),
            );
            return true;
        }
        let conn = &mut conns[slot];
        let peer = peer_ip(&conn.peer);
        let admission = &mut self.admission;
        if !admission.proxies.trusts(peer) {
            return false;
        }
        let client = admission.proxies.client(peer, forwarded_for);
        log::info!("#{} client {client} (through {peer})", conn.id);
        if admission.per_ip.is_off() {
            return false;
        }
        let now_us = admission.micros(now);
        let Err(refusal) = admission.per_ip.admit(ClientKey::of(client), slot, now_us) else {
            return false;
        };
        log::debug!("#{} refused: 429 ({refusal:?})", conn.id);
        self.metrics.count_refused_per_ip(refusal, false);
        self.post.respond_and_close(
            conn,
            slot,
            limits::too_many_requests(refusal).to_vec(),
            CloseReason::HandshakeRejected(429),
        );
        true
    }
}
