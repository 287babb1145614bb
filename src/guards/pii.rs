//! Personal information: candidates found by pattern, confirmed by checksum or
//! issuing rules so look-alike numbers are not reported.

use regex::{Regex, RegexSet};
use serde::Deserialize;

use super::rules::{self, RequiredBytes, RuleMask};
use super::{GuardError, Hit, Path, Text};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
enum Check {
    None,
    Phone,
    Luhn,
    Iban,
    UsSsn,
    UkNino,
}

#[derive(Deserialize)]
struct RuleDecl {
    id: String,
    pattern: String,
    check: Check,
}

#[derive(Deserialize)]
struct File {
    rules: Vec<RuleDecl>,
}

pub(super) struct Pii {
    rules: Vec<RuleDecl>,
    /// The set's automaton reads every byte (7 µs per 4 KiB); a string with
    /// none of these bytes (no digit, `@` or `+`: most prose) is skipped.
    required: RequiredBytes,
    set: RegexSet,
    each: Vec<Regex>,
}

impl Pii {
    pub fn load() -> Result<Pii, GuardError> {
        let (file, text) = rules::PII;
        let File { rules } = rules::load(file, text)?;
        let invalid = |e: regex::Error| GuardError::RuleSet {
            file,
            reason: e.to_string(),
        };
        let set = RegexSet::new(rules.iter().map(|r| &r.pattern)).map_err(invalid)?;
        let each = rules
            .iter()
            .map(|r| Regex::new(&r.pattern))
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        let required = RequiredBytes::of(rules.iter().map(|r| r.pattern.as_str()))
            .map_err(|reason| GuardError::RuleSet { file, reason })?;
        Ok(Pii {
            rules,
            required,
            set,
            each,
        })
    }

    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }

    #[cfg(test)]
    fn scan<'a>(&'a self, text: &str, mask: RuleMask, out: &mut Vec<Hit<'a>>) {
        self.scan_text(&Text::new(text, Path::Fast), mask, out);
    }

    pub fn scan_text<'a>(&'a self, text: &Text, mask: RuleMask, out: &mut Vec<Hit<'a>>) {
        let (path, text) = (text.path(), text.raw());
        let possible = match path {
            Path::Fast => self.required.found_in(text),
            #[cfg(test)]
            Path::Straightforward => true,
        };
        if !possible {
            return;
        }
        for index in self.set.matches(text).iter().filter(|&i| mask.has(i)) {
            let rule = &self.rules[index];
            for m in self.each[index].find_iter(text) {
                if confirmed(&rule.check, m.as_str()) {
                    out.push(Hit {
                        rule: &rule.id,
                        span: Some(m.range()),
                    });
                }
            }
        }
    }
}

fn confirmed(check: &Check, candidate: &str) -> bool {
    match check {
        Check::None => true,
        Check::Phone => phone(candidate),
        Check::Luhn => payment_card(candidate),
        Check::Iban => iban(candidate),
        Check::UsSsn => us_ssn(candidate),
        Check::UkNino => uk_nino(candidate),
    }
}

fn digits(s: &str) -> Vec<u8> {
    s.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

/// International numbers carry 8 to 15 digits (E.164); North American ones
/// have an area code and exchange that do not start with 0 or 1.
fn phone(candidate: &str) -> bool {
    let d = digits(candidate);
    if candidate.starts_with('+') {
        (8..=15).contains(&d.len())
    } else {
        d.len() == 10 && d[0] >= 2 && d[3] >= 2
    }
}

/// 13 to 19 digits, an issuer prefix (2 to 6), the Luhn checksum, and not one
/// digit repeated (all zeros passes Luhn).
fn payment_card(candidate: &str) -> bool {
    let d = digits(candidate);
    if !(13..=19).contains(&d.len()) || !(2..=6).contains(&d[0]) || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let doubled = x * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// IBAN lengths of common countries; others need 15 to 34 characters.
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AT", 20),
    ("BE", 16),
    ("CH", 21),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("ES", 24),
    ("FI", 18),
    ("FR", 27),
    ("GB", 22),
    ("IE", 22),
    ("IT", 27),
    ("LU", 20),
    ("NL", 18),
    ("NO", 15),
    ("PL", 28),
    ("PT", 25),
    ("SE", 24),
];

/// ISO 13616: the country's length, then the number with its first four
/// characters moved to the end, letters as 10..35, is 1 modulo 97.
fn iban(candidate: &str) -> bool {
    let compact: Vec<u8> = candidate.bytes().filter(|b| *b != b' ').collect();
    let country = std::str::from_utf8(&compact[..2]).unwrap_or_default();
    let length_ok = match IBAN_LENGTHS.iter().find(|(c, _)| *c == country) {
        Some((_, len)) => compact.len() == *len,
        None => (15..=34).contains(&compact.len()),
    };
    if !length_ok {
        return false;
    }
    let mut remainder = 0u32;
    for &b in compact[4..].iter().chain(&compact[..4]) {
        let value = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

/// Area 001-899 but not 666, group 01-99, serial 0001-9999 (SSA rules).
fn us_ssn(candidate: &str) -> bool {
    let d = digits(candidate);
    let number = |r: std::ops::Range<usize>| d[r].iter().fold(0u32, |n, &x| n * 10 + u32::from(x));
    let (area, group, serial) = (number(0..3), number(3..5), number(5..9));
    (1..900).contains(&area) && area != 666 && group != 0 && serial != 0
}

/// HMRC's rules: the first letter is not D, F, I, Q, U or V, the second not
/// those or O, and the prefix is not one never issued.
fn uk_nino(candidate: &str) -> bool {
    let b = candidate.as_bytes();
    let (first, second) = (b[0], b[1]);
    let prefix = &candidate[..2];
    !b"DFIQUV".contains(&first)
        && !b"DFIQUVO".contains(&second)
        && !["BG", "GB", "KN", "NK", "NT", "TN", "ZZ"].contains(&prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_hit(text: &str) -> Vec<String> {
        let pii = Pii::load().unwrap();
        let mut out = Vec::new();
        pii.scan(text, RuleMask::ALL, &mut out);
        out.iter().map(|h| h.rule.to_string()).collect()
    }

    #[test]
    fn true_positives() {
        for (text, rule) in [
            ("write to jane.doe+tag@mail.example.org today", "email"),
            ("call +44 20 7946 0958", "phone"),
            ("call (212) 555-0187", "phone"),
            ("card 4111 1111 1111 1111 exp 12/29", "paymentCard"),
            ("amex 378282246310005", "paymentCard"),
            ("mc 5555-5555-5555-4444", "paymentCard"),
            ("pay to DE89 3704 0044 0532 0130 00", "iban"),
            ("GB29NWBK60161331926819", "iban"),
            ("ssn 536-22-8475", "usSsn"),
            ("NI number AB 12 34 56 C", "ukNino"),
        ] {
            assert_eq!(rules_hit(text), vec![rule], "{text}");
        }
    }

    #[test]
    fn near_misses_are_not_reported() {
        for text in [
            // Luhn fails (last digit changed), all zeros, wrong issuer digit.
            "card 4111 1111 1111 1112",
            "0000000000000000",
            "8111111111111111",
            // IBAN with a wrong check digit and with a wrong length for DE.
            "DE88 3704 0044 0532 0130 00",
            "DE89 3704 0044 0532 0130",
            // Never-issued SSN areas and an all-zero group.
            "666-12-3456",
            "900-12-3456",
            "536-00-8475",
            // Never-issued NINO prefix.
            "GB 12 34 56 C",
            // Dates, versions, ids and NANP numbers with impossible area codes.
            "released 2024-01-15, version 1.2.3",
            "123-456-7890",
            "550e8400-e29b-41d4-a716-446655440000",
            "user@localhost",
        ] {
            assert!(rules_hit(text).is_empty(), "{text}: {:?}", rules_hit(text));
        }
    }

    #[test]
    fn only_strings_with_a_digit_at_or_plus_can_hold_personal_information() {
        let pii = Pii::load().unwrap();
        let needed: Vec<u8> = (0..=255u8)
            .filter(|&b| pii.required.found_in(&String::from(b as char)))
            .collect();
        assert_eq!(needed, b"+0123456789@");
        assert!(
            !pii.required
                .found_in("My tomatoes finally ripened, mûri après l'hiver.")
        );
    }

    #[test]
    fn spans_cover_the_number() {
        let pii = Pii::load().unwrap();
        let text = "card: 4111-1111-1111-1111.";
        let mut out = Vec::new();
        pii.scan(text, RuleMask::ALL, &mut out);
        assert_eq!(&text[out[0].span.clone().unwrap()], "4111-1111-1111-1111");
    }
}
