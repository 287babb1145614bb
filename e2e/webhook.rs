//! The admission webhook against a real API server: the webhook runs in this
//! process with its own certificate, registered by URL, scoped to the test
//! namespace. Through the API: a violating AgentTool is denied naming every
//! rule; the same in `warn` mode is admitted with warnings; a tampered runner
//! Deployment is denied; a self-approval is denied; and with the webhook gone,
//! the emitted ValidatingAdmissionPolicies still reject the violating tool.
//!
//! Needs, besides `KUBECONFIG`: an address of this machine the API server can
//! reach (`TOOLWARDEN_E2E_WEBHOOK_HOST`; default: the local address of the route
//! to the API server). Creates cluster-scoped objects named
//! `toolwarden-e2e-<pid>` (a ToolPolicy, a ValidatingWebhookConfiguration,
//! ValidatingAdmissionPolicies and bindings), all selecting only the test
//! namespace, and deletes them at the end.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use toolwarden::api::{AgentTool, ToolApproval, ToolPolicy};
use toolwarden::sandbox::pod::runner_security_context;
use toolwarden::webhook::certs::{self, CertStore};
use toolwarden::webhook::install::Install;
use toolwarden::webhook::server::{self, Limits};
use toolwarden::webhook::{Admission, ClusterView, Config, admission_policies};

use super::{TestNamespace, cluster, dry_run, examples, install_crds};

const HOST_ENV: &str = "TOOLWARDEN_E2E_WEBHOOK_HOST";

/// An address of this machine on the route to the API server.
async fn reachable_host() -> Result<IpAddr, String> {
    if let Ok(host) = std::env::var(HOST_ENV) {
        return host.parse().map_err(|e| format!("{HOST_ENV}={host}: {e}"));
    }
    let config = kube::Config::infer().await.map_err(|e| e.to_string())?;
    let uri = config.cluster_url;
    let host = uri
        .host()
        .ok_or("the API server URL has no host")?
        .trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(443);
    let server = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or("the API server host resolves to nothing")?;
    let probe = std::net::UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .and_then(|s| s.connect(server).map(|()| s))
    .and_then(|s| s.local_addr())
    .map_err(|e| format!("no route to the API server: {e}"))?;
    if probe.ip().is_loopback() && !server.ip().is_loopback() {
        return Err(format!(
            "set {HOST_ENV}: no address the API server can reach"
        ));
    }
    Ok(probe.ip())
}

fn message(error: kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message,
        other => other.to_string(),
    }
}

/// Polls `attempt` (every 500 ms, 30 s at most) until it returns Some.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Creates a tool (dry run) and returns (allowed, the Warning headers or the denial).
async fn try_create_tool(client: &Client, namespace: &str, tool: &AgentTool) -> (bool, String) {
    let body = serde_json::to_vec(tool).unwrap();
    let request = http::Request::post(format!(
        "/apis/toolwarden.dev/v1alpha1/namespaces/{namespace}/agenttools?dryRun=All"
    ))
    .header("content-type", "application/json")
    .body(kube::client::Body::from(body))
    .unwrap();
    let response = client.send(request).await.unwrap();
    let status = response.status();
    let warnings: Vec<String> = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let body = response.into_body().collect_bytes().await.unwrap();
    if status.is_success() {
        (true, warnings.join("\n"))
    } else {
        let status: Value = serde_json::from_slice(&body).unwrap_or_default();
        (
            false,
            status["message"].as_str().unwrap_or_default().to_string(),
        )
    }
}

#[tokio::test]
async fn the_webhook_and_the_admission_policies_hold_through_the_api_server() {
    let client = match cluster().await {
        Ok(client) => client,
        Err(why) => {
            return eprintln!(
                "SKIPPED {}: {why}; set KUBECONFIG to a Kubernetes 1.33+ cluster to run it",
                module_path!()
            );
        }
    };
    let host = match reachable_host().await {
        Ok(host) => host,
        Err(why) => return eprintln!("SKIPPED {}: {why}", module_path!()),
    };
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "toolwarden-e2e-wh").await;
    let name = format!("toolwarden-e2e-{}", std::process::id());

    // The webhook, in this process, with a certificate for the address the API server dials.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let material = certs::renew(None, &[host.to_string()], now)
        .unwrap()
        .unwrap();
    let store = Arc::new(CertStore::default());
    store
        .set(&material.serving.cert_pem, &material.serving.key_pem)
        .unwrap();
    let (view, reflectors) = ClusterView::watch(&client);
    let reflectors = tokio::spawn(reflectors);
    let admission = Admission::new(Config::new(&ns.name, "toolwarden-controller"), view.clone());
    let limits = Limits::default();
    let router = server::router(Arc::new(admission), Arc::clone(&store), &limits);
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::serve(
        listener,
        certs::tls_config(store),
        router,
        limits,
        async {
            stopped.await.ok();
        },
    ));
    eventually("the webhook's stores sync", || async {
        view.is_synced().then_some(())
    })
    .await;

    // Registered by URL, for the test namespace only.
    let mut configuration = Install {
        namespace: ns.name.clone(),
        ..Install::default()
    }
    .webhook_configuration();
    configuration["metadata"] = json!({"name": name});
    let url = format!("https://{}/validate", SocketAddr::new(host, port));
    for hook in configuration["webhooks"].as_array_mut().unwrap() {
        hook["clientConfig"] = json!({"url": url, "caBundle": k8s_openapi::ByteString(material.ca_bundle(now).into_bytes())});
        hook["namespaceSelector"] =
            json!({"matchLabels": {"kubernetes.io/metadata.name": ns.name}});
    }
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    configurations
        .create(
            &PostParams::default(),
            &serde_json::from_value(configuration).unwrap(),
        )
        .await
        .expect("registering the webhook");

    // A policy for this namespace only, and a tool that breaks three of its rules.
    let policies: Api<ToolPolicy> = Api::all(client.clone());
    let policy: ToolPolicy = serde_json::from_value(json!({"apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolPolicy",
        "metadata": {"name": name},
        "spec": {"mode": "enforce", "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
                 "rules": {"sandboxing": {"maxTimeoutMs": 100, "maxPids": 8}, "rateLimiting": {"maxRequestsPerMinute": 1}}}}))
    .unwrap();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("creating the ToolPolicy");
    let manifests = examples();
    let mut tool = manifests
        .tools
        .iter()
        .find(|t| t.object.metadata.name.as_deref() == Some("user-profile-update"))
        .unwrap()
        .object
        .clone();
    tool.metadata.namespace = Some(ns.name.clone());
    let rules = ["TW-SANDBOX-001", "TW-SANDBOX-003", "TW-RATE-002"];

    let denial = eventually("the webhook sees the policy", || async {
        let (allowed, text) = try_create_tool(&client, &ns.name, &tool).await;
        (!allowed && text.contains("TW-SANDBOX-001")).then_some(text)
    })
    .await;
    for rule in rules {
        assert!(denial.contains(rule), "{rule} not named: {denial}");
    }
    assert!(
        denial.contains("toolwarden.dev"),
        "the denial comes from the webhook: {denial}"
    );

    // warn: admitted, with a warning per rule.
    policies
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"mode": "warn"}})),
        )
        .await
        .unwrap();
    let warnings = eventually("warn mode reaches the webhook", || async {
        let (allowed, text) = try_create_tool(&client, &ns.name, &tool).await;
        allowed.then_some(text)
    })
    .await;
    for rule in rules {
        assert!(warnings.contains(rule), "{rule} not warned: {warnings}");
    }

    // A runner Deployment changed by someone other than the controller, made privileged.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let mut context = serde_json::to_value(runner_security_context()).unwrap();
    context["privileged"] = json!(true);
    let labels = json!({"app.kubernetes.io/managed-by": "toolwarden", "app.kubernetes.io/name": "toolwarden-runner",
                        "toolwarden.dev/tool": "user-profile-update"});
    let tampered: Deployment = serde_json::from_value(json!({"metadata": {"name": "user-profile-update", "labels": labels},
        "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels},
            "spec": {"hostUsers": false, "containers": [{"name": "runner", "image": "busybox", "securityContext": context}]}}}}))
    .unwrap();
    let denied = message(
        deployments
            .create(&dry_run(), &tampered)
            .await
            .expect_err("a tampered runner Deployment"),
    );
    assert!(denied.contains("only the controller"), "{denied}");

    // Self-approval: the caller of record approves their own call.
    let me = Api::<SelfSubjectReview>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({})).unwrap(),
        )
        .await
        .expect("SelfSubjectReview")
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .expect("my user name");
    let mut approvable = tool.clone();
    approvable.metadata.name = Some("approvable".into());
    approvable.spec.approval = Some(
        serde_json::from_value(json!({"required": true, "approvers": {"users": [me]}})).unwrap(),
    );
    approvable.spec.sandbox.timeout_ms = 100;
    approvable.spec.sandbox.pids = 8;
    approvable.spec.rate_limit = None;
    let tools: Api<AgentTool> = Api::namespaced(client.clone(), &ns.name);
    tools
        .create(&PostParams::default(), &approvable)
        .await
        .expect("a compliant tool");
    let approvals: Api<ToolApproval> = Api::namespaced(client.clone(), &ns.name);
    let approval: ToolApproval = serde_json::from_value(json!({"apiVersion": "toolwarden.dev/v1alpha1", "kind": "ToolApproval",
        "metadata": {"name": "call-1"},
        "spec": {"toolRef": "approvable", "invocationId": "inv-1", "caller": me, "inputDigest": "sha256:00",
                 "summary": "e2e", "expiresAt": "2030-01-01T00:00:00Z"}}))
    .unwrap();
    approvals
        .create(&PostParams::default(), &approval)
        .await
        .expect("a ToolApproval");
    eventually("the webhook sees the tool", || async {
        view.tool(&ns.name, "approvable").map(|_| ())
    })
    .await;
    let decision = json!({"status": {"decision": "Approved", "decidedBy": me, "decidedAt": "2026-01-01T00:00:00Z"}});
    let denied = message(
        approvals
            .patch_status("call-1", &PatchParams::default(), &Patch::Merge(decision))
            .await
            .expect_err("self-approval"),
    );
    assert!(
        denied.contains("cannot decide its own approval"),
        "{denied}"
    );

    // The admission policies, scoped to this namespace, with the webhook gone.
    policies
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"mode": "enforce"}})),
        )
        .await
        .unwrap();
    stop.send(()).unwrap();
    serving.await.unwrap();
    reflectors.abort();
    configurations
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let vaps: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    let mut created = Vec::new();
    for mut object in admission_policies::objects(&ns.name) {
        let original = object["metadata"]["name"].as_str().unwrap().to_string();
        let renamed = format!("{original}-{}", std::process::id());
        object["metadata"]["name"] = json!(renamed);
        if object["kind"] == "ValidatingAdmissionPolicy" {
            vaps.create(
                &PostParams::default(),
                &serde_json::from_value(object).unwrap(),
            )
            .await
            .unwrap();
        } else {
            object["spec"]["policyName"] = json!(format!(
                "{}-{}",
                object["spec"]["policyName"].as_str().unwrap(),
                std::process::id()
            ));
            object["spec"]["matchResources"] = json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}}});
            bindings
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(object).unwrap(),
                )
                .await
                .unwrap();
        }
        created.push(renamed);
    }
    let denial = eventually("the admission policies take effect", || async {
        let (allowed, text) = try_create_tool(&client, &ns.name, &tool).await;
        (!allowed && text.contains("TW-SANDBOX-001")).then_some(text)
    })
    .await;
    assert!(
        denial.contains("ValidatingAdmissionPolicy"),
        "denied by the API server itself: {denial}"
    );

    for object in created {
        let _ = bindings.delete(&object, &DeleteParams::default()).await;
        let _ = vaps.delete(&object, &DeleteParams::default()).await;
    }
    let _ = policies.delete(&name, &DeleteParams::default()).await;
    ns.delete().await;
}
