//! The chat protocol's messages (docs/PROTOCOL.md): what a client may send,
//! parsed without copying, and what the server sends, encoded by hand.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{json, scan};

/// The most bytes a string `ref` may have.
pub const MAX_REF_BYTES: usize = 64;

/// A client's message, borrowed from the frame that carried it.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Public {
        body: Cow<'a, str>,
    },
    Private {
        to: Cow<'a, str>,
        body: Cow<'a, str>,
    },
    Users,
    /// A reliable client has every private message up to `seq`.
    Ack {
        seq: u64,
    },
    /// A newer token for the same user (`--auth jwt`), before the current
    /// one expires.
    Auth {
        token: Cow<'a, str>,
    },
}

/// A parsed request and its `ref`, echoed as raw JSON (a string or an integer).
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub request: Request<'a>,
    pub reference: Option<&'a str>,
}

/// Why a client message was refused; each has a wire code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    InvalidJson(String),
    UnknownType(String),
    MissingField(&'static str),
    BodyTooLong { limit: usize },
}

impl RequestError {
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::InvalidJson(_) => "invalid_json",
            RequestError::UnknownType(_) => "unknown_type",
            RequestError::MissingField(_) => "missing_field",
            RequestError::BodyTooLong { .. } => "body_too_long",
        }
    }

    pub fn message(&self) -> String {
        match self {
            RequestError::InvalidJson(why) => format!("not a valid message: {why}"),
            RequestError::UnknownType(kind) => format!("unknown message type '{kind}'"),
            RequestError::MissingField(field) => format!("missing field '{field}'"),
            RequestError::BodyTooLong { limit } => format!("body longer than {limit} bytes"),
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for RequestError {}

/// The wire shape; unknown fields (a client's `from` among them) are ignored.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    to: Option<Text<'a>>,
    #[serde(borrow, default)]
    body: Option<Text<'a>>,
    #[serde(rename = "ref", borrow, default)]
    reference: Option<&'a RawValue>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    token: Option<Text<'a>>,
}

/// A string borrowed from the input unless it had escapes (serde only
/// borrows a `Cow` that is a field itself, not one inside an `Option`).
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// A message's fields, from whichever reader took it. Public only for
/// [`readings`].
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct Fields<'a> {
    pub kind: Option<Cow<'a, str>>,
    pub to: Option<Cow<'a, str>>,
    pub body: Option<Cow<'a, str>>,
    pub reference: Option<&'a str>,
    pub seq: Option<u64>,
    pub token: Option<Cow<'a, str>>,
}

/// serde_json's reading, which the fast path in [`scan`] must agree with.
#[cold]
#[inline(never)]
pub(super) fn read_with_serde(text: &str) -> Result<Fields<'_>, serde_json::Error> {
    let wire: Wire<'_> = serde_json::from_str(text)?;
    Ok(Fields {
        kind: wire.kind.map(|Text(s)| s),
        to: wire.to.map(|Text(s)| s),
        body: wire.body.map(|Text(s)| s),
        reference: wire.reference.map(RawValue::get),
        seq: wire.seq,
        token: wire.token.map(|Text(s)| s),
    })
}

/// The one-pass reader's reading ([`scan`]), in the shape of serde's;
/// `None` when it leaves `text` to serde_json.
fn read_with_scan(text: &str) -> Option<Fields<'_>> {
    scan::scan(text).map(|f| Fields {
        kind: f.kind.map(Cow::Borrowed),
        to: f.to.map(Cow::Borrowed),
        body: f.body.map(Cow::Borrowed),
        reference: f.reference,
        seq: f.seq,
        token: f.token.map(Cow::Borrowed),
    })
}

/// Both readings of `text`, the one-pass reader's and serde_json's, for the
/// differential fuzz target (`tests/fuzz/fuzz_targets/chat_differential.rs`):
/// whatever the first takes, the second must read alike. Not part of the API.
#[doc(hidden)]
pub fn readings(text: &str) -> (Option<Fields<'_>>, Result<Fields<'_>, serde_json::Error>) {
    (read_with_scan(text), read_with_serde(text))
}

/// Parses one text message: a plain one in one pass by [`scan`], any other
/// by serde_json. On error, returns the `ref` too when it could be read, so
/// the error can carry it.
pub fn parse(text: &str, max_body: usize) -> Result<Parsed<'_>, (RequestError, Option<&str>)> {
    let fields = match read_with_scan(text) {
        Some(fields) => fields,
        None => read_with_serde(text)
            .map_err(|e| (RequestError::InvalidJson(short_reason(&e)), None))?,
    };
    let reference = match fields.reference {
        None => None,
        Some(raw) if is_valid_ref(raw) => Some(raw),
        Some(_) => {
            return Err((
                RequestError::InvalidJson(format!(
                    "ref must be an integer or a string of at most {MAX_REF_BYTES} bytes"
                )),
                None,
            ))
        }
    };
    let fail = |e| Err((e, reference));
    let Some(kind) = fields.kind else {
        return fail(RequestError::MissingField("type"));
    };
    let request = match kind.as_ref() {
        "public" => {
            let Some(body) = fields.body else {
                return fail(RequestError::MissingField("body"));
            };
            if body.len() > max_body {
                return fail(RequestError::BodyTooLong { limit: max_body });
            }
            Request::Public { body }
        }
        "private" => {
            let Some(to) = fields.to else {
                return fail(RequestError::MissingField("to"));
            };
            let Some(body) = fields.body else {
                return fail(RequestError::MissingField("body"));
            };
            if body.len() > max_body {
                return fail(RequestError::BodyTooLong { limit: max_body });
            }
            Request::Private { to, body }
        }
        "users" => Request::Users,
        "ack" => {
            let Some(seq) = fields.seq else {
                return fail(RequestError::MissingField("seq"));
            };
            Request::Ack { seq }
        }
        "auth" => {
            let Some(token) = fields.token else {
                return fail(RequestError::MissingField("token"));
            };
            Request::Auth { token }
        }
        other => {
            let mut shown = other.to_owned();
            shown.truncate(shown.char_indices().nth(32).map_or(shown.len(), |(i, _)| i));
            return fail(RequestError::UnknownType(shown));
        }
    };
    Ok(Parsed { request, reference })
}

fn is_valid_ref(raw: &str) -> bool {
    if raw.starts_with('"') {
        serde_json::from_str::<Cow<'_, str>>(raw).is_ok_and(|s| s.len() <= MAX_REF_BYTES)
    } else {
        serde_json::from_str::<i64>(raw).is_ok() || serde_json::from_str::<u64>(raw).is_ok()
    }
}

/// serde_json's message without its line and column noise for one-line input.
fn short_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The fields of a private message as the recipient sees it.
#[derive(Debug, Clone, Copy)]
pub struct PrivateMessage<'a> {
    pub id: u64,
    pub ts: u64,
    pub seq: u64,
    pub from: &'a str,
    pub to: &'a str,
    pub body: &'a str,
    /// `body` was read from a JSON string without escapes, so it needs none.
    pub body_is_plain: bool,
    pub offline: bool,
}

/// Whether text read from a client's JSON needs no escaping to be written
/// back: both readers borrow a string only when it had no escape, and JSON
/// strings hold no raw control characters, so a borrowed one has nothing
/// that JSON escapes.
#[allow(clippy::ptr_arg)] // which variant it is is the point
pub fn is_plain(text: &Cow<'_, str>) -> bool {
    matches!(text, Cow::Borrowed(_))
}

/// Encoders for everything the server sends. Each writes one JSON object.
pub mod encode {
    use super::json::{message_id, number, plain, string, timestamp};

    pub fn public(
        out: &mut Vec<u8>,
        id: u64,
        ts: u64,
        from: &str,
        body: &str,
        body_is_plain: bool,
    ) {
        out.extend_from_slice(b"{\"type\":\"public\",\"id\":");
        message_id(out, id);
        out.extend_from_slice(b",\"ts\":");
        timestamp(out, ts);
        out.extend_from_slice(b",\"from\":");
        plain(out, from);
        out.extend_from_slice(b",\"body\":");
        if body_is_plain {
            plain(out, body);
        } else {
            string(out, body);
        }
        out.push(b'}');
    }

    /// A private message; `offline` marks one replayed from the outbox.
    pub fn private(out: &mut Vec<u8>, m: &super::PrivateMessage<'_>) {
        let super::PrivateMessage {
            id,
            ts,
            seq,
            from,
            to,
            body,
            body_is_plain,
            offline,
        } = *m;
        out.extend_from_slice(b"{\"type\":\"private\",\"id\":");
        message_id(out, id);
        out.extend_from_slice(b",\"ts\":");
        timestamp(out, ts);
        out.extend_from_slice(b",\"seq\":");
        number(out, seq);
        // Names replayed from the log are escaped like any stored text, so a
        // damaged log cannot break the JSON; live names were validated.
        let name = if offline { string } else { plain };
        out.extend_from_slice(b",\"from\":");
        name(out, from);
        out.extend_from_slice(b",\"to\":");
        name(out, to);
        out.extend_from_slice(b",\"body\":");
        if body_is_plain {
            plain(out, body);
        } else {
            string(out, body);
        }
        if offline {
            out.extend_from_slice(b",\"offline\":true");
        }
        out.push(b'}');
    }

    pub fn receipt(out: &mut Vec<u8>, id: u64, reference: Option<&str>, status: &str) {
        out.extend_from_slice(b"{\"type\":\"receipt\",\"id\":");
        message_id(out, id);
        reference_field(out, reference);
        out.extend_from_slice(b",\"status\":");
        plain(out, status);
        out.push(b'}');
    }

    pub fn error(out: &mut Vec<u8>, code: &str, message: &str, reference: Option<&str>) {
        out.extend_from_slice(b"{\"type\":\"error\",\"code\":");
        plain(out, code);
        out.extend_from_slice(b",\"message\":");
        string(out, message);
        reference_field(out, reference);
        out.push(b'}');
    }

    /// `rate_limited`: an error that says when to send again.
    pub fn rate_limited(out: &mut Vec<u8>, retry_after_ms: u64, reference: Option<&str>) {
        out.extend_from_slice(
            b"{\"type\":\"error\",\"code\":\"rate_limited\",\"message\":\"too many messages: wait before sending more\",\"retry_after_ms\":",
        );
        out.extend_from_slice(retry_after_ms.to_string().as_bytes());
        reference_field(out, reference);
        out.push(b'}');
    }

    /// Appends `name` to a comma-separated list of JSON strings.
    pub fn name_list_push(list: &mut Vec<u8>, name: &str) {
        if !list.is_empty() {
            list.push(b',');
        }
        plain(list, name);
    }

    /// The first event a joined connection gets: its name, the count and
    /// (some) names online (encoded by [`name_list_push`]), and the limits a
    /// client needs before it sends (`max_body`, in bytes).
    pub fn welcome(
        out: &mut Vec<u8>,
        username: &str,
        online: usize,
        names: &[u8],
        max_body: usize,
    ) {
        roster_fields(out, "welcome", Some(username), online, names);
        out.extend_from_slice(b",\"limits\":{\"max_body\":");
        number(out, max_body as u64);
        out.extend_from_slice(b"}}");
    }

    /// The answer to a `users` request.
    pub fn users(out: &mut Vec<u8>, online: usize, names: &[u8]) {
        roster_fields(out, "users", None, online, names);
        out.push(b'}');
    }

    /// `welcome` and `users` share a shape: a count and (some) names, the
    /// names already encoded. Leaves the object open.
    fn roster_fields(
        out: &mut Vec<u8>,
        kind: &str,
        username: Option<&str>,
        online: usize,
        names: &[u8],
    ) {
        out.extend_from_slice(b"{\"type\":");
        plain(out, kind);
        if let Some(username) = username {
            out.extend_from_slice(b",\"username\":");
            plain(out, username);
        }
        out.extend_from_slice(b",\"online\":");
        number(out, online as u64);
        out.extend_from_slice(b",\"users\":[");
        out.extend_from_slice(names);
        out.push(b']');
    }

    /// `join` or `leave`.
    pub fn presence(out: &mut Vec<u8>, kind: &str, username: &str, online: usize) {
        out.extend_from_slice(b"{\"type\":");
        plain(out, kind);
        out.extend_from_slice(b",\"username\":");
        plain(out, username);
        out.extend_from_slice(b",\"online\":");
        number(out, online as u64);
        out.push(b'}');
    }

    /// The answer to a token renewal: the new expiry (seconds since 1970).
    pub fn auth_renewed(out: &mut Vec<u8>, exp: u64, reference: Option<&str>) {
        out.extend_from_slice(b"{\"type\":\"auth\",\"exp\":");
        number(out, exp);
        reference_field(out, reference);
        out.push(b'}');
    }

    pub fn gap(out: &mut Vec<u8>, dropped: u64) {
        out.extend_from_slice(b"{\"type\":\"gap\",\"dropped\":");
        number(out, dropped);
        out.push(b'}');
    }

    fn reference_field(out: &mut Vec<u8>, reference: Option<&str>) {
        if let Some(raw) = reference {
            out.extend_from_slice(b",\"ref\":");
            out.extend_from_slice(raw.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn ok(text: &str) -> Parsed<'_> {
        parse(text, 100).expect("valid request")
    }

    fn err(text: &str) -> (&'static str, Option<&str>) {
        let (e, r) = parse(text, 100).expect_err("invalid request");
        (e.code(), r)
    }

    #[test]
    fn parses_requests_and_ignores_from_and_unknown_fields() {
        let p =
            ok(r#"{"type":"private","from":"mallory","to":"bob","body":"hi","extra":{"a":[1]}}"#);
        assert_eq!(
            p.request,
            Request::Private {
                to: "bob".into(),
                body: "hi".into()
            }
        );
        assert_eq!(
            ok(r#"{"body":"x","type":"public"}"#).request,
            Request::Public { body: "x".into() }
        );
        assert_eq!(ok(r#" { "type" : "users" } "#).request, Request::Users);
        assert_eq!(
            ok(r#"{"type":"ack","seq":12}"#).request,
            Request::Ack { seq: 12 }
        );
        assert_eq!(err(r#"{"type":"ack"}"#).0, "missing_field");
        assert_eq!(ok(r#"{"type":"users","ref":17}"#).reference, Some("17"));
        assert_eq!(
            ok(r#"{"type":"users","ref":"a\"b"}"#).reference,
            Some(r#""a\"b""#)
        );
        assert_eq!(
            ok(r#"{"type":"public","body":"tab\there \u00e9"}"#).request,
            Request::Public {
                body: "tab\there é".into()
            }
        );
    }

    #[test]
    fn borrows_bodies_without_escapes() {
        let text = r#"{"type":"public","body":"no escapes"}"#.to_string();
        let p = ok(&text);
        assert!(matches!(
            p.request,
            Request::Public {
                body: Cow::Borrowed(_)
            }
        ));
    }

    #[test]
    fn refusals_carry_the_ref_when_readable() {
        assert_eq!(err("not json"), ("invalid_json", None));
        assert_eq!(err("[1,2]"), ("invalid_json", None));
        assert_eq!(err(r#"{"type":"public","body":5}"#), ("invalid_json", None));
        // Whichever reader takes it (the one-pass reader once passed over it).
        assert_eq!(err(r#"{"type":"users","token":5}"#), ("invalid_json", None));
        assert_eq!(
            err(r#"{"type":"public","body":"x","token":"a","token":"b"}"#),
            ("invalid_json", None)
        );
        assert_eq!(
            err(r#"{"type":"nope","ref":1}"#),
            ("unknown_type", Some("1"))
        );
        assert_eq!(
            err(r#"{"body":"x","ref":"r"}"#),
            ("missing_field", Some("\"r\""))
        );
        assert_eq!(err(r#"{"type":"public"}"#), ("missing_field", None));
        assert_eq!(
            err(r#"{"type":"private","body":"x"}"#),
            ("missing_field", None)
        );
        assert_eq!(
            err(r#"{"type":"private","to":"b"}"#),
            ("missing_field", None)
        );
        let long = format!(
            r#"{{"type":"public","body":"{}","ref":2}}"#,
            "x".repeat(101)
        );
        assert_eq!(err(&long), ("body_too_long", Some("2")));
        assert_eq!(err(r#"{"type":"users","ref":1.5}"#).0, "invalid_json");
        assert_eq!(err(r#"{"type":"users","ref":{"a":1}}"#).0, "invalid_json");
        let long_ref = format!(r#"{{"type":"users","ref":"{}"}}"#, "r".repeat(65));
        assert_eq!(err(&long_ref).0, "invalid_json");
    }

    #[test]
    fn body_limit_counts_bytes() {
        let at_limit = format!(r#"{{"type":"public","body":"{}"}}"#, "é".repeat(50));
        assert!(parse(&at_limit, 100).is_ok());
        let over = format!(r#"{{"type":"public","body":"{}"}}"#, "é".repeat(51));
        assert!(parse(&over, 100).is_err());
    }

    #[test]
    fn a_body_written_back_unescaped_only_when_it_was_read_without_escapes() {
        for (input, plain) in [
            (r#"{"type":"private","to":"b","body":"plain words"}"#, true),
            (
                r#"{"type":"private","to":"b","body":"小明 😀 </script>"}"#,
                true,
            ),
            (
                r#"{"type": "private", "to": "b", "body": "spaced out"}"#,
                true,
            ),
            (r#"{"type":"private","to":"b","body":"q\"uote"}"#, false),
            (
                r#"{"type":"private","to":"b","body":"nul \u0000 nl \n"}"#,
                false,
            ),
            (r#"{"type":"private","to":"b","body":"\u00e9"}"#, false),
            (r#"{"type":"private","to":"b","body":"x","n":[1]}"#, true),
        ] {
            let parsed = parse(input, 100).expect("valid");
            let Request::Private { body, .. } = parsed.request else {
                panic!("a private message: {input}");
            };
            assert_eq!(is_plain(&body), plain, "{input}");
            let mut out = Vec::new();
            let m = PrivateMessage {
                id: 1,
                ts: 2,
                seq: 3,
                from: "a",
                to: "b",
                body: &body,
                body_is_plain: is_plain(&body),
                offline: false,
            };
            encode::private(&mut out, &m);
            let back: Value = serde_json::from_slice(&out).expect("valid JSON out");
            assert_eq!(back["body"], *body, "{input}");
        }
    }

    #[test]
    fn encoded_messages_are_the_documented_json() {
        let mut out = Vec::new();
        let mut m = PrivateMessage {
            id: 18,
            ts: 1764250000124,
            seq: 3,
            from: "alice",
            to: "bob",
            body: "say \"hi\"\n",
            body_is_plain: false,
            offline: false,
        };
        encode::private(&mut out, &m);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"private","id":18,"ts":1764250000124u64,"seq":3,"from":"alice","to":"bob","body":"say \"hi\"\n"})
        );
        out.clear();
        m.offline = true;
        encode::private(&mut out, &m);
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap()["offline"],
            true
        );
        out.clear();
        encode::receipt(&mut out, 18, Some("\"r1\""), "delivered");
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({"type":"receipt","id":18,"ref":"r1","status":"delivered"})
        );
        out.clear();
        encode::error(&mut out, "user_offline", "bob is not online", None);
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({"type":"error","code":"user_offline","message":"bob is not online"})
        );
        out.clear();
        let mut names = Vec::new();
        encode::name_list_push(&mut names, "bob");
        encode::name_list_push(&mut names, "carol");
        encode::welcome(&mut out, "alice", 3, &names, 8192);
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({"type":"welcome","username":"alice","online":3,"users":["bob","carol"],"limits":{"max_body":8192}})
        );
        out.clear();
        encode::users(&mut out, 3, &names);
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({"type":"users","online":3,"users":["bob","carol"]})
        );
        out.clear();
        encode::presence(&mut out, "join", "bob", 4);
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({"type":"join","username":"bob","online":4})
        );
        out.clear();
        encode::gap(&mut out, 12);
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            serde_json::json!({"type":"gap","dropped":12})
        );
    }
}
