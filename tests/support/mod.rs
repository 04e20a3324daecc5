//! What every black-box test crate shares, below the per-suite helpers
//! (`common`, `chat_support`, `offline_support`): starting the binary and
//! socket I/O that survives `EINTR`.
//!
//! A test crate that uses a suite helper declares `mod support;` next to it.

pub mod eintr;
pub mod http;
pub mod redis;
pub mod redis_mailbox;
pub mod skip;
pub mod source;
pub mod spawn;
pub mod token;
