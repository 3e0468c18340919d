//! One instance per state: each service holds an exclusive lock on what it owns (the fetcher's
//! state directory, the importer's journal, the layerer's build directory) for as long as it
//! runs. A second instance finds the lock taken, says which process holds it and exits without
//! touching anything; a lock left by a killed instance is released by the kernel with its last
//! descriptor, so the next instance takes over at once.
//!
//! A lock can also be handed down to child processes ([`InstanceLock::acquire_inherited`]): a
//! service whose children write its state (the importer's `ostree commit`) then keeps the lock
//! until the last of them ends, even when the service itself was killed, and the next instance
//! waits for those children instead of hunting for them in `/proc`.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// An exclusive, advisory lock on a file, held until dropped (or the process dies).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

/// Another live process holds the lock.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} is in use by {holder}: another instance of this service is running; stop it first \
     (or give this one another directory)"
)]
pub struct Held {
    /// What the lock protects, for people.
    pub what: String,
    /// The holder, as it wrote itself into the lock file ("dnfimage-fetcher (pid 123)").
    pub holder: String,
    /// The holder's process id, when it wrote one.
    pub pid: Option<i32>,
}

impl Held {
    /// Whether the process that took the lock still runs; when it does not, processes it
    /// started hold the lock (they inherited it).
    pub fn holder_alive(&self) -> bool {
        let Some(pid) = self.pid.and_then(rustix::process::Pid::from_raw) else {
            return true;
        };
        // Signal 0 only checks that the process exists; EPERM means it does.
        !matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        )
    }
}

/// The pid in a holder line "name (pid N)".
fn pid_of(holder: &str) -> Option<i32> {
    holder
        .rsplit_once("(pid ")?
        .1
        .strip_suffix(')')?
        .parse()
        .ok()
}

impl InstanceLock {
    /// Takes the lock on `path` (created when missing, mode 0600), recording this process in it.
    /// `what` names what it protects, for the error when another process holds it.
    pub fn acquire(path: &Path, what: &str) -> Result<Self> {
        Self::take(path, what, false)
    }

    /// Like [`acquire`](Self::acquire), but the lock is inherited by the processes this one
    /// starts, so it stays held until the last of them ends. When the process that took it is
    /// gone but its children still hold it, waits up to `wait` for them to end.
    pub fn acquire_inherited(path: &Path, what: &str, wait: std::time::Duration) -> Result<Self> {
        let deadline = std::time::Instant::now() + wait;
        let mut told = false;
        loop {
            match Self::take(path, what, true) {
                Err(e) => match e.downcast_ref::<Held>() {
                    Some(held) if !held.holder_alive() && std::time::Instant::now() < deadline => {
                        if !told {
                            told = true;
                            tracing::info!(
                                "Waiting for the processes {} left to release {}",
                                held.holder,
                                path.display()
                            );
                        }
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    _ => return Err(e),
                },
                ok => return ok,
            }
        }
    }

    fn take(path: &Path, what: &str, inherit: bool) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("Creating {}", parent.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("Opening the lock {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Held {
                    pid: pid_of(holder),
                    what: what.to_string(),
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        holder.chars().take(200).collect()
                    },
                }
                .into());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("Locking {}", path.display()));
            }
        }
        let me = format!(
            "{} (pid {})\n",
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "dnfimage".into()),
            std::process::id()
        );
        if inherit {
            rustix::io::fcntl_setfd(&file, rustix::io::FdFlags::empty())
                .with_context(|| format!("Letting child processes inherit {}", path.display()))?;
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .with_context(|| format!("Recording this process in {}", path.display()))?;
        Ok(Self {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/.lock");
        let first = InstanceLock::acquire(&path, "the state directory").unwrap();
        // A second open file description conflicts like another process would.
        let err = InstanceLock::acquire(&path, "the state directory").unwrap_err();
        let held = err.downcast_ref::<Held>().expect("a Held error");
        assert_eq!(held.what, "the state directory");
        assert!(
            held.holder
                .contains(&format!("(pid {})", std::process::id())),
            "{}",
            held.holder
        );
        drop(first);
        let again = InstanceLock::acquire(&path, "the state directory").unwrap();
        assert_eq!(again.path(), path);
    }

    #[test]
    fn an_inherited_lock_outlives_its_taker_until_the_children_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        // We take the lock and start a child that inherits it; then we let go of ours.
        let lock = InstanceLock::acquire_inherited(&path, "the journal", Duration::ZERO).unwrap();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(lock);
        // The child still holds it; make the record name a process that does not exist, as when
        // the taker was killed.
        std::fs::write(&path, "dnfimage-importer (pid 2147483646)\n").unwrap();
        let err = InstanceLock::acquire(&path, "the journal").unwrap_err();
        let held = err.downcast_ref::<Held>().unwrap();
        assert!(!held.holder_alive(), "{held:?}");
        // Waiting for the children: release them, and the wait ends with the lock taken.
        let stdin = child.stdin.take().unwrap();
        let waiter = std::thread::spawn(move || {
            InstanceLock::acquire_inherited(&path, "the journal", Duration::from_secs(600))
        });
        drop(stdin);
        child.wait().unwrap();
        assert!(waiter.join().unwrap().is_ok());
    }

    #[test]
    fn a_live_holder_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        let _first = InstanceLock::acquire(&path, "the journal").unwrap();
        let err = InstanceLock::acquire_inherited(&path, "the journal", Duration::from_secs(600))
            .unwrap_err();
        assert!(err.downcast_ref::<Held>().unwrap().holder_alive());
    }
}
