//! Cost of the input guards: all four in-process kinds (pii, secrets,
//! promptInjection, malicious) over every string of a 4 KiB input, median of
//! single calls. Target: ≤ 50 µs added to the pipeline. Printed beside, from
//! the same run: parsing the same input with serde_json (work every call does
//! anyway), the guards alone, and the whole pipeline (authentication, rate
//! limit, shape, validation, audit records, an executor that answers at
//! once) for a tool without guards and the same tool with the four guards.
//!
//! Run: `cargo bench --bench guards`. Three inputs: ASCII prose (nothing to
//! normalise), accented prose (already NFKC: the quick check and the folding
//! table per accented letter), and prose with a fullwidth word and a
//! zero-width space (NFKC of the runs around them as well). None holds
//! anything a guard reports, so the prefilters skip what they can; the
//! property test `guards::tests::the_fast_path_finds_exactly_what_the_straightforward_path_finds`
//! is what shows they skip nothing that matters.

use std::hint::black_box;
use std::time::{Duration, Instant};

use std::sync::Arc;

use serde_json::{Value, json};
use toolwarden::guards::{GuardAction, GuardDecl, GuardKind, GuardSet};
use toolwarden::runner::audit::{AuditKey, AuditLog};
use toolwarden::runner::auth::Authenticator;
use toolwarden::runner::executor::{ExecFuture, ExecOutcome, ToolExecutor};
use toolwarden::runner::pipeline::{CallContext, Runner};
use toolwarden::runner::ratelimit::LimiterClock;
use toolwarden::runner::registry::Registry;
use toolwarden::runner::tool::{PreparedTool, SecretDelivery, SecretsDir};

/// The same tool twice: `plain` without guards, `guarded` with all four input guards.
const TOOLS: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: NAME}
spec:
  description: Moderates a post
  risk: low
  maxInputBytes: 8192
  inputSchema:
    type: object
    additionalProperties: false
    required: [content, contentType]
    properties:
      content: {type: string, maxLength: 8000}
      contentType: {type: string, enum: [post, comment]}
      author: {type: object, properties: {name: {type: string}, handle: {type: string}}}
      tags: {type: array, items: {type: string}}
  runtime: {image: "busybox:1.36.1", command: [/bin/true]}
GUARDS"#;

const GUARDS: &str = "  guards:
    input:
      - {kind: pii, action: refuse}
      - {kind: secrets, action: refuse}
      - {kind: promptInjection, action: refuse}
      - {kind: malicious, action: refuse}
";

/// The most all input guards may add to the pipeline's median, in µs.
const TARGET_US: f64 = 50.0;

/// Answers `{}` at once: the pipeline's own cost only.
struct Instant0;

impl ToolExecutor for Instant0 {
    fn execute<'a>(
        &'a self,
        _: &'a PreparedTool,
        _: Vec<u8>,
        _: Vec<SecretDelivery>,
    ) -> ExecFuture<'a> {
        Box::pin(async {
            Ok(ExecOutcome {
                exit_code: Some(0),
                stdout: b"{}".to_vec(),
                ..ExecOutcome::default()
            })
        })
    }

    fn isolation(&self) -> String {
        "none (benchmark)".into()
    }
}

/// A runner serving `plain` and `guarded`, its audit records written to nowhere.
fn runner(dir: &std::path::Path) -> Arc<Runner> {
    let mut files = Vec::new();
    for (name, guards) in [("plain", ""), ("guarded", GUARDS)] {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, TOOLS.replace("NAME", name).replace("GUARDS", guards)).unwrap();
        files.push(file);
    }
    let registry = Registry::new(LimiterClock::real(), SecretsDir::default());
    let report = registry.load(&files);
    assert_eq!(report.served.len(), 2, "{report:?}");
    Arc::new(Runner::new(
        Arc::new(registry),
        Authenticator {
            allow_anonymous: true,
            ..Authenticator::default()
        },
        AuditLog::to_writer(
            Box::new(std::io::sink()),
            "sink",
            AuditKey::new(&[1; 32]).unwrap(),
        ),
        Arc::new(Instant0),
    ))
}

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
    let dir = tempfile::tempdir().unwrap();
    let runner = runner(dir.path());
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = CallContext {
        transport: "bench",
        ..CallContext::default()
    };
    let pipeline = |tool: &str, text: &str| {
        let body = axum::body::Bytes::from(text.to_string());
        median(budget, || {
            let called =
                tokio.block_on(runner.invoke(&ctx, tool, std::future::ready(Ok(body.clone()))));
            assert!(called.is_ok(), "{tool}: {called:?}");
        })
    };
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
        let plain = pipeline("plain", &text);
        let guarded = pipeline("guarded", &text);
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let added = us(guarded) - us(plain);
        println!(
            "{name:>8} input, {} bytes: pipeline without guards {:>6.1} µs, with all input guards {:>6.1} µs, added {:>5.1} µs (target ≤ {TARGET_US} µs: {}); \
             guards alone {:>5.1} µs ({}); baseline serde_json parse {:>5.1} µs",
            text.len(),
            us(plain),
            us(guarded),
            added,
            if added <= TARGET_US { "met" } else { "NOT met" },
            us(checked),
            per_kind.join(", "),
            us(parse),
        );
    }
}
