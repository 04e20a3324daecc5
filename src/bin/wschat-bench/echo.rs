//! `echo`: C connections to `wschat --echo`, W text messages in flight each;
//! raw engine throughput and round-trip latency.

use crate::hist::Histogram;
use crate::net::{App, Net};
use crate::os::now_ns;
use crate::phases::{close_all, drain, open_every, run_window, settle, Window};
use crate::report::{round1, Report};
use crate::scan::{parse_body, push_body};
use crate::{Common, Outcome};

pub struct Opts {
    pub conns: usize,
    pub window: usize,
    pub size: usize,
    pub duration: f64,
    pub warmup: f64,
}

#[derive(Default, Clone, Copy)]
struct Slot {
    id: usize,
    sent: u64,
    received: u64,
    expect: u64,
}

struct EchoApp {
    slots: Vec<Slot>,
    size: usize,
    sending: bool,
    t0: u64,
    t1: u64,
    latency: Histogram,
    echoed_window: u64,
    bytes_window: u64,
    foreign: u64,
    out_of_order: u64,
    msg: Vec<u8>,
}

impl EchoApp {
    fn send_one(&mut self, net: &mut Net, conn: usize) {
        let slot = &mut self.slots[conn];
        self.msg.clear();
        push_body(
            &mut self.msg,
            &[(b'E', conn as u64), (b'Q', slot.sent), (b'T', now_ns())],
            self.size,
        );
        slot.sent += 1;
        net.send_text(slot.id, &self.msg);
    }

    fn in_flight(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.sent - s.received.min(s.sent))
            .sum()
    }
}

impl App for EchoApp {
    fn on_text(&mut self, net: &mut Net, _id: usize, tag: usize, text: &[u8], now: u64) {
        let Some([conn, seq, ts]) = parse_body(text, [b'E', b'Q', b'T']) else {
            self.foreign += 1;
            return;
        };
        if conn as usize != tag {
            self.foreign += 1;
            return;
        }
        let slot = &mut self.slots[tag];
        slot.received += 1;
        if seq == slot.expect {
            slot.expect += 1;
        } else {
            self.out_of_order += 1;
            slot.expect = slot.expect.max(seq + 1);
        }
        if now >= self.t0 && now < self.t1 {
            self.echoed_window += 1;
            self.bytes_window += text.len() as u64;
        }
        if ts >= self.t0 && ts < self.t1 {
            self.latency.record(now.saturating_sub(ts));
        }
        if self.sending {
            self.send_one(net, tag);
        }
    }
}

pub fn run(c: &Common, o: &Opts) -> Result<Outcome, String> {
    if o.conns == 0 || o.window == 0 || o.size == 0 || !crate::positive(o.duration) {
        return Err("--conns, --window, --size and --duration must be positive".into());
    }
    if !crate::non_negative(o.warmup) {
        return Err("--warmup must not be negative".into());
    }
    c.check_fds(o.conns)?;
    let io = |e: std::io::Error| format!("event loop: {e}");
    let mut app = EchoApp {
        slots: vec![Slot::default(); o.conns],
        size: o.size,
        sending: false,
        t0: u64::MAX,
        t1: u64::MAX,
        latency: Histogram::new(),
        echoed_window: 0,
        bytes_window: 0,
        foreign: 0,
        out_of_order: 0,
        msg: Vec::with_capacity(o.size + 32),
    };
    let mut net = Net::new(c.target.clone()).map_err(io)?;
    let names: Vec<String> = (0..o.conns).map(|i| format!("{}e{i}", c.prefix)).collect();
    let (ids, _) = open_every(&mut net, &mut app, &names, c)?;
    for (slot, &id) in app.slots.iter_mut().zip(&ids) {
        slot.id = id;
    }
    settle(&mut net, &mut app, 0.1).map_err(io)?;
    let foreign_before = app.foreign;
    let before = net.stats.clone();

    let w = Window::starting_now(o.warmup, o.duration);
    app.t0 = w.t0;
    app.t1 = w.t1;
    app.sending = true;
    for conn in 0..o.conns {
        for _ in 0..o.window {
            app.send_one(&mut net, conn);
        }
    }
    let cpu = run_window(&mut net, &mut app, c, w, |_, _| {})?;
    app.sending = false;
    drain(&mut net, &mut app, c, EchoApp::in_flight)?;
    let during = net.stats.clone();
    close_all(&mut net, &mut app).map_err(io)?;

    let per_s = app.echoed_window as f64 / o.duration;
    let mb_s = app.bytes_window as f64 / o.duration / 1e6;
    let lost = app.in_flight();
    let mut r = Report::new(
        "echo",
        format!(
            "wschat-bench echo: {} connections, window {}, {} B messages, {}s window after {}s warmup, {}",
            o.conns, o.window, o.size, o.duration, o.warmup, c.url
        ),
    );
    r.val("conns", o.conns);
    r.val("window", o.window);
    r.val("size", o.size);
    r.val("duration_s", o.duration);
    r.row(
        "echoed",
        format!("{per_s:.0} msg/s, {mb_s:.1} MB/s of payload each way"),
    );
    r.val("echoed_per_s", round1(per_s));
    r.val("mb_per_s", round1(mb_s * 10.0) / 10.0);
    r.latency("latency", "round trip (µs)", &app.latency);
    let sent: u64 = app.slots.iter().map(|s| s.sent).sum();
    r.row(
        "messages",
        format!(
            "{sent} sent, {lost} unanswered, {} out of order, {} not ours",
            app.out_of_order, app.foreign
        ),
    );
    r.val("sent", sent);
    r.val("lost", lost);
    r.val("out_of_order", app.out_of_order);
    r.val("foreign", app.foreign);
    if foreign_before > 0 {
        r.warn(format!(
            "{foreign_before} messages arrived before any was sent: is the server in --echo mode?"
        ));
    }
    r.cpu(&cpu, Some((per_s, "message")));
    r.net(&net.stats);
    let ended_early = (during.closed_by_server - before.closed_by_server)
        + (during.eofs - before.eofs)
        + (during.io_errors - before.io_errors)
        + during.protocol_errors;
    let errors = lost + app.out_of_order + app.foreign + ended_early;
    Ok(Outcome { report: r, errors })
}
