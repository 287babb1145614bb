//! Host capability detection, done once at zygote startup, so that every limit is enforced by
//! the strongest mechanism available and the choice is reported (never silently degraded).

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sandbox::cgroup_v2;
use crate::sandbox::model::{Enforcement, Mechanism, SandboxSpec};
use crate::sandbox::mountinfo::{MountEntry, mountinfo};
use crate::sandbox::names::{CGROUP_PARENT, SANDBOX_UID};

/// In the initial user namespace (the runner on a host), sandbox ids are taken at or above this
/// id: below it live the host's own users.
pub const USERNS_HOST_BASE: u32 = 1_000_000;
/// Ids mapped into a sandbox's user namespace (its 0..65535) where the runner owns enough.
pub const USERNS_SIZE: u32 = 65_536;

/// The ids a sandbox's user namespace maps: its ids `0..size` are the runner's
/// `uid_base..uid_base+size` (and `gid_base..` for groups), ids the runner owns in its own user
/// namespace. In a pod with `hostUsers: false` that is a part of the pod's 65,536 ids, never
/// its id 0 (the runner itself).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdMap {
    pub uid_base: u32,
    pub gid_base: u32,
    pub size: u32,
}

/// How the container init switches to the tool's root file system.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum RootSwitch {
    /// pivot_root(2), then the old root is unmounted: nothing of the runner's tree remains.
    #[default]
    PivotRoot,
    /// pivot_root(2) is refused (containerd's RuntimeDefault seccomp profile does): the rootfs
    /// is moved over `/` (MS_MOVE) and chroot'ed into, in the container's fresh mount namespace
    /// (see README, "The runner in a pod").
    MoveMount,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum CgroupMode {
    /// Legacy or hybrid hierarchy; `memsw` tells whether swap accounting exists.
    V1 {
        memsw: bool,
    },
    V2,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// The ids sandboxes map (None when no user namespace can be used).
    #[serde(default)]
    pub id_map: Option<IdMap>,
    /// Measured by the probe: whether pivot_root works here.
    #[serde(default)]
    pub root_switch: RootSwitch,
}

impl CgroupMode {
    /// `cgroupV1` or `cgroupV2`, as [`crate::sandbox::Mechanism`] names them.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupMode::V1 { .. } => "cgroupV1",
            CgroupMode::V2 => "cgroupV2",
        }
    }
}

impl HostReport {
    /// `scratch` is an existing directory the probe may mount over in its own mount namespace.
    pub fn detect(force_rlimits: bool, scratch: &Path) -> HostReport {
        let cgroup = detect_cgroup();
        let cgroup_unusable = if force_rlimits {
            Some("disabled by configuration (force_rlimits)".to_string())
        } else {
            match cgroup {
                None => Some("no cgroup hierarchy found under /sys/fs/cgroup".into()),
                Some(CgroupMode::V2) => match cgroup_v2::delegate() {
                    Ok(_) => probe_cgroup_writable(CgroupMode::V2)
                        .err()
                        .map(|why| why.to_string()),
                    Err(e) => Some(e.to_string()),
                },
                Some(mode) => probe_cgroup_writable(mode).err().map(|why| why.to_string()),
            }
        };
        let outer_bound = cgroup_unusable.as_ref().map(|_| own_cgroup_limits(cgroup));
        let id_map = sandbox_id_map();
        let userns = id_map.and_then(|map| probe_sandbox(Some(map), scratch).map(|s| (map, s)));
        let (id_map, userns_unusable, root_switch) = match userns {
            Ok((map, switch)) => (Some(map), None, switch),
            // Without a user namespace, still measure how the root can be switched.
            Err(why) => (
                None,
                Some(format!("{why} ({})", why.reason())),
                probe_sandbox(None, scratch).unwrap_or_default(),
            ),
        };
        HostReport {
            cgroup,
            cgroup_unusable,
            userns_unusable,
            outer_bound,
            id_map,
            root_switch,
        }
    }

    /// The runner-side uid of the sandbox user ([`SANDBOX_UID`]) in a pool
    /// with a user namespace: who must own the files handed to it.
    pub fn sandbox_outer_uid(&self) -> Option<u32> {
        self.id_map.map(|m| m.uid_base + SANDBOX_UID)
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
            if let Err(why) = world_traversable(&p, self.id_map) {
                return Some(why.to_string());
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

/// The memory, pids and cpu limits that bound the engine as a whole, e.g.
/// `memory.max=2147483648 pids.max=max cpu.max=200000 100000`: for each, the nearest limit set
/// on the way from our own cgroup up to the root of the hierarchy we can see (in a pod, the
/// container's or the pod's cgroup), `max` when none is set, `none` without that controller.
fn own_cgroup_limits(mode: Option<CgroupMode>) -> String {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = mountinfo().unwrap_or_default();
    let limit = |controller: &str, file: &str| {
        nearest_limit(&own, &mounts, controller, file).unwrap_or_else(|| "none".into())
    };
    match mode {
        Some(CgroupMode::V2) => format!(
            "memory.max={} pids.max={} cpu.max={}",
            limit("", "memory.max"),
            limit("", "pids.max"),
            limit("", "cpu.max")
        ),
        Some(CgroupMode::V1 { .. }) => format!(
            "memory.limit_in_bytes={} pids.max={} cpu.cfs_quota_us={}",
            limit("memory", "memory.limit_in_bytes"),
            limit("pids", "pids.max"),
            limit("cpu", "cpu.cfs_quota_us"),
        ),
        None => "none (no cgroup hierarchy)".to_string(),
    }
}

/// See [`own_cgroup_limits`]; `controller` is "" for the cgroup v2 hierarchy. None when no
/// hierarchy with that controller is mounted, or no cgroup on the path has `file`.
fn nearest_limit(
    own_cgroups: &str,
    mounts: &[MountEntry],
    controller: &str,
    file: &str,
) -> Option<String> {
    let v2 = controller.is_empty();
    let mount = mounts.iter().find(|m| {
        if v2 {
            m.fstype == "cgroup2"
        } else {
            m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == controller)
        }
    })?;
    // "<id>:<controllers>:<path>"; v2 has the single line "0::<path>".
    let own = own_cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let matches = if v2 {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        matches.then_some(path)
    })?;
    // The mount shows the hierarchy from `root` (a container's bind of its own cgroup, or a
    // cgroup namespace's root): our path below it, or the mount point itself when our path is
    // outside what it shows.
    let below = Path::new(own)
        .strip_prefix(&mount.root)
        .map(Path::to_path_buf)
        .ok()
        .filter(|p| !p.components().any(|c| c == std::path::Component::ParentDir))
        .unwrap_or_default();
    let top = mount.mount_point.clone();
    let mut dir = top.join(below);
    // On cgroup v2 a controller's files exist only where the parent enables it (systemd
    // enables only memory and pids for system.slice): no file anywhere means no controller.
    let mut controlled = false;
    loop {
        if let Ok(v) = std::fs::read_to_string(dir.join(file)) {
            controlled = true;
            let v = v.trim();
            if !unlimited(v) {
                return Some(v.to_string());
            }
        }
        if dir == top || !dir.pop() {
            return controlled.then(|| "max".into());
        }
    }
}

/// `max` (v2), -1 (v1 cpu quota) or the v1 memory "unlimited" page-rounded 2^63-1.
fn unlimited(value: &str) -> bool {
    value == "max"
        || value.starts_with("max ")
        || value == "-1"
        || value.parse::<u64>().is_ok_and(|n| n >= 1 << 62)
}

/// A probe cgroup could not be created where the per-call cgroups will live.
#[derive(Debug, thiserror::Error)]
#[error("cgroup tree not writable ({}): {source}", .path.display())]
pub struct CgroupNotWritable {
    path: PathBuf,
    source: std::io::Error,
}

impl CgroupNotWritable {
    pub fn reason(&self) -> &'static str {
        "CgroupNotWritable"
    }
}

/// Tries to create (and remove) a probe cgroup where the per-call cgroups will live.
fn probe_cgroup_writable(mode: CgroupMode) -> Result<(), CgroupNotWritable> {
    let dirs: Vec<PathBuf> = match mode {
        CgroupMode::V2 => vec![PathBuf::from("/sys/fs/cgroup").join(cgroup_v2::per_call_parent())],
        CgroupMode::V1 { .. } => ["memory", "pids", "cpu"]
            .iter()
            .map(|c| PathBuf::from("/sys/fs/cgroup").join(c).join(CGROUP_PARENT))
            .collect(),
    };
    for d in dirs {
        let probe = d.join(format!("probe-{}", std::process::id()));
        if let Err(source) = std::fs::create_dir_all(&probe) {
            return Err(CgroupNotWritable {
                path: probe,
                source,
            });
        }
        let _ = std::fs::remove_dir(&probe);
    }
    Ok(())
}

/// Why sandboxes get no user namespace here (reported as [`HostReport::userns_unusable`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernsError {
    #[error("/proc/self/{file}: {reason}")]
    IdMapUnreadable { file: &'static str, reason: String },
    #[error("{file}: no ids mapped beside the runner's own ({map})")]
    NoIds { file: &'static str, map: String },
    #[error(
        "{file}: the runner owns {owned} id(s) beside its own ({map}); a sandbox needs {needed} \
         (its root up to uid {})",
        SANDBOX_UID
    )]
    TooFewIds {
        file: &'static str,
        owned: u64,
        needed: u32,
        map: String,
    },
    #[error("writing {file} {text:?} of a new user namespace: {errno}")]
    MapWrite {
        file: &'static str,
        text: String,
        errno: nix::Error,
    },
    #[error("sandbox probe: {}: {errno}", step.describe())]
    Step { step: ProbeStep, errno: nix::Error },
    #[error("sandbox probe: the child died without a report")]
    NoReport,
}

impl UsernsError {
    /// Stable name of the failure, for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            UsernsError::IdMapUnreadable { .. } => "IdMapUnreadable",
            UsernsError::NoIds { .. } => "NoIds",
            UsernsError::TooFewIds { .. } => "TooFewIds",
            UsernsError::MapWrite { .. } => "MapWriteFailed",
            UsernsError::Step { .. } => "ProbeStepFailed",
            UsernsError::NoReport => "ProbeDied",
        }
    }
}

/// The steps of [`probe_sandbox`], in order; the child reports the one that failed by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeStep {
    Pipe,
    Fork,
    UnshareUser,
    MapNotWritten,
    BecomeRoot,
    UnshareMountPid,
    ForkPidNamespaceInit,
    MakePrivate,
    MountTmpfs,
    CreateMountPoints,
    MountProcfs,
    BindDevice,
    Chdir,
    MoveMount,
    Chroot,
}

impl ProbeStep {
    const ALL: [ProbeStep; 15] = [
        ProbeStep::Pipe,
        ProbeStep::Fork,
        ProbeStep::UnshareUser,
        ProbeStep::MapNotWritten,
        ProbeStep::BecomeRoot,
        ProbeStep::UnshareMountPid,
        ProbeStep::ForkPidNamespaceInit,
        ProbeStep::MakePrivate,
        ProbeStep::MountTmpfs,
        ProbeStep::CreateMountPoints,
        ProbeStep::MountProcfs,
        ProbeStep::BindDevice,
        ProbeStep::Chdir,
        ProbeStep::MoveMount,
        ProbeStep::Chroot,
    ];

    fn describe(self) -> &'static str {
        match self {
            ProbeStep::Pipe => "pipe",
            ProbeStep::Fork => "fork",
            ProbeStep::UnshareUser => "unshare(CLONE_NEWUSER)",
            ProbeStep::MapNotWritten => "waiting for the id map",
            ProbeStep::BecomeRoot => "setresgid/setresuid(0) in the new user namespace",
            ProbeStep::UnshareMountPid => "unshare(CLONE_NEWNS|CLONE_NEWPID)",
            ProbeStep::ForkPidNamespaceInit => "fork into the new pid namespace",
            ProbeStep::MakePrivate => "make / rprivate",
            ProbeStep::MountTmpfs => "mount tmpfs",
            ProbeStep::CreateMountPoints => "create mount points in the tmpfs",
            ProbeStep::MountProcfs => {
                "mount a fresh procfs (refused while /proc has masks the kernel locked)"
            }
            ProbeStep::BindDevice => "bind /dev/null",
            ProbeStep::Chdir => "chdir",
            ProbeStep::MoveMount => "pivot_root refused, and move-mount",
            ProbeStep::Chroot => "pivot_root refused, and chroot",
        }
    }
}

/// The ids the runner owns in its own user namespace, from `/proc/self/{uid,gid}_map`, and the
/// 65,536-id (at least 65,535-id) window of them sandboxes map. On a host (the initial
/// namespace maps all 2^32 ids) every runner maps the window at [`USERNS_HOST_BASE`]: the image
/// cache and the per-tool secret folders belong to that mapped root, shared by the host's
/// runners, and per-call cgroups, not the uid, bound each sandbox's processes there. In a pod
/// with `hostUsers: false` (65,536 ids) the window is the pod's ids 1..65535: never its 0 (the
/// runner itself), and the pod's range on the node is already distinct per pod, so two runner
/// pods never share a sandbox uid or its process budget.
pub fn sandbox_id_map() -> Result<IdMap, UsernsError> {
    let read = |file: &'static str| {
        std::fs::read_to_string(format!("/proc/self/{file}")).map_err(|e| {
            UsernsError::IdMapUnreadable {
                file,
                reason: e.to_string(),
            }
        })
    };
    let uid = id_window("uid_map", &read("uid_map")?)?;
    let gid = id_window("gid_map", &read("gid_map")?)?;
    Ok(IdMap {
        uid_base: uid.0,
        gid_base: gid.0,
        size: uid.1.min(gid.1),
    })
}

/// (first id, size) of the sandbox window in one id map (`inside outside count` lines). Pure.
fn id_window(file: &'static str, map: &str) -> Result<(u32, u32), UsernsError> {
    let needed = SANDBOX_UID + 1;
    let lines: Vec<(u64, u64)> = map
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 3).then(|| (f[0], f[0] + f[2]))
        })
        .collect();
    let initial = lines
        .iter()
        .any(|&(lo, hi)| lo == 0 && hi == u64::from(u32::MAX));
    let floor = if initial {
        u64::from(USERNS_HOST_BASE)
    } else {
        1
    };
    let (lo, hi) = lines
        .iter()
        .map(|&(lo, hi)| (lo.max(floor), hi))
        .filter(|(lo, hi)| hi > lo)
        .max_by_key(|(lo, hi)| hi - lo)
        .ok_or_else(|| UsernsError::NoIds {
            file,
            map: map.trim().to_string(),
        })?;
    let size = (hi - lo).min(u64::from(USERNS_SIZE));
    if size < u64::from(needed) {
        return Err(UsernsError::TooFewIds {
            file,
            owned: hi - lo,
            needed,
            map: map.trim().to_string(),
        });
    }
    Ok((lo as u32, size as u32))
}

/// What the probe child reports: how the root could be switched, or the step that failed.
type ProbeReport = Result<RootSwitch, (ProbeStep, nix::Error)>;

/// Encodes a report in 6 bytes for the pipe: a tag (0 pivot_root, 1 move-mount, 2 failed),
/// the failed step's number and its errno.
fn encode_report(report: ProbeReport) -> [u8; 6] {
    let (tag, step, errno) = match report {
        Ok(RootSwitch::PivotRoot) => (0, 0, 0),
        Ok(RootSwitch::MoveMount) => (1, 0, 0),
        Err((step, e)) => {
            let index = ProbeStep::ALL.iter().position(|s| *s == step).unwrap_or(0);
            (2, index as u8, e as i32)
        }
    };
    let e = errno.to_ne_bytes();
    [tag, step, e[0], e[1], e[2], e[3]]
}

fn decode_report(bytes: &[u8]) -> Option<ProbeReport> {
    let (&tag, rest) = bytes.split_first()?;
    match tag {
        0 => Some(Ok(RootSwitch::PivotRoot)),
        1 => Some(Ok(RootSwitch::MoveMount)),
        2 => {
            let step = *ProbeStep::ALL.get(usize::from(*rest.first()?))?;
            let errno = i32::from_ne_bytes(rest.get(1..5)?.try_into().ok()?);
            Some(Err((step, nix::Error::from_raw(errno))))
        }
        _ => None,
    }
}

/// Builds what a sandbox is built from, for real, in a forked child (the zygote is
/// single-threaded here): with `map`, a user namespace with that id map written from here as
/// libcontainer will (`setgroups` denied first when the runner is itself in a user namespace);
/// then mount and pid namespaces, and in them a tmpfs, a fresh procfs (refused under a masked
/// `/proc`: see `zygote_mounts::unmask_proc`), a device bound from `/dev`, and the root switch:
/// pivot_root, or else a move-mount and chroot. Returns how the root can be switched, or the
/// step that failed and why.
fn probe_sandbox(map: Option<IdMap>, scratch: &Path) -> Result<RootSwitch, UsernsError> {
    use nix::unistd::{ForkResult, fork, pipe2, read, write};
    let failed = |step, errno| UsernsError::Step { step, errno };
    let pipe = || pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed(ProbeStep::Pipe, e));
    let (go_r, go_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let (report_r, report_w) = pipe()?;
    // SAFETY: the zygote is single-threaded here, so the child's copy of memory holds no lock
    // another thread took; the child only makes system calls and leaves with `_exit`.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop((go_w, ready_r, report_r));
            let report = probe_child(map, ready_w, &go_r, scratch);
            let _ = write(&report_w, &encode_report(report));
            // SAFETY: `_exit` takes a plain int and never returns; it runs no destructor or atexit
            // handler, so the forked child flushes nothing it shares with its parent.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(failed(ProbeStep::Fork, e)),
    };
    drop((go_r, ready_w, report_w));
    // The maps are the new namespace's only once the child has unshared (or has given up: EOF).
    let mut byte = [0u8; 1];
    let unshared = matches!(read(ready_r.as_raw_fd(), &mut byte), Ok(1));
    let mapped = match map {
        Some(map) if unshared => write_probe_maps(child.as_raw(), map),
        _ => Ok(()),
    };
    // The child goes on (or, on a failed map, reads EOF and stops) once `go_w` is closed.
    if mapped.is_ok() {
        let _ = write(&go_w, b"g");
    }
    drop(go_w);
    let mut report = [0u8; 6];
    let mut got = 0;
    while got < report.len() {
        match read(report_r.as_raw_fd(), &mut report[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let _ = nix::sys::wait::waitpid(child, None);
    mapped?;
    match decode_report(&report[..got]) {
        Some(Ok(switch)) => Ok(switch),
        Some(Err((step, errno))) => Err(failed(step, errno)),
        None => Err(UsernsError::NoReport),
    }
}

fn write_probe_maps(pid: i32, map: IdMap) -> Result<(), UsernsError> {
    let write = |file: &'static str, text: String| {
        std::fs::write(format!("/proc/{pid}/{file}"), &text).map_err(|e| UsernsError::MapWrite {
            file,
            text,
            errno: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
        })
    };
    // As libcontainer does when the runner is itself in a user namespace (CVE-2014-8989).
    if in_user_namespace() {
        write("setgroups", "deny".into())?;
    }
    write("uid_map", format!("0 {} {}", map.uid_base, map.size))?;
    write("gid_map", format!("0 {} {}", map.gid_base, map.size))
}

/// True when the runner runs in a user namespace other than the initial one (a pod with
/// `hostUsers: false`, rootless): libcontainer's "rootless" test.
pub fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| !m.contains("4294967295"))
}

/// The probe child's steps (see [`probe_sandbox`]).
fn probe_child(
    map: Option<IdMap>,
    ready: std::os::fd::OwnedFd,
    go: &std::os::fd::OwnedFd,
    scratch: &Path,
) -> ProbeReport {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    use nix::sched::{CloneFlags, unshare};
    let io = |e: std::io::Error| nix::Error::from_raw(e.raw_os_error().unwrap_or(0));
    if map.is_some() {
        unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| (ProbeStep::UnshareUser, e))?;
    }
    let _ = nix::unistd::write(&ready, b"u");
    drop(ready);
    let mut b = [0u8; 1];
    if !matches!(nix::unistd::read(go.as_raw_fd(), &mut b), Ok(1)) {
        return Err((ProbeStep::MapNotWritten, nix::Error::EPIPE));
    }
    if map.is_some() {
        let root = nix::unistd::Uid::from_raw(0);
        let group = nix::unistd::Gid::from_raw(0);
        nix::unistd::setresgid(group, group, group).map_err(|e| (ProbeStep::BecomeRoot, e))?;
        nix::unistd::setresuid(root, root, root).map_err(|e| (ProbeStep::BecomeRoot, e))?;
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)
        .map_err(|e| (ProbeStep::UnshareMountPid, e))?;
    // The procfs of a pid namespace can only be mounted from inside it: fork its init.
    // SAFETY: the probe child is still single-threaded (see `probe_sandbox`).
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = nix::sys::wait::waitpid(child, None);
            // The grandchild wrote the report; nothing more to say.
            // SAFETY: `_exit` takes a plain int and never returns; it runs no destructor or atexit
            // handler, so the forked child flushes nothing it shares with its parent.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(e) => return Err((ProbeStep::ForkPidNamespaceInit, e)),
    }
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| (ProbeStep::MakePrivate, e))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let tmpfs = Some("size=64k,mode=755");
    mount(Some("tmpfs"), scratch, Some("tmpfs"), flags, tmpfs)
        .map_err(|e| (ProbeStep::MountTmpfs, e))?;
    let at = |p: &str| scratch.join(p);
    let create = || -> std::io::Result<()> {
        std::fs::create_dir(at("proc"))?;
        std::fs::create_dir(at("old"))?;
        std::fs::write(at("null"), b"")
    };
    create().map_err(|e| (ProbeStep::CreateMountPoints, io(e)))?;
    let proc_flags = flags | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &at("proc"), Some("proc"), proc_flags, none)
        .map_err(|e| (ProbeStep::MountProcfs, e))?;
    mount(Some("/dev/null"), &at("null"), none, MsFlags::MS_BIND, none)
        .map_err(|e| (ProbeStep::BindDevice, e))?;
    std::env::set_current_dir(scratch).map_err(|e| (ProbeStep::Chdir, io(e)))?;
    if nix::unistd::pivot_root(".", "old").is_ok() {
        let _ = umount2("/old", MntFlags::MNT_DETACH);
        return Ok(RootSwitch::PivotRoot);
    }
    mount(Some("."), "/", none, MsFlags::MS_MOVE, none).map_err(|e| (ProbeStep::MoveMount, e))?;
    nix::unistd::chroot(".").map_err(|e| (ProbeStep::Chroot, e))?;
    Ok(RootSwitch::MoveMount)
}

/// Every folder on the way to `path` can be searched by the user-namespace
/// root (`ids`, as the host sees it): by everyone (`o+x`), by the mapped root's
/// group (an image cache entry, `0710`), or by the mapped root as its owner (a
/// private per-tool folder, see `write_secret_files`).
fn world_traversable(path: &Path, ids: Option<IdMap>) -> Result<(), UnreachablePath> {
    let inaccessible = |path: &Path| {
        let path = path.to_path_buf();
        |source| UnreachablePath::Inaccessible { path, source }
    };
    let canon = std::fs::canonicalize(path).map_err(inaccessible(path))?;
    for anc in canon.ancestors() {
        let meta = std::fs::metadata(anc).map_err(inaccessible(anc))?;
        let mode = meta.permissions().mode();
        // The image cache's entries are `0710` with the mapped root's group; per-tool
        // secret folders belong to the mapped root.
        let group_traversable = ids.is_some_and(|i| meta.gid() == i.gid_base) && mode & 0o010 != 0;
        let mapped_root_owns = ids.is_some_and(|i| meta.uid() == i.uid_base) && mode & 0o100 != 0;
        if meta.is_dir() && mode & 0o001 == 0 && !group_traversable && !mapped_root_owns {
            return Err(UnreachablePath::NotTraversable {
                path: anc.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// A path the user-namespace root of a sandbox could not reach.
#[derive(Debug, thiserror::Error)]
pub enum UnreachablePath {
    #[error("{}: {source}", .path.display())]
    Inaccessible {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is not world-traversable (o+x), the user-namespace root could not reach it",
        .path.display()
    )]
    NotTraversable { path: PathBuf },
}

impl UnreachablePath {
    pub fn reason(&self) -> &'static str {
        match self {
            UnreachablePath::Inaccessible { .. } => "PathInaccessible",
            UnreachablePath::NotTraversable { .. } => "PathNotTraversable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_stay_inside_what_the_runner_owns() {
        let window = |map: &str| id_window("uid_map", map);
        // A host: the window of 65,536 at 1,000,000.
        let host = "         0          0 4294967295\n";
        assert_eq!(window(host), Ok((USERNS_HOST_BASE, USERNS_SIZE)));
        // A pod with hostUsers: false: its ids 1..65535, never 0 (the runner), never ids of
        // the node.
        let pod = "         0    1375731712      65536\n";
        assert_eq!(window(pod), Ok((1, 65_535)));
        // A larger range: ids start after the runner's own 0.
        assert_eq!(window("0 300000 200000\n"), Ok((1, USERNS_SIZE)));
        // Too few ids to map the sandbox user (65534): a clear error, no map.
        let err = window("0 300000 1000\n").unwrap_err();
        assert_eq!(err.reason(), "TooFewIds");
        let text = err.to_string();
        assert!(
            text.contains("owns 999 id(s)") && text.contains("needs 65535"),
            "{text}"
        );
        assert_eq!(window("0 1000 1\n").unwrap_err().reason(), "NoIds");
        assert_eq!(window("").unwrap_err().reason(), "NoIds");
    }

    #[test]
    fn probe_reports_survive_the_pipe() {
        for report in [
            Ok(RootSwitch::PivotRoot),
            Ok(RootSwitch::MoveMount),
            Err((ProbeStep::MountProcfs, nix::Error::EPERM)),
            Err((ProbeStep::Chroot, nix::Error::EACCES)),
        ] {
            assert_eq!(decode_report(&encode_report(report)), Some(report));
        }
        assert_eq!(decode_report(&[]), None);
        assert_eq!(decode_report(&[2, 200, 0, 0, 0, 0]), None);
        let e = UsernsError::Step {
            step: ProbeStep::MountProcfs,
            errno: nix::Error::EPERM,
        };
        assert!(e.to_string().contains("mount a fresh procfs"), "{e}");
    }

    #[test]
    fn outer_bound_is_the_nearest_limit_up_to_the_visible_root() {
        let root = tempfile::tempdir().unwrap();
        let top = root.path().join("memory");
        let pod = top.join("kubepods/pod1");
        let own = pod.join("ctr");
        std::fs::create_dir_all(&own).unwrap();
        let unlimited = "9223372036854771712\n";
        std::fs::write(own.join("memory.limit_in_bytes"), unlimited).unwrap();
        std::fs::write(pod.join("memory.limit_in_bytes"), "268435456\n").unwrap();
        std::fs::write(top.join("memory.limit_in_bytes"), unlimited).unwrap();
        let mount = |root: &str| MountEntry {
            root: root.into(),
            mount_point: top.clone(),
            fstype: "cgroup".into(),
            super_opts: "rw,memory".into(),
        };
        let own_cgroups = "4:memory:/kubepods/pod1/ctr\n";
        let limit =
            |mounts: &[_]| nearest_limit(own_cgroups, mounts, "memory", "memory.limit_in_bytes");
        assert_eq!(limit(&[mount("/")]).as_deref(), Some("268435456"));
        // The container sees only its own cgroup (a bind of it): no ancestor to read, so "max".
        std::fs::write(top.join("memory.limit_in_bytes"), unlimited).unwrap();
        let own_only = MountEntry {
            mount_point: own.clone(),
            ..mount("/kubepods/pod1/ctr")
        };
        assert_eq!(limit(&[own_only]).as_deref(), Some("max"));
        // No hierarchy with the controller: None ("none" in the report).
        assert_eq!(
            nearest_limit(own_cgroups, &[], "memory", "memory.limit_in_bytes"),
            None
        );
        // A path outside the mount's root (a cgroup namespace's "/.."): read from its top.
        let escaped = "4:memory:/../other\n";
        let got = nearest_limit(escaped, &[mount("/")], "memory", "memory.limit_in_bytes");
        assert_eq!(got.as_deref(), Some("max"));
    }

    #[test]
    fn outer_bound_without_the_controller_on_the_path_is_none() {
        // cgroup v2 under systemd: the cpu controller is enabled at the root only, so neither
        // the unit nor system.slice has cpu.max; memory.max is set on the slice.
        let root = tempfile::tempdir().unwrap();
        let top = root.path().to_path_buf();
        let unit = top.join("system.slice/toolwarden.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::write(top.join("system.slice/memory.max"), "1073741824\n").unwrap();
        std::fs::write(unit.join("memory.max"), "max\n").unwrap();
        std::fs::write(unit.join("pids.max"), "max\n").unwrap();
        let mounts = [MountEntry {
            root: "/".into(),
            mount_point: top,
            fstype: "cgroup2".into(),
            super_opts: "rw".into(),
        }];
        let own = "0::/system.slice/toolwarden.service\n";
        let limit = |file| nearest_limit(own, &mounts, "", file);
        assert_eq!(limit("memory.max").as_deref(), Some("1073741824"));
        assert_eq!(limit("pids.max").as_deref(), Some("max"));
        assert_eq!(limit("cpu.max"), None);
    }
}
