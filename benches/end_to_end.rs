//! End-to-end figures: the real server against `wschat-bench`, over loopback.
//!
//! `cargo bench --bench end_to_end` starts `wschat` pinned to core 0 and the
//! load generator pinned to core 1 (when `taskset` exists and there are two
//! cores), runs every scenario below with `--json`, prints one table, and
//! writes `<target>/bench/results.json` and `<target>/bench/latency.svg`
//! (private-message latency percentiles against the offered rate).
//!
//! Scenarios: private closed loop (50 pairs × window 16); private open loop at
//! 1000, 5000, 20000 and 50000 msgs/s; fanout to 1000 receivers at 200/s;
//! 10000 idle connections (on a fresh server, for KiB per connection); echo
//! (`wschat --echo`); offline messages with `--fsync always` and `never`.
//! With the defaults the whole run takes about 90 s.
//!
//! Knobs (environment):
//!   E2E_DURATION=S      measured seconds per scenario [5]
//!   E2E_WARMUP=S        warmup seconds per scenario [1]
//!   E2E_CONNS=N         idle connections [10000]
//!   E2E_RATES=a,b,...   open-loop rates, msgs/s [1000,5000,20000,50000]
//!   E2E_PAIRS=P         private pairs [50]
//!   E2E_RECEIVERS=N     fanout receivers [1000]
//!   E2E_ONLY=a,b        only these groups: private, open, fanout, idle, echo, offline
//!   E2E_PUBLISH=1       also copy the SVG to docs/latency.svg
//!   E2E_REPLOT=FILE     only redraw the SVG from a saved results.json
//!
//! Without `--bench` on the command line (`cargo test --all-targets`) it
//! does nothing: it needs release builds and two quiet cores.

#[path = "../tests/support/spawn.rs"]
mod spawn;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use plotters::coord::CoordTranslate;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{json, Value};
use spawn::{AfterListening, Spawned};

const SERVER: &str = env!("CARGO_BIN_EXE_wschat");
const BENCH: &str = env!("CARGO_BIN_EXE_wschat-bench");

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("end_to_end: skipped (run it with `cargo bench --bench end_to_end`)");
        return;
    }
    let started = Instant::now();
    let target_dir = Path::new(SERVER)
        .parent()
        .and_then(Path::parent)
        .expect("the binaries live in <target>/<profile>/")
        .to_path_buf();
    let out_dir = target_dir.join("bench");
    if let Ok(file) = std::env::var("E2E_REPLOT") {
        replot(Path::new(&file), &out_dir);
        return;
    }
    let knobs = Knobs::from_env();
    let machine = Machine::probe();
    std::fs::create_dir_all(&out_dir).expect("create <target>/bench");
    let scratch = Scratch::new();
    eprintln!(
        "end_to_end: {} cores ({}), {}; server {SERVER}",
        machine.nproc,
        machine.model,
        if machine.pinned {
            "server on core 0, load generator on core 1"
        } else {
            "not pinned (needs taskset and 2 cores)"
        }
    );

    let mut runs: Vec<Run> = Vec::new();
    let mut table = Table::default();
    let d = knobs.duration;
    let w = knobs.warmup;
    let dur = format!("{d}");
    let warm = format!("{w}");

    // One chat server for private and fanout.
    if knobs.wants("private") || knobs.wants("open") || knobs.wants("fanout") {
        let server = Server::start(&machine, &scratch, "chat", &[]);
        if knobs.wants("private") {
            let pairs = knobs.pairs.to_string();
            let run = server.bench(
                &machine,
                "private closed loop",
                &[
                    "private",
                    "--pairs",
                    &pairs,
                    "--window",
                    "16",
                    "--duration",
                    &dur,
                    "--warmup",
                    &warm,
                ],
            );
            let name = format!("private closed loop ({} pairs × 16)", knobs.pairs);
            table.num(&name, "throughput", &run, "delivered_per_s", "msgs/s");
            table.latency(&name, &run, "latency", &["p50", "p99", "max"]);
            table.num(&name, "server cpu", &run, "server_cpu_pct", "% core");
            runs.push(run);
        }
        if knobs.wants("open") {
            for &rate in &knobs.rates {
                let pairs = knobs.pairs.to_string();
                let r = rate.to_string();
                let mut run = server.bench(
                    &machine,
                    &format!("private open loop {rate}/s"),
                    &[
                        "private",
                        "--pairs",
                        &pairs,
                        "--rate",
                        &r,
                        "--duration",
                        &dur,
                        "--warmup",
                        &warm,
                    ],
                );
                run.rate = Some(rate);
                let name = format!("private open loop {rate}/s");
                table.latency(&name, &run, "latency", &["p50", "p90", "p99", "p99.9"]);
                table.num(&name, "delivered", &run, "delivered_per_s", "msgs/s");
                table.num(&name, "server cpu", &run, "server_cpu_pct", "% core");
                runs.push(run);
            }
        }
        if knobs.wants("fanout") {
            let receivers = knobs.receivers.to_string();
            let run = server.bench(
                &machine,
                "fanout",
                &[
                    "fanout",
                    "--receivers",
                    &receivers,
                    "--rate",
                    "200",
                    "--duration",
                    &dur,
                    "--warmup",
                    &warm,
                ],
            );
            let name = format!("fanout 1 → {} at 200/s", knobs.receivers);
            table.num(&name, "deliveries", &run, "deliveries_per_s", "/s");
            table.latency(&name, &run, "last_receiver", &["p50", "p99"]);
            table.num(&name, "server cpu", &run, "server_cpu_pct", "% core");
            runs.push(run);
        }
    }

    if knobs.wants("idle") {
        let server = Server::start(&machine, &scratch, "idle", &[]);
        let conns = knobs.conns.to_string();
        let run = server.bench(
            &machine,
            "idle",
            &[
                "idle",
                "--conns",
                &conns,
                "--hold",
                "1",
                "--settle",
                "2",
                "--timeout",
                "60",
            ],
        );
        let name = format!("idle {} connections", knobs.conns);
        table.num(&name, "memory", &run, "kib_per_conn", "KiB/conn");
        table.num(&name, "handshakes", &run, "handshakes_per_s", "/s");
        runs.push(run);
    }

    if knobs.wants("echo") {
        let server = Server::start(&machine, &scratch, "echo", &["--echo"]);
        let run = server.bench(
            &machine,
            "echo",
            &[
                "echo",
                "--conns",
                "10",
                "--window",
                "16",
                "--duration",
                &dur,
                "--warmup",
                &warm,
            ],
        );
        let name = "echo (10 conns × 16)";
        table.num(name, "throughput", &run, "echoed_per_s", "msgs/s");
        table.latency(name, &run, "latency", &["p50", "p99"]);
        runs.push(run);
    }

    if knobs.wants("offline") {
        for fsync in ["always", "never"] {
            let server = Server::start(
                &machine,
                &scratch,
                &format!("offline-{fsync}"),
                &[
                    "--fsync",
                    fsync,
                    // The recipients never connect.
                    "--offline-to-unknown",
                    "--offline-max-per-user",
                    "100000000",
                    "--offline-max-bytes",
                    "4294967296",
                ],
            );
            let run = server.bench(
                &machine,
                &format!("offline fsync {fsync}"),
                &[
                    "offline",
                    "--senders",
                    "10",
                    "--window",
                    "16",
                    "--recipients",
                    "100",
                    "--duration",
                    &dur,
                    "--warmup",
                    &warm,
                ],
            );
            let name = format!("offline, --fsync {fsync} (10 × 16)");
            table.num(&name, "queued receipts", &run, "queued_per_s", "/s");
            table.latency(&name, &run, "latency", &["p50", "p99", "max"]);
            table.num(&name, "refused", &run, "refused", "msgs");
            runs.push(run);
        }
    }

    // Report.
    table.print();
    let mut notes = Vec::new();
    for run in &runs {
        if let Some(problem) = run.problem() {
            notes.push(format!("{}: {problem}", run.name));
        }
        for w in run.warnings() {
            notes.push(format!("{}: {w}", run.name));
        }
    }
    for n in &notes {
        println!("note: {n}");
    }
    let date = utc_date();
    let results = json!({
        "machine": {
            "nproc": machine.nproc, "model": machine.model, "kernel": machine.kernel,
            "pinned": machine.pinned, "date": date,
        },
        "knobs": {
            "duration_s": knobs.duration, "warmup_s": knobs.warmup, "idle_conns": knobs.conns,
            "rates": knobs.rates, "pairs": knobs.pairs, "fanout_receivers": knobs.receivers,
        },
        "table": table.rows.iter().map(|r| json!({
            "figure": r.figure, "value": r.value, "unit": r.unit,
        })).collect::<Vec<_>>(),
        "runs": runs.iter().map(|r| json!({
            "name": r.name, "args": r.args, "exit": r.exit, "seconds": r.seconds,
            "flaw": r.flaw(), "result": r.result,
        })).collect::<Vec<_>>(),
        "notes": notes,
        "elapsed_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    let results_path = out_dir.join("results.json");
    std::fs::write(
        &results_path,
        serde_json::to_string_pretty(&results).expect("json") + "\n",
    )
    .expect("write results.json");
    println!("results: {}", results_path.display());

    write_svg(&runs, &machine, &date, knobs.pairs, &out_dir);
    println!(
        "end_to_end: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// Writes latency.svg (and docs/latency.svg with E2E_PUBLISH=1) from the
/// open-loop runs.
fn write_svg(runs: &[Run], machine: &Machine, date: &str, pairs: usize, out_dir: &Path) {
    let open: Vec<&Run> = runs.iter().filter(|r| r.rate.is_some()).collect();
    if open.is_empty() {
        println!("no open-loop runs: no latency.svg");
        return;
    }
    let svg = latency_svg(&open, machine, date, pairs);
    std::fs::create_dir_all(out_dir).expect("create <target>/bench");
    let svg_path = out_dir.join("latency.svg");
    std::fs::write(&svg_path, &svg).expect("write latency.svg");
    println!("latency plot: {}", svg_path.display());
    if std::env::var("E2E_PUBLISH").is_ok_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/latency.svg");
        std::fs::write(&docs, &svg).expect("write docs/latency.svg");
        println!("published: {}", docs.display());
    }
}

/// `E2E_REPLOT=results.json`: the plot again from a saved run, without
/// running anything.
fn replot(file: &Path, out_dir: &Path) {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("E2E_REPLOT: {}: {e}", file.display()));
    let saved: Value = serde_json::from_str(&text).expect("E2E_REPLOT: not JSON");
    let m = &saved["machine"];
    let machine = Machine {
        nproc: m["nproc"].as_u64().unwrap_or(0) as usize,
        model: m["model"].as_str().unwrap_or("unknown CPU").to_owned(),
        kernel: m["kernel"].as_str().unwrap_or("").to_owned(),
        pinned: m["pinned"].as_bool().unwrap_or(false),
    };
    let runs: Vec<Run> = saved["runs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| Run {
            name: r["name"].as_str().unwrap_or("").to_owned(),
            args: Vec::new(),
            exit: r["exit"].as_i64().map(|c| c as i32),
            seconds: r["seconds"].as_f64().unwrap_or(0.0),
            rate: (r["result"]["mode"] == "private")
                .then(|| r["result"]["rate"].as_f64())
                .flatten()
                .map(|x| x as u64),
            result: r["result"].clone(),
            stderr: String::new(),
        })
        .collect();
    let pairs = saved["knobs"]["pairs"].as_u64().unwrap_or(50) as usize;
    let date = m["date"].as_str().unwrap_or("");
    write_svg(&runs, &machine, date, pairs, out_dir);
}

struct Knobs {
    duration: f64,
    warmup: f64,
    conns: usize,
    rates: Vec<u64>,
    pairs: usize,
    receivers: usize,
    only: Option<Vec<String>>,
}

impl Knobs {
    fn from_env() -> Knobs {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?}: not a number")),
                Err(_) => default,
            }
        }
        let rates = match std::env::var("E2E_RATES") {
            Ok(v) => v
                .split(',')
                .map(|r| {
                    r.trim()
                        .parse()
                        .expect("E2E_RATES: a list such as 1000,5000")
                })
                .collect(),
            Err(_) => vec![1000, 5000, 20_000, 50_000],
        };
        let only = std::env::var("E2E_ONLY")
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
        let k = Knobs {
            duration: var("E2E_DURATION", 5.0),
            warmup: var("E2E_WARMUP", 1.0),
            conns: var("E2E_CONNS", 10_000),
            rates,
            pairs: var("E2E_PAIRS", 50),
            receivers: var("E2E_RECEIVERS", 1000),
            only,
        };
        assert!(
            k.duration > 0.0 && k.duration <= 60.0,
            "E2E_DURATION: 0 < S <= 60"
        );
        assert!((0.0..=10.0).contains(&k.warmup), "E2E_WARMUP: 0 <= S <= 10");
        assert!(k.rates.iter().all(|&r| r > 0), "E2E_RATES: positive");
        k
    }

    fn wants(&self, group: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|g| g == group))
    }
}

struct Machine {
    nproc: usize,
    model: String,
    kernel: String,
    /// taskset exists and there are at least two cores.
    pinned: bool,
}

impl Machine {
    fn probe() -> Machine {
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown CPU".to_owned(), |(_, m)| {
                m.split_whitespace().collect::<Vec<_>>().join(" ")
            });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let taskset = Command::new("taskset")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Machine {
            nproc,
            model,
            kernel,
            pinned: taskset && nproc >= 2,
        }
    }

    /// `exe`, under `taskset -c core` when pinning.
    fn command(&self, core: usize, exe: &str) -> Command {
        if self.pinned {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(core.to_string()).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }
}

/// A fresh temporary directory for data dirs, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("wschat-e2e-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server; killed (and its data dir removed) when dropped, on
/// panic too. It also gets SIGKILL if this process dies (PR_SET_PDEATHSIG).
struct Server {
    /// Its stderr is read to the end by the helper, so it never blocks on it.
    process: Spawned,
    pid: u32,
    url: String,
    data_dir: PathBuf,
}

/// The load comes from one address, far faster than a person sends: the
/// per-connection rate and the per-address limits would measure themselves.
const LIMITS_OFF: [&str; 6] = [
    "--rate-limit",
    "0",
    "--max-connections-per-ip",
    "0",
    "--max-handshakes-per-ip",
    "0",
];

impl Server {
    fn start(machine: &Machine, scratch: &Scratch, name: &str, extra: &[&str]) -> Server {
        let data_dir = scratch.0.join(name);
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut cmd = machine.command(0, SERVER);
        cmd.args(["--listen", "127.0.0.1:0", "--log", "warn", "--data-dir"])
            .arg(&data_dir)
            .args(LIMITS_OFF)
            .args(extra);
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let process = spawn::start_command(cmd, AfterListening::KeepReading);
        Server {
            pid: process.child.id(),
            url: format!("ws://{}/ws", process.addr),
            process,
            data_dir,
        }
    }

    fn log_text(&self) -> String {
        self.process.log.text()
    }

    /// Runs `wschat-bench ARGS --url URL --pid PID --json` on core 1.
    fn bench(&self, machine: &Machine, name: &str, args: &[&str]) -> Run {
        let pid = self.pid.to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--url", &self.url, "--pid", &pid, "--json"]);
        eprintln!("end_to_end: {name}: wschat-bench {}", all.join(" "));
        let start = Instant::now();
        let mut cmd = machine.command(1, BENCH);
        cmd.args(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BENCH}: {e}"));
        let guard = Killer(Some(child));
        let output = guard.wait_with_timeout(Duration::from_secs(150));
        let seconds = (start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let result = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object);
        let exit = output.status.code();
        if result.is_none() || exit != Some(0) {
            eprintln!(
                "end_to_end: {name}: exit {exit:?}\n{stdout}{stderr}\nserver stderr:\n{}",
                self.log_text()
            );
        }
        Run {
            name: name.to_owned(),
            args: all.iter().map(|s| s.to_string()).collect(),
            exit,
            seconds,
            rate: None,
            result: result.unwrap_or(Value::Null),
            stderr,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM for a clean shutdown, SIGKILL if it takes over 2 s.
        // SAFETY: kill sends a signal to our own child, still unreaped.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.process.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    self.process.stop();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Kills the load generator if it overruns (or on panic).
struct Killer(Option<Child>);

impl Killer {
    fn wait_with_timeout(mut self, limit: Duration) -> std::process::Output {
        let mut child = self.0.take().expect("child");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
            v
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    break child.wait().expect("wait for wschat-bench");
                }
            }
        };
        std::process::Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Run {
    name: String,
    args: Vec<String>,
    exit: Option<i32>,
    seconds: f64,
    /// The offered rate of an open-loop run.
    rate: Option<u64>,
    /// The `--json` object, or null.
    result: Value,
    stderr: String,
}

impl Run {
    /// A number at a dotted path of the result.
    fn get(&self, path: &str) -> Option<f64> {
        path.split('.')
            .try_fold(&self.result, |v, k| v.get(k))
            .and_then(Value::as_f64)
    }

    fn problem(&self) -> Option<String> {
        if self.result.is_null() {
            let why = self.stderr.lines().last().unwrap_or("no output").to_owned();
            return Some(format!("no result (exit {:?}): {why}", self.exit));
        }
        match self.exit {
            Some(0) => None,
            _ => Some(format!(
                "exit {:?}, {} errors counted",
                self.exit,
                self.get("errors").unwrap_or(f64::NAN)
            )),
        }
    }

    fn warnings(&self) -> Vec<String> {
        self.result
            .get("warnings")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|w| w.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Why an open-loop point is not a clean measurement, if it is not: the
    /// server delivered less than offered or lost messages, or the load
    /// generator saturated its core (its own queueing is then in the figures).
    fn flaw(&self) -> Option<&'static str> {
        let rate = self.rate? as f64;
        if self.result.is_null() {
            return Some("no result");
        }
        if self.get("lost").unwrap_or(0.0) > 0.0 {
            return Some("messages lost");
        }
        if self.get("delivered_per_s").unwrap_or(0.0) < 0.97 * rate {
            return Some("server behind");
        }
        if self.result.get("loadgen_saturated") == Some(&Value::Bool(true)) {
            return Some("loadgen saturated");
        }
        None
    }
}

struct Row {
    figure: String,
    value: Option<f64>,
    unit: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn num(&mut self, scenario: &str, what: &str, run: &Run, key: &str, unit: &str) {
        self.rows.push(Row {
            figure: format!("{scenario}: {what}"),
            value: run.get(key),
            unit: unit.to_owned(),
        });
    }

    /// Percentiles named p50, p90, p99, p99.9, max of a latency object.
    fn latency(&mut self, scenario: &str, run: &Run, key: &str, which: &[&str]) {
        for p in which {
            let field = match *p {
                "p99.9" => "p999_us".to_owned(),
                other => format!("{other}_us"),
            };
            self.rows.push(Row {
                figure: format!("{scenario}: latency {p}"),
                value: run.get(&format!("{key}.{field}")),
                unit: "µs".to_owned(),
            });
        }
    }

    fn print(&self) {
        let width = self
            .rows
            .iter()
            .map(|r| r.figure.chars().count())
            .max()
            .unwrap_or(6)
            .max(6);
        println!();
        println!("{:<width$}  {:>12}  unit", "figure", "value");
        println!("{}", "-".repeat(width + 24));
        for r in &self.rows {
            let value = match r.value {
                None => "-".to_owned(),
                Some(v) if v.abs() >= 100.0 || v.fract() == 0.0 => format!("{v:.0}"),
                Some(v) => format!("{v:.1}"),
            };
            let pad = width - r.figure.chars().count();
            println!("{}{}  {value:>12}  {}", r.figure, " ".repeat(pad), r.unit);
        }
        println!();
    }
}

/// Today's UTC date, YYYY-MM-DD (days-from-civil, inverted).
fn utc_date() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// 1000 → "1k", 20000 → "20k", 1500 → "1.5k", 500 → "500".
fn short_rate(r: f64) -> String {
    if r >= 1000.0 {
        let k = r / 1000.0;
        if (k - k.round()).abs() < 0.05 {
            format!("{}k", k.round())
        } else {
            format!("{k:.1}k")
        }
    } else {
        format!("{r:.0}")
    }
}

/// 1 → "1", 10000 → "10 000".
fn grouped(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{2009}');
        }
        out.push(c);
    }
    out
}

/// The percentiles plotted: label, key in the result, colour.
const SERIES: [(&str, &str, RGBColor); 4] = [
    ("p50", "p50_us", RGBColor(0x1b, 0x9e, 0x77)),
    ("p90", "p90_us", RGBColor(0xd9, 0x5f, 0x02)),
    ("p99", "p99_us", RGBColor(0x75, 0x70, 0xb3)),
    ("p99.9", "p999_us", RGBColor(0xe7, 0x29, 0x8a)),
];
const GREY: RGBColor = RGBColor(0x77, 0x77, 0x77);
const DARK: RGBColor = RGBColor(0x33, 0x33, 0x33);
const FLAWED: RGBColor = RGBColor(0xcc, 0x00, 0x00);

/// Latency percentiles of the open-loop runs against the offered rate:
/// log-log, one line per percentile, drawn with plotters' SVG backend.
fn latency_svg(runs: &[&Run], machine: &Machine, date: &str, pairs: usize) -> String {
    let mut svg = String::new();
    draw_latency(&mut svg, runs, machine, date, pairs).expect("draw latency.svg");
    svg
}

/// Text of `size` SVG pixels (plotters writes 1/1.24 of the size it is given).
fn font(size: f64) -> TextStyle<'static> {
    styled(size, FontStyle::Normal)
}

fn styled(size: f64, style: FontStyle) -> TextStyle<'static> {
    (
        "DejaVu Sans, Helvetica, Arial, sans-serif",
        size * 1.24,
        style,
    )
        .into_font()
        .into()
}

fn centred(size: f64, colour: &'static RGBColor) -> TextStyle<'static> {
    font(size)
        .color(colour)
        .pos(Pos::new(HPos::Center, VPos::Top))
}

fn draw_latency<'s>(
    svg: &'s mut String,
    runs: &[&Run],
    machine: &Machine,
    date: &str,
    pairs: usize,
) -> Result<(), Box<dyn std::error::Error + 's>> {
    const W: u32 = 860;
    const H: u32 = 552;
    const LEFT: u32 = 90;
    const RIGHT: u32 = 190;
    const TOP: u32 = 78;
    const BOTTOM: u32 = 104;
    let mut runs: Vec<&Run> = runs.to_vec();
    runs.sort_by_key(|r| r.rate);
    let rates: Vec<f64> = runs.iter().map(|r| r.rate.unwrap_or(1) as f64).collect();
    let values: Vec<f64> = runs
        .iter()
        .flat_map(|r| {
            SERIES
                .iter()
                .filter_map(|(_, k, _)| r.get(&format!("latency.{k}")))
        })
        .filter(|v| *v > 0.0)
        .collect();
    let (y_lo, y_hi) = latency_range(&values);
    let (r_lo, r_hi) = (
        rates.iter().copied().fold(f64::MAX, f64::min) / 1.6,
        rates.iter().copied().fold(f64::MIN, f64::max) * 1.6,
    );

    let root = SVGBackend::with_string(svg, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let middle = (W / 2) as i32;
    root.draw(&Text::new(
        "wschat: private-message latency vs offered rate",
        (middle, 13),
        styled(18.0, FontStyle::Bold).pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    let pin = if machine.pinned {
        "server on core 0, load generator on core 1"
    } else {
        "not pinned"
    };
    let lines = [
        format!(
            "{} · {} cores · Linux {} · {date}",
            machine.model, machine.nproc, machine.kernel
        ),
        format!("{pairs} sender/receiver pairs, open loop (latency from the scheduled send time), loopback, {pin}"),
    ];
    for (i, line) in lines.iter().enumerate() {
        root.draw(&Text::new(
            line.as_str(),
            (middle, 40 + 16 * i as i32),
            centred(12.5, &DARK),
        ))?;
    }

    // Ticks at the measured rates, and at 1-2-5 steps of latency.
    let steps = steps_125(y_lo, y_hi);
    let mut chart = ChartBuilder::on(&root)
        .margin_top(TOP)
        .margin_right(RIGHT)
        .margin_bottom(8)
        .margin_left(16)
        .x_label_area_size(BOTTOM - 8)
        .y_label_area_size(LEFT - 16)
        .build_cartesian_2d(
            (r_lo..r_hi).log_scale().with_key_points(rates.clone()),
            (y_lo..y_hi).log_scale().with_key_points(steps.clone()),
        )?;
    chart
        .configure_mesh()
        .x_labels(rates.len())
        .y_labels(steps.len())
        .x_label_formatter(&|r| format!("{}/s", short_rate(*r)))
        .y_label_formatter(&|v| grouped(*v))
        .label_style(font(12.0))
        .bold_line_style(RGBColor(0xdc, 0xdc, 0xdc))
        .light_line_style(TRANSPARENT)
        .axis_style(DARK)
        .x_desc("offered rate (messages/s, log scale; got: delivered in the window, n: latency samples)")
        .y_desc("latency (µs, log scale)")
        .axis_desc_style(font(13.0))
        .draw()?;
    root.draw(&Rectangle::new(
        [
            (LEFT as i32, TOP as i32),
            ((W - RIGHT) as i32, (H - BOTTOM) as i32),
        ],
        DARK.stroke_width(1),
    ))?;
    // Under each rate: what was delivered, the samples, and why a point is
    // not clean.
    for (run, &r) in runs.iter().zip(&rates) {
        let (x, bottom) = chart.backend_coord(&(r, y_lo));
        let colour: &'static RGBColor = if run.flaw().is_some() { &FLAWED } else { &GREY };
        let delivered = format!(
            "got {}/s",
            short_rate(run.get("delivered_per_s").unwrap_or(0.0))
        );
        let samples = format!("n={}", short_rate(run.get("latency.count").unwrap_or(0.0)));
        let notes = [
            (delivered.as_str(), colour),
            (samples.as_str(), &GREY),
            (run.flaw().unwrap_or(""), colour),
        ];
        for (i, (text, colour)) in notes.iter().enumerate() {
            root.draw(&Text::new(
                *text,
                (x, bottom + 24 + 12 * i as i32),
                centred(10.0, colour),
            ))?;
        }
    }

    // The series, and their legend to the right.
    let legend_x = (W - RIGHT + 24) as i32;
    for (i, (label, key, colour)) in SERIES.iter().enumerate() {
        let points: Vec<(f64, f64, bool)> = runs
            .iter()
            .zip(&rates)
            .filter_map(|(run, &r)| {
                let v = run.get(&format!("latency.{key}"))?;
                (v > 0.0).then(|| (r, v.clamp(y_lo, y_hi), run.flaw().is_some()))
            })
            .collect();
        if points.len() > 1 {
            chart.draw_series(LineSeries::new(
                points.iter().map(|&(x, y, _)| (x, y)),
                colour.stroke_width(2),
            ))?;
        }
        for &(x, y, hollow) in &points {
            marker(chart.plotting_area(), i, (x, y), *colour, hollow)?;
        }
        let y = (TOP + 14 + 24 * i as u32) as i32;
        root.draw(&PathElement::new(
            vec![(legend_x, y), (legend_x + 30, y)],
            colour.stroke_width(2),
        ))?;
        marker(&root, i, (legend_x + 15, y), *colour, false)?;
        root.draw(&Text::new(
            *label,
            (legend_x + 40, y),
            font(13.0).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    if runs.iter().any(|r| r.flaw().is_some()) {
        let y = (TOP + 14 + 4 * 24 + 8) as i32;
        marker(
            &root,
            0,
            (legend_x + 15, y),
            RGBColor(0x55, 0x55, 0x55),
            true,
        )?;
        let note = [
            "hollow: not a clean",
            "point (reason in red",
            "under the rate)",
        ];
        for (i, line) in note.iter().enumerate() {
            root.draw(&Text::new(
                *line,
                (legend_x + 40, y + 14 * i as i32),
                font(11.0)
                    .color(&DARK)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

/// The y range: 1-2-5 steps with some room around the data, at least a
/// factor of 20 tall.
fn latency_range(values: &[f64]) -> (f64, f64) {
    let (vmin, vmax) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (vmin, vmax) = if values.is_empty() {
        (10.0, 1000.0)
    } else {
        (vmin, vmax)
    };
    let mut y_lo = nice(vmin / 1.25, false);
    let mut y_hi = nice(vmax * 1.25, true);
    while y_hi / y_lo < 20.0 {
        if vmin / y_lo < y_hi / vmax {
            y_lo = nice(y_lo * 0.99, false);
        } else {
            y_hi = nice(y_hi * 1.01, true);
        }
    }
    (y_lo, y_hi)
}

/// The 1, 2 and 5 multiples of powers of ten from `lo` to `hi`.
fn steps_125(lo: f64, hi: f64) -> Vec<f64> {
    let mut steps = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo * 0.9999 && v <= hi * 1.0001 {
                steps.push(v);
            }
        }
        decade *= 10.0;
    }
    steps
}

/// The 1-2-5 step at or above `v` (`up`), or at or below it.
fn nice(v: f64, up: bool) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    let steps = [1.0, 2.0, 5.0, 10.0];
    if up {
        steps
            .iter()
            .map(|m| m * decade)
            .find(|&s| s >= v * 0.9999)
            .unwrap_or(10.0 * decade)
    } else {
        steps
            .iter()
            .rev()
            .map(|m| m * decade)
            .find(|&s| s <= v * 1.0001)
            .unwrap_or(decade)
    }
}

/// Draws marker `i` (circle, square, triangle, diamond) at `at`: filled,
/// or white inside when its point is not clean.
fn marker<DB: DrawingBackend, CT: CoordTranslate>(
    area: &DrawingArea<DB, CT>,
    i: usize,
    at: CT::From,
    colour: RGBColor,
    hollow: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    CT::From: Clone,
{
    let fill = if hollow { WHITE } else { colour }.filled();
    let line = colour.stroke_width(2);
    let corners: Vec<(i32, i32)> = match i % 4 {
        0 => {
            return area.draw(
                &(EmptyElement::at(at)
                    + Circle::new((0, 0), 4, fill)
                    + Circle::new((0, 0), 4, line)),
            )
        }
        1 => vec![(-4, -4), (4, -4), (4, 4), (-4, 4)],
        2 => vec![(0, -6), (5, 4), (-5, 4)],
        _ => vec![(0, -6), (5, 0), (0, 6), (-5, 0)],
    };
    let mut outline = corners.clone();
    outline.push(corners[0]);
    area.draw(
        &(EmptyElement::at(at) + Polygon::new(corners, fill) + PathElement::new(outline, line)),
    )
}
