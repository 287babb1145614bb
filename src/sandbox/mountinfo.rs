//! The mounts of our mount namespace, from `/proc/self/mountinfo`.

use crate::sandbox::error::Result;

pub struct MountEntry {
    /// The path of the file system shown at the mount point (a bind's source).
    pub root: String,
    pub mount_point: String,
    pub fstype: String,
    pub super_opts: String,
}

/// Our mount namespace's mounts, from /proc/self/mountinfo.
pub fn mountinfo() -> Result<Vec<MountEntry>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            // Fields: id parent dev root mountpoint opts [optional...] - fstype source superopts
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountEntry {
                root: f.get(3)?.to_string(),
                mount_point: f.get(4)?.to_string(),
                fstype: f.get(sep + 1)?.to_string(),
                super_opts: f.get(sep + 3).unwrap_or(&"").to_string(),
            })
        })
        .collect())
}

/// Mount points of the file systems of these types in our mount namespace.
pub fn mounts_of_type(types: &[&str]) -> Result<Vec<String>> {
    Ok(mountinfo()?
        .into_iter()
        .filter(|m| types.contains(&m.fstype.as_str()))
        .map(|m| m.mount_point)
        .collect())
}
