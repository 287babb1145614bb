//! The names and ids the engine gives to what it creates on the host: the zygote's subcommand,
//! container ids, the per-call cgroup parent and the sandbox user. The sweeper recognises a
//! crashed engine's leftovers by these names, so they live in one place.

use std::path::{Path, PathBuf};

/// Hidden subcommand under which the runner binary acts as the zygote.
pub const ZYGOTE_SUBCOMMAND: &str = "sandbox-zygote";

/// Parent of all per-call cgroups: relative to each hierarchy root on cgroup v1, below the
/// engine's own cgroup on cgroup v2 (see [`crate::sandbox::cgroup_v2`]).
pub const CGROUP_PARENT: &str = "toolwarden";

/// The uid and gid the tool runs as inside the sandbox.
pub const SANDBOX_UID: u32 = 65534;

/// Container ids are `tw-<zygote pid>-<seq>`.
pub fn container_id(zygote_pid: u32, seq: u64) -> String {
    format!("tw-{zygote_pid}-{seq}")
}

/// The directory (under the state root) that holds zygote `zygote_pid`'s container states and
/// bundles when it keeps them on its private tmpfs. Named like its containers so that the
/// sweeper removes it once that zygote is gone.
pub fn zygote_dir(state_root: &Path, zygote_pid: u32) -> PathBuf {
    state_root.join(format!("tw-{zygote_pid}"))
}

/// The zygote that created a container (or owns a [`zygote_dir`]), from its name.
pub fn owner_pid(id: &str) -> Option<u32> {
    id.strip_prefix("tw-")?.split('-').next()?.parse().ok()
}
