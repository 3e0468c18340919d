//! Pushing OCI layouts to the test registry with `skopeo copy` (Debian's skopeo 1.9.3).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::run;

/// `oci:<dir>:<tag>` for skopeo and ostree-ext.
pub fn oci_ref(oci_dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", oci_dir.display())
}

/// `skopeo copy SRC DEST` between any two transports, TLS verification off on both sides (the
/// test registry speaks plain http) and no signature policy.
pub fn copy(src: &str, dest: &str) -> Result<()> {
    copy_with(src, dest, &[])
}

/// [`copy`], writing the manifest in Docker schema 2 form (`--format v2s2`), as `docker push`
/// and podman's default push do: media types `application/vnd.docker.*`, no annotations. The
/// layers stay the same blobs; skopeo converts them back to OCI (and the configuration with
/// them, as new bytes) when it reads them through its image proxy.
pub fn copy_v2s2(src: &str, dest: &str) -> Result<()> {
    copy_with(src, dest, &["--format", "v2s2"])
}

/// [`copy`] to a registry that requires credentials (`USER:PASSWORD`, see
/// `Registry::credentials`).
pub fn copy_with_creds(src: &str, dest: &str, dest_creds: &str) -> Result<()> {
    copy_as(src, dest, Some(dest_creds))
}

/// [`copy`], with `--dest-creds` when given.
pub(crate) fn copy_as(src: &str, dest: &str, dest_creds: Option<&str>) -> Result<()> {
    match dest_creds {
        Some(creds) => copy_with(src, dest, &["--dest-creds", creds]),
        None => copy_with(src, dest, &[]),
    }
}

fn copy_with(src: &str, dest: &str, options: &[&str]) -> Result<()> {
    run(Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .args(options)
        .args([src, dest]))
    .with_context(|| format!("Copying {src} to {dest}"))?;
    Ok(())
}

/// The manifest `image` has, byte for byte as its source serves it (`skopeo inspect --raw`;
/// for a registry, what a pull by tag gets), and its digest: the sha256 of those bytes.
pub fn raw_manifest(image: &str) -> Result<(Vec<u8>, String)> {
    use sha2::{Digest as _, Sha256};
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", image])
        .output()
        .with_context(|| format!("Running skopeo inspect --raw {image}"))?;
    anyhow::ensure!(
        out.status.success(),
        "skopeo inspect --raw {image}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&out.stdout)));
    Ok((out.stdout, digest))
}

/// Push `oci:<oci_dir>:<tag>` to `docker://<registry_addr>/<repo>:<tag>` for each tag; returns
/// the docker references in the order of `tags`.
pub fn push_tags(
    oci_dir: &Path,
    registry_addr: &str,
    repo: &str,
    tags: &[String],
) -> Result<Vec<String>> {
    tags.iter()
        .map(|tag| {
            let dest = format!("docker://{registry_addr}/{repo}:{tag}");
            copy(&oci_ref(oci_dir, tag), &dest)?;
            Ok(dest)
        })
        .collect()
}

// Here rather than in fixtures.rs, whose source names the cached fixture build: how an image is
// pushed does not change what was built.
impl crate::Fixtures {
    /// [`crate::Fixtures::push_as`] in Docker schema 2 form ([`copy_v2s2`]), e.g.
    /// `push_as_v2s2(&r, tags::BASE_V1, "dnfimage/os:latest")`; returns the docker reference.
    /// The registry's manifest digest differs from the fixture's (see [`raw_manifest`]).
    pub fn push_as_v2s2(
        &self,
        registry: &crate::Registry,
        tag: &str,
        name_and_tag: &str,
    ) -> Result<String> {
        let dest = registry.docker_ref(name_and_tag);
        copy_v2s2(&self.oci_ref(tag), &dest)?;
        Ok(dest)
    }
}
