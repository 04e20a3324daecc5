//! The human table and the one-line JSON object every run prints.

use serde_json::{Map, Value};

use crate::hist::Histogram;
use crate::net::NetStats;
use crate::os::CpuUse;

pub struct Report {
    title: String,
    rows: Vec<(String, String)>,
    json: Map<String, Value>,
    warnings: Vec<String>,
}

impl Report {
    pub fn new(mode: &str, title: String) -> Report {
        let mut json = Map::new();
        json.insert("mode".into(), mode.into());
        Report {
            title,
            rows: Vec::new(),
            json,
            warnings: Vec::new(),
        }
    }

    pub fn row(&mut self, label: &str, text: String) {
        self.rows.push((label.to_owned(), text));
    }

    pub fn val(&mut self, key: &str, value: impl Into<Value>) {
        self.json.insert(key.to_owned(), value.into());
    }

    pub fn warn(&mut self, text: String) {
        self.warnings.push(text);
    }

    /// A latency row (µs) and `{key: {count, p50_us, ...}}` in the JSON.
    pub fn latency(&mut self, key: &str, label: &str, h: &Histogram) {
        let s = h.summary_us();
        self.row(
            label,
            if s.count == 0 {
                "no samples".into()
            } else {
                format!(
                    "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1}, n={})",
                    s.p50, s.p90, s.p99, s.p999, s.max, s.mean, s.count
                )
            },
        );
        self.val(
            key,
            serde_json::json!({
                "count": s.count, "p50_us": s.p50, "p90_us": s.p90, "p99_us": s.p99,
                "p999_us": s.p999, "max_us": s.max, "mean_us": s.mean,
            }),
        );
    }

    /// Our CPU and the server's over the window, with the saturation warning.
    /// `per_unit`: (units per second, unit name) for the CPU cost of one.
    pub fn cpu(&mut self, cpu: &CpuUse, per_unit: Option<(f64, &str)>) {
        let own = cpu.own;
        let mut text = format!("{own:.1} % of one core (getrusage)");
        if let Some((core, busy)) = cpu.core {
            text += &format!(", core {core} busy {busy:.1} %");
            self.val("loadgen_core_busy_pct", round1(busy));
        }
        if let Some((rate, unit)) = per_unit.filter(|(n, _)| *n > 0.0) {
            let ns = own / 100.0 * 1e9 / rate;
            self.val("loadgen_ns_per_unit", ns.round());
            text += &format!(", {ns:.0} ns per {unit}");
        }
        self.row("loadgen cpu", text);
        self.val("loadgen_cpu_pct", round1(own));
        if let Some(server) = cpu.server {
            self.row("server cpu", format!("{server:.1} % of one core"));
            self.val("server_cpu_pct", round1(server));
        }
        if let Some(other) = cpu.other {
            self.row(
                "other load",
                format!("{other:.1} % of a core (other processes, kernel)"),
            );
            self.val("other_load_pct", round1(other));
            if other > 20.0 {
                self.warn(format!(
                    "other work used {other:.0} % of a core during the window: figures disturbed"
                ));
            }
        }
        let core_busy = cpu.core.map_or(0.0, |(_, b)| b);
        let disturbed = cpu.other.is_some_and(|o| o > 20.0);
        let saturated = own >= 95.0 || (core_busy >= 95.0 && !disturbed);
        self.val("loadgen_saturated", saturated);
        if saturated {
            self.warn(format!(
                "LOADGEN SATURATED: the load generator used {own:.0} % of a core ({core_busy:.0} % core busy incl. softirq); the figures are its limit, not the server's"
            ));
        } else if core_busy >= 95.0 {
            self.warn(format!(
                "the load generator's core was {core_busy:.0} % busy, shared with other work: it may have been starved"
            ));
        }
    }

    /// The event loop's own counters.
    pub fn net(&mut self, s: &NetStats) {
        self.row(
            "connections",
            format!(
                "{} opened, {} handshake failures, {} closed by server, {} eof, {} io errors, {} protocol errors",
                s.opened, s.handshake_failures, s.closed_by_server, s.eofs, s.io_errors, s.protocol_errors
            ),
        );
        self.row(
            "io",
            format!(
                "{} frames out in {} writes, {:.1} MB in in {} reads, {} pings answered",
                s.frames_out,
                s.writes,
                s.bytes_in as f64 / 1e6,
                s.reads,
                s.pings
            ),
        );
        self.val(
            "net",
            serde_json::json!({
                "opened": s.opened, "handshake_failures": s.handshake_failures,
                "closed_by_server": s.closed_by_server, "eof": s.eofs, "io_errors": s.io_errors,
                "protocol_errors": s.protocol_errors, "pings": s.pings, "binary": s.binary,
                "frames_out": s.frames_out, "writes": s.writes, "reads": s.reads,
                "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
            }),
        );
        for f in &s.failures {
            self.warn(format!("failure: {f}"));
        }
    }

    pub fn print(&self, json: bool, errors: u64) {
        println!("{}", self.title);
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        for (label, text) in &self.rows {
            println!("  {label:<width$}  {text}");
        }
        for w in &self.warnings {
            println!("WARNING: {w}");
        }
        println!(
            "result: {}",
            if errors == 0 {
                "ok".to_string()
            } else {
                format!("{errors} errors counted")
            }
        );
        if json {
            let mut obj = self.json.clone();
            obj.insert("errors".into(), errors.into());
            obj.insert("warnings".into(), self.warnings.clone().into());
            println!("{}", Value::Object(obj));
        }
    }
}

pub fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Counts of message types that are not the one being measured.
#[derive(Default)]
pub struct TypeCounts(Vec<(String, u64)>);

impl TypeCounts {
    pub fn add(&mut self, ty: &[u8]) {
        let ty = std::str::from_utf8(ty).unwrap_or("?");
        match self.0.iter_mut().find(|(t, _)| t == ty) {
            Some((_, n)) => *n += 1,
            None => self.0.push((ty.to_owned(), 1)),
        }
    }

    pub fn get(&self, ty: &str) -> u64 {
        self.0.iter().find(|(t, _)| t == ty).map_or(0, |(_, n)| *n)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    pub fn text(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(t, n)| (t.clone(), Value::from(*n)))
                .collect(),
        )
    }
}
