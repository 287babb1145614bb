//! The admission webhook's validators, as table tests over real AdmissionReview
//! JSON: no cluster, the same stores the server reads (filled from fixtures).

#[path = "common/webhook.rs"]
mod webhook;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use toolwarden::api::{AgentTool, PolicyMode, ToolPolicy};
use toolwarden::policy::{self, catalog};
use toolwarden::sandbox::pod::runner_security_context;
use toolwarden::webhook::BadReview;
use webhook::*;

const MODES: [PolicyMode; 3] = [PolicyMode::Enforce, PolicyMode::Warn, PolicyMode::Audit];

fn namespace_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "kubernetes.io/metadata.name".to_string(),
            NAMESPACE.to_string(),
        ),
        ("team".to_string(), "agents".to_string()),
    ])
}

fn with_mode(policies: &[ToolPolicy], mode: PolicyMode) -> Vec<ToolPolicy> {
    policies
        .iter()
        .cloned()
        .map(|mut p| {
            p.spec.mode = mode;
            p
        })
        .collect()
}

/// The tool before an update: the same tool with another description.
fn previous(tool: &AgentTool) -> AgentTool {
    let mut old = tool.clone();
    old.spec.description = "the version before this update".into();
    old
}

fn message(response: &Value) -> String {
    response["status"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn warnings(response: &Value) -> String {
    response["warnings"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

fn audit(response: &Value) -> String {
    response["auditAnnotations"]["violations"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// mode × every violating example × create/update: enforce denies naming every
/// enforced violation, warn admits with a warning per violation, audit admits
/// with an audit annotation; baseline rules deny in every mode.
#[test]
fn every_violating_example_in_every_mode_and_operation() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/violations");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the violating examples: {files:?}");
    for file in files {
        let rule = file.file_stem().unwrap().to_str().unwrap().to_string();
        let baseline = catalog::by_id(&rule)
            .unwrap_or_else(|| panic!("{rule}"))
            .baseline;
        let loaded = load(file.to_str().unwrap());
        let tool = loaded.tools[0].object.clone();
        let policies: Vec<ToolPolicy> = loaded.policies.iter().map(|p| p.object.clone()).collect();
        for mode in MODES {
            let policies = with_mode(&policies, mode);
            let expected = policy::evaluate(&tool, &policies, &namespace_labels());
            let admission = admission(policies.clone(), vec![]);
            for old in [None, Some(previous(&tool))] {
                let case = format!(
                    "{rule} {mode:?} {}",
                    if old.is_some() { "UPDATE" } else { "CREATE" }
                );
                let response = answer(&admission, &tool_request(&tool, old.as_ref(), ALICE).body());
                let allowed = response["allowed"].as_bool().unwrap();
                assert_eq!(allowed, !expected.denied(), "{case}: {response}");
                for v in expected.with_mode(PolicyMode::Enforce) {
                    let line = format!("{} {}: {}", v.rule, v.path, v.message);
                    assert!(
                        message(&response).contains(&line),
                        "{case}: missing {line:?} in {response}"
                    );
                }
                for v in expected.with_mode(PolicyMode::Warn) {
                    let line = format!("{} {}: {}", v.rule, v.path, v.message);
                    assert!(
                        warnings(&response).contains(&line),
                        "{case}: missing warning {line:?}: {response}"
                    );
                }
                for v in expected.with_mode(PolicyMode::Audit) {
                    assert!(audit(&response).contains(v.rule), "{case}: {response}");
                }
                // The example's own rule lands where its mode says.
                let named_in = match (baseline, mode) {
                    (true, _) | (false, PolicyMode::Enforce) => message(&response),
                    (false, PolicyMode::Warn) => warnings(&response),
                    (false, PolicyMode::Audit) => audit(&response),
                };
                assert!(
                    named_in.contains(&rule),
                    "{case}: {rule} not reported: {response}"
                );
                if baseline || mode == PolicyMode::Enforce {
                    assert!(!allowed, "{case}: {response}");
                    assert_eq!(response["status"]["code"], 403, "{case}");
                    assert_eq!(response["status"]["reason"], "PolicyViolation", "{case}");
                } else {
                    assert!(allowed, "{case}: {response}");
                }
            }
        }
    }
}

#[test]
fn compliant_tools_are_admitted_quietly_in_every_mode_and_operation() {
    let examples = load("examples");
    let policies: Vec<ToolPolicy> = examples.policies.iter().map(|p| p.object.clone()).collect();
    assert!(!policies.is_empty() && examples.tools.len() >= 5);
    for mode in MODES {
        let admission = admission(with_mode(&policies, mode), vec![]);
        for tool in &examples.tools {
            for old in [None, Some(previous(&tool.object))] {
                let response = answer(
                    &admission,
                    &tool_request(&tool.object, old.as_ref(), ALICE).body(),
                );
                assert_eq!(response["allowed"], true, "{response}");
                assert!(response.get("warnings").is_none(), "{response}");
                assert!(response.get("auditAnnotations").is_none(), "{response}");
            }
        }
    }
}

/// A tool that breaks several rules of one enforcing policy is denied with all
/// of them named, in `check`'s words.
#[test]
fn a_denial_names_every_violation() {
    let policies: Vec<ToolPolicy> = load("examples/baseline-policy.yaml")
        .policies
        .into_iter()
        .map(|p| p.object)
        .collect();
    let mut tool = example_tool("user-profile-update");
    tool.spec.rate_limit = None;
    tool.spec.sandbox.timeout_ms = 60_000;
    tool.spec.sandbox.pids = 1000;
    tool.spec.audit.input = toolwarden::api::AuditLevel::None;
    let expected = policy::evaluate(&tool, &policies, &namespace_labels());
    let rules: Vec<&str> = expected.violations.iter().map(|v| v.rule).collect();
    for rule in [
        "TW-RATE-001",
        "TW-SANDBOX-001",
        "TW-SANDBOX-003",
        "TW-AUDIT-001",
    ] {
        assert!(rules.contains(&rule), "{rules:?}");
    }
    let response = answer(
        &admission(policies, vec![]),
        &tool_request(&tool, None, ALICE).body(),
    );
    assert_eq!(response["allowed"], false);
    let text = message(&response);
    assert!(
        text.contains(&format!(
            "violates {} enforced rule(s)",
            expected.violations.len()
        )),
        "{text}"
    );
    for v in &expected.violations {
        assert!(
            text.contains(&format!(
                "{} {}: {} ({})",
                v.rule,
                v.path,
                v.message,
                v.source()
            )),
            "{text}"
        );
    }
}

fn timeout_policy(selector: Value) -> ToolPolicy {
    serde_json::from_value(json!({
        "apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": {"name": "short-calls"},
        "spec": {"mode": "enforce", "namespaceSelector": selector,
                 "rules": {"sandboxing": {"maxTimeoutMs": 100}}},
    }))
    .unwrap()
}

/// Policies select by the namespace's real labels from the store, not by what the
/// tool claims; a namespace the store does not know is refused, not guessed.
#[test]
fn policies_select_by_the_namespaces_real_labels() {
    let tool = example_tool("user-profile-update");
    let body = tool_request(&tool, None, ALICE).body();
    let selected = admission(
        vec![timeout_policy(json!({"matchLabels": {"team": "agents"}}))],
        vec![],
    );
    let response = answer(&selected, &body);
    assert_eq!(response["allowed"], false, "{response}");
    assert!(message(&response).contains("TW-SANDBOX-001"), "{response}");
    let elsewhere = admission(
        vec![timeout_policy(json!({"matchLabels": {"team": "other"}}))],
        vec![],
    );
    assert_eq!(answer(&elsewhere, &body)["allowed"], true);
    // A tool that labels itself like another team changes nothing: namespace labels come from the store.
    let mut disguised = tool.clone();
    disguised.metadata.labels = Some(BTreeMap::from([("team".into(), "other".into())]));
    assert_eq!(
        answer(&selected, &tool_request(&disguised, None, ALICE).body())["allowed"],
        false
    );

    let mut review = tool_request(&tool, None, ALICE).review();
    review["request"]["namespace"] = json!("not-yet-seen");
    let response = answer(&selected, &serde_json::to_vec(&review).unwrap());
    assert_eq!(response["allowed"], false);
    assert_eq!(
        response["status"]["reason"], "NamespaceUnknown",
        "{response}"
    );
}

/// A tool a new policy made non-compliant still takes metadata-only updates
/// (finalizers on deletion), with the violations as warnings; any spec or label
/// change is judged in full.
#[test]
fn metadata_only_updates_of_a_non_compliant_tool_pass_with_warnings() {
    let tool = example_tool("user-profile-update");
    let admission = admission(vec![timeout_policy(json!({}))], vec![]);
    let mut finalized = tool.clone();
    finalized.metadata.finalizers = Some(vec!["toolwarden.dev/cleanup".into()]);
    let response = answer(
        &admission,
        &tool_request(&finalized, Some(&tool), ALICE).body(),
    );
    assert_eq!(response["allowed"], true, "{response}");
    assert!(warnings(&response).contains("TW-SANDBOX-001"), "{response}");
    let mut relabelled = finalized.clone();
    relabelled.metadata.labels = Some(BTreeMap::from([("x".into(), "y".into())]));
    assert_eq!(
        answer(
            &admission,
            &tool_request(&relabelled, Some(&tool), ALICE).body()
        )["allowed"],
        false
    );
    assert_eq!(
        answer(
            &admission,
            &tool_request(&tool, Some(&previous(&tool)), ALICE).body()
        )["allowed"],
        false
    );
}

fn policy_request(spec: Value) -> Vec<u8> {
    let object = json!({
        "apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": {"name": "p", "uid": "1", "resourceVersion": "1"},
        "spec": spec,
    });
    Request {
        group: "toolwarden.dev",
        version: "v1alpha1",
        kind: "ToolPolicy",
        resource: "toolpolicies",
        sub_resource: None,
        operation: "CREATE",
        namespace: None,
        name: "p".into(),
        object: Some(object),
        old_object: None,
        user: ALICE,
    }
    .body()
}

#[test]
fn malformed_policies_are_rejected_naming_each_field() {
    let admission = admission(vec![], vec![]);
    for policy in load("examples").policies {
        let spec = serde_json::to_value(&policy.object.spec).unwrap();
        assert_eq!(answer(&admission, &policy_request(spec))["allowed"], true);
    }
    let response = answer(
        &admission,
        &policy_request(json!({
            "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Bogus", "values": ["a"]}]},
            "toolSelector": {"matchExpressions": [{"key": "tier", "operator": "In"}]},
            "rules": {
                "leastPrivilege": {"allowedVerbs": ["get", "gett"], "allowedWritablePaths": ["/tmp", "work/../etc"],
                                   "allowedRegistries": ["https://ghcr.io/acme/"]},
                "sandboxing": {"maxMemory": "lots", "allowedEgressHosts": ["*.Example.com", "api.example.com"],
                               "allowedRuntimeClasses": [], "requireRuntimeClass": true},
            },
        })),
    );
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["reason"], "InvalidPolicy");
    let text = message(&response);
    for path in [
        "spec.namespaceSelector:",
        "spec.toolSelector:",
        "spec.rules.leastPrivilege.allowedVerbs[1]: \"gett\"",
        "spec.rules.leastPrivilege.allowedWritablePaths[1]:",
        "spec.rules.leastPrivilege.allowedRegistries[0]:",
        "spec.rules.sandboxing.maxMemory:",
        "spec.rules.sandboxing.allowedEgressHosts[0]:",
        "spec.rules.sandboxing.requireRuntimeClass:",
    ] {
        assert!(text.contains(path), "missing {path:?} in {text}");
    }
    assert!(text.contains("has 8 malformed rule(s)"), "{text}");
    // A wrong type is named by its path too.
    let response = answer(
        &admission,
        &policy_request(json!({"rules": {"sandboxing": {"maxPids": "many"}}})),
    );
    assert_eq!(response["allowed"], false);
    assert!(
        message(&response).contains("spec.rules.sandboxing.maxPids"),
        "{response}"
    );
}

// ---- runner workloads ----

fn runner_labels() -> Value {
    json!({"app.kubernetes.io/managed-by": "toolwarden", "app.kubernetes.io/name": "toolwarden-runner",
           "toolwarden.dev/tool": "user-profile-update"})
}

fn runner_pod_spec() -> Value {
    json!({
        "hostUsers": false,
        "automountServiceAccountToken": false,
        "containers": [{
            "name": "runner", "image": "ghcr.io/toolwarden/toolwarden:0.1.0",
            "args": ["runner"], "securityContext": runner_security_context(),
            "ports": [{"name": "http", "containerPort": 8080}],
        }],
        "volumes": [{"name": "tools", "configMap": {"name": "user-profile-update"}},
                    {"name": "state", "emptyDir": {}}],
    })
}

fn runner_deployment(pod: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "user-profile-update", "namespace": NAMESPACE, "labels": runner_labels()},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"toolwarden.dev/tool": "user-profile-update"}},
                 "template": {"metadata": {"labels": runner_labels()}, "spec": pod}},
    })
}

fn runner_pod(pod: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "user-profile-update-abc", "namespace": NAMESPACE, "labels": runner_labels()},
           "spec": pod})
}

fn workload_request<'a>(
    kind: (&'a str, &'a str, &'a str),
    op: &'a str,
    object: Option<Value>,
    old: Option<Value>,
    user: User<'a>,
) -> Vec<u8> {
    let (group, kind, resource) = kind;
    Request {
        group,
        version: "v1",
        kind,
        resource,
        sub_resource: None,
        operation: op,
        namespace: Some(NAMESPACE),
        name: "user-profile-update".into(),
        object,
        old_object: old,
        user,
    }
    .body()
}

const DEPLOYMENT: (&str, &str, &str) = ("apps", "Deployment", "deployments");
const POD: (&str, &str, &str) = ("", "Pod", "pods");
const CONTROLLER: User = User {
    name: CONTROLLER_USER,
    groups: &["system:serviceaccounts"],
};
const REPLICASET_CONTROLLER: User = User {
    name: "system:serviceaccount:kube-system:replicaset-controller",
    groups: &["system:serviceaccounts"],
};
const GARBAGE_COLLECTOR: User = User {
    name: "system:serviceaccount:kube-system:generic-garbage-collector",
    groups: &["system:serviceaccounts"],
};
/// A cluster admin: RBAC lets them do anything, the webhook still does not.
const ADMIN: User = User {
    name: "kubernetes-admin",
    groups: &["system:masters", "kubeadm:cluster-admins"],
};

#[test]
fn only_the_controller_writes_runner_workloads() {
    let admission = admission(vec![], vec![]);
    let deployment = runner_deployment(runner_pod_spec());
    let allowed = |body: Vec<u8>| answer(&admission, &body)["allowed"].as_bool().unwrap();
    assert!(allowed(workload_request(
        DEPLOYMENT,
        "CREATE",
        Some(deployment.clone()),
        None,
        CONTROLLER
    )));
    assert!(allowed(workload_request(
        DEPLOYMENT,
        "UPDATE",
        Some(deployment.clone()),
        Some(deployment.clone()),
        CONTROLLER
    )));
    let mut scaled = deployment.clone();
    scaled["spec"]["replicas"] = json!(5);
    for user in [
        ALICE,
        ADMIN,
        REPLICASET_CONTROLLER,
        User {
            name: "system:serviceaccount:toolwarden:toolwarden-webhook",
            groups: &[],
        },
    ] {
        for (op, object, old) in [
            ("CREATE", Some(deployment.clone()), None),
            ("UPDATE", Some(scaled.clone()), Some(deployment.clone())),
            ("DELETE", None, Some(deployment.clone())),
        ] {
            let response = answer(
                &admission,
                &workload_request(DEPLOYMENT, op, object, old, user),
            );
            assert_eq!(
                response["allowed"], false,
                "{op} by {}: {response}",
                user.name
            );
            assert_eq!(response["status"]["reason"], "NotTheController");
            assert!(message(&response).contains(CONTROLLER_USER), "{response}");
        }
    }
    // Dropping the label to escape is itself a change of a runner workload.
    let mut unlabelled = deployment.clone();
    unlabelled["metadata"]["labels"] = json!({});
    assert!(!allowed(workload_request(
        DEPLOYMENT,
        "UPDATE",
        Some(unlabelled.clone()),
        Some(deployment.clone()),
        ALICE
    )));
    // Objects that never were runner workloads are not this check's business.
    assert!(allowed(workload_request(
        DEPLOYMENT,
        "UPDATE",
        Some(unlabelled.clone()),
        Some(unlabelled),
        ALICE
    )));
    // Kubernetes' own controllers do what they own; cleanup deletes anything.
    let pod = runner_pod(runner_pod_spec());
    assert!(allowed(workload_request(
        POD,
        "CREATE",
        Some(pod.clone()),
        None,
        REPLICASET_CONTROLLER
    )));
    assert!(allowed(workload_request(
        DEPLOYMENT,
        "DELETE",
        None,
        Some(deployment.clone()),
        GARBAGE_COLLECTOR
    )));
    let mut orphaned = deployment.clone();
    orphaned["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
    assert!(allowed(workload_request(
        DEPLOYMENT,
        "UPDATE",
        Some(orphaned),
        Some(deployment.clone()),
        GARBAGE_COLLECTOR
    )));
    assert!(!allowed(workload_request(
        DEPLOYMENT,
        "UPDATE",
        Some(scaled.clone()),
        Some(deployment.clone()),
        GARBAGE_COLLECTOR
    )));
    assert!(!allowed(workload_request(
        DEPLOYMENT,
        "CREATE",
        Some(deployment.clone()),
        None,
        GARBAGE_COLLECTOR
    )));
    // Deleting a pod weakens nothing (its ReplicaSet recreates it); a NetworkPolicy it does.
    assert!(allowed(workload_request(
        POD,
        "DELETE",
        None,
        Some(pod.clone()),
        ALICE
    )));
    let netpol = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "user-profile-update", "namespace": NAMESPACE, "labels": runner_labels()},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}});
    assert!(!allowed(workload_request(
        ("networking.k8s.io", "NetworkPolicy", "networkpolicies"),
        "DELETE",
        None,
        Some(netpol),
        ADMIN
    )));
}

/// Every way to give a runner pod more than the documented securityContext is
/// denied, from the controller too, in Deployments and in Pods.
#[test]
fn runner_pods_beyond_the_documented_security_context_are_denied_from_anyone() {
    let admission = admission(vec![], vec![]);
    type Tamper = fn(&mut Value);
    let cases: Vec<(&str, Tamper)> = vec![
        ("containers[0].securityContext.privileged", |p| {
            p["containers"][0]["securityContext"]["privileged"] = json!(true)
        }),
        ("containers[0].securityContext.capabilities.add", |p| {
            p["containers"][0]["securityContext"]["capabilities"]["add"] =
                json!(["SYS_ADMIN", "NET_ADMIN"])
        }),
        ("containers[0].securityContext.capabilities.add", |p| {
            p["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["CAP_SYS_MODULE"])
        }),
        ("containers[0].securityContext.capabilities.add", |p| {
            p["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["net_raw"])
        }),
        ("containers[0].securityContext.capabilities.add", |p| {
            p["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["ALL"])
        }),
        (
            "containers[0].securityContext.allowPrivilegeEscalation",
            |p| p["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true),
        ),
        ("containers[0].securityContext.seccompProfile.type", |p| {
            p["containers"][0]["securityContext"]["seccompProfile"] = json!({"type": "Unconfined"})
        }),
        ("containers[0].securityContext.procMount", |p| {
            p["containers"][0]["securityContext"]["procMount"] = json!("Unmasked")
        }),
        ("containers[0].securityContext.appArmorProfile.type", |p| {
            p["containers"][0]["securityContext"]["appArmorProfile"] = json!({"type": "Unconfined"})
        }),
        ("securityContext.seccompProfile.type", |p| {
            p["securityContext"] = json!({"seccompProfile": {"type": "Unconfined"}})
        }),
        ("volumes[2].hostPath", |p| {
            p["volumes"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "host", "hostPath": {"path": "/"}}))
        }),
        ("hostNetwork", |p| p["hostNetwork"] = json!(true)),
        ("hostPID", |p| p["hostPID"] = json!(true)),
        ("hostIPC", |p| p["hostIPC"] = json!(true)),
        ("hostUsers", |p| p["hostUsers"] = json!(true)),
        ("hostUsers", |p| {
            p.as_object_mut().unwrap().remove("hostUsers");
        }),
        ("containers[0].ports[0].hostPort", |p| {
            p["containers"][0]["ports"][0]["hostPort"] = json!(8080)
        }),
        (
            "initContainers[0].securityContext.privileged",
            |p| p["initContainers"] = json!([{"name": "init", "image": "busybox", "securityContext": {"privileged": true}}]),
        ),
        ("containers[1].securityContext.capabilities.add", |p| {
            p["containers"].as_array_mut().unwrap().push(json!({"name": "sidecar", "image": "busybox", "securityContext": {"capabilities": {"add": ["SYS_MODULE"]}}}))
        }),
        ("ephemeralContainers[0].securityContext.privileged", |p| {
            p["ephemeralContainers"] = json!([{"name": "debug", "image": "busybox", "securityContext": {"privileged": true}}])
        }),
    ];
    for (path, tamper) in cases {
        let mut pod = runner_pod_spec();
        tamper(&mut pod);
        for (kind, object, user, prefix) in [
            (
                DEPLOYMENT,
                runner_deployment(pod.clone()),
                CONTROLLER,
                "spec.template.spec",
            ),
            (POD, runner_pod(pod.clone()), REPLICASET_CONTROLLER, "spec"),
            (POD, runner_pod(pod.clone()), CONTROLLER, "spec"),
        ] {
            let response = answer(
                &admission,
                &workload_request(kind, "CREATE", Some(object), None, user),
            );
            assert_eq!(
                response["allowed"], false,
                "{path} in {}: {response}",
                kind.1
            );
            assert_eq!(response["status"]["reason"], "RunnerSecurityContext");
            assert!(
                message(&response).contains(&format!("{prefix}.{path}")),
                "{path}: {response}"
            );
        }
    }
    // The documented set itself passes, and so does dropping a capability.
    let mut fewer = runner_pod_spec();
    fewer["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["SYS_ADMIN"]);
    for pod in [runner_pod_spec(), fewer] {
        let body = workload_request(
            DEPLOYMENT,
            "CREATE",
            Some(runner_deployment(pod)),
            None,
            CONTROLLER,
        );
        assert_eq!(answer(&admission, &body)["allowed"], true);
    }
}

fn role(rules: Value) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
           "metadata": {"name": "user-profile-update", "namespace": NAMESPACE, "labels": runner_labels()},
           "rules": rules})
}

/// The controller may create Roles with rules it does not hold (`escalate`), so
/// a runner Role may grant no more than its tool declares.
#[test]
fn a_runner_role_grants_only_what_its_tool_declares() {
    let mut tool = example_tool("user-profile-update");
    tool.metadata.namespace = Some(NAMESPACE.into());
    tool.spec.permissions.kubernetes = serde_json::from_value(json!([
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]},
    ]))
    .unwrap();
    let admission = admission(vec![], vec![tool]);
    const ROLE: (&str, &str, &str) = ("rbac.authorization.k8s.io", "Role", "roles");
    let check = |rules: Value| {
        answer(
            &admission,
            &workload_request(ROLE, "CREATE", Some(role(rules)), None, CONTROLLER),
        )
    };
    assert_eq!(
        check(json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]))
            ["allowed"],
        true
    );
    assert_eq!(
        check(json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]))["allowed"],
        true
    );
    for beyond in [
        json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "delete"]}]),
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]),
        json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]),
        json!([{"apiGroups": ["apps"], "resources": ["configmaps"], "verbs": ["get"]}]),
        json!([{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]),
    ] {
        let response = check(beyond.clone());
        assert_eq!(response["allowed"], false, "{beyond}: {response}");
        assert!(
            message(&response).contains("rules[0]: grants more than AgentTool"),
            "{response}"
        );
    }
}

// ---- ToolApprovals ----

fn approval_tool() -> AgentTool {
    let mut tool = example_tool("user-profile-update");
    tool.metadata.namespace = Some(NAMESPACE.into());
    tool.spec.approval = Some(
        serde_json::from_value(json!({"required": true,
            "approvers": {"users": ["bob@example.com", "alice@example.com"], "groups": ["platform-admins"]}}))
        .unwrap(),
    );
    tool
}

fn approval(status: Value) -> Value {
    json!({"apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolApproval",
           "metadata": {"name": "call-1", "namespace": NAMESPACE, "uid": "2", "resourceVersion": "7"},
           "spec": {"toolRef": "user-profile-update", "invocationId": "inv-1", "caller": "alice@example.com",
                    "inputDigest": "sha256:00", "summary": "update alice's bio", "expiresAt": "2030-01-01T00:00:00Z"},
           "status": status})
}

fn decide(old: Value, new: Value, user: User) -> Value {
    let admission = admission(vec![], vec![approval_tool()]);
    let body = Request {
        group: "toolwarden.dev",
        version: "v1alpha1",
        kind: "ToolApproval",
        resource: "toolapprovals",
        sub_resource: Some("status"),
        operation: "UPDATE",
        namespace: Some(NAMESPACE),
        name: "call-1".into(),
        object: Some(approval(new)),
        old_object: Some(approval(old)),
        user,
    }
    .body();
    answer(&admission, &body)
}

fn decided(decision: &str, by: &str) -> Value {
    json!({"decision": decision, "decidedBy": by, "decidedAt": "2026-12-01T15:00:00Z"})
}

const BOB: User = User {
    name: "bob@example.com",
    groups: &["system:authenticated"],
};
const CAROL: User = User {
    name: "carol@example.com",
    groups: &["system:authenticated", "platform-admins"],
};
const MALLORY: User = User {
    name: "mallory@example.com",
    groups: &["system:authenticated", "developers"],
};

#[test]
fn approvals_are_decided_by_an_approver_who_did_not_ask_and_only_once() {
    let pending = json!({});
    let ok = |r: Value| assert_eq!(r["allowed"], true, "{r}");
    let denied = |r: Value, reason: &str| {
        assert_eq!(r["allowed"], false, "{r}");
        assert_eq!(r["status"]["reason"], reason, "{r}");
    };
    ok(decide(pending.clone(), decided("Approved", BOB.name), BOB));
    ok(decide(
        pending.clone(),
        decided("Denied", CAROL.name),
        CAROL,
    ));
    // Self-approval: alice is an approver of the tool, but she made the call.
    denied(
        decide(pending.clone(), decided("Approved", ALICE.name), ALICE),
        "SelfApproval",
    );
    // ... and cannot launder it by naming someone else in the body.
    denied(
        decide(pending.clone(), decided("Approved", BOB.name), ALICE),
        "DeciderMismatch",
    );
    denied(
        decide(pending.clone(), decided("Approved", MALLORY.name), MALLORY),
        "NotAnApprover",
    );
    let impostor = User {
        name: "platform-admins",
        groups: &["developers"],
    };
    denied(
        decide(
            pending.clone(),
            decided("Approved", impostor.name),
            impostor,
        ),
        "NotAnApprover",
    );
    // Re-decisions: another verdict, another decider, even by the same approver.
    let approved = decided("Approved", BOB.name);
    denied(
        decide(approved.clone(), decided("Denied", BOB.name), BOB),
        "AlreadyDecided",
    );
    denied(
        decide(approved.clone(), decided("Approved", CAROL.name), CAROL),
        "AlreadyDecided",
    );
    denied(decide(approved.clone(), json!({}), BOB), "AlreadyDecided");
    ok(decide(approved.clone(), approved.clone(), MALLORY));
    // Status updates that decide nothing are not this check's business.
    ok(decide(
        pending.clone(),
        json!({"reason": "waiting"}),
        MALLORY,
    ));
}

// ---- hostile requests ----

#[test]
fn hostile_bodies_get_a_clear_answer_never_a_panic() {
    let admission = admission(vec![], vec![]);
    let bad = |body: &[u8]| admission.review(body).expect_err("a bad review").reason();
    assert_eq!(bad(b"{not json"), "NotAReview");
    assert_eq!(bad(b""), "NotAReview");
    assert_eq!(bad(b"[1,2,3]"), "NotAReview");
    assert_eq!(bad(&vec![b'['; 100_000]), "NotAReview");
    let deep = format!("{}{}", "{\"a\":".repeat(50_000), "}".repeat(50_000));
    assert_eq!(bad(deep.as_bytes()), "NotAReview");
    let tool = example_tool("user-profile-update");
    let mut review = tool_request(&tool, None, ALICE).review();
    review["apiVersion"] = json!("admission.k8s.io/v1beta1");
    assert_eq!(bad(&serde_json::to_vec(&review).unwrap()), "WrongVersion");
    assert_eq!(
        bad(br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#),
        "NoRequest"
    );
    let reasons: Vec<&str> = [BadReview::NoRequest]
        .iter()
        .map(BadReview::reason)
        .collect();
    assert_eq!(reasons, ["NoRequest"]);

    let reason = |review: Value| {
        let response = answer(&admission, &serde_json::to_vec(&review).unwrap());
        assert_eq!(response["allowed"], false, "{response}");
        (
            response["status"]["reason"].as_str().unwrap().to_string(),
            message(&response),
        )
    };
    // A kind the webhook does not review.
    let mut other = tool_request(&tool, None, ALICE).review();
    other["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Secret"});
    assert_eq!(reason(other).0, "UnsupportedKind");
    // A ToolApproval outside its status subresource.
    let mut approval = tool_request(&tool, None, ALICE).review();
    approval["request"]["kind"]["kind"] = json!("ToolApproval");
    assert_eq!(reason(approval).0, "UnsupportedKind");
    // No object.
    let mut missing = tool_request(&tool, None, ALICE).review();
    missing["request"]["object"] = Value::Null;
    assert_eq!(reason(missing).0, "MissingObject");
    // An object that is not an AgentTool: the path of the first wrong field.
    let mut wrong = tool_request(&tool, None, ALICE).review();
    wrong["request"]["object"]["spec"]["sandbox"]["timeoutMs"] = json!("slow");
    let (why, text) = reason(wrong);
    assert_eq!(why, "InvalidObject");
    assert!(text.contains("spec.sandbox.timeoutMs"), "{text}");
    let mut scalar = tool_request(&tool, None, ALICE).review();
    scalar["request"]["object"]["spec"] = json!("x");
    assert_eq!(reason(scalar).0, "InvalidObject");
    // A deeply nested input schema within the JSON depth limit is judged, not crashed on
    // (beyond it, 128 JSON levels, the body is refused whole: such a schema breaks TW-INPUT-006 anyway).
    let mut nested = json!({"type": "string", "maxLength": 1});
    for _ in 0..40 {
        nested =
            json!({"type": "object", "additionalProperties": false, "properties": {"a": nested}});
    }
    let mut deep_tool = tool.clone();
    deep_tool.spec.input_schema = nested;
    let response = answer(&admission, &tool_request(&deep_tool, None, ALICE).body());
    assert_eq!(response["allowed"], false);
    assert!(message(&response).contains("TW-INPUT-006"), "{response}");
    // A pod spec of the wrong shape in a runner workload.
    let mut pod = runner_pod(runner_pod_spec());
    pod["spec"]["containers"] = json!("everything");
    let response = answer(
        &admission,
        &workload_request(POD, "CREATE", Some(pod), None, CONTROLLER),
    );
    assert_eq!(response["allowed"], false);
    assert!(message(&response).contains("spec.containers"), "{response}");
}
