//! The mounts of our mount namespace, from `/proc/self/mountinfo`.
//!
//! Hand-written, on purpose: the kernel writes a space, tab, newline or backslash in a path as
//! an octal escape (`/a b` is `/a\040b`), and a parser that keeps the escape unmounts or reads
//! the wrong path. `procfs` 0.18 (already built here, through libcontainer) keeps mount points
//! and roots escaped (`MountInfo::from_line`), and the crates that decode them are small and
//! little kept. So the engine has this one parser, with its tests; every use goes through it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// The path of the file system shown at the mount point (a bind's source).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    /// Per-superblock options, e.g. `rw,cpu,cpuacct`.
    pub super_opts: String,
}

/// Our mount namespace's mounts.
pub fn mountinfo() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read("/proc/self/mountinfo")?))
}

/// Mount points of the file systems of these types in our mount namespace.
pub fn mounts_of_type(types: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    Ok(mountinfo()?
        .into_iter()
        .filter(|m| types.contains(&m.fstype.as_str()))
        .map(|m| m.mount_point)
        .collect())
}

/// Parses mountinfo text; a malformed line is skipped. Pure.
pub fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|b| *b == b'\n').filter_map(parse_line).collect()
}

/// `id parent major:minor root mount-point options [optional...] - fstype source superopts`
fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    // The optional fields end at a lone "-" (never inside a field: spaces are escaped).
    let sep = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    let path = |f: &[u8]| PathBuf::from(OsString::from_vec(unescape(f)));
    Some(MountEntry {
        root: path(fields.get(3)?),
        mount_point: path(fields.get(4)?),
        fstype: text(fields.get(sep + 1)?),
        super_opts: fields.get(sep + 3).map(|f| text(f)).unwrap_or_default(),
    })
}

/// Decodes the kernel's `\ooo` escapes (three octal digits); anything else is kept as is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_paths_are_decoded() {
        let text = b"36 35 98:0 /sub\\040dir /mnt/a\\040b\\011c\\012d\\134e rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                     37 36 0:32 / /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct\n";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].root, PathBuf::from("/sub dir"));
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/a b\tc\nd\\e"));
        assert_eq!(mounts[0].fstype, "ext3");
        assert_eq!(mounts[0].super_opts, "rw,errors=continue");
        assert_eq!(
            mounts[1].mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(mounts[1].fstype, "cgroup");
        assert_eq!(mounts[1].super_opts, "rw,cpu,cpuacct");
    }

    #[test]
    fn optional_fields_and_non_utf8_paths() {
        // No optional field, several, and a path that is not UTF-8 (\377).
        let text = b"1 0 0:1 / / rw - rootfs rootfs rw\n\
                     2 1 0:2 / /x\\377 rw shared:1 master:2 propagate_from:3 - tmpfs tmpfs rw\n";
        let mounts = parse(text);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/"));
        assert_eq!(mounts[0].fstype, "rootfs");
        assert_eq!(
            mounts[1].mount_point.as_os_str().as_encoded_bytes(),
            b"/x\xff"
        );
        assert_eq!(mounts[1].fstype, "tmpfs");
    }

    #[test]
    fn malformed_lines_and_escapes_never_panic() {
        for line in [
            &b""[..],
            b"1 2 3",
            b"1 0 0:1 / / rw",
            b"1 0 0:1 / / rw -",
            b"1 0 0:1 \\ \\04 rw - t",
            b"1 0 0:1 / /a\\400 rw - t s o",
            b"- - - - - - - - -",
        ] {
            let _ = parse(line);
        }
        // A lone or incomplete escape, or one above 255, stays as written.
        assert_eq!(unescape(b"a\\"), b"a\\");
        assert_eq!(unescape(b"a\\04"), b"a\\04");
        assert_eq!(unescape(b"\\400"), b"\\400");
        assert_eq!(unescape(b"\\0401"), b" 1");
        // A line with no separator is not a mount.
        assert!(parse(b"1 0 0:1 / / rw shared:1 tmpfs tmpfs rw").is_empty());
    }

    #[test]
    fn our_own_mountinfo_parses() {
        let mounts = mountinfo().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_point == std::path::Path::new("/"))
        );
    }
}
