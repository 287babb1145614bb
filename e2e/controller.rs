//! `toolwarden controller` against a real cluster, run in-process: the examples get every
//! child and their conditions, a hand-edited Deployment is put back, an enforcing
//! ToolPolicy scales a violating tool to zero with the rule named (and `warn` brings it
//! back), every runner may review tokens, deleting a tool collects its children.
//!
//! Runner pods only run on a cluster with a Ready node and the runner and tool images
//! (`TOOLWARDEN_E2E_RUNNER_IMAGE`, `TOOLWARDEN_E2E_TOOL_IMAGE`, as in `runner_pod.rs`);
//! then the test also waits for `Ready=True` and calls a tool as an authenticated caller.
//! Without them it checks everything else. With a Ready node and the runner image, a tool
//! whose image lacks the sandbox's mount points is reported with the reason.
//! `TOOLWARDEN_E2E_SCALE=1` adds the scale run: 1,000
//! AgentTools reconciled to all their children within 60 s by the `toolwarden controller`
//! binary in a process of its own, whose peak RSS must stay within 64 MiB; figures printed.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use toolwarden::api::{AgentTool, ToolPolicy};
use toolwarden::controller::build::Settings;
use toolwarden::controller::labels::children_selector;
use toolwarden::controller::run::{Options, run};
use toolwarden::controller::runner_token_review::TOKEN_REVIEW_ROLE;
use toolwarden::webhook::install::Install;

use super::{TestNamespace, cluster, examples, install_crds, ready_node, runner_call};

const SCALE_ENV: &str = "TOOLWARDEN_E2E_SCALE";
const RUNNER_IMAGE_ENV: &str = "TOOLWARDEN_E2E_RUNNER_IMAGE";
const TOOL_IMAGE_ENV: &str = "TOOLWARDEN_E2E_TOOL_IMAGE";
const SCALE_TOOLS: usize = 1000;
const SCALE_DEADLINE: Duration = Duration::from_secs(60);
/// The controller's peak resident memory through the scale run.
const SCALE_MAX_RSS_KIB: u64 = 64 * 1024;

/// Polls `check` until it returns `Some`, or fails with `what` after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn condition(tool: &AgentTool, type_: &str) -> Option<(String, String, String)> {
    let status = tool.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The controller on a background task, stopped when dropped.
struct RunningController {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningController {
    fn start(client: Client, namespace: &str) -> RunningController {
        let runner_image = std::env::var(RUNNER_IMAGE_ENV)
            .unwrap_or_else(|_| "docker.io/toolwarden/toolwarden:0.1.0".into());
        let options = Options {
            settings: Settings {
                runner_image,
                api_server: Vec::new(),
                tool_rootfs: Default::default(),
            },
            namespaces: vec![namespace.to_string()],
            lease: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("a loopback port");
            if let Err(e) = run(client, options, listener, shutdown).await {
                panic!("the controller stopped: {e}");
            }
        });
        RunningController {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
    }
}

/// Creates namespace `<prefix>-<pid>` and starts a controller watching only it.
async fn controlled_namespace(client: &Client, prefix: &str) -> (TestNamespace, RunningController) {
    let namespace = TestNamespace::create(client, prefix).await;
    let controller = RunningController::start(client.clone(), &namespace.name);
    (namespace, controller)
}

/// Creates what the tool references, so it is not refused for a missing Secret or PVC.
async fn create_references(client: &Client, ns: &str, tool: &AgentTool) {
    let post = PostParams::default();
    let meta = |name: &str| json!({"name": name, "namespace": ns});
    for secret in &tool.spec.secrets {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let object: Secret = serde_json::from_value(json!({"metadata": meta(&secret.secret_name),
            "stringData": {secret.key.clone(): "e2e-value"}}))
        .unwrap();
        if api.create(&post, &object).await.is_err() {
            // Another tool's key of the same Secret: add this one.
            let patch = json!({"stringData": {secret.key.clone(): "e2e-value"}});
            api.patch(
                &secret.secret_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .expect("secret");
        }
    }
    for mount in &tool.spec.permissions.filesystem {
        if let Some(claim) = &mount.persistent_volume_claim {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
            let object = serde_json::from_value(json!({"metadata": meta(claim), "spec": {
                "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
            .unwrap();
            let _ = api.create(&post, &object).await;
        }
        if let Some(name) = &mount.config_map {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            let object = serde_json::from_value(json!({"metadata": meta(name)})).unwrap();
            let _ = api.create(&post, &object).await;
        }
    }
}

async fn children_exist(client: &Client, ns: &str, tool: &str) -> bool {
    let selector = ListParams::default().labels(&children_selector(tool));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let counts = [
        deployments
            .list_metadata(&selector)
            .await
            .map(|l| l.items.len()),
        services
            .list_metadata(&selector)
            .await
            .map(|l| l.items.len()),
        accounts
            .list_metadata(&selector)
            .await
            .map(|l| l.items.len()),
        config_maps
            .list_metadata(&selector)
            .await
            .map(|l| l.items.len()),
        policies
            .list_metadata(&selector)
            .await
            .map(|l| l.items.len()),
    ];
    counts.iter().all(|c| matches!(c, Ok(n) if *n >= 1))
}

fn strict_policy(name: &str, ns: &str, mode: &str) -> ToolPolicy {
    serde_json::from_value(json!({
        "apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": {"name": name},
        "spec": {"mode": mode,
                 "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                 "rules": {"sandboxing": {"maxTimeoutMs": 500}}},
    }))
    .unwrap()
}

/// A `/proc/PID/status` figure in KiB (`VmHWM`: the peak resident set).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
}

/// `toolwarden controller` as its own process, so that its memory is measured alone.
struct ControllerProcess(std::process::Child);

impl ControllerProcess {
    fn start(namespace: &str) -> ControllerProcess {
        let runner_image = std::env::var(RUNNER_IMAGE_ENV)
            .unwrap_or_else(|_| "docker.io/toolwarden/toolwarden:0.1.0".into());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_toolwarden"))
            .args([
                "controller",
                "--no-leader-election",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--runner-image", &runner_image, "--namespaces", namespace])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starting toolwarden controller");
        ControllerProcess(child)
    }

    fn peak_rss_kib(&self) -> u64 {
        status_kib(self.0.id(), "VmHWM:").expect("the controller process is running")
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_controller_deploys_reports_restores_denies_and_collects() {
    let client = match cluster().await {
        Ok(client) => client,
        Err(why) => {
            eprintln!(
                "SKIPPED {}: {why}; set KUBECONFIG to a Kubernetes 1.33+ cluster to run it",
                module_path!()
            );
            return;
        }
    };
    install_crds(&client).await;
    install_runner_token_review(&client).await;
    let (namespace, controller) = controlled_namespace(&client, "toolwarden-e2e-ctl").await;
    let ns = namespace.name.clone();
    let tools: Api<AgentTool> = Api::namespaced(client.clone(), &ns);
    let apply = PatchParams::apply("toolwarden-e2e").force();

    // Every example gets its children and a compliant, reconciled status.
    let manifests = examples();
    let running = running_pods(&client).await;
    for loaded in &manifests.tools {
        let mut tool = loaded.object.clone();
        tool.metadata.namespace = Some(ns.clone());
        if let Some(images) = &running {
            // The node has no registry: every tool runs on the imported tool image.
            tool.spec.runtime.image = images.tool.clone();
        }
        create_references(&client, &ns, &tool).await;
        tools
            .patch(&tool.name_any(), &apply, &Patch::Apply(&tool))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", loaded.origin));
    }
    for loaded in &manifests.tools {
        let name = loaded.object.name_any();
        let tool = eventually(
            &format!("{name}: status"),
            Duration::from_secs(60),
            || async {
                let tool = tools.get(&name).await.ok()?;
                let generation = tool.status.as_ref()?.observed_generation;
                (generation == tool.metadata.generation).then_some(tool)
            },
        )
        .await;
        assert_eq!(
            condition(&tool, "PolicyCompliant").map(|c| c.0).as_deref(),
            Some("True"),
            "{name}"
        );
        // Without the images, a node that can run pods fails to pull the examples'
        // images: the only degradation allowed then.
        let degraded = condition(&tool, "Degraded");
        let image_missing = running.is_none()
            && degraded.as_ref().is_some_and(|(status, reason, _)| {
                status == "True" && ["ErrImagePull", "ImagePullBackOff"].contains(&reason.as_str())
            });
        assert!(
            degraded
                .as_ref()
                .is_some_and(|(status, ..)| status == "False")
                || image_missing,
            "{name}: {degraded:?}"
        );
        assert!(
            tool.status.as_ref().unwrap().endpoints.contains_key("mcp"),
            "{name}"
        );
        eventually(
            &format!("{name}: children"),
            Duration::from_secs(30),
            || async { children_exist(&client, &ns, &name).await.then_some(()) },
        )
        .await;
    }
    eprintln!("every example has its children and conditions");

    // A hand edit of the runner Deployment is put back.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let privileged = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| {
                p.containers[0]
                    .security_context
                    .as_ref()
                    .and_then(|c| c.privileged)
            })
    };
    let edit = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "runner", "securityContext": {"privileged": true}}]}}}});
    deployments
        .patch(
            "execute-code",
            &PatchParams::default(),
            &Patch::Strategic(&edit),
        )
        .await
        .expect("the hand edit");
    eventually(
        "the edited Deployment restored",
        Duration::from_secs(30),
        || async {
            let d = deployments.get("execute-code").await.ok()?;
            (privileged(&d) == Some(false)).then_some(())
        },
    )
    .await;
    eprintln!("a hand-edited Deployment was restored");

    // An enforcing policy scales the violating tool to zero, naming the rule; warn undoes it.
    let policies: Api<ToolPolicy> = Api::all(client.clone());
    let policy_name = format!("{ns}-strict");
    let replicas = |d: Deployment| d.spec.and_then(|s| s.replicas);
    for (mode, want_replicas, want_reason) in [
        ("enforce", 0, "PolicyDenied"),
        ("warn", 1, "PolicyWarnings"),
    ] {
        policies
            .patch(
                &policy_name,
                &apply,
                &Patch::Apply(&strict_policy(&policy_name, &ns, mode)),
            )
            .await
            .expect("the ToolPolicy");
        eventually(
            &format!("{mode}: replicas {want_replicas}"),
            Duration::from_secs(30),
            || async {
                let tool = tools.get("execute-code").await.ok()?;
                let (_, reason, message) = condition(&tool, "PolicyCompliant")?;
                let scaled =
                    replicas(deployments.get("execute-code").await.ok()?) == Some(want_replicas);
                (reason == want_reason && message.contains("TW-SANDBOX-") && scaled).then_some(())
            },
        )
        .await;
        eprintln!("{mode}: execute-code at {want_replicas} replicas, {want_reason}");
    }
    let _ = policies
        .delete(&policy_name, &DeleteParams::default())
        .await;

    // The runner may review its callers' tokens: its ServiceAccount is a subject of the
    // one TokenReview binding the controller keeps.
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    eventually(
        "execute-code's runner in the TokenReview binding",
        Duration::from_secs(30),
        || async {
            let binding = bindings.get(TOKEN_REVIEW_ROLE).await.ok()?;
            binding
                .subjects?
                .iter()
                .any(|s| s.name == "execute-code" && s.namespace.as_deref() == Some(&ns))
                .then_some(())
        },
    )
    .await;
    eprintln!("execute-code's runner may review tokens");

    // With a Ready node and both images, the runner pods become Ready and serve calls
    // authenticated by TokenReview.
    match &running {
        Some(_) => {
            eventually("execute-code Ready", Duration::from_secs(180), || async {
                let tool = tools.get("execute-code").await.ok()?;
                (condition(&tool, "Ready")?.0 == "True").then_some(())
            })
            .await;
            call_execute_code(&client, &ns).await;
        }
        None => eprintln!(
            "not waiting for Ready=True nor calling a tool: {}",
            running_pods_missing(&client).await
        ),
    }

    // Deleting a tool collects its children (ownerReferences, the garbage collector).
    tools
        .delete("execute-code", &DeleteParams::foreground())
        .await
        .expect("deleting the tool");
    eventually(
        "execute-code's children collected",
        Duration::from_secs(60),
        || async {
            let selector = ListParams::default().labels(&children_selector("execute-code"));
            let left = deployments.list_metadata(&selector).await.ok()?.items.len();
            (left == 0).then_some(())
        },
    )
    .await;
    eprintln!("deleting a tool collected its children");

    controller.stop().await;
    if std::env::var_os(SCALE_ENV).is_some() {
        scale_run(&client, &ns).await;
    } else {
        eprintln!("scale run SKIPPED: set {SCALE_ENV}=1");
    }
    namespace.delete().await;
}

/// A tool whose image lacks the mount points a sandbox needs: its runner pod refuses to
/// start with `ImageLacksMountPoints` in its termination message, and the tool's status says
/// so, naming what is missing. The toolwarden image is such an image (it has `/tmp` but no
/// `/proc` or `/dev`). Needs a Ready node and `TOOLWARDEN_E2E_RUNNER_IMAGE`.
#[tokio::test]
async fn a_tool_whose_image_lacks_mount_points_is_degraded_naming_them() {
    let skip = |why: String| eprintln!("SKIPPED {}: {why}", module_path!());
    let client = match cluster().await {
        Ok(client) => client,
        Err(why) => {
            return skip(format!(
                "{why}; set KUBECONFIG to a Kubernetes 1.33+ cluster"
            ));
        }
    };
    let Ok(runner_image) = std::env::var(RUNNER_IMAGE_ENV) else {
        return skip(
            "TOOLWARDEN_E2E_RUNNER_IMAGE is not set (the image scripts/build-image.sh \
                     builds, imported into the node's containerd)"
                .into(),
        );
    };
    if let Err(why) = ready_node(&client).await {
        return skip(why);
    }
    install_crds(&client).await;
    let (namespace, controller) = controlled_namespace(&client, "toolwarden-e2e-mp").await;
    let ns = namespace.name.clone();
    let tools: Api<AgentTool> = Api::namespaced(client.clone(), &ns);
    let mut tool = examples()
        .tools
        .into_iter()
        .find(|t| t.object.name_any() == "execute-code")
        .unwrap()
        .object;
    tool.metadata = kube::api::ObjectMeta {
        name: Some("no-mount-points".into()),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    tool.spec.runtime.image = runner_image;
    tools
        .patch(
            "no-mount-points",
            &PatchParams::apply("toolwarden-e2e").force(),
            &Patch::Apply(&tool),
        )
        .await
        .expect("the tool");

    let (ready, degraded, isolation) = eventually(
        "Ready=False and Degraded=True with ImageLacksMountPoints",
        Duration::from_secs(240),
        || async {
            let tool = tools.get("no-mount-points").await.ok()?;
            let ready = condition(&tool, "Ready")?;
            let degraded = condition(&tool, "Degraded")?;
            (ready.1 == "ImageLacksMountPoints" && degraded.1 == "ImageLacksMountPoints")
                .then(|| (ready, degraded, tool.status.unwrap_or_default().isolation))
        },
    )
    .await;
    assert_eq!((ready.0.as_str(), degraded.0.as_str()), ("False", "True"));
    for message in [&ready.2, &degraded.2] {
        assert!(
            message.contains("lacks the mount point(s) /proc, /dev:"),
            "{message}"
        );
    }
    assert_eq!(isolation["rootfs"], "imageVolume");
    // The runner said it itself, in the pod's termination message.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let listed = pods
        .list(&ListParams::default().labels(&children_selector("no-mount-points")))
        .await
        .expect("the runner pods");
    let said = listed.items.iter().flat_map(|pod| {
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone());
        statuses.unwrap_or_default().into_iter().flat_map(|c| {
            [c.state, c.last_state]
                .into_iter()
                .flatten()
                .filter_map(|s| s.terminated?.message)
        })
    });
    let said: Vec<String> = said.collect();
    assert!(
        said.iter()
            .any(|m| m.starts_with("ImageLacksMountPoints: tool no-mount-points")),
        "{said:?}"
    );
    eprintln!("no-mount-points: {}", degraded.2);
    controller.stop().await;
    namespace.delete().await;
}

/// The images runner pods need on a cluster without a registry.
struct Images {
    tool: String,
}

/// The images, when the cluster can run pods (a Ready node) and both are given.
async fn running_pods(client: &Client) -> Option<Images> {
    ready_node(client).await.ok()?;
    std::env::var_os(RUNNER_IMAGE_ENV)?;
    Some(Images {
        tool: std::env::var(TOOL_IMAGE_ENV).ok()?,
    })
}

/// Why [`running_pods`] found none.
async fn running_pods_missing(client: &Client) -> String {
    if let Err(why) = ready_node(client).await {
        return why;
    }
    [RUNNER_IMAGE_ENV, TOOL_IMAGE_ENV]
        .iter()
        .filter(|name| std::env::var_os(name).is_none())
        .map(|name| format!("{name} is not set"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cluster-wide grant the chart installs for runner pods (a ClusterRole allowing
/// `create tokenreviews` and its binding, whose subjects the controller keeps).
async fn install_runner_token_review(client: &Client) {
    let apply = PatchParams::apply("toolwarden-e2e").force();
    for object in Install::default().objects() {
        if object["metadata"]["name"] != TOKEN_REVIEW_ROLE {
            continue;
        }
        let kind = object["kind"].as_str().unwrap_or_default();
        let result = match kind {
            "ClusterRole" => Api::<ClusterRole>::all(client.clone())
                .patch(TOKEN_REVIEW_ROLE, &apply, &Patch::Apply(&object))
                .await
                .map(|_| ()),
            "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(client.clone())
                .patch(TOKEN_REVIEW_ROLE, &apply, &Patch::Apply(&object))
                .await
                .map(|_| ()),
            other => panic!("unexpected {other} {TOKEN_REVIEW_ROLE}"),
        };
        result.unwrap_or_else(|e| panic!("applying {kind} {TOKEN_REVIEW_ROLE}: {e}"));
    }
}

/// Calls execute-code in one of its runner pods: with a ServiceAccount token for the
/// runner's audience it runs; without a token, or with one for another audience, it is
/// refused before anything runs.
async fn call_execute_code(client: &Client, ns: &str) {
    let selector = children_selector("execute-code");
    let pod = eventually("a Ready execute-code pod", Duration::from_secs(60), || {
        runner_call::ready_pod(client, ns, &selector)
    })
    .await;
    let host = format!("execute-code.{ns}.svc");
    let invoke = |code: &str| {
        (
            "POST",
            "/v1/tools/execute-code/invoke",
            Some(json!({ "code": code })),
        )
    };
    let token = runner_call::caller_token(client, ns, "e2e-caller", "toolwarden").await;
    let (status, answer) = runner_call::request(
        client,
        (ns, &pod, &host),
        invoke("echo called-through-the-runner"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["output"].as_str().map(str::trim),
        Some("called-through-the-runner"),
        "{answer}"
    );
    let (status, answer) =
        runner_call::request(client, (ns, &pod, &host), invoke("echo nobody"), None).await;
    assert_eq!(status, 401, "no token: {answer}");
    let other_audience =
        runner_call::caller_token(client, ns, "e2e-caller", "not-toolwarden").await;
    let (status, answer) = runner_call::request(
        client,
        (ns, &pod, &host),
        invoke("echo wrong-audience"),
        Some(&other_audience),
    )
    .await;
    assert_eq!(status, 401, "a token for another audience: {answer}");
    eprintln!("execute-code answered an authenticated call and refused the others");
}

/// 1,000 tools reconciled to all their children and a status within 60 s, by the
/// controller binary, whose peak RSS stays within 64 MiB.
async fn scale_run(client: &Client, ns: &str) {
    let controller = ControllerProcess::start(ns);
    let tools: Api<AgentTool> = Api::namespaced(client.clone(), ns);
    let template = examples()
        .tools
        .into_iter()
        .find(|t| t.object.name_any() == "execute-code")
        .unwrap()
        .object;
    let started = Instant::now();
    let apply = PatchParams::apply("toolwarden-e2e").force();
    for i in 0..SCALE_TOOLS {
        let mut tool = template.clone();
        tool.metadata = kube::api::ObjectMeta {
            name: Some(format!("scale-{i}")),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([(
                "toolwarden.dev/e2e".into(),
                "scale".into(),
            )])),
            ..Default::default()
        };
        tools
            .patch(&tool.name_any(), &apply, &Patch::Apply(&tool))
            .await
            .expect("scale tool");
    }
    let created = started.elapsed();
    let done = eventually("1,000 tools reconciled", SCALE_DEADLINE, || async {
        let list = tools
            .list(&ListParams::default().labels("toolwarden.dev/e2e=scale"))
            .await
            .ok()?;
        let reconciled = list
            .items
            .iter()
            .filter(|t| {
                t.status
                    .as_ref()
                    .and_then(|s| s.observed_generation)
                    .is_some()
            })
            .count();
        (reconciled == SCALE_TOOLS).then_some(started.elapsed())
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let count = deployments
        .list_metadata(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    assert!(count >= SCALE_TOOLS, "{count} Deployments");
    let peak = controller.peak_rss_kib();
    eprintln!(
        "scale: {SCALE_TOOLS} tools applied in {created:?}, all reconciled with children in {done:?} \
         (limit {SCALE_DEADLINE:?}); controller peak RSS {peak} KiB (limit {SCALE_MAX_RSS_KIB} KiB)"
    );
    assert!(
        peak <= SCALE_MAX_RSS_KIB,
        "the controller peaked at {peak} KiB RSS reconciling {SCALE_TOOLS} tools"
    );
    drop(controller);
}
