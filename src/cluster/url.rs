//! `--cluster redis://[:PASSWORD@]HOST:PORT[/DB]`.

use std::net::{SocketAddr, ToSocketAddrs};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub password: Option<String>,
    pub db: u32,
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or("must start with redis://")?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let password = match auth {
            None => None,
            // `user:password` (Redis 6 ACL users are not supported: default user).
            Some(auth) => match auth.split_once(':') {
                Some(("", pw)) | Some(("default", pw)) if !pw.is_empty() => Some(pw.to_owned()),
                _ => return Err("credentials must be :PASSWORD@".into()),
            },
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (hp, db.parse().map_err(|_| "DB must be a number")?),
            None => (rest, 0),
        };
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or("HOST:PORT expected (the port is required)")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("empty host".into());
        }
        let port = port.parse().map_err(|_| "bad port")?;
        Ok(RedisUrl {
            host: host.to_owned(),
            port,
            password,
            db,
        })
    }

    /// Resolved once, at start (a blocking lookup, before the loop runs).
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address for the Redis host"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let ok = [
            ("redis://h:6379", ("h", 6379, None, 0)),
            ("redis://h:1/3", ("h", 1, None, 3)),
            ("redis://:pw@h:1/", ("h", 1, Some("pw"), 0)),
            ("redis://:p@w@[::1]:2/1", ("::1", 2, Some("p@w"), 1)),
        ];
        for (url, (host, port, pw, db)) in ok {
            let u = RedisUrl::parse(url).unwrap();
            assert_eq!(
                (u.host.as_str(), u.port, u.password.as_deref(), u.db),
                (host, port, pw, db),
                "{url}"
            );
        }
        for bad in [
            "h:1",
            "redis://h",
            "redis://h:x",
            "redis://u@h:1",
            "redis://h:1/x",
            "redis://:1",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
