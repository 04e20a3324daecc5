//! Strict base64url decoding (RFC 4648 section 5, without padding), as JWS
//! compact serialization uses it (RFC 7515 section 2). A few lines, so a
//! dependency is not worth it; nothing here is cryptography.

/// Why bytes are not canonical base64url.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotBase64Url;

impl std::fmt::Display for NotBase64Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not base64url")
    }
}

impl std::error::Error for NotBase64Url {}

fn value(byte: u8) -> Option<u32> {
    Some(u32::from(match byte {
        b'A'..=b'Z' => byte - b'A',
        b'a'..=b'z' => byte - b'a' + 26,
        b'0'..=b'9' => byte - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    }))
}

/// Decodes `text`: only the base64url alphabet, no padding, and unused bits
/// of the last character zero (so every byte string has one encoding).
pub fn decode(text: &[u8]) -> Result<Vec<u8>, NotBase64Url> {
    if text.len() % 4 == 1 {
        return Err(NotBase64Url);
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut bits = 0u32;
        for &byte in chunk {
            bits = (bits << 6) | value(byte).ok_or(NotBase64Url)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&bits.to_be_bytes()[1..]),
            3 => {
                if bits & 0b11 != 0 {
                    return Err(NotBase64Url);
                }
                out.extend_from_slice(&(bits >> 2).to_be_bytes()[2..]);
            }
            2 => {
                if bits & 0b1111 != 0 {
                    return Err(NotBase64Url);
                }
                out.push((bits >> 4) as u8);
            }
            _ => return Err(NotBase64Url),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4648_vectors_in_the_url_alphabet() {
        for (text, bytes) in [
            ("", &b""[..]),
            ("Zg", b"f"),
            ("Zm8", b"fo"),
            ("Zm9v", b"foo"),
            ("Zm9vYg", b"foob"),
            ("Zm9vYmE", b"fooba"),
            ("Zm9vYmFy", b"foobar"),
            ("-_-_", &[0xfb, 0xff, 0xbf]),
        ] {
            assert_eq!(decode(text.as_bytes()).as_deref(), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for text in [
            "Zg==", "Zm9v+", "Zm9v/A", "Z", "Zh", "Zm9", "Zm9vY", "a b", "é",
        ] {
            assert_eq!(decode(text.as_bytes()), Err(NotBase64Url), "{text}");
        }
    }
}
