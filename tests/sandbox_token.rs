//! A tool's own Kubernetes identity, attacked in real sandboxes: each call of a tool with
//! `permissions.kubernetes` finds a fresh token (minted per call) in a tmpfs of its own at
//! the standard service account path; printing it yields only `[REDACTED]` (output and
//! audit log), the next call's token differs and nothing of the previous one is left to it,
//! a tool without the permissions has neither the files nor the mount, and hostile
//! per-call file names never reach a container.
//!
//! Needs root and a working sandbox; `TOOLWARDEN_REQUIRE_SANDBOX=1` makes a skip a failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use toolwarden::runner::audit::{AuditKey, AuditLog};
use toolwarden::runner::auth::Authenticator;
use toolwarden::runner::kube_identity::{MintFuture, TokenMinter, ToolIdentity};
use toolwarden::runner::pipeline::{CallContext, Called, Runner};
use toolwarden::runner::ratelimit::LimiterClock;
use toolwarden::runner::registry::{Registry, manifest_files};
use toolwarden::runner::reload;
use toolwarden::runner::tool::SecretsDir;
use toolwarden::sandbox::model::{CallFile, MAX_CALL_FILE_BYTES, SERVICE_ACCOUNT_DIR};
use toolwarden::sandbox::{Error, Invocation, SandboxSpec};

/// Prints its token, inspects its folder (and tries to leave the token behind for the
/// next call), or looks for a `needle` everywhere a previous call could have left it.
const LISTER: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: lister, namespace: agents}
spec:
  description: Lists pods with its own identity, or misbehaves on request
  risk: low
  inputSchema:
    type: object
    additionalProperties: false
    properties:
      mode: {type: string, enum: [print, inspect, look]}
      needle: {type: string, maxLength: 4096}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command:
      - /bin/sh
      - -c
      - |
        D=/var/run/secrets/kubernetes.io/serviceaccount
        read -r line
        case "$line" in
        *print*) cat $D/token; echo; cat $D/token >&2; exit 0 ;;
        *inspect*)
          stat -c '%a %u %g %n' $D $D/token $D/namespace $D/ca.crt
          cat $D/namespace; echo
          sha256sum $D/token | cut -d' ' -f1
          grep " $D " /proc/mounts | cut -d' ' -f3
          cat $D/token > /tmp/stash; cat $D/token > $D/stash 2>/dev/null
          echo > $D/token 2>/dev/null || echo read-only ;;
        *look*)
          N=$(echo "$line" | sed 's/.*"needle":"\([^"]*\)".*/\1/')
          ls -A $D /tmp
          grep -rlF "$N" /tmp /var /run /etc 2>/dev/null
          echo done ;;
        esac
  sandbox: {timeoutMs: 5000}
  permissions:
    kubernetes:
      - {apiGroups: [""], resources: [pods], verbs: [get, list]}
  audit: {input: full}
"#;

/// The same image, no Kubernetes permissions: it looks for a token anyway.
const PLAIN: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: plain, namespace: agents}
spec:
  description: Looks for a Kubernetes token it was never given
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command:
      - /bin/sh
      - -c
      - |
        D=/var/run/secrets/kubernetes.io/serviceaccount
        echo "files:$(ls -A $D 2>/dev/null | tr '\n' ' ')"
        echo "mounts:$(grep -c serviceaccount /proc/mounts)"
        cat $D/token 2>&1
        exit 0
  sandbox: {timeoutMs: 5000}
"#;

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n";

/// Mints `token(1)`, `token(2)`, ... : JWT-shaped and each one different.
#[derive(Default)]
struct CountingMinter(AtomicUsize);

fn token(n: usize) -> String {
    format!(
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJsaXN0ZXItdG9vbCIsIm4iOiJ{n}In0.c2lnbmF0dXJl{n}LW9mLXRva2Vu"
    )
}

impl TokenMinter for CountingMinter {
    fn mint(&self) -> MintFuture<'_> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(std::future::ready(Ok(token(n))))
    }
}

struct Setup {
    runner: Arc<Runner>,
    minter: Arc<CountingMinter>,
    audit_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup() -> Option<Setup> {
    if let Some(why) = common::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let dir = common::world_traversable_tempdir();
    let (executor, images) = common::runner_sandbox(dir.path());
    let tools = dir.path().join("tools");
    std::fs::create_dir(&tools).unwrap();
    std::fs::write(tools.join("lister.yaml"), LISTER).unwrap();
    std::fs::write(tools.join("plain.yaml"), PLAIN).unwrap();
    let registry =
        Arc::new(Registry::new(LimiterClock::manual(), SecretsDir(None)).with_images(images));
    let report = registry.load(&manifest_files(&tools).unwrap());
    assert!(
        report.refused.is_empty() && report.errors.is_empty(),
        "{report:?}"
    );
    let audit_path = dir.path().join("audit.log");
    let audit = AuditLog::open_file(&audit_path, AuditKey::new(&[9; 32]).unwrap()).unwrap();
    let auth = Authenticator {
        allow_anonymous: true,
        ..Authenticator::default()
    };
    let minter = Arc::new(CountingMinter::default());
    let identity = ToolIdentity::new(minter.clone(), "agents".into(), CA.into());
    let runner = Arc::new(Runner {
        tool_identity: Some(Arc::new(identity)),
        ..Runner::new(registry, auth, audit, Arc::new(executor))
    });
    reload::prepare_executor(&runner).await;
    assert_eq!(runner.registry.snapshot().len(), 2, "both tools are served");
    Some(Setup {
        runner,
        minter,
        audit_path,
        _dir: dir,
    })
}

impl Setup {
    /// The tool's output (a JSON string: none of these tools prints JSON).
    async fn call(&self, tool: &str, input: Value) -> String {
        let ctx = CallContext {
            transport: "rest",
            client_ip: Some("127.0.0.1".into()),
            ..CallContext::default()
        };
        let body = std::future::ready(Ok(bytes::Bytes::from(input.to_string())));
        match self.runner.invoke(&ctx, tool, body).await {
            Ok(Called::Ran(success)) => serde_json::from_str(success.output.get()).unwrap(),
            other => panic!("{tool}: {other:?}"),
        }
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(&self.audit_path).unwrap()
    }
}

/// A pool's spec whose sandboxes get per-call files at the service account path.
fn call_files_spec(rootfs: &common::Rootfs, warm_pool: usize) -> SandboxSpec {
    SandboxSpec {
        call_files_dir: Some(SERVICE_ACCOUNT_DIR.into()),
        ..common::spec(rootfs, common::limits(), warm_pool)
    }
}

fn sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_that_prints_its_token_gets_only_the_redacted_form() {
    let Some(s) = setup().await else { return };
    let output = s.call("lister", json!({"mode": "print"})).await;
    assert_eq!(output, "[REDACTED]\n");
    assert_eq!(s.minter.0.load(Ordering::SeqCst), 1);
    let audit = s.audit();
    let signature = token(1).rsplit_once('.').unwrap().1.to_string();
    assert!(!audit.contains(&signature), "{audit}");
    // Its stderr (kept in the audit record only for failures) is redacted just the same.
    assert!(audit.contains("\"event\":\"finished\""), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_has_its_own_token_in_a_private_tmpfs_and_none_of_the_previous_one() {
    let Some(s) = setup().await else { return };
    let first = s.call("lister", json!({"mode": "inspect"})).await;
    let dir = SERVICE_ACCOUNT_DIR;
    // Owned by the sandbox's user, files 0400, in a tmpfs of the call's own.
    let expected = format!(
        "700 65534 65534 {dir}\n400 65534 65534 {dir}/token\n400 65534 65534 {dir}/namespace\n\
         400 65534 65534 {dir}/ca.crt\nagents\n{}\ntmpfs\n",
        sha256(&token(1))
    );
    assert!(first.starts_with(&expected), "{first}");
    // Mode 0400: even its owner cannot overwrite it without a chmod first.
    assert!(first.ends_with("read-only\n"), "{first}");
    // The next call: another token, and nothing the first call stashed (in /tmp, in the
    // token folder) is there.
    let second = s.call("lister", json!({"mode": "inspect"})).await;
    assert!(second.contains(&sha256(&token(2))), "{second}");
    assert!(!second.contains(&sha256(&token(1))), "{second}");
    let look = s
        .call("lister", json!({"mode": "look", "needle": token(1)}))
        .await;
    assert_eq!(
        look,
        format!("/tmp:\n\n{dir}:\nca.crt\nnamespace\ntoken\ndone\n")
    );
    assert_eq!(s.minter.0.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_without_kubernetes_permissions_has_no_token_and_no_mount() {
    let Some(s) = setup().await else { return };
    // Served beside a tool with an identity (same image): nothing of it reaches this one.
    let output = s.call("plain", json!({})).await;
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "files:", "files of a token: {output}");
    assert_eq!(lines[1], "mounts:0", "a serviceaccount mount: {output}");
    assert!(
        lines[2].contains("No such file or directory"),
        "a token file: {output}"
    );
    assert_eq!(
        s.minter.0.load(Ordering::SeqCst),
        0,
        "minted for a plain tool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_per_call_file_names_never_reach_a_container() {
    if let Some(why) = common::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let rootfs = common::busybox_rootfs();
    let engine = common::engine();
    let pool = engine.pool(call_files_spec(&rootfs, 0)).await.unwrap();
    let before = tree(&rootfs.path());
    for name in [
        "../../../etc/passwd",
        "../token",
        "..",
        "a/b",
        "/token",
        ".token",
        "tok\0en",
        "",
    ] {
        let inv = Invocation {
            files: vec![CallFile {
                name: name.into(),
                contents: "owned".into(),
            }],
            ..common::sh("echo ran")
        };
        let err = pool.run(inv).await.unwrap_err();
        assert!(matches!(err, Error::Invocation(_)), "{name:?}: {err}");
        assert_eq!(err.reason(), "InvalidInvocation");
    }
    assert_eq!(tree(&rootfs.path()), before, "the rootfs changed");
    // A good name lands in the folder, nowhere else.
    let inv = Invocation {
        files: vec![CallFile {
            name: "token".into(),
            contents: "t0ken".into(),
        }],
        ..common::sh(&format!("cat {SERVICE_ACCOUNT_DIR}/token"))
    };
    assert_eq!(common::text(&common::run(&pool, inv).await.stdout), "t0ken");
    // Files at the size limit (an invocation far beyond one pipe buffer) arrive whole.
    let big = "c".repeat(MAX_CALL_FILE_BYTES);
    let inv = Invocation {
        files: vec![
            CallFile {
                name: "ca.crt".into(),
                contents: big.clone(),
            },
            CallFile {
                name: "token".into(),
                contents: big,
            },
        ],
        ..common::sh(&format!("cat {SERVICE_ACCOUNT_DIR}/* | wc -c"))
    };
    let outcome = common::run(&pool, inv).await;
    assert_eq!(
        common::text(&outcome.stdout).trim(),
        (2 * MAX_CALL_FILE_BYTES).to_string(),
        "{}",
        common::text(&outcome.stderr)
    );
    // A pool without the folder refuses files outright.
    let plain = engine
        .pool(common::spec(&rootfs, common::limits(), 0))
        .await
        .unwrap();
    let inv = Invocation {
        files: vec![CallFile {
            name: "token".into(),
            contents: "t0ken".into(),
        }],
        ..common::sh("true")
    };
    assert_eq!(
        plain.run(inv).await.unwrap_err().reason(),
        "InvalidInvocation"
    );
}

/// Every path under `root`, for before/after comparisons.
fn tree(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                todo.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Without a user namespace (as where a pod cannot nest one) the folder and its files
/// still belong to the sandbox's user alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_files_belong_to_the_sandbox_user_without_a_user_namespace_too() {
    if let Some(why) = common::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let rootfs = common::busybox_rootfs();
    // A rootfs the user-namespace root cannot traverse: the pool goes without one.
    std::fs::set_permissions(
        rootfs.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let engine = common::engine();
    let pool = engine.pool(call_files_spec(&rootfs, 1)).await.unwrap();
    assert!(!pool.enforcement().user_namespace);
    let inv = Invocation {
        files: vec![CallFile {
            name: "token".into(),
            contents: "t0ken".into(),
        }],
        ..common::sh(&format!(
            "stat -c '%a %u %g' {SERVICE_ACCOUNT_DIR} {SERVICE_ACCOUNT_DIR}/token; id -u"
        ))
    };
    let outcome = common::run(&pool, inv).await;
    assert_eq!(
        common::text(&outcome.stdout),
        "700 65534 65534\n400 65534 65534\n65534\n",
        "{}",
        common::text(&outcome.stderr)
    );
}

/// A read-only image (an image volume) without the service account folder: the pool is
/// refused with an error naming the mount point, and nothing is written to the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_image_without_the_mount_point_is_refused_by_name() {
    use nix::mount::{MsFlags, mount, umount2};
    if let Some(why) = common::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let rootfs = common::busybox_rootfs();
    let root = rootfs.path();
    // As the kubelet mounts an image volume: read-only. Before the engine starts, so its
    // zygote sees the mount.
    mount(
        Some(&root),
        &root,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(root.clone());
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mount(None::<&str>, &root, None::<&str>, flags, None::<&str>).unwrap();
    let engine = common::engine();
    let err = engine
        .pool(call_files_spec(&rootfs, 0))
        .await
        .err()
        .expect("a pool on an image without the mount point");
    let message = err.to_string();
    assert!(
        message.contains(&format!("lacks the mount point {SERVICE_ACCOUNT_DIR}"))
            && message.contains("the image must contain it"),
        "{message}"
    );
    assert!(!root.join("var/run").exists());
}
