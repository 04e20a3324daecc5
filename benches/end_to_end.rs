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

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
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

/// Latency percentiles of the open-loop runs against the offered rate:
/// log-log, one line per percentile.
fn latency_svg(runs: &[&Run], machine: &Machine, date: &str, pairs: usize) -> String {
    const W: f64 = 860.0;
    const H: f64 = 552.0;
    const LEFT: f64 = 90.0;
    const RIGHT: f64 = 190.0;
    const TOP: f64 = 78.0;
    const BOTTOM: f64 = 104.0;
    let series: [(&str, &str, &str); 4] = [
        ("p50", "p50_us", "#1b9e77"),
        ("p90", "p90_us", "#d95f02"),
        ("p99", "p99_us", "#7570b3"),
        ("p99.9", "p999_us", "#e7298a"),
    ];
    let mut runs: Vec<&Run> = runs.to_vec();
    runs.sort_by_key(|r| r.rate);
    let rates: Vec<f64> = runs.iter().map(|r| r.rate.unwrap_or(1) as f64).collect();
    let values: Vec<f64> = runs
        .iter()
        .flat_map(|r| {
            series
                .iter()
                .filter_map(|(_, k, _)| r.get(&format!("latency.{k}")))
        })
        .filter(|v| *v > 0.0)
        .collect();
    let (vmin, vmax) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (vmin, vmax) = if values.is_empty() {
        (10.0, 1000.0)
    } else {
        (vmin, vmax)
    };
    // The y range: 1-2-5 steps with some room around the data, at least
    // a factor of 20 tall.
    let mut y_lo = nice(vmin / 1.25, false);
    let mut y_hi = nice(vmax * 1.25, true);
    while y_hi / y_lo < 20.0 {
        if vmin / y_lo < y_hi / vmax {
            y_lo = nice(y_lo * 0.99, false);
        } else {
            y_hi = nice(y_hi * 1.01, true);
        }
    }
    let (r_lo, r_hi) = (
        rates.iter().copied().fold(f64::MAX, f64::min) / 1.6,
        rates.iter().copied().fold(f64::MIN, f64::max) * 1.6,
    );
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |r: f64| LEFT + (r / r_lo).ln() / (r_hi / r_lo).ln() * pw;
    let y = |v: f64| TOP + ph - (v / y_lo).ln() / (y_hi / y_lo).ln() * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" font-size="18" font-weight="bold" text-anchor="middle">wschat: private-message latency vs offered rate</text>"#,
        W / 2.0
    );
    let pin = if machine.pinned {
        "server on core 0, load generator on core 1"
    } else {
        "not pinned"
    };
    let _ = writeln!(
        s,
        r##"<text x="{}" y="50" font-size="12.5" text-anchor="middle" fill="#333">{} · {} cores · Linux {} · {date}</text>"##,
        W / 2.0,
        xml_escape(&machine.model),
        machine.nproc,
        xml_escape(&machine.kernel),
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="66" font-size="12.5" text-anchor="middle" fill="#333">{pairs} sender/receiver pairs, open loop (latency from the scheduled send time), loopback, {pin}</text>"##,
        W / 2.0,
    );

    // Grid and y ticks: decades labelled and darker, 2 and 5 lighter.
    let mut decade = 10f64.powf(y_lo.log10().floor());
    while decade <= y_hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v < y_lo * 0.9999 || v > y_hi * 1.0001 {
                continue;
            }
            let yy = y(v);
            let (stroke, size, fill) = if m == 1.0 {
                ("#c8c8c8", 12, "#000")
            } else {
                ("#ececec", 10, "#777")
            };
            let _ = writeln!(
                s,
                r#"<line x1="{LEFT}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="{stroke}"/>"#,
                LEFT + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="{size}" text-anchor="end" fill="{fill}">{}</text>"#,
                LEFT - 8.0,
                yy + 4.0,
                grouped(v)
            );
        }
        decade *= 10.0;
    }
    // x ticks at the measured rates, with what was delivered underneath.
    for (run, &r) in runs.iter().zip(&rates) {
        let xx = x(r);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{TOP}" y2="{:.1}" stroke="#ececec"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{:.1}" y2="{:.1}" stroke="#333"/>"##,
            TOP + ph,
            TOP + ph + 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}/s</text>"#,
            TOP + ph + 19.0,
            short_rate(r)
        );
        let delivered = run.get("delivered_per_s").unwrap_or(0.0);
        let colour = if run.flaw().is_some() { "#c00" } else { "#777" };
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="{colour}">got {}/s</text>"#,
            TOP + ph + 33.0,
            short_rate(delivered),
        );
        let _ = writeln!(
            s,
            r##"<text x="{xx:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#777">n={}</text>"##,
            TOP + ph + 45.0,
            short_rate(run.get("latency.count").unwrap_or(0.0))
        );
        if let Some(flaw) = run.flaw() {
            let _ = writeln!(
                s,
                r#"<text x="{xx:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="{colour}">{flaw}</text>"#,
                TOP + ph + 57.0,
            );
        }
    }
    // Frame and axis labels.
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">offered rate (messages/s, log scale; got: delivered in the window, n: latency samples)</text>"#,
        LEFT + pw / 2.0,
        H - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(24 {:.1}) rotate(-90)" font-size="13" text-anchor="middle">latency (µs, log scale)</text>"#,
        TOP + ph / 2.0
    );

    // Series.
    for (i, (label, key, colour)) in series.iter().enumerate() {
        let points: Vec<(f64, f64, bool)> = runs
            .iter()
            .zip(&rates)
            .filter_map(|(run, &r)| {
                let v = run.get(&format!("latency.{key}"))?;
                (v > 0.0).then(|| (x(r), y(v.clamp(y_lo, y_hi)), run.flaw().is_some()))
            })
            .collect();
        if points.len() > 1 {
            let path: Vec<String> = points
                .iter()
                .map(|(px, py, _)| format!("{px:.1},{py:.1}"))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.join(" ")
            );
        }
        for &(px, py, behind) in &points {
            let fill = if behind { "white" } else { colour };
            let _ = writeln!(s, "{}", marker(i, px, py, colour, fill));
        }
        // Legend.
        let lx = LEFT + pw + 24.0;
        let ly = TOP + 14.0 + i as f64 * 24.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/>"#,
            lx + 30.0
        );
        let _ = writeln!(s, "{}", marker(i, lx + 15.0, ly, colour, colour));
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="13">{label}</text>"#,
            lx + 40.0,
            ly + 4.5
        );
    }
    if runs.iter().any(|r| r.flaw().is_some()) {
        let lx = LEFT + pw + 24.0;
        let ly = TOP + 14.0 + 4.0 * 24.0 + 8.0;
        let _ = writeln!(s, "{}", marker(0, lx + 15.0, ly, "#555", "white"));
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#333"><tspan x="{:.1}" dy="0">hollow: not a clean</tspan><tspan x="{:.1}" dy="14">point (reason in red</tspan><tspan x="{:.1}" dy="14">under the rate)</tspan></text>"##,
            lx + 40.0,
            ly + 4.0,
            lx + 40.0,
            lx + 40.0,
            lx + 40.0,
        );
    }
    s.push_str("</svg>\n");
    s
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

/// Marker `i`: circle, square, triangle, diamond.
fn marker(i: usize, x: f64, y: f64, stroke: &str, fill: &str) -> String {
    let style = format!(r#"fill="{fill}" stroke="{stroke}" stroke-width="1.8""#);
    match i % 4 {
        0 => format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="4.5" {style}/>"#),
        1 => format!(
            r#"<rect x="{:.1}" y="{:.1}" width="8" height="8" {style}/>"#,
            x - 4.0,
            y - 4.0
        ),
        2 => format!(
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" {style}/>"#,
            x,
            y - 5.5,
            x + 5.0,
            y + 4.0,
            x - 5.0,
            y + 4.0
        ),
        _ => format!(
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" {style}/>"#,
            x,
            y - 5.5,
            x + 5.0,
            y,
            x,
            y + 5.5,
            x - 5.0,
            y
        ),
    }
}
