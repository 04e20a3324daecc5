//! Offline delivery: per-user outboxes in memory, and the log that makes
//! them survive restarts and crashes.

pub mod log;
pub mod outbox;
pub mod record;
pub mod replay;

pub use outbox::{Entry, Full, Limits, Outboxes, Remembered};
