//! Verification of JSON Web Tokens (RFC 7519) signed with HS256 (JWS
//! compact serialization, RFC 7515), as the JWT RFCs and OWASP's JWT
//! cheat sheet require:
//!
//! - the algorithm is fixed by configuration, never taken from the token:
//!   a header with `alg` other than `HS256` (`none` included) is refused,
//!   whatever the signature (the classic algorithm-confusion attack);
//! - the MAC is computed by RustCrypto's `hmac` + `sha2` and compared in
//!   constant time (`Mac::verify_slice`);
//! - `exp` is required and `nbf` honoured, both with a leeway for clocks
//!   that disagree; `aud` and `iss` are checked when configured;
//! - `crit` (extensions the verifier must understand) is refused: none are;
//! - size is bounded before anything is decoded, and every malformed part is
//!   a typed error, never a panic.
//!
//! No I/O: a token and the time in, the claims or the reason out. The reason
//! never contains the token.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::base64url;

/// The longest token accepted (header, claims and signature, encoded).
pub const MAX_TOKEN_LEN: usize = 4096;

/// The shortest HS256 secret accepted: RFC 7518 section 3.2 requires a key
/// at least as long as the hash output (256 bits).
pub const MIN_SECRET_LEN: usize = 32;

/// An HS256 secret. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The secret, or `None` if it is shorter than [`MIN_SECRET_LEN`].
    pub fn new(bytes: Vec<u8>) -> Option<Secret> {
        (bytes.len() >= MIN_SECRET_LEN).then_some(Secret(bytes))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Seconds a clock may be off: `exp` and `nbf` are stretched by it.
    pub leeway_secs: u64,
    /// When set, `aud` must be (or contain) this.
    pub audience: Option<String>,
    /// When set, `iss` must be this.
    pub issuer: Option<String>,
}

/// The claims the server uses, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The subject: the username.
    pub sub: String,
    /// Expiry, in seconds since 1970 (as in the token; the leeway is not added).
    pub exp: u64,
}

/// Why a token was refused: one short line, safe to log and to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Missing,
    TooLong,
    Malformed,
    /// `alg` is not the configured algorithm (`none` included).
    WrongAlgorithm,
    /// The header names extensions (`crit`) this verifier does not know.
    CriticalHeader,
    BadSignature,
    /// No `exp`, or not a number.
    NoExpiry,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    /// No `sub`, or one that is not a valid username.
    BadSubject,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::Missing => "a token is required",
            TokenError::TooLong => "token too long",
            TokenError::Malformed => "malformed token",
            TokenError::WrongAlgorithm => "token algorithm not accepted",
            TokenError::CriticalHeader => "token has critical headers this server does not know",
            TokenError::BadSignature => "invalid token signature",
            TokenError::NoExpiry => "token has no exp",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not yet valid",
            TokenError::WrongAudience => "token audience not accepted",
            TokenError::WrongIssuer => "token issuer not accepted",
            TokenError::BadSubject => "token sub is not a valid username",
        })
    }
}

impl std::error::Error for TokenError {}

/// A JOSE header or a claims set: a JSON object (RFC 7515 section 4, RFC
/// 7519 section 4), never an array read by position. Of a repeated name the
/// last is used, as RFC 7515 allows.
type Object = serde_json::Map<String, Value>;

fn object(json: &[u8]) -> Result<Object, TokenError> {
    serde_json::from_slice(json).map_err(|_| TokenError::Malformed)
}

/// A NumericDate (RFC 7519 section 2): seconds, possibly fractional; the
/// whole seconds are used (an expiry is never extended by rounding up).
fn numeric_date(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        _ => None,
    }
}

/// Verifies the signature of `token` with `secret` and returns the decoded
/// claims bytes. The header is checked first, so a token naming another
/// algorithm is refused without computing anything with the key.
pub fn verify_signature(token: &str, secret: &Secret) -> Result<Vec<u8>, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header_json = base64url::decode(header.as_bytes()).map_err(|_| TokenError::Malformed)?;
    let header_fields = object(&header_json)?;
    if header_fields.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(TokenError::WrongAlgorithm);
    }
    if header_fields.contains_key("crit") {
        return Err(TokenError::CriticalHeader);
    }
    let signature = base64url::decode(signature.as_bytes()).map_err(|_| TokenError::Malformed)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&secret.0).map_err(|_| TokenError::BadSignature)?;
    // The signing input is the encoded header and payload as sent.
    mac.update(&token.as_bytes()[..header.len() + 1 + payload.len()]);
    mac.verify_slice(&signature)
        .map_err(|_| TokenError::BadSignature)?;
    base64url::decode(payload.as_bytes()).map_err(|_| TokenError::Malformed)
}

/// Verifies `token` at `now_secs` (seconds since 1970): signature first,
/// then the claims. `is_valid_subject` says which `sub` values are usernames.
pub fn verify(
    token: &str,
    secret: &Secret,
    rules: &Rules,
    now_secs: u64,
    is_valid_subject: impl Fn(&str) -> bool,
) -> Result<Claims, TokenError> {
    let payload = verify_signature(token, secret)?;
    let claims = object(&payload)?;
    let exp = claims
        .get("exp")
        .and_then(numeric_date)
        .ok_or(TokenError::NoExpiry)?;
    if now_secs > exp.saturating_add(rules.leeway_secs) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = numeric_date(nbf).ok_or(TokenError::Malformed)?;
        if nbf > now_secs.saturating_add(rules.leeway_secs) {
            return Err(TokenError::NotYetValid);
        }
    }
    if let Some(wanted) = &rules.audience {
        // One string or an array of them (RFC 7519 section 4.1.3).
        let ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == wanted,
            Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(wanted)),
            _ => false,
        };
        if !ok {
            return Err(TokenError::WrongAudience);
        }
    }
    if let Some(wanted) = &rules.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(wanted.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
    }
    match claims.get("sub") {
        Some(Value::String(sub)) if is_valid_subject(sub) => Ok(Claims {
            sub: sub.clone(),
            exp,
        }),
        _ => Err(TokenError::BadSubject),
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Mints an HS256 token (for tests): base64url without padding.
    pub fn mint(header: &str, claims: &str, secret: &[u8]) -> String {
        let head = format!(
            "{}.{}",
            encode(header.as_bytes()),
            encode(claims.as_bytes())
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(head.as_bytes());
        format!("{head}.{}", encode(&mac.finalize().into_bytes()))
    }

    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut n = 0u32;
            for (i, &b) in chunk.iter().enumerate() {
                n |= u32::from(b) << (16 - 8 * i);
            }
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            }
        }
        out
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
    const NOW: u64 = 1_800_000_000;

    fn secret() -> Secret {
        Secret::new(SECRET.to_vec()).expect("32 bytes")
    }

    fn rules() -> Rules {
        Rules {
            leeway_secs: 30,
            audience: None,
            issuer: None,
        }
    }

    fn check(token: &str, rules: &Rules) -> Result<Claims, TokenError> {
        verify(
            token,
            &secret(),
            rules,
            NOW,
            crate::chat::username::is_valid,
        )
    }

    /// The example of RFC 7515 appendix A.1 (also RFC 7519 section 3.1):
    /// its key, its token, its claims.
    #[test]
    fn the_rfc_7515_example_verifies_and_a_changed_byte_does_not() {
        let key = super::base64url::decode(
            b"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow",
        )
        .expect("the RFC's key");
        let key = Secret::new(key).expect("64 bytes");
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let payload = verify_signature(token, &key).expect("the RFC's token verifies");
        assert_eq!(
            payload,
            b"{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n \"http://example.com/is_root\":true}"
        );
        let mut tampered = token.to_string();
        tampered.replace_range(50..51, "F"); // in the claims
        assert_eq!(
            verify_signature(&tampered, &key),
            Err(TokenError::BadSignature)
        );
        // The RFC's token has no sub and expired in 2011.
        let rules = rules();
        let at = |now| verify(token, &key, &rules, now, |_| true);
        assert_eq!(at(NOW), Err(TokenError::Expired));
        assert_eq!(at(1_300_819_380), Err(TokenError::BadSubject));
    }

    #[test]
    fn a_valid_token_gives_its_claims() {
        let token = mint(
            HS256,
            &format!(r#"{{"sub":"Zoë","exp":{}}}"#, NOW + 60),
            SECRET,
        );
        assert_eq!(
            check(&token, &rules()),
            Ok(Claims {
                sub: "Zoë".into(),
                exp: NOW + 60
            })
        );
    }

    #[test]
    fn the_refusal_table() {
        let exp = NOW + 60;
        let good = |claims: &str| mint(HS256, claims, SECRET);
        let none_alg = format!(
            "{}.{}.",
            encode(br#"{"alg":"none"}"#),
            encode(format!(r#"{{"sub":"a","exp":{exp}}}"#).as_bytes())
        );
        let claims = format!(r#"{{"sub":"alice","exp":{exp}}}"#);
        #[rustfmt::skip]
        let table: Vec<(String, TokenError)> = vec![
            (String::new(), TokenError::Missing),
            ("a".repeat(MAX_TOKEN_LEN + 1), TokenError::TooLong),
            ("abc".into(), TokenError::Malformed),
            ("a.b.c.d".into(), TokenError::Malformed),
            ("!!.b.c".into(), TokenError::Malformed),
            (format!("{}.e30.", encode(b"not json")), TokenError::Malformed),
            (none_alg, TokenError::WrongAlgorithm),
            (mint(r#"{"alg":"HS512"}"#, &claims, SECRET), TokenError::WrongAlgorithm),
            (mint(r#"{"alg":"RS256"}"#, &claims, SECRET), TokenError::WrongAlgorithm),
            (mint(r#"{"typ":"JWT"}"#, &claims, SECRET), TokenError::WrongAlgorithm),
            (mint(r#"{"alg":"hs256"}"#, &claims, SECRET), TokenError::WrongAlgorithm),
            (mint(r#"{"alg":"HS256","crit":["exp"]}"#, &claims, SECRET), TokenError::CriticalHeader),
            (mint(HS256, &claims, b"another secret, also 32 bytes...."), TokenError::BadSignature),
            (format!("{}x", good(&claims)), TokenError::BadSignature),
            (format!("{}xy", good(&claims)), TokenError::Malformed),
            (mint(r#"["HS256"]"#, &claims, SECRET), TokenError::Malformed),
            (good(r#"{"sub":"alice"}"#), TokenError::NoExpiry),
            (good(r#"{"sub":"alice","exp":"soon"}"#), TokenError::NoExpiry),
            (good(&format!(r#"{{"sub":"alice","exp":{}}}"#, NOW - 31)), TokenError::Expired),
            (good(&format!(r#"{{"sub":"alice","exp":{exp},"nbf":{}}}"#, NOW + 31)), TokenError::NotYetValid),
            (good(&format!(r#"{{"exp":{exp}}}"#)), TokenError::BadSubject),
            (good(&format!(r#"{{"sub":"no one","exp":{exp}}}"#)), TokenError::BadSubject),
            (good(&format!(r#"{{"sub":7,"exp":{exp}}}"#)), TokenError::BadSubject),
            (good("[1,2]"), TokenError::Malformed),
        ];
        for (token, error) in table {
            assert_eq!(
                check(&token, &rules()).map(|_| ()),
                Err(error),
                "{token:.80}"
            );
            // The reason never carries the token.
            assert!(token.len() < 8 || !error.to_string().contains(&token[..8]));
        }
        // Within the leeway: 30 s late or early is still fine.
        let late = good(&format!(r#"{{"sub":"alice","exp":{}}}"#, NOW - 30));
        assert!(check(&late, &rules()).is_ok());
        let early = good(&format!(
            r#"{{"sub":"alice","exp":{exp},"nbf":{}}}"#,
            NOW + 30
        ));
        assert!(check(&early, &rules()).is_ok());
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let rules = Rules {
            leeway_secs: 0,
            audience: Some("chat".into()),
            issuer: Some("https://auth.example".into()),
        };
        let exp = NOW + 60;
        let with = |extra: &str| {
            check(
                &mint(
                    HS256,
                    &format!(r#"{{"sub":"a","exp":{exp}{extra}}}"#),
                    SECRET,
                ),
                &rules,
            )
            .map(|_| ())
        };
        let iss = r#","iss":"https://auth.example""#;
        assert_eq!(with(&format!(r#","aud":"chat"{iss}"#)), Ok(()));
        assert_eq!(with(&format!(r#","aud":["x","chat"]{iss}"#)), Ok(()));
        assert_eq!(with(iss), Err(TokenError::WrongAudience));
        assert_eq!(
            with(&format!(r#","aud":"other"{iss}"#)),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(with(r#","aud":"chat""#), Err(TokenError::WrongIssuer));
        assert_eq!(
            with(r#","aud":"chat","iss":"evil""#),
            Err(TokenError::WrongIssuer)
        );
    }

    #[test]
    fn a_short_secret_is_refused_and_never_printed() {
        assert!(Secret::new(vec![1; MIN_SECRET_LEN - 1]).is_none());
        let secret = Secret::new(b"a secret that must never be shown".to_vec()).expect("long");
        assert_eq!(format!("{secret:?}"), "Secret(33 bytes)");
    }
}
