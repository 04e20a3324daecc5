//! Usernames: taken from the upgrade request's query string, percent-decoded.

use std::borrow::Cow;

use unicode_normalization::char::canonical_combining_class;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};
use unicode_security::{GeneralSecurityProfile, RestrictionLevel, RestrictionLevelDetection};

use super::confusable::{is_default_ignorable, skeleton};

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

/// Why a name cannot be a username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidName {
    /// No characters, or more than [`MAX_CHARS`] (after NFC).
    Length,
    /// Not a letter, digit, `_`, `-` or `.`, or one that UTS #39 restricts
    /// in identifiers (full-width and mathematical letters, obsolete
    /// scripts, ...), or a combining mark with nothing to combine with.
    Character(char),
    /// Shows nothing (U+3164 HANGUL FILLER, U+200B, U+00AD, bidi controls,
    /// variation selectors: Unicode's default-ignorable code points).
    Invisible(char),
    /// Letters of scripts that do not go together (`аlice` with a
    /// Cyrillic `а`): more than UTS #39's "highly restrictive" level allows.
    MixedScripts,
}

impl InvalidName {
    /// What a client is told (the `error` event's `message`).
    pub fn explain(self) -> &'static str {
        match self {
            InvalidName::Length | InvalidName::Character(_) => {
                "username must be 1-32 letters, digits, '_', '-' or '.'"
            }
            InvalidName::Invisible(_) => "username must not contain invisible characters",
            InvalidName::MixedScripts => {
                "username must not mix scripts (such as Latin and Cyrillic letters)"
            }
        }
    }
}

/// The username `raw` stands for: its NFC form, which is how it is shown
/// and addressed, if that is 1 to 32 characters of letters and digits of
/// any script, `_`, `-`, `.` (and combining marks on a letter), none
/// invisible or restricted by UTS #39's General Security Profile, and of
/// one script (or a combination usual in one writing system, such as
/// Japanese kanji with kana or Latin letters: UTS #39 "highly restrictive").
/// Borrows `raw` when it is in NFC already (the common case: a quick check).
pub fn canonical(raw: &str) -> Result<Cow<'_, str>, InvalidName> {
    let name = match is_nfc_quick(raw.chars()) {
        IsNormalized::Yes => Cow::Borrowed(raw),
        _ => Cow::Owned(raw.nfc().collect::<String>()),
    };
    let mut count = 0;
    let mut previous: Option<char> = None;
    for c in name.chars() {
        count += 1;
        if count > MAX_CHARS {
            return Err(InvalidName::Length);
        }
        // Unicode's default-ignorable code points show nothing, so a name
        // with one looks like the name without it. (UTS #39 allows ZWNJ and
        // ZWJ for a few scripts' spelling; here they are refused too.)
        if is_default_ignorable(c) {
            return Err(InvalidName::Invisible(c));
        }
        let allowed = if canonical_combining_class(c) != 0 {
            // A combining mark (a non-zero combining class) goes on the
            // letter before it, and not twice in a row.
            previous.is_some_and(|p| p != c && !matches!(p, '_' | '-' | '.'))
        } else {
            c.is_alphanumeric() || matches!(c, '_' | '-' | '.')
        };
        if !allowed || !c.identifier_allowed() {
            return Err(InvalidName::Character(c));
        }
        previous = Some(c);
    }
    if count == 0 {
        return Err(InvalidName::Length);
    }
    if !name.check_restriction_level(RestrictionLevel::HighlyRestrictive) {
        return Err(InvalidName::MixedScripts);
    }
    Ok(name)
}

/// Whether `name` is a username as given (or in another normalisation
/// form of one: see [`canonical`]).
pub fn is_valid(name: &str) -> bool {
    canonical(name).is_ok()
}

/// The strings that decide whether two names look alike: two names clash
/// when they share one. Case is folded (`Alice` is `alice`), and case and
/// UTS #39 confusables combine either way round: the skeleton of the name
/// in lower case (`ALICE` is `alice`), and the skeleton of the lower-cased
/// skeleton (`aIice` with a capital I, whose skeleton is `alice`; `B0B`,
/// whose skeleton is `BOB`, is `bob`). One string when both are the same.
pub fn lookalike_keys(name: &str) -> Vec<Box<str>> {
    let folded: String = skeleton(&name.to_lowercase()).collect();
    let confusable_first: String =
        skeleton(&skeleton(name).collect::<String>().to_lowercase()).collect();
    if confusable_first == folded {
        vec![folded.into()]
    } else {
        vec![folded.into(), confusable_first.into()]
    }
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
        use InvalidName::*;
        // (given, its name or why it is refused)
        let table: &[(&str, Result<&str, InvalidName>)] = &[
            ("alice", Ok("alice")),
            ("Alice", Ok("Alice")),
            ("小明", Ok("小明")),
            ("李雷", Ok("李雷")),
            ("Zoë", Ok("Zoë")),
            ("Zoe\u{308}", Ok("Zoë")), // NFD in, NFC out
            ("e\u{301}", Ok("é")),
            ("a_b-c.d", Ok("a_b-c.d")),
            ("٣٤", Ok("٣٤")),
            ("x", Ok("x")),
            ("аре", Ok("аре")),               // all Cyrillic: one script
            ("нмстe", Err(MixedScripts)),     // ... with a Latin e
            ("नमस्ते", Ok("नमस्ते")),             // a virama (a combining mark)
            ("山田たろう", Ok("山田たろう")), // Han with Hiragana: Japanese
            ("Tokyo東京", Ok("Tokyo東京")),   // Latin with Han: highly restrictive
            ("김민준", Ok("김민준")),
            ("Ωμέγα", Ok("Ωμέγα")),
            ("Ωmega", Err(MixedScripts)),         // Greek and Latin
            ("\u{430}lice", Err(MixedScripts)),   // Cyrillic а, Latin lice
            ("ａｌｉｃｅ", Err(Character('ａ'))), // full-width
            ("𝐚𝐥𝐢𝐜𝐞", Err(Character('𝐚'))),       // mathematical bold
            ("ℌello", Err(Character('ℌ'))),
            ("\u{3164}", Err(Invisible('\u{3164}'))), // HANGUL FILLER, a letter
            ("alice\u{3164}", Err(Invisible('\u{3164}'))),
            ("\u{ffa0}", Err(Invisible('\u{ffa0}'))),
            ("a\u{200b}b", Err(Invisible('\u{200b}'))),
            ("a\u{200d}b", Err(Invisible('\u{200d}'))),
            ("al\u{ad}ice", Err(Invisible('\u{ad}'))),
            ("\u{202e}ecila", Err(Invisible('\u{202e}'))), // right-to-left override
            ("alice\u{fe0f}", Err(Invisible('\u{fe0f}'))),
            ("a\u{34f}b", Err(Invisible('\u{34f}'))),
            ("\u{301}a", Err(Character('\u{301}'))), // a mark on nothing
            ("q\u{301}\u{301}", Err(Character('\u{301}'))), // the same mark twice
            ("ǉ", Err(Character('ǉ'))),              // a ligature, restricted
            ("", Err(Length)),
            (&"a".repeat(32), Ok(&"a".repeat(32))),
            (&"é".repeat(32), Ok(&"é".repeat(32))),
            (&"e\u{301}".repeat(32), Ok(&"é".repeat(32))), // 64 in, 32 after NFC
            (&"a".repeat(33), Err(Length)),
            ("a b", Err(Character(' '))),
            ("a\tb", Err(Character('\t'))),
            ("a\u{0}", Err(Character('\u{0}'))),
            ("<script>", Err(Character('<'))),
            ("a/b", Err(Character('/'))),
            ("o'neil", Err(Character('\''))),
            ("a:b", Err(Character(':'))),
            ("😀", Err(Character('😀'))),
        ];
        for (given, expected) in table {
            assert_eq!(
                canonical(given).as_deref().map_err(|e| *e),
                *expected,
                "{given:?}"
            );
            assert_eq!(is_valid(given), expected.is_ok(), "{given:?}");
        }
    }

    #[test]
    fn lookalikes_share_a_key_and_different_names_do_not() {
        let clash = |a: &str, b: &str| {
            let (a, b) = (lookalike_keys(a), lookalike_keys(b));
            a.iter().any(|k| b.contains(k))
        };
        // (one name, another, whether they clash): names as they would be
        // admitted (valid, NFC).
        let table = [
            ("alice", "alice", true),
            ("alice", "Alice", true),
            ("alice", "ALICE", true),
            ("alice", "aIice", true), // capital I
            ("alice", "a1ice", true),
            ("alice", "allce", false),
            ("ALICE", "allce", true), // a capital I looks like l
            ("ALICE", "aIice", true),
            ("alice", "alicia", false),
            ("ape", "аре", true), // all Cyrillic
            ("ape", "APE", true),
            ("bob", "b0b", true),
            ("bob", "B0B", true),
            ("modern", "rnodern", true),
            ("Zoë", "zoë", true),
            ("李雷", "李雷", true),
            ("李雷", "李电", false),
            ("Ωμέγα", "ωμέγα", true),
            ("x", "y", false),
            ("paypal", "paypa1", true),
        ];
        for (a, b, expected) in table {
            assert_eq!(clash(a, b), expected, "{a} / {b}");
            assert_eq!(clash(b, a), expected, "{b} / {a}");
        }
        // Only names that differ with case need two keys.
        assert_eq!(lookalike_keys("alice").len(), 1);
        assert_eq!(lookalike_keys("Alice").len(), 1);
        assert_eq!(lookalike_keys("ALICE").len(), 2);
    }
}
