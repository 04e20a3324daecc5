//! The opening handshake (RFC 6455 section 4.2) and the plain HTTP requests
//! served on the same port, without I/O.
//!
//! httparse is a push parser that re-parses from the start on every call, so
//! the caller buffers the request head and must bound it: [`MAX_HEAD`] bytes
//! here, and a deadline in the event loop.

use crate::http::{Method, Response, Status};

/// The most bytes a request head may take (RFC 6585 431 beyond).
pub const MAX_HEAD: usize = 8 * 1024;

/// The most headers a request may have; more is answered with 431 too.
const MAX_HEADERS: usize = 64;

/// The GUID of RFC 6455 section 1.3, appended to the key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Static resources a plain GET or HEAD can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Health,
    /// The chat page.
    Page,
    /// Prometheus metrics.
    Metrics,
}

/// What to do with the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The head is incomplete: read more.
    Partial,
    /// A valid upgrade: send `response` (101), then speak WebSocket. The
    /// bytes after `head_len` already belong to the WebSocket stream.
    Upgrade(Upgrade),
    /// A plain request for a resource the server renders (see
    /// [`crate::endpoints`]).
    Serve { resource: Resource, method: Method },
    /// Answer with this and close.
    Reject(Response),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub response: Vec<u8>,
    /// The query string of the request target, without the `?`.
    pub query: String,
    /// The `Authorization` header (at most one), for `--auth jwt`.
    pub authorization: Option<String>,
    /// Every `X-Forwarded-For` value, in order, joined by commas (read only
    /// when the peer is a `--trusted-proxy`; see `limits::forwarded`).
    pub forwarded_for: Option<String>,
    pub head_len: usize,
}

/// The server's rules for accepting an upgrade.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    /// When non-empty, a browser `Origin` must be one of these.
    pub allowed_origins: Vec<String>,
    /// Set after SIGINT/SIGTERM: the server is closing every connection, so
    /// a valid upgrade is refused with 503 rather than opened and closed.
    pub shutting_down: bool,
}

/// Parses the request head in `buf` (everything received so far).
pub fn parse(buf: &[u8], policy: &Policy) -> Outcome {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Outcome::Reject(Response::text(
                Status::HeaderTooLarge,
                "request head too large",
            ))
        }
        Ok(httparse::Status::Partial) => return Outcome::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Outcome::Reject(Response::text(Status::HeaderTooLarge, "too many headers"))
        }
        Err(_) => return Outcome::Reject(Response::text(Status::BadRequest, "malformed request")),
    };
    if head_len > MAX_HEAD {
        return Outcome::Reject(Response::text(
            Status::HeaderTooLarge,
            "request head too large",
        ));
    }
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Outcome::Reject(Response::text(Status::BadRequest, "malformed request"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let is_upgrade = header_has_token(request.headers, "upgrade", "websocket");

    match path {
        "/healthz" | "/metrics" | "/" if !is_upgrade => {
            let method = match method {
                "GET" => Method::Get,
                "HEAD" => Method::Head,
                _ => {
                    return Outcome::Reject(
                        Response::text(Status::MethodNotAllowed, "use GET or HEAD")
                            .with_header("Allow", "GET, HEAD"),
                    )
                }
            };
            let resource = match path {
                "/healthz" => Resource::Health,
                "/metrics" => Resource::Metrics,
                _ => Resource::Page,
            };
            Outcome::Serve { resource, method }
        }
        "/ws" | "/" if is_upgrade || path == "/ws" => {
            if method != "GET" {
                return Outcome::Reject(
                    Response::text(Status::MethodNotAllowed, "use GET").with_header("Allow", "GET"),
                );
            }
            match check_upgrade(version, request.headers, policy) {
                Ok(_) if policy.shutting_down => Outcome::Reject(Response::text(
                    Status::ServiceUnavailable,
                    "server shutting down",
                )),
                Ok(response) => match single_header(request.headers, "authorization") {
                    Ok(authorization) => Outcome::Upgrade(Upgrade {
                        response,
                        query: query.to_owned(),
                        authorization: authorization
                            .map(|value| String::from_utf8_lossy(trim(value)).into_owned()),
                        forwarded_for: joined_header(request.headers, "x-forwarded-for"),
                        head_len,
                    }),
                    Err(response) => Outcome::Reject(response),
                },
                Err(response) => Outcome::Reject(response),
            }
        }
        _ => Outcome::Reject(Response::text(Status::NotFound, "not found")),
    }
}

/// Checks the upgrade headers; returns the 101 response or the refusal.
fn check_upgrade(
    version: u8,
    headers: &[httparse::Header<'_>],
    policy: &Policy,
) -> Result<Vec<u8>, Response> {
    let bad = |why: &str| Response::text(Status::BadRequest, why);
    if version != 1 {
        return Err(bad("WebSocket needs HTTP/1.1"));
    }
    if single_header(headers, "host")?.is_none() {
        return Err(bad("missing Host header"));
    }
    if !header_has_token(headers, "upgrade", "websocket") {
        return Err(
            Response::text(Status::UpgradeRequired, "this endpoint speaks WebSocket")
                .with_header("Upgrade", "websocket")
                .with_header("Sec-WebSocket-Version", "13"),
        );
    }
    if !header_has_token(headers, "connection", "upgrade") {
        return Err(bad("Connection header must contain 'upgrade'"));
    }
    match single_header(headers, "sec-websocket-version")? {
        Some(b"13") => {}
        _ => {
            return Err(
                Response::text(Status::UpgradeRequired, "unsupported WebSocket version")
                    .with_header("Sec-WebSocket-Version", "13"),
            )
        }
    }
    let key = single_header(headers, "sec-websocket-key")?
        .ok_or_else(|| bad("missing Sec-WebSocket-Key"))?;
    let key = trim(key);
    if !is_valid_key(key) {
        return Err(bad("Sec-WebSocket-Key must be 16 bytes in base64"));
    }
    if !policy.allowed_origins.is_empty() {
        if let Some(origin) = single_header(headers, "origin")? {
            let origin = trim(origin);
            let allowed = policy.allowed_origins.iter().any(|a| {
                a.trim_end_matches('/')
                    .as_bytes()
                    .eq_ignore_ascii_case(origin)
            });
            if !allowed {
                return Err(Response::text(Status::Forbidden, "origin not allowed"));
            }
        }
    }
    let mut response = Vec::with_capacity(160);
    response.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    response.extend_from_slice(&accept_key(key));
    response.extend_from_slice(b"\r\n\r\n");
    Ok(response)
}

/// `Sec-WebSocket-Accept`: base64(SHA-1(key ++ GUID)).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    base64_encode_20(&sha.digest().bytes())
}

/// The value of a header that must appear at most once; two copies are a 400.
fn single_header<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &str,
) -> Result<Option<&'h [u8]>, Response> {
    let mut found = None;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        if found.is_some() {
            return Err(Response::text(Status::BadRequest, "duplicate header"));
        }
        found = Some(h.value);
    }
    Ok(found)
}

/// Every `name` header's value, in order, joined by commas (as RFC 9110
/// section 5.3 lets a list header be split); `None` if there is none.
fn joined_header(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    let mut joined: Option<String> = None;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        let value = String::from_utf8_lossy(trim(h.value));
        match &mut joined {
            Some(list) => {
                list.push(',');
                list.push_str(&value);
            }
            None => joined = Some(value.into_owned()),
        }
    }
    joined
}

/// True if any `name` header lists `token` in its comma-separated value.
fn header_has_token(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| trim(t).eq_ignore_ascii_case(token.as_bytes()))
}

fn trim(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// A key is 16 bytes in base64: 22 symbols and `==`, the last symbol
/// carrying only 2 bits (so its low 4 bits are zero).
fn is_valid_key(key: &[u8]) -> bool {
    let [symbols @ .., b'=', b'='] = key else {
        return false;
    };
    symbols.len() == 22
        && symbols.iter().all(|&b| base64_value(b).is_some())
        && symbols
            .last()
            .and_then(|&b| base64_value(b))
            .is_some_and(|v| v & 0x0F == 0)
}

fn base64_value(symbol: u8) -> Option<u8> {
    Some(match symbol {
        b'A'..=b'Z' => symbol - b'A',
        b'a'..=b'z' => symbol - b'a' + 26,
        b'0'..=b'9' => symbol - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    })
}

fn base64_encode_20(bytes: &[u8; 20]) -> [u8; 28] {
    let mut out = [b'='; 28];
    for (i, chunk) in bytes.chunks(3).enumerate() {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for j in 0..=chunk.len() {
            out[i * 4 + j] = BASE64[(n >> (18 - 6 * j) & 63) as usize];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws?username=alice HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse_str(s: &str) -> Outcome {
        parse(s.as_bytes(), &Policy::default())
    }

    fn status_of(outcome: Outcome) -> u16 {
        match outcome {
            Outcome::Reject(r) => r.status.code(),
            Outcome::Upgrade(_) => 101,
            Outcome::Serve { .. } => 200,
            Outcome::Partial => 0,
        }
    }

    fn with(replace: &str, by: &str) -> String {
        assert!(GOOD.contains(replace), "{replace}");
        GOOD.replace(replace, by)
    }

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            &accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn valid_upgrade() {
        let Outcome::Upgrade(up) = parse_str(GOOD) else {
            panic!("expected an upgrade");
        };
        assert_eq!(up.query, "username=alice");
        assert_eq!(up.head_len, GOOD.len());
        let text = String::from_utf8(up.response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!text.contains("Sec-WebSocket-Protocol") && !text.contains("Extensions"));
    }

    #[test]
    fn forwarded_for_headers_are_joined_in_order() {
        let forwarded = |extra: &str| match parse_str(&with(
            "Host: example.com",
            &format!("Host: example.com{extra}"),
        )) {
            Outcome::Upgrade(up) => up.forwarded_for,
            other => panic!("{other:?}"),
        };
        assert_eq!(forwarded(""), None);
        assert_eq!(
            forwarded("\r\nX-Forwarded-For:  192.0.2.1 "),
            Some("192.0.2.1".into())
        );
        assert_eq!(
            forwarded("\r\nX-Forwarded-For: 192.0.2.1, 10.0.0.2\r\nx-forwarded-for: 10.0.0.3"),
            Some("192.0.2.1, 10.0.0.2,10.0.0.3".into())
        );
    }

    #[test]
    fn every_prefix_is_partial() {
        for cut in 0..GOOD.len() {
            assert_eq!(
                parse(&GOOD.as_bytes()[..cut], &Policy::default()),
                Outcome::Partial,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn header_variants_accepted() {
        for (from, to) in [
            ("Upgrade: websocket", "upgrade: WebSocket"),
            ("Connection: Upgrade", "Connection: keep-alive, Upgrade"),
            ("Connection: Upgrade", "connection:upgrade"),
            ("Host: example.com", "host: a"),
            ("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\nSec-WebSocket-Extensions: permessage-deflate"),
        ] {
            assert!(matches!(parse_str(&with(from, to)), Outcome::Upgrade(_)), "{to}");
        }
    }

    #[test]
    fn refusals() {
        let cases = [
            (with("GET", "POST"), 405),
            (with("HTTP/1.1", "HTTP/1.0"), 400),
            (with("Host: example.com\r\n", ""), 400),
            (with("Upgrade: websocket\r\n", ""), 426),
            (with("Connection: Upgrade", "Connection: keep-alive"), 400),
            (
                with("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                426,
            ),
            (with("Sec-WebSocket-Version: 13\r\n", ""), 426),
            (with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ=="), 400),
            (
                with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZR=="),
                400,
            ),
            (
                with("dGhlIHNhbXBsZSBub25jZQ==", "!!!!!!!!!!!!!!!!!!!!!!=="),
                400,
            ),
            (
                with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                400,
            ),
            (with("Host: example.com", "Host: a\r\nHost: b"), 400),
            (with("/ws?username=alice", "/nowhere"), 404),
            ("GARBAGE\r\n\r\n".to_string(), 400),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_string(),
                400,
            ),
        ];
        for (request, status) in cases {
            assert_eq!(status_of(parse_str(&request)), status, "{request:?}");
        }
    }

    #[test]
    fn version_refusal_names_the_supported_version() {
        let Outcome::Reject(r) = parse_str(&with(
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Version: 7",
        )) else {
            panic!("expected a refusal");
        };
        assert!(String::from_utf8(r.to_bytes())
            .unwrap()
            .contains("Sec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn plain_http_routes() {
        let request = |method: &str, target: &str| {
            parse_str(&format!("{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n"))
        };
        for (method, target, served) in [
            ("GET", "/healthz", Some((Resource::Health, Method::Get))),
            ("GET", "/", Some((Resource::Page, Method::Get))),
            ("GET", "/metrics", Some((Resource::Metrics, Method::Get))),
            ("HEAD", "/healthz", Some((Resource::Health, Method::Head))),
            ("HEAD", "/", Some((Resource::Page, Method::Head))),
            ("HEAD", "/metrics", Some((Resource::Metrics, Method::Head))),
            ("POST", "/healthz", None),
            ("PUT", "/", None),
        ] {
            let outcome = request(method, target);
            match served {
                Some((resource, method)) => {
                    assert_eq!(outcome, Outcome::Serve { resource, method })
                }
                None => {
                    let Outcome::Reject(r) = outcome else {
                        panic!("{method} {target}: {outcome:?}");
                    };
                    assert_eq!(r.status.code(), 405, "{method} {target}");
                    let text = String::from_utf8(r.to_bytes()).unwrap();
                    assert!(text.contains("Allow: GET, HEAD\r\n"), "{text}");
                }
            }
        }
        assert_eq!(status_of(request("GET", "/missing")), 404);
        assert_eq!(status_of(request("GET", "/ws")), 426);
        assert_eq!(status_of(request("PUT", "/ws")), 405);
        assert_eq!(status_of(request("HEAD", "/ws")), 405);
    }

    #[test]
    fn upgrades_are_refused_while_shutting_down() {
        let policy = Policy {
            shutting_down: true,
            ..Policy::default()
        };
        assert_eq!(status_of(parse(GOOD.as_bytes(), &policy)), 503);
        // A bad upgrade is still told what is wrong with it.
        let bad_key = with("dGhlIHNhbXBsZSBub25jZQ==", "short");
        assert_eq!(status_of(parse(bad_key.as_bytes(), &policy)), 400);
        // Plain resources are still served (/healthz says 503 itself).
        assert!(matches!(
            parse(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", &policy),
            Outcome::Serve { .. }
        ));
    }

    #[test]
    fn head_size_limit() {
        let big = format!("GET /ws HTTP/1.1\r\nX-Pad: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status_of(parse_str(&big)), 431);
        let complete_but_big = format!("{big}\r\n");
        assert_eq!(status_of(parse_str(&complete_but_big)), 431);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        assert_eq!(
            status_of(parse_str(&format!("GET / HTTP/1.1\r\n{many}\r\n"))),
            431
        );
    }

    #[test]
    fn origin_policy() {
        let policy = Policy {
            allowed_origins: vec!["https://chat.example/".into()],
            ..Policy::default()
        };
        let request = |origin: &str| {
            with(
                "Host: example.com",
                &format!("Host: example.com\r\nOrigin: {origin}"),
            )
        };
        assert!(matches!(
            parse(request("https://chat.example").as_bytes(), &policy),
            Outcome::Upgrade(_)
        ));
        assert!(matches!(
            parse(request("HTTPS://CHAT.example").as_bytes(), &policy),
            Outcome::Upgrade(_)
        ));
        assert_eq!(
            status_of(parse(request("https://evil.example").as_bytes(), &policy)),
            403
        );
        assert!(matches!(
            parse(GOOD.as_bytes(), &policy),
            Outcome::Upgrade(_)
        ));
    }
}
