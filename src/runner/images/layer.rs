//! Applies image layers to a root file system without ever touching anything
//! outside it.
//!
//! Every entry's folder path is resolved *inside* the root with pathrs
//! (`openat2` with `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS`, or its checked
//! userspace fallback on older kernels) and must consist of real folders: a
//! symlink in it, such as one an earlier entry or layer planted (`evil -> /etc`,
//! then `evil/passwd`), is refused. Layers name real paths (Docker and BuildKit
//! write them from the file system they diff), and real folders also bound how
//! deep the tree can grow: no deeper than the deepest entry name. The entry's
//! own name is never followed: whatever is there (a planted symlink included)
//! is removed and the entry created with `O_EXCL | O_NOFOLLOW`. Names are
//! checked before any of that: absolute paths, `..`, over-long and over-deep
//! paths are refused for every entry type, hard-link targets included.
//!
//! The tar crate's own `unpack_in` is not used: it deletes nothing (whiteouts
//! are ours to apply), keeps set-id bits with `preserve_permissions`, and checks
//! containment by path string rather than by resolving inside the root.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::AtFlags;
use nix::sys::stat::{SFlag, fstatat};
use pathrs::error::ErrorKind;
use pathrs::flags::{OpenFlags, ResolverFlags};
use pathrs::{Handle, InodeType, Root, RootRef};
use sha2::{Digest, Sha256};

use super::{ImageError, Limit, UnpackLimits};

/// Longest entry path accepted (Linux's `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;
/// Longest single name (Linux's `NAME_MAX`).
const MAX_NAME_BYTES: usize = 255;
/// Deepest entry path accepted.
const MAX_DEPTH: usize = 128;
/// Bytes of headers (GNU long names, PAX records) the tar reader may buffer
/// for one entry: it reads them into memory whole.
const MAX_HEADER_BYTES: u64 = 1 << 20;
/// How an error reading a tar header (no entry yet) names the entry.
const HEADER: &str = "<tar header>";
/// Mode bits kept from an image: set-user-id, set-group-id and write access
/// for group and others are dropped. The sandbox mounts the root read-only and
/// `nosuid`, so inside it nothing changes; outside it, nothing in the cache
/// can raise a local user's privileges or be changed by one.
const KEPT_MODE_BITS: u32 = 0o1755;

/// One layer blob and what its descriptor promises about it.
pub(super) struct Layer {
    pub path: PathBuf,
    pub gzip: bool,
    /// Lowercase hex SHA-256 the blob must have.
    pub sha256: String,
    /// Size in bytes the blob must have, when the descriptor says.
    pub size: Option<u64>,
}

/// Why an entry is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("absolute path")]
    Absolute,
    #[error("`..` leaves the root file system")]
    ParentComponent,
    #[error("a name longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("a path longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
    #[error("a path deeper than {MAX_DEPTH} folders")]
    TooDeep,
    #[error("a symlink in its folder path (layers must name real folders)")]
    SymlinkInPath,
    #[error("a NUL byte in a name")]
    NulByte,
    #[error("a whiteout that names no file")]
    EmptyWhiteout,
    #[error("a {0} entry for the root folder itself")]
    Root(&'static str),
    #[error("an empty link target")]
    EmptyLinkTarget,
    #[error("hard-link target: {0}")]
    HardLinkTarget(Box<Refusal>),
    #[error("unsupported entry type {0:?}")]
    UnsupportedType(char),
}

/// Budget shared by all layers of one image, and the per-entry header budget.
/// The tar reader consumes bytes through [`Metered`], which fails with
/// [`Limit`] recorded here as soon as one is crossed.
struct Budget {
    limits: UnpackLimits,
    bytes: Cell<u64>,
    /// Bytes read since the last entry's data was consumed: its headers.
    since_entry: Cell<u64>,
    /// False while an entry's own data is read.
    in_headers: Cell<bool>,
    crossed: Cell<Option<Limit>>,
}

/// Counts the decompressed tar stream against the budget.
struct Metered<'a, R> {
    inner: R,
    budget: &'a Budget,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)? as u64;
        let b = self.budget;
        b.bytes.set(b.bytes.get() + n);
        b.since_entry.set(b.since_entry.get() + n);
        let crossed = if b.bytes.get() > b.limits.max_bytes {
            Some(Limit::Bytes(b.limits.max_bytes))
        } else if b.in_headers.get() && b.since_entry.get() > MAX_HEADER_BYTES {
            Some(Limit::HeaderBytes(MAX_HEADER_BYTES))
        } else {
            None
        };
        if let Some(limit) = crossed {
            b.crossed.set(Some(limit));
            return Err(io::Error::other(limit.to_string()));
        }
        Ok(n as usize)
    }
}

/// Hashes and counts the raw blob as it is read; refuses to read past the
/// size its descriptor gives.
struct Verifying<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    size: Option<u64>,
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if self.size.is_some_and(|size| self.read > size) {
            return Err(io::Error::other("blob is larger than its descriptor says"));
        }
        Ok(n)
    }
}

/// Unpacks layers, in order, into one root file system.
pub(super) struct Unpacker {
    root: Root,
    budget: Budget,
    entries: u64,
    /// Sum of the entries' sizes, all layers together.
    file_bytes: u64,
}

impl Unpacker {
    pub fn new(rootfs: &Path, limits: UnpackLimits) -> Result<Unpacker, ImageError> {
        let root = Root::open(rootfs)
            .map_err(|e| ImageError::Io {
                path: rootfs.to_path_buf(),
                source: io::Error::other(e),
            })?
            .with_resolver_flags(ResolverFlags::NO_SYMLINKS);
        Ok(Unpacker {
            root,
            budget: Budget {
                limits,
                bytes: Cell::new(0),
                since_entry: Cell::new(0),
                in_headers: Cell::new(true),
                crossed: Cell::new(None),
            },
            entries: 0,
            file_bytes: 0,
        })
    }

    /// Applies one layer, verifying the blob's digest (and size) as it is read.
    /// On any error the root is left in an unspecified state *inside itself*:
    /// the caller discards it.
    pub fn apply(&mut self, layer: &Layer) -> Result<(), ImageError> {
        let io_error = |source| ImageError::Io {
            path: layer.path.clone(),
            source,
        };
        let file = super::open_regular(&layer.path).map_err(io_error)?;
        let actual_size = file.metadata().map_err(io_error)?.len();
        if let Some(size) = layer.size.filter(|&s| s != actual_size) {
            return Err(ImageError::SizeMismatch {
                path: layer.path.clone(),
                expected: size,
                actual: actual_size,
            });
        }
        let mut blob = Verifying {
            inner: file,
            hasher: Sha256::new(),
            read: 0,
            size: layer.size,
        };
        let applied = {
            let decompressed: Box<dyn Read + '_> = if layer.gzip {
                Box::new(flate2::read::GzDecoder::new(&mut blob))
            } else {
                Box::new(&mut blob)
            };
            self.apply_entries(decompressed, layer)
        };
        // Hash what the tar reader left unread (the end-of-archive padding),
        // so that a tampered blob reports as tampered whatever else failed.
        let drained = io::copy(&mut blob, &mut io::sink());
        let actual = hex::encode(blob.hasher.finalize());
        if actual != layer.sha256 {
            return Err(ImageError::DigestMismatch {
                path: layer.path.clone(),
                expected: format!("sha256:{}", layer.sha256),
                actual: format!("sha256:{actual}"),
            });
        }
        applied?;
        drained.map(drop).map_err(io_error)
    }

    fn apply_entries(&mut self, stream: impl Read, layer: &Layer) -> Result<(), ImageError> {
        self.budget.since_entry.set(0);
        let mut archive = tar::Archive::new(Metered {
            inner: stream,
            budget: &self.budget,
        });
        let mut written = Written::default();
        let entries = archive
            .entries()
            .map_err(|e| stream_error(&self.budget, layer, HEADER, e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| stream_error(&self.budget, layer, HEADER, e))?;
            self.budget.in_headers.set(false);
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            self.entries += 1;
            // What the entry unpacks to: more than its bytes in the stream for
            // a GNU sparse file, whose holes the tar reader fills with zeros.
            self.file_bytes = self.file_bytes.saturating_add(entry.size());
            let limits = self.budget.limits;
            let crossed = if self.entries > limits.max_entries {
                Some(Limit::Entries(limits.max_entries))
            } else if self.file_bytes > limits.max_bytes {
                Some(Limit::Bytes(limits.max_bytes))
            } else {
                None
            };
            if let Some(limit) = crossed {
                return Err(ImageError::LimitExceeded {
                    layer: layer.path.clone(),
                    limit,
                });
            }
            let refused = |why| ImageError::EntryRefused {
                layer: layer.path.clone(),
                entry: name.clone(),
                why,
            };
            let path = entry_path(&entry.path_bytes()).map_err(refused)?;
            match apply_entry(&self.root, &mut entry, &path, &mut written) {
                Ok(()) => {}
                Err(EntryError::Refused(why)) => return Err(refused(why)),
                Err(EntryError::Io(e)) => return Err(stream_error(&self.budget, layer, &name, e)),
            }
            // Whatever data the entry carries counts against the budget; only
            // headers may be read between here and the next entry.
            io::copy(&mut entry, &mut io::sink())
                .map_err(|e| stream_error(&self.budget, layer, &name, e))?;
            self.budget.since_entry.set(0);
            self.budget.in_headers.set(true);
        }
        Ok(())
    }
}

fn stream_error(budget: &Budget, layer: &Layer, entry: &str, source: io::Error) -> ImageError {
    match budget.crossed.get() {
        Some(limit) => ImageError::LimitExceeded {
            layer: layer.path.clone(),
            limit,
        },
        None => ImageError::Unpack {
            layer: layer.path.clone(),
            entry: entry.to_string(),
            source,
        },
    }
}

enum EntryError {
    Refused(Refusal),
    Io(io::Error),
}

impl From<io::Error> for EntryError {
    fn from(e: io::Error) -> Self {
        EntryError::Io(e)
    }
}

impl From<pathrs::error::Error> for EntryError {
    fn from(e: pathrs::error::Error) -> Self {
        // With `RESOLVE_NO_SYMLINKS`, and final names never followed, ELOOP
        // means a symlink in the folder path.
        if e.kind() == ErrorKind::OsError(Some(libc::ELOOP)) {
            return EntryError::Refused(Refusal::SymlinkInPath);
        }
        EntryError::Io(io::Error::other(e))
    }
}

/// Paths this layer created, with their ancestors: an opaque whiteout hides
/// only what lower layers put in its folder.
#[derive(Default)]
struct Written(HashSet<PathBuf>);

impl Written {
    fn record(&mut self, path: &Path) {
        for ancestor in path.ancestors() {
            if !self.0.insert(ancestor.to_path_buf()) {
                break;
            }
        }
    }
}

/// A checked entry path, relative to the root; empty for the root itself.
/// `./`, `//` and trailing slashes are normalised away.
fn entry_path(raw: &[u8]) -> Result<PathBuf, Refusal> {
    if raw.starts_with(b"/") {
        return Err(Refusal::Absolute);
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(Refusal::PathTooLong);
    }
    if raw.contains(&0) {
        return Err(Refusal::NulByte);
    }
    let mut path = PathBuf::new();
    let mut depth = 0;
    for name in raw.split(|&b| b == b'/') {
        match name {
            b"" | b"." => continue,
            b".." => return Err(Refusal::ParentComponent),
            _ if name.len() > MAX_NAME_BYTES => return Err(Refusal::NameTooLong),
            _ => {}
        }
        depth += 1;
        if depth > MAX_DEPTH {
            return Err(Refusal::TooDeep);
        }
        path.push(OsStr::from_bytes(name));
    }
    Ok(path)
}

enum Whiteout<'a> {
    /// `.wh.NAME`: NAME is removed.
    Remove(&'a OsStr),
    /// `.wh..wh..opq`: what lower layers put in the folder is removed.
    Opaque,
    /// Other `.wh..wh.` names: AUFS bookkeeping, ignored.
    Bookkeeping,
}

fn whiteout(name: &OsStr) -> Option<Whiteout<'_>> {
    let hidden = name.as_bytes().strip_prefix(b".wh.")?;
    Some(match hidden {
        b".wh..opq" => Whiteout::Opaque,
        _ if hidden.starts_with(b".wh.") => Whiteout::Bookkeeping,
        _ => Whiteout::Remove(OsStr::from_bytes(hidden)),
    })
}

fn apply_entry(
    root: &Root,
    entry: &mut tar::Entry<'_, impl Read>,
    path: &Path,
    written: &mut Written,
) -> Result<(), EntryError> {
    let kind = entry.header().entry_type();
    if kind == tar::EntryType::XGlobalHeader {
        // PAX records for the whole archive (`git archive` writes one): nothing to unpack.
        return Ok(());
    }
    let Some(name) = path.file_name() else {
        // The archive's `./`: the root's mode is the cache's to decide.
        return match kind {
            tar::EntryType::Directory => Ok(()),
            _ => Err(EntryError::Refused(Refusal::Root(entry_kind(kind)))),
        };
    };
    let parent_path = path.parent().unwrap_or(Path::new(""));
    if let Some(whiteout) = whiteout(name) {
        return match whiteout {
            Whiteout::Remove(hidden) => remove_hidden(root, parent_path, hidden),
            // A folder that does not resolve has nothing from lower layers to hide.
            Whiteout::Opaque => match root.resolve(in_root(parent_path)) {
                Ok(dir) => clear_lower(&dir, parent_path, written),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(e.into()),
            },
            Whiteout::Bookkeeping => Ok(()),
        };
    }
    if is_special(kind) {
        tracing::debug!(entry = %path.display(), kind = entry_kind(kind), "image layer: special file not unpacked");
        return Ok(());
    }
    if !is_supported(kind) {
        return Err(EntryError::Refused(Refusal::UnsupportedType(
            kind.as_byte() as char,
        )));
    }
    // Checked before anything is created or removed.
    let link_target = match kind {
        tar::EntryType::Link => Some(
            entry_path(&entry.link_name_bytes().unwrap_or_default())
                .and_then(|t| match t.as_os_str().is_empty() {
                    true => Err(Refusal::EmptyLinkTarget),
                    false => Ok(t),
                })
                .map_err(|why| EntryError::Refused(Refusal::HardLinkTarget(Box::new(why))))?,
        ),
        tar::EntryType::Symlink => {
            let target = entry.link_name_bytes().unwrap_or_default().into_owned();
            if target.is_empty() {
                return Err(EntryError::Refused(Refusal::EmptyLinkTarget));
            }
            if target.contains(&0) {
                return Err(EntryError::Refused(Refusal::NulByte));
            }
            Some(PathBuf::from(OsStr::from_bytes(&target)))
        }
        _ => None,
    };
    let parent = root.mkdir_all(in_root(parent_path), &dir_perm())?;
    let at = RootRef::from_fd(parent.as_fd());
    let mode = entry.header().mode().map_err(EntryError::Io)? & KEPT_MODE_BITS;
    let existing = lstat_type(&parent, name)?;
    let keep_dir = kind == tar::EntryType::Directory && existing == Some(SFlag::S_IFDIR);
    if existing.is_some() && !keep_dir {
        at.remove_all(name)?;
    }
    match (kind, link_target) {
        (tar::EntryType::Directory, _) => {
            if !keep_dir {
                at.create(name, &InodeType::Directory(dir_perm()))?;
            }
            let dir = at
                .resolve_nofollow(name)?
                .reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY)?;
            dir.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        (tar::EntryType::Symlink, Some(target)) => at.create(name, &InodeType::Symlink(target))?,
        (tar::EntryType::Link, Some(target)) => {
            // The target resolves inside the root too, through real folders only;
            // its last name is not followed (a link to a symlink links the symlink).
            root.create(in_root(path), &InodeType::Hardlink(in_root(&target)))?;
        }
        _ => {
            let mut file = at.create_file(
                name,
                OpenFlags::O_WRONLY
                    | OpenFlags::O_EXCL
                    | OpenFlags::O_NOFOLLOW
                    | OpenFlags::O_CLOEXEC,
                &std::fs::Permissions::from_mode(0o600),
            )?;
            io::copy(entry, &mut file)?;
            file.flush()?;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            // Best effort (a hostile time may not fit in a SystemTime): only tools
            // comparing timestamps, such as Python's bytecode cache, look at it.
            let mtime = entry
                .header()
                .mtime()
                .ok()
                .and_then(|secs| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)));
            if let Some(mtime) = mtime {
                let _ = file.set_modified(mtime);
            }
        }
    }
    written.record(path);
    Ok(())
}

/// `path`, made absolute for pathrs: resolved from the root, never the cwd.
fn in_root(path: &Path) -> PathBuf {
    Path::new("/").join(path)
}

fn dir_perm() -> std::fs::Permissions {
    std::fs::Permissions::from_mode(0o755)
}

/// The type of `name` in `dir`, without following it; None when absent.
fn lstat_type(dir: &Handle, name: &OsStr) -> Result<Option<SFlag>, EntryError> {
    match fstatat(
        Some(dir.as_fd().as_raw_fd()),
        name,
        AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(stat) => Ok(Some(
            SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT,
        )),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(EntryError::Io(e.into())),
    }
}

fn is_not_found(e: &pathrs::error::Error) -> bool {
    e.kind() == ErrorKind::OsError(Some(libc::ENOENT))
}

/// `.wh.NAME` in `parent`: removes NAME (a whole folder, if it is one) when it
/// exists. A missing parent means there is nothing to hide.
fn remove_hidden(root: &Root, parent: &Path, hidden: &OsStr) -> Result<(), EntryError> {
    match hidden.as_bytes() {
        b"" => return Err(EntryError::Refused(Refusal::EmptyWhiteout)),
        b"." | b".." => return Err(EntryError::Refused(Refusal::ParentComponent)),
        _ => {}
    }
    let dir = match root.resolve(in_root(parent)) {
        Ok(dir) => dir,
        Err(e) if is_not_found(&e) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    match RootRef::from_fd(dir.as_fd()).remove_all(hidden) {
        Err(e) if !is_not_found(&e) => Err(e.into()),
        _ => Ok(()),
    }
}

/// Opaque whiteout of `dir`: removes everything in it this layer did not
/// write, descending into folders this layer wrote into.
fn clear_lower(dir: &Handle, dir_path: &Path, written: &Written) -> Result<(), EntryError> {
    let listing = dir.reopen(OpenFlags::O_RDONLY | OpenFlags::O_DIRECTORY)?;
    let mut names = Vec::new();
    for item in nix::dir::Dir::from_fd(listing.into_raw_fd())
        .map_err(io::Error::from)?
        .iter()
    {
        let name =
            OsStr::from_bytes(item.map_err(io::Error::from)?.file_name().to_bytes()).to_os_string();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    let at = RootRef::from_fd(dir.as_fd());
    for name in names {
        let child = dir_path.join(&name);
        if !written.0.contains(&child) {
            at.remove_all(&name)?;
        } else if lstat_type(dir, &name)? == Some(SFlag::S_IFDIR) {
            clear_lower(&at.resolve_nofollow(&name)?, &child, written)?;
        }
    }
    Ok(())
}

fn is_special(kind: tar::EntryType) -> bool {
    matches!(
        kind,
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo
    )
}

fn is_supported(kind: tar::EntryType) -> bool {
    matches!(
        kind,
        tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::GNUSparse
            | tar::EntryType::Directory
            | tar::EntryType::Symlink
            | tar::EntryType::Link
    )
}

fn entry_kind(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Directory => "folder",
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hard-link",
        tar::EntryType::Char => "character-device",
        tar::EntryType::Block => "block-device",
        tar::EntryType::Fifo => "fifo",
        _ => "file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_are_normalised_or_refused() {
        assert_eq!(entry_path(b"./a//b/./c/").unwrap(), Path::new("a/b/c"));
        assert_eq!(entry_path(b"./").unwrap(), Path::new(""));
        assert!(matches!(entry_path(b"/etc/passwd"), Err(Refusal::Absolute)));
        assert!(matches!(
            entry_path(b"a/../../b"),
            Err(Refusal::ParentComponent)
        ));
        assert!(matches!(entry_path(b"a/\0b"), Err(Refusal::NulByte)));
    }

    #[test]
    fn whiteout_names_are_told_apart() {
        assert!(matches!(
            whiteout(OsStr::new(".wh..wh..opq")),
            Some(Whiteout::Opaque)
        ));
        assert!(matches!(
            whiteout(OsStr::new(".wh..wh.plnk")),
            Some(Whiteout::Bookkeeping)
        ));
        assert!(matches!(whiteout(OsStr::new(".wh.x")), Some(Whiteout::Remove(n)) if n == "x"));
        assert!(whiteout(OsStr::new("x.wh.y")).is_none());
    }
}
