//! Close codes (RFC 6455 section 7.4), typed: the server never sends a bare
//! number, and every code it sends is named once here.

use std::fmt;

/// A close code the server sends, or one a peer sent that it echoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the purpose of the connection is fulfilled.
    Normal,
    /// 1001: the server is going away (shutdown) or the peer went idle.
    Away,
    /// 1002: the peer broke RFC 6455.
    Protocol,
    /// 1003: a kind of data the endpoint does not take (binary, for the chat).
    Unsupported,
    /// 1007: a text message (or close reason) that is not UTF-8.
    InvalidPayload,
    /// 1008: a policy was violated (a slow consumer).
    Policy,
    /// 1009: a message larger than the limit.
    TooBig,
    /// 4001: the chat refused the requested username as invalid.
    InvalidUsername,
    /// 4003: the connection's token expired unrenewed, or a renewal named
    /// another user.
    TokenExpired,
    /// 4009: the chat refused the username because it is online already.
    UsernameTaken,
    /// 4010: a newer connection of the same (authenticated) user took over.
    Replaced,
    /// Any other valid code, echoed back to the peer that sent it.
    Other(u16),
}

impl CloseCode {
    pub fn to_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::Away => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::InvalidUsername => 4001,
            CloseCode::TokenExpired => 4003,
            CloseCode::UsernameTaken => 4009,
            CloseCode::Replaced => 4010,
            CloseCode::Other(code) => code,
        }
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> CloseCode {
        match code {
            1000 => CloseCode::Normal,
            1001 => CloseCode::Away,
            1002 => CloseCode::Protocol,
            1003 => CloseCode::Unsupported,
            1007 => CloseCode::InvalidPayload,
            1008 => CloseCode::Policy,
            1009 => CloseCode::TooBig,
            4001 => CloseCode::InvalidUsername,
            4003 => CloseCode::TokenExpired,
            4009 => CloseCode::UsernameTaken,
            4010 => CloseCode::Replaced,
            other => CloseCode::Other(other),
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::CloseCode;

    #[test]
    fn codes_round_trip() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 4001, 4003, 4009, 4010, 3000, 4999,
        ] {
            assert_eq!(CloseCode::from(code).to_u16(), code);
        }
        assert_eq!(CloseCode::from(1008), CloseCode::Policy);
        assert_eq!(CloseCode::Other(3000).to_string(), "3000");
    }
}
