//! The bootable base image: a tiny root in ostree layout, committed with
//! `ostree commit --bootable` and encapsulated by ostree-ext into one layer per component.
//!
//! Layers, bottom first: the ostree commit layer (commit, dirtree and dirmeta objects; it
//! changes with every commit), then one layer per component, largest first (each filler,
//! `busybox`, `kernel`, and `os`: os-release, `/usr/etc`, `/usr/share/dnfimage-app` and the
//! rest), then ostree-ext's empty "reserved for new packages" layer. ostree-ext requires every
//! file to belong to a component. Version 2 changes only files of `os`, so v1 → v2 changes
//! exactly two layers: the ostree commit layer and the `os` layer.
//!
//! The root carries an rpm database (sqlite, in `/usr/lib/sysimage/rpm` as on Fedora, part of
//! `os`) recording the packages its files belong to (see `rpms::base_specs`): `dnfimage-base`
//! (1.0 in v1, 2.0 in v2), `dnfimage-busybox`, `dnfimage-kernel` and `dnfimage-docs`, so the
//! images are layering bases.

use std::collections::BTreeMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow};
use ostree_ext::chunking::ObjectMetaSized;
use ostree_ext::container::{Config, ExportOpts, ImageReference, Transport};
use ostree_ext::objectsource::{ObjectMeta, ObjectSourceMeta};
use ostree_ext::prelude::*;
use ostree_ext::{gio, ostree};

use crate::cmd::run;
use crate::oci::{CREATED, Prng, VERSION_LABEL, import_normalized};

/// Kernel version of the placeholder kernel in `/usr/lib/modules`.
pub const KERNEL_VERSION: &str = "6.1.0-dnfimage";
/// `NAME` in `/usr/lib/os-release`.
pub const OS_NAME: &str = "dnfimage test OS";
/// Hostname in `/usr/etc/hostname`.
pub const HOSTNAME: &str = "dnfimage-test";
/// The ostree branch the base commit is written to (in a throwaway repo).
const BRANCH: &str = "dnfimage/base";
/// Where the host's static busybox is looked for; `DNFIMAGE_BUSYBOX` overrides.
const BUSYBOX_PATHS: &[&str] = &["/usr/bin/busybox", "/bin/busybox"];

/// Content of the base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseOptions {
    /// Filler components `(name, bytes)`, each under `/usr/share/dnfimage-filler/<name>/` in
    /// four files of pseudo-random bytes, each its own layer (a base has 5 + fillers layers).
    /// Same in every version.
    pub fillers: Vec<(String, u64)>,
    /// Bytes under `/usr/share/dnfimage-app/`, which differ between versions.
    pub app_bytes: u64,
    /// Bytes of the placeholder `vmlinuz` (`initramfs.img` is a quarter of it).
    pub kernel_bytes: u64,
}

impl Default for BaseOptions {
    fn default() -> Self {
        BaseOptions {
            fillers: vec![("filler".to_string(), 4 << 20)],
            app_bytes: 256 << 10,
            kernel_bytes: 1 << 20,
        }
    }
}

/// The component (chunk) that owns a path of the committed tree.
pub(crate) fn component_of(path: &str) -> &str {
    if path.starts_with("/usr/bin/") {
        return "busybox";
    }
    if path.starts_with("/usr/lib/modules/") {
        return "kernel";
    }
    path.strip_prefix("/usr/share/dnfimage-filler/")
        .and_then(|rest| rest.split_once('/'))
        .map_or("os", |(name, _)| name)
}

/// A small seed from a name, so each filler gets its own bytes.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn find_busybox() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("DNFIMAGE_BUSYBOX") {
        return Ok(p.into());
    }
    BUSYBOX_PATHS
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("No static busybox found (apt-get install busybox-static)"))
}

fn mkdir(root: &Path, path: &str, mode: u32) -> Result<()> {
    let p = root.join(path);
    std::fs::create_dir_all(&p).with_context(|| format!("Creating {path}"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("Setting mode of {path}"))
}

fn write(root: &Path, path: &str, mode: u32, data: &[u8]) -> Result<()> {
    let p = root.join(path);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("Creating parent of {path}"))?;
    }
    std::fs::write(&p, data).with_context(|| format!("Writing {path}"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("Setting mode of {path}"))
}

fn link(root: &Path, path: &str, target: &str) -> Result<()> {
    symlink(target, root.join(path)).with_context(|| format!("Linking {path} to {target}"))
}

/// Write the root filesystem of base `version` under `root` (an empty directory).
pub(crate) fn write_root(root: &Path, version: u32, opts: &BaseOptions) -> Result<()> {
    for dir in [
        "boot", "dev", "proc", "run", "sys", "sysroot", "var", "usr/bin", "usr/etc",
    ] {
        mkdir(root, dir, 0o755)?;
    }
    mkdir(root, "tmp", 0o1777)?;
    for (path, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/bin"),
        ("lib", "usr/lib"),
        ("home", "var/home"),
        ("ostree", "sysroot/ostree"),
    ] {
        link(root, path, target)?;
    }

    let busybox = find_busybox()?;
    let busybox =
        std::fs::read(&busybox).with_context(|| format!("Reading {}", busybox.display()))?;
    write(root, "usr/bin/busybox", 0o755, &busybox)?;
    link(root, "usr/bin/sh", "busybox")?;

    let os_release = format!(
        "NAME=\"{OS_NAME}\"\nID=dnfimage\nVERSION=\"{version}\"\nVERSION_ID={version}\n\
         PRETTY_NAME=\"{OS_NAME} {version}\"\n"
    );
    write(root, "usr/lib/os-release", 0o644, os_release.as_bytes())?;
    // Configuration lives in /usr/etc only: a tree with /etc too does not deploy.
    write(
        root,
        "usr/etc/hostname",
        0o644,
        format!("{HOSTNAME}\n").as_bytes(),
    )?;
    link(root, "usr/etc/os-release", "../lib/os-release")?;

    let modules = format!("usr/lib/modules/{KERNEL_VERSION}");
    let vmlinuz = Prng::new(seed_of("vmlinuz"), opts.kernel_bytes).into_vec();
    write(root, &format!("{modules}/vmlinuz"), 0o644, &vmlinuz)?;
    let initramfs = Prng::new(seed_of("initramfs"), opts.kernel_bytes / 4).into_vec();
    write(root, &format!("{modules}/initramfs.img"), 0o644, &initramfs)?;

    for (name, bytes) in &opts.fillers {
        for i in 0..4u64 {
            let data =
                Prng::new(seed_of(name) + i, bytes / 4 + u64::from(i < bytes % 4)).into_vec();
            let path = format!("usr/share/dnfimage-filler/{name}/file-{i}");
            write(root, &path, 0o644, &data)?;
        }
    }

    let app = Prng::new(seed_of("app") + u64::from(version), opts.app_bytes).into_vec();
    write(root, "usr/share/dnfimage-app/data", 0o644, &app)?;
    write(
        root,
        "usr/share/dnfimage-app/version",
        0o644,
        format!("{version}\n").as_bytes(),
    )?;
    write(
        root,
        crate::rpms::files::DOCS,
        0o644,
        b"The dnfimage test OS.\n",
    )?;
    Ok(())
}

/// Map every content object of `rev` to the component owning its path.
fn object_meta(repo: &ostree::Repo, rev: &str) -> Result<ObjectMeta> {
    fn walk(dir: &gio::File, path: &str, meta: &mut ObjectMeta) -> Result<()> {
        let children = dir.enumerate_children(
            "standard::name,standard::type",
            gio::FileQueryInfoFlags::NOFOLLOW_SYMLINKS,
            gio::Cancellable::NONE,
        )?;
        for info in children {
            let info = info?;
            let name = info.name();
            let child = dir.child(&name);
            let path = format!("{path}/{}", name.display());
            match info.file_type() {
                gio::FileType::Directory => walk(&child, &path, meta)?,
                gio::FileType::Regular | gio::FileType::SymbolicLink => {
                    let component = component_of(&path);
                    let file = child
                        .downcast::<ostree::RepoFile>()
                        .map_err(|_| anyhow!("{path} is not in an ostree repo"))?;
                    let id: Rc<str> = Rc::from(component);
                    meta.map.insert(file.checksum().to_string(), Rc::clone(&id));
                    meta.set.insert(ObjectSourceMeta {
                        identifier: Rc::clone(&id),
                        name: Rc::clone(&id),
                        srcid: id,
                        change_time_offset: 0,
                        change_frequency: 1,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
    let (root, _) = repo
        .read_commit(rev, gio::Cancellable::NONE)
        .with_context(|| format!("Reading commit {rev}"))?;
    let mut meta = ObjectMeta::default();
    walk(&root, "", &mut meta)?;
    Ok(meta)
}

/// Run `f` on a fresh thread with its own tokio runtime: callable from sync code and from
/// async tests alike, and the ostree objects (not `Send`) never leave that thread.
fn on_runtime_thread<T: Send>(
    f: impl FnOnce(&tokio::runtime::Runtime) -> Result<T> + Send,
) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("Starting tokio runtime")?;
            f(&rt)
        })
        .join()
        .map_err(|_| anyhow!("Image build thread panicked"))?
    })
}

/// Build base `version` (1, 2, …) into the OCI layout `oci_dir` as `tag`; returns the manifest
/// digest. Scratch files go to a temporary directory next to `oci_dir`.
pub fn build_base(oci_dir: &Path, tag: &str, version: u32, opts: &BaseOptions) -> Result<String> {
    let parent = oci_dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("Creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".dnfimage-base-")
        .tempdir_in(parent)
        .context("Creating scratch directory")?;
    let root = tmp.path().join("root");
    let repo_path = tmp.path().join("repo");
    let scratch_oci = tmp.path().join("oci");
    std::fs::create_dir(&root).context("Creating root")?;
    write_root(&root, version, opts).context("Writing root filesystem")?;
    crate::rpms::install_base_rpmdb(&root, version, tmp.path())
        .context("Writing the rpm database")?;

    let ostree = |args: &[&str]| -> Result<String> {
        run(Command::new("ostree")
            .arg(format!("--repo={}", repo_path.display()))
            .args(args))
    };
    ostree(&["init", "--mode=bare-user"]).context("Creating ostree repo")?;
    let commit = ostree(&[
        "commit",
        &format!("--branch={BRANCH}"),
        &format!("--tree=dir={}", root.display()),
        "--bootable",
        "--owner-uid=0",
        "--owner-gid=0",
        "--no-xattrs",
        &format!("--timestamp={CREATED}"),
        &format!("--add-metadata-string=version={version}"),
        &format!("--subject={OS_NAME} {version}"),
    ])
    .context("Committing root filesystem")?;
    let commit = commit.trim().to_string();

    on_runtime_thread(|rt| {
        let repo = ostree::Repo::new_for_path(&repo_path);
        repo.open(gio::Cancellable::NONE)
            .context("Opening ostree repo")?;
        let meta = object_meta(&repo, &commit).context("Mapping objects to components")?;
        let sized = ObjectMetaSized::compute_sizes(&repo, meta).context("Sizing components")?;
        let mut opts = ExportOpts::default();
        opts.contentmeta = Some(&sized);
        let labels = BTreeMap::from([(VERSION_LABEL.to_string(), version.to_string())]);
        let config = Config {
            labels: Some(labels),
            cmd: Some(vec!["/usr/bin/sh".to_string()]),
        };
        let dest = ImageReference {
            transport: Transport::OciDir,
            name: format!("{}:image", scratch_oci.display()),
        };
        rt.block_on(ostree_ext::container::encapsulate(
            &repo,
            &commit,
            &config,
            Some(opts),
            &dest,
        ))
        .context("Encapsulating commit")?;
        Ok(())
    })?;
    import_normalized(&scratch_oci, "image", oci_dir, tag)
        .with_context(|| format!("Copying base v{version} into {}", oci_dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_of_paths() {
        let cases = [
            ("/usr/bin/busybox", "busybox"),
            ("/usr/bin/sh", "busybox"),
            ("/usr/lib/modules/6.1.0-dnfimage/vmlinuz", "kernel"),
            ("/usr/share/dnfimage-filler/filler-a/file-0", "filler-a"),
            ("/usr/share/dnfimage-filler/filler-a", "os"),
            ("/usr/share/dnfimage-app/data", "os"),
            ("/usr/lib/os-release", "os"),
            ("/usr/etc/hostname", "os"),
            ("/usr/lib/sysimage/rpm/rpmdb.sqlite", "os"),
            ("/usr/share/doc/dnfimage/README", "os"),
            ("/bin", "os"),
        ];
        for (path, want) in cases {
            assert_eq!(component_of(path), want, "{path}");
        }
    }

    #[test]
    fn root_layout() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let opts = BaseOptions {
            fillers: vec![("f".into(), 10)],
            app_bytes: 3,
            kernel_bytes: 8,
        };
        write_root(tmp.path(), 2, &opts)?;
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p));
        assert!(read("usr/lib/os-release")?.contains("VERSION=\"2\"\n"));
        assert_eq!(read("usr/etc/hostname")?, format!("{HOSTNAME}\n"));
        assert!(
            !tmp.path().join("etc").exists(),
            "config must be in /usr/etc only"
        );
        let filler: u64 = (0..4)
            .map(|i| {
                std::fs::metadata(
                    tmp.path()
                        .join(format!("usr/share/dnfimage-filler/f/file-{i}")),
                )
                .map(|m| m.len())
            })
            .sum::<std::io::Result<u64>>()?;
        assert_eq!(filler, 10);
        let busybox = tmp.path().join("usr/bin/busybox");
        assert_eq!(
            std::fs::metadata(&busybox)?.permissions().mode() & 0o777,
            0o755
        );
        let out = Command::new(&busybox).args(["echo", "ok"]).output()?;
        assert_eq!(out.stdout, b"ok\n");
        Ok(())
    }
}
