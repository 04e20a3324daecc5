//! The records of the outbox log and their byte format.
//!
//! A record on disk is `[len u32 LE][crc32 u32 LE][payload; len]`; the CRC
//! covers the payload. A torn write (power cut mid-record) leaves a tail
//! whose length or checksum does not match, which replay detects and cuts;
//! a record damaged elsewhere fails its own checksum, and replay finds the
//! next one that passes (see `store::replay`).

/// A change to the outboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A private message held for `user`.
    Store {
        user: String,
        seq: u64,
        id: u64,
        ts: u64,
        from: String,
        body: String,
        /// The sender was already told it was delivered.
        notified: bool,
    },
    /// The sender of `user`'s message `seq` was told it was delivered.
    Notified { user: String, seq: u64 },
    /// Everything for `user` up to `seq` is done with (acknowledged by a
    /// reliable client, or written to a simple client's connection).
    Ack { user: String, seq: u64 },
    /// One message passed its time to live.
    Expire { user: String, seq: u64 },
    /// Sequence numbers below `next` may have been given out (one counter
    /// numbers every recipient's messages).
    SeqFloor { next: u64 },
    /// The same, from a log written when each user had a counter of its
    /// own: read (as a floor for every number), no longer written.
    UserSeqFloor { user: String, next: u64 },
    /// `user` connected (with authentication: a valid token named it), so
    /// private messages may be held for it.
    Known { user: String },
}

const STORE: u8 = 1;
const ACK: u8 = 2;
const EXPIRE: u8 = 3;
const USER_SEQ_FLOOR: u8 = 4;
const NOTIFIED: u8 = 5;
const KNOWN: u8 = 6;
const SEQ_FLOOR: u8 = 7;

/// Bytes of framing around each payload.
pub const FRAME_OVERHEAD: usize = 8;

/// Where sequence numbers end: a `Store` record's `seq` is below it and a
/// `SeqFloor` record's `next` at most it, and the outboxes number nothing
/// past it, so that what they write reads back. A server numbers messages
/// from one counter that starts near the clock's milliseconds times 1000
/// (about 2^51 today), so it never comes near; a record beyond is
/// damage, and refusing it keeps the outboxes' arithmetic (`seq + 1`, a
/// block of 1024 ahead) from overflowing. (Other records may carry any
/// number: a client may acknowledge up to 2^64 - 1.)
pub const SEQ_LIMIT: u64 = 1 << 63;

/// Why bytes could not be read as a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrupt {
    /// The input ends inside a record.
    Truncated,
    /// The checksum does not match, or the payload does not parse or holds
    /// a sequence number beyond [`SEQ_LIMIT`].
    BadRecord,
}

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Corrupt::Truncated => "the log ends inside a record",
            Corrupt::BadRecord => "a record's checksum or payload is wrong",
        })
    }
}

impl std::error::Error for Corrupt {}

impl Record {
    /// Appends the framed record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_OVERHEAD]);
        match self {
            Record::Store {
                user,
                seq,
                id,
                ts,
                from,
                body,
                notified,
            } => {
                out.push(STORE);
                put_str(out, user);
                put_u64(out, *seq);
                put_u64(out, *id);
                put_u64(out, *ts);
                put_str(out, from);
                put_str(out, body);
                out.push(u8::from(*notified));
            }
            Record::Notified { user, seq } => {
                out.push(NOTIFIED);
                put_str(out, user);
                put_u64(out, *seq);
            }
            Record::Ack { user, seq } => {
                out.push(ACK);
                put_str(out, user);
                put_u64(out, *seq);
            }
            Record::Expire { user, seq } => {
                out.push(EXPIRE);
                put_str(out, user);
                put_u64(out, *seq);
            }
            Record::SeqFloor { next } => {
                out.push(SEQ_FLOOR);
                put_u64(out, *next);
            }
            Record::UserSeqFloor { user, next } => {
                out.push(USER_SEQ_FLOOR);
                put_str(out, user);
                put_u64(out, *next);
            }
            Record::Known { user } => {
                out.push(KNOWN);
                put_str(out, user);
            }
        }
        let payload_len = (out.len() - start - FRAME_OVERHEAD) as u32;
        let crc = crc32(&out[start + FRAME_OVERHEAD..]);
        out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads one framed record from the start of `input`; returns it and
    /// the bytes it took.
    pub fn decode(input: &[u8]) -> Result<(Record, usize), Corrupt> {
        let (crc, payload) = frame(input)?;
        let len = payload.len();
        if crc32(payload) != crc {
            return Err(Corrupt::BadRecord);
        }
        let mut r = Reader(payload);
        let record = match r.u8()? {
            STORE => Record::Store {
                user: r.string()?,
                seq: r.seq(SEQ_LIMIT - 1)?,
                id: r.u64()?,
                ts: r.u64()?,
                from: r.string()?,
                body: r.string()?,
                notified: r.u8()? != 0,
            },
            NOTIFIED => Record::Notified {
                user: r.string()?,
                seq: r.u64()?,
            },
            ACK => Record::Ack {
                user: r.string()?,
                seq: r.u64()?,
            },
            EXPIRE => Record::Expire {
                user: r.string()?,
                seq: r.u64()?,
            },
            SEQ_FLOOR => Record::SeqFloor {
                next: r.seq(SEQ_LIMIT)?,
            },
            USER_SEQ_FLOOR => Record::UserSeqFloor {
                user: r.string()?,
                next: r.seq(SEQ_LIMIT)?,
            },
            KNOWN => Record::Known { user: r.string()? },
            _ => return Err(Corrupt::BadRecord),
        };
        if !r.0.is_empty() {
            return Err(Corrupt::BadRecord);
        }
        Ok((record, FRAME_OVERHEAD + len))
    }

    /// The bytes a record starting at `input` would take, if its header and
    /// the lengths inside its payload fit together; `None` if they cannot.
    /// Constant time: no checksum, no UTF-8 check. Replay asks this at every
    /// offset while it searches past damage, and pays for a checksum only
    /// where the answer is yes (see `store::replay`).
    pub fn shape(input: &[u8]) -> Option<usize> {
        let (_, payload) = frame(input).ok()?;
        let mut r = Reader(payload);
        // The layouts `encode` writes: a string is a u32 length and its bytes.
        let fits = match r.u8().ok()? {
            STORE => {
                r.skip_string() && r.skip(3 * 8) && r.skip_string() && r.skip_string() && r.skip(1)
            }
            NOTIFIED | ACK | EXPIRE | USER_SEQ_FLOOR => r.skip_string() && r.skip(8),
            SEQ_FLOOR => r.skip(8),
            KNOWN => r.skip_string(),
            _ => false,
        };
        (fits && r.0.is_empty()).then_some(FRAME_OVERHEAD + payload.len())
    }

    /// What a record's header says it takes, payload included (checked
    /// against nothing: the length may itself be damaged).
    pub fn declared_len(input: &[u8]) -> Option<usize> {
        let header = input.get(..4)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        usize::try_from(len).ok()?.checked_add(FRAME_OVERHEAD)
    }
}

/// Splits a framed record into its checksum and its payload.
fn frame(input: &[u8]) -> Result<(u32, &[u8]), Corrupt> {
    let header = input.get(..FRAME_OVERHEAD).ok_or(Corrupt::Truncated)?;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let total = Record::declared_len(header).ok_or(Corrupt::Truncated)?;
    let payload = input.get(FRAME_OVERHEAD..total).ok_or(Corrupt::Truncated)?;
    Ok((crc, payload))
}

fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Corrupt> {
        if self.0.len() < n {
            return Err(Corrupt::BadRecord);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// Skips `n` bytes; false if there are fewer.
    fn skip(&mut self, n: usize) -> bool {
        self.take(n).is_ok()
    }

    /// Skips a string without reading it as UTF-8.
    fn skip_string(&mut self) -> bool {
        self.string_len().is_ok_and(|len| self.skip(len))
    }

    /// A string's length prefix.
    fn string_len(&mut self) -> Result<usize, Corrupt> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        usize::try_from(u32::from_le_bytes(b)).map_err(|_| Corrupt::BadRecord)
    }

    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, Corrupt> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    /// A sequence number of at most `max` (see [`SEQ_LIMIT`]).
    fn seq(&mut self, max: u64) -> Result<u64, Corrupt> {
        let n = self.u64()?;
        if n > max {
            return Err(Corrupt::BadRecord);
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, Corrupt> {
        let len = self.string_len()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Corrupt::BadRecord)
    }
}

/// CRC-32 (IEEE 802.3, as in zlib and PNG), table-driven.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::Store {
                user: "bob".into(),
                seq: 7,
                id: 1_764_250_000_123_000,
                ts: 1_764_250_000_123,
                from: "小明".into(),
                body: "hello \"world\" 😀".into(),
                notified: true,
            },
            Record::Notified {
                user: "bob".into(),
                seq: 7,
            },
            Record::Ack {
                user: "bob".into(),
                seq: 7,
            },
            Record::Expire {
                user: "carol".into(),
                seq: 1,
            },
            Record::SeqFloor { next: 1025 },
            Record::UserSeqFloor {
                user: "dave".into(),
                next: 1025,
            },
            Record::Known {
                user: "Zoë".into()
            },
        ]
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_round_trip() {
        let mut bytes = Vec::new();
        for r in samples() {
            r.encode(&mut bytes);
        }
        let mut pos = 0;
        for expected in samples() {
            let (r, used) = Record::decode(&bytes[pos..]).unwrap();
            assert_eq!(r, expected);
            pos += used;
        }
        assert_eq!(pos, bytes.len());
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32(payload).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn a_sequence_number_no_server_gives_out_is_damage() {
        // The log_replay fuzz target's crash, its checksum filled in: a
        // Store for "eE\0" with seq 2^64 - 1, whose replay overflowed
        // `seq + 1` in `Outboxes::insert`.
        let crash = b"\x01\x03\0\0\0eE\0\xff\xff\xff\xff\xff\xff\xff\xff\x09\0\x01\0\0\0\0\0\
                      \0\0\0v\x05\0\0\0\0\0\0\0\x04\0\0\0\0\0\0\0\0";
        assert_eq!(Record::decode(&framed(crash)), Err(Corrupt::BadRecord));
        let mut highest = crash.to_vec();
        highest[8..16].copy_from_slice(&(SEQ_LIMIT - 1).to_le_bytes());
        let (record, _) = Record::decode(&framed(&highest)).unwrap();
        assert!(matches!(record, Record::Store { seq, .. } if seq == SEQ_LIMIT - 1));

        let store = |seq| Record::Store {
            user: "bob".into(),
            seq,
            id: 1,
            ts: 1,
            from: "a".into(),
            body: "b".into(),
            notified: false,
        };
        let floor = |next| Record::SeqFloor { next };
        let ack = |seq| Record::Ack {
            user: "bob".into(),
            seq,
        };
        for (record, kept) in [
            (store(SEQ_LIMIT - 1), true),
            (store(SEQ_LIMIT), false),
            (store(u64::MAX), false),
            (floor(SEQ_LIMIT), true),
            (floor(SEQ_LIMIT + 1), false),
            (floor(u64::MAX), false),
            (ack(u64::MAX), true),
        ] {
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            let expected = if kept {
                Ok((record.clone(), bytes.len()))
            } else {
                Err(Corrupt::BadRecord)
            };
            assert_eq!(Record::decode(&bytes), expected, "{record:?}");
        }
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_detected() {
        let mut bytes = Vec::new();
        samples()[0].encode(&mut bytes);
        for cut in 0..bytes.len() {
            assert_eq!(
                Record::decode(&bytes[..cut]),
                Err(Corrupt::Truncated),
                "cut {cut}"
            );
        }
        for i in FRAME_OVERHEAD..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert!(Record::decode(&damaged).is_err(), "flip {i}");
        }
    }

    /// `shape` is the cheap filter replay puts before `decode`: it must
    /// never turn away a record that decodes, and must say how long it is.
    #[test]
    fn shape_accepts_every_record_that_decodes_and_gives_its_length() {
        let mut inputs = Vec::new();
        for r in samples() {
            let mut bytes = Vec::new();
            r.encode(&mut bytes);
            for cut in 0..=bytes.len() {
                inputs.push(bytes[..cut].to_vec());
            }
            for i in 0..bytes.len() {
                for bit in [0x01, 0x20, 0x80] {
                    let mut damaged = bytes.clone();
                    damaged[i] ^= bit;
                    inputs.push(damaged);
                }
            }
            bytes.extend_from_slice(b"next record");
            inputs.push(bytes);
        }
        let mut decoded = 0;
        for input in &inputs {
            if let Ok((_, used)) = Record::decode(input) {
                assert_eq!(Record::shape(input), Some(used), "{input:?}");
                decoded += 1;
            }
        }
        // The whole records, and each with a following one.
        assert_eq!(decoded, 2 * samples().len());
        // Lengths that do not add up are turned away without a checksum.
        let mut bytes = Vec::new();
        samples()[2].encode(&mut bytes);
        bytes[0] += 1;
        bytes.push(0);
        assert_eq!(Record::shape(&bytes), None);
        assert_eq!(Record::shape(&[0; 64]), None, "an empty payload");
    }
}
