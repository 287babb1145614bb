//! Resolves a tool's `runtime.image` to a root file system on disk, from local
//! sources only (no registry access): in the images folder, an entry named
//! after the reference with `/`, `:` and `@` replaced by `_` (so
//! `docker.io/library/busybox:1.36.1` is `docker.io_library_busybox_1.36.1`):
//!
//! - `NAME/` holding an OCI image layout (`oci-layout`, `index.json`, `blobs/`):
//!   the manifest the reference names (by digest when pinned, else by tag, else
//!   the only one) is unpacked, every blob checked against its descriptor;
//! - `NAME/` holding anything else: used as the root file system as it is;
//! - `NAME.tar` or `NAME.tar.gz`: a root file system tarball, unpacked.
//!
//! A reference pinned by digest (`name@sha256:...`) is only served from an OCI
//! layout, where the pin is checked; a plain tree or tarball has no manifest to
//! check it against and is refused.
//!
//! Unpacked trees are cached under `CACHE/<sha256>/rootfs`, keyed by content.
//! Each is unpacked into a private temporary folder and renamed into place
//! complete, so a failed unpack leaves nothing behind. The cache folder is
//! `0711` and each entry `0710` with the group of the sandboxes' user-namespace
//! root (or `0700` when not run as root): a sandbox can reach its root file
//! system, local users cannot.

mod layer;
mod oci;

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::sandbox::detect::sandbox_id_map;
pub use layer::Refusal;
use layer::{Layer, Unpacker};

/// Written last into a complete cache entry. An entry without it, or from
/// another version of the unpacking rules, is unpacked again.
const FORMAT: &str = "toolwarden-rootfs 2";

pub struct ImageStore {
    pub dir: PathBuf,
    pub cache: PathBuf,
    pub limits: UnpackLimits,
}

/// Bounds on what one image may unpack to.
#[derive(Clone, Copy, Debug)]
pub struct UnpackLimits {
    /// Bytes of decompressed layer data, all layers together.
    pub max_bytes: u64,
    /// Entries, all layers together.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 8 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// A limit an image crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Bytes(u64),
    Entries(u64),
    HeaderBytes(u64),
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Bytes(n) => write!(f, "the image unpacks to more than {n} bytes"),
            Limit::Entries(n) => write!(f, "the image has more than {n} entries"),
            Limit::HeaderBytes(n) => write!(f, "an entry has more than {n} bytes of tar headers"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {reference} not found in {} (looked for {name}/, {name}.tar, {name}.tar.gz)", dir.display())]
    NotFound {
        reference: String,
        dir: PathBuf,
        name: String,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {detail}", path.display())]
    Layout { path: PathBuf, detail: String },
    #[error("unsupported digest {digest:?} (expected sha256:<64 lowercase hex digits>)")]
    UnsupportedDigest { digest: String },
    #[error("{}: content is {actual}, not {expected}", path.display())]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: {actual} bytes, not {expected} as its descriptor says", path.display())]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("image {reference} is pinned by digest, but {}/index.json lists no such manifest (it lists {listed})", layout.display())]
    PinMismatch {
        reference: String,
        layout: PathBuf,
        listed: String,
    },
    #[error("image {reference} is pinned by digest, but {} is a plain root file system with no manifest to check the digest against; provide it as an OCI image layout", path.display())]
    PinUnverifiable { reference: String, path: PathBuf },
    #[error("{}: entry {entry:?} refused: {why}", layer.display())]
    EntryRefused {
        layer: PathBuf,
        entry: String,
        why: Refusal,
    },
    #[error("{}: entry {entry:?}: {source}", layer.display())]
    Unpack {
        layer: PathBuf,
        entry: String,
        source: io::Error,
    },
    #[error("{}: {limit}", layer.display())]
    LimitExceeded { layer: PathBuf, limit: Limit },
    #[error("image cache {}: {why}", path.display())]
    UnsafeCache { path: PathBuf, why: UnsafeCache },
    #[error("image {reference}: no image volume mounted at {}", root.display())]
    NoImageVolume { reference: String, root: PathBuf },
    #[error(
        "image {reference} (image volume {}) lacks the mount point(s) {}: an image \
         volume is read-only, so the image itself must contain these empty directories",
        root.display(),
        missing.join(", ")
    )]
    MountPointsMissing {
        reference: String,
        root: PathBuf,
        missing: Vec<String>,
    },
}

impl ImageError {
    /// Stable CamelCase name of the error class.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::NotFound { .. } => "ImageNotFound",
            ImageError::Io { .. } => "ImageUnreadable",
            ImageError::Layout { .. } | ImageError::UnsupportedDigest { .. } => {
                "ImageLayoutInvalid"
            }
            ImageError::DigestMismatch { .. } | ImageError::SizeMismatch { .. } => {
                "ImageDigestMismatch"
            }
            ImageError::PinMismatch { .. } => "ImagePinMismatch",
            ImageError::PinUnverifiable { .. } => "ImagePinUnverifiable",
            ImageError::EntryRefused { .. } => "ImageEntryRefused",
            ImageError::Unpack { .. } => "ImageUnpackFailed",
            ImageError::LimitExceeded { .. } => "ImageTooLarge",
            ImageError::UnsafeCache { .. } => "ImageCacheUnsafe",
            ImageError::NoImageVolume { .. } => "ImageVolumeMissing",
            ImageError::MountPointsMissing { .. } => "ImageLacksMountPoints",
        }
    }
}

/// Why the image cache folder is refused.
#[derive(Debug, thiserror::Error)]
pub enum UnsafeCache {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a folder (a symlink?)")]
    NotAFolder,
    #[error("owned by uid {0}, not by this user")]
    NotOurs(u32),
    #[error("{} is owned by uid {uid}", folder.display())]
    AncestorNotOurs { folder: PathBuf, uid: u32 },
    #[error("{} is writable by other users (mode {mode:o})", folder.display())]
    AncestorWritable { folder: PathBuf, mode: u32 },
}

/// The parts of an image reference the lookup needs.
pub(crate) struct Reference<'a> {
    full: &'a str,
    tag: Option<&'a str>,
    digest: Option<&'a str>,
}

impl<'a> Reference<'a> {
    fn parse(full: &'a str) -> Reference<'a> {
        let (name, digest) = match full.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (full, None),
        };
        // A `:` after the last `/` starts the tag (`localhost:5000/x` has none).
        let last = name.rsplit('/').next().unwrap_or(name);
        let tag = last.rsplit_once(':').map(|(_, tag)| tag);
        Reference { full, tag, digest }
    }
}

/// Turns a tool's `runtime.image` into the directory its sandboxes use as root file system.
pub trait RootfsResolver: Send + Sync {
    fn resolve(&self, reference: &str) -> Result<PathBuf, ImageError>;
}

impl RootfsResolver for ImageStore {
    fn resolve(&self, reference: &str) -> Result<PathBuf, ImageError> {
        ImageStore::resolve(self, reference)
    }
}

/// The file name an image reference is looked up under. Pure.
pub fn entry_name(reference: &str) -> String {
    reference.replace(['/', ':', '@'], "_")
}

impl ImageStore {
    pub fn new(dir: PathBuf, cache: PathBuf) -> ImageStore {
        ImageStore {
            dir,
            cache,
            limits: UnpackLimits::default(),
        }
    }

    /// The root file system directory of `reference`.
    pub fn resolve(&self, reference: &str) -> Result<PathBuf, ImageError> {
        let parsed = Reference::parse(reference);
        if let Some(digest) = parsed.digest {
            oci::check_digest(digest)?;
        }
        let name = entry_name(reference);
        let dir = self.dir.join(&name);
        if dir.join("oci-layout").is_file() {
            let image = oci::select(&dir, &parsed)?;
            return self.unpack(&image.manifest, &image.layers);
        }
        let tarball = [format!("{name}.tar"), format!("{name}.tar.gz")]
            .into_iter()
            .map(|candidate| self.dir.join(candidate))
            .find(|path| path.is_file());
        let plain = if dir.is_dir() {
            Some(&dir)
        } else {
            tarball.as_ref()
        };
        match (plain, parsed.digest) {
            (None, _) => Err(ImageError::NotFound {
                reference: reference.to_string(),
                dir: self.dir.clone(),
                name,
            }),
            (Some(path), Some(_)) => Err(ImageError::PinUnverifiable {
                reference: reference.to_string(),
                path: path.clone(),
            }),
            (Some(path), None) if path == &dir => Ok(dir),
            (Some(path), None) => {
                let digest = file_digest(path)?;
                let layer = Layer {
                    gzip: path.extension().is_some_and(|e| e == "gz"),
                    sha256: digest.clone(),
                    size: None,
                    path: path.clone(),
                };
                self.unpack(&digest, &[layer])
            }
        }
    }

    /// Unpacks layers in order into the cache, once per content digest.
    fn unpack(&self, digest: &str, layers: &[Layer]) -> Result<PathBuf, ImageError> {
        self.prepare_cache()?;
        let entry = self.cache.join(digest);
        if is_trusted_entry(&entry, digest) {
            return Ok(entry.join("rootfs"));
        }
        let partial = self.cache.join(format!(
            ".partial-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        let result = self.unpack_into(&partial, digest, layers).and_then(|()| {
            if entry.exists() {
                // From an older version, or incomplete: never trusted.
                discard(&entry, &self.cache).map_err(|source| ImageError::Io {
                    path: entry.clone(),
                    source,
                })?;
            }
            std::fs::rename(&partial, &entry).or_else(|e| {
                // Another runner sharing the cache finished first.
                if is_trusted_entry(&entry, digest) {
                    Ok(())
                } else {
                    Err(ImageError::Io {
                        path: entry.clone(),
                        source: e,
                    })
                }
            })
        });
        if partial.exists() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        result?;
        tracing::info!(image = %digest, layers = layers.len(), cache = %entry.display(), "image unpacked");
        Ok(entry.join("rootfs"))
    }

    fn unpack_into(
        &self,
        partial: &Path,
        digest: &str,
        layers: &[Layer],
    ) -> Result<(), ImageError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(partial)
            .map_err(io_error(partial))?;
        let rootfs = partial.join("rootfs");
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&rootfs)
            .map_err(io_error(&rootfs))?;
        let mut unpacker = Unpacker::new(&rootfs, self.limits)?;
        for layer in layers {
            unpacker.apply(layer)?;
        }
        std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
            .map_err(io_error(&rootfs))?;
        let marker = partial.join("format");
        std::fs::write(&marker, marker_text(digest)).map_err(io_error(&marker))?;
        let (group, mode) = entry_access();
        std::os::unix::fs::chown(partial, None, Some(group)).map_err(io_error(partial))?;
        std::fs::set_permissions(partial, std::fs::Permissions::from_mode(mode))
            .map_err(io_error(partial))
    }

    /// Creates the cache folder (`0711`) and checks that no other user can
    /// change it or what leads to it; removes entries left by older versions
    /// and by unpacks that died.
    fn prepare_cache(&self) -> Result<(), ImageError> {
        let unsafe_cache = |why: UnsafeCache| ImageError::UnsafeCache {
            path: self.cache.clone(),
            why,
        };
        // Missing folders are made `0711` whatever the umask: a `0777` one would be refused below.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.cache)
            .map_err(|e| unsafe_cache(e.into()))?;
        // The folder itself, not where a symlink planted at its path leads.
        let meta = std::fs::symlink_metadata(&self.cache).map_err(|e| unsafe_cache(e.into()))?;
        let me = nix::unistd::geteuid().as_raw();
        if !meta.is_dir() {
            return Err(unsafe_cache(UnsafeCache::NotAFolder));
        }
        if meta.uid() != me {
            return Err(unsafe_cache(UnsafeCache::NotOurs(meta.uid())));
        }
        let canonical = std::fs::canonicalize(&self.cache).map_err(|e| unsafe_cache(e.into()))?;
        for folder in canonical.ancestors().skip(1) {
            let meta = std::fs::metadata(folder).map_err(|e| unsafe_cache(e.into()))?;
            if ![0, me].contains(&meta.uid()) {
                return Err(unsafe_cache(UnsafeCache::AncestorNotOurs {
                    folder: folder.to_path_buf(),
                    uid: meta.uid(),
                }));
            }
            let sticky = meta.mode() & 0o1000 != 0;
            if meta.mode() & 0o022 != 0 && !sticky {
                return Err(unsafe_cache(UnsafeCache::AncestorWritable {
                    folder: folder.to_path_buf(),
                    mode: meta.mode() & 0o7777,
                }));
            }
        }
        if meta.mode() & 0o7777 != 0o711 {
            std::fs::set_permissions(&canonical, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| unsafe_cache(e.into()))?;
        }
        for item in std::fs::read_dir(&canonical).map_err(|e| unsafe_cache(e.into()))? {
            let Ok(item) = item else { continue };
            let name = item.file_name().to_string_lossy().into_owned();
            let stale = match name.strip_prefix(".partial-") {
                Some(rest) => rest
                    .split('-')
                    .next()
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists()),
                None => {
                    oci::check_digest(&format!("sha256:{name}")).is_ok()
                        && !is_trusted_entry(&item.path(), &name)
                }
            };
            if stale {
                tracing::info!(entry = %item.path().display(), "image cache: removing an entry from an older version or an interrupted unpack");
                if let Err(e) = discard(&item.path(), &canonical) {
                    tracing::warn!(entry = %item.path().display(), error = %e, "image cache: could not remove a stale entry");
                }
            }
        }
        Ok(())
    }
}

fn marker_text(digest: &str) -> String {
    format!("{FORMAT} sha256:{digest}\n")
}

/// The group and mode of a cache entry. As root: group = the sandboxes'
/// user-namespace root (a sandbox's setup runs as it and must reach the root
/// file system; on a host 1000000, in a pod one of the pod's ids), `0710`.
/// Otherwise, or without ids to map, only this user: `0700`.
fn entry_access() -> (u32, u32) {
    match sandbox_id_map() {
        Ok(ids) if nix::unistd::geteuid().is_root() => (ids.gid_base, 0o710),
        _ => (nix::unistd::getegid().as_raw(), 0o700),
    }
}

/// A complete entry of this version, as only this user can have made it.
fn is_trusted_entry(entry: &Path, digest: &str) -> bool {
    let (group, mode) = entry_access();
    let Ok(meta) = std::fs::symlink_metadata(entry) else {
        return false;
    };
    meta.is_dir()
        && meta.uid() == nix::unistd::geteuid().as_raw()
        && meta.gid() == group
        && meta.mode() & 0o7777 == mode
        && std::fs::read_to_string(entry.join("format")).is_ok_and(|m| m == marker_text(digest))
}

/// Removes a cache entry: first renamed out of the way so that it is never
/// seen half-removed, then deleted (std's `remove_dir_all` does not follow
/// symlinks).
fn discard(entry: &Path, cache: &Path) -> io::Result<()> {
    let aside = cache.join(format!(
        ".partial-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::rename(entry, &aside)?;
    std::fs::remove_dir_all(&aside)
}

/// Opens a file of the images folder for reading, refusing anything but a
/// regular file (a fifo planted as a blob would block the load forever).
fn open_regular(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

fn file_digest(path: &Path) -> Result<String, ImageError> {
    let io_error = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = open_regular(path).map_err(io_error)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf).map_err(io_error)? {
            0 => return Ok(hex::encode(hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_tag_and_digest() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let pinned = format!("localhost:5000/team/tool:v2@{digest}");
        let r = Reference::parse(&pinned);
        assert_eq!((r.tag, r.digest), (Some("v2"), Some(digest.as_str())));
        let r = Reference::parse("localhost:5000/team/tool");
        assert_eq!((r.tag, r.digest), (None, None));
        assert_eq!(
            entry_name("docker.io/library/busybox:1.36.1"),
            "docker.io_library_busybox_1.36.1"
        );
    }
}
