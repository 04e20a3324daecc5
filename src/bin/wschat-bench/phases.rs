//! The phases every measured run goes through, whatever its traffic:
//! connect everyone, let the welcome and presence events settle, warm up,
//! measure a window (with the server's CPU use over exactly that window),
//! drain what is in flight, and close with a close handshake.

use std::time::Duration;

use crate::hist::Histogram;
use crate::net::{App, Net};
use crate::os::{now_ns, CpuMark, CpuUse};
use crate::report::Report;
use crate::Common;

fn io(e: std::io::Error) -> String {
    format!("event loop: {e}")
}

/// Opens one connection per name (tag = position); fails unless all open.
/// Returns their ids, in name order, and how long connecting took.
pub fn open_every(
    net: &mut Net,
    app: &mut impl App,
    names: &[String],
    c: &Common,
) -> Result<(Vec<usize>, f64), String> {
    let start = now_ns();
    let ids = net
        .open_all(app, names, c.batch, start + c.timeout_ns())
        .map_err(io)?;
    let secs = (now_ns() - start) as f64 / 1e9;
    let opened: Vec<usize> = ids.iter().flatten().copied().collect();
    if opened.len() < names.len() {
        return Err(format!(
            "only {} of {} connections opened: {}",
            opened.len(),
            names.len(),
            net.stats.failures.join("; ")
        ));
    }
    Ok((opened, secs))
}

/// The report's `connect` row.
pub fn connect_row(r: &mut Report, connections: usize, secs: f64) {
    r.row(
        "connect",
        format!(
            "{connections} connections in {secs:.2}s ({:.0} handshakes/s)",
            connections as f64 / secs.max(1e-9)
        ),
    );
}

/// When a run starts, and its measured window (ns, `now_ns` clock).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: u64,
    pub t0: u64,
    pub t1: u64,
}

impl Window {
    /// Starts now: `warmup` seconds, then `duration` seconds measured.
    pub fn starting_now(warmup: f64, duration: f64) -> Window {
        let start = now_ns();
        let t0 = start + (warmup * 1e9) as u64;
        Window {
            start,
            t0,
            t1: t0 + (duration * 1e9) as u64,
        }
    }

    /// The open-loop schedule: send `k` is due at `start + k × interval`, and
    /// latency is taken from that time, so a late sender hides nothing.
    /// Returns the time once it has come (recording in `lag` how late it is
    /// going out, inside the measured part); `None` past the window, or after
    /// asking `net` to wake when it comes.
    pub fn due(&self, k: u64, interval: f64, net: &mut Net, lag: &mut Histogram) -> Option<u64> {
        let at = self.start + (k as f64 * interval) as u64;
        if at >= self.t1 {
            return None;
        }
        let now = now_ns();
        if at > now {
            net.wake_at(at);
            return None;
        }
        if at >= self.t0 {
            lag.record(now - at);
        }
        Some(at)
    }
}

/// Runs the loop through warm-up and the window. `each_turn` runs before
/// every wait (an open-loop sender sends what is due there). Returns the
/// server's CPU use over the window.
pub fn run_window<A: App>(
    net: &mut Net,
    app: &mut A,
    c: &Common,
    w: Window,
    mut each_turn: impl FnMut(&mut Net, &mut A),
) -> Result<CpuUse, String> {
    let mut mark0 = None;
    let mark1 = loop {
        let now = now_ns();
        if mark0.is_none() && now >= w.t0 {
            mark0 = Some(CpuMark::take(c.pid));
        }
        if now >= w.t1 {
            break CpuMark::take(c.pid);
        }
        each_turn(net, app);
        let next = if now < w.t0 { w.t0 } else { w.t1 };
        let wait = Duration::from_nanos(next - now).min(Duration::from_millis(50));
        net.turn(app, wait).map_err(io)?;
    };
    Ok(mark0.unwrap_or(mark1).until(&mark1))
}

/// Lets replies still in flight arrive, for at most the drain time.
pub fn drain<A: App>(
    net: &mut Net,
    app: &mut A,
    c: &Common,
    in_flight: impl Fn(&A) -> u64,
) -> Result<(), String> {
    let end = now_ns() + c.drain_ns();
    while in_flight(app) > 0 && now_ns() < end && !net.conns.is_empty() {
        net.turn(app, Duration::from_millis(10)).map_err(io)?;
    }
    Ok(())
}

/// Runs the loop for `secs` seconds.
pub fn settle(net: &mut Net, app: &mut impl App, secs: f64) -> std::io::Result<()> {
    let end = now_ns() + (secs * 1e9) as u64;
    loop {
        let now = now_ns();
        if now >= end {
            return Ok(());
        }
        net.turn(
            app,
            Duration::from_nanos(end - now).min(Duration::from_millis(50)),
        )?;
    }
}

/// Closes every connection with a close handshake (bounded: 5 s).
pub fn close_all(net: &mut Net, app: &mut impl App) -> std::io::Result<()> {
    let ids: Vec<usize> = net.conns.iter().map(|(id, _)| id).collect();
    for id in ids {
        net.close(id);
    }
    let end = now_ns() + 5_000_000_000;
    while !net.conns.is_empty() && now_ns() < end {
        net.turn(app, Duration::from_millis(10))?;
    }
    Ok(())
}
