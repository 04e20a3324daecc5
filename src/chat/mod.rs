//! The chat application, without I/O: protocol, usernames, routing.

mod confusable;
pub mod json;
pub mod lookalike;
pub mod protocol;
pub mod router;
mod scan;
pub mod username;

pub use router::{Class, ConnId, Delivery, Fanout, Limits, Outbox, Router};
