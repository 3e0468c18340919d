//! What the deployer tests need around a test sysroot: fixture images imported into its
//! repository with ostree-ext (as the importer service does), commits made with `ostree
//! commit`, and a tiny filesystem mounted on its `/boot`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use ostree_ext::container::store::{ImageImporter, PrepareResult};
use ostree_ext::container::{ImageReference, OstreeImageReference, SignatureSource};
use ostree_ext::{gio, ostree};

use crate::run_ok;

/// An image imported into a repository.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The commit to deploy (ostree-ext's merge commit).
    pub commit: String,
    /// The manifest digest.
    pub digest: String,
}

/// Imports the image `source` (e.g. `oci:/dir:tag`) into the repository at `repo`, as the
/// importer service does: ostree-ext's `ImageImporter`, bootable images only.
pub fn import(repo: &Path, source: &str) -> Result<Imported> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let repo = ostree::Repo::new_for_path(repo);
    repo.open(gio::Cancellable::NONE)
        .context("Opening the repository")?;
    let imgref = OstreeImageReference {
        sigverify: SignatureSource::ContainerPolicyAllowInsecure,
        imgref: ImageReference::try_from(source)?,
    };
    let state = rt
        .block_on(async {
            let mut importer = ImageImporter::new(&repo, &imgref, Default::default()).await?;
            importer.require_bootable();
            match importer.prepare().await? {
                PrepareResult::Ready(prep) => importer.import(prep).await,
                PrepareResult::AlreadyPresent(state) => Ok(state),
            }
        })
        .with_context(|| format!("Importing {source}"))?;
    Ok(Imported {
        commit: state.merge_commit.clone(),
        digest: state.manifest_digest.to_string(),
    })
}

/// `ostree commit` of `base` with the directory `overlay` laid over it, in the repository at
/// `repo`; returns the new commit. No branch points at it.
pub fn commit_overlay(repo: &Path, base: &str, overlay: &Path, subject: &str) -> Result<String> {
    let out = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(["commit", "--orphan", "--no-xattrs", "--fsync=false"])
            .arg(format!("--subject={subject}"))
            .arg(format!("--tree=ref={base}"))
            .arg(format!("--tree=dir={}", overlay.display())),
    )?;
    Ok(out.trim().to_string())
}

/// A commit of `base` with `dirs` × `files` small files more (under `scratch`'s "many-files"),
/// in the repository at `repo`: slow enough to check out that a test can act while it deploys.
pub fn commit_with_many_files(
    repo: &Path,
    scratch: &Path,
    base: &str,
    dirs: usize,
    files: usize,
) -> Result<String> {
    let overlay = scratch.join("many-files");
    for d in 0..dirs {
        let dir = overlay.join(format!("usr/share/dnfimage-many/{d:04}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..files {
            // One content: one object in the repository, many links in a checkout.
            std::fs::write(dir.join(format!("{f:04}")), b"many\n")?;
        }
    }
    commit_overlay(repo, base, &overlay, "many files")
}

/// Where images declare kernel arguments (bootc's kargs.d).
pub const KARGS_D: &str = "usr/lib/bootc/kargs.d";

/// An architecture that is not this machine's, for a kargs.d file that must be ignored.
pub fn foreign_architecture() -> &'static str {
    if std::env::consts::ARCH == "s390x" {
        "aarch64"
    } else {
        "s390x"
    }
}

/// Adds image `tag` to the writable OCI layout `layout`: image `base_tag` plus one layer with
/// the files `(name, content)` in `/usr/lib/bootc/kargs.d` (built under `work`), as a
/// Containerfile's `COPY kargs.d/ /usr/lib/bootc/kargs.d/` makes it.
pub fn kargs_image(
    layout: &Path,
    base_tag: &str,
    tag: &str,
    work: &Path,
    files: &[(&str, &str)],
) -> Result<()> {
    let root = work.join(format!("kargs-root-{tag}"));
    let dir = root.join(KARGS_D);
    std::fs::create_dir_all(&dir).with_context(|| format!("Creating {}", dir.display()))?;
    for (name, content) in files {
        std::fs::write(dir.join(name), content).with_context(|| format!("Writing {name}"))?;
    }
    crate::importer_support::derive(layout, base_tag, tag, &root)?;
    Ok(())
}

/// The content of `path` in commit `commit` of the repository at `repo`.
pub fn cat(repo: &Path, commit: &str, path: &str) -> Result<Vec<u8>> {
    let out = Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(["cat", commit, path])
        .output()
        .context("Running ostree cat")?;
    anyhow::ensure!(
        out.status.success(),
        "ostree cat {commit} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// A tmpfs of a given size mounted over a directory, holding a copy of what the directory
/// held; unmounted when dropped (the directory then shows its old content again).
pub struct SmallFilesystem {
    mountpoint: PathBuf,
}

impl SmallFilesystem {
    /// Mounts a tmpfs of `size` bytes over `dir`, with a copy of its content.
    pub fn mount_over(dir: &Path, size: u64, scratch: &Path) -> Result<Self> {
        let copy = scratch.join(format!(
            "small-fs-copy-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("dir")
        ));
        run_ok(Command::new("cp").arg("-a").arg(dir).arg(&copy))?;
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0755"))
                .arg("dnfimage-test")
                .arg(dir),
        )?;
        let fs = Self {
            mountpoint: dir.to_path_buf(),
        };
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", copy.display()))
                .arg(dir),
        )?;
        std::fs::remove_dir_all(&copy)?;
        Ok(fs)
    }

    /// Free bytes on it.
    pub fn available(&self) -> Result<u64> {
        free_bytes(&self.mountpoint)
    }
}

/// Free bytes (for unprivileged writers) on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let out = run_ok(Command::new("stat").args(["-f", "-c", "%a %S"]).arg(path))?;
    let mut parts = out.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(blocks)), Some(Ok(size))) => Ok(blocks * size),
        _ => anyhow::bail!("Unexpected stat output {out:?}"),
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(&self.mountpoint).status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}
