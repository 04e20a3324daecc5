//! `--cluster`: several wschat processes as one chat, over Redis. See
//! docs/CLUSTER.md for the design.

pub mod resp;
