//! TokenReview for runner pods. A runner authenticates its callers' ServiceAccount
//! tokens with TokenReview, a cluster-scoped API that no namespaced Role can grant.
//! Rather than one ClusterRoleBinding per tool, the install ships one ClusterRole
//! ([`TOKEN_REVIEW_ROLE`]: `create tokenreviews`, nothing else) and one
//! ClusterRoleBinding of the same name without subjects; the controller keeps that
//! binding's subjects equal to the runner ServiceAccounts of the tools it watches. Its
//! own ClusterRole lets it patch only that binding and bind only that role.
//!
//! The binding is read and compared on every look, not only after a tool changed, so a
//! `helm upgrade` or a hand edit that empties it is put back within [`PERIOD`]. A
//! controller watching only some namespaces (`--namespaces`) keeps the subjects of the
//! other namespaces as they are, so controllers of separate tenants share the binding;
//! each write carries the `resourceVersion` it was computed from, so two of them never
//! undo each other's change (the loser tries again on its next look).

use std::time::Duration;

use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Subject};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::build::ChildNames;
use crate::api::AgentTool;

/// Name of the ClusterRole granting `create tokenreviews` and of the one binding to it.
pub const TOKEN_REVIEW_ROLE: &str = "toolwarden-runner-token-review";

/// How often the binding is compared with the tools: a new tool's runner can
/// authenticate callers within this long of the tool showing up in the store.
const PERIOD: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TokenReviewBindingError {
    #[error(
        "ClusterRoleBinding {TOKEN_REVIEW_ROLE} does not exist: runner pods cannot \
         authenticate callers until it is installed (the chart and `toolwarden manifests` \
         create it)"
    )]
    Missing,
    #[error("reading ClusterRoleBinding {TOKEN_REVIEW_ROLE}: {0}")]
    Read(#[source] kube::Error),
    #[error("updating the subjects of ClusterRoleBinding {TOKEN_REVIEW_ROLE}: {0}")]
    Write(#[source] kube::Error),
}

impl TokenReviewBindingError {
    /// Stable CamelCase reason for logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenReviewBindingError::Missing => "TokenReviewBindingMissing",
            TokenReviewBindingError::Read(_) => "TokenReviewBindingReadFailed",
            TokenReviewBindingError::Write(_) => "TokenReviewBindingUpdateFailed",
        }
    }
}

/// The runner ServiceAccount of every tool, sorted and without repeats.
pub fn subjects<'a>(tools: impl IntoIterator<Item = &'a AgentTool>) -> Vec<Subject> {
    let mut subjects: Vec<Subject> = tools
        .into_iter()
        .filter_map(|tool| {
            Some(Subject {
                kind: "ServiceAccount".into(),
                name: ChildNames::of(&tool.name_any()).runner,
                namespace: Some(tool.namespace()?),
                api_group: None,
            })
        })
        .collect();
    subjects.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    subjects.dedup();
    subjects
}

/// The subjects the binding should have: `wanted` for the namespaces this controller
/// watches (`scope`; empty: all of them), and the current subjects of every other
/// namespace, sorted and without repeats.
pub fn merged_subjects(current: &[Subject], scope: &[String], wanted: &[Subject]) -> Vec<Subject> {
    let watched = |subject: &Subject| {
        scope.is_empty()
            || subject
                .namespace
                .as_ref()
                .is_some_and(|namespace| scope.contains(namespace))
    };
    let mut subjects: Vec<Subject> = current
        .iter()
        .filter(|subject| !watched(subject))
        .chain(wanted)
        .cloned()
        .collect();
    subjects.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    subjects.dedup();
    subjects
}

/// One look: reads the binding and, when its subjects differ from what they should
/// be, writes them, on the condition that nobody changed the binding in between.
/// Returns whether it wrote.
pub async fn sync(
    client: &Client,
    scope: &[String],
    wanted: &[Subject],
) -> Result<bool, TokenReviewBindingError> {
    let api: Api<ClusterRoleBinding> = Api::all(client.clone());
    let current = api
        .get_opt(TOKEN_REVIEW_ROLE)
        .await
        .map_err(TokenReviewBindingError::Read)?
        .ok_or(TokenReviewBindingError::Missing)?;
    let current_subjects = current.subjects.as_deref().unwrap_or_default();
    let subjects = merged_subjects(current_subjects, scope, wanted);
    if current_subjects == subjects {
        return Ok(false);
    }
    // A merge patch with the resourceVersion read: the API server refuses it (409)
    // if the binding changed since, instead of overwriting that change.
    let patch = json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "subjects": subjects,
    });
    api.patch(
        TOKEN_REVIEW_ROLE,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(TokenReviewBindingError::Write)?;
    Ok(true)
}

/// Keeps the binding's subjects current until `stop` turns true. A failure is logged
/// when it first happens (not every look) and tried again on the next look.
pub async fn run(
    client: Client,
    scope: Vec<String>,
    tools: Vec<Store<AgentTool>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_failure: Option<&'static str> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let all_tools: Vec<_> = tools.iter().flat_map(Store::state).collect();
        let wanted = subjects(all_tools.iter().map(|t| &**t));
        match sync(&client, &scope, &wanted).await {
            Ok(wrote) => {
                if wrote {
                    tracing::info!(
                        runners = wanted.len(),
                        binding = TOKEN_REVIEW_ROLE,
                        "runner ServiceAccounts allowed to review callers' tokens"
                    );
                }
                last_failure = None;
            }
            Err(e) => {
                if last_failure != Some(e.reason()) {
                    tracing::warn!(reason = e.reason(), error = %e, "runner TokenReview binding");
                }
                last_failure = Some(e.reason());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(namespace: Option<&str>, name: &str) -> AgentTool {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/execute-code.yaml");
        let mut tool: AgentTool =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        tool.metadata.name = Some(name.into());
        tool.metadata.namespace = namespace.map(Into::into);
        tool
    }

    fn subject(namespace: &str, name: &str) -> Subject {
        Subject {
            kind: "ServiceAccount".into(),
            name: name.into(),
            namespace: Some(namespace.into()),
            api_group: None,
        }
    }

    #[test]
    fn a_namespaced_controller_changes_only_the_subjects_of_its_namespaces() {
        let current = [
            subject("team-a", "gone"),
            subject("team-b", "theirs"),
            subject("team-c", "kept"),
        ];
        let wanted = [subject("team-a", "search")];
        let scope = ["team-a".to_string(), "team-b".to_string()];
        assert_eq!(
            merged_subjects(&current, &scope, &wanted),
            [subject("team-a", "search"), subject("team-c", "kept")],
            "team-a and team-b are this controller's: only its tools stay there"
        );
        assert_eq!(
            merged_subjects(&current, &[], &wanted),
            [subject("team-a", "search")],
            "a cluster-wide controller owns every subject"
        );
    }

    #[test]
    fn every_tools_runner_is_a_subject_once_in_a_stable_order() {
        let tools = [
            tool(Some("team-b"), "search"),
            tool(Some("team-a"), "search"),
            tool(Some("team-a"), "execute-code"),
            tool(Some("team-a"), "execute-code"),
            // Not from the API server: no namespace, no subject.
            tool(None, "orphan"),
        ];
        let names: Vec<String> = subjects(&tools)
            .iter()
            .map(|s| format!("{}/{}", s.namespace.as_deref().unwrap(), s.name))
            .collect();
        assert_eq!(
            names,
            ["team-a/execute-code", "team-a/search", "team-b/search"]
        );
        assert!(
            subjects(&tools)
                .iter()
                .all(|s| s.kind == "ServiceAccount" && s.api_group.is_none())
        );
    }
}
