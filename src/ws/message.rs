//! From client bytes to WebSocket messages: frame sequencing, reassembly of
//! fragmented messages, the size limit, UTF-8 and the closing rules.
//!
//! A push decoder with no I/O: the caller hands it whatever bytes arrived and
//! gets back how many it consumed and, at most, one message. A message that
//! sits whole inside the input is unmasked in place and borrowed from it
//! (zero copy); only a message that spans reads or frames is copied, into a
//! buffer that exists just while that message is incomplete. Between
//! messages the decoder holds nothing but a partial frame header.
//!
//! That buffer is charged to the process's ledger ([`crate::budget`]): a
//! message whose growth would pass the process's bound for partial
//! messages fails with [`ProtocolError::OverBudget`] (1009).

use super::frame::{
    apply_mask, parse_header, unmask_reporting_ascii, FrameHeader, HeaderError, Opcode, Role,
    MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};
use super::utf8::Utf8Validator;
use super::CloseCode;
use crate::budget::{grown_capacity, PartialBytes};
use crate::timer::Tick;

/// One complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// `None` when the close frame had no payload.
    Close(Option<CloseFrame<'a>>),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct CloseFrame<'a> {
    pub code: u16,
    pub reason: &'a str,
}

/// Why the connection must be failed; each maps to one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    Header(HeaderError),
    /// A continuation frame with no message to continue.
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is unfinished.
    ExpectedContinuation,
    /// The message would exceed the configured size limit.
    MessageTooBig,
    /// The message would take the partial messages of the whole process
    /// past their bound (`--max-partial-bytes` or `--memory-budget`).
    OverBudget,
    InvalidUtf8,
    /// A close frame with a one-byte payload (a code needs two).
    CloseTooShort,
    InvalidCloseCode(u16),
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code (RFC 6455 section 7.4.1) to fail the connection with.
    pub fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseReason => {
                CloseCode::InvalidPayload
            }
            // It names the cause from the client's side: this message was
            // too big to be held now (1013, "try again later", is not an
            // RFC 6455 code and many clients do not know it).
            ProtocolError::MessageTooBig | ProtocolError::OverBudget => CloseCode::TooBig,
            _ => CloseCode::Protocol,
        }
    }

    /// A short reason for the close frame and the log.
    pub fn reason(self) -> &'static str {
        match self {
            ProtocolError::Header(HeaderError::ReservedBits) => "reserved bits set",
            ProtocolError::Header(HeaderError::ReservedOpcode(_)) => "reserved opcode",
            ProtocolError::Header(HeaderError::Unmasked) => "client frame not masked",
            ProtocolError::Header(HeaderError::Masked) => "server frame masked",
            ProtocolError::Header(HeaderError::FragmentedControl) => "fragmented control frame",
            ProtocolError::Header(HeaderError::ControlTooLong) => "control frame too long",
            ProtocolError::Header(HeaderError::LengthTopBit) => "invalid payload length",
            ProtocolError::Header(HeaderError::NonMinimalLength) => "non-minimal payload length",
            ProtocolError::UnexpectedContinuation => "continuation without a message",
            ProtocolError::ExpectedContinuation => "expected a continuation frame",
            ProtocolError::MessageTooBig => "message too big",
            ProtocolError::OverBudget => "server busy: partial messages over budget",
            ProtocolError::InvalidUtf8 => "invalid UTF-8 in text message",
            ProtocolError::CloseTooShort => "close payload of one byte",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::InvalidCloseReason => "invalid UTF-8 in close reason",
        }
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ProtocolError {}

impl From<HeaderError> for ProtocolError {
    fn from(e: HeaderError) -> Self {
        ProtocolError::Header(e)
    }
}

/// Close codes a peer may send (RFC 6455 section 7.4 and the IANA registry
/// as Autobahn checks it): 1004-1006 and 1015 are reserved, 1012-2999 unassigned.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataKind {
    Text,
    Binary,
}

/// A message being reassembled across frames or reads.
#[derive(Debug)]
struct Assembly {
    kind: DataKind,
    bytes: PartialBytes,
    utf8: Utf8Validator,
    /// When it must be complete, once the caller timed it (kept here, so an
    /// idle connection carries no field for it).
    due: Option<Tick>,
}

/// The frame whose payload is being received.
#[derive(Debug, Clone, Copy)]
struct InFrame {
    header: FrameHeader,
    /// Payload bytes already received (keeps the mask in phase).
    received: u64,
}

#[derive(Debug, Default)]
pub struct Decoder {
    /// Which end this decoder serves (servers read masked frames).
    role: Role,
    /// Header bytes received so far, when a header spans reads.
    header_bytes: [u8; MAX_HEADER_LEN],
    header_len: u8,
    frame: Option<InFrame>,
    assembly: Option<Box<Assembly>>,
    /// A control frame's payload that spans reads; boxed, since it is rare
    /// and every connection carries the field.
    control: Option<Box<ControlPayload>>,
    /// What the last message was lent from, to be dropped on the next call.
    lent: Lent,
}

/// Up to 125 bytes of a control frame's payload.
#[derive(Debug)]
struct ControlPayload {
    bytes: [u8; MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlPayload {
    fn empty() -> Box<ControlPayload> {
        Box::new(ControlPayload {
            bytes: [0; MAX_CONTROL_PAYLOAD],
            len: 0,
        })
    }

    /// Appends a piece; the header parser already bounded the total.
    fn push(&mut self, piece: &[u8]) {
        let start = usize::from(self.len);
        let end = (start + piece.len()).min(MAX_CONTROL_PAYLOAD);
        self.bytes[start..end].copy_from_slice(&piece[..end - start]);
        self.len = end as u8;
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Lent {
    #[default]
    Nothing,
    Control,
    Assembly,
}

impl Decoder {
    /// A decoder for the client end of a connection (server frames are unmasked).
    pub fn client() -> Decoder {
        Decoder {
            role: Role::Client,
            ..Decoder::default()
        }
    }

    /// Decodes from `input` (unmasking it in place) until one message is
    /// complete or the input is used up. Returns the bytes consumed and the
    /// message, if any; call again with the rest of the input.
    ///
    /// `max_message` bounds a message's payload; it is checked when a frame
    /// header arrives, before any of its payload is buffered.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a mut [u8],
        max_message: usize,
    ) -> Result<(usize, Option<Message<'a>>), ProtocolError> {
        self.release_lent();
        let mut pos = 0;
        let frame = loop {
            if let Some(frame) = self.frame {
                break frame;
            }
            match self.take_header(&input[pos..])? {
                None => return Ok((input.len(), None)),
                Some((header, used)) => {
                    pos += used;
                    self.start_frame(header, max_message)?;
                }
            }
        };

        let available = (input.len() - pos) as u64;
        let header = frame.header;
        let whole_in_input = frame.received == 0 && header.payload_len <= available;
        let standalone = header.opcode.is_control() || (header.fin && self.assembly.is_none());
        if whole_in_input && standalone {
            // Fast path: the whole frame is here and is the whole message.
            let end = pos + header.payload_len as usize;
            self.frame = None;
            let payload = &mut input[pos..end];
            // Unmasking reads every byte anyway: it also says whether all
            // are ASCII, which spares a text message its UTF-8 pass.
            let ascii = match header.mask {
                Some(mask) => unmask_reporting_ascii(payload, mask),
                None => false,
            };
            let message = match header.opcode {
                // SAFETY: ASCII is valid UTF-8.
                Opcode::Text if ascii => {
                    Message::Text(unsafe { std::str::from_utf8_unchecked(payload) })
                }
                Opcode::Text => Message::Text(
                    std::str::from_utf8(payload).map_err(|_| ProtocolError::InvalidUtf8)?,
                ),
                Opcode::Binary => Message::Binary(payload),
                opcode => control_message(opcode, payload)?,
            };
            return Ok((end, Some(message)));
        }

        // Slow path: take what is here of the payload and keep it.
        let take = (header.payload_len - frame.received).min(available) as usize;
        let piece = &mut input[pos..pos + take];
        if let Some(mask) = header.mask {
            apply_mask(piece, mask, frame.received);
        }
        pos += take;
        if header.opcode.is_control() {
            self.control
                .get_or_insert_with(ControlPayload::empty)
                .push(piece);
        } else {
            let assembly = self.assembly.get_or_insert_with(|| {
                Box::new(Assembly {
                    kind: if header.opcode == Opcode::Binary {
                        DataKind::Binary
                    } else {
                        DataKind::Text
                    },
                    bytes: PartialBytes::new(),
                    utf8: Utf8Validator::default(),
                    due: None,
                })
            });
            if assembly.kind == DataKind::Text {
                assembly
                    .utf8
                    .feed(piece)
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
            }
            // Room for what arrived, doubling, up to the message limit; and
            // never past the message's end once its final frame is here.
            let needed = assembly.bytes.len() + take;
            let limit = if header.fin {
                assembly.bytes.len() + (header.payload_len - frame.received) as usize
            } else {
                max_message
            };
            let capacity = grown_capacity(assembly.bytes.capacity(), needed, limit);
            assembly
                .bytes
                .try_reserve_total(capacity)
                .map_err(|_| ProtocolError::OverBudget)?;
            assembly.bytes.extend(piece, max_message);
        }
        let received = frame.received + take as u64;
        if received < header.payload_len {
            self.frame = Some(InFrame { header, received });
            return Ok((pos, None));
        }
        self.frame = None;

        if header.opcode.is_control() {
            self.lent = Lent::Control;
            let payload = self
                .control
                .as_deref()
                .map_or(&[][..], ControlPayload::as_slice);
            return Ok((pos, Some(control_message(header.opcode, payload)?)));
        }
        if !header.fin {
            return Ok((pos, None));
        }
        let Some(assembly) = self.assembly.as_mut() else {
            return Ok((pos, None));
        };
        self.lent = Lent::Assembly;
        let message = match assembly.kind {
            DataKind::Text => {
                assembly
                    .utf8
                    .finish()
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
                Message::Text(
                    std::str::from_utf8(&assembly.bytes).map_err(|_| ProtocolError::InvalidUtf8)?,
                )
            }
            DataKind::Binary => Message::Binary(&assembly.bytes),
        };
        Ok((pos, Some(message)))
    }

    /// True while a message or frame is partly received: the connection holds
    /// per-connection state that an idle one would not.
    pub fn is_mid_message(&self) -> bool {
        self.header_len > 0 || self.frame.is_some() || self.assembly.is_some()
    }

    /// The message being reassembled, if any (not one already lent out).
    fn partial(&self) -> Option<&Assembly> {
        self.assembly
            .as_deref()
            .filter(|_| self.lent != Lent::Assembly)
    }

    /// True while a data message is being reassembled and the caller has
    /// not timed it yet (its bytes are held until it completes, so
    /// `--message-timeout` bounds how long).
    pub fn partial_message_untimed(&self) -> bool {
        self.partial().is_some_and(|a| a.due.is_none())
    }

    /// When the message being reassembled must be complete; the deadline
    /// goes with the message.
    pub fn partial_message_due(&self) -> Option<Tick> {
        self.partial().and_then(|a| a.due)
    }

    /// Times the message being reassembled (nothing without one).
    pub fn time_partial_message(&mut self, due: Tick) {
        if self.lent != Lent::Assembly {
            if let Some(assembly) = self.assembly.as_mut() {
                assembly.due = Some(due);
            }
        }
    }

    /// Drops what the last message was lent from. `decode` does it at its
    /// next call; the caller does it when the input ran out, so a completed
    /// message's buffer is not kept while the connection idles.
    pub fn release_lent(&mut self) {
        match std::mem::take(&mut self.lent) {
            Lent::Nothing => {}
            Lent::Control => self.control = None,
            Lent::Assembly => self.assembly = None,
        }
    }

    /// Parses a header from buffered bytes plus `input`; buffers a partial one.
    fn take_header(&mut self, input: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        let have = usize::from(self.header_len);
        if have == 0 {
            return match parse_header(input, self.role)? {
                Some(parsed) => Ok(Some(parsed)),
                None => {
                    // A partial header is shorter than MAX_HEADER_LEN.
                    self.header_bytes[..input.len()].copy_from_slice(input);
                    self.header_len = input.len() as u8;
                    Ok(None)
                }
            };
        }
        let take = (MAX_HEADER_LEN - have).min(input.len());
        self.header_bytes[have..have + take].copy_from_slice(&input[..take]);
        match parse_header(&self.header_bytes[..have + take], self.role)? {
            Some((header, len)) => {
                self.header_len = 0;
                Ok(Some((header, len - have)))
            }
            None => {
                self.header_len = (have + take) as u8;
                Ok(None)
            }
        }
    }

    /// Applies the sequencing and size rules to a new frame.
    fn start_frame(
        &mut self,
        header: FrameHeader,
        max_message: usize,
    ) -> Result<(), ProtocolError> {
        match header.opcode {
            Opcode::Continuation if self.assembly.is_none() => {
                return Err(ProtocolError::UnexpectedContinuation)
            }
            Opcode::Text | Opcode::Binary if self.assembly.is_some() => {
                return Err(ProtocolError::ExpectedContinuation)
            }
            _ => {}
        }
        if !header.opcode.is_control() {
            let so_far = self.assembly.as_ref().map_or(0, |a| a.bytes.len()) as u64;
            if so_far.saturating_add(header.payload_len) > max_message as u64 {
                return Err(ProtocolError::MessageTooBig);
            }
        }
        self.frame = Some(InFrame {
            header,
            received: 0,
        });
        Ok(())
    }
}

fn control_message(opcode: Opcode, payload: &[u8]) -> Result<Message<'_>, ProtocolError> {
    Ok(match opcode {
        Opcode::Ping => Message::Ping(payload),
        Opcode::Pong => Message::Pong(payload),
        _ => Message::Close(parse_close(payload)?),
    })
}

fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame<'_>>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason =
                std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    /// A masked client frame, with the mask chosen from `seed`.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], seed: u8) -> Vec<u8> {
        let mask = [
            seed,
            seed.wrapping_mul(7) ^ 0x5a,
            0xc3,
            seed.wrapping_add(91),
        ];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    fn own(m: Message<'_>) -> Owned {
        match m {
            Message::Text(t) => Owned::Text(t.to_owned()),
            Message::Binary(b) => Owned::Binary(b.to_vec()),
            Message::Ping(b) => Owned::Ping(b.to_vec()),
            Message::Pong(b) => Owned::Pong(b.to_vec()),
            Message::Close(c) => Owned::Close(c.map(|c| (c.code, c.reason.to_owned()))),
        }
    }

    /// Feeds `bytes` in pieces cut at `cuts`, collecting messages until an error.
    fn decode_pieces(
        bytes: &[u8],
        cuts: &[usize],
        limit: usize,
    ) -> (Vec<Owned>, Option<ProtocolError>) {
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        let mut data = bytes.to_vec();
        let mut bounds: Vec<usize> = cuts.to_vec();
        bounds.push(data.len());
        let mut start = 0;
        for end in bounds {
            let piece = &mut data[start..end];
            let mut pos = 0;
            while pos < piece.len() {
                match decoder.decode(&mut piece[pos..], limit) {
                    Ok((used, message)) => {
                        pos += used;
                        if let Some(m) = message {
                            out.push(own(m));
                        }
                    }
                    Err(e) => return (out, Some(e)),
                }
            }
            start = end;
        }
        (out, None)
    }

    fn decode_all(bytes: &[u8]) -> (Vec<Owned>, Option<ProtocolError>) {
        decode_pieces(bytes, &[], LIMIT)
    }

    fn conversation() -> (Vec<u8>, Vec<Owned>) {
        let mut bytes = Vec::new();
        bytes.extend(client_frame(true, 1, "héllo".as_bytes(), 1));
        bytes.extend(client_frame(false, 1, &"小明".as_bytes()[..4], 2));
        bytes.extend(client_frame(true, 9, b"ping!", 3));
        bytes.extend(client_frame(false, 0, &"小明".as_bytes()[4..], 4));
        bytes.extend(client_frame(true, 0, b"", 5));
        bytes.extend(client_frame(true, 2, &[0, 1, 2, 255], 6));
        bytes.extend(client_frame(true, 10, b"", 7));
        bytes.extend(client_frame(true, 1, &[b'x'; 300], 8));
        bytes.extend(client_frame(true, 8, b"\x03\xe8bye", 9));
        let expected = vec![
            Owned::Text("héllo".into()),
            Owned::Ping(b"ping!".to_vec()),
            Owned::Text("小明".into()),
            Owned::Binary(vec![0, 1, 2, 255]),
            Owned::Pong(vec![]),
            Owned::Text("x".repeat(300)),
            Owned::Close(Some((1000, "bye".into()))),
        ];
        (bytes, expected)
    }

    #[test]
    fn decodes_a_conversation_whole() {
        let (bytes, expected) = conversation();
        assert_eq!(decode_all(&bytes), (expected, None));
    }

    #[test]
    fn decodes_a_conversation_split_at_every_byte_and_pair_of_bytes() {
        let (bytes, expected) = conversation();
        for a in 0..=bytes.len() {
            assert_eq!(
                decode_pieces(&bytes, &[a], LIMIT),
                (expected.clone(), None),
                "cut {a}"
            );
        }
        for a in (0..=bytes.len()).step_by(3) {
            for b in a..=bytes.len() {
                assert_eq!(
                    decode_pieces(&bytes, &[a, b], LIMIT),
                    (expected.clone(), None),
                    "cuts {a} {b}"
                );
            }
        }
    }

    #[test]
    fn decodes_one_byte_at_a_time() {
        let (bytes, expected) = conversation();
        let cuts: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(decode_pieces(&bytes, &cuts, LIMIT), (expected, None));
    }

    #[test]
    fn sequencing_errors() {
        let stray = client_frame(true, 0, b"x", 1);
        assert_eq!(
            decode_all(&stray).1,
            Some(ProtocolError::UnexpectedContinuation)
        );

        let mut nested = client_frame(false, 1, b"a", 1);
        nested.extend(client_frame(true, 1, b"b", 2));
        assert_eq!(
            decode_all(&nested).1,
            Some(ProtocolError::ExpectedContinuation)
        );

        let mut nested_binary = client_frame(false, 2, b"a", 1);
        nested_binary.extend(client_frame(true, 2, b"b", 2));
        assert_eq!(
            decode_all(&nested_binary).1,
            Some(ProtocolError::ExpectedContinuation)
        );
    }

    #[test]
    fn size_limit_is_enforced_from_the_header_before_the_payload() {
        let mut header_only = client_frame(true, 2, &[0; 2000], 1);
        header_only.truncate(8);
        assert_eq!(
            decode_pieces(&header_only, &[], 1000).1,
            Some(ProtocolError::MessageTooBig)
        );

        // Fragments that add up past the limit.
        let mut parts = client_frame(false, 1, &[b'a'; 600], 1);
        parts.extend(client_frame(true, 0, &[b'a'; 600], 2));
        assert_eq!(
            decode_pieces(&parts, &[], 1000).1,
            Some(ProtocolError::MessageTooBig)
        );
        assert_eq!(decode_pieces(&parts, &[], 1200).1, None);
    }

    #[test]
    fn invalid_utf8_fails_in_the_first_fragment() {
        let first = client_frame(false, 1, b"ok \xf4\x90\x80\x80", 1);
        let (messages, error) = decode_all(&first);
        assert!(messages.is_empty());
        assert_eq!(error, Some(ProtocolError::InvalidUtf8));
        // Even when the frame itself is still arriving.
        for cut in 0..first.len() {
            let (_, error) = decode_pieces(&first[..first.len()], &[cut], LIMIT);
            assert_eq!(error, Some(ProtocolError::InvalidUtf8), "cut {cut}");
        }
    }

    #[test]
    fn utf8_split_inside_a_character_across_fragments_is_valid() {
        let text = "κόσμε".as_bytes();
        for cut in 0..=text.len() {
            let mut bytes = client_frame(false, 1, &text[..cut], 1);
            bytes.extend(client_frame(true, 0, &text[cut..], 2));
            assert_eq!(
                decode_all(&bytes),
                (vec![Owned::Text("κόσμε".into())], None)
            );
        }
        let mut unfinished = client_frame(false, 1, &text[..3], 1);
        unfinished.extend(client_frame(true, 0, b"", 2));
        assert_eq!(decode_all(&unfinished).1, Some(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn close_payload_rules() {
        assert_eq!(
            decode_all(&client_frame(true, 8, b"", 1)).0,
            vec![Owned::Close(None)]
        );
        assert_eq!(
            decode_all(&client_frame(true, 8, b"\x03", 1)).1,
            Some(ProtocolError::CloseTooShort)
        );
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            let frame = client_frame(true, 8, &code.to_be_bytes(), 1);
            assert_eq!(
                decode_all(&frame).0,
                vec![Owned::Close(Some((code, String::new())))]
            );
        }
        for code in [
            0u16, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000,
            65535,
        ] {
            let frame = client_frame(true, 8, &code.to_be_bytes(), 1);
            assert_eq!(
                decode_all(&frame).1,
                Some(ProtocolError::InvalidCloseCode(code)),
                "{code}"
            );
        }
        let bad_reason = client_frame(
            true,
            8,
            b"\x03\xe8\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80",
            1,
        );
        assert_eq!(
            decode_all(&bad_reason).1,
            Some(ProtocolError::InvalidCloseReason)
        );
    }

    #[test]
    fn error_codes() {
        assert_eq!(ProtocolError::InvalidUtf8.close_code().to_u16(), 1007);
        assert_eq!(
            ProtocolError::InvalidCloseReason.close_code().to_u16(),
            1007
        );
        assert_eq!(ProtocolError::MessageTooBig.close_code().to_u16(), 1009);
        assert_eq!(
            ProtocolError::Header(HeaderError::Unmasked)
                .close_code()
                .to_u16(),
            1002
        );
        assert_eq!(
            ProtocolError::InvalidCloseCode(5).close_code().to_u16(),
            1002
        );
    }

    #[test]
    fn client_decoder_reads_server_frames() {
        use crate::ws::frame::encode;
        let mut bytes = encode(Opcode::Text, "héllo".as_bytes());
        bytes.extend(encode(Opcode::Ping, b"p"));
        for cut in 0..=bytes.len() {
            let mut decoder = Decoder::client();
            let mut data = bytes.clone();
            let (a, b) = data.split_at_mut(cut);
            let mut got = Vec::new();
            for piece in [a, b] {
                let mut pos = 0;
                while pos < piece.len() {
                    let (used, m) = decoder.decode(&mut piece[pos..], LIMIT).unwrap();
                    pos += used;
                    got.extend(m.map(own));
                }
            }
            assert_eq!(
                got,
                vec![Owned::Text("héllo".into()), Owned::Ping(b"p".to_vec())]
            );
        }
        let mut masked = client_frame(true, 1, b"x", 1);
        assert!(Decoder::client().decode(&mut masked, LIMIT).is_err());
    }

    #[test]
    fn partial_messages_are_charged_and_refused_past_the_process_bound() {
        use crate::budget::{self, Limits};
        // This test thread's own ledger.
        budget::set_limits(Limits {
            memory_budget: 1 << 20,
            max_partial: 1000,
        });
        let mut first = Decoder::default();
        let mut bytes = client_frame(false, 1, &[b'a'; 600], 1);
        assert_eq!(decode_with(&mut first, &mut bytes), Ok(None));
        assert_eq!(budget::held().partial, 600, "what arrived");
        assert!(first.partial_message_untimed());

        // A second message that would pass 1000 in all is refused at its
        // first frame; the first keeps its room.
        let mut second = Decoder::default();
        let mut bytes = client_frame(false, 1, &[b'b'; 401], 2);
        assert_eq!(
            decode_with(&mut second, &mut bytes),
            Err(ProtocolError::OverBudget)
        );
        assert_eq!(ProtocolError::OverBudget.close_code().to_u16(), 1009);
        drop(second);
        assert_eq!(budget::held().partial, 600);

        // The first finishes: its final frame grows it to exactly its end.
        let mut bytes = client_frame(true, 0, &[b'a'; 400], 3);
        let message = decode_with(&mut first, &mut bytes).map(|m| m.map(|m| m.len()));
        assert_eq!(message, Ok(Some(1000)));
        assert_eq!(budget::held().partial, 1000);
        assert!(!first.partial_message_untimed(), "lent, not partial");
        first.release_lent();
        assert_eq!(budget::held().partial, 0, "released without another read");
        budget::set_limits(Limits::UNLIMITED);
    }

    /// Decodes all of `bytes`; the last message's length, if any.
    fn decode_with(
        decoder: &mut Decoder,
        bytes: &mut [u8],
    ) -> Result<Option<Vec<u8>>, ProtocolError> {
        let mut pos = 0;
        let mut last = None;
        while pos < bytes.len() {
            let (used, message) = decoder.decode(&mut bytes[pos..], LIMIT)?;
            pos += used;
            if let Some(Message::Text(t)) = message {
                last = Some(t.as_bytes().to_vec());
            }
        }
        Ok(last)
    }

    #[test]
    fn a_declared_length_reserves_nothing_until_its_bytes_come() {
        use crate::budget;
        let mut decoder = Decoder::default();
        let mut frame = client_frame(false, 1, &[b'x'; 60_000], 1);
        let header = frame.len() - 60_000;
        frame.truncate(header + 10); // the header, its mask, 10 bytes of 60,000
        let before = budget::held().partial;
        decoder.decode(&mut frame, LIMIT).unwrap();
        assert_eq!(budget::held().partial - before, 10);
    }

    #[test]
    fn a_partial_message_is_timed_once_and_its_deadline_goes_with_it() {
        let clock = crate::timer::Clock::starting_now();
        let due = clock.tick(std::time::Instant::now());
        let mut decoder = Decoder::default();
        assert!(!decoder.partial_message_untimed());
        decoder.time_partial_message(due); // nothing held: nothing timed
        let mut bytes = client_frame(false, 1, b"abc", 1);
        bytes.extend(client_frame(true, 9, b"ping", 2));
        let mut pos = 0;
        while pos < bytes.len() {
            pos += decoder.decode(&mut bytes[pos..], LIMIT).unwrap().0;
        }
        assert!(decoder.partial_message_untimed());
        decoder.time_partial_message(due);
        assert!(!decoder.partial_message_untimed());
        assert_eq!(decoder.partial_message_due(), Some(due));
        let mut ping = client_frame(true, 9, b"", 3);
        decoder.decode(&mut ping, LIMIT).unwrap();
        assert_eq!(
            decoder.partial_message_due(),
            Some(due),
            "pings do not move it"
        );
        let mut last = client_frame(true, 0, b"def", 4);
        decoder.decode(&mut last, LIMIT).unwrap();
        decoder.release_lent();
        assert_eq!(decoder.partial_message_due(), None);
    }

    #[test]
    fn idle_decoder_holds_nothing() {
        let mut decoder = Decoder::default();
        let mut frame = client_frame(false, 1, b"abc", 1);
        frame.extend(client_frame(true, 0, b"def", 2));
        let mut pos = 0;
        while pos < frame.len() {
            let (used, _) = decoder.decode(&mut frame[pos..], LIMIT).unwrap();
            pos += used;
        }
        // The message was lent; the next call (with nothing) releases it.
        let (_, none) = decoder.decode(&mut [], LIMIT).unwrap();
        assert!(none.is_none());
        assert!(!decoder.is_mid_message());
        assert!(decoder.control.is_none());
    }
}
