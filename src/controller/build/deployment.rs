//! The runner Deployment: `toolwarden runner` in pods with exactly the documented
//! securityContext (`hostUsers: false`, only namespaced capabilities), the tool's image as
//! an image volume (its root file system, nothing unpacked), the admitted tool from the
//! ConfigMap, secrets as 0400 files (never environment variables), audit records on stdout.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use serde_json::{Value, json};

use super::{BuildError, ChildNames, Settings, ToolRootfs, child_meta, from_json};
use crate::api::AgentTool;
use crate::controller::labels::{CONFIG_HASH, child_labels};
use crate::controller::validate::Admitted;
use crate::runner::images::entry_name;
use crate::sandbox::pod::runner_security_context;

/// The runner's one HTTP port: REST, MCP, probes.
pub const RUNNER_PORT: u16 = 8080;
const TOOLS_DIR: &str = "/etc/toolwarden/tools";
const STATE_DIR: &str = "/run/toolwarden";
const IMAGE_VOLUMES_DIR: &str = "/var/lib/toolwarden/image-volumes";
const VOLUMES_DIR: &str = "/var/lib/toolwarden/volumes";
const SECRETS_DIR: &str = "/var/run/secrets/toolwarden";
/// Where `audit.persistentVolumeClaim` is mounted: one `<pod>.jsonl` per runner pod.
const AUDIT_DIR: &str = "/var/log/toolwarden/audit";
/// Where in-cluster clients (the runner's TokenReview client) look for their credentials.
const API_CREDENTIALS_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Lifetime of the runner's own API token; the kubelet renews it at 80%.
const API_TOKEN_SECONDS: u32 = 3600;
/// Enough CPU that warm-pool refills are not throttled (p90 3.1 ms at 500m, 78 ms at 200m).
pub const MIN_CPU_REQUEST: &str = "500m";
const SECRET_FILE_MODE: u32 = 0o400;
/// Where the copy init container writes the tool's file system: its only writable path.
const ROOTFS_COPY_DIR: &str = "/toolwarden-rootfs";
/// `sh -c` script of the copy init container (`$1`: the root to copy, `$2`: the target):
/// the image's own file system, without the pod's mounts over `/proc`, `/sys` and `/dev`
/// (their mount points are made empty) or the target. Symlinks are copied as links; no
/// owner or set-id bit survives (the copy needs no capability and is read-only later).
pub(crate) const ROOTFS_COPY_SCRIPT: &str = r#"set -eu
cd "$1"
for entry in * .[!.]* ..?*; do
  [ -e "$entry" ] || [ -L "$entry" ] || continue
  case "$entry" in proc|sys|dev|toolwarden-rootfs) continue ;; esac
  cp -R -P "$entry" "$2/"
done
mkdir -p "$2/proc" "$2/sys" "$2/dev" "$2/tmp"
"#;

/// The runner container's memory limit: the outer bound of all its sandboxes' memory.
pub const RUNNER_MEMORY_LIMIT: &str = "1Gi";

pub fn build(
    admitted: &Admitted,
    names: &ChildNames,
    settings: &Settings,
    config_hash: &str,
) -> Result<Deployment, BuildError> {
    let tool = &admitted.tool;
    let labels = child_labels(tool);
    let (volumes, mounts) = volumes(tool, names, settings.tool_rootfs);
    let namespace = tool.metadata.namespace.as_deref().unwrap_or_default();
    let service_names = [
        names.runner.clone(),
        format!("{}.{namespace}", names.runner),
        format!("{}.{namespace}.svc", names.runner),
        format!("{}.{namespace}.svc.cluster.local", names.runner),
    ];
    let mut args = vec![
        "runner".to_string(),
        "--tools".into(),
        TOOLS_DIR.into(),
        "--listen".into(),
        format!("0.0.0.0:{RUNNER_PORT}"),
        "--state-dir".into(),
        STATE_DIR.into(),
        "--image-volumes".into(),
        IMAGE_VOLUMES_DIR.into(),
        "--volumes".into(),
        VOLUMES_DIR.into(),
        // A pod's cgroup tree is read-only: sandboxes get rlimits, bounded by the runner
        // container's cgroup (the tool's status says so per limit). Without the flag every
        // tool that does not set `sandbox.allowDegraded` would be refused in the pod.
        "--allow-degraded".into(),
    ];
    if !tool.spec.secrets.is_empty() {
        args.extend(["--secrets-dir".into(), SECRETS_DIR.into()]);
    }
    // Audit records go to stdout (what log pipelines collect) unless the tool names a
    // PVC; the kubelet expands `$(POD_NAME)`, so replicas never share a file.
    if tool.spec.audit.persistent_volume_claim.is_some() {
        args.extend([
            "--audit-log".into(),
            format!("{AUDIT_DIR}/$(POD_NAME).jsonl"),
        ]);
    }
    for host in service_names {
        args.extend(["--allowed-host".into(), host]);
    }
    // Only a tool with its own identity: the runner mints each call a token of it, bound
    // to this pod (named by the downward API below).
    let mints_tokens = !tool.spec.permissions.kubernetes.is_empty();
    if mints_tokens {
        args.extend(["--tool-service-account".into(), names.tool.clone()]);
    }
    let probe = |path: &str, period: u32| {
        json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
               "timeoutSeconds": 2, "failureThreshold": 3})
    };
    let mut pod_spec = json!({
        "serviceAccountName": names.runner,
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "hostUsers": false,
        "terminationGracePeriodSeconds": 30,
        "topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": labels},
        }],
        "containers": [{
            "name": "runner",
            "image": settings.runner_image,
            "args": args,
            "ports": [{"name": "http", "containerPort": RUNNER_PORT, "protocol": "TCP"}],
            "securityContext": runner_security_context(),
            "resources": {
                "requests": {"cpu": MIN_CPU_REQUEST, "memory": "256Mi"},
                "limits": {"memory": RUNNER_MEMORY_LIMIT},
            },
            "readinessProbe": probe("/readyz", 5),
            "livenessProbe": probe("/healthz", 10),
            // A start refusal (`ImageLacksMountPoints: ...`) is the runner's own line in
            // /dev/termination-log. Never the log tail: stdout carries audit records, which
            // readers of the pod's status may not be allowed to see.
            "terminationMessagePolicy": "File",
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    });
    if settings.tool_rootfs == ToolRootfs::Copy {
        pod_spec["initContainers"] = json!([{
            "name": "tool-rootfs",
            "image": tool.spec.runtime.image,
            "command": ["/bin/sh", "-c", ROOTFS_COPY_SCRIPT, "copy-rootfs", "/", ROOTFS_COPY_DIR],
            "securityContext": rootfs_copy_security_context(),
            "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
            // Why a copy failed (no /bin/sh, a file cp cannot read) is in its log.
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [{"name": "tool-image", "mountPath": ROOTFS_COPY_DIR}],
        }]);
    }
    let downward = |name: &str, field: &str| json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field}}});
    let mut env = Vec::new();
    if tool.spec.audit.persistent_volume_claim.is_some() || mints_tokens {
        env.push(downward("POD_NAME", "metadata.name"));
    }
    if mints_tokens {
        env.push(downward("POD_UID", "metadata.uid"));
    }
    if !env.is_empty() {
        pod_spec["containers"][0]["env"] = json!(env);
    }
    if let Some(class) = &tool.spec.sandbox.runtime_class_name {
        pod_spec["runtimeClassName"] = json!(class);
    }
    let spec = from_json(
        "Deployment",
        json!({
            "replicas": admitted.replicas(),
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {CONFIG_HASH: config_hash}},
                "spec": pod_spec,
            },
        }),
    )?;
    Ok(Deployment {
        metadata: child_meta(tool, &names.runner)?,
        spec: Some(spec),
        status: None,
    })
}

/// The pod's volumes and the runner container's mounts of them.
/// The copy init container runs the tool's (untrusted) image: no capability at all, no
/// privilege escalation, nothing writable but the target.
pub fn rootfs_copy_security_context() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsUser": 0,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn volumes(tool: &AgentTool, names: &ChildNames, rootfs: ToolRootfs) -> (Vec<Value>, Vec<Value>) {
    let image = &tool.spec.runtime.image;
    let tool_image = match rootfs {
        ToolRootfs::ImageVolume => {
            json!({"name": "tool-image", "image": {"reference": image, "pullPolicy": "IfNotPresent"}})
        }
        ToolRootfs::Copy => json!({"name": "tool-image", "emptyDir": {}}),
    };
    let mut volumes = vec![
        json!({"name": "tools", "configMap": {"name": names.runner, "defaultMode": 0o444}}),
        json!({"name": "state", "emptyDir": {}}),
        tool_image,
        json!({"name": "api-credentials", "projected": {"defaultMode": 0o444, "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": API_TOKEN_SECONDS}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]}}),
    ];
    let mut mounts = vec![
        json!({"name": "tools", "mountPath": TOOLS_DIR, "readOnly": true}),
        json!({"name": "state", "mountPath": STATE_DIR}),
        json!({"name": "tool-image", "mountPath": format!("{IMAGE_VOLUMES_DIR}/{}", entry_name(image)), "readOnly": true}),
        json!({"name": "api-credentials", "mountPath": API_CREDENTIALS_DIR, "readOnly": true}),
    ];
    // One volume per Secret with only the declared keys: `SECRETS_DIR/<secret>/<key>`, the
    // layout `--secrets-dir` reads; the runner hands each to a sandbox as declared.
    let secrets: BTreeSet<&str> = tool
        .spec
        .secrets
        .iter()
        .map(|s| s.secret_name.as_str())
        .collect();
    for (index, secret) in secrets.into_iter().enumerate() {
        let keys: BTreeSet<&str> = tool
            .spec
            .secrets
            .iter()
            .filter(|s| s.secret_name == secret)
            .map(|s| s.key.as_str())
            .collect();
        let items: Vec<Value> = keys
            .into_iter()
            .map(|key| json!({"key": key, "path": key}))
            .collect();
        let name = format!("secret-{index}");
        volumes.push(json!({"name": name, "secret": {
            "secretName": secret, "defaultMode": SECRET_FILE_MODE, "items": items}}));
        mounts.push(
            json!({"name": name, "mountPath": format!("{SECRETS_DIR}/{secret}"), "readOnly": true}),
        );
    }
    // PVCs and ConfigMaps the sandbox mounts: `VOLUMES_DIR/pvc/<claim>`, `.../configmap/<name>`;
    // a claim is writable in the pod when any of the tool's mounts of it is.
    let mut sources: BTreeMap<(&str, &str), bool> = BTreeMap::new();
    for mount in &tool.spec.permissions.filesystem {
        if let Some(claim) = &mount.persistent_volume_claim {
            *sources.entry(("pvc", claim)).or_insert(true) &= mount.read_only;
        }
        if let Some(config_map) = &mount.config_map {
            sources.insert(("configmap", config_map), true);
        }
    }
    if let Some(claim) = &tool.spec.audit.persistent_volume_claim {
        volumes.push(json!({"name": "audit", "persistentVolumeClaim": {"claimName": claim}}));
        mounts.push(json!({"name": "audit", "mountPath": AUDIT_DIR}));
    }
    for (index, ((kind, name), read_only)) in sources.into_iter().enumerate() {
        let volume = format!("volume-{index}");
        volumes.push(if kind == "pvc" {
            json!({"name": volume, "persistentVolumeClaim": {"claimName": name, "readOnly": read_only}})
        } else {
            json!({"name": volume, "configMap": {"name": name, "defaultMode": 0o444}})
        });
        mounts.push(json!({"name": volume, "mountPath": format!("{VOLUMES_DIR}/{kind}/{name}"), "readOnly": read_only}));
    }
    (volumes, mounts)
}
