//! `toolwarden check` end to end: the real binary on real files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde::Deserialize;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn check(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .arg("check")
        .args(args)
        .current_dir(root())
        .output()
        .expect("toolwarden runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_rules(out: &Output) -> BTreeSet<String> {
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap().to_string())
        .collect()
}

fn violation_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples/violations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// The ToolPolicy of a violation example, minus its `toolSelector`, as YAML (an empty
/// document for the examples of baseline rules, which carry no policy).
fn policy_without_tool_selector(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let policy = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "ToolPolicy");
    match policy {
        Some(mut policy) => {
            policy["spec"]
                .as_object_mut()
                .unwrap()
                .remove("toolSelector");
            serde_yaml::to_string(&policy).unwrap()
        }
        None => String::new(),
    }
}

fn write_temp(content: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, content.as_bytes()).unwrap();
    file
}

#[test]
fn the_examples_pass_the_baseline_policy() {
    let out = check(&[
        "-f",
        "examples/",
        "--policy",
        "examples/baseline-policy.yaml",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("checked 5 tool(s)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_rule_has_a_violation_manifest_that_breaks_only_that_rule() {
    let files = violation_files();
    let covered: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let all: BTreeSet<String> = toolwarden::policy::catalog::ALL
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(
        covered, all,
        "examples/violations/ must hold exactly one manifest per rule"
    );
    for file in files {
        let rule = file.file_stem().unwrap().to_string_lossy().into_owned();
        let out = check(&["-f", file.to_str().unwrap(), "-o", "json"]);
        assert_eq!(out.status.code(), Some(1), "{rule}: {}", stderr(&out));
        assert_eq!(
            json_rules(&out),
            BTreeSet::from([rule.clone()]),
            "{rule} must break exactly its own rule"
        );
    }
}

/// The compliant side of every policy rule: the policy each violation manifest
/// carries, applied to the five example tools, finds nothing. The exceptions
/// are image pinning, which the examples (tagged public images) do not do, and
/// output schemas, which the high-risk example cannot declare (its reads answer
/// plain text, and MCP structured output is an object); their compliant cases
/// are the pinned image and the declared output schema below.
#[test]
fn every_policy_rule_passes_on_compliant_tools() {
    for file in violation_files() {
        let rule = file.file_stem().unwrap().to_string_lossy().into_owned();
        if rule == "TW-PRIV-007" || rule == "TW-INPUT-007" {
            continue;
        }
        // The example's policy selects only its own tool; without the selector its rules
        // apply to the compliant examples.
        let unselective = write_temp(&policy_without_tool_selector(&file));
        let out = check(&[
            "-f",
            "examples/",
            "--policy",
            unselective.path().to_str().unwrap(),
            "-o",
            "json",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{rule}'s policy rejects the compliant examples: {}",
            stdout(&out)
        );
    }
    let digest = "a".repeat(64);
    let pinned = std::fs::read_to_string(root().join("examples/violations/TW-PRIV-007.yaml"))
        .unwrap()
        .replace(
            "docker.io/library/busybox:1.36.1",
            &format!("docker.io/library/busybox@sha256:{digest}"),
        );
    let file = write_temp(&pinned);
    let out = check(&["-f", file.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let with_output_schema = std::fs::read_to_string(
        root().join("examples/violations/TW-INPUT-007.yaml"),
    )
    .unwrap()
    .replace(
        "  sanitize:\n",
        "  outputSchema: {type: object, properties: {answer: {type: string}}}\n  sanitize:\n",
    );
    let file = write_temp(&with_output_schema);
    let out = check(&["-f", file.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[test]
fn text_output_names_file_document_rule_path_and_policy() {
    let out = check(&[
        "-f",
        "examples/violations/TW-SANDBOX-001.yaml",
        "-f",
        "examples/baseline-policy.yaml",
    ]);
    let line = "examples/violations/TW-SANDBOX-001.yaml:1: TW-SANDBOX-001 spec.sandbox.timeoutMs: timeoutMs 60000 exceeds the policy cap of";
    // Two policies demand the rule with the same cap: one line naming both.
    assert_eq!(
        stdout(&out),
        format!("{line} 30000 (policies demands-tw-sandbox-001, baseline)\n")
    );
}

#[test]
fn the_violation_examples_checked_together_show_one_line_each_with_its_own_rule() {
    let out = check(&["-f", "examples/violations/"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(String::from).collect();
    assert_eq!(lines.len(), violation_files().len(), "{lines:#?}");
    for line in lines {
        let (file, rest) = line.split_once(".yaml:1: ").unwrap();
        let rule = file.rsplit('/').next().unwrap();
        assert!(rest.starts_with(&format!("{rule} ")), "{line}");
    }
}

#[test]
fn policies_with_different_caps_keep_separate_lines() {
    let stricter = std::fs::read_to_string(root().join("examples/violations/TW-SANDBOX-001.yaml"))
        .unwrap()
        .replace("demands-tw-sandbox-001", "stricter")
        .replace("maxTimeoutMs: 30000", "maxTimeoutMs: 20000");
    assert!(stricter.contains("maxTimeoutMs: 20000"), "{stricter}");
    let file = write_temp(&stricter);
    let out = check(&[
        "-f",
        "examples/violations/TW-SANDBOX-001.yaml",
        "--policy",
        file.path().to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(
        text.contains("cap of 30000 (policy demands-tw-sandbox-001)"),
        "{text}"
    );
    assert!(text.contains("cap of 20000 (policy stricter)"), "{text}");
}

#[test]
fn warn_mode_reports_without_failing() {
    let manifest = std::fs::read_to_string(root().join("examples/violations/TW-RATE-001.yaml"))
        .unwrap()
        .replace("mode: enforce", "mode: warn");
    let file = write_temp(&manifest);
    let out = check(&["-f", file.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("TW-RATE-001 spec.rateLimit: the policy requires a rate limit (warn, policy demands-tw-rate-001)"));
}

#[test]
fn json_output_lists_rule_path_message_and_file() {
    let out = check(&["-f", "examples/violations/TW-PRIV-003.yaml", "-o", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = &report["violations"][0];
    assert_eq!(v["rule"], "TW-PRIV-003");
    assert_eq!(v["path"], "spec.permissions.kubernetes[0].resources");
    assert_eq!(v["file"], "examples/violations/TW-PRIV-003.yaml");
    assert_eq!(v["item"], "least-privilege");
    assert!(v["message"].as_str().unwrap().contains("Secrets"));
}

#[test]
fn sarif_output_has_the_shape_code_scanning_reads() {
    let out = check(&["-f", "examples/violations/TW-INPUT-002.yaml", "-o", "sarif"]);
    let sarif: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sarif["version"], "2.1.0");
    let run = &sarif["runs"][0];
    let rules = run["tool"]["driver"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), toolwarden::policy::catalog::ALL.len());
    let result = &run["results"][0];
    let index = result["ruleIndex"].as_u64().unwrap() as usize;
    assert_eq!(rules[index]["id"], result["ruleId"]);
    assert_eq!(result["ruleId"], "TW-INPUT-002");
    assert_eq!(result["level"], "error");
    let location = &result["locations"][0]["physicalLocation"];
    assert_eq!(
        location["artifactLocation"]["uri"],
        "examples/violations/TW-INPUT-002.yaml"
    );
    assert!(location["region"]["startLine"].as_u64().unwrap() >= 1);
}

#[test]
fn other_kinds_are_skipped_and_counted() {
    let file = write_temp(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: apps/v1\nkind: Deployment\n",
    );
    let out = check(&["-f", file.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("skipped 2 other document(s)"),
        "{}",
        stderr(&out)
    );
}

fn expect_input_error(content: &str, expected: &str) {
    let file = write_temp(content);
    let out = check(&["-f", file.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(expected),
        "expected `{expected}` in:\n{}",
        stderr(&out)
    );
}

const TOOL_HEAD: &str =
    "apiVersion: toolwarden.dev/v1alpha1\nkind: AgentTool\nmetadata: {name: t}\n";
const GOOD_SPEC: &str = "spec:\n  description: d\n  risk: low\n  inputSchema: {type: object}\n  runtime: {image: busybox}\n";

#[test]
fn yaml_syntax_errors_name_the_file_line() {
    // The second document starts at line 10 of the file; the unclosed flow
    // sequence is found at its end, line 12 of the file (line 3 of the document).
    let content = format!("{TOOL_HEAD}{GOOD_SPEC}---\nkind: AgentTool\nspec: [unclosed\n");
    let file = write_temp(&content);
    let out = check(&["-f", file.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let message = stderr(&out);
    assert!(
        message.contains(":2: YAML error at line 12, column 1: did not find expected ',' or ']'"),
        "{message}"
    );
    assert!(
        !message.contains("at line 3"),
        "document-relative lines must not leak: {message}"
    );
}

#[test]
fn unknown_fields_are_reported_with_their_path() {
    expect_input_error(
        &format!("{TOOL_HEAD}{GOOD_SPEC}  sandbox: {{timeoutMS: 10}}\n"),
        "spec.sandbox.timeoutMS: unknown field `timeoutMS`",
    );
    expect_input_error(
        &format!("{TOOL_HEAD}{GOOD_SPEC}specs: {{}}\n"),
        "specs: unknown field",
    );
}

#[test]
fn wrong_types_are_reported_with_their_path() {
    expect_input_error(
        &format!("{TOOL_HEAD}{GOOD_SPEC}  sandbox: {{pids: lots}}\n"),
        "spec.sandbox.pids: invalid type: string \"lots\"",
    );
    expect_input_error(
        &format!(
            "{TOOL_HEAD}{}",
            GOOD_SPEC.replace("risk: low", "risk: extreme")
        ),
        "spec.risk: unknown variant `extreme`",
    );
    expect_input_error(
        &format!("{TOOL_HEAD}{GOOD_SPEC}  risk: high\n"),
        "spec: duplicate entry with key \"risk\"",
    );
}

#[test]
fn crd_bounds_are_enforced_offline() {
    expect_input_error(
        &format!("{TOOL_HEAD}{GOOD_SPEC}  sandbox: {{timeoutMs: 50}}\n"),
        "spec.sandbox.timeoutMs: 50 is less than the minimum of 100",
    );
    expect_input_error(
        &format!("{TOOL_HEAD}{GOOD_SPEC}  sandbox: {{memory: lots}}\n"),
        "spec.sandbox.memory",
    );
    expect_input_error(
        &format!(
            "{TOOL_HEAD}spec:\n  description: ''\n  risk: low\n  inputSchema: {{type: object}}\n  runtime: {{image: busybox}}\n"
        ),
        "spec.description",
    );
}

#[test]
fn missing_paths_and_wrong_api_versions_are_input_errors() {
    let out = check(&["-f", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("does/not/exist.yaml: no such file or directory"));
    expect_input_error(
        &format!("apiVersion: toolwarden.dev/v1\nkind: AgentTool\n{GOOD_SPEC}"),
        "apiVersion: `toolwarden.dev/v1` is not served",
    );
}

#[test]
fn cli_usage_errors_exit_2_with_help() {
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--filename <PATH>"),
        "{}",
        stderr(&out)
    );
    let out = check(&["-f", "examples/", "-o", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("possible values: text, json, sarif"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn crd_subcommand_prints_every_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert_eq!(text.matches("kind: CustomResourceDefinition").count(), 3);
    assert_eq!(text, toolwarden::api::crds_yaml());
}

/// The hardening issue's attack: volume and secret names that climb out of
/// their folder. `check` refuses them as input errors naming the field (the
/// CRD's DNS-1123 pattern, as the API server would), also under a policy
/// that forbids hostPath, which used to be the only guard anyone looked at.
#[test]
fn traversing_volume_and_secret_names_are_refused() {
    let forbid = "---\napiVersion: toolwarden.dev/v1alpha1\nkind: ToolPolicy\nmetadata: {name: p}\nspec:\n  rules:\n    leastPrivilege: {forbidHostPath: true}\n";
    let attacks = [
        (
            "  permissions:\n    filesystem:\n    - {mountPath: /w, readOnly: false, persistentVolumeClaim: '../../../outside'}\n",
            "spec.permissions.filesystem[0].persistentVolumeClaim",
        ),
        (
            "  permissions:\n    filesystem:\n    - {mountPath: /s, configMap: '../../../state/secret-files'}\n",
            "spec.permissions.filesystem[0].configMap",
        ),
        (
            "  permissions:\n    filesystem:\n    - {mountPath: /s, configMap: '..'}\n",
            "spec.permissions.filesystem[0].configMap",
        ),
        (
            "  permissions:\n    filesystem:\n    - {mountPath: /s, persistentVolumeClaim: 'a/b'}\n",
            "spec.permissions.filesystem[0].persistentVolumeClaim",
        ),
        (
            "  permissions:\n    filesystem:\n    - {mountPath: /s, hostPath: '/srv/data/../../etc'}\n",
            "spec.permissions.filesystem[0].hostPath",
        ),
        (
            "  secrets:\n  - {secretName: '../other-tool', key: token, env: T}\n",
            "spec.secrets[0].secretName",
        ),
        (
            "  secrets:\n  - {secretName: s, key: '..', file: /run/x}\n",
            "spec.secrets[0].key",
        ),
    ];
    for (tail, field) in attacks {
        for policy in ["", forbid] {
            expect_input_error(&format!("{TOOL_HEAD}{GOOD_SPEC}{tail}{policy}"), field);
            let file = write_temp(&format!("{TOOL_HEAD}{GOOD_SPEC}{tail}{policy}"));
            let out = check(&["-f", file.path().to_str().unwrap()]);
            assert!(stderr(&out).contains("does not match"), "{}", stderr(&out));
        }
    }
}

/// hostPath is refused by the baseline, with no ToolPolicy at all; an
/// administrator's policy may allow folders by prefix, read-only unless it
/// says otherwise, and `forbidHostPath` still wins.
#[test]
fn host_paths_need_an_administrators_allowance() {
    let mount = |path: &str, read_only: bool| {
        format!(
            "{TOOL_HEAD}{GOOD_SPEC}  permissions:\n    filesystem:\n    - {{mountPath: /h, readOnly: {read_only}, hostPath: '{path}'}}\n"
        )
    };
    let allow = |entries: &str, extra: &str| {
        format!(
            "---\napiVersion: toolwarden.dev/v1alpha1\nkind: ToolPolicy\nmetadata: {{name: admin}}\nspec:\n  rules:\n    leastPrivilege:\n      allowedHostPaths: [{entries}]\n{extra}"
        )
    };
    let verdict = |content: String| {
        let file = write_temp(&content);
        let out = check(&["-f", file.path().to_str().unwrap(), "-o", "json"]);
        (out.status.code(), json_rules(&out), stdout(&out))
    };
    let refused = |content: String, message: &str| {
        let (code, rules, text) = verdict(content);
        assert_eq!(code, Some(1), "{text}");
        assert_eq!(rules, BTreeSet::from(["TW-PRIV-009".to_string()]), "{text}");
        assert!(text.contains(message), "expected `{message}` in {text}");
    };
    // No policy: any hostPath, read-only or not, is refused.
    refused(
        mount("/", false),
        "no ToolPolicy selecting this tool lists it",
    );
    refused(
        mount("/etc", true),
        "no ToolPolicy selecting this tool lists it",
    );
    let data = "{pathPrefix: /srv/data}";
    // Allowed read-only folder: a read-only mount below it passes...
    assert_eq!(
        verdict(mount("/srv/data/reports", true) + &allow(data, "")).0,
        Some(0)
    );
    assert_eq!(
        verdict(mount("/srv/data", true) + &allow(data, "")).0,
        Some(0)
    );
    // ...a writable one does not, nor a sibling sharing the prefix's text.
    refused(
        mount("/srv/data", false) + &allow(data, ""),
        "read-only mounts only",
    );
    refused(
        mount("/srv/database", true) + &allow(data, ""),
        "no ToolPolicy",
    );
    // Writes only where the administrator said so.
    let writable = "{pathPrefix: /srv/data, readOnly: false}";
    assert_eq!(
        verdict(mount("/srv/data/out", false) + &allow(writable, "")).0,
        Some(0)
    );
    // forbidHostPath in any selecting policy refuses even an allowed folder.
    refused(
        mount("/srv/data", true) + &allow(data, "      forbidHostPath: true\n"),
        "hostPath mounts are forbidden",
    );
    // An allowance cannot smuggle `..` either.
    expect_input_error(
        &(mount("/srv/data", true) + &allow("{pathPrefix: '/srv/data/..'}", "")),
        "rules.leastPrivilege.allowedHostPaths[0].pathPrefix",
    );
}

#[test]
fn names_the_api_server_would_refuse_are_refused() {
    for name in ["../../etc", "UPPER", "a/b", "-dash", &"x".repeat(254)] {
        let head = TOOL_HEAD.replacen("{name: t}", &format!("{{name: '{name}'}}"), 1);
        assert_ne!(head, TOOL_HEAD, "the test's manifest has no `{{name: t}}`");
        expect_input_error(&format!("{head}{GOOD_SPEC}"), "metadata.name: ");
    }
}
