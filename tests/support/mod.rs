//! What every black-box test crate shares, below the per-suite helpers
//! (`common`, `chat_support`, `offline_support`): starting the binary.
//!
//! A test crate that uses a suite helper declares `mod support;` next to it.

pub mod spawn;
