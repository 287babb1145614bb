//! The validate phase (pure): the same checklist engine as `toolwarden check` and the
//! webhook, with the namespace's real labels and the ToolPolicies from the dereference
//! phase, plus what only a cluster deployment cannot do.

use kube::ResourceExt;
use serde::Serialize;

use super::dereference::Inputs;
use crate::api::{AgentTool, EgressCidr};
use crate::policy::{Engine, Violation};

/// A tool as the controller admitted it: the spec it validated and the verdict.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub tool: AgentTool,
    pub verdict: Verdict,
    /// What the selecting policies let its egress reach (`allowedEgressCidrs`), for the
    /// runner, which cannot see the policies.
    pub allowed_egress_cidrs: Vec<EgressCidr>,
}

/// The checklist's result for the tool in its namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// An enforcing policy (or the baseline) rejects the tool: it gets no runner pods.
    pub denied: bool,
    /// Every broken rule, enforcing or not.
    pub violations: Vec<Violation>,
}

impl Admitted {
    /// Runner pods to run: none for a denied tool (an existing workload scales to zero).
    pub fn replicas(&self) -> u32 {
        if self.verdict.denied {
            0
        } else {
            self.tool.spec.serving.replicas
        }
    }
}

/// A spec the controller cannot deploy, whatever the policies say. Waits for a change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidateError {
    #[error(
        "the name {0:?} cannot name the tool's Service: use at most 57 lower-case letters, \
         digits and '-', starting with a letter (a DNS-1035 label leaving room for suffixes)"
    )]
    InvalidName(String),
    #[error(
        "spec.permissions.filesystem[{index}].hostPath: runner pods never mount host paths; \
         use a persistentVolumeClaim"
    )]
    HostPathUnsupported { index: usize },
    #[error(
        "spec.permissions.kubernetes[{index}].clusterWide: the controller creates nothing \
         cluster-scoped; grant namespaced rules"
    )]
    ClusterWideRbacUnsupported { index: usize },
    #[error(
        "namespace label {POD_SECURITY_ENFORCE}={level} refuses runner pods (they add \
         namespaced capabilities such as SYS_ADMIN in their own user namespace); label the \
         namespace {POD_SECURITY_ENFORCE}=privileged or run the tool elsewhere"
    )]
    PodSecurityForbids { level: String },
}

/// Pod Security Admission's enforced level, a namespace label.
const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";

impl ValidateError {
    /// Stable CamelCase reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ValidateError::InvalidName(_) => "InvalidName",
            ValidateError::HostPathUnsupported { .. } => "HostPathUnsupported",
            ValidateError::ClusterWideRbacUnsupported { .. } => "ClusterWideRbacUnsupported",
            ValidateError::PodSecurityForbids { .. } => "PodSecurityForbids",
        }
    }
}

/// Longest tool name: a DNS-1035 label (63) minus the longest child suffix (`-token`).
const MAX_NAME: usize = 57;

pub fn validate(
    tool: &AgentTool,
    inputs: &Inputs,
    engine: &Engine,
) -> Result<Admitted, ValidateError> {
    let name = tool.name_any();
    if !is_dns1035_label(&name) || name.len() > MAX_NAME {
        return Err(ValidateError::InvalidName(name));
    }
    let permissions = &tool.spec.permissions;
    if let Some(index) = permissions
        .filesystem
        .iter()
        .position(|m| m.host_path.is_some())
    {
        return Err(ValidateError::HostPathUnsupported { index });
    }
    if let Some(index) = permissions.kubernetes.iter().position(|r| r.cluster_wide) {
        return Err(ValidateError::ClusterWideRbacUnsupported { index });
    }
    // Both Pod Security levels below `privileged` refuse added capabilities beyond a
    // default set that has no SYS_ADMIN: the Deployment would exist, its pods never.
    if let Some(level) = inputs.namespace_labels.get(POD_SECURITY_ENFORCE)
        && matches!(level.as_str(), "baseline" | "restricted")
    {
        return Err(ValidateError::PodSecurityForbids {
            level: level.clone(),
        });
    }
    let report = engine.evaluate(tool, &inputs.policies, &inputs.namespace_labels);
    Ok(Admitted {
        tool: tool.clone(),
        verdict: Verdict {
            denied: report.denied(),
            violations: report.violations,
        },
        allowed_egress_cidrs: crate::policy::granted_egress_cidrs(
            tool,
            &inputs.policies,
            &inputs.namespace_labels,
        ),
    })
}

fn is_dns1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_lowercase)
        && bytes
            .last()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_namespace_whose_pod_security_refuses_runner_pods_is_named() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/execute-code.yaml");
        let tool: AgentTool =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let engine = Engine::default();
        let with_level = |level: &str| Inputs {
            namespace_labels: BTreeMap::from([(POD_SECURITY_ENFORCE.into(), level.into())]),
            policies: Vec::new(),
        };
        for level in ["baseline", "restricted"] {
            let error = validate(&tool, &with_level(level), &engine).unwrap_err();
            assert_eq!(error.reason(), "PodSecurityForbids");
            assert!(error.to_string().contains(level), "{error}");
        }
        assert!(validate(&tool, &with_level("privileged"), &engine).is_ok());
        assert!(validate(&tool, &Inputs::default(), &engine).is_ok());
    }

    #[test]
    fn service_names_must_be_dns1035_labels() {
        for good in ["a", "api-call", "tool-2"] {
            assert!(is_dns1035_label(good), "{good}");
        }
        for bad in ["", "2tool", "api.call", "Tool", "tool-", "-tool"] {
            assert!(!is_dns1035_label(bad), "{bad}");
        }
    }
}
