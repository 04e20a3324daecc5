//! The bodies this generator sends, and a fast scan of the JSON it receives.
//!
//! We control the content of every body (letters and digits only), so a
//! received message needs no JSON parser: a byte search for `"body"`, `"type"`
//! or `"from"` followed by `:` and a string is enough, with whitespace allowed
//! around the colon (other servers format differently). A key inside a JSON
//! string cannot match: its quotes would be escaped there.

/// The string value of the top-level field `name` in `json`, without escapes
/// resolved (ours have none). `None` if absent or not a string.
pub fn field<'a>(json: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let i = value_at(json, name)?;
    if json.get(i) != Some(&b'"') {
        return None;
    }
    let value_start = i + 1;
    let mut j = value_start;
    while j < json.len() {
        match json[j] {
            b'"' => return Some(&json[value_start..j]),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
    None
}

/// The value of the top-level field `name` in `json` if it is a whole number
/// (digits only, as the server writes counts). `None` if absent or not one.
pub fn number_field(json: &[u8], name: &str) -> Option<u64> {
    let (v, end) = number_at(json, value_at(json, name)?)?;
    matches!(
        json.get(end),
        Some(b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n')
    )
    .then_some(v)
}

/// The decimal number that starts at `i`: its value and where it ends. `None`
/// without a digit there, or past `u64`.
fn number_at(bytes: &[u8], i: usize) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut end = i;
    while let Some(&d) = bytes.get(end).filter(|d| d.is_ascii_digit()) {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        end += 1;
    }
    (end > i).then_some((v, end))
}

/// Where the value of the first key `"name"` starts (after the colon and any
/// whitespace).
fn value_at(json: &[u8], name: &str) -> Option<usize> {
    let name = name.as_bytes();
    let mut from = 0;
    while let Some(at) = find(&json[from..], name) {
        let start = from + at;
        from = start + name.len();
        // The name must be a whole key: `"name"`.
        if start == 0 || json[start - 1] != b'"' || json.get(from) != Some(&b'"') {
            continue;
        }
        if start >= 2 && json[start - 2] == b'\\' {
            continue;
        }
        let i = skip_ws(json, from + 1);
        if json.get(i) != Some(&b':') {
            continue;
        }
        return Some(skip_ws(json, i + 1));
    }
    None
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// The first position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        let at = haystack[i..=haystack.len() - needle.len()]
            .iter()
            .position(|&b| b == first)?;
        let start = i + at;
        if &haystack[start + 1..start + needle.len()] == rest {
            return Some(start);
        }
        i = start + 1;
    }
    None
}

/// Appends `v` in decimal.
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = digits.len();
    loop {
        n -= 1;
        digits[n] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[n..]);
}

/// A body: each `(tag, number)` as `<tag><number>`, then `X`, padded with `x`
/// to `size` bytes (never cut: a longer body stays longer).
pub fn push_body(out: &mut Vec<u8>, fields: &[(u8, u64)], size: usize) {
    let start = out.len();
    for &(tag, value) in fields {
        out.push(tag);
        push_u64(out, value);
    }
    out.push(b'X');
    let len = out.len() - start;
    if len < size {
        out.resize(start + size, b'x');
    }
}

/// Reads the numbers of a body made by [`push_body`] with these `tags`, in
/// order. `None` if the body does not have that shape.
pub fn parse_body<const N: usize>(body: &[u8], tags: [u8; N]) -> Option<[u64; N]> {
    let mut out = [0u64; N];
    let mut i = 0;
    for (slot, tag) in out.iter_mut().zip(tags) {
        if body.get(i) != Some(&tag) {
            return None;
        }
        (*slot, i) = number_at(body, i + 1)?;
    }
    (body.get(i) == Some(&b'X')).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_in_our_servers_format() {
        let m = br#"{"type":"private","id":18,"ts":1764250000124,"from":"alice","to":"bob","body":"P3Q7T99Xxxx"}"#;
        assert_eq!(field(m, "type"), Some(&b"private"[..]));
        assert_eq!(field(m, "from"), Some(&b"alice"[..]));
        assert_eq!(field(m, "to"), Some(&b"bob"[..]));
        assert_eq!(field(m, "body"), Some(&b"P3Q7T99Xxxx"[..]));
        assert_eq!(field(m, "id"), None, "not a string");
        assert_eq!(field(m, "ref"), None);
    }

    #[test]
    fn any_order_whitespace_and_decoys() {
        let m = br#"{ "body" : "K1T2X", "note":"the \"type\":\"x\" key", "type":	"public", "xtype":"no" }"#;
        assert_eq!(field(m, "body"), Some(&b"K1T2X"[..]));
        assert_eq!(field(m, "type"), Some(&b"public"[..]));
        let m = br#"{"message":"say \"body\":\"fake\"","body":"real"}"#;
        assert_eq!(field(m, "body"), Some(&b"real"[..]));
        let m = br#"{"type":"welcome","users":["type","body"]}"#;
        assert_eq!(field(m, "type"), Some(&b"welcome"[..]));
        assert_eq!(field(m, "body"), None);
        assert_eq!(field(b"", "body"), None);
        assert_eq!(field(br#"{"body":"unterminated"#, "body"), None);
        assert_eq!(field(br#"{"body":"a\"b"}"#, "body"), Some(&br#"a\"b"#[..]));
    }

    #[test]
    fn numbers() {
        let m = br#"{"type":"gap","dropped":12}"#;
        assert_eq!(number_field(m, "dropped"), Some(12));
        assert_eq!(number_field(m, "type"), None, "a string");
        assert_eq!(number_field(m, "missing"), None);
        let m = br#"{ "note":"\"dropped\":5", "dropped" : 0 , "online":4}"#;
        assert_eq!(number_field(m, "dropped"), Some(0));
        assert_eq!(number_field(m, "online"), Some(4));
        assert_eq!(number_field(br#"{"dropped":-1}"#, "dropped"), None);
        assert_eq!(number_field(br#"{"dropped":1.5}"#, "dropped"), None);
        assert_eq!(number_field(br#"{"dropped":12"#, "dropped"), None);
        let max = format!(r#"{{"dropped":{}}}"#, u64::MAX);
        assert_eq!(number_field(max.as_bytes(), "dropped"), Some(u64::MAX));
        let over = format!(r#"{{"dropped":{}0}}"#, u64::MAX);
        assert_eq!(number_field(over.as_bytes(), "dropped"), None);
    }

    #[test]
    fn find_substrings() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"abc", b"abcd"), None);
        assert_eq!(find(b"aaa", b"a"), Some(0));
        assert_eq!(find(b"xya", b"a"), Some(2));
        assert_eq!(find(b"abc", b""), None);
    }

    #[test]
    fn bodies_round_trip_and_pad() {
        let mut b = Vec::new();
        push_body(
            &mut b,
            &[(b'P', 12), (b'Q', 0), (b'T', 1_764_250_000_123_456_789)],
            64,
        );
        assert_eq!(b.len(), 64);
        assert!(b.starts_with(b"P12Q0T1764250000123456789Xxx"));
        assert!(b.iter().all(u8::is_ascii_alphanumeric));
        assert_eq!(
            parse_body(&b, [b'P', b'Q', b'T']),
            Some([12, 0, 1_764_250_000_123_456_789])
        );
        let mut short = Vec::new();
        push_body(&mut short, &[(b'K', u64::MAX)], 4);
        assert_eq!(short, format!("K{}X", u64::MAX).as_bytes());
        assert_eq!(parse_body(&short, [b'K']), Some([u64::MAX]));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert_eq!(parse_body(b"P1Q2X", [b'P', b'Q', b'T']), None);
        assert_eq!(parse_body(b"P1Q2T", [b'P', b'Q', b'T']), None);
        assert_eq!(parse_body(b"PQ2T3X", [b'P', b'Q', b'T']), None);
        assert_eq!(parse_body(b"hello", [b'K', b'T']), None);
        assert_eq!(
            parse_body(b"K99999999999999999999999T1X", [b'K', b'T']),
            None
        );
        assert_eq!(parse_body(b"K1T2Xxxx", [b'K', b'T']), Some([1, 2]));
    }

    #[test]
    fn decimal() {
        for v in [0, 7, 10, 99, 1234567890, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, v);
            assert_eq!(out, v.to_string().as_bytes());
        }
    }
}
