//! Resolves a tool's `runtime.image` to a root file system on disk, from local
//! sources only (no registry access): in the images folder, an entry named
//! after the reference with `/`, `:` and `@` replaced by `_` (so
//! `docker.io/library/busybox:1.36.1` is `docker.io_library_busybox_1.36.1`):
//!
//! - `NAME/` holding an OCI image layout (`oci-layout`, `index.json`, `blobs/`):
//!   the manifest tagged with the reference (or the only one) is unpacked, each
//!   blob checked against its digest;
//! - `NAME/` holding anything else: used as the root file system as it is;
//! - `NAME.tar` or `NAME.tar.gz`: a root file system tarball, unpacked.
//!
//! Unpacked trees are cached under `CACHE/<sha256>/rootfs`, keyed by content.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub struct ImageStore {
    pub dir: PathBuf,
    pub cache: PathBuf,
}

/// Turns a tool's `runtime.image` into the directory its sandboxes use as root file system.
pub trait RootfsResolver: Send + Sync {
    fn resolve(&self, reference: &str) -> Result<PathBuf, String>;
}

impl RootfsResolver for ImageStore {
    fn resolve(&self, reference: &str) -> Result<PathBuf, String> {
        ImageStore::resolve(self, reference)
    }
}

/// The file name an image reference is looked up under. Pure.
pub fn entry_name(reference: &str) -> String {
    reference.replace(['/', ':', '@'], "_")
}

impl ImageStore {
    /// The root file system directory of `reference`.
    pub fn resolve(&self, reference: &str) -> Result<PathBuf, String> {
        let name = entry_name(reference);
        let dir = self.dir.join(&name);
        if dir.join("oci-layout").is_file() {
            return self.unpack_oci(&dir, reference);
        }
        if dir.is_dir() {
            return Ok(dir);
        }
        for candidate in [format!("{name}.tar"), format!("{name}.tar.gz")] {
            let path = self.dir.join(&candidate);
            if path.is_file() {
                let digest = file_digest(&path)?;
                return self.unpack(&digest, &[(path, candidate.ends_with(".gz"))]);
            }
        }
        Err(format!(
            "image {reference} not found in {} (looked for {name}/, {name}.tar, {name}.tar.gz)",
            self.dir.display()
        ))
    }

    fn unpack_oci(&self, layout: &Path, reference: &str) -> Result<PathBuf, String> {
        let read_json = |path: &Path| -> Result<Value, String> {
            let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
        };
        let index = read_json(&layout.join("index.json"))?;
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let tag = reference
            .rsplit_once(':')
            .map(|(_, t)| t)
            .unwrap_or_default();
        let chosen = manifests
            .iter()
            .find(|m| {
                let name = m["annotations"]["org.opencontainers.image.ref.name"].as_str();
                name == Some(reference) || name == Some(tag)
            })
            .or(if manifests.len() == 1 {
                manifests.first()
            } else {
                None
            })
            .ok_or_else(|| format!("{}: no manifest is tagged {reference}", layout.display()))?;
        let digest = chosen["digest"]
            .as_str()
            .ok_or("a manifest without digest")?;
        let manifest = read_json(&blob(layout, digest)?)?;
        let mut layers = Vec::new();
        for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
            let layer_digest = layer["digest"].as_str().ok_or("a layer without digest")?;
            let path = blob(layout, layer_digest)?;
            let actual = format!("sha256:{}", file_digest(&path)?);
            if actual != layer_digest {
                return Err(format!(
                    "{}: content is {actual}, not {layer_digest}",
                    path.display()
                ));
            }
            let gzip = layer["mediaType"]
                .as_str()
                .is_some_and(|m| m.ends_with("gzip"));
            layers.push((path, gzip));
        }
        self.unpack(digest.trim_start_matches("sha256:"), &layers)
    }

    /// Unpacks layers in order into the cache, once per content digest.
    fn unpack(&self, digest: &str, layers: &[(PathBuf, bool)]) -> Result<PathBuf, String> {
        let root = self.cache.join(digest);
        let rootfs = root.join("rootfs");
        if root.join("complete").is_file() {
            return Ok(rootfs);
        }
        let fail = |e: std::io::Error| format!("unpacking into {}: {e}", rootfs.display());
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&rootfs).map_err(fail)?;
        for (path, gzip) in layers {
            let file = File::open(path).map_err(fail)?;
            let reader: Box<dyn Read> = if *gzip {
                Box::new(flate2::read::GzDecoder::new(file))
            } else {
                Box::new(file)
            };
            apply_layer(reader, &rootfs).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        std::fs::write(root.join("complete"), digest).map_err(fail)?;
        Ok(rootfs)
    }
}

/// Applies one layer: OCI whiteouts (`.wh.NAME`) delete, everything else is
/// unpacked with the tar crate's `unpack_in`, which refuses paths that leave
/// the root (`..`, absolute paths, symlinks pointing out).
fn apply_layer(reader: impl Read, rootfs: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            if hidden != ".wh..opq" && !path.components().any(|c| c.as_os_str() == "..") {
                let target = rootfs.join(path.with_file_name(hidden));
                let _ = std::fs::remove_dir_all(&target).or_else(|_| std::fs::remove_file(&target));
            }
            continue;
        }
        entry.unpack_in(rootfs)?;
    }
    Ok(())
}

fn blob(layout: &Path, digest: &str) -> Result<PathBuf, String> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or_else(|| format!("bad digest {digest}"))?;
    if algorithm != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("unsupported digest {digest}"));
    }
    Ok(layout.join("blobs").join(algorithm).join(hex))
}

fn file_digest(path: &Path) -> Result<String, String> {
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o755);
            header.set_cksum();
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn store() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore {
            dir: dir.path().join("images"),
            cache: dir.path().join("cache"),
        };
        std::fs::create_dir_all(&store.dir).unwrap();
        (dir, store)
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn a_rootfs_tarball_is_unpacked_once() {
        let (_dir, store) = store();
        let name = entry_name("docker.io/library/busybox:1.36.1");
        assert_eq!(name, "docker.io_library_busybox_1.36.1");
        std::fs::write(
            store.dir.join(format!("{name}.tar")),
            tarball(&[("bin/sh", b"#!")]),
        )
        .unwrap();
        let rootfs = store.resolve("docker.io/library/busybox:1.36.1").unwrap();
        assert_eq!(std::fs::read(rootfs.join("bin/sh")).unwrap(), b"#!");
        assert_eq!(
            store.resolve("docker.io/library/busybox:1.36.1").unwrap(),
            rootfs
        );
        assert!(
            store
                .resolve("docker.io/library/alpine:3")
                .unwrap_err()
                .contains("not found")
        );
    }

    #[test]
    fn an_oci_layout_is_verified_and_whiteouts_apply() {
        let (_dir, store) = store();
        let layout = store.dir.join("example.com_tool_v1");
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let base = tarball(&[("bin/tool", b"v1"), ("etc/old", b"x")]);
        let top = tarball(&[("etc/.wh.old", b""), ("bin/tool", b"v2")]);
        for layer in [&base, &top] {
            std::fs::write(layout.join("blobs/sha256").join(sha(layer)), layer).unwrap();
        }
        let manifest = serde_json::json!({"layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", sha(&base))},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", sha(&top))}]})
        .to_string();
        std::fs::write(
            layout.join("blobs/sha256").join(sha(manifest.as_bytes())),
            &manifest,
        )
        .unwrap();
        let index = serde_json::json!({"manifests": [{"digest": format!("sha256:{}", sha(manifest.as_bytes())),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();

        let rootfs = store.resolve("example.com/tool:v1").unwrap();
        assert_eq!(std::fs::read(rootfs.join("bin/tool")).unwrap(), b"v2");
        assert!(!rootfs.join("etc/old").exists());

        std::fs::write(layout.join("blobs/sha256").join(sha(&base)), b"tampered").unwrap();
        std::fs::remove_dir_all(&store.cache).unwrap();
        assert!(
            store
                .resolve("example.com/tool:v1")
                .unwrap_err()
                .contains("content is")
        );
    }

    #[test]
    fn layers_cannot_write_outside_the_rootfs() {
        let (dir, store) = store();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        // `append_data` refuses `..`; write the name raw, as an attacker would.
        header.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        std::fs::write(store.dir.join("evil.tar"), builder.into_inner().unwrap()).unwrap();
        let _ = store.resolve("evil");
        assert!(!dir.path().join("cache/escape").exists());
        assert!(!store.cache.join("escape").exists());
    }
}
