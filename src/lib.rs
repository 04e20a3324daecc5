//! wschat: a single-threaded WebSocket chat server.
//!
//! Bytes enter in [`server`] (the mio loop), become requests in
//! [`handshake`] and messages in [`ws`], are routed in [`chat`], and leave
//! through [`delivery`], the one place that decides what a connection's
//! queue takes and who is too slow.

pub mod auth;
pub mod budget;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod endpoints;
pub mod handshake;
pub mod http;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod persist;
pub mod process;
pub mod server;
pub mod store;
pub mod sys;
pub mod timer;
pub mod ws;

/// The version `--version` prints and `/metrics` reports (`wschat_build_info`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
