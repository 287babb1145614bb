//! `toolwarden controller`: reconciles every AgentTool into least-privilege runner
//! workloads in its namespace.
//!
//! One reconcile runs explicit phases, each with its own error type and stable
//! `reason()`: [`dereference`] (the only reads, from reflector stores and metadata gets)
//! → [`validate`] (pure: the checklist engine with the namespace's real labels) →
//! [`build`] (pure: every child object) → [`apply`] (server-side apply under one field
//! manager, stale children deleted) → [`status`] (derived from what was applied).
//! [`run`] wires the kube-runtime `Controller`, leader election, metrics and health;
//! [`policy_status`] keeps each ToolPolicy's `violatingTools` current;
//! [`runner_token_review`] lets every tool's runner review its callers' tokens.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod labels;
pub mod metrics;
pub mod policy_status;
pub mod reconcile;
pub mod run;
pub mod runner_pods;
pub mod runner_token_review;
pub mod status;
#[cfg(test)]
mod tests;
pub mod validate;
