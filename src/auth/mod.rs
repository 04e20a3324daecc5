//! Who may connect as whom: signed tokens (`--auth jwt`), or anyone under
//! any free name (`--auth none`). No I/O: the request's token and the time
//! in, an identity or a refusal out.

pub mod base64url;
pub mod jwt;

pub use jwt::{Claims, Rules, Secret, TokenError};

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
            Auth::Jwt { secret, rules } => jwt::verify(
                token.ok_or(TokenError::Missing)?,
                secret,
                rules,
                now_secs,
                crate::chat::username::is_valid,
            ),
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
