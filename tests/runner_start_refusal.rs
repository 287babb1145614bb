//! `toolwarden runner`, the process of a runner pod, given a tool whose image volume lacks
//! the mount points a sandbox needs: it must not stay up serving nothing and look Ready.
//! It writes one line `ImageLacksMountPoints: ...` into the termination message file (what
//! the kubelet copies into the pod's status for the controller) and exits non-zero. With a
//! complete image the same runner serves and writes nothing. Real processes, real sandboxes,
//! no cluster (the Kubernetes client is built from a kubeconfig nobody answers).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use toolwarden::runner::images::entry_name;
use toolwarden::runner::registry::ADMITTED_VERDICT_FILE;
use toolwarden::runner::termination;

const IMAGE: &str = "docker.io/library/busybox:1.36.1";

/// The pod's files: the admitted tool as the controller's ConfigMap holds it, the tool's
/// image volume (without `missing`), the termination message file the kubelet creates.
struct RunnerPod {
    dir: tempfile::TempDir,
}

impl RunnerPod {
    fn new(missing: &[&str]) -> RunnerPod {
        let dir = common::world_traversable_tempdir();
        let tools = dir.path().join("tools");
        std::fs::create_dir(&tools).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/execute-code.yaml"),
            tools.join("execute-code.yaml"),
        )
        .unwrap();
        std::fs::write(
            tools.join(ADMITTED_VERDICT_FILE),
            r#"{"tool": "execute-code", "generation": null, "denied": false}"#,
        )
        .unwrap();
        let rootfs = dir.path().join("image-volumes").join(entry_name(IMAGE));
        common::build_busybox_rootfs(&rootfs);
        for path in missing {
            std::fs::remove_dir(rootfs.join(path)).unwrap();
        }
        std::fs::write(dir.path().join("termination-log"), b"").unwrap();
        std::fs::write(
            dir.path().join("kubeconfig"),
            "apiVersion: v1\nkind: Config\ncurrent-context: none\n\
             clusters: [{name: none, cluster: {server: 'https://127.0.0.1:9'}}]\n\
             users: [{name: none, user: {token: unused}}]\n\
             contexts: [{name: none, context: {cluster: none, user: none}}]\n",
        )
        .unwrap();
        RunnerPod { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `toolwarden runner` with the flags the controller's Deployment gives it.
    fn command(&self, termination_log: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_toolwarden"));
        cmd.arg("runner")
            .arg("--tools")
            .arg(self.path("tools"))
            .arg("--image-volumes")
            .arg(self.path("image-volumes"))
            .arg("--state-dir")
            .arg(self.path("state"))
            .args(["--listen", "127.0.0.1:0", "--allow-degraded"])
            .env("KUBECONFIG", self.path("kubeconfig"))
            .env("TOOLWARDEN_TERMINATION_LOG", termination_log)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    }
}

/// Waits for the child to exit on its own (bounded), killing it when it does not.
fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_runner_whose_image_lacks_mount_points_writes_why_and_exits() {
    require_root!();
    for missing in [&["proc", "tmp"][..], &["dev"][..]] {
        let pod = RunnerPod::new(missing);
        let log = pod.path("termination-log");
        let stderr_path = pod.path("stderr");
        let mut child = pod
            .command(&log)
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(60));
        let stderr = std::fs::read_to_string(&stderr_path).unwrap();
        let status = status.unwrap_or_else(|| panic!("{missing:?}: still running: {stderr}"));
        assert!(
            !status.success(),
            "{missing:?}: the runner must not start: {stderr}"
        );
        assert!(
            !stderr.contains("serving"),
            "{missing:?}: it never served: {stderr}"
        );
        let written = std::fs::read_to_string(&log).unwrap();
        assert_eq!(written.lines().count(), 1, "one line: {written:?}");
        let refusal = termination::parse(&written).expect("a reason the controller reads");
        assert_eq!(refusal.reason, "ImageLacksMountPoints", "{written}");
        let named: Vec<String> = missing.iter().map(|m| format!("/{m}")).collect();
        assert!(
            refusal.message.contains("tool execute-code")
                && refusal
                    .message
                    .contains(&format!("lacks the mount point(s) {}", named.join(", "))),
            "{written}"
        );
        assert!(
            stderr.contains("refusing to start: ImageLacksMountPoints"),
            "{stderr}"
        );
    }
}

/// Outside a pod there is no termination message file: the runner still refuses, and never
/// creates one (it must not litter `/dev`).
#[test]
fn without_a_termination_message_file_the_runner_still_refuses_and_creates_none() {
    require_root!();
    let pod = RunnerPod::new(&["tmp"]);
    let absent = pod.path("no-such-termination-log");
    let mut child = pod.command(&absent).stderr(Stdio::null()).spawn().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60)).expect("the runner exits");
    assert!(!status.success());
    assert!(!absent.exists(), "{} was created", absent.display());
}

/// The control: the same runner with a complete image serves (ready on /readyz) and writes
/// no termination message.
#[tokio::test]
async fn a_runner_with_a_complete_image_serves_and_writes_nothing() {
    require_root!();
    let pod = RunnerPod::new(&[]);
    let log = pod.path("termination-log");
    let (mut child, banner, addr) = common::spawn_serve(&mut pod.command(&log));
    assert!(
        banner.iter().any(|l| l.contains("tools:     execute-code")),
        "{banner:#?}"
    );
    let ready = reqwest::get(format!("http://{addr}/readyz")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready.unwrap().status(), 200, "{banner:#?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "");
}
