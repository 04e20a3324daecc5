//! Limits that one client cannot escape: how fast a connection may send
//! ([`rate`], charged by the router), how many connections and handshakes
//! one address may have ([`per_ip`], at accept or, behind a proxy, at the
//! handshake), and who the client is behind a trusted proxy
//! ([`forwarded`]). Policies only: time is passed in, sockets stay in the
//! loop.

pub mod forwarded;
pub mod per_ip;
pub mod rate;

use forwarded::TrustedProxies;
use per_ip::{PerIpPolicy, Refusal};
use rate::{MessagePolicy, Rate};

/// The operator's settings (see the options in `config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Chat messages per second per connection; 0: unlimited.
    pub rate_limit: u32,
    /// Messages a connection may send at once before the rate applies.
    pub rate_burst: u32,
    /// Connections one address may hold; 0: no limit.
    pub max_connections_per_ip: u32,
    /// Handshakes one address may start per second (and at once); 0: no limit.
    pub max_handshakes_per_ip: u32,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            rate_limit: 20,
            rate_burst: 40,
            max_connections_per_ip: 64,
            max_handshakes_per_ip: 30,
            trusted_proxies: TrustedProxies::default(),
        }
    }
}

impl Settings {
    pub fn message_policy(&self) -> MessagePolicy {
        MessagePolicy::new(Rate::new(self.rate_limit, self.rate_burst))
    }

    pub fn per_ip_policy(&self) -> PerIpPolicy {
        PerIpPolicy {
            max_connections: self.max_connections_per_ip,
            handshakes: Rate::new(self.max_handshakes_per_ip, self.max_handshakes_per_ip),
        }
    }
}

/// Sockets beyond `--max-connections` kept for plain HTTP requests
/// (`/healthz`, `/metrics`): a chat full of WebSocket connections still
/// answers its health checks. An upgrade that arrives in one of them is
/// refused with 503.
pub const HTTP_RESERVE: usize = 16;

/// The answer to an address over its limit, written to the fresh socket at
/// accept (nothing is read: the address holds no slot) or queued at the
/// handshake behind a proxy. A handshake token comes back within a second
/// (the rate is whole handshakes per second), so `Retry-After: 1` holds for both.
pub fn too_many_requests(refusal: Refusal) -> &'static [u8] {
    match refusal {
        Refusal::Connections => b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 39\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many connections from your address\n",
        Refusal::Handshakes => b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 38\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many handshakes from your address\n",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_429s_say_their_length_truly() {
        for refusal in [Refusal::Connections, Refusal::Handshakes] {
            let text = std::str::from_utf8(too_many_requests(refusal)).expect("ASCII");
            let (head, body) = text.split_once("\r\n\r\n").expect("a head");
            assert!(head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
            assert!(
                head.contains(&format!("Content-Length: {}\r\n", body.len())),
                "{text}"
            );
            assert!(head.contains("Retry-After: 1"));
        }
    }
}
