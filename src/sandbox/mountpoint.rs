//! Creates the mount targets a container needs inside its root file system
//! before it is built. libcontainer creates missing targets from inside the
//! container, where a user-namespaced root (a host nobody) cannot write to the
//! root-owned rootfs; the zygote runs as real root and does it up front.

use std::io;
use std::path::{Component, Path};

use crate::sandbox::model::SandboxSpec;

/// Mount points of every container, besides the spec's bind mounts.
const STANDARD: &[&str] = &["/proc", "/dev", "/tmp"];

/// Creates each missing target of `spec` (a folder, or an empty file when the
/// bind source is a file). A path that crosses a symlink is left to
/// libcontainer, which resolves it inside the rootfs: nothing is created
/// through a symlink here, so nothing can land outside the rootfs.
pub fn ensure(spec: &SandboxSpec) -> io::Result<()> {
    let standard = STANDARD.iter().map(|p| (Path::new(p), false));
    let binds = spec
        .mounts
        .iter()
        .map(|m| (m.destination.as_path(), m.source.is_file()));
    for (target, is_file) in standard.chain(binds) {
        ensure_one(&spec.rootfs, target, is_file)?;
    }
    Ok(())
}

fn ensure_one(rootfs: &Path, target: &Path, is_file: bool) -> io::Result<()> {
    if target.components().any(|c| c == Component::ParentDir) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("mount target {} must not contain ..", target.display()),
        ));
    }
    let parts: Vec<_> = target
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part),
            _ => None,
        })
        .collect();
    let mut path = rootfs.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let created = if last && is_file {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map(drop)
                } else {
                    std::fs::create_dir(&path)
                };
                created.map_err(|e| missing_target(rootfs, target, e))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The error for a mount target that could not be created, naming it (on a read-only root
/// file system, such as an image volume, the image itself must contain it).
fn missing_target(rootfs: &Path, target: &Path, e: io::Error) -> io::Error {
    let hint = if e.raw_os_error() == Some(libc::EROFS) {
        " (the root file system is read-only: the image must contain it)"
    } else {
        ""
    };
    io::Error::new(
        e.kind(),
        format!(
            "{} lacks the mount point {} and it cannot be created: {e}{hint}",
            rootfs.display(),
            target.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_missing_targets_but_never_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        ensure_one(root.path(), Path::new("/run/secrets/token"), true).unwrap();
        ensure_one(root.path(), Path::new("/data/in"), false).unwrap();
        ensure_one(root.path(), Path::new("/link/x/y"), false).unwrap();
        assert!(root.path().join("run/secrets/token").is_file());
        assert!(root.path().join("data/in").is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(ensure_one(root.path(), Path::new("/a/../../b"), false).is_err());
    }
}
