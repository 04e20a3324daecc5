//! Helpers for the cluster suites (`tests/cluster.rs`, `tests/cluster_store.rs`),
//! on top of `chat_support` and `support`: nodes on a test's own Redis, and
//! waiting until they have formed one cluster.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use crate::chat_support::ChatServer;
use crate::support::http;
use crate::support::redis::Redis;

/// The per-client limits these tests would hit, off: every client and every
/// `/metrics` poll comes from 127.0.0.1, and senders send as fast as they can.
pub const NO_CLIENT_LIMITS: [&str; 4] = ["--rate-limit", "0", "--max-handshakes-per-ip", "0"];

/// A node of the cluster on `redis`, with a short lease (a killed node's
/// names are free within 2 s).
pub fn node(redis: &Redis, extra: &[&str]) -> ChatServer {
    let url = redis.url();
    let mut args = vec!["--cluster", url.as_str(), "--cluster-lease", "2s"];
    args.extend_from_slice(&NO_CLIENT_LIMITS);
    args.extend_from_slice(extra);
    ChatServer::start(&args)
}

pub fn metric(text: &str, name: &str) -> Option<f64> {
    http::metric_value(text, name)
}

/// Waits until every node is up on Redis and has heard from all the others.
pub fn wait_for_cluster(nodes: &[&ChatServer]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in nodes {
        loop {
            let m = http::get(n.addr, "/metrics");
            let up = metric(&m, "wschat_cluster_redis_state") == Some(2.0);
            let peers = metric(&m, "wschat_cluster_peers").unwrap_or(0.0) as usize;
            if up && peers + 1 >= nodes.len() {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not form:\n{m}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}
