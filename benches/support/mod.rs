//! What the in-process benchmarks share: an outbox that only counts, and a
//! router with some users online.

use wschat::chat::router::unlimited_outboxes;
use wschat::chat::{Class, Delivery, Limits, Outbox, Router};
use wschat::outbound::Chunk;

/// An outbox that only counts bytes, so the router's own cost is measured.
#[derive(Default)]
pub struct Counting {
    pub frames: usize,
    pub bytes: usize,
}

impl Outbox for Counting {
    fn send(&mut self, _slot: usize, frame: Chunk, _class: Class) -> Delivery {
        self.frames += 1;
        self.bytes += frame.as_bytes().len();
        Delivery::Queued
    }
    fn send_text(&mut self, _slot: usize, json: &[u8], _class: Class) -> Delivery {
        self.frames += 1;
        self.bytes += json.len() + 2;
        Delivery::Queued
    }
    fn send_when_durable(&mut self, slot: usize, frame: Chunk) {
        self.send(slot, frame, Class::Reply);
    }
    fn close(&mut self, _slot: usize, _code: u16, _reason: &'static str) {}
}

pub fn router_with(users: usize, out: &mut Counting) -> Router {
    let mut router = Router::new(
        Limits {
            max_body: 8192,
            presence_limit: 0,
        },
        unlimited_outboxes(),
    );
    // Ids as the server gives them: milliseconds since 1970 × 1000, 16 digits.
    router.start_ids_after(1_764_250_000_000);
    for slot in 0..users {
        router.join(slot, &format!("username=u{slot}"), out);
    }
    router
}
