//! The toolwarden API (`toolwarden.dev/v1alpha1`): one file per kind, plus the
//! shared pieces and the CRD generator.

mod agent_tool;
mod agent_tool_guards;
mod common;
mod crd;
pub mod manifest;
pub mod names;
mod tool_approval;
mod tool_policy;

pub use agent_tool::*;
pub use agent_tool_guards::*;
pub use common::*;
pub use crd::{all_crds, crd_files, crds_yaml};
pub use tool_approval::*;
pub use tool_policy::*;

/// API group of every toolwarden kind.
pub const GROUP: &str = "toolwarden.dev";
/// The one served version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "toolwarden.dev/v1alpha1";
