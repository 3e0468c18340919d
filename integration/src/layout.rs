//! OCI layouts written blob by blob, whose manifests may lie: a layer or configuration longer
//! than its descriptor says, a negative size, a configuration or manifest larger than readers
//! take. For the tests of what the services do with such images (the fixture factory only
//! writes honest ones).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::Digest as _;

/// An image to write.
#[derive(Debug, Clone, Default)]
pub struct RawImage {
    /// The configuration blob.
    pub config: Vec<u8>,
    /// The size the manifest declares for it (default: its length).
    pub config_size: Option<i64>,
    /// The layer blobs, each with the size the manifest declares (default: its length).
    pub layers: Vec<(Vec<u8>, Option<i64>)>,
    /// Manifest annotations (a large one makes a large manifest).
    pub annotations: BTreeMap<String, String>,
}

/// `sha256:HEX` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// A configuration of a bootable image (`containers.bootc=1`) with `labels` added.
pub fn bootable_config(labels: &[(&str, &str)]) -> Vec<u8> {
    let mut all: BTreeMap<&str, &str> = labels.iter().copied().collect();
    all.insert("containers.bootc", "1");
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": all},
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .expect("a JSON value serializes")
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Result<String> {
    let digest = digest_of(bytes);
    let path = dir
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::write(&path, bytes).with_context(|| format!("Writing {}", path.display()))?;
    Ok(digest)
}

/// Writes `image` into a new OCI layout at `dir`, tagged with each of `tags` (all naming the
/// same manifest); returns the manifest digest.
pub fn write(dir: &Path, tags: &[String], image: &RawImage) -> Result<String> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))
        .with_context(|| format!("Creating {}", dir.display()))?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let descriptor = |media_type: &str, digest: String, size: i64| json!({"mediaType": media_type, "digest": digest, "size": size});
    let config = descriptor(
        "application/vnd.oci.image.config.v1+json",
        write_blob(dir, &image.config)?,
        image.config_size.unwrap_or(image.config.len() as i64),
    );
    let mut layers = Vec::new();
    for (bytes, size) in &image.layers {
        layers.push(descriptor(
            "application/vnd.oci.image.layer.v1.tar",
            write_blob(dir, bytes)?,
            size.unwrap_or(bytes.len() as i64),
        ));
    }
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": layers,
    });
    if !image.annotations.is_empty() {
        manifest["annotations"] = json!(image.annotations);
    }
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = write_blob(dir, &manifest)?;
    let manifests: Vec<Value> = tags
        .iter()
        .map(|tag| {
            json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            })
        })
        .collect();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests}))?,
    )?;
    Ok(manifest_digest)
}
