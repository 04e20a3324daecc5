//! Who may connect as whom: signed tokens (`--auth jwt`), or anyone under
//! any free name (`--auth none`). No I/O: the request's token and the time
//! in, an identity or a refusal out.

pub mod base64url;
pub mod jwt;

use std::borrow::Cow;
use std::path::Path;

pub use jwt::{Claims, Rules, Secret, TokenError};

use crate::chat::username;

/// How connections are authenticated.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    /// Anyone may connect under any free, valid name.
    #[default]
    None,
    /// A valid HS256 token is required; its `sub` is the username.
    Jwt { secret: Secret, rules: Rules },
}

impl Auth {
    pub fn is_on(&self) -> bool {
        matches!(self, Auth::Jwt { .. })
    }

    /// Verifies `token` at `now_secs`.
    pub fn verify(&self, token: Option<&str>, now_secs: u64) -> Result<Claims, TokenError> {
        match self {
            Auth::None => Err(TokenError::Missing),
            Auth::Jwt { secret, rules } => {
                let mut claims = jwt::verify(
                    token.ok_or(TokenError::Missing)?,
                    secret,
                    rules,
                    now_secs,
                    username::is_valid,
                )?;
                // The user is known by the NFC form of its `sub`.
                if let Ok(Cow::Owned(nfc)) = username::canonical(&claims.sub) {
                    claims.sub = nfc;
                }
                Ok(claims)
            }
        }
    }

    /// Seconds a token's `exp` is stretched by (0 without tokens).
    pub fn leeway_secs(&self) -> u64 {
        match self {
            Auth::None => 0,
            Auth::Jwt { rules, .. } => rules.leeway_secs,
        }
    }
}

/// Why a handshake was refused with 401: one line, without the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Token(TokenError),
    /// `username=` names someone else than the token's `sub`.
    NotTheTokensUser,
    /// Both an `Authorization` header and `?token=`: which one counts?
    TwoTokens,
    /// An `Authorization` header that is not `Bearer <token>`.
    NotBearer,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Token(e) => e.fmt(f),
            Refusal::NotTheTokensUser => f.write_str("username does not match the token's sub"),
            Refusal::TwoTokens => f.write_str("send the token once: header or query, not both"),
            Refusal::NotBearer => f.write_str("Authorization must be 'Bearer <token>'"),
        }
    }
}

impl std::error::Error for Refusal {}

/// Checks an upgrade request: its token (`Authorization: Bearer …`, or
/// `?token=` for browsers, which cannot set headers) and, if it names one,
/// that `username=` is the token's `sub`.
pub fn authenticate(
    auth: &Auth,
    authorization: Option<&str>,
    query: &str,
    now_secs: u64,
) -> Result<Claims, Refusal> {
    let from_query = username::query_param(query, "token");
    let from_header = match authorization {
        None => None,
        Some(value) => {
            let (scheme, token) = value.split_once(' ').ok_or(Refusal::NotBearer)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(Refusal::NotBearer);
            }
            Some(token.trim())
        }
    };
    let token = match (from_header, from_query.as_deref()) {
        (Some(_), Some(_)) => return Err(Refusal::TwoTokens),
        (Some(token), None) | (None, Some(token)) => Some(token),
        (None, None) => None,
    };
    let claims = auth.verify(token, now_secs).map_err(Refusal::Token)?;
    match username::query_param(query, "username") {
        Some(name) if username::canonical(&name).ok().as_deref() != Some(&*claims.sub) => {
            Err(Refusal::NotTheTokensUser)
        }
        _ => Ok(claims),
    }
}

/// Why `--auth-secret-file` cannot be used (the secret is never shown).
#[derive(Debug)]
pub enum SecretFileError {
    Unreadable(std::io::Error),
    /// Others may read (or write) it: anyone on the host could mint tokens.
    WorldAccessible(u32),
    TooShort(usize),
}

impl std::fmt::Display for SecretFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretFileError::Unreadable(e) => write!(f, "cannot read it: {e}"),
            SecretFileError::WorldAccessible(mode) => write!(
                f,
                "its mode {mode:o} lets every user of the host read or write it (chmod 600 or 640)"
            ),
            SecretFileError::TooShort(len) => write!(
                f,
                "it holds {len} bytes; an HS256 secret needs at least {}",
                jwt::MIN_SECRET_LEN
            ),
        }
    }
}

impl std::error::Error for SecretFileError {}

/// Reads an HS256 secret: the file's bytes, less one trailing newline (so
/// `echo` or an editor can write it).
pub fn read_secret_file(path: &Path) -> Result<Secret, SecretFileError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(SecretFileError::Unreadable)?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o006 != 0 {
        return Err(SecretFileError::WorldAccessible(mode));
    }
    let mut bytes = std::fs::read(path).map_err(SecretFileError::Unreadable)?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    let len = bytes.len();
    Secret::new(bytes).ok_or(SecretFileError::TooShort(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jwt::tests::mint;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn auth() -> Auth {
        Auth::Jwt {
            secret: Secret::new(SECRET.to_vec()).expect("32 bytes"),
            rules: Rules {
                leeway_secs: 30,
                audience: None,
                issuer: None,
            },
        }
    }

    fn token(sub: &str) -> String {
        let claims = format!(r#"{{"sub":"{sub}","exp":{}}}"#, NOW + 60);
        mint(r#"{"alg":"HS256"}"#, &claims, SECRET)
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_query_and_must_match_username() {
        let bob = token("bob");
        let header = format!("Bearer {bob}");
        let query = format!("token={bob}");
        let ok = |auth_header: Option<&str>, query: &str| {
            authenticate(&auth(), auth_header, query, NOW).map(|c| c.sub)
        };
        assert_eq!(ok(Some(&header), ""), Ok("bob".into()));
        assert_eq!(ok(Some(&format!("bearer  {bob}")), ""), Ok("bob".into()));
        assert_eq!(ok(None, &query), Ok("bob".into()));
        assert_eq!(ok(None, &format!("{query}&username=bob")), Ok("bob".into()));
        assert_eq!(
            ok(None, &format!("{query}&username=alice")),
            Err(Refusal::NotTheTokensUser)
        );
        assert_eq!(ok(Some(&header), &query), Err(Refusal::TwoTokens));
        assert_eq!(
            ok(Some(&format!("Basic {bob}")), ""),
            Err(Refusal::NotBearer)
        );
        assert_eq!(ok(Some(&bob), ""), Err(Refusal::NotBearer));
        assert_eq!(
            ok(None, "username=bob"),
            Err(Refusal::Token(TokenError::Missing))
        );
        // A non-ASCII name, percent-encoded in the query like any other.
        let zoe = token("Zoë");
        assert_eq!(
            ok(None, &format!("token={zoe}&username=Zo%C3%AB")),
            Ok("Zoë".into())
        );
        // A `sub` in NFD is the user in NFC; `username=` may be either form.
        let nfd = token("Zoe\\u0308");
        for query in [
            format!("token={nfd}"),
            format!("token={nfd}&username=Zo%C3%AB"),
            format!("token={nfd}&username=Zoe%CC%88"),
            format!("token={zoe}&username=Zoe%CC%88"),
        ] {
            assert_eq!(ok(None, &query), Ok("Zoë".into()), "{query}");
        }
        // A `sub` that is no valid name (invisible, mixed scripts) is refused.
        for sub in ["alice\\u3164", "\\u0430lice", "\\uff41lice"] {
            assert_eq!(
                ok(None, &format!("token={}", token(sub))),
                Err(Refusal::Token(TokenError::BadSubject)),
                "{sub}"
            );
        }
    }

    #[test]
    fn a_secret_file_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("wschat-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("secret");
        let write = |bytes: &[u8], mode: u32| {
            std::fs::write(&path, bytes).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write(b"0123456789abcdef0123456789abcdef\n", 0o600);
        assert!(read_secret_file(&path).is_ok(), "32 bytes and a newline");
        write(b"0123456789abcdef0123456789abcde\n", 0o600);
        assert!(matches!(
            read_secret_file(&path),
            Err(SecretFileError::TooShort(31))
        ));
        write(b"0123456789abcdef0123456789abcdef", 0o644);
        let error = read_secret_file(&path).expect_err("world-readable");
        assert!(matches!(error, SecretFileError::WorldAccessible(0o644)));
        assert!(!error.to_string().contains("0123"), "never the secret");
        assert!(matches!(
            read_secret_file(&dir.join("missing")),
            Err(SecretFileError::Unreadable(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
