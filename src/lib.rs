//! wschat: a single-threaded WebSocket chat server.
//!
//! Bytes enter in [`server`] (the mio loop), become requests in
//! [`handshake`] and messages in [`ws`], and leave through [`outbound`].

pub mod chat;
pub mod config;
pub mod conn;
pub mod handshake;
pub mod http;
pub mod log;
pub mod metrics;
pub mod outbound;
pub mod presence;
pub mod server;
pub mod store;
pub mod sys;
pub mod timer;
pub mod ws;
