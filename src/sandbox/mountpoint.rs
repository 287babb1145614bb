//! Creates the mount targets a container needs inside its root file system
//! before it is built. libcontainer creates missing targets from inside the
//! container, where a user-namespaced root (a host nobody) cannot write to the
//! root-owned rootfs; the zygote runs as real root and does it up front.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path};

use crate::sandbox::model::SandboxSpec;

/// Mount points of every container, besides the spec's bind mounts.
const STANDARD: &[&str] = &["/proc", "/dev", "/tmp"];

/// Creates each missing target of `spec` (a folder, or an empty file when the
/// bind source is a file). Symlinks on the way are resolved inside the rootfs,
/// as libcontainer resolves the mount's destination (an image's `/var/run`
/// is often a link to `/run`): nothing is created outside the rootfs.
pub fn ensure(spec: &SandboxSpec) -> io::Result<()> {
    let standard = STANDARD.iter().map(|p| (Path::new(p), false));
    let binds = spec
        .mounts
        .iter()
        .map(|m| (m.destination.as_path(), m.source.is_file()));
    let call_files = spec.call_files_dir.iter().map(|d| (d.as_path(), false));
    for (target, is_file) in standard.chain(binds).chain(call_files) {
        ensure_one(&spec.rootfs, target, is_file)?;
    }
    Ok(())
}

/// Symlinks followed for one target before giving up (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

fn ensure_one(rootfs: &Path, target: &Path, is_file: bool) -> io::Result<()> {
    if target.components().any(|c| c == Component::ParentDir) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("mount target {} must not contain ..", target.display()),
        ));
    }
    let mut pending: VecDeque<OsString> = normal_parts(target).collect();
    // The resolved path below the rootfs so far.
    let mut path = rootfs.to_path_buf();
    let mut depth = 0usize;
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            // Clamped at the rootfs, like a `..` at `/`.
            if depth > 0 {
                path.pop();
                depth -= 1;
            }
            continue;
        }
        path.push(&part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(missing_target(
                        rootfs,
                        target,
                        io::Error::from_raw_os_error(libc::ELOOP),
                    ));
                }
                let link = std::fs::read_link(&path)?;
                path.pop();
                if link.is_absolute() {
                    path = rootfs.to_path_buf();
                    depth = 0;
                }
                for part in normal_parts(&link).rev() {
                    pending.push_front(part);
                }
            }
            Ok(_) => depth += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let created = if pending.is_empty() && is_file {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map(drop)
                } else {
                    std::fs::create_dir(&path)
                };
                created.map_err(|e| missing_target(rootfs, target, e))?;
                depth += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The named components of `path`, `..` included (as `".."`).
fn normal_parts(path: &Path) -> impl DoubleEndedIterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(part) => Some(part.to_os_string()),
        Component::ParentDir => Some("..".into()),
        _ => None,
    })
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

    #[test]
    fn symlinks_on_the_way_are_resolved_inside_the_rootfs() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // As in Debian's and Alpine's images.
        std::fs::create_dir(root.path().join("run")).unwrap();
        std::fs::create_dir(root.path().join("var")).unwrap();
        std::os::unix::fs::symlink("../run", root.path().join("var/run")).unwrap();
        ensure_one(
            root.path(),
            Path::new("/var/run/secrets/kubernetes.io/serviceaccount"),
            false,
        )
        .unwrap();
        assert!(
            root.path()
                .join("run/secrets/kubernetes.io/serviceaccount")
                .is_dir()
        );
        // Absolute links and `..` past the top stay in the rootfs.
        std::os::unix::fs::symlink(outside.path(), root.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.path().join("up")).unwrap();
        ensure_one(root.path(), Path::new("/abs/a"), false).unwrap();
        ensure_one(root.path(), Path::new("/up/b"), false).unwrap();
        assert!(
            root.path()
                .join(outside.path().strip_prefix("/").unwrap())
                .join("a")
                .is_dir()
        );
        assert!(root.path().join("b").is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // A loop is an error naming the target, not a hang.
        std::os::unix::fs::symlink("loop", root.path().join("loop")).unwrap();
        let err = ensure_one(root.path(), Path::new("/loop/x"), false).unwrap_err();
        assert!(err.to_string().contains("/loop/x"), "{err}");
    }
}
