//! Image reference → qcow2: the image is deployed with ostree-ext into a sysroot directory, which
//! becomes filesystems with `mkfs.ext4 -d` (no mounting), on a GPT disk with an EFI system
//! partition holding a GRUB EFI image (filled with mtools: no vfat needed in the kernel).
//!
//! Layout (MiB-aligned): 1 MiB gap, ESP (`esp`), `/boot` (ext4 `dnfimage-boot`), root (ext4
//! `dnfimage-root`, the ostree sysroot). `<out>.layout.json` records the offsets; `boot_entry`
//! reads the default BLS entry back from the `/boot` partition for direct kernel boot.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use ostree_ext::container::{ImageReference, OstreeImageReference, SignatureSource};
use ostree_ext::{gio, ostree};

use crate::bls;
use crate::cmd::run;

/// Label of the `/boot` filesystem (the image's `/etc/fstab` and GRUB find it by this).
pub const BOOT_LABEL: &str = "dnfimage-boot";
/// Label of the root filesystem (`root=LABEL=…`).
pub const ROOT_LABEL: &str = "dnfimage-root";
const STATEROOT: &str = "default";

#[derive(Args)]
pub struct DiskArgs {
    /// The image to deploy: `oci:/dir:tag`, `oci-archive:/file`, `docker://…`.
    #[arg(long)]
    pub image: String,
    /// The reference the deployment's origin records (what `dnf-image upgrade` follows);
    /// default: `--image`.
    #[arg(long)]
    pub target: Option<String>,
    /// The qcow2 file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Kernel arguments besides `root=LABEL=dnfimage-root rw`.
    #[arg(long = "karg", default_values_t = vec!["console=ttyS0,115200".to_string()])]
    pub kargs: Vec<String>,
    /// Size of the EFI system partition, MiB.
    #[arg(long, default_value_t = 64)]
    pub esp_mib: u64,
    /// Size of `/boot`, MiB.
    #[arg(long, default_value_t = 384)]
    pub boot_mib: u64,
    /// Free space on the root filesystem besides the deployment, MiB (room for upgrades).
    #[arg(long, default_value_t = 3072)]
    pub free_mib: u64,
}

/// Where the partitions are, in MiB from the start of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub esp: (u64, u64),
    pub boot: (u64, u64),
    pub root: (u64, u64),
}

impl Layout {
    pub fn new(esp: u64, boot: u64, root: u64) -> Self {
        Layout {
            esp: (1, esp),
            boot: (1 + esp, boot),
            root: (1 + esp + boot, root),
        }
    }
    /// Whole disk, with 1 MiB at the end for the backup GPT.
    pub fn total_mib(&self) -> u64 {
        self.root.0 + self.root.1 + 1
    }
    fn to_json(self) -> serde_json::Value {
        serde_json::json!({"esp": [self.esp.0, self.esp.1], "boot": [self.boot.0, self.boot.1],
            "root": [self.root.0, self.root.1]})
    }
    fn from_json(v: &serde_json::Value) -> Result<Self> {
        let pair = |k: &str| -> Result<(u64, u64)> {
            let a = v[k].as_array().ok_or_else(|| anyhow!("layout: no {k}"))?;
            let n = |i: usize| {
                a.get(i)
                    .and_then(|x| x.as_u64())
                    .ok_or_else(|| anyhow!("layout: bad {k}"))
            };
            Ok((n(0)?, n(1)?))
        };
        Ok(Layout {
            esp: pair("esp")?,
            boot: pair("boot")?,
            root: pair("root")?,
        })
    }
}

fn layout_path(disk: &Path) -> PathBuf {
    let mut s = disk.as_os_str().to_owned();
    s.push(".layout.json");
    PathBuf::from(s)
}

fn ostree_ref(s: &str) -> Result<OstreeImageReference> {
    Ok(OstreeImageReference {
        sigverify: SignatureSource::ContainerPolicyAllowInsecure,
        imgref: ImageReference::try_from(s)
            .with_context(|| format!("Parsing image reference {s}"))?,
    })
}

/// Bytes used under `dir` (`du`), in MiB, rounded up.
fn du_mib(dir: &Path) -> Result<u64> {
    let out = run(Command::new("du").args(["-s", "-B1M"]).arg(dir))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("Unexpected du output: {out}"))
}

fn mkfs_ext4(label: &str, from: &Path, image: &Path, mib: u64) -> Result<()> {
    let f =
        std::fs::File::create(image).with_context(|| format!("Creating {}", image.display()))?;
    f.set_len(mib << 20)
        .with_context(|| format!("Sizing {}", image.display()))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d"])
        .arg(from)
        .arg(image))
    .with_context(|| format!("Making the {label} filesystem"))?;
    Ok(())
}

/// Deploys `args.image` into a new sysroot at `sysroot`.
fn deploy(args: &DiskArgs, sysroot: &Path) -> Result<()> {
    let ostree = |a: &[&str]| run(Command::new("ostree").args(a));
    std::fs::create_dir_all(sysroot).context("Creating the sysroot directory")?;
    let s = sysroot.to_str().ok_or_else(|| anyhow!("Non-UTF-8 path"))?;
    ostree(&["admin", "init-fs", "--modern", s]).context("Creating the sysroot")?;
    ostree(&["admin", "os-init", STATEROOT, &format!("--sysroot={s}")])
        .context("Creating the stateroot")?;
    use_syslinux_menu(sysroot)?;

    let imgref = ostree_ref(&args.image)?;
    let target = args.target.as_deref().map(ostree_ref).transpose()?;
    let mut kargs = vec![format!("root=LABEL={ROOT_LABEL}"), "rw".to_string()];
    kargs.extend(args.kargs.iter().cloned());
    let kargs: Vec<&str> = kargs.iter().map(String::as_str).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Starting tokio runtime")?;
    let root = ostree::Sysroot::new(Some(&gio::File::for_path(sysroot)));
    root.load(gio::Cancellable::NONE)
        .context("Loading the sysroot")?;
    let mut opts = ostree_ext::container::deploy::DeployOpts::default();
    opts.kargs = Some(&kargs);
    opts.target_imgref = target.as_ref();
    rt.block_on(ostree_ext::container::deploy::deploy(
        &root,
        STATEROOT,
        &imgref,
        Some(opts),
    ))
    .with_context(|| format!("Deploying {}", args.image))?;
    Ok(())
}

/// Makes libostree write a syslinux menu next to the BLS entries of the (new, deployment-less)
/// sysroot at `sysroot` on every deployment change: `/boot/loader.N/syslinux.cfg`, switched with
/// the `loader` symlink, so also when ostree-finalize-staged writes at shutdown. The disk's GRUB
/// reads it at boot with `syslinux_configfile` ([`GRUB_CFG`]). (libostree's grub2 backend would
/// run grub2-mkconfig at every deployment instead, and Debian's GRUB has no `blscfg` to read
/// the entries themselves.)
pub fn use_syslinux_menu(sysroot: &Path) -> Result<()> {
    let s = sysroot.to_str().ok_or_else(|| anyhow!("Non-UTF-8 path"))?;
    run(Command::new("ostree").args([
        &format!("--repo={s}/ostree/repo"),
        "config",
        "set",
        "sysroot.bootloader",
        "syslinux",
    ]))
    .context("Configuring the sysroot")?;
    // What the syslinux backend expects before its first write: it keeps the non-entry lines
    // of the current `syslinux.cfg` (the timeout) and regenerates the entries.
    let boot = sysroot.join("boot");
    let loader0 = boot.join("loader.0");
    std::fs::create_dir_all(&loader0).context("Creating /boot/loader.0")?;
    std::fs::write(loader0.join("syslinux.cfg"), "TIMEOUT 10\n")
        .context("Writing /boot/loader.0/syslinux.cfg")?;
    std::os::unix::fs::symlink("loader.0", boot.join("loader")).context("Linking /boot/loader")?;
    std::fs::create_dir_all(boot.join("syslinux")).context("Creating /boot/syslinux")?;
    std::os::unix::fs::symlink("../loader/syslinux.cfg", boot.join("syslinux/syslinux.cfg"))
        .context("Linking /boot/syslinux/syslinux.cfg")?;
    Ok(())
}

/// GRUB's configuration on `/boot`: serial and screen output, then the menu libostree keeps in
/// `/boot/loader/syslinux.cfg` (default entry first, one-second timeout).
pub const GRUB_CFG: &str = "# Written by dnfimage-vmimage. The menu is libostree's: it rewrites\n\
# /boot/loader/syslinux.cfg whenever the deployments change.\n\
serial --unit=0 --speed=115200\n\
terminal_input serial console\n\
terminal_output serial console\n\
syslinux_configfile -s /loader/syslinux.cfg\n";

/// Removes the immutable attribute libostree puts on deployment roots, so they can be removed.
fn unlock_deployments(sysroot: &Path) {
    let deploy = sysroot.join("ostree/deploy").join(STATEROOT).join("deploy");
    if let Ok(dirs) = std::fs::read_dir(&deploy) {
        for d in dirs.flatten() {
            if d.path().is_dir()
                && let Err(e) = run(Command::new("chattr").arg("-i").arg(d.path()))
            {
                eprintln!("chattr -i {}, ignoring: {e:#}", d.path().display());
            }
        }
    }
}

fn read_entries(boot: &Path) -> Result<Vec<bls::Entry>> {
    let dir = boot.join("loader/entries");
    let mut entries = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("Reading {}", dir.display()))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "conf") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("Reading {}", path.display()))?;
            entries.push(bls::parse(&text).with_context(|| format!("Parsing {}", path.display()))?);
        }
    }
    if entries.is_empty() {
        bail!("No boot entries in {}", dir.display());
    }
    bls::sort(&mut entries);
    Ok(entries)
}

/// The GRUB EFI image: finds `/boot` by label and loads its `grub/grub.cfg` ([`GRUB_CFG`]).
fn grub_efi(scratch: &Path) -> Result<PathBuf> {
    let embed = scratch.join("embed.cfg");
    std::fs::write(
        &embed,
        format!(
            "search --no-floppy --label {BOOT_LABEL} --set=root\n\
             set prefix=($root)/grub\nconfigfile ($root)/grub/grub.cfg\n"
        ),
    )
    .context("Writing the embedded GRUB config")?;
    let efi = scratch.join("BOOTX64.EFI");
    run(Command::new("grub-mkimage")
        .args(["-O", "x86_64-efi", "-p", "/grub", "-c"])
        .arg(&embed)
        .arg("-o")
        .arg(&efi)
        .args([
            "part_gpt",
            "ext2",
            "fat",
            "normal",
            "linux",
            "search",
            "search_label",
            "configfile",
            "echo",
            "test",
            "serial",
            "terminal",
            "efi_gop",
            "all_video",
            "gzio",
            "syslinuxcfg",
        ]))
    .context("Making the GRUB EFI image (apt-get install grub-efi-amd64-bin)")?;
    Ok(efi)
}

fn esp_image(efi: &Path, image: &Path, mib: u64) -> Result<()> {
    let f =
        std::fs::File::create(image).with_context(|| format!("Creating {}", image.display()))?;
    f.set_len(mib << 20).context("Sizing the ESP")?;
    run(Command::new("mkfs.fat").args(["-n", "ESP"]).arg(image))
        .context("Making the ESP filesystem (apt-get install dosfstools)")?;
    let i = image.to_str().ok_or_else(|| anyhow!("Non-UTF-8 path"))?;
    run(Command::new("mmd").args(["-i", i, "::/EFI", "::/EFI/BOOT"]))
        .context("Creating EFI/BOOT (apt-get install mtools)")?;
    run(Command::new("mcopy")
        .args(["-i", i])
        .arg(efi)
        .arg("::/EFI/BOOT/BOOTX64.EFI"))
    .context("Copying GRUB onto the ESP")?;
    Ok(())
}

fn place(part: &Path, disk: &Path, at_mib: u64) -> Result<()> {
    run(Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={at_mib}")))
    .with_context(|| format!("Writing {} into the disk", part.display()))?;
    Ok(())
}

pub fn build(args: &DiskArgs) -> Result<()> {
    let parent = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("Creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".dnfimage-disk-")
        .tempdir_in(parent)
        .context("Creating scratch directory")?;
    let result = build_in(args, tmp.path());
    unlock_deployments(&tmp.path().join("sysroot"));
    result
}

fn build_in(args: &DiskArgs, tmp: &Path) -> Result<()> {
    let sysroot = tmp.join("sysroot");
    deploy(args, &sysroot)?;

    // /boot becomes its own filesystem; the sysroot keeps an empty mount point.
    let boot = tmp.join("boot");
    std::fs::rename(sysroot.join("boot"), &boot).context("Moving /boot out of the sysroot")?;
    std::fs::create_dir(sysroot.join("boot")).context("Creating the /boot mount point")?;
    let entries = read_entries(&boot)?;
    let menu = std::fs::read_to_string(boot.join("loader/syslinux.cfg"))
        .context("Reading the menu libostree wrote (/boot/loader/syslinux.cfg)")?;
    if !menu.contains(&format!("LABEL {}", entries[0].title)) {
        bail!(
            "libostree's menu does not list the deployment {}:\n{menu}",
            entries[0].title
        );
    }
    std::fs::create_dir_all(boot.join("grub")).context("Creating /boot/grub")?;
    std::fs::write(boot.join("grub/grub.cfg"), GRUB_CFG).context("Writing grub.cfg")?;

    let root_mib = du_mib(&sysroot)? * 12 / 10 + args.free_mib;
    let layout = Layout::new(args.esp_mib, args.boot_mib, root_mib);
    let efi = grub_efi(tmp)?;
    esp_image(&efi, &tmp.join("esp.img"), args.esp_mib)?;
    mkfs_ext4(BOOT_LABEL, &boot, &tmp.join("boot.img"), args.boot_mib)?;
    mkfs_ext4(ROOT_LABEL, &sysroot, &tmp.join("root.img"), root_mib)?;

    let raw = tmp.join("disk.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(layout.total_mib() << 20))
        .context("Creating the raw disk")?;
    let sectors = |mib: u64| mib * 2048;
    let part = |n: u32, (at, size): (u64, u64), code: &str, name: &str| {
        vec![
            format!("--new={n}:{}:{}", sectors(at), sectors(at + size) - 1),
            format!("--typecode={n}:{code}"),
            format!("--change-name={n}:{name}"),
        ]
    };
    let mut sgdisk = Command::new("sgdisk");
    sgdisk.arg("--clear");
    sgdisk.args(part(1, layout.esp, "ef00", "esp"));
    sgdisk.args(part(2, layout.boot, "ea00", "boot"));
    sgdisk.args(part(3, layout.root, "8304", "root"));
    run(sgdisk.arg(&raw)).context("Partitioning (apt-get install gdisk)")?;
    place(&tmp.join("esp.img"), &raw, layout.esp.0)?;
    place(&tmp.join("boot.img"), &raw, layout.boot.0)?;
    place(&tmp.join("root.img"), &raw, layout.root.0)?;

    let partial = args.out.with_extension("qcow2.partial");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&partial))
    .context("Converting to qcow2")?;
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("Writing {}", args.out.display()))?;
    let layout_json = serde_json::json!({"layout": layout.to_json(),
        "image": args.image, "target": args.target.as_deref().unwrap_or(&args.image)});
    std::fs::write(layout_path(&args.out), layout_json.to_string())
        .context("Writing the layout")?;
    eprintln!(
        "disk: {} ({} MiB virtual; root {} MiB), default entry: {}",
        args.out.display(),
        layout.total_mib(),
        root_mib,
        entries[0].title
    );
    Ok(())
}

fn debugfs(image: &Path, request: &str) -> Result<String> {
    run(Command::new("debugfs").args(["-R", request]).arg(image))
        .with_context(|| format!("debugfs {request}"))
}

/// The default entry of `disk`'s `/boot`: writes `vmlinuz`, `initramfs.img` and `entry.json`
/// into `out`.
pub fn boot_entry(disk: &Path, out: &Path) -> Result<bls::Entry> {
    let layout_file = layout_path(disk);
    let text = std::fs::read_to_string(&layout_file)
        .with_context(|| format!("Reading {}", layout_file.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).context("Parsing the layout")?;
    let layout = Layout::from_json(&v["layout"])?;
    std::fs::create_dir_all(out).with_context(|| format!("Creating {}", out.display()))?;
    let boot = out.join("boot.img");
    run(Command::new("qemu-img")
        .args(["dd", "-f", "qcow2", "-O", "raw", "bs=1M"])
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", boot.display()))
        .arg(format!("skip={}", layout.boot.0))
        .arg(format!("count={}", layout.boot.1)))
    .context("Reading the /boot partition")?;
    // `loader` is a symlink to loader.0 or loader.1.
    let loader = debugfs(&boot, "stat /loader")?;
    let target = loader
        .lines()
        .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
        .map(|t| t.trim_matches('"').to_string())
        .unwrap_or_else(|| "loader".to_string());
    let listing = debugfs(&boot, &format!("ls -p /{target}/entries"))?;
    let mut entries = Vec::new();
    for line in listing.lines() {
        // /inode/mode/uid/gid/name/size/
        let name = line.split('/').nth(5).unwrap_or("");
        if name.ends_with(".conf") {
            let text = debugfs(&boot, &format!("cat /{target}/entries/{name}"))?;
            entries.push(bls::parse(&text).with_context(|| format!("Parsing {name}"))?);
        }
    }
    bls::sort(&mut entries);
    let entry = entries
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("No boot entries in /{target}/entries"))?;
    for (from, to) in [(&entry.linux, "vmlinuz"), (&entry.initrd, "initramfs.img")] {
        let dest = out.join(to);
        let _ = std::fs::remove_file(&dest);
        debugfs(&boot, &format!("dump {from} {}", dest.display()))?;
        if !dest.exists() {
            bail!("debugfs did not extract {from}");
        }
    }
    std::fs::remove_file(&boot).context("Removing the /boot copy")?;
    let json = serde_json::json!({"title": entry.title, "version": entry.version,
        "linux": entry.linux, "initrd": entry.initrd, "options": entry.options});
    std::fs::write(out.join("entry.json"), json.to_string()).context("Writing entry.json")?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() -> Result<()> {
        let l = Layout::new(64, 384, 2000);
        assert_eq!(l.boot, (65, 384));
        assert_eq!(l.root, (449, 2000));
        assert_eq!(l.total_mib(), 2450);
        assert_eq!(Layout::from_json(&l.to_json())?, l);
        Ok(())
    }
}
