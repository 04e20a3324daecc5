//! The loop's side of `--cluster`: Redis readiness and deadlines go to
//! [`Cluster`], and what it reports (leases granted or refused, messages
//! from other nodes) goes to the router and the waiting connections.

use std::time::Instant;

use mio::Token;
use slab::Slab;

use super::{App, Core};
use crate::chat::ConnId;
use crate::cluster::remote::{self, Remote};
use crate::cluster::store::Fetched;
use crate::cluster::{Cluster, Event, WaitingJoin};
use crate::conn::{CloseReason, Connection};
use crate::delivery::Mailer;
use crate::log;
use crate::ws::CloseCode;

/// Sent when the cluster cannot confirm a name in time (RFC 6455: try again later).
const TRY_AGAIN_LATER: CloseCode = CloseCode::Other(1013);

impl Core {
    /// Sets the router up as a node (called once, at start).
    pub(super) fn start_cluster(&mut self, cluster: Cluster) {
        let mut cluster = cluster;
        if let App::Chat(router) = &mut self.app {
            router.set_remote(Remote::new(cluster.node()));
            cluster.migrate(
                router.held_to_migrate(),
                router.known_to_migrate(),
                Instant::now(),
            );
        }
        self.cluster = Some(cluster);
    }

    pub(super) fn on_cluster_ready(
        &mut self,
        conns: &mut Slab<Connection>,
        token: Token,
        now: Instant,
    ) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let mut events = Vec::new();
        cluster.on_event(&self.registry, token, now, &mut events);
        self.on_cluster_events(conns, events, now);
    }

    /// A WebSocket connection asks for `name` on a node: it waits, unread,
    /// for the name's lease. False when the cluster is off and the router
    /// should join it at once.
    pub(super) fn join_via_cluster(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        query: &str,
        verified: Option<&str>,
        early: &[u8],
        now: Instant,
    ) -> bool {
        let (Some(cluster), App::Chat(router)) = (&mut self.cluster, &self.app) else {
            return false;
        };
        let requested = match verified {
            Some(name) => Some(std::borrow::Cow::Borrowed(name)),
            None => crate::chat::username::query_param(query, "username"),
        };
        // The name the router will join it under (NFC): the lease must be
        // for that spelling, or another node could admit the same name.
        let Some(name) = requested
            .as_deref()
            .and_then(|n| crate::chat::username::canonical(n).ok())
        else {
            return false; // the router refuses it
        };
        // Held here already: the router refuses it (or, with a token, the
        // new connection replaces the old) without asking Redis.
        if router.is_online_here(&name) {
            return false;
        }
        let conn = &mut conns[slot];
        let join = WaitingJoin::new(slot, conn.id, &name, query, verified.is_some(), early);
        match cluster.begin_join(join, now) {
            Ok(()) => conn.held = true,
            Err(_) => self.post.close(
                conns,
                slot,
                TRY_AGAIN_LATER,
                "chat cluster busy",
                CloseReason::Refused(TRY_AGAIN_LATER),
            ),
        }
        true
    }

    /// Once per turn: deadlines and lease renewal. What they owe Redis is
    /// written with the rest at the end of the turn ([`cluster_send`](Self::cluster_send)).
    pub(super) fn cluster_turn(&mut self, conns: &mut Slab<Connection>, now: Instant) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let mut events = Vec::new();
        cluster.tick(&self.registry, now, &mut events);
        self.on_cluster_events(conns, events, now);
        let (Some(cluster), App::Chat(router)) = (&mut self.cluster, &mut self.app) else {
            return;
        };
        let mut mailer = Mailer {
            conns,
            post: &mut self.post,
        };
        let up = cluster.is_up();
        cluster.now_ms = self.now_ms;
        cluster.id_floor = self.now_ms.saturating_mul(1000).max(router.last_id());
        if router
            .remote()
            .is_some_and(|r| r.ids_left() < crate::cluster::remote::ID_BLOCK / 2)
        {
            cluster.ask_for_ids(now);
        }
        // With the link down no receipt can come back: the senders of
        // what is pending are told now rather than at the timeout.
        router.cluster_overdue(if up { self.now_ms } else { u64::MAX }, &mut mailer);
        if let Some(remote) = router.remote_mut() {
            remote.up = up;
        }
        if cluster.renew(router.local_names(), now) {
            if let Some(remote) = router.remote_mut() {
                remote.beat();
            }
            // Beats come every third of the lease: a node that missed two
            // is dead, and its users' `leave` goes out within the lease.
            let silent_ms = self.config.cluster_lease.as_millis() as u64 * 2 / 3;
            router.cluster_forget_silent(self.now_ms.saturating_sub(silent_ms), &mut mailer);
        }
    }

    /// Everything the turn owes Redis, in one write per connection, after
    /// the clients' flush: a simple client's copy is removed from the store
    /// (and its sender told `delivered`) only once it was written to the
    /// client's socket, so a node killed in between gives it again rather
    /// than lose it.
    pub(super) fn cluster_send(&mut self, now: Instant) {
        let (Some(cluster), App::Chat(router)) = (&mut self.cluster, &mut self.app) else {
            return;
        };
        if let Some(remote) = router.remote_mut() {
            cluster.send_outgoing(remote, now);
        }
        cluster.flush(&self.registry, now);
    }

    fn on_cluster_events(
        &mut self,
        conns: &mut Slab<Connection>,
        events: Vec<Event>,
        now: Instant,
    ) {
        for event in events {
            let (Some(cluster), App::Chat(router)) = (&mut self.cluster, &mut self.app) else {
                return;
            };
            let mut mailer = Mailer {
                conns,
                post: &mut self.post,
            };
            match event {
                Event::Message(payload) => {
                    if let Some((node, inbound)) = remote::decode(&payload) {
                        router.on_cluster(node, inbound, self.now_ms, &mut mailer);
                    }
                }
                Event::Up => {
                    let now_ms = self.now_ms;
                    router.cluster_hold_all();
                    cluster.reclaim(router.local_names(), now);
                    let names: Vec<_> = router.local_names().cloned().collect();
                    if let Some(remote) = router.remote_mut() {
                        remote.up = true;
                        remote.forgive_silence(now_ms);
                        remote.hello();
                        remote.roster(remote::To::All, names.iter().map(|n| &**n));
                    }
                }
                Event::Ids(end) => {
                    if let Some(remote) = router.remote_mut() {
                        remote.grant_ids(end);
                    }
                }
                Event::TookOver(node, name) => {
                    if let Some(remote) = router.remote_mut() {
                        remote.kick(node, &name);
                    }
                }
                Event::LeaseLost(name) => {
                    log::warn!(
                        "cluster: {name}'s name was taken by another node while Redis was away"
                    );
                    router.kicked(&name, &mut mailer);
                }
                Event::JoinGranted(join) => self.fetch_then_join(conns, join, now),
                Event::JoinFetched(join, generation, fetched) => {
                    self.joined(conns, join, (generation, fetched), now)
                }
                Event::Sent(tag, sent) => router.on_sent(tag, sent, &mut mailer),
                Event::NotSent(tag) => router.on_unsent(tag, true, &mut mailer),
                Event::Unconfirmed(tag) => router.on_unsent(tag, false, &mut mailer),
                Event::Fetched(name, generation, fetched) => {
                    router.on_fetched(&name, generation, fetched, &mut mailer)
                }
                Event::Expired(expired) => router.on_store_expired(expired, &mut mailer),
                Event::Migrated(done) => router.migrated(done),
                Event::LeaseMissing(name) => router.cluster_hold(&name),
                Event::Reclaimed(name) => router.cluster_fetch_again(&name),
                Event::JoinRefused(join) => {
                    if let Some(slot) = waiting_slot(mailer.conns, &join) {
                        mailer.conns[slot].held = false;
                        router.refuse_taken(ConnId(slot), &mut mailer);
                    }
                }
                Event::JoinTimedOut(join) => self.join_unavailable(conns, &join),
            }
        }
    }

    /// The lease is ours: the user's outbox is fetched, and live messages
    /// for it are kept until the fetch answers (then it joins).
    fn fetch_then_join(&mut self, conns: &mut Slab<Connection>, join: WaitingJoin, now: Instant) {
        let (Some(cluster), App::Chat(router)) = (&mut self.cluster, &mut self.app) else {
            return;
        };
        if waiting_slot(conns, &join).is_none() {
            // Gone while it waited: the lease lapses unrenewed, or goes now.
            cluster.release(&join.name, now);
            return;
        }
        let fetch = router.cluster_begin_join(&join.name, &join.query);
        if let Err(join) = cluster.fetch_for_join(join, fetch, now) {
            self.join_unavailable(conns, &join);
        }
    }

    /// A join Redis could not complete (its lease or its outbox did not
    /// come): what was kept for it is let go, and it is closed with 1013.
    fn join_unavailable(&mut self, conns: &mut Slab<Connection>, join: &WaitingJoin) {
        if let App::Chat(router) = &mut self.app {
            let mut mailer = Mailer {
                conns,
                post: &mut self.post,
            };
            router.cluster_join_abandoned(&join.name, &mut mailer);
        }
        if let Some(slot) = waiting_slot(conns, join) {
            conns[slot].held = false;
            self.post.close(
                conns,
                slot,
                TRY_AGAIN_LATER,
                "chat cluster unavailable",
                CloseReason::Refused(TRY_AGAIN_LATER),
            );
        }
    }

    /// The outbox came: the connection joins (its `welcome` now, then what
    /// was held for it, then what came live meanwhile), and what it sent
    /// meanwhile is read.
    fn joined(
        &mut self,
        conns: &mut Slab<Connection>,
        join: WaitingJoin,
        (generation, fetched): (u64, Fetched),
        now: Instant,
    ) {
        let App::Chat(router) = &mut self.app else {
            return;
        };
        let Some(slot) = waiting_slot(conns, &join) else {
            let mut mailer = Mailer {
                conns,
                post: &mut self.post,
            };
            router.cluster_join_abandoned(&join.name, &mut mailer);
            if let Some(cluster) = &mut self.cluster {
                cluster.release(&join.name, now);
            }
            return;
        };
        conns[slot].held = false;
        let mut mailer = Mailer {
            conns,
            post: &mut self.post,
        };
        // A name online here already is refused, or (with a token) replaced
        // by this connection, which fetches its outbox for itself.
        let fresh = !router.is_online_here(&join.name);
        let verified = join.verified.then_some(&*join.name);
        if router
            .join_as(ConnId(slot), &join.query, verified, &mut mailer)
            .is_none()
        {
            router.cluster_join_abandoned(&join.name, &mut mailer);
            // Refused (a lookalike, say): the lease it was granted goes back
            // now rather than keep the name taken for a lease. (One online
            // here keeps it: it is that session's.)
            if !router.is_online_here(&join.name) {
                if let Some(cluster) = &mut self.cluster {
                    cluster.release(&join.name, now);
                }
            }
            return;
        }
        if fresh {
            router.on_fetched(&join.name, generation, fetched, &mut mailer);
        }
        if !join.early.is_empty() {
            let mut early = join.early;
            self.on_frames(conns, slot, &mut early, now);
        }
        self.read_again.push((slot, conns[slot].id));
    }
}

/// The slot of a waiting join's connection, if it is still that connection and open.
fn waiting_slot(conns: &Slab<Connection>, join: &WaitingJoin) -> Option<usize> {
    conns
        .get(join.slot)
        .filter(|c| c.id == join.conn_id && c.is_open())
        .map(|_| join.slot)
}
