//! The checklist engine as a long-lived service: [`evaluate`](super::evaluate)
//! plus a bounded cache of per-tool analyses.
//!
//! Compiling a tool's input schema and CEL expressions costs ~80 µs, the
//! policy rules ~1.5 µs. The webhook and the controller see the same tool
//! generation again and again (each policy change re-checks every tool), so
//! the analysis is cached by the content it depends on.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::{Report, ToolFacts, evaluate_with_facts};
use crate::api::{AgentTool, AgentToolSpec, ToolPolicy};

/// Analyses kept; one per distinct schema and expression set.
const CACHED_ANALYSES: usize = 4096;

pub struct Engine {
    /// Seeded per process, so nobody can craft a tool that collides with another's key.
    hasher: RandomState,
    cache: Mutex<LruCache<u64, Arc<ToolFacts>>>,
}

impl Default for Engine {
    fn default() -> Self {
        Engine {
            hasher: RandomState::new(),
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(CACHED_ANALYSES).expect("non-zero"),
            )),
        }
    }
}

impl Engine {
    /// Same result as [`super::evaluate`], reusing the analysis of a tool seen before.
    pub fn evaluate(
        &self,
        tool: &AgentTool,
        policies: &[ToolPolicy],
        namespace_labels: &BTreeMap<String, String>,
    ) -> Report {
        let facts = self.facts(&tool.spec);
        evaluate_with_facts(tool, &facts, policies, namespace_labels)
    }

    fn facts(&self, spec: &AgentToolSpec) -> Arc<ToolFacts> {
        let key = self.analysis_key(spec);
        if let Some(hit) = self.lock().get(&key) {
            return Arc::clone(hit);
        }
        // Analysed outside the lock: a slow compile must not stall other evaluations.
        let facts = Arc::new(ToolFacts::analyze(spec));
        self.lock().put(key, Arc::clone(&facts));
        facts
    }

    /// Hash of exactly the fields [`ToolFacts::analyze`] reads.
    fn analysis_key(&self, spec: &AgentToolSpec) -> u64 {
        let mut h = self.hasher.build_hasher();
        hash_json(&spec.input_schema, &mut h);
        if let Some(output) = &spec.output_schema {
            hash_json(output, &mut h);
        }
        for rule in &spec.authorization {
            rule.expression.hash(&mut h);
        }
        spec.approval
            .as_ref()
            .and_then(|a| a.when.as_deref())
            .hash(&mut h);
        h.finish()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<u64, Arc<ToolFacts>>> {
        // A panic while holding the lock leaves only a cache behind; keep using it.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Hashes a JSON value structurally (objects are ordered maps in serde_json, so
/// equal documents hash equally).
fn hash_json(value: &serde_json::Value, h: &mut impl Hasher) {
    use serde_json::Value::*;
    std::mem::discriminant(value).hash(h);
    match value {
        Null => {}
        Bool(b) => b.hash(h),
        Number(n) => n.to_string().hash(h),
        String(s) => s.hash(h),
        Array(items) => {
            items.len().hash(h);
            items.iter().for_each(|v| hash_json(v, h));
        }
        Object(map) => {
            map.len().hash(h);
            for (k, v) in map {
                k.hash(h);
                hash_json(v, h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::manifest::Manifests;

    fn example_tool(name: &str) -> AgentTool {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let manifests = Manifests::load(&[dir], false).unwrap();
        manifests
            .tools
            .into_iter()
            .find(|t| t.object.metadata.name.as_deref() == Some(name))
            .unwrap()
            .object
    }

    /// A placeholder variable that would clash with another variable of the
    /// tool (the proxy's, another secret's, runtime.env) is a violation.
    #[test]
    fn placeholder_variables_clash_with_nothing() {
        let labels = BTreeMap::new();
        let at = "spec.secrets[0].inject.placeholderEnv";
        let clashes = |tool: &AgentTool| {
            super::super::evaluate(tool, &[], &labels)
                .violations
                .iter()
                .any(|v| v.rule == "TW-SECRET-004" && v.path == at)
        };
        let mut tool = example_tool("api-call");
        assert!(!clashes(&tool));
        for name in ["HTTPS_PROXY", "no_proxy", "SERVICE_API_KEY"] {
            tool.spec.secrets[0]
                .inject
                .as_mut()
                .unwrap()
                .placeholder_env = Some(name.into());
            assert!(clashes(&tool), "{name}");
        }
        tool.spec.secrets[0]
            .inject
            .as_mut()
            .unwrap()
            .placeholder_env = Some("KEY".into());
        assert!(!clashes(&tool));
        tool.spec.runtime.env.push(crate::api::EnvVar {
            name: "KEY".into(),
            value: String::new(),
        });
        assert!(clashes(&tool));
    }

    #[test]
    fn an_output_schema_that_does_not_compile_or_nests_too_deep_is_a_baseline_violation() {
        let engine = Engine::default();
        let labels = BTreeMap::new();
        let mut tool = example_tool("moderate-content");
        let output_errors = |tool: &AgentTool| -> Vec<String> {
            engine
                .evaluate(tool, &[], &labels)
                .violations
                .into_iter()
                .filter(|v| v.path == "spec.outputSchema")
                .map(|v| format!("{} {}", v.rule, v.message))
                .collect()
        };
        tool.spec.output_schema = Some(serde_json::json!({"type": "object",
            "properties": {"approved": {"type": "boolean"}}}));
        assert!(output_errors(&tool).is_empty());
        // Changing only the output schema must not be served the old analysis.
        tool.spec.output_schema =
            Some(serde_json::json!({"type": "object", "minProperties": "two"}));
        let errors = output_errors(&tool);
        assert!(
            errors.len() == 1 && errors[0].starts_with("TW-INPUT-001"),
            "{errors:?}"
        );
        // A deep schema is reported, not compiled (no stack to exhaust).
        let mut deep = serde_json::json!({"type": "object"});
        for _ in 0..100 {
            deep = serde_json::json!({"type": "object", "properties": {"a": deep}});
        }
        tool.spec.output_schema = Some(deep);
        let errors = output_errors(&tool);
        assert!(
            errors[0].contains("nests deeper than 32 levels"),
            "{errors:?}"
        );
    }

    #[test]
    fn cached_results_equal_uncached_ones_and_follow_changes() {
        let engine = Engine::default();
        let labels = BTreeMap::new();
        let mut tool = example_tool("user-profile-update");
        assert_eq!(
            engine.evaluate(&tool, &[], &labels),
            super::super::evaluate(&tool, &[], &labels)
        );
        // A changed schema must not be served the old analysis.
        tool.spec.input_schema["minProperties"] = serde_json::json!("two");
        let changed = engine.evaluate(&tool, &[], &labels);
        assert!(
            changed.violations.iter().any(|v| v.rule == "TW-INPUT-001"),
            "{changed:?}"
        );
        assert_eq!(changed, super::super::evaluate(&tool, &[], &labels));
        // Likewise a changed expression.
        tool.spec.authorization[0].expression = "caller.sub ==".into();
        assert!(
            engine
                .evaluate(&tool, &[], &labels)
                .violations
                .iter()
                .any(|v| v.rule == "TW-PRIV-008")
        );
    }
}
