//! Counters for the operator, rendered in the Prometheus text format.
//!
//! The loop is single-threaded, so a counter is a plain `u64` bumped in
//! place: no atomics, no locks, nothing on the hot path but an add.

use std::fmt::Write;
use std::time::Duration;

use crate::budget::Held;
use crate::conn::CloseReason;
use crate::limits::per_ip::Refusal;
use crate::process::ProcessStats;
use crate::store::log::Replayed;

/// Upper bounds (seconds) of the routing-latency histogram buckets.
const LATENCY_BOUNDS: [f64; 12] = [
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.005,
    0.025,
];

/// Close reasons as metric labels, in a fixed order.
const CLOSE_LABELS: [&str; 15] = [
    "normal",
    "protocol_error",
    "unsupported_data",
    "refused",
    "connection_lost",
    "handshake_timeout",
    "handshake_rejected",
    "close_timeout",
    "idle_timeout",
    "write_stall",
    "slow_consumer",
    "shutdown",
    "token_expired",
    "replaced",
    "message_timeout",
];

fn close_index(reason: CloseReason) -> Option<usize> {
    Some(match reason {
        CloseReason::None => return None,
        CloseReason::Normal => 0,
        CloseReason::ProtocolError(_) => 1,
        CloseReason::UnsupportedData => 2,
        CloseReason::Refused(_) => 3,
        CloseReason::ConnectionLost => 4,
        CloseReason::HandshakeTimeout => 5,
        CloseReason::HandshakeRejected(_) => 6,
        CloseReason::CloseTimeout => 7,
        CloseReason::IdleTimeout => 8,
        CloseReason::WriteStall => 9,
        CloseReason::SlowConsumer => 10,
        CloseReason::Shutdown => 11,
        CloseReason::TokenExpired => 12,
        CloseReason::Replaced => 13,
        CloseReason::MessageTimeout => 14,
    })
}

/// HTTP statuses counted as handshake failures.
const HANDSHAKE_STATUSES: [u16; 9] = [400, 401, 403, 404, 405, 426, 429, 431, 503];

#[derive(Debug, Default)]
pub struct Metrics {
    pub bytes_in: u64,
    pub connections_accepted: u64,
    closes: [u64; CLOSE_LABELS.len()],
    /// Handshake failures by HTTP status (same order as `HANDSHAKE_STATUSES`).
    handshake_failures: [u64; HANDSHAKE_STATUSES.len()],
    handshake_timeouts: u64,
    latency_buckets: [u64; LATENCY_BOUNDS.len() + 1],
    latency_count: u64,
    latency_sum: f64,
    /// Connections refused for their address's limits: too many
    /// connections, too many handshakes (see `limits::per_ip`).
    refused_per_ip: [u64; 2],
    pub memory: MemoryCounters,
}

/// What the memory budget refused (see `budget`).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryCounters {
    /// New connections answered 503 above the high mark.
    pub connections_refused: u64,
    /// Connections closed (1009) because their partial message would pass
    /// `--max-partial-bytes` or the budget.
    pub partial_refused: u64,
    /// Connections closed (1008) for not completing a message within
    /// `--message-timeout`.
    pub message_timeouts: u64,
    /// Times freed memory was given back to the OS.
    pub trims: u64,
}

/// Figures kept elsewhere (the router, the store), read when rendering.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    pub open_connections: usize,
    pub users_online: usize,
    pub public_messages: u64,
    pub private_messages: u64,
    pub deliveries: u64,
    pub public_shed: u64,
    pub errors: u64,
    pub offline_messages: usize,
    pub offline_bytes: usize,
    /// Names with messages held.
    pub offline_users: usize,
    /// Times a sender was held (not read) for a flooded reader.
    pub senders_held: u64,
    /// Private messages refused because the recipient was flooded.
    pub private_refused: u64,
    /// Bytes written to clients (counted where they are written).
    pub bytes_out: u64,
    /// Names remembered as users (who may be sent offline messages).
    pub known_users: usize,
    /// Users not remembered because `--max-known-users` were.
    pub known_users_full: u64,
    /// What replaying the outbox log found at start.
    pub replayed: Replayed,
    /// Bytes peers make the server hold now, by kind.
    pub held: Held,
    pub memory_budget: usize,
    pub max_partial_bytes: usize,
    /// Messages refused with `rate_limited`.
    pub rate_limited: u64,
    /// Connections closed (1008) for going on past the rate.
    pub rate_limit_closes: u64,
    /// Client addresses in the per-address table.
    pub per_ip_tracked: usize,
    /// The outbox log cannot be written now.
    pub store_degraded: bool,
    /// Writes of the outbox log that failed, and recoveries from that.
    pub store_write_failures: u64,
    pub store_recoveries: u64,
    /// Offline messages refused because the log could not be written.
    pub store_refused: u64,
}

impl Metrics {
    pub fn count_close(&mut self, reason: CloseReason) {
        if let Some(i) = close_index(reason) {
            self.closes[i] += 1;
        }
        match reason {
            CloseReason::HandshakeTimeout => self.handshake_timeouts += 1,
            CloseReason::HandshakeRejected(status) => {
                if let Some(i) = HANDSHAKE_STATUSES.iter().position(|&s| s == status) {
                    self.handshake_failures[i] += 1;
                }
            }
            _ => {}
        }
    }

    /// Counts a 503 sent at the connection limit (no connection was made).
    pub fn count_refused_at_capacity(&mut self) {
        if let Some(i) = HANDSHAKE_STATUSES.iter().position(|&s| s == 503) {
            self.handshake_failures[i] += 1;
        }
    }

    /// Counts a connection refused with 429 for its address's limits;
    /// `at_accept`: answered before a connection was made (a refusal at
    /// the handshake is counted with its close).
    pub fn count_refused_per_ip(&mut self, refusal: Refusal, at_accept: bool) {
        self.refused_per_ip[match refusal {
            Refusal::Connections => 0,
            Refusal::Handshakes => 1,
        }] += 1;
        if at_accept {
            if let Some(i) = HANDSHAKE_STATUSES.iter().position(|&s| s == 429) {
                self.handshake_failures[i] += 1;
            }
        }
    }

    /// Records `messages` messages that were all routed within `took` of
    /// their read (one clock reading per read, not per message).
    pub fn observe_routing(&mut self, took: Duration, messages: u64) {
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.latency_buckets[bucket] += messages;
        self.latency_count += messages;
        self.latency_sum += seconds * messages as f64;
    }

    /// The Prometheus text: these counters, the figures in `s`, and the
    /// process's own (read from `/proc` now: this is only called for a
    /// request of `/metrics`).
    pub fn render(&self, s: &Snapshot) -> String {
        self.render_with(s, &ProcessStats::read())
    }

    fn render_with(&self, s: &Snapshot, process: &ProcessStats) -> String {
        let mut out = String::with_capacity(4096);
        gauge(
            &mut out,
            "wschat_open_connections",
            "Open TCP connections (all phases).",
            s.open_connections as u64,
        );
        gauge(
            &mut out,
            "wschat_users_online",
            "Users with a username online.",
            s.users_online as u64,
        );
        counter(
            &mut out,
            "wschat_connections_accepted_total",
            "TCP connections accepted.",
            self.connections_accepted,
        );

        help(
            &mut out,
            "wschat_messages_routed_total",
            "Chat messages routed, by type.",
            "counter",
        );
        let _ = writeln!(
            out,
            "wschat_messages_routed_total{{type=\"public\"}} {}",
            s.public_messages
        );
        let _ = writeln!(
            out,
            "wschat_messages_routed_total{{type=\"private\"}} {}",
            s.private_messages
        );
        counter(
            &mut out,
            "wschat_deliveries_total",
            "Messages queued to a recipient's connection.",
            s.deliveries,
        );
        counter(
            &mut out,
            "wschat_public_shed_total",
            "Public messages and presence events shed for slow readers.",
            s.public_shed,
        );
        counter(
            &mut out,
            "wschat_senders_held_total",
            "Times a sender was not read while a reader it sent private messages to drained.",
            s.senders_held,
        );
        counter(
            &mut out,
            "wschat_private_refused_total",
            "Private messages refused (recipient_busy) because the recipient was flooded.",
            s.private_refused,
        );
        counter(
            &mut out,
            "wschat_message_errors_total",
            "Error events sent for refused client messages.",
            s.errors,
        );
        counter(
            &mut out,
            "wschat_rate_limited_total",
            "Messages refused (rate_limited) because their sender passed --rate-limit.",
            s.rate_limited,
        );
        counter(
            &mut out,
            "wschat_rate_limit_closes_total",
            "Connections closed (1008) for sending on past --rate-limit.",
            s.rate_limit_closes,
        );
        help(
            &mut out,
            "wschat_per_ip_refused_total",
            "Connections refused (429) for their client address's limits, by limit.",
            "counter",
        );
        for (label, n) in ["connections", "handshakes"]
            .iter()
            .zip(self.refused_per_ip)
        {
            let _ = writeln!(out, "wschat_per_ip_refused_total{{reason=\"{label}\"}} {n}");
        }
        gauge(
            &mut out,
            "wschat_per_ip_tracked_addresses",
            "Client addresses (IPv6: /64s) in the per-address limits' table.",
            s.per_ip_tracked as u64,
        );
        counter(
            &mut out,
            "wschat_received_bytes_total",
            "Bytes read from clients.",
            self.bytes_in,
        );
        counter(
            &mut out,
            "wschat_sent_bytes_total",
            "Bytes written to clients.",
            s.bytes_out,
        );

        help(
            &mut out,
            "wschat_handshake_failures_total",
            "Opening handshakes that failed, by reason.",
            "counter",
        );
        for (status, n) in HANDSHAKE_STATUSES.iter().zip(self.handshake_failures) {
            let _ = writeln!(
                out,
                "wschat_handshake_failures_total{{reason=\"http_{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "wschat_handshake_failures_total{{reason=\"timeout\"}} {}",
            self.handshake_timeouts
        );

        help(
            &mut out,
            "wschat_connection_closes_total",
            "Connections closed, by reason.",
            "counter",
        );
        for (label, n) in CLOSE_LABELS.iter().zip(self.closes) {
            let _ = writeln!(
                out,
                "wschat_connection_closes_total{{reason=\"{label}\"}} {n}"
            );
        }

        gauge(
            &mut out,
            "wschat_known_users",
            "Names remembered as users, who may be sent offline messages (bounded by --max-known-users).",
            s.known_users as u64,
        );
        counter(
            &mut out,
            "wschat_known_users_full_total",
            "Users who connected but were not remembered because --max-known-users names were.",
            s.known_users_full,
        );
        gauge(
            &mut out,
            "wschat_offline_messages",
            "Messages held in offline outboxes.",
            s.offline_messages as u64,
        );
        gauge(
            &mut out,
            "wschat_offline_bytes",
            "Bytes held in offline outboxes.",
            s.offline_bytes as u64,
        );
        gauge(
            &mut out,
            "wschat_offline_users",
            "Names with messages held (a name with nothing held costs nothing).",
            s.offline_users as u64,
        );

        gauge(
            &mut out,
            "wschat_store_degraded",
            "1 while the outbox log cannot be written (offline messages are refused with storage_unavailable).",
            u64::from(s.store_degraded),
        );
        counter(
            &mut out,
            "wschat_store_write_failures_total",
            "Writes of the outbox log (append, sync or rewrite) that failed.",
            s.store_write_failures,
        );
        counter(
            &mut out,
            "wschat_store_recoveries_total",
            "Times the outbox log was rewritten from memory after write failures and accepted writes again.",
            s.store_recoveries,
        );
        counter(
            &mut out,
            "wschat_store_refused_total",
            "Offline messages refused with storage_unavailable.",
            s.store_refused,
        );
        gauge(
            &mut out,
            "wschat_store_replay_records_kept",
            "Outbox log records read back at start.",
            s.replayed.records_kept,
        );
        gauge(
            &mut out,
            "wschat_store_replay_damaged_bytes",
            "Outbox log bytes that could not be read at start (a cut tail included).",
            s.replayed.damaged_bytes,
        );
        gauge(
            &mut out,
            "wschat_store_replay_damaged_regions",
            "Separate damaged stretches of the outbox log found at start.",
            s.replayed.damaged_regions,
        );

        self.render_memory(&mut out, s);

        help(
            &mut out,
            "wschat_routing_latency_seconds",
            "Time from reading a message to its frames being queued.",
            "histogram",
        );
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BOUNDS.iter().zip(self.latency_buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "wschat_routing_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "wschat_routing_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            self.latency_count
        );
        let _ = writeln!(
            out,
            "wschat_routing_latency_seconds_sum {}",
            self.latency_sum
        );
        let _ = writeln!(
            out,
            "wschat_routing_latency_seconds_count {}",
            self.latency_count
        );

        help(
            &mut out,
            "wschat_build_info",
            "The running version, as a label; the value is always 1.",
            "gauge",
        );
        // A Cargo version has no character that needs escaping in a label.
        let _ = writeln!(out, "wschat_build_info{{version=\"{}\"}} 1", crate::VERSION);
        render_process(&mut out, process);
        out
    }
}

/// The `process_*` families, each left out when its figure is unknown.
fn render_process(out: &mut String, p: &ProcessStats) {
    let families: [(&str, &str, &str, Option<f64>); 5] = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            p.resident_memory_bytes.map(|v| v as f64),
        ),
        (
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            "counter",
            p.cpu_seconds,
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            p.open_fds.map(|v| v as f64),
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            "gauge",
            p.max_fds.map(|v| v as f64),
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            "gauge",
            p.start_time_seconds,
        ),
    ];
    for (name, text, kind, value) in families {
        if let Some(value) = value {
            help(out, name, text, kind);
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

impl Metrics {
    fn render_memory(&self, out: &mut String, s: &Snapshot) {
        help(
            out,
            "wschat_memory_held_bytes",
            "Bytes peers make the server hold, by kind (counted against --memory-budget).",
            "gauge",
        );
        for (kind, bytes) in [
            ("outbound", s.held.outbound),
            ("partial", s.held.partial),
            ("heads", s.held.heads),
        ] {
            let _ = writeln!(out, "wschat_memory_held_bytes{{kind=\"{kind}\"}} {bytes}");
        }
        gauge(
            out,
            "wschat_memory_budget_bytes",
            "--memory-budget: from three quarters of it new connections get 503.",
            s.memory_budget as u64,
        );
        gauge(
            out,
            "wschat_max_partial_bytes",
            "--max-partial-bytes: the bound for all partial messages together.",
            s.max_partial_bytes as u64,
        );
        let m = &self.memory;
        help(
            out,
            "wschat_memory_refusals_total",
            "What the memory budget refused: new connections (503), partial messages \
             over budget (1009), messages not completed in --message-timeout (1008).",
            "counter",
        );
        for (reason, n) in [
            ("connection", m.connections_refused),
            ("partial_message", m.partial_refused),
            ("message_timeout", m.message_timeouts),
        ] {
            let _ = writeln!(
                out,
                "wschat_memory_refusals_total{{reason=\"{reason}\"}} {n}"
            );
        }
        counter(
            out,
            "wschat_memory_trims_total",
            "Times freed memory was given back to the OS after the held bytes fell.",
            m.trims,
        );
    }
}

fn help(out: &mut String, name: &str, text: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, text: &str, value: u64) {
    help(out, name, text, "counter");
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, text: &str, value: u64) {
    help(out, name, text, "gauge");
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_and_type() {
        let mut m = Metrics::default();
        m.count_close(CloseReason::ProtocolError(crate::ws::CloseCode::Protocol));
        m.count_close(CloseReason::HandshakeRejected(404));
        m.observe_routing(Duration::from_micros(3), 1);
        m.observe_routing(Duration::from_millis(30), 1);
        let process = ProcessStats {
            resident_memory_bytes: Some(1_769_472),
            cpu_seconds: Some(0.25),
            open_fds: Some(9),
            max_fds: Some(1_048_576),
            start_time_seconds: Some(1_764_250_000.5),
        };
        let snapshot = Snapshot {
            users_online: 2,
            replayed: Replayed {
                records_kept: 99,
                damaged_bytes: 61,
                damaged_regions: 1,
            },
            ..Snapshot::default()
        };
        let text = m.render_with(&snapshot, &process);
        assert!(text.contains("wschat_connection_closes_total{reason=\"protocol_error\"} 1\n"));
        assert!(text.contains("wschat_handshake_failures_total{reason=\"http_404\"} 1\n"));
        assert!(text.contains("wschat_users_online 2\n"));
        assert!(text.contains("wschat_store_replay_records_kept 99\n"));
        assert!(text.contains("wschat_store_replay_damaged_bytes 61\n"));
        assert!(text.contains("wschat_store_replay_damaged_regions 1\n"));
        assert!(text.contains("wschat_routing_latency_seconds_bucket{le=\"0.000005\"} 1\n"));
        assert!(text.contains("wschat_routing_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains(&format!(
            "wschat_build_info{{version=\"{}\"}} 1\n",
            crate::VERSION
        )));
        for sample in [
            "process_resident_memory_bytes 1769472\n",
            "process_cpu_seconds_total 0.25\n",
            "process_open_fds 9\n",
            "process_max_fds 1048576\n",
            "process_start_time_seconds 1764250000.5\n",
        ] {
            assert!(text.contains(sample), "{sample}");
        }
        // Every sample's family has HELP and TYPE lines before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count");
                assert!(declared.iter().any(|d| d == name || d == family), "{line}");
            }
        }
    }

    #[test]
    fn unknown_process_figures_are_left_out() {
        let text = Metrics::default().render_with(&Snapshot::default(), &ProcessStats::default());
        assert!(!text.contains("process_"), "{text}");
        let with_rss = ProcessStats {
            resident_memory_bytes: Some(4096),
            ..ProcessStats::default()
        };
        let text = Metrics::default().render_with(&Snapshot::default(), &with_rss);
        assert!(text.contains(
            "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 4096\n"
        ));
        assert!(!text.contains("process_open_fds"), "{text}");
    }
}
