//! The runner pod's security settings: the one definition the README documents, the e2e test
//! deploys and the controller (a later change) will put on every runner pod.

use k8s_openapi::api::core::v1::SecurityContext;

/// The capabilities a runner pod adds after dropping ALL (with `hostUsers: false` each is
/// powerful only over the pod's own user namespace; README "The runner in a pod" says why each
/// is needed): own mount namespace and mounts (SYS_ADMIN), the sandboxes' id maps (SETUID,
/// SETGID), handing file secrets to the sandbox user (CHOWN), opening a starting sandbox's
/// /proc/<pid>/ns and root (SYS_PTRACE), and chroot for the move-mount root switch, which
/// RuntimeDefault seccomp allows only with SYS_CHROOT.
pub const RUNNER_POD_CAPABILITIES: &[&str] = &[
    "SYS_ADMIN",
    "SETUID",
    "SETGID",
    "CHOWN",
    "SYS_PTRACE",
    "SYS_CHROOT",
];

/// The runner container's `securityContext`; the pod also sets `hostUsers: false`.
///
/// `runAsUser: 0` is the root of the pod's own user namespace, an unprivileged id on the node:
/// the capabilities below are effective only for uid 0 (Kubernetes sets no ambient
/// capabilities), so `runAsNonRoot` cannot be set.
pub fn runner_security_context() -> SecurityContext {
    serde_json::from_value(serde_json::json!({
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": false,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "privileged": false,
        "capabilities": {"drop": ["ALL"], "add": RUNNER_POD_CAPABILITIES},
        "seccompProfile": {"type": "RuntimeDefault"},
    }))
    .expect("a valid SecurityContext")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's "The runner in a pod" section shows exactly this securityContext.
    #[test]
    fn the_readme_documents_exactly_this_security_context() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("# runner securityContext (src/sandbox/pod.rs)\n")
            .expect("the README's runner securityContext block");
        let block = &readme[start..];
        let block = &block[..block.find("```").expect("end of the block")];
        let documented: serde_yaml::Value = serde_yaml::from_str(block).unwrap();
        let documented: SecurityContext =
            serde_yaml::from_value(documented["securityContext"].clone()).unwrap();
        assert_eq!(documented, runner_security_context());
    }
}
