//! The server binary.
//!
//! `#![no_main]`: the C runtime calls `main` below directly, without Rust's
//! start-up runtime. On glibc that runtime asks `pthread_getattr_np` where the
//! main stack is (which reads /proc/self/maps through stdio and `sscanf`) and
//! installs SIGSEGV/SIGBUS handlers on an alternate stack, all to print a
//! message on stack overflow. Those code paths alone put ~400 KiB of glibc
//! pages in the resident set (start-up RSS median 2,084 -> 1,772 KiB over 20
//! starts, see docs/PERFORMANCE.md). The costs: a stack overflow is a bare SIGSEGV with no message
//! (the kernel's guard gap still stops it), and a panic names no thread.
//! What the server needs from that runtime is `sys::prepare_process`, plus the
//! arguments, read here from `argv` (std only fills `std::env::args` without
//! its runtime on glibc).
#![no_main]

use std::ffi::{c_char, c_int, CStr};
use std::io::Write;

use wschat::auth::{read_secret_file, Auth, Rules};
use wschat::config::{self, fd_reserve, AuthMode, Command, Config};
use wschat::log;
use wschat::server::Server;
use wschat::store::log::{Log, Sync};
use wschat::store::Outboxes;

/// Process exit statuses.
const EXIT_OK: i32 = 0;
/// The event loop failed, or `--help` or `--version` could not be written.
const EXIT_FAILED: i32 = 1;
/// Bad flags, or the server could not start (address in use, unusable data
/// directory, no event loop): one line on stderr says which.
const EXIT_CANNOT_START: i32 = 2;
/// A panic in a debug build (release builds abort), as std's runtime reports it.
const EXIT_PANICKED: i32 = 101;

#[no_mangle]
pub extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    wschat::sys::prepare_process();
    let args = match arguments(argc, argv) {
        Ok(args) => args,
        Err(position) => {
            eprintln!("wschat: argument {position} is not UTF-8 (see --help)");
            return EXIT_CANNOT_START;
        }
    };
    // A panic must not unwind out of an `extern "C"` function.
    std::panic::catch_unwind(|| run(args)).unwrap_or(EXIT_PANICKED)
}

/// The arguments after the program name; `Err(n)` if the n-th is not UTF-8.
fn arguments(argc: c_int, argv: *const *const c_char) -> Result<Vec<String>, usize> {
    (1..usize::try_from(argc).unwrap_or(0))
        .map(|position| {
            // SAFETY: the C runtime passes `argc` valid, NUL-terminated
            // strings in `argv`, alive for the whole process.
            let arg = unsafe { CStr::from_ptr(*argv.add(position)) };
            arg.to_str().map(str::to_owned).map_err(|_| position)
        })
        .collect()
}

fn run(args: Vec<String>) -> i32 {
    // The environment is read through libc's `environ`, which the C runtime
    // sets up (unlike `std::env::args`).
    let (config, command) = match Config::parse(args, |name| std::env::var_os(name)) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("wschat: {e} (see --help)");
            return EXIT_CANNOT_START;
        }
    };
    match command {
        Command::Run => {}
        Command::Help => return print(&config::help()),
        Command::Version => return print(&format!("wschat {}\n", wschat::VERSION)),
    }
    log::set_level(config.log_level);
    let listener = match Server::listen_on(config.listen, config.reuseport) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("wschat: cannot listen on {}: {e}", config.listen);
            return EXIT_CANNOT_START;
        }
    };
    let admin_listener = match config.metrics_listen.map(Server::listen).transpose() {
        Ok(listener) => listener,
        Err(e) => {
            let addr = config
                .metrics_listen
                .map(|a| a.to_string())
                .unwrap_or_default();
            eprintln!("wschat: cannot listen on {addr} (--metrics-listen): {e}");
            return EXIT_CANNOT_START;
        }
    };
    let auth = match auth_from(&config) {
        Ok(auth) => auth,
        Err(message) => {
            eprintln!("wschat: {message}");
            return EXIT_CANNOT_START;
        }
    };
    let (store_log, outboxes) = match open_store(&config) {
        Ok(opened) => opened,
        Err(message) => {
            eprintln!("wschat: {message}");
            return EXIT_CANNOT_START;
        }
    };
    let fd_limit = wschat::sys::raise_fd_limit();
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| fd_limit.saturating_sub(fd_reserve()).max(1));
    let listen = config.listen;
    let echo = config.echo;
    let mut server = match Server::new(
        listener,
        admin_listener,
        config,
        auth,
        max_connections,
        store_log,
        outboxes,
    ) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("wschat: cannot start the event loop: {e}");
            return EXIT_CANNOT_START;
        }
    };
    let addr = server.local_addr().map_or(listen, |a| a);
    // Before `listening on`, which scripts and tests wait for.
    if let Some(admin) = server.admin_addr() {
        log::write(
            log::Level::Info,
            format_args!("metrics on {admin} (/metrics and /healthz)"),
        );
    }
    // Printed at every log level: scripts and tests wait for this line.
    log::write(
        log::Level::Info,
        format_args!(
            "listening on {addr} ({}; max {max_connections} connections; open-file limit {fd_limit})",
            if echo { "echo mode" } else { "chat" }
        ),
    );
    log::flush();
    match server.run() {
        Ok(()) => {
            log::flush();
            EXIT_OK
        }
        Err(e) => {
            log::error!("event loop failed: {e}");
            EXIT_FAILED
        }
    }
}

/// Prints `text` on stdout for `--help` and `--version`.
fn print(text: &str) -> i32 {
    // Flushed here: without Rust's runtime nothing flushes stdout at exit.
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("wschat: cannot write to stdout: {e}");
            EXIT_FAILED
        }
    }
}

/// The authentication `config` asks for, with its secret read. Errors are
/// one line, and never show the secret.
fn auth_from(config: &Config) -> Result<Auth, String> {
    let path = config.auth_secret_file.as_ref();
    match (config.auth, path) {
        (AuthMode::None, None) => Ok(Auth::None),
        (AuthMode::None, Some(_)) => Err("--auth-secret-file needs --auth jwt".into()),
        (AuthMode::Jwt, None) => Err("--auth jwt needs --auth-secret-file PATH".into()),
        (AuthMode::Jwt, Some(path)) => {
            let secret = read_secret_file(path)
                .map_err(|e| format!("--auth-secret-file {}: {e}", path.display()))?;
            Ok(Auth::Jwt {
                secret,
                rules: Rules {
                    leeway_secs: config.auth_leeway.as_secs(),
                    audience: config.auth_audience.clone(),
                    issuer: config.auth_issuer.clone(),
                },
            })
        }
    }
}

/// Opens the offline outbox log and replays it. Errors are one line.
fn open_store(config: &Config) -> Result<(Option<Log>, Outboxes), String> {
    let mut outboxes = Outboxes::new(config.store_limits());
    if config.echo {
        return Ok((None, outboxes));
    }
    let Some(dir) = &config.data_dir else {
        // Under `--cluster` they are in Redis; the local store only ever
        // holds a log being uploaded.
        if config.cluster.is_none() {
            log::warn!(
                "offline messages are kept in memory only (--data-dir none): a restart loses them"
            );
        }
        return Ok((None, outboxes));
    };
    let opened = Log::open(dir, config.fsync)
        .map_err(|e| format!("cannot use data directory {}: {e}", dir.display()))?;
    if let Some((at, bytes)) = opened.cut {
        log::warn!(
            "outbox log {}: cut a torn or corrupt tail of {bytes} bytes at offset {at}; everything before it is kept",
            dir.display()
        );
    }
    let replayed = opened.log.replayed();
    if let Some(aside) = &opened.kept_aside {
        log::error!(
            "outbox log {}: damaged: {} bytes in {} could not be read and the records in them are lost; \
             {} records around them were kept; the damaged file is kept as {} and the log was rewritten without the damage",
            dir.display(),
            replayed.damaged_bytes,
            match replayed.damaged_regions {
                1 => "1 stretch".to_string(),
                n => format!("{n} stretches"),
            },
            replayed.records_kept,
            aside.display()
        );
    }
    let records = opened.records.len();
    for record in opened.records {
        outboxes.replay(record);
    }
    outboxes.finish_replay();
    if replayed.damaged_regions > 0 {
        outboxes.after_lost_records();
    }
    let (held, bytes) = outboxes.held();
    log::info!(
        "offline store {}: {records} log records, {held} messages held ({bytes} bytes)",
        dir.display()
    );
    if config.auth == AuthMode::None {
        log::warn!(
            "offline storage is on and there is no authentication (--auth none): whoever connects as a name receives its stored messages"
        );
    }
    if config.fsync == Sync::Never {
        log::warn!(
            "--fsync never: a crash can lose recently stored messages (for benchmarks only)"
        );
    }
    Ok((Some(opened.log), outboxes))
}
