//! The reload protocol: re-read the manifests folder into the registry (which
//! swaps the tool set atomically), then let the executor prepare the new set
//! (and withdraw the tools it cannot run); and the watcher that triggers it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::executor::{Degradation, ExecError};
use super::kube_identity::MintError;
use super::pipeline::Runner;
use super::registry::{LoadReport, Registry, is_manifest, manifest_files};
use super::tool::PreparedTool;

/// Changes settle this long before a reload (editors write files in several steps).
const SETTLE: Duration = Duration::from_millis(200);

/// Loads `dir` into the registry and logs what is (not) served.
pub fn load(registry: &Registry, dir: &Path) -> LoadReport {
    let report = match manifest_files(dir) {
        Ok(files) => registry.load(&files),
        Err(e) => LoadReport {
            errors: vec![format!("{}: {e}", dir.display())],
            ..LoadReport::default()
        },
    };
    for e in &report.errors {
        tracing::error!("{e}");
    }
    for refusal in &report.refused {
        tracing::warn!(
            tool = %refusal.tool,
            origin = %refusal.origin,
            reason = refusal.reason,
            "refused {} ({}): {}",
            refusal.tool,
            refusal.origin,
            refusal.reasons.join("; ")
        );
    }
    report
}

/// Lets the executor get ready for the tools now served (e.g. fill warm pools,
/// drop those of replaced tools). A tool that cannot run (e.g. its isolation
/// would be degraded without permission) is logged and no longer served; the
/// metrics name what each served tool runs without. Returns the tools withdrawn,
/// each with the reason and message of why.
pub async fn prepare_executor(runner: &Runner) -> Vec<(String, &'static str, String)> {
    let (tools, unserved) = without_identity(runner);
    let unrunnable = match runner.executor.prepare(&tools).await {
        Ok(unrunnable) => unrunnable,
        Err(e) => {
            tracing::error!(error = %e, "preparing the executor failed");
            Vec::new()
        }
    };
    let mut withdrawn = Vec::new();
    for (tool, error) in unrunnable.into_iter().chain(unserved) {
        tracing::error!(
            %tool,
            %error,
            reason = error.reason(),
            "cannot run {tool}, not served: {error}"
        );
        withdrawn.push((tool, error.reason(), error.to_string()));
    }
    let names: Vec<String> = withdrawn.iter().map(|(tool, ..)| tool.clone()).collect();
    runner.registry.withdraw(&names);
    let served: Vec<_> = runner.registry.snapshot().values().cloned().collect();
    let degraded: Vec<(String, Vec<Degradation>)> = served
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                runner.executor.degradations(t).unwrap_or_default(),
            )
        })
        .collect();
    runner.metrics.set_degraded(
        degraded
            .iter()
            .flat_map(|(tool, list)| list.iter().map(move |d| (tool.as_str(), d.missing))),
    );
    withdrawn
}

/// The tools to prepare, and those refused because they declare
/// `permissions.kubernetes` while this runner mints no tokens (`serve`, a runner
/// without `--tool-service-account`): they would run without their identity.
fn without_identity(runner: &Runner) -> (Vec<Arc<PreparedTool>>, Vec<(String, ExecError)>) {
    let (tools, unserved): (Vec<_>, Vec<_>) =
        runner.registry.snapshot().values().cloned().partition(|t| {
            runner.tool_identity.is_some() || t.spec.permissions.kubernetes.is_empty()
        });
    let refused = unserved
        .into_iter()
        .map(|t| {
            let why = ExecError::NotRunnable(Box::new(MintError::NoIdentity));
            (t.name.clone(), why)
        })
        .collect();
    (tools, refused)
}

/// One reload: load `dir` off the I/O threads (it compiles schemas and may
/// unpack images), then prepare the executor. A folder that cannot be read
/// leaves the previous tools served.
pub async fn reload(runner: &Arc<Runner>, dir: &Path) {
    let (registry, folder) = (runner.registry.clone(), dir.to_path_buf());
    let Ok(report) = tokio::task::spawn_blocking(move || load(&registry, &folder)).await else {
        return;
    };
    if report.errors.is_empty() {
        tracing::info!(
            dir = %dir.display(),
            served = ?report.served,
            rotated = ?report.rotated,
            "reloaded {}: serving {}",
            dir.display(),
            report.served.join(", ")
        );
        // A reload keeps serving what it can; what it withdrew is logged above.
        prepare_executor(runner).await;
    } else {
        tracing::error!(
            dir = %dir.display(),
            "reload failed; still serving the previous tools"
        );
    }
}

/// True for the entries kubelet's atomic writer keeps in a mounted ConfigMap or
/// Secret folder: `..data` (the symlink it swaps on an update), `..data_tmp`
/// and the timestamped `..2026_...` folders. The manifests themselves are
/// symlinks through `..data`, so an update raises events for these alone.
fn is_kubelet_entry(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".."))
}

/// Reloads after any change to a manifest in `dir` (a file of its own, or
/// kubelet's `..data` swap of a mounted ConfigMap) or to anything under the
/// secrets folder, once changes settle. The secrets folder is watched whole,
/// recursively: kubelet rotates a mounted Secret the same way, and no event of
/// the key files themselves reports it.
pub fn watch(
    dir: &Path,
    secrets: Option<&Path>,
    runner: Arc<Runner>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Events name paths under the folder as watched: compare with the same form.
    let secrets = secrets.map(|s| std::fs::canonicalize(s).unwrap_or_else(|_| s.to_path_buf()));
    let secrets_watched = secrets.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files (our own reload included) raises access events:
        // reacting to those would reload forever.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
            && event.paths.iter().any(|p| {
                is_manifest(p)
                    || is_kubelet_entry(p)
                    || secrets_watched.as_ref().is_some_and(|s| p.starts_with(s))
            })
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    if let Some(secrets) = &secrets
        && let Err(e) = watcher.watch(secrets, notify::RecursiveMode::Recursive)
    {
        tracing::warn!(
            dir = %secrets.display(),
            error = %e,
            "not watching the secrets folder for rotated secrets"
        );
    }
    let dir: PathBuf = dir.to_path_buf();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while let Ok(Some(())) = tokio::time::timeout(SETTLE, rx.recv()).await {}
            reload(&runner, &dir).await;
        }
    });
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::time::Instant;

    use super::*;
    use crate::runner::fake::TestRunner;

    fn tool(description: &str) -> String {
        format!(
            r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {{name: mounted}}
spec:
  description: {description}
  risk: low
  inputSchema: {{type: object, additionalProperties: false, properties: {{}}}}
  runtime: {{image: "busybox:1.36.1", command: [/bin/true]}}
  rateLimit: {{requestsPerMinute: 60}}
"#
        )
    }

    /// kubelet's atomic writer: the files live in a timestamped folder, `..data`
    /// links to it, and each key is a link through `..data`. An update writes a
    /// new folder, points `..data_tmp` at it and renames that over `..data`.
    fn kubelet_update(dir: &Path, stamp: &str, description: &str) {
        let data = dir.join(stamp);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("tool.yaml"), tool(description)).unwrap();
        symlink(stamp, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kubelet_configmap_update_swapping_data_is_served() {
        let dir = tempfile::tempdir().unwrap();
        kubelet_update(dir.path(), "..2026_12_01_10_00_00.1", "First version");
        symlink("..data/tool.yaml", dir.path().join("tool.yaml")).unwrap();
        let served = TestRunner::serving(dir, None);
        let description = || {
            served
                .runner
                .registry
                .get("mounted")
                .unwrap()
                .spec
                .description
                .clone()
        };
        assert_eq!(description(), "First version");
        let _watcher = watch(served.path(), None, served.runner.clone()).unwrap();

        // No event names a manifest: only `..2026...`, `..data_tmp` and `..data` change.
        kubelet_update(served.path(), "..2026_12_01_10_05_00.2", "Second version");
        let deadline = Instant::now() + Duration::from_secs(10);
        while description() != "Second version" {
            assert!(
                Instant::now() < deadline,
                "the update was not served: {}",
                description()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
