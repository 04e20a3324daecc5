//! Writing the server's JSON by hand: every outgoing message has a fixed
//! shape, so appending fields to a buffer beats a generic serializer, and
//! only the strings a user supplied need escaping.

/// Which bytes JSON needs escaped: `"`, `\\` and control characters.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// True if any of the 8 bytes in `word` needs escaping (a control
/// character, `"` or `\\`): the classic SWAR zero-byte tests, exact about
/// whether such a byte exists.
fn word_needs_escape(word: u64) -> bool {
    escape_mask(word) != 0
}

/// The high bit of each byte of `word` that may need escaping. Borrows only
/// carry upward from a byte that does, so the lowest marked byte is exact
/// (in a little-endian load, the first one in memory).
fn escape_mask(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let has_quote = quote.wrapping_sub(ONES) & !quote;
    let has_backslash = backslash.wrapping_sub(ONES) & !backslash;
    (below_space | has_quote | has_backslash) & HIGHS
}

/// Appends `s` as a JSON string literal (with quotes). Clean runs (nearly
/// all of a chat message) are checked eight bytes at a time and copied whole.
pub fn string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            if !word_needs_escape(u64::from_le_bytes(word)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        if NEEDS_ESCAPE[usize::from(b)] {
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xF)]);
                }
            }
            start = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends a string that needs no escaping as a JSON string: a username
/// (letters, digits and `_-.`, checked at the handshake) or one of the
/// server's own words. Skips the scan that user-supplied text needs.
pub fn plain(out: &mut Vec<u8>, s: &str) {
    debug_assert!(
        !s.bytes().any(|b| NEEDS_ESCAPE[usize::from(b)]),
        "{s:?} needs escaping"
    );
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// The digits of the last number written of one kind, kept because the
/// next is usually the same (a turn's timestamp) or one more (message ids:
/// a private message and its receipt share one, and the next message has
/// the next).
struct LastNumber {
    value: u64,
    digits: [u8; 20],
    start: usize,
}

impl LastNumber {
    const fn new() -> LastNumber {
        LastNumber {
            value: 0,
            digits: *b"00000000000000000000",
            start: 19,
        }
    }

    fn write(&mut self, out: &mut Vec<u8>, n: u64) {
        if n != self.value && !(self.value.checked_add(1) == Some(n) && self.increment()) {
            (self.digits, self.start) = decimal(n);
        }
        self.value = n;
        out.extend_from_slice(&self.digits[self.start..]);
    }

    /// Adds one to the digits in place; false if that needs a new digit.
    fn increment(&mut self) -> bool {
        for digit in self.digits[self.start..].iter_mut().rev() {
            if *digit == b'9' {
                *digit = b'0';
            } else {
                *digit += 1;
                return true;
            }
        }
        false
    }
}

thread_local! {
    static LAST_TIMESTAMP: std::cell::RefCell<LastNumber> =
        const { std::cell::RefCell::new(LastNumber::new()) };
    static LAST_ID: std::cell::RefCell<LastNumber> =
        const { std::cell::RefCell::new(LastNumber::new()) };
}

/// Appends a millisecond timestamp: every message of a loop turn carries
/// the same one, so its digits are kept (per thread; the server has one).
pub fn timestamp(out: &mut Vec<u8>, ms: u64) {
    LAST_TIMESTAMP.with_borrow_mut(|last| last.write(out, ms));
}

/// Appends a message id: ids go up by one, and a message and its receipt
/// carry the same, so the digits are kept and counted up in place.
pub fn message_id(out: &mut Vec<u8>, id: u64) {
    LAST_ID.with_borrow_mut(|last| last.write(out, id));
}

/// How many leading bytes need no escaping: where a JSON string without
/// escapes would end, found eight bytes at a time. Out of line because,
/// inlined into the parser, its loop ran short of registers (measured).
#[inline(never)]
pub(super) fn clean_prefix(bytes: &[u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    let mut i = match clean_prefix_sse2(bytes) {
        Ok(found) => return found,
        Err(checked) => checked,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let mut i = 0;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let mask = escape_mask(u64::from_le_bytes(word));
        if mask != 0 {
            return i + (mask.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    let tail = &bytes[i..];
    i + tail
        .iter()
        .position(|&b| NEEDS_ESCAPE[usize::from(b)])
        .unwrap_or(tail.len())
}

/// Sixteen bytes at a time (SSE2 is part of every x86_64): `Ok` with the
/// first byte that needs escaping, or `Err` with how many bytes are clean
/// (fewer than 16 are left for the word-wise loop).
#[cfg(target_arch = "x86_64")]
fn clean_prefix_sse2(bytes: &[u8]) -> Result<usize, usize> {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let mut i = 0;
    while let Some(chunk) = bytes.get(i..i + 16) {
        // SAFETY: SSE2 is part of every x86_64 processor, and `chunk` is 16
        // readable bytes (the load is unaligned).
        let mask = unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
            // A control character is one that 0x1f does not lower.
            let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
            let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            _mm_movemask_epi8(_mm_or_si128(control, _mm_or_si128(quote, backslash))) as u32
        };
        if mask != 0 {
            return Ok(i + mask.trailing_zeros() as usize);
        }
        i += 16;
    }
    Err(i)
}

/// Appends an unsigned integer.
pub fn number(out: &mut Vec<u8>, n: u64) {
    let (digits, start) = decimal(n);
    out.extend_from_slice(&digits[start..]);
}

/// The decimal digits of `n`, right-aligned, worked out two at a time, and
/// where they start.
fn decimal(n: u64) -> ([u8; 20], usize) {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    (digits, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_through_serde_json() {
        for s in [
            "plain",
            "q\"uote",
            "back\\slash",
            "nl\n\r\t",
            "\u{0}\u{1f}",
            "小明 😀 مرحبا",
            "</script>",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn the_word_test_agrees_with_the_byte_table() {
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut word = [b'a'; 8];
                word[at] = b;
                let expected = NEEDS_ESCAPE[usize::from(b)];
                assert_eq!(
                    word_needs_escape(u64::from_le_bytes(word)),
                    expected,
                    "byte {b} at {at}"
                );
            }
        }
        for s in [
            "",
            "a",
            "abcdefgh",
            "abcdefghi\"",
            "abcdefgh\\",
            "0123456789abcdef\n",
            "\u{7f}é\u{1}xxxxxxxx",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), s);
            let expected = s.bytes().position(|b| NEEDS_ESCAPE[usize::from(b)]);
            assert_eq!(clean_prefix(s.as_bytes()), expected.unwrap_or(s.len()));
        }
        // Bytes that need escaping after the first must not move it; every
        // position of a 16-byte block, an 8-byte word and the tail.
        for b in 0..=255u8 {
            for at in 0..40 {
                let mut bytes = [0u8; 41];
                bytes[..at].fill(b'a');
                bytes[at] = b;
                let expected = at + usize::from(!NEEDS_ESCAPE[usize::from(b)]);
                assert_eq!(clean_prefix(&bytes), expected, "byte {b} at {at}");
            }
        }
    }

    #[test]
    fn timestamps_are_numbers_even_when_repeated_or_changed() {
        for ms in [
            0u64,
            0,
            1_764_250_000_123,
            1_764_250_000_123,
            7,
            1_764_250_000_124,
        ] {
            let mut out = b"x".to_vec();
            timestamp(&mut out, ms);
            assert_eq!(out, format!("x{ms}").into_bytes());
        }
    }

    #[test]
    fn ids_counted_up_in_place_stay_right_across_carries() {
        let steps = [0u64, 1, 1, 9, 10, 11, 98, 99, 100, 5, 999, 1000, 1001]
            .into_iter()
            .chain(1_764_250_000_000_998..=1_764_250_000_001_001)
            .chain([u64::MAX - 1, u64::MAX, 0, 1]);
        for id in steps {
            let mut out = b"x".to_vec();
            message_id(&mut out, id);
            assert_eq!(out, format!("x{id}").into_bytes());
        }
    }

    #[test]
    fn numbers() {
        for n in [
            0u64,
            7,
            9,
            10,
            99,
            100,
            101,
            12345,
            99_999_999,
            100_000_000,
            100_000_001,
            1_764_250_000_123,
            10_000_000_000_000_000,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            number(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
    }
}
