//! The VM suite: the example base OS (examples/base) built as OCI images, turned into a qcow2
//! with a NoCloud seed, booted under qemu (TCG), and driven over the serial console through a
//! user's day: boot, socket activation, upgrade to v2, reboot, rollback, reboot. Every boot goes
//! through OVMF and the disk's own GRUB, whose menu is the one libostree rewrites on each
//! deployment change, so each reboot also shows the bootloader follows upgrade and rollback.
//! Update images come from a second, read-only disk holding an OCI layout (`oci:` transport):
//! the guest has no network.
//!
//! Slow (about 15 minutes on 2 cores) and root-only: ignored by plain `cargo test`; `make test`
//! runs it last and `make test-vm` alone (`scripts/vm/setup.sh` then
//! `cargo test -p dnfimage-integration --test vm -- --ignored --nocapture`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use dnfimage_integration::repo_root;
use dnfimage_integration::vm::{Drive, Firmware, Vm};
use dnfimage_testimage::TestRpms;

const USER: &str = "dnfuser";
const PASSWORD: &str = "dnfimage-vm-test";
/// Where the guest mounts the updates disk; the deployment's origin points below it.
const UPDATES_MOUNT: &str = "/run/updates";
const UPDATES_LABEL: &str = "dnfimage-updates";
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(180);
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const SERVICES: [&str; 4] = ["fetcher", "importer", "deployer", "layerer"];
/// The layered package of step 5 (from the test packages' repository, with a dependency).
const LAYERED: &str = "dnfimage-hello";
const LAYERED_FILE: &str = "/usr/share/dnfimage-hello/hello.txt";

/// Why step 5 (layering) cannot run, if it cannot.
fn layering_unavailable(root: &Path, target: &Path) -> Option<String> {
    if !root.join("services/layerer/src/lib.rs").exists() {
        return Some("the layerer has not landed (services/layerer/src/lib.rs)".into());
    }
    if !target.join("debug/dnfimage-layerer").exists() {
        return Some("dnfimage-layerer is not built".into());
    }
    None
}

/// Timings, printed at the end (and as they happen).
#[derive(Default)]
struct Timings(Vec<(String, String)>);

impl Timings {
    fn add(&mut self, what: &str, value: String) {
        println!("vm: {what}: {value}");
        self.0.push((what.to_string(), value));
    }
    fn secs(&mut self, what: &str, since: Instant) {
        self.add(what, format!("{:.1} s", since.elapsed().as_secs_f64()));
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("Starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn missing_tools() -> Vec<&'static str> {
    [
        "qemu-system-x86_64",
        "mmdebstrap",
        "grub-mkimage",
        "mcopy",
        "mkfs.fat",
        "sgdisk",
        "genisoimage",
        "debugfs",
        "qemu-img",
    ]
    .into_iter()
    .filter(|t| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .collect()
}

/// Adds the tag `latest` to the OCI layout `dir`, pointing at the manifest tagged `tag`.
fn tag_latest(dir: &Path, tag: &str) -> Result<()> {
    let path = dir.join("index.json");
    let text = std::fs::read_to_string(&path).context("Reading index.json")?;
    let mut index: serde_json::Value = serde_json::from_str(&text).context("Parsing index.json")?;
    let manifests = index["manifests"]
        .as_array_mut()
        .context("index.json has no manifests")?;
    let refname = |m: &serde_json::Value| {
        m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .map(str::to_string)
    };
    let mut desc = manifests
        .iter()
        .find(|m| refname(m).as_deref() == Some(tag))
        .cloned()
        .with_context(|| format!("No manifest tagged {tag}"))?;
    desc["annotations"]["org.opencontainers.image.ref.name"] = "latest".into();
    manifests.retain(|m| refname(m).as_deref() != Some("latest"));
    manifests.push(desc);
    std::fs::write(&path, serde_json::to_string(&index)?).context("Writing index.json")
}

struct Env {
    work: PathBuf,
    vmimage: PathBuf,
    /// OVMF's variable store, kept across boots like a machine's NVRAM.
    vars: PathBuf,
    disk: PathBuf,
    seed: PathBuf,
    updates: PathBuf,
}

impl Env {
    fn drives(&self) -> Vec<Drive> {
        vec![
            Drive {
                path: self.disk.clone(),
                format: "qcow2",
                read_only: false,
            },
            Drive {
                path: self.seed.clone(),
                format: "raw",
                read_only: true,
            },
            Drive {
                path: self.updates.clone(),
                format: "raw",
                read_only: true,
            },
        ]
    }

    /// Boots the disk through OVMF and its GRUB; logs in as root; checks GRUB booted the
    /// default BLS entry (read from the disk before booting).
    fn boot(&self, name: &str, t: &mut Timings) -> Result<Vm> {
        let entry_dir = self.work.join(format!("entry-{name}"));
        run(Command::new(&self.vmimage)
            .args(["boot-entry", "--disk"])
            .arg(&self.disk)
            .arg("--out")
            .arg(&entry_dir))?;
        let entry: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(entry_dir.join("entry.json")).context("Reading entry.json")?,
        )?;
        let options = entry["options"].as_str().context("entry without options")?;
        let deployment = options
            .split_whitespace()
            .find(|o| o.starts_with("ostree="))
            .context("entry without ostree=")?
            .to_string();
        println!(
            "vm: {name}: default entry {} ({deployment})",
            entry["title"]
        );
        let firmware = Firmware {
            code: OVMF_CODE.into(),
            vars: self.vars.clone(),
        };
        let log = self.work.join(format!("console-{name}.log"));
        let mut vm = Vm::start(name, &firmware, &self.drives(), 2048, &log)?;
        vm.wait_for("GRUB", BOOT_TIMEOUT)?;
        vm.login(USER, PASSWORD, BOOT_TIMEOUT)?;
        t.add(
            &format!("{name}: boot to root shell (OVMF + GRUB)"),
            format!("{:.1} s", vm.uptime()),
        );
        let cmdline = vm.sh("cat /proc/cmdline", STEP)?;
        ensure!(
            cmdline.split_whitespace().any(|o| o == deployment),
            "GRUB did not boot the default entry ({deployment}): /proc/cmdline is {cmdline}"
        );
        Ok(vm)
    }
}

fn reboot(vm: &mut Vm, name: &str, t: &mut Timings) -> Result<()> {
    let start = Instant::now();
    vm.send("systemctl reboot")?;
    vm.wait_exit(SHUTDOWN_TIMEOUT)?;
    t.secs(&format!("{name}: shutdown"), start);
    Ok(())
}

fn active_services(vm: &mut Vm) -> Result<Vec<String>> {
    let mut active = Vec::new();
    for s in SERVICES {
        let (rc, _) = vm.sh_status(
            &format!("systemctl is-active -q dnfimage-{s}.service"),
            STEP,
        )?;
        if rc == 0 {
            active.push(s.to_string());
        }
    }
    Ok(active)
}

/// `IMAGE_VERSION` of the booted OS.
fn os_version(vm: &mut Vm) -> Result<String> {
    Ok(vm
        .sh(". /usr/lib/os-release; echo \"v=$IMAGE_VERSION\"", STEP)?
        .lines()
        .find_map(|l| l.strip_prefix("v="))
        .unwrap_or("")
        .trim()
        .to_string())
}

/// `dnf-image status --json`, parsed; prints the human form too.
fn status(vm: &mut Vm, when: &str) -> Result<serde_json::Value> {
    let text = vm.sh("dnf-image status", STEP)?;
    println!("vm: dnf-image status ({when}):\n{text}");
    let out = vm.sh("dnf-image status --json", STEP)?;
    let json = out
        .find('{')
        .zip(out.rfind('}'))
        .map(|(a, b)| &out[a..=b])
        .with_context(|| format!("no JSON in: {out}"))?;
    serde_json::from_str(json).with_context(|| format!("parsing status: {json}"))
}

/// The version (image label) of the deployment with `flag` set (`booted`, `staged`,
/// `rollback`), if any.
fn version_where(status: &serde_json::Value, flag: &str) -> Option<String> {
    status["deployments"]
        .as_array()?
        .iter()
        .find(|d| d[flag].as_bool() == Some(true))
        .and_then(|d| d["version"].as_str().map(str::to_string))
}

fn suite() -> Result<()> {
    let mut t = Timings::default();
    let root = repo_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    let work = target.join("vm/run");
    if work.exists() {
        std::fs::remove_dir_all(&work).context("Removing the previous run")?;
    }
    std::fs::create_dir_all(&work)?;

    // The images.
    let images = work.join("images");
    let start = Instant::now();
    let built = Command::new(root.join("examples/base/build.sh"))
        .arg(&images)
        .status()
        .context("Running examples/base/build.sh")?;
    ensure!(built.success(), "examples/base/build.sh failed ({built})");
    t.secs(
        "image build (v1 + v2; mmdebstrap cached if target/vm/cache has it)",
        start,
    );
    let oci = images.join("oci");
    tag_latest(&oci, "v2")?;
    // Step 5's packages go on the updates disk too: a signed rpm repository and its key.
    let no_layering = layering_unavailable(&root, &target);
    if no_layering.is_none() {
        let rpms = TestRpms::shared().context("Building the test packages")?;
        run(Command::new("cp")
            .arg("-a")
            .arg(&rpms.repo_dir)
            .arg(images.join("rpms")))?;
        std::fs::copy(&rpms.key_file, images.join("RPM-GPG-KEY-dnfimage-test"))
            .context("Copying the package key")?;
    }

    let vmimage = target.join("debug/dnfimage-vmimage");
    let disk = work.join("disk.qcow2");
    let start = Instant::now();
    run(Command::new(&vmimage)
        .arg("disk")
        .arg("--image")
        .arg(format!("oci:{}:v1", oci.display()))
        .arg("--target")
        .arg(format!("oci:{UPDATES_MOUNT}/oci:latest"))
        .arg("--out")
        .arg(&disk))?;
    t.secs("disk build (deploy + filesystems + qcow2)", start);
    let size = std::fs::metadata(&disk)?.len();
    t.add("qcow2 size", format!("{:.0} MiB", size as f64 / 1048576.0));

    let seed = work.join("seed.iso");
    run(Command::new(&vmimage)
        .arg("seed")
        .arg("--out")
        .arg(&seed)
        .args(["--user", USER, "--password", PASSWORD]))?;
    let updates = work.join("updates.img");
    let start = Instant::now();
    let mib = run(Command::new("du").args(["-s", "-B1M"]).arg(&oci))?
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .context("du")?;
    std::fs::File::create(&updates)?.set_len(((mib + 64) * 12 / 10) << 20)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", UPDATES_LABEL, "-d"])
        .arg(&images)
        .arg(&updates))?;
    t.secs("updates disk", start);
    let vars = work.join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars).context("Copying OVMF variables (apt-get install ovmf)")?;
    let env = Env {
        work: work.clone(),
        vmimage,
        vars,
        disk: disk.clone(),
        seed,
        updates,
    };

    // 1. Boot v1; cloud-init made the user; status shows the booted deployment and image.
    let mut vm = env.boot("boot1-v1", &mut t)?;
    let start = Instant::now();
    let out = vm.sh("cloud-init status --wait; id dnfuser", STEP)?;
    println!("{out}");
    ensure!(
        out.contains("status: done"),
        "cloud-init did not finish: {out}"
    );
    ensure!(
        out.contains("uid="),
        "cloud-init did not create {USER}: {out}"
    );
    ensure!(os_version(&mut vm)? == "1", "not running v1");

    // 2. No service runs until called; a call activates only what it needs; idle exit.
    let before = active_services(&mut vm)?;
    ensure!(
        before.is_empty(),
        "services running before any call: {before:?}"
    );
    let sockets = vm.sh("systemctl is-active dnfimage-fetcher.socket dnfimage-importer.socket dnfimage-deployer.socket", STEP)?;
    ensure!(
        !sockets.contains("inactive"),
        "sockets not listening: {sockets}"
    );
    let st = status(&mut vm, "v1")?;
    let booted = st["deployments"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["booted"].as_bool() == Some(true)))
        .cloned()
        .context("status shows no booted deployment")?;
    ensure!(
        booted["image"]
            .as_str()
            .is_some_and(|i| i.contains(&format!("{UPDATES_MOUNT}/oci:latest"))),
        "the booted deployment's image is not the disk's target reference: {booted}"
    );
    ensure!(
        booted["version"] == "1",
        "booted version is not 1: {booted}"
    );
    t.secs("step 1: cloud-init + first dnf-image status", start);
    let after = active_services(&mut vm)?;
    println!("vm: services active after `dnf-image status`: {after:?}");
    ensure!(
        after.contains(&"deployer".to_string()),
        "status did not start the deployer"
    );
    ensure!(
        !after.contains(&"importer".to_string()) && !after.contains(&"layerer".to_string()),
        "status started more than it needs: {after:?}"
    );
    let start = Instant::now();
    loop {
        let now = active_services(&mut vm)?;
        if now.is_empty() {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "services still running after 120 s idle: {now:?}"
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    t.secs("step 2: services exited when idle", start);

    // 3. Upgrade to v2 (staged), reboot into it; v1 is the rollback.
    vm.sh(
        &format!("mkdir -p {UPDATES_MOUNT} && mount -o ro LABEL={UPDATES_LABEL} {UPDATES_MOUNT}"),
        STEP,
    )?;
    // 5 (first half). Layer a package on v1; the upgrade must carry it to v2.
    let start = Instant::now();
    match &no_layering {
        Some(why) => println!("vm: step 5 skipped: {why}"),
        None => {
            vm.sh(
                &format!(
                    "mkdir -p /etc/yum.repos.d /etc/pki/rpm-gpg && \
                     cp {UPDATES_MOUNT}/RPM-GPG-KEY-dnfimage-test /etc/pki/rpm-gpg/ && \
                     printf '[dnfimage-test]\\nname=test packages\\nbaseurl=file://{UPDATES_MOUNT}/rpms\\n\
                     enabled=1\\ngpgcheck=1\\nmetadata_expire=0\\n' >/etc/yum.repos.d/dnfimage-test.repo"
                ),
                STEP,
            )?;
            let out = vm.sh(
                &format!("dnf-image install {LAYERED}"),
                Duration::from_secs(900),
            )?;
            println!("vm: dnf-image install {LAYERED}:\n{out}");
            t.secs(
                "step 5: dnf-image install (layered deployment staged)",
                start,
            );
        }
    }
    let start = Instant::now();
    let out = vm.sh("dnf-image upgrade", Duration::from_secs(900))?;
    println!("vm: dnf-image upgrade:\n{out}");
    let st = status(&mut vm, "staged")?;
    ensure!(
        version_where(&st, "staged").as_deref() == Some("2"),
        "v2 is not staged"
    );
    t.secs("step 3: dnf-image upgrade (fetch + import + stage)", start);
    reboot(&mut vm, "boot1-v1", &mut t)?;
    drop(vm);
    let mut vm = env.boot("boot2-v2", &mut t)?;
    let start = Instant::now();
    ensure!(
        os_version(&mut vm)? == "2",
        "not running v2 after the upgrade"
    );
    vm.sh("cat /usr/share/dnfimage-os/v2", STEP)?;
    let st = status(&mut vm, "v2")?;
    ensure!(
        version_where(&st, "booted").as_deref() == Some("2"),
        "status: v2 not booted"
    );
    ensure!(
        version_where(&st, "rollback").as_deref() == Some("1"),
        "status: v1 is not the rollback"
    );
    t.secs("step 3: checks in v2", start);

    // 5 (second half). The layered package survived the upgrade.
    if no_layering.is_none() {
        let out = vm.sh(&format!("cat {LAYERED_FILE}"), STEP)?;
        ensure!(out.contains("hello"), "layered file missing in v2: {out}");
        let packages = st["deployments"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["booted"].as_bool() == Some(true)))
            .map(|d| d["layering"]["packages"].to_string())
            .unwrap_or_default();
        ensure!(
            packages.contains(LAYERED),
            "status does not list {LAYERED}: {packages}"
        );
        println!("vm: step 5: {LAYERED} survived the upgrade to v2");
    }

    // 4. Rollback + reboot returns to v1.
    let start = Instant::now();
    let out = vm.sh("dnf-image rollback", STEP)?;
    println!("vm: dnf-image rollback:\n{out}");
    t.secs("step 4: dnf-image rollback", start);
    reboot(&mut vm, "boot2-v2", &mut t)?;
    drop(vm);
    let mut vm = env.boot("boot3-v1", &mut t)?;
    ensure!(
        os_version(&mut vm)? == "1",
        "not running v1 after the rollback"
    );
    ensure!(
        vm.sh_status("test -e /usr/share/dnfimage-os/v2", STEP)?.0 != 0,
        "v2's file is still there"
    );
    let st = status(&mut vm, "after rollback")?;
    ensure!(
        version_where(&st, "booted").as_deref() == Some("1"),
        "status: v1 not booted"
    );
    vm.send("systemctl poweroff")?;
    vm.wait_exit(SHUTDOWN_TIMEOUT)?;
    drop(vm);

    // Derived images from Containerfiles (buildah, offline), each ending with the lint step.
    let start = Instant::now();
    let base_ref = format!("oci:{}:v1", oci.display());
    let derived = work.join("derived");
    run(Command::new(root.join("examples/derived/build.sh"))
        .arg(&base_ref)
        .arg(&derived))?;
    t.secs("derived images (firewall, tool) built with buildah", start);
    let bad = Command::new(root.join("examples/derived/build.sh"))
        .arg(&base_ref)
        .arg(work.join("derived-bad"))
        .env("DERIVED", "bad")
        .output()
        .context("Building the bad example")?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        !bad.status.success()
            && stderr.contains("content in /var")
            && stderr.contains("/opt has content")
            && stderr.contains("leftover files in /tmp"),
        "the lint step did not stop the bad example:\n{stderr}"
    );
    println!("vm: the lint step stopped examples/derived/bad as expected");

    // On success only the console logs stay (a failed run keeps everything to look at).
    for big in ["disk.qcow2", "updates.img", "images", "derived"] {
        let p = work.join(big);
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if let Err(e) = removed {
            println!("vm: removing {}, ignoring: {e}", p.display());
        }
    }

    println!("vm: summary");
    for (what, value) in &t.0 {
        println!("vm:   {what}: {value}");
    }
    Ok(())
}

#[test]
#[ignore = "builds an OS and boots it under qemu for about 15 minutes, as root: make test-vm"]
fn vm_suite() -> Result<()> {
    let missing = missing_tools();
    ensure!(
        missing.is_empty(),
        "missing tools {missing:?}: run scripts/vm/setup.sh"
    );
    suite()
}
