//! RFC 6455 section 5.2: the frame header, the payload mask, and server frames.
//!
//! Client frames are parsed here (and must be masked); server frames are
//! built here (and are never masked). Nothing in this module allocates except
//! [`encode`], which builds one contiguous frame ready for the socket.

/// A frame header is at most 2 + 8 (extended length) + 4 (mask) bytes.
pub const MAX_HEADER_LEN: usize = 14;

/// Control frames carry at most 125 bytes (RFC 6455 section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Which end of the connection is parsing: a server reads masked frames, a
/// client (the load generator) reads unmasked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Server,
    Client,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: Opcode,
    /// `None` for the unmasked frames a client receives.
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

/// Why a header was refused. Every case maps to close code 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// "RSV1, RSV2, RSV3: MUST be 0 unless an extension is negotiated."
    ReservedBits,
    /// "If an unknown opcode is received, the receiving endpoint MUST _Fail_."
    ReservedOpcode(u8),
    /// "The server MUST close the connection upon receiving a frame that is not masked."
    Unmasked,
    /// "A server MUST NOT mask any frames that it sends to the client."
    Masked,
    /// "Control frames themselves MUST NOT be fragmented."
    FragmentedControl,
    /// "All control frames MUST have a payload length of 125 bytes or less."
    ControlTooLong,
    /// "the most significant bit MUST be 0" in the 64-bit length.
    LengthTopBit,
    /// "the minimal number of bytes MUST be used to encode the length".
    NonMinimalLength,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(crate::ws::ProtocolError::Header(*self).reason())
    }
}

impl std::error::Error for HeaderError {}

/// Parses a frame header from the start of `buf`, as `role` receives it.
///
/// Returns `Ok(None)` while more bytes are needed, and fails as soon as the
/// bytes seen so far are already invalid, so a hostile first byte is refused
/// without waiting for the rest.
pub fn parse_header(buf: &[u8], role: Role) -> Result<Option<(FrameHeader, usize)>, HeaderError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        return Err(HeaderError::ReservedBits);
    }
    let opcode_bits = first & 0x0F;
    let opcode = Opcode::from_bits(opcode_bits).ok_or(HeaderError::ReservedOpcode(opcode_bits))?;
    let fin = first & 0x80 != 0;
    if opcode.is_control() && !fin {
        return Err(HeaderError::FragmentedControl);
    }
    let Some(&second) = buf.get(1) else {
        return Ok(None);
    };
    let masked = second & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(HeaderError::Unmasked),
        (Role::Client, true) => return Err(HeaderError::Masked),
        _ => {}
    }
    let short_len = second & 0x7F;
    if opcode.is_control() && usize::from(short_len) > MAX_CONTROL_PAYLOAD {
        return Err(HeaderError::ControlTooLong);
    }
    let (payload_len, len_end) = match short_len {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u64::from(u16::from_be_bytes([bytes[0], bytes[1]]));
            if len < 126 {
                return Err(HeaderError::NonMinimalLength);
            }
            (len, 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut be = [0u8; 8];
            be.copy_from_slice(bytes);
            let len = u64::from_be_bytes(be);
            if len >> 63 != 0 {
                return Err(HeaderError::LengthTopBit);
            }
            if len <= u64::from(u16::MAX) {
                return Err(HeaderError::NonMinimalLength);
            }
            (len, 10)
        }
        len => (u64::from(len), 2),
    };
    let (mask, end) = if masked {
        let Some(m) = buf.get(len_end..len_end + 4) else {
            return Ok(None);
        };
        (Some([m[0], m[1], m[2], m[3]]), len_end + 4)
    } else {
        (None, len_end)
    };
    let header = FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
    };
    Ok(Some((header, end)))
}

/// XORs `payload` with `mask`, where `payload` starts `offset` bytes into the
/// frame's payload (so a payload unmasked piece by piece stays in phase).
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4], offset: u64) {
    let mut phase = mask;
    phase.rotate_left((offset % 4) as usize);
    xor_repeating(payload, phase);
}

/// [`apply_mask`] for a whole payload (offset 0) that also tells whether
/// the unmasked bytes are all ASCII: a text message almost always is, and
/// ASCII is valid UTF-8, so the separate validation pass can be skipped.
pub fn unmask_reporting_ascii(payload: &mut [u8], mask: [u8; 4]) -> bool {
    xor_repeating(payload, mask) & 0x8080_8080_8080_8080 == 0
}

/// XORs `payload` with `key` repeated, eight bytes at a time (the compiler
/// turns the loop into wide vector XORs); returns the OR of the results, so
/// a high bit set anywhere shows in the top bit of some byte.
fn xor_repeating(payload: &mut [u8], key: [u8; 4]) -> u64 {
    let word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut seen = 0u64;
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let plain = u64::from_ne_bytes(bytes) ^ word;
        seen |= plain;
        chunk.copy_from_slice(&plain.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the phase is unchanged.
    for (byte, key) in chunks.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= key;
        seen |= u64::from(*byte);
    }
    seen
}

/// Writes the header of an unmasked, final server frame carrying `len` bytes.
pub fn write_header(out: &mut Vec<u8>, opcode: Opcode, len: usize) {
    out.push(0x80 | opcode.bits());
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// The header length [`write_header`] uses for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= usize::from(u16::MAX) {
        4
    } else {
        10
    }
}

/// One complete, masked, final client frame (for the load generator).
pub fn encode_masked(opcode: Opcode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(payload.len()) + 4 + payload.len());
    write_header(&mut out, opcode, payload.len());
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
    out
}

/// One complete, unmasked, final server frame.
pub fn encode(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    out
}

/// A close frame with `code` and a reason (truncated to fit 125 bytes on a
/// character boundary).
pub fn encode_close(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(Opcode::Close, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, len_bytes: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![first];
        v.extend_from_slice(len_bytes);
        v[1] |= 0x80;
        v.extend_from_slice(&mask);
        v
    }

    #[test]
    fn parses_the_three_length_forms() {
        let mask = [1, 2, 3, 4];
        let small = masked(0x81, &[5], mask);
        let (h, n) = parse_header(&small, Role::Server).unwrap().unwrap();
        assert_eq!(
            (h.payload_len, n, h.fin, h.opcode),
            (5, 6, true, Opcode::Text)
        );

        let medium = masked(0x82, &[126, 0x01, 0x00], mask);
        let (h, n) = parse_header(&medium, Role::Server).unwrap().unwrap();
        assert_eq!((h.payload_len, n, h.opcode), (256, 8, Opcode::Binary));

        let mut long_len = vec![127];
        long_len.extend_from_slice(&0x1_0000u64.to_be_bytes());
        let long = masked(0x02, &long_len, mask);
        let (h, n) = parse_header(&long, Role::Server).unwrap().unwrap();
        assert_eq!(
            (h.payload_len, n, h.fin, h.mask),
            (0x1_0000, 14, false, Some(mask))
        );
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let mut long_len = vec![127];
        long_len.extend_from_slice(&70_000u64.to_be_bytes());
        for header in [
            masked(0x81, &[5], [9, 9, 9, 9]),
            masked(0x81, &[126, 0x01, 0x00], [9, 9, 9, 9]),
            masked(0x81, &long_len, [9, 9, 9, 9]),
        ] {
            for cut in 0..header.len() {
                assert_eq!(
                    parse_header(&header[..cut], Role::Server),
                    Ok(None),
                    "cut at {cut}"
                );
            }
            assert!(parse_header(&header, Role::Server).unwrap().is_some());
        }
    }

    #[test]
    fn refuses_what_rfc_6455_forbids() {
        let m = [0, 0, 0, 0];
        for rsv in [0x40, 0x20, 0x10] {
            assert_eq!(
                parse_header(&[0x81 | rsv], Role::Server),
                Err(HeaderError::ReservedBits)
            );
        }
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                parse_header(&[0x80 | op], Role::Server),
                Err(HeaderError::ReservedOpcode(op))
            );
        }
        assert_eq!(
            parse_header(&[0x81, 0x05], Role::Server),
            Err(HeaderError::Unmasked)
        );
        assert_eq!(
            parse_header(&[0x09], Role::Server),
            Err(HeaderError::FragmentedControl)
        );
        assert_eq!(
            parse_header(&masked(0x89, &[126], m), Role::Server),
            Err(HeaderError::ControlTooLong)
        );
        assert_eq!(
            parse_header(&masked(0x81, &[126, 0, 125], m), Role::Server),
            Err(HeaderError::NonMinimalLength)
        );
        let mut len = vec![127];
        len.extend_from_slice(&65_535u64.to_be_bytes());
        assert_eq!(
            parse_header(&masked(0x81, &len, m), Role::Server),
            Err(HeaderError::NonMinimalLength)
        );
        let mut len = vec![127];
        len.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(
            parse_header(&masked(0x81, &len, m), Role::Server),
            Err(HeaderError::LengthTopBit)
        );
    }

    #[test]
    fn mask_matches_the_byte_loop_at_every_offset_and_alignment() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for offset in 0..4u64 {
                let mut buf = data.clone();
                apply_mask(&mut buf[start..], mask, offset);
                for (i, (got, orig)) in buf[start..].iter().zip(&data[start..]).enumerate() {
                    let key = mask[(i + offset as usize) % 4];
                    assert_eq!(*got, orig ^ key, "start {start} offset {offset} byte {i}");
                }
            }
        }
    }

    #[test]
    fn unmasking_reports_ascii_exactly_at_every_length_and_position() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..40 {
            let plain: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            // All ASCII, then one byte with the high bit at each position.
            for high_at in std::iter::once(None).chain((0..len).map(Some)) {
                let mut expected = plain.clone();
                if let Some(at) = high_at {
                    expected[at] = 0xc3;
                }
                let mut masked = expected.clone();
                apply_mask(&mut masked, mask, 0);
                let ascii = unmask_reporting_ascii(&mut masked, mask);
                assert_eq!(masked, expected, "len {len} high byte at {high_at:?}");
                assert_eq!(
                    ascii,
                    high_at.is_none(),
                    "len {len} high byte at {high_at:?}"
                );
            }
        }
    }

    #[test]
    fn unmasking_in_pieces_equals_unmasking_at_once() {
        let mask = [1, 2, 3, 4];
        let data: Vec<u8> = (0..100u8).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        for cut in 0..data.len() {
            let mut pieces = data.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, cut as u64);
            assert_eq!(pieces, whole, "cut at {cut}");
        }
    }

    #[test]
    fn the_client_role_reads_unmasked_frames_and_refuses_masked_ones() {
        assert_eq!(
            parse_header(&[0x81, 0x05], Role::Client),
            Ok(Some((
                FrameHeader {
                    fin: true,
                    opcode: Opcode::Text,
                    mask: None,
                    payload_len: 5
                },
                2
            )))
        );
        assert_eq!(
            parse_header(&[0x81, 0x85], Role::Client),
            Err(HeaderError::Masked)
        );
        let frame = encode_masked(Opcode::Text, b"hello", [1, 2, 3, 4]);
        let (h, n) = parse_header(&frame, Role::Server).unwrap().unwrap();
        let mut payload = frame[n..].to_vec();
        apply_mask(&mut payload, h.mask.unwrap(), 0);
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn server_frames_use_minimal_lengths() {
        assert_eq!(encode(Opcode::Text, b"hi"), vec![0x81, 2, b'h', b'i']);
        let medium = encode(Opcode::Binary, &[0; 126]);
        assert_eq!(&medium[..4], &[0x82, 126, 0, 126]);
        let long = encode(Opcode::Binary, &[0; 65_536]);
        assert_eq!(&long[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        for len in [0, 125, 126, 65_535, 65_536] {
            assert_eq!(
                encode(Opcode::Text, &vec![0; len]).len(),
                header_len(len) + len
            );
        }
    }

    #[test]
    fn close_reason_is_cut_on_a_character_boundary() {
        let frame = encode_close(1000, &"é".repeat(100));
        assert_eq!(frame[1] as usize, 2 + 122);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
