//! Property test: whatever documents `check` is fed, it reports or rejects
//! them and never panics.

use std::path::Path;

use proptest::prelude::*;
use serde_yaml::Value;
use toolwarden::api::manifest::Manifests;

/// Loads and evaluates like `toolwarden check`: the violated rule IDs, then the input errors.
fn load_and_evaluate(text: &str) -> Vec<String> {
    let mut manifests = Manifests::default();
    let mut errors = Vec::new();
    manifests.add_text(Path::new("fuzz.yaml"), text, &mut errors);
    let policies: Vec<_> = manifests
        .policies
        .iter()
        .map(|p| p.object.clone())
        .collect();
    let rules = manifests
        .tools
        .iter()
        .flat_map(|t| {
            toolwarden::policy::evaluate(&t.object, &policies, &Default::default()).violations
        })
        .map(|v| v.rule.to_string());
    rules
        .chain(errors.iter().map(ToString::to_string))
        .collect()
}

fn example_documents() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            docs.push(serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap());
        }
    }
    docs
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|n| Value::Number(n.into())),
        ".{0,40}".prop_map(Value::String),
        prop::sample::select(vec![
            "object",
            "string",
            "array",
            "#/$defs/x",
            "*",
            "/updates/bio",
            "0",
            "1Gi",
            "-1"
        ])
        .prop_map(|s| Value::String(s.into())),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Sequence),
            prop::collection::vec((prop::sample::select(KEYS.to_vec()), inner), 0..6).prop_map(
                |entries| {
                    Value::Mapping(
                        entries
                            .into_iter()
                            .map(|(k, v)| (Value::String(k.into()), v))
                            .collect(),
                    )
                }
            ),
        ]
    })
}

/// Keys that mean something to the loader, the CRD schema and the schema walk.
const KEYS: &[&str] = &[
    "type",
    "properties",
    "items",
    "additionalProperties",
    "maxLength",
    "$ref",
    "$defs",
    "anyOf",
    "enum",
    "pattern",
    "spec",
    "metadata",
    "kind",
    "apiVersion",
    "rules",
    "sandbox",
    "memory",
    "secrets",
    "inject",
    "host",
    "x",
];

/// Replaces the node reached by following `steps` through `doc` with `replacement`.
fn mutate(doc: &mut Value, steps: &[usize], replacement: Value) {
    let Some((step, rest)) = steps.split_first() else {
        *doc = replacement;
        return;
    };
    match doc {
        Value::Mapping(map) if !map.is_empty() => {
            let key = map.keys().nth(step % map.len()).cloned().unwrap();
            mutate(map.get_mut(&key).unwrap(), rest, replacement);
        }
        Value::Sequence(items) if !items.is_empty() => {
            let len = items.len();
            mutate(&mut items[step % len], rest, replacement);
        }
        _ => *doc = replacement,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}") {
        load_and_evaluate(&text);
    }

    #[test]
    fn mutated_examples_never_panic(
        pick in any::<prop::sample::Index>(),
        steps in prop::collection::vec(any::<usize>(), 0..8),
        replacement in value(),
    ) {
        let docs = example_documents();
        let mut doc = docs[pick.index(docs.len())].clone();
        mutate(&mut doc, &steps, replacement);
        load_and_evaluate(&serde_yaml::to_string(&doc).unwrap());
    }
}

#[test]
fn deeply_nested_documents_are_rejected_not_overflowed() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let found = load_and_evaluate(&deep);
    assert!(
        found.len() == 1 && found[0].contains("recursion limit exceeded"),
        "{found:?}"
    );
    let nested_schema = format!(
        "apiVersion: toolwarden.dev/v1alpha1\nkind: AgentTool\nmetadata: {{name: t}}\nspec:\n  description: d\n  risk: low\n  runtime: {{image: busybox}}\n  inputSchema: {{\"type\": \"object\", \"x\": {}{}}}\n",
        "{\"not\": ".repeat(100),
        "{}".to_string() + &"}".repeat(100)
    );
    assert_eq!(
        load_and_evaluate(&nested_schema),
        ["TW-INPUT-006"],
        "a 100-deep schema is reported, not compiled"
    );
}
