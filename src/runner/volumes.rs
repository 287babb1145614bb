//! Where the standalone runner finds the volumes a tool mounts, and how it
//! bounds the writable ones.
//!
//! Names are Kubernetes names (checked again here, whatever the manifest
//! loader did) and are opened beneath their folder with `openat2`
//! (`RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS` through `pathrs`): no `..`, no
//! absolute path and no symbolic link planted in `volumes/pvc/` can lead out.
//!
//! A writable volume gets a size limit the kernel enforces: its data lives in
//! an ext4 image of `sizeLimit` bytes (`STATE/volumes/<kind>-<name>.ext4`,
//! seeded once from the folder), loop-mounted in the sandbox engine's own
//! mount namespace. A tool that fills it gets `ENOSPC`; the host file system
//! only ever holds the image.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pathrs::Root;
use pathrs::flags::ResolverFlags;
use sha2::Digest;

use crate::api::names::{self, NameError};
use crate::api::{FilesystemMount, parse_quantity};
use crate::sandbox::detect::sandbox_id_map;

/// Size of a writable volume whose mount sets no `sizeLimit`.
pub const DEFAULT_WRITABLE_SIZE: u64 = 256 << 20;
/// ext4 needs room for its own metadata; smaller limits are refused.
pub const MIN_WRITABLE_SIZE: u64 = 1 << 20;

/// Where the standalone runner finds the volumes a tool names:
/// `DIR/pvc/<claim>` and `DIR/configmap/<name>`.
#[derive(Clone, Debug, Default)]
pub struct VolumesDir(pub Option<PathBuf>);

/// Why a volume cannot be mounted.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{kind} {name:?} needs a volumes folder (--volumes DIR, read as DIR/{kind}/{name})")]
    NoVolumesDir { kind: &'static str, name: String },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(
        "{path}: cannot be opened beneath the volumes folder without following a symbolic link or leaving it ({source})"
    )]
    Escapes {
        path: String,
        source: pathrs::error::Error,
    },
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("{folder} is outside {root}")]
    Outside { folder: PathBuf, root: PathBuf },
    #[error(
        "hostPath {given} resolves to {real}: name the real folder (symbolic links are not followed)"
    )]
    HostPathLink { given: String, real: PathBuf },
    #[error("{0} is not a folder")]
    NotAFolder(PathBuf),
    #[error("emptyDir is not available to the standalone runner; use /tmp (spec.sandbox.tmpSize)")]
    EmptyDir,
    #[error("sizeLimit: {0}")]
    SizeLimit(#[from] crate::api::BadQuantity),
    #[error("sizeLimit: {given} is below the smallest bounded volume, 1Mi")]
    SizeLimitTooSmall { given: String },
    #[error(
        "{image} holds this volume with {found} bytes, but sizeLimit is now {wanted}: restore sizeLimit or move the image away (its data is the volume's)"
    )]
    SizeChanged {
        image: PathBuf,
        found: u64,
        wanted: u64,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {output}")]
    Command { command: String, output: String },
}

impl VolumeError {
    pub fn reason(&self) -> &'static str {
        match self {
            VolumeError::NoVolumesDir { .. } => "NoVolumesDir",
            VolumeError::Name(e) => e.reason(),
            VolumeError::Escapes { .. } => "VolumeEscapes",
            VolumeError::Missing(_) => "VolumeMissing",
            VolumeError::Outside { .. } => "VolumeOutside",
            VolumeError::HostPathLink { .. } => "HostPathLink",
            VolumeError::NotAFolder(_) => "NotAFolder",
            VolumeError::EmptyDir => "EmptyDirUnsupported",
            VolumeError::SizeLimit(_) => "InvalidSizeLimit",
            VolumeError::SizeLimitTooSmall { .. } => "SizeLimitTooSmall",
            VolumeError::SizeChanged { .. } => "SizeLimitChanged",
            VolumeError::Io { .. } => "VolumeIo",
            VolumeError::Command { .. } => "VolumeCommandFailed",
        }
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> VolumeError {
    let what = what.to_string();
    move |source| VolumeError::Io { what, source }
}

/// The host folder behind one mount, resolved so that it cannot be outside
/// its folder. `kind` is `pvc`, `configmap` or `hostpath` (for the image name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSource {
    pub kind: &'static str,
    pub name: String,
    pub folder: PathBuf,
}

impl VolumesDir {
    /// The folder `mount` names. Never a path outside `DIR/<kind>/`.
    pub fn resolve(&self, mount: &FilesystemMount) -> Result<VolumeSource, VolumeError> {
        if let Some(path) = &mount.host_path {
            return host_folder(path);
        }
        let (kind, name) = match (&mount.persistent_volume_claim, &mount.config_map) {
            (Some(claim), _) => ("pvc", claim),
            (None, Some(name)) => ("configmap", name),
            // A shared folder would let one call leave data for the next, which a
            // fresh sandbox per call must not allow; /tmp is the per-call scratch.
            (None, None) => return Err(VolumeError::EmptyDir),
        };
        let name = names::dns1123_subdomain(name)?;
        let Some(dir) = &self.0 else {
            return Err(VolumeError::NoVolumesDir {
                kind,
                name: name.into(),
            });
        };
        let relative = format!("{kind}/{name}");
        let escapes = |source: pathrs::error::Error| {
            if source.kind() == pathrs::error::ErrorKind::OsError(Some(libc::ENOENT)) {
                VolumeError::Missing(dir.join(&relative))
            } else {
                VolumeError::Escapes {
                    path: dir.join(&relative).display().to_string(),
                    source,
                }
            }
        };
        // The volumes folder itself is the administrator's choice; below it,
        // nothing is followed.
        let root = Root::open(dir)
            .map_err(escapes)?
            .with_resolver_flags(ResolverFlags::NO_SYMLINKS);
        let handle = root.resolve(&relative).map_err(escapes)?;
        let folder = fd_path(handle.as_fd())?;
        let canonical_root = std::fs::canonicalize(dir).map_err(io(dir.display()))?;
        if !folder.starts_with(&canonical_root) {
            // openat2 guarantees this; a failure here is a kernel or pathrs bug.
            return Err(VolumeError::Outside {
                folder,
                root: canonical_root,
            });
        }
        let meta = std::fs::metadata(&folder).map_err(io(folder.display()))?;
        if !meta.is_dir() {
            return Err(VolumeError::NotAFolder(folder));
        }
        Ok(VolumeSource {
            kind,
            name: name.into(),
            folder,
        })
    }
}

/// A hostPath as given: absolute, without `.`/`..` and without symbolic
/// links, so the folder a policy allowed by prefix is the folder mounted.
fn host_folder(path: &str) -> Result<VolumeSource, VolumeError> {
    names::absolute_clean_path(path)?;
    let given = Path::new(path);
    let real = std::fs::canonicalize(given).map_err(io(path))?;
    if real != given.components().collect::<PathBuf>() {
        return Err(VolumeError::HostPathLink {
            given: path.into(),
            real,
        });
    }
    if !real.is_dir() {
        return Err(VolumeError::NotAFolder(real));
    }
    // The image name stands for the path: a digest keeps it one file name.
    let digest = hex::encode(sha2::Sha256::digest(path.as_bytes()));
    Ok(VolumeSource {
        kind: "hostpath",
        name: digest[..16].to_string(),
        folder: real,
    })
}

/// The path an open file descriptor refers to.
fn fd_path(fd: std::os::fd::BorrowedFd<'_>) -> Result<PathBuf, VolumeError> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    std::fs::read_link(&link).map_err(io(link))
}

/// `sizeLimit` of a writable mount in bytes.
pub fn size_limit(mount: &FilesystemMount) -> Result<u64, VolumeError> {
    let Some(q) = &mount.size_limit else {
        return Ok(DEFAULT_WRITABLE_SIZE);
    };
    let bytes = parse_quantity(q)?;
    if bytes < MIN_WRITABLE_SIZE as f64 {
        return Err(VolumeError::SizeLimitTooSmall { given: q.0.clone() });
    }
    Ok(bytes as u64)
}

/// The writable volumes of all pools: one loop-mounted ext4 image per
/// volume, shared by every pool that mounts it and unmounted with the last.
/// One mount per image at a time (two would be two file systems writing the
/// same blocks): counting users and unmounting happen under one lock.
pub struct BoundedVolumes {
    /// `STATE/volumes`: the images and their mount points.
    store: PathBuf,
    /// The mount namespace the sandboxes are built in (the zygote's).
    zygote_pid: u32,
    /// Users (pools) of each mounted image.
    mounted: Mutex<HashMap<PathBuf, usize>>,
}

/// One pool's use of a mounted image; the last one dropped unmounts it.
pub struct BoundedVolume {
    /// Where the sandboxes find it (in the zygote's mount namespace).
    pub mountpoint: PathBuf,
    image: PathBuf,
    volumes: Arc<BoundedVolumes>,
}

impl Drop for BoundedVolume {
    fn drop(&mut self) {
        self.volumes.release(&self.image, &self.mountpoint);
    }
}

impl BoundedVolumes {
    pub fn new(store: PathBuf, zygote_pid: u32) -> Self {
        BoundedVolumes {
            store,
            zygote_pid,
            mounted: Mutex::new(HashMap::new()),
        }
    }

    /// The image that holds `source` once any tool mounted it writable.
    pub fn image(&self, source: &VolumeSource) -> PathBuf {
        self.store.join(format!("{}.ext4", stem(source)))
    }

    /// Creates the image of `source` (`size` bytes) unless it exists, in which
    /// case its size must be `size`. True when it was created now.
    pub fn ensure_image(&self, source: &VolumeSource, size: u64) -> Result<bool, VolumeError> {
        let _serialized = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure_image_locked(source, size)
    }

    fn ensure_image_locked(&self, source: &VolumeSource, size: u64) -> Result<bool, VolumeError> {
        let image = self.image(source);
        if image.exists() {
            check_size(&image, size)?;
            return Ok(false);
        }
        self.mountpoint(source)?;
        create_image(&image, &source.folder, size)?;
        Ok(true)
    }

    /// The mounted image holding `source`, whose root folder belongs to
    /// `owner` (the sandbox user as the host sees it). `size`: the limit of a
    /// writable mount (the image is created with it, or must have it); `None`
    /// for a read-only mount of an existing image.
    pub fn mount(
        self: &Arc<Self>,
        source: &VolumeSource,
        size: Option<u64>,
        owner: u32,
    ) -> Result<BoundedVolume, VolumeError> {
        let image = self.image(source);
        let mountpoint = self.mountpoint(source)?;
        let mut mounted = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(size) = size {
            self.ensure_image_locked(source, size)?;
        }
        if let Some(users) = mounted.get_mut(&image) {
            *users += 1;
        } else {
            in_mount_namespace(
                self.zygote_pid,
                "mount",
                &[
                    "-o".as_ref(),
                    "loop,nosuid,nodev".as_ref(),
                    image.as_os_str(),
                    mountpoint.as_os_str(),
                ],
            )?;
            // The file system's root, as the sandboxes see it: the sandbox user's.
            let root = self.seen_by_sandboxes(&mountpoint);
            let owned = std::os::unix::fs::chown(&root, Some(owner), Some(owner))
                .and_then(|()| {
                    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(io(root.display()));
            if let Err(e) = owned {
                self.unmount(&mountpoint);
                return Err(e);
            }
            mounted.insert(image.clone(), 1);
        }
        Ok(BoundedVolume {
            mountpoint,
            image,
            volumes: Arc::clone(self),
        })
    }

    fn release(&self, image: &Path, mountpoint: &Path) {
        let mut mounted = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        let Some(users) = mounted.get_mut(image) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            mounted.remove(image);
            self.unmount(mountpoint);
        }
    }

    fn unmount(&self, mountpoint: &Path) {
        // Once the engine has stopped, its mount namespace and this mount are gone.
        if !Path::new(&format!("/proc/{}/ns/mnt", self.zygote_pid)).exists() {
            return;
        }
        if let Err(e) = in_mount_namespace(self.zygote_pid, "umount", &[mountpoint.as_os_str()]) {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "bounded volume not unmounted");
        }
    }

    /// Where the bounded image of `source` is mounted (an empty folder until it is).
    pub fn mountpoint(&self, source: &VolumeSource) -> Result<PathBuf, VolumeError> {
        let mountpoints = self.store.join("mnt");
        // The store: passable, listable by nobody (the images in it are 0600).
        // The mount points: only the container's root passes (the mapped root
        // owns them; root passes anyway), which only sets sandboxes up; no tool
        // reaches another's volume through them, whatever folder it mounts.
        for (dir, owner, mode) in [
            (&self.store, 0, 0o711),
            (
                &mountpoints,
                sandbox_id_map().map_or(0, |ids| ids.uid_base),
                0o700,
            ),
        ] {
            std::fs::create_dir_all(dir).map_err(io(dir.display()))?;
            std::os::unix::fs::chown(dir, Some(owner), Some(owner)).map_err(io(dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(io(dir.display()))?;
        }
        let mountpoint = mountpoints.join(stem(source));
        std::fs::create_dir_all(&mountpoint).map_err(io(mountpoint.display()))?;
        Ok(mountpoint)
    }

    /// `path` in the sandbox engine's mount namespace, as this process can reach it.
    pub fn seen_by_sandboxes(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.zygote_pid))
            .join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// File name of a volume's image and mount point: names are DNS-1123, so
/// `pvc-NAME`, `configmap-NAME` and `hostpath-DIGEST` never collide.
fn stem(source: &VolumeSource) -> String {
    format!("{}-{}", source.kind, source.name)
}

fn check_size(image: &Path, wanted: u64) -> Result<(), VolumeError> {
    let found = std::fs::metadata(image).map_err(io(image.display()))?.len();
    if found == wanted {
        Ok(())
    } else {
        Err(VolumeError::SizeChanged {
            image: image.into(),
            found,
            wanted,
        })
    }
}

/// An image of `size` bytes with an ext4 file system holding a copy of
/// `folder`. Written under a temporary name: a failure leaves nothing behind.
fn create_image(image: &Path, folder: &Path, size: u64) -> Result<(), VolumeError> {
    let partial = image.with_extension("ext4.partial");
    let _ = std::fs::remove_file(&partial);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io(partial.display()))?;
    // Allocated now, not sparse: the volume's bytes are reserved on the host,
    // so filling it never takes space from anything else (and a limit larger
    // than the free space fails here, not in the middle of a call).
    nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t).map_err(|e| {
        VolumeError::Io {
            what: format!("reserving {size} bytes for {}", partial.display()),
            source: e.into(),
        }
    })?;
    drop(file);
    let result = run(std::process::Command::new("mkfs.ext4").args([
        "-q".as_ref(),
        "-F".as_ref(),
        // No blocks reserved for root: the tool gets the whole limit.
        "-m".as_ref(),
        "0".as_ref(),
        // Discarding would punch the reservation back out of the image.
        "-E".as_ref(),
        "nodiscard".as_ref(),
        "-d".as_ref(),
        folder.as_os_str(),
        partial.as_os_str(),
    ]))
    .and_then(|()| std::fs::rename(&partial, image).map_err(io(image.display())));
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Runs `program args` inside the mount namespace of process `pid`. A thread
/// of its own leaves the runner's shared file system context
/// (`unshare(CLONE_FS)`, without which a thread of a multi-threaded process
/// cannot enter a mount namespace) and enters the namespace; the command's
/// process inherits it. The thread ends with the command, so nothing else
/// ever runs in that namespace. (Safe wrappers instead of a `pre_exec` hook,
/// which is `unsafe`.)
fn in_mount_namespace(
    pid: u32,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> Result<(), VolumeError> {
    use nix::sched::{CloneFlags, setns, unshare};
    let ns_path = format!("/proc/{pid}/ns/mnt");
    let ns = std::fs::File::open(&ns_path).map_err(io(&ns_path))?;
    let mut command = std::process::Command::new(program);
    command.args(args);
    std::thread::scope(|scope| {
        let entered = scope.spawn(|| {
            unshare(CloneFlags::CLONE_FS)
                .and_then(|()| setns(&ns, CloneFlags::CLONE_NEWNS))
                .map_err(|e| io(format!("entering {ns_path}"))(e.into()))?;
            run(&mut command)
        });
        entered
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn run(command: &mut std::process::Command) -> Result<(), VolumeError> {
    let describe = format!("{command:?}");
    let output = command.output().map_err(io(&describe))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(VolumeError::Command {
            command: describe,
            output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}
