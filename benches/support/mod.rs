//! What the in-process benchmarks share: an outbox that only counts, and a
//! router with some users online.

use wschat::chat::router::unlimited_outboxes;
use wschat::chat::{Class, ConnId, Delivery, Fanout, Limits, Outbox, Router};
use wschat::ws::CloseCode;

/// An outbox that only counts bytes, so the router's own cost is measured.
#[derive(Default)]
pub struct Counting {
    pub frames: usize,
    pub bytes: usize,
}

impl Outbox for Counting {
    fn send(&mut self, _to: ConnId, json: &[u8], _class: Class) -> Delivery {
        self.frames += 1;
        self.bytes += json.len() + 2;
        Delivery::Queued
    }
    fn send_private(&mut self, _from: ConnId, to: ConnId, json: &[u8]) -> Delivery {
        self.send(to, json, Class::Private)
    }
    fn broadcast(
        &mut self,
        json: &[u8],
        _class: Class,
        to: impl Iterator<Item = ConnId>,
    ) -> Fanout {
        let queued = to.count();
        self.frames += queued;
        self.bytes += queued * (json.len() + 2);
        Fanout {
            queued: queued as u64,
            shed: 0,
        }
    }
    fn send_when_durable(&mut self, to: ConnId, json: &[u8]) {
        self.send(to, json, Class::Reply);
    }
    fn close(&mut self, _conn: ConnId, _code: CloseCode, _reason: &'static str) {}
    fn renew(&mut self, _conn: ConnId, _until_unix_secs: u64) {}
}

pub fn router_with(users: usize, out: &mut Counting) -> Router {
    let mut router = Router::new(
        Limits {
            max_body: 8192,
            presence_limit: 0,
        },
        unlimited_outboxes(),
    );
    // Ids and seqs as the server gives them: milliseconds since 1970 × 1000,
    // 16 digits.
    router.start_numbers_after(1_764_250_000_000);
    for slot in 0..users {
        router.join(ConnId(slot), &format!("username=u{slot}"), out);
    }
    router
}
