//! bubblewrap (`bwrap`), the sandbox rpm installs and removes packages in: no network (its own
//! network namespace has nothing but its own loopback), its own PID, IPC and UTS namespaces,
//! capabilities dropped to what rpm needs to write files and chroot into the target, the host's
//! `/usr` and `/etc` read-only, `/var`, `/home`, `/root` and `/run` of the host absent, and
//! only the target tree writable (with a fresh `/dev`, `/proc` and `/tmp` inside it for the
//! scriptlets).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::version_line;

/// The capabilities rpm keeps: owning and moding files, creating device nodes, setting file
/// capabilities, chrooting into the target for scriptlets, and switching users for them.
/// Everything else (CAP_SYS_ADMIN, CAP_NET_*, CAP_SYS_MODULE, CAP_SYS_PTRACE, …) is dropped.
pub const KEPT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_MKNOD",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// Top-level host directories that may be symlinks into `/usr` (merged /usr) or directories.
const HOST_TOP_LEVEL: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// How a top-level host path looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    /// A symlink to the target.
    Symlink(PathBuf),
    /// A directory.
    Dir,
}

/// The bubblewrap sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    program: PathBuf,
    /// `bwrap --version`, when it runs.
    pub version: Option<String>,
    host: Vec<(String, HostEntry)>,
}

impl Sandbox {
    /// Finds `bwrap` and looks at the host's top-level layout.
    pub fn detect() -> Self {
        let host = HOST_TOP_LEVEL
            .iter()
            .filter_map(|name| {
                let path = Path::new("/").join(name);
                let meta = std::fs::symlink_metadata(&path).ok()?;
                let entry = if meta.file_type().is_symlink() {
                    HostEntry::Symlink(std::fs::read_link(&path).ok()?)
                } else if meta.is_dir() {
                    HostEntry::Dir
                } else {
                    return None;
                };
                Some((name.to_string(), entry))
            })
            .collect();
        Sandbox {
            program: PathBuf::from("bwrap"),
            version: version_line("bwrap"),
            host,
        }
    }

    /// The `bwrap` arguments for a sandbox writing `target` only and reading `readable` too,
    /// up to (not including) the `--` before the command.
    pub fn args(&self, target: &Path, readable: &[&Path]) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            a.extend(items.iter().map(|i| i.as_ref().to_os_string()));
        };
        push(&[
            &"--unshare-net",
            &"--unshare-ipc",
            &"--unshare-pid",
            &"--unshare-uts",
            &"--unshare-cgroup-try",
            &"--die-with-parent",
            &"--new-session",
            &"--ro-bind",
            &"/usr",
            &"/usr",
            &"--ro-bind",
            &"/etc",
            &"/etc",
        ]);
        for (name, entry) in &self.host {
            let path = format!("/{name}");
            match entry {
                HostEntry::Symlink(t) => push(&[&"--symlink", t, &path]),
                HostEntry::Dir => push(&[&"--ro-bind", &path, &path]),
            }
        }
        push(&[&"--dev", &"/dev", &"--proc", &"/proc", &"--tmpfs", &"/tmp"]);
        // Read-only binds first: one that held the target would otherwise cover it.
        for r in readable {
            push(&[&"--ro-bind", r, r]);
        }
        push(&[&"--bind", &target, &target]);
        // Inside the target, for scriptlets; only where the image has the directory, so that
        // nothing is created in it.
        for (dir, kind) in [("dev", "--dev"), ("proc", "--proc"), ("tmp", "--tmpfs")] {
            let inside = target.join(dir);
            if inside.is_dir() {
                push(&[&kind, &inside]);
            }
        }
        push(&[&"--cap-drop", &"ALL"]);
        for cap in KEPT_CAPABILITIES {
            push(&[&"--cap-add", cap]);
        }
        push(&[&"--chdir", &"/"]);
        a
    }

    /// `program args…` in a sandbox writing `target` only, with a clean environment (`PATH`,
    /// `HOME=home`, `LC_ALL=C`).
    pub fn command(
        &self,
        target: &Path,
        readable: &[&Path],
        home: &Path,
        program: &str,
        args: &[OsString],
    ) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args(target, readable))
            .arg("--")
            .arg(program)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", home)
            .env("LC_ALL", "C");
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_target_is_writable_and_network_is_gone() {
        let target = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(target.path().join("dev")).expect("mkdir");
        let sandbox = Sandbox {
            program: "bwrap".into(),
            version: None,
            host: vec![
                ("bin".into(), HostEntry::Symlink("usr/bin".into())),
                ("lib64".into(), HostEntry::Dir),
            ],
        };
        let args: Vec<String> = sandbox
            .args(target.path(), &[Path::new("/pkgs")])
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        let t = target.path().display();
        for want in [
            "--unshare-net".to_string(),
            "--ro-bind /usr /usr".into(),
            "--symlink usr/bin /bin".into(),
            "--ro-bind /lib64 /lib64".into(),
            format!("--bind {t} {t}"),
            "--ro-bind /pkgs /pkgs".into(),
            format!("--dev {t}/dev"),
            "--cap-drop ALL".into(),
            "--cap-add CAP_SYS_CHROOT".into(),
        ] {
            assert!(joined.contains(&want), "{want:?} missing from {joined}");
        }
        // No writable bind but the target; nothing mounted where the target lacks a directory.
        assert_eq!(args.iter().filter(|a| *a == "--bind").count(), 1);
        assert!(!joined.contains(&format!("{t}/proc")));
        assert!(!joined.contains("CAP_SYS_ADMIN") && !joined.contains("CAP_NET"));
    }
}
