//! `toolwarden serve` and `toolwarden audit verify` as a user runs them: the
//! real binary, real HTTP on loopback, real sandboxes, a real SIGKILL. Needs
//! root and busybox-static; each test prints SKIPPED with the reason otherwise.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SLOW_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: slow}
spec:
  description: Sleeps, then answers
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command: [/bin/sh, -c, 'cat >/dev/null; sleep 3; echo "{\"slept\":true}"']
  sandbox: {timeoutMs: 20000, memory: 16Mi}
  rateLimit: {requestsPerMinute: 60}
"#;

fn toolwarden() -> Command {
    Command::new(env!("CARGO_BIN_EXE_toolwarden"))
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// A tools folder: the examples (with their baseline policy), the slow tool,
/// one tool that fails the checklist, and beside them the `images/` and
/// `volumes/` folders `serve` finds on its own.
fn tools_dir() -> tempfile::TempDir {
    let dir = common::world_traversable_tempdir();
    common::example_images_and_volumes(dir.path());
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        examples().join("violations/TW-INPUT-003.yaml"),
        dir.path().join("unbounded.yaml"),
    )
    .unwrap();
    std::fs::write(dir.path().join("slow.yaml"), SLOW_TOOL).unwrap();
    dir
}

struct Served {
    child: Child,
    addr: String,
    banner: Vec<String>,
    _state: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve` on a free port and reads its startup lines.
fn serve(dir: &Path, audit: &Path) -> Served {
    let state = tempfile::Builder::new()
        .prefix("twtest-serve")
        .tempdir_in("/run")
        .unwrap();
    let mut child = toolwarden()
        .args(["serve", "--listen", "127.0.0.1:0", "--audit-log"])
        .arg(audit)
        .arg("--state-dir")
        .arg(state.path())
        .arg(dir)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut banner = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.trim_start().starts_with("audit:");
        banner.push(line);
        if done {
            break;
        }
    }
    // Keep draining stderr so reload messages never block the server.
    std::thread::spawn(move || lines.for_each(drop));
    let rest = banner
        .iter()
        .find(|l| l.trim_start().starts_with("REST:"))
        .expect("a REST line");
    let addr = rest
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    Served {
        child,
        addr,
        banner,
        _state: state,
    }
}

fn records(audit: &Path) -> Vec<Value> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls until `done` holds; fails the test after 15 s.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn call_slow(addr: &str) -> std::thread::JoinHandle<Result<u16, String>> {
    let url = format!("http://{addr}/v1/tools/slow/invoke");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let response = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .map_err(|e| e.to_string())?;
            Ok(response.status().as_u16())
        })
    })
}

#[test]
fn serve_refuses_to_start_without_a_working_sandbox() {
    // The engine cannot create its state under /proc: no tool may run unisolated.
    let out = toolwarden()
        .args(["serve", "--state-dir", "/proc/toolwarden"])
        .arg(examples())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the sandbox engine could not start"),
        "{stderr}"
    );
    assert!(stderr.contains("--unsandboxed-dev"), "{stderr}");
}

#[test]
fn serve_prints_what_it_serves_refuses_failing_tools_and_reloads_without_dropping_calls() {
    require_root!();
    let dir = tools_dir();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.log");
    let served = serve(dir.path(), &audit);
    let banner = served.banner.join("\n");
    assert!(banner.contains("refused violates-tw-input-003"), "{banner}");
    assert!(
        banner.contains("TW-INPUT-003 spec.inputSchema.properties.query"),
        "{banner}"
    );
    assert!(banner.contains("serving 6 tool(s)"), "{banner}");
    assert!(
        banner.contains("isolation: youki sandbox per call"),
        "{banner}"
    );

    let call = call_slow(&served.addr);
    wait_for("the slow call to start", || {
        records(&audit).iter().any(|r| r["event"] == "started")
    });
    let changed = SLOW_TOOL.replace("Sleeps, then answers", "Sleeps a while, then answers");
    std::fs::write(dir.path().join("slow.yaml"), changed).unwrap();
    let tools_url = format!("http://{}/v1/tools", served.addr);
    wait_for("generation 2 of the slow tool", || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let list: Value = rt.block_on(async {
            reqwest::get(&tools_url)
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        });
        list["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "slow" && t["generation"] == 2)
    });
    assert_eq!(call.join().unwrap(), Ok(200), "the call in flight finished");
    let finished: Vec<Value> = records(&audit)
        .into_iter()
        .filter(|r| r["event"] == "finished")
        .collect();
    assert_eq!(finished.len(), 1);
    assert_eq!(
        finished[0]["toolGeneration"], 1,
        "it ran with the generation it started with"
    );
}

#[test]
fn a_killed_runner_leaves_started_as_the_calls_last_record_and_the_chain_verifies() {
    require_root!();
    let dir = tools_dir();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.log");
    let mut served = serve(dir.path(), &audit);
    let call = call_slow(&served.addr);
    wait_for("the slow call to start", || {
        records(&audit).iter().any(|r| r["event"] == "started")
    });
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    assert!(
        call.join().unwrap().is_err(),
        "the connection died with the runner"
    );
    let all = records(&audit);
    assert_eq!(all.last().unwrap()["event"], "started");

    let verify = toolwarden()
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(
        String::from_utf8_lossy(&verify.stdout)
            .contains(&format!("{} record(s), hash chain intact", all.len()))
    );

    let text = std::fs::read_to_string(&audit).unwrap();
    std::fs::write(
        &audit,
        text.replacen("\"event\":\"received\"", "\"event\":\"received \"", 1),
    )
    .unwrap();
    let verify = toolwarden()
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("line 1: content was altered"));
}

/// The Python that has the official MCP SDK: `TOOLWARDEN_TEST_PYTHON` (set by
/// `.ci/run`), else `python3`. `None` (with the reason) when it lacks `mcp`.
fn python_with_mcp_sdk() -> Result<String, String> {
    let python = std::env::var("TOOLWARDEN_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python).args(["-c", "import mcp"]).output() {
        Ok(out) if out.status.success() => Ok(python),
        Ok(_) => Err(format!("{python} has no `mcp` module (pip install mcp)")),
        Err(e) => Err(format!("{python}: {e}")),
    }
}

#[test]
fn the_official_mcp_python_sdk_lists_and_calls_tools() {
    require_root!();
    let python = match python_with_mcp_sdk() {
        Ok(python) => python,
        Err(why) if std::env::var(common::REQUIRE_SANDBOX_ENV).is_ok_and(|v| v == "1") => {
            panic!(
                "the MCP SDK test must run under {}=1: {why}",
                common::REQUIRE_SANDBOX_ENV
            )
        }
        Err(why) => {
            eprintln!("SKIPPED the_official_mcp_python_sdk_lists_and_calls_tools: {why}");
            return;
        }
    };
    let dir = tools_dir();
    let audit = dir.path().join("audit.log");
    let served = serve(dir.path(), &audit);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_python_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("http://{}/mcp", served.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["protocol"], "2025-11-25");
    assert_eq!(
        seen["tools"],
        serde_json::json!([
            "api-call",
            "execute-code",
            "file-operation",
            "moderate-content",
            "slow",
            "user-profile-update"
        ])
    );
    assert_eq!(seen["readOnly"]["moderate-content"], true);
    assert_eq!(seen["readOnly"]["file-operation"], false);
    assert_eq!(seen["okIsError"], false);
    assert_eq!(seen["okResult"], serde_json::json!({"approved": true}));
    assert_eq!(seen["badIsError"], true);
    let problem: Value = serde_json::from_str(seen["badText"].as_str().unwrap()).unwrap();
    assert_eq!(
        problem["type"],
        "https://toolwarden.dev/problems/validation"
    );
    assert_eq!(problem["errors"][1]["path"], "/content");
}
