//! Picks the image manifest of an OCI image layout and checks it: every blob
//! read here is verified against its descriptor's digest and size, and a
//! reference pinned by digest must name a manifest (or index) of the layout.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::layer::Layer;
use super::{ImageError, Reference};

/// Largest index or manifest read (they are small JSON documents).
const MAX_DOCUMENT_BYTES: u64 = 4 << 20;
/// Nested indexes followed (an index of per-platform manifests is one level).
const MAX_INDEX_DEPTH: usize = 4;

#[derive(Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize, Clone, Debug)]
struct Platform {
    architecture: String,
    os: String,
}

/// An image index (`manifests`) or an image manifest (`layers`).
#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// The image a layout holds for a reference.
pub(super) struct Selected {
    /// Hex SHA-256 of the image manifest: the cache key.
    pub manifest: String,
    pub layers: Vec<Layer>,
}

pub(super) fn select(layout: &Path, reference: &Reference<'_>) -> Result<Selected, ImageError> {
    let index_path = layout.join("index.json");
    let index: Document = parse(&index_path, &read_limited(&index_path)?)?;
    let mut descriptor = match reference.digest {
        Some(pinned) => index
            .manifests
            .iter()
            .find(|m| m.digest == pinned)
            .ok_or_else(|| ImageError::PinMismatch {
                reference: reference.full.to_string(),
                layout: layout.to_path_buf(),
                listed: listed(&index.manifests),
            })?,
        None => tagged(&index.manifests, reference).ok_or_else(|| ImageError::Layout {
            path: index_path.clone(),
            detail: format!(
                "no manifest is tagged {} (org.opencontainers.image.ref.name) and there is not exactly one",
                reference.full
            ),
        })?,
    }
    .clone();
    for _ in 0..MAX_INDEX_DEPTH {
        let path = blob_path(layout, &descriptor.digest)?;
        let document: Document = parse(&path, &read_blob(&path, &descriptor)?)?;
        if let Some(layers) = document.layers {
            return Ok(Selected {
                manifest: hex_of(&descriptor.digest).to_string(),
                layers: layers
                    .iter()
                    .map(|layer| layer_of(layout, layer))
                    .collect::<Result<_, _>>()?,
            });
        }
        descriptor = for_this_platform(&document.manifests)
            .ok_or_else(|| ImageError::Layout {
                path: path.clone(),
                detail: format!(
                    "neither an image manifest (layers) nor an index with a manifest for {} (has {})",
                    host_platform(),
                    listed(&document.manifests)
                ),
            })?
            .clone();
    }
    Err(ImageError::Layout {
        path: index_path,
        detail: format!("indexes nested deeper than {MAX_INDEX_DEPTH}"),
    })
}

fn tagged<'a>(manifests: &'a [Descriptor], reference: &Reference<'_>) -> Option<&'a Descriptor> {
    manifests
        .iter()
        .find(|m| {
            let name = m.annotations.get("org.opencontainers.image.ref.name");
            name.is_some_and(|n| n == reference.full || Some(n.as_str()) == reference.tag)
        })
        .or(match manifests {
            [only] => Some(only),
            _ => None,
        })
}

/// The manifest for linux on this machine's architecture; an entry without a
/// platform when it is the only one.
fn for_this_platform(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let arch = oci_architecture();
    manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .or(match manifests {
            [only] if only.platform.is_none() => Some(only),
            _ => None,
        })
}

/// Rust's name for this machine's architecture, in OCI (Go) spelling.
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn host_platform() -> String {
    format!("linux/{}", oci_architecture())
}

fn listed(manifests: &[Descriptor]) -> String {
    if manifests.is_empty() {
        return "no manifest".into();
    }
    manifests
        .iter()
        .map(|m| match &m.platform {
            Some(p) => format!("{} ({}/{})", m.digest, p.os, p.architecture),
            None => m.digest.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn layer_of(layout: &Path, descriptor: &Descriptor) -> Result<Layer, ImageError> {
    let path = blob_path(layout, &descriptor.digest)?;
    let media_type = descriptor.media_type.as_deref().unwrap_or_default();
    let gzip = if media_type.ends_with("tar+gzip") || media_type.ends_with(".tar.gzip") {
        true
    } else if media_type.ends_with(".tar") {
        false
    } else {
        return Err(ImageError::Layout {
            path,
            detail: format!(
                "layer media type {media_type:?} is not supported (uncompressed or gzip tar layers)"
            ),
        });
    };
    Ok(Layer {
        gzip,
        sha256: hex_of(&descriptor.digest).to_string(),
        size: descriptor.size,
        path,
    })
}

/// `blobs/sha256/<hex>` for a `sha256:<64 lowercase hex>` digest.
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    check_digest(digest)?;
    Ok(layout.join("blobs/sha256").join(hex_of(digest)))
}

pub(super) fn check_digest(digest: &str) -> Result<(), ImageError> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        _ => Err(ImageError::UnsupportedDigest {
            digest: digest.to_string(),
        }),
    }
}

fn hex_of(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// A small document, read whole.
fn read_limited(path: &Path) -> Result<Vec<u8>, ImageError> {
    let io_error = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    super::open_regular(path)
        .map_err(io_error)?
        .take(MAX_DOCUMENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
        return Err(ImageError::Layout {
            path: path.to_path_buf(),
            detail: format!("larger than {MAX_DOCUMENT_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// A manifest or index blob, checked against its descriptor.
fn read_blob(path: &Path, descriptor: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let bytes = read_limited(path)?;
    if let Some(size) = descriptor.size.filter(|&s| s != bytes.len() as u64) {
        return Err(ImageError::SizeMismatch {
            path: path.to_path_buf(),
            expected: size,
            actual: bytes.len() as u64,
        });
    }
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if actual != descriptor.digest {
        return Err(ImageError::DigestMismatch {
            path: path.to_path_buf(),
            expected: descriptor.digest.clone(),
            actual,
        });
    }
    Ok(bytes)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Document, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Layout {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}
