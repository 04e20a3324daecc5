//! wschat: a single-threaded WebSocket chat server.
pub mod handshake;
pub mod http;
pub mod ws;
