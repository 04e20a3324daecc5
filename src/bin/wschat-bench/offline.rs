//! `offline`: S online senders send private messages to names that never
//! connect, W in flight per sender. Each message is held on disk by the
//! server and answered with a `queued` receipt once its log record is
//! durable (one fsync per loop turn: group commit), so the receipt rate and
//! latency measure the cost of durability (compare `wschat --fsync never`).

use crate::hist::Histogram;
use crate::net::{App, Net};
use crate::os::now_ns;
use crate::phases::{close_all, connect_row, drain, open_every, run_window, settle, Window};
use crate::report::{round1, Report, TypeCounts};
use crate::scan::{field, parse_body, push_body};
use crate::{Common, Outcome};

pub struct Opts {
    pub senders: usize,
    pub window: usize,
    pub size: usize,
    pub duration: f64,
    pub warmup: f64,
    pub recipients: usize,
}

#[derive(Default, Clone, Copy)]
struct Sender {
    id: usize,
    sent: u64,
    answered: u64,
}

struct OfflineApp {
    senders: Vec<Sender>,
    recipient_names: Vec<String>,
    next_recipient: usize,
    size: usize,
    sending: bool,
    t0: u64,
    t1: u64,
    /// Send to `queued` receipt, for messages sent in the window.
    latency: Histogram,
    queued: u64,
    queued_window: u64,
    /// Server `error` replies to our messages, by code.
    refused: TypeCounts,
    refused_total: u64,
    refused_window: u64,
    /// Receipts with another status than `queued` (e.g. `delivered`: someone
    /// connected under a recipient name).
    other_receipts: TypeCounts,
    /// Replies whose `ref` is not one of ours (or is missing).
    malformed: u64,
    types: TypeCounts,
    msg: Vec<u8>,
}

impl OfflineApp {
    fn send_one(&mut self, net: &mut Net, sender: usize) {
        let s = &mut self.senders[sender];
        let ts = now_ns();
        let to = &self.recipient_names[self.next_recipient];
        self.next_recipient = (self.next_recipient + 1) % self.recipient_names.len();
        let msg = &mut self.msg;
        msg.clear();
        msg.extend_from_slice(br#"{"type":"private","to":""#);
        msg.extend_from_slice(to.as_bytes());
        msg.extend_from_slice(br#"","ref":""#);
        // The ref carries who sent it, its number and the send time (at most
        // 1 + 20 + 1 + 20 + 1 + 20 + 1 bytes: under the server's 64).
        push_body(msg, &[(b'S', sender as u64), (b'Q', s.sent), (b'T', ts)], 0);
        msg.extend_from_slice(br#"","body":""#);
        push_body(msg, &[(b'O', sender as u64), (b'Q', s.sent)], self.size);
        msg.extend_from_slice(br#""}"#);
        s.sent += 1;
        net.send_text(s.id, msg);
    }

    fn in_flight(&self) -> u64 {
        self.senders
            .iter()
            .map(|s| s.sent.saturating_sub(s.answered))
            .sum()
    }

    /// A receipt or an error for one of our messages: `Some(send time)`.
    fn answer(&mut self, tag: usize, text: &[u8]) -> Option<u64> {
        let reference = field(text, "ref")?;
        let [sender, _seq, ts] = parse_body(reference, [b'S', b'Q', b'T'])?;
        if sender as usize != tag {
            return None;
        }
        let s = &mut self.senders[tag];
        if s.answered >= s.sent {
            return None;
        }
        s.answered += 1;
        Some(ts)
    }
}

impl App for OfflineApp {
    fn on_text(&mut self, net: &mut Net, _id: usize, tag: usize, text: &[u8], now: u64) {
        let ty = field(text, "type");
        if !matches!(ty, Some(b"receipt" | b"error")) {
            self.types.add(ty.unwrap_or(b"(no type)"));
            return;
        }
        let Some(ts) = self.answer(tag, text) else {
            self.malformed += 1;
            return;
        };
        let in_window = now >= self.t0 && now < self.t1;
        if ty == Some(b"receipt") {
            let status = field(text, "status").unwrap_or(b"(none)");
            if status == b"queued" {
                self.queued += 1;
                if in_window {
                    self.queued_window += 1;
                }
                if ts >= self.t0 && ts < self.t1 {
                    self.latency.record(now.saturating_sub(ts));
                }
            } else {
                self.other_receipts.add(status);
            }
        } else {
            self.refused
                .add(field(text, "code").unwrap_or(b"(no code)"));
            self.refused_total += 1;
            if in_window {
                self.refused_window += 1;
            }
        }
        if self.sending {
            self.send_one(net, tag);
        }
    }
}

pub fn run(c: &Common, o: &Opts) -> Result<Outcome, String> {
    if o.senders == 0
        || o.window == 0
        || o.size == 0
        || o.recipients == 0
        || !crate::positive(o.duration)
        || !crate::non_negative(o.warmup)
    {
        return Err(
            "--senders, --window, --size, --recipients and --duration must be positive".into(),
        );
    }
    c.check_fds(o.senders)?;
    let io = |e: std::io::Error| format!("event loop: {e}");
    let recipient_names: Vec<String> = (0..o.recipients)
        .map(|k| format!("{}off{k}", c.prefix))
        .collect();
    let mut app = OfflineApp {
        senders: vec![Sender::default(); o.senders],
        recipient_names,
        next_recipient: 0,
        size: o.size,
        sending: false,
        t0: u64::MAX,
        t1: u64::MAX,
        latency: Histogram::new(),
        queued: 0,
        queued_window: 0,
        refused: TypeCounts::default(),
        refused_total: 0,
        refused_window: 0,
        other_receipts: TypeCounts::default(),
        malformed: 0,
        types: TypeCounts::default(),
        msg: Vec::with_capacity(o.size + 192),
    };
    let mut net = Net::new(c.target.clone()).map_err(io)?;
    let names: Vec<String> = (0..o.senders)
        .map(|i| format!("{}o{i}", c.prefix))
        .collect();
    let (ids, connect_secs) = open_every(&mut net, &mut app, &names, c)?;
    for (s, &id) in app.senders.iter_mut().zip(&ids) {
        s.id = id;
    }
    settle(&mut net, &mut app, 0.2).map_err(io)?;
    let before = net.stats.clone();

    let w = Window::starting_now(o.warmup, o.duration);
    app.t0 = w.t0;
    app.t1 = w.t1;
    app.sending = true;
    for sender in 0..o.senders {
        for _ in 0..o.window {
            app.send_one(&mut net, sender);
        }
    }
    let cpu = run_window(&mut net, &mut app, c, w, |_, _| {})?;
    app.sending = false;
    drain(&mut net, &mut app, c, OfflineApp::in_flight)?;
    let during = net.stats.clone();
    close_all(&mut net, &mut app).map_err(io)?;

    let per_s = app.queued_window as f64 / o.duration;
    let sent: u64 = app.senders.iter().map(|s| s.sent).sum();
    let unanswered = app.in_flight();
    let mut r = Report::new(
        "offline",
        format!(
            "wschat-bench offline: {} senders, window {}, {} B bodies to {} offline names, {}s window after {}s warmup, {}",
            o.senders, o.window, o.size, o.recipients, o.duration, o.warmup, c.url
        ),
    );
    r.val("senders", o.senders);
    r.val("window", o.window);
    r.val("size", o.size);
    r.val("recipients", o.recipients);
    r.val("duration_s", o.duration);
    connect_row(&mut r, names.len(), connect_secs);
    r.row("queued", format!("{per_s:.0} receipts/s in the window"));
    r.val("queued_per_s", round1(per_s));
    r.val("queued_in_window", app.queued_window);
    r.latency("latency", "send to queued receipt (µs)", &app.latency);
    r.row(
        "messages",
        format!(
            "{sent} sent, {} queued, {} refused, {unanswered} unanswered, {} malformed replies",
            app.queued, app.refused_total, app.malformed
        ),
    );
    r.row("refused", app.refused.text());
    r.val("sent", sent);
    r.val("queued", app.queued);
    r.val("refused", app.refused_total);
    r.val("refused_in_window", app.refused_window);
    r.val("refused_by_code", app.refused.json());
    r.val("offline_queue_full", app.refused.get("offline_queue_full"));
    r.val("unanswered", unanswered);
    r.val("malformed", app.malformed);
    r.row("other receipts", app.other_receipts.text());
    r.val("other_receipts", app.other_receipts.json());
    r.row("other messages", app.types.text());
    r.val("other_types", app.types.json());
    let full = app.refused.get("offline_queue_full");
    if full > 0 {
        r.warn(format!(
            "{full} messages refused with offline_queue_full: start the server with larger --offline-max-per-user / --offline-max-bytes"
        ));
    }
    let other_refusals = app.refused_total - full;
    if other_refusals > 0 {
        r.warn(format!(
            "{other_refusals} messages refused for other reasons: {}",
            app.refused.text()
        ));
    }
    // Every message of the window refused: no figure was measured.
    let all_refused = sent > 0 && app.queued_window == 0;
    if all_refused {
        r.warn("no message was queued in the measured window".into());
    }
    r.cpu(&cpu, Some((per_s, "message")));
    r.net(&net.stats);
    let ended_early = (during.closed_by_server - before.closed_by_server)
        + (during.eofs - before.eofs)
        + (during.io_errors - before.io_errors)
        + during.protocol_errors;
    // offline_queue_full is reported, not an error, unless nothing was queued
    // in the window;
    // any other refusal means this generator sent something wrong.
    let errors = unanswered
        + app.malformed
        + other_refusals
        + app.other_receipts.total()
        + ended_early
        + if all_refused {
            app.refused_window.max(1)
        } else {
            0
        };
    Ok(Outcome { report: r, errors })
}
