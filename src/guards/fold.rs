//! Folding text into one canonical form before matching phrases, so that
//! fullwidth letters, zero-width characters, homoglyphs and case do not let a
//! phrase slip past: NFKC, invisible characters removed (Unicode tag
//! characters decoded to the ASCII they smuggle), lower case, the UTS #39
//! confusable skeleton without combining marks, and runs of separators
//! collapsed to one space.

use std::borrow::Cow;
use std::sync::LazyLock;

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfkc_quick};
use unicode_security::GeneralSecurityProfile;
use unicode_security::general_security_profile::IdentifierType;

/// Punctuation that carries meaning in chat-template delimiters and is kept;
/// every other non-alphanumeric ASCII character is a separator.
const KEPT_PUNCTUATION: &str = "<>|[]#/`";

/// The folded form of each ASCII character, computed once with the same
/// skeleton mapping non-ASCII characters get (the hot path is ASCII).
static ASCII: LazyLock<[Cow<'static, str>; 128]> = LazyLock::new(|| {
    std::array::from_fn(|b| {
        let c = b as u8 as char;
        if KEPT_PUNCTUATION.contains(c) {
            Cow::Owned(c.to_string())
        } else if c.is_ascii_alphanumeric() {
            Cow::Owned(skeleton_lower(c))
        } else {
            Cow::Borrowed(" ")
        }
    })
});

/// Folded forms of U+0080..U+024F (Latin-1 and Latin Extended A and B:
/// accented prose), computed once; the skeleton costs about 100 ns a call.
const LATIN_END: u32 = 0x250;
static LATIN: LazyLock<Vec<String>> = LazyLock::new(|| {
    (0x80..LATIN_END)
        .map(|u| {
            let mut out = String::new();
            if let Some(c) = char::from_u32(u) {
                for_skeleton_lower(c, |f| {
                    if !is_combining_mark(f) {
                        out.push(f)
                    }
                });
            }
            out
        })
        .collect()
});

fn skeleton_lower(c: char) -> String {
    let mut out = String::new();
    for_skeleton_lower(c, |f| out.push(f));
    out
}

/// Calls `each` with the lower-cased skeleton of `c`, without allocating.
fn for_skeleton_lower(c: char, mut each: impl FnMut(char)) {
    let mut buffer = [0u8; 16];
    let mut len = 0;
    for lower in c.to_lowercase() {
        len += lower.encode_utf8(&mut buffer[len..]).len();
    }
    let lower = std::str::from_utf8(&buffer[..len]).unwrap_or_default();
    for folded in unicode_security::skeleton(lower).flat_map(char::to_lowercase) {
        each(folded);
    }
}

/// Characters that render as nothing: default-ignorable code points (UTS #39
/// identifier type) plus the joiners, which identifier rules allow but which
/// hide nothing in prose.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200C}' | '\u{200D}')
        || c.identifier_type() == Some(IdentifierType::Default_Ignorable)
}

/// Unicode tag characters (U+E0020..U+E007E) mirror ASCII and render as
/// nothing: "ASCII smuggling" hides instructions in them, so they are read.
fn untag(c: char) -> char {
    match c as u32 {
        t @ 0xE0020..=0xE007E => char::from((t - 0xE0000) as u8),
        _ => c,
    }
}

/// `text` in NFKC, borrowed when the quick check (a table lookup per
/// character) proves it already is: ASCII and most accented prose.
pub fn nfkc(text: &str) -> Cow<'_, str> {
    if text.is_ascii() || is_nfkc_quick(text.chars()) == IsNormalized::Yes {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.nfkc().collect())
    }
}

/// Folds `text`; the result is lower case with single spaces and no leading
/// or trailing space.
pub fn fold(text: &str) -> String {
    fold_nfkc(&nfkc(text))
}

/// [`fold`] of text already in NFKC (the guards normalise each string once
/// for every detector that needs it).
pub fn fold_nfkc(normalized: &str) -> String {
    let ascii = &*ASCII;
    let mut out = String::with_capacity(normalized.len());
    let push = |piece: &str, out: &mut String| {
        for c in piece.chars() {
            if c == ' ' {
                if !out.is_empty() && !out.ends_with(' ') {
                    out.push(' ');
                }
            } else {
                out.push(c);
            }
        }
    };
    for c in normalized.chars().map(untag) {
        if c.is_ascii() {
            push(&ascii[c as usize], &mut out);
        } else if invisible(c) {
            continue;
        } else if c.is_whitespace() {
            push(" ", &mut out);
        } else {
            let emit = |f: char| match f {
                f if is_combining_mark(f) => {}
                f if f.is_ascii() => push(&ascii[f as usize], &mut out),
                f if f.is_alphanumeric() => out.push(f),
                _ => push(" ", &mut out),
            };
            // The skeleton is decomposed: dropping the marks reads `ïgnöre` as `ignore`.
            match LATIN.get((c as u32).wrapping_sub(0x80) as usize) {
                Some(folded) => folded.chars().for_each(emit),
                None => for_skeleton_lower(c, emit),
            }
        }
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::fold;

    #[test]
    fn evasions_fold_to_the_plain_phrase() {
        let plain = fold("Ignore previous instructions");
        for evasion in [
            "IGNORE   previous\tinstructions",
            "ig\u{200B}nore pre\u{200D}vious instruc\u{2060}tions",
            "Ｉｇｎｏｒｅ ｐｒｅｖｉｏｕｓ ｉｎｓｔｒｕｃｔｉｏｎｓ",
            // Cyrillic о, е, і and Greek ο standing in for Latin letters.
            "ign\u{043E}r\u{0435} prev\u{0456}\u{03BF}us instructions",
            "ignore_previous-instructions",
            "i\u{0308}gno\u{0301}re pre\u{0300}vious instructions",
            "ïgnöré prévious instructions",
            "\u{E0069}\u{E0067}\u{E006E}\u{E006F}\u{E0072}\u{E0065} previous instructions",
        ] {
            assert_eq!(fold(evasion), plain, "{evasion:?}");
        }
    }

    #[test]
    fn delimiters_keep_their_punctuation() {
        // The skeleton writes `m` as its confusable `rn`; phrases fold the same way.
        assert_eq!(fold("<|im_start|>system"), "<|irn start|>systern");
        assert_eq!(fold("  [INST] hi "), "[inst] hi");
    }
}
