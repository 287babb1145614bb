//! ToolApproval status updates: who decided is the request's authenticated
//! user, never what the body says; the user must be one of the tool's
//! approvers and not the caller who asked; a decision, once made, stays.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};

use super::cluster::ClusterView;
use super::review::{deny, typed_object};
use crate::api::ToolApproval;

pub fn admit(request: &AdmissionRequest<DynamicObject>, view: &ClusterView) -> AdmissionResponse {
    if request.operation != Operation::Update {
        return AdmissionResponse::from(request);
    }
    let new: ToolApproval = match typed_object(request, false) {
        Ok(approval) => approval,
        Err(denied) => return *denied,
    };
    let old: ToolApproval = match typed_object(request, true) {
        Ok(approval) => approval,
        Err(denied) => return *denied,
    };
    let old_status = old.status.clone().unwrap_or_default();
    let new_status = new.status.clone().unwrap_or_default();
    if let Some(decision) = old_status.decision {
        if old_status == new_status {
            return AdmissionResponse::from(request);
        }
        return deny(
            request,
            "AlreadyDecided",
            format!(
                "ToolApproval {} was already decided ({:?} by {}); a decision is immutable",
                request.name,
                decision,
                old_status.decided_by.as_deref().unwrap_or("unknown")
            ),
        );
    }
    if new_status.decision.is_none() {
        return AdmissionResponse::from(request);
    }
    let Some(user) = request
        .user_info
        .username
        .as_deref()
        .filter(|u| !u.is_empty())
    else {
        return deny(
            request,
            "NoUser",
            "the request names no authenticated user to decide",
        );
    };
    if new_status.decided_by.as_deref() != Some(user) {
        return deny(
            request,
            "DeciderMismatch",
            format!(
                "status.decidedBy is {:?} but the request is made by {user:?}; decidedBy must be the deciding user",
                new_status.decided_by.as_deref().unwrap_or("")
            ),
        );
    }
    if user == new.spec.caller {
        return deny(
            request,
            "SelfApproval",
            format!("{user:?} made the call and cannot decide its own approval"),
        );
    }
    let namespace = request.namespace.as_deref().unwrap_or_default();
    let Some(tool) = view.tool(namespace, &new.spec.tool_ref) else {
        return deny(
            request,
            "ToolNotFound",
            format!(
                "AgentTool {namespace}/{} is not known, so its approvers cannot be checked",
                new.spec.tool_ref
            ),
        );
    };
    let approvers = tool.spec.approval.as_ref().map(|a| &a.approvers);
    let groups = request.user_info.groups.as_deref().unwrap_or_default();
    let allowed = approvers.is_some_and(|a| {
        a.users.iter().any(|u| u == user) || a.groups.iter().any(|g| groups.contains(g))
    });
    if !allowed {
        return deny(
            request,
            "NotAnApprover",
            format!(
                "{user:?} is not an approver of AgentTool {namespace}/{} (spec.approval.approvers: users {:?}, groups {:?})",
                new.spec.tool_ref,
                approvers.map(|a| a.users.as_slice()).unwrap_or_default(),
                approvers.map(|a| a.groups.as_slice()).unwrap_or_default(),
            ),
        );
    }
    AdmissionResponse::from(request)
}
