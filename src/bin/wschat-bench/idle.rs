//! `idle`: open C named connections, read the server's RSS before and after,
//! hold them (answering pings), close them all with a close handshake.

use std::time::Duration;

use crate::net::{App, Net};
use crate::os::{now_ns, proc_rss_kib, CpuMark};
use crate::phases::settle;
use crate::report::{round1, Report, TypeCounts};
use crate::scan::field;
use crate::{Common, Outcome};

pub struct Opts {
    pub conns: usize,
    pub hold: f64,
    pub settle: f64,
}

#[derive(Default)]
struct IdleApp {
    types: TypeCounts,
}

impl App for IdleApp {
    fn on_text(&mut self, _net: &mut Net, _id: usize, _tag: usize, text: &[u8], _now: u64) {
        self.types.add(field(text, "type").unwrap_or(b"(no type)"));
    }
}

pub fn run(c: &Common, o: &Opts) -> Result<Outcome, String> {
    let pid = c.pid.ok_or("idle needs --pid SERVER_PID")?;
    if o.conns == 0 || !crate::non_negative(o.hold) || !crate::non_negative(o.settle) {
        return Err("--conns must be positive, --hold and --settle not negative".into());
    }
    c.check_fds(o.conns)?;
    let io = |e: std::io::Error| format!("event loop: {e}");
    let rss_before = proc_rss_kib(pid).ok_or("cannot read the server's VmRSS")?;
    let mut app = IdleApp::default();
    let mut net = Net::new(c.target.clone()).map_err(io)?;
    let names: Vec<String> = (0..o.conns).map(|i| format!("{}i{i}", c.prefix)).collect();

    let mark0 = CpuMark::take(c.pid);
    let start = now_ns();
    let ids = net
        .open_all(&mut app, &names, c.batch, start + c.timeout_ns())
        .map_err(io)?;
    let connect_secs = (now_ns() - start) as f64 / 1e9;
    let mark1 = CpuMark::take(c.pid);
    let opened = ids.iter().filter(|i| i.is_some()).count();
    let rate = opened as f64 / connect_secs.max(1e-9);

    settle(&mut net, &mut app, o.settle).map_err(io)?;
    let rss_after = proc_rss_kib(pid).ok_or("cannot read the server's VmRSS")?;
    let still_open_settled = net.conns.len();
    let before_hold = net.stats.clone();
    settle(&mut net, &mut app, o.hold).map_err(io)?;
    let held = net.conns.len();
    let during = net.stats.clone();

    // Close everything with a close handshake.
    let close_start = now_ns();
    let ids: Vec<usize> = net.conns.iter().map(|(id, _)| id).collect();
    for &id in &ids {
        net.close(id);
    }
    let close_end = close_start + 10_000_000_000;
    while !net.conns.is_empty() && now_ns() < close_end {
        net.turn(&mut app, Duration::from_millis(10)).map_err(io)?;
    }
    let close_secs = (now_ns() - close_start) as f64 / 1e9;
    let clean = net.stats.clean_closes - during.clean_closes;
    let unfinished = net.conns.len();

    let per_conn = (rss_after as f64 - rss_before as f64) / opened.max(1) as f64;
    let cpu = mark0.until(&mark1);
    let mut r = Report::new(
        "idle",
        format!(
            "wschat-bench idle: {} connections, {} in flight, hold {}s, {}",
            o.conns, c.batch, o.hold, c.url
        ),
    );
    r.val("conns", o.conns);
    r.val("batch", c.batch);
    r.row(
        "connect",
        format!(
            "{opened} of {} open in {connect_secs:.2}s: {rate:.0} handshakes/s",
            o.conns
        ),
    );
    r.val("opened", opened);
    r.val("connect_s", (connect_secs * 1000.0).round() / 1000.0);
    r.val("handshakes_per_s", round1(rate));
    r.row(
        "server rss",
        format!(
            "{rss_before} KiB before, {rss_after} KiB after {}s settle: {per_conn:.2} KiB per connection",
            o.settle
        ),
    );
    r.val("rss_before_kib", rss_before);
    r.val("rss_after_kib", rss_after);
    r.val("kib_per_conn", (per_conn * 100.0).round() / 100.0);
    r.row(
        "hold",
        format!(
            "{still_open_settled} open after settling, {held} still open after holding {}s",
            o.hold
        ),
    );
    r.val("held", held);
    r.row(
        "close",
        format!("{clean} clean close handshakes in {close_secs:.2}s, {unfinished} unfinished"),
    );
    r.val("clean_closes", clean);
    r.val("unfinished_closes", unfinished);
    r.row("messages", app.types.text());
    r.val("types", app.types.json());
    r.row("cpu (window)", "while connecting".into());
    r.cpu(&cpu, Some((rate, "handshake")));
    r.net(&net.stats);
    let lost_early = (opened - still_open_settled) as u64
        + (during.closed_by_server - before_hold.closed_by_server)
        + (during.eofs - before_hold.eofs)
        + (during.io_errors - before_hold.io_errors);
    let errors = (o.conns - opened) as u64
        + lost_early
        + net.stats.protocol_errors
        + unfinished as u64
        + app.types.get("error");
    Ok(Outcome { report: r, errors })
}
