//! Golden files of every child for each example tool (and a fixture using every
//! feature), and the security invariants every runner workload must keep, each tested
//! against the attack it stops.
//!
//! `BLESS=1 cargo test --lib controller::build` rewrites the golden files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PodSpec, Volume};
use serde::Serialize;

use super::*;
use crate::api::manifest::Manifests;
use crate::api::{AgentTool, ToolPolicy};
use crate::controller::dereference::Inputs;
use crate::controller::validate::{self, Admitted};
use crate::policy::Engine;
use crate::sandbox::RUNNER_POD_CAPABILITIES;
use crate::sandbox::pod::runner_security_context;

const RUNNER_IMAGE: &str = "ghcr.io/toolwarden/toolwarden:0.1.0";

fn settings() -> Settings {
    Settings {
        runner_image: RUNNER_IMAGE.into(),
        api_server: vec![ApiServerEndpoint {
            ip: [10, 0, 0, 1].into(),
            port: 6443,
        }],
        tool_rootfs: ToolRootfs::default(),
    }
}

fn load(path: &Path) -> (Vec<AgentTool>, Vec<ToolPolicy>) {
    let manifests = Manifests::load(&[path.to_path_buf()], false).expect("fixtures load");
    let tools = manifests
        .tools
        .into_iter()
        .map(|loaded| {
            let mut tool = loaded.object;
            // As the API server would have it.
            tool.metadata.uid = Some(format!("uid-of-{}", tool.name_any()));
            tool.metadata.generation = Some(1);
            tool
        })
        .collect();
    let policies = manifests.policies.into_iter().map(|l| l.object).collect();
    (tools, policies)
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every example tool (checked with the examples' ToolPolicy) and the everything fixture
/// (checked with the baseline alone), admitted.
pub(crate) fn admitted_fixtures() -> Vec<Admitted> {
    let engine = Engine::default();
    let (examples, policies) = load(&manifest_dir().join("examples"));
    let (everything, _) = load(&manifest_dir().join("tests/fixtures/controller/everything.yaml"));
    let with_policies = examples.into_iter().map(|t| (t, policies.clone()));
    let alone = everything.into_iter().map(|t| (t, Vec::new()));
    let admitted: Vec<Admitted> = with_policies
        .chain(alone)
        .map(|(tool, policies)| {
            let inputs = Inputs {
                namespace_labels: BTreeMap::from([(
                    "kubernetes.io/metadata.name".into(),
                    "agents".into(),
                )]),
                policies,
            };
            validate::validate(&tool, &inputs, &engine).expect("fixtures are deployable")
        })
        .collect();
    assert!(admitted.len() >= 6, "examples and the fixture load");
    admitted
}

/// Each child as `(file name, YAML)`.
fn rendered(children: &Children) -> Vec<(String, String)> {
    fn yaml<T: Serialize + kube::Resource<DynamicType = ()>>(object: &T) -> (String, String) {
        let name = format!(
            "{}-{}.yaml",
            T::kind(&()),
            object.meta().name.as_deref().unwrap_or_default()
        );
        (
            name,
            serde_yaml::to_string(object).expect("children serialize"),
        )
    }
    let mut files = vec![
        yaml(&children.runner_service_account),
        yaml(&children.config_map),
        yaml(&children.deployment),
        yaml(&children.service),
        yaml(&children.network_policy),
    ];
    if let Some(identity) = &children.tool_identity {
        files.extend([
            yaml(&identity.service_account),
            yaml(&identity.role),
            yaml(&identity.role_binding),
            yaml(&identity.token_role),
            yaml(&identity.token_role_binding),
        ]);
    }
    files.extend(children.pdb.iter().map(yaml));
    files
}

#[test]
fn every_child_of_every_example_matches_its_golden_file() {
    let golden_root = manifest_dir().join("tests/golden/controller");
    let bless = std::env::var_os("BLESS").is_some();
    let mut mismatches = Vec::new();
    for admitted in admitted_fixtures() {
        let tool = admitted.tool.name_any();
        let children = children(&admitted, &settings()).expect("children build");
        let dir = golden_root.join(&tool);
        let files = rendered(&children);
        if bless {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
        }
        let expected_names: BTreeSet<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let built_names: BTreeSet<String> = files.iter().map(|(name, _)| name.clone()).collect();
        if !bless && expected_names != built_names {
            mismatches.push(format!(
                "{tool}: children {built_names:?}, golden files {expected_names:?}"
            ));
        }
        for (name, yaml) in files {
            let path = dir.join(&name);
            if bless {
                std::fs::write(&path, &yaml).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                mismatches.push(format!("{}:\n{yaml}", path.display()));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "children differ from tests/golden/controller (review, then BLESS=1):\n{}",
        mismatches.join("\n")
    );
}

/// Everything about a runner pod that would hand a sandbox escape the node, a secret to
/// the environment, or an API token to a tool: an empty list when the pod is safe.
fn pod_violations(pod: &PodSpec, tool: &AgentTool) -> Vec<String> {
    let mut found = Vec::new();
    if pod.host_users != Some(false) {
        found.push("hostUsers is not false".into());
    }
    for (flag, set) in [
        ("hostNetwork", pod.host_network),
        ("hostPID", pod.host_pid),
        ("hostIPC", pod.host_ipc),
    ] {
        if set == Some(true) {
            found.push(format!("{flag}: true"));
        }
    }
    if pod.automount_service_account_token != Some(false) {
        found.push("automountServiceAccountToken is not false".into());
    }
    // The runner's identity, never the tool's (whose tokens are minted per call).
    if pod.service_account_name.as_deref() != Some(ChildNames::of(&tool.name_any()).runner.as_str())
    {
        found.push(format!(
            "serviceAccountName {:?} is not the runner's",
            pod.service_account_name
        ));
    }
    // Tokens are minted only of the tool's own account, and only when it declares rules.
    let names = ChildNames::of(&tool.name_any());
    for container in &pod.containers {
        let args = container.args.iter().flatten();
        let minted = args.skip_while(|a| *a != "--tool-service-account").nth(1);
        match minted {
            Some(_) if tool.spec.permissions.kubernetes.is_empty() => found.push(format!(
                "{}: mints tokens without declared Kubernetes permissions",
                container.name
            )),
            Some(account) if *account != names.tool => found.push(format!(
                "{}: mints tokens of {account}, not the tool's own account",
                container.name
            )),
            _ => {}
        }
    }
    let declared: BTreeSet<&str> = tool
        .spec
        .secrets
        .iter()
        .map(|s| s.secret_name.as_str())
        .collect();
    for volume in pod.volumes.iter().flatten() {
        found.extend(volume_violations(volume, &declared));
    }
    let documented: BTreeSet<&str> = RUNNER_POD_CAPABILITIES.iter().copied().collect();
    let copy_context: k8s_openapi::api::core::v1::SecurityContext =
        serde_json::from_value(deployment::rootfs_copy_security_context()).unwrap();
    // The runner gets exactly the runner set; an init container (the rootfs copy, running
    // the tool's untrusted image) exactly the copy's: no capability at all.
    let containers = pod
        .containers
        .iter()
        .map(|c| (c, runner_security_context()))
        .chain(
            pod.init_containers
                .iter()
                .flatten()
                .map(|c| (c, copy_context.clone())),
        );
    for (container, expected_context) in containers {
        let name = &container.name;
        let context = container.security_context.clone().unwrap_or_default();
        if context.privileged == Some(true) {
            found.push(format!("{name}: privileged"));
        }
        if context.allow_privilege_escalation != Some(false) {
            found.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        let capabilities = context.capabilities.clone().unwrap_or_default();
        if !capabilities.drop.iter().flatten().any(|c| c == "ALL") {
            found.push(format!("{name}: capabilities do not drop ALL"));
        }
        for added in capabilities.add.iter().flatten() {
            if !documented.contains(added.as_str()) {
                found.push(format!(
                    "{name}: capability {added} outside the documented set"
                ));
            }
        }
        if context != expected_context {
            found.push(format!(
                "{name}: securityContext differs from the documented one"
            ));
        }
        for env in container.env.iter().flatten() {
            if env
                .value_from
                .as_ref()
                .is_some_and(|v| v.secret_key_ref.is_some())
            {
                found.push(format!("{name}: secret in env var {}", env.name));
            }
        }
        if container
            .env_from
            .iter()
            .flatten()
            .any(|s| s.secret_ref.is_some())
        {
            found.push(format!("{name}: secret as envFrom"));
        }
    }
    found
}

fn volume_violations(volume: &Volume, declared_secrets: &BTreeSet<&str>) -> Vec<String> {
    let mut found = Vec::new();
    let name = &volume.name;
    if volume.host_path.is_some() {
        found.push(format!("volume {name}: hostPath"));
    }
    if let Some(secret) = &volume.secret {
        if secret.default_mode != Some(0o400) {
            found.push(format!("volume {name}: secret files not mode 0400"));
        }
        // Any other Secret, e.g. a legacy service-account token Secret, is not the tool's.
        if !declared_secrets.contains(secret.secret_name.as_deref().unwrap_or_default()) {
            found.push(format!(
                "volume {name}: Secret {:?} the tool did not declare",
                secret.secret_name
            ));
        }
    }
    for source in volume
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
    {
        if let Some(token) = &source.service_account_token {
            // Only the runner's own API credentials (default audience), expiring within an hour.
            if name != "api-credentials" || token.audience.is_some() {
                found.push(format!("volume {name}: an extra service-account token"));
            }
            if token.expiration_seconds.unwrap_or(i64::MAX) > 3600 {
                found.push(format!("volume {name}: a token living over an hour"));
            }
        }
        if source.secret.is_some() {
            found.push(format!("volume {name}: a projected Secret"));
        }
    }
    found
}

/// The tool's own identity exists exactly when it declares Kubernetes permissions, holds
/// exactly those rules, and the runner may only mint its tokens.
fn identity_violations(children: &Children, tool: &AgentTool) -> Vec<String> {
    let mut found = Vec::new();
    let declared = &tool.spec.permissions.kubernetes;
    if children
        .runner_service_account
        .automount_service_account_token
        != Some(false)
    {
        found.push("runner ServiceAccount automounts its token".to_string());
    }
    match &children.tool_identity {
        None if !declared.is_empty() => found.push("declared permissions but no identity".into()),
        Some(_) if declared.is_empty() => {
            found.push("an identity without declared permissions".into())
        }
        None => {}
        Some(identity) => {
            if identity.service_account.automount_service_account_token != Some(false) {
                found.push("tool ServiceAccount automounts its token".into());
            }
            let rules = identity.role.rules.clone().unwrap_or_default();
            let granted: Vec<RuleParts> = rules
                .into_iter()
                .map(|r| {
                    (
                        r.api_groups.unwrap_or_default(),
                        r.resources.unwrap_or_default(),
                        r.verbs,
                        r.resource_names.unwrap_or_default(),
                    )
                })
                .collect();
            let wanted: Vec<_> = declared
                .iter()
                .map(|r| {
                    (
                        r.api_groups.clone(),
                        r.resources.clone(),
                        r.verbs.clone(),
                        r.resource_names.clone(),
                    )
                })
                .collect();
            if granted != wanted {
                found.push(format!("tool Role grants {granted:?}, declared {wanted:?}"));
            }
            let token_rules = identity.token_role.rules.clone().unwrap_or_default();
            let mint_only = token_rules.len() == 1
                && token_rules[0].verbs == ["create"]
                && token_rules[0].resources.as_deref()
                    == Some(&["serviceaccounts/token".to_string()][..])
                && token_rules[0].resource_names.as_deref()
                    == Some(&[identity.service_account.name_any()][..]);
            if !mint_only {
                found.push(format!(
                    "token Role grants more than minting: {token_rules:?}"
                ));
            }
        }
    }
    found
}

/// apiGroups, resources, verbs, resourceNames of one rule.
type RuleParts = (Vec<String>, Vec<String>, Vec<String>, Vec<String>);

fn pod_spec(deployment: &Deployment) -> &PodSpec {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod template")
}

#[test]
fn no_child_of_any_fixture_breaks_an_invariant() {
    for admitted in admitted_fixtures() {
        let tool = &admitted.tool;
        let children = children(&admitted, &settings()).unwrap();
        let mut found = pod_violations(pod_spec(&children.deployment), tool);
        found.extend(identity_violations(&children, tool));
        assert!(found.is_empty(), "{}: {found:#?}", tool.name_any());
    }
}

/// Each hostile change a builder could make to the pod is caught by the invariants: the
/// check above cannot pass by being blind.
#[test]
fn a_builder_that_weakens_the_runner_pod_is_caught() {
    type Attack = (&'static str, fn(&mut PodSpec));
    let attacks: [Attack; 13] = [
        ("hostPath", |p| {
            p.volumes.get_or_insert_default().push(
                serde_json::from_value(serde_json::json!(
                {"name": "host", "hostPath": {"path": "/"}}))
                .unwrap(),
            )
        }),
        ("hostNetwork", |p| p.host_network = Some(true)),
        ("hostPID", |p| p.host_pid = Some(true)),
        ("hostUsers", |p| p.host_users = None),
        ("privileged", |p| {
            p.containers[0]
                .security_context
                .as_mut()
                .unwrap()
                .privileged = Some(true)
        }),
        ("host capability", |p| {
            let caps = p.containers[0]
                .security_context
                .as_mut()
                .unwrap()
                .capabilities
                .as_mut()
                .unwrap();
            caps.add.get_or_insert_default().push("NET_ADMIN".into())
        }),
        ("no drop ALL", |p| {
            let caps = p.containers[0]
                .security_context
                .as_mut()
                .unwrap()
                .capabilities
                .as_mut()
                .unwrap();
            caps.drop = None
        }),
        ("secret in env", |p| {
            p.containers[0].env.get_or_insert_default().push(serde_json::from_value(serde_json::json!(
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "report-keys", "key": "token"}}})).unwrap())
        }),
        ("automounted token", |p| {
            p.automount_service_account_token = None
        }),
        ("the tool's identity on the pod", |p| {
            p.service_account_name = Some("everything-tool".into())
        }),
        ("an extra token for another audience", |p| {
            p.volumes.get_or_insert_default().push(
                serde_json::from_value(serde_json::json!(
                {"name": "tool-token", "projected": {"sources": [{"serviceAccountToken":
                    {"path": "token", "audience": "vault", "expirationSeconds": 600}}]}}))
                .unwrap(),
            )
        }),
        ("tokens of the runner's own account", |p| {
            let args = p.containers[0].args.as_mut().unwrap();
            let at = args
                .iter()
                .position(|a| a == "--tool-service-account")
                .unwrap();
            args[at + 1] = "everything".into();
        }),
        ("a legacy token Secret", |p| {
            p.volumes.get_or_insert_default().push(serde_json::from_value(serde_json::json!(
                {"name": "legacy", "secret": {"secretName": "everything-tool-token", "defaultMode": 256}})).unwrap())
        }),
    ];
    let admitted = admitted_fixtures()
        .into_iter()
        .find(|a| a.tool.name_any() == "everything")
        .unwrap();
    let children = children(&admitted, &settings()).unwrap();
    for (attack, weaken) in attacks {
        let mut pod = pod_spec(&children.deployment).clone();
        weaken(&mut pod);
        assert!(
            !pod_violations(&pod, &admitted.tool).is_empty(),
            "{attack}: not caught"
        );
    }
    // A tool without Kubernetes permissions gets no token, whoever's it would be.
    let plain = admitted_fixtures()
        .into_iter()
        .find(|a| a.tool.spec.permissions.kubernetes.is_empty())
        .unwrap();
    let mut pod = pod_spec(&super::children(&plain, &settings()).unwrap().deployment).clone();
    let account = ChildNames::of(&plain.tool.name_any()).tool;
    pod.containers[0]
        .args
        .get_or_insert_default()
        .extend(["--tool-service-account".into(), account]);
    assert!(!pod_violations(&pod, &plain.tool).is_empty());
    let mut granting_more = children.clone();
    if let Some(identity) = &mut granting_more.tool_identity {
        identity.role.rules.get_or_insert_default()[0]
            .verbs
            .push("delete".into());
    }
    assert!(!identity_violations(&granting_more, &admitted.tool).is_empty());
    let mut no_identity = children;
    no_identity.tool_identity = None;
    assert!(!identity_violations(&no_identity, &admitted.tool).is_empty());
}

/// The runner mints tokens of the tool's own account, bound to its pod, only for a tool
/// that declares Kubernetes rules; other tools' pods do not change.
#[test]
fn only_a_tool_with_kubernetes_rules_gets_a_token_minting_runner_bound_to_its_pod() {
    for admitted in admitted_fixtures() {
        let tool = &admitted.tool;
        let children = children(&admitted, &settings()).unwrap();
        let runner = &pod_spec(&children.deployment).containers[0];
        let args = runner.args.clone().unwrap_or_default();
        let env: Vec<(String, Option<String>)> = (runner.env.iter().flatten())
            .map(|e| {
                let field = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
                (e.name.clone(), field.map(|f| f.field_path.clone()))
            })
            .collect();
        let flag = args.iter().position(|a| a == "--tool-service-account");
        if tool.spec.permissions.kubernetes.is_empty() {
            assert_eq!(flag, None, "{}", tool.name_any());
            assert!(!env.iter().any(|(n, _)| n == "POD_UID"), "{env:?}");
        } else {
            let account = &args[flag.unwrap() + 1];
            assert_eq!(*account, format!("{}-tool", tool.name_any()));
            assert!(env.contains(&("POD_NAME".into(), Some("metadata.name".into()))));
            assert!(env.contains(&("POD_UID".into(), Some("metadata.uid".into()))));
        }
    }
}

fn everything() -> Admitted {
    static EVERYTHING: std::sync::LazyLock<Admitted> = std::sync::LazyLock::new(|| {
        admitted_fixtures()
            .into_iter()
            .find(|a| a.tool.name_any() == "everything")
            .unwrap()
    });
    EVERYTHING.clone()
}

#[test]
fn the_runner_pod_gets_its_cpu_probes_image_volume_and_runtime_class() {
    let admitted = everything();
    let children = children(&admitted, &settings()).unwrap();
    let pod = pod_spec(&children.deployment);
    let runner = &pod.containers[0];
    let cpu = &runner
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap()["cpu"];
    assert!(crate::api::parse_quantity(cpu).unwrap() >= 0.5, "{cpu:?}");
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(
        probe_path(&runner.readiness_probe).as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        probe_path(&runner.liveness_probe).as_deref(),
        Some("/healthz")
    );
    assert_eq!(pod.runtime_class_name.as_deref(), Some("gvisor"));
    let image = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.image.as_ref())
        .unwrap();
    assert_eq!(
        image.reference.as_deref(),
        Some(admitted.tool.spec.runtime.image.as_str())
    );
    assert!(
        pod.topology_spread_constraints
            .as_ref()
            .is_some_and(|t| !t.is_empty())
    );
    // Audit records go to stdout, or to the tool's audit claim: never a file that dies
    // with the pod (the claim case is checked in an_audit_claim_gets_one_file_per_runner_pod).
    let args = runner.args.clone().unwrap_or_default();
    if let Some(i) = args.iter().position(|a| a == "--audit-log") {
        assert!(
            args[i + 1].starts_with("/var/log/toolwarden/audit/"),
            "{args:?}"
        );
        assert!(admitted.tool.spec.audit.persistent_volume_claim.is_some());
    }
    // Only the declared keys of each Secret, as 0400 files.
    let secret_keys: BTreeSet<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref())
        .flat_map(|s| {
            s.items
                .iter()
                .flatten()
                .map(|i| format!("{}/{}", s.secret_name.as_deref().unwrap(), i.key))
        })
        .collect();
    assert_eq!(
        secret_keys,
        BTreeSet::from([
            "api-keys/example".into(),
            "report-keys/signing.pem".into(),
            "report-keys/token".into()
        ])
    );
}

#[test]
fn replicas_follow_the_spec_and_a_denied_tool_gets_none() {
    let mut admitted = everything();
    let built = children(&admitted, &settings()).unwrap();
    assert_eq!(built.deployment.spec.as_ref().unwrap().replicas, Some(3));
    assert!(built.pdb.is_some(), "3 replicas get a disruption budget");
    admitted.verdict.denied = true;
    let built = children(&admitted, &settings()).unwrap();
    assert_eq!(built.deployment.spec.as_ref().unwrap().replicas, Some(0));
    assert!(built.pdb.is_none());
    let single = admitted_fixtures()
        .into_iter()
        .find(|a| a.tool.name_any() == "execute-code")
        .unwrap();
    let built = children(&single, &settings()).unwrap();
    assert_eq!(built.deployment.spec.as_ref().unwrap().replicas, Some(1));
    assert!(
        built.pdb.is_none(),
        "one pod: a budget would only block drains"
    );
}

#[test]
fn a_changed_spec_rolls_the_pods_and_an_unchanged_one_does_not() {
    let hash = |admitted: &Admitted| {
        let built = children(admitted, &settings()).unwrap();
        built
            .deployment
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[crate::controller::labels::CONFIG_HASH]
            .clone()
    };
    let mut admitted = everything();
    let before = hash(&admitted);
    assert_eq!(hash(&admitted), before);
    admitted.tool.spec.sandbox.timeout_ms += 1;
    assert_ne!(hash(&admitted), before);
}

#[test]
fn ingress_defaults_to_the_tools_namespace_and_egress_to_dns_api_server_and_declared_ports() {
    let single = admitted_fixtures()
        .into_iter()
        .find(|a| a.tool.name_any() == "execute-code")
        .unwrap();
    let policy = children(&single, &settings())
        .unwrap()
        .network_policy
        .spec
        .unwrap();
    let ingress = &policy.ingress.unwrap()[0];
    let from = ingress.from.as_ref().unwrap();
    assert_eq!(from.len(), 1);
    assert!(from[0].namespace_selector.is_none(), "same namespace only");
    let egress = policy.egress.unwrap();
    assert_eq!(
        egress.len(),
        2,
        "no network declared: DNS and the API server only: {egress:?}"
    );
    assert_eq!(
        egress[1].to.as_ref().unwrap()[0]
            .ip_block
            .as_ref()
            .unwrap()
            .cidr,
        "10.0.0.1/32",
        "the API server's endpoint, for the runner's TokenReviews"
    );
    let everything = children(&everything(), &settings())
        .unwrap()
        .network_policy
        .spec
        .unwrap();
    let ports: BTreeSet<String> = everything.egress.unwrap()[2]
        .ports
        .iter()
        .flatten()
        .map(|p| format!("{:?}", p.port))
        .collect();
    assert_eq!(ports.len(), 2, "443 (the default) and 8443: {ports:?}");
    // Every caller names pods: an empty peer would admit the whole cluster.
    for peer in everything.ingress.unwrap()[0].from.iter().flatten() {
        assert!(peer.pod_selector.is_some());
    }
}

/// The runner reads the ConfigMap as a folder of manifests: it must find exactly the
/// admitted tool there, and nothing else as a manifest.
#[test]
fn the_runner_reads_exactly_the_admitted_tool_from_the_config_map() {
    for admitted in admitted_fixtures() {
        let built = children(&admitted, &settings()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (key, value) in built.config_map.data.iter().flatten() {
            std::fs::write(dir.path().join(key), value).unwrap();
        }
        let served =
            Manifests::load(&[dir.path().to_path_buf()], false).expect("the runner loads it");
        assert_eq!(served.tools.len(), 1);
        assert!(served.policies.is_empty());
        let tool = &served.tools[0].object;
        assert_eq!(tool.spec, admitted.tool.spec);
        assert_eq!(tool.metadata.name, admitted.tool.metadata.name);
        assert!(!crate::runner::registry::is_manifest(Path::new(
            config_map::VERDICT_KEY
        )));
    }
}

mod variants {
    use proptest::prelude::*;

    use super::*;

    /// Keeps the entries of `items` whose bit in `mask` is set.
    fn subset<T: Clone>(items: &[T], mask: u32) -> Vec<T> {
        items
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, item)| item.clone())
            .collect()
    }

    proptest! {
        /// Any mix of the features that shape the pod (secrets, mounts, Kubernetes
        /// rules, replicas, callers, RuntimeClass, a denial) keeps every invariant.
        #[test]
        fn every_variant_of_a_tool_keeps_every_invariant(
            secrets in 0u32..8,
            mounts in 0u32..16,
            rules in 0u32..4,
            callers in 0u32..4,
            replicas in 1u32..5,
            runtime_class in proptest::option::of("[a-z]{1,8}"),
            denied in any::<bool>(),
        ) {
            let base = everything();
            let mut admitted = base.clone();
            let spec = &mut admitted.tool.spec;
            spec.secrets = subset(&base.tool.spec.secrets, secrets);
            spec.permissions.filesystem = subset(&base.tool.spec.permissions.filesystem, mounts);
            spec.permissions.kubernetes = subset(&base.tool.spec.permissions.kubernetes, rules);
            spec.serving.callers = subset(&base.tool.spec.serving.callers, callers);
            spec.serving.replicas = replicas;
            spec.sandbox.runtime_class_name = runtime_class.clone();
            admitted.verdict.denied = denied;
            let built = children(&admitted, &settings()).unwrap();
            let mut found = pod_violations(pod_spec(&built.deployment), &admitted.tool);
            found.extend(identity_violations(&built, &admitted.tool));
            prop_assert!(found.is_empty(), "{:?}", found);
            let pod = pod_spec(&built.deployment);
            prop_assert_eq!(&pod.runtime_class_name, &runtime_class);
            let want = if denied { 0 } else { replicas as i32 };
            prop_assert_eq!(built.deployment.spec.as_ref().unwrap().replicas, Some(want));
            prop_assert_eq!(built.pdb.is_some(), want > 1);
        }
    }
}

/// The runner serves what the controller admitted. The ConfigMap, written as kubelet
/// mounts it, goes into a `toolwarden runner` registry: a tool that an enforcing cluster
/// policy denies in its real namespace (which the runner cannot see, so its own check
/// would pass) is refused naming the rule; a verdict about another tool or generation,
/// an unreadable one, or none at all, is not trusted.
#[test]
fn the_runner_serves_the_configmaps_verdict_and_nothing_else() {
    use crate::runner::ratelimit::LimiterClock;
    use crate::runner::registry::{ADMITTED_VERDICT_FILE, Judge, Registry, manifest_files};
    use crate::runner::tool::SecretsDir;

    let (tools, _) = load(&manifest_dir().join("examples/execute-code.yaml"));
    let tool = tools.into_iter().next().unwrap();
    let strict: ToolPolicy = serde_yaml::from_str(
        "apiVersion: toolwarden.dev/v1alpha1\nkind: ToolPolicy\nmetadata: {name: strict}\n\
         spec: {mode: enforce, namespaceSelector: {matchLabels: {team: a}},\n  \
         rules: {sandboxing: {maxTimeoutMs: 500}}}\n",
    )
    .unwrap();
    let admit = |labels: &[(&str, &str)]| {
        let inputs = Inputs {
            namespace_labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            policies: vec![strict.clone()],
        };
        validate::validate(&tool, &inputs, &Engine::default()).unwrap()
    };
    let mounted = |admitted: &Admitted| {
        let dir = tempfile::tempdir().unwrap();
        let config_map = children(admitted, &settings()).unwrap().config_map;
        for (key, value) in config_map.data.unwrap() {
            std::fs::write(dir.path().join(key), value).unwrap();
        }
        dir
    };
    let serve = |dir: &Path, judge: Judge| {
        Registry::new(LimiterClock::manual(), SecretsDir::default())
            .with_judge(judge)
            .load(&manifest_files(dir).unwrap())
    };

    let denied = mounted(&admit(&[("team", "a")]));
    let report = serve(denied.path(), Judge::Admitted);
    assert!(report.served.is_empty(), "{report:?}");
    let reasons = report.refused[0].reasons.join("; ");
    assert!(
        reasons.contains("TW-SANDBOX-001") && reasons.contains("policy strict"),
        "{reasons}"
    );
    // What the runner's own check, without the namespace's labels, would have served.
    assert_eq!(
        serve(denied.path(), Judge::Evaluate).served,
        ["execute-code"]
    );

    let admitted = mounted(&admit(&[("team", "b")]));
    assert_eq!(
        serve(admitted.path(), Judge::Admitted).served,
        ["execute-code"]
    );
    let verdict_path = admitted.path().join(ADMITTED_VERDICT_FILE);
    let verdict = std::fs::read_to_string(&verdict_path).unwrap();
    let forged = [
        (
            verdict.replace("\"generation\": 1", "\"generation\": 2"),
            "generation Some(2)",
        ),
        (
            verdict.replace("\"tool\": \"execute-code\"", "\"tool\": \"other\""),
            "about other",
        ),
        ("{\"denied\": false".to_string(), "unreadable"),
    ];
    for (text, why) in forged {
        std::fs::write(&verdict_path, &text).unwrap();
        let report = serve(admitted.path(), Judge::Admitted);
        assert!(report.served.is_empty(), "{text}: {report:?}");
        let reasons = report.refused[0].reasons.join("; ");
        assert!(reasons.contains(why), "{why}: {reasons}");
    }
    std::fs::remove_file(&verdict_path).unwrap();
    let report = serve(admitted.path(), Judge::Admitted);
    assert!(report.served.is_empty(), "{report:?}");
    assert!(
        report.refused[0].reasons[0].contains("no verdict of the controller"),
        "{report:?}"
    );
}

/// Clusters without image volumes: an init container running the tool's image copies its
/// file system into an emptyDir mounted where the image volume would be; the pod keeps
/// every invariant (the init container adds no capability), and the status says so.
#[test]
fn without_image_volumes_an_init_container_copies_the_tools_file_system() {
    let copy = Settings {
        tool_rootfs: ToolRootfs::Copy,
        ..settings()
    };
    for admitted in admitted_fixtures() {
        let tool = &admitted.tool;
        let copied = children(&admitted, &copy).unwrap();
        let pod = pod_spec(&copied.deployment);
        let mut found = pod_violations(pod, tool);
        found.extend(identity_violations(&copied, tool));
        // The admission webhook lets the controller write it.
        crate::webhook::workloads::pod_problems(pod, "spec.template.spec", &mut found);
        assert!(found.is_empty(), "{}: {found:#?}", tool.name_any());
        let init = &pod.init_containers.as_ref().expect("an init container")[0];
        assert_eq!(
            init.image.as_deref(),
            Some(tool.spec.runtime.image.as_str())
        );
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "tool-image")
            .unwrap();
        assert!(
            volume.empty_dir.is_some() && volume.image.is_none(),
            "{volume:?}"
        );
        // The runner mounts it read-only where the image volume would be.
        let runner_mount = |d: &Deployment| {
            pod_spec(d).containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "tool-image")
                .cloned()
                .unwrap()
        };
        let by_volume = children(&admitted, &settings()).unwrap();
        assert_eq!(
            runner_mount(&copied.deployment),
            runner_mount(&by_volume.deployment)
        );
        assert_eq!(runner_mount(&copied.deployment).read_only, Some(true));
        assert!(
            by_volume
                .deployment
                .spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap()
                .init_containers
                .is_none()
        );
    }
    // An init container with any capability is caught.
    let admitted = &admitted_fixtures()[0];
    let mut pod = pod_spec(&children(admitted, &copy).unwrap().deployment).clone();
    let init = &mut pod.init_containers.as_mut().unwrap()[0];
    init.security_context = Some(runner_security_context());
    assert!(!pod_violations(&pod, &admitted.tool).is_empty());
}

/// The copy script, run by a real shell on a tree shaped like an image: regular files
/// (modes kept, set-id bits dropped), hidden entries, symlinks copied as links (never
/// followed out of the image), and the pod's /proc, /sys, /dev left as empty mount points.
#[test]
fn the_rootfs_copy_script_copies_the_image_and_not_the_pods_mounts() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let root = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let r = root.path();
    for dir in [
        "bin",
        "etc/deep",
        "proc/1",
        "sys/kernel",
        "dev",
        ".hidden-dir",
    ] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    std::fs::write(r.join("bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(r.join("bin/tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::write(r.join("etc/deep/conf"), "x").unwrap();
    std::fs::write(r.join(".profile"), "hidden").unwrap();
    std::fs::write(r.join("..odd"), "odd").unwrap();
    std::fs::write(r.join("proc/1/status"), "the pod's").unwrap();
    std::fs::write(r.join("sys/kernel/x"), "the pod's").unwrap();
    std::fs::write(r.join("dev/null-ish"), "the pod's").unwrap();
    // Links that would leave the image if followed.
    symlink("/etc/shadow", r.join("etc/passwd-link")).unwrap();
    symlink("/", r.join("host-root")).unwrap();

    let status = std::process::Command::new("/bin/sh")
        .args(["-c", deployment::ROOTFS_COPY_SCRIPT, "copy-rootfs"])
        .arg(r)
        .arg(target.path())
        .status()
        .unwrap();
    assert!(status.success());
    let t = target.path();
    assert_eq!(
        std::fs::read_to_string(t.join("etc/deep/conf")).unwrap(),
        "x"
    );
    assert_eq!(
        std::fs::read_to_string(t.join(".profile")).unwrap(),
        "hidden"
    );
    assert_eq!(std::fs::read_to_string(t.join("..odd")).unwrap(), "odd");
    assert!(t.join(".hidden-dir").is_dir());
    let mode = std::fs::metadata(t.join("bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "executable: {mode:o}");
    assert_eq!(mode & 0o6000, 0, "no set-id bit: {mode:o}");
    for link in ["etc/passwd-link", "host-root"] {
        let meta = std::fs::symlink_metadata(t.join(link)).unwrap();
        assert!(meta.file_type().is_symlink(), "{link} copied as a link");
    }
    for mount_point in ["proc", "sys", "dev", "tmp"] {
        let entries = std::fs::read_dir(t.join(mount_point)).unwrap().count();
        assert_eq!(entries, 0, "{mount_point} is an empty mount point");
    }
}

/// `audit.persistentVolumeClaim`: the records go to one file per pod on the claim
/// (`$(POD_NAME)` is expanded by the kubelet), not stdout; without it, stdout.
#[test]
fn an_audit_claim_gets_one_file_per_runner_pod() {
    let fixtures = admitted_fixtures();
    for admitted in &fixtures {
        let built = children(admitted, &settings()).unwrap();
        let pod = pod_spec(&built.deployment);
        let runner = &pod.containers[0];
        let args = runner.args.clone().unwrap_or_default();
        let audit_log = args
            .iter()
            .position(|a| a == "--audit-log")
            .map(|i| args[i + 1].as_str());
        match &admitted.tool.spec.audit.persistent_volume_claim {
            None => assert_eq!(audit_log, None, "{}: stdout", admitted.tool.name_any()),
            Some(claim) => {
                assert_eq!(
                    audit_log,
                    Some("/var/log/toolwarden/audit/$(POD_NAME).jsonl")
                );
                let env = runner.env.as_ref().unwrap();
                assert!(env.iter().any(|e| {
                    e.name == "POD_NAME"
                        && e.value_from
                            .as_ref()
                            .and_then(|v| v.field_ref.as_ref())
                            .map(|f| f.field_path.as_str())
                            == Some("metadata.name")
                }));
                let volume = pod
                    .volumes
                    .iter()
                    .flatten()
                    .find(|v| v.name == "audit")
                    .unwrap();
                let source = volume.persistent_volume_claim.as_ref().unwrap();
                assert_eq!(&source.claim_name, claim);
                assert_ne!(source.read_only, Some(true));
                let mount = runner
                    .volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.name == "audit")
                    .unwrap();
                assert_eq!(mount.mount_path, "/var/log/toolwarden/audit");
            }
        }
    }
    assert!(
        fixtures
            .iter()
            .any(|a| a.tool.spec.audit.persistent_volume_claim.is_some()),
        "the everything fixture names an audit claim"
    );
}

/// The address ranges a tool's egress may reach come from the ToolPolicies that select it,
/// which a runner pod cannot see: the controller's verdict carries them, and the runner
/// serves the tool with exactly those (a policy for another namespace grants nothing).
#[test]
fn the_runner_gets_the_egress_ranges_of_the_policies_that_select_the_tool() {
    use crate::runner::ratelimit::LimiterClock;
    use crate::runner::registry::{Judge, Registry, manifest_files};
    use crate::runner::tool::SecretsDir;

    let (tools, _) = load(&manifest_dir().join("examples/api-call.yaml"));
    let tool = tools.into_iter().next().unwrap();
    let granting = |name: &str, team: &str, cidr: &str| -> ToolPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: toolwarden.dev/v1alpha1\nkind: ToolPolicy\nmetadata: {{name: {name}}}\n\
             spec: {{mode: warn, namespaceSelector: {{matchLabels: {{team: {team}}}}},\n  \
             rules: {{sandboxing: {{allowedEgressCidrs: [\"{cidr}\"]}}}}}}\n"
        ))
        .unwrap()
    };
    let inputs = Inputs {
        namespace_labels: BTreeMap::from([("team".into(), "b".into())]),
        policies: vec![
            granting("ours", "b", "10.1.0.0/16"),
            granting("theirs", "a", "192.168.0.0/16"),
        ],
    };
    let admitted = validate::validate(&tool, &inputs, &Engine::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_map = children(&admitted, &settings()).unwrap().config_map;
    for (key, value) in config_map.data.unwrap() {
        std::fs::write(dir.path().join(key), value).unwrap();
    }
    let registry =
        Registry::new(LimiterClock::manual(), SecretsDir::default()).with_judge(Judge::Admitted);
    let report = registry.load(&manifest_files(dir.path()).unwrap());
    assert_eq!(report.served, ["api-call"], "{report:?}");
    let served = registry.snapshot()["api-call"].allowed_egress_cidrs.clone();
    let ranges: Vec<String> = served
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ranges, ["10.1.0.0/16"]);
}
