//! Builds the OCI runtime spec (config.json) for a pool. Written as JSON in the OCI format so
//! it reads like runc's/Docker's defaults it is derived from.

use serde_json::{Value, json};

use crate::sandbox::detect::{CgroupMode, HostReport};
use crate::sandbox::error::SpecError;
use crate::sandbox::model::{CALL_FILES_TMPFS_BYTES, Limits, MAX_CALL_FILES, SandboxSpec};
use crate::sandbox::names::SANDBOX_UID;

/// Placeholder argv: the real argv arrives late through the control pipe.
pub const PLACEHOLDER_ARG: &str = "/toolwarden-late-exec";
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// runc's default masked paths.
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
];
const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// (path, major, minor): the only devices in the sandbox. libcontainer always adds /dev/full
/// too; the keeper unlinks it before start (`keeper::remove_extra_devices`) and the device
/// cgroup (v1) does not allow it.
const DEVICES: &[(&str, i64, i64)] = &[
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// Returns the spec as JSON; `cgroups_path` is filled in per container.
pub fn build(spec: &SandboxSpec, host: &HostReport, userns: bool) -> Result<Value, SpecError> {
    let l = &spec.limits;
    if !spec.rootfs.is_absolute() {
        return Err(SpecError::RelativeRootfs);
    }
    let cgroups = host.cgroup_unusable.is_none();
    let tmp_opts = |extra: &[&str]| {
        let mut v: Vec<String> = vec!["nosuid".into(), "nodev".into(), "mode=1777".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(format!("size={}", l.tmp_size_bytes.max(4096)));
        v
    };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": tmp_opts(&["noexec"])}),
        // No /sys: a tool has no use for the kernel's device tree, and a sysfs is kernel attack
        // surface and information (hardware, the runner's network devices when bound from the
        // runner). Leaving it out also works where a new sysfs cannot be mounted at all (a pod:
        // the kernel refuses one below a read-only /sys with masked paths). /sys stays the
        // image's empty, read-only directory.
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": tmp_opts(&[])}),
    ];
    for m in &spec.mounts {
        if !m.destination.is_absolute() || !m.source.is_absolute() {
            return Err(SpecError::RelativeBindMount);
        }
        let rw = if m.read_only { "ro" } else { "rw" };
        mounts.push(
            json!({"destination": m.destination, "type": "bind", "source": m.source,
                           "options": ["rbind", rw, "nosuid", "nodev"]}),
        );
    }
    // Last, so no bind mount covers it: each container's own, empty folder for its call's
    // files (a Kubernetes token), owned by the sandbox's user (who writes them, from the
    // container init) and nobody else's to read.
    if let Some(dir) = &spec.call_files_dir {
        if !dir.is_absolute() {
            return Err(SpecError::RelativeCallFilesDir);
        }
        mounts.push(
            json!({"destination": dir, "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "noexec", "mode=0700",
                        format!("uid={SANDBOX_UID}"), format!("gid={SANDBOX_UID}"),
                        format!("size={CALL_FILES_TMPFS_BYTES}"),
                        format!("nr_inodes={}", MAX_CALL_FILES + 1)]}),
        );
    }

    let mut rlimits = vec![
        json!({"type": "RLIMIT_NOFILE", "hard": l.open_files, "soft": l.open_files}),
        json!({"type": "RLIMIT_CORE", "hard": 0, "soft": 0}),
        json!({"type": "RLIMIT_FSIZE", "hard": l.file_size_bytes, "soft": l.file_size_bytes}),
    ];
    let mut resources = json!({
        "devices": device_rules(),
    });
    if cgroups {
        if let Some(mem) = l.memory_bytes {
            resources["memory"] = match host.cgroup {
                // Without swap accounting the limit can only cover memory (hosts without it
                // typically have no swap either).
                Some(CgroupMode::V1 { memsw: false }) => json!({"limit": mem}),
                _ => json!({"limit": mem, "swap": mem}),
            };
            if host.cgroup == Some(CgroupMode::V2) {
                // cgroup v2 keeps swap apart from memory: the spec's memory+swap equal to the
                // limit means `memory.swap.max = 0`, which libcgroups 0.7 skips writing (it
                // treats 0 as unset), leaving swap unlimited on nodes with swap. Written here
                // explicitly; libcgroups applies `unified` after the memory controller.
                resources["unified"] = json!({"memory.swap.max": "0"});
            }
        }
        resources["pids"] = json!({"limit": l.pids});
        if let Some(mc) = l.cpu_millicores {
            resources["cpu"] = json!({"quota": u64::from(mc) * 100, "period": 100_000});
        }
    } else {
        // Fallback: per-process rlimits (weaker: NPROC counts per uid, shared by all sandboxes
        // without a user namespace; AS is virtual memory). RLIMIT_AS is not in the spec:
        // libcontainer would set it in its intermediate process, so the parked init, a copy of
        // the zygote (~63 MiB of address space here), would run our init code under it and every
        // allocation before execve could fail. The container init sets it just before execve instead
        // (`address_space_limit`), so it bounds the tool's fresh address space only.
        rlimits.push(json!({"type": "RLIMIT_NPROC", "hard": l.pids, "soft": l.pids}));
        let cpu_secs = cpu_seconds(l);
        // Soft < hard: a process gets SIGXCPU (its signal names the cause), then SIGKILL one
        // CPU second later. The tool itself, pid 1 of its namespace, never sees the SIGXCPU
        // (the kernel drops default-action signals to a namespace init): for it, the SIGKILL
        // at the hard limit, before the timeout when the quota is below one core.
        rlimits.push(json!({"type": "RLIMIT_CPU", "hard": cpu_secs + 1, "soft": cpu_secs}));
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "mount"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "network"}),
        json!({"type": "cgroup"}),
    ];
    let mut linux = json!({
        "namespaces": [],
        "devices": DEVICES.iter().map(|(p, maj, min)| json!({
            "path": p, "type": "c", "major": maj, "minor": min, "fileMode": 0o666, "uid": 0, "gid": 0
        })).collect::<Vec<_>>(),
        "resources": resources,
        "maskedPaths": MASKED,
        "readonlyPaths": READONLY,
    });
    if !cgroups {
        // No cgroup at all: libcontainer is not asked to apply any resource (the zygote also
        // hides the cgroup file system from it, see `zygote_mounts::hide_cgroupfs`); devices are then
        // limited by the explicit device list only.
        if let Some(obj) = linux.as_object_mut() {
            obj.remove("resources");
        }
    }
    if userns {
        let ids = host.id_map.ok_or(SpecError::UserNamespaceWithoutIdMap)?;
        namespaces.push(json!({"type": "user"}));
        linux["uidMappings"] =
            json!([{"containerID": 0, "hostID": ids.uid_base, "size": ids.size}]);
        linux["gidMappings"] =
            json!([{"containerID": 0, "hostID": ids.gid_base, "size": ids.size}]);
    }
    linux["namespaces"] = Value::Array(namespaces);

    let no_caps: Vec<String> = Vec::new();
    Ok(json!({
        "ociVersion": "1.0.2",
        "root": {"path": spec.rootfs, "readonly": true},
        "hostname": "sandbox",
        "mounts": mounts,
        "process": {
            "terminal": false,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID, "additionalGids": []},
            "args": [PLACEHOLDER_ARG],
            "env": [format!("PATH={DEFAULT_PATH}")],
            "cwd": "/",
            "capabilities": {"bounding": no_caps, "effective": no_caps, "inheritable": no_caps,
                             "permitted": no_caps, "ambient": no_caps},
            "rlimits": rlimits,
            "noNewPrivileges": true,
        },
        "linux": linux,
    }))
}

/// RLIMIT_AS for the tool, set by the container init just before execve (None = not limited this way).
pub fn address_space_limit(limits: &Limits, host: &HostReport) -> Option<u64> {
    // Only without cgroups (the memory cgroup enforces the limit otherwise).
    host.cgroup_unusable.as_ref().and(limits.memory_bytes)
}

/// CPU seconds per process in rlimit mode: what the CPU quota allows over the whole timeout
/// (at least 1 s, the rlimit's granularity). A budget that does not end before the timeout
/// gets one more second, so the timeout (the clearer outcome, answered 504) always comes
/// first for a process within its quota: with the budget equal to the timeout (one core, the
/// default) the two raced and a busy loop sometimes died of SIGXCPU (exit 152) instead.
/// Without a quota, the timeout plus 1 s is a backstop.
pub fn cpu_seconds(l: &Limits) -> u64 {
    let timeout_ms = l.timeout.as_millis() as u64;
    let Some(mc) = l.cpu_millicores else {
        return timeout_ms.div_ceil(1000) + 1;
    };
    let budget = (timeout_ms * u64::from(mc) / 1000).div_ceil(1000).max(1);
    match budget * 1000 < timeout_ms {
        true => budget,
        false => budget + 1,
    }
}

fn device_rules() -> Vec<Value> {
    let mut v = vec![json!({"allow": false, "access": "rwm"})];
    v.extend(DEVICES.iter().map(
        |(_, maj, min)| json!({"allow": true, "type": "c", "major": maj, "minor": min, "access": "rwm"}),
    ));
    v
}

#[cfg(test)]
mod cpu_budget_tests {
    use super::*;
    use std::time::Duration;

    fn budget(timeout_ms: u64, millicores: Option<u32>) -> u64 {
        cpu_seconds(&Limits {
            timeout: Duration::from_millis(timeout_ms),
            cpu_millicores: millicores,
            ..Limits::default()
        })
    }

    #[test]
    fn a_quota_below_the_timeout_is_the_budget() {
        // 4 s at half a core: 2 CPU seconds, spent before the wall clock runs out.
        assert_eq!(budget(4000, Some(500)), 2);
        assert_eq!(budget(10_000, Some(100)), 1);
    }

    #[test]
    fn a_budget_that_reaches_the_timeout_leaves_the_timeout_first() {
        // One core for 1 s used to be exactly 1 CPU second: a race with the timeout.
        assert_eq!(budget(1000, Some(1000)), 2);
        // Rounded up to the rlimit's granularity, half a core for 1 s is 1 s too.
        assert_eq!(budget(1000, Some(500)), 2);
        assert_eq!(budget(1500, Some(1000)), 3);
        assert_eq!(budget(1000, Some(2000)), 3);
        assert_eq!(budget(1000, None), 2);
        assert_eq!(budget(1500, None), 3);
    }
}

/// The OCI spec is the sandbox's security contract: these tests build it from fixed inputs for
/// each enforcement mode and compare it, byte for byte, with the checked-in files under
/// `tests/golden/oci_spec/`, so any change to it shows up in review. `BLESS=1 cargo test --lib
/// sandbox::oci_spec` rewrites them after an intended change.
#[cfg(test)]
mod golden_tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::sandbox::detect::{IdMap, RootSwitch};
    use crate::sandbox::model::BindMount;

    fn sandbox_spec() -> SandboxSpec {
        SandboxSpec {
            rootfs: PathBuf::from("/var/cache/toolwarden/rootfs/example"),
            mounts: vec![
                BindMount {
                    source: PathBuf::from("/var/lib/toolwarden/secrets/example"),
                    destination: PathBuf::from("/run/secrets"),
                    read_only: true,
                },
                BindMount {
                    source: PathBuf::from("/var/lib/toolwarden/volumes/workspace"),
                    destination: PathBuf::from("/workspace"),
                    read_only: false,
                },
            ],
            limits: Limits {
                timeout: Duration::from_secs(10),
                memory_bytes: Some(256 << 20),
                cpu_millicores: Some(500),
                pids: 64,
                max_output_bytes: 1 << 20,
                tmp_size_bytes: 64 << 20,
                file_size_bytes: 16 << 20,
                open_files: 1024,
            },
            warm_pool: 2,
            call_files_dir: None,
        }
    }

    /// A host as detection would report it, without probing anything.
    fn host(cgroup: Option<CgroupMode>, cgroup_unusable: Option<&str>) -> HostReport {
        HostReport {
            cgroup,
            cgroup_unusable: cgroup_unusable.map(str::to_string),
            userns_unusable: None,
            outer_bound: cgroup_unusable.map(|_| "memory.max=max pids.max=max".to_string()),
            id_map: Some(IdMap {
                uid_base: 1_000_000,
                gid_base: 1_000_000,
                size: 65_536,
            }),
            root_switch: RootSwitch::PivotRoot,
        }
    }

    fn check(name: &str, host: &HostReport, userns: bool) {
        check_spec(name, &sandbox_spec(), host, userns)
    }

    fn check_spec(name: &str, sandbox: &SandboxSpec, host: &HostReport, userns: bool) {
        let spec = build(sandbox, host, userns).unwrap();
        // What libcontainer is given must be a valid OCI spec, too.
        serde_json::from_value::<libcontainer::oci_spec::runtime::Spec>(spec.clone()).unwrap();
        let built = serde_json::to_string_pretty(&spec).unwrap() + "\n";
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/oci_spec")
            .join(format!("{name}.json"));
        if std::env::var_os("BLESS").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, &built).unwrap();
            return;
        }
        let golden = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!("{}: {e} (BLESS=1 writes it)", file.display());
        });
        if built != golden {
            let first = built
                .lines()
                .zip(golden.lines())
                .position(|(b, g)| b != g)
                .unwrap_or(built.lines().count().min(golden.lines().count()));
            panic!(
                "the OCI spec for {name} changed from {} at line {}:\n  built:  {:?}\n  golden: {:?}\n\
                 if intended, rewrite it with BLESS=1 and let review see the diff",
                file.display(),
                first + 1,
                built.lines().nth(first),
                golden.lines().nth(first),
            );
        }
    }

    #[test]
    fn cgroup_v1_with_user_namespace() {
        check(
            "cgroup_v1",
            &host(Some(CgroupMode::V1 { memsw: true }), None),
            true,
        );
    }

    #[test]
    fn cgroup_v1_without_swap_accounting() {
        check(
            "cgroup_v1_no_memsw",
            &host(Some(CgroupMode::V1 { memsw: false }), None),
            true,
        );
    }

    #[test]
    fn cgroup_v2_with_user_namespace() {
        check("cgroup_v2", &host(Some(CgroupMode::V2), None), true);
    }

    /// A tool with its own Kubernetes identity: one more mount, a tmpfs of the sandbox's
    /// user at the service account folder; everything else as for any tool.
    #[test]
    fn a_tool_with_a_kubernetes_identity_gets_its_call_files_tmpfs() {
        let spec = SandboxSpec {
            call_files_dir: Some(PathBuf::from(crate::sandbox::model::SERVICE_ACCOUNT_DIR)),
            ..sandbox_spec()
        };
        let host = host(Some(CgroupMode::V2), None);
        check_spec("cgroup_v2_call_files", &spec, &host, true);
        let with = build(&spec, &host, true).unwrap();
        let mut without = build(&sandbox_spec(), &host, true).unwrap();
        without["mounts"]
            .as_array_mut()
            .unwrap()
            .push(with["mounts"].as_array().unwrap().last().unwrap().clone());
        assert_eq!(with, without);
    }

    #[test]
    fn rlimits_without_cgroups_or_user_namespace() {
        let host = host(
            Some(CgroupMode::V2),
            Some(
                "cgroup tree not writable (/sys/fs/cgroup/toolwarden/probe-1): Read-only file system (os error 30)",
            ),
        );
        check("rlimit", &host, false);
        // RLIMIT_AS is not in the spec: the container init sets it just before execve.
        assert_eq!(
            address_space_limit(&sandbox_spec().limits, &host),
            Some(256 << 20)
        );
    }

    #[test]
    fn bad_specs_are_refused_with_their_reason() {
        let host = host(Some(CgroupMode::V2), None);
        let mut relative = sandbox_spec();
        relative.rootfs = PathBuf::from("rootfs");
        let err = build(&relative, &host, true).unwrap_err();
        assert_eq!(err.reason(), "RootfsNotAbsolute");
        let mut bind = sandbox_spec();
        bind.mounts[0].destination = PathBuf::from("run/secrets");
        assert_eq!(
            build(&bind, &host, true).unwrap_err().reason(),
            "BindMountNotAbsolute"
        );
        let mut call_files = sandbox_spec();
        call_files.call_files_dir = Some(PathBuf::from("var/run/secrets"));
        assert_eq!(
            build(&call_files, &host, true).unwrap_err().reason(),
            "CallFilesDirNotAbsolute"
        );
        let no_ids = HostReport {
            id_map: None,
            ..host
        };
        assert_eq!(
            build(&sandbox_spec(), &no_ids, true).unwrap_err().reason(),
            "UserNamespaceWithoutIdMap"
        );
    }
}
