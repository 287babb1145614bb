//! The runner in least-privilege pods on a real node: `hostUsers: false` and exactly the
//! documented securityContext ([`toolwarden::sandbox::pod::runner_security_context`]), the
//! tool's root file system from an image volume, tools from a ConfigMap, calls through each
//! pod's Service (the API server's service proxy).
//!
//! Needs, besides `KUBECONFIG`: a Ready node, `TOOLWARDEN_E2E_RUNNER_IMAGE` (the image
//! `scripts/build-image.sh` builds, imported into the node's containerd) and
//! `TOOLWARDEN_E2E_TOOL_IMAGE` (an image with `/bin/sh` and empty `/proc`, `/dev`, `/tmp`:
//! `scripts/build-image.sh --busybox-tool` builds one), both used with
//! `imagePullPolicy: IfNotPresent`. Prints SKIPPED with the missing piece otherwise.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{LogParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use toolwarden::runner::images::entry_name;
use toolwarden::sandbox::pod::runner_security_context;

use super::{TestNamespace, cluster, ready_node};

const RUNNER_IMAGE_ENV: &str = "TOOLWARDEN_E2E_RUNNER_IMAGE";
const TOOL_IMAGE_ENV: &str = "TOOLWARDEN_E2E_TOOL_IMAGE";
const PORT: u16 = 8080;
/// The pod's memory limit, which the banner must report as the outer bound.
const POD_MEMORY_LIMIT: &str = "1073741824";
const IMAGES_DIR: &str = "/var/lib/toolwarden/image-volumes";

/// What this test needs beyond a reachable cluster, or why it cannot run.
struct Setup {
    client: Client,
    runner_image: String,
    tool_image: String,
    node: String,
}

async fn setup() -> Result<Setup, String> {
    let client = cluster().await?;
    let env = |name: &str| {
        std::env::var(name).map_err(|_| {
            format!("{name} is not set (an image imported into the node's containerd)")
        })
    };
    let runner_image = env(RUNNER_IMAGE_ENV)?;
    let tool_image = env(TOOL_IMAGE_ENV)?;
    let node = ready_node(&client).await?;
    Ok(Setup {
        client,
        runner_image,
        tool_image,
        node,
    })
}

/// The example execute-code tool on the tool image, with room for many calls.
fn tool_manifest(tool_image: &str) -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/execute-code.yaml"
    ))
    .unwrap()
    .replace("docker.io/library/busybox:1.36.1", tool_image)
    .replace("requestsPerMinute: 30", "requestsPerMinute: 6000")
}

/// One runner pod with the documented security settings, pinned to `node`.
fn runner_pod(setup: &Setup, name: &str) -> Pod {
    let image_mount = format!("{IMAGES_DIR}/{}", entry_name(&setup.tool_image));
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "toolwarden-e2e-runner", "runner": name}},
        "spec": {
            "hostUsers": false,
            "nodeName": setup.node,
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "restartPolicy": "Never",
            "containers": [{
                "name": "runner",
                "image": setup.runner_image,
                "imagePullPolicy": "IfNotPresent",
                "args": ["serve", "/etc/toolwarden/tools",
                         "--listen", format!("0.0.0.0:{PORT}"), "--anonymous", "allow",
                         "--image-volumes", IMAGES_DIR, "--state-dir", "/run/toolwarden",
                         "--allow-degraded"],
                "ports": [{"name": "http", "containerPort": PORT}],
                "securityContext": runner_security_context(),
                "resources": {
                    "requests": {"cpu": "500m", "memory": "256Mi"},
                    "limits": {"cpu": "1", "memory": POD_MEMORY_LIMIT},
                },
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": PORT},
                                   "periodSeconds": 1},
                "volumeMounts": [
                    {"name": "tools", "mountPath": "/etc/toolwarden/tools", "readOnly": true},
                    {"name": "state", "mountPath": "/run/toolwarden"},
                    {"name": "tool-image", "mountPath": image_mount, "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "tools", "configMap": {"name": "tools"}},
                {"name": "state", "emptyDir": {}},
                {"name": "tool-image",
                 "image": {"reference": setup.tool_image, "pullPolicy": "IfNotPresent"}},
            ],
        },
    }))
    .unwrap()
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"runner": name},
                 "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]},
    }))
    .unwrap()
}

struct Cluster {
    client: Client,
    ns: String,
}

impl Cluster {
    /// One request to the runner behind Service `svc`, through the API server's proxy.
    async fn http(&self, svc: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let uri = format!(
            "/api/v1/namespaces/{}/services/{svc}:http/proxy{path}",
            self.ns
        );
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(kube::client::Body::from(body))
            .unwrap();
        let response = self.client.send(request).await.expect("proxy request");
        let status = response.status().as_u16();
        let bytes = response.into_body().collect_bytes().await.expect("body");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn call(&self, svc: &str, code: &str) -> (u16, Value) {
        let path = "/v1/tools/execute-code/invoke";
        self.http(svc, "POST", path, Some(json!({ "code": code })))
            .await
    }

    async fn metrics(&self, svc: &str) -> String {
        let (status, v) = self.http(svc, "GET", "/metrics", None).await;
        assert_eq!(status, 200, "{v}");
        v.as_str().unwrap_or_default().to_string()
    }

    async fn logs(&self, pod: &str) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        pods.logs(pod, &LogParams::default())
            .await
            .unwrap_or_default()
    }

    async fn wait_ready(&self, pod: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let p = pods.get(pod).await.expect("get pod");
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pod {pod} not Ready within 180 s: {:?}\nlogs:\n{}",
                p.status,
                self.logs(pod).await
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn output(v: &Value) -> String {
    v["output"].as_str().unwrap_or_default().to_string()
}

/// Starts 40 background processes, more than the tool's `pids: 16` allows.
const FORK_40: &str = "i=0; while [ $i -lt 40 ]; do sleep 3 & i=$((i+1)); done";

#[tokio::test]
async fn runner_pods_with_only_namespaced_capabilities_serve_and_enforce_every_limit() {
    let setup = match setup().await {
        Ok(s) => s,
        Err(why) => {
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
    let client = setup.client.clone();
    let namespace = TestNamespace::create(&client, "toolwarden-e2e-pod").await;
    let ns = namespace.name.clone();
    let c = Cluster {
        client: client.clone(),
        ns: ns.clone(),
    };
    let post = PostParams::default();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let tools = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("tools".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "execute-code.yaml".to_string(),
            tool_manifest(&setup.tool_image),
        )])),
        ..Default::default()
    };
    config_maps
        .create(&post, &tools)
        .await
        .expect("tools ConfigMap");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    for name in ["runner-a", "runner-b"] {
        pods.create(&post, &runner_pod(&setup, name))
            .await
            .expect("runner pod");
        services
            .create(&post, &service(name))
            .await
            .expect("service");
    }
    c.wait_ready("runner-a").await;
    c.wait_ready("runner-b").await;
    // The pods run as documented: nothing (an admission plugin, a default) changed them.
    for name in ["runner-a", "runner-b"] {
        let spec = pods
            .get(name)
            .await
            .expect("get pod")
            .spec
            .expect("pod spec");
        assert_eq!(spec.host_users, Some(false), "{name}");
        let mut context = spec.containers[0]
            .security_context
            .clone()
            .expect("context");
        // The API server defaults procMount to "Default" (the runtime's masked /proc).
        if context.proc_mount.as_deref() == Some("Default") {
            context.proc_mount = None;
        }
        assert_eq!(context, runner_security_context(), "{name}");
    }

    // The banner, the API and the metrics tell what the engine measured in the pod.
    let logs = c.logs("runner-a").await;
    let isolation = logs
        .lines()
        .find_map(|l| l.trim().strip_prefix("isolation: "))
        .unwrap_or_else(|| panic!("no isolation line in the runner's log:\n{logs}"))
        .to_string();
    for want in [
        "user namespace: yes (sandbox ids 0-65534 are the runner's 1-65535)",
        "root switch: ",
        POD_MEMORY_LIMIT,
    ] {
        assert!(isolation.contains(want), "want {want:?} in {isolation:?}");
    }
    let (status, listed) = c.http("runner-a", "GET", "/v1/tools", None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["isolation"], Value::String(isolation.clone()));

    // A call runs, as the sandbox user inside the pod's ids.
    let (status, v) = c.call("runner-a", "id -u; cat /proc/self/uid_map").await;
    assert_eq!(status, 200, "{v}\n{}", c.logs("runner-a").await);
    let out = output(&v);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"65534"), "{out}");
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map, ["0", "1", "65535"], "{out}");
    let metrics = c.metrics("runner-a").await;
    assert!(
        metrics.contains(
            "sandbox_enforcement{tool=\"execute-code\",limit=\"userNamespace\",mechanism=\"yes\"} 1"
        ),
        "{metrics}"
    );

    // Each limit enforced: memory, processes, time (fork bomb, busy loop), output.
    let (_, v) = c.call("runner-a", "tail /dev/zero; echo rc=$?").await;
    let out = output(&v);
    assert!(
        out.contains("rc=1") || out.contains("rc=137"),
        "memory bomb: {v}"
    );
    let (status, v) = c
        .call("runner-a", &format!("sh -c '{FORK_40}' 2>&1; echo rc=$?"))
        .await;
    assert!(
        status == 200 && output(&v).contains("can't fork"),
        "pids: {v}"
    );
    let started = Instant::now();
    let (status, v) = c.call("runner-a", "f(){ f|f& }; f; sleep 100").await;
    assert_eq!(status, 504, "fork bomb: {v}");
    let (status, v) = c.call("runner-a", "while :; do :; done").await;
    assert_eq!(status, 504, "busy loop: {v}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let (status, v) = c
        .call("runner-a", "head -c 100000 /dev/zero | tr '\\0' a")
        .await;
    assert_eq!((status, output(&v).len()), (200, 4096), "output cap: {v}");
    assert_eq!(v["outputTruncated"], true, "{v}");

    // Two runner pods on one node do not share a process budget: while a call in pod A holds
    // every process its limit allows, pod B's calls run.
    let hog_code =
        format!("sh -c '{FORK_40}' 2>/tmp/e; read -r why </tmp/e; echo \"$why\"; exec sleep 0.5");
    let hog = c.call("runner-a", &hog_code);
    let other = async {
        // Aimed into pod A's 0.5 s at its limit; B's calls must succeed whenever they land.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(c.call("runner-b", "echo ok").await);
        }
        answers
    };
    let ((status, held), answers) = tokio::join!(hog, other);
    assert!(
        status == 200 && output(&held).contains("can't fork"),
        "{held}"
    );
    for (status, v) in answers {
        assert_eq!((status, output(&v)), (200, "ok\n".to_string()), "{v}");
    }

    // 200 calls, failures included; then no zombie in the pod.
    for i in 0..200 {
        let code = match i % 8 {
            0 => "exit 3",
            1 => "sleep 30",
            2 => "sleep 30 & echo background",
            3 => "tail /dev/zero",
            4 => "f(){ f|f& }; f",
            _ => "echo ok",
        };
        let (status, v) = c.call("runner-a", code).await;
        assert!(matches!(status, 200 | 502 | 504), "{code}: {status} {v}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = c.metrics("runner-a").await;
        if metrics.contains("pid_namespace_zombies 0\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zombies left in the runner pod:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, v) = c.call("runner-a", "echo still serving").await;
    assert_eq!(
        (status, output(&v)),
        (200, "still serving\n".to_string()),
        "{v}"
    );

    namespace.delete().await;
}
