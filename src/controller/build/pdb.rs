//! A PodDisruptionBudget when more than one runner pod serves the tool: a drain takes
//! at most one at a time. With one pod a budget would only block node drains.

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::json;

use super::{BuildError, ChildNames, child_meta, from_json};
use crate::controller::labels::child_labels;
use crate::controller::validate::Admitted;

pub fn build(
    admitted: &Admitted,
    names: &ChildNames,
) -> Result<Option<PodDisruptionBudget>, BuildError> {
    let tool = &admitted.tool;
    if admitted.replicas() <= 1 {
        return Ok(None);
    }
    let spec = from_json(
        "PodDisruptionBudget",
        json!({"maxUnavailable": 1, "selector": {"matchLabels": child_labels(tool)}}),
    )?;
    Ok(Some(PodDisruptionBudget {
        metadata: child_meta(tool, &names.runner)?,
        spec: Some(spec),
        status: None,
    }))
}
