//! Where per-call cgroups live on cgroup v2: below the engine's own cgroup, never at the root
//! of the tree. Under systemd a unit with `Delegate=yes` owns its subtree and nothing above
//! it; cgroup v2's no-internal-process rule then asks that the server itself leave that
//! cgroup for a leaf before controllers can be handed to children:
//!
//! ```text
//! <own>/                      delegated to us (systemd unit, pod, or the root)
//! <own>/toolwarden-server/    runner, zygote, keepers (a leaf)
//! <own>/toolwarden/<id>/      one per call, created by libcontainer
//! ```
//!
//! cgroup v1 hybrids have no delegation model; there per-call cgroups stay at
//! `/toolwarden/<id>` in each hierarchy.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::sandbox::names::CGROUP_PARENT;

/// The leaf the server's own processes move into.
pub const SERVER_LEAF: &str = "toolwarden-server";
/// Controllers every per-call cgroup needs.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
const ROOT: &str = "/sys/fs/cgroup";

static PARENT: OnceLock<String> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("cannot read this process's cgroup: {0}")]
    OwnCgroup(std::io::Error),
    #[error(
        "controllers {missing} are not delegated to {cgroup} (cgroup.controllers: {available:?})"
    )]
    NotDelegated {
        cgroup: String,
        missing: String,
        available: String,
    },
    #[error("{action} {path}: {source}")]
    Write {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
}

impl PlacementError {
    pub fn reason(&self) -> &'static str {
        match self {
            PlacementError::OwnCgroup(_) => "OwnCgroupUnreadable",
            PlacementError::NotDelegated { .. } => "ControllersNotDelegated",
            PlacementError::Write { .. } => "CgroupWriteFailed",
        }
    }
}

/// The per-call cgroups' parent relative to the cgroup v2 root (`<own>/toolwarden`), once
/// [`delegate`] has run in this process; `toolwarden` before that (and on cgroup v1).
pub fn per_call_parent() -> &'static str {
    PARENT.get().map_or(CGROUP_PARENT, String::as_str)
}

/// Moves this process's cgroup peers (the server) into a leaf, hands the controllers to
/// children and creates the per-call parent. Idempotent: a process already in the server
/// leaf (a second engine of the same runner) uses the same parent.
pub fn delegate() -> Result<&'static str, PlacementError> {
    if let Some(parent) = PARENT.get() {
        return Ok(parent);
    }
    let own = own_cgroup().map_err(PlacementError::OwnCgroup)?;
    let delegated = match own.rsplit_once('/') {
        Some((above, SERVER_LEAF)) => above.to_string(),
        _ if own.ends_with(SERVER_LEAF) => String::new(),
        _ => own,
    };
    let dir = Path::new(ROOT).join(&delegated);
    let available = read(&dir.join("cgroup.controllers"));
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if !missing.is_empty() {
        return Err(PlacementError::NotDelegated {
            cgroup: format!("/{delegated}"),
            missing: missing.join(" "),
            available: available.trim().to_string(),
        });
    }
    // The root cgroup is exempt from the no-internal-process rule.
    if !delegated.is_empty() {
        move_processes_to_leaf(&dir)?;
    }
    enable_controllers(&dir)?;
    let parent_dir = dir.join(CGROUP_PARENT);
    create_dir(&parent_dir)?;
    enable_controllers(&parent_dir)?;
    let parent = Path::new(&delegated)
        .join(CGROUP_PARENT)
        .to_string_lossy()
        .into_owned();
    Ok(PARENT.get_or_init(|| parent))
}

/// `0::/a/b` from /proc/self/cgroup, as `a/b`.
fn own_cgroup() -> std::io::Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/').to_string())
        .ok_or_else(|| std::io::Error::other("no cgroup v2 entry in /proc/self/cgroup"))
}

/// Moves every process of `dir` into `dir/toolwarden-server`. A process forked meanwhile
/// lands in `dir` again, so repeat until it is empty (bounded: a runner starts few).
fn move_processes_to_leaf(dir: &Path) -> Result<(), PlacementError> {
    let leaf = dir.join(SERVER_LEAF);
    create_dir(&leaf)?;
    for _ in 0..10 {
        let procs = read(&dir.join("cgroup.procs"));
        if procs.trim().is_empty() {
            return Ok(());
        }
        for pid in procs.split_whitespace() {
            match std::fs::write(leaf.join("cgroup.procs"), pid) {
                // Exited between the read and the write.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                r => r.map_err(|source| write_error("move process into", &leaf, source))?,
            }
        }
    }
    Ok(())
}

fn enable_controllers(dir: &Path) -> Result<(), PlacementError> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = read(&file);
    for c in CONTROLLERS {
        if !enabled.split_whitespace().any(|e| e == c) {
            std::fs::write(&file, format!("+{c}"))
                .map_err(|source| write_error("enable controllers in", dir, source))?;
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), PlacementError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(write_error("create", dir, e))
        }
        _ => Ok(()),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn write_error(action: &'static str, path: &Path, source: std::io::Error) -> PlacementError {
    PlacementError::Write {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// The per-call cgroup of container `id` under the cgroup v2 root.
pub fn container_dir(id: &str) -> PathBuf {
    Path::new(ROOT).join(per_call_parent()).join(id)
}
