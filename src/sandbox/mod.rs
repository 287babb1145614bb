//! Sandbox engine: runs one tool invocation per fresh OCI container (libcontainer/youki).
//!
//! Architecture (README, "Sandbox engine"):
//! * The async runner ([`Sandboxes`]) never forks containers itself: cloning from a
//!   multi-threaded tokio process is unsafe (youki #3011/#3027). It spawns a *zygote*:
//!   the same binary re-executed with the hidden `sandbox-zygote` subcommand
//!   ([`zygote_main`]), talking over a `SOCK_SEQPACKET` socketpair.
//! * For every container the zygote forks a single-threaded *keeper* that builds and
//!   starts the container, hands the per-call pipes and a pidfd to the runner with
//!   `SCM_RIGHTS`, then waits for the container init, reports its status through a per-container
//!   report pipe (read directly by the calling task) and deletes it.
//!   Keepers are independent, so a slow `build()` never delays another call's result.
//! * The container init parks inside [`container_init`] (after pivot_root, setuid, cap drop)
//!   reading the invocation from a control pipe. A warm call is therefore: write argv/env to
//!   the pipe, read output, get the exit status. Each container is used exactly once.
//!
//! Files, by lifecycle. Runner side: [`engine`] (the handle), [`zygote_client`] (the socket),
//! [`pool`] (warm pools), [`call`] (one invocation), [`output`]. Zygote side: [`zygote`] (event
//! loop), [`zygote_mounts`] (its mount namespace), [`keeper`] (one container's life),
//! [`container_init`] (inside the container). Shared: [`model`], [`error`], [`names`],
//! [`proto`]. No file imports another that imports it back.
//!
//! The only module of the crate allowed `unsafe` code (fork, raw fds, system calls without a
//! safe wrapper in nix or rustix): every block says why it is sound.
#![warn(clippy::undocumented_unsafe_blocks)]

// The seccomp allowlist (syscall numbers, `TargetArch`) and the kernel `sigaction` layout the
// container init uses are x86_64's.
#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "toolwarden's sandbox supports x86_64 only: port the seccomp allowlist \
     (src/sandbox/seccomp.rs) and the container init's signal reset \
     (src/sandbox/container_init.rs) to this architecture first"
);

pub mod call;
pub mod cgroup_v2;
pub mod container_init;
pub mod detect;
pub mod engine;
pub mod error;
pub mod keeper;
pub mod model;
pub mod mountinfo;
pub mod mountpoint;
pub mod names;
pub mod netlo;
pub mod oci_spec;
pub mod output;
pub mod pod;
pub mod pool;
pub mod proto;
pub mod reaper;
pub mod seal;
pub mod seccomp;
pub mod sweep;
pub mod zygote;
pub mod zygote_client;
pub mod zygote_mounts;

pub use engine::{EngineConfig, Sandboxes};
pub use error::{Error, Result};
pub use model::{
    BindMount, Captured, Enforcement, Invocation, Limits, Mechanism, Outcome, SandboxSpec,
};
pub use names::ZYGOTE_SUBCOMMAND;
pub use pod::RUNNER_POD_CAPABILITIES;
pub use pool::Pool;
pub use zygote::zygote_main;

#[cfg(test)]
mod structure_tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// The first path segment of every `crate::sandbox::...` path outside comments, i.e. the
    /// sibling files this file uses (`{a, b::c}` groups are split at their top level).
    fn sibling_imports(source: &str) -> BTreeSet<String> {
        let code: String = source
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut found = BTreeSet::new();
        for (at, _) in code.match_indices("crate::sandbox::") {
            let rest = &code[at + "crate::sandbox::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 0;
                let mut item = String::new();
                for ch in group.chars() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.insert(std::mem::take(&mut item));
                            continue;
                        }
                        _ => {}
                    }
                    item.push(ch);
                }
                found.insert(item);
            } else {
                found.insert(rest.to_string());
            }
        }
        found
            .iter()
            .map(|p| {
                let p = p.trim();
                let end = p
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(p.len());
                p[..end].to_string()
            })
            .filter(|m| !m.is_empty() && m != "self")
            .collect()
    }

    /// Every file of `src/sandbox/` uses its siblings by their module path (never through a
    /// re-export of mod.rs or `super::`), and the uses form no cycle: no two files import each
    /// other, directly or around a loop.
    #[test]
    fn no_two_files_import_each_other() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sandbox");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if name == "mod" {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            assert!(
                !source
                    .lines()
                    .any(|l| l.contains("super::") && l.trim() != "use super::*;"),
                "{name}.rs reaches a sibling through super::; name it by crate::sandbox::<file>"
            );
            graph.insert(name, sibling_imports(&source));
        }
        for (file, uses) in &graph {
            for used in uses {
                assert!(
                    graph.contains_key(used),
                    "{file}.rs uses crate::sandbox::{used}, which is not a file of src/sandbox/ \
                     (import items from the file that defines them)"
                );
            }
        }
        // Depth-first search for a cycle; reports the loop.
        fn visit(
            file: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if done.contains(file) {
                return;
            }
            if let Some(at) = path.iter().position(|p| p == file) {
                panic!("import cycle: {} -> {file}", path[at..].join(" -> "));
            }
            path.push(file.to_string());
            for used in &graph[file] {
                if used != file {
                    visit(used, graph, path, done);
                }
            }
            path.pop();
            done.insert(file.to_string());
        }
        let mut done = BTreeSet::new();
        for file in graph.keys() {
            visit(file, &graph, &mut Vec::new(), &mut done);
        }
        assert!(graph["zygote"].contains("keeper") && graph["engine"].contains("pool"));
    }
}
