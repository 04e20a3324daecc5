//! The server binary.
//!
//! `#![no_main]`: the C runtime calls `main` below directly, without Rust's
//! start-up runtime. On glibc that runtime asks `pthread_getattr_np` where the
//! main stack is (which reads /proc/self/maps through stdio and `sscanf`) and
//! installs SIGSEGV/SIGBUS handlers on an alternate stack, all to print a
//! message on stack overflow. Those code paths alone put ~400 KiB of glibc
//! pages in the resident set (start-up RSS 2.0-2.2 MiB with them, 1.6-1.9
//! without); a stack overflow is still a crash, only with a plainer message.
//! What the server needs from that runtime is `sys::prepare_process`.
//! `std::env::args` works without it (glibc hands argv to Rust's init hook).
#![no_main]

use std::io::Write;

use wschat::config::{fd_reserve, Command, Config, HELP};
use wschat::log;
use wschat::server::Server;
use wschat::store::log::{Log, Sync};
use wschat::store::{Limits, Outboxes};

/// Process exit statuses.
const EXIT_OK: i32 = 0;
const EXIT_FAILED: i32 = 1;
const EXIT_USAGE: i32 = 2;

#[no_mangle]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    wschat::sys::prepare_process();
    run()
}

fn run() -> i32 {
    let (config, command) = match Config::from_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("wschat: {e} (see --help)");
            return EXIT_USAGE;
        }
    };
    if command == Command::Help {
        // Flushed here: without Rust's runtime nothing flushes stdout at exit.
        let mut stdout = std::io::stdout().lock();
        let written = stdout
            .write_all(HELP.as_bytes())
            .and_then(|()| stdout.flush());
        return if written.is_ok() {
            EXIT_OK
        } else {
            EXIT_FAILED
        };
    }
    log::set_level(config.log_level);
    let listener = match Server::listen(config.listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("wschat: cannot listen on {}: {e}", config.listen);
            return EXIT_USAGE;
        }
    };
    let (store_log, outboxes) = match open_store(&config) {
        Ok(opened) => opened,
        Err(message) => {
            eprintln!("wschat: {message}");
            return EXIT_USAGE;
        }
    };
    let fd_limit = wschat::sys::raise_fd_limit();
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| fd_limit.saturating_sub(fd_reserve()).max(1));
    let listen = config.listen;
    let echo = config.echo;
    let mut server = match Server::new(listener, config, max_connections, store_log, outboxes) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("wschat: cannot start the event loop: {e}");
            return EXIT_USAGE;
        }
    };
    let addr = server.local_addr().map_or(listen, |a| a);
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

/// Opens the offline outbox log and replays it. Errors are one line.
fn open_store(config: &Config) -> Result<(Option<Log>, Outboxes), String> {
    let mut outboxes = Outboxes::new(Limits {
        max_per_user: config.offline_max_per_user,
        max_bytes: config.offline_max_bytes,
        ttl_ms: config.offline_ttl.as_millis() as u64,
    });
    if config.echo {
        return Ok((None, outboxes));
    }
    let Some(dir) = &config.data_dir else {
        log::warn!(
            "offline messages are kept in memory only (--data-dir none): a restart loses them"
        );
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
    let records = opened.records.len();
    for record in opened.records {
        outboxes.replay(record);
    }
    outboxes.finish_replay();
    let (held, bytes) = outboxes.held();
    log::info!(
        "offline store {}: {records} log records, {held} messages held ({bytes} bytes)",
        dir.display()
    );
    log::warn!(
        "offline storage is on and there is no authentication: whoever connects as a name receives its stored messages"
    );
    if config.fsync == Sync::Never {
        log::warn!(
            "--fsync never: a crash can lose recently stored messages (for benchmarks only)"
        );
    }
    Ok((Some(opened.log), outboxes))
}
