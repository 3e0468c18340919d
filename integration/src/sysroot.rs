//! A temporary ostree sysroot, made with the real `ostree admin` commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::run_ok;

/// The stateroot (osname) test sysroots use.
pub const STATEROOT: &str = "dnfimage";

/// An empty sysroot (`ostree admin init-fs --modern` + `os-init`) under a directory; cleaned up
/// (immutable attributes cleared first) when dropped.
pub struct TestSysroot {
    path: PathBuf,
}

impl TestSysroot {
    /// Creates the sysroot at `path` (which must not exist or be empty).
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        run_ok(
            Command::new("ostree")
                .args(["admin", "init-fs", "--modern"])
                .arg(path),
        )?;
        run_ok(
            Command::new("ostree")
                .args(["admin", "os-init", STATEROOT])
                .arg(format!("--sysroot={}", path.display())),
        )?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Takes libostree's sysroot lock as another program (`ostree admin`, rpm-ostree) would;
    /// held until the file returned is dropped.
    pub fn hold_lock(&self) -> Result<std::fs::File> {
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.join("ostree/lock"))?;
        lock_like_libostree(&lock)?;
        Ok(lock)
    }

    /// The sysroot directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its repository.
    pub fn repo(&self) -> PathBuf {
        self.path.join("ostree/repo")
    }

    /// `ostree fsck` on its repository; fails when the repository is damaged.
    pub fn fsck(&self) -> Result<String> {
        run_ok(
            Command::new("ostree")
                .arg("fsck")
                .arg(format!("--repo={}", self.repo().display())),
        )
    }

    /// `ostree admin status` output.
    pub fn admin_status(&self) -> Result<String> {
        run_ok(
            Command::new("ostree")
                .args(["admin", "status"])
                .arg(format!("--sysroot={}", self.path.display())),
        )
    }

    /// The BLS entries under `boot/loader/entries`, file name → text, sorted.
    pub fn boot_entries(&self) -> Result<Vec<(String, String)>> {
        let dir = self.path.join("boot/loader/entries");
        let mut entries = Vec::new();
        if dir.exists() {
            for e in std::fs::read_dir(&dir)? {
                let e = e?;
                entries.push((
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read_to_string(e.path())?,
                ));
            }
        }
        entries.sort();
        Ok(entries)
    }
}

impl Drop for TestSysroot {
    fn drop(&mut self) {
        // Deployment roots carry the immutable attribute.
        let _ = Command::new("chattr")
            .args(["-R", "-i"])
            .arg(self.path.join("ostree/deploy"))
            .output();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Takes the exclusive open-file-description lock libostree's `glnx_make_lock_file` takes on
/// `file` (released when it is closed; flock(2) locks would not conflict with it).
fn lock_like_libostree(file: &std::fs::File) -> Result<()> {
    use std::os::fd::AsRawFd;
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: F_OFD_SETLK reads the flock struct we pass for the duration of the call only.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    anyhow::ensure!(
        r == 0,
        "fcntl(F_OFD_SETLK): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}
