use std::process::ExitCode;

use wschat::config::{fd_reserve, Command, Config, HELP};
use wschat::log;
use wschat::server::Server;

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
    let fd_limit = wschat::sys::raise_fd_limit();
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| fd_limit.saturating_sub(fd_reserve()).max(1));
    let listen = config.listen;
    let echo = config.echo;
    let mut server = match Server::bind(config, max_connections) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("wschat: cannot listen on {listen}: {e}");
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
