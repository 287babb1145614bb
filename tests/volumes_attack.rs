//! Attacks on the host side of the runner's volumes, file secrets and
//! isolation, written as the outside suite ran them: traversing volume names,
//! a symbolic link planted in `volumes/`, one tool reading another's secret,
//! a writable volume filled to the brim, a tool served from a folder that
//! costs it its user namespace. Real sandboxes and the real `serve` binary;
//! needs root and busybox-static (each test prints SKIPPED otherwise).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use toolwarden::api::AgentTool;
use toolwarden::runner::executor::{ExecError, ToolExecutor};
use toolwarden::runner::images::ImageStore;
use toolwarden::runner::ratelimit::LimiterClock;
use toolwarden::runner::sandbox_executor::{SandboxExecutor, VolumesDir};
use toolwarden::runner::tool::{PreparedTool, SecretsDir, prepare};

/// A tool running `script` under /bin/sh, with `extra` appended to its spec.
/// Parsed without the CRD schema: the runner must hold even when a manifest
/// reaches it unchecked.
fn tool(name: &str, script: &str, extra: &str) -> AgentTool {
    let yaml = format!(
        "apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {{name: {name}}}
spec:
  description: attack
  risk: low
  inputSchema: {{type: object}}
  runtime:
    image: docker.io/library/busybox:1.36.1
    command: [/bin/sh, -c, {script:?}]
  sandbox: {{timeoutMs: 20000, memory: 64Mi, warmPool: 0}}
{extra}"
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn prepared(tool: &AgentTool, store: &ImageStore, secrets: &SecretsDir) -> Arc<PreparedTool> {
    Arc::new(prepare(tool, 1, secrets, Some(store), &LimiterClock::manual()).unwrap())
}

fn mount(field: &str, name: &str, read_only: bool) -> String {
    format!(
        "  permissions:\n    filesystem:\n    - {{mountPath: /w, readOnly: {read_only}, {field}: '{name}'}}\n"
    )
}

/// Every file below `dir` with its content (symbolic links as their target).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(path, target.into_os_string().into_encoded_bytes());
            } else if kind.is_dir() {
                out.insert(path.clone(), b"<dir>".to_vec());
                todo.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Runs `tool` once; (stdout, stderr).
async fn call(executor: &SandboxExecutor, tool: &PreparedTool) -> (String, String) {
    let out = executor
        .execute(tool, b"{}".to_vec(), tool.secrets.clone())
        .await
        .unwrap_or_else(|e| panic!("{} did not run: {e}", tool.name));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts the tool is refused by `prepare` and by a direct call, both
/// saying `why`.
async fn assert_refused(executor: &SandboxExecutor, tool: &Arc<PreparedTool>, why: &str) {
    let refused = executor.prepare(std::slice::from_ref(tool)).await.unwrap();
    assert_eq!(refused.len(), 1, "{} was not refused", tool.name);
    assert!(
        matches!(refused[0].1, ExecError::NotRunnable(_)) && refused[0].1.to_string().contains(why),
        "expected `{why}` in {refused:?}"
    );
    match executor.execute(tool, b"{}".to_vec(), vec![]).await {
        Err(e @ ExecError::NotRunnable(_)) => assert!(e.to_string().contains(why), "{e}"),
        other => panic!("{} ran: {other:?}", tool.name),
    }
}

const WRITE_AND_READ: &str = "echo pwned > /w/pwned; ls -la /w; cat /w/*";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversing_volume_names_never_leave_the_volumes_folder() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    let (executor, store) = common::runner_sandbox(dir.path());
    // What the names aim at, outside volumes/; and the real /etc.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(outside.join("secret-files")).unwrap();
    std::fs::write(outside.join("secret-files/0"), "other tool's secret").unwrap();
    let before = snapshot(dir.path());
    let etc = std::fs::metadata("/etc").unwrap().mtime();
    let attacks = [
        ("persistentVolumeClaim", "../../outside", false),
        ("persistentVolumeClaim", "../../../../../../outside", false),
        ("persistentVolumeClaim", "..", false),
        ("persistentVolumeClaim", ".", false),
        (
            "persistentVolumeClaim",
            "agent-workspace/../../../outside",
            false,
        ),
        ("configMap", "../../outside/secret-files", true),
        ("configMap", "../../../../../../etc", true),
        ("configMap", "/etc", true),
        ("configMap", "Agent-Workspace", true),
    ];
    for (field, name, read_only) in attacks {
        let attack = tool("climber", WRITE_AND_READ, &mount(field, name, read_only));
        let attack = prepared(&attack, &store, &SecretsDir::default());
        assert_refused(&executor, &attack, "is not a Kubernetes name").await;
    }
    assert_eq!(snapshot(dir.path()), before, "the host changed");
    assert_eq!(std::fs::metadata("/etc").unwrap().mtime(), etc);
    let missing = tool("missing", "true", &mount("configMap", "not-there", true));
    let missing = prepared(&missing, &store, &SecretsDir::default());
    assert_refused(&executor, &missing, "configmap/not-there does not exist").await;
    // The honest name still works, so the refusals are about the names.
    let honest = tool(
        "honest",
        "cat /w/notes.txt",
        &mount("configMap", "notes", true),
    );
    std::fs::create_dir_all(dir.path().join("volumes/configmap/notes")).unwrap();
    std::fs::write(dir.path().join("volumes/configmap/notes/notes.txt"), "hi\n").unwrap();
    let honest = prepared(&honest, &store, &SecretsDir::default());
    assert_eq!(call(&executor, &honest).await.0, "hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_in_the_volumes_folder_is_not_followed_out() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    let (executor, store) = common::runner_sandbox(dir.path());
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(outside.join("data")).unwrap();
    std::fs::write(outside.join("data/keep.txt"), "host data\n").unwrap();
    let volumes = dir.path().join("volumes");
    // A claim that is a link out; a link to /etc; a whole kind folder that is a link.
    symlink(&outside, volumes.join("pvc/evil")).unwrap();
    symlink("/etc", volumes.join("pvc/etc")).unwrap();
    symlink("../../outside/data", volumes.join("pvc/relative")).unwrap();
    symlink(&outside, volumes.join("configmap")).unwrap();
    let before = snapshot(dir.path());
    let etc = std::fs::metadata("/etc").unwrap().mtime();
    for (field, name, read_only) in [
        ("persistentVolumeClaim", "evil", false),
        ("persistentVolumeClaim", "evil", true),
        ("persistentVolumeClaim", "etc", true),
        ("persistentVolumeClaim", "relative", false),
        ("configMap", "data", true),
    ] {
        let attack = tool("linker", WRITE_AND_READ, &mount(field, name, read_only));
        let attack = prepared(&attack, &store, &SecretsDir::default());
        assert_refused(&executor, &attack, "without following a symbolic link").await;
    }
    // A hostPath through a link, or with `..`, is not the folder a policy allowed.
    let via_link = volumes.join("pvc/evil").display().to_string();
    let dotted = format!("{}/../outside", volumes.display());
    for (path, why) in [
        (via_link.as_str(), "name the real folder"),
        (dotted.as_str(), "is not an absolute path without"),
    ] {
        let attack = tool("linker", WRITE_AND_READ, &mount("hostPath", path, false));
        let attack = prepared(&attack, &store, &SecretsDir::default());
        assert_refused(&executor, &attack, why).await;
    }
    assert_eq!(snapshot(dir.path()), before, "the host changed");
    assert_eq!(std::fs::metadata("/etc").unwrap().mtime(), etc);
}

/// Two tools with file secrets run as the same sandbox user. The second
/// mounts the whole state folder (as an allowed hostPath over `/run` would)
/// and tries every path to the first's secret: listing, globbing, the exact
/// name read off the host, find. It reads only its own. With a user namespace
/// and without one (where the container's root is the host's root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tool_cannot_read_another_tools_file_secret_by_any_path() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    let secrets = dir.path().join("secrets");
    for (name, value) in [("alpha", "alpha-secret-4711"), ("beta", "beta-secret-0815")] {
        std::fs::create_dir_all(secrets.join(name)).unwrap();
        std::fs::write(secrets.join(name).join("token"), value).unwrap();
    }
    let secrets = SecretsDir(Some(secrets));
    let (executor, store) = common::runner_sandbox(dir.path());
    secret_attack(&executor, &store, &secrets, &dir.path().join("state"), true).await;
    // Without a user namespace: the root file system in a folder only root can enter.
    let private = dir.path().join("private");
    common::build_busybox_rootfs(&private.join("images").join(
        toolwarden::runner::images::entry_name("docker.io/library/busybox:1.36.1"),
    ));
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let store = ImageStore::new(private.join("images"), dir.path().join("cache"));
    let state = dir.path().join("state-without-userns");
    let executor = SandboxExecutor::new(common::engine(), VolumesDir(None), state.clone())
        .allow_degraded(true);
    secret_attack(&executor, &store, &secrets, &state, false).await;
}

async fn secret_attack(
    executor: &SandboxExecutor,
    store: &ImageStore,
    secrets: &SecretsDir,
    state: &Path,
    user_namespace: bool,
) {
    let file_secret = |name: &str| {
        format!("  secrets:\n  - {{secretName: {name}, key: token, file: /run/secrets/token}}\n")
    };
    let alpha = tool("alpha", "cat /run/secrets/token", &file_secret("alpha"));
    let alpha = prepared(&alpha, store, secrets);
    assert!(
        executor
            .prepare(std::slice::from_ref(&alpha))
            .await
            .unwrap()
            .is_empty()
    );
    let degraded = !executor.degradations(&alpha).unwrap().is_empty();
    assert_eq!(degraded, !user_namespace);
    assert_eq!(call(executor, &alpha).await.0, "alpha-secret-4711");
    // The exact path of alpha's file, as the host sees it (its only secret folder yet).
    let folders: Vec<String> = std::fs::read_dir(state.join("secret-files"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let [folder] = folders.as_slice() else {
        panic!("one secret folder expected: {folders:?}");
    };
    let meta = std::fs::metadata(state.join("secret-files").join(folder)).unwrap();
    // Private: its owner (the container's root) and the runner's group (the engine must
    // reach the files to mount them; no tool holds that group), nobody else.
    assert_eq!(meta.mode() & 0o777, 0o710, "alpha's folder is private");
    assert_eq!(meta.gid(), nix::unistd::getegid().as_raw());
    let file = std::fs::metadata(state.join("secret-files").join(folder).join("0")).unwrap();
    assert_eq!(file.mode() & 0o777, 0o400);
    let script = format!(
        "cat /run/secrets/token; echo; ls -la /s /s/secret-files /s/secret-files/{folder} 2>&1; \
         cat /s/secret-files/*/0 /s/secret-files/{folder}/0 /s/secret-files/{folder}/../{folder}/0 2>&1; \
         find /s -name 0 -exec cat {{}} \\; 2>&1; echo done"
    );
    let extra = format!(
        "{}  permissions:\n    filesystem:\n    - {{mountPath: /s, hostPath: '{}'}}\n",
        file_secret("beta"),
        state.display()
    );
    let mut beta = tool("beta", &script, &extra);
    beta.spec.sandbox.allow_degraded = !user_namespace;
    let beta = prepared(&beta, store, secrets);
    let (out, err) = call(executor, &beta).await;
    eprintln!("beta's attempts (user namespace: {user_namespace}):\n{out}{err}");
    assert!(out.starts_with("beta-secret-0815"), "{out}{err}");
    assert!(out.contains("Permission denied"), "{out}{err}");
    assert!(out.ends_with("done\n"), "{out}{err}");
    assert!(
        !out.contains("alpha-secret"),
        "beta read alpha's secret: {out}"
    );
    assert_eq!(call(executor, &alpha).await.0, "alpha-secret-4711");
}

/// A call writes until its writable volume is full: the write fails with
/// ENOSPC at the size limit, the host holds no more than the limit for it,
/// the folder the volume was seeded from is untouched and the next call works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_a_writable_volume_stops_at_its_size_limit() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    let (executor, store) = common::runner_sandbox(dir.path());
    let seed = dir.path().join("volumes/pvc/scratch");
    std::fs::create_dir_all(&seed).unwrap();
    std::fs::write(seed.join("seed.txt"), "seeded\n").unwrap();
    let before = snapshot(&dir.path().join("volumes"));
    let limit: u64 = 8 << 20;
    let extra = "  permissions:\n    filesystem:\n    - {mountPath: /w, readOnly: false, persistentVolumeClaim: scratch, sizeLimit: 8Mi}\n";
    // File by file, so the per-file size rlimit is not what stops it.
    let fill = tool(
        "filler",
        "i=0; while [ $i -lt 64 ]; do dd if=/dev/zero of=/w/fill$i bs=1048576 count=1 2>/tmp/err || { cat /tmp/err; break; }; i=$((i+1)); done; echo files=$i",
        extra,
    );
    let fill = prepared(&fill, &store, &SecretsDir::default());
    assert!(
        executor
            .prepare(std::slice::from_ref(&fill))
            .await
            .unwrap()
            .is_empty()
    );
    let (out, err) = call(&executor, &fill).await;
    eprintln!("filler:\n{out}{err}");
    assert!(out.contains("No space left on device"), "{out}{err}");
    let files: u64 = out.rsplit("files=").next().unwrap().trim().parse().unwrap();
    assert!(files < 8, "{files} MiB written into an 8 MiB volume");
    let image = dir.path().join("state/volumes/pvc-scratch.ext4");
    let on_disk = std::fs::metadata(&image).unwrap().blocks() * 512;
    // Reserved up front (plus the host file system's few blocks of bookkeeping
    // for the file), never more: the call did not take the host's free space.
    assert!(
        on_disk >= limit && on_disk <= limit + (64 << 10),
        "the image takes {on_disk} bytes"
    );
    assert_eq!(
        snapshot(&dir.path().join("volumes")),
        before,
        "the host folder changed"
    );
    let next = tool(
        "filler",
        "rm /w/fill*; echo again > /w/after && cat /w/after /w/seed.txt",
        extra,
    );
    let next = prepared(&next, &store, &SecretsDir::default());
    assert_eq!(call(&executor, &next).await.0, "again\nseeded\n");
    // The limit cannot be raised behind the image's back, nor made too small to hold a file system.
    for (size, why) in [
        ("16Mi", "sizeLimit is now 16777216"),
        ("512Ki", "below the smallest"),
    ] {
        let bigger = tool("bigger", "true", &extra.replace("8Mi", size));
        let bigger = prepared(&bigger, &store, &SecretsDir::default());
        assert_refused(&executor, &bigger, why).await;
    }
    assert_eq!(std::fs::metadata(&image).unwrap().len(), limit);
}

/// A writer and a read-only reader share a volume. Before any tool writes it,
/// the reader reads the folder; once the writer comes, the volume lives in
/// its image and the reader is moved onto it (never two file systems on one
/// image); it stays mounted while one of them uses it and goes with the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_volume_is_one_mounted_image_for_writers_and_readers() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    common::example_images_and_volumes(dir.path());
    let store = ImageStore::new(dir.path().join("images"), dir.path().join("cache"));
    let engine = common::engine();
    let zygote = engine.zygote_pid();
    let executor = SandboxExecutor::new(
        engine,
        VolumesDir(Some(dir.path().join("volumes"))),
        dir.path().join("state"),
    );
    let mountpoint = dir.path().join("state/volumes/mnt/pvc-agent-workspace");
    let mounts = || {
        std::fs::read_to_string(format!("/proc/{zygote}/mountinfo"))
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(mountpoint.to_str().unwrap()))
            .count()
    };
    let claim = |read_only: bool| {
        format!(
            "  permissions:\n    filesystem:\n    - {{mountPath: /w, readOnly: {read_only}, persistentVolumeClaim: agent-workspace, sizeLimit: 8Mi}}\n"
        )
    };
    let writer = tool(
        "writer",
        "echo shared > /w/note; cat /w/note",
        &claim(false),
    );
    let writer = prepared(&writer, &store, &SecretsDir::default());
    let script =
        "cat /w/note 2>/dev/null; cat /w/notes.txt; touch /w/x 2>/dev/null || echo read-only";
    let reader = prepared(
        &tool("reader", script, &claim(true)),
        &store,
        &SecretsDir::default(),
    );
    let prepare = |tools: Vec<Arc<PreparedTool>>| {
        let executor = &executor;
        async move { assert!(executor.prepare(&tools).await.unwrap().is_empty()) }
    };
    prepare(vec![reader.clone()]).await;
    assert_eq!(mounts(), 0);
    assert_eq!(
        call(&executor, &reader).await.0,
        "remember the milk\nread-only\n"
    );
    prepare(vec![writer.clone(), reader.clone()]).await;
    assert_eq!(mounts(), 1);
    assert_eq!(call(&executor, &writer).await.0, "shared\n");
    let both = "shared\nremember the milk\nread-only\n";
    assert_eq!(call(&executor, &reader).await.0, both);
    // A third tool mounts the whole state folder at /w (as a hostPath over /run
    // would) and goes for the volume through its mount point and its image.
    let state = dir.path().join("state");
    let spy = tool(
        "spy",
        "cat /w/volumes/mnt/pvc-agent-workspace/note /w/volumes/pvc-agent-workspace.ext4 2>&1; ls /w/volumes /w/volumes/mnt 2>&1; echo done",
        &mount("hostPath", state.to_str().unwrap(), true),
    );
    let spy = prepared(&spy, &store, &SecretsDir::default());
    let (out, _) = call(&executor, &spy).await;
    assert!(!out.contains("shared"), "the spy read the volume: {out}");
    assert!(
        out.contains("Permission denied") && out.ends_with("done\n"),
        "{out}"
    );
    prepare(vec![reader.clone()]).await;
    assert_eq!(mounts(), 1, "unmounted while the reader still uses it");
    assert_eq!(call(&executor, &reader).await.0, both);
    prepare(vec![]).await;
    assert_eq!(mounts(), 0, "still mounted with no tool left");
    // The seed folder never saw the write.
    assert!(!dir.path().join("volumes/pvc/agent-workspace/note").exists());
}

/// A tool whose root file system sits in a folder only root can enter gets no
/// user namespace. It is refused unless it, or the operator, accepts that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_tool_is_refused_unless_degradation_is_allowed() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    let (executor, _) = common::runner_sandbox(dir.path());
    let private = dir.path().join("private");
    common::build_busybox_rootfs(&private.join("images").join(
        toolwarden::runner::images::entry_name("docker.io/library/busybox:1.36.1"),
    ));
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let store = ImageStore::new(private.join("images"), dir.path().join("cache"));
    let plain = prepared(&tool("plain", "id -u", ""), &store, &SecretsDir::default());
    assert_refused(&executor, &plain, "isolation would be degraded").await;
    assert_eq!(executor.degradations(&plain), None);
    // The tool accepts it...
    let mut accepting = tool("accepting", "id -u", "");
    assert!(
        !accepting.spec.sandbox.allow_degraded,
        "allowDegraded defaults to false"
    );
    accepting.spec.sandbox.allow_degraded = true;
    let accepting = prepared(&accepting, &store, &SecretsDir::default());
    // ...or the operator does, for every tool.
    let operator = SandboxExecutor::new(
        common::engine(),
        VolumesDir(None),
        dir.path().join("state2"),
    )
    .allow_degraded(true);
    for (executor, tool) in [(&executor, &accepting), (&operator, &plain)] {
        assert!(
            executor
                .prepare(std::slice::from_ref(tool))
                .await
                .unwrap()
                .is_empty()
        );
        let degradations = executor.degradations(tool).unwrap();
        assert!(
            degradations.iter().any(|d| d.missing == "userNamespace"),
            "{degradations:?}"
        );
        assert_eq!(call(executor, tool).await.0, "65534\n");
    }
    // A tool from a reachable folder is not degraded at all (on this host).
    let (_, reachable) = common::runner_sandbox(&dir.path().join("open"));
    let fine = prepared(
        &tool("fine", "id -u", ""),
        &reachable,
        &SecretsDir::default(),
    );
    assert!(
        executor
            .prepare(std::slice::from_ref(&fine))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(executor.degradations(&fine), Some(vec![]));
}

struct Served {
    child: Child,
    addr: String,
    stderr: Vec<String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve DIR extra...` on a free port; its stderr up to the banner's end.
fn serve(dir: &Path, state: &Path, extra: &[&str]) -> Served {
    let (child, stderr, addr) = common::spawn_serve(
        Command::new(env!("CARGO_BIN_EXE_toolwarden"))
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .args(extra)
            .arg(dir),
    );
    Served {
        child,
        addr,
        stderr,
    }
}

fn get(url: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let response = reqwest::get(url).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    })
}

const DEGRADED_TOOLS: &str = "apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: shy}
spec:
  description: Runs from a folder only root can enter
  risk: low
  inputSchema: {type: object}
  runtime: {image: 'docker.io/library/busybox:1.36.1', command: [/bin/echo, '{}']}
  sandbox: {warmPool: 0}
";

/// The case over real `serve`: tools served from a folder that is not
/// world-traversable. Without `--allow-degraded` the tool is not served at all;
/// with it, the banner, `GET /v1/tools` and the metrics say it is degraded.
#[test]
fn serve_refuses_a_degraded_tool_without_the_flag_and_shows_it_with_it() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    common::example_images_and_volumes(dir.path());
    std::fs::write(dir.path().join("shy.yaml"), DEGRADED_TOOLS).unwrap();
    let state = tempfile::Builder::new()
        .prefix("twtest-vol")
        .tempdir_in("/run")
        .unwrap();

    let refused = serve(dir.path(), state.path(), &[]);
    let text = refused.stderr.join("\n");
    assert!(text.contains("cannot run shy, not served"), "{text}");
    assert!(text.contains("isolation would be degraded"), "{text}");
    assert!(text.contains("serving 0 tool(s)"), "{text}");
    let (status, body) = get(&format!("http://{}/v1/tools", refused.addr));
    assert_eq!(status, 200);
    assert!(!body.contains("\"shy\""), "{body}");
    drop(refused);

    let allowed = serve(dir.path(), state.path(), &["--allow-degraded"]);
    let text = allowed.stderr.join("\n");
    assert!(text.contains("serving 1 tool(s)"), "{text}");
    assert!(
        text.contains("DEGRADED:  shy runs with no userNamespace"),
        "{text}"
    );
    let (_, body) = get(&format!("http://{}/v1/tools", allowed.addr));
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let isolation = &list["tools"][0]["isolation"];
    assert_eq!(isolation["degraded"], true, "{body}");
    assert_eq!(
        isolation["degradations"][0]["missing"], "userNamespace",
        "{body}"
    );
    let (_, metrics) = get(&format!("http://{}/metrics", allowed.addr));
    assert!(
        metrics.contains("toolwarden_sandbox_degraded{tool=\"shy\",missing=\"userNamespace\"} 1"),
        "{metrics}"
    );
}

/// A traversing claim name over real `serve`: refused when the manifests are
/// read, nothing is served and the folder it aims at is not created.
#[test]
fn serve_refuses_a_manifest_with_a_traversing_volume_name() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    common::example_images_and_volumes(dir.path());
    let tools = dir.path().join("tools");
    std::fs::create_dir(&tools).unwrap();
    let attack = serde_yaml::to_string(&tool(
        "climber",
        WRITE_AND_READ,
        &mount("persistentVolumeClaim", "../../../outside", false),
    ))
    .unwrap();
    std::fs::write(tools.join("climber.yaml"), attack).unwrap();
    let before = snapshot(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_toolwarden"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--volumes")
        .arg(dir.path().join("volumes"))
        .arg(&tools)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("spec.permissions.filesystem[0].persistentVolumeClaim"),
        "{stderr}"
    );
    let mut after = snapshot(dir.path());
    after.retain(|p, _| !p.starts_with(dir.path().join("state")));
    assert_eq!(after, before, "the host changed");
    assert!(!dir.path().parent().unwrap().join("outside").exists());
}

/// The outside suite's hostPath attack over real `serve`, with no ToolPolicy
/// at all: a tool mounting the host's root read-write is refused by the
/// baseline (TW-PRIV-009) and never served; the host folder stays as it was.
#[test]
fn serve_refuses_a_host_path_no_policy_allows() {
    require_root!();
    let dir = common::world_traversable_tempdir();
    common::example_images_and_volumes(dir.path());
    let target = dir.path().join("host-data");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep.txt"), "host data\n").unwrap();
    let attack = serde_yaml::to_string(&tool(
        "mounter",
        WRITE_AND_READ,
        &mount("hostPath", target.to_str().unwrap(), false),
    ))
    .unwrap();
    std::fs::write(dir.path().join("mounter.yaml"), attack).unwrap();
    let before = snapshot(&target);
    let state = tempfile::Builder::new()
        .prefix("twtest-vol")
        .tempdir_in("/run")
        .unwrap();
    let served = serve(dir.path(), state.path(), &[]);
    let text = served.stderr.join("\n");
    assert!(text.contains("refused mounter"), "{text}");
    assert!(
        text.contains("TW-PRIV-009 spec.permissions.filesystem[0].hostPath"),
        "{text}"
    );
    assert!(text.contains("serving 0 tool(s)"), "{text}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{}/v1/tools/mounter/invoke", served.addr))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(status, 404);
    assert_eq!(snapshot(&target), before, "the host folder changed");
}

/// Secrets are read as `SECRETS/<name>/<key>` beneath the secrets folder: a
/// link planted there that points out of it reads nothing (the tool is
/// refused), while a mounted Secret's own `..data` links still work.
#[test]
fn a_link_planted_in_the_secrets_folder_does_not_read_host_files() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    // The layout the kubelet writes for a Secret volume.
    let mounted = secrets.join("mounted");
    std::fs::create_dir_all(mounted.join("..2026_12_01")).unwrap();
    std::fs::write(mounted.join("..2026_12_01/token"), "kubelet-value").unwrap();
    symlink("..2026_12_01", mounted.join("..data")).unwrap();
    symlink("..data/token", mounted.join("token")).unwrap();
    // Planted links out, absolute and relative, to a file the runner can read.
    let host_file = dir.path().join("host-only.txt");
    std::fs::write(&host_file, "host-only-content").unwrap();
    std::fs::create_dir_all(secrets.join("planted")).unwrap();
    symlink(&host_file, secrets.join("planted/absolute")).unwrap();
    symlink("../../host-only.txt", secrets.join("planted/relative")).unwrap();
    symlink(dir.path(), secrets.join("whole-dir")).unwrap();
    let store = ImageStore::new(dir.path().join("images"), dir.path().join("cache"));
    let secrets = SecretsDir(Some(secrets));
    let load = |name: &str, key: &str| {
        let t = tool(
            "reader",
            "true",
            &format!("  secrets:\n  - {{secretName: {name}, key: {key}, env: VALUE}}\n"),
        );
        prepare(&t, 1, &secrets, Some(&store), &LimiterClock::manual())
    };
    for (name, key) in [
        ("planted", "absolute"),
        ("planted", "relative"),
        ("whole-dir", "host-only.txt"),
    ] {
        let Err(errors) = load(name, key) else {
            panic!("{name}/{key} was read");
        };
        assert!(
            errors.iter().any(|e| e.reason() == "SecretUnavailable"
                && e.to_string()
                    .contains(&format!("secret {name}/{key} is not available"))),
            "{errors:?}"
        );
    }
    // An (empty) root file system, so the honest tool loads completely.
    std::fs::create_dir_all(dir.path().join("images").join(
        toolwarden::runner::images::entry_name("docker.io/library/busybox:1.36.1"),
    ))
    .unwrap();
    let honest = load("mounted", "token").unwrap();
    assert_eq!(honest.secret_values, vec![b"kubelet-value".to_vec()]);
}
