//! `ApplyLive`: the pending deployment's additions, copied into the running `/usr`.
//!
//! [`diff`] compares the `/usr` trees of two commits from their dirtree objects (pure reading,
//! tested on a repository made here). The copy needs the running system's `/usr` made writable
//! in the host's mount namespace, which the service's unit keeps private
//! (`PrivateMounts=yes`, `ProtectSystem=strict`): an overlay mounted there would be seen by the
//! service alone. So the service starts itself once more with `--apply-live FROM TO` through
//! `systemd-run` ([`run_helper`]), as a transient unit without that namespace; that process
//! ([`helper`]) unlocks the booted deployment with libostree's transient unlock (an overlayfs
//! on `/usr`, mounted read-only, gone at the next boot, as `ostree admin unlock --transient`),
//! makes `/usr` writable in a mount namespace of its own thread (the overlay's upper directory
//! is shared, so the host sees what is written), and copies the additions ([`copy`]).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use dnfimage_interfaces::deployer::DeployerError;
use ostree_ext::gio;
use ostree_ext::glib;
use ostree_ext::ostree;
use ostree_ext::prelude::*;
use serde::{Deserialize, Serialize};

use crate::commit::DirTree as Tree;

/// What `ApplyLive` records, for `Status`: the booted deployment ("STATEROOT/COMMIT.SERIAL")
/// and the commit whose additions its running `/usr` has, on one line. Under `/run`, so it
/// goes with the overlay at the next boot.
pub const RECORD: &str = "/run/dnfimage/live-commit";
/// The rpm database directories (those the layerer looks for under `/usr`): the files there a
/// pending deployment changes list the packages it adds, so they are replaced with the
/// additions, never refused.
pub const RPM_DATABASES: [&str; 2] = ["/usr/lib/sysimage/rpm/", "/usr/share/rpm/"];
/// How many changed files `ReplacementRefused` names.
pub const NAMED: usize = 10;

/// What an entry of a tree is, with the object that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory: its dirmeta object (owner, mode, extended attributes).
    Directory { meta: String },
    /// A file or a symbolic link: its file object.
    File { checksum: String },
}

/// A path under `/usr` and what the newer commit has there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// "/usr/…".
    pub path: String,
    pub kind: Kind,
}

/// How the `/usr` of one commit differs from another's, `/usr/etc` aside (it becomes `/etc`,
/// which `ApplyLive` leaves alone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Paths only the newer commit has, parents before their children.
    pub added: Vec<Entry>,
    /// Paths both have with other contents (or of another kind), as the newer has them; the rpm
    /// database aside.
    pub changed: Vec<Entry>,
    /// Files of the rpm database ([`RPM_DATABASES`]) both have with other contents.
    pub database: Vec<Entry>,
    /// Paths only the older commit has (a removed directory counts once).
    pub removed: Vec<String>,
}

/// The `usr` dirtree of commit `commit`.
fn usr_of(repo: &ostree::Repo, commit: &str) -> Result<Option<Tree>> {
    let (v, _) = repo
        .load_commit(commit)
        .with_context(|| format!("Loading commit {commit}"))?;
    let root = ostree::checksum_from_bytes_v(&v.child_value(6)).to_string();
    let root = Tree::load(repo, &root)?;
    root.dir("usr").map(|t| Tree::load(repo, t)).transpose()
}

/// How the `/usr` of commit `to` differs from that of commit `from`.
pub fn diff(repo: &ostree::Repo, from: &str, to: &str) -> Result<Diff> {
    let old = usr_of(repo, from)?;
    let Some(new) = usr_of(repo, to)? else {
        anyhow::bail!("Commit {to} has no /usr");
    };
    let mut d = Diff::default();
    walk(repo, old.as_ref(), &new, "/usr", &mut d)?;
    Ok(d)
}

fn walk(
    repo: &ostree::Repo,
    old: Option<&Tree>,
    new: &Tree,
    dir: &str,
    d: &mut Diff,
) -> Result<()> {
    for (name, checksum) in &new.files {
        let entry = Entry {
            path: format!("{dir}/{name}"),
            kind: Kind::File {
                checksum: checksum.clone(),
            },
        };
        match old {
            Some(old) if old.file(name) == Some(checksum.as_str()) => {}
            Some(old) if old.file(name).is_some() && in_rpm_database(&entry.path) => {
                d.database.push(entry)
            }
            Some(old) if old.has(name) => d.changed.push(entry),
            _ => d.added.push(entry),
        }
    }
    for (name, tree, meta) in &new.dirs {
        let path = format!("{dir}/{name}");
        if path == "/usr/etc" {
            continue;
        }
        let entry = Entry {
            path: path.clone(),
            kind: Kind::Directory { meta: meta.clone() },
        };
        match old {
            Some(old) if old.dir(name) == Some(tree.as_str()) => {}
            Some(old) if old.dir(name).is_some() => {
                let before = Tree::load(repo, old.dir(name).unwrap_or_default())?;
                walk(repo, Some(&before), &Tree::load(repo, tree)?, &path, d)?;
            }
            Some(old) if old.file(name).is_some() => d.changed.push(entry),
            _ => {
                d.added.push(entry);
                walk(repo, None, &Tree::load(repo, tree)?, &path, d)?;
            }
        }
    }
    if let Some(old) = old {
        let names = old
            .files
            .iter()
            .map(|(n, _)| n)
            .chain(old.dirs.iter().map(|(n, _, _)| n));
        for name in names {
            if !new.has(name) && format!("{dir}/{name}") != "/usr/etc" {
                d.removed.push(format!("{dir}/{name}"));
            }
        }
    }
    Ok(())
}

fn in_rpm_database(path: &str) -> bool {
    RPM_DATABASES.iter().any(|dir| path.starts_with(dir))
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copied {
    /// Entries added.
    pub added: u64,
    /// Files replaced: the rpm database's, and the changed ones when asked.
    pub replaced: u64,
}

/// Sets the extended attributes of a variant `a(ayay)` on `path`; one the filesystem refuses
/// (an overlay refuses some namespaces) is logged and skipped.
fn set_xattrs(path: &Path, xattrs: &glib::Variant) {
    for x in xattrs.iter() {
        let name = x.child_value(0).data_as_bytes();
        let name = name.strip_suffix(b"\0").unwrap_or(&name);
        let value = x.child_value(1).data_as_bytes();
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        if let Err(e) = rustix::fs::lsetxattr(
            path,
            cname.as_c_str(),
            &value,
            rustix::fs::XattrFlags::empty(),
        ) {
            tracing::debug!(
                "Setting extended attribute {} on {}, ignoring: {e}",
                String::from_utf8_lossy(name),
                path.display()
            );
        }
    }
}

/// `path` in a temporary name beside it.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".dnfimage-live.{name}"))
}

/// Writes `entry` of the repository under `root` (`root` + its path), with its owner, mode and
/// extended attributes: a directory is created, a file or symbolic link is written beside its
/// place and renamed into it (so a replaced file changes at once).
fn write_entry(repo: &ostree::Repo, root: &Path, entry: &Entry) -> Result<()> {
    let dest = root.join(entry.path.trim_start_matches('/'));
    match &entry.kind {
        Kind::Directory { meta } => {
            let v = repo
                .load_variant(ostree::ObjectType::DirMeta, meta)
                .with_context(|| format!("Loading dirmeta {meta}"))?;
            let uid = u32::from_be(v.child_value(0).get::<u32>().unwrap_or(0));
            let gid = u32::from_be(v.child_value(1).get::<u32>().unwrap_or(0));
            let mode = u32::from_be(v.child_value(2).get::<u32>().unwrap_or(0o755));
            match std::fs::create_dir(&dest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dest.is_dir() => {}
                Err(e) => return Err(e).with_context(|| format!("Creating {}", dest.display())),
            }
            std::os::unix::fs::lchown(&dest, Some(uid), Some(gid))
                .with_context(|| format!("Changing the owner of {}", dest.display()))?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode & 0o7777))
                .with_context(|| format!("Changing the mode of {}", dest.display()))?;
            set_xattrs(&dest, &v.child_value(3));
        }
        Kind::File { checksum } => {
            let (stream, info, xattrs) = repo
                .load_file(checksum, gio::Cancellable::NONE)
                .with_context(|| format!("Loading file object {checksum}"))?;
            let uid = info.attribute_uint32("unix::uid");
            let gid = info.attribute_uint32("unix::gid");
            let mode = info.attribute_uint32("unix::mode");
            let tmp = temporary(&dest);
            match std::fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("Removing {}", tmp.display())),
            }
            if info.file_type() == gio::FileType::SymbolicLink {
                let target = info
                    .symlink_target()
                    .with_context(|| format!("Reading the target of {}", entry.path))?;
                std::os::unix::fs::symlink(&target, &tmp)
                    .with_context(|| format!("Creating {}", tmp.display()))?;
                std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid))
                    .with_context(|| format!("Changing the owner of {}", tmp.display()))?;
            } else {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode_0600()
                    .open(&tmp)
                    .with_context(|| format!("Creating {}", tmp.display()))?;
                if let Some(stream) = stream {
                    std::io::copy(&mut stream.into_read(), &mut file)
                        .with_context(|| format!("Writing {}", tmp.display()))?;
                }
                file.flush()?;
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                    .with_context(|| format!("Changing the owner of {}", tmp.display()))?;
                // After the owner: changing it clears the set-user-ID and set-group-ID bits.
                file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                    .with_context(|| format!("Changing the mode of {}", tmp.display()))?;
            }
            set_xattrs(&tmp, &xattrs);
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("Renaming {} to {}", tmp.display(), dest.display()))?;
        }
    }
    Ok(())
}

/// Open options for a new file readable by its owner only until its mode is set.
trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// Writes the additions of `diff` (and, when `replace`, its changed files) from the repository
/// under `root`, "/" for the running system.
pub fn copy(repo: &ostree::Repo, diff: &Diff, root: &Path, replace: bool) -> Result<Copied> {
    let mut copied = Copied::default();
    for entry in &diff.added {
        write_entry(repo, root, entry)?;
        copied.added += 1;
    }
    for entry in &diff.database {
        write_entry(repo, root, entry)?;
        copied.replaced += 1;
    }
    if replace {
        for entry in &diff.changed {
            write_entry(repo, root, entry)?;
            copied.replaced += 1;
        }
    }
    Ok(copied)
}

/// The refusal of changed files without `allowReplacement`: how many, and the first of them (the
/// rpm database is never refused).
pub fn refused(diff: &Diff) -> Option<(u64, Vec<String>)> {
    if diff.changed.is_empty() {
        return None;
    }
    Some((
        diff.changed.len() as u64,
        diff.changed
            .iter()
            .take(NAMED)
            .map(|e| e.path.clone())
            .collect(),
    ))
}

/// What `ApplyLive` does with `diff` (to commit `to`): `None` to copy, `Some(why)` when there
/// is nothing to apply, `ReplacementRefused` when it changes files and `allow_replacement` is
/// false.
pub fn decide(
    diff: &Diff,
    to: &str,
    allow_replacement: bool,
) -> Result<Option<String>, DeployerError> {
    if !allow_replacement && let Some((count, files)) = refused(diff) {
        return Err(DeployerError::ReplacementRefused { count, files });
    }
    if diff.added.is_empty() && diff.changed.is_empty() {
        return Ok(Some(format!(
            "The pending deployment (commit {to}) adds no files to /usr"
        )));
    }
    Ok(None)
}

/// The record line for `deployment` ("STATEROOT/COMMIT.SERIAL") and `commit`.
pub fn record_line(deployment: &str, commit: &str) -> String {
    format!("{deployment} {commit}\n")
}

/// The commit [`RECORD`] names for `deployment`, if it names that deployment.
pub fn recorded_commit(text: &str, deployment: &str) -> Option<String> {
    let (d, c) = text.trim().split_once(' ')?;
    (d == deployment && !c.is_empty()).then(|| c.to_string())
}

/// The commit whose additions the running `/usr` of `deployment` has, from [`RECORD`].
pub fn live_commit(deployment: &str) -> Option<String> {
    let text = std::fs::read_to_string(RECORD).ok()?;
    recorded_commit(&text, deployment)
}

/// Runs [`helper`] outside the service's mount namespace: the service's own program, started
/// with `--apply-live FROM TO` as a transient unit by `systemd-run`, waited for; its result is
/// the JSON line it prints.
pub fn run_helper(sysroot: &Path, from: &str, to: &str, replace: bool) -> Result<Copied> {
    let exe = std::env::current_exe().context("Finding the service's program")?;
    let mut cmd = std::process::Command::new("systemd-run");
    cmd.args([
        "--quiet",
        "--wait",
        "--pipe",
        "--collect",
        "--service-type=exec",
        "--description=dnfimage apply-live: the pending deployment's additions into /usr",
        "--",
    ])
    .arg(exe)
    .arg("--sysroot")
    .arg(sysroot)
    .args(["--apply-live", from, to]);
    if replace {
        cmd.arg("--allow-replacement");
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .context("Running systemd-run")?;
    anyhow::ensure!(
        out.status.success(),
        "The apply-live step failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("Reading the apply-live step's result: it printed none")?;
    serde_json::from_str(line).context("Reading the apply-live step's result")
}

/// Makes the running `/usr`, unlocked read-only by the transient unlock, writable for this
/// thread alone: a mount namespace of its own, private, with `/usr` remounted read-write (the
/// overlay's upper directory is the host's, so what is written here is the host's too).
fn writable_usr() -> Result<()> {
    rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS)
        .context("Entering a mount namespace of our own")?;
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
    .context("Making the mount namespace private")?;
    rustix::mount::mount_remount("/usr", rustix::mount::MountFlags::empty(), "")
        .context("Remounting /usr read-write")?;
    Ok(())
}

/// The step of `ApplyLive` that runs in the host's mount namespace (`--apply-live FROM TO`):
/// checks that the booted deployment still is commit `from`, unlocks its `/usr` (transient),
/// copies the additions of commit `to` into it (and its changed files when `replace`),
/// records it in [`RECORD`] and prints the [`Copied`] counts as a JSON line.
pub fn helper(sysroot: &Path, from: &str, to: &str, replace: bool) -> Result<()> {
    let (sysroot, from, to) = (sysroot.to_path_buf(), from.to_string(), to.to_string());
    // The mount namespace is entered by this thread alone: the copy runs on it, start to end.
    let copied = std::thread::spawn(move || -> Result<Copied> {
        let root = ostree::Sysroot::new(Some(&gio::File::for_path(&sysroot)));
        root.load(gio::Cancellable::NONE)
            .with_context(|| format!("Loading the sysroot {}", sysroot.display()))?;
        let booted = root
            .booted_deployment()
            .context("The sysroot is not booted: there is no running /usr to change")?;
        anyhow::ensure!(
            booted.csum() == from,
            "The booted deployment is commit {}, not {from}",
            booted.csum()
        );
        let repo = root.repo();
        let diff = diff(&repo, &from, &to)?;
        if !replace && let Some((count, files)) = refused(&diff) {
            anyhow::bail!("{count} changed files, e.g. {}", files.join(", "));
        }
        if booted.unlocked() == ostree::DeploymentUnlockedState::None {
            root.deployment_unlock(
                &booted,
                ostree::DeploymentUnlockedState::Transient,
                gio::Cancellable::NONE,
            )
            .context("Unlocking /usr with a transient overlay")?;
        }
        writable_usr()?;
        let copied = copy(&repo, &diff, Path::new("/"), replace)?;
        let id = dnfimage_interfaces::deployer::deployment_id(
            booted.osname().as_str(),
            booted.csum().as_str(),
            u64::try_from(booted.deployserial()).unwrap_or_default(),
        );
        if let Some(dir) = Path::new(RECORD).parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("Creating {}", dir.display()))?;
        }
        std::fs::write(RECORD, record_line(&id, &to))
            .with_context(|| format!("Writing {RECORD}"))?;
        Ok(copied)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("The apply-live thread panicked"))??;
    println!("{}", serde_json::to_string(&copied)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    use super::*;

    fn ostree(repo: &Path, args: &[&str]) -> String {
        let out = Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(args)
            .output()
            .expect("ostree runs");
        assert!(out.status.success(), "ostree {args:?}: {out:?}");
        String::from_utf8(out.stdout)
            .expect("UTF-8")
            .trim()
            .to_string()
    }

    fn commit(repo: &Path, tree: &Path, branch: &str) -> String {
        ostree(
            repo,
            &[
                "commit",
                &format!("--branch={branch}"),
                &format!("--tree=dir={}", tree.display()),
                "--owner-uid=0",
                "--owner-gid=0",
            ],
        )
    }

    fn write(root: &Path, path: &str, text: &str, mode: u32) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Two commits: the booted one and a pending one that adds a package's files (a new
    /// directory with a file and a symbolic link, a file in an existing directory), changes one
    /// file, removes one, turns a file into a directory, and changes `/usr/etc`.
    fn two_commits(dir: &Path) -> (ostree::Repo, String, String) {
        let repo = dir.join("repo");
        ostree(&repo, &["init", "--mode=archive"]);
        let a = dir.join("a");
        write(&a, "usr/bin/sh", "sh", 0o755);
        write(&a, "usr/bin/old", "old", 0o755);
        write(&a, "usr/lib/os-release", "VERSION_ID=1", 0o644);
        write(&a, "usr/share/doc/same", "same", 0o644);
        write(&a, "usr/share/kind", "a file", 0o644);
        write(&a, "usr/etc/motd", "hello", 0o644);
        write(
            &a,
            "usr/lib/sysimage/rpm/rpmdb.sqlite",
            "one package",
            0o644,
        );
        let from = commit(&repo, &a, "a");
        let b = dir.join("b");
        write(&b, "usr/bin/sh", "sh", 0o755);
        write(&b, "usr/bin/hello", "#!/bin/sh\necho hello\n", 0o4755);
        write(&b, "usr/lib/os-release", "VERSION_ID=2", 0o644);
        write(&b, "usr/share/doc/same", "same", 0o644);
        write(&b, "usr/share/hello/README", "read me", 0o600);
        std::os::unix::fs::symlink("README", b.join("usr/share/hello/LINK")).expect("symlink");
        write(&b, "usr/share/kind/now-a-dir", "x", 0o644);
        write(&b, "usr/etc/motd", "changed", 0o644);
        write(&b, "usr/etc/hello.conf", "new", 0o644);
        write(
            &b,
            "usr/lib/sysimage/rpm/rpmdb.sqlite",
            "two packages",
            0o644,
        );
        let to = commit(&repo, &b, "b");
        let repo = ostree::Repo::new_for_path(&repo);
        repo.open(gio::Cancellable::NONE)
            .expect("the repository opens");
        (repo, from, to)
    }

    fn paths(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.path.as_str()).collect()
    }

    #[test]
    fn tells_added_changed_and_removed_paths_under_usr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, from, to) = two_commits(dir.path());
        let d = diff(&repo, &from, &to).expect("diff");
        assert_eq!(
            paths(&d.added),
            [
                "/usr/bin/hello",
                "/usr/share/hello",
                "/usr/share/hello/LINK",
                "/usr/share/hello/README",
            ]
        );
        assert!(matches!(d.added[1].kind, Kind::Directory { .. }));
        assert_eq!(
            paths(&d.changed),
            ["/usr/lib/os-release", "/usr/share/kind"]
        );
        assert_eq!(d.removed, ["/usr/bin/old"]);
        assert_eq!(paths(&d.database), ["/usr/lib/sysimage/rpm/rpmdb.sqlite"]);
        assert_eq!(
            refused(&d),
            Some((
                2,
                vec!["/usr/lib/os-release".into(), "/usr/share/kind".into()]
            ))
        );

        // The same commit: nothing; the other way round: additions become removals.
        assert_eq!(diff(&repo, &to, &to).expect("diff"), Diff::default());
        let back = diff(&repo, &to, &from).expect("diff");
        assert_eq!(
            paths(&back.database),
            ["/usr/lib/sysimage/rpm/rpmdb.sqlite"]
        );
        assert_eq!(paths(&back.added), ["/usr/bin/old"]);
        assert_eq!(back.removed, ["/usr/bin/hello", "/usr/share/hello"]);
        assert_eq!(refused(&Diff::default()), None);
    }

    #[test]
    fn copies_the_additions_with_their_modes_and_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, from, to) = two_commits(dir.path());
        let d = diff(&repo, &from, &to).expect("diff");
        // The running /usr: the booted commit checked out.
        let root = dir.path().join("root");
        ostree(
            &dir.path().join("repo"),
            &[
                "checkout",
                "--user-mode",
                &from,
                &root.display().to_string(),
            ],
        );
        let copied = copy(&repo, &d, &root, false).expect("copy");
        assert_eq!(
            copied,
            Copied {
                added: 4,
                replaced: 1
            }
        );
        let hello = root.join("usr/bin/hello");
        assert_eq!(
            std::fs::read_to_string(&hello).expect("read"),
            "#!/bin/sh\necho hello\n"
        );
        assert_eq!(
            std::fs::metadata(&hello).expect("stat").mode() & 0o7777,
            0o4755
        );
        let readme = root.join("usr/share/hello/README");
        assert_eq!(
            std::fs::metadata(&readme).expect("stat").mode() & 0o7777,
            0o600
        );
        assert_eq!(
            std::fs::read_link(root.join("usr/share/hello/LINK")).expect("readlink"),
            Path::new("README")
        );
        // Changed files stay as they were, removed ones stay, /etc is not touched.
        assert_eq!(
            std::fs::read_to_string(root.join("usr/lib/os-release")).expect("read"),
            "VERSION_ID=1"
        );
        assert!(root.join("usr/bin/old").exists());
        assert!(!root.join("usr/etc/hello.conf").exists());
        // No temporary file is left.
        assert_eq!(
            std::fs::read_to_string(root.join("usr/lib/sysimage/rpm/rpmdb.sqlite")).expect("read"),
            "two packages"
        );
        let leftovers: Vec<_> = std::fs::read_dir(root.join("usr/bin"))
            .expect("readdir")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".dnfimage-live")
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // With replacement: the changed file too (a file that became a directory cannot be
        // renamed over, and says so).
        let only_file = Diff {
            changed: d
                .changed
                .iter()
                .filter(|e| e.path == "/usr/lib/os-release")
                .cloned()
                .collect(),
            ..Diff::default()
        };
        let copied = copy(&repo, &only_file, &root, true).expect("copy");
        assert_eq!(
            copied,
            Copied {
                added: 0,
                replaced: 1
            }
        );
        assert_eq!(
            std::fs::read_to_string(root.join("usr/lib/os-release")).expect("read"),
            "VERSION_ID=2"
        );
        let err = copy(&repo, &d, &root, true).expect_err("a file cannot replace a directory");
        assert!(format!("{err:#}").contains("/usr/share/kind"), "{err:#}");
    }

    #[test]
    fn refuses_replacements_unless_allowed_and_says_when_nothing_is_added() {
        let entry = |path: &str| Entry {
            path: path.into(),
            kind: Kind::File {
                checksum: "0".into(),
            },
        };
        let added = Diff {
            added: vec![entry("/usr/bin/hello")],
            removed: vec!["/usr/bin/old".into()],
            ..Diff::default()
        };
        let changed = Diff {
            added: vec![entry("/usr/bin/hello")],
            changed: (0..12)
                .map(|i| entry(&format!("/usr/lib/f{i:02}")))
                .collect(),
            ..Diff::default()
        };
        let only_removed = Diff {
            removed: vec!["/usr/bin/old".into()],
            database: vec![entry("/usr/share/rpm/Packages")],
            ..Diff::default()
        };
        assert_eq!(decide(&added, "c", false), Ok(None));
        assert_eq!(decide(&changed, "c", true), Ok(None));
        match decide(&changed, "c", false) {
            Err(DeployerError::ReplacementRefused { count, files }) => {
                assert_eq!(count, 12);
                assert_eq!(files.len(), NAMED);
                assert_eq!(files[0], "/usr/lib/f00");
            }
            other => panic!("{other:?}"),
        }
        for (diff, allow) in [(&only_removed, false), (&Diff::default(), true)] {
            let why = decide(diff, "c", allow)
                .expect("no refusal")
                .expect("nothing");
            assert!(why.contains("adds no files"), "{why}");
        }
    }

    #[test]
    fn reads_the_record_of_the_booted_deployment_only() {
        let line = record_line("default/abc.0", "def");
        assert_eq!(
            recorded_commit(&line, "default/abc.0").as_deref(),
            Some("def")
        );
        assert_eq!(recorded_commit(&line, "default/abc.1"), None);
        assert_eq!(recorded_commit("", "default/abc.0"), None);
        assert_eq!(recorded_commit("default/abc.0 ", "default/abc.0"), None);
    }
}
