//! Checklist engine throughput: a realistic tool (the guide's
//! user-profile-update) against 10 policies, on one core.
//!
//! Run: `cargo bench --bench policy`. Target: ≥ 50,000 evaluations/s. Both
//! paths are printed: `Engine::evaluate` (what the webhook and controller call;
//! the per-tool analysis is cached by content) and a tool's first sight, where
//! compiling its JSON Schema and CEL expressions dominates.
//! Baseline in the same run: decoding the same AgentTool from JSON, the work
//! the admission webhook does anyway before it can evaluate anything.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use toolwarden::api::manifest::Manifests;
use toolwarden::api::{AgentTool, ToolPolicy};
use toolwarden::policy::{Engine, ToolFacts, evaluate, evaluate_with_facts};

/// Runs `f` repeatedly for about `budget` and returns calls per second.
fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..100 {
        f();
    }
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget {
        for _ in 0..100 {
            f();
        }
        calls += 100;
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifests = Manifests::load(&[root.join("examples")], false).expect("examples load");
    let tool: AgentTool = manifests
        .tools
        .iter()
        .find(|t| t.object.metadata.name.as_deref() == Some("user-profile-update"))
        .unwrap()
        .object
        .clone();
    let baseline_policy = manifests.policies[0].object.clone();
    let policies: Vec<ToolPolicy> = (0..10)
        .map(|i| {
            let mut p = baseline_policy.clone();
            p.metadata.name = Some(format!("policy-{i}"));
            p
        })
        .collect();
    let labels = BTreeMap::from([(
        "kubernetes.io/metadata.name".to_string(),
        "agents".to_string(),
    )]);
    assert!(
        evaluate(&tool, &policies, &labels).violations.is_empty(),
        "the benchmark tool must be compliant"
    );
    let tool_json = serde_json::to_string(&tool).unwrap();
    let budget = Duration::from_secs(2);

    let decode = rate(budget, || {
        black_box(serde_json::from_str::<AgentTool>(black_box(&tool_json)).unwrap());
    });
    let full = rate(budget, || {
        black_box(evaluate(black_box(&tool), black_box(&policies), &labels));
    });
    let engine = Engine::default();
    let engine_rate = rate(budget, || {
        black_box(engine.evaluate(black_box(&tool), black_box(&policies), &labels));
    });
    let facts = ToolFacts::analyze(&tool.spec);
    let rules_only = rate(budget, || {
        black_box(evaluate_with_facts(
            black_box(&tool),
            &facts,
            black_box(&policies),
            &labels,
        ));
    });
    let analysis = rate(budget, || {
        black_box(ToolFacts::analyze(black_box(&tool.spec)));
    });

    println!("checklist engine, user-profile-update against 10 policies, 1 thread");
    println!("{:<44} {:>14} {:>12}", "measure", "per second", "µs each");
    for (name, per_second) in [
        ("baseline: decode the AgentTool from JSON", decode),
        ("Engine::evaluate, tool generation seen before", engine_rate),
        ("evaluate, first sight (analysis + 10 policies)", full),
        ("  per-tool analysis (schema, CEL compile)", analysis),
        ("  10 policies, analysis reused", rules_only),
    ] {
        println!("{name:<44} {per_second:>14.0} {:>12.2}", 1e6 / per_second);
    }
    println!(
        "Engine::evaluate costs {:.2}x decoding the object; first sight {:.2}x",
        decode / engine_rate,
        decode / full
    );
    let verdict = |r: f64| if r >= 50_000.0 { "met" } else { "NOT met" };
    println!(
        "target ≥ 50000/s: Engine (cached analysis) {}, first sight {}",
        verdict(engine_rate),
        verdict(full)
    );
}
