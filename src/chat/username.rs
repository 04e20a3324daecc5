//! Usernames: taken from the upgrade request's query string, percent-decoded.

use std::borrow::Cow;

/// The most characters (not bytes) a name may have.
pub const MAX_CHARS: usize = 32;

/// The value of `key` in a query string (`a=1&b=2`), percent-decoded as
/// UTF-8, with `+` as a space. `None` if absent or not decodable.
pub fn query_param<'q>(query: &'q str, key: &str) -> Option<Cow<'q, str>> {
    let raw = query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)?;
    if !raw.contains(['%', '+']) {
        return Some(Cow::Borrowed(raw));
    }
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        match b {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = rest.get(..2)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                bytes.push((hi * 16 + lo) as u8);
                rest = &rest[2..];
            }
            _ => bytes.push(b),
        }
    }
    String::from_utf8(bytes).ok().map(Cow::Owned)
}

/// 1 to 32 characters: letters and digits of any script, `_`, `-`, `.`.
pub fn is_valid(name: &str) -> bool {
    let mut count = 0;
    for c in name.chars() {
        count += 1;
        if count > MAX_CHARS || !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            return false;
        }
    }
    count > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_values() {
        assert_eq!(
            query_param("username=alice", "username").as_deref(),
            Some("alice")
        );
        assert_eq!(
            query_param("x=1&username=bob&y", "username").as_deref(),
            Some("bob")
        );
        assert_eq!(
            query_param("username=%E5%B0%8F%E6%98%8E", "username").as_deref(),
            Some("小明")
        );
        assert_eq!(
            query_param("username=Zo%c3%ab", "username").as_deref(),
            Some("Zoë")
        );
        assert_eq!(
            query_param("username=a+b", "username").as_deref(),
            Some("a b")
        );
        assert_eq!(query_param("username", "username").as_deref(), Some(""));
        assert_eq!(query_param("name=alice", "username"), None);
        assert_eq!(query_param("username=%zz", "username"), None);
        assert_eq!(query_param("username=%C3", "username"), None);
        assert_eq!(query_param("username=%", "username"), None);
    }

    #[test]
    fn name_rules() {
        for ok in [
            "alice",
            "小明",
            "Zoë",
            "a_b-c.d",
            "٣٤",
            "x",
            &"a".repeat(32),
            &"é".repeat(32),
        ] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a\tb",
            "a\u{0}",
            "<script>",
            "a/b",
            "😀",
            &"a".repeat(33),
            "a\u{200b}b",
            "e\u{301}",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }
}
