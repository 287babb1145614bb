//! Tool root file systems from Kubernetes image volumes (`volumes[].image`): the kubelet
//! mounts each tool image read-only at `DIR/<entry name>/` (the entry name as in the images
//! folder, [`entry_name`]), and the sandbox uses that tree directly as its root file system:
//! nothing is unpacked or cached. A read-only tree cannot get the mount points a sandbox needs
//! created in it, so they are checked here, up front, with an error that names what is missing.

use std::path::PathBuf;

use super::images::{ImageError, RootfsResolver, entry_name};

/// The directories a sandbox mounts over in every root file system (spec.rs): procfs, the /dev
/// tmpfs and the /tmp tmpfs. (/sys is left out of sandboxes, so it is not needed.)
pub const MOUNT_POINTS: &[&str] = &["proc", "dev", "tmp"];

pub struct ImageVolumes {
    pub dir: PathBuf,
}

impl RootfsResolver for ImageVolumes {
    fn resolve(&self, reference: &str) -> Result<PathBuf, ImageError> {
        let name = entry_name(reference);
        let root = self.dir.join(&name);
        if !root.is_dir() {
            return Err(ImageError::NoImageVolume {
                reference: reference.into(),
                root,
            });
        }
        let missing: Vec<String> = MOUNT_POINTS
            .iter()
            .filter(|p| !root.join(p).is_dir())
            .map(|p| format!("/{p}"))
            .collect();
        if !missing.is_empty() {
            return Err(ImageError::MountPointsMissing {
                reference: reference.into(),
                root,
                missing,
            });
        }
        Ok(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_volume_is_used_as_it_is_and_must_have_every_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = ImageVolumes {
            dir: dir.path().to_path_buf(),
        };
        let reference = "registry.example/tools/grep:1.0";
        let err = volumes.resolve(reference).unwrap_err();
        assert_eq!(err.reason(), "ImageVolumeMissing");
        assert!(
            err.to_string().contains("no image volume mounted at"),
            "{err}"
        );
        let root = dir.path().join(entry_name(reference));
        std::fs::create_dir_all(root.join("dev")).unwrap();
        let err = volumes.resolve(reference).unwrap_err();
        assert_eq!(err.reason(), "ImageLacksMountPoints");
        assert!(
            err.to_string()
                .contains("lacks the mount point(s) /proc, /tmp"),
            "{err}"
        );
        std::fs::create_dir(root.join("proc")).unwrap();
        std::fs::create_dir(root.join("tmp")).unwrap();
        assert_eq!(volumes.resolve(reference).unwrap(), root);
        // A file where a mount point belongs is no mount point.
        std::fs::remove_dir(root.join("tmp")).unwrap();
        std::fs::write(root.join("tmp"), b"").unwrap();
        assert!(
            volumes
                .resolve(reference)
                .unwrap_err()
                .to_string()
                .contains("/tmp")
        );
    }
}
