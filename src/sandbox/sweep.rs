//! Removes containers (state dirs, bundles, cgroups, processes) left behind by crashed
//! zygotes/keepers. Container ids are `tw-<zygote pid>-<seq>`; an id is stale when its zygote
//! is no longer a running `sandbox-zygote` process (other live runners are left alone).

use std::path::{Path, PathBuf};

use libcontainer::container::Container;

use crate::sandbox::cgroup_v2;
use crate::sandbox::names::{CGROUP_PARENT, ZYGOTE_SUBCOMMAND, owner_pid};

fn zygote_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .any(|a| a == ZYGOTE_SUBCOMMAND.as_bytes())
        })
        .unwrap_or(false)
}

/// True if `pid` is alive (not a zombie) and in another pid namespace than ours, i.e. still the
/// container's init and not a host process that reused the pid.
fn is_container_init(pid: nix::unistd::Pid) -> bool {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().chars().next()? != 'Z'))
        .unwrap_or(false);
    alive && ns(&pid.to_string()).is_some_and(|n| Some(n) != ns("self"))
}

/// SIGKILLs `pid` if it is still a container init, through a pidfd opened *before* checking:
/// if the pid was recycled after the check, the signal goes nowhere instead of to a stranger.
fn kill_container_init(pid: nix::unistd::Pid) -> bool {
    let Some(Ok(pidfd)) = rustix::process::Pid::from_raw(pid.as_raw())
        .map(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()))
    else {
        return false;
    };
    if !is_container_init(pid) {
        return false;
    }
    let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
    true
}

/// All cgroup directories that may hold container `id`.
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut out = vec![cgroup_v2::container_dir(id)];
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            out.push(e.path().join(CGROUP_PARENT).join(id));
        }
    }
    out.into_iter().filter(|p| p.is_dir()).collect()
}

/// Force-removes one container: kill its processes, delete via libcontainer, then remove any
/// leftovers by hand (state dir, bundle, cgroup dirs).
pub fn remove_container(state_root: &Path, id: &str) {
    let dir = state_root.join(id);
    if dir.is_dir() {
        if let Ok(mut c) = Container::load(dir.clone())
            && c.delete(true).is_err()
        {
            // Without cgroups (rlimit mode) libcontainer cannot list a running container's
            // processes and the forced delete fails: kill its init instead, which takes the
            // whole pid namespace with it, then delete again.
            if let Some(pid) = c.pid()
                && kill_container_init(pid)
            {
                for _ in 0..200 {
                    if !is_container_init(pid) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let _ = c.delete(true);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    remove_files_and_cgroups(state_root, id, true);
}

/// Removes a container whose init its keeper has reaped. The init of a pid namespace is reaped
/// only after every other process in it is gone, so nothing is left to kill: what remains are
/// the state dir, the bundle and the (empty) cgroups. This does by hand what
/// `Container::delete` does for a stopped container without hooks, minus its cgroup manager:
/// libcgroups' v1 manager parses /proc/self/mountinfo once per controller it knows (12) to
/// find the hierarchies, about 1 ms of CPU per container here, on the path every call pays.
pub fn remove_exited(state_root: &Path, id: &str) {
    let _ = std::fs::remove_dir_all(state_root.join(id));
    remove_files_and_cgroups(state_root, id, false);
}

/// Removes the bundle and the cgroup dirs of container `id`, first killing whatever is still
/// in those cgroups when `kill` is set.
fn remove_files_and_cgroups(state_root: &Path, id: &str, kill: bool) {
    let _ = std::fs::remove_dir_all(state_root.join("bundles").join(id));
    for cg in cgroup_dirs(id) {
        // A process may still be in the cgroup (e.g. keeper died before delete).
        if kill && let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) {
            for p in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // rmdir fails while dying tasks remain; retry briefly (bounded).
        for _ in 0..200 {
            if std::fs::remove_dir(&cg).is_ok() || !cg.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Sweeps everything not owned by a live zygote. Returns the ids removed.
pub fn sweep(state_root: &Path) -> Vec<String> {
    let mut ids = std::collections::BTreeSet::new();
    let mut scan = |dir: &Path| {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = owner_pid(&name)
                    && !zygote_alive(pid)
                {
                    ids.insert(name);
                }
            }
        }
    };
    scan(state_root);
    scan(&state_root.join("bundles"));
    let root = Path::new("/sys/fs/cgroup");
    scan(&root.join(cgroup_v2::per_call_parent()));
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            scan(&e.path().join(CGROUP_PARENT));
        }
    }
    for id in &ids {
        remove_container(state_root, id);
    }
    ids.into_iter().collect()
}
