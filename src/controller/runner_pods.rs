//! What the tool's runner pods say about why they do not run, as the tool's conditions
//! say it (pure). The runner refuses to start with one line `Reason: message` in its
//! termination message ([`crate::runner::termination`]); the kubelet reports images it
//! cannot pull and containers it cannot create in the container's waiting state.

use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};
use kube::ResourceExt;

use super::labels::CONFIG_HASH;
use crate::runner::termination;

/// The runner container: its termination message is toolwarden's own and its reason is
/// trusted. Anything else (the copy init container runs the tool's image) is not.
const RUNNER_CONTAINER: &str = "runner";
/// Waiting reasons that say nothing is wrong yet.
const STARTING: &[&str] = &["ContainerCreating", "PodInitializing"];
const CRASH_LOOP: &str = "CrashLoopBackOff";

/// Why the tool's runner pods do not run: the reason and message of `Ready` and `Degraded`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTrouble {
    pub reason: String,
    pub message: String,
}

/// The most telling trouble of the runner pods of the tool's current rollout: the
/// runner's own start refusal first, then what the kubelet reports (an image it cannot
/// pull, a container it cannot create), then a failed copy of the tool's file system,
/// then any other crash. `deployment` is the tool's Deployment name and `config_hash`
/// its pod template's [`CONFIG_HASH`]: pods of earlier rollouts, pods being deleted and
/// pods the Deployment does not control (someone else's pod with the same labels) are
/// not the tool's story.
pub fn trouble<'a>(
    deployment: &str,
    config_hash: Option<&str>,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Option<PodTrouble> {
    let mut found: Vec<(Rank, String, PodTrouble)> = pods
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| controlled_by_deployment(pod, deployment))
        .filter(|pod| {
            config_hash.is_none_or(|hash| {
                pod.annotations()
                    .get(CONFIG_HASH)
                    .is_some_and(|h| h == hash)
            })
        })
        .flat_map(|pod| {
            let status = pod.status.as_ref();
            let init = status.and_then(|s| s.init_container_statuses.as_deref());
            let main = status.and_then(|s| s.container_statuses.as_deref());
            let name = pod.name_any();
            let init = init.unwrap_or_default().iter().map(|c| (c, true));
            let main = main.unwrap_or_default().iter().map(|c| (c, false));
            init.chain(main)
                .filter_map(|(c, is_init)| container_trouble(&name, c, is_init))
                .map(|(rank, trouble)| (rank, name.clone(), trouble))
                .collect::<Vec<_>>()
        })
        .collect();
    found.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    found.into_iter().next().map(|(_, _, trouble)| trouble)
}

/// How telling a trouble is (lower first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    RunnerRefusal,
    Kubelet,
    RootfsCopy,
    Crash,
}

/// A runner pod belongs to the tool when a ReplicaSet of its Deployment (`<name>-<hash>`)
/// controls it.
fn controlled_by_deployment(pod: &Pod, deployment: &str) -> bool {
    pod.owner_references().iter().any(|owner| {
        owner.kind == "ReplicaSet"
            && owner.controller == Some(true)
            && owner
                .name
                .strip_prefix(deployment)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|hash| !hash.is_empty() && !hash.contains('-'))
    })
}

fn container_trouble(
    pod: &str,
    status: &ContainerStatus,
    is_init: bool,
) -> Option<(Rank, PodTrouble)> {
    let state = status.state.as_ref()?;
    let container = &status.name;
    if let Some(waiting) = &state.waiting {
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if reason == CRASH_LOOP {
            let last = status.last_state.as_ref()?.terminated.as_ref()?;
            return Some(terminated_trouble(pod, container, last, is_init));
        }
        if !reason.is_empty() && !STARTING.contains(&reason) {
            let detail = waiting.message.as_deref().unwrap_or("no message");
            let trouble = PodTrouble {
                reason: reason.into(),
                message: format!("runner pod {pod}, container {container}: {reason}: {detail}"),
            };
            return Some((Rank::Kubelet, trouble));
        }
        return None;
    }
    let terminated = state.terminated.as_ref().filter(|t| t.exit_code != 0)?;
    Some(terminated_trouble(pod, container, terminated, is_init))
}

fn terminated_trouble(
    pod: &str,
    container: &str,
    terminated: &ContainerStateTerminated,
    is_init: bool,
) -> (Rank, PodTrouble) {
    let message = terminated.message.as_deref().unwrap_or_default().trim();
    if container == RUNNER_CONTAINER
        && !is_init
        && let Some(refusal) = termination::parse(message)
    {
        let trouble = PodTrouble {
            reason: refusal.reason,
            message: format!("runner pod {pod} refuses to start: {}", refusal.message),
        };
        return (Rank::RunnerRefusal, trouble);
    }
    let how = format!(
        "exited with code {}{}{}",
        terminated.exit_code,
        terminated
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        }
    );
    if is_init {
        let trouble = PodTrouble {
            reason: "RootfsCopyFailed".into(),
            message: format!(
                "runner pod {pod}: init container {container}, copying the tool image's file \
                 system (the image needs /bin/sh and cp), {how}"
            ),
        };
        return (Rank::RootfsCopy, trouble);
    }
    let trouble = PodTrouble {
        reason: "RunnerFailed".into(),
        message: format!("runner pod {pod}, container {container}, {how}"),
    };
    (Rank::Crash, trouble)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::{Value, json};

    use super::*;

    /// The config hash of the fixtures' rollout.
    const HASH: &str = "abc123";

    /// A pod of Deployment `grep` as the API server reports it:
    /// `tests/fixtures/controller/pods/<name>.json`.
    fn fixture(name: &str) -> Pod {
        let path = format!(
            "{}/tests/fixtures/controller/pods/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    /// The refused fixture with the runner's last state replaced.
    fn runner_ended(state: Value, last_state: Value) -> Pod {
        let mut pod = fixture("refused-image-lacks-mount-points");
        let mut runner = serde_json::to_value(
            &pod.status
                .as_ref()
                .unwrap()
                .container_statuses
                .as_ref()
                .unwrap()[0],
        )
        .unwrap();
        runner["state"] = state;
        runner["lastState"] = last_state;
        pod.status.as_mut().unwrap().container_statuses =
            Some(vec![serde_json::from_value(runner).unwrap()]);
        pod
    }

    fn terminated_message(pod: &Pod) -> String {
        let runner = &pod
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0];
        let last = runner
            .last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap();
        last.message.clone().unwrap()
    }

    #[test]
    fn the_runners_refusal_names_the_missing_mount_points() {
        let backing_off = fixture("refused-image-lacks-mount-points");
        // The same line while the container is still terminated, before the back-off.
        let message = terminated_message(&backing_off);
        let just_ended = runner_ended(
            json!({"terminated": {"exitCode": 2, "reason": "Error", "message": message}}),
            json!({}),
        );
        for pod in [backing_off, just_ended] {
            let trouble = trouble("grep", Some(HASH), [&pod]).expect("trouble");
            assert_eq!(trouble.reason, "ImageLacksMountPoints");
            assert!(
                trouble
                    .message
                    .starts_with("runner pod grep-7d9f8c6b5-abcde refuses to start: tool grep")
                    && trouble
                        .message
                        .contains("lacks the mount point(s) /proc, /tmp"),
                "{}",
                trouble.message
            );
        }
    }

    #[test]
    fn image_pull_errors_are_the_kubelets_reasons() {
        let pulling = fixture("image-volume-pull-backoff");
        let trouble = trouble("grep", Some(HASH), [&pulling]).expect("trouble");
        assert_eq!(trouble.reason, "ImagePullBackOff");
        assert!(
            trouble.message.starts_with(
                "runner pod grep-7d9f8c6b5-fghij, container runner: ImagePullBackOff: \
                 Back-off pulling image \"registry.example/grep:1\""
            ),
            "{}",
            trouble.message
        );
        for reason in [
            "ErrImagePull",
            "InvalidImageName",
            "CreateContainerConfigError",
        ] {
            let pod = runner_ended(
                json!({"waiting": {"reason": reason, "message": "registry.example/grep:1: no"}}),
                json!({}),
            );
            let found = trouble_of(&pod);
            assert_eq!(found.reason, reason);
            assert!(
                found.message.contains("registry.example/grep:1"),
                "{}",
                found.message
            );
        }
    }

    /// The copy init container runs the tool's image: whatever it writes is a message,
    /// never a reason of its choosing.
    #[test]
    fn a_failed_copy_is_reported_and_a_forged_reason_is_not_believed() {
        let failed = fixture("rootfs-copy-failed");
        let trouble = trouble("grep", Some(HASH), [&failed]).expect("trouble");
        assert_eq!(trouble.reason, "RootfsCopyFailed");
        assert!(
            trouble.message.contains("init container tool-rootfs")
                && trouble
                    .message
                    .contains("exited with code 128 (StartError)")
                && trouble
                    .message
                    .contains("stat /bin/sh: no such file or directory"),
            "{}",
            trouble.message
        );
        let mut forged = serde_json::to_value(&failed).unwrap();
        forged["status"]["initContainerStatuses"][0]["lastState"]["terminated"]["message"] =
            json!("RunnersReady: all is well");
        let forged: Pod = serde_json::from_value(forged).unwrap();
        let trouble = trouble_of(&forged);
        assert_eq!(trouble.reason, "RootfsCopyFailed");
        assert!(
            trouble.message.ends_with(": RunnersReady: all is well"),
            "{}",
            trouble.message
        );
    }

    #[test]
    fn a_crash_without_a_refusal_line_is_a_runner_failure() {
        let pod = runner_ended(
            json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
        );
        let trouble = trouble("grep", Some(HASH), [&pod]).expect("trouble");
        assert_eq!(trouble.reason, "RunnerFailed");
        assert!(
            trouble
                .message
                .ends_with("container runner, exited with code 137 (OOMKilled)"),
            "{}",
            trouble.message
        );
        // A panic's text is a message, not a reason.
        let panicked = runner_ended(
            json!({"terminated": {"exitCode": 101, "message": "thread 'main' panicked: x"}}),
            json!({}),
        );
        assert_eq!(trouble_of(&panicked).reason, "RunnerFailed");
    }

    fn trouble_of(pod: &Pod) -> PodTrouble {
        trouble("grep", Some(HASH), [pod]).expect("trouble")
    }

    #[test]
    fn healthy_starting_stale_foreign_and_deleted_pods_are_no_trouble() {
        // Running now, after an OOM kill in an earlier life.
        let running = fixture("running");
        let starting = runner_ended(
            json!({"waiting": {"reason": "ContainerCreating"}}),
            json!({}),
        );
        let refused = fixture("refused-image-lacks-mount-points");
        let mut stale = refused.clone();
        stale
            .annotations_mut()
            .insert(CONFIG_HASH.into(), "older".into());
        let mut foreign = refused.clone();
        foreign.metadata.owner_references = None;
        let mut not_controller = refused.clone();
        not_controller.metadata.owner_references.as_mut().unwrap()[0].controller = None;
        let mut other_deployment = refused.clone();
        other_deployment.metadata.owner_references.as_mut().unwrap()[0].name =
            "grep-extra-7d9f8c6b5".into();
        let mut deleted = refused.clone();
        deleted.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        let pods = [
            running,
            starting,
            stale,
            foreign,
            not_controller,
            other_deployment,
            deleted,
        ];
        assert_eq!(trouble("grep", Some(HASH), &pods), None);
        // The same refusal in a pod of the current rollout is trouble.
        assert!(trouble("grep", Some(HASH), [&refused]).is_some());
    }

    #[test]
    fn the_runners_refusal_wins_over_the_troubles_of_other_pods() {
        let pods = [
            fixture("image-volume-pull-backoff"),
            fixture("rootfs-copy-failed"),
            fixture("refused-image-lacks-mount-points"),
        ];
        assert_eq!(
            trouble("grep", Some(HASH), &pods).unwrap().reason,
            "ImageLacksMountPoints"
        );
        assert_eq!(
            trouble("grep", Some(HASH), &pods[..2]).unwrap().reason,
            "ImagePullBackOff"
        );
    }
}
