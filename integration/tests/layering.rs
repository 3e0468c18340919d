//! Client-side layering through `dnf-image`: packages installed on one machine survive image
//! upgrades, overrides replace or remove image packages, reset returns to the image; with the
//! real layerer, importer, deployer and fetcher, a registry and a signed package repository.

use std::path::Path;
use std::process::{Command, Output, Stdio};

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

/// `override replace` passes each file as a descriptor: the layerer installs a package it cannot
/// open by path (here on a tmpfs mounted only in the CLI's mount namespace, as a home directory
/// is out of sight under the units' `ProtectHome`), refuses what is not a signed RPM, and what it
/// installed and keeps does not change when the caller's file does afterwards.
#[test]
fn override_replace_passes_the_file_not_its_path() -> Result<()> {
    let host = Host::with_layerer()?;
    host.ok(&["rebase", &host.latest])?;
    let rpms = TestRpms::shared()?;
    let hidden = host.scratch.path().join("home");
    std::fs::create_dir(&hidden)?;
    let overrides = host.scratch.state_dir().join("layerer/overrides");
    let kept = || -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&overrides)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    };
    // `dnf-image override replace HIDDEN/name` with `file` copied to `HIDDEN/name` on a tmpfs
    // that only the CLI's mount namespace has.
    let replace_hidden = |file: &Path, name: &str| -> Result<Output> {
        let cli = host.cli();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs tmpfs "$1" && cp "$2" "$1/$3" && shift 3 && exec "$@""#)
            .arg("sh")
            .arg(&hidden)
            .arg(file)
            .arg(name)
            .arg(cli.get_program())
            .args(cli.get_args())
            .args(["override", "replace"])
            .arg(hidden.join(name))
            .stdin(Stdio::null());
        for (k, v) in cli.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        run(&mut cmd)
    };

    // Not an RPM, and an RPM not signed with a configured key: refused, nothing deployed,
    // nothing kept.
    let before = host.status()?["deployments"].clone();
    let not_rpm = host.scratch.path().join("notes.txt");
    std::fs::write(&not_rpm, "not a package\n".repeat(20))?;
    let unsigned = rpms.repo_package(packages::UNSIGNED);
    for (file, want) in [
        (not_rpm.as_path(), "not an RPM package"),
        (unsigned.as_path(), "not signed"),
    ] {
        let out = replace_hidden(file, "x.rpm")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", file.display());
        assert!(stderr.contains(want), "{}: {stderr}", file.display());
        assert!(
            stderr.contains(&hidden.join("x.rpm").display().to_string()),
            "the error names the file as the caller does: {stderr}"
        );
    }
    assert_eq!(host.status()?["deployments"], before);
    assert_eq!(kept()?, Vec::<String>::new());

    // The signed kernel: installed, and its copy kept.
    let kernel = rpms.new_kernel();
    let out = replace_hidden(&kernel, "kernel.rpm")?;
    anyhow::ensure!(
        out.status.success(),
        "override replace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !hidden.join("kernel.rpm").exists(),
        "the file was visible outside the CLI's mount namespace"
    );
    let deps = host.deployments()?;
    assert_eq!(deps[0]["kernelVersion"], NEW_KERNEL_VERSION);
    let kept_name = format!("{}-6.2.0-1.noarch.rpm", packages::KERNEL);
    assert_eq!(kept()?, std::slice::from_ref(&kept_name));
    assert_eq!(
        std::fs::read(overrides.join(&kept_name))?,
        std::fs::read(&kernel)?
    );

    // The caller's file is gone (its tmpfs with the namespace): a later build re-applies the
    // replacement from the copy the layerer read.
    host.ok(&["install", packages::HELLO])?;
    let deps = host.deployments()?;
    assert_eq!(deps[0]["kernelVersion"], NEW_KERNEL_VERSION);
    assert_eq!(layering(&deps[0], "packages"), [packages::HELLO]);
    assert_eq!(kept()?, [kept_name]);
    host.sysroot.fsck()?;
    Ok(())
}
