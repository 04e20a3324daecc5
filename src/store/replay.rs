//! Reading the outbox log back: the records it holds, and where it is
//! damaged. No I/O: bytes in, records and a report of the damage out.
//!
//! Every record carries its own length and checksum, so one damaged record
//! need not cost the ones after it: replay steps over the damage and
//! resynchronises on the next offset where a whole record checks out.
//! Damage with nothing readable after it is a *tail* (a write torn by a
//! power cut, or bytes appended by something else), which the log can
//! simply be cut back from; anything else is damage *inside* the log.

use std::ops::Range;

use super::record::Record;

/// Checksum work replay may spend, in bytes, per byte of the log...
const WORK_PER_BYTE: usize = 16;
/// ...plus this much, so that the one large record after a small damaged
/// stretch is always found.
const WORK_FLOOR: usize = 1 << 20;

/// What a log's bytes hold.
#[derive(Debug, Default)]
pub struct Replay {
    /// The records that check out, in order.
    pub records: Vec<Record>,
    /// Where each of `records` lies in the input.
    kept: Vec<Range<usize>>,
    /// The stretches that could not be read, in order. Each is followed by
    /// a kept record or by the end of the input.
    pub damaged: Vec<Range<usize>>,
    /// The work budget ran out: the last damaged stretch was not searched
    /// to its end, and may hold records.
    pub gave_up: bool,
    /// Bytes checksummed, searches included (the budget's measure).
    pub work: usize,
    len: usize,
}

/// Where a log is damaged, as far as what to do about it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    None,
    /// Only the bytes after the last record that checks out: cutting them
    /// loses nothing that could be read.
    Tail(Range<usize>),
    /// Before the last record that checks out (or unsearched): the file is
    /// evidence, and must not be cut.
    Inside,
}

impl Replay {
    /// Reads `bytes` as a log. Linear in their length whatever they hold:
    /// checksums, the only work that grows with a record's length, stop at
    /// a budget proportional to the input (see [`Budget`]).
    pub fn read(bytes: &[u8]) -> Replay {
        let mut budget = Budget {
            left: bytes
                .len()
                .saturating_mul(WORK_PER_BYTE)
                .saturating_add(WORK_FLOOR),
            spent: 0,
            ran_out: false,
        };
        let mut replay = Replay {
            len: bytes.len(),
            ..Replay::default()
        };
        let mut pos = 0;
        while pos < bytes.len() {
            let found = record_at(bytes, pos, &mut budget).or_else(|| {
                let at = resync(bytes, pos, &mut budget);
                replay
                    .damaged
                    .push(pos..at.as_ref().map_or(bytes.len(), |f| f.0));
                at
            });
            let Some((at, record, used)) = found else {
                break;
            };
            replay.records.push(record);
            replay.kept.push(at..at + used);
            pos = at + used;
        }
        replay.gave_up = budget.ran_out;
        replay.work = budget.spent;
        replay
    }

    pub fn damage(&self) -> Damage {
        match self.damaged.as_slice() {
            [] => Damage::None,
            [tail] if tail.end == self.len && !self.gave_up => Damage::Tail(tail.clone()),
            _ => Damage::Inside,
        }
    }

    /// Bytes that could not be read, the tail's included.
    pub fn damaged_bytes(&self) -> usize {
        self.damaged.iter().map(|d| d.len()).sum()
    }

    /// The log without its damage: the kept records' bytes, in order. It
    /// replays to the same records.
    pub fn clean(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.kept.iter().map(|k| k.len()).sum());
        for kept in &self.kept {
            out.extend_from_slice(&bytes[kept.clone()]);
        }
        out
    }
}

/// Checksum work left. A crafted log can make many offsets look like the
/// start of a long record (a header whose lengths add up, a bad checksum),
/// and checking each in full would take time quadratic in the log's size.
/// With a budget of a few times the log's size, the records of an intact
/// log (checksummed once each) always fit, and so does the search past
/// ordinary damage; only a log built to waste time runs it out, and then
/// the rest of it is reported damaged (and kept as evidence), not searched.
struct Budget {
    left: usize,
    spent: usize,
    ran_out: bool,
}

impl Budget {
    fn spend(&mut self, bytes: usize) -> bool {
        if bytes > self.left {
            self.ran_out = true;
            return false;
        }
        self.left -= bytes;
        self.spent += bytes;
        true
    }
}

/// The record at `at`, if one checks out there: (where, record, length).
fn record_at(bytes: &[u8], at: usize, budget: &mut Budget) -> Option<(usize, Record, usize)> {
    let rest = bytes.get(at..)?;
    // Constant time; the checksum only where the lengths add up.
    let len = Record::shape(rest)?;
    if !budget.spend(len) {
        return None;
    }
    let (record, used) = Record::decode(rest).ok()?;
    Some((at, record, used))
}

/// The first record after damage at `from`, if any.
///
/// Most of a record is payload, so the damage is most likely there and the
/// record's length still right: where it says the record ends is tried
/// first. Only if no record starts there is the length suspect, and every
/// later offset is tried in turn. That order matters beyond speed: a message
/// body may itself hold bytes that look like whole records, and the
/// byte-by-byte search could take those for real ones (which it can still
/// do, but only after damage to a length field, or in a torn tail).
fn resync(bytes: &[u8], from: usize, budget: &mut Budget) -> Option<(usize, Record, usize)> {
    let declared_end = Record::declared_len(&bytes[from..]).and_then(|len| from.checked_add(len));
    if let Some(found) = declared_end.and_then(|end| record_at(bytes, end, budget)) {
        return Some(found);
    }
    for at in from + 1..bytes.len() {
        if budget.ran_out {
            break;
        }
        if let Some(found) = record_at(bytes, at, budget) {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::FRAME_OVERHEAD;

    fn message(seq: u64) -> Record {
        Record::Store {
            user: "bob".into(),
            seq,
            id: 1_000 + seq,
            ts: 1_764_250_000_000 + seq,
            from: "alice".into(),
            body: format!("message number {seq}"),
            notified: false,
        }
    }

    /// 100 messages; and where each record starts (plus the end).
    fn hundred() -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=100 {
            starts.push(bytes.len());
            message(seq).encode(&mut bytes);
        }
        starts.push(bytes.len());
        (bytes, starts)
    }

    fn seqs(replay: &Replay) -> Vec<u64> {
        replay
            .records
            .iter()
            .map(|r| match r {
                Record::Store { seq, .. } => *seq,
                other => panic!("not a message: {other:?}"),
            })
            .collect()
    }

    fn all_but(lost: &[u64]) -> Vec<u64> {
        (1..=100).filter(|s| !lost.contains(s)).collect()
    }

    #[test]
    fn an_intact_log_reads_whole() {
        let (bytes, _) = hundred();
        let replay = Replay::read(&bytes);
        assert_eq!(seqs(&replay), all_but(&[]));
        assert_eq!(replay.damage(), Damage::None);
        assert_eq!(replay.work, bytes.len());
        assert_eq!(replay.clean(&bytes), bytes);
        assert_eq!(Replay::read(&[]).damage(), Damage::None);
    }

    #[test]
    fn any_byte_of_a_middle_record_flipped_loses_that_record_only() {
        let (bytes, starts) = hundred();
        let (first, end) = (starts[49], starts[50]);
        for at in first..end {
            for bit in [0x01, 0x20, 0x80] {
                let mut damaged = bytes.clone();
                damaged[at] ^= bit;
                let replay = Replay::read(&damaged);
                assert_eq!(seqs(&replay), all_but(&[50]), "flip {bit:#x} at {at}");
                assert_eq!(replay.damaged, vec![first..end], "flip {bit:#x} at {at}");
                assert_eq!(replay.damage(), Damage::Inside);
                // The clean log is the intact one without record 50.
                let mut want = bytes[..first].to_vec();
                want.extend_from_slice(&bytes[end..]);
                assert_eq!(replay.clean(&damaged), want);
            }
        }
    }

    #[test]
    fn a_flipped_first_byte_keeps_the_rest() {
        let (mut bytes, starts) = hundred();
        bytes[0] ^= 0xFF;
        let replay = Replay::read(&bytes);
        assert_eq!(seqs(&replay), all_but(&[1]));
        assert_eq!(replay.damaged, vec![0..starts[1]]);
        assert_eq!(replay.damage(), Damage::Inside);
    }

    #[test]
    fn a_damaged_length_field_loses_that_record_only() {
        let (bytes, starts) = hundred();
        let (first, end) = (starts[49], starts[50]);
        let len = (end - first - FRAME_OVERHEAD) as u32;
        // Past the end of the file, zero, one short, into the next record,
        // and exactly onto the record after next (a valid record there: the
        // one in between is lost with it, the only way to be fooled).
        let next_len = (starts[51] - end) as u32;
        for (bad, lost) in [
            (u32::MAX, vec![50]),
            (0, vec![50]),
            (len - 1, vec![50]),
            (len + 5, vec![50]),
            (len + next_len, vec![50, 51]),
        ] {
            let mut damaged = bytes.clone();
            damaged[first..first + 4].copy_from_slice(&bad.to_le_bytes());
            let replay = Replay::read(&damaged);
            assert_eq!(seqs(&replay), all_but(&lost), "length {bad}");
            assert_eq!(replay.damage(), Damage::Inside, "length {bad}");
        }
    }

    #[test]
    fn garbage_in_the_middle_loses_nothing() {
        let (bytes, starts) = hundred();
        let at = starts[50];
        let mut header_like = Vec::new();
        for _ in 0..50 {
            // Headers that claim plausible lengths, with bad checksums.
            header_like.extend_from_slice(&30u32.to_le_bytes());
            header_like.extend_from_slice(&[0xAB; 4]);
            header_like.push(2);
        }
        for garbage in [
            vec![0u8; 4096],
            vec![0xFF; 1000],
            b"not a record at all".repeat(20),
            header_like,
        ] {
            let mut damaged = bytes[..at].to_vec();
            damaged.extend_from_slice(&garbage);
            damaged.extend_from_slice(&bytes[at..]);
            let replay = Replay::read(&damaged);
            assert_eq!(seqs(&replay), all_but(&[]));
            assert_eq!(replay.damaged, vec![at..at + garbage.len()]);
            assert_eq!(replay.damage(), Damage::Inside);
            assert_eq!(replay.clean(&damaged), bytes);
        }
    }

    #[test]
    fn a_tail_torn_anywhere_is_a_tail() {
        let (bytes, starts) = hundred();
        let last = starts[99];
        for cut in last + 1..bytes.len() {
            let replay = Replay::read(&bytes[..cut]);
            assert_eq!(seqs(&replay), all_but(&[100]), "cut {cut}");
            assert_eq!(replay.damage(), Damage::Tail(last..cut), "cut {cut}");
        }
        for at in last..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            let replay = Replay::read(&damaged);
            assert_eq!(seqs(&replay), all_but(&[100]), "flip at {at}");
            assert_eq!(replay.damage(), Damage::Tail(last..bytes.len()));
        }
    }

    #[test]
    fn appended_garbage_is_a_tail() {
        let (bytes, _) = hundred();
        for garbage in [vec![0u8; 3], vec![0u8; 5000], b"\xff\xfe junk".repeat(100)] {
            let mut damaged = bytes.clone();
            damaged.extend_from_slice(&garbage);
            let replay = Replay::read(&damaged);
            assert_eq!(seqs(&replay), all_but(&[]));
            assert_eq!(replay.damage(), Damage::Tail(bytes.len()..damaged.len()));
            assert_eq!(replay.damaged_bytes(), garbage.len());
        }
    }

    #[test]
    fn a_record_inside_a_damaged_body_is_not_taken_for_a_real_one() {
        // A body that holds a whole encoded record (a forged message): any
        // record whose checksum bytes happen to be ASCII can be sent as text.
        let forged = (1..)
            .find_map(|id| {
                let mut forged = Vec::new();
                Record::Store {
                    user: "victim".into(),
                    seq: 1,
                    id,
                    ts: 1,
                    from: "admin".into(),
                    body: "send me your password".into(),
                    notified: false,
                }
                .encode(&mut forged);
                String::from_utf8(forged).ok()
            })
            .unwrap_or_default();
        let carrier = Record::Store {
            user: "bob".into(),
            seq: 1,
            id: 1,
            ts: 1,
            from: "mallory".into(),
            body: forged,
            notified: false,
        };
        let mut bytes = Vec::new();
        carrier.encode(&mut bytes);
        let carrier_len = bytes.len();
        message(2).encode(&mut bytes);
        assert!(
            (1..carrier_len).any(|at| Record::decode(&bytes[at..]).is_ok()),
            "the carrier holds a record that a search byte by byte would find"
        );
        // Damage the carrier's payload before the embedded record.
        bytes[FRAME_OVERHEAD + 2] ^= 0x01;
        let replay = Replay::read(&bytes);
        assert_eq!(seqs(&replay), vec![2]);
    }

    #[test]
    fn a_log_built_to_waste_time_is_read_in_linear_time() {
        // From every 13th byte, a header whose lengths add up to a record
        // reaching the end of the file, with a wrong checksum: checking each
        // in full would hash ~n²/26 bytes (40 GB for this 1 MiB).
        let n = 1 << 20;
        let mut bytes = vec![0u8; n];
        let mut at = 0;
        while at + 13 <= n {
            let payload = (n - at - FRAME_OVERHEAD) as u32;
            bytes[at..at + 4].copy_from_slice(&payload.to_le_bytes());
            bytes[at + 8] = 2;
            bytes[at + 9..at + 13].copy_from_slice(&(payload - 13).to_le_bytes());
            at += 13;
        }
        assert!(Record::shape(&bytes[13..]).is_some(), "the trap is set");
        let replay = Replay::read(&bytes);
        assert!(replay.records.is_empty());
        assert!(
            replay.work <= WORK_PER_BYTE * n + WORK_FLOOR,
            "{}",
            replay.work
        );
        assert!(replay.gave_up);
        // Not searched to the end: evidence, not a tail to cut.
        assert_eq!(replay.damage(), Damage::Inside);
    }
}
