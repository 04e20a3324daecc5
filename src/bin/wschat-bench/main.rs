//! wschat-bench: a load generator for wschat (and any server speaking its
//! protocol). One thread, one mio event loop, loopback targets only; every
//! run is bounded in time and stops by itself.

mod echo;
mod fanout;
mod hist;
mod idle;
mod net;
mod offline;
mod os;
mod phases;
mod private;
mod public;
mod report;
mod scan;

use std::process::ExitCode;
use std::str::FromStr;

use net::Target;
use report::Report;

const HELP: &str = "\
wschat-bench: a load generator for the wschat protocol (loopback targets only)

USAGE:
  wschat-bench private --url URL [options]   pairs s<i> -> r<i> of private messages
  wschat-bench fanout  --url URL [options]   one publisher, N receivers of public messages
  wschat-bench idle    --url URL --pid PID [options]   memory per idle connection
  wschat-bench echo    --url URL [options]   raw engine throughput against `wschat --echo`
  wschat-bench offline --url URL [options]   private messages to offline names: queued
                                             receipts/s, the cost of durability
  wschat-bench SUBCOMMAND --help             the options of one subcommand

Each run prints a table; with --json the last line is one JSON object.
Exit status: 0 ok, 1 protocol errors counted, 2 usage or setup error.

All its connections come from one address and send far faster than a person: run the
server under test with --rate-limit 0 --max-connections-per-ip 0
--max-handshakes-per-ip 0, or its limits are what gets measured (rate_limited errors,
429s at connect).
";

const COMMON: &str = "
COMMON OPTIONS:
  --url URL        ws://HOST:PORT/PATH, HOST a loopback address (127.0.0.0/8, ::1,
                   localhost); ?username=NAME is appended for each connection
  --pid PID        the server's process id: its CPU use (/proc/PID/stat) is reported
  --prefix P       username prefix, so runs do not clash [default: random, 3 letters]
  --batch B        handshakes in flight while connecting [default: 64]
  --drain S        seconds to wait for in-flight messages after the window [default: 3]
  --timeout S      seconds allowed for connecting [default: 60]
  --json           print one JSON object as the last line
  -h, --help       this text

The loadgen's own CPU (getrusage, user+sys over the window, % of one core) is always
reported; at 95 % or more it prints LOADGEN SATURATED: its figures are then its own
limit. Pin it and the server to different cores (taskset -c) for stable numbers.
";

const HELP_PRIVATE: &str = "\
wschat-bench private: private messages between P pairs s<i> -> r<i> (2P connections)

USAGE: wschat-bench private --url URL [options]

  --pairs P        sender/receiver pairs [default: 50]
  --window W       closed loop: messages in flight per sender; a new one is sent
                   when its receiver gets one [default: 16]
  --rate R         open loop instead: R msgs/s in total, message k scheduled at
                   t0 + k/R on sender k mod P; latency counts from the scheduled
                   time (no coordinated omission) and the send lag is reported
  --size BYTES     body size: P<pair>Q<seq>T<ns>X padded with x [default: 64]
  --duration S     measured window in seconds [default: 10]
  --warmup S       seconds of load before the window [default: 1]
  --public-rate R  under a flood: one more connection <prefix>pub sends R public
                   messages/s (open loop, scheduled like --rate), which every
                   sender and receiver gets too
  --public-size BYTES
                   public body size: K<seq>T<ns>X padded with x [default: 4096]
  --receiver-url URL
                   receivers connect here instead: another node of a wschat
                   --cluster, so every message crosses nodes through Redis
  --receiver-pid PID, --redis-pid PID
                   report that process's CPU over the run (warm-up included),
                   in % of a core and µs per message sent

Reports delivered msgs/s in the window; latency p50/p90/p99/p99.9/max in µs from the
send time in the body to arrival; lost, misrouted, out-of-order and malformed counts
(all of them errors, as are server `error` messages and connections lost mid-run).
Other message types (welcome, receipt, join, leave, ...) are counted and ignored.
With --public-rate, public messages are counted apart and never enter the private
latency: deliveries to receivers and to senders, their latency from the scheduled
time, missing deliveries, and `gap` events with the number they report dropped
(shed by the server: not errors); misrouted, out-of-order or malformed public
messages are errors.
";

const HELP_FANOUT: &str = "\
wschat-bench fanout: one publisher sends public messages to N idle receivers

USAGE: wschat-bench fanout --url URL [options]

  --receivers N    idle receivers [default: 1000]
  --rate R         public messages per second from the publisher [default: 200]
  --size BYTES     body size: K<seq>T<ns>X padded with x [default: 64]
  --duration S     measured window in seconds [default: 10]
  --warmup S       seconds of load before the window [default: 1]

Reports deliveries/s; per message, the time from its scheduled send until the LAST
receiver had it (p50/p90/p99/max); per-delivery latency; missing deliveries (reported,
and explained by `gap` events if the server shed load; not counted as errors) and
misrouted/duplicated/out-of-order deliveries (errors).
";

const HELP_IDLE: &str = "\
wschat-bench idle: the server's memory per idle connection

USAGE: wschat-bench idle --url URL --pid SERVER_PID [options]

  --conns C        connections to open [default: 10000]
  --batch B        handshakes in flight [default: 64]
  --hold S         seconds to hold them open, answering pings [default: 5]
  --settle S       seconds between connecting and the second RSS reading [default: 2]

Reads the server's VmRSS (/proc/PID/status) before connecting and after the settle
time: (after - before) / C is reported as KiB per connection. Reports handshakes/s
while connecting, then closes every connection with a close handshake. The open-file
soft limit is raised to the hard limit; C must be at most that limit - 64.
";

const HELP_OFFLINE: &str = "\
wschat-bench offline: private messages to users who are never online (held on disk)

USAGE: wschat-bench offline --url URL [options]

  --senders S      online senders <prefix>o<i> [default: 10]
  --window W       messages in flight per sender; a new one is sent when the
                   server answers one [default: 16]
  --recipients N   offline names <prefix>off<k> the messages go to, round robin;
                   nobody ever connects under them, so run wschat with
                   --offline-to-unknown [default: 100]
  --size BYTES     body size: O<sender>Q<seq>X padded with x [default: 64]
  --duration S     measured window in seconds [default: 5]
  --warmup S       seconds of load before the window [default: 1]

A message is answered by a `queued` receipt, sent once its record is in the server's
outbox log (and, with `wschat --fsync always`, synced: one fsync per loop turn for
all of that turn's messages), or by an `error`. Reports queued receipts/s in the
window and the latency from send to receipt (p50/p90/p99/p99.9/max, µs); refusals
by code. offline_queue_full refusals are reported but are not errors unless nothing
was queued in the window; other refusals, unanswered messages and dropped
connections are errors.

The server's defaults hold at most 1000 messages per recipient and 64 MiB in all:
start it with room, and a fresh data directory, e.g.
  wschat --data-dir /tmp/wschat-offline --offline-max-per-user 100000000 \\
         --offline-max-bytes 4294967296 [--fsync never]
";

const HELP_ECHO: &str = "\
wschat-bench echo: raw WebSocket throughput against `wschat --echo`

USAGE: wschat-bench echo --url URL [options]

  --conns C        connections [default: 10]
  --window W       text messages in flight per connection [default: 16]
  --size BYTES     message size: E<conn>Q<seq>T<ns>X padded with x [default: 64]
  --duration S     measured window in seconds [default: 10]
  --warmup S       seconds of load before the window [default: 1]

Reports echoed messages/s, MB/s of payload echoed, and round-trip latency.
";

/// Options every subcommand takes.
pub struct Common {
    pub url: String,
    pub target: Target,
    pub pid: Option<u32>,
    pub prefix: String,
    pub batch: usize,
    pub drain: f64,
    pub timeout: f64,
    pub fd_limit: usize,
}

impl Common {
    pub fn drain_ns(&self) -> u64 {
        (self.drain * 1e9) as u64
    }

    pub fn timeout_ns(&self) -> u64 {
        (self.timeout * 1e9) as u64
    }

    /// Refuses more connections than the open-file limit allows.
    pub fn check_fds(&self, conns: usize) -> Result<(), String> {
        let room = self.fd_limit.saturating_sub(64);
        if conns > room {
            return Err(format!(
                "{conns} connections need more descriptors than the open-file limit allows ({} - 64 = {room}); raise it with ulimit -n",
                self.fd_limit
            ));
        }
        Ok(())
    }
}

/// A finite number above zero.
pub fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// A finite number, zero or more.
pub fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

pub struct Outcome {
    pub report: Report,
    pub errors: u64,
}

/// `--name value`, `--name=value` and the flags `--json`, `--help`.
struct Args {
    options: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse(list: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut options = Vec::new();
        let mut list = list.peekable();
        while let Some(arg) = list.next() {
            let name = match arg.as_str() {
                "-h" => "help".to_string(),
                a => a
                    .strip_prefix("--")
                    .ok_or_else(|| format!("unexpected argument {a:?}"))?
                    .to_string(),
            };
            if let Some((n, v)) = name.split_once('=') {
                options.push((n.to_string(), Some(v.to_string())));
            } else if name == "help" || name == "json" {
                options.push((name, None));
            } else {
                let value = list
                    .next()
                    .ok_or_else(|| format!("--{name} needs a value"))?;
                options.push((name, Some(value)));
            }
        }
        Ok(Args { options })
    }

    fn flag(&mut self, name: &str) -> bool {
        let before = self.options.len();
        self.options.retain(|(n, _)| n != name);
        self.options.len() != before
    }

    fn text(&mut self, name: &str) -> Result<Option<String>, String> {
        let Some(i) = self.options.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        match self.options.remove(i).1 {
            Some(v) => Ok(Some(v)),
            None => Err(format!("--{name} needs a value")),
        }
    }

    fn num<T: FromStr>(&mut self, name: &str, default: T) -> Result<T, String> {
        Ok(self.opt(name)?.unwrap_or(default))
    }

    fn opt<T: FromStr>(&mut self, name: &str) -> Result<Option<T>, String> {
        match self.text(name)? {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("--{name}: cannot use {v:?}")),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.options.first() {
            None => Ok(()),
            Some((name, _)) => Err(format!("unknown option --{name}")),
        }
    }
}

fn common(args: &mut Args) -> Result<Common, String> {
    let url = args.text("url")?.ok_or("--url is required")?;
    let target = Target::parse(&url)?;
    let prefix = match args.text("prefix")? {
        Some(p) => {
            if !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err("--prefix: letters, digits, _ and - only".into());
            }
            p
        }
        None => {
            let mut rng = os::Rng::seeded();
            (0..3)
                .map(|_| (b'a' + (rng.next_u64() % 26) as u8) as char)
                .collect()
        }
    };
    if prefix.len() > 20 {
        return Err("--prefix: at most 20 characters".into());
    }
    let c = Common {
        url,
        target,
        pid: args.opt("pid")?,
        prefix,
        batch: args.num("batch", 64)?,
        drain: args.num("drain", 3.0)?,
        timeout: args.num("timeout", 60.0)?,
        fd_limit: os::raise_fd_limit(),
    };
    if let Some(pid) = c.pid {
        if os::proc_cpu_ns(pid).is_none() {
            return Err(format!(
                "--pid {pid}: no such process (cannot read /proc/{pid}/stat)"
            ));
        }
    }
    if c.batch == 0 || !crate::non_negative(c.drain) || !crate::positive(c.timeout) {
        return Err("--batch and --timeout must be positive, --drain not negative".into());
    }
    Ok(c)
}

fn private_opts(args: &mut Args) -> Result<private::Opts, String> {
    let public_rate = args.opt("public-rate")?;
    let public_size = args.opt("public-size")?;
    if public_size.is_some() && public_rate.is_none() {
        return Err("--public-size needs --public-rate".into());
    }
    let receiver_target = args
        .text("receiver-url")?
        .map(|url| net::Target::parse(&url))
        .transpose()?;
    let mut watch = Vec::new();
    if let Some(pid) = args.opt::<u32>("receiver-pid")? {
        watch.push(private::Watched {
            label: "receiver node cpu",
            key: "receiver",
            pid,
        });
    }
    if let Some(pid) = args.opt::<u32>("redis-pid")? {
        watch.push(private::Watched {
            label: "redis cpu",
            key: "redis",
            pid,
        });
    }
    for w in &watch {
        if os::proc_cpu_ns(w.pid).is_none() {
            return Err(format!("{}: no process {}", w.label, w.pid));
        }
    }
    Ok(private::Opts {
        receiver_target,
        watch,
        pairs: args.num("pairs", 50)?,
        window: args.num("window", 16)?,
        size: args.num("size", 64)?,
        duration: args.num("duration", 10.0)?,
        warmup: args.num("warmup", 1.0)?,
        rate: args.opt("rate")?,
        public_rate,
        public_size: public_size.unwrap_or(4096),
    })
}

fn run(mut argv: impl Iterator<Item = String>) -> Result<(Outcome, bool), (String, u8)> {
    let usage = |e: String| (e, 2u8);
    let Some(sub) = argv.next() else {
        print!("{HELP}{COMMON}");
        return Err((String::new(), 2));
    };
    let mut args = Args::parse(argv).map_err(usage)?;
    let help = match sub.as_str() {
        "private" => HELP_PRIVATE,
        "fanout" => HELP_FANOUT,
        "idle" => HELP_IDLE,
        "echo" => HELP_ECHO,
        "offline" => HELP_OFFLINE,
        "-h" | "--help" | "help" => {
            print!("{HELP}{COMMON}");
            return Err((String::new(), 0));
        }
        other => return Err(usage(format!("unknown subcommand {other:?}"))),
    };
    if args.flag("help") {
        print!("{help}{COMMON}");
        return Err((String::new(), 0));
    }
    let json = args.flag("json");
    let c = common(&mut args).map_err(usage)?;
    let outcome = match sub.as_str() {
        "private" => {
            let o = private_opts(&mut args).map_err(usage)?;
            args.finish().map_err(usage)?;
            private::run(&c, &o)
        }
        "fanout" => {
            let o = fanout::Opts {
                receivers: args.num("receivers", 1000).map_err(usage)?,
                rate: args.num("rate", 200.0).map_err(usage)?,
                size: args.num("size", 64).map_err(usage)?,
                duration: args.num("duration", 10.0).map_err(usage)?,
                warmup: args.num("warmup", 1.0).map_err(usage)?,
            };
            args.finish().map_err(usage)?;
            fanout::run(&c, &o)
        }
        "idle" => {
            let o = idle::Opts {
                conns: args.num("conns", 10_000).map_err(usage)?,
                hold: args.num("hold", 5.0).map_err(usage)?,
                settle: args.num("settle", 2.0).map_err(usage)?,
            };
            args.finish().map_err(usage)?;
            idle::run(&c, &o)
        }
        "offline" => {
            let o = offline::Opts {
                senders: args.num("senders", 10).map_err(usage)?,
                window: args.num("window", 16).map_err(usage)?,
                size: args.num("size", 64).map_err(usage)?,
                duration: args.num("duration", 5.0).map_err(usage)?,
                warmup: args.num("warmup", 1.0).map_err(usage)?,
                recipients: args.num("recipients", 100).map_err(usage)?,
            };
            args.finish().map_err(usage)?;
            offline::run(&c, &o)
        }
        _ => {
            let o = echo::Opts {
                conns: args.num("conns", 10).map_err(usage)?,
                window: args.num("window", 16).map_err(usage)?,
                size: args.num("size", 64).map_err(usage)?,
                duration: args.num("duration", 10.0).map_err(usage)?,
                warmup: args.num("warmup", 1.0).map_err(usage)?,
            };
            args.finish().map_err(usage)?;
            echo::run(&c, &o)
        }
    };
    outcome
        .map(|o| (o, json))
        .map_err(|e| (format!("setup: {e}"), 2))
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1)) {
        Ok((outcome, json)) => {
            outcome.report.print(json, outcome.errors);
            ExitCode::from(u8::from(outcome.errors > 0))
        }
        Err((message, code)) => {
            if !message.is_empty() {
                if message.starts_with("setup: ") {
                    eprintln!("wschat-bench: {message}");
                } else {
                    eprintln!("wschat-bench: {message} (see --help)");
                }
            }
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Args {
        Args::parse(line.split_whitespace().map(String::from)).unwrap()
    }

    #[test]
    fn private_options() {
        let mut a = args("--pairs 10 --rate 1000 --public-rate 2000");
        let o = private_opts(&mut a).unwrap();
        assert!(a.finish().is_ok());
        assert_eq!((o.pairs, o.window, o.size), (10, 16, 64));
        assert_eq!((o.rate, o.public_rate), (Some(1000.0), Some(2000.0)));
        assert_eq!(o.public_size, 4096);

        let o = private_opts(&mut args("--public-rate=5 --public-size 100")).unwrap();
        assert_eq!((o.public_rate, o.public_size), (Some(5.0), 100));

        let o = private_opts(&mut args("")).unwrap();
        assert_eq!((o.rate, o.public_rate), (None, None));

        assert!(private_opts(&mut args("--public-size 100")).is_err());
        assert!(private_opts(&mut args("--public-rate fast")).is_err());
        let mut a = args("--public-rate 1 --public-sizes 2");
        private_opts(&mut a).unwrap();
        assert!(a.finish().is_err(), "a misspelt option is refused");
    }
}
