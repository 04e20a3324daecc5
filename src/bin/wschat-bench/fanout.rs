//! `fanout`: N idle receivers and one publisher sending public messages at a
//! fixed rate; per message, the time until the last receiver had it.

use crate::hist::Histogram;
use crate::net::{App, Net};
use crate::os::set_timer_slack_ns;
use crate::phases::{close_all, connect_row, drain, open_every, run_window, settle, Window};
use crate::public::Publisher;
use crate::report::{round1, Report, TypeCounts};
use crate::scan::field;
use crate::{Common, Outcome};

pub struct Opts {
    pub receivers: usize,
    pub rate: f64,
    pub size: usize,
    pub duration: f64,
    pub warmup: f64,
}

struct FanoutApp {
    receivers: usize,
    publisher: Publisher,
    /// Per message (as `publisher.sent_at`): receivers reached, last arrival.
    reached: Vec<u32>,
    last: Vec<u64>,
    /// Per receiver: the next sequence number expected.
    expect: Vec<u64>,
    t0: u64,
    t1: u64,
    delivery: Histogram,
    deliveries: u64,
    deliveries_window: u64,
    own_copies: u64,
    duplicates: u64,
    out_of_order: u64,
    types: TypeCounts,
}

impl FanoutApp {
    fn incomplete(&self) -> bool {
        self.reached.iter().any(|&r| (r as usize) < self.receivers)
    }
}

impl App for FanoutApp {
    fn on_text(&mut self, _net: &mut Net, _id: usize, tag: usize, text: &[u8], now: u64) {
        match field(text, "type") {
            Some(b"public") => {}
            Some(ty) => return self.types.add(ty),
            None => return self.types.add(b"(no type)"),
        }
        let Some((seq, ts)) = self.publisher.check(text) else {
            return;
        };
        if tag >= self.receivers {
            self.own_copies += 1;
            return;
        }
        let expect = &mut self.expect[tag];
        if seq as u64 == *expect {
            *expect += 1;
        } else if seq as u64 > *expect {
            *expect = seq as u64 + 1;
        } else {
            // Behind the expected number: a duplicate or a reordering.
            self.out_of_order += 1;
        }
        if self.reached[seq] as usize >= self.receivers {
            self.duplicates += 1;
            return;
        }
        self.reached[seq] += 1;
        self.last[seq] = self.last[seq].max(now);
        self.deliveries += 1;
        if now >= self.t0 && now < self.t1 {
            self.deliveries_window += 1;
        }
        if ts >= self.t0 && ts < self.t1 {
            self.delivery.record(now.saturating_sub(ts));
        }
    }
}

pub fn run(c: &Common, o: &Opts) -> Result<Outcome, String> {
    if o.receivers == 0 || o.size == 0 || !crate::positive(o.rate) || !crate::positive(o.duration) {
        return Err("--receivers, --rate, --size and --duration must be positive".into());
    }
    if !crate::non_negative(o.warmup) {
        return Err("--warmup must not be negative".into());
    }
    c.check_fds(o.receivers + 1)?;
    set_timer_slack_ns(1);
    let n = o.receivers;
    let mut names: Vec<String> = (0..n).map(|i| format!("{}f{i}", c.prefix)).collect();
    let publisher = Publisher::new(format!("{}pub", c.prefix), o.rate, o.size);
    names.push(publisher.name.clone());
    let mut app = FanoutApp {
        receivers: n,
        publisher,
        reached: Vec::new(),
        last: Vec::new(),
        expect: vec![0; n],
        t0: u64::MAX,
        t1: u64::MAX,
        delivery: Histogram::new(),
        deliveries: 0,
        deliveries_window: 0,
        own_copies: 0,
        duplicates: 0,
        out_of_order: 0,
        types: TypeCounts::default(),
    };
    let io = |e: std::io::Error| format!("event loop: {e}");
    let mut net = Net::new(c.target.clone()).map_err(io)?;
    net.enable_timer().map_err(io)?;
    let (ids, connect_secs) = open_every(&mut net, &mut app, &names, c)?;
    app.publisher.id = ids[n];
    // Presence events from connecting go to everyone: let them drain.
    settle(&mut net, &mut app, 0.3 + n as f64 / 20_000.0).map_err(io)?;
    let before = net.stats.clone();

    let w = Window::starting_now(o.warmup, o.duration);
    let t0 = w.t0;
    app.t0 = w.t0;
    app.t1 = w.t1;
    let cpu = run_window(&mut net, &mut app, c, w, |net, app| {
        // Each message at its scheduled time (open loop).
        app.publisher.publish_due(&w, net);
        let sent = app.publisher.sent_at.len();
        app.reached.resize(sent, 0);
        app.last.resize(sent, 0);
    })?;
    drain(&mut net, &mut app, c, |app| u64::from(app.incomplete()))?;
    let during = net.stats.clone();
    close_all(&mut net, &mut app).map_err(io)?;

    // Per message in the window: time until the last receiver had it.
    let mut last_hist = Histogram::new();
    let mut missing = 0u64;
    let mut window_msgs = 0u64;
    let mut incomplete_msgs = 0u64;
    for (k, &at) in app.publisher.sent_at.iter().enumerate() {
        let reached = app.reached[k] as u64;
        missing += n as u64 - reached;
        if at < t0 {
            continue;
        }
        window_msgs += 1;
        if reached == n as u64 {
            last_hist.record(app.last[k] - at);
        } else {
            incomplete_msgs += 1;
        }
    }
    let sent = app.publisher.sent_at.len() as u64;
    let per_s = app.deliveries_window as f64 / o.duration;
    let mut r = Report::new(
        "fanout",
        format!(
            "wschat-bench fanout: {n} receivers, {} msg/s public, {} B bodies, {}s window after {}s warmup, {}",
            o.rate, o.size, o.duration, o.warmup, c.url
        ),
    );
    r.val("receivers", n);
    r.val("rate", o.rate);
    r.val("size", o.size);
    r.val("duration_s", o.duration);
    connect_row(&mut r, names.len(), connect_secs);
    r.row(
        "deliveries",
        format!(
            "{per_s:.0} /s in the window (expected {:.0})",
            o.rate * n as f64
        ),
    );
    r.val("deliveries_per_s", round1(per_s));
    r.latency("last_receiver", "last receiver (µs)", &last_hist);
    r.latency("delivery", "each delivery (µs)", &app.delivery);
    r.latency("send_lag", "send lag (µs)", &app.publisher.lag);
    r.row(
        "messages",
        format!(
            "{sent} published ({window_msgs} in the window, {incomplete_msgs} of them not reaching everyone), {} deliveries, {missing} missing, {} own copies",
            app.deliveries, app.own_copies
        ),
    );
    r.row(
        "errors",
        format!(
            "{} misrouted, {} duplicates, {} out of order, {} malformed",
            app.publisher.misrouted, app.duplicates, app.out_of_order, app.publisher.malformed
        ),
    );
    r.val("published", sent);
    r.val("deliveries", app.deliveries);
    r.val("missing", missing);
    r.val("own_copies", app.own_copies);
    r.val("misrouted", app.publisher.misrouted);
    r.val("duplicates", app.duplicates);
    r.val("out_of_order", app.out_of_order);
    r.val("malformed", app.publisher.malformed);
    r.row("other messages", app.types.text());
    r.val("other_types", app.types.json());
    if missing > 0 {
        r.warn(format!(
            "{missing} deliveries missing ({} gap events received)",
            app.types.get("gap")
        ));
    }
    r.cpu(&cpu, Some((per_s, "delivery")));
    r.net(&net.stats);
    let server_errors = app.types.get("error");
    let ended_early = (during.closed_by_server - before.closed_by_server)
        + (during.eofs - before.eofs)
        + (during.io_errors - before.io_errors)
        + during.protocol_errors;
    let errors = app.publisher.misrouted
        + app.duplicates
        + app.out_of_order
        + app.publisher.malformed
        + server_errors
        + ended_early;
    Ok(Outcome { report: r, errors })
}
