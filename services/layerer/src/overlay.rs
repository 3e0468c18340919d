//! The writable view of a base commit a build works in: an overlayfs whose lower layer is a
//! hardlinked checkout of the commit (read-only to overlayfs, so the repository's objects are
//! never written through their hardlinks) and whose upper layer collects every change, which is
//! what gets committed. Plus the build's other scratch directories, all removed when the build
//! ends, however it ends.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Prefix of a build's directories (in the state directory and in the repository's `tmp`).
const PREFIX: &str = "dnfimage-layerer-";

/// Gives the service its own mount namespace (mounts of the host still propagate in, ours not
/// out), so that the overlays it mounts are invisible to the rest of the system and go away
/// with the process if it dies. Must run before any thread exists.
pub fn private_mount_namespace() -> Result<()> {
    rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS)
        .context("Unsharing the mount namespace")?;
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::SLAVE | rustix::mount::MountPropagationFlags::REC,
    )
    .context("Making the mounts of the namespace slaves")?;
    Ok(())
}

/// Mounts an overlayfs at `merged`. Redirects, metacopy and the inode index stay off: the upper
/// directory then holds complete files, plain whiteouts and opaque directories only.
pub fn mount(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Result<()> {
    for p in [lower, upper, work] {
        let s = p.to_string_lossy();
        if s.contains([',', ':', '\\']) {
            bail!("{s}: overlayfs cannot take a path with ',', ':' or '\\'");
        }
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    rustix::mount::mount(
        "dnfimage-layerer",
        merged,
        "overlay",
        rustix::mount::MountFlags::empty(),
        data.as_str(),
    )
    .with_context(|| format!("Mounting an overlay at {}", merged.display()))
}

/// Unmounts `merged` (lazily, should something still hold it).
pub fn unmount(merged: &Path) -> Result<()> {
    rustix::mount::unmount(merged, rustix::mount::UnmountFlags::DETACH)
        .with_context(|| format!("Unmounting {}", merged.display()))
}

/// One build's directories: `<builds>/dnfimage-layerer-ID/{upper,work,merged,resolve,packages,
/// home}` and the hardlinked checkout `<repo>/tmp/dnfimage-layerer-ID` (hardlinks need the
/// repository's filesystem). Unmounted and removed when dropped.
#[derive(Debug)]
pub struct Workspace {
    dir: PathBuf,
    lower: PathBuf,
    mounted: bool,
}

impl Workspace {
    /// Creates the directories (the lower one is left for the checkout to create).
    pub fn create(builds: &Path, repo_tmp: &Path) -> Result<Self> {
        std::fs::create_dir_all(builds)
            .with_context(|| format!("Creating {}", builds.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir_in(builds)
            .with_context(|| format!("Creating a build directory in {}", builds.display()))?
            .keep();
        let name = dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let ws = Workspace {
            lower: repo_tmp.join(name),
            dir,
            mounted: false,
        };
        for d in ["upper", "work", "merged", "resolve", "packages", "home"] {
            std::fs::create_dir(ws.dir.join(d)).with_context(|| format!("Creating {d}"))?;
        }
        Ok(ws)
    }

    /// The build directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the base commit is checked out (hardlinked).
    pub fn lower(&self) -> &Path {
        &self.lower
    }

    /// The overlay's upper directory: the changes.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    /// The overlay: the tree being built.
    pub fn merged(&self) -> PathBuf {
        self.dir.join("merged")
    }

    /// The throwaway root dnf resolves in.
    pub fn resolve_root(&self) -> PathBuf {
        self.dir.join("resolve")
    }

    /// Where downloaded packages go.
    pub fn packages(&self) -> PathBuf {
        self.dir.join("packages")
    }

    /// `HOME` for dnf and rpm.
    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    /// Mounts the overlay; the lower checkout must be there, and the upper root takes the mode
    /// and owner of the lower root so the merged root looks like the image's.
    pub fn mount(&mut self) -> Result<()> {
        let root = std::fs::metadata(&self.lower)
            .with_context(|| format!("Reading {}", self.lower.display()))?;
        let upper = self.upper();
        std::fs::set_permissions(&upper, root.permissions())
            .context("Setting the mode of the upper root")?;
        {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::chown(&upper, Some(root.uid()), Some(root.gid()))
                .context("Setting the owner of the upper root")?;
        }
        mount(&self.lower, &upper, &self.dir.join("work"), &self.merged())?;
        self.mounted = true;
        Ok(())
    }

    /// Unmounts the overlay (the upper directory can then be committed).
    pub fn unmount(&mut self) -> Result<()> {
        if self.mounted {
            unmount(&self.merged())?;
            self.mounted = false;
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<()> {
        self.unmount()?;
        for d in [&self.dir, &self.lower] {
            match std::fs::remove_dir_all(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("Removing {}", d.display())),
            }
        }
        Ok(())
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::warn!("Cleaning up the build directory: {e:#}");
        }
    }
}

/// Removes what builds of an earlier run left in `builds` and `repo_tmp` (after a crash);
/// returns how many were removed.
pub fn remove_stale(builds: &Path, repo_tmp: &Path) -> usize {
    let mut removed = 0;
    for (dir, is_build) in [(builds, true), (repo_tmp, false)] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(PREFIX) {
                continue;
            }
            let path = entry.path();
            if is_build {
                // Only mounted if an earlier process shared our mount namespace.
                let _ = unmount(&path.join("merged"));
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("Removing {}, ignoring: {e}", path.display()),
            }
        }
    }
    removed
}
