//! Every limit and default in one place, and the command line that sets them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::log::Level;
use crate::store::log::Sync;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Serve a plain echo server (for Autobahn and raw benchmarks) instead of chat.
    pub echo: bool,
    /// Open sockets beyond this are answered 503 and closed. `None`: what the
    /// open-file limit allows, less a reserve (see [`fd_reserve`]).
    pub max_connections: Option<usize>,
    /// The largest message a client may send, checked before it is buffered.
    pub max_message_size: usize,
    /// Unsent bytes one connection may hold; beyond it, it is read no more
    /// until it drains (and, in chat, slow recipients are shed).
    pub max_outbound: usize,
    /// Time to complete the opening handshake (slowloris bound).
    pub handshake_timeout: Duration,
    /// Time a peer has to finish the closing handshake.
    pub close_timeout: Duration,
    /// When non-empty, browsers from other origins get 403.
    pub allowed_origins: Vec<String>,
    pub log_level: Level,
    /// The largest chat message body, in bytes.
    pub max_body: usize,
    /// Join and leave events are sent only while at most this many are online.
    pub presence_limit: usize,
    /// How often the server pings each client.
    pub ping_interval: Duration,
    /// A connection from which nothing arrives this long is closed.
    pub idle_timeout: Duration,
    /// A backlog that makes no progress this long gets its connection closed.
    pub write_timeout: Duration,
    /// A reader whose socket took nothing this long while bytes waited is
    /// slow (see `delivery::policy`).
    pub slow_reader_after: Duration,
    /// After SIGINT/SIGTERM, the longest the server waits for clients to close.
    pub shutdown_timeout: Duration,
    /// Where the offline outbox log lives; `None`: in memory only.
    pub data_dir: Option<PathBuf>,
    /// Whether a turn's log records are synced before its replies leave.
    pub fsync: Sync,
    /// Messages one user's outbox may hold.
    pub offline_max_per_user: usize,
    /// Bytes all outboxes together may hold.
    pub offline_max_bytes: usize,
    /// How long a held message waits before it expires.
    pub offline_ttl: Duration,
    /// The log is compacted once it is at least this big (and mostly dead).
    pub compact_min_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            echo: false,
            max_connections: None,
            max_message_size: 64 * 1024,
            max_outbound: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            allowed_origins: Vec::new(),
            log_level: Level::Info,
            max_body: 8 * 1024,
            presence_limit: 1000,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            slow_reader_after: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(5),
            data_dir: Some(PathBuf::from("wschat-data")),
            fsync: Sync::Always,
            offline_max_per_user: 1000,
            offline_max_bytes: 64 * 1024 * 1024,
            offline_ttl: Duration::from_secs(7 * 24 * 3600),
            compact_min_bytes: 4 * 1024 * 1024,
        }
    }
}

/// File descriptors kept back from `--max-connections`' default: the
/// listener, epoll, stdio, and room to answer 503 at the limit.
pub fn fd_reserve() -> usize {
    32
}

pub const HELP: &str = "\
wschat: a single-threaded WebSocket chat server

USAGE: wschat [OPTIONS]

OPTIONS:
  --listen ADDR              address to listen on [default: 127.0.0.1:8080]
  --echo                     serve a plain WebSocket echo server instead of chat
  --max-connections N        open sockets beyond N get 503 [default: open-file limit - 32]
  --max-message-size BYTES   largest client message [default: 65536]
  --max-outbound BYTES       unsent bytes allowed per connection; public messages
                             are shed above a quarter of it [default: 1048576]
  --slow-reader-after DUR    a reader whose socket took nothing this long is slow:
                             senders are no longer held for it, and a private that
                             would pass --max-outbound disconnects it [default: 2s]
  --handshake-timeout DUR    time to complete the opening handshake [default: 10s]
  --close-timeout DUR        time a peer has to finish the closing handshake [default: 5s]
  --allowed-origin URL       accept browsers only from this origin (repeatable)
  --max-body BYTES           largest chat message body [default: 8192]
  --presence-limit N         send join/leave only while at most N are online [default: 1000]
  --ping-interval DUR        how often the server pings each client [default: 25s]
  --idle-timeout DUR         close a connection silent this long [default: 60s]
  --write-timeout DUR        close a connection whose backlog is stuck this long [default: 30s]
  --shutdown-timeout DUR     on SIGINT/SIGTERM, wait this long for clients [default: 5s]
  --data-dir DIR|none        where offline messages are kept; none = memory only
                             [default: ./wschat-data]
  --fsync always|never       sync the outbox log before acknowledging (never: for
                             benchmarks; a crash may lose recent messages) [default: always]
  --offline-max-per-user N   messages held per user [default: 1000]
  --offline-max-bytes BYTES  bytes held by all outboxes together [default: 67108864]
  --offline-ttl DUR          held messages expire after this [default: 7d]
  --compact-min-bytes BYTES  compact the log once it is this big and mostly dead
                             [default: 4194304]
  --log LEVEL                error | warn | info | debug [default: info]
  -h, --help                 print this help

DUR is a number of seconds or a number with ms, s, m, h or d (500ms, 10s, 2m, 7d).
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run,
    Help,
}

/// A command-line mistake, printed as one line.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses the arguments (without the program name).
    pub fn from_args<I: IntoIterator<Item = String>>(
        args: I,
    ) -> Result<(Config, Command), ConfigError> {
        let mut config = Config::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = || -> Result<String, ConfigError> {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| ConfigError(format!("{flag} needs a value")))
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok((config, Command::Help)),
                "--echo" => config.echo = true,
                "--listen" => config.listen = parse_addr(&value()?)?,
                "--max-connections" => {
                    config.max_connections = Some(parse_count(&flag, &value()?, 1)?);
                }
                "--max-message-size" => {
                    config.max_message_size = parse_count(&flag, &value()?, 1)?;
                }
                "--max-outbound" => config.max_outbound = parse_count(&flag, &value()?, 1024)?,
                "--handshake-timeout" => {
                    config.handshake_timeout = parse_duration(&flag, &value()?)?
                }
                "--close-timeout" => config.close_timeout = parse_duration(&flag, &value()?)?,
                "--max-body" => config.max_body = parse_count(&flag, &value()?, 1)?,
                "--presence-limit" => config.presence_limit = parse_count(&flag, &value()?, 0)?,
                "--ping-interval" => config.ping_interval = parse_duration(&flag, &value()?)?,
                "--idle-timeout" => config.idle_timeout = parse_duration(&flag, &value()?)?,
                "--write-timeout" => config.write_timeout = parse_duration(&flag, &value()?)?,
                "--slow-reader-after" => {
                    config.slow_reader_after = parse_duration(&flag, &value()?)?
                }
                "--shutdown-timeout" => config.shutdown_timeout = parse_duration(&flag, &value()?)?,
                "--data-dir" => {
                    let dir = value()?;
                    config.data_dir = if dir == "none" {
                        None
                    } else {
                        Some(PathBuf::from(dir))
                    };
                }
                "--fsync" => {
                    config.fsync = match value()?.as_str() {
                        "always" => Sync::Always,
                        "never" => Sync::Never,
                        other => {
                            return Err(ConfigError(format!(
                                "--fsync: '{other}' is not always or never"
                            )))
                        }
                    }
                }
                "--offline-max-per-user" => {
                    config.offline_max_per_user = parse_count(&flag, &value()?, 1)?
                }
                "--offline-max-bytes" => {
                    config.offline_max_bytes = parse_count(&flag, &value()?, 1024)?
                }
                "--offline-ttl" => config.offline_ttl = parse_duration(&flag, &value()?)?,
                "--compact-min-bytes" => {
                    config.compact_min_bytes = parse_count(&flag, &value()?, 1)? as u64
                }
                "--allowed-origin" => {
                    let origin = value()?;
                    if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                        return Err(ConfigError(format!(
                            "--allowed-origin: '{origin}' is not an http(s) origin such as https://chat.example"
                        )));
                    }
                    config.allowed_origins.push(origin);
                }
                "--log" => {
                    let v = value()?;
                    config.log_level = Level::parse(&v).ok_or_else(|| {
                        ConfigError(format!(
                            "--log: '{v}' is not one of error, warn, info, debug"
                        ))
                    })?;
                }
                _ => return Err(ConfigError(format!("unknown option '{arg}'"))),
            }
        }
        Ok((config, Command::Run))
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, ConfigError> {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            ConfigError(format!(
                "--listen: '{text}' is not an address such as 127.0.0.1:8080"
            ))
        })
}

fn parse_count(flag: &str, text: &str, min: usize) -> Result<usize, ConfigError> {
    match text.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(ConfigError(format!(
            "{flag}: '{text}' is not a whole number of at least {min}"
        ))),
    }
}

/// `10` (seconds), `10s`, `500ms`, `2m`.
pub fn parse_duration(flag: &str, text: &str) -> Result<Duration, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "{flag}: '{text}' is not a duration such as 500ms, 10s or 2m"
        ))
    };
    let (number, unit_ms) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = text.strip_suffix('d') {
        (n, 86_400_000)
    } else {
        (text, 1000)
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
    if ms == 0 {
        return Err(bad());
    }
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Config, Command), ConfigError> {
        Config::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_and_flags() {
        let (c, cmd) = parse(&[]).unwrap();
        assert_eq!(cmd, Command::Run);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_message_size, 65_536);
        let (c, _) = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--echo",
            "--max-message-size=16777216",
            "--handshake-timeout",
            "300ms",
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "http://b.example",
            "--log",
            "debug",
            "--max-connections",
            "5",
        ])
        .unwrap();
        assert!(c.echo);
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.max_message_size, 16 << 20);
        assert_eq!(c.handshake_timeout, Duration::from_millis(300));
        assert_eq!(c.allowed_origins.len(), 2);
        assert_eq!(c.log_level, Level::Debug);
        assert_eq!(c.max_connections, Some(5));
        assert_eq!(parse(&["--help"]).unwrap().1, Command::Help);
    }

    #[test]
    fn mistakes_are_one_line_errors() {
        for args in [
            &["--bogus"][..],
            &["--listen"],
            &["--listen", "nowhere"],
            &["--max-message-size", "-1"],
            &["--max-connections", "0"],
            &["--handshake-timeout", "soon"],
            &["--handshake-timeout", "0"],
            &["--log", "loud"],
            &["--allowed-origin", "chat.example"],
        ] {
            let err = parse(args).expect_err("should fail");
            assert!(!err.0.contains('\n'), "{err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("x", "10s").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("x", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("x", "2m").unwrap(), Duration::from_secs(120));
    }
}
