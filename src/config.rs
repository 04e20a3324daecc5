//! Every limit and default in one place, and the command line that sets them.

use std::ffi::OsString;
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
    /// Everything peers make the process hold together: outbound queues,
    /// partial messages, request heads (see `budget`).
    pub memory_budget: usize,
    /// All partial (unfinished) messages together.
    pub max_partial_bytes: usize,
    /// Time a client has to complete a message once its first bytes came.
    pub message_timeout: Duration,
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
    /// Messages one sender may have held at once, over all recipients.
    pub offline_max_per_sender: usize,
    /// Bytes one sender may have held at once, over all recipients.
    /// `None`: a sixteenth of `offline_max_bytes`.
    pub offline_max_bytes_per_sender: Option<usize>,
    /// How long a held message waits before it expires.
    pub offline_ttl: Duration,
    /// The log is compacted once it is at least this big (and mostly dead).
    pub compact_min_bytes: u64,
    /// Whether clients must present a signed token.
    pub auth: AuthMode,
    /// The HS256 secret's file, for `--auth jwt`.
    pub auth_secret_file: Option<PathBuf>,
    /// How far a token's `exp` and `nbf` may be off.
    pub auth_leeway: Duration,
    /// When set, tokens must carry this `aud`.
    pub auth_audience: Option<String>,
    /// When set, tokens must carry this `iss`.
    pub auth_issuer: Option<String>,
    /// Names remembered as users (who may be sent offline messages).
    pub max_known_users: usize,
    /// Without authentication: hold private messages for names that never
    /// connected, too.
    pub offline_to_unknown: bool,
    /// Where `/metrics` and `/healthz` are served apart from the chat.
    pub metrics_listen: Option<SocketAddr>,
    /// `--cluster`: be one node of a chat shared over this Redis.
    pub cluster: Option<crate::cluster::RedisUrl>,
    /// Prefix of the cluster's Redis keys and channels.
    pub cluster_prefix: String,
    /// How long a node's names outlive it (renewed every third of it).
    pub cluster_lease: Duration,
    /// Set SO_REUSEPORT on the listener, so several processes share the port.
    pub reuseport: bool,
    /// Message rate, per-address limits and trusted proxies.
    pub limits: crate::limits::Settings,
}

/// How clients are authenticated (`--auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    None,
    Jwt,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            echo: false,
            max_connections: None,
            max_message_size: 64 * 1024,
            max_outbound: 1024 * 1024,
            memory_budget: 256 * 1024 * 1024,
            max_partial_bytes: 64 * 1024 * 1024,
            message_timeout: Duration::from_secs(30),
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
            offline_max_per_sender: 1000,
            offline_max_bytes_per_sender: None,
            offline_ttl: Duration::from_secs(7 * 24 * 3600),
            compact_min_bytes: 4 * 1024 * 1024,
            auth: AuthMode::None,
            auth_secret_file: None,
            auth_leeway: Duration::from_secs(30),
            auth_audience: None,
            auth_issuer: None,
            max_known_users: 1_000_000,
            offline_to_unknown: false,
            metrics_listen: None,
            cluster: None,
            cluster_prefix: "wschat".to_string(),
            cluster_lease: Duration::from_secs(15),
            reuseport: false,
            limits: crate::limits::Settings::default(),
        }
    }
}

impl Config {
    /// The offline store's bounds.
    pub fn store_limits(&self) -> crate::store::Limits {
        crate::store::Limits {
            max_per_user: self.offline_max_per_user,
            max_bytes: self.offline_max_bytes,
            max_per_sender: self.offline_max_per_sender,
            max_bytes_per_sender: self
                .offline_max_bytes_per_sender
                .unwrap_or(self.offline_max_bytes / 16),
            ttl_ms: self.offline_ttl.as_millis().try_into().unwrap_or(u64::MAX),
            max_known_users: self.max_known_users,
        }
    }
}

/// File descriptors kept back from `--max-connections`' default: the
/// listener, epoll, stdio, room to answer 503 at the limit, and the sockets
/// kept for health checks beyond it ([`crate::limits::HTTP_RESERVE`]).
pub fn fd_reserve() -> usize {
    32 + crate::limits::HTTP_RESERVE
}

/// How an option takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A switch: the flag alone turns it on; its variable takes `1`, `true`,
    /// `0` or `false`.
    Switch,
    /// One value; given twice, the last one wins.
    Value,
    /// Repeatable; its variable takes a comma-separated list.
    List,
}

/// Sets one option from one value. `name` is the flag or the variable the
/// value came from, so that an error names what the operator wrote.
type Setter = fn(&mut Config, &str, &str) -> Result<(), ConfigError>;

/// One command-line option. Its environment variable is derived from the
/// flag ([`Opt::env_var`]), so an option added to [`OPTIONS`] gets its
/// variable, its `--help` line and its parsing from this one entry.
pub struct Opt {
    pub flag: &'static str,
    /// The value's placeholder in `--help`; empty for a switch.
    pub value_name: &'static str,
    pub about: &'static str,
    /// The default as `--help` shows it, if there is one worth showing.
    pub default: Option<&'static str>,
    kind: Kind,
    set: Setter,
}

impl Opt {
    /// `--max-outbound` -> `WSCHAT_MAX_OUTBOUND`.
    pub fn env_var(&self) -> String {
        let name = self.flag.trim_start_matches('-');
        format!("WSCHAT_{}", name.to_ascii_uppercase().replace('-', "_"))
    }
}

/// Every option, in `--help` order.
pub const OPTIONS: &[Opt] = &[
    Opt {
        flag: "--listen",
        value_name: "ADDR",
        about: "address to listen on",
        default: Some("127.0.0.1:8080"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.listen = parse_addr(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--echo",
        value_name: "",
        about: "serve a plain WebSocket echo server instead of chat",
        default: None,
        kind: Kind::Switch,
        set: |c, name, v| {
            c.echo = parse_switch(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--max-connections",
        value_name: "N",
        about: "WebSocket connections (and handshakes) beyond N get 503; 16 more sockets are \
                kept for /healthz and /metrics",
        default: Some("open-file limit - 48"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.max_connections = Some(parse_count(name, v, 1)?);
            Ok(())
        },
    },
    Opt {
        flag: "--max-message-size",
        value_name: "BYTES",
        about: "largest client message",
        default: Some("65536"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.max_message_size = parse_count(name, v, 1)?;
            Ok(())
        },
    },
    Opt {
        flag: "--max-outbound",
        value_name: "BYTES",
        about:
            "unsent bytes allowed per connection; public messages are shed above a quarter of it",
        default: Some("1048576"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.max_outbound = parse_count(name, v, 1024)?;
            Ok(())
        },
    },
    Opt {
        flag: "--memory-budget",
        value_name: "BYTES",
        about: "bytes all peers together may make the server hold (outbound queues, partial \
                messages, request heads); from three quarters of it new connections get 503 \
                and public messages are shed",
        default: Some("268435456"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.memory_budget = parse_count(name, v, 4096)?;
            Ok(())
        },
    },
    Opt {
        flag: "--max-partial-bytes",
        value_name: "BYTES",
        about: "bytes all unfinished messages together may hold; a client whose message would \
                pass it is closed with 1009",
        default: Some("67108864"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.max_partial_bytes = parse_count(name, v, 1)?;
            Ok(())
        },
    },
    Opt {
        flag: "--message-timeout",
        value_name: "DUR",
        about: "time to complete a message once it began (pings do not extend it); \
                then 1008",
        default: Some("30s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.message_timeout = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--slow-reader-after",
        value_name: "DUR",
        about: "a reader whose socket took nothing this long is slow: senders are no longer \
                held for it, and a private that would pass --max-outbound disconnects it",
        default: Some("2s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.slow_reader_after = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--handshake-timeout",
        value_name: "DUR",
        about: "time to complete the opening handshake",
        default: Some("10s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.handshake_timeout = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--close-timeout",
        value_name: "DUR",
        about: "time a peer has to finish the closing handshake",
        default: Some("5s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.close_timeout = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--allowed-origin",
        value_name: "URL",
        about: "accept browsers only from this origin (repeatable)",
        default: None,
        kind: Kind::List,
        set: |c, name, v| {
            c.allowed_origins.push(parse_origin(name, v)?);
            Ok(())
        },
    },
    Opt {
        flag: "--max-body",
        value_name: "BYTES",
        about: "largest chat message body",
        default: Some("8192"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.max_body = parse_count(name, v, 1)?;
            Ok(())
        },
    },
    Opt {
        flag: "--presence-limit",
        value_name: "N",
        about: "send join/leave only while at most N are online",
        default: Some("1000"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.presence_limit = parse_count(name, v, 0)?;
            Ok(())
        },
    },
    Opt {
        flag: "--ping-interval",
        value_name: "DUR",
        about: "how often the server pings each client",
        default: Some("25s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.ping_interval = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--idle-timeout",
        value_name: "DUR",
        about: "close a connection silent this long",
        default: Some("60s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.idle_timeout = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--write-timeout",
        value_name: "DUR",
        about: "close a connection whose backlog is stuck this long",
        default: Some("30s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.write_timeout = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--shutdown-timeout",
        value_name: "DUR",
        about: "on SIGINT/SIGTERM, wait this long for clients",
        default: Some("5s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.shutdown_timeout = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--data-dir",
        value_name: "DIR|none",
        about: "where offline messages are kept; none = memory only",
        default: Some("./wschat-data"),
        kind: Kind::Value,
        set: |c, _, v| {
            c.data_dir = (v != "none").then(|| PathBuf::from(v));
            Ok(())
        },
    },
    Opt {
        flag: "--fsync",
        value_name: "always|never",
        about: "sync the outbox log before acknowledging (never: for benchmarks; a crash \
                may lose recent messages)",
        default: Some("always"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.fsync = match v {
                "always" => Sync::Always,
                "never" => Sync::Never,
                _ => return Err(ConfigError::invalid(name, v, "always or never")),
            };
            Ok(())
        },
    },
    Opt {
        flag: "--offline-max-per-user",
        value_name: "N",
        about: "messages held per user",
        default: Some("1000"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.offline_max_per_user = parse_count(name, v, 1)?;
            Ok(())
        },
    },
    Opt {
        flag: "--offline-max-bytes",
        value_name: "BYTES",
        about: "bytes held by all outboxes together",
        default: Some("67108864"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.offline_max_bytes = parse_count(name, v, 1024)?;
            Ok(())
        },
    },
    Opt {
        flag: "--offline-max-per-sender",
        value_name: "N",
        about: "messages one sender may have held, over all recipients",
        default: Some("1000"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.offline_max_per_sender = parse_count(name, v, 1)?;
            Ok(())
        },
    },
    Opt {
        flag: "--offline-max-bytes-per-sender",
        value_name: "BYTES",
        about: "bytes one sender may have held, over all recipients",
        default: Some("a sixteenth of --offline-max-bytes"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.offline_max_bytes_per_sender = Some(parse_count(name, v, 1024)?);
            Ok(())
        },
    },
    Opt {
        flag: "--offline-ttl",
        value_name: "DUR",
        about: "held messages expire after this",
        default: Some("7d"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.offline_ttl = parse_duration(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--compact-min-bytes",
        value_name: "BYTES",
        about: "compact the log once it is this big and mostly dead",
        default: Some("4194304"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.compact_min_bytes = parse_count(name, v, 1)? as u64;
            Ok(())
        },
    },
    Opt {
        flag: "--auth",
        value_name: "none|jwt",
        about: "jwt: clients present an HS256 token (Authorization: Bearer, or ?token=) whose sub is their username",
        default: Some("none"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.auth = match v {
                "none" => AuthMode::None,
                "jwt" => AuthMode::Jwt,
                _ => return Err(ConfigError::invalid(name, v, "none or jwt")),
            };
            Ok(())
        },
    },
    Opt {
        flag: "--auth-secret-file",
        value_name: "PATH",
        about: "the HS256 secret (at least 32 bytes, not readable by others); needed with --auth jwt",
        default: None,
        kind: Kind::Value,
        set: |c, _, v| {
            c.auth_secret_file = Some(PathBuf::from(v));
            Ok(())
        },
    },
    Opt {
        flag: "--auth-leeway",
        value_name: "DUR",
        about: "how far a token's exp and nbf may be off",
        default: Some("30s"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.auth_leeway = parse_duration_or_zero(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--auth-audience",
        value_name: "AUD",
        about: "tokens must carry this aud",
        default: None,
        kind: Kind::Value,
        set: |c, _, v| {
            c.auth_audience = Some(v.to_owned());
            Ok(())
        },
    },
    Opt {
        flag: "--auth-issuer",
        value_name: "ISS",
        about: "tokens must carry this iss",
        default: None,
        kind: Kind::Value,
        set: |c, _, v| {
            c.auth_issuer = Some(v.to_owned());
            Ok(())
        },
    },
    Opt {
        flag: "--max-known-users",
        value_name: "N",
        about: "names remembered as users, who may be sent offline messages",
        default: Some("1000000"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.max_known_users = parse_count(name, v, 1)?;
            Ok(())
        },
    },
    Opt {
        flag: "--offline-to-unknown",
        value_name: "",
        about: "without --auth: hold private messages for names that never connected",
        default: None,
        kind: Kind::Switch,
        set: |c, name, v| {
            c.offline_to_unknown = parse_switch(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--metrics-listen",
        value_name: "ADDR",
        about: "serve /metrics (and /healthz) here instead of on --listen, e.g. 127.0.0.1:9090",
        default: None,
        kind: Kind::Value,
        set: |c, name, v| {
            c.metrics_listen = Some(parse_addr(name, v)?);
            Ok(())
        },
    },
    Opt {
        flag: "--cluster",
        value_name: "REDIS_URL",
        about: "be one node of a chat shared over Redis: redis://[:PASSWORD@]HOST:PORT[/DB]",
        default: None,
        kind: Kind::Value,
        set: |c, name, v| {
            let url = crate::cluster::RedisUrl::parse(v)
                .map_err(|why| ConfigError::invalid(name, "(the URL)", &why))?;
            c.cluster = Some(url);
            Ok(())
        },
    },
    Opt {
        flag: "--cluster-prefix",
        value_name: "PREFIX",
        about: "prefix of the cluster's Redis keys and channels",
        default: Some("wschat"),
        kind: Kind::Value,
        set: |c, name, v| {
            if v.is_empty() || v.len() > 64 || v.bytes().any(|b| b.is_ascii_whitespace()) {
                return Err(ConfigError::invalid(name, v, "1-64 characters, no spaces"));
            }
            c.cluster_prefix = v.to_string();
            Ok(())
        },
    },
    Opt {
        flag: "--cluster-lease",
        value_name: "DUR",
        about: "how long names of a node that died stay taken (renewed every third)",
        default: Some("15s"),
        kind: Kind::Value,
        set: |c, name, v| {
            let lease = parse_duration(name, v)?;
            if lease < Duration::from_secs(1) {
                return Err(ConfigError::invalid(name, v, "at least 1s"));
            }
            c.cluster_lease = lease;
            Ok(())
        },
    },
    Opt {
        flag: "--reuseport",
        value_name: "",
        about: "set SO_REUSEPORT so several processes share --listen's port",
        default: None,
        kind: Kind::Switch,
        set: |c, name, v| {
            c.reuseport = parse_switch(name, v)?;
            Ok(())
        },
    },
    Opt {
        flag: "--rate-limit",
        value_name: "N",
        about: "chat messages per second per connection (acks and token renewals are free); \
                beyond it rate_limited errors, and close 1008 for a sender that keeps on; 0 = off",
        default: Some("20"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.limits.rate_limit = parse_u32(name, v, 0)?;
            Ok(())
        },
    },
    Opt {
        flag: "--rate-burst",
        value_name: "N",
        about: "messages a connection may send at once before --rate-limit applies",
        default: Some("40"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.limits.rate_burst = parse_u32(name, v, 1)?;
            Ok(())
        },
    },
    Opt {
        flag: "--max-connections-per-ip",
        value_name: "N",
        about: "connections one client address (an IPv6 /64) may hold; more get 429; 0 = off",
        default: Some("64"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.limits.max_connections_per_ip = parse_u32(name, v, 0)?;
            Ok(())
        },
    },
    Opt {
        flag: "--max-handshakes-per-ip",
        value_name: "N",
        about: "connections one client address may open per second; more get 429; 0 = off",
        default: Some("30"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.limits.max_handshakes_per_ip = parse_u32(name, v, 0)?;
            Ok(())
        },
    },
    Opt {
        flag: "--trusted-proxy",
        value_name: "IP|CIDR",
        about: "a reverse proxy whose X-Forwarded-For names the client, for the per-address \
                limits and the log (repeatable)",
        default: None,
        kind: Kind::List,
        set: |c, name, v| {
            let cidr = crate::limits::forwarded::Cidr::parse(v).ok_or_else(|| {
                ConfigError::invalid(name, v, "an IP address or a CIDR such as 10.0.0.0/8")
            })?;
            c.limits.trusted_proxies.0.push(cidr);
            Ok(())
        },
    },
    Opt {
        flag: "--log",
        value_name: "LEVEL",
        about: "error | warn | info | debug",
        default: Some("info"),
        kind: Kind::Value,
        set: |c, name, v| {
            c.log_level = Level::parse(v)
                .ok_or_else(|| ConfigError::invalid(name, v, "one of error, warn, info, debug"))?;
            Ok(())
        },
    },
];

const HELP_HEAD: &str = "\
wschat: a single-threaded WebSocket chat server

USAGE: wschat [OPTIONS]

Each option can also be set by the environment variable shown with it; a flag
wins over its variable, and an empty variable counts as unset.

OPTIONS:
";

const HELP_TAIL: &str = "  -V, --version              print the version
  -h, --help                 print this help

DUR is a number of seconds or a number with ms, s, m, h or d (500ms, 10s, 2m,
7d). A switch's variable takes 1, true, 0 or false; a repeatable option's
variable takes a comma-separated list.
";

/// Where the description column of `--help` starts, and where it wraps.
const HELP_INDENT: usize = 29;
const HELP_WIDTH: usize = 80;

/// The `--help` text, built from [`OPTIONS`].
pub fn help() -> String {
    let mut out = String::from(HELP_HEAD);
    for opt in OPTIONS {
        let usage = if opt.value_name.is_empty() {
            opt.flag.to_owned()
        } else {
            format!("{} {}", opt.flag, opt.value_name)
        };
        // Bracketed notes are kept whole when the line wraps.
        let mut words: Vec<String> = opt.about.split_whitespace().map(str::to_owned).collect();
        if let Some(default) = opt.default {
            words.push(format!("[default: {default}]"));
        }
        words.push(format!("[env: {}]", opt.env_var()));
        let mut line = format!("  {usage:<width$}", width = HELP_INDENT - 3);
        if line.len() >= HELP_INDENT {
            out.push_str(&line);
            out.push('\n');
            line = " ".repeat(HELP_INDENT - 1);
        }
        for (i, word) in words.iter().enumerate() {
            if i > 0 && line.len() + 1 + word.len() > HELP_WIDTH {
                out.push_str(&line);
                out.push('\n');
                line = " ".repeat(HELP_INDENT - 1);
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(HELP_TAIL);
    out
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run,
    Help,
    Version,
}

/// A mistake in the command line or the environment, printed as one line.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// An argument that is no option.
    UnknownOption(String),
    /// A flag given without its value.
    MissingValue(&'static str),
    /// A switch given a value on the command line (`--echo=yes`).
    UnexpectedValue(&'static str),
    /// A variable whose value is not UTF-8.
    NotUtf8(String),
    /// A value its option cannot take; `name` is the flag or the variable.
    Invalid {
        name: String,
        value: String,
        expected: String,
    },
}

impl ConfigError {
    fn invalid(name: &str, value: &str, expected: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            name: name.to_owned(),
            value: value.to_owned(),
            expected: expected.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::UnknownOption(arg) => write!(f, "unknown option '{arg}'"),
            ConfigError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            ConfigError::UnexpectedValue(flag) => write!(f, "{flag} takes no value"),
            ConfigError::NotUtf8(name) => write!(f, "{name} is not UTF-8"),
            ConfigError::Invalid {
                name,
                value,
                expected,
            } => write!(f, "{name}: '{value}' is not {expected}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses the arguments (without the program name) over the environment
    /// that `env` looks variables up in (`std::env::var_os` in the binary, a
    /// table in tests). A flag wins over its variable; a variable whose
    /// option is given as a flag is not read at all.
    pub fn parse<I, E>(args: I, env: E) -> Result<(Config, Command), ConfigError>
    where
        I: IntoIterator<Item = String>,
        E: Fn(&str) -> Option<OsString>,
    {
        let mut given: Vec<(&Opt, String)> = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            match flag {
                "-h" | "--help" => return Ok((Config::default(), Command::Help)),
                "-V" | "--version" => return Ok((Config::default(), Command::Version)),
                _ => {}
            }
            let opt = OPTIONS
                .iter()
                .find(|opt| opt.flag == flag)
                .ok_or_else(|| ConfigError::UnknownOption(arg.clone()))?;
            let value = match (opt.kind, inline) {
                (Kind::Switch, None) => "true".to_owned(),
                (Kind::Switch, Some(_)) => return Err(ConfigError::UnexpectedValue(opt.flag)),
                (_, Some(value)) => value,
                (_, None) => args.next().ok_or(ConfigError::MissingValue(opt.flag))?,
            };
            given.push((opt, value));
        }

        let mut config = Config::default();
        for opt in OPTIONS {
            if given.iter().any(|(flagged, _)| std::ptr::eq(*flagged, opt)) {
                continue;
            }
            let name = opt.env_var();
            let Some(value) = env(&name) else {
                continue;
            };
            let value = value
                .into_string()
                .map_err(|_| ConfigError::NotUtf8(name.clone()))?;
            if value.is_empty() {
                continue;
            }
            match opt.kind {
                Kind::List => {
                    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                        (opt.set)(&mut config, &name, item)?;
                    }
                }
                Kind::Switch | Kind::Value => (opt.set)(&mut config, &name, &value)?,
            }
        }
        for (opt, value) in given {
            (opt.set)(&mut config, opt.flag, &value)?;
        }
        Ok((config, Command::Run))
    }
}

fn parse_addr(name: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| ConfigError::invalid(name, text, "an address such as 127.0.0.1:8080"))
}

fn parse_u32(name: &str, text: &str, min: u32) -> Result<u32, ConfigError> {
    match text.parse::<u32>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(ConfigError::invalid(
            name,
            text,
            format!("a whole number from {min} to {}", u32::MAX),
        )),
    }
}

fn parse_count(name: &str, text: &str, min: usize) -> Result<usize, ConfigError> {
    match text.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(ConfigError::invalid(
            name,
            text,
            format!("a whole number of at least {min}"),
        )),
    }
}

/// A switch's value in the environment (the flag alone passes `true`).
fn parse_switch(name: &str, text: &str) -> Result<bool, ConfigError> {
    match text {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(ConfigError::invalid(name, text, "1, true, 0 or false")),
    }
}

fn parse_origin(name: &str, text: &str) -> Result<String, ConfigError> {
    if text.starts_with("http://") || text.starts_with("https://") {
        Ok(text.to_owned())
    } else {
        Err(ConfigError::invalid(
            name,
            text,
            "an http(s) origin such as https://chat.example",
        ))
    }
}

/// `10` (seconds), `10s`, `500ms`, `2m`.
pub fn parse_duration(name: &str, text: &str) -> Result<Duration, ConfigError> {
    match parse_duration_or_zero(name, text)? {
        Duration::ZERO => Err(ConfigError::invalid(
            name,
            text,
            "a duration such as 500ms, 10s or 2m",
        )),
        duration => Ok(duration),
    }
}

/// [`parse_duration`] that also takes zero (`0s`: no leeway at all).
fn parse_duration_or_zero(name: &str, text: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::invalid(name, text, "a duration such as 500ms, 10s or 2m");
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
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Config, Command), ConfigError> {
        parse_in(args, &[])
    }

    /// Parses `args` over an environment holding only `vars`.
    fn parse_in(args: &[&str], vars: &[(&str, &str)]) -> Result<(Config, Command), ConfigError> {
        let env = |name: &str| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| OsString::from(value))
        };
        Config::parse(args.iter().map(|s| s.to_string()), env)
    }

    fn config_in(args: &[&str], vars: &[(&str, &str)]) -> Config {
        parse_in(args, vars).expect("valid").0
    }

    /// Config has no `PartialEq` (nor needs one); its Debug text shows every field.
    fn same(a: &Config, b: &Config) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    /// A value each kind of placeholder takes, unlike its default. A new
    /// placeholder fails `every_variable_sets_its_option_like_its_flag`
    /// until it is given one here.
    fn example(value_name: &str) -> &'static str {
        match value_name {
            "ADDR" => "127.0.0.1:9",
            "N" => "7",
            "BYTES" => "4096",
            "DUR" => "3s",
            "URL" => "https://chat.example",
            "DIR|none" => "none",
            "always|never" => "never",
            "LEVEL" => "debug",
            "none|jwt" => "jwt",
            "PATH" => "/run/secrets/wschat",
            "AUD" => "chat",
            "ISS" => "https://auth.example",
            "REDIS_URL" => "redis://:pw@127.0.0.1:6379/2",
            "PREFIX" => "chat1",
            "IP|CIDR" => "10.0.0.0/8",
            other => panic!("no example value for {other}: add one"),
        }
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
    }

    #[test]
    fn commands() {
        for (args, command) in [
            (&["--help"][..], Command::Help),
            (&["-h"], Command::Help),
            (&["--version"], Command::Version),
            (&["-V"], Command::Version),
            (&["--max-body", "10", "-V", "--bogus"], Command::Version),
        ] {
            assert_eq!(parse(args).unwrap().1, command, "{args:?}");
        }
        // A broken environment does not stand in the way of --help.
        let broken = [("WSCHAT_MAX_BODY", "lots")];
        assert_eq!(parse_in(&["--help"], &broken).unwrap().1, Command::Help);
    }

    #[test]
    fn limits_take_their_values() {
        let c = config_in(
            &[
                "--rate-limit",
                "0",
                "--rate-burst=3",
                "--trusted-proxy",
                "10.0.0.1",
            ],
            &[
                ("WSCHAT_MAX_CONNECTIONS_PER_IP", "5"),
                ("WSCHAT_MAX_HANDSHAKES_PER_IP", "0"),
                ("WSCHAT_TRUSTED_PROXY", "192.0.2.0/24, fd00::/8"),
            ],
        );
        assert_eq!((c.limits.rate_limit, c.limits.rate_burst), (0, 3));
        assert_eq!(c.limits.max_connections_per_ip, 5);
        assert_eq!(c.limits.max_handshakes_per_ip, 0);
        // The flag wins over its variable, as for every option.
        let proxies: Vec<String> = c
            .limits
            .trusted_proxies
            .0
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(proxies, ["10.0.0.1/32"]);
        let c = config_in(&[], &[("WSCHAT_TRUSTED_PROXY", "192.0.2.0/24, fd00::/8")]);
        let proxies: Vec<String> = c
            .limits
            .trusted_proxies
            .0
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(proxies, ["192.0.2.0/24", "fd00::/8"]);
        let d = Config::default().limits;
        assert_eq!(
            (
                d.rate_limit,
                d.rate_burst,
                d.max_connections_per_ip,
                d.max_handshakes_per_ip
            ),
            (20, 40, 64, 30)
        );
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
            &["--echo=yes"],
            &["--rate-limit", "-1"],
            &["--rate-limit", "4294967296"],
            &["--rate-burst", "0"],
            &["--trusted-proxy", "proxy.example"],
            &["--trusted-proxy", "10.0.0.0/33"],
        ] {
            let err = parse(args).expect_err("should fail");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn variable_names_follow_the_flags() {
        for (flag, var) in [
            ("--listen", "WSCHAT_LISTEN"),
            ("--echo", "WSCHAT_ECHO"),
            ("--max-outbound", "WSCHAT_MAX_OUTBOUND"),
            ("--offline-max-per-user", "WSCHAT_OFFLINE_MAX_PER_USER"),
            ("--log", "WSCHAT_LOG"),
        ] {
            let opt = OPTIONS.iter().find(|o| o.flag == flag).expect(flag);
            assert_eq!(opt.env_var(), var);
        }
        let mut vars: Vec<String> = OPTIONS.iter().map(Opt::env_var).collect();
        vars.sort();
        vars.dedup();
        assert_eq!(vars.len(), OPTIONS.len(), "two options share a variable");
    }

    #[test]
    fn every_variable_sets_its_option_like_its_flag() {
        let default = Config::default();
        for opt in OPTIONS {
            let var = opt.env_var();
            let (flagged, from_env) = match opt.kind {
                Kind::Switch => {
                    assert!(opt.value_name.is_empty(), "{}", opt.flag);
                    (config_in(&[opt.flag], &[]), config_in(&[], &[(&var, "1")]))
                }
                Kind::Value | Kind::List => {
                    let value = example(opt.value_name);
                    (
                        config_in(&[opt.flag, value], &[]),
                        config_in(&[], &[(&var, value)]),
                    )
                }
            };
            assert!(!same(&flagged, &default), "{} changes nothing", opt.flag);
            assert!(same(&flagged, &from_env), "{var} is not {}", opt.flag);
        }
    }

    #[test]
    fn flags_win_over_variables() {
        let vars = [
            ("WSCHAT_MAX_BODY", "100"),
            ("WSCHAT_LOG", "warn"),
            ("WSCHAT_ECHO", "1"),
            (
                "WSCHAT_ALLOWED_ORIGIN",
                "https://a.example, https://b.example",
            ),
        ];
        let c = config_in(&[], &vars);
        assert_eq!(c.max_body, 100);
        assert_eq!(c.log_level, Level::Warn);
        assert!(c.echo);
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        let c = config_in(
            &["--max-body=200", "--allowed-origin", "https://c.example"],
            &vars,
        );
        assert_eq!(c.max_body, 200);
        assert_eq!(c.allowed_origins, ["https://c.example"]);
        assert_eq!(
            c.log_level,
            Level::Warn,
            "a variable no flag overrides stays"
        );
        // A variable whose option is given as a flag is not read at all.
        let c = config_in(&["--max-body", "300"], &[("WSCHAT_MAX_BODY", "lots")]);
        assert_eq!(c.max_body, 300);
    }

    #[test]
    fn bad_variables_are_errors_naming_them() {
        for (var, value) in [
            ("WSCHAT_MAX_BODY", "lots"),
            ("WSCHAT_MAX_OUTBOUND", "10"),
            ("WSCHAT_LISTEN", "nowhere"),
            ("WSCHAT_ECHO", "yes"),
            ("WSCHAT_LOG", "loud"),
            ("WSCHAT_FSYNC", "sometimes"),
            ("WSCHAT_HANDSHAKE_TIMEOUT", "0"),
            ("WSCHAT_ALLOWED_ORIGIN", "https://a.example,chat.example"),
        ] {
            let err = parse_in(&[], &[(var, value)]).expect_err(var);
            let text = err.to_string();
            assert!(text.starts_with(&format!("{var}: ")), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }

    #[test]
    fn switch_variables_and_empty_ones() {
        for (value, echo) in [("1", true), ("true", true), ("0", false), ("false", false)] {
            assert_eq!(
                config_in(&[], &[("WSCHAT_ECHO", value)]).echo,
                echo,
                "{value}"
            );
        }
        // An empty variable counts as unset (`WSCHAT_LOG=` in a unit file).
        let c = config_in(&[], &[("WSCHAT_ECHO", ""), ("WSCHAT_LISTEN", "")]);
        assert!(same(&c, &Config::default()));
        // Variables that name no option (WSCHAT_BIN, used by the tests) are not ours.
        assert!(parse_in(&[], &[("WSCHAT_BIN", "x")]).is_ok());
    }

    #[test]
    fn a_variable_that_is_not_utf8_is_named() {
        use std::os::unix::ffi::OsStringExt;
        let env = |name: &str| (name == "WSCHAT_DATA_DIR").then(|| OsString::from_vec(vec![0xff]));
        let err = Config::parse(Vec::new(), env).expect_err("not UTF-8");
        assert_eq!(err, ConfigError::NotUtf8("WSCHAT_DATA_DIR".into()));
    }

    #[test]
    fn defaults_in_help_are_the_real_ones() {
        // Shown as prose or as a path spelled differently from the value.
        let described = [
            "--max-connections",
            "--data-dir",
            "--offline-max-bytes-per-sender",
        ];
        let default = Config::default();
        for opt in OPTIONS.iter().filter(|o| !described.contains(&o.flag)) {
            let Some(shown) = opt.default else { continue };
            let set = config_in(&[opt.flag, shown], &[]);
            assert!(same(&set, &default), "{} [default: {shown}]", opt.flag);
        }
    }

    #[test]
    fn help_lists_every_option_with_its_variable() {
        let text = help();
        for opt in OPTIONS {
            assert!(text.contains(&format!("  {} ", opt.flag)), "{}", opt.flag);
            assert!(
                text.contains(&format!("[env: {}]", opt.env_var())),
                "{}",
                opt.flag
            );
        }
        for line in text.lines() {
            assert!(line.chars().count() <= HELP_WIDTH, "too wide: {line}");
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
