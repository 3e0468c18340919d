//! Where a service gets its socket from: systemd socket activation, a connected socket handed
//! over by `varlinkctl call exec:` or `Accept=yes`, or a path it binds itself.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use anyhow::{Context, Result};

/// The socket a service was started with, taken from the environment before any thread starts.
#[derive(Debug)]
pub enum Activation {
    /// A listening socket (`ListenStream=` without `Accept=`): accept connections on it.
    Listener(OwnedFd),
    /// An already connected socket (`Accept=yes`, `varlinkctl call exec:`): serve it, then exit.
    Connected(OwnedFd),
}

impl std::os::fd::AsFd for Activation {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Activation::Listener(fd) | Activation::Connected(fd) => fd.as_fd(),
        }
    }
}

/// The `FileDescriptorName=` our socket units use.
pub const FD_NAME: &str = "varlink";

const SD_LISTEN_FDS_START: RawFd = 3;

/// Takes the activation socket from `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES` and unsets them.
///
/// Call it first thing in `main`, before the async runtime starts threads: the environment is
/// modified. Returns `None` when the process was not socket-activated.
pub fn take() -> Result<Option<Activation>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        remove_env(var);
    }
    let Some(fds) = fds else { return Ok(None) };
    if pid.as_deref() != Some(&std::process::id().to_string()) {
        tracing::debug!("LISTEN_PID is not ours, ignoring socket activation");
        return Ok(None);
    }
    let count: RawFd = fds.parse().context("Parsing LISTEN_FDS")?;
    let index = pick_fd(count, names.as_deref())?;
    // Every fd passed to us is ours to own; close the ones we do not use.
    let mut chosen = None;
    for i in 0..count {
        let raw = SD_LISTEN_FDS_START + i;
        let fd = own_inherited_fd(raw);
        if i == index {
            chosen = Some(fd);
        }
    }
    let fd = chosen.expect("pick_fd returns an index below count");
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .context("Setting close-on-exec on the activation socket")?;
    let accepting = rustix::net::sockopt::get_socket_acceptconn(&fd)
        .context("Checking whether the activation socket is listening")?;
    Ok(Some(if accepting {
        Activation::Listener(fd)
    } else {
        Activation::Connected(fd)
    }))
}

/// Chooses which of `count` passed fds is the varlink socket: the one named [`FD_NAME`], else the
/// first one.
fn pick_fd(count: RawFd, names: Option<&str>) -> Result<RawFd> {
    anyhow::ensure!(count >= 1, "Socket activation passed no file descriptor");
    let by_name = names.and_then(|names| names.split(':').position(|name| name == FD_NAME));
    let index = by_name.map(|i| i as RawFd).unwrap_or(0);
    anyhow::ensure!(
        index < count,
        "LISTEN_FDNAMES names more sockets than LISTEN_FDS passes"
    );
    Ok(index)
}

#[allow(unsafe_code)]
fn own_inherited_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: systemd's activation protocol hands these descriptors to this process, which owns
    // them from now on; nothing else in the process refers to them.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

#[allow(unsafe_code)]
fn remove_env(var: &str) {
    // SAFETY: called from `take()`, which documents that it runs before any other thread exists.
    unsafe { std::env::remove_var(var) }
}

/// Binds a listening Unix socket at `path`, replacing a stale socket left by an earlier run and
/// creating the parent directory.
pub fn bind(path: &Path, mode: Option<u32>) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("Creating socket directory {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "Another process is serving {}; stop it first or use another --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("Removing stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("Checking {}", path.display())),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("Binding {}", path.display()))?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("Setting mode {mode:o} on {}", path.display()))?;
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_named_fd() {
        let cases: &[(RawFd, Option<&str>, Option<RawFd>)] = &[
            (1, None, Some(0)),
            (1, Some("varlink"), Some(0)),
            (2, Some("other:varlink"), Some(1)),
            (2, Some("other:unrelated"), Some(0)),
            (1, Some("other:varlink"), None),
            (0, None, None),
        ];
        for (count, names, want) in cases {
            let got = pick_fd(*count, *names).ok();
            assert_eq!(got, *want, "count={count} names={names:?}");
        }
    }

    #[test]
    fn bind_replaces_stale_socket_and_refuses_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/sock");
        let first = bind(&path, Some(0o600)).unwrap();
        // A live listener: refused.
        let err = bind(&path, None).unwrap_err();
        assert!(format!("{err:#}").contains("Another process"), "{err:#}");
        drop(first);
        // Now stale: replaced.
        let _second = bind(&path, None).unwrap();
        // Not a socket: refused.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(bind(&file, None).is_err());
    }
}
