//! Cost of the input guards: all four in-process kinds (pii, secrets,
//! promptInjection, malicious) over every string of a 4 KiB input, median of
//! single calls. Target: ≤ 50 µs. Printed beside a baseline from the same run:
//! parsing the same input with serde_json, work every call does anyway.
//!
//! Run: `cargo bench --bench guards`. Three inputs: ASCII prose (the fast
//! path), accented prose (already NFKC: the skeleton runs per accented
//! letter), and prose with a fullwidth word and a zero-width space (full NFKC
//! as well).

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use toolwarden::guards::{GuardAction, GuardDecl, GuardKind, GuardSet};

/// Median duration of one call of `f`, over calls made for about `budget`.
fn median(budget: Duration, mut f: impl FnMut()) -> Duration {
    for _ in 0..200 {
        f();
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget {
        let t = Instant::now();
        f();
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

/// A 4 KiB input: a free-text post plus a few short fields.
fn input(sentence: &str) -> String {
    let mut content = String::new();
    while content.len() < 3900 {
        content.push_str(sentence);
    }
    let doc = json!({
        "content": content,
        "contentType": "post",
        "author": {"name": "Jo Example", "handle": "jo_example"},
        "tags": ["gardening", "spring", "tomatoes"],
    });
    let text = doc.to_string();
    assert!((4000..=4300).contains(&text.len()), "{}", text.len());
    text
}

fn main() {
    let kinds = [
        GuardKind::Pii,
        GuardKind::Secrets,
        GuardKind::PromptInjection,
        GuardKind::Malicious,
    ];
    let decls: Vec<GuardDecl> = kinds
        .iter()
        .map(|&kind| GuardDecl {
            kind,
            action: GuardAction::Refuse,
            fields: Vec::new(),
            categories: Vec::new(),
            http: None,
        })
        .collect();
    let guards = GuardSet::compile(&decls).expect("guards compile");
    let budget = Duration::from_secs(2);
    for (name, sentence) in [
        (
            "ascii",
            "My tomatoes finally ripened after a cold spring, and I watered them every morning and it paid off. ",
        ),
        (
            "accented",
            "Mes tomates ont enfin mûri après un printemps froid, grâce au soleil et à l'arrosage. ",
        ),
        (
            "unicode",
            "Mes tomates ont enfin mûri après un printemps froid, ｍｅｒｃｉ au soleil\u{200B} et à l'arrosage. ",
        ),
    ] {
        let text = input(sentence);
        let value: Value = serde_json::from_str(&text).unwrap();
        let findings = guards.check(&value);
        assert!(findings.is_empty(), "{name}: {findings:?}");
        let parse = median(budget, || {
            black_box(serde_json::from_str::<Value>(black_box(&text)).unwrap());
        });
        let checked = median(budget, || {
            black_box(guards.apply(black_box(&value)));
        });
        let per_kind: Vec<String> = decls
            .iter()
            .map(|decl| {
                let single = GuardSet::compile(std::slice::from_ref(decl)).unwrap();
                let alone = median(budget / 4, || {
                    black_box(single.apply(black_box(&value)));
                });
                format!("{} {:.1}", decl.kind.as_str(), alone.as_secs_f64() * 1e6)
            })
            .collect();
        println!(
            "{name:>8} input, {} bytes: baseline serde_json parse {:>7.1} µs, all input guards {:>7.1} µs (target ≤ 50 µs; alone, µs: {})",
            text.len(),
            parse.as_secs_f64() * 1e6,
            checked.as_secs_f64() * 1e6,
            per_kind.join(", "),
        );
    }
}
