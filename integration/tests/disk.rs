//! Disk use that stays bounded, through `dnf-image` on a scratch sysroot with the real services
//! and registry: after each upgrade the fetcher's cache holds only the images the deployments
//! follow, `cleanup --repo` frees the repository objects no deployment uses (and nothing a
//! deployment needs), and `status --disk` says what both take.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use dnfimage_integration::host::{Host, check_schema};
use dnfimage_integration::{run, run_ok};
use dnfimage_testimage::{
    DERIVED_CONTENT, DERIVED_FILE, Fixtures, Image, build_derived, oci_ref, read_image,
    skopeo_copy, tags,
};
use serde_json::{Value, json};

/// The tag of the fourth version: base v2 plus the derived layer, built by the test.
const DERIVED_V2: &str = "derived-v2";

/// Every blob an image is made of: manifest, configuration, layers.
fn blobs_of(image: &Image) -> BTreeSet<String> {
    let mut blobs: BTreeSet<String> = image.layer_digests().into_iter().collect();
    blobs.insert(image.digest.clone());
    blobs.insert(image.manifest.config().digest().to_string());
    blobs
}

/// The blobs stored in the fetcher's cache, as digests.
fn cached_blobs(host: &Host) -> Result<BTreeSet<String>> {
    let dir = host.scratch.state_dir().join("cache/blobs/sha256");
    std::fs::read_dir(&dir)
        .with_context(|| format!("Listing {}", dir.display()))?
        .map(|e| Ok(format!("sha256:{}", e?.file_name().to_string_lossy())))
        .collect()
}

/// `image list --json`: (reference, digest) of each cached image.
fn cached_images(host: &Host) -> Result<Vec<(String, String)>> {
    let doc: Value = serde_json::from_str(&host.ok(&["--json", "image", "list"])?)?;
    let mut images: Vec<(String, String)> = doc["images"]
        .as_array()
        .context("images")?
        .iter()
        .map(|i| {
            (
                i["reference"].as_str().unwrap_or_default().to_string(),
                i["digest"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    images.sort();
    Ok(images)
}

/// The ostree references under `prefix`.
fn refs_under(host: &Host, prefix: &str) -> Result<BTreeSet<String>> {
    let out = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", host.sysroot.repo().display()))
            .args(["refs", prefix]),
    )?;
    Ok(out.lines().map(str::to_string).collect())
}

/// Whether the repository has commit `commit`.
fn has_commit(host: &Host, commit: &str) -> Result<bool> {
    let out = run(Command::new("ostree")
        .arg(format!("--repo={}", host.sysroot.repo().display()))
        .args(["show", commit]))?;
    Ok(out.status.success())
}

/// Asserts that every object of the repository is reachable from its references (deployments,
/// images, layers): nothing is left for a prune to delete.
fn assert_nothing_unreachable(host: &Host) -> Result<()> {
    let out = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", host.sysroot.repo().display()))
            .args(["prune", "--refs-only", "--no-prune"]),
    )?;
    anyhow::ensure!(out.contains("No unreachable objects"), "{out}");
    Ok(())
}

/// `du -s -B1 PATH`.
fn du(path: &Path) -> Result<u64> {
    let out = run_ok(Command::new("du").args(["-s", "-B1"]).arg(path))?;
    out.split_whitespace()
        .next()
        .context("du output")?
        .parse()
        .context("du output")
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// `status --disk --json`, checked against the schema.
fn disk_usage(host: &Host) -> Result<Value> {
    let out = host.ok(&["--json", "status", "--disk"])?;
    check_schema(&out)?;
    let doc: Value = serde_json::from_str(&out)?;
    Ok(doc["diskUsage"].clone())
}

#[test]
fn repeated_upgrades_keep_the_cache_and_the_repository_bounded() -> Result<()> {
    let host = Host::new()?;
    let f = Fixtures::shared()?;
    // A fourth version: v2 plus the layer the derived fixture adds to v1.
    let layout = host.scratch.path().join("derived-v2");
    skopeo_copy(&f.oci_ref(tags::BASE_V2), &oci_ref(&layout, tags::BASE_V2))?;
    build_derived(&layout, tags::BASE_V2, DERIVED_V2)?;
    let versions = [
        f.image(tags::BASE_V1)?,
        f.image(tags::BASE_V2)?,
        f.image(tags::DERIVED)?,
        read_image(&layout, DERIVED_V2)?,
    ];

    // v1 → v2 → v3 → v4: after each, the cache holds the one image the deployments follow, at
    // its newest digest, and no blob of another.
    host.ok(&["rebase", &host.latest])?;
    let mut commits = vec![
        host.deployments()?[0]["commit"]
            .as_str()
            .context("commit")?
            .to_string(),
    ];
    for (i, version) in versions.iter().enumerate().skip(1) {
        match i {
            3 => skopeo_copy(
                &oci_ref(&layout, DERIVED_V2),
                &host.registry.docker_ref("dnfimage/os:latest"),
            )?,
            1 => host.publish(tags::BASE_V2)?,
            _ => host.publish(tags::DERIVED)?,
        }
        host.ok(&["upgrade"])?;
        let deps = host.deployments()?;
        assert_eq!(deps[0]["imageDigest"], version.digest.as_str(), "{deps:?}");
        assert!(
            deps.iter().all(|d| d["image"] == host.latest.as_str()),
            "{deps:?}"
        );
        commits.push(deps[0]["commit"].as_str().context("commit")?.to_string());
        assert_eq!(
            cached_images(&host)?,
            [(host.latest.clone(), version.digest.clone())]
        );
        assert_eq!(
            cached_blobs(&host)?,
            blobs_of(version),
            "after upgrading to v{}",
            i + 1
        );
    }
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 2, "{deps:?}");
    assert_eq!(deps[1]["imageDigest"], versions[2].digest.as_str());

    // status --disk: what du counts, for the repository and the cache.
    let disk = disk_usage(&host)?;
    assert_eq!(
        u64_of(&disk["repository"], "bytes"),
        du(&host.sysroot.repo())?
    );
    assert_eq!(
        disk["repository"]["path"],
        host.sysroot.repo().display().to_string()
    );
    let cache_dir = host.scratch.state_dir().join("cache");
    assert_eq!(u64_of(&disk["cache"], "bytes"), du(&cache_dir)?);
    assert_eq!(u64_of(&disk["cache"], "images"), 1);
    assert_eq!(
        u64_of(&disk["cache"], "blobs"),
        blobs_of(&versions[3]).len() as u64
    );
    let text = host.ok(&["status", "--disk"])?;
    assert!(
        text.contains("Repository:") && text.contains("Image cache:"),
        "{text}"
    );
    let objects_before = u64_of(&disk["repository"], "objects");

    // cleanup --repo alone: the deployments stay; the commits of v1 and v2, which no deployment
    // uses any more, go, and nothing unreachable is left.
    let before = host.deployments()?;
    let out = host.ok(&["--json", "cleanup", "--repo"])?;
    let doc: Value = serde_json::from_str(&out)?;
    assert_eq!(doc["apiVersion"], "dnfimage/v1");
    assert_eq!(doc["kind"], "CleanupResult");
    assert_eq!(doc["removedDeployments"], json!([]));
    let pruned = &doc["repository"];
    assert_eq!(pruned["removedImages"], json!([]), "{doc}");
    // v3 is v1 plus a layer, v4 is v2 plus one: every layer is still used.
    assert_eq!(u64_of(pruned, "removedLayers"), 0, "{doc}");
    assert!(u64_of(pruned, "removedObjects") > 0, "{doc}");
    assert!(u64_of(pruned, "freedBytes") > 0, "{doc}");
    assert_eq!(host.deployments()?, before);
    for (i, commit) in commits.iter().enumerate() {
        assert_eq!(has_commit(&host, commit)?, i >= 2, "v{}'s commit", i + 1);
    }
    assert_nothing_unreachable(&host)?;
    let disk = disk_usage(&host)?;
    assert!(
        u64_of(&disk["repository"], "objects") < objects_before,
        "{disk}"
    );
    host.sysroot.fsck()?;

    // Rollback works on what is left: v3 boots next, with its files, and back to v4.
    host.ok(&["rollback"])?;
    assert_eq!(
        host.deployments()?[0]["imageDigest"],
        versions[2].digest.as_str()
    );
    assert!(
        host.deployed_file(0, DERIVED_FILE)?
            .contains(DERIVED_CONTENT.trim())
    );
    assert!(
        host.deployed_file(0, "/usr/lib/os-release")?
            .contains("VERSION_ID=1")
    );
    host.ok(&["rollback"])?;
    assert_eq!(
        host.deployments()?[0]["imageDigest"],
        versions[3].digest.as_str()
    );

    // With --rollback: v3 goes, and with it the layers only v1 had.
    let size_before = u64_of(&disk_usage(&host)?["repository"], "bytes");
    let out = host.ok(&["--json", "cleanup", "--rollback", "--repo"])?;
    let doc: Value = serde_json::from_str(&out)?;
    let removed = doc["removedDeployments"].as_array().context("removed")?;
    assert_eq!(removed.len(), 1, "{doc}");
    assert_eq!(removed[0]["imageDigest"], versions[2].digest.as_str());
    let v4_layers: BTreeSet<String> = versions[3].layer_digests().into_iter().collect();
    let only_v3: Vec<String> = versions[2]
        .layer_digests()
        .into_iter()
        .filter(|l| !v4_layers.contains(l))
        .collect();
    assert!(!only_v3.is_empty());
    assert_eq!(
        u64_of(&doc["repository"], "removedLayers"),
        only_v3.len() as u64,
        "{doc}"
    );
    assert!(!has_commit(&host, &commits[2])?);
    assert!(has_commit(&host, &commits[3])?);
    // What is left: the deployment, its image and exactly its layers.
    let layers = refs_under(&host, "ostree/container/blob")?;
    assert_eq!(layers.len(), v4_layers.len(), "{layers:?}");
    let images = refs_under(&host, "ostree/container/image")?;
    assert_eq!(images.len(), 1, "{images:?}");
    assert_nothing_unreachable(&host)?;
    let size_after = u64_of(&disk_usage(&host)?["repository"], "bytes");
    assert!(size_after < size_before, "{size_after} ≥ {size_before}");
    host.sysroot.fsck()?;
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 1);
    assert!(
        host.deployed_file(0, "/usr/lib/os-release")?
            .contains("VERSION_ID=2")
    );
    let text = host.ok(&["cleanup", "--repo"])?;
    assert!(
        text.contains("Repository: removed 0 layered commits, 0 layers and 0 objects; freed 0 B"),
        "{text}"
    );

    // A rebase to another reference: the deployment that boots after it still follows
    // dnfimage/os:latest, so the cache keeps both.
    let other = f.push_as(&host.registry, tags::BASE_V2, "dnfimage/other:stable")?;
    host.ok(&["rebase", &other])?;
    assert_eq!(
        cached_images(&host)?,
        [
            (host.latest.clone(), versions[3].digest.clone()),
            (other.clone(), versions[1].digest.clone())
        ]
    );
    let mut both = blobs_of(&versions[3]);
    both.extend(blobs_of(&versions[1]));
    assert_eq!(cached_blobs(&host)?, both);
    Ok(())
}

/// A prune of the cache that fails after the deployment succeeded is a warning: the upgrade
/// exits 0 with its deployment done.
#[test]
fn a_failing_cache_prune_after_a_deployment_is_a_warning() -> Result<()> {
    let host = Host::new()?;
    host.ok(&["rebase", &host.latest])?;
    // A directory where a blob would be: the prune cannot remove it (a fetch never reads it).
    let stuck = host
        .scratch
        .state_dir()
        .join(format!("cache/blobs/sha256/{}", "0".repeat(64)));
    std::fs::create_dir_all(stuck.join("inside"))?;
    host.publish(tags::BASE_V2)?;
    let out = run(host.cli().args(["upgrade"]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stderr.contains("warning: The deployment is done, but pruning the image cache failed"),
        "{stderr}"
    );
    assert!(stderr.contains(&"0".repeat(64)), "{stderr}");
    let v2 = Fixtures::shared()?.image(tags::BASE_V2)?;
    let deps = host.deployments()?;
    assert_eq!(deps[0]["imageDigest"], v2.digest.as_str());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Deployed"),
        "{out:?}"
    );

    // Once the obstacle is gone, the next change prunes again.
    std::fs::remove_dir_all(&stuck)?;
    host.ok(&["rebase", "--force", &host.latest])?;
    assert_eq!(cached_blobs(&host)?, blobs_of(&v2));
    Ok(())
}

/// `cleanup --repo` keeps the update downloaded for the image the deployments follow, and
/// `status --disk` still answers, with the part it could not measure null, when the fetcher is
/// not there.
#[test]
fn cleanup_repo_keeps_a_downloaded_update() -> Result<()> {
    let mut host = Host::new()?;
    let v2 = Fixtures::shared()?.image(tags::BASE_V2)?;
    host.ok(&["rebase", &host.latest])?;
    host.publish(tags::BASE_V2)?;
    host.ok(&["upgrade", "--download-only"])?;
    let out = host.ok(&["--json", "cleanup", "--repo"])?;
    let doc: Value = serde_json::from_str(&out)?;
    assert_eq!(doc["repository"]["removedImages"], json!([]), "{doc}");
    assert_eq!(doc["repository"]["removedLayers"], 0, "{doc}");
    host.sysroot.fsck()?;
    host.ok(&["upgrade", "--from-downloaded"])?;
    assert_eq!(host.deployments()?[0]["imageDigest"], v2.digest.as_str());

    // The fetcher stops: the repository is still measured, the cache is not.
    host.services[0].kill();
    let out = run(host.cli().args(["--json", "status", "--disk"]))?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    check_schema(&text)?;
    let doc: Value = serde_json::from_str(&text)?;
    assert_eq!(doc["diskUsage"]["cache"], Value::Null, "{doc}");
    assert!(
        u64_of(&doc["diskUsage"]["repository"], "bytes") > 0,
        "{doc}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: Measuring the image cache: Connecting to org.dnfimage.Fetcher"),
        "{stderr}"
    );
    Ok(())
}
