//! Offline delivery: per-user outboxes in memory, and the log that makes
//! them survive restarts and crashes, and the interface (`mailbox`) they
//! share with the cluster's store in Redis.

pub mod log;
pub mod mailbox;
pub mod outbox;
pub mod record;
pub mod replay;

pub use outbox::{Entry, Full, Limits, Outboxes, Remembered};
