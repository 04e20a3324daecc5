//! The deployment recipes of docs/DEPLOY.md, run for real:
//!
//! - `docs/deploy/nginx-wschat.conf`, this very file with only its port,
//!   certificate and upstream address substituted, in a real nginx in front
//!   of a real wschat, and two clients chatting through it over `wss://`
//!   (needs `nginx` and the `openssl` command, for a self-signed
//!   certificate);
//! - `docs/deploy/wschat.service` and `wschat@.service` through `systemd-analyze verify`.
//!
//! A missing program gives one `skipped:` line and a pass, except under
//! `CI=true` (see `tests/support/skip.rs`).

mod support;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

use support::skip::{find_program, skip};
use support::spawn::{self, Spawned};

const NGINX_RECIPE: &str = include_str!("../docs/deploy/nginx-wschat.conf");
const SYSTEMD_UNIT: &str = include_str!("../docs/deploy/wschat.service");
const SYSTEMD_TEMPLATE: &str = include_str!("../docs/deploy/wschat@.service");

/// Read timeout of every test socket: a test waiting for an answer that
/// never comes fails after this long instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long nginx may take to accept connections.
const NGINX_STARTUP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// A scratch directory and the recipe's substitutions
// ---------------------------------------------------------------------------

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "wschat-deploy-{label}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create the temp dir");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// `path(name)` as text, for configuration files.
    fn text_path(&self, name: &str) -> String {
        self.path(name)
            .to_str()
            .expect("the temp dir's path is UTF-8")
            .to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `text` with its one occurrence of `from` replaced by `to`. Fails if the
/// recipe no longer says `from` exactly once, so the test cannot drift
/// away from the documented file unnoticed.
fn substitute(text: &str, from: &str, to: &str) -> String {
    let found = text.matches(from).count();
    assert_eq!(
        found, 1,
        "the recipe should contain {from:?} once (found {found} times)"
    );
    text.replacen(from, to, 1)
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

/// A self-signed certificate for `localhost`: PEM files for nginx, and the
/// certificate's DER for the client to pin.
struct Certificate {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn make_certificate(openssl: &Path, dir: &TempDir) -> Certificate {
    let (cert_pem, key_pem, der) = (
        dir.text_path("cert.pem"),
        dir.text_path("key.pem"),
        dir.path("cert.der"),
    );
    let run = |args: &[&str]| {
        let out = Command::new(openssl)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-keyout",
        &key_pem,
        "-out",
        &cert_pem,
    ]);
    run(&[
        "x509",
        "-in",
        &cert_pem,
        "-outform",
        "DER",
        "-out",
        der.to_str().expect("UTF-8 path"),
    ]);
    Certificate {
        der: std::fs::read(&der).expect("read cert.der"),
        cert_pem,
        key_pem,
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// The recipe as this test runs it: listening on `listen` with `cert`, in
/// front of the wschat at `upstream`. Nothing else is changed.
fn recipe_for_test(listen: SocketAddr, cert: &Certificate, upstream: SocketAddr) -> String {
    let conf = substitute(
        NGINX_RECIPE,
        "listen 443 ssl;",
        &format!("listen {listen} ssl;"),
    );
    let conf = substitute(&conf, "listen [::]:443 ssl;", "");
    let conf = substitute(
        &conf,
        "/etc/letsencrypt/live/chat.example.org/fullchain.pem",
        &cert.cert_pem,
    );
    let conf = substitute(
        &conf,
        "/etc/letsencrypt/live/chat.example.org/privkey.pem",
        &cert.key_pem,
    );
    substitute(
        &conf,
        "server 127.0.0.1:8080;",
        &format!("server {upstream};"),
    )
}

/// nginx in the foreground, one process, everything it writes in `dir`;
/// killed on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    fn start(nginx: &Path, dir: TempDir, recipe: &str, addr: SocketAddr) -> Nginx {
        std::fs::write(dir.path("wschat.conf"), recipe).expect("write wschat.conf");
        let main_conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {pid};
error_log {error_log} info;
events {{ worker_connections 64; }}
http {{
    access_log {access_log};
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {recipe};
}}
",
            pid = dir.text_path("nginx.pid"),
            error_log = dir.text_path("error.log"),
            access_log = dir.text_path("access.log"),
            tmp = dir.text_path(""),
            recipe = dir.text_path("wschat.conf"),
        );
        std::fs::write(dir.path("nginx.conf"), main_conf).expect("write nginx.conf");
        let stderr = File::create(dir.path("stderr.log")).expect("create stderr.log");
        let child = Command::new(nginx)
            // -e: the log nginx opens before it reads its configuration
            // (Debian's default, /var/log/nginx/error.log, may not be writable).
            .arg("-e")
            .arg(dir.path("error.log"))
            .arg("-p")
            .arg(dir.path(""))
            .arg("-c")
            .arg(dir.path("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nginx.display()));
        let mut started = Nginx { child, addr, dir };
        started.wait_until_accepting();
        started
    }

    /// Waits until nginx accepts TCP connections; fails with its logs if it
    /// exits or takes too long.
    fn wait_until_accepting(&mut self) {
        let deadline = Instant::now() + NGINX_STARTUP;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for nginx") {
                panic!("nginx exited ({status}) before accepting:\n{}", self.logs());
            }
            if TcpStream::connect(self.addr).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not accept on {} within {NGINX_STARTUP:?}:\n{}",
                self.addr,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// nginx's stderr and error log.
    fn logs(&self) -> String {
        ["stderr.log", "error.log"]
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.path(name)).unwrap_or_default();
                format!("--- {name}:\n{text}")
            })
            .join("\n")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// A TLS client that trusts exactly the test's certificate
// ---------------------------------------------------------------------------

/// Accepts the one certificate the test made (byte for byte) and checks the
/// handshake's signatures with it as rustls always does.
#[derive(Debug)]
struct PinnedCertificate {
    der: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.der.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection from `source` to `addr` as `localhost`, trusting only
/// `cert_der`.
fn tls_connect(source: Ipv4Addr, addr: SocketAddr, cert_der: &[u8]) -> TlsStream {
    let provider = Arc::new(ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
            der: cert_der.to_vec(),
            provider,
        }))
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("server name");
    let connection = ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let tcp = support::source::connect_from(source, addr);
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    tcp.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    StreamOwned::new(connection, tcp)
}

/// `GET path` over TLS; the status code and body.
fn https_get(addr: SocketAddr, cert_der: &[u8], path: &str) -> (u16, String) {
    let mut tls = tls_connect(Ipv4Addr::LOCALHOST, addr, cert_der);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    read_response(&mut tls)
}

/// Reads an HTTP/1.1 response to the end of its connection.
fn read_response(stream: &mut impl Read) -> (u16, String) {
    let mut bytes = Vec::new();
    match stream.read_to_end(&mut bytes) {
        Ok(_) => {}
        // A peer that closes without TLS close_notify; what came is kept.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !bytes.is_empty() => {}
        Err(e) => panic!("reading the response: {e}"),
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    (status, body)
}

/// `GET path` in plain HTTP (wschat's metrics address).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    read_response(&mut tcp)
}

// ---------------------------------------------------------------------------
// Chat clients over wss://
// ---------------------------------------------------------------------------

type Client = WebSocket<TlsStream>;

/// Where the two chat clients connect to nginx from.
const ALICE_AT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const BOB_AT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// What each client claims in an `X-Forwarded-For` of its own, which nginx
/// must replace.
const FORGED_CLIENT: &str = "203.0.113.9";

/// `username` connected through nginx from `source`, claiming to be
/// `FORGED_CLIENT` in its own `X-Forwarded-For`; returns once its
/// `welcome` came.
fn join(source: Ipv4Addr, nginx: SocketAddr, cert_der: &[u8], username: &str) -> Client {
    let url = format!("wss://localhost:{}/ws?username={username}", nginx.port());
    let mut request = url.into_client_request().expect("a client request");
    request
        .headers_mut()
        .insert("X-Forwarded-For", HeaderValue::from_static(FORGED_CLIENT));
    let tls = tls_connect(source, nginx, cert_der);
    let (mut client, response) = tungstenite::client(request, tls)
        .unwrap_or_else(|e| panic!("WebSocket handshake through nginx for {username}: {e}"));
    assert_eq!(response.status().as_u16(), 101);
    let welcome = next_of_type(&mut client, "welcome");
    assert_eq!(welcome["username"], username, "{welcome}");
    client
}

fn send(client: &mut Client, message: Value) {
    client
        .send(Message::text(message.to_string()))
        .expect("send through nginx");
}

/// The next event of type `kind`, skipping others (presence events).
fn next_of_type(client: &mut Client, kind: &str) -> Value {
    for _ in 0..100 {
        match client.read() {
            Ok(Message::Text(text)) => {
                let event: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
                if event["type"] == kind {
                    return event;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("waiting for a {kind} event: {e}"),
        }
    }
    panic!("no {kind} event among the next 100 messages");
}

/// The address in the server's `metrics on ADDR` line.
fn metrics_addr(server: &Spawned) -> SocketAddr {
    server
        .log
        .lines()
        .iter()
        .find_map(|line| spawn::address_after(line, "metrics on "))
        .unwrap_or_else(|| panic!("no `metrics on` line:\n{}", server.log.text()))
}

#[test]
fn chat_over_wss_through_the_nginx_recipe() {
    const TEST: &str = "chat_over_wss_through_the_nginx_recipe";
    let Some(nginx) = find_program("nginx") else {
        return skip(TEST, "no nginx");
    };
    let Some(openssl) = find_program("openssl") else {
        return skip(TEST, "no openssl (for a self-signed certificate)");
    };
    let dir = TempDir::new("nginx");
    let cert = make_certificate(&openssl, &dir);
    // As the recipe's upstream comment says, with a metrics port of its own.
    let mut server = spawn::start_test_server(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let recipe = recipe_for_test(addr, &cert, server.addr);
    let proxy = Nginx::start(&nginx, dir, &recipe, addr);

    // Two clients at addresses of their own, as wschat should see them.
    let mut alice = join(ALICE_AT, addr, &cert.der, "alice");
    let mut bob = join(BOB_AT, addr, &cert.der, "bob");

    send(
        &mut alice,
        json!({"type": "public", "body": "hello over wss"}),
    );
    for client in [&mut alice, &mut bob] {
        let public = next_of_type(client, "public");
        assert_eq!(
            (&public["from"], &public["body"]),
            (&json!("alice"), &json!("hello over wss")),
            "{public}"
        );
    }

    send(
        &mut bob,
        json!({"type": "private", "to": "alice", "body": "just you", "ref": "r-1"}),
    );
    let receipt = next_of_type(&mut bob, "receipt");
    assert_eq!(
        (&receipt["ref"], &receipt["status"]),
        (&json!("r-1"), &json!("delivered")),
        "{receipt}"
    );
    let private = next_of_type(&mut alice, "private");
    assert_eq!(
        (&private["from"], &private["to"], &private["body"]),
        (&json!("bob"), &json!("alice"), &json!("just you")),
        "{private}"
    );
    assert_eq!(private["id"], receipt["id"], "{private} {receipt}");

    // A health check passes through; metrics do not, and are served on the
    // metrics address instead.
    let (status, health) = https_get(addr, &cert.der, "/healthz");
    assert_eq!((status, health.trim_end()), (200, "ok"));
    assert_eq!(https_get(addr, &cert.der, "/metrics").0, 404);
    let (status, metrics) = http_get(metrics_addr(&server), "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("wschat_"), "{metrics}");

    // wschat took each client's address from nginx's X-Forwarded-For, not
    // the proxy's and not what the client wrote in its own. (It logged that
    // at the handshake and has flushed its log since, before each wait;
    // stopping it makes the log read here complete.)
    server.stop();
    let log = server.log.text();
    for client in [ALICE_AT, BOB_AT] {
        let line = format!("client {client} (through 127.0.0.1)");
        assert!(log.contains(&line), "no {line:?} in:\n{log}");
    }
    assert!(!log.contains(FORGED_CLIENT), "{log}");

    drop(proxy);
}

// ---------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    const TEST: &str = "systemd_units_pass_systemd_analyze_verify";
    let Some(analyze) = find_program("systemd-analyze") else {
        return skip(TEST, "no systemd-analyze");
    };
    let dir = TempDir::new("systemd");
    // The template is checked as its instance 1 (`%i` = 1).
    for (text, name) in [
        (SYSTEMD_UNIT, "wschat.service"),
        (SYSTEMD_TEMPLATE, "wschat@1.service"),
    ] {
        // verify checks that ExecStart's program exists: the unit runs the
        // binary under test here instead of /usr/local/bin/wschat.
        let unit = substitute(
            text,
            "/usr/local/bin/wschat ",
            &format!("{} ", spawn::bin()),
        );
        let path = dir.path(name);
        std::fs::write(&path, unit).expect("write the unit");
        let out = Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // verify exits 0 after an unknown key or a bad value, with a warning
        // naming the unit: any line about it fails the test. (On a machine
        // without systemd running it may also print lines about other units.)
        let about_the_unit: Vec<&str> = stderr.lines().filter(|line| line.contains(name)).collect();
        assert!(
            out.status.success() && about_the_unit.is_empty(),
            "systemd-analyze verify {name}: {}\n{stderr}",
            out.status
        );
    }
}
