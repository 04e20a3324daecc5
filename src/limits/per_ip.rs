//! What one client address may hold: open connections, and handshakes per
//! second. A table of addresses that must not itself become the thing an
//! attacker fills: an entry is kept only while it counts a connection or
//! its handshake bucket is not yet full again, idle ones are swept once the
//! table doubles, and past a hard cap a new address is let through
//! uncounted (the global `--max-connections` still holds) rather than
//! refused, so a flood of fresh addresses cannot lock real clients out.
//! No clock and no sockets: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;

use super::rate::{Bucket, Rate};

/// The unit a limit counts: one IPv4 address, or one IPv6 /64 (what one
/// subscriber or one host is usually given; counting single IPv6 addresses
/// would let one host take 2^64 of them). IPv4-mapped IPv6 addresses count
/// as the IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6Prefix(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(u32::from(v4)),
                None => ClientKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It holds `--max-connections-per-ip` connections already.
    Connections,
    /// It opened `--max-handshakes-per-ip` in the last second.
    Handshakes,
}

/// The limits one address is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpPolicy {
    /// Connections one address may hold; 0: no limit.
    pub max_connections: u32,
    /// Handshakes one address may start.
    pub handshakes: Rate,
}

impl PerIpPolicy {
    pub fn is_off(&self) -> bool {
        self.max_connections == 0 && self.handshakes.is_unlimited()
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    connections: u32,
    handshakes: Bucket,
}

/// Entries below which no sweep is tried.
const SWEEP_FLOOR: usize = 1024;
/// Idle entries (no connection counted) beyond which a new address is let
/// through uncounted: about 3 MiB of table at most, beside the entries of
/// open connections, which the connection limit bounds.
const IDLE_CAP: usize = 65_536;

#[derive(Debug)]
pub struct PerIp {
    policy: PerIpPolicy,
    entries: HashMap<ClientKey, Entry>,
    /// Which address each counted connection (by slot) is counted against.
    by_slot: HashMap<usize, ClientKey>,
    /// Sweep idle entries once the table grows past this.
    sweep_at: usize,
    /// When the last sweep ran: at the cap, sweeps wait [`SWEEP_PAUSE_US`]
    /// between them, so a table full of fresh addresses is not scanned
    /// once per connection.
    swept_at_us: Option<u64>,
}

/// The least time between two sweeps of a table at its cap.
const SWEEP_PAUSE_US: u64 = 100_000;

impl PerIp {
    pub fn new(policy: PerIpPolicy) -> PerIp {
        PerIp {
            policy,
            entries: HashMap::new(),
            by_slot: HashMap::new(),
            sweep_at: SWEEP_FLOOR,
            swept_at_us: None,
        }
    }

    pub fn is_off(&self) -> bool {
        self.policy.is_off()
    }

    /// Addresses in the table (for `/metrics`).
    pub fn tracked(&self) -> usize {
        self.entries.len()
    }

    /// A connection in `slot` from `key` at `now_us`: counted against it,
    /// or refused (and then not counted: its slot is not to be released).
    pub fn admit(&mut self, key: ClientKey, slot: usize, now_us: u64) -> Result<(), Refusal> {
        if self.is_off() {
            return Ok(());
        }
        if !self.entries.contains_key(&key) && !self.make_room(now_us) {
            return Ok(()); // full of fresh addresses: let it through uncounted
        }
        let entry = self.entries.entry(key).or_default();
        if self.policy.max_connections > 0 && entry.connections >= self.policy.max_connections {
            return Err(Refusal::Connections);
        }
        if entry
            .handshakes
            .take(self.policy.handshakes, now_us)
            .is_err()
        {
            return Err(Refusal::Handshakes);
        }
        entry.connections += 1;
        if let Some(old) = self.by_slot.insert(slot, key) {
            // The caller released nothing for a slot it reused: keep the
            // counts true anyway.
            self.uncount(old);
        }
        Ok(())
    }

    /// The connection in `slot` is gone (a slot never admitted is ignored).
    pub fn release(&mut self, slot: usize) {
        if let Some(key) = self.by_slot.remove(&slot) {
            self.uncount(key);
        }
    }

    fn uncount(&mut self, key: ClientKey) {
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.connections = entry.connections.saturating_sub(1);
        }
    }

    /// Whether a new entry may be added, sweeping idle ones when the table
    /// has grown enough for a sweep to pay for itself.
    fn make_room(&mut self, now_us: u64) -> bool {
        let cap = self.by_slot.len() + IDLE_CAP;
        let at_cap = self.entries.len() >= cap;
        let paused = self
            .swept_at_us
            .is_some_and(|at| now_us.saturating_sub(at) < SWEEP_PAUSE_US);
        let due = if at_cap {
            !paused
        } else {
            self.entries.len() >= self.sweep_at
        };
        if due {
            self.entries
                .retain(|_, e| e.connections > 0 || !e.handshakes.is_full(now_us));
            self.sweep_at = (self.entries.len() * 2).max(SWEEP_FLOOR);
            self.swept_at_us = Some(now_us);
        }
        self.entries.len() < cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const S: u64 = 1_000_000;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> ClientKey {
        ClientKey::of(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    fn v6(text: &str) -> ClientKey {
        ClientKey::of(text.parse::<Ipv6Addr>().expect("an IPv6 address").into())
    }

    #[test]
    fn keys_count_ipv4_addresses_and_ipv6_slash_64s() {
        #[rustfmt::skip]
        let same = [
            (v6("2001:db8:1:2::1"), v6("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            (v6("::ffff:192.0.2.7"), v4(192, 0, 2, 7)),
        ];
        for (a, b) in same {
            assert_eq!(a, b);
        }
        #[rustfmt::skip]
        let different = [
            (v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1")),
            (v4(127, 0, 0, 1), v4(127, 0, 0, 2)),
            (v4(0, 0, 0, 1), v6("::1")),
        ];
        for (a, b) in different {
            assert_ne!(a, b);
        }
    }

    /// Each row: the policy, then (address, slot, time, expected) admits
    /// with `Some(slot)` releases in between.
    #[test]
    fn connections_and_handshakes_per_address() {
        let a = v4(192, 0, 2, 1);
        let b = v4(192, 0, 2, 2);
        let conn = |n| PerIpPolicy {
            max_connections: n,
            handshakes: Rate::UNLIMITED,
        };
        let rate = |n| PerIpPolicy {
            max_connections: 0,
            handshakes: Rate::new(n, n),
        };
        enum Step {
            Admit(ClientKey, usize, u64, Result<(), Refusal>),
            Release(usize),
        }
        use Step::{Admit, Release};
        let full = Err(Refusal::Connections);
        let fast = Err(Refusal::Handshakes);
        #[rustfmt::skip]
        let table: Vec<(PerIpPolicy, Vec<Step>)> = vec![
            (conn(2), vec![
                Admit(a, 1, 0, Ok(())), Admit(a, 2, 0, Ok(())), Admit(a, 3, 0, full),
                Admit(b, 4, 0, Ok(())),           // another address is not affected
                Release(3),                       // refused: was never counted
                Admit(a, 5, 0, full),
                Release(1), Admit(a, 6, 0, Ok(())), Admit(a, 7, 0, full),
                Release(99),                      // unknown slot
            ]),
            (rate(2), vec![
                Admit(a, 1, 0, Ok(())), Admit(a, 2, 0, Ok(())), Admit(a, 3, 0, fast),
                Admit(b, 4, 0, Ok(())),
                Release(1), Release(2),
                Admit(a, 5, 0, fast),             // closing does not give handshakes back
                Admit(a, 6, S / 2, Ok(())),       // time does
            ]),
            // Both: a full address is refused for its connections before its
            // handshakes are spent.
            (PerIpPolicy { max_connections: 1, handshakes: Rate::new(1, 2) }, vec![
                Admit(a, 1, 0, Ok(())), Admit(a, 2, 0, full), Admit(a, 3, 0, full),
                Release(1), Admit(a, 4, 0, Ok(())),
            ]),
            // Off: nothing counted.
            (conn(0), (0..100).map(|s| Admit(a, s, 0, Ok(()))).collect()),
        ];
        for (row, (policy, steps)) in table.into_iter().enumerate() {
            let mut table = PerIp::new(policy);
            for (i, step) in steps.into_iter().enumerate() {
                match step {
                    Admit(key, slot, now, expected) => {
                        assert_eq!(table.admit(key, slot, now), expected, "row {row} step {i}")
                    }
                    Release(slot) => table.release(slot),
                }
            }
        }
    }

    #[test]
    fn the_table_forgets_idle_addresses_and_stays_bounded() {
        let mut table = PerIp::new(PerIpPolicy {
            max_connections: 4,
            handshakes: Rate::new(10, 10),
        });
        // One address holds a connection through everything below.
        let holder = v4(10, 0, 0, 1);
        table.admit(holder, 0, 0).expect("first");
        // A stream of fresh addresses, each one handshake, one per 10 ms:
        // each is idle 100 ms later, so sweeps keep the table small.
        for i in 1..20_000u32 {
            let key = ClientKey::V4(0x0b00_0000 + i);
            let now = u64::from(i) * 10_000;
            table.admit(key, i as usize, now).expect("fresh");
            table.release(i as usize);
        }
        assert!(
            table.tracked() <= 2 * SWEEP_FLOOR + 1,
            "{}",
            table.tracked()
        );
        assert_eq!(
            table.entries[&holder].connections, 1,
            "a counting entry stays"
        );
        // A burst of fresh addresses all at one instant cannot be swept: past
        // the cap they are let through uncounted, and the table stops growing.
        let now = 1000 * S;
        for i in 0..(IDLE_CAP as u32 + 10_000) {
            let slot = 100_000 + i as usize;
            assert_eq!(
                table.admit(ClientKey::V6Prefix(u64::from(i)), slot, now),
                Ok(())
            );
            table.release(slot);
        }
        assert!(table.tracked() <= IDLE_CAP + 1, "{}", table.tracked());
        // Counting goes on for addresses already known.
        for slot in 1..4 {
            table.admit(holder, slot, now).expect("room for four");
        }
        assert_eq!(table.admit(holder, 9, now), Err(Refusal::Connections));
    }
}
