//! The tools being served: each AgentTool checked against the checklist and
//! compiled once per generation (schema, CEL rules, rate limiter, secrets).
//! A reload swaps the whole set atomically; calls in flight keep the
//! `Arc<PreparedTool>` they started with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::api::manifest::Manifests;
use crate::api::{AgentTool, AgentToolSpec, AuthorizationRule, ToolPolicy};
use crate::policy;

use super::authorize::{self, CompiledRule};
use super::executor::SecretDelivery;
use super::images::RootfsResolver;
use super::ratelimit::{LimiterClock, ToolLimiter};
use super::validate;

/// A tool ready to be called.
pub struct PreparedTool {
    pub name: String,
    /// Bumped each time the spec changes; recorded with every call.
    pub generation: u64,
    pub spec: AgentToolSpec,
    pub validator: jsonschema::Validator,
    pub rules: Vec<CompiledRule>,
    /// `approval.when`, compiled.
    pub approval_when: Option<CompiledRule>,
    pub limiter: Option<ToolLimiter>,
    /// Env and file secrets, handed to the executor.
    pub secrets: Vec<SecretDelivery>,
    /// Every secret value the tool has (injected ones too), redacted from output.
    pub secret_values: Vec<Vec<u8>>,
    /// Root file system of `runtime.image`, when the runner resolves images.
    pub rootfs: Option<PathBuf>,
}

/// Where secret values come from: `DIR/<secretName>/<key>`, the layout of a
/// mounted Kubernetes Secret volume.
#[derive(Clone, Debug, Default)]
pub struct SecretsDir(pub Option<PathBuf>);

impl SecretsDir {
    fn read(&self, secret: &str, key: &str) -> Option<Vec<u8>> {
        let dir = self.0.as_ref()?;
        // Names are validated by the CRD bounds, but never let one climb out.
        if [secret, key]
            .iter()
            .any(|s| s.contains('/') || s.starts_with('.'))
        {
            return None;
        }
        std::fs::read(dir.join(secret).join(key)).ok()
    }
}

/// Compiles one tool. Errors are readable reasons (one per problem).
pub fn prepare(
    tool: &AgentTool,
    generation: u64,
    secrets: &SecretsDir,
    images: Option<&dyn RootfsResolver>,
    clock: &LimiterClock,
) -> Result<PreparedTool, Vec<String>> {
    let spec = &tool.spec;
    let mut errors = Vec::new();
    let rootfs = images.and_then(|store| {
        store
            .resolve(&spec.runtime.image)
            .map_err(|e| errors.push(format!("spec.runtime.image: {e}")))
            .ok()
    });
    let validator = validate::compile(&spec.input_schema)
        .map_err(|e| errors.push(format!("spec.inputSchema: {e}")))
        .ok();
    let rules = authorize::compile(&spec.authorization)
        .map_err(|e| errors.push(format!("spec.{e}")))
        .ok();
    let when: Vec<AuthorizationRule> = spec
        .approval
        .iter()
        .filter_map(|a| a.when.clone())
        .map(|expression| AuthorizationRule {
            expression,
            message: None,
        })
        .collect();
    let approval_when = authorize::compile(&when)
        .map_err(|e| errors.push(format!("spec.approval.when: {e}")))
        .ok()
        .and_then(|mut rules| rules.pop());
    let mut deliveries = Vec::new();
    let mut values = Vec::new();
    for (i, use_) in spec.secrets.iter().enumerate() {
        let value = secrets.read(&use_.secret_name, &use_.key);
        match (value, &use_.env, &use_.file) {
            (Some(v), Some(env), _) => {
                values.push(v.clone());
                deliveries.push(SecretDelivery::Env {
                    name: env.clone(),
                    value: String::from_utf8_lossy(&v).into_owned(),
                });
            }
            (Some(v), None, Some(path)) => {
                values.push(v.clone());
                deliveries.push(SecretDelivery::File {
                    path: path.clone(),
                    value: v,
                });
            }
            // Injected secrets never reach the tool; the runner redacts them if it can read them.
            (Some(v), None, None) => values.push(v),
            (None, None, None) => {}
            (None, _, _) => errors.push(format!(
                "spec.secrets[{i}]: secret {}/{} is not available{}",
                use_.secret_name,
                use_.key,
                if secrets.0.is_none() {
                    " (no --secrets-dir)"
                } else {
                    ""
                }
            )),
        }
    }
    match (validator, rules, errors.is_empty()) {
        (Some(validator), Some(rules), true) => Ok(PreparedTool {
            name: tool.metadata.name.clone().unwrap_or_default(),
            generation,
            spec: spec.clone(),
            validator,
            rules,
            approval_when,
            limiter: spec
                .rate_limit
                .as_ref()
                .map(|r| ToolLimiter::new(r, clock.clone())),
            secrets: deliveries,
            secret_values: values,
            rootfs,
        }),
        _ => Err(errors),
    }
}

/// A tool that is not served, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub tool: String,
    pub origin: String,
    pub reasons: Vec<String>,
}

/// What a load or reload did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub served: Vec<String>,
    pub refused: Vec<Refusal>,
    /// Files that could not be read at all; nothing was changed.
    pub errors: Vec<String>,
}

/// The served tool set.
pub struct Registry {
    tools: RwLock<Arc<BTreeMap<String, Arc<PreparedTool>>>>,
    clock: LimiterClock,
    secrets: SecretsDir,
    images: Option<Box<dyn RootfsResolver>>,
}

impl Registry {
    pub fn new(clock: LimiterClock, secrets: SecretsDir) -> Registry {
        Registry {
            tools: RwLock::default(),
            clock,
            secrets,
            images: None,
        }
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

    /// Loads `paths` and replaces the tool set. A tool whose spec did not change
    /// keeps its compiled form and its rate-limit state. When the manifests
    /// cannot be read at all, the current set stays.
    pub fn load(&self, paths: &[PathBuf]) -> LoadReport {
        match Manifests::load(paths, false) {
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
            let refuse = |reasons: Vec<String>| Refusal {
                tool: name.clone(),
                origin: loaded.origin.to_string(),
                reasons,
            };
            if next.contains_key(&name) {
                report.refused.push(refuse(vec![format!(
                    "a tool named {name} is already served"
                )]));
                continue;
            }
            let namespace = tool
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), namespace)]);
            let verdict = policy::evaluate(tool, &policies, &labels);
            if verdict.denied() {
                report.refused.push(refuse(
                    verdict
                        .with_mode(crate::api::PolicyMode::Enforce)
                        .map(|v| format!("{} {}: {} ({})", v.rule, v.path, v.message, v.source()))
                        .collect(),
                ));
                continue;
            }
            let previous = current.get(&name);
            if let Some(prev) = previous.filter(|p| p.spec == tool.spec) {
                next.insert(name.clone(), prev.clone());
                report.served.push(name);
                continue;
            }
            let generation = tool
                .metadata
                .generation
                .and_then(|g| u64::try_from(g).ok())
                .unwrap_or_else(|| previous.map_or(1, |p| p.generation + 1));
            match prepare(
                tool,
                generation,
                &self.secrets,
                self.images.as_deref(),
                &self.clock,
            ) {
                Ok(prepared) => {
                    next.insert(name.clone(), Arc::new(prepared));
                    report.served.push(name);
                }
                Err(reasons) => report.refused.push(refuse(reasons)),
            }
        }
        *self.tools.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        report
    }
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
