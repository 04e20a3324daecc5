//! `private`: P pairs s<i> → r<i>, closed loop (W in flight per sender) or
//! open loop at a fixed total rate (latency from the scheduled send time).

use crate::hist::Histogram;
use crate::net::{App, Net};
use crate::os::{now_ns, set_timer_slack_ns};
use crate::phases::{close_all, connect_row, drain, open_every, run_window, settle, Window};
use crate::report::{round1, Report, TypeCounts};
use crate::scan::{field, parse_body, push_body};
use crate::{Common, Outcome};

pub struct Opts {
    pub pairs: usize,
    pub window: usize,
    pub size: usize,
    pub duration: f64,
    pub warmup: f64,
    pub rate: Option<f64>,
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
            Some(ty) => self.types.add(ty),
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
    c.check_fds(2 * o.pairs)?;
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
    };
    let mut net = Net::new(c.target.clone()).map_err(|e| format!("event loop: {e}"))?;
    if o.rate.is_some() {
        net.enable_timer().map_err(|e| format!("timerfd: {e}"))?;
    }
    let io = |e: std::io::Error| format!("event loop: {e}");

    // Receivers first (tags 0..P), then senders (tags P..2P).
    let names: Vec<String> = app
        .receiver_names
        .iter()
        .chain(&app.sender_names)
        .cloned()
        .collect();
    let (ids, connect_secs) = open_every(&mut net, &mut app, &names, c)?;
    for (pair, &id) in app.pairs.iter_mut().zip(&ids[p..]) {
        pair.sender = id;
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
    let cpu = run_window(&mut net, &mut app, c, w, |net, app| {
        // Open loop: send what is due, each message at its scheduled time.
        let Some(interval) = interval else {
            return;
        };
        while let Some(at) = w.due(k, interval, net, &mut app.lag) {
            app.send_one(net, (k % p as u64) as usize, at);
            k += 1;
        }
    })?;
    app.sending = false;

    // Drain what is in flight.
    drain(&mut net, &mut app, c, PrivateApp::in_flight)?;
    let during = net.stats.clone();
    close_all(&mut net, &mut app).map_err(io)?;

    // The report.
    let window_secs = o.duration;
    let sent: u64 = app.pairs.iter().map(|p| p.sent).sum();
    let received: u64 = app.pairs.iter().map(|p| p.received).sum();
    let lost = app.in_flight();
    let rate = app.delivered_window as f64 / window_secs;
    let mode = match o.rate {
        Some(r) => format!("open loop at {r} msg/s"),
        None => format!("closed loop, window {}", o.window),
    };
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
    r.row("other messages", app.types.text());
    r.val("other_types", app.types.json());
    r.cpu(&cpu, Some((rate, "message")));
    r.net(&net.stats);
    let server_errors = app.types.get("error");
    if server_errors > 0 {
        r.warn(format!("the server sent {server_errors} error messages"));
    }
    let ended_early = (during.closed_by_server - before.closed_by_server)
        + (during.eofs - before.eofs)
        + (during.io_errors - before.io_errors)
        + during.protocol_errors;
    let errors =
        lost + app.misrouted + app.out_of_order + app.malformed + server_errors + ended_early;
    Ok(Outcome { report: r, errors })
}
