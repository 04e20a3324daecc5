//! Who the client is behind a reverse proxy: `X-Forwarded-For`, believed
//! only from a `--trusted-proxy`. Each proxy appends the address it got the
//! request from, so the entries are read from the right: trusted proxies
//! are skipped, and the first address that is not one is the client's
//! (everything to its left was written by that client and proves nothing).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// An address or a network (`10.0.0.0/8`, `fd00::/8`, `192.0.2.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = canonical(address.trim().parse::<IpAddr>().ok()?);
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
            Some(_) => return None,
            None => bits,
        };
        (prefix <= bits).then_some(Cidr { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Whether the first `prefix` bits of `a` and `b` agree.
fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    prefix == 0 || (a ^ b) >> (128 - u32::from(prefix)) == 0
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4
/// clients) as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The `--trusted-proxy` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|cidr| cidr.contains(ip))
    }

    /// The client's address for a request from `peer` carrying
    /// `forwarded_for` (every `X-Forwarded-For` value, in order, joined by
    /// commas). From a peer that is not a trusted proxy, the header is
    /// ignored. An entry that is not an address ends the walk: the nearest
    /// address to its right (a trusted proxy) is taken, so garbage never
    /// names a client. When every entry is trusted, the leftmost is taken.
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let peer = canonical(peer);
        let Some(header) = forwarded_for else {
            return peer;
        };
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for entry in header.rsplit(',') {
            let Some(ip) = parse_entry(entry) else {
                return client;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`) or brackets as some proxies write it.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    let bracketed = entry.strip_prefix('[')?.strip_suffix(']')?;
    bracketed
        .parse::<Ipv6Addr>()
        .ok()
        .map(|v6| canonical(v6.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn cidrs_parse_and_match() {
        #[rustfmt::skip]
        let table = [
            // cidr,             address,            contains
            ("10.0.0.0/8",       "10.255.1.2",       true),
            ("10.0.0.0/8",       "11.0.0.1",         false),
            ("192.0.2.1",        "192.0.2.1",        true),
            ("192.0.2.1",        "192.0.2.2",        false),
            ("192.0.2.1/32",     "192.0.2.1",        true),
            ("0.0.0.0/0",        "203.0.113.9",      true),
            ("0.0.0.0/0",        "::1",              false),
            ("fd00::/8",         "fd12:3456::1",     true),
            ("fd00::/8",         "fe80::1",          false),
            ("::1",              "::1",              true),
            ("::/0",             "2001:db8::1",      true),
            ("10.0.0.0/8",       "::ffff:10.1.2.3",  true),  // a dual-stack listener's view
            ("::ffff:10.0.0.1",  "10.0.0.1",         true),
            ("172.16.0.0/12",    "172.31.255.255",   true),
            ("172.16.0.0/12",    "172.32.0.0",       false),
        ];
        for (cidr, address, expected) in table {
            let parsed = Cidr::parse(cidr).unwrap_or_else(|| panic!("{cidr} parses"));
            assert_eq!(parsed.contains(ip(address)), expected, "{cidr} ∋ {address}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "host.example",
            "10.0.0/8",
            "10.0.0.0/8/8",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_rightmost_untrusted_entry_is_the_client() {
        let proxies = TrustedProxies(vec![
            Cidr::parse("10.0.0.0/8").expect("cidr"),
            Cidr::parse("::1").expect("cidr"),
        ]);
        #[rustfmt::skip]
        let table: &[(&str, Option<&str>, &str)] = &[
            // peer,       X-Forwarded-For,                          client
            ("10.0.0.1",   Some("203.0.113.7"),                      "203.0.113.7"),
            ("10.0.0.1",   None,                                     "10.0.0.1"),     // the proxy's own request
            ("10.0.0.1",   Some("198.51.100.1, 203.0.113.7"),        "203.0.113.7"),  // the left one is the client's claim
            ("10.0.0.1",   Some("198.51.100.1, 203.0.113.7, 10.0.0.9"), "203.0.113.7"), // two proxies
            ("10.0.0.1",   Some("10.0.0.3, 10.0.0.9"),               "10.0.0.3"),     // all trusted: the leftmost
            ("10.0.0.1",   Some("garbage, 203.0.113.7"),             "203.0.113.7"),
            ("10.0.0.1",   Some("203.0.113.7, garbage"),             "10.0.0.1"),     // garbage names no one
            ("10.0.0.1",   Some("198.51.100.1, garbage, 10.0.0.9"),  "10.0.0.9"),
            ("10.0.0.1",   Some(""),                                 "10.0.0.1"),
            ("10.0.0.1",   Some(" 203.0.113.7:4711 "),               "203.0.113.7"),
            ("10.0.0.1",   Some("[2001:db8::1]:4711"),               "2001:db8::1"),
            ("10.0.0.1",   Some("[2001:db8::1]"),                    "2001:db8::1"),
            ("10.0.0.1",   Some("::ffff:203.0.113.7"),               "203.0.113.7"),
            ("::1",        Some("2001:db8::5"),                      "2001:db8::5"),
            ("::ffff:10.0.0.1", Some("203.0.113.7"),                 "203.0.113.7"),
            // Not a trusted proxy: the header is ignored.
            ("192.0.2.50", Some("203.0.113.7"),                      "192.0.2.50"),
            ("192.0.2.50", Some("10.0.0.1"),                         "192.0.2.50"),
        ];
        for &(peer, header, client) in table {
            assert_eq!(
                proxies.client(ip(peer), header),
                ip(client),
                "{peer} {header:?}"
            );
        }
        let none = TrustedProxies::default();
        assert_eq!(
            none.client(ip("10.0.0.1"), Some("203.0.113.7")),
            ip("10.0.0.1")
        );
    }
}
