//! The VM suite: the example base OS (examples/base) built as OCI images, turned into a qcow2
//! with a NoCloud seed, booted under qemu (TCG), and driven over the serial console through a
//! user's day: boot, socket activation, upgrade to v2, reboot, rollback, reboot. Every boot goes
//! through OVMF and the disk's own GRUB, whose menu is the one libostree rewrites on each
//! deployment change, so each reboot also shows the bootloader follows upgrade and rollback.
//! Update images come from a second, read-only disk holding an OCI layout (`oci:` transport):
//! the guest has no network, except in the last boot, where a registry on the host's 127.0.0.1
//! is all it can reach (qemu's user network with `restrict=on` and one `guestfwd`), for the
//! signed upgrade of step 6. The guest is driven as its users would: `dnf image …`, `dnf
//! upgrade`, `dnf install` (the dnf plugin hands them to `dnf-image`).
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
use dnfimage_testimage::{Registry, SigningKey, TestRpms};

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
/// Where the guest finds the host's registry (qemu's guestfwd), in step 6.
const REGISTRY_IN_GUEST: &str = "10.0.2.100:5000";
/// The image step 6 rebases to: signed v2, then unsigned v3.
const SIGNED_REPO: &str = "dnfimage/os";
const SIGNED_TAG: &str = "signed";

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
        "socat",
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
    /// qemu arguments giving a guest the registry (and nothing else) as its network.
    network: Vec<String>,
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
        self.boot_with(name, t, &[])
    }

    /// [`Env::boot`] with more qemu arguments.
    fn boot_with(&self, name: &str, t: &mut Timings, extra: &[String]) -> Result<Vm> {
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
        let mut vm = Vm::start(name, &firmware, &self.drives(), 2048, &log, extra)?;
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

/// `dnf image status --json`, parsed; prints the human form too.
fn status(vm: &mut Vm, when: &str) -> Result<serde_json::Value> {
    let text = vm.sh("dnf image status", STEP)?;
    println!("vm: dnf image status ({when}):\n{text}");
    let out = vm.sh("dnf image status --json", STEP)?;
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

/// Step 6, on a booted guest whose network is the registry: policy, rebase to the signed v2,
/// then the tag moved to the unsigned v3.
fn signed_upgrade(vm: &mut Vm, registry: &Registry, key: &SigningKey, oci: &Path) -> Result<()> {
    let image = format!("docker://{REGISTRY_IN_GUEST}/{SIGNED_REPO}:{SIGNED_TAG}");
    let policy = serde_json::json!({
        "default": [{"type": "insecureAcceptAnything"}],
        "transports": {"docker": {REGISTRY_IN_GUEST: [{
            "type": "signedBy", "keyType": "GPGKeys",
            "keyPath": "/etc/pki/containers/dnfimage-vm.gpg",
        }]}},
    });
    vm.sh(
        &format!(
            "mkdir -p {UPDATES_MOUNT} && mount -o ro LABEL={UPDATES_LABEL} {UPDATES_MOUNT} && \
             nic=$(ls /sys/class/net | grep -v '^lo$' | head -n1) && ip link set \"$nic\" up && \
             ip addr replace 10.0.2.15/24 dev \"$nic\" && \
             mkdir -p /etc/pki/containers /etc/containers/registries.d \
               /etc/containers/registries.conf.d && \
             cp {UPDATES_MOUNT}/signing-key.gpg /etc/pki/containers/dnfimage-vm.gpg && \
             printf '%s\\n' '{policy}' >/etc/containers/policy.json && \
             printf 'docker:\\n  {REGISTRY_IN_GUEST}:\\n    lookaside: file://{UPDATES_MOUNT}/sigs\\n' \
               >/etc/containers/registries.d/dnfimage-vm.yaml && \
             printf '[[registry]]\\nlocation = \"{REGISTRY_IN_GUEST}\"\\ninsecure = true\\n' \
               >/etc/containers/registries.conf.d/50-dnfimage-vm.conf"
        ),
        STEP,
    )?;
    let out = vm.sh(
        &format!("dnf image rebase {image} 2>&1"),
        Duration::from_secs(900),
    )?;
    println!("vm: dnf image rebase {image}:\n{out}");
    let st = status(vm, "signed v2 staged")?;
    let staged = st["deployments"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["staged"] == true))
        .cloned()
        .context("no staged deployment after the signed rebase")?;
    ensure!(
        staged["version"] == "2",
        "the staged deployment is not v2: {staged}"
    );
    ensure!(
        staged["trust"]["verified"] == true
            && staged["trust"]["signers"]
                .to_string()
                .contains(&key.fingerprint),
        "status does not name the signer {}: {staged}",
        key.fingerprint
    );
    // The tag moves to an image nobody signed.
    dnfimage_testimage::skopeo_copy(
        &format!("oci:{}:v3", oci.display()),
        &format!("docker://{}/{SIGNED_REPO}:{SIGNED_TAG}", registry.addr()),
    )?;
    let (rc, out) = vm.sh_status("dnf upgrade -y 2>&1", Duration::from_secs(600))?;
    println!("vm: dnf upgrade to the unsigned v3 (exit {rc}):\n{out}");
    ensure!(
        rc != 0 && out.contains("The signature policy refuses") && out.contains("not signed"),
        "the unsigned v3 was not refused (exit {rc}): {out}"
    );
    let after = status(vm, "after the refused upgrade")?;
    ensure!(
        after["deployments"] == st["deployments"],
        "the refused upgrade changed the deployments: {after}"
    );
    Ok(())
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

    // Step 6's registry and signatures: a registry on 127.0.0.1, which the guest reaches as
    // REGISTRY_IN_GUEST; v2 there signed by a key made now (the signature names the image as
    // the guest sees it), and v3 (v2 plus a layer) to push unsigned later. The signature and
    // the public key go on the updates disk.
    let start = Instant::now();
    let registry = Registry::start(&work.join("registry"))?;
    let key = SigningKey::generate(&work.join("gpg"), "dnfimage VM test <vm@example.invalid>")?;
    dnfimage_testimage::build_derived(&oci, "v2", "v3")?;
    let on_host = format!("docker://{}/{SIGNED_REPO}:{SIGNED_TAG}", registry.addr());
    dnfimage_testimage::skopeo_copy(&format!("oci:{}:v2", oci.display()), &on_host)?;
    let (manifest, digest) = dnfimage_testimage::raw_manifest(&on_host)?;
    let manifest_file = work.join("v2-manifest.json");
    std::fs::write(&manifest_file, manifest)?;
    let sig_dir = images.join(format!(
        "sigs/{SIGNED_REPO}@{}",
        digest.replacen(':', "=", 1)
    ));
    std::fs::create_dir_all(&sig_dir)?;
    run(Command::new("skopeo")
        .env("GNUPGHOME", key.home())
        .arg("standalone-sign")
        .arg(&manifest_file)
        .arg(format!("{REGISTRY_IN_GUEST}/{SIGNED_REPO}:{SIGNED_TAG}"))
        .arg(&key.fingerprint)
        .arg("--output")
        .arg(sig_dir.join("signature-1")))?;
    std::fs::copy(&key.public_key, images.join("signing-key.gpg"))
        .context("Copying the signing key")?;
    t.secs("step 6 preparation: registry, v3, signature of v2", start);

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
        network: vec![
            "-netdev".into(),
            format!(
                "user,id=net0,restrict=on,guestfwd=tcp:{REGISTRY_IN_GUEST}-cmd:socat STDIO \
                 TCP:{}",
                registry.addr()
            ),
            // A slot of its own (the disks keep the PCI addresses the firmware's boot entries
            // name) and no option ROM (the firmware does not try to boot from the network).
            "-device".into(),
            "virtio-net-pci,netdev=net0,addr=0x10,romfile=".into(),
        ],
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
            // dnf as usual: a read-only command works, `install` layers, a command that
            // would write /usr in place says what to do instead.
            let out = vm.sh(&format!("dnf repoquery --quiet {LAYERED}"), STEP)?;
            ensure!(out.contains(LAYERED), "dnf repoquery: {out}");
            let (rc, out) = vm.sh_status("dnf downgrade -y bash 2>&1", STEP)?;
            ensure!(
                rc != 0 && out.contains("dnf image rollback"),
                "dnf downgrade was not refused with its sentence (exit {rc}): {out}"
            );
            let out = vm.sh(
                &format!("dnf install -y {LAYERED}"),
                Duration::from_secs(900),
            )?;
            println!("vm: dnf install {LAYERED}:\n{out}");
            t.secs("step 5: dnf install (layered deployment staged)", start);
            // apply-live: the package's files are usable now, before any reboot.
            let start = Instant::now();
            ensure!(
                vm.sh_status(&format!("test -e {LAYERED_FILE}"), STEP)?.0 != 0,
                "{LAYERED_FILE} is there before apply-live"
            );
            let out = vm.sh("dnf image apply-live 2>&1", Duration::from_secs(600))?;
            println!("vm: dnf image apply-live:\n{out}");
            ensure!(out.contains("Applied commit"), "apply-live: {out}");
            let out = vm.sh(&format!("cat {LAYERED_FILE} && rpm -q {LAYERED}"), STEP)?;
            ensure!(
                out.contains("hello") && out.contains(LAYERED),
                "{LAYERED} not usable after apply-live: {out}"
            );
            let st = status(&mut vm, "live")?;
            let deps = st["deployments"].as_array().context("deployments")?;
            let booted = deps
                .iter()
                .find(|d| d["booted"] == true)
                .context("no booted deployment")?;
            ensure!(
                booted["unlocked"] == "transient" && booted["liveCommit"] == deps[0]["commit"],
                "status does not show the live change: {booted}"
            );
            let out = vm.sh("dnf image apply-live 2>&1", STEP)?;
            ensure!(out.contains("Nothing to apply"), "apply-live again: {out}");
            t.secs("step 5: dnf image apply-live", start);
        }
    }
    let start = Instant::now();
    let out = vm.sh("dnf upgrade -y", Duration::from_secs(900))?;
    println!("vm: dnf upgrade:\n{out}");
    let st = status(&mut vm, "staged")?;
    ensure!(
        version_where(&st, "staged").as_deref() == Some("2"),
        "v2 is not staged"
    );
    t.secs("step 3: dnf upgrade (fetch + import + stage)", start);
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
        // The package database the layerer committed opens on the read-only /usr.
        let out = vm.sh(&format!("rpm -q {LAYERED}"), STEP)?;
        ensure!(out.contains(LAYERED), "rpm -q {LAYERED} in v2: {out}");
        let packages = st["deployments"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["booted"].as_bool() == Some(true)))
            .map(|d| d["layering"]["packages"].to_string())
            .unwrap_or_default();
        ensure!(
            packages.contains(LAYERED),
            "status does not list {LAYERED}: {packages}"
        );
        let live = st["deployments"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["booted"] == true))
            .map(|d| d["unlocked"].clone())
            .unwrap_or_default();
        ensure!(
            live.is_null(),
            "the live change outlived the reboot: unlocked {live}"
        );
        println!("vm: step 5: {LAYERED} survived the upgrade to v2, from the deployment");
    }

    // 4. `rollback --apply` reboots by itself, into v1.
    let start = Instant::now();
    vm.send("dnf image rollback --apply")?;
    vm.wait_exit(SHUTDOWN_TIMEOUT)?;
    t.secs(
        "step 4: dnf image rollback --apply (until the guest is off)",
        start,
    );
    drop(vm);
    let mut vm = env.boot_with("boot3-v1", &mut t, &env.network)?;
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

    // 6. The host's signature policy requires the test key for the registry: the signed v2 is
    // staged and status names its signer; once the tag moves to an unsigned v3, `dnf upgrade`
    // is refused and nothing changes.
    let start = Instant::now();
    signed_upgrade(&mut vm, &registry, &key, &oci)?;
    t.secs("step 6: signed rebase, unsigned upgrade refused", start);
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
