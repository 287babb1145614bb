//! `--log-format`: diagnostics on stderr are plain text without colour codes when
//! stderr is not a terminal, or one JSON object a line. Needs root and busybox-static
//! (the sandbox engine logs its start); prints SKIPPED with the reason otherwise.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// Runs `serve` on the examples with `format` and returns its stderr up to the end of
/// the startup banner (the sandbox engine logs its start before it).
fn startup_stderr(format: &str) -> Vec<String> {
    let dir = common::world_traversable_tempdir();
    common::example_images_and_volumes(dir.path());
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let state = tempfile::Builder::new()
        .prefix("twtest-logging")
        .tempdir_in("/run")
        .unwrap();
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
