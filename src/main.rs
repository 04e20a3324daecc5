use std::process::ExitCode;

use wschat::config::{fd_reserve, Command, Config, HELP};
use wschat::log;
use wschat::server::Server;
use wschat::store::log::{Log, Sync};
use wschat::store::{Limits, Outboxes};

fn main() -> ExitCode {
    let (config, command) = match Config::from_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("wschat: {e} (see --help)");
            return ExitCode::from(2);
        }
    };
    if command == Command::Help {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    log::set_level(config.log_level);
    let listener = match Server::listen(config.listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("wschat: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(2);
        }
    };
    let (store_log, outboxes) = match open_store(&config) {
        Ok(opened) => opened,
        Err(message) => {
            eprintln!("wschat: {message}");
            return ExitCode::from(2);
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
            return ExitCode::from(2);
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::from(1)
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
