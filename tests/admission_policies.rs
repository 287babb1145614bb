//! The ValidatingAdmissionPolicies `manifests --admission-policies` emits, their
//! CEL evaluated here (the `cel` crate) the way the API server would, against
//! the same examples as the engine: for every rule they cover they must deny
//! exactly when the engine does, for the same ToolPolicy, in the same mode.

#[path = "common/webhook.rs"]
mod webhook;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use toolwarden::api::{AgentTool, PolicyMode, ToolPolicy};
use toolwarden::policy;
use toolwarden::webhook::admission_policies::{self, CelRule};
use webhook::*;

fn eval(expression: &str, bindings: &[(&str, &Value)]) -> bool {
    let program = cel::Program::compile(expression).unwrap_or_else(|e| panic!("{expression}: {e}"));
    let mut context = cel::Context::default();
    for (name, value) in bindings {
        context.add_variable(*name, *value).unwrap();
    }
    match program.execute(&context) {
        Ok(cel::Value::Bool(b)) => b,
        other => panic!("{expression}: {other:?} with {bindings:?}"),
    }
}

fn namespace_object() -> Value {
    serde_json::to_value(namespace(NAMESPACE, json!({"team": "agents"}))).unwrap()
}

/// (rule ID, policy) pairs the VAP for `mode` denies.
fn vap_denials(
    tool: &AgentTool,
    policies: &[ToolPolicy],
    mode: PolicyMode,
) -> BTreeSet<(String, String)> {
    let object = as_stored(tool, "AgentTool", "toolwarden.dev/v1alpha1");
    let namespace_object = namespace_object();
    let mut denied = BTreeSet::new();
    for policy in policies {
        let params = serde_json::to_value(policy).unwrap();
        let mut variables = json!({});
        for (name, expression) in admission_policies::variables(mode) {
            let value = {
                let program = cel::Program::compile(&expression).unwrap();
                let mut context = cel::Context::default();
                for (n, v) in [
                    ("object", &object),
                    ("params", &params),
                    ("namespaceObject", &namespace_object),
                    ("variables", &variables),
                ] {
                    context.add_variable(n, v).unwrap();
                }
                let result = program
                    .execute(&context)
                    .unwrap_or_else(|e| panic!("{expression}: {e}"));
                result.json().unwrap()
            };
            variables[name] = value;
        }
        for rule in admission_policies::policy_rules() {
            let expression = admission_policies::validation_expression(&rule);
            let bindings = [
                ("object", &object),
                ("params", &params),
                ("namespaceObject", &namespace_object),
                ("variables", &variables),
            ];
            if !eval(&expression, &bindings) {
                denied.insert((
                    rule.rule.id.to_string(),
                    policy.metadata.name.clone().unwrap(),
                ));
            }
        }
    }
    denied
}

fn covered() -> BTreeSet<&'static str> {
    admission_policies::policy_rules()
        .iter()
        .map(|r: &CelRule| r.rule.id)
        .collect()
}

fn engine_denials(
    tool: &AgentTool,
    policies: &[ToolPolicy],
    mode: PolicyMode,
) -> BTreeSet<(String, String)> {
    let labels = [
        ("kubernetes.io/metadata.name", NAMESPACE),
        ("team", "agents"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    policy::evaluate(tool, policies, &labels)
        .violations
        .into_iter()
        .filter(|v| v.mode == mode && covered().contains(v.rule))
        .filter_map(|v| Some((v.rule.to_string(), v.policy?)))
        .collect()
}

#[test]
fn the_cel_rules_agree_with_the_engine_on_every_example_in_every_mode() {
    let mut cases: Vec<(AgentTool, Vec<ToolPolicy>)> = Vec::new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/violations");
    for entry in std::fs::read_dir(dir).unwrap() {
        let loaded = load(entry.unwrap().path().to_str().unwrap());
        let policies: Vec<ToolPolicy> = loaded.policies.iter().map(|p| p.object.clone()).collect();
        cases.extend(
            loaded
                .tools
                .into_iter()
                .map(|t| (t.object, policies.clone())),
        );
    }
    let examples = load("examples");
    let baseline: Vec<ToolPolicy> = examples.policies.iter().map(|p| p.object.clone()).collect();
    // The compliant examples, and each of them against every violation file's policy.
    for tool in &examples.tools {
        cases.push((tool.object.clone(), baseline.clone()));
    }
    let mut seen = BTreeSet::new();
    for (tool, policies) in &cases {
        for mode in [PolicyMode::Enforce, PolicyMode::Warn, PolicyMode::Audit] {
            let policies: Vec<ToolPolicy> = policies
                .iter()
                .cloned()
                .map(|mut p| {
                    p.spec.mode = mode;
                    p
                })
                .collect();
            let expected = engine_denials(tool, &policies, mode);
            seen.extend(expected.iter().map(|(rule, _)| rule.clone()));
            assert_eq!(
                vap_denials(tool, &policies, mode),
                expected,
                "{:?} in {mode:?}",
                tool.metadata.name
            );
            // A policy of another mode never trips this mode's VAP.
            let other = if mode == PolicyMode::Enforce {
                PolicyMode::Warn
            } else {
                PolicyMode::Enforce
            };
            assert!(vap_denials(tool, &policies, other).is_empty());
        }
    }
    // Every covered rule was seen violated by some example, so each expression can fail.
    assert_eq!(
        seen.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        covered()
    );
}

#[test]
fn policies_select_by_tool_and_namespace_labels_in_cel_as_in_the_engine() {
    let tool = {
        let mut t = example_tool("user-profile-update");
        t.metadata.labels = Some([("tier".to_string(), "gold".to_string())].into());
        t
    };
    for (namespace_selector, tool_selector) in [
        (json!({"matchLabels": {"team": "agents"}}), json!(null)),
        (json!({"matchLabels": {"team": "other"}}), json!(null)),
        (
            json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["x", "agents"]}]}),
            json!({"matchLabels": {"tier": "gold"}}),
        ),
        (
            json!({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["agents"]}]}),
            json!(null),
        ),
        (
            json!(null),
            json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
        ),
        (
            json!(null),
            json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
        ),
        (json!(null), json!({"matchLabels": {"tier": "silver"}})),
    ] {
        let mut spec = json!({"mode": "enforce", "rules": {"sandboxing": {"maxTimeoutMs": 100}}});
        if !namespace_selector.is_null() {
            spec["namespaceSelector"] = namespace_selector.clone();
        }
        if !tool_selector.is_null() {
            spec["toolSelector"] = tool_selector.clone();
        }
        let policy: ToolPolicy = serde_json::from_value(
            json!({"apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy",
            "metadata": {"name": "p"}, "spec": spec}),
        )
        .unwrap();
        let policies = vec![policy];
        assert_eq!(
            vap_denials(&tool, &policies, PolicyMode::Enforce),
            engine_denials(&tool, &policies, PolicyMode::Enforce),
            "{namespace_selector} {tool_selector}"
        );
    }
}

#[test]
fn the_baseline_cel_rules_agree_with_the_engine() {
    for name in ["user-profile-update", "execute-code"] {
        let mut tool = example_tool(name);
        for (input, redact) in [
            ("digest", vec![]),
            ("redacted", vec!["/a".to_string()]),
            ("digest", vec!["/a".to_string()]),
        ] {
            tool.spec.audit.input = serde_json::from_value(json!(input)).unwrap();
            tool.spec.audit.redact = redact;
            let object = as_stored(&tool, "AgentTool", "toolwarden.dev/v1alpha1");
            let engine: BTreeSet<&str> = policy::evaluate(&tool, &[], &Default::default())
                .violations
                .iter()
                .map(|v| v.rule)
                .collect();
            for rule in admission_policies::baseline_rules() {
                assert_eq!(
                    !eval(&rule.ok, &[("object", &object)]),
                    engine.contains(rule.rule.id),
                    "{name} {input}"
                );
            }
        }
    }
}

#[test]
fn the_emitted_objects_are_well_formed() {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let objects = admission_policies::objects("toolwarden");
    assert_eq!(objects.len(), 8);
    for object in &objects {
        let mut back = match object["kind"].as_str().unwrap() {
            "ValidatingAdmissionPolicy" => serde_json::to_value(
                serde_json::from_value::<ValidatingAdmissionPolicy>(object.clone()).unwrap(),
            )
            .unwrap(),
            _ => serde_json::to_value(
                serde_json::from_value::<ValidatingAdmissionPolicyBinding>(object.clone()).unwrap(),
            )
            .unwrap(),
        };
        back["apiVersion"] = object["apiVersion"].clone();
        back["kind"] = object["kind"].clone();
        assert_eq!(&back, object, "a field was dropped");
        // Every binding names a policy that exists; every messageExpression is CEL.
        if object["kind"] == "ValidatingAdmissionPolicyBinding" {
            let policy = &object["spec"]["policyName"];
            assert!(
                objects
                    .iter()
                    .any(|o| o["kind"] == "ValidatingAdmissionPolicy"
                        && &o["metadata"]["name"] == policy)
            );
        }
        for validation in object["spec"]["validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for key in ["expression", "messageExpression"] {
                if let Some(expression) = validation[key].as_str() {
                    cel::Program::compile(expression)
                        .unwrap_or_else(|e| panic!("{expression}: {e}"));
                }
            }
        }
    }
}
