//! `private`: P pairs s<i> → r<i>, closed loop (W in flight per sender) or
//! open loop at a fixed total rate (latency from the scheduled send time);
//! optionally under a flood of public messages that every sender and
//! receiver gets too (`--public-rate`).

use crate::hist::Histogram;
use crate::net::{App, Net};
use crate::os::{now_ns, set_timer_slack_ns};
use crate::phases::{close_all, connect_row, drain, open_every, run_window, settle, Window};
use crate::public::Publisher;
use crate::report::{round1, Report, TypeCounts};
use crate::scan::{field, number_field, parse_body, push_body};
use crate::{Common, Outcome};

pub struct Opts {
    pub pairs: usize,
    pub window: usize,
    pub size: usize,
    pub duration: f64,
    pub warmup: f64,
    pub rate: Option<f64>,
    /// Public messages per second from `<prefix>pub` to everyone.
    pub public_rate: Option<f64>,
    pub public_size: usize,
    /// Receivers connect here instead (another node of a `--cluster`).
    pub receiver_target: Option<crate::net::Target>,
    /// Processes whose CPU over the window is reported per message (the
    /// receivers' node, Redis), with their labels.
    pub watch: Vec<Watched>,
}

#[derive(Default, Clone)]
struct Pair {
    sender: usize,
    sent: u64,
    received: u64,
    expect: u64,
}

struct PrivateApp {
    pairs: Vec<Pair>,
    sender_names: Vec<String>,
    receiver_names: Vec<String>,
    size: usize,
    closed_loop: bool,
    sending: bool,
    t0: u64,
    t1: u64,
    latency: Histogram,
    lag: Histogram,
    delivered_window: u64,
    sent_window: u64,
    misrouted: u64,
    malformed: u64,
    out_of_order: u64,
    types: TypeCounts,
    msg: Vec<u8>,
    flood: Option<Flood>,
}

/// A process whose CPU is reported: its row label, its JSON key prefix, its pid.
pub struct Watched {
    pub label: &'static str,
    pub key: &'static str,
    pub pid: u32,
}

/// The public flood and what the pairs' connections got of it. Tags 0..2P
/// are the pairs' (receivers, then senders); the publisher's is 2P.
struct Flood {
    publisher: Publisher,
    /// Per connection of the pairs: the next sequence number expected.
    expect: Vec<u64>,
    to_receivers: u64,
    to_senders: u64,
    deliveries_window: u64,
    own_copies: u64,
    latency: Histogram,
    out_of_order: u64,
    gaps: u64,
    dropped: u64,
}

impl Flood {
    /// `conns`: the pairs' connections, each owed every message.
    fn new(publisher: Publisher, conns: usize) -> Flood {
        Flood {
            publisher,
            expect: vec![0; conns],
            to_receivers: 0,
            to_senders: 0,
            deliveries_window: 0,
            own_copies: 0,
            latency: Histogram::new(),
            out_of_order: 0,
            gaps: 0,
            dropped: 0,
        }
    }

    fn on_public(&mut self, tag: usize, text: &[u8], now: u64, t0: u64, t1: u64) {
        let Some((seq, ts)) = self.publisher.check(text) else {
            return;
        };
        let seq = seq as u64;
        let Some(expect) = self.expect.get_mut(tag) else {
            self.own_copies += 1;
            return;
        };
        if seq >= *expect {
            // Ahead of the expected number: the server shed what is between.
            *expect = seq + 1;
        } else {
            self.out_of_order += 1;
            return;
        }
        if tag < self.expect.len() / 2 {
            self.to_receivers += 1;
        } else {
            self.to_senders += 1;
        }
        if now >= t0 && now < t1 {
            self.deliveries_window += 1;
        }
        if ts >= t0 && ts < t1 {
            self.latency.record(now.saturating_sub(ts));
        }
    }

    /// A `gap` to one of the pairs (the publisher's own go with the other
    /// message types).
    fn on_gap(&mut self, text: &[u8]) {
        self.gaps += 1;
        self.dropped += number_field(text, "dropped").unwrap_or(0);
    }

    fn deliveries(&self) -> u64 {
        self.to_receivers + self.to_senders
    }

    /// Deliveries owed to the pairs and neither made nor reported dropped.
    fn missing(&self) -> u64 {
        let owed = self.publisher.sent_at.len() as u64 * self.expect.len() as u64;
        owed.saturating_sub(self.deliveries())
    }

    fn outstanding(&self) -> u64 {
        self.missing().saturating_sub(self.dropped)
    }
}

impl PrivateApp {
    fn send_one(&mut self, net: &mut Net, pair: usize, ts: u64) {
        let p = &mut self.pairs[pair];
        let msg = &mut self.msg;
        msg.clear();
        msg.extend_from_slice(br#"{"type":"private","to":""#);
        msg.extend_from_slice(self.receiver_names[pair].as_bytes());
        msg.extend_from_slice(br#"","body":""#);
        push_body(
            msg,
            &[(b'P', pair as u64), (b'Q', p.sent), (b'T', ts)],
            self.size,
        );
        msg.extend_from_slice(br#""}"#);
        p.sent += 1;
        if ts >= self.t0 && ts < self.t1 {
            self.sent_window += 1;
        }
        net.send_text(p.sender, msg);
    }

    fn in_flight(&self) -> u64 {
        self.pairs
            .iter()
            .map(|p| p.sent.saturating_sub(p.received))
            .sum()
    }

    fn on_private(&mut self, net: &mut Net, tag: usize, text: &[u8], now: u64) {
        let n = self.pairs.len();
        let fields = field(text, "body").and_then(|b| parse_body(b, [b'P', b'Q', b'T']));
        let Some([pair, seq, ts]) = fields else {
            self.malformed += 1;
            return;
        };
        let pair = pair as usize;
        let from = field(text, "from");
        // Receivers have tags 0..n; a sender never gets a private.
        if tag >= n || pair != tag || from != Some(self.sender_names[tag].as_bytes()) {
            self.misrouted += 1;
            return;
        }
        let p = &mut self.pairs[pair];
        p.received += 1;
        if seq == p.expect {
            p.expect += 1;
        } else if seq > p.expect {
            p.expect = seq + 1;
        } else {
            self.out_of_order += 1;
        }
        if now >= self.t0 && now < self.t1 {
            self.delivered_window += 1;
        }
        if ts >= self.t0 && ts < self.t1 {
            self.latency.record(now.saturating_sub(ts));
        }
        if self.closed_loop && self.sending {
            self.send_one(net, pair, now_ns());
        }
    }
}

impl App for PrivateApp {
    fn on_text(&mut self, net: &mut Net, _id: usize, tag: usize, text: &[u8], now: u64) {
        match field(text, "type") {
            Some(b"private") => self.on_private(net, tag, text, now),
            Some(ty) => match (&mut self.flood, ty) {
                (Some(f), b"public") => f.on_public(tag, text, now, self.t0, self.t1),
                (Some(f), b"gap") if tag < f.expect.len() => f.on_gap(text),
                _ => self.types.add(ty),
            },
            None => self.types.add(b"(no type)"),
        }
    }
}

pub fn run(c: &Common, o: &Opts) -> Result<Outcome, String> {
    if o.pairs == 0 || o.size == 0 || !crate::positive(o.duration) || !crate::non_negative(o.warmup)
    {
        return Err("--pairs, --size and --duration must be positive".into());
    }
    if o.rate.is_none() && o.window == 0 {
        return Err("--window must be positive".into());
    }
    if o.rate.is_some_and(|r| !crate::positive(r)) {
        return Err("--rate must be positive".into());
    }
    if o.public_rate.is_some_and(|r| !crate::positive(r)) || o.public_size == 0 {
        return Err("--public-rate and --public-size must be positive".into());
    }
    c.check_fds(2 * o.pairs + usize::from(o.public_rate.is_some()))?;
    set_timer_slack_ns(1);
    let p = o.pairs;
    let receiver_names: Vec<String> = (0..p).map(|i| format!("{}r{i}", c.prefix)).collect();
    let sender_names: Vec<String> = (0..p).map(|i| format!("{}s{i}", c.prefix)).collect();
    let mut app = PrivateApp {
        pairs: vec![Pair::default(); p],
        sender_names,
        receiver_names,
        size: o.size,
        closed_loop: o.rate.is_none(),
        sending: false,
        t0: u64::MAX,
        t1: u64::MAX,
        latency: Histogram::new(),
        lag: Histogram::new(),
        delivered_window: 0,
        sent_window: 0,
        misrouted: 0,
        malformed: 0,
        out_of_order: 0,
        types: TypeCounts::default(),
        msg: Vec::with_capacity(o.size + 128),
        flood: o.public_rate.map(|rate| {
            let name = format!("{}pub", c.prefix);
            Flood::new(Publisher::new(name, rate, o.public_size), 2 * p)
        }),
    };
    let mut net = Net::new(c.target.clone()).map_err(|e| format!("event loop: {e}"))?;
    // Receivers are tags 0..P.
    net.second = o.receiver_target.clone().map(|t| (t, p));
    if o.rate.is_some() || app.flood.is_some() {
        net.enable_timer().map_err(|e| format!("timerfd: {e}"))?;
    }
    let io = |e: std::io::Error| format!("event loop: {e}");

    // Receivers first (tags 0..P), then senders (tags P..2P), then the
    // publisher of the flood (tag 2P).
    let names: Vec<String> = app
        .receiver_names
        .iter()
        .chain(&app.sender_names)
        .chain(app.flood.as_ref().map(|f| &f.publisher.name))
        .cloned()
        .collect();
    let (ids, connect_secs) = open_every(&mut net, &mut app, &names, c)?;
    for (pair, &id) in app.pairs.iter_mut().zip(&ids[p..2 * p]) {
        pair.sender = id;
    }
    if let Some(f) = &mut app.flood {
        f.publisher.id = ids[2 * p];
    }
    // Let welcome and presence events settle.
    settle(&mut net, &mut app, 0.2).map_err(io)?;
    let before = net.stats.clone();

    let w = Window::starting_now(o.warmup, o.duration);
    app.t0 = w.t0;
    app.t1 = w.t1;
    app.sending = true;
    if app.closed_loop {
        for pair in 0..p {
            for _ in 0..o.window {
                app.send_one(&mut net, pair, now_ns());
            }
        }
    }
    let interval = o.rate.map(|r| 1e9 / r);
    let mut k: u64 = 0;
    let watched_before: Vec<Option<u64>> = o
        .watch
        .iter()
        .map(|w| crate::os::proc_cpu_ns(w.pid))
        .collect();
    let watch_start = now_ns();
    let cpu = run_window(&mut net, &mut app, c, w, |net, app| {
        // Open loop: send what is due, each message at its scheduled time.
        if let Some(interval) = interval {
            while let Some(at) = w.due(k, interval, net, &mut app.lag) {
                app.send_one(net, (k % p as u64) as usize, at);
                k += 1;
            }
        }
        if let Some(f) = &mut app.flood {
            f.publisher.publish_due(&w, net);
        }
    })?;
    app.sending = false;
    let watch_wall = now_ns().saturating_sub(watch_start).max(1) as f64;
    let watched: Vec<Option<f64>> = o
        .watch
        .iter()
        .zip(&watched_before)
        .map(|(w, before)| {
            let after = crate::os::proc_cpu_ns(w.pid)?;
            Some(after.saturating_sub((*before)?) as f64 * 100.0 / watch_wall)
        })
        .collect();

    // Drain what is in flight (and public copies neither here nor reported
    // dropped yet).
    drain(&mut net, &mut app, c, |app| {
        app.in_flight() + app.flood.as_ref().map_or(0, Flood::outstanding)
    })?;
    let during = net.stats.clone();
    close_all(&mut net, &mut app).map_err(io)?;

    // The report.
    let window_secs = o.duration;
    let sent: u64 = app.pairs.iter().map(|p| p.sent).sum();
    let received: u64 = app.pairs.iter().map(|p| p.received).sum();
    let lost = app.in_flight();
    let rate = app.delivered_window as f64 / window_secs;
    let mut mode = match o.rate {
        Some(r) => format!("open loop at {r} msg/s"),
        None => format!("closed loop, window {}", o.window),
    };
    if let Some(r) = o.public_rate {
        mode += &format!(", public flood {r} msg/s of {} B", o.public_size);
    }
    let mut r = Report::new(
        "private",
        format!(
            "wschat-bench private: {} pairs, {mode}, {} B bodies, {}s window after {}s warmup, {}",
            p, o.size, o.duration, o.warmup, c.url
        ),
    );
    r.val("pairs", p);
    r.val("window", o.window);
    r.val("size", o.size);
    r.val("duration_s", o.duration);
    r.val("rate", o.rate);
    connect_row(&mut r, names.len(), connect_secs);
    r.row("delivered", format!("{rate:.0} msg/s in the window"));
    r.val("delivered_per_s", round1(rate));
    r.val("delivered_in_window", app.delivered_window);
    r.val("sent_in_window", app.sent_window);
    r.latency("latency", "latency (µs)", &app.latency);
    if o.rate.is_some() {
        r.latency("send_lag", "send lag (µs)", &app.lag);
    }
    r.row(
        "messages",
        format!(
            "{sent} sent, {received} received, {lost} lost, {} misrouted, {} out of order, {} malformed",
            app.misrouted, app.out_of_order, app.malformed
        ),
    );
    r.val("sent", sent);
    r.val("received", received);
    r.val("lost", lost);
    r.val("misrouted", app.misrouted);
    r.val("out_of_order", app.out_of_order);
    r.val("malformed", app.malformed);
    if let Some(f) = &app.flood {
        flood_rows(&mut r, f, o, window_secs);
    }
    r.row("other messages", app.types.text());
    r.val("other_types", app.types.json());
    r.cpu(&cpu, Some((rate, "message")));
    // The whole run (warm-up included) was watched: per message over what
    // was sent in it.
    let run_rate = sent as f64 / (watch_wall / 1e9);
    for (w, pct) in o.watch.iter().zip(&watched) {
        let Some(pct) = pct else { continue };
        let mut text = format!("{pct:.1} % of one core (pid {})", w.pid);
        if run_rate > 0.0 {
            let us = pct / 100.0 * 1e6 / run_rate;
            text += &format!(", {us:.1} µs per message");
            r.val(&format!("{}_us_per_message", w.key), round1(us));
        }
        r.row(w.label, text);
        r.val(&format!("{}_cpu_pct", w.key), round1(*pct));
    }
    r.net(&net.stats);
    let server_errors = app.types.get("error");
    if server_errors > 0 {
        r.warn(format!("the server sent {server_errors} error messages"));
    }
    let ended_early = (during.closed_by_server - before.closed_by_server)
        + (during.eofs - before.eofs)
        + (during.io_errors - before.io_errors)
        + during.protocol_errors;
    let flood_errors = app.flood.as_ref().map_or(0, |f| {
        f.publisher.misrouted + f.out_of_order + f.publisher.malformed
    });
    let errors = lost
        + app.misrouted
        + app.out_of_order
        + app.malformed
        + server_errors
        + ended_early
        + flood_errors;
    Ok(Outcome { report: r, errors })
}

/// The report's rows on the public flood.
fn flood_rows(r: &mut Report, f: &Flood, o: &Opts, window_secs: f64) {
    let rate = o.public_rate.unwrap_or(0.0);
    let per_s = f.deliveries_window as f64 / window_secs;
    let published = f.publisher.sent_at.len() as u64;
    let missing = f.missing();
    r.val("public_rate", rate);
    r.val("public_size", o.public_size);
    r.row(
        "public",
        format!(
            "{published} published, {} deliveries ({} to receivers, {} to senders), {per_s:.0} /s in the window (expected {:.0}), {missing} missing, {} own copies",
            f.deliveries(),
            f.to_receivers,
            f.to_senders,
            rate * f.expect.len() as f64,
            f.own_copies
        ),
    );
    r.row(
        "public gaps",
        format!(
            "{} gap events, {} dropped; {} misrouted, {} out of order, {} malformed",
            f.gaps, f.dropped, f.publisher.misrouted, f.out_of_order, f.publisher.malformed
        ),
    );
    r.latency("public_delivery", "public delivery (µs)", &f.latency);
    r.latency("public_send_lag", "public send lag (µs)", &f.publisher.lag);
    r.val(
        "public",
        serde_json::json!({
            "published": published, "deliveries": f.deliveries(),
            "to_receivers": f.to_receivers, "to_senders": f.to_senders,
            "deliveries_per_s": round1(per_s), "missing": missing, "own_copies": f.own_copies,
            "gaps": f.gaps, "dropped": f.dropped, "misrouted": f.publisher.misrouted,
            "out_of_order": f.out_of_order, "malformed": f.publisher.malformed,
        }),
    );
    if missing > 0 {
        r.warn(format!(
            "{missing} public deliveries missing ({} gap events reported {} dropped)",
            f.gaps, f.dropped
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(k: u64, at: u64) -> String {
        format!(r#"{{"type":"public","id":9,"from":"xyzpub","body":"K{k}T{at}Xxxxx"}}"#)
    }

    #[test]
    fn the_flood_is_counted_apart() {
        // One pair: tag 0 the receiver, 1 the sender, 2 the publisher.
        let mut f = Flood::new(Publisher::new("xyzpub".into(), 10.0, 16), 2);
        f.publisher.sent_at = vec![100, 200, 300];
        let (t0, t1) = (150, 1000);
        f.on_public(0, copy(0, 100).as_bytes(), 160, t0, t1);
        f.on_public(0, copy(2, 300).as_bytes(), 350, t0, t1);
        f.on_public(1, copy(1, 200).as_bytes(), 210, t0, t1);
        f.on_public(2, copy(1, 200).as_bytes(), 220, t0, t1);
        assert_eq!((f.to_receivers, f.to_senders, f.own_copies), (2, 1, 1));
        assert_eq!(f.deliveries_window, 3);
        assert_eq!(f.latency.summary_us().count, 2, "scheduled in the window");
        // 6 owed, 3 made; the receiver skipped message 1 and the sender has
        // 0 and 2 to come.
        assert_eq!((f.missing(), f.outstanding()), (3, 3));
        f.on_gap(br#"{"type":"gap","dropped":1}"#);
        assert_eq!((f.gaps, f.dropped, f.outstanding()), (1, 1, 2));
        // Going back is an error, not a delivery.
        f.on_public(0, copy(1, 200).as_bytes(), 400, t0, t1);
        assert_eq!((f.out_of_order, f.deliveries()), (1, 3));
        f.on_public(
            0,
            br#"{"type":"public","from":"xyzpub","body":"K7T1X"}"#,
            400,
            t0,
            t1,
        );
        f.on_public(
            0,
            br#"{"type":"public","from":"xyzpub","body":"oops"}"#,
            400,
            t0,
            t1,
        );
        assert_eq!((f.publisher.misrouted, f.publisher.malformed), (1, 1));
    }
}
