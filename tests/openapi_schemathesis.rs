//! schemathesis (PyPI) against `GET /openapi.json` of `toolwarden serve` on
//! the example tools, real sandboxes: a fixed number of generated requests per
//! operation (valid and invalid inputs, missing and wrong headers), and every
//! answer must be documented (status, content type, headers, body schema).
//! The only 5xx allowed are the ones a tool causes and the document declares:
//! `502 tool-failed` (a read of a file that does not exist exits 1), `504
//! tool-timeout`, `503 overloaded`; a `500` fails the test.
//! Needs root, busybox-static and schemathesis (`.ci/run` installs it into
//! `target/schemathesis-venv`); prints SKIPPED otherwise, fails under
//! `TOOLWARDEN_REQUIRE_SANDBOX=1` when schemathesis is missing.

mod common;

use std::path::PathBuf;
use std::process::Command;

use sha2::{Digest, Sha256};

/// Generated test cases per API operation.
const EXAMPLES_PER_OPERATION: &str = "40";
/// Fixed, so a failure can be replayed.
const SEED: &str = "20261201";

/// `TOOLWARDEN_TEST_SCHEMATHESIS`, else the venv `.ci/run` makes.
fn schemathesis() -> Result<PathBuf, String> {
    let path = std::env::var_os("TOOLWARDEN_TEST_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/schemathesis-venv/bin/schemathesis")
        });
    match Command::new(&path).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(path),
        Ok(out) => Err(format!(
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_the_document_does_not_declare() {
    require_root!();
    let schemathesis = match schemathesis() {
        Ok(path) => path,
        Err(why) if std::env::var(common::REQUIRE_SANDBOX_ENV).is_ok_and(|v| v == "1") => {
            panic!(
                "schemathesis is required under {}=1: {why}",
                common::REQUIRE_SANDBOX_ENV
            )
        }
        Err(why) => {
            eprintln!("SKIPPED schemathesis: {why}");
            return;
        }
    };
    let dir = common::examples_tools_dir();
    let work = tempfile::tempdir().unwrap();
    let token = "schemathesis-token-0123456789abcdef";
    let tokens = work.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{} fuzzer admins\n", hex::encode(Sha256::digest(token))),
    )
    .unwrap();
    let key = work.path().join("audit.key");
    std::fs::write(&key, "schemathesis-test-audit-key-32-bytes\n").unwrap();
    let audit = work.path().join("audit.log");
    let state = tempfile::Builder::new()
        .prefix("twtest-openapi")
        .tempdir_in("/run")
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_toolwarden"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--tokens"])
        .arg(&tokens)
        .arg("--audit-log")
        .arg(&audit)
        .arg("--audit-key")
        .arg(&key)
        .arg("--state-dir")
        .arg(state.path())
        .arg(dir.path());
    let (mut child, _banner, addr) = common::spawn_serve(&mut command);

    let config = work.path().join("schemathesis.toml");
    // The tool's own failures are documented 5xx answers (see the module comment).
    std::fs::write(
        &config,
        "[checks.not_a_server_error]\nexpected-statuses = [\"2xx\", \"3xx\", \"4xx\", 502, 503, 504]\n",
    )
    .unwrap();
    let report = work.path().join("report.json");
    // In the temporary folder: schemathesis keeps a cache of crashes in its working directory.
    let out = Command::new(&schemathesis)
        .current_dir(work.path())
        .arg("--no-color")
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("http://{addr}/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", EXAMPLES_PER_OPERATION, "--seed", SEED])
        .args(["--phases", "examples,coverage,fuzzing", "--workers", "1"])
        .args(["--request-timeout", "30"])
        .arg("--report-json-path")
        .arg(&report)
        .args(["--report", "json"])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect();
    eprintln!("{}", summary.join("\n"));
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every call it made was audited; none ended as an internal error. How the
    // calls ended, for the record (`--nocapture` shows it).
    let log = std::fs::read_to_string(&audit).unwrap();
    let mut endings = std::collections::BTreeMap::<String, usize>::new();
    for record in log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let ending = match record["event"].as_str() {
            Some("denied") => format!("denied {}", record["problem"].as_str().unwrap_or("?")),
            Some(event @ ("finished" | "failed" | "approvalPending" | "rateLimited")) => {
                event.to_string()
            }
            _ => continue,
        };
        *endings.entry(ending).or_default() += 1;
    }
    eprintln!("calls by ending: {endings:?}");
    assert!(
        endings.values().sum::<usize>() > 100,
        "schemathesis made few calls: {endings:?}"
    );
    assert!(endings.contains_key("finished"), "no call ran: {endings:?}");
    assert!(!log.contains(r#""problem":"internal""#), "{log}");
}
