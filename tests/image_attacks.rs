//! Hostile images, written as the attacks: layers that try to delete, write or
//! link host files, set-id files, forged digests, bombs. Each test asserts the
//! refusal (or the in-root meaning) and that the host folder beside the image
//! store is exactly as it was.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;
use toolwarden::runner::images::{ImageError, ImageStore, Limit, Refusal, UnpackLimits};

/// A tar layer built entry by entry with raw names, as an attacker writes them
/// (the tar crate's builder refuses `..` and absolute paths).
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn entry(mut self, kind: EntryType, name: &str, link: &str, mode: u32, data: &[u8]) -> Layer {
        if name.len() > 100 {
            self = self.entry(
                EntryType::GNULongName,
                "././@LongLink",
                "",
                0o644,
                &[name.as_bytes(), b"\0"].concat(),
            );
        }
        if link.len() > 100 {
            self = self.entry(
                EntryType::GNULongLink,
                "././@LongLink",
                "",
                0o644,
                &[link.as_bytes(), b"\0"].concat(),
            );
        }
        let mut header = tar::Header::new_gnu();
        let raw = header.as_old_mut();
        let short = &name.as_bytes()[..name.len().min(100)];
        raw.name[..short.len()].copy_from_slice(short);
        let link = &link.as_bytes()[..link.len().min(100)];
        raw.linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        self.0.append(&header, data).unwrap();
        self
    }

    fn file(self, name: &str, data: &str) -> Layer {
        self.entry(EntryType::Regular, name, "", 0o644, data.as_bytes())
    }

    fn dir(self, name: &str) -> Layer {
        self.entry(EntryType::Directory, name, "", 0o755, b"")
    }

    fn symlink(self, name: &str, target: &str) -> Layer {
        self.entry(EntryType::Symlink, name, target, 0o777, b"")
    }

    fn hardlink(self, name: &str, target: &str) -> Layer {
        self.entry(EntryType::Link, name, target, 0o644, b"")
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// An image store in a temporary folder, beside a `host/` folder that stands
/// for everything outside the root file system.
struct Fixture {
    dir: tempfile::TempDir,
    store: ImageStore,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = common::world_traversable_tempdir();
        let store = ImageStore::new(dir.path().join("images"), dir.path().join("cache"));
        std::fs::create_dir_all(&store.dir).unwrap();
        let host = dir.path().join("host");
        std::fs::create_dir_all(host.join("dir/deeper")).unwrap();
        std::fs::write(host.join("victim.txt"), "keep me").unwrap();
        std::fs::write(host.join("dir/inner.txt"), "keep me too").unwrap();
        std::fs::write(host.join("dir/deeper/leaf.txt"), "and me").unwrap();
        Fixture { dir, store }
    }

    fn host(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    /// Every path under `host/` with its type, mode, link count and content.
    fn host_state(&self) -> BTreeMap<PathBuf, (u32, u64, Vec<u8>)> {
        fn walk(p: &Path, out: &mut BTreeMap<PathBuf, (u32, u64, Vec<u8>)>) {
            let meta = std::fs::symlink_metadata(p).unwrap();
            let content = if meta.is_file() {
                std::fs::read(p).unwrap()
            } else {
                vec![]
            };
            out.insert(p.to_path_buf(), (meta.mode(), meta.nlink(), content));
            if meta.is_dir() {
                for e in std::fs::read_dir(p).unwrap() {
                    walk(&e.unwrap().path(), out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.host(), &mut out);
        out
    }

    fn tarball(&self, name: &str, layer: Vec<u8>) {
        std::fs::write(self.store.dir.join(format!("{name}.tar")), layer).unwrap();
    }

    /// An OCI layout for `example.com/tool:v1` holding `layers`; returns the
    /// manifest digest (`sha256:...`).
    fn oci(&self, folder: &str, layers: &[Vec<u8>]) -> String {
        let layout = self.store.dir.join(folder);
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let descriptors: Vec<_> = layers
            .iter()
            .map(|layer| {
                std::fs::write(blobs.join(sha(layer)), layer).unwrap();
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{}", sha(layer)), "size": layer.len()})
            })
            .collect();
        let manifest = serde_json::json!({"schemaVersion": 2, "layers": descriptors}).to_string();
        std::fs::write(blobs.join(sha(manifest.as_bytes())), &manifest).unwrap();
        let digest = format!("sha256:{}", sha(manifest.as_bytes()));
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
        digest
    }

    /// Nothing is left in the cache by a refused image: no entry, no partial unpack.
    fn assert_cache_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.store.cache)
            .map(|rd| rd.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in the cache: {left:?}");
    }
}

fn refusal(err: &ImageError) -> &Refusal {
    match err {
        ImageError::EntryRefused { why, .. } => why,
        other => panic!("expected a refused entry, got {other:?} ({other})"),
    }
}

/// Every way of naming a path outside the root, for every entry type that
/// takes a path (whiteouts and hard-link targets included), is refused before
/// anything is written or removed.
#[test]
fn entries_naming_paths_outside_the_root_are_refused() {
    let fx = Fixture::new();
    let host = fx.host().display().to_string();
    let cases: Vec<(&str, Layer)> = vec![
        (
            "absolute whiteout of a file",
            Layer::new()
                .file("ok", "x")
                .file(&format!("{host}/.wh.victim.txt"), ""),
        ),
        (
            "absolute whiteout of a folder",
            Layer::new().file(&format!("{host}/.wh.dir"), ""),
        ),
        (
            "`..` whiteout",
            Layer::new().file("a/../../../host/.wh.victim.txt", ""),
        ),
        (
            "whiteout hiding `..`",
            Layer::new().dir("a").file("a/.wh...", ""),
        ),
        ("`..` file", Layer::new().file("../escape", "x")),
        (
            "absolute file",
            Layer::new().file(&format!("{host}/planted"), "x"),
        ),
        (
            "absolute folder",
            Layer::new().dir(&format!("{host}/newdir")),
        ),
        ("`..` symlink name", Layer::new().symlink("../../link", "/")),
        (
            "hard link to an absolute host file",
            Layer::new().hardlink("passwd", &format!("{host}/victim.txt")),
        ),
        (
            "hard link to /etc/passwd",
            Layer::new().hardlink("passwd", "/etc/passwd"),
        ),
        (
            "hard link climbing out",
            Layer::new().hardlink("passwd", "../../../../../etc/passwd"),
        ),
        (
            "hard link with an absolute name",
            Layer::new()
                .file("t", "x")
                .hardlink(&format!("{host}/l"), "t"),
        ),
    ];
    let before = fx.host_state();
    let passwd_links = std::fs::metadata("/etc/passwd").unwrap().nlink();
    for (i, (what, layer)) in cases.into_iter().enumerate() {
        let name = format!("evil{i}");
        fx.tarball(&name, layer.bytes());
        let err = fx.store.resolve(&name).unwrap_err();
        assert_eq!(err.reason(), "ImageEntryRefused", "{what}: {err}");
        assert!(
            matches!(
                refusal(&err),
                Refusal::Absolute | Refusal::ParentComponent | Refusal::HardLinkTarget(_)
            ),
            "{what}: {err}"
        );
        assert_eq!(fx.host_state(), before, "{what} changed the host");
        fx.assert_cache_empty();
    }
    assert_eq!(
        std::fs::metadata("/etc/passwd").unwrap().nlink(),
        passwd_links
    );
}

/// A symlink an earlier entry (or layer) planted is never followed: in an
/// entry's folder path (whiteouts, files, opaque whiteouts, hard-link targets
/// under it) it is refused; as the entry's own name it is replaced, never
/// written through; a hard link to it links the symlink itself.
#[test]
fn planted_symlinks_never_lead_out_of_the_root() {
    let fx = Fixture::new();
    let host = fx.host().display().to_string();
    let host_in_root = host.trim_start_matches('/').to_string();
    let deep_up = format!("{}{host}", "../".repeat(40));
    let passwd = std::fs::read("/etc/passwd").unwrap();
    // (attack, layers, Ok(file in the root and its content) or the refusal's reason)
    type Expect = Result<Option<(String, &'static str)>, &'static str>;
    let refused = || Err("ImageEntryRefused");
    let cases: Vec<(&str, Vec<Vec<u8>>, Expect)> = vec![
        (
            "whiteout through an absolute symlink",
            vec![
                Layer::new()
                    .symlink("evil", &host)
                    .file("evil/.wh.victim.txt", "")
                    .bytes(),
            ],
            refused(),
        ),
        (
            "folder whiteout through a relative climbing symlink",
            vec![
                Layer::new()
                    .symlink("evil", &deep_up)
                    .file("evil/.wh.dir", "")
                    .bytes(),
            ],
            refused(),
        ),
        (
            "whiteout through a symlink from a lower layer",
            vec![
                Layer::new().symlink("evil", &host).bytes(),
                Layer::new().file("evil/dir/.wh.inner.txt", "").bytes(),
            ],
            refused(),
        ),
        (
            "opaque whiteout through a symlink",
            vec![
                Layer::new()
                    .symlink("evil", &host)
                    .file("evil/.wh..wh..opq", "")
                    .bytes(),
            ],
            refused(),
        ),
        (
            "file through a symlink to /etc",
            vec![
                Layer::new()
                    .dir("etc")
                    .symlink("evil", "/etc")
                    .file("evil/passwd", "pwned")
                    .bytes(),
            ],
            refused(),
        ),
        (
            "file through a symlink in a lower layer, to a folder the root has",
            vec![
                Layer::new()
                    .file(&format!("{host_in_root}/dir/inner.txt"), "lower")
                    .symlink("evil", &format!("{host}/dir"))
                    .bytes(),
                Layer::new().file("evil/inner.txt", "overwritten").bytes(),
            ],
            refused(),
        ),
        (
            "folder through a symlink",
            vec![
                Layer::new()
                    .symlink("evil", &host)
                    .dir("evil/newdir")
                    .bytes(),
            ],
            refused(),
        ),
        (
            "hard link whose target is under a symlinked folder",
            vec![
                Layer::new()
                    .symlink("evil", &host)
                    .hardlink("stolen", "evil/victim.txt")
                    .bytes(),
            ],
            refused(),
        ),
        (
            "hard link placed under a symlinked folder",
            vec![
                Layer::new()
                    .file("t", "x")
                    .symlink("evil", &host)
                    .hardlink("evil/stolen", "t")
                    .bytes(),
            ],
            refused(),
        ),
        (
            "symlink placed under a symlinked folder",
            vec![
                Layer::new()
                    .symlink("evil", &host)
                    .symlink("evil/x", "/")
                    .bytes(),
            ],
            refused(),
        ),
        (
            "file replacing a symlink to a host file",
            vec![
                Layer::new()
                    .symlink("evil", &format!("{host}/victim.txt"))
                    .bytes(),
                Layer::new().file("evil", "overwritten").bytes(),
            ],
            Ok(Some(("evil".into(), "overwritten"))),
        ),
        (
            "file replacing a symlink to /etc/passwd in the same layer",
            vec![
                Layer::new()
                    .symlink("evil", "/etc/passwd")
                    .file("evil", "overwritten")
                    .bytes(),
            ],
            Ok(Some(("evil".into(), "overwritten"))),
        ),
        (
            "hard link to a symlink to a host file",
            vec![
                Layer::new()
                    .symlink("evil", &format!("{host}/victim.txt"))
                    .hardlink("stolen", "evil")
                    .bytes(),
            ],
            Ok(None),
        ),
        (
            "whiteout of the symlink itself",
            vec![
                Layer::new().symlink("evil", &host).bytes(),
                Layer::new().file(".wh.evil", "").bytes(),
            ],
            Ok(None),
        ),
    ];
    for (what, layers, expect) in cases {
        let before = fx.host_state();
        fx.oci("example.com_tool_v1", &layers);
        let result = fx.store.resolve("example.com/tool:v1");
        assert_eq!(
            fx.host_state(),
            before,
            "{what} changed the host ({result:?})"
        );
        assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd, "{what}");
        match (result, expect) {
            (Ok(rootfs), Ok(file)) => {
                for name in ["evil", "stolen"] {
                    if let Ok(meta) = std::fs::symlink_metadata(rootfs.join(name)) {
                        // Whatever is left is a symlink (resolved in the sandbox's
                        // root) or a file of the image's own.
                        assert!(meta.is_symlink() || meta.is_file(), "{what}: {name}");
                    }
                }
                if let Some((path, content)) = file {
                    let meta = std::fs::symlink_metadata(rootfs.join(&path)).unwrap();
                    assert!(meta.is_file(), "{what}: {path} is not a file in the root");
                    assert_eq!(
                        std::fs::read_to_string(rootfs.join(&path)).unwrap(),
                        content,
                        "{what}"
                    );
                }
            }
            (Err(err), Err(reason)) => {
                assert_eq!(err.reason(), reason, "{what}: {err}");
                fx.assert_cache_empty();
            }
            (result, expect) => panic!("{what}: got {result:?}, expected {expect:?}"),
        }
        std::fs::remove_dir_all(fx.store.dir.join("example.com_tool_v1")).unwrap();
        let _ = std::fs::remove_dir_all(&fx.store.cache);
    }
}

/// `.wh..wh..opq` hides what lower layers put in its folder, keeps what the
/// same layer puts there (before or after the marker), and `.wh.NAME` removes
/// files and whole folders of lower layers.
#[test]
fn opaque_and_plain_whiteouts_follow_the_oci_rules() {
    let fx = Fixture::new();
    let lower = Layer::new()
        .file("d/a", "lower")
        .file("d/sub/b", "lower")
        .file("d/sub/c", "lower")
        .file("e/gone", "lower")
        .file("f/x", "lower")
        .file("keep", "lower")
        .bytes();
    let upper = Layer::new()
        .file("d/sub/new-before", "upper")
        .file("d/.wh..wh..opq", "")
        .file("d/new-after", "upper")
        .file(".wh.e", "")
        .file("f/.wh.x", "")
        .file(".wh.not-there", "")
        .bytes();
    fx.oci("example.com_tool_v1", &[lower, upper]);
    let rootfs = fx.store.resolve("example.com/tool:v1").unwrap();
    let mut found: Vec<String> = walk_names(&rootfs);
    found.sort();
    assert_eq!(
        found,
        ["d", "d/new-after", "d/sub", "d/sub/new-before", "f", "keep"]
    );
}

fn walk_names(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// A setuid-root shell in an image gives a local user nothing: set-id bits and
/// group/other write bits are stripped, and the unpacked tree is not reachable
/// by other users at all.
#[test]
fn set_id_files_are_neutralised_and_the_cache_is_private() {
    let fx = Fixture::new();
    let busybox = std::fs::read(common::BUSYBOX).unwrap_or_else(|_| b"#!/bin/sh\nid -u\n".to_vec());
    let layer = Layer::new()
        .entry(EntryType::Directory, "bin", "", 0o2777, b"")
        .entry(EntryType::Regular, "bin/rootshell", "", 0o4755, &busybox)
        .entry(EntryType::Regular, "bin/groupshell", "", 0o2755, &busybox)
        .entry(EntryType::Regular, "writable", "", 0o666, b"x")
        .entry(EntryType::Directory, "tmp", "", 0o1777, b"")
        .bytes();
    fx.tarball("setuid", layer);
    let rootfs = fx.store.resolve("setuid").unwrap();
    let mode = |p: &str| std::fs::metadata(rootfs.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("bin"), 0o755);
    assert_eq!(mode("bin/rootshell"), 0o755);
    assert_eq!(mode("bin/groupshell"), 0o755);
    assert_eq!(mode("writable"), 0o644);
    assert_eq!(mode("tmp"), 0o1755);
    let cache = std::fs::metadata(&fx.store.cache).unwrap();
    assert_eq!(cache.mode() & 0o7777, 0o711);
    let entry = std::fs::metadata(rootfs.parent().unwrap()).unwrap();
    if nix::unistd::geteuid().is_root() {
        assert_eq!(entry.mode() & 0o7777, 0o710);
        assert_eq!(entry.gid(), toolwarden::sandbox::detect::USERNS_HOST_BASE);
        // The attack: a local user runs the image's setuid shell.
        use std::os::unix::process::CommandExt;
        let run = std::process::Command::new(rootfs.join("bin/rootshell"))
            .args(["id", "-u"])
            .uid(65534)
            .gid(65534)
            .output();
        match run {
            Ok(out) => panic!("a local user reached the image: {out:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}"),
        }
    } else {
        assert_eq!(entry.mode() & 0o7777, 0o700);
    }
}

/// A digest pin must name the manifest that is used; a tampered manifest or
/// layer blob is refused however it was selected; a pinned reference to a plain
/// tarball or tree (no manifest to check) is refused.
#[test]
fn digest_pins_and_blob_digests_are_verified() {
    let fx = Fixture::new();
    let layer = Layer::new().file("bin/tool", "v1").bytes();
    let digest = fx.oci("example.com_tool_v1", std::slice::from_ref(&layer));
    let layout = fx.store.dir.join("example.com_tool_v1");

    // The attack: the policy is satisfied by a pin, the layout holds another image.
    let other = format!("sha256:{}", "e".repeat(64));
    let pinned_name = |d: &str| format!("example.com_tool_v1_{}", d.replace(':', "_"));
    std::fs::rename(&layout, fx.store.dir.join(pinned_name(&other))).unwrap();
    let err = fx
        .store
        .resolve(&format!("example.com/tool:v1@{other}"))
        .unwrap_err();
    assert_eq!(err.reason(), "ImagePinMismatch", "{err}");
    assert!(err.to_string().contains(&digest), "{err}");
    fx.assert_cache_empty();

    // The right pin works.
    std::fs::rename(
        fx.store.dir.join(pinned_name(&other)),
        fx.store.dir.join(pinned_name(&digest)),
    )
    .unwrap();
    let pinned = format!("example.com/tool:v1@{digest}");
    let rootfs = fx.store.resolve(&pinned).unwrap();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("bin/tool")).unwrap(),
        "v1"
    );
    std::fs::remove_dir_all(&fx.store.cache).unwrap();

    // index.json claims the pinned digest, but the blob under it says something else.
    let blobs = fx.store.dir.join(pinned_name(&digest)).join("blobs/sha256");
    let manifest_blob = blobs.join(digest.trim_start_matches("sha256:"));
    let original = std::fs::read(&manifest_blob).unwrap();
    let forged = String::from_utf8(original.clone())
        .unwrap()
        .replace("\"layers\"", "\"layers\" ");
    std::fs::write(&manifest_blob, &forged).unwrap();
    let err = fx.store.resolve(&pinned).unwrap_err();
    assert!(matches!(err.reason(), "ImageDigestMismatch"), "{err}");
    std::fs::write(&manifest_blob, &original).unwrap();

    // A tampered layer, same size, and a longer one.
    let layer_blob = blobs.join(sha(&layer));
    let mut tampered = layer.clone();
    let at = tampered.windows(2).position(|w| w == b"v1").unwrap();
    tampered[at + 1] = b'2';
    for bad in [tampered, [layer.clone(), vec![0; 512]].concat()] {
        std::fs::write(&layer_blob, &bad).unwrap();
        let err = fx.store.resolve(&pinned).unwrap_err();
        assert_eq!(err.reason(), "ImageDigestMismatch", "{err}");
        fx.assert_cache_empty();
    }

    // Pinned references to plain root file systems cannot be checked.
    fx.tarball(
        &pinned_name(&other).replace("example.com_tool_v1", "plain"),
        Layer::new().file("x", "y").bytes(),
    );
    let err = fx.store.resolve(&format!("plain@{other}")).unwrap_err();
    assert_eq!(err.reason(), "ImagePinUnverifiable", "{err}");
    std::fs::create_dir(
        fx.store
            .dir
            .join(format!("tree_{}", other.replace(':', "_"))),
    )
    .unwrap();
    let err = fx.store.resolve(&format!("tree@{other}")).unwrap_err();
    assert_eq!(err.reason(), "ImagePinUnverifiable", "{err}");
    let err = fx.store.resolve("tree@sha256:ABC").unwrap_err();
    assert_eq!(err.reason(), "ImageLayoutInvalid", "{err}");
}

/// A multi-platform index: the pin names the index, the manifest for this
/// machine is picked from it (and verified like every blob).
#[test]
fn a_pinned_index_selects_this_platform() {
    let fx = Fixture::new();
    let ours = fx.oci("ours", &[Layer::new().file("arch", "ours").bytes()]);
    let theirs = fx.oci("theirs", &[Layer::new().file("arch", "theirs").bytes()]);
    let layout = fx.store.dir.join("ours");
    for blob in std::fs::read_dir(fx.store.dir.join("theirs/blobs/sha256")).unwrap() {
        let blob = blob.unwrap();
        std::fs::copy(
            blob.path(),
            layout.join("blobs/sha256").join(blob.file_name()),
        )
        .unwrap();
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let size = |d: &str| {
        std::fs::metadata(
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
        .len()
    };
    let image_index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"digest": theirs, "size": size(&theirs), "platform": {"os": "linux", "architecture": "s390x"}},
        {"digest": ours, "size": size(&ours), "platform": {"os": "linux", "architecture": arch}},
        {"digest": theirs, "size": size(&theirs), "platform": {"os": "unknown", "architecture": "unknown"}}]})
    .to_string();
    std::fs::write(
        layout
            .join("blobs/sha256")
            .join(sha(image_index.as_bytes())),
        &image_index,
    )
    .unwrap();
    let index_digest = format!("sha256:{}", sha(image_index.as_bytes()));
    std::fs::write(
        layout.join("index.json"),
        serde_json::json!({"manifests": [{"digest": index_digest, "size": image_index.len(),
            "mediaType": "application/vnd.oci.image.index.v1+json"}]})
        .to_string(),
    )
    .unwrap();
    let reference = format!("example.com/multi@{index_digest}");
    std::fs::rename(
        &layout,
        fx.store
            .dir
            .join(toolwarden::runner::images::entry_name(&reference)),
    )
    .unwrap();
    let rootfs = fx.store.resolve(&reference).unwrap();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("arch")).unwrap(),
        "ours"
    );
}

/// Bombs and absurd names are refused with the limit they crossed, and leave
/// nothing behind.
#[test]
fn bombs_and_absurd_paths_are_refused_cleanly() {
    let mut fx = Fixture::new();
    fx.store.limits = UnpackLimits {
        max_bytes: 4 << 20,
        max_entries: 100,
    };

    // 64 MiB of zeros in a 64 KiB gzip layer.
    let mut bomb = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(64 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    let zeros = std::io::Read::take(std::io::repeat(0), 64 << 20);
    bomb.append_data(&mut header, "zeros", zeros).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &bomb.into_inner().unwrap()).unwrap();
    std::fs::write(fx.store.dir.join("gzbomb.tar.gz"), gz.finish().unwrap()).unwrap();
    let err = fx.store.resolve("gzbomb").unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::LimitExceeded {
                limit: Limit::Bytes(_),
                ..
            }
        ),
        "{err}"
    );
    fx.assert_cache_empty();

    // A GNU sparse file: 64 MiB of holes, no data at all in the stream.
    let mut header = tar::Header::new_gnu();
    header.set_path("holes").unwrap();
    header.set_entry_type(EntryType::GNUSparse);
    header.set_mode(0o644);
    header.set_size(0);
    let gnu = header.as_gnu_mut().unwrap();
    gnu.set_real_size(64 << 20);
    gnu.sparse[0].set_offset(64 << 20);
    gnu.sparse[0].set_length(0);
    header.set_cksum();
    let mut sparse = tar::Builder::new(Vec::new());
    sparse.append(&header, std::io::empty()).unwrap();
    fx.tarball("sparse", sparse.into_inner().unwrap());
    let err = fx.store.resolve("sparse").unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::LimitExceeded {
                limit: Limit::Bytes(_),
                ..
            }
        ),
        "{err}"
    );
    fx.assert_cache_empty();

    let mut many = Layer::new();
    for i in 0..101 {
        many = many.file(&format!("f{i}"), "");
    }
    fx.tarball("many", many.bytes());
    let err = fx.store.resolve("many").unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::LimitExceeded {
                limit: Limit::Entries(100),
                ..
            }
        ),
        "{err}"
    );
    fx.assert_cache_empty();

    // A GNU long name of 2 MiB: the tar reader would hold it in memory.
    fx.tarball(
        "longname",
        Layer::new().file(&"a/".repeat(1 << 20), "x").bytes(),
    );
    let err = fx.store.resolve("longname").unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::LimitExceeded {
                limit: Limit::HeaderBytes(_),
                ..
            }
        ),
        "{err}"
    );
    fx.assert_cache_empty();

    // A modification time no clock can hold.
    let mut header = tar::Header::new_gnu();
    header.set_path("forever").unwrap();
    header.set_size(1);
    header.set_mode(0o644);
    header.set_mtime(u64::MAX);
    header.set_cksum();
    let mut forever = tar::Builder::new(Vec::new());
    forever.append(&header, &b"x"[..]).unwrap();
    fx.tarball("forever", forever.into_inner().unwrap());
    let rootfs = fx.store.resolve("forever").unwrap();
    assert_eq!(std::fs::read(rootfs.join("forever")).unwrap(), b"x");
    std::fs::remove_dir_all(&fx.store.cache).unwrap();

    let cases = [
        ("deep", "d/".repeat(200) + "f", "deeper"),
        ("longpath", "abcdefgh/".repeat(500) + "f", "longer"),
        ("longname2", "n".repeat(300), "longer"),
    ];
    for (name, path, what) in cases {
        fx.tarball(name, Layer::new().file(&path, "x").bytes());
        let err = fx.store.resolve(name).unwrap_err();
        assert_eq!(err.reason(), "ImageEntryRefused", "{err}");
        assert!(err.to_string().contains(what), "{err}");
        fx.assert_cache_empty();
    }
}

/// Cache entries from an older version (or planted by someone) are not
/// trusted: they are unpacked again. A cache folder another user controls is
/// refused.
#[test]
fn stale_or_foreign_cache_entries_are_not_trusted() {
    let fx = Fixture::new();
    let tar = Layer::new().file("bin/tool", "real").bytes();
    let digest = sha(&tar);
    fx.tarball("tool", tar);
    // An entry as the previous version left it: world-readable, set-id files, `complete` marker.
    let old = fx.store.cache.join(&digest);
    std::fs::create_dir_all(old.join("rootfs/bin")).unwrap();
    std::fs::write(old.join("rootfs/bin/tool"), "planted").unwrap();
    std::fs::set_permissions(
        old.join("rootfs/bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::write(old.join("complete"), &digest).unwrap();
    // Another old entry no tool uses any more: swept all the same.
    let unused = fx.store.cache.join("f".repeat(64));
    std::fs::create_dir_all(unused.join("rootfs")).unwrap();
    std::fs::write(unused.join("complete"), "x").unwrap();

    let rootfs = fx.store.resolve("tool").unwrap();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("bin/tool")).unwrap(),
        "real"
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("bin/tool")).unwrap().mode() & 0o7777,
        0o644
    );
    assert!(!unused.exists());
    // Served from the cache the second time.
    assert_eq!(fx.store.resolve("tool").unwrap(), rootfs);

    if nix::unistd::geteuid().is_root() {
        let foreign = fx.dir.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        let store = ImageStore::new(fx.store.dir.clone(), foreign.join("cache"));
        let err = store.resolve("tool").unwrap_err();
        assert_eq!(err.reason(), "ImageCacheUnsafe", "{err}");
    }
    // A symlink planted where the cache is configured: refused, wherever it leads.
    let root_mode = std::fs::metadata("/").unwrap().mode();
    let link = fx.dir.path().join("link");
    std::os::unix::fs::symlink("/", &link).unwrap();
    let store = ImageStore::new(fx.store.dir.clone(), link.clone());
    let err = store.resolve("tool").unwrap_err();
    assert_eq!(err.reason(), "ImageCacheUnsafe", "{err}");
    assert_eq!(std::fs::metadata("/").unwrap().mode(), root_mode);
    let open = fx.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let store = ImageStore::new(fx.store.dir.clone(), open.join("cache"));
    let err = store.resolve("tool").unwrap_err();
    assert_eq!(err.reason(), "ImageCacheUnsafe", "{err}");
}

/// The examples' busybox image, unpacked from a tarball into the private
/// cache, still runs in a user-namespaced sandbox, and the setuid copy in it
/// does not raise the sandbox user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpacked_image_runs_in_a_user_namespaced_sandbox() {
    require_root!();
    let fx = Fixture::new();
    let tree = fx.dir.path().join("tree");
    common::build_busybox_rootfs(&tree);
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", &tree).unwrap();
    let mut header = tar::Header::new_gnu();
    let busybox = std::fs::read(common::BUSYBOX).unwrap();
    header.set_size(busybox.len() as u64);
    header.set_mode(0o4755);
    header.set_cksum();
    builder
        .append_data(&mut header, "bin/busybox-suid", &busybox[..])
        .unwrap();
    fx.tarball("busybox", builder.into_inner().unwrap());
    let rootfs = fx.store.resolve("busybox").unwrap();

    let engine = common::engine();
    let spec = toolwarden::sandbox::SandboxSpec {
        rootfs,
        mounts: vec![],
        limits: common::limits(),
        warm_pool: 0,
        call_files_dir: None,
    };
    let pool = engine.pool(spec).await.unwrap();
    assert!(
        pool.enforcement().user_namespace,
        "{:?}",
        pool.enforcement()
    );
    let o = common::run(&pool, common::sh("/bin/busybox-suid id -u; ls /bin/sh")).await;
    assert_eq!(common::text(&o.stdout), "65534\n/bin/sh\n", "{o:?}");
}

/// The way `serve` meets a hostile image: loading the tool, before any call.
/// The tool is refused with the reason, the host folder is untouched, and a
/// digest-pinned tool whose layout holds another manifest is refused too.
#[test]
fn loading_a_tool_with_a_hostile_image_refuses_it_and_changes_nothing() {
    use toolwarden::runner::ratelimit::LimiterClock;
    use toolwarden::runner::registry::Registry;
    use toolwarden::runner::tool::SecretsDir;
    let fx = Fixture::new();
    let host = fx.host().display().to_string();
    fx.tarball(
        "evil.example_wipe_1",
        Layer::new()
            .file("ok", "x")
            .file(&format!("{host}/.wh.dir"), "")
            .bytes(),
    );
    let digest = fx.oci(
        "evil.example_pinned_sha256_placeholder",
        &[Layer::new().file("x", "y").bytes()],
    );
    let pin = format!("sha256:{}", "d".repeat(64));
    std::fs::rename(
        fx.store.dir.join("evil.example_pinned_sha256_placeholder"),
        fx.store
            .dir
            .join(format!("evil.example_pinned_{}", pin.replace(':', "_"))),
    )
    .unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/execute-code.yaml"
    ))
    .unwrap();
    let tools = fx.dir.path().join("tools");
    std::fs::create_dir(&tools).unwrap();
    for (name, image) in [
        ("wipe", "evil.example/wipe:1".to_string()),
        ("pinned", format!("evil.example/pinned@{pin}")),
    ] {
        let manifest = example
            .replace("name: execute-code", &format!("name: {name}"))
            .replace("docker.io/library/busybox:1.36.1", &image);
        std::fs::write(tools.join(format!("{name}.yaml")), manifest).unwrap();
    }
    let before = fx.host_state();
    let store = ImageStore::new(fx.store.dir.clone(), fx.store.cache.clone());
    let registry = Registry::new(LimiterClock::real(), SecretsDir::default()).with_images(store);
    let report = registry.load(&[tools.join("wipe.yaml"), tools.join("pinned.yaml")]);
    assert!(report.served.is_empty(), "{report:?}");
    let reasons = |tool: &str| {
        report
            .refused
            .iter()
            .find(|r| r.tool == tool)
            .unwrap_or_else(|| panic!("{tool} not refused: {report:?}"))
            .reasons
            .join("; ")
    };
    assert!(
        reasons("wipe").contains("refused: absolute path"),
        "{}",
        reasons("wipe")
    );
    assert!(
        reasons("pinned").contains("pinned by digest") && reasons("pinned").contains(&digest),
        "{}",
        reasons("pinned")
    );
    assert_eq!(fx.host_state(), before);
    fx.assert_cache_empty();
}

/// A fifo planted as a blob is refused instead of blocking the load forever.
#[test]
fn a_fifo_blob_is_refused() {
    let fx = Fixture::new();
    let layer = Layer::new().file("x", "y").bytes();
    fx.oci("example.com_tool_v1", std::slice::from_ref(&layer));
    let blob = fx
        .store
        .dir
        .join("example.com_tool_v1/blobs/sha256")
        .join(sha(&layer));
    std::fs::remove_file(&blob).unwrap();
    nix::unistd::mkfifo(&blob, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let err = fx.store.resolve("example.com/tool:v1").unwrap_err();
    assert_eq!(err.reason(), "ImageUnreadable", "{err}");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

/// Digests are names of files in `blobs/`: one that is not 64 lowercase hex
/// digits (a path, another algorithm) is refused before any file is opened.
#[test]
fn descriptor_digests_cannot_name_other_files() {
    let fx = Fixture::new();
    fx.oci(
        "example.com_tool_v1",
        &[Layer::new().file("x", "y").bytes()],
    );
    let index = fx.store.dir.join("example.com_tool_v1/index.json");
    for digest in [
        "sha256:../../../../../../etc/passwd",
        "sha512:abcd",
        &format!("sha256:{}", "A".repeat(64)),
    ] {
        let forged = serde_json::json!({"manifests": [{"digest": digest}]});
        std::fs::write(&index, forged.to_string()).unwrap();
        let err = fx.store.resolve("example.com/tool:v1").unwrap_err();
        assert!(
            matches!(err, ImageError::UnsupportedDigest { .. }),
            "{digest}: {err}"
        );
    }
}

/// A PAX extended header record (`NN key=value\n`, NN counting itself).
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// Variants of the first suite's layer attacks: the escaping name or link
/// target carried by a PAX header instead of the tar header, and a hard link
/// laid over a planted symlink. All are refused (or stay inside the root) and
/// the host is untouched.
#[test]
fn pax_names_and_links_over_symlinks_stay_in_the_root() {
    let fx = Fixture::new();
    let host = fx.host().display().to_string();
    // The header's own name is harmless; the PAX record before it overrides it.
    let pax = |key: &str, value: &str, then: fn(Layer) -> Layer| {
        let record = pax_record(key, value);
        then(Layer::new().entry(EntryType::XHeader, "PaxHeaders/x", "", 0o644, &record)).bytes()
    };
    let refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "PAX path: absolute whiteout",
            pax("path", &format!("{host}/.wh.victim.txt"), |l| {
                l.file("harmless", "")
            }),
        ),
        (
            "PAX path: climbing file",
            pax("path", "../../host/victim.txt", |l| {
                l.file("harmless", "pwned")
            }),
        ),
        (
            "PAX linkpath: hard link to a host file",
            pax("linkpath", &format!("{host}/victim.txt"), |l| {
                l.hardlink("stolen", "harmless")
            }),
        ),
        (
            "PAX linkpath: climbing hard link",
            pax("linkpath", "../../../../../etc/passwd", |l| {
                l.hardlink("stolen", "harmless")
            }),
        ),
        (
            "whiteout through an in-root symlink (layers name real folders)",
            Layer::new()
                .dir("real")
                .file("real/x", "")
                .symlink("alias", "real")
                .file("alias/.wh.x", "")
                .bytes(),
        ),
    ];
    let before = fx.host_state();
    let passwd_links = std::fs::metadata("/etc/passwd").unwrap().nlink();
    for (i, (what, layer)) in refused.into_iter().enumerate() {
        let name = format!("variant{i}");
        fx.tarball(&name, layer);
        let err = fx.store.resolve(&name).unwrap_err();
        assert!(
            matches!(
                refusal(&err),
                Refusal::Absolute
                    | Refusal::ParentComponent
                    | Refusal::HardLinkTarget(_)
                    | Refusal::SymlinkInPath
            ),
            "{what}: {err}"
        );
        assert_eq!(fx.host_state(), before, "{what} changed the host");
        fx.assert_cache_empty();
    }
    assert_eq!(
        std::fs::metadata("/etc/passwd").unwrap().nlink(),
        passwd_links
    );

    // A hard link laid over a symlink to a host file replaces the symlink; the
    // host file gains no link and keeps its content.
    fx.oci(
        "example.com_tool_v1",
        &[
            Layer::new()
                .file("t", "image's own")
                .symlink("evil", &format!("{host}/victim.txt"))
                .bytes(),
            Layer::new().hardlink("evil", "t").bytes(),
        ],
    );
    let rootfs = fx.store.resolve("example.com/tool:v1").unwrap();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("evil")).unwrap(),
        "image's own"
    );
    assert_eq!(fx.host_state(), before);
    std::fs::remove_dir_all(fx.store.dir.join("example.com_tool_v1")).unwrap();

    // A folder declared over a symlink to a host folder replaces the symlink;
    // what goes into it (an opaque whiteout included) stays in the root.
    fx.oci(
        "example.com_tool_v1",
        &[
            Layer::new().symlink("evil", &format!("{host}/dir")).bytes(),
            Layer::new()
                .dir("evil")
                .file("evil/.wh..wh..opq", "")
                .file("evil/new", "in the root")
                .bytes(),
        ],
    );
    let rootfs = fx.store.resolve("example.com/tool:v1").unwrap();
    let evil = std::fs::symlink_metadata(rootfs.join("evil")).unwrap();
    assert!(evil.is_dir(), "{evil:?}");
    assert_eq!(walk_names(&rootfs.join("evil")).len(), 1);
    assert_eq!(fx.host_state(), before);
}

/// Set-id bits arriving in a later layer (a file replaced, a folder re-declared)
/// or through a hard link to a lower layer's file are stripped too; an opaque
/// whiteout of the root folder hides the lower layers and nothing else.
#[test]
fn set_id_bits_from_any_layer_are_stripped_and_a_root_opaque_whiteout_stays_inside() {
    let fx = Fixture::new();
    let before = fx.host_state();
    fx.oci(
        "example.com_tool_v1",
        &[
            Layer::new()
                .file("bin/sh", "#!/bin/sh\n")
                .file("lower-only", "x")
                .bytes(),
            Layer::new()
                .entry(EntryType::Directory, "bin", "", 0o6777, b"")
                .entry(EntryType::Regular, "bin/sh", "", 0o4755, b"#!/bin/sh\nid\n")
                .entry(EntryType::Regular, "bin/gsh", "", 0o2711, b"#!/bin/sh\n")
                .bytes(),
            Layer::new()
                .entry(EntryType::Link, "bin/sh-link", "bin/sh", 0o4755, b"")
                .bytes(),
        ],
    );
    let rootfs = fx.store.resolve("example.com/tool:v1").unwrap();
    let mode = |p: &str| std::fs::metadata(rootfs.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("bin"), 0o755);
    assert_eq!(mode("bin/sh"), 0o755);
    assert_eq!(mode("bin/gsh"), 0o711);
    assert_eq!(mode("bin/sh-link"), 0o755);
    assert!(rootfs.join("lower-only").exists());
    std::fs::remove_dir_all(fx.store.dir.join("example.com_tool_v1")).unwrap();

    fx.oci(
        "example.com_tool_v1",
        &[
            Layer::new().file("lower", "x").file("d/lower", "x").bytes(),
            Layer::new()
                .file(".wh..wh..opq", "")
                .file("upper", "y")
                .bytes(),
        ],
    );
    let rootfs = fx.store.resolve("example.com/tool:v1").unwrap();
    assert_eq!(walk_names(&rootfs), ["upper"]);
    assert_eq!(fx.host_state(), before);
}
