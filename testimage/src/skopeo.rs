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
    copy_as(src, dest, None)
}

/// [`copy`] to a registry that requires credentials (`USER:PASSWORD`, see
/// `Registry::credentials`).
pub fn copy_with_creds(src: &str, dest: &str, dest_creds: &str) -> Result<()> {
    copy_as(src, dest, Some(dest_creds))
}

/// [`copy`], with `--dest-creds` when given.
pub(crate) fn copy_as(src: &str, dest: &str, dest_creds: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]);
    if let Some(creds) = dest_creds {
        cmd.arg("--dest-creds").arg(creds);
    }
    run(cmd.args([src, dest])).with_context(|| format!("Copying {src} to {dest}"))?;
    Ok(())
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
