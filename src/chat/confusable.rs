//! UTS #39 confusable skeletons, from a compact copy of Unicode's
//! confusables data: the `unicode-security` crate's own table is a slice of
//! pointers per entry, which costs ~360 KB of binary (relocations included)
//! where this costs ~50 KB. `CONFUSABLES` is generated from that crate's
//! public `skeleton` (`cargo test --lib regenerate_confusables -- --ignored`
//! rewrites src/chat/confusable_table.rs) and a test checks that both give the same
//! skeleton for every code point.

use unicode_normalization::UnicodeNormalization;

#[path = "confusable_table.rs"]
#[rustfmt::skip]
mod table;

/// The skeleton of `s` (UTS #39 section 4): NFD, without default-ignorable
/// code points, each character replaced by its prototype, NFD again.
pub fn skeleton(s: &str) -> impl Iterator<Item = char> + '_ {
    s.chars()
        .nfd()
        .filter(|&c| !is_default_ignorable(c))
        .flat_map(prototype)
        .nfd()
}

/// The NFD of `c`'s prototype (`c`, a character of an NFD string).
fn prototype(c: char) -> impl Iterator<Item = char> {
    let code = c as u32;
    let found = match u16::try_from(code) {
        Ok(bmp) => table::FROM_BMP.binary_search(&bmp).ok(),
        Err(_) => table::FROM_ASTRAL
            .binary_search(&code)
            .ok()
            .map(|i| table::FROM_BMP.len() + i),
    };
    let units = match found {
        Some(i) => &table::TO[usize::from(table::START[i])..usize::from(table::START[i + 1])],
        None => &[],
    };
    // The table is generated from chars: no lone surrogate.
    let mapped = char::decode_utf16(units.iter().copied()).map(|c| c.unwrap_or('\u{fffd}'));
    let unmapped = units.is_empty().then_some(c);
    mapped.chain(unmapped)
}

/// Default_Ignorable_Code_Point (DerivedCoreProperties.txt; the ranges
/// unicode-security uses for skeletons, checked by a test).
pub fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{34f}'
            | '\u{61c}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff0}'..='\u{fff8}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e0fff}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(s: &str) -> String {
        skeleton(s).collect()
    }

    fn theirs(s: &str) -> String {
        unicode_security::skeleton(s).collect()
    }

    #[test]
    fn every_code_point_has_the_skeleton_unicode_security_gives() {
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            let s = c.to_string();
            assert_eq!(ours(&s), theirs(&s), "U+{:04X}", c as u32);
        }
        for s in [
            "alice",
            "\u{430}lice",
            "rn",
            "Zoe\u{308}",
            "a\u{200b}b",
            "𝐚𝐥𝐢𝐜𝐞",
            "ǉ",
            "李雷",
        ] {
            assert_eq!(ours(s), theirs(s), "{s:?}");
        }
    }

    /// Rewrites the table from `unicode_security::skeleton`: for each
    /// character that NFD leaves alone, the NFD of its prototype where that
    /// differs from the character (the skeleton of a one-character string).
    #[test]
    fn default_ignorable_code_points_are_those_unicode_security_drops() {
        // A skeleton drops exactly these (no prototype is empty).
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            let s = c.to_string();
            if s.nfd().eq(s.chars()) {
                assert_eq!(
                    theirs(&s).is_empty(),
                    is_default_ignorable(c),
                    "U+{:04X}",
                    c as u32
                );
            }
        }
    }

    #[test]
    #[ignore = "rewrites src/chat/confusable_table.rs"]
    fn regenerate_confusables() {
        let (mut from, mut start, mut to) = (Vec::new(), vec![0usize], Vec::new());
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            let s = c.to_string();
            if s.nfd().ne(s.chars()) || is_default_ignorable(c) {
                continue;
            }
            let skeleton: String = unicode_security::skeleton(&s).collect();
            if skeleton != s {
                from.push(c as u32);
                to.extend(skeleton.encode_utf16());
                start.push(to.len());
            }
        }
        assert!(to.len() <= usize::from(u16::MAX));
        let (bmp, astral): (Vec<u32>, Vec<u32>) = from.iter().partition(|&&c| c <= 0xffff);
        let list = |items: Vec<String>| {
            items
                .chunks(12)
                .map(|line| format!("    {},\n", line.join(", ")))
                .collect::<String>()
        };
        let hex = |items: &[u32]| list(items.iter().map(|c| format!("0x{c:x}")).collect());
        let units: Vec<u32> = to.iter().map(|&u| u32::from(u)).collect();
        let text = format!(
            "// Generated by `cargo test --lib regenerate_confusables -- --ignored`\n\
             // from unicode-security {} (Unicode {}.{}.{}): do not edit.\n\n\
             /// Characters with a prototype, ascending: those of the BMP, then the others.\n\
             pub static FROM_BMP: [u16; {}] = [\n{}];\n\n\
             pub static FROM_ASTRAL: [u32; {}] = [\n{}];\n\n\
             /// Where each one's prototype starts in `TO` (and ends: the next start),\n\
             /// in the order of `FROM_BMP` then `FROM_ASTRAL`.\n\
             pub static START: [u16; {}] = [\n{}];\n\n\
             /// The prototypes, in NFD, one after another, in UTF-16.\n\
             pub static TO: [u16; {}] = [\n{}];\n",
            "0.1.3",
            unicode_security::UNICODE_VERSION.0,
            unicode_security::UNICODE_VERSION.1,
            unicode_security::UNICODE_VERSION.2,
            bmp.len(),
            hex(&bmp),
            astral.len(),
            hex(&astral),
            start.len(),
            list(start.iter().map(|s| s.to_string()).collect()),
            to.len(),
            hex(&units),
        );
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/src/chat/confusable_table.rs"),
            text,
        )
        .expect("write the table");
    }
}
