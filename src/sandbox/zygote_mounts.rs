//! The zygote's own mount namespace, inherited by its keepers (and copied into each container,
//! which pivots away from it): what the zygote unmasks, hides and mounts there before any
//! sandbox exists.

use std::path::{Path, PathBuf};

use crate::sandbox::error::{Result, SetupError};
use crate::sandbox::mountinfo::{mountinfo, mounts_of_type};

/// The zygote's own mount namespace, inherited by its keepers (and copied into each container,
/// which pivots away from it): a slave of the host's, so later host mounts (bind sources,
/// images) still arrive and nothing done here propagates back.
pub fn enter_own_mount_namespace() -> Result<(), SetupError> {
    use nix::mount::{MsFlags, mount};
    let err = |step: &'static str, errno: nix::Error| SetupError::OwnMountNamespace { step, errno };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| err("unshare(CLONE_NEWNS)", e))?;
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
        .map_err(|e| err("make / rslave", e))
}

/// A container runtime masks parts of a pod's /proc (/dev/null over /proc/kcore, /proc/keys,
/// ...; tmpfs over /proc/acpi, /proc/scsi; read-only binds of /proc/sys, /proc/bus, ...). A
/// sandbox's user namespace owns its mount namespace, so every mount it inherits is locked,
/// and the kernel refuses a fresh procfs there while the only procfs around has locked mounts
/// over non-empty files and directories (`mount_too_revealing`). So the zygote removes those
/// masks in its own mount namespace, before any sandbox exists.
///
/// Why that is safe: only the zygote and its keepers (runner code, root of the pod's user
/// namespace, which may unmount them anyway with the CAP_SYS_ADMIN it holds there) see the
/// unmasked /proc; the runner's HTTP side keeps the runtime's masks; every sandbox mounts its
/// own procfs and masks it again with the OCI spec's maskedPaths/readonlyPaths (the same paths,
/// spec.rs) before the tool runs; and what the masks hide stays guarded by the kernel against
/// the *host*'s root (/proc/kcore needs CAP_SYS_RAWIO in the initial user namespace, which a pod
/// never has; /proc/sysrq-trigger is writable by the host's uid 0 only). A mask that cannot be removed
/// (a host's locked mount) stays, and the probe then reports the user namespace unusable.
pub fn unmask_proc() {
    let Ok(mounts) = mountinfo() else { return };
    let proc = Path::new("/proc");
    let mut masks: Vec<PathBuf> = mounts
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(proc) && p != proc)
        .collect();
    deepest_first(&mut masks);
    for m in masks {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Upper bound of the container-state tmpfs: a container's state and bundle take ~10 KiB.
const STATE_TMPFS_SIZE: &str = "size=64m";

/// libcontainer writes and rewrites each container's state.json, config and bundle, then
/// deletes them; on a disk file system (here /run is ext4; in a pod it is an emptyDir) the
/// journal work alone cost ~1.5 ms of CPU per call. A tmpfs in the zygote's own mount
/// namespace keeps that in memory and vanishes with the zygote. Only used with per-call
/// cgroups: those name every container, so the sweeper still finds a crashed zygote's
/// containers without their state dirs (in rlimit mode the state dirs are the only record).
pub fn mount_state_tmpfs(dir: &Path) -> Result<(), SetupError> {
    use nix::mount::{MsFlags, mount};
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let options = format!("mode=0700,{STATE_TMPFS_SIZE}");
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        flags,
        Some(options.as_str()),
    )
    .map_err(|errno| SetupError::StateTmpfs {
        dir: dir.to_path_buf(),
        errno,
    })
}

/// rlimit mode. libcontainer always moves the container into a cgroup (`cgroupsPath`, or
/// `:youki:<id>` without one) and fails on a read-only cgroup file system (cgroup v1 has no
/// "rootless" tolerance at all). So in the zygote's own mount namespace (inherited by its
/// keepers, hence by the containers, which get no /sys at all) no cgroup file system stays
/// mounted and /sys/fs/cgroup is an empty read-only tmpfs: libcgroups then detects a legacy
/// layout without any hierarchy, and its add_task/apply/remove do nothing. The host's (the
/// pod's) cgroups stay the outer bound of everything the zygote starts.
pub fn hide_cgroupfs() -> Result<()> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let cgroup_root = Path::new("/sys/fs/cgroup");
    let hide_err = |step: &'static str, errno: nix::Error| SetupError::HideCgroupfs { step, errno };
    // Deepest first; a mount that cannot be detached (e.g. locked) is covered below, which is
    // enough for cgroup2 (libcgroups only looks for v1 hierarchies once the root is a tmpfs).
    let mut cgroup_mounts = mounts_of_type(&["cgroup", "cgroup2"])?;
    deepest_first(&mut cgroup_mounts);
    for m in &cgroup_mounts {
        let _ = umount2(m, MntFlags::MNT_DETACH);
    }
    let _ = umount2(cgroup_root, MntFlags::MNT_DETACH);
    if !cgroup_root.is_dir() {
        return Err(SetupError::NoCgroupRoot.into());
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    mount(
        Some("tmpfs"),
        cgroup_root,
        Some("tmpfs"),
        flags,
        Some("size=4k,mode=555"),
    )
    .map_err(|e| hide_err("mount tmpfs on /sys/fs/cgroup", e))?;
    let left = mounts_of_type(&["cgroup"])?;
    if !left.is_empty() {
        return Err(SetupError::CgroupV1Left(left).into());
    }
    Ok(())
}

/// cgroup v1 controllers the sandbox's limits use: memory (memory+swap), pids, cpu (quota) and
/// devices (the device cgroup; libcontainer also lists a container's processes there).
const V1_CONTROLLERS_USED: &[&str] = &["memory", "pids", "cpu", "devices"];

/// cgroup v1 (hybrid) with writable cgroups. libcgroups' v1 manager puts every container into
/// *every* mounted hierarchy (cpuacct, cpuset, blkio, freezer, ...), although the sandbox sets
/// no limit there: a cgroup created, joined and removed per call and per hierarchy. So in the
/// zygote's own mount namespace only the hierarchies of the limits in use stay mounted.
/// Containers then get cgroups only there; their limits are unchanged, and a hidden hierarchy
/// imposed none. The sweeper has already run in the host's view.
pub fn hide_unused_cgroup_v1() -> Result<()> {
    use nix::mount::{MntFlags, umount2};
    let unused: Vec<PathBuf> = mountinfo()?
        .into_iter()
        .filter(|m| m.fstype == "cgroup")
        .filter(|m| {
            // Super options, e.g. "rw,cpu,cpuacct" or "rw,name=systemd" (a named hierarchy
            // without controllers: libcgroups ignores it, leave it alone).
            let opts: Vec<&str> = m.super_opts.split(',').collect();
            let controllers = opts.iter().any(|o| is_v1_controller(o));
            controllers && !opts.iter().any(|o| V1_CONTROLLERS_USED.contains(o))
        })
        .map(|m| m.mount_point)
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    for mount in unused {
        umount2(&mount, MntFlags::MNT_DETACH)
            .map_err(|errno| SetupError::UnmountCgroupV1 { mount, errno })?;
    }
    Ok(())
}

/// Names of cgroup v1 controllers (as in a hierarchy's mount options).
fn is_v1_controller(opt: &str) -> bool {
    matches!(
        opt,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "devices"
            | "freezer"
            | "net_cls"
            | "net_prio"
            | "blkio"
            | "perf_event"
            | "hugetlb"
            | "pids"
            | "rdma"
            | "misc"
    )
}

/// Sorts mount points so that one below another is unmounted first (longest first).
fn deepest_first(mounts: &mut [PathBuf]) {
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
}
