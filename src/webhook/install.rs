//! The install as objects: what `toolwarden manifests` prints and the Helm
//! chart (charts/toolwarden) renders with its default values (tests/chart.rs
//! keeps the two identical). The controller and the webhook run as two
//! Deployments with separate ServiceAccounts, so each holds only its own RBAC.

use serde_json::{Value, json};

use super::workloads::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, WORKLOAD_KINDS};
use crate::controller::runner_token_review::TOKEN_REVIEW_ROLE;

pub const WEBHOOK_CONFIGURATION: &str = "toolwarden";
pub const WEBHOOK_SERVICE: &str = "toolwarden-webhook";
pub const WEBHOOK_TLS_SECRET: &str = "toolwarden-webhook-tls";
pub const WEBHOOK_PORT: u16 = 8443;
/// What the API server waits for an answer; the webhook's own deadline (3 s) stays below it.
pub const TIMEOUT_SECONDS: i32 = 5;

/// The choices an install makes (the chart's values).
#[derive(Clone, Debug)]
pub struct Install {
    pub namespace: String,
    pub image: String,
    pub controller_service_account: String,
    pub webhook_service_account: String,
    pub webhook_replicas: u32,
    /// Serving certificate from cert-manager instead of self-managed.
    pub cert_manager: bool,
    /// A cluster-wide ToolPolicy named `default` with the full checklist in `warn` mode.
    pub default_policy: bool,
    /// ValidatingAdmissionPolicies for the rules CEL can express (see [`super::admission_policies`]).
    pub admission_policies: bool,
}

impl Default for Install {
    fn default() -> Self {
        Install {
            namespace: "toolwarden".into(),
            image: format!(
                "docker.io/toolwarden/toolwarden:{}",
                env!("CARGO_PKG_VERSION")
            ),
            controller_service_account: "toolwarden-controller".into(),
            webhook_service_account: "toolwarden-webhook".into(),
            webhook_replicas: 2,
            cert_manager: false,
            default_policy: false,
            admission_policies: false,
        }
    }
}

fn labels(component: &str) -> Value {
    json!({"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": "toolwarden"})
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> Value {
    let mut meta = json!({"name": name, "labels": labels(component)});
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    meta
}

impl Install {
    /// Every object of the install, CRDs first, in apply order.
    pub fn objects(&self) -> Vec<Value> {
        let mut objects: Vec<Value> = crate::api::all_crds()
            .into_iter()
            .map(|crd| serde_json::to_value(crd).expect("CRDs serialize"))
            .collect();
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": self.namespace, "labels": {"app.kubernetes.io/part-of": "toolwarden"}}}));
        objects.extend(self.chart_objects());
        objects
    }

    /// The objects the chart's templates render (no CRDs, no Namespace: Helm
    /// installs `crds/` itself and creates the namespace with `--create-namespace`).
    pub fn chart_objects(&self) -> Vec<Value> {
        let mut objects = vec![];
        objects.extend(self.controller_objects());
        objects.extend(self.webhook_objects());
        if self.default_policy {
            objects.push(default_policy());
        }
        if self.admission_policies {
            objects.extend(super::admission_policies::objects(&self.namespace));
        }
        objects
    }

    fn controller_objects(&self) -> Vec<Value> {
        let ns = self.namespace.as_str();
        let sa = self.controller_service_account.as_str();
        let component = "toolwarden-controller";
        let write = json!([
            "get", "list", "watch", "create", "update", "patch", "delete"
        ]);
        let read = json!(["get", "list", "watch"]);
        vec![
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(sa, Some(ns), component)}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": meta("toolwarden-controller", None, component),
            "rules": [
                {"apiGroups": ["toolwarden.dev"], "resources": ["agenttools"], "verbs": ["get", "list", "watch", "patch", "update"]},
                {"apiGroups": ["toolwarden.dev"], "resources": ["agenttools/status", "toolpolicies/status"], "verbs": ["get", "patch", "update"]},
                {"apiGroups": ["toolwarden.dev"], "resources": ["agenttools/finalizers"], "verbs": ["update"]},
                {"apiGroups": ["toolwarden.dev"], "resources": ["toolpolicies"], "verbs": read},
                // Pods: the runner pods' status, watched for the tools' conditions.
                {"apiGroups": [""], "resources": ["namespaces", "persistentvolumeclaims", "pods"], "verbs": read},
                // Referenced Secrets are checked to exist, never listed or watched.
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["configmaps", "services", "serviceaccounts"], "verbs": write},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": write},
                {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": write},
                {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": write},
                {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": write},
                // A tool's Role holds the rules the tool declares, which the controller does
                // not hold itself: `escalate` and `bind` on namespaced Roles only (no
                // ClusterRoles), and the webhook refuses a runner Role granting more than
                // its AgentTool declares.
                {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate", "bind"]},
                // Runner pods review their callers' tokens (a cluster-scoped API): the
                // controller keeps the subjects of this one binding, and may bind only
                // the one role that grants `create tokenreviews`.
                {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterrolebindings"],
                 "resourceNames": [TOKEN_REVIEW_ROLE], "verbs": ["get", "patch"]},
                {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
                 "resourceNames": [TOKEN_REVIEW_ROLE], "verbs": ["bind"]},
                {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            ]}),
            binding(
                "ClusterRoleBinding",
                "toolwarden-controller",
                None,
                "ClusterRole",
                sa,
                ns,
                component,
            ),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": meta(TOKEN_REVIEW_ROLE, None, component),
                "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]}),
            // No subjects here: the controller sets them (every runner ServiceAccount), and
            // leaving the field out keeps `helm upgrade` and `kubectl apply` from emptying it.
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": meta(TOKEN_REVIEW_ROLE, None, component),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": TOKEN_REVIEW_ROLE}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": meta("toolwarden-controller-leader", Some(ns), component),
                "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch"]}]}),
            binding(
                "RoleBinding",
                "toolwarden-controller-leader",
                Some(ns),
                "Role",
                sa,
                ns,
                component,
            ),
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta("toolwarden-controller", Some(ns), component),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels(component)},
                "template": {
                    "metadata": {"labels": labels(component)},
                    // Runner pods run this same image; the Lease is this pod's (POD_NAMESPACE, POD_NAME).
                    "spec": pod_spec(sa, container(&self.image, json!(["controller", "--runner-image", self.image, "--tool-rootfs", "image-volume"]), json!({
                        "requests": {"cpu": "100m", "memory": "64Mi"},
                        "limits": {"cpu": "1", "memory": "256Mi"}}))),
                }}}),
        ]
    }

    fn webhook_objects(&self) -> Vec<Value> {
        let ns = self.namespace.as_str();
        let sa = self.webhook_service_account.as_str();
        let component = "toolwarden-webhook";
        let mut objects = vec![
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(sa, Some(ns), component)}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": meta("toolwarden-webhook", None, component),
            "rules": [
                {"apiGroups": ["toolwarden.dev"], "resources": ["agenttools", "toolpolicies"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
            ]}),
            binding(
                "ClusterRoleBinding",
                "toolwarden-webhook",
                None,
                "ClusterRole",
                sa,
                ns,
                component,
            ),
        ];
        if !self.cert_manager {
            objects.extend([
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": meta("toolwarden-webhook-ca-bundle", None, component),
                    "rules": [{"apiGroups": ["admissionregistration.k8s.io"], "resources": ["validatingwebhookconfigurations"],
                               "resourceNames": [WEBHOOK_CONFIGURATION], "verbs": ["get", "update"]}]}),
                binding("ClusterRoleBinding", "toolwarden-webhook-ca-bundle", None, "ClusterRole", sa, ns, component),
                // `create` cannot be limited by name; it is limited to this namespace.
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": meta("toolwarden-webhook-tls", Some(ns), component),
                    "rules": [
                        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
                        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [WEBHOOK_TLS_SECRET], "verbs": ["get", "update"]},
                    ]}),
                binding("RoleBinding", "toolwarden-webhook-tls", Some(ns), "Role", sa, ns, component),
            ]);
        } else {
            objects.extend([
                json!({"apiVersion": "cert-manager.io/v1", "kind": "Issuer",
                    "metadata": meta("toolwarden-webhook", Some(ns), component),
                    "spec": {"selfSigned": {}}}),
                json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                    "metadata": meta("toolwarden-webhook", Some(ns), component),
                    "spec": {"secretName": WEBHOOK_TLS_SECRET,
                             "dnsNames": [format!("{WEBHOOK_SERVICE}.{ns}.svc"), format!("{WEBHOOK_SERVICE}.{ns}.svc.cluster.local")],
                             "issuerRef": {"kind": "Issuer", "name": "toolwarden-webhook"}}}),
            ]);
        }
        let mut args = json!([
            "webhook",
            "--controller-service-account",
            self.controller_service_account
        ]);
        let mut container = container(
            &self.image,
            json!([]),
            json!({
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"}}),
        );
        container["ports"] = json!([{"name": "https", "containerPort": WEBHOOK_PORT}]);
        let probe = |path: &str| json!({"httpGet": {"path": path, "port": "https", "scheme": "HTTPS"}, "periodSeconds": 5});
        container["readinessProbe"] = probe("/readyz");
        container["livenessProbe"] = probe("/healthz");
        let mut pod = pod_spec(sa, container);
        if self.cert_manager {
            args.as_array_mut().expect("array").extend([
                json!("--tls-cert"),
                json!("/etc/toolwarden/tls/tls.crt"),
                json!("--tls-key"),
                json!("/etc/toolwarden/tls/tls.key"),
            ]);
            pod["containers"][0]["volumeMounts"] =
                json!([{"name": "tls", "mountPath": "/etc/toolwarden/tls", "readOnly": true}]);
            pod["volumes"] = json!([{"name": "tls", "secret": {"secretName": WEBHOOK_TLS_SECRET}}]);
        }
        pod["containers"][0]["args"] = args;
        pod["affinity"] = json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": labels(component)}}}]}});
        objects.extend([
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": meta("toolwarden-webhook", Some(ns), component),
                "spec": {"replicas": self.webhook_replicas, "selector": {"matchLabels": labels(component)},
                         "template": {"metadata": {"labels": labels(component)}, "spec": pod}}}),
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": meta("toolwarden-webhook", Some(ns), component),
                "spec": {"minAvailable": 1, "selector": {"matchLabels": labels(component)}}}),
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": meta(WEBHOOK_SERVICE, Some(ns), component),
                "spec": {"selector": labels(component),
                         "ports": [{"name": "https", "port": 443, "targetPort": "https"}]}}),
            self.webhook_configuration(),
        ]);
        objects
    }

    /// Two webhooks behind one service path: the toolwarden kinds, and runner
    /// workloads (selected by the controller's managed-by label).
    pub fn webhook_configuration(&self) -> Value {
        let ns = self.namespace.as_str();
        let common = |name: &str, rules: Value| {
            json!({
                "name": name,
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"service": {"name": WEBHOOK_SERVICE, "namespace": ns, "path": "/validate", "port": 443}},
                "failurePolicy": "Fail",
                "matchPolicy": "Equivalent",
                "sideEffects": "None",
                "timeoutSeconds": TIMEOUT_SECONDS,
                // The immutable name label: users cannot set it to opt a namespace out.
                "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", ns]}]},
                "rules": rules,
            })
        };
        let tools = common(
            "tools.webhook.toolwarden.dev",
            json!([
                {"apiGroups": ["toolwarden.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
                 "resources": ["agenttools", "toolpolicies"], "scope": "*"},
                {"apiGroups": ["toolwarden.dev"], "apiVersions": ["v1alpha1"], "operations": ["UPDATE"],
                 "resources": ["toolapprovals/status"], "scope": "Namespaced"},
            ]),
        );
        let mut workload_rules: Vec<Value> = Vec::new();
        for (group, _, resource) in WORKLOAD_KINDS {
            let existing = workload_rules
                .iter_mut()
                .find(|r| r["apiGroups"][0] == *group);
            match existing {
                Some(rule) => rule["resources"].as_array_mut().expect("array").push(json!(resource)),
                None => workload_rules.push(json!({"apiGroups": [group], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE", "DELETE"], "resources": [resource], "scope": "Namespaced"})),
            }
        }
        // Debug containers added to a running runner pod.
        if let Some(core) = workload_rules.iter_mut().find(|r| r["apiGroups"][0] == "") {
            core["resources"]
                .as_array_mut()
                .expect("array")
                .push(json!("pods/ephemeralcontainers"));
        }
        let mut workloads = common("workloads.webhook.toolwarden.dev", json!(workload_rules));
        workloads["objectSelector"] = json!({"matchLabels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}});
        let mut metadata = meta(WEBHOOK_CONFIGURATION, None, "toolwarden-webhook");
        if self.cert_manager {
            metadata["annotations"] =
                json!({"cert-manager.io/inject-ca-from": format!("{ns}/toolwarden-webhook")});
        }
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
               "metadata": metadata, "webhooks": [tools, workloads]})
    }
}

fn binding(
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    role_kind: &str,
    sa: &str,
    sa_namespace: &str,
    component: &str,
) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind,
           "metadata": meta(name, namespace, component),
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
           "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_namespace}]})
}

/// toolwarden's own containers: non-root, read-only, no capabilities.
fn container(image: &str, args: Value, resources: Value) -> Value {
    json!({
        "name": "toolwarden",
        "image": image,
        "args": args,
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
    })
}

fn pod_spec(service_account: &str, container: Value) -> Value {
    json!({"serviceAccountName": service_account, "enableServiceLinks": false, "containers": [container]})
}

/// The full checklist in `warn` mode: every tool reports what a strict policy
/// would refuse, nothing is refused.
fn default_policy() -> Value {
    json!({"apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy",
    "metadata": {"name": "default", "labels": {"app.kubernetes.io/part-of": "toolwarden"}},
    "spec": {"mode": "warn", "rules": {
        "inputValidation": {"requireStrictSchema": true},
        "sanitization": {"requireForFreeText": true},
        "leastPrivilege": {"forbidSecretAccess": true, "forbidClusterScope": true, "forbidHostPath": true},
        "sandboxing": {"maxTimeoutMs": 30000, "maxMemory": "512Mi", "maxPids": 256},
        "auditLogging": {"minLevel": "digest", "forbidFullWithSecrets": true},
        "humanOversight": {"requireApprovalForRisk": ["high"], "requireApprovalForKubernetesWrites": true},
        "rateLimiting": {"required": true},
        "secretManagement": {"requireInjection": true},
    }}})
}

/// Objects as one multi-document YAML stream.
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml::to_string(o).expect("JSON values serialize as YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}
