//! A user's whole day through `dnf-image`, on a real sysroot made with `ostree admin`, with the
//! real fetcher, importer and deployer and a real registry.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use dnfimage_integration::deploy_support;
use dnfimage_integration::host::Host;
use dnfimage_integration::importer_support::copy_layout;
use dnfimage_integration::{run, run_ok};
use dnfimage_testimage::{Fixtures, oci_ref, skopeo_copy, tags};
use serde_json::Value;

fn flags(d: &Value) -> Vec<&str> {
    ["booted", "staged", "default", "rollback", "pinned"]
        .into_iter()
        .filter(|f| d[*f] == true)
        .collect()
}

#[test]
fn rebase_upgrade_rollback_pin_cleanup_kargs() -> Result<()> {
    let host = Host::new()?;
    let f = Fixtures::shared()?;
    let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);

    // Rebase onto v1: one deployment, its BLS entry boots v1's kernel, the origin records the
    // registry reference.
    let out = host.ok(&["rebase", &host.latest])?;
    assert!(out.contains("Deployed"), "{out}");
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 1);
    assert_eq!(deps[0]["image"], host.latest.as_str());
    assert_eq!(deps[0]["imageDigest"], v1.digest.as_str());
    assert_eq!(deps[0]["version"], "1");
    let entries = host.sysroot.boot_entries()?;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0].1.contains(dnfimage_testimage::KERNEL_VERSION),
        "{}",
        entries[0].1
    );
    let origin = host.origin_of(&deps[0])?;
    assert!(
        origin.contains(host.latest.trim_start_matches("docker://")),
        "{origin}"
    );
    assert!(
        host.deployed_file(0, "/usr/lib/os-release")?
            .contains("VERSION_ID=1")
    );

    // v2 is published: --check tells what it would download.
    host.publish(tags::BASE_V2)?;
    let check: Value = serde_json::from_str(&host.ok(&["--json", "upgrade", "--check"])?)?;
    assert_eq!(check["updateAvailable"], true);
    assert_eq!(check["digest"], v2.digest.as_str());
    let v1_layers: std::collections::BTreeSet<_> = v1.layer_digests().into_iter().collect();
    let missing: u64 = v2
        .manifest
        .layers()
        .iter()
        .filter(|l| !v1_layers.contains(&l.digest().to_string()))
        .map(|l| l.size())
        .sum();
    assert_eq!(check["bytesMissing"], missing);

    // Upgrade: v2 first, v1 the rollback.
    host.ok(&["upgrade"])?;
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 2);
    assert_eq!(deps[0]["version"], "2");
    assert_eq!(deps[1]["version"], "1");
    assert!(
        flags(&deps[0]).contains(&"default"),
        "{:?}",
        flags(&deps[0])
    );
    assert!(
        flags(&deps[1]).contains(&"rollback"),
        "{:?}",
        flags(&deps[1])
    );
    assert!(
        host.deployed_file(0, "/usr/lib/os-release")?
            .contains("VERSION_ID=2")
    );

    // Nothing new: exit 77 when asked.
    let again = run(host.cli().args(["upgrade", "--unchanged-exit-77"]))?;
    assert_eq!(again.status.code(), Some(77), "{again:?}");
    assert_eq!(host.deployments()?.len(), 2);

    // Rollback swaps them.
    host.ok(&["rollback"])?;
    let deps = host.deployments()?;
    assert_eq!(deps[0]["version"], "1");
    assert_eq!(deps[1]["version"], "2");

    // Pin v1 (now index 0), roll forward to v2 and upgrade twice more: the pinned one stays.
    host.ok(&["pin", "0"])?;
    host.ok(&["rollback"])?;
    host.publish(tags::DERIVED)?;
    host.ok(&["upgrade"])?;
    let deps = host.deployments()?;
    let pinned: Vec<_> = deps.iter().filter(|d| d["pinned"] == true).collect();
    assert_eq!(pinned.len(), 1);
    assert_eq!(pinned[0]["version"], "1");
    assert!(deps.len() >= 3, "{deps:?}");
    assert!(
        host.deployed_file(0, "/usr/share/dnfimage-derived/hello.txt")?
            .contains(dnfimage_testimage::DERIVED_CONTENT.trim())
    );
    host.ok(&["cleanup"])?;
    let deps = host.deployments()?;
    assert!(
        deps.iter()
            .any(|d| d["pinned"] == true && d["version"] == "1"),
        "{deps:?}"
    );

    // Kernel arguments: a new deployment whose BLS entry has the argument.
    host.ok(&["kargs", "--append", "dnfimage.test=1"])?;
    let deps = host.deployments()?;
    let args = deps[0]["kernelArguments"].as_array().context("kargs")?;
    assert!(args.iter().any(|a| a == "dnfimage.test=1"), "{args:?}");
    let entries = host.sysroot.boot_entries()?;
    assert!(
        entries
            .iter()
            .any(|(_, text)| text.contains("dnfimage.test=1")),
        "{entries:?}"
    );
    host.sysroot.fsck()?;
    Ok(())
}

/// `rebase` to the image and digest the deployment that boots next already has deploys nothing
/// (repeating a command whose client was killed after the deploy must not push the rollback
/// out), and asks the registry for the digest only: no layer is downloaded. `--force` deploys it
/// again; a new digest behind the same reference is a real rebase.
#[test]
fn rebase_to_the_deployed_image_is_a_no_op_unless_forced() -> Result<()> {
    let host = Host::new()?;
    let v1 = Fixtures::shared()?.image(tags::BASE_V1)?;
    host.ok(&["rebase", &host.latest])?;
    let before = host.deployments()?;
    let entries = host.sysroot.boot_entries()?;

    let pos = host.registry.log_position()?;
    let out = run(host.cli().args(["rebase", &host.latest]))?;
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the image specification is unchanged"),
        "{stderr}"
    );
    assert!(stderr.contains(&v1.digest), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(host.deployments()?, before);
    assert_eq!(host.sysroot.boot_entries()?, entries);
    let layers = v1.layer_digests();
    let fetched = host.registry.blob_requests_since(pos)?;
    assert!(
        fetched.iter().all(|b| !layers.contains(b)),
        "layers were downloaded for a no-op: {fetched:?}"
    );

    // The same reference without "docker://", for scripts: 77, and a result in JSON.
    let bare = host.latest.trim_start_matches("docker://");
    let out = run(host.cli().args(["rebase", "--unchanged-exit-77", bare]))?;
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    let out = run(host.cli().args(["--json", "rebase", bare]))?;
    assert!(out.status.success(), "{out:?}");
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["changed"], false, "{doc}");
    assert_eq!(
        doc["deployment"]["imageDigest"],
        v1.digest.as_str(),
        "{doc}"
    );
    assert_eq!(host.deployments()?, before);

    // --force: a fresh deployment of the same commit, the old one the rollback.
    host.ok(&["rebase", "--force", &host.latest])?;
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 2, "{deps:?}");
    assert_eq!(deps[0]["commit"], before[0]["commit"]);
    assert_ne!(deps[0]["serial"], before[0]["serial"]);
    assert!(flags(&deps[1]).contains(&"rollback"), "{deps:?}");

    // The tag moved: the same reference is a new image, and is deployed.
    host.publish(tags::BASE_V2)?;
    host.ok(&["rebase", &host.latest])?;
    let deps = host.deployments()?;
    assert_eq!(deps[0]["version"], "2");
    Ok(())
}

#[test]
fn download_only_then_deploy_without_the_registry() -> Result<()> {
    let mut host = Host::new()?;
    host.ok(&["rebase", &host.latest])?;
    host.publish(tags::BASE_V2)?;
    let out = host.ok(&["upgrade", "--download-only"])?;
    assert!(out.contains("from-downloaded"), "{out}");
    assert_eq!(host.deployments()?.len(), 1, "download-only deployed");
    host.registry.stop();
    host.ok(&["upgrade", "--from-downloaded"])?;
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 2);
    assert_eq!(deps[0]["version"], "2");
    // And once deployed, nothing more is downloaded.
    let again = run(host
        .cli()
        .args(["upgrade", "--from-downloaded", "--unchanged-exit-77"]))?;
    assert_eq!(again.status.code(), Some(77), "{again:?}");
    host.start_services()?;
    Ok(())
}

#[test]
fn derived_image_rebases_with_its_extra_file() -> Result<()> {
    let host = Host::new()?;
    let derived =
        Fixtures::shared()?.push_as(&host.registry, tags::DERIVED, "dnfimage/derived:1")?;
    host.ok(&["rebase", &derived])?;
    let text = host.deployed_file(0, "/usr/share/dnfimage-derived/hello.txt")?;
    assert_eq!(text.trim(), dnfimage_testimage::DERIVED_CONTENT.trim());
    assert_eq!(host.deployments()?[0]["image"], derived.as_str());
    Ok(())
}

#[test]
fn failed_deploy_leaves_status_and_repo_unchanged() -> Result<()> {
    let host = Host::new()?;
    host.ok(&["rebase", &host.latest])?;
    let before = host.status()?["deployments"].clone();
    let entries_before = host.sysroot.boot_entries()?;

    // /boot becomes a tmpfs holding exactly what it holds now and one page more: the next
    // deploy needs more than that for its boot entries.
    let boot = host.sysroot.path().join("boot");
    let saved = host.scratch.path().join("boot-saved");
    run_ok(Command::new("cp").arg("-a").arg(&boot).arg(&saved))?;
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(&boot),
    )?;
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&boot);
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "cp -a {}/. {}/",
        saved.display(),
        boot.display()
    )))?;
    let used: u64 = run_ok(Command::new("df").args(["--output=used", "-B1"]).arg(&boot))?
        .lines()
        .nth(1)
        .context("df output")?
        .trim()
        .parse()?;
    run_ok(
        Command::new("mount")
            .args(["-o", &format!("remount,size={}", used + 4096)])
            .arg(&boot),
    )?;

    host.publish(tags::BASE_V2)?;
    let out = run(host.cli().arg("upgrade"))?;
    assert!(
        !out.status.success(),
        "the upgrade succeeded on a full /boot"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Not enough space"), "{stderr}");
    assert_eq!(host.status()?["deployments"], before);
    assert_eq!(host.sysroot.boot_entries()?, entries_before);
    host.sysroot.fsck()?;
    Ok(())
}

#[test]
fn killed_import_leaves_status_and_repo_unchanged() -> Result<()> {
    let mut host = Host::new()?;
    host.ok(&["rebase", &host.latest])?;
    let before = host.status()?["deployments"].clone();
    let refs_before = run_ok(
        Command::new("ostree")
            .arg("refs")
            .arg(format!("--repo={}", host.sysroot.repo().display())),
    )?;

    host.publish(tags::BASE_V2)?;
    // Start the upgrade and kill the importer as soon as the CLI says it is importing.
    let mut child = host
        .cli()
        .arg("upgrade")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stderr = std::io::BufReader::new(child.stderr.take().context("stderr")?);
    let mut said = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line)?;
        anyhow::ensure!(n > 0, "the upgrade ended before it imported:\n{said}");
        said.push_str(&line);
        if line.starts_with("Importing") {
            break;
        }
    }
    host.services[1].kill();
    std::io::Read::read_to_string(&mut stderr, &mut said)?;
    let status = child.wait()?;
    assert!(
        !status.success(),
        "the upgrade succeeded without its importer"
    );
    // Which service, what it means, what to do; not a protocol error.
    let stderr = &said;
    assert!(
        stderr.contains(
            "The importer (org.dnfimage.Importer) stopped while importing: nothing was \
             deployed. Run the command again."
        ),
        "{stderr}"
    );

    assert_eq!(host.status()?["deployments"], before);
    host.sysroot.fsck()?;
    let refs_after = run_ok(
        Command::new("ostree")
            .arg("refs")
            .arg(format!("--repo={}", host.sysroot.repo().display())),
    )?;
    // Layers completed before the kill may stay for the next try; no image ref may appear.
    let images = |refs: &str| -> Vec<String> {
        refs.lines()
            .filter(|r| r.starts_with("ostree/container/image/"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        images(&refs_after),
        images(&refs_before),
        "a ref points at a half-imported image"
    );

    // The next upgrade completes.
    host.start_services()?;
    host.ok(&["upgrade"])?;
    assert_eq!(host.deployments()?[0]["version"], "2");
    Ok(())
}

#[test]
fn rebase_and_upgrade_from_a_registry_requiring_credentials() -> Result<()> {
    let host = Host::with_registry_auth("admin", "hunter2 and more")?;
    let f = Fixtures::shared()?;
    let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);

    // No credentials yet: a typed refusal saying what to do, nothing deployed.
    let out = run(host.cli().args(["rebase", &host.latest]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("The registry refused") && stderr.contains("skopeo login"),
        "{stderr}"
    );
    assert!(host.deployments()?.is_empty());

    host.log_in("admin", "hunter2 and more")?;
    let out = host.ok(&["rebase", &host.latest])?;
    assert!(out.contains("Deployed"), "{out}");
    let deps = host.deployments()?;
    assert_eq!(deps.len(), 1);
    assert_eq!(deps[0]["imageDigest"], v1.digest.as_str());

    host.publish(tags::BASE_V2)?;
    host.ok(&["upgrade"])?;
    let deps = host.deployments()?;
    assert_eq!(deps[0]["imageDigest"], v2.digest.as_str(), "{deps:?}");
    Ok(())
}

/// Kernel arguments images declare in `/usr/lib/bootc/kargs.d`, through `dnf-image`: the rebase
/// brings v1's (not those of a file for another architecture), `kargs` adds the user's, an
/// image with a broken kargs.d file is refused with a sentence naming the file and changes
/// nothing, and the upgrade to v2 replaces v1's own arguments with v2's and keeps the user's.
#[test]
fn upgrade_replaces_the_image_kernel_arguments_and_keeps_the_users() -> Result<()> {
    let host = Host::new()?;
    let layout = host.scratch.path().join("kargs-images");
    copy_layout(
        &Fixtures::shared()?.oci_dir,
        &[tags::BASE_V1, tags::BASE_V2],
        &layout,
    )?;
    let foreign = format!(
        "kargs = [\"foreign.arch=1\"]\nmatch-architectures = [\"{}\"]\n",
        deploy_support::foreign_architecture()
    );
    let work = host.scratch.path();
    let v2_file = r#"kargs = ["console=ttyS0", "dnfimage.v=2", "new=1"]"#;
    // (base, tag, kargs.d files)
    type Image<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let images: [Image; 3] = [
        (
            tags::BASE_V1,
            "kargs-v1",
            vec![
                (
                    "10-console.toml",
                    r#"kargs = ["console=ttyS0", "dnfimage.v=1"]"#,
                ),
                ("20-foreign.toml", &foreign),
            ],
        ),
        (
            tags::BASE_V2,
            "kargs-v2",
            vec![("10-console.toml", v2_file), ("20-foreign.toml", &foreign)],
        ),
        (
            tags::BASE_V2,
            "kargs-broken",
            vec![
                ("10-console.toml", v2_file),
                ("30-bad.toml", "kargs = [\"a\"\n"),
            ],
        ),
    ];
    for (base, tag, files) in &images {
        deploy_support::kargs_image(&layout, base, tag, work, files)?;
    }
    let publish = |tag: &str| skopeo_copy(&oci_ref(&layout, tag), &host.latest);
    let arguments = |index: usize| -> Result<Vec<String>> {
        Ok(serde_json::from_value(
            host.deployments()?[index]["kernelArguments"].clone(),
        )?)
    };

    publish("kargs-v1")?;
    let out = host.ok(&["rebase", &host.latest])?;
    assert!(
        out.contains("Kernel arguments from the image: added console=ttyS0 dnfimage.v=1."),
        "{out}"
    );
    assert_eq!(arguments(0)?, ["console=ttyS0", "dnfimage.v=1"]);
    host.ok(&["kargs", "--append", "quiet"])?;
    assert_eq!(arguments(0)?, ["console=ttyS0", "dnfimage.v=1", "quiet"]);

    publish("kargs-broken")?;
    let before = host.status()?["deployments"].clone();
    let entries = host.sysroot.boot_entries()?;
    let out = run(host.cli().arg("upgrade"))?;
    assert!(!out.status.success(), "a broken kargs.d file was deployed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "The image's kernel arguments file /usr/lib/bootc/kargs.d/30-bad.toml is not valid: \
             Line "
        ) && stderr.contains("Nothing was deployed"),
        "{stderr}"
    );
    assert_eq!(host.status()?["deployments"], before);
    assert_eq!(host.sysroot.boot_entries()?, entries);

    publish("kargs-v2")?;
    let out = host.ok(&["upgrade"])?;
    assert!(
        out.contains(
            "Kernel arguments from the image: added dnfimage.v=2 new=1; removed dnfimage.v=1."
        ),
        "{out}"
    );
    let args = arguments(0)?;
    assert_eq!(args, ["console=ttyS0", "quiet", "dnfimage.v=2", "new=1"]);
    let entries = host.sysroot.boot_entries()?;
    let wanted = args.join(" ");
    assert!(
        entries.iter().any(|(_, text)| text.contains(&wanted)),
        "no boot entry has {wanted}: {entries:?}"
    );
    assert_eq!(arguments(1)?, ["console=ttyS0", "dnfimage.v=1", "quiet"]);
    host.sysroot.fsck()?;
    Ok(())
}

/// `--apply` (and rpm-ostree's `-r`/`--reboot`) on a sysroot that is not the running system's:
/// the change is made, the machine running the tests is not rebooted, and the command says why
/// and exits 0; nothing new deployed means no reboot either. JSON says whether a reboot was
/// requested.
#[test]
fn apply_reboots_nothing_on_a_sysroot_that_is_not_booted() -> Result<()> {
    let host = Host::new()?;
    let stderr_of = |args: &[&str]| -> Result<(Value, String)> {
        let out = run(host.cli().args(args))?;
        assert!(out.status.success(), "{args:?}: {out:?}");
        let doc = if !args.contains(&"--json") {
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout)?
        };
        Ok((doc, String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    const NOT_BOOTED: &str = "--apply: not booted: nothing to reboot";
    const UNCHANGED: &str = "--apply: nothing changed, so no reboot";

    let (doc, stderr) = stderr_of(&["--json", "rebase", "--apply", &host.latest])?;
    assert!(stderr.contains(NOT_BOOTED), "{stderr}");
    assert_eq!(doc["changed"], true, "{doc}");
    assert_eq!(doc["rebootRequested"], false, "{doc}");
    assert_eq!(host.deployments()?.len(), 1);

    // The same image again: the image specification is unchanged, nothing to reboot into.
    let (doc, stderr) = stderr_of(&["--json", "rebase", "-r", &host.latest])?;
    assert!(stderr.contains(UNCHANGED), "{stderr}");
    assert!(!stderr.contains(NOT_BOOTED), "{stderr}");
    assert_eq!(doc["changed"], false, "{doc}");
    assert_eq!(doc["rebootRequested"], false, "{doc}");

    // No update: no reboot.
    let (_, stderr) = stderr_of(&["upgrade", "--reboot"])?;
    assert!(stderr.contains("No update"), "{stderr}");
    assert!(stderr.contains(UNCHANGED), "{stderr}");

    // An update: deployed, and said why nothing reboots.
    host.publish(tags::BASE_V2)?;
    let (doc, stderr) = stderr_of(&["--json", "upgrade", "--apply"])?;
    assert!(stderr.contains(NOT_BOOTED), "{stderr}");
    assert_eq!(doc["deployment"]["version"], "2", "{doc}");
    assert_eq!(doc["rebootRequested"], false, "{doc}");
    let deps = host.deployments()?;
    assert_eq!(deps[0]["version"], "2");

    // Rollback: set, not rebooted.
    let (doc, stderr) = stderr_of(&["--json", "rollback", "--apply"])?;
    assert!(stderr.contains(NOT_BOOTED), "{stderr}");
    assert_eq!(doc["version"], "1", "{doc}");
    assert_eq!(doc["rebootRequested"], false, "{doc}");
    assert_eq!(host.deployments()?[0]["version"], "1");

    // Without --apply nothing is said about rebooting.
    let (_, stderr) = stderr_of(&["rollback"])?;
    assert!(!stderr.contains("--apply"), "{stderr}");

    // apply-live needs the running system's /usr: refused with a sentence, nothing changed,
    // and status shows no live changes.
    let before = host.deployments()?;
    let out = run(host.cli().args(["apply-live"]))?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not the sysroot the running system booted from"),
        "{stderr}"
    );
    let out = run(host.cli().args(["apply-live", "--allow-replacement"]))?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let after = host.deployments()?;
    assert_eq!(after, before);
    assert!(
        after
            .iter()
            .all(|d| d["unlocked"].is_null() && d["liveCommit"].is_null()),
        "{after:?}"
    );

    // Nothing to deploy with --check, --download-only, --preview or --auto: refused as usage.
    for flag in ["--check", "--download-only", "--preview", "--auto"] {
        let out = run(host.cli().args(["upgrade", "--apply", flag]))?;
        assert_eq!(out.status.code(), Some(2), "{flag}: {out:?}");
    }
    assert_eq!(host.deployments()?[0]["version"], "2");
    Ok(())
}
