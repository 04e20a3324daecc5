//! RESP2, the Redis wire protocol, sans-IO: commands are encoded into a
//! `Vec` and replies decoded from bytes as they arrive, one frame at a time,
//! with every size bounded (a reply is data from the network, and a broken
//! or hostile server must not make the node allocate without limit).
//!
//! Own code rather than a crate: the node needs arrays of bulk strings out
//! and five reply types in, which is under three hundred lines, and the
//! bounds below (the point of a codec facing the network) are ours to set.

use std::fmt;

/// The longest bulk string accepted (a pub/sub payload carries one chat
/// event, bounded far below this by `--max-message-size`).
pub const MAX_BULK: usize = 4 * 1024 * 1024;
/// The most elements one array may announce.
pub const MAX_ARRAY: usize = 1 << 20;
/// How deep arrays may nest (replies the node asks for nest two deep).
pub const MAX_DEPTH: usize = 8;
/// The longest simple string, error or number line.
pub const MAX_LINE: usize = 64 * 1024;

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$3\r\nfoo`; `None` is the null bulk string `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*2 ...`; `None` is the null array `*-1`.
    Array(Option<Vec<Frame>>),
}

impl Frame {
    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Frame::Bulk(Some(b)) => Some(b),
            Frame::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
}

/// What makes a byte stream not RESP2 (or beyond our bounds): the
/// connection is dropped and made again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    UnknownType(u8),
    BadLength,
    BadInteger,
    /// A bulk string not followed by CRLF.
    MissingCrlf,
    TooLong,
    TooDeep,
    NotUtf8,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            RespError::UnknownType(b) => return write!(f, "unknown RESP type byte 0x{b:02x}"),
            RespError::BadLength => "bad length",
            RespError::BadInteger => "bad integer",
            RespError::MissingCrlf => "bulk string without CRLF",
            RespError::TooLong => "frame beyond the size limits",
            RespError::TooDeep => "arrays nested too deep",
            RespError::NotUtf8 => "status line not UTF-8",
        };
        f.write_str(what)
    }
}

impl std::error::Error for RespError {}

/// Appends one command (an array of bulk strings) to `out`.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    push_decimal(out, args.len());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.push(b'$');
        push_decimal(out, arg.len());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Accumulates bytes and yields whole frames.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames.
    start: usize,
}

impl Decoder {
    /// Bytes received and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Drops everything buffered (the connection was lost).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, RespError> {
        let mut pos = self.start;
        match parse(&self.buf, &mut pos, 0)? {
            Some(frame) => {
                self.start = pos;
                if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                Ok(Some(frame))
            }
            None => {
                // A partial frame may not grow past what a whole one may be.
                if self.buf.len() - self.start > MAX_BULK + MAX_LINE {
                    return Err(RespError::TooLong);
                }
                Ok(None)
            }
        }
    }
}

/// The line starting at `*pos` (without CRLF), advancing past it.
fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Result<Option<&'a [u8]>, RespError> {
    let rest = &buf[*pos..];
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(end) if end > MAX_LINE => Err(RespError::TooLong),
        Some(end) => {
            *pos += end + 2;
            Ok(Some(&rest[..end]))
        }
        None if rest.len() > MAX_LINE => Err(RespError::TooLong),
        None => Ok(None),
    }
}

fn integer(digits: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or(RespError::BadInteger)
}

/// A length: -1 (null) or 0..=max.
fn length(digits: &[u8], max: usize) -> Result<Option<usize>, RespError> {
    match integer(digits).map_err(|_| RespError::BadLength)? {
        -1 => Ok(None),
        n if n < 0 => Err(RespError::BadLength),
        n if n as u64 > max as u64 => Err(RespError::TooLong),
        n => Ok(Some(n as usize)),
    }
}

fn parse(buf: &[u8], pos: &mut usize, depth: usize) -> Result<Option<Frame>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::TooDeep);
    }
    let Some(&kind) = buf.get(*pos) else {
        return Ok(None);
    };
    let mut at = *pos + 1;
    let Some(head) = line(buf, &mut at)? else {
        return Ok(None);
    };
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| RespError::NotUtf8)
    };
    let frame = match kind {
        b'+' => Frame::Simple(text(head)?),
        b'-' => Frame::Error(text(head)?),
        b':' => Frame::Integer(integer(head)?),
        b'$' => match length(head, MAX_BULK)? {
            None => Frame::Bulk(None),
            Some(n) => {
                if buf.len() < at + n + 2 {
                    return Ok(None);
                }
                if &buf[at + n..at + n + 2] != b"\r\n" {
                    return Err(RespError::MissingCrlf);
                }
                let bytes = buf[at..at + n].to_vec();
                at += n + 2;
                Frame::Bulk(Some(bytes))
            }
        },
        b'*' => match length(head, MAX_ARRAY)? {
            None => Frame::Array(None),
            Some(n) => {
                // Grown as elements arrive, so a claimed length costs nothing.
                let mut items = Vec::new();
                for _ in 0..n {
                    match parse(buf, &mut at, depth + 1)? {
                        Some(item) => items.push(item),
                        None => return Ok(None),
                    }
                }
                Frame::Array(Some(items))
            }
        },
        other => return Err(RespError::UnknownType(other)),
    };
    *pos = at;
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn encodes_commands_as_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k", b"", b"NX"]);
        assert_eq!(out, b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n$2\r\nNX\r\n");
        out.clear();
        encode_command(&mut out, &[&[b'x'; 12][..]]);
        assert_eq!(out, b"*1\r\n$12\r\nxxxxxxxxxxxx\r\n");
    }

    #[test]
    fn decodes_every_type() {
        let input = b"+OK\r\n-ERR no\r\n:-42\r\n$3\r\nfoo\r\n$-1\r\n*-1\r\n*0\r\n\
            *3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhe\r\nl\r\n*2\r\n*1\r\n:1\r\n+x\r\n";
        let mut d = Decoder::default();
        d.feed(input);
        let mut frames = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            frames.push(f);
        }
        assert_eq!(
            frames,
            vec![
                Frame::Simple("OK".into()),
                Frame::Error("ERR no".into()),
                Frame::Integer(-42),
                bulk("foo"),
                Frame::Bulk(None),
                Frame::Array(None),
                Frame::Array(Some(vec![])),
                Frame::Array(Some(vec![bulk("message"), bulk("ch"), bulk("he\r\nl")])),
                Frame::Array(Some(vec![
                    Frame::Array(Some(vec![Frame::Integer(1)])),
                    Frame::Simple("x".into())
                ])),
            ]
        );
        assert_eq!(d.buffered(), 0);
    }

    /// Every split of the input into two feeds gives the same frames.
    #[test]
    fn decodes_across_every_split() {
        let input: &[u8] =
            b"*3\r\n$7\r\nmessage\r\n$4\r\nch:1\r\n$10\r\n0123456789\r\n:7\r\n+PONG\r\n";
        for cut in 0..=input.len() {
            let mut d = Decoder::default();
            let mut frames = Vec::new();
            d.feed(&input[..cut]);
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
            d.feed(&input[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
            assert_eq!(frames.len(), 3, "cut at {cut}");
            assert_eq!(frames[1], Frame::Integer(7));
            assert_eq!(frames[2], Frame::Simple("PONG".into()));
        }
        // And byte by byte.
        let mut d = Decoder::default();
        let mut n = 0;
        for b in input {
            d.feed(std::slice::from_ref(b));
            while d.next_frame().unwrap().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn refuses_what_is_not_resp_or_too_big() {
        let cases: &[(&[u8], RespError)] = &[
            (b"?x\r\n", RespError::UnknownType(b'?')),
            (b"$abc\r\n", RespError::BadLength),
            (b"$-2\r\n", RespError::BadLength),
            (b":1x\r\n", RespError::BadInteger),
            (b"$2\r\nabcd\r\n", RespError::MissingCrlf),
            (b"$99999999999\r\n", RespError::TooLong),
            (b"*99999999999\r\n", RespError::TooLong),
            (b"+\xff\r\n", RespError::NotUtf8),
            (
                b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
                RespError::TooDeep,
            ),
        ];
        for (input, error) in cases {
            let mut d = Decoder::default();
            d.feed(input);
            assert_eq!(d.next_frame().as_ref(), Err(error), "{input:?}");
        }
        // A line that never ends is bounded too.
        let mut d = Decoder::default();
        d.feed(b"+");
        d.feed(&vec![b'a'; MAX_LINE + 1]);
        assert_eq!(d.next_frame(), Err(RespError::TooLong));
    }

    #[test]
    fn a_huge_claimed_array_allocates_nothing_up_front() {
        let mut d = Decoder::default();
        d.feed(b"*1000000\r\n:1\r\n");
        assert_eq!(d.next_frame(), Ok(None));
    }
}
