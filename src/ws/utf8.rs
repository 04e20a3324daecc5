//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! RFC 6455 section 8.1 lets an endpoint fail as soon as an invalid sequence
//! is seen; Autobahn's 6.x "fail fast" cases expect it. `std::str::from_utf8`
//! already rejects an impossible prefix byte-precisely (`error_len() == Some`)
//! and reports a merely unfinished sequence at the end (`error_len() == None`),
//! so only those up to three trailing bytes are carried between pieces.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

impl std::fmt::Display for InvalidUtf8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid UTF-8")
    }
}

impl std::error::Error for InvalidUtf8 {}

#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

impl Utf8Validator {
    /// Validates the next piece of the text.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let need = sequence_len(self.pending[0]);
            let take = (need - have).min(input.len());
            self.pending[have..have + take].copy_from_slice(&input[..take]);
            input = &input[take..];
            let filled = have + take;
            match std::str::from_utf8(&self.pending[..filled]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still a valid prefix; the piece was too short to finish it.
                    self.pending_len = filled as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        match std::str::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &input[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// The text has ended: an unfinished character is an error.
    pub fn finish(&self) -> Result<(), InvalidUtf8> {
        if self.pending_len == 0 {
            Ok(())
        } else {
            Err(InvalidUtf8)
        }
    }
}

/// The length of the sequence a lead byte starts. Only called on a lead byte
/// `from_utf8` accepted as the start of an unfinished sequence (2 to 4 bytes).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xF0..=0xF4 => 4,
        0xE0..=0xEF => 3,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::default();
        let mut start = 0;
        for &cut in cuts {
            v.feed(&bytes[start..cut])?;
            start = cut;
        }
        v.feed(&bytes[start..])?;
        v.finish()
    }

    #[test]
    fn valid_text_split_anywhere_is_valid() {
        let text = "aé€𝄞小明 Zoë ✓ 😀".as_bytes();
        for a in 0..=text.len() {
            for b in a..=text.len() {
                assert_eq!(validate_in_pieces(text, &[a, b]), Ok(()), "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn invalid_text_split_anywhere_is_invalid() {
        let cases: &[&[u8]] = &[
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
            b"\xff",
            b"ab\xc0\xaf",
            b"\xf4\x90\x80\x80",
            b"\xed\xa0\x80",
            b"\xe0\x80\xaf",
            b"abc\xe2\x82",
            b"\x80",
        ];
        for bytes in cases {
            for a in 0..=bytes.len() {
                assert_eq!(
                    validate_in_pieces(bytes, &[a]),
                    Err(InvalidUtf8),
                    "{bytes:?} cut {a}"
                );
            }
        }
    }

    #[test]
    fn fails_on_the_first_impossible_byte_not_at_the_end() {
        let mut v = Utf8Validator::default();
        assert_eq!(v.feed(b"hello \xce"), Ok(()));
        // 0xF4 0x90 can never start a valid character (beyond U+10FFFF).
        assert_eq!(v.feed(b"\xba\xf4\x90"), Err(InvalidUtf8));
        let mut v = Utf8Validator::default();
        assert_eq!(v.feed(b"\xf4"), Ok(()));
        assert_eq!(v.feed(b"\x90"), Err(InvalidUtf8));
    }

    #[test]
    fn unfinished_character_at_the_end_is_invalid() {
        let mut v = Utf8Validator::default();
        assert_eq!(v.feed(b"ok\xe2\x82"), Ok(()));
        assert_eq!(v.finish(), Err(InvalidUtf8));
    }
}
