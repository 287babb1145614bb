//! `toolwarden serve` and `toolwarden audit verify` as a user runs them: the
//! real binary, real HTTP on loopback, real sandboxes, a real SIGKILL. Needs
//! root and busybox-static; each test prints SKIPPED with the reason otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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

/// Records every input in full in the audit log.
const RECORDER_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: recorder}
spec:
  description: Takes a long text and answers
  risk: low
  maxInputBytes: 131072
  inputSchema:
    type: object
    additionalProperties: false
    properties: {text: {type: string, maxLength: 100000}}
  sanitize: [{field: /text, transforms: [stripControlChars]}]
  runtime:
    image: docker.io/library/busybox:1.36.1
    command: [/bin/sh, -c, 'cat >/dev/null; echo "{}"']
  sandbox: {timeoutMs: 20000, memory: 16Mi}
  rateLimit: {requestsPerMinute: 60}
  audit: {input: full}
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
    let dir = common::examples_tools_dir();
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

/// The audit key tests pass to `serve` and `audit verify`: FILE.key beside the log.
fn audit_key(audit: &Path) -> PathBuf {
    let key = audit.with_extension("key");
    if !key.exists() {
        std::fs::write(&key, "serve-cli-test-audit-key-of-32-bytes\n").unwrap();
    }
    key
}

/// Starts `serve` on a free port and reads its startup lines.
fn serve(dir: &Path, audit: &Path) -> Served {
    serve_with(dir, audit, &[])
}

/// [`serve`] with more flags.
fn serve_with(dir: &Path, audit: &Path, flags: &[&str]) -> Served {
    let state = tempfile::Builder::new()
        .prefix("twtest-serve")
        .tempdir_in("/run")
        .unwrap();
    let mut command = toolwarden();
    // The usual soft open-files limit, which `serve` must raise itself.
    // SAFETY: setrlimit is async-signal-safe; nothing else runs before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
            setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard)?;
            Ok(())
        });
    }
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--audit-log"])
        .arg(audit)
        .arg("--audit-key")
        .arg(audit_key(audit))
        .arg("--state-dir")
        .arg(state.path())
        .args(flags)
        .arg(dir);
    let (child, banner, addr) = common::spawn_serve(&mut command);
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

    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("{} record(s), 1 run(s)", all.len())),
        "{out}"
    );
    assert!(out.contains("chain intact; MACs verified"), "{out}");
    assert!(out.contains("without a shutdown checkpoint"), "{out}");

    let text = std::fs::read_to_string(&audit).unwrap();
    std::fs::write(
        &audit,
        text.replacen("\"event\":\"received\"", "\"event\":\"received \"", 1),
    )
    .unwrap();
    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("(Altered) at line 2: the MAC does not match"),
        "{out}"
    );
}

/// `toolwarden audit verify --key` on `audit` (its anchor found beside it): exit code and stdout.
fn audit_verify(audit: &Path) -> (Option<i32>, String) {
    let out = toolwarden()
        .args(["audit", "verify", "--key"])
        .arg(audit_key(audit))
        .arg(audit)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A clean stop (SIGTERM), bounded.
fn stop(mut served: Served) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(served.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    while served.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects and sends one JSON POST, leaving the answer unread.
fn send_post(addr: &str, path: &str, body: &str, user_agent: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nUser-Agent: {user_agent}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A server that hangs up early shows as an unreadable answer.
    let _ = conn.write_all(request.as_bytes());
    conn
}

/// One POST over a raw connection, answer read; `None` when the server hung up.
fn post(addr: &str, path: &str, body: &str, user_agent: &str) -> Option<String> {
    use std::io::Read;
    let mut conn = send_post(addr, path, body, user_agent);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// The attacks: stop the runner, cut the log's tail, start it again; drop
/// the log's head. `audit verify` reports both.
#[test]
fn a_cut_tail_before_a_restart_and_a_dropped_head_are_reported() {
    require_root!();
    let dir = tools_dir();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.log");
    let served = serve(dir.path(), &audit);
    for _ in 0..3 {
        let answer = post(&served.addr, "/v1/tools/nope/invoke", "{}", "t").unwrap();
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    }
    let banner = served.banner.join("\n");
    assert!(banner.contains("key id "), "{banner}");
    stop(served);
    let key = std::fs::read_to_string(audit_key(&audit)).unwrap();
    let key = key.trim_end();
    assert!(!banner.contains(key), "the key is never printed");
    assert!(!std::fs::read_to_string(&audit).unwrap().contains(key));
    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        !out.contains("note:"),
        "a clean run leaves nothing to doubt: {out}"
    );

    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let head_dropped: String = lines[1..].iter().map(|l| format!("{l}\n")).collect();
    let tail_cut: String = lines[..lines.len() - 3]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();

    std::fs::write(&audit, &head_dropped).unwrap();
    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("(MissingStart) at line 1"), "{out}");

    std::fs::write(&audit, &tail_cut).unwrap();
    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("(Truncated)"),
        "the anchor names what was cut: {out}"
    );
    let anchor = audit.with_extension("log.anchor");
    let saved_anchor = std::fs::read(&anchor).unwrap();
    std::fs::remove_file(&anchor).unwrap();
    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(1), "deleting the anchor with the tail: {out}");
    assert!(out.contains("no anchor file"), "{out}");
    std::fs::write(&anchor, saved_anchor).unwrap();
    // Restarting on the cut log does not hide the cut.
    stop(serve(dir.path(), &audit));
    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("(Truncated)"), "{out}");
    assert!(
        out.contains("restarted here after anchoring checkpoint"),
        "{out}"
    );
}

/// A huge invalid input and a huge header make bounded records, and a log whose last
/// record was cut short (a runner killed mid-write) is continued, not refused.
#[test]
fn oversized_records_are_bounded_and_a_broken_last_record_does_not_stop_serve() {
    require_root!();
    let dir = tools_dir();
    std::fs::write(dir.path().join("recorder.yaml"), RECORDER_TOOL).unwrap();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.log");
    let mut served = serve(dir.path(), &audit);
    // A 60 KB invalid path, 3,000 unknown fields, emoji content.
    let extra: String = (0..3000).map(|i| format!(", \"f{i}\": {i}")).collect();
    let body = format!(
        "{{\"operation\": \"nope\", \"path\": \"{}\", \"content\": \"{}\"{extra}}}",
        "x".repeat(60_000),
        "\u{1F600}".repeat(15_000)
    );
    let answer = post(&served.addr, "/v1/tools/file-operation/invoke", &body, "t").unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{}", &answer[..200]);
    // A valid 60 KB input of a tool that records inputs in full.
    let big = format!("{{\"text\": \"{}\"}}", "z".repeat(60_000));
    let answer = post(&served.addr, "/v1/tools/recorder/invoke", &big, "t").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..200]);
    // A huge header too, where the HTTP layer lets one through.
    post(
        &served.addr,
        "/v1/tools/nope/invoke",
        "{}",
        &"A".repeat(200_000),
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    let denied = records(&audit)
        .into_iter()
        .find(|r| r["event"] == "denied" && r["tool"] == "file-operation")
        .unwrap();
    // The 3,000 unknown fields are counted, not named.
    assert!(!denied.to_string().contains("f2999"), "{denied}");
    assert!(denied.to_string().len() < 4096, "{denied}");
    let recorded = records(&audit)
        .into_iter()
        .find(|r| r["event"] == "validated" && r["tool"] == "recorder")
        .unwrap();
    assert_eq!(recorded["truncated"], true, "{recorded}");
    assert!(recorded.to_string().contains("…[truncated"), "{recorded}");
    for line in text.lines() {
        assert!(line.len() <= 16 * 1024, "a record of {} bytes", line.len());
    }
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    // A record cut short: 2 MB and no newline.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .unwrap();
    std::io::Write::write_all(
        &mut log,
        format!("{{\"seq\":99,\"x\":\"{}", "y".repeat(2 << 20)).as_bytes(),
    )
    .unwrap();
    drop(log);
    let served = serve(dir.path(), &audit);
    assert!(served.banner.iter().any(|l| l.contains("audit:")));
    stop(served);
    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("acknowledged by the checkpoint"), "{out}");
}

/// A caller that hangs up mid-call: the call runs on and is closed as
/// `abandoned` with what the sandbox did; a clean stop waits for such calls.
#[test]
fn a_caller_that_hangs_up_still_gets_its_call_closed() {
    require_root!();
    let dir = tools_dir();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.log");
    let served = serve(dir.path(), &audit);
    let hang_up_during_a_slow_call = |calls: usize| {
        let conn = send_post(&served.addr, "/v1/tools/slow/invoke", "{}", "t");
        wait_for("the slow call to start", || {
            records(&audit)
                .iter()
                .filter(|r| r["event"] == "started")
                .count()
                == calls
        });
        drop(conn);
    };
    hang_up_during_a_slow_call(1);
    wait_for("the closing record", || {
        records(&audit).iter().any(|r| r["event"] == "abandoned")
    });
    let all = records(&audit);
    let closing = all.iter().find(|r| r["event"] == "abandoned").unwrap();
    let started = all.iter().find(|r| r["event"] == "started").unwrap();
    assert_eq!(closing["invocationId"], started["invocationId"]);
    assert_eq!(
        closing["exitCode"], 0,
        "the sandbox ran to its end: {closing}"
    );
    assert!(closing["durationMs"].as_u64().unwrap() >= 3000, "{closing}");

    // Stopped while an abandoned call runs: the stop waits for its closing record.
    hang_up_during_a_slow_call(2);
    stop(served);
    let all = records(&audit);
    let last = all.last().unwrap();
    assert_eq!(last["reason"], "shutdown", "{last}");
    assert_eq!(last["openCalls"], 0, "{last}");
    let closings = all
        .iter()
        .filter(|r| matches!(r["event"].as_str(), Some("abandoned" | "finished")))
        .count();
    assert_eq!(closings, 2, "every started call is closed");
    let (code, out) = audit_verify(&audit);
    assert_eq!(code, Some(0), "{out}");
}

const LONG_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: long}
spec:
  description: Sleeps far past its deadline
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command: [/bin/sh, -c, 'cat >/dev/null; sleep 86421']
  sandbox: {timeoutMs: 5000, memory: 16Mi}
  rateLimit: {requestsPerMinute: 60}
"#;

/// Processes whose command line names the long tool's sleep.
fn long_tool_processes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"86421"))
        })
        .collect()
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// `kill -9` of the runner alone, of the runner and its zygote, and of the
/// keepers first, then both, during a call: the tool must not outlive its 5 s
/// deadline.
#[test]
fn a_tool_dies_with_its_killed_runner_and_zygote() {
    require_root!();
    let dir = tools_dir();
    std::fs::write(dir.path().join("long.yaml"), LONG_TOOL).unwrap();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.log");
    for (kill_zygote, kill_keepers) in [(false, false), (true, false), (true, true)] {
        let mut served = serve(dir.path(), &audit);
        let runner = served.child.id();
        let addr = served.addr.clone();
        std::thread::spawn(move || post(&addr, "/v1/tools/long/invoke", "{}", "t"));
        wait_for("the long tool to run", || !long_tool_processes().is_empty());
        let zygote = children(runner)
            .into_iter()
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"sandbox-zygote"))
            })
            .expect("the zygote");
        // Keepers first: then only the sandbox's own parent-death signal can end it.
        if kill_keepers {
            children(zygote).into_iter().for_each(sigkill);
        }
        sigkill(runner);
        if kill_zygote {
            sigkill(zygote);
        }
        served.child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !long_tool_processes().is_empty() {
            if Instant::now() > deadline {
                let left = long_tool_processes();
                left.iter().for_each(|p| sigkill(*p));
                panic!(
                    "kill_zygote={kill_zygote} kill_keepers={kill_keepers}: the tool outlived its deadline: {left:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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

/// The test venv's python (official MCP SDK, Prometheus client), or None after printing
/// why `test` skips; under `TOOLWARDEN_REQUIRE_SANDBOX=1` (CI) a missing venv fails it.
fn test_python(test: &str) -> Option<String> {
    match python_with_mcp_sdk() {
        Ok(python) => Some(python),
        Err(why) if std::env::var(common::REQUIRE_SANDBOX_ENV).is_ok_and(|v| v == "1") => {
            panic!(
                "{test} must run under {}=1: {why}",
                common::REQUIRE_SANDBOX_ENV
            )
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

/// The official Python SDK against one `serve`, opening in `era` (`stateless`:
/// `discover()`; `handshake`: `initialize()`); what it saw.
fn python_sdk_session(python: &str, addr: &str, era: &str) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_python_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("http://{addr}/mcp"))
        .arg(era)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{era}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_official_mcp_python_sdk_lists_and_calls_tools_in_both_eras() {
    require_root!();
    let Some(python) =
        test_python("the_official_mcp_python_sdk_lists_and_calls_tools_in_both_eras")
    else {
        return;
    };
    let dir = tools_dir();
    let audit = dir.path().join("audit.log");
    let served = serve(dir.path(), &audit);
    for (era, protocol) in [("stateless", "2026-07-28"), ("handshake", "2025-11-25")] {
        let seen = python_sdk_session(&python, &served.addr, era);
        assert_eq!(seen["protocol"], protocol, "{seen}");
        // In name order, the same every time (the stateless era's caching relies on it).
        assert_eq!(
            seen["tools"],
            serde_json::json!([
                "api-call",
                "execute-code",
                "file-operation",
                "moderate-content",
                "slow",
                "user-profile-update"
            ]),
            "{era}"
        );
        assert_eq!(seen["readOnly"]["moderate-content"], true, "{era}");
        assert_eq!(seen["readOnly"]["file-operation"], false, "{era}");
        assert_eq!(seen["okIsError"], false, "{era}");
        assert_eq!(
            seen["okResult"],
            serde_json::json!({"approved": true}),
            "{era}"
        );
        // Input that fails the schema is the tool's error, with the problem's details.
        assert_eq!(seen["badIsError"], true, "{era}");
        let problem: Value = serde_json::from_str(seen["badText"].as_str().unwrap()).unwrap();
        assert_eq!(
            problem["type"],
            "https://toolwarden.dev/problems/validation"
        );
        assert_eq!(problem["errors"][1]["path"], "/content");
        // The guide's prompt injection: a tool error with the generic refusal, nothing of the
        // instruction echoed; the audit log names the guard, its rule and the field.
        assert_eq!(seen["injectionIsError"], true, "{era}");
        let text = seen["injectionText"].as_str().unwrap();
        assert!(!text.contains("delete"), "{era}: {text}");
        let problem: Value = serde_json::from_str(text).unwrap();
        assert_eq!(problem["type"], "https://toolwarden.dev/problems/refused");
        assert_eq!(problem["detail"], "The request cannot be processed");
        let denied = records(&audit)
            .into_iter()
            .find(|r| r["stage"] == "inputGuards" && r["invocationId"] == problem["invocationId"])
            .unwrap_or_else(|| panic!("{era}: no denied record of the input guards"));
        assert_eq!(denied["findings"][0]["guard"], "promptInjection");
        assert_eq!(denied["findings"][0]["rule"], "instructionOverride");
        assert_eq!(denied["findings"][0]["pointer"], "/content");
        // The slow tool sleeps 3 s: streamed, with progress while it ran, result last.
        assert_eq!(
            seen["slowResult"],
            serde_json::json!({"slept": true}),
            "{era}"
        );
        let progress = seen["progress"].as_array().unwrap();
        assert!(!progress.is_empty(), "{era}: no progress in {seen}");
        assert!(
            progress[0]["message"]
                .as_str()
                .unwrap()
                .starts_with("running in its sandbox"),
            "{era}: {seen}"
        );
        if era == "stateless" {
            assert_eq!(seen["supportedVersions"][0], "2026-07-28");
            assert_eq!(seen["listTtlMs"], 60_000);
            assert_eq!(seen["listCacheScope"], "private");
            // A session declaring the tasks extension: the 3 s call comes back as a
            // task (after 2 s), which the SDK polls to the tool's result.
            let tasks = &seen["tasks"];
            assert_eq!(
                tasks["serverExtensions"],
                serde_json::json!({"io.modelcontextprotocol/tasks": {}}),
                "{seen}"
            );
            assert_eq!(tasks["taskResultType"], "task", "{seen}");
            assert_eq!(tasks["taskStatuses"][0], "working", "{seen}");
            assert_eq!(tasks["taskStatuses"][1], "completed", "{seen}");
            assert_eq!(tasks["taskResult"], serde_json::json!({"slept": true}));
        }
    }
}

/// The directory holding the official TypeScript SDK (`node_modules/@modelcontextprotocol/sdk`):
/// `TOOLWARDEN_TEST_TS_SDK`, else `target/mcp-ts` where `.ci/run` installs it. `None` (after
/// printing why `test` skips) without node or the SDK; under `TOOLWARDEN_REQUIRE_SANDBOX=1`
/// (CI) that fails the test.
fn typescript_sdk(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("TOOLWARDEN_TEST_TS_SDK").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/mcp-ts"),
        PathBuf::from,
    );
    let node = Command::new("node").arg("--version").output();
    let why = if !node.is_ok_and(|out| out.status.success()) {
        "no `node` (apt-get install nodejs npm)".to_string()
    } else if !dir.join("node_modules/@modelcontextprotocol/sdk").is_dir() {
        format!(
            "no @modelcontextprotocol/sdk under {} (.ci/run installs it)",
            dir.display()
        )
    } else {
        return Some(dir);
    };
    if std::env::var(common::REQUIRE_SANDBOX_ENV).is_ok_and(|v| v == "1") {
        panic!(
            "{test} must run under {}=1: {why}",
            common::REQUIRE_SANDBOX_ENV
        );
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

#[test]
fn the_official_mcp_typescript_sdk_outlasts_its_request_timeout_on_progress() {
    require_root!();
    let test = "the_official_mcp_typescript_sdk_outlasts_its_request_timeout_on_progress";
    let Some(sdk) = typescript_sdk(test) else {
        return;
    };
    let dir = tools_dir();
    let audit = dir.path().join("audit.log");
    let served = serve(dir.path(), &audit);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_typescript_sdk.mjs");
    let out = Command::new("node")
        .arg(script)
        .arg(sdk)
        .arg(format!("http://{}/mcp", served.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The TypeScript SDK speaks the handshake era.
    assert_eq!(seen["protocol"], "2025-11-25", "{seen}");
    assert_eq!(seen["server"]["name"], "toolwarden");
    assert_eq!(seen["tools"].as_array().unwrap().len(), 6, "{seen}");
    assert_eq!(seen["okIsError"], false);
    assert_eq!(seen["okResult"], serde_json::json!({"approved": true}));
    assert_eq!(seen["badIsError"], true);
    let problem: Value = serde_json::from_str(seen["badText"].as_str().unwrap()).unwrap();
    assert_eq!(problem["status"], 400, "{problem}");
    // A 3 s call with a 2.9 s request timeout: finished, thanks to progress...
    assert_eq!(
        seen["slowResult"],
        serde_json::json!({"slept": true}),
        "{seen}"
    );
    assert!(!seen["progress"].as_array().unwrap().is_empty(), "{seen}");
    // ...and the same call without progress timed out (the SDK's RequestTimeout).
    assert_eq!(seen["silentError"]["code"], -32001, "{seen}");
    // The call the client gave up on still ran to its end and was audited so:
    // three calls ran (moderate-content, the slow one twice), three were closed.
    wait_for("every call that ran to be closed", || {
        let all = records(&audit);
        let count = |events: &[&str]| {
            all.iter()
                .filter(|r| events.contains(&r["event"].as_str().unwrap_or_default()))
                .count()
        };
        count(&["started"]) == 3 && count(&["finished", "abandoned"]) == 3
    });
}

/// `serve` with `flags` must refuse to start, saying `expected`.
fn refuses_to_start(flags: &[&str], expected: &str) {
    let out = toolwarden()
        .args(["serve", "--state-dir", "/proc/toolwarden"])
        .args(flags)
        .arg(examples())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
    assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    assert!(
        !stderr.contains("sandbox engine"),
        "{flags:?} got as far as the sandbox: {stderr}"
    );
}

#[test]
fn weak_or_incomplete_authentication_settings_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let good_key = file("good.key", "0123456789abcdef0123456789abcdef\n");
    // Anyone could forge an admin token with an empty or guessable secret.
    for weak in [
        file("empty.key", ""),
        file("nl.key", "\n"),
        file("short.key", "hunter2\n"),
    ] {
        refuses_to_start(
            &["--jwt-hs256-key", &weak, "--jwt-audience", "toolwarden"],
            "an HS256 key must be at least 32 bytes",
        );
    }
    // A token minted for another service must not open this one.
    refuses_to_start(&["--jwt-hs256-key", &good_key], "without --jwt-audience");
    // An empty token file would leave anonymous access on (or refuse everyone).
    for empty in [
        file("empty.tokens", ""),
        file("comments.tokens", "# none yet\n\n"),
    ] {
        refuses_to_start(&["--tokens", &empty], "holds no tokens");
    }
    // OAuth: tokens and keys would cross the network in clear, or no issuer to get them from,
    // or an issuer whose metadata cannot be had (every call would be refused).
    let issuer = "https://idp.example.com/realms/agents";
    refuses_to_start(
        &[
            "--oauth-resource",
            "http://tools.example.com/mcp",
            "--oauth-issuer",
            issuer,
        ],
        "must be an absolute https:// URL",
    );
    refuses_to_start(
        &["--oauth-resource", "https://tools.example.com/mcp"],
        "--oauth-issuer",
    );
    refuses_to_start(
        &[
            "--oauth-resource",
            "https://tools.example.com/mcp",
            "--oauth-issuer",
            "http://127.0.0.1:1/realms/agents",
        ],
        "no authorization server metadata names issuer",
    );
    // An explicit --jwt-any-audience gets past authentication (to the sandbox check).
    let out = toolwarden()
        .args([
            "serve",
            "--state-dir",
            "/proc/toolwarden",
            "--jwt-hs256-key",
        ])
        .args([&good_key, "--jwt-any-audience"])
        .arg(examples())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the sandbox engine could not start"),
        "{stderr}"
    );
}

#[test]
fn serve_with_tokens_refuses_anonymous_raises_the_fd_limit_and_exposes_metrics_only_where_asked() {
    require_root!();
    let dir = tools_dir();
    let work = tempfile::tempdir().unwrap();
    let audit = work.path().join("audit.log");
    let token = "agent-token-0123456789";
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let tokens = work.path().join("tokens");
    std::fs::write(&tokens, format!("{hash} agent\n")).unwrap();
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let served = serve_with(
        dir.path(),
        &audit,
        &[
            "--tokens",
            tokens.to_str().unwrap(),
            "--metrics-listen",
            &metrics_addr,
        ],
    );
    let banner = served.banner.join("\n");
    assert!(!banner.contains("ANONYMOUS"), "{banner}");

    // Started with a soft open-files limit of 1024, it now runs with the hard
    // limit: a connection flood cannot run it out of descriptors at 1024.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", served.child.id())).unwrap();
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "{files}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let call = |token: Option<&str>| {
            let mut request = http
                .post(format!(
                    "http://{}/v1/tools/moderate-content/invoke",
                    served.addr
                ))
                .json(&serde_json::json!({"text": "hello"}));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send()
        };
        // --anonymous auto on loopback, but a token file is configured: no anonymous calls.
        assert_eq!(call(None).await.unwrap().status(), 401);
        assert_ne!(call(Some(token)).await.unwrap().status(), 401);
        let main_metrics = http
            .get(format!("http://{}/metrics", served.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(main_metrics.status(), 401);
        // The metrics address the operator chose serves the scraper without a token.
        let scraped = http
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(scraped.status(), 200);
        let text = scraped.text().await.unwrap();
        assert!(text.contains("toolwarden_calls_total"), "{text}");
        // Only metrics there.
        let other = http
            .get(format!("http://{metrics_addr}/v1/tools"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 404);
    });
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn token_less_16_mib_posts_do_not_grow_the_runner() {
    use std::io::{Read, Write};
    require_root!();
    let dir = tools_dir();
    let work = tempfile::tempdir().unwrap();
    let tokens = work.path().join("tokens");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"some-token"));
    std::fs::write(&tokens, format!("{hash} agent\n")).unwrap();
    let served = serve_with(
        dir.path(),
        &work.path().join("audit.log"),
        &["--tokens", tokens.to_str().unwrap()],
    );
    let before = rss_kib(served.child.id());
    // The attack: six 16 MiB bodies, sent in full as fast as the server takes them.
    let senders: Vec<_> = (0..6)
        .map(|_| {
            let addr = served.addr.clone();
            std::thread::spawn(move || {
                let mut stream = std::net::TcpStream::connect(&addr).unwrap();
                let body = format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"x\",\"arguments\":{{\"a\":\"{}\"}}}}}}",
                    "A".repeat(16 << 20)
                );
                let head = format!(
                    "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                // The server may close mid-body; that is the point.
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body.as_bytes());
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
                String::from_utf8_lossy(&answer).into_owned()
            })
        })
        .collect();
    for sender in senders {
        let answer = sender.join().unwrap();
        // Empty when the close reset the connection before the 401 was read.
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 401"),
            "{answer:.200}"
        );
    }
    let grown = rss_kib(served.child.id()).saturating_sub(before);
    assert!(grown < 16 * 1024, "the runner grew by {grown} KiB");
}

/// Prometheus' own Python client parses `/metrics` as a scraper that does not ask for
/// OpenMetrics reads it: counters are counters with their samples, nothing is untyped.
#[test]
fn metrics_are_read_right_by_the_prometheus_text_parser() {
    require_root!();
    let Some(python) = test_python("metrics_are_read_right_by_the_prometheus_text_parser") else {
        return;
    };
    let dir = tools_dir();
    let audit = dir.path().join("audit.log");
    let served = serve(dir.path(), &audit);
    let answer = post(&served.addr, "/v1/tools/slow/invoke", "{}", "t").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let script = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
with urllib.request.urlopen(sys.argv[1]) as r:
    content_type, text = r.headers["Content-Type"], r.read().decode()
families = {f.name: [f.type, len(f.samples)] for f in text_string_to_metric_families(text)}
print(json.dumps({"contentType": content_type, "families": families}))
"#;
    let out = Command::new(python)
        .args(["-c", script, &format!("http://{}/metrics", served.addr)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["contentType"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let families = report["families"].as_object().unwrap();
    assert_eq!(families["toolwarden_calls"][0], "counter", "{report}");
    assert!(
        families["toolwarden_calls"][1].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert_eq!(
        families["toolwarden_tool_run_seconds"][0], "histogram",
        "{report}"
    );
    for (name, family) in families {
        assert_ne!(family[0], "unknown", "{name} is untyped: {report}");
    }
}

/// One JSON POST (or GET when `body` is `None`) with an `X-Forwarded-For`; the status and body.
fn request(
    addr: &str,
    path: &str,
    forwarded_for: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}{path}");
        let mut request = match body {
            Some(body) => client
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string()),
            None => client.get(url),
        };
        if let Some(xff) = forwarded_for {
            request = request.header("x-forwarded-for", xff);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    })
}

fn assert_refused(answer: &(u16, Value)) {
    assert_eq!(answer.0, 403, "{answer:?}");
    assert_eq!(answer.1["type"], "https://toolwarden.dev/problems/refused");
    assert_eq!(answer.1["detail"], "The request cannot be processed");
}

const READ_NOTES: &str = r#"{"operation": "read", "path": "/workspace/notes.txt"}"#;
const POST: &str = r#"{"content": "hello", "contentType": "post"}"#;

#[test]
fn allow_lists_believe_only_trusted_proxies_and_anomaly_baselines_survive_a_restart() {
    require_root!();
    let dir = tools_dir();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.log");
    let baselines = audit_dir.path().join("baselines.json");
    let flags = [
        "--ip-allow-list",
        "10.0.0.0/8,192.0.2.0/24",
        "--trusted-proxies",
        "127.0.0.1",
        "--anomaly-baselines",
        baselines.to_str().unwrap(),
    ];
    let served = serve_with(dir.path(), &audit, &flags);
    let addr = served.addr.clone();
    // Loopback is the trusted proxy: the client is what it appended, right-most.
    assert_eq!(
        request(
            &addr,
            "/v1/tools/moderate-content/invoke",
            Some("192.0.2.7"),
            Some(POST)
        )
        .0,
        200
    );
    // The proxy itself is not allowed, nor a client the proxy named after a spoofed entry.
    assert_refused(&request(
        &addr,
        "/v1/tools/moderate-content/invoke",
        None,
        Some(POST),
    ));
    assert_refused(&request(
        &addr,
        "/v1/tools/moderate-content/invoke",
        Some("192.0.2.7, 198.51.100.1"),
        Some(POST),
    ));
    // Every endpoint but the probes.
    assert_refused(&request(&addr, "/v1/tools", None, None));
    assert_refused(&request(
        &addr,
        "/mcp",
        None,
        Some(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
    ));
    assert_eq!(request(&addr, "/healthz", None, None).0, 200);
    // file-operation's own callers.ipAllowList (127/8, ::1, 10/8) narrows the runner's.
    assert_refused(&request(
        &addr,
        "/v1/tools/file-operation/invoke",
        Some("192.0.2.7"),
        Some(READ_NOTES),
    ));
    let denied = records(&audit)
        .into_iter()
        .filter(|r| r["stage"] == "callers")
        .collect::<Vec<_>>();
    assert_eq!(denied.len(), 5, "{denied:?}");
    assert_eq!(denied.last().unwrap()["clientIp"], "192.0.2.7");
    assert_eq!(denied.last().unwrap()["peerIp"], "127.0.0.1");
    // file-operation is scored: three calls train the caller's baseline...
    for _ in 0..3 {
        let (status, body) = request(
            &addr,
            "/v1/tools/file-operation/invoke",
            Some("10.1.2.3"),
            Some(READ_NOTES),
        );
        assert_eq!(status, 200, "{body}");
    }
    stop(served);
    let saved: Value = serde_json::from_slice(&std::fs::read(&baselines).unwrap()).unwrap();
    assert_eq!(saved["anonymous"]["calls"], 3, "{saved}");
    // ...and a restarted serve goes on from them.
    let served = serve_with(dir.path(), &audit, &flags);
    let (status, _) = request(
        &served.addr,
        "/v1/tools/file-operation/invoke",
        Some("10.1.2.3"),
        Some(READ_NOTES),
    );
    assert_eq!(status, 200);
    stop(served);
    let saved: Value = serde_json::from_slice(&std::fs::read(&baselines).unwrap()).unwrap();
    assert_eq!(saved["anonymous"]["calls"], 4, "{saved}");
    assert_eq!(saved["anonymous"]["sources"]["10.1.2.3"], 4, "{saved}");
    // Without --trusted-proxies the same header is a spoof: the client is loopback.
    let served = serve_with(dir.path(), &audit, &["--ip-allow-list", "192.0.2.0/24"]);
    assert_refused(&request(
        &served.addr,
        "/v1/tools/moderate-content/invoke",
        Some("192.0.2.7"),
        Some(POST),
    ));
}
