//! The deployer end to end: the real service binary on a real ostree sysroot made with
//! `ostree admin init-fs` + `os-init`, the fixture images imported into its repository with
//! ostree-ext (as the importer service does), driven over its socket with raw JSON, the typed
//! proxy and varlinkctl; the results checked with `ostree admin status`, `ostree fsck`, the
//! boot entries and the files on disk.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_integration::deploy_support::{self, Imported, SmallFilesystem};
use dnfimage_integration::importer_support::copy_layout;
use dnfimage_integration::sysroot::{STATEROOT, TestSysroot};
use dnfimage_integration::{Scratch, ServiceProcess, error_name, raw_call, run, run_ok};
use dnfimage_interfaces::deployer::{
    self, CheckSpaceReply, CleanupResult, DeployPhase, DeployResult, DeployerError, DeployerProxy,
    Deployment, StatusReply,
};
use dnfimage_testimage::{DERIVED_CONTENT, DERIVED_FILE, Fixtures, KERNEL_VERSION, oci_ref, tags};
use futures_util::StreamExt;
use serde_json::{Value, json};

const DEPLOYER: &str = deployer::INTERFACE;
/// The references the importer records images under; the deployer only writes them down.
const IMAGE_V1: &str = "docker://registry.example/dnfimage/base:v1";
const IMAGE_V2: &str = "docker://registry.example/dnfimage/base:v2";
const IMAGE_DERIVED: &str = "docker://registry.example/dnfimage/derived:latest";

/// A scratch directory, a test sysroot and a deployer serving it. Dropped in field order: the
/// service first, then the sysroot, then the scratch directory holding it.
struct Setup {
    service: ServiceProcess,
    sysroot: TestSysroot,
    scratch: Scratch,
}

fn setup() -> Result<Setup> {
    setup_with(&[])
}

fn setup_with(extra: &[&str]) -> Result<Setup> {
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let mut args: Vec<&std::ffi::OsStr> = vec!["--sysroot".as_ref(), sysroot.path().as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let service = ServiceProcess::start(&scratch, "deployer", DEPLOYER, &args)?;
    Ok(Setup {
        service,
        sysroot,
        scratch,
    })
}

/// The final reply of a call, as the test sees it.
#[derive(Debug)]
enum Outcome {
    Ok(Value),
    Err(String, Value),
}

impl Outcome {
    fn ok(self) -> Result<Value> {
        match self {
            Outcome::Ok(v) => Ok(v),
            Outcome::Err(name, params) => anyhow::bail!("{name}: {params}"),
        }
    }

    fn err(self) -> Result<(String, Value)> {
        match self {
            Outcome::Ok(v) => anyhow::bail!("expected an error, got {v}"),
            Outcome::Err(name, params) => Ok((name, params)),
        }
    }
}

impl Setup {
    fn socket(&self) -> PathBuf {
        self.scratch.socket(DEPLOYER)
    }

    fn repo(&self) -> PathBuf {
        self.sysroot.repo()
    }

    fn import(&self, tag: &str) -> Result<Imported> {
        deploy_support::import(&self.repo(), &Fixtures::shared()?.oci_ref(tag))
    }

    /// Calls `method` (with `more` for the streaming ones); returns the progress records and
    /// the final reply.
    fn call(&self, method: &str, params: Value) -> Result<(Vec<Value>, Outcome)> {
        let more = matches!(method, "Deploy" | "SetKernelArguments" | "Cleanup");
        let mut call = json!({"method": format!("{DEPLOYER}.{method}"), "parameters": params});
        if more {
            call["more"] = json!(true);
        }
        let mut replies = raw_call(&self.socket(), &call)?;
        let last = replies.pop().context("no reply")?;
        let progress = replies
            .into_iter()
            .map(|r| r["parameters"]["progress"].clone())
            .collect();
        let outcome = match error_name(&last) {
            Some(name) => Outcome::Err(
                name.trim_start_matches(&format!("{DEPLOYER}.")).to_string(),
                last["parameters"].clone(),
            ),
            None => Outcome::Ok(last["parameters"].clone()),
        };
        Ok((progress, outcome))
    }

    fn status(&self) -> Result<StatusReply> {
        let (_, outcome) = self.call("Status", json!({}))?;
        Ok(serde_json::from_value(outcome.ok()?)?)
    }

    fn deployments(&self) -> Result<Vec<Deployment>> {
        Ok(self.status()?.deployments)
    }

    /// Deploys `commit` recording `image`; returns the progress records and the result.
    fn deploy(
        &self,
        commit: &str,
        image: &str,
        extra: Value,
    ) -> Result<(Vec<Value>, DeployResult)> {
        let mut params = json!({"commit": commit, "image": image});
        if let (Some(p), Some(extra)) = (params.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        let (progress, outcome) = self.call("Deploy", params)?;
        let value = outcome.ok()?;
        Ok((progress, serde_json::from_value(value["result"].clone())?))
    }

    fn set_kargs(&self, params: Value) -> Result<DeployResult> {
        let (_, outcome) = self.call("SetKernelArguments", params)?;
        Ok(serde_json::from_value(outcome.ok()?["result"].clone())?)
    }

    fn cleanup(&self, params: Value) -> Result<CleanupResult> {
        let (_, outcome) = self.call("Cleanup", params)?;
        Ok(serde_json::from_value(outcome.ok()?["result"].clone())?)
    }

    /// The deployment directory of `d`.
    fn deployment_dir(&self, d: &Deployment) -> PathBuf {
        self.sysroot.path().join(format!(
            "ostree/deploy/{}/deploy/{}.{}",
            d.stateroot, d.commit, d.serial
        ))
    }

    fn origin(&self, d: &Deployment) -> Result<String> {
        let mut path = self.deployment_dir(d).into_os_string();
        path.push(".origin");
        std::fs::read_to_string(&path).with_context(|| format!("Reading {path:?}"))
    }

    /// Every deployment directory on disk, `STATEROOT/COMMIT.SERIAL`.
    fn deployment_dirs(&self) -> Result<Vec<String>> {
        let mut dirs = Vec::new();
        let deploy = self.sysroot.path().join("ostree/deploy");
        for stateroot in std::fs::read_dir(&deploy)? {
            let stateroot = stateroot?;
            let name = stateroot.file_name().to_string_lossy().to_string();
            let Ok(entries) = std::fs::read_dir(stateroot.path().join("deploy")) else {
                continue;
            };
            for e in entries {
                let e = e?;
                if e.file_type()?.is_dir() {
                    dirs.push(format!("{name}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        dirs.sort();
        Ok(dirs)
    }

    /// The boot entries, each as key → value, in file name order.
    fn boot_entries(&self) -> Result<Vec<BTreeMap<String, String>>> {
        Ok(self
            .sysroot
            .boot_entries()?
            .into_iter()
            .map(|(_, text)| parse_entry(&text))
            .collect())
    }
}

fn parse_entry(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The boot entry whose `options` boot `d` (its `ostree=` argument leads to its directory).
fn entry_of<'a>(
    s: &Setup,
    entries: &'a [BTreeMap<String, String>],
    d: &Deployment,
) -> Result<&'a BTreeMap<String, String>> {
    let want = std::fs::canonicalize(s.deployment_dir(d))?;
    for e in entries {
        let options = e.get("options").map(String::as_str).unwrap_or_default();
        let Some(target) = options
            .split_whitespace()
            .find_map(|a| a.strip_prefix("ostree="))
        else {
            continue;
        };
        let path = s.sysroot.path().join(target.trim_start_matches('/'));
        if std::fs::canonicalize(&path).is_ok_and(|p| p == want) {
            return Ok(e);
        }
    }
    anyhow::bail!("No boot entry for deployment {} in {entries:?}", d.index)
}

/// The flags of each deployment, compactly: commit and which of default/rollback/pinned.
fn order(deployments: &[Deployment]) -> Vec<(String, bool, bool, bool)> {
    deployments
        .iter()
        .map(|d| (d.commit.clone(), d.default, d.rollback, d.pinned))
        .collect()
}

#[test]
fn first_deploy_writes_a_boot_entry_and_records_the_image() -> Result<()> {
    let s = setup()?;
    let status = s.status()?;
    assert!(!status.booted);
    assert!(status.deployments.is_empty());
    assert_eq!(status.sysroot, s.sysroot.path().display().to_string());
    assert_eq!(status.operation, None);

    let v1 = s.import(tags::BASE_V1)?;
    let start = Instant::now();
    let (progress, result) = s.deploy(
        &v1.commit,
        IMAGE_V1,
        json!({"stateroot": STATEROOT, "kernelArguments": ["rw", "console=ttyS0,115200"]}),
    )?;
    eprintln!(
        "TIMING deploy v1 (first, empty sysroot): {:?}",
        start.elapsed()
    );
    let phases: Vec<&str> = progress
        .iter()
        .map(|p| p["phase"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        phases,
        ["checking", "deploying", "updating_boot_entries"],
        "{progress:?}"
    );
    assert!(result.changed);
    let d = &result.deployment;
    assert_eq!(d.index, 0);
    assert_eq!(d.stateroot, STATEROOT);
    assert_eq!(d.commit, v1.commit);
    assert_eq!(d.serial, 0);
    assert_eq!(d.image.as_deref(), Some(IMAGE_V1));
    assert_eq!(d.image_digest.as_deref(), Some(v1.digest.as_str()));
    assert_eq!(
        d.image_digest.as_deref(),
        Some(Fixtures::shared()?.image(tags::BASE_V1)?.digest.as_str())
    );
    assert_eq!(d.version.as_deref(), Some("1"));
    assert_eq!(d.timestamp, "2024-01-01T00:00:00Z");
    assert_eq!(d.kernel_version, KERNEL_VERSION);
    assert_eq!(d.kernel_arguments, ["rw", "console=ttyS0,115200"]);
    assert!(d.default && !d.rollback && !d.booted && !d.staged && !d.pinned);
    assert!(!d.finalization_locked);
    assert_eq!(d.base_commit, None);
    assert_eq!(d.layering, Default::default());
    assert_eq!(s.deployments()?, vec![d.clone()]);

    // The origin records the registry reference as ostree-ext and bootc write it: held to the
    // signature policy when the caller does not say otherwise.
    let origin = s.origin(d)?;
    assert!(
        origin.contains(
            "container-image-reference=ostree-image-signed:docker://registry.example/dnfimage/base:v1\n"
        ),
        "{origin}"
    );
    assert_eq!(d.trust.as_ref().map(|t| t.enforced), Some(true));

    // One boot entry, whose kernel is v1's kernel, with the arguments.
    let entries = s.boot_entries()?;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = entry_of(&s, &entries, d)?;
    let linux = entry.get("linux").context("no linux line")?;
    let kernel = std::fs::read(
        s.sysroot
            .path()
            .join("boot")
            .join(linux.trim_start_matches('/')),
    )?;
    let want = deploy_support::cat(
        &s.repo(),
        &v1.commit,
        &format!("/usr/lib/modules/{KERNEL_VERSION}/vmlinuz"),
    )?;
    assert!(kernel == want, "{linux} is not v1's kernel");
    let options = entry.get("options").context("no options")?;
    assert!(options.contains("console=ttyS0,115200"), "{options}");
    assert!(options.contains("ostree=/ostree/boot."), "{options}");
    // The deployment is a checkout of v1 with /etc merged from /usr/etc.
    let dir = s.deployment_dir(d);
    assert!(std::fs::read_to_string(dir.join("usr/lib/os-release"))?.contains("VERSION=\"1\""));
    assert!(dir.join("etc/hostname").exists());

    let admin = s.sysroot.admin_status()?;
    assert!(
        admin.contains(&format!("{STATEROOT} {}.0", v1.commit)),
        "{admin}"
    );
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn first_deploy_without_stateroot_creates_the_default_one() -> Result<()> {
    let s = setup()?;
    let v1 = s.import(tags::BASE_V1)?;
    let (_, result) = s.deploy(&v1.commit, IMAGE_V1, json!({}))?;
    assert_eq!(result.deployment.stateroot, "default");
    assert_eq!(result.deployment.kernel_arguments, Vec::<String>::new());
    assert!(s.sysroot.path().join("ostree/deploy/default/var").is_dir());
    // The next deploy stays in the stateroot of the deployment that boots next.
    let v2 = s.import(tags::BASE_V2)?;
    let (_, result) = s.deploy(&v2.commit, IMAGE_V2, json!({}))?;
    assert_eq!(result.deployment.stateroot, "default");
    Ok(())
}

#[test]
fn upgrade_then_rollback_swaps_default_and_rollback() -> Result<()> {
    let s = setup()?;
    let (v1, v2) = (s.import(tags::BASE_V1)?, s.import(tags::BASE_V2)?);
    s.deploy(
        &v1.commit,
        IMAGE_V1,
        json!({"stateroot": STATEROOT, "kernelArguments": ["quiet"]}),
    )?;
    // There is nothing to roll back to yet.
    let (_, outcome) = s.call("Rollback", json!({}))?;
    assert_eq!(outcome.err()?.0, "NoRollback");

    let start = Instant::now();
    let (_, result) = s.deploy(&v2.commit, IMAGE_V2, json!({}))?;
    eprintln!("TIMING deploy v2 (upgrade): {:?}", start.elapsed());
    // Kernel arguments default to those of the deployment that booted next.
    assert_eq!(result.deployment.kernel_arguments, ["quiet"]);
    assert_eq!(result.deployment.version.as_deref(), Some("2"));
    let ds = s.deployments()?;
    assert_eq!(
        order(&ds),
        [
            (v2.commit.clone(), true, false, false),
            (v1.commit.clone(), false, true, false)
        ]
    );
    assert_eq!(ds[0].image.as_deref(), Some(IMAGE_V2));
    assert_eq!(ds[1].image.as_deref(), Some(IMAGE_V1));
    assert_eq!(ds[0].index, 0);
    assert_eq!(ds[1].index, 1);
    assert_eq!(s.boot_entries()?.len(), 2);
    // `ostree admin status` lists them in the same order.
    let admin = s.sysroot.admin_status()?;
    let (p2, p1) = (
        admin.find(&v2.commit).context("v2 missing")?,
        admin.find(&v1.commit).context("v1 missing")?,
    );
    assert!(p2 < p1, "{admin}");

    let (_, outcome) = s.call("Rollback", json!({}))?;
    let now_default: Deployment = serde_json::from_value(outcome.ok()?["deployment"].clone())?;
    assert_eq!(now_default.commit, v1.commit);
    assert!(now_default.default);
    let ds = s.deployments()?;
    assert_eq!(
        order(&ds),
        [
            (v1.commit.clone(), true, false, false),
            (v2.commit.clone(), false, true, false)
        ]
    );
    let admin = s.sysroot.admin_status()?;
    assert!(admin.find(&v1.commit) < admin.find(&v2.commit), "{admin}");
    // And back.
    s.call("Rollback", json!({}))?.1.ok()?;
    assert_eq!(s.deployments()?[0].commit, v2.commit);
    s.sysroot.fsck()?;
    Ok(())
}

/// The `(label, kernel, options)` entries of the syslinux menu libostree keeps in
/// `boot/loader/syslinux.cfg`, in menu order.
fn syslinux_menu(sysroot: &Path) -> Result<Vec<(String, String, String)>> {
    let path = sysroot.join("boot/loader/syslinux.cfg");
    let text = std::fs::read_to_string(&path).with_context(|| format!("Reading {path:?}"))?;
    let mut menu: Vec<(String, String, String)> = Vec::new();
    for line in text.lines() {
        let (key, value) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        match (key, menu.last_mut()) {
            ("LABEL", _) => menu.push((value.into(), String::new(), String::new())),
            ("KERNEL", Some(e)) => e.1 = value.into(),
            ("APPEND", Some(e)) => e.2 = value.into(),
            _ => {}
        }
    }
    Ok(menu)
}

/// What GRUB makes of that menu (`grub-syslinux2cfg`, GRUB's own parser): the default entry's
/// `linux` line.
fn grub_default_linux(sysroot: &Path) -> Result<String> {
    let cfg = run_ok(
        Command::new("grub-syslinux2cfg")
            .args(["-s", "-r"])
            .arg(sysroot.join("boot"))
            .arg(sysroot.join("boot/loader/syslinux.cfg")),
    )?;
    let default = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("default="))
        .with_context(|| format!("no default in\n{cfg}"))?;
    let entry = cfg
        .split("menuentry ")
        .find(|e| e.contains(&format!("--id {default}")))
        .with_context(|| format!("no menu entry {default} in\n{cfg}"))?;
    entry
        .lines()
        .find(|l| l.trim_start().starts_with("linux"))
        .map(|l| l.trim().to_string())
        .with_context(|| format!("no linux line in {entry}"))
}

/// A disk from `dnfimage-vmimage` boots through GRUB reading the syslinux menu libostree
/// rewrites on every deployment change (the VM suite boots it): the deployer's deploys and
/// rollbacks leave GRUB's default on the deployment that boots next.
#[test]
fn boot_menu_follows_deploys_and_rollbacks() -> Result<()> {
    let s = setup()?;
    dnfimage_vmimage::disk::use_syslinux_menu(s.sysroot.path())?;
    let (v1, v2) = (s.import(tags::BASE_V1)?, s.import(tags::BASE_V2)?);
    // The default BLS entry's options, which the menu's first entry must carry.
    let default_options = |s: &Setup| -> Result<String> {
        s.boot_entries()?
            .into_iter()
            .max_by_key(|e| e.get("version").and_then(|v| v.parse::<u32>().ok()))
            .and_then(|e| e.get("options").cloned())
            .context("no boot entries")
    };
    // GRUB's default entry boots `commit`: its `ostree=` argument leads to that deployment.
    let check = |s: &Setup, entries: usize, commit: &str| -> Result<()> {
        let menu = syslinux_menu(s.sysroot.path())?;
        assert_eq!(menu.len(), entries, "{menu:?}");
        let options = default_options(s)?;
        assert_eq!(
            menu[0].2, options,
            "the menu's first entry is not the default"
        );
        let linux = grub_default_linux(s.sysroot.path())?;
        assert!(
            linux.ends_with(&options) && linux.contains(&format!("vmlinuz-{KERNEL_VERSION}")),
            "GRUB would boot {linux}, not {options}"
        );
        let ostree = options
            .split_whitespace()
            .find_map(|o| o.strip_prefix("ostree="))
            .context("no ostree= argument")?;
        let deployment = std::fs::canonicalize(s.sysroot.path().join(&ostree[1..]))?;
        let name = deployment.file_name().unwrap_or_default().to_string_lossy();
        assert!(
            name.starts_with(commit),
            "GRUB's default boots {deployment:?}, not {commit}"
        );
        Ok(())
    };

    s.deploy(&v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    check(&s, 1, &v1.commit)?;
    s.deploy(&v2.commit, IMAGE_V2, json!({}))?;
    check(&s, 2, &v2.commit)?;
    s.call("Rollback", json!({}))?.1.ok()?;
    check(&s, 2, &v1.commit)?;
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn pinned_deployment_survives_deploys_and_cleanup() -> Result<()> {
    let s = setup()?;
    let (v1, v2, derived) = (
        s.import(tags::BASE_V1)?,
        s.import(tags::BASE_V2)?,
        s.import(tags::DERIVED)?,
    );
    let root = json!({"stateroot": STATEROOT});
    s.deploy(&v1.commit, IMAGE_V1, root.clone())?;
    let (_, outcome) = s.call("Pin", json!({"index": 0, "pinned": true}))?;
    let pinned: Deployment = serde_json::from_value(outcome.ok()?["deployment"].clone())?;
    assert!(pinned.pinned);
    assert_eq!(pinned.commit, v1.commit);

    s.deploy(&v2.commit, IMAGE_V2, json!({}))?;
    s.deploy(&derived.commit, IMAGE_DERIVED, json!({}))?;
    s.deploy(&v2.commit, IMAGE_V2, json!({}))?;
    // v2 (new), derived (the rollback), v1 (pinned); the first v2 is gone.
    let ds = s.deployments()?;
    assert_eq!(
        order(&ds),
        [
            (v2.commit.clone(), true, false, false),
            (derived.commit.clone(), false, true, false),
            (v1.commit.clone(), false, false, true),
        ]
    );
    assert_eq!(ds[0].serial, 1, "the second deployment of v2");
    assert_eq!(s.deployment_dirs()?.len(), 3, "{:?}", s.deployment_dirs()?);
    assert_eq!(s.boot_entries()?.len(), 3);

    // A derived image: its extra file is in the deployment.
    let dir = s.deployment_dir(&ds[1]);
    assert_eq!(
        std::fs::read_to_string(dir.join(DERIVED_FILE))?,
        DERIVED_CONTENT
    );
    assert_eq!(ds[1].image.as_deref(), Some(IMAGE_DERIVED));

    // Cleanup of the rollback removes derived, files included; v1 stays pinned.
    let start = Instant::now();
    let removed = s.cleanup(json!({"rollback": true}))?;
    eprintln!("TIMING cleanup of one deployment: {:?}", start.elapsed());
    assert_eq!(removed.removed_deployments.len(), 1);
    assert_eq!(removed.removed_deployments[0].commit, derived.commit);
    let ds = s.deployments()?;
    assert_eq!(
        order(&ds),
        [
            (v2.commit.clone(), true, false, false),
            (v1.commit.clone(), false, true, true),
        ]
    );
    assert!(
        !dir.exists(),
        "the files of the removed deployment are left"
    );
    assert_eq!(s.deployment_dirs()?.len(), 2);
    assert_eq!(s.boot_entries()?.len(), 2);

    // Now the rollback is the pinned one: nothing is removed.
    let (_, outcome) = s.call("Cleanup", json!({"rollback": true}))?;
    let (name, params) = outcome.err()?;
    assert_eq!(name, "DeploymentPinned");
    assert_eq!(params["index"], 1);
    assert_eq!(s.deployments()?.len(), 2);
    // Nothing is pending on a sysroot that is not booted: not an error, nothing removed.
    assert!(
        s.cleanup(json!({"pending": true}))?
            .removed_deployments
            .is_empty()
    );

    // Unpinned, it goes.
    s.call("Pin", json!({"index": 1, "pinned": false}))?
        .1
        .ok()?;
    let removed = s.cleanup(json!({"rollback": true}))?;
    assert_eq!(removed.removed_deployments[0].commit, v1.commit);
    assert_eq!(
        order(&s.deployments()?),
        [(v2.commit.clone(), true, false, false)]
    );
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn kernel_arguments_make_a_new_deployment_of_the_same_commit() -> Result<()> {
    let s = setup()?;
    let v1 = s.import(tags::BASE_V1)?;
    s.deploy(
        &v1.commit,
        IMAGE_V1,
        json!({"stateroot": STATEROOT, "kernelArguments": ["rw", "console=tty0"]}),
    )?;
    let start = Instant::now();
    let result = s.set_kargs(json!({"append": ["dnfimage.test=1"]}))?;
    eprintln!("TIMING kernel argument change: {:?}", start.elapsed());
    assert!(result.changed);
    let d = result.deployment;
    assert_eq!(
        (d.index, d.commit.as_str(), d.serial),
        (0, v1.commit.as_str(), 1)
    );
    assert_eq!(
        d.kernel_arguments,
        ["rw", "console=tty0", "dnfimage.test=1"]
    );
    assert_eq!(d.image.as_deref(), Some(IMAGE_V1), "the origin is kept");
    let entries = s.boot_entries()?;
    let options = &entry_of(&s, &entries, &d)?["options"];
    assert!(options.contains("dnfimage.test=1"), "{options}");
    let ds = s.deployments()?;
    assert_eq!(ds.len(), 2);
    assert_eq!(ds[1].serial, 0);
    assert_eq!(ds[1].kernel_arguments, ["rw", "console=tty0"]);
    let old_options = &entry_of(&s, &entries, &ds[1])?["options"];
    assert!(!old_options.contains("dnfimage.test"), "{old_options}");

    // Already as asked: nothing written.
    let result = s.set_kargs(json!({"delete": [], "append": []}))?;
    assert!(!result.changed);
    assert_eq!(result.deployment, s.deployments()?[0]);
    assert_eq!(s.deployment_dirs()?.len(), 2);

    // Replace one value, delete another.
    let result = s.set_kargs(json!({
        "replace": ["dnfimage.test=1=2"],
        "delete": ["console"],
    }))?;
    assert_eq!(
        result.deployment.kernel_arguments,
        ["rw", "dnfimage.test=2"]
    );
    assert_eq!(result.deployment.serial, 2);

    // Errors name the argument and change nothing.
    let before = s.status()?;
    for (params, argument) in [
        (json!({"delete": ["nosuch"]}), "nosuch"),
        (json!({"replace": ["rw=x=y"]}), "rw=x=y"),
        (json!({"append": ["ostree=/x"]}), "ostree=/x"),
        (json!({"append": ["two words"]}), "two words"),
    ] {
        let (_, outcome) = s.call("SetKernelArguments", params.clone())?;
        let (name, p) = outcome.err()?;
        assert_eq!(name, "InvalidKernelArgument", "{params}");
        assert_eq!(p["argument"], argument, "{params}");
    }
    let (_, outcome) = s.call("SetKernelArguments", json!({"index": 7, "append": ["x"]}))?;
    let (name, p) = outcome.err()?;
    assert_eq!(name, "NoSuchDeployment");
    assert_eq!(p["index"], 7);
    assert_eq!(s.status()?.deployments, before.deployments);
    s.sysroot.fsck()?;
    Ok(())
}

/// A commit of v1 with a kernel (and initramfs) of `bytes` bytes of its own.
fn commit_with_big_kernel(s: &Setup, base: &str, bytes: usize) -> Result<String> {
    let overlay = s.scratch.path().join("big-kernel");
    let dir = overlay.join(format!("usr/lib/modules/{KERNEL_VERSION}"));
    std::fs::create_dir_all(&dir)?;
    let mut data = vec![0u8; bytes];
    // Not all zeros, so nothing can share it.
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    std::fs::write(dir.join("vmlinuz"), &data)?;
    std::fs::write(dir.join("initramfs.img"), &data[..bytes / 4])?;
    deploy_support::commit_overlay(&s.repo(), base, &overlay, "v1 with a big kernel")
}

#[test]
fn deploy_that_does_not_fit_in_boot_changes_nothing() -> Result<()> {
    let s = setup()?;
    let (v1, v2) = (s.import(tags::BASE_V1)?, s.import(tags::BASE_V2)?);
    s.deploy(&v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    let big = commit_with_big_kernel(&s, &v1.commit, 4 << 20)?;

    // /boot: what it holds now plus 512 KiB.
    let boot = s.sysroot.path().join("boot");
    let used = run_ok(Command::new("du").args(["-s", "-B1"]).arg(&boot))?;
    let used: u64 = used
        .split_whitespace()
        .next()
        .context("du output")?
        .parse()?;
    let small = SmallFilesystem::mount_over(&boot, used + (512 << 10), s.scratch.path())?;
    let free = small.available()?;

    let before = s.status()?;
    let entries_before = s.sysroot.boot_entries()?;
    let dirs_before = s.deployment_dirs()?;

    let (_, outcome) = s.call("CheckSpace", json!({"commit": big}))?;
    let space: CheckSpaceReply = serde_json::from_value(outcome.ok()?)?;
    assert!(!space.fits, "{space:?}");
    let boot_fs = space
        .filesystems
        .iter()
        .find(|f| f.path.ends_with("/boot"))
        .context("no /boot filesystem")?;
    assert_eq!(boot_fs.available, free);
    assert!(boot_fs.needed > (5 << 20), "{boot_fs:?}");

    let (_, outcome) = s.call("Deploy", json!({"commit": big, "image": IMAGE_V1}))?;
    let (name, p) = outcome.err()?;
    assert_eq!(name, "InsufficientSpace", "{p}");
    assert_eq!(p["path"], boot.display().to_string());
    assert_eq!(p["available"], free);

    assert_eq!(s.status()?.deployments, before.deployments);
    assert_eq!(s.sysroot.boot_entries()?, entries_before);
    assert_eq!(s.deployment_dirs()?, dirs_before);
    s.sysroot.fsck()?;

    // v2 has v1's kernel: it only needs new boot entries, and fits.
    let (_, outcome) = s.call("CheckSpace", json!({"commit": v2.commit}))?;
    let space: CheckSpaceReply = serde_json::from_value(outcome.ok()?)?;
    assert!(space.fits, "{space:?}");
    s.deploy(&v2.commit, IMAGE_V2, json!({}))?;
    assert_eq!(s.deployments()?.len(), 2);
    s.sysroot.fsck()?;
    drop(small);
    Ok(())
}

/// A commit of v1 with `dirs` × `files` small files more, slow enough to check out that a
/// second call arrives while it deploys.
fn commit_with_many_files(s: &Setup, base: &str, dirs: usize, files: usize) -> Result<String> {
    deploy_support::commit_with_many_files(&s.repo(), s.scratch.path(), base, dirs, files)
}

#[test]
fn one_change_at_a_time_and_cancel_or_kill_leaves_nothing_behind() -> Result<()> {
    let mut s = setup()?;
    let v1 = s.import(tags::BASE_V1)?;
    s.deploy(&v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    let start = Instant::now();
    let slow = commit_with_many_files(&s, &v1.commit, 100, 80)?;
    eprintln!("TIMING commit of 8000 files: {:?}", start.elapsed());
    let start = Instant::now();
    s.deploy(&slow, IMAGE_V1, json!({}))?;
    let slow_time = start.elapsed();
    eprintln!("TIMING deploy of an 8000-file commit: {slow_time:?}");
    s.call("Rollback", json!({}))?.1.ok()?;
    s.cleanup(json!({"rollback": true}))?;
    let before = s.status()?;
    let dirs_before = s.deployment_dirs()?;

    // A deploy runs; a second change is refused while it does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut conn = dnfimage_interfaces::connect(&s.scratch.runtime_dir(), DEPLOYER).await?;
        let mut other = dnfimage_interfaces::connect(&s.scratch.runtime_dir(), DEPLOYER).await?;
        let mut stream = conn
            .deploy(&slow, IMAGE_V1, None, None, None, None, None)
            .await?;
        // The call is sent; once Status names it, it runs (it takes the job slot before it
        // answers anything).
        let mut polls = 0;
        loop {
            let status = other
                .status()
                .await?
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            if status.operation.is_some() {
                assert_eq!(status.operation, Some(format!("Deploying {IMAGE_V1}")));
                break;
            }
            polls += 1;
            anyhow::ensure!(polls < 1000, "the deploy never showed in Status");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let refused = other.pin(0, true).await?;
        match refused {
            Err(DeployerError::AlreadyInProgress { operation }) => {
                assert_eq!(operation, format!("Deploying {IMAGE_V1}"));
            }
            other => panic!("expected AlreadyInProgress, got {other:?}"),
        }
        let status = other
            .status()
            .await?
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(status.operation, Some(format!("Deploying {IMAGE_V1}")));

        // Cancel it before it writes the boot entries.
        let cancelled = other
            .cancel()
            .await?
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(cancelled.cancelled, Some(format!("Deploying {IMAGE_V1}")));
        let mut last = None;
        let mut phases = Vec::new();
        while let Some(item) = stream.next().await {
            let item = item?;
            if let Ok(reply) = &item
                && let Some(p) = &reply.progress
            {
                phases.push(p.phase);
            }
            last = Some(item);
        }
        assert!(
            !phases.contains(&DeployPhase::UpdatingBootEntries),
            "{phases:?}"
        );
        match last.context("no final reply")? {
            Err(DeployerError::Cancelled { operation }) => {
                assert_eq!(operation, format!("Deploying {IMAGE_V1}"));
            }
            other => panic!("expected Cancelled, got {other:?}"),
        }
        anyhow::Ok(())
    })?;
    let after = s.status()?;
    assert_eq!(after.deployments, before.deployments);
    assert_eq!(after.operation, None);
    assert_eq!(
        s.deployment_dirs()?,
        dirs_before,
        "a cancelled deploy left files"
    );
    s.sysroot.fsck()?;

    // Killed in the middle of a deploy: the deployments are as before or include the new one
    // whole, never half of it; a restarted service deletes what is left of it on the next
    // change.
    let mut conn = std::os::unix::net::UnixStream::connect(s.socket())?;
    let call = json!({"method": format!("{DEPLOYER}.Deploy"), "more": true,
        "parameters": {"commit": slow, "image": IMAGE_V1}});
    std::io::Write::write_all(&mut conn, format!("{call}\0").as_bytes())?;
    let start = Instant::now();
    while s.status()?.operation.is_none() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the deploy never ran"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    s.service.kill();
    drop(conn);
    s.service = ServiceProcess::start(
        &s.scratch,
        "deployer",
        DEPLOYER,
        &["--sysroot".as_ref(), s.sysroot.path().as_os_str()],
    )?;
    let after = s.status()?;
    let whole = after.deployments.len() == 2 && after.deployments[0].commit == slow;
    eprintln!(
        "killed {}",
        if whole {
            "after the boot entries were written"
        } else {
            "before the boot entries"
        }
    );
    if !whole {
        assert_eq!(after.deployments, before.deployments);
    }
    assert_eq!(s.boot_entries()?.len(), after.deployments.len());
    for d in &after.deployments {
        assert!(
            s.deployment_dir(d).join("usr/lib/os-release").exists(),
            "{d:?}"
        );
    }
    s.sysroot.fsck()?;
    // The next change works and leaves only listed deployments on disk.
    s.deploy(&v1.commit, IMAGE_V1, json!({}))?;
    let listed: Vec<String> = s
        .deployments()?
        .iter()
        .map(|d| format!("{}/{}.{}", d.stateroot, d.commit, d.serial))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(s.deployment_dirs()?, listed);
    s.sysroot.fsck()?;

    // Another program holding the sysroot lock (as `ostree admin` does): the change waits
    // for it, as `ostree admin` would, while Status is answered; then it goes through.
    let lock = s.sysroot.hold_lock()?;
    let pin = std::thread::spawn({
        let socket = s.socket();
        move || {
            raw_call(
                &socket,
                &json!({"method": format!("{DEPLOYER}.Pin"), "parameters": {"index": 0, "pinned": true}}),
            )
        }
    });
    while !s.service.log_text().contains("Waiting for another program") {
        anyhow::ensure!(!pin.is_finished(), "Pin ended without waiting for the lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s.status()?;
    assert!(!pin.is_finished(), "Pin did not wait for the sysroot lock");
    drop(lock);
    let replies = pin
        .join()
        .map_err(|_| anyhow::anyhow!("the Pin caller panicked"))??;
    assert!(error_name(&replies[0]).is_none(), "{replies:?}");
    assert!(s.status()?.deployments[0].pinned);
    Ok(())
}

/// The lost update, played out on the deployer alone: two changes prepared against the same
/// `Status` (as two `dnf-image` commands started together read it). The first one is written;
/// the second names a deployment that is no longer the one changes start from and is refused
/// with `StateChanged`, writing nothing. Each method that writes deployments checks it.
#[test]
fn a_change_prepared_against_moved_deployments_is_refused() -> Result<()> {
    let s = setup()?;
    let (v1, v2) = (s.import(tags::BASE_V1)?, s.import(tags::BASE_V2)?);
    let derived = s.import(tags::DERIVED)?;

    // An empty sysroot is named "": a second first deploy prepared on it is refused.
    let (_, first) = s.deploy(
        &v1.commit,
        IMAGE_V1,
        json!({"stateroot": STATEROOT, "expectedDeployment": ""}),
    )?;
    let (_, outcome) = s.call(
        "Deploy",
        json!({"commit": v2.commit, "image": IMAGE_V2, "expectedDeployment": ""}),
    )?;
    let (name, p) = outcome.err()?;
    assert_eq!(name, "StateChanged", "{p}");
    assert_eq!(p["expected"], "");
    assert_eq!(p["actual"], first.deployment.id());
    assert_eq!(s.deployments()?.len(), 1);

    // Both changes read this.
    let read = s.status()?;
    let x = read.deployments[0].id();
    assert_eq!(x, format!("{STATEROOT}/{}.0", v1.commit));

    // A (the upgrade) is written.
    let (_, a) = s.deploy(&v2.commit, IMAGE_V2, json!({"expectedDeployment": x}))?;
    assert_eq!(a.deployment.commit, v2.commit);
    let after_a = s.status()?;
    let dirs = s.deployment_dirs()?;
    let entries = s.sysroot.boot_entries()?;

    // B (the install, built on v1) is refused, and writes nothing.
    let (progress, outcome) = s.call(
        "Deploy",
        json!({"commit": derived.commit, "image": IMAGE_DERIVED, "expectedDeployment": x}),
    )?;
    let (name, p) = outcome.err()?;
    assert_eq!(name, "StateChanged", "{p}");
    assert_eq!(p["expected"], x.as_str());
    assert_eq!(p["actual"], a.deployment.id());
    let message = p["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&x) && message.contains(&a.deployment.id()),
        "{message}"
    );
    assert!(progress.is_empty(), "it started: {progress:?}");
    assert_eq!(s.status()?.deployments, after_a.deployments);
    assert_eq!(s.deployment_dirs()?, dirs);
    assert_eq!(s.sysroot.boot_entries()?, entries);

    // The same for every other method that writes deployments, each also run with the right
    // expectation to show that it is the expectation that refuses it.
    let stale = json!(x);
    let mut current = json!(a.deployment.id());
    let calls = [
        ("SetKernelArguments", json!({"append": ["dnfimage.test=1"]})),
        ("Rollback", json!({})),
        ("Cleanup", json!({"rollback": true})),
    ];
    for (method, params) in &calls {
        let mut with = params.clone();
        with["expectedDeployment"] = stale.clone();
        let before = s.status()?;
        let dirs = s.deployment_dirs()?;
        let (_, outcome) = s.call(method, with)?;
        let (name, p) = outcome.err()?;
        assert_eq!(name, "StateChanged", "{method}: {p}");
        assert_eq!(p["expected"], stale, "{method}");
        assert_eq!(s.status()?.deployments, before.deployments, "{method}");
        assert_eq!(s.deployment_dirs()?, dirs, "{method}");

        let mut with = params.clone();
        with["expectedDeployment"] = current.clone();
        s.call(method, with)?.1.ok().context(*method)?;
        // On a sysroot that is not booted, changes start from the first deployment.
        let now = s.status()?;
        current = json!(now.deployments.first().context("no deployment")?.id());
    }

    // Null or absent: no check, as before.
    let before = s.status()?;
    let (_, outcome) = s.call(
        "SetKernelArguments",
        json!({"append": ["dnfimage.other=1"], "expectedDeployment": null}),
    )?;
    let result: DeployResult = serde_json::from_value(outcome.ok()?["result"].clone())?;
    assert!(result.changed);
    assert_ne!(s.status()?.deployments, before.deployments);
    s.sysroot.fsck()?;
    Ok(())
}

#[test]
fn bad_requests_get_typed_errors() -> Result<()> {
    let s = setup()?;
    let v1 = s.import(tags::BASE_V1)?;
    let missing = "0".repeat(64);
    let cases = [
        (
            "Deploy",
            json!({"commit": missing, "image": IMAGE_V1}),
            "CommitNotFound",
        ),
        // Never a path, nor a ref.
        (
            "Deploy",
            json!({"commit": "/etc/passwd", "image": IMAGE_V1}),
            "CommitNotFound",
        ),
        (
            "Deploy",
            json!({"commit": "ostree/container/image/x", "image": IMAGE_V1}),
            "CommitNotFound",
        ),
        ("CheckSpace", json!({"commit": missing}), "CommitNotFound"),
        (
            "Deploy",
            json!({"commit": v1.commit, "image": "http://example.com/x"}),
            "InvalidImageReference",
        ),
        (
            "Deploy",
            json!({"commit": v1.commit, "image": "docker://a b"}),
            "InvalidImageReference",
        ),
        (
            "Deploy",
            json!({"commit": v1.commit, "image": "docker://quay.io/os@sha256:abcd"}),
            "InvalidImageReference",
        ),
        (
            "Deploy",
            json!({"commit": v1.commit, "image": format!("docker://x.io/{}", "a".repeat(300 << 10))}),
            "InvalidImageReference",
        ),
        (
            "Deploy",
            json!({"commit": v1.commit, "image": IMAGE_V1, "kernelArguments": ["a\nb"]}),
            "InvalidKernelArgument",
        ),
        (
            "Deploy",
            json!({"commit": v1.commit, "image": IMAGE_V1, "stateroot": "../x"}),
            "Failed",
        ),
        (
            "Pin",
            json!({"index": 0, "pinned": true}),
            "NoSuchDeployment",
        ),
        ("Rollback", json!({}), "NoRollback"),
        ("UnlockStaged", json!({}), "NoSuchDeployment"),
        ("ApplyLive", json!({}), "NotBooted"),
        (
            "SetKernelArguments",
            json!({"append": ["x"]}),
            "NoSuchDeployment",
        ),
    ];
    for (method, params, want) in &cases {
        let (_, outcome) = s.call(method, params.clone())?;
        let (name, p) = outcome.err()?;
        assert_eq!(name, *want, "{method} {params}: {p}");
    }
    // A commit that cannot boot: no kernel.
    let overlay = s.scratch.path().join("no-kernel");
    std::fs::create_dir_all(overlay.join("usr/share"))?;
    let no_kernel = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", s.repo().display()))
            .args(["commit", "--orphan", "--subject=no kernel"])
            .arg(format!("--tree=dir={}", overlay.display())),
    )?;
    let (_, outcome) = s.call(
        "Deploy",
        json!({"commit": no_kernel.trim(), "image": IMAGE_V1}),
    )?;
    let (name, p) = outcome.err()?;
    assert_eq!(name, "NotBootable", "{p}");
    assert!(
        p["message"]
            .as_str()
            .unwrap_or_default()
            .contains("vmlinuz"),
        "{p}"
    );

    s.deploy(&v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    // A pending deployment on a sysroot that is not booted: still no running /usr to change,
    // with or without replacements allowed.
    s.deploy(&v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    for params in [json!({}), json!({"allowReplacement": true})] {
        let (_, outcome) = s.call("ApplyLive", params.clone())?;
        let (name, p) = outcome.err()?;
        assert_eq!(name, "NotBooted", "{params}: {p}");
        assert_eq!(p["sysroot"], s.sysroot.path().display().to_string(), "{p}");
    }
    let deployments = s.status()?.deployments;
    assert!(
        deployments
            .iter()
            .all(|d| d.unlocked.is_none() && d.live_commit.is_none()),
        "{deployments:?}"
    );
    s.cleanup(json!({"rollback": true}))?;
    let (_, outcome) = s.call("Pin", json!({"index": 1, "pinned": true}))?;
    let (name, p) = outcome.err()?;
    assert_eq!(name, "NoSuchDeployment");
    assert_eq!(p["index"], 1);
    assert!(s.status()?.deployments.len() == 1);
    assert!(s.deployment_dirs()?.len() == 1);
    s.sysroot.fsck()?;
    Ok(())
}

/// The step of ApplyLive that the service runs outside its unit's namespace (through
/// systemd-run, on a booted host) refuses a sysroot that is not booted before it unlocks or
/// writes anything, and the deployments stay as they were.
#[test]
fn apply_live_step_refuses_a_sysroot_that_is_not_booted() -> Result<()> {
    let s = setup()?;
    let v1 = s.import(tags::BASE_V1)?;
    s.deploy(&v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    let before = s.status()?.deployments;
    let record_before = std::fs::read_to_string("/run/dnfimage/live-commit").ok();
    let out = run(Command::new(dnfimage_integration::bin("dnfimage-deployer"))
        .arg("--sysroot")
        .arg(s.sysroot.path())
        .args(["--apply-live", &v1.commit, &v1.commit]))?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not booted"), "{stderr}");
    assert_eq!(s.status()?.deployments, before);
    assert_eq!(
        std::fs::read_to_string("/run/dnfimage/live-commit").ok(),
        record_before
    );
    // --allow-replacement only goes with --apply-live.
    let out =
        run(Command::new(dnfimage_integration::bin("dnfimage-deployer"))
            .args(["--allow-replacement"]))?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    Ok(())
}

#[test]
fn unprivileged_caller_may_read_but_not_change() -> Result<()> {
    let s = setup_with(&["--socket-mode", "666"])?;
    let v1 = s.import(tags::BASE_V1)?;
    s.deploy(&v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    let socket = s.socket();
    let socket = socket.to_str().context("socket path")?;
    let as_nobody = |method: &str, params: &str| {
        let mut cmd = Command::new(dnfimage_integration::varlinkctl());
        cmd.args(["call", socket, &format!("{DEPLOYER}.{method}"), params])
            .uid(65534)
            .gid(65534);
        cmd
    };
    let out = run_ok(&mut as_nobody("Status", "{}"))?;
    assert!(out.contains(&v1.commit), "{out}");
    let params = json!({"commit": v1.commit}).to_string();
    run_ok(&mut as_nobody("CheckSpace", &params))?;
    for (method, params) in [
        ("Rollback", "{}".to_string()),
        ("Pin", r#"{"index":0,"pinned":true}"#.to_string()),
        ("Cancel", "{}".to_string()),
        ("ApplyLive", "{}".to_string()),
        (
            "Deploy",
            json!({"commit": v1.commit, "image": IMAGE_V1}).to_string(),
        ),
    ] {
        let out = run(&mut as_nobody(method, &params))?;
        assert!(!out.status.success(), "{method}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("PermissionDenied"), "{method}: {stderr}");
    }
    assert_eq!(s.deployments()?.len(), 1);
    assert!(!s.deployments()?[0].pinned);
    Ok(())
}

#[test]
fn protocol_errors_are_replies() -> Result<()> {
    let s = setup()?;
    for (call, want) in [
        (
            json!({"method": "org.dnfimage.Deployer.Nope", "parameters": {}}),
            "org.varlink.service.MethodNotFound",
        ),
        (
            json!({"method": "org.dnfimage.Deployer.Pin", "parameters": {"index": "zero", "pinned": true}}),
            "org.varlink.service.InvalidParameter",
        ),
        (
            json!({"method": "org.dnfimage.Deployer.Deploy", "parameters": {"commit": "x"}}),
            "org.varlink.service.InvalidParameter",
        ),
    ] {
        let replies = raw_call(&s.socket(), &call)?;
        assert_eq!(error_name(&replies[0]), Some(want), "{call}");
    }
    let replies = raw_call(
        &s.socket(),
        &json!({"method": "org.varlink.service.GetInfo"}),
    )?;
    assert_eq!(replies[0]["parameters"]["product"], "dnfimage-deployer");
    Ok(())
}

#[test]
fn served_interface_matches_the_committed_idl() -> Result<()> {
    let s = setup()?;
    dnfimage_integration::assert_served_idl_matches(&s.socket(), DEPLOYER)
}

#[test]
fn service_stops_on_sigterm_and_removes_its_socket() -> Result<()> {
    let mut s = setup()?;
    s.service.signal(libc::SIGTERM);
    assert_eq!(s.service.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(!Path::new(&s.socket()).exists());
    Ok(())
}

#[test]
fn layered_commit_records_its_request_in_the_origin() -> Result<()> {
    let s = setup()?;
    let v1 = s.import(tags::BASE_V1)?;
    // A commit as the layerer makes them: parent the image commit, the request in its
    // metadata.
    let request = json!({
        "packages": ["htop"],
        "inactive": ["bash"],
        "overrideRemove": ["nano"],
        "overrideReplace": [{"name": "kernel-core", "version": "6.2.1-1", "architecture": "x86_64"}],
    });
    let overlay = s.scratch.path().join("layered");
    std::fs::create_dir_all(overlay.join("usr/bin"))?;
    std::fs::write(overlay.join("usr/bin/htop"), b"#!/bin/sh\n")?;
    let layered = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", s.repo().display()))
            .args(["commit", "--orphan", "--no-xattrs", "--subject=layered"])
            .arg(format!("--parent={}", v1.commit))
            .arg(format!(
                "--add-metadata-string={}={request}",
                deployer::LAYERING_METADATA_KEY
            ))
            .arg(format!("--tree=ref={}", v1.commit))
            .arg(format!("--tree=dir={}", overlay.display())),
    )?;
    let layered = layered.trim();
    let (_, result) = s.deploy(layered, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    let d = result.deployment;
    assert_eq!(d.commit, layered);
    assert_eq!(d.base_commit.as_deref(), Some(v1.commit.as_str()));
    assert_eq!(d.image.as_deref(), Some(IMAGE_V1));
    // The image facts come from the image commit under it.
    assert_eq!(d.image_digest.as_deref(), Some(v1.digest.as_str()));
    assert_eq!(d.version.as_deref(), Some("1"));
    assert_eq!(serde_json::to_value(&d.layering)?, request);
    let origin = s.origin(&d)?;
    assert!(origin.contains("[dnfimage-layering]"), "{origin}");
    assert!(origin.contains("packages=htop;"), "{origin}");
    assert!(
        origin.contains("override-replace=kernel-core-6.2.1-1.x86_64;"),
        "{origin}"
    );
    assert!(s.deployment_dir(&d).join("usr/bin/htop").exists());

    // A kernel argument change keeps the request.
    let result = s.set_kargs(json!({"append": ["quiet"]}))?;
    assert_eq!(result.deployment.layering, d.layering);
    assert_eq!(result.deployment.base_commit, d.base_commit);
    s.sysroot.fsck()?;
    Ok(())
}

/// Test images declaring kernel arguments in `/usr/lib/bootc/kargs.d`, derived from the fixture
/// bases in a layout of the test's own, imported into the sysroot's repository: v1, v2 (which
/// replaces v1's own argument and adds one) and one whose kargs.d has a broken file.
struct KargsImages {
    v1: Imported,
    v2: Imported,
    broken: Imported,
}

fn kargs_images(s: &Setup) -> Result<KargsImages> {
    let layout = s.scratch.path().join("kargs-images");
    let f = Fixtures::shared()?;
    copy_layout(&f.oci_dir, &[tags::BASE_V1, tags::BASE_V2], &layout)?;
    let foreign = format!(
        "kargs = [\"foreign.arch=1\"]\nmatch-architectures = [\"{}\"]\n",
        deploy_support::foreign_architecture()
    );
    let work = s.scratch.path();
    let v2_file = r#"kargs = ["console=ttyS0", "dnfimage.v=2", "new=1"]"#;
    deploy_support::kargs_image(
        &layout,
        tags::BASE_V1,
        "kargs-v1",
        work,
        &[
            (
                "10-console.toml",
                r#"kargs = ["console=ttyS0", "dnfimage.v=1"]"#,
            ),
            ("20-foreign.toml", &foreign),
            ("README", "Not a kargs file: only *.toml files are read."),
        ],
    )?;
    deploy_support::kargs_image(
        &layout,
        tags::BASE_V2,
        "kargs-v2",
        work,
        &[("10-console.toml", v2_file), ("20-foreign.toml", &foreign)],
    )?;
    deploy_support::kargs_image(
        &layout,
        tags::BASE_V2,
        "kargs-broken",
        work,
        &[
            ("10-console.toml", v2_file),
            ("30-bad.toml", "kargs = \"quiet\"\n"),
        ],
    )?;
    let import = |tag: &str| deploy_support::import(&s.repo(), &oci_ref(&layout, tag));
    Ok(KargsImages {
        v1: import("kargs-v1")?,
        v2: import("kargs-v2")?,
        broken: import("kargs-broken")?,
    })
}

/// What the boot entry of `d` passes to the kernel, without `ostree=`.
fn entry_arguments(s: &Setup, d: &Deployment) -> Result<Vec<String>> {
    let entries = s.boot_entries()?;
    Ok(entry_of(s, &entries, d)?["options"]
        .split_whitespace()
        .filter(|a| !a.starts_with("ostree="))
        .map(str::to_string)
        .collect())
}

/// An image's kargs.d arguments come with its first deploy; an upgrade replaces the old image's
/// with the new image's and keeps those the user added; a broken kargs.d file refuses the deploy
/// and changes nothing.
#[test]
fn kernel_arguments_from_the_image_follow_upgrades_and_keep_the_users() -> Result<()> {
    let s = setup()?;
    let images = kargs_images(&s)?;

    // First deploy: the image's arguments, not the foreign architecture's, not the README's.
    let (_, result) = s.deploy(&images.v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    let d = &result.deployment;
    assert_eq!(d.kernel_arguments, ["console=ttyS0", "dnfimage.v=1"]);
    assert_eq!(result.added_kernel_arguments, d.kernel_arguments);
    assert!(result.removed_kernel_arguments.is_empty());
    assert_eq!(entry_arguments(&s, d)?, d.kernel_arguments);

    // The user adds one.
    let result = s.set_kargs(json!({"append": ["quiet"]}))?;
    assert_eq!(
        result.deployment.kernel_arguments,
        ["console=ttyS0", "dnfimage.v=1", "quiet"]
    );
    assert!(result.added_kernel_arguments.is_empty());

    // An image whose kargs.d has a broken file: refused, naming the file; nothing changed.
    let before = s.status()?;
    let (dirs, entries) = (s.deployment_dirs()?, s.boot_entries()?);
    let (_, outcome) = s.call(
        "Deploy",
        json!({"commit": images.broken.commit, "image": IMAGE_V2}),
    )?;
    let (name, p) = outcome.err()?;
    assert_eq!(name, "InvalidKernelArgumentsFile", "{p}");
    assert_eq!(p["file"], "/usr/lib/bootc/kargs.d/30-bad.toml", "{p}");
    assert_eq!(p["commit"], images.broken.commit.as_str(), "{p}");
    let message = p["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("Line 1: "), "{p}");
    assert_eq!(s.status()?.deployments, before.deployments);
    assert_eq!(s.deployment_dirs()?, dirs);
    assert_eq!(s.boot_entries()?, entries);

    // The upgrade: v1's own argument gives way to v2's, the shared one stays once, the user's
    // stays.
    let (_, result) = s.deploy(&images.v2.commit, IMAGE_V2, json!({}))?;
    let d = &result.deployment;
    assert_eq!(d.commit, images.v2.commit);
    assert_eq!(
        d.kernel_arguments,
        ["console=ttyS0", "quiet", "dnfimage.v=2", "new=1"]
    );
    assert_eq!(result.added_kernel_arguments, ["dnfimage.v=2", "new=1"]);
    assert_eq!(result.removed_kernel_arguments, ["dnfimage.v=1"]);
    assert_eq!(entry_arguments(&s, d)?, d.kernel_arguments);
    // The rollback keeps its own.
    let ds = s.deployments()?;
    assert_eq!(ds.len(), 2);
    assert_eq!(
        ds[1].kernel_arguments,
        ["console=ttyS0", "dnfimage.v=1", "quiet"]
    );
    assert_eq!(entry_arguments(&s, &ds[1])?, ds[1].kernel_arguments);

    // The same image again: nothing added twice.
    let (_, result) = s.deploy(&images.v2.commit, IMAGE_V2, json!({}))?;
    assert_eq!(
        result.deployment.kernel_arguments,
        ["console=ttyS0", "quiet", "dnfimage.v=2", "new=1"]
    );
    assert!(result.added_kernel_arguments.is_empty());
    assert!(result.removed_kernel_arguments.is_empty());

    // Back to v1 (a rebase or a roll forward by Deploy): v2's own ones go, v1's come back.
    let (_, result) = s.deploy(&images.v1.commit, IMAGE_V1, json!({}))?;
    assert_eq!(
        result.deployment.kernel_arguments,
        ["console=ttyS0", "quiet", "dnfimage.v=1"]
    );
    assert_eq!(result.removed_kernel_arguments, ["dnfimage.v=2", "new=1"]);
    s.sysroot.fsck()?;
    Ok(())
}

/// A deployment that is not from an image (no image in its origin) declares nothing to
/// replace, even when its tree has a kargs.d; one from an image whose kargs.d another tool let
/// through broken declares nothing either, and the next image still deploys.
#[test]
fn kernel_arguments_from_a_deployment_another_tool_wrote() -> Result<()> {
    let s = setup()?;
    let images = kargs_images(&s)?;
    let admin_deploy = |commit: &str, origin: &str, karg: &str| -> Result<()> {
        let file = s.scratch.path().join("admin.origin");
        std::fs::write(&file, origin)?;
        run_ok(
            Command::new("ostree")
                .args(["admin", "deploy", &format!("--os={STATEROOT}")])
                .arg(format!("--sysroot={}", s.sysroot.path().display()))
                .arg(format!("--origin-file={}", file.display()))
                .args(["--karg-none", &format!("--karg={karg}")])
                .arg(commit),
        )?;
        Ok(())
    };

    // A plain ostree deployment of v2's tree (its origin names a ref, no image): rebasing onto
    // v1 removes none of v2's declared arguments and adds v1's after the ones it has.
    admin_deploy(
        &images.v2.commit,
        "[origin]\nrefspec=dnfimage:os/stable\n",
        "dnfimage.v=2",
    )?;
    let (_, result) = s.deploy(&images.v1.commit, IMAGE_V1, json!({}))?;
    assert_eq!(
        result.deployment.kernel_arguments,
        ["dnfimage.v=2", "console=ttyS0", "dnfimage.v=1"]
    );
    assert!(result.removed_kernel_arguments.is_empty());

    // Deployed from an image by another tool although its kargs.d has a broken file: it
    // counts as declaring nothing, and v2 deploys with its own arguments.
    admin_deploy(
        &images.broken.commit,
        "[origin]\ncontainer-image-reference=ostree-unverified-registry:registry.example/x:1\n",
        "quiet",
    )?;
    let (_, result) = s.deploy(&images.v2.commit, IMAGE_V2, json!({}))?;
    assert_eq!(
        result.deployment.kernel_arguments,
        ["quiet", "console=ttyS0", "dnfimage.v=2", "new=1"]
    );
    assert!(result.removed_kernel_arguments.is_empty());
    let log = s.service.log_text();
    assert!(
        log.contains("ignoring") && log.contains("30-bad.toml"),
        "the broken file is logged: {log}"
    );
    s.sysroot.fsck()?;
    Ok(())
}

/// A kargs.d file that is a symbolic link, or too large to be a command line, refuses the
/// deploy with the file named; nothing changes.
#[test]
fn kargs_d_links_and_huge_files_are_refused() -> Result<()> {
    let s = setup()?;
    let images = kargs_images(&s)?;
    s.deploy(&images.v1.commit, IMAGE_V1, json!({"stateroot": STATEROOT}))?;
    let before = s.status()?;
    let dirs = s.deployment_dirs()?;
    let cases = [
        (
            "link",
            "40-link.toml",
            "It is a symbolic link (to \"10-console.toml\"), not a file",
        ),
        (
            "huge",
            "40-huge.toml",
            "It has 65547 bytes, more than the 65536 read",
        ),
    ];
    for (what, name, message) in cases {
        let overlay = s.scratch.path().join(format!("overlay-{what}"));
        let dir = overlay.join(deploy_support::KARGS_D);
        std::fs::create_dir_all(&dir)?;
        if what == "link" {
            std::os::unix::fs::symlink("10-console.toml", dir.join(name))?;
        } else {
            std::fs::write(dir.join(name), format!("kargs = []\n{}", "#".repeat(65536)))?;
        }
        let commit = deploy_support::commit_overlay(&s.repo(), &images.v2.commit, &overlay, what)?;
        let (_, outcome) = s.call("Deploy", json!({"commit": commit, "image": IMAGE_V2}))?;
        let (error, p) = outcome.err()?;
        assert_eq!(error, "InvalidKernelArgumentsFile", "{what}: {p}");
        assert_eq!(p["file"], format!("/usr/lib/bootc/kargs.d/{name}"), "{p}");
        assert_eq!(p["message"], message, "{p}");
    }
    assert_eq!(s.status()?.deployments, before.deployments);
    assert_eq!(s.deployment_dirs()?, dirs);
    Ok(())
}
