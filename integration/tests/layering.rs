//! Client-side layering through `dnf-image`: packages installed on one machine survive image
//! upgrades, overrides replace or remove image packages, reset returns to the image; with the
//! real layerer, importer, deployer and fetcher, a registry and a signed package repository.

use anyhow::{Context, Result};
use dnfimage_integration::host::Host;
use dnfimage_integration::run;
use dnfimage_testimage::rpms::{NEW_KERNEL_VERSION, TestRpms, files as paths, packages};
use dnfimage_testimage::{KERNEL_VERSION, tags};
use serde_json::Value;

fn layering(d: &Value, key: &str) -> Vec<String> {
    d["layering"][key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn has_file(host: &Host, index: usize, path: &str) -> bool {
    host.deployed_file(index, path).is_ok()
}

#[test]
fn layered_packages_survive_upgrades_and_reset_returns_to_the_image() -> Result<()> {
    let host = Host::with_layerer()?;
    host.ok(&["rebase", &host.latest])?;
    let image_commit = host.deployments()?[0]["commit"]
        .as_str()
        .context("commit")?
        .to_string();

    // Install: the dependency comes along; status shows the request.
    let out = host.ok(&["install", packages::HELLO])?;
    assert!(
        out.contains(packages::LIBHELLO),
        "the dependency is not listed: {out}"
    );
    let deps = host.deployments()?;
    assert_eq!(layering(&deps[0], "packages"), [packages::HELLO]);
    assert_eq!(deps[0]["baseCommit"], image_commit.as_str());
    assert_eq!(
        host.deployed_file(0, paths::HELLO)?,
        paths::HELLO_CONTENT,
        "the layered file"
    );
    assert!(has_file(&host, 0, paths::LIBHELLO), "the dependency's file");
    host.sysroot.fsck()?;

    // A package that does not exist: a clear error and nothing deployed.
    let before = host.status()?["deployments"].clone();
    let out = run(host.cli().args(["install", "dnfimage-no-such-package"]))?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dnfimage-no-such-package"), "{stderr}");
    assert_eq!(host.status()?["deployments"], before);

    // v2 is published; downloaded first, the check shows the package changes it brings.
    host.publish(tags::BASE_V2)?;
    host.ok(&["upgrade", "--download-only"])?;
    let check: Value = serde_json::from_str(&host.ok(&["--json", "upgrade", "--check"])?)?;
    let upgraded = check["packageChanges"]["upgraded"]
        .as_array()
        .context("packageChanges.upgraded")?;
    assert!(
        upgraded.iter().any(|p| p["name"] == packages::BASE
            && p["fromVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("1."))
            && p["toVersion"].as_str().is_some_and(|v| v.starts_with("2."))),
        "{check}"
    );

    // The upgrade keeps the package on the new image.
    host.ok(&["upgrade", "--from-downloaded"])?;
    let deps = host.deployments()?;
    assert_eq!(deps[0]["version"], "2");
    assert_eq!(layering(&deps[0], "packages"), [packages::HELLO]);
    assert!(
        has_file(&host, 0, paths::HELLO),
        "the package did not survive the upgrade"
    );
    assert!(
        host.deployed_file(0, "/usr/lib/os-release")?
            .contains("VERSION_ID=2")
    );

    // Uninstall.
    host.ok(&["uninstall", packages::HELLO])?;
    let deps = host.deployments()?;
    assert!(layering(&deps[0], "packages").is_empty());
    assert!(!has_file(&host, 0, paths::HELLO));

    // Override remove of an image package.
    host.ok(&["override", "remove", packages::DOCS])?;
    let deps = host.deployments()?;
    assert_eq!(layering(&deps[0], "overrideRemove"), [packages::DOCS]);
    assert!(!has_file(&host, 0, "/usr/share/doc/dnfimage/README"));

    // A local package must be an .rpm file outside pseudo filesystems.
    let before = host.status()?["deployments"].clone();
    for bad in ["/etc/passwd", "/proc/self/environ"] {
        let out = run(host.cli().args(["override", "replace", bad]))?;
        assert!(!out.status.success(), "{bad} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Invalid request"), "{bad}: {stderr}");
    }
    assert_eq!(host.status()?["deployments"], before);

    // Override replace of the kernel: the new deployment boots the new kernel.
    let kernel = TestRpms::shared()?.new_kernel();
    host.ok(&["override", "replace", kernel.to_str().context("path")?])?;
    let deps = host.deployments()?;
    assert_eq!(deps[0]["kernelVersion"], NEW_KERNEL_VERSION);
    let entries = host.sysroot.boot_entries()?;
    assert!(
        entries
            .iter()
            .any(|(_, text)| text.contains(NEW_KERNEL_VERSION)),
        "{entries:?}"
    );

    // Reset: the image as built, the old kernel, no request.
    host.ok(&["reset"])?;
    let deps = host.deployments()?;
    assert!(deps[0]["baseCommit"].is_null(), "{}", deps[0]);
    assert_eq!(deps[0]["kernelVersion"], KERNEL_VERSION);
    assert!(layering(&deps[0], "overrideRemove").is_empty());
    assert!(has_file(&host, 0, "/usr/share/doc/dnfimage/README"));
    host.sysroot.fsck()?;
    Ok(())
}
