//! The Helm chart against `toolwarden manifests`, as far as Rust can check
//! without a helm binary: the chart's simple templates are rendered here with a
//! tiny renderer (`{{ .Values.x }}`, `{{ .Release.Namespace }}`, `if`/`if
//! not`/`else`/`end` with Helm's `{{-` trimming) and must produce exactly the
//! objects `manifests` prints; every object round-trips through its Kubernetes
//! type (no unknown or misspelt field), and names, labels and selectors line up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde_json::{Value, json};
use toolwarden::webhook::install::{Install, TIMEOUT_SECONDS};

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/toolwarden")
}

/// Renders one template: only what the chart's templates use.
fn render(template: &str, values: &serde_yaml::Value, namespace: &str) -> String {
    let lookup = |path: &str| -> serde_yaml::Value {
        if path == ".Release.Namespace" {
            return namespace.into();
        }
        if path == ".Release.Name" {
            return "toolwarden".into();
        }
        let keys = path
            .strip_prefix(".Values.")
            .unwrap_or_else(|| panic!("unsupported reference {path}"));
        keys.split('.').fold(values.clone(), |v, key| {
            v.get(key)
                .cloned()
                .unwrap_or_else(|| panic!("no value {path}"))
        })
    };
    let truthy = |v: &serde_yaml::Value| {
        !matches!(v, serde_yaml::Value::Null | serde_yaml::Value::Bool(false))
    };
    let mut out = String::new();
    // One entry per open `if`: (this branch renders, some branch already rendered).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let mut rest = template;
    let mut trim_next = false;
    let active = |stack: &Vec<(bool, bool)>| stack.iter().all(|(on, _)| *on);
    while let Some(start) = rest.find("{{") {
        let (text, after) = rest.split_at(start);
        let text = if trim_next { text.trim_start() } else { text };
        if active(&stack) {
            out.push_str(text);
        }
        let end = after.find("}}").expect("closed action");
        let mut action = &after[2..end];
        if let Some(a) = action.strip_prefix('-') {
            if active(&stack) {
                out.truncate(out.trim_end().len());
            }
            action = a;
        }
        trim_next = action.ends_with('-');
        let action = action.trim_end_matches('-').trim();
        rest = &after[end + 2..];
        if let Some(cond) = action.strip_prefix("if ") {
            let on = match cond.strip_prefix("not ") {
                Some(c) => !truthy(&lookup(c.trim())),
                None => truthy(&lookup(cond.trim())),
            };
            stack.push((on, on));
        } else if action == "else" {
            let top = stack.last_mut().expect("else inside if");
            *top = (!top.1, true);
        } else if action == "end" {
            stack.pop().expect("end closes an if");
        } else if active(&stack) {
            match lookup(action) {
                serde_yaml::Value::String(s) => out.push_str(&s),
                other => out.push_str(serde_yaml::to_string(&other).unwrap().trim()),
            }
        }
    }
    assert!(stack.is_empty(), "unclosed if");
    out.push_str(if trim_next { rest.trim_start() } else { rest });
    out
}

fn default_values() -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
        .unwrap()
}

/// Every object the chart's templates render with these values.
fn render_chart(values: &serde_yaml::Value, namespace: &str) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let rendered = render(&std::fs::read_to_string(&file).unwrap(), values, namespace);
        for document in serde_yaml::Deserializer::from_str(&rendered) {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}\n{rendered}", file.display()));
            if !value.is_null() {
                objects.push(serde_json::to_value(value).unwrap());
            }
        }
    }
    objects
}

use serde::Deserialize;

fn key(object: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    (
        s(&object["kind"]),
        s(&object["metadata"]["namespace"]),
        s(&object["metadata"]["name"]),
    )
}

fn assert_same_objects(chart: Vec<Value>, manifests: Vec<Value>) {
    let chart: BTreeMap<_, _> = chart.into_iter().map(|o| (key(&o), o)).collect();
    let manifests: BTreeMap<_, _> = manifests.into_iter().map(|o| (key(&o), o)).collect();
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        manifests.keys().collect::<Vec<_>>()
    );
    for (key, object) in &manifests {
        assert_eq!(
            &chart[key],
            object,
            "{key:?} differs:\nchart:\n{}\nmanifests:\n{}",
            serde_yaml::to_string(&chart[key]).unwrap(),
            serde_yaml::to_string(object).unwrap()
        );
    }
}

#[test]
fn the_charts_crds_are_the_generated_crds() {
    let read = |dir: &Path| -> BTreeMap<String, String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into(),
                    std::fs::read_to_string(&p).unwrap(),
                )
            })
            .collect()
    };
    let generated = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("crds"));
    assert_eq!(generated.len(), 3);
    assert_eq!(
        read(&chart_dir().join("crds")),
        generated,
        "run: cp crds/*.yaml charts/toolwarden/crds/"
    );
}

#[test]
fn default_values_render_exactly_what_manifests_prints() {
    assert_same_objects(
        render_chart(&default_values(), "toolwarden"),
        Install::default().chart_objects(),
    );
    // In another namespace, with other choices, too.
    let mut values = default_values();
    values["certManager"]["enabled"] = true.into();
    values["defaultPolicy"]["enabled"] = true.into();
    values["admissionPolicies"]["enabled"] = true.into();
    values["webhook"]["replicas"] = 3.into();
    values["controller"]["serviceAccount"] = "tw-ctrl".into();
    values["image"]["tag"] = "dev".into();
    let install = Install {
        namespace: "platform".into(),
        cert_manager: true,
        default_policy: true,
        admission_policies: true,
        webhook_replicas: 3,
        controller_service_account: "tw-ctrl".into(),
        image: "docker.io/toolwarden/toolwarden:dev".into(),
        ..Install::default()
    };
    assert_same_objects(render_chart(&values, "platform"), install.chart_objects());
}

#[test]
fn chart_metadata_and_values_match_the_crate() {
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let values = default_values();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::draft7::new(&schema).unwrap();
    let values_json = serde_json::to_value(&values).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&values_json)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    // The schema refuses what the templates cannot render sensibly.
    for (path, bad) in [
        ("/webhook/replicas", json!(0)),
        ("/defaultPolicy/mode", json!("loud")),
        ("/certManager/enabled", json!("yes")),
        ("/controller/toolRootfs", json!("init-container")),
    ] {
        let mut broken = values_json.clone();
        *broken.pointer_mut(path).unwrap() = bad;
        assert!(!validator.is_valid(&broken), "{path}");
    }
    let mut extra = values_json.clone();
    extra["webhook"]["replicaz"] = json!(2);
    assert!(!validator.is_valid(&extra));
    // The other rootfs path is valid and reaches the controller's arguments.
    let mut copy = values.clone();
    copy["controller"]["toolRootfs"] = "copy".into();
    assert!(validator.is_valid(&serde_json::to_value(&copy).unwrap()));
    let objects = render_chart(&copy, "toolwarden");
    let controller = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "toolwarden-controller")
        .unwrap();
    let args = &controller["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(
        (&args[3], &args[4]),
        (&json!("--tool-rootfs"), &json!("copy")),
        "{args}"
    );
}

/// Each object through its Kubernetes type and back: a misspelt or misplaced
/// field would be dropped on the way and show up here.
fn round_trips(object: &Value) {
    use k8s_openapi::api::{
        admissionregistration::v1 as adm, apps::v1 as apps, core::v1 as core, policy::v1 as policy,
        rbac::v1 as rbac,
    };
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) {
        let typed: T =
            serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object}"));
        let mut back = serde_json::to_value(typed).unwrap();
        back["apiVersion"] = object["apiVersion"].clone();
        back["kind"] = object["kind"].clone();
        assert_eq!(&back, object);
    }
    match object["kind"].as_str().unwrap() {
        "Namespace" => check::<core::Namespace>(object),
        "ServiceAccount" => check::<core::ServiceAccount>(object),
        "Service" => check::<core::Service>(object),
        "Deployment" => check::<apps::Deployment>(object),
        "PodDisruptionBudget" => check::<policy::PodDisruptionBudget>(object),
        "ClusterRole" => check::<rbac::ClusterRole>(object),
        "ClusterRoleBinding" => check::<rbac::ClusterRoleBinding>(object),
        "Role" => check::<rbac::Role>(object),
        "RoleBinding" => check::<rbac::RoleBinding>(object),
        "ValidatingWebhookConfiguration" => check::<adm::ValidatingWebhookConfiguration>(object),
        "ValidatingAdmissionPolicy" => check::<adm::ValidatingAdmissionPolicy>(object),
        "ValidatingAdmissionPolicyBinding" => check::<adm::ValidatingAdmissionPolicyBinding>(object),
        "CustomResourceDefinition" => {
            check::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(object)
        }
        "ToolPolicy" => {
            let policy: toolwarden::api::ToolPolicy = serde_json::from_value(object.clone()).unwrap();
            assert!(toolwarden::webhook::policy_problems(&policy.spec).is_empty());
        }
        "Issuer" | "Certificate" => {} // cert-manager's kinds: no Rust types here
        other => panic!("unexpected kind {other}"),
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

#[test]
fn every_object_parses_and_names_labels_and_selectors_line_up() {
    for install in [
        Install::default(),
        Install {
            namespace: "platform".into(),
            cert_manager: true,
            default_policy: true,
            ..Install::default()
        },
    ] {
        let ns = install.namespace.as_str();
        let objects = install.objects();
        objects.iter().for_each(round_trips);
        for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let labels = &deployment["spec"]["template"]["metadata"]["labels"];
            assert!(
                selects(&deployment["spec"]["selector"]["matchLabels"], labels),
                "{deployment}"
            );
            let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap();
            find(&objects, "ServiceAccount", sa);
            assert_eq!(deployment["metadata"]["namespace"], ns);
        }
        let webhook = find(&objects, "Deployment", "toolwarden-webhook");
        let pod_labels = &webhook["spec"]["template"]["metadata"]["labels"];
        assert_eq!(webhook["spec"]["replicas"], install.webhook_replicas);
        assert!(selects(
            &find(&objects, "PodDisruptionBudget", "toolwarden-webhook")["spec"]["selector"]["matchLabels"],
            pod_labels
        ));
        let service = find(&objects, "Service", "toolwarden-webhook");
        assert!(selects(&service["spec"]["selector"], pod_labels));
        let container = &webhook["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"],
            container["ports"][0]["name"]
        );
        // The controller the webhook trusts is the one that runs.
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let controller = find(&objects, "Deployment", "toolwarden-controller");
        let controller_sa = controller["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        assert!(
            args.windows(2)
                .any(|w| w == ["--controller-service-account", controller_sa]),
            "{args:?}"
        );
        // Both Deployments' arguments are what the binary accepts: a missing required flag
        // (the runner image) fails here, not in the pod.
        for name in ["toolwarden-controller", "toolwarden-webhook"] {
            let container =
                &find(&objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0];
            let argv = std::iter::once("toolwarden").chain(
                container["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap()),
            );
            if let Err(e) = toolwarden::cli::Cli::try_parse_from(argv) {
                panic!("{name}: {e}");
            }
        }
        // Runner pods run the operator's own image.
        let container = &controller["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["args"],
            json!([
                "controller",
                "--runner-image",
                container["image"],
                "--tool-rootfs",
                "image-volume"
            ])
        );
        // Bindings bind existing roles to existing ServiceAccounts.
        for binding in objects
            .iter()
            .filter(|o| o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
        {
            let role = &binding["roleRef"];
            let target = find(
                &objects,
                role["kind"].as_str().unwrap(),
                role["name"].as_str().unwrap(),
            );
            if binding["kind"] == "RoleBinding" {
                assert_eq!(
                    target["metadata"]["namespace"],
                    binding["metadata"]["namespace"]
                );
            }
            // The runners' TokenReview binding alone is installed without subjects: the
            // controller keeps them.
            if binding["metadata"]["name"] == "toolwarden-runner-token-review" {
                assert_eq!(binding["subjects"], Value::Null, "{binding}");
                continue;
            }
            for subject in binding["subjects"].as_array().unwrap() {
                assert_eq!(subject["namespace"], ns);
                find(
                    &objects,
                    "ServiceAccount",
                    subject["name"].as_str().unwrap(),
                );
            }
        }
        // The webhook configuration: fail closed, fast, side-effect free, never in kube-system
        // or its own namespace (by the immutable name label), pointed at the Service.
        let configuration = find(&objects, "ValidatingWebhookConfiguration", "toolwarden");
        for hook in configuration["webhooks"].as_array().unwrap() {
            assert_eq!(hook["failurePolicy"], "Fail");
            assert_eq!(hook["sideEffects"], "None");
            assert!(hook["timeoutSeconds"].as_i64().unwrap() <= 5 && TIMEOUT_SECONDS <= 5);
            assert_eq!(
                hook["namespaceSelector"],
                json!({"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", ns]}]})
            );
            assert_eq!(
                hook["clientConfig"]["service"]["name"],
                service["metadata"]["name"]
            );
            assert_eq!(hook["clientConfig"]["service"]["namespace"], ns);
            assert_eq!(
                hook["clientConfig"]["service"]["port"],
                service["spec"]["ports"][0]["port"]
            );
        }
        if install.cert_manager {
            let certificate = find(&objects, "Certificate", "toolwarden-webhook");
            assert_eq!(
                certificate["spec"]["dnsNames"][0],
                format!("toolwarden-webhook.{ns}.svc")
            );
            assert_eq!(
                configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
                format!("{ns}/toolwarden-webhook")
            );
            assert!(args.contains(&"--tls-cert"));
        } else {
            // The self-managed certificate's RBAC names the Secret and configuration the webhook uses.
            let tls_role = find(&objects, "Role", "toolwarden-webhook-tls");
            assert_eq!(
                tls_role["rules"][1]["resourceNames"],
                json!([toolwarden::webhook::install::WEBHOOK_TLS_SECRET])
            );
            let ca_role = find(&objects, "ClusterRole", "toolwarden-webhook-ca-bundle");
            assert_eq!(
                ca_role["rules"][0]["resourceNames"],
                json!([configuration["metadata"]["name"]])
            );
        }
    }
}

/// The command prints exactly the library's objects, flags included.
#[test]
fn the_manifests_command_prints_the_install() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_toolwarden"))
            .arg("manifests")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        run(&[]),
        toolwarden::webhook::install::to_yaml(&Install::default().objects())
    );
    let all = Install {
        namespace: "platform".into(),
        cert_manager: true,
        default_policy: true,
        admission_policies: true,
        ..Install::default()
    };
    let printed = run(&[
        "--namespace",
        "platform",
        "--cert-manager",
        "--default-policy",
        "--admission-policies",
    ]);
    assert_eq!(
        printed,
        toolwarden::webhook::install::to_yaml(&all.objects())
    );
    // Every document parses; CRDs first, then the namespace they do not need.
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&printed)
        .map(|d| {
            serde_yaml::Value::deserialize(d).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        &kinds[..4],
        [
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Namespace"
        ]
    );
}
