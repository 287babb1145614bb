//! Host capability detection, done once at zygote startup, so that every limit is enforced by
//! the strongest mechanism available and the choice is reported (never silently degraded).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sandbox::{Enforcement, Mechanism, SandboxSpec, cgroup_v2};

/// Parent of all per-call cgroups: relative to each hierarchy root on cgroup v1, below the
/// engine's own cgroup on cgroup v2 (see [`cgroup_v2`]).
pub const CGROUP_PARENT: &str = "toolwarden";
/// Container uid/gid 0 maps to this host id when a user namespace is used.
pub const USERNS_HOST_BASE: u32 = 1_000_000;
pub const USERNS_SIZE: u32 = 65_536;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum CgroupMode {
    /// Legacy or hybrid hierarchy; `memsw` tells whether swap accounting exists.
    V1 {
        memsw: bool,
    },
    V2,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostReport {
    pub cgroup: Option<CgroupMode>,
    /// Why per-call cgroups cannot be used (None = they can).
    pub cgroup_unusable: Option<String>,
    /// Why user namespaces cannot be used (None = they can).
    pub userns_unusable: Option<String>,
    /// When per-call cgroups cannot be used: the limits of the cgroup the engine itself runs
    /// in (in a pod, the pod's), which bound all sandboxes together.
    #[serde(default)]
    pub outer_bound: Option<String>,
}

impl HostReport {
    pub fn detect(force_rlimits: bool) -> HostReport {
        let cgroup = detect_cgroup();
        let cgroup_unusable = if force_rlimits {
            Some("disabled by configuration (force_rlimits)".to_string())
        } else {
            match cgroup {
                None => Some("no cgroup hierarchy found under /sys/fs/cgroup".into()),
                Some(CgroupMode::V2) => match cgroup_v2::delegate() {
                    Ok(_) => probe_cgroup_writable(CgroupMode::V2).err(),
                    Err(e) => Some(e.to_string()),
                },
                Some(mode) => probe_cgroup_writable(mode).err(),
            }
        };
        let outer_bound = cgroup_unusable.as_ref().map(|_| own_cgroup_limits(cgroup));
        HostReport {
            cgroup,
            cgroup_unusable,
            userns_unusable: probe_userns().err(),
            outer_bound,
        }
    }

    pub fn cgroup_mechanism(&self) -> Mechanism {
        match (self.cgroup, &self.cgroup_unusable) {
            (Some(CgroupMode::V1 { .. }), None) => Mechanism::CgroupV1,
            (Some(CgroupMode::V2), None) => Mechanism::CgroupV2,
            _ => Mechanism::Rlimit,
        }
    }

    /// Why a user namespace cannot be used for this spec (None = it will be used).
    pub fn userns_unusable_for(&self, spec: &SandboxSpec) -> Option<String> {
        if let Some(why) = &self.userns_unusable {
            return Some(why.clone());
        }
        // The mapped root has no rights on host-root-owned dirs: every path it must reach has
        // to be world-traversable.
        let mut paths = vec![spec.rootfs.clone()];
        paths.extend(spec.mounts.iter().map(|m| m.source.clone()));
        for p in paths {
            if let Err(why) = world_traversable(&p) {
                return Some(why);
            }
        }
        None
    }

    pub fn enforcement(&self, userns: bool) -> Enforcement {
        let cg = self.cgroup_mechanism();
        let devices = match cg {
            Mechanism::CgroupV1 => Mechanism::CgroupV1,
            // libcontainer built without `cgroupsv2_devices`: only the explicit device list.
            _ => Mechanism::None,
        };
        Enforcement {
            memory: cg,
            pids: cg,
            cpu: cg,
            file_size: Mechanism::Rlimit,
            tmp_size: Mechanism::Tmpfs,
            devices,
            user_namespace: userns,
            seccomp: true,
        }
    }
}

fn detect_cgroup() -> Option<CgroupMode> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return Some(CgroupMode::V2);
    }
    if root.join("memory").is_dir() && root.join("pids").is_dir() {
        let memsw = root.join("memory/memory.memsw.limit_in_bytes").exists();
        return Some(CgroupMode::V1 { memsw });
    }
    None
}

/// The memory, pids and cpu limits of our own cgroup, e.g.
/// `memory.max=2147483648 pids.max=max cpu.max=200000 100000` ("?" where unreadable).
fn own_cgroup_limits(mode: Option<CgroupMode>) -> String {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let root = Path::new("/sys/fs/cgroup");
    // "<id>:<controllers>:<path>"; v2 has the single line "0::<path>".
    let path_of = |ctrl: &str| {
        own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|c| c == ctrl)
                .then(|| path.trim_start_matches('/').to_string())
        })
    };
    let read = |ctrl: &str, hierarchy: &str, file: &str| match path_of(ctrl) {
        // The (real) root cgroup has no limit files: it is not limited.
        Some(p) if p.is_empty() && !root.join(hierarchy).join(file).exists() => "max".into(),
        Some(p) => std::fs::read_to_string(root.join(hierarchy).join(p).join(file))
            .map_or("?".to_string(), |v| v.trim().to_string()),
        None => "?".into(),
    };
    match mode {
        Some(CgroupMode::V2) => format!(
            "memory.max={} pids.max={} cpu.max={}",
            read("", "", "memory.max"),
            read("", "", "pids.max"),
            read("", "", "cpu.max")
        ),
        Some(CgroupMode::V1 { .. }) => format!(
            "memory.limit_in_bytes={} pids.max={} cpu.cfs_quota_us={} cpu.cfs_period_us={}",
            read("memory", "memory", "memory.limit_in_bytes"),
            read("pids", "pids", "pids.max"),
            read("cpu", "cpu", "cpu.cfs_quota_us"),
            read("cpu", "cpu", "cpu.cfs_period_us")
        ),
        None => "no cgroup hierarchy".to_string(),
    }
}

/// Tries to create (and remove) a probe cgroup where the per-call cgroups will live.
fn probe_cgroup_writable(mode: CgroupMode) -> Result<(), String> {
    let dirs: Vec<PathBuf> = match mode {
        CgroupMode::V2 => vec![PathBuf::from("/sys/fs/cgroup").join(cgroup_v2::per_call_parent())],
        CgroupMode::V1 { .. } => ["memory", "pids", "cpu"]
            .iter()
            .map(|c| PathBuf::from("/sys/fs/cgroup").join(c).join(CGROUP_PARENT))
            .collect(),
    };
    for d in dirs {
        let probe = d.join(format!("probe-{}", std::process::id()));
        std::fs::create_dir_all(&probe)
            .map_err(|e| format!("cgroup tree not writable ({}): {e}", probe.display()))?;
        let _ = std::fs::remove_dir(&probe);
    }
    Ok(())
}

/// Forks a child that tries `unshare(CLONE_NEWUSER)` (the zygote is single-threaded here).
fn probe_userns() -> Result<(), String> {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        && s.trim() == "0"
    {
        return Err("user.max_user_namespaces is 0".into());
    }
    // SAFETY: single-threaded process; the child only calls async-signal-safe functions.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
                other => Err(format!("unshare(CLONE_NEWUSER) failed in probe: {other:?}")),
            }
        }
        Err(e) => Err(format!("fork for userns probe failed: {e}")),
    }
}

/// Every folder on the way to `path` can be searched by the user-namespace
/// root: by everyone (`o+x`), or by the mapped root as its owner (a private
/// per-tool folder, see `write_secret_files`).
fn world_traversable(path: &Path) -> Result<(), String> {
    let canon = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for anc in canon.ancestors() {
        let meta = std::fs::metadata(anc).map_err(|e| format!("{}: {e}", anc.display()))?;
        let mode = meta.permissions().mode();
        // The image cache's entries are `0710` with the mapped root's group; per-tool
        // secret folders belong to the mapped root.
        let group_traversable = meta.gid() == USERNS_HOST_BASE && mode & 0o010 != 0;
        let mapped_root_owns = meta.uid() == USERNS_HOST_BASE && mode & 0o100 != 0;
        if meta.is_dir() && mode & 0o001 == 0 && !group_traversable && !mapped_root_owns {
            return Err(format!(
                "{} is not world-traversable (o+x), the user-namespace root could not reach it",
                anc.display()
            ));
        }
    }
    Ok(())
}
