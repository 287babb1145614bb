//! The tools being served: each AgentTool checked against the checklist and
//! compiled ([`super::tool::prepare`]), and prepared again when a reload finds
//! its secret values rotated.
//! A reload swaps the whole set atomically; calls in flight keep the
//! `Arc<PreparedTool>` they started with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::api::manifest::Manifests;
use crate::api::{AgentTool, EgressCidr, PolicyMode, ToolPolicy};
use crate::policy;

use super::images::RootfsResolver;
use super::ratelimit::LimiterClock;
use super::tool::{PreparedTool, SecretsDir, prepare};

/// The file beside the manifests in which the controller states its verdict on
/// the tool of the same ConfigMap (`toolwarden runner` serves by it).
pub const ADMITTED_VERDICT_FILE: &str = "verdict.json";

/// The controller's verdict, as `src/controller/build/config_map.rs` writes it:
/// the checklist run with the namespace's real labels and the cluster's
/// ToolPolicies, which a runner pod cannot see.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmittedVerdict {
    /// The tool it is about, and the generation the controller validated.
    pub tool: String,
    pub generation: Option<i64>,
    pub denied: bool,
    #[serde(default)]
    pub violations: Vec<AdmittedViolation>,
    /// The address ranges the tool's egress may reach: the union of
    /// `sandboxing.allowedEgressCidrs` of the policies that select it.
    #[serde(default)]
    pub allowed_egress_cidrs: Vec<EgressCidr>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct AdmittedViolation {
    pub rule: String,
    pub path: String,
    pub message: String,
    pub policy: Option<String>,
    pub mode: PolicyMode,
}

/// How a tool is judged before it is served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Judge {
    /// `serve`: the checklist, with the tool's namespace as its only label.
    #[default]
    Evaluate,
    /// `runner`: the controller's verdict beside the manifests; a tool without
    /// a verdict about it (its name and generation) is not served.
    Admitted,
}

/// A tool that is not served, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub tool: String,
    pub origin: String,
    /// Stable CamelCase class of the first reason (what a runner pod reports on refusal).
    pub reason: &'static str,
    pub reasons: Vec<String>,
}

/// What a load or reload did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub served: Vec<String>,
    pub refused: Vec<Refusal>,
    /// Tools served with a spec unchanged but secrets that changed.
    pub rotated: Vec<String>,
    /// Files that could not be read at all; nothing was changed.
    pub errors: Vec<String>,
}

/// The served tool set.
pub struct Registry {
    tools: RwLock<Arc<BTreeMap<String, Arc<PreparedTool>>>>,
    clock: LimiterClock,
    secrets: SecretsDir,
    images: Option<Box<dyn RootfsResolver>>,
    judge: Judge,
}

impl Registry {
    pub fn new(clock: LimiterClock, secrets: SecretsDir) -> Registry {
        Registry {
            tools: RwLock::default(),
            clock,
            secrets,
            images: None,
            judge: Judge::Evaluate,
        }
    }

    /// Serves by the controller's verdict ([`ADMITTED_VERDICT_FILE`]) instead of
    /// evaluating the checklist without the cluster's labels and policies.
    pub fn with_judge(mut self, judge: Judge) -> Registry {
        self.judge = judge;
        self
    }

    /// Resolves every tool's image to a root file system; tools whose image
    /// cannot be found are refused.
    /// (An [`super::images::ImageStore`], or [`super::image_volumes::ImageVolumes`].)
    pub fn with_images(mut self, images: impl RootfsResolver + 'static) -> Registry {
        self.images = Some(Box::new(images));
        self
    }

    pub fn get(&self, name: &str) -> Option<Arc<PreparedTool>> {
        self.snapshot().get(name).cloned()
    }

    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<PreparedTool>>> {
        self.tools.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops serving `names` (tools that cannot run); the others stay as they are.
    pub fn withdraw(&self, names: &[String]) {
        let mut tools = self.tools.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**tools).clone();
        next.retain(|name, _| !names.contains(name));
        *tools = Arc::new(next);
    }

    /// Loads `paths` and replaces the tool set. A tool whose spec did not change
    /// keeps its compiled form and its rate-limit state. When the manifests
    /// cannot be read at all, the current set stays.
    pub fn load(&self, paths: &[PathBuf]) -> LoadReport {
        match Manifests::load(paths, false) {
            Ok(manifests) if self.judge == Judge::Admitted => {
                let verdict = paths
                    .first()
                    .and_then(|p| p.parent())
                    .map(|dir| read_verdict(&dir.join(ADMITTED_VERDICT_FILE)))
                    .unwrap_or_else(|| Err("no manifest folder".into()));
                self.replace_judged(&manifests, Some(&verdict))
            }
            Ok(manifests) => self.replace(&manifests),
            Err(errors) => LoadReport {
                errors: errors.iter().map(ToString::to_string).collect(),
                ..LoadReport::default()
            },
        }
    }

    /// Checks every tool against the checklist (same engine and messages as
    /// `toolwarden check`) and serves those that pass.
    pub fn replace(&self, manifests: &Manifests) -> LoadReport {
        self.replace_judged(manifests, None)
    }

    /// As [`Self::replace`]; with `admitted`, each tool is judged by that verdict
    /// (or refused with the reason it could not be read) instead of the checklist.
    pub fn replace_judged(
        &self,
        manifests: &Manifests,
        admitted: Option<&Result<AdmittedVerdict, String>>,
    ) -> LoadReport {
        let policies: Vec<ToolPolicy> = manifests
            .policies
            .iter()
            .map(|p| p.object.clone())
            .collect();
        let current = self.snapshot();
        let mut next = BTreeMap::new();
        let mut report = LoadReport::default();
        for loaded in &manifests.tools {
            let tool = &loaded.object;
            let name = tool.metadata.name.clone().unwrap_or_default();
            let refuse = |reason: &'static str, reasons: Vec<String>| Refusal {
                tool: name.clone(),
                origin: loaded.origin.to_string(),
                reason,
                reasons,
            };
            if next.contains_key(&name) {
                report.refused.push(refuse(
                    "DuplicateToolName",
                    vec![format!("a tool named {name} is already served")],
                ));
                continue;
            }
            let denial = match admitted {
                None => evaluate(tool, &policies),
                Some(verdict) => judged_by(tool, verdict),
            };
            if let Some((reason, reasons)) = denial {
                report.refused.push(refuse(reason, reasons));
                continue;
            }
            let allowed_egress_cidrs = match admitted {
                None => policy::granted_egress_cidrs(tool, &policies, &namespace_labels(tool)),
                Some(verdict) => verdict
                    .as_ref()
                    .map(|v| v.allowed_egress_cidrs.clone())
                    .unwrap_or_default(),
            };
            let previous = current.get(&name);
            let unchanged = previous
                .filter(|p| p.spec == tool.spec && p.allowed_egress_cidrs == allowed_egress_cidrs);
            if let Some(prev) = unchanged {
                // Secrets are read again on every reload: rotation changes no spec.
                let fresh = self.secrets.read_all(&tool.spec);
                if fresh.is_ok_and(|s| s.values == prev.secret_values) {
                    next.insert(name.clone(), prev.clone());
                    report.served.push(name);
                    continue;
                }
            }
            let generation = match unchanged {
                Some(prev) => prev.generation,
                None => tool
                    .metadata
                    .generation
                    .and_then(|g| u64::try_from(g).ok())
                    .unwrap_or_else(|| previous.map_or(1, |p| p.generation + 1)),
            };
            let prepared = prepare(
                tool,
                generation,
                &self.secrets,
                self.images.as_deref(),
                &self.clock,
            )
            .map(|mut prepared| {
                prepared.allowed_egress_cidrs = allowed_egress_cidrs;
                prepared
            })
            .and_then(|mut prepared| match previous {
                Some(prev) => prepared
                    .take_over_from(prev)
                    .map(|()| prepared)
                    .map_err(|e| vec![e.into()]),
                None => Ok(prepared),
            });
            match prepared {
                Ok(prepared) => {
                    if unchanged.is_some() {
                        tracing::info!(tool = %name, revision = prepared.secrets_revision, "secrets rotated");
                        report.rotated.push(name.clone());
                    }
                    next.insert(name.clone(), Arc::new(prepared));
                    report.served.push(name);
                }
                Err(errors) => report.refused.push(refuse(
                    errors.first().map_or("ToolInvalid", |e| e.reason()),
                    errors.iter().map(ToString::to_string).collect(),
                )),
            }
        }
        *self.tools.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        report
    }
}

/// Without a cluster the namespace's name is its only label.
fn namespace_labels(tool: &AgentTool) -> BTreeMap<String, String> {
    let namespace = tool
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    BTreeMap::from([("kubernetes.io/metadata.name".to_string(), namespace)])
}

/// The checklist without a cluster: the namespace's name is its only label.
/// `Some(every enforced violation)` when the tool is denied.
fn evaluate(tool: &AgentTool, policies: &[ToolPolicy]) -> Option<(&'static str, Vec<String>)> {
    let verdict = policy::evaluate(tool, policies, &namespace_labels(tool));
    verdict.denied().then(|| {
        let reasons = verdict
            .with_mode(PolicyMode::Enforce)
            .map(|v| format!("{} {}: {} ({})", v.rule, v.path, v.message, v.source()))
            .collect();
        (POLICY_DENIED, reasons)
    })
}

const POLICY_DENIED: &str = "PolicyDenied";

/// The controller's verdict on `tool`: `Some((reason, reasons))` when it is not to be served.
fn judged_by(
    tool: &AgentTool,
    verdict: &Result<AdmittedVerdict, String>,
) -> Option<(&'static str, Vec<String>)> {
    let verdict = match verdict {
        Ok(verdict) => verdict,
        Err(why) => return Some(("AdmittedVerdictUnreadable", vec![why.clone()])),
    };
    let name = tool.metadata.name.as_deref().unwrap_or_default();
    if verdict.tool != name || verdict.generation != tool.metadata.generation {
        return Some((
            "AdmittedVerdictMismatch",
            vec![format!(
                "the controller's verdict is about {} generation {:?}, not {name} generation {:?}",
                verdict.tool, verdict.generation, tool.metadata.generation
            )],
        ));
    }
    verdict.denied.then(|| {
        let reasons: Vec<String> = verdict
            .violations
            .iter()
            .filter(|v| v.mode == PolicyMode::Enforce)
            .map(|v| {
                let source = v
                    .policy
                    .as_deref()
                    .map_or_else(|| "baseline".into(), |p| format!("policy {p}"));
                format!("{} {}: {} ({source})", v.rule, v.path, v.message)
            })
            .collect();
        if reasons.is_empty() {
            (POLICY_DENIED, vec!["the controller denies it".to_string()])
        } else {
            (POLICY_DENIED, reasons)
        }
    })
}

fn read_verdict(path: &Path) -> Result<AdmittedVerdict, String> {
    let text = std::fs::read(path).map_err(|e| {
        format!(
            "no verdict of the controller at {}: {e} (toolwarden runner serves only what the controller admitted)",
            path.display()
        )
    })?;
    serde_json::from_slice(&text).map_err(|e| {
        format!(
            "the controller's verdict {} is unreadable: {e}",
            path.display()
        )
    })
}

/// True when `path` is a manifest file a reload should react to.
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// The manifests `serve DIR` reads: the `*.yaml`/`*.yml` files directly in
/// DIR (not sub-folders, which hold things like counter-examples), or DIR
/// itself when it is a file.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file() && is_manifest(path))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::tool::{RETIRED_SECRETS_KEPT, SecretDelivery};

    fn examples() -> Vec<PathBuf> {
        manifest_files(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")).unwrap()
    }

    #[test]
    fn the_examples_are_all_served_and_the_violations_refused() {
        let registry = Registry::new(LimiterClock::manual(), SecretsDir::default());
        let report = registry.load(&examples());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert_eq!(
            report.served,
            [
                "api-call",
                "execute-code",
                "file-operation",
                "moderate-content",
                "user-profile-update"
            ]
        );
        let bad = vec![
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/violations/TW-INPUT-001.yaml"),
        ];
        let report = registry.load(&bad);
        assert_eq!(report.refused.len(), 1, "{report:?}");
        assert!(
            report.refused[0]
                .reasons
                .iter()
                .any(|r| r.contains("TW-INPUT-001")),
            "{report:?}"
        );
    }

    const ROTATING_TOOL: &str = r#"
apiVersion: toolwarden.dev/v1alpha1
kind: AgentTool
metadata: {name: rotating}
spec:
  description: Uses a secret
  risk: low
  inputSchema: {type: object, additionalProperties: false, properties: {}}
  runtime: {image: "busybox:1.36.1", command: [/bin/true]}
  rateLimit: {requestsPerMinute: 60}
  secrets:
    - {secretName: api, key: token, env: API_TOKEN}
"#;

    #[test]
    fn rotated_secrets_are_picked_up_and_the_old_ones_stay_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("tool.yaml");
        std::fs::write(&manifest, ROTATING_TOOL).unwrap();
        let token = dir.path().join("secrets/api/token");
        std::fs::create_dir_all(token.parent().unwrap()).unwrap();
        std::fs::write(&token, "first-token-value\n").unwrap();
        let registry = Registry::new(
            LimiterClock::manual(),
            SecretsDir(Some(dir.path().join("secrets"))),
        );
        let load = || registry.load(std::slice::from_ref(&manifest));
        load();
        let first = registry.get("rotating").unwrap();
        assert!(load().rotated.is_empty());
        assert!(Arc::ptr_eq(&first, &registry.get("rotating").unwrap()));

        std::fs::write(&token, "second-token-value\n").unwrap();
        let report = load();
        assert_eq!(report.rotated, ["rotating"]);
        let second = registry.get("rotating").unwrap();
        assert_eq!(
            (second.generation, second.secrets_revision),
            (first.generation, first.secrets_revision + 1),
            "a rotation is not a new spec, but needs fresh sandboxes"
        );
        assert_eq!(
            second.secrets,
            [SecretDelivery::Env {
                name: "API_TOKEN".into(),
                value: "second-token-value\n".into()
            }]
        );
        assert!(
            Arc::ptr_eq(
                first.limiter.as_ref().unwrap(),
                second.limiter.as_ref().unwrap()
            ),
            "the rate-limit state survives"
        );
        assert_eq!(
            second
                .redactor
                .redact_str("first-token-value second-token-value"),
            "[REDACTED] [REDACTED]"
        );

        // Retired values are kept up to a bound, newest first.
        for i in 0..RETIRED_SECRETS_KEPT + 2 {
            std::fs::write(&token, format!("token-number-{i:02}")).unwrap();
            load();
        }
        let last = registry.get("rotating").unwrap();
        assert_eq!(last.redactor.values().len(), 1 + RETIRED_SECRETS_KEPT);
        assert_eq!(
            last.redactor
                .redact_str("token-number-00 token-number-02 token-number-17"),
            "token-number-00 [REDACTED] [REDACTED]"
        );

        // A secret that disappears refuses the tool: it would run without it.
        std::fs::remove_file(&token).unwrap();
        let report = load();
        assert!(registry.get("rotating").is_none());
        assert!(
            report.refused[0].reasons[0].contains("secret api/token is not available"),
            "{report:?}"
        );
    }

    fn policy(name: &str, selector: &str, cidr: &str) -> String {
        format!(
            "apiVersion: toolwarden.dev/v1alpha1
kind: ToolPolicy
metadata: {{name: {name}}}
spec:
  mode: enforce
  {selector}
  rules:
    sandboxing:
      allowedEgressCidrs: [\"{cidr}\"]
---
"
        )
    }

    /// A policy grants its ranges to the tools it selects, and only those: one
    /// selecting other tools, or whose selector cannot be parsed, grants
    /// nothing; a changed policy reaches an otherwise unchanged tool.
    #[test]
    fn egress_ranges_come_from_the_policies_that_select_the_tool() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("all.yaml");
        let tool = ROTATING_TOOL
            .replace(
                "metadata: {name: rotating}",
                "metadata: {name: rotating, labels: {team: a}}",
            )
            .replace(
                "  secrets:\n    - {secretName: api, key: token, env: API_TOKEN}\n",
                "",
            );
        let write = |policies: &[String]| {
            std::fs::write(&manifest, format!("{}{tool}", policies.concat())).unwrap()
        };
        write(&[
            policy(
                "mine",
                "toolSelector: {matchLabels: {team: a}}",
                "10.0.0.0/8",
            ),
            policy(
                "theirs",
                "toolSelector: {matchLabels: {team: b}}",
                "192.168.0.0/16",
            ),
            policy(
                "broken",
                "toolSelector: {matchExpressions: [{key: team, operator: Bogus}]}",
                "172.16.0.0/12",
            ),
            policy("everyone", "", "10.0.0.0/8"),
        ]);
        let registry = Registry::new(LimiterClock::manual(), SecretsDir::default());
        let report = registry.load(std::slice::from_ref(&manifest));
        assert!(
            report.refused.is_empty() && report.errors.is_empty(),
            "{report:?}"
        );
        let granted = |r: &Registry| -> Vec<String> {
            r.get("rotating")
                .unwrap()
                .allowed_egress_cidrs
                .iter()
                .map(|c| c.0.clone())
                .collect()
        };
        assert_eq!(granted(&registry), ["10.0.0.0/8"]);

        write(&[policy(
            "mine",
            "toolSelector: {matchLabels: {team: a}}",
            "100.64.0.0/10",
        )]);
        registry.load(std::slice::from_ref(&manifest));
        assert_eq!(granted(&registry), ["100.64.0.0/10"]);
    }

    #[test]
    fn unchanged_tools_keep_their_generation_and_state() {
        let registry = Registry::new(LimiterClock::manual(), SecretsDir::default());
        registry.load(&examples());
        let before = registry.get("execute-code").unwrap();
        registry.load(&examples());
        assert!(Arc::ptr_eq(&before, &registry.get("execute-code").unwrap()));
        assert_eq!(before.generation, 1);
    }
}
