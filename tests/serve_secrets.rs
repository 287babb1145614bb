//! Attacks on what reaches a tool and what leaves it, against the real
//! `toolwarden serve` binary over real HTTP with real sandboxes: confusable
//! and growing input that sanitizing would turn into what the schema forbids,
//! a tool leaking its secret escaped, trimmed or across the output cap, and
//! secret rotation (a rewritten file and kubelet's `..data` symlink swap).
//! Needs root and busybox-static; each test prints SKIPPED otherwise.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// 24 bytes with its newline, as a Secret's file often has; a `/` to escape.
const SECRET: &str = "sk-live/0123456789abcde\n";

/// A tool that leaks its secret (env `T`, file `/run/secrets/t`) in the form
/// the input asks for, after `pad` bytes of `x`.
const LEAKY_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: NAME}
spec:
  description: Leaks its secret on request
  risk: low
  maxInputBytes: 256
  inputSchema:
    type: object
    additionalProperties: false
    properties:
      mode: {type: string, enum: [raw, trimmed, uescaped, slashed, uescaped-text, twice-escaped-text, stderr]}
      pad: {type: integer, minimum: 0, maximum: 200}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command:
      - /bin/sh
      - -c
      - |
        read -r line
        case "$line" in *'"stderr"'*) exec >&2;; esac
        pad=$(echo "$line" | sed -n 's/.*"pad":\([0-9]*\).*/\1/p')
        head -c "${pad:-0}" /dev/zero | tr '\0' x
        uesc() { printf %s "$1" | od -An -v -tx1 | tr -d '\n' | sed 's/ /\\u00/g'; }
        case "$line" in
          *'"raw"'*) printf %s "$T";;
          *'"trimmed"'*) printf '%s|' "$(cat /run/secrets/t)";;
          *'"uescaped"'*) printf '{"t":"%s"}' "$(uesc "$T")";;
          *'"slashed"'*) printf '{"t":"%s"}' "$(printf %s "$T" | tr -d '\n' | sed 's|/|\\/|g')";;
          *'"uescaped-text"'*) printf 'token: %s' "$(uesc "$T")";;
          *'"twice-escaped-text"'*) printf 'token: %s' "$(uesc "$T" | sed 's/\\/\\\\/g')";;
          *'"stderr"'*) uesc "$T" >&2; printf %s "$T" >&2; exit 1;;
        esac
  sandbox: {timeoutMs: 5000, maxOutputBytes: CAP}
  secrets:
    - {secretName: leaky, key: token, env: T}
    - {secretName: leaky, key: token, file: /run/secrets/t}
  rateLimit: {requestsPerMinute: 6000}
  audit: {input: full}
"#;

/// A tool that runs its input through a shell, trusting the schema to keep
/// `;`, backticks and `|` out, with sanitizing that could put them back.
const SHELL_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: shell}
spec:
  description: Echoes a word through the shell
  risk: low
  maxInputBytes: 1024
  inputSchema:
    type: object
    additionalProperties: false
    properties:
      cmd: {type: string, maxLength: 40, pattern: "^[^;`|]*$"}
      note: {type: string, maxLength: 20}
      code: {type: string, maxLength: 20, pattern: "^[A-Z_]*$"}
      name: {type: string, maxLength: 20}
  sanitize:
    - {field: /cmd, transforms: [normalizeUnicode]}
    - {field: /note, transforms: [stripHtml]}
    - {field: /code, transforms: [lowercase]}
    - {field: /name, transforms: [lowercase]}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command: [/bin/sh, -c, 'cat']
  sandbox: {timeoutMs: 5000}
  rateLimit: {requestsPerMinute: 6000}
  audit: {input: full}
"#;

/// Prints the SHA-256 of each secret (never the value) and echoes `echo`.
const ROTATING_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: rotating}
spec:
  description: Shows which secret values it got
  risk: low
  maxInputBytes: 256
  inputSchema:
    type: object
    additionalProperties: false
    properties:
      echo: {type: string, maxLength: 64}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command:
      - /bin/sh
      - -c
      - |
        read -r line
        env=$(printf %s "$ENV_TOKEN" | sha256sum | cut -d' ' -f1)
        file=$(sha256sum /run/secrets/mounted | cut -d' ' -f1)
        printf '{"env":"%s","file":"%s","echo":%s}' "$env" "$file" "$(echo "$line" | sed 's/.*"echo":\("[^"]*"\).*/\1/')"
  sandbox: {timeoutMs: 5000}
  secrets:
    - {secretName: plain, key: token, env: ENV_TOKEN}
    - {secretName: mounted, key: token, file: /run/secrets/mounted}
  rateLimit: {requestsPerMinute: 6000}
  audit: {input: full}
"#;

/// `toolwarden serve` on a free port, stopped when dropped.
struct Served {
    child: Child,
    base: String,
    audit: std::path::PathBuf,
    _state: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A folder with `manifests`, the busybox image beside them and `secrets/`.
fn tools_dir(manifests: &[(&str, String)]) -> tempfile::TempDir {
    let dir = common::world_traversable_tempdir();
    common::example_images_and_volumes(dir.path());
    for (name, text) in manifests {
        std::fs::write(dir.path().join(format!("{name}.yaml")), text).unwrap();
    }
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    dir
}

fn serve(dir: &Path) -> Served {
    let state = tempfile::Builder::new()
        .prefix("twtest-secrets")
        .tempdir_in("/run")
        .unwrap();
    let audit = dir.join("audit.log");
    let (child, banner, addr) = common::spawn_serve(
        Command::new(env!("CARGO_BIN_EXE_toolwarden"))
            .args(["serve", "--listen", "127.0.0.1:0", "--audit-log"])
            .arg(&audit)
            .arg("--secrets-dir")
            .arg(dir.join("secrets"))
            .arg("--state-dir")
            .arg(state.path())
            .arg(dir),
    );
    assert!(
        // Refusals are logged (`... WARN ...: refused NAME (...)`).
        !banner.iter().any(|l| l.contains("refused ")),
        "{banner:#?}"
    );
    Served {
        child,
        base: format!("http://{addr}"),
        audit,
        _state: state,
    }
}

impl Served {
    fn invoke(&self, tool: &str, input: &Value) -> (u16, Value) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let response = reqwest::Client::new()
                .post(format!("{}/v1/tools/{tool}/invoke", self.base))
                .header("content-type", "application/json")
                .body(input.to_string())
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json().await.unwrap())
        })
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap()
    }
}

/// Every form of `secret` the caller could turn back into it by decoding
/// JSON once, and its trimmed value.
fn leaked_forms(secret: &str) -> Vec<String> {
    let u: String = secret.bytes().map(|b| format!("\\u{b:04x}")).collect();
    vec![
        secret.to_string(),
        secret.trim().to_string(),
        secret.trim().replace('/', "\\/"),
        u.clone(),
        u.replace('\\', "\\\\"),
    ]
}

fn assert_no_leak(what: &str, text: &str) {
    for form in leaked_forms(SECRET) {
        assert!(!text.contains(&form), "{what} leaks {form:?}: {text}");
    }
}

#[test]
fn a_tool_leaking_its_secret_escaped_trimmed_or_across_the_cap_gets_only_redacted_output() {
    require_root!();
    let dir = tools_dir(&[
        (
            "leaky",
            LEAKY_TOOL.replace("NAME", "leaky").replace("CAP", "65536"),
        ),
        (
            "capped",
            LEAKY_TOOL.replace("NAME", "capped").replace("CAP", "64"),
        ),
    ]);
    std::fs::create_dir(dir.path().join("secrets/leaky")).unwrap();
    std::fs::write(dir.path().join("secrets/leaky/token"), SECRET).unwrap();
    let served = serve(dir.path());

    let leak = |tool: &str, mode: &str, pad: usize| {
        let (status, body) = served.invoke(tool, &json!({"mode": mode, "pad": pad}));
        assert_eq!(status, 200, "{mode}: {body}");
        assert_no_leak(mode, &body.to_string());
        body
    };
    assert_eq!(leak("leaky", "raw", 0)["output"], "[REDACTED]");
    assert_eq!(leak("leaky", "trimmed", 0)["output"], "[REDACTED]|");
    // The tool's JSON is decoded for the caller: redaction sees the decoded text.
    assert_eq!(
        leak("leaky", "uescaped", 0)["output"],
        json!({"t": "[REDACTED]"})
    );
    assert_eq!(
        leak("leaky", "slashed", 0)["output"],
        json!({"t": "[REDACTED]"})
    );
    // Not JSON: returned as text, with the escaped form found all the same.
    assert_eq!(
        leak("leaky", "uescaped-text", 3)["output"],
        "xxxtoken: [REDACTED]"
    );

    // Across the 64-byte cap: redacted before the cut, so no prefix is left,
    // whether the secret starts just before the cap or well before it.
    for (mode, prefix, pads) in [("raw", "", 38..=64), ("uescaped-text", "token: ", 30..=57)] {
        for pad in pads {
            let body = leak("capped", mode, pad);
            let start = pad + prefix.len();
            let kept = format!("{}{prefix}", "x".repeat(pad));
            let whole = format!("{kept}[REDACTED]");
            let expected = if start < 64 { &whole } else { &kept };
            assert_eq!(
                body["output"].as_str().unwrap(),
                &expected[..expected.len().min(64)],
                "{mode} with {pad} bytes before it"
            );
            let cut = start >= 64 || whole.len() > 64;
            assert_eq!(
                body["outputTruncated"],
                json!(cut.then_some(true)),
                "{mode} {pad}"
            );
        }
    }

    // Escaped twice (7 bytes a byte, past the capture margin of 6): from 34
    // bytes of padding on, the capture itself ends inside the secret.
    for pad in 30..=57 {
        let body = leak("capped", "twice-escaped-text", pad);
        let whole = format!("{}token: [REDACTED]", "x".repeat(pad));
        assert_eq!(
            body["output"].as_str().unwrap(),
            &whole[..whole.len().min(64)],
            "twice escaped with {pad} bytes before it"
        );
    }

    // Stderr kept in the audit record: escaped and raw, and across the cap.
    let pads = [0, 40, 50, 55, 60, 63, 64];
    for pad in pads {
        let (status, _) = served.invoke("capped", &json!({"mode": "stderr", "pad": pad}));
        assert_eq!(status, 502);
    }
    let audit = served.audit_text();
    assert_no_leak("the audit log", &audit);
    let stderr: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "finished" && r["exitCode"] == 1)
        .map(|r| r["stderr"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = pads
        .iter()
        .map(|&pad| {
            // The raw copy starts past the cap: only the escaped one is kept.
            let whole = format!("{}[REDACTED]", "x".repeat(pad));
            whole[..whole.len().min(64)].to_string()
        })
        .collect();
    assert_eq!(stderr, expected);
}

#[test]
fn sanitizing_cannot_smuggle_in_what_the_schema_forbids() {
    require_root!();
    let dir = tools_dir(&[("shell", SHELL_TOOL.to_string())]);
    let served = serve(dir.path());
    let attacks = [
        // NFC folds GREEK QUESTION MARK into `;` and GREEK VARIA into a backtick.
        ("cmd", json!({"cmd": "ls\u{37e} id \u{1fef}id\u{1fef}"})),
        ("cmd", json!({"cmd": "ls \u{37e}\u{37e} reboot"})),
        // Escaping grows 20 `&` into 100 characters; `<` and quotes likewise.
        ("note", json!({"note": "&".repeat(20)})),
        ("note", json!({"note": "x < y > \"z\" & w"})),
        // Lowercase turns a value the pattern allows into one it forbids,
        ("code", json!({"code": "DROP_ALL"})),
        // and dotted capital I grows past the maximum length.
        ("name", json!({"name": "\u{130}".repeat(15), "code": "OK"})),
    ];
    for (field, attack) in &attacks {
        let (status, body) = served.invoke("shell", attack);
        assert_eq!(status, 400, "{attack}: {body}");
        let errors = body["errors"].as_array().unwrap();
        assert!(
            errors.iter().any(|e| e["path"] == format!("/{field}")
                && e["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("after sanitizing: ")),
            "{attack}: {body}"
        );
    }
    // Values that stay valid once sanitized still run, sanitized.
    let (status, body) = served.invoke("shell", &json!({"cmd": "caf\u{65}\u{301}", "code": ""}));
    assert_eq!(
        (status, &body["output"]),
        (200, &json!({"cmd": "caf\u{e9}", "code": ""}))
    );

    let records: Vec<Value> = served
        .audit_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied: Vec<&Value> = records.iter().filter(|r| r["event"] == "denied").collect();
    assert_eq!(denied.len(), attacks.len(), "every refusal is audited");
    assert!(
        denied
            .iter()
            .all(|r| r["stage"] == "validation"
                && r["reason"] == "the sanitized input fails the schema"),
        "{denied:?}"
    );
    assert_eq!(
        records.iter().filter(|r| r["event"] == "started").count(),
        1,
        "no refused input reached the tool"
    );
}

/// Writes `value` as kubelet's atomic writer does: a fresh timestamped
/// folder, a `..data_tmp` symlink to it renamed over `..data`, the key a
/// symlink through `..data`, and the previous folder removed.
fn kubelet_write(secret: &Path, key: &str, value: &str, version: u32) {
    std::fs::create_dir_all(secret).unwrap();
    let data = format!("..2026_12_01_00_00_0{version}.000000001");
    std::fs::create_dir(secret.join(&data)).unwrap();
    std::fs::write(secret.join(&data).join(key), value).unwrap();
    std::os::unix::fs::symlink(&data, secret.join("..data_tmp")).unwrap();
    let previous = std::fs::read_link(secret.join("..data")).ok();
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    if !secret.join(key).exists() {
        std::os::unix::fs::symlink(format!("..data/{key}"), secret.join(key)).unwrap();
    }
    if let Some(previous) = previous {
        std::fs::remove_dir_all(secret.join(previous)).unwrap();
    }
}

fn sha256(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// Calls `rotating` until `done` holds for its output; fails after 20 s.
fn poll(served: &Served, echo: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = served.invoke("rotating", &json!({"echo": echo}));
        assert_eq!(status, 200, "{body}");
        if done(&body["output"]) {
            return body["output"].clone();
        }
        assert!(Instant::now() < deadline, "no rotation seen: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rotated_secrets_reach_new_calls_and_old_and_new_values_stay_redacted() {
    require_root!();
    let dir = tools_dir(&[("rotating", ROTATING_TOOL.to_string())]);
    let secrets = dir.path().join("secrets");
    let (plain_1, plain_2) = ("plain-value-one-1111", "plain-value-two-2222");
    let (mounted_1, mounted_2) = ("mounted-value-one-3333\n", "mounted-value-two-4444\n");
    std::fs::create_dir(secrets.join("plain")).unwrap();
    std::fs::write(secrets.join("plain/token"), plain_1).unwrap();
    kubelet_write(&secrets.join("mounted"), "token", mounted_1, 1);
    let served = serve(dir.path());
    let first = poll(&served, "hello", |_| true);
    assert_eq!(
        first,
        json!({"env": sha256(plain_1), "file": sha256(mounted_1), "echo": "hello"})
    );

    // A file rewritten in place.
    std::fs::write(secrets.join("plain/token"), plain_2).unwrap();
    poll(&served, "x", |out| out["env"] == sha256(plain_2));
    // Kubelet's `..data` swap: no event on the key's own path.
    kubelet_write(&secrets.join("mounted"), "token", mounted_2, 2);
    let rotated = poll(&served, "x", |out| out["file"] == sha256(mounted_2));
    assert_eq!(rotated["env"], sha256(plain_2));

    // The old values stay redacted (a tool may have kept them), the new ones too.
    for value in [plain_1, plain_2, mounted_1.trim(), mounted_2.trim()] {
        let (_, body) = served.invoke("rotating", &json!({"echo": value}));
        assert_eq!(body["output"]["echo"], "[REDACTED]", "{value}");
    }
}
