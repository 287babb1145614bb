//! The runner pods' ServiceAccount: no token is mounted automatically; the runner's one
//! API token (for TokenReview) is an explicit, expiring projection in the Deployment.

use k8s_openapi::api::core::v1::ServiceAccount;

use super::{BuildError, child_meta};
use crate::api::AgentTool;

pub fn build(tool: &AgentTool, name: &str) -> Result<ServiceAccount, BuildError> {
    Ok(ServiceAccount {
        metadata: child_meta(tool, name)?,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}
