//! A one-pass reader for the plain shape nearly every client message has:
//! one flat object of unescaped strings, integers, booleans and nulls.
//! serde_json stays the parser of record, but its per-string overhead made
//! it the largest user-space cost of a short chat message. This reader takes
//! only input whose reading is obvious and returns `None` for anything else
//! (escapes, nesting, floats, duplicate or mistyped fields, malformed JSON),
//! so serde_json still reads those and reports their errors.

use super::json;

/// A message's fields exactly as serde's derive for `protocol::Wire` reads
/// them; `reference` is the raw JSON text of the `ref` value.
#[derive(Debug, Default)]
pub struct Fields<'a> {
    pub kind: Option<&'a str>,
    pub to: Option<&'a str>,
    pub body: Option<&'a str>,
    pub reference: Option<&'a str>,
    pub seq: Option<u64>,
    pub token: Option<&'a str>,
}

/// Reads `text` if it is a flat object of plain values; `None` means "ask serde".
pub fn scan(text: &str) -> Option<Fields<'_>> {
    let mut s = Scanner { text, at: 0 };
    let mut fields = Fields::default();
    // serde refuses a repeated known field, so the fast path must not pick one.
    let mut seen = 0u8;
    s.expect(b'{')?;
    if !s.eat(b'}') {
        loop {
            s.expect(b'"')?;
            let key = s.string()?;
            s.expect(b':')?;
            let (raw, string) = s.value()?;
            // A string field's `null` is absent; another type is serde's error.
            let as_text = || string.map(Some).or((raw == "null").then_some(None));
            let bit = match key {
                "type" => {
                    fields.kind = as_text()?;
                    1
                }
                "to" => {
                    fields.to = as_text()?;
                    2
                }
                "body" => {
                    fields.body = as_text()?;
                    4
                }
                "ref" => {
                    // A RawValue takes any value; null is Option's None.
                    fields.reference = (raw != "null").then_some(raw);
                    8
                }
                "seq" => {
                    fields.seq = seq_value(raw)?;
                    16
                }
                "token" => {
                    fields.token = as_text()?;
                    32
                }
                _ => 0,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            if s.eat(b'}') {
                break;
            }
            s.expect(b',')?;
        }
    }
    s.skip_whitespace();
    (s.at == text.len()).then_some(fields)
}

/// `seq` is a `u64`: a negative or too large number is serde's error to report.
fn seq_value(raw: &str) -> Option<Option<u64>> {
    if raw == "null" {
        return Some(None);
    }
    raw.parse().ok().map(Some)
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Consumes `byte` if it comes next, after optional whitespace.
    fn eat(&mut self, byte: u8) -> bool {
        // Compact JSON has no whitespace; looking first measured cheaper.
        if self.peek() != Some(byte) {
            self.skip_whitespace();
        }
        let found = self.peek() == Some(byte);
        self.at += usize::from(found);
        found
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    /// The rest of a string begun at the quote just consumed, if it has no
    /// escapes or control characters; returns its contents.
    fn string(&mut self) -> Option<&'a str> {
        let start = self.at;
        let end = start + json::clean_prefix(self.text.as_bytes().get(start..)?);
        if self.text.as_bytes().get(end) != Some(&b'"') {
            return None;
        }
        self.at = end + 1;
        self.text.get(start..end)
    }

    /// An accepted value: its raw text, and its contents if it is a string.
    fn value(&mut self) -> Option<(&'a str, Option<&'a str>)> {
        self.skip_whitespace();
        let start = self.at;
        let string = match self.peek()? {
            b'"' => {
                self.at += 1;
                Some(self.string()?)
            }
            b'n' => self.word(b"null")?,
            b't' => self.word(b"true")?,
            b'f' => self.word(b"false")?,
            _ => self.integer()?,
        };
        Some((self.text.get(start..self.at)?, string))
    }

    fn word(&mut self, word: &[u8]) -> Option<Option<&'a str>> {
        let found = self.text.as_bytes().get(self.at..)?.starts_with(word);
        self.at += if found { word.len() } else { 0 };
        found.then_some(None)
    }

    /// JSON's integer grammar, `-?(0|[1-9][0-9]*)`, so serde reads it alike.
    fn integer(&mut self) -> Option<Option<&'a str>> {
        self.at += usize::from(self.peek() == Some(b'-'));
        let rest = self.text.as_bytes().get(self.at..)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || (digits > 1 && rest.first() == Some(&b'0')) {
            return None;
        }
        self.at += digits;
        Some(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::read_with_serde;
    use super::*;

    const CANONICAL: &[&str] = &[
        r#"{"type":"private","from":"s1","to":"r1","body":"P1Q2T3Xxxxx"}"#,
        r#"{"type":"private","to":"bob","body":"hi","ref":"r1"}"#,
        r#"{"type":"private","to":"bob","body":"hi","ref":7}"#,
        r#"{"type":"public","body":"hello"}"#,
        r#"{"type":"users"}"#,
        r#"{"type":"ack","seq":12}"#,
        r#"{"type": "private", "from": "s1", "to": "r1", "body": "P1Q2T3Xxxxx"}"#,
        r#"{"type": "private", "to": "bob", "body": "hi", "ref": "r1"}"#,
        r#"{"type": "private", "to": "bob", "body": "hi", "ref": 7}"#,
        r#"{"type": "public", "body": "hello"}"#,
        r#"{"type": "users"}"#,
        r#"{"type": "ack", "seq": 12}"#,
        r#"{"type":"auth","token":"eyJhbGciOiJIUzI1NiJ9.e30.c2ln","ref":1}"#,
    ];

    const EDGES: &[&str] = &[
        " \t\r\n{ \n\"type\"\t:\r\"users\" \n, \"ref\" : -3 } \r\n\t",
        "{}",
        " { } ",
        r#"{"from":"x","n":-12,"z":0,"t":true,"f":false,"u":null,"type":"users"}"#,
        r#"{"type":null,"to":null,"body":null,"ref":null,"seq":null}"#,
        r#"{"type":"users","ref":true}"#,
        r#"{"type":"users","ref":false}"#,
        r#"{"type":"users","ref":""}"#,
        r#"{"type":"users","ref":99999999999999999999999}"#,
        r#"{"type":"users","ref":-0}"#,
        r#"{"type":"users","type":"users"}"#,
        r#"{"ref":1,"ref":null}"#,
        r#"{"seq":null,"seq":null}"#,
        r#"{"x":1,"x":2,"type":"users"}"#,
        r#"{"type":"us\"ers"}"#,
        r#"{"ty\u0070e":"users"}"#,
        r#"{"type":"public","body":"a\nb"}"#,
        "{\"type\":\"public\",\"body\":\"raw\ttab\"}",
        r#"{"type":"users","extra":{"a":[1,2]}}"#,
        r#"{"type":"users","extra":[]}"#,
        r#"{"type":"users","ref":1.5}"#,
        r#"{"type":"users","ref":1e3}"#,
        r#"{"type":"ack","seq":18446744073709551615}"#,
        r#"{"type":"ack","seq":18446744073709551616}"#,
        r#"{"type":"ack","seq":-1}"#,
        r#"{"type":"ack","seq":-0}"#,
        r#"{"type":"ack","seq":012}"#,
        r#"{"type":"ack","seq":"12"}"#,
        r#"{"type":"ack","seq":true}"#,
        r#"{"type":5}"#,
        r#"{"type":"public","body":false}"#,
        r#"{"to":["bob"]}"#,
        // Found by the chat_differential fuzz target: the one-pass reader
        // passed over `token` as an unknown field while serde reads it.
        r#"{"typeI1NiJ9":"auth","token":"eyJhbGciOiJIUzI1NiJ9.e30.c2ln","ref":1}"#,
        r#"{"type":"users","token":5}"#,
        r#"{"type":"users","token":"a","token":"b"}"#,
        r#"{"type":"users","token":null}"#,
        r#"{"Type":"users","TYPE":1}"#,
        r#"{"type":"users"} x"#,
        r#"{"type":"users"}}"#,
        r#"{"type":"users",}"#,
        r#"{"type":"users""to":"b"}"#,
        r#"{"type" "users"}"#,
        r#"{,}"#,
        r#"{"type":nul}"#,
        r#"{"type":"users","x":tru}"#,
        r#"{"type":"users","x":-}"#,
        r#"{"type":"users""#,
        r#"{"type":"public","body":"小明 😀 مرحبا"}"#,
        r#"{"小明":"😀","type":"users"}"#,
        "{\"type\":\"public\",\"body\":\"\u{7f}\"}",
        "\u{feff}{}",
        "{\u{a0}}",
        "{\u{c}}",
        "\u{b}{}",
        r#"["private","bob","hi",null,null]"#,
        r#""users""#,
        "12",
        "null",
        "",
        "   ",
    ];

    fn agrees(text: &str) -> bool {
        let Some(fast) = scan(text) else {
            return false;
        };
        let slow = read_with_serde(text)
            .unwrap_or_else(|e| panic!("fast path took {text:?}, serde refused: {e}"));
        assert_eq!(fast.kind, slow.kind.as_deref(), "type of {text:?}");
        assert_eq!(fast.to, slow.to.as_deref(), "to of {text:?}");
        assert_eq!(fast.body, slow.body.as_deref(), "body of {text:?}");
        assert_eq!(fast.reference, slow.reference, "ref of {text:?}");
        assert_eq!(fast.seq, slow.seq, "seq of {text:?}");
        assert_eq!(fast.token, slow.token.as_deref(), "token of {text:?}");
        true
    }

    #[test]
    fn canonical_messages_take_the_fast_path() {
        for text in CANONICAL {
            assert!(agrees(text), "{text}");
        }
        let f = scan(r#"{"type":"private","to":"bob","body":"hi","ref":7}"#);
        assert_eq!(f.and_then(|f| f.reference), Some("7"));
        let f = scan(r#"{"type": "ack", "seq": 12}"#);
        assert_eq!(f.and_then(|f| f.seq), Some(12));
    }

    #[test]
    fn agrees_with_serde_on_edge_cases_and_mutations() {
        let seeds: Vec<&str> = CANONICAL.iter().chain(EDGES).copied().collect();
        let fast_seeds = seeds.iter().filter(|t| agrees(t)).count();
        assert!(
            fast_seeds >= 25,
            "only {fast_seeds} seeds took the fast path"
        );

        const ALPHABET: &[u8] = b"{}[]\",:\\ 0123456789abcdefghijklmnopqrstuvwxyz\t-";
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        let (mut tried, mut fast) = (0, 0);
        for _ in 0..1000 {
            for seed in &seeds {
                let mut bytes = seed.as_bytes().to_vec();
                for _ in 0..=next(3) {
                    let at = next(bytes.len() + 1);
                    let byte = ALPHABET[next(ALPHABET.len())];
                    match next(3) {
                        0 if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        1 if at < bytes.len() => bytes[at] = byte,
                        _ => bytes.insert(at, byte),
                    }
                }
                if let Ok(text) = String::from_utf8(bytes) {
                    tried += 1;
                    fast += usize::from(agrees(&text));
                }
            }
        }
        assert!(
            fast * 10 >= tried,
            "only {fast} of {tried} mutations took the fast path"
        );
    }
}
