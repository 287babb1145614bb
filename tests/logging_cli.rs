//! `--log-format`: diagnostics on stderr are plain text without colour codes when
//! stderr is not a terminal, or one JSON object a line. Needs root and busybox-static
//! (the sandbox engine logs its start); prints SKIPPED with the reason otherwise.

mod common;

use std::process::Command;

fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("twtest-logging")
        .tempdir_in("/run")
        .unwrap()
}

/// Runs `serve` on the examples with `format` and returns its stderr up to the end of
/// the startup banner (the sandbox engine logs its start before it).
fn startup_stderr(format: &str) -> Vec<String> {
    let dir = common::examples_tools_dir();
    let state = state_dir();
    let (mut child, lines, _) = common::spawn_serve(
        Command::new(env!("CARGO_BIN_EXE_toolwarden"))
            .args(["--log-format", format, "serve", "--listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(state.path())
            .arg(dir.path()),
    );
    let _ = child.kill();
    let _ = child.wait();
    lines
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    require_root!();
    let lines = startup_stderr("text");
    assert!(
        lines.iter().any(|l| l.contains("sandbox engine started")),
        "no engine log line in {lines:#?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in {lines:#?}"
    );
}

#[test]
fn json_logs_are_one_object_a_line() {
    require_root!();
    let lines = startup_stderr("json");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let engine = events
        .iter()
        .find(|e| e["fields"]["message"] == "sandbox engine started")
        .unwrap_or_else(|| panic!("no engine event in {lines:#?}"));
    assert_eq!(engine["level"], "INFO");
    assert!(engine["fields"]["user_namespace"].is_boolean(), "{engine}");
}

#[test]
fn an_unknown_log_format_is_refused_with_the_choices() {
    let out = Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .args(["--log-format", "xml", "check", "-f", "examples/"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'xml'") && stderr.contains("text") && stderr.contains("json"),
        "{stderr}"
    );
}

/// A reload keeps the pools of unchanged tools, and says only what changed: the pool of
/// the one edited tool is logged, not every tool's again.
#[test]
fn a_reload_logs_only_the_pools_it_creates() {
    require_root!();
    use std::io::BufRead;
    use std::sync::mpsc;
    use std::time::Duration;
    let dir = common::examples_tools_dir();
    let state = state_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state.path())
        .arg(dir.path())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let seen = std::cell::RefCell::new(Vec::new());
    let next = || match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => {
            seen.borrow_mut().push(line.clone());
            line
        }
        Err(e) => panic!(
            "serve went quiet ({e}) after:\n{}",
            seen.borrow().join("\n")
        ),
    };
    while !next().trim_start().starts_with("audit:") {}
    // The last tool by name changes: a reload that logged every pool again would log the
    // others before it.
    let manifest = dir.path().join("user-profile-update.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let edited = text.replacen("description: ", "description: Edited. ", 1);
    assert_ne!(text, edited);
    std::fs::write(&manifest, edited).unwrap();
    let mut pools = Vec::new();
    loop {
        let line = next();
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let message = event["fields"]["message"].as_str().unwrap_or_default();
        if message.starts_with("sandbox pool ready") {
            let tool = event["fields"]["tool"].as_str().unwrap().to_string();
            let done = tool == "user-profile-update";
            pools.push(tool);
            if done {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(pools, ["user-profile-update"]);
}

/// The sandbox zygote logs as the runner does: JSON lines when the runner logs JSON (it is
/// told so through its otherwise empty environment), text otherwise. Started here without its
/// socket, it reports that one error and exits.
#[test]
fn the_zygote_logs_in_the_runners_format() {
    for json in [true, false] {
        let mut zygote = Command::new(env!("CARGO_BIN_EXE_toolwarden"));
        zygote.arg("sandbox-zygote").env_remove("RUST_LOG");
        if json {
            zygote.env("TOOLWARDEN_SANDBOX_LOG_JSON", "1");
        }
        let out = zygote.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().last().unwrap_or_default();
        let event = serde_json::from_str::<serde_json::Value>(line);
        if json {
            let event = event.unwrap_or_else(|e| panic!("not a JSON line ({e}): {stderr}"));
            assert_eq!(event["level"], "ERROR", "{event}");
            assert_eq!(
                event["fields"]["message"], "sandbox zygote failed",
                "{event}"
            );
            assert!(event["fields"]["reason"].is_string(), "{event}");
        } else {
            assert!(event.is_err(), "JSON without being asked: {stderr}");
            assert!(line.contains("sandbox zygote failed"), "{stderr}");
        }
    }
}

/// `--log-format json` reaches the zygote the runner starts.
#[test]
fn a_json_runner_tells_its_zygote_to_log_json() {
    require_root!();
    let dir = common::examples_tools_dir();
    let state = state_dir();
    for (format, told) in [("json", true), ("text", false)] {
        let (mut child, _, _) = common::spawn_serve(
            Command::new(env!("CARGO_BIN_EXE_toolwarden"))
                .args(["--log-format", format, "serve", "--listen", "127.0.0.1:0"])
                .arg("--state-dir")
                .arg(state.path())
                .arg(dir.path()),
        );
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap();
        let zygote_env = children
            .split_whitespace()
            .filter_map(|pid| std::fs::read(format!("/proc/{pid}/environ")).ok())
            .find(|env| {
                env.split(|b| *b == 0)
                    .any(|v| v.starts_with(b"TOOLWARDEN_SANDBOX_STATE="))
            })
            .expect("serve has a zygote child");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            zygote_env
                .split(|b| *b == 0)
                .any(|v| v == b"TOOLWARDEN_SANDBOX_LOG_JSON=1"),
            told,
            "--log-format {format}"
        );
    }
}
