//! The cluster's offline store in Redis as a [`Mailbox`], so the contract
//! the local store keeps (`wschat::store::mailbox::contract`) runs against
//! the Lua scripts too: each call runs `Store`'s command on a blocking client
//! and decodes its reply. Tests only: the node sends the same commands
//! through its event loop.

#![allow(dead_code)]

use wschat::cluster::store::{self, Outgoing, Quotas, Sent, Store};
use wschat::store::mailbox::contract::Setup;
use wschat::store::mailbox::{Expired, Fetched, Mail, Mailbox, Refusal};
use wschat::store::outbox::Remembered;

use super::redis::Client;

/// The node named as the sender's: nobody holds a lease in these tests, so
/// nothing is published in its name.
const NODE: &str = "node-a";

pub struct RedisMailbox {
    client: Client,
    store: Store,
    /// The limits, passed with every `SEND` (`known_only` per message).
    quotas: Quotas,
    max_known_users: usize,
    /// Every number is above it: a node passes its clock's ms times 1000.
    seq_floor: u64,
}

impl RedisMailbox {
    /// The store under `prefix` (one per test case, on one `redis-server`),
    /// with commands sent as `EVAL`.
    pub fn new(client: Client, prefix: &str, setup: Setup) -> RedisMailbox {
        let limits = setup.limits;
        RedisMailbox {
            client,
            store: Store::new(prefix),
            quotas: Quotas {
                max_per_user: limits.max_per_user,
                max_bytes: limits.max_bytes,
                max_per_sender: limits.max_per_sender,
                max_bytes_per_sender: limits.max_bytes_per_sender,
                // The local store's "never" is u64::MAX, the Redis one's 0.
                ttl_ms: if limits.ttl_ms == u64::MAX {
                    0
                } else {
                    limits.ttl_ms
                },
                known_only: false,
            },
            max_known_users: limits.max_known_users,
            seq_floor: setup.seqs_above,
        }
    }
}

impl Mailbox for RedisMailbox {
    fn send(&mut self, mail: &Mail<'_>, known_only: bool, now_ms: u64) -> Result<u64, Refusal> {
        let msg = Outgoing {
            from: mail.from,
            to: mail.to,
            id: mail.id,
            ts: mail.ts,
            body: mail.body,
            tag: mail.id,
            payload: "{}",
        };
        let quotas = Quotas {
            known_only,
            ..self.quotas
        };
        let command = self.store.send(&msg, &quotas, self.seq_floor, NODE, now_ms);
        match store::sent(&self.client.call(&command)).expect("SEND reply") {
            Sent::Queued(seq) | Sent::Live { seq, .. } => Ok(seq),
            Sent::Full(full) => Err(Refusal::Full(full)),
            Sent::Unknown => Err(Refusal::Unknown),
        }
    }

    fn fetch(&mut self, name: &str, after: u64, ack: bool) -> Fetched {
        let command = self.store.fetch(name, after, ack);
        store::fetched(&self.client.call(&command)).expect("FETCH reply")
    }

    fn ack(&mut self, name: &str, from: u64, to: u64) -> usize {
        let command = self.store.ack(name, from, to);
        let acked = store::acked(&self.client.call(&command)).expect("ACK reply");
        usize::try_from(acked).expect("a count")
    }

    fn expire(&mut self, now_ms: u64) -> Vec<Expired> {
        let command = self.store.expire(now_ms);
        store::expired(&self.client.call(&command)).expect("EXPIRE reply")
    }

    fn remember(&mut self, name: &str) -> Remembered {
        let command = self.store.remember(name, self.max_known_users);
        store::remembered(&self.client.call(&command)).expect("REMEMBER reply")
    }
}
