//! Images a registry serves in Docker schema 2 form (what `docker push` and podman write;
//! `skopeo copy --format v2s2`), through `dnf-image` on a scratch host: skopeo converts them to
//! OCI on the way in, and every digest shown and recorded is still the registry's.

use anyhow::{Context, Result};
use dnfimage_integration::host::Host;
use dnfimage_integration::{assert_blobs_intact, raw_call, run};
use dnfimage_interfaces::importer;
use dnfimage_testimage::{Fixtures, raw_manifest, tags};
use serde_json::Value;

const DOCKER_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The digest of the registry's manifest of `image` (the sha256 of its bytes), which must be
/// Docker schema 2.
fn registry_digest(image: &str) -> Result<String> {
    let (bytes, digest) = raw_manifest(image)?;
    let manifest: Value = serde_json::from_slice(&bytes)?;
    assert_eq!(manifest["mediaType"], DOCKER_MEDIA_TYPE, "{manifest}");
    Ok(digest)
}

fn json(host: &Host, args: &[&str]) -> Result<Value> {
    let out = host.ok(&[&["--json"], args].concat())?;
    serde_json::from_str(&out).with_context(|| format!("Parsing {out}"))
}

/// The images the fetcher's cache lists, by reference.
fn cached_digest(host: &Host, image: &str) -> Result<Value> {
    let list = json(host, &["image", "list"])?;
    let images = list["images"].as_array().context("images")?;
    Ok(images
        .iter()
        .find(|i| i["reference"] == image)
        .with_context(|| format!("{image} is not cached: {list}"))?["digest"]
        .clone())
}

#[test]
fn schema2_image_rebases_checks_and_upgrades_by_the_registry_digest() -> Result<()> {
    let host = Host::new()?;
    let f = Fixtures::shared()?;
    let image = f.push_as_v2s2(&host.registry, tags::BASE_V1, "dnfimage/docker:latest")?;
    let v1_digest = registry_digest(&image)?;
    // skopeo wrote a new manifest: the registry's digest is not the fixture's.
    assert_ne!(v1_digest, f.image(tags::BASE_V1)?.digest);

    // Rebase: deployed, and known everywhere by the registry's digest.
    let out = host.ok(&["rebase", &image])?;
    assert!(out.contains("Deployed"), "{out}");
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 1, "{deps:?}");
    assert_eq!(deps[0]["image"], image.as_str());
    assert_eq!(deps[0]["imageDigest"], v1_digest.as_str(), "{deps:?}");
    assert_eq!(deps[0]["version"], "1");
    assert!(
        host.deployed_file(0, "/usr/lib/os-release")?
            .contains("VERSION_ID=1")
    );
    let origin = host.origin_of(&deps[0])?;
    assert!(
        origin.contains(&format!(
            "container-image-reference=ostree-image-signed:{image}\n"
        )),
        "{origin}"
    );
    assert_eq!(cached_digest(&host, &image)?, v1_digest.as_str());
    let info = json(&host, &["image", "inspect", &image])?;
    assert_eq!(info["digest"], v1_digest.as_str(), "{info}");
    // Fetching again: all there, under the same digest.
    let fetched = json(&host, &["image", "fetch", &image])?;
    assert_eq!(fetched["digest"], v1_digest.as_str(), "{fetched}");
    assert_eq!(fetched["layersFetched"], 0, "{fetched}");
    // The cache holds a whole image skopeo reads back (the converted manifest, configuration
    // and layers), every blob under its digest.
    assert!(assert_blobs_intact(&host.scratch.state_dir().join("cache"))? > 0);

    // Nothing moved: --check says so (77 when asked), and so does upgrade, deploying nothing.
    let check = json(&host, &["upgrade", "--check"])?;
    assert_eq!(check["updateAvailable"], false, "{check}");
    assert_eq!(check["digest"], v1_digest.as_str(), "{check}");
    let out = run(host
        .cli()
        .args(["upgrade", "--check", "--unchanged-exit-77"]))?;
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    let pos = host.registry.log_position()?;
    let out = run(host.cli().args(["upgrade", "--unchanged-exit-77"]))?;
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert_eq!(host.deployments()?, deps);
    // No layer downloaded (skopeo reads the registry's configuration to convert the manifest).
    let layers = f.image(tags::BASE_V1)?.layer_digests();
    let fetched = host.registry.blob_requests_since(pos)?;
    assert!(fetched.iter().all(|b| !layers.contains(b)), "{fetched:?}");
    // Status has no update to offer after that check.
    let text = host.ok(&["status"])?;
    assert!(text.contains(&v1_digest), "{text}");
    assert!(!text.contains("Update available"), "{text}");
    assert_eq!(host.status()?["availableUpdate"], Value::Null);
    // rebase to the same image is a no-op too.
    let out = run(host.cli().args(["rebase", "--unchanged-exit-77", &image]))?;
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert_eq!(host.deployments()?, deps);

    // v2 pushed the same way to the same tag: found, fetched, imported and deployed.
    f.push_as_v2s2(&host.registry, tags::BASE_V2, "dnfimage/docker:latest")?;
    let v2_digest = registry_digest(&image)?;
    assert_ne!(v2_digest, v1_digest);
    let check = json(&host, &["upgrade", "--check"])?;
    assert_eq!(check["updateAvailable"], true, "{check}");
    assert_eq!(check["digest"], v2_digest.as_str(), "{check}");
    let text = host.ok(&["status"])?;
    assert!(text.contains("Update available"), "{text}");
    let status = host.status()?;
    assert_eq!(
        status["availableUpdate"]["digest"],
        v2_digest.as_str(),
        "{status}"
    );
    assert_eq!(
        status["availableUpdate"]["currentDigest"],
        v1_digest.as_str(),
        "{status}"
    );
    host.ok(&["upgrade"])?;
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 2, "{deps:?}");
    assert_eq!(deps[0]["imageDigest"], v2_digest.as_str(), "{deps:?}");
    assert_eq!(deps[0]["version"], "2");
    assert_eq!(deps[1]["imageDigest"], v1_digest.as_str(), "{deps:?}");
    assert!(
        host.deployed_file(0, "/usr/lib/os-release")?
            .contains("VERSION_ID=2")
    );
    assert_eq!(cached_digest(&host, &image)?, v2_digest.as_str());
    // The repository knows the image by the registry's digest (what `upgrade
    // --from-downloaded` compares).
    let listed = raw_call(
        &host.scratch.socket(importer::INTERFACE),
        &serde_json::json!({"method": "org.dnfimage.Importer.ListImages"}),
    )?;
    let imported: Vec<&str> = listed[0]["parameters"]["images"]
        .as_array()
        .context("images")?
        .iter()
        .filter(|i| i["reference"] == image)
        .filter_map(|i| i["digest"].as_str())
        .collect();
    assert_eq!(imported, [v2_digest.as_str()], "{listed:?}");
    let out = run(host.cli().args(["upgrade", "--unchanged-exit-77"]))?;
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert_eq!(host.deployments()?.len(), 2);
    host.sysroot.fsck()?;
    Ok(())
}
