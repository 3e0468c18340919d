//! A build, as DESIGN.md "Layering" says: an overlay over a hardlinked checkout of the image
//! commit; override removals with `rpm -e` (which refuses to break dependents) and replacements
//! with `rpm -U --oldpackage`; requested packages resolved and downloaded by dnf against a copy
//! of the image's own rpm database; every package checked with `rpm -K` against the configured
//! keys; rpm installing inside the sandbox, a failed scriptlet being fatal; the rpm database
//! checkpointed and the transient files removed; the overlay's changes committed on the image
//! commit. Runs on one blocking thread (the repository is not `Send`), synchronously, checking
//! for cancellation between steps and while tools run.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dnfimage_interfaces::layerer::{
    BuildPhase, BuildProgress, BuildResult, LayererError, LayeringRequest, LocalPackage, Package,
    PackageChanges,
};

use crate::dnf::{self, Dnf, Download};
use crate::overlay::Workspace;
use crate::packages::diff;
use crate::process::{self, Cancel, Stream};
use crate::request::{self, Changes};
use crate::rpm::{self, Rpm, run_error};
use crate::sandbox::Sandbox;
use crate::{failed, repo, repos, rpmdb};

/// The external tools, found once at start.
#[derive(Debug, Clone)]
pub struct Tools {
    /// rpm and rpmkeys.
    pub rpm: Rpm,
    /// dnf.
    pub dnf: Dnf,
    /// bubblewrap.
    pub sandbox: Sandbox,
}

/// Directories a caller's local package may never come from: pseudo filesystems, and this
/// service's own runtime and state.
const FORBIDDEN_PACKAGE_DIRS: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// Checks a local package path a caller gave for `overrideReplace`: absolute, an existing
/// regular `.rpm` file once symlinks are resolved, outside pseudo filesystems and outside the
/// service's own build area. (Its signature is checked afterwards like any package's.)
pub fn local_package(given: &str, builds: &std::path::Path) -> Result<PathBuf, LayererError> {
    let invalid = |message: String| LayererError::InvalidRequest {
        packages: vec![given.to_string()],
        message,
    };
    let path = std::path::Path::new(given);
    if !path.is_absolute() {
        return Err(invalid(format!(
            "{given}: a local package must be an absolute path"
        )));
    }
    let real = match path.canonicalize() {
        Ok(real) => real,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LayererError::PackageNotFound {
                packages: vec![given.to_string()],
                message: format!("{given}: no such file"),
            });
        }
        Err(e) => return Err(invalid(format!("{given}: {e}"))),
    };
    if real.extension().is_none_or(|e| e != "rpm") {
        return Err(invalid(format!("{given}: not an .rpm file")));
    }
    let forbidden = FORBIDDEN_PACKAGE_DIRS
        .iter()
        .map(std::path::Path::new)
        .chain(std::iter::once(builds))
        .find(|dir| real.starts_with(dir));
    if let Some(dir) = forbidden {
        return Err(invalid(format!(
            "{given}: packages are not taken from {}",
            dir.display()
        )));
    }
    if !real.is_file() {
        return Err(invalid(format!("{given}: not a regular file")));
    }
    Ok(real)
}

/// A local package file a caller passed as a descriptor for `overrideReplaceFiles`.
#[derive(Debug, Clone)]
pub struct LocalFile {
    /// What the caller calls it, for messages.
    pub name: String,
    /// The file, read once, from its start, whatever the caller's offset.
    pub file: Arc<File>,
}

/// Pairs the `overrideReplaceFiles` of a call with the descriptors passed with it: each index
/// names one passed descriptor, no descriptor is named twice, and each is a regular file.
/// Descriptors no entry names are closed unread.
pub fn passed_files(
    files: Vec<LocalPackage>,
    fds: Vec<OwnedFd>,
) -> Result<Vec<LocalFile>, LayererError> {
    let count = fds.len();
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut taken = Vec::with_capacity(files.len());
    for f in files {
        let invalid = |message: String| LayererError::InvalidRequest {
            packages: vec![f.name.clone()],
            message,
        };
        let slot = usize::try_from(f.fd).ok().and_then(|i| fds.get_mut(i));
        let fd = match slot {
            None => {
                return Err(invalid(format!(
                    "{}: no file descriptor {} was passed with the call ({count} were)",
                    f.name, f.fd
                )));
            }
            Some(slot) => slot.take().ok_or_else(|| {
                invalid(format!(
                    "{}: file descriptor {} is named twice",
                    f.name, f.fd
                ))
            })?,
        };
        let file = File::from(fd);
        let is_file = file.metadata().map(|m| m.is_file());
        if !matches!(is_file, Ok(true)) {
            return Err(invalid(format!("{}: not a regular file", f.name)));
        }
        taken.push(LocalFile {
            name: f.name,
            file: Arc::new(file),
        });
    }
    Ok(taken)
}

/// Opens the local package path a root caller gave for `overrideReplace` (checked with
/// [`local_package`]), without following a link put there since.
fn open_local_package(given: &str, builds: &Path) -> Result<File, LayererError> {
    let path = local_package(given, builds)?;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LayererError::PackageNotFound {
                packages: vec![given.to_string()],
                message: format!("{given}: no such file"),
            },
            _ => LayererError::InvalidRequest {
                packages: vec![given.to_string()],
                message: format!("{given}: {e}"),
            },
        })
}

/// Reads a caller's package file once, from its start, into a new file of the service's own
/// in `dir` (named `.incoming-*`, removed unless kept): every later step reads that copy only,
/// so what is checked is what is installed and kept, whatever happens to the caller's file.
fn stage(
    dir: &Path,
    source: &File,
    label: &str,
    cancel: &Cancel,
) -> Result<tempfile::NamedTempFile, LayererError> {
    let copying = format!("Copying {label}");
    let mut copy = tempfile::Builder::new()
        .prefix(".incoming-")
        .suffix(".rpm")
        .tempfile_in(dir)
        .map_err(|e| failed(&copying, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        check(cancel)?;
        let n = match source.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(LayererError::CorruptPackage {
                    package: label.to_string(),
                    message: format!("Reading it: {e}"),
                });
            }
        };
        copy.write_all(&buf[..n]).map_err(|e| failed(&copying, e))?;
        offset += n as u64;
    }
    copy.as_file().sync_all().map_err(|e| failed(&copying, e))?;
    Ok(copy)
}

/// The magic number an RPM file starts with, and the length of its lead.
const RPM_MAGIC: [u8; 4] = [0xed, 0xab, 0xee, 0xdb];
const RPM_LEAD: usize = 96;

/// Checks that the file `file` is a binary RPM package (its lead: the magic number, type 0);
/// `label` names it in errors.
fn plain_rpm(file: &Path, label: &str) -> Result<(), LayererError> {
    let invalid = |message: String| LayererError::InvalidRequest {
        packages: vec![label.to_string()],
        message: format!("{label}: {message}"),
    };
    let mut lead = [0u8; RPM_LEAD];
    let read = File::open(file).and_then(|f| f.read_exact_at(&mut lead, 0));
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(invalid("not an RPM package (too short)".to_string()))
        }
        Err(e) => Err(failed(&format!("Reading the copy of {label}"), e)),
        Ok(()) if lead[..4] != RPM_MAGIC => Err(invalid("not an RPM package".to_string())),
        Ok(()) if lead[6..8] != [0, 0] => {
            Err(invalid("a source package, not a binary one".to_string()))
        }
        Ok(()) => Ok(()),
    }
}

/// Where a build reads and writes.
#[derive(Debug, Clone)]
pub struct Context {
    /// The ostree repository.
    pub repo: PathBuf,
    /// Where build directories go.
    pub builds: PathBuf,
    /// Where the local packages of `overrideReplace` are kept for later builds.
    pub overrides: PathBuf,
    /// The rpm keyring (an rpm database of the configured keys) `rpm -K` checks against.
    pub keyring: PathBuf,
    /// The directory of `.repo` files.
    pub repos_dir: PathBuf,
    /// The tools.
    pub tools: Tools,
}

/// What `Build` was asked.
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// The image commit, or a commit built on it.
    pub base_commit: String,
    /// The commit whose recorded request is the starting point.
    pub request_from: Option<String>,
    /// Packages to add.
    pub install: Vec<String>,
    /// Requested packages to drop.
    pub uninstall: Vec<String>,
    /// Image packages to remove.
    pub override_remove: Vec<String>,
    /// Local package paths replacing image packages (root callers; the service opens them).
    pub override_replace: Vec<String>,
    /// Local package files passed as descriptors, replacing image packages.
    pub override_replace_files: Vec<LocalFile>,
    /// Packages whose overrides to drop.
    pub override_reset: Vec<String>,
    /// Repository ids to use; all enabled ones when `None`.
    pub repositories: Option<Vec<String>>,
}

/// Sends progress records.
pub type Report<'a> = &'a (dyn Fn(BuildProgress) + Sync);

fn progress(
    phase: BuildPhase,
    package: Option<String>,
    done: u64,
    total: u64,
    message: String,
) -> BuildProgress {
    BuildProgress {
        phase,
        package,
        packages_done: done,
        packages_total: total,
        bytes_done: None,
        bytes_total: None,
        message,
    }
}

fn cancelled() -> LayererError {
    LayererError::Cancelled {
        operation: String::new(),
    }
}

fn check(cancel: &Cancel) -> Result<(), LayererError> {
    if cancel.is_cancelled() {
        Err(cancelled())
    } else {
        Ok(())
    }
}

/// `failed`, or `Cancelled` when the failure comes from a cancellation.
fn failed_or_cancelled(cancel: &Cancel, context: &str, e: anyhow::Error) -> LayererError {
    if cancel.is_cancelled() {
        cancelled()
    } else {
        failed(context, e)
    }
}

/// The first 12 characters of a checksum (whole characters, whatever the text).
fn short(csum: &str) -> &str {
    csum.char_indices()
        .nth(12)
        .map_or(csum, |(i, _)| &csum[..i])
}

/// The file name a kept replacement package has in the overrides directory.
pub fn kept_file_name(p: &Package) -> String {
    format!("{}-{}.{}.rpm", p.name, p.version, p.architecture)
}

/// `VERSION_ID` of the tree at `root` (for dnf's `$releasever`).
fn version_id(root: &Path) -> Option<String> {
    ["usr/lib/os-release", "usr/etc/os-release", "etc/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(root.join(p)).ok())?
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// The kernel version of the tree at `root`: the directory of `/usr/lib/modules` holding a
/// `vmlinuz` (the newest, should there be several).
pub fn kernel_of(root: &Path) -> Option<String> {
    let mut kernels: Vec<String> = std::fs::read_dir(root.join("usr/lib/modules"))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("vmlinuz").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    kernels.sort_by(|a, b| crate::packages::rpmvercmp(a, b));
    if kernels.len() > 1 {
        tracing::warn!("The tree has several kernels {kernels:?}; using the newest");
    }
    kernels.pop()
}

/// Lists the `*.rpm` files of `dir`, sorted.
fn rpm_files(dir: &Path) -> Result<Vec<PathBuf>, LayererError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| failed("Listing the downloaded packages", e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rpm"))
        .collect();
    files.sort();
    Ok(files)
}

fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".rpm").to_string())
        .unwrap_or_default()
}

/// Removes what rpm, dnf and scriptlets leave that must not be committed: the contents of
/// `/tmp` and `/var/tmp` (the directories themselves too when the image has none), dnf's
/// cache, state and logs. Warns about other `/var` content, which a deployment never sees.
fn remove_transient(merged: &Path, lower: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    for dir in ["tmp", "var/tmp"] {
        let path = merged.join(dir);
        if !path.is_dir() {
            continue;
        }
        if !lower.join(dir).is_dir() {
            std::fs::remove_dir_all(&path).with_context(|| format!("Removing /{dir}"))?;
            continue;
        }
        for entry in std::fs::read_dir(&path).with_context(|| format!("Listing /{dir}"))? {
            let p = entry?.path();
            let removed = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            removed.with_context(|| format!("Removing {}", p.display()))?;
        }
    }
    for dir in ["var/cache/dnf", "var/lib/dnf"] {
        let path = merged.join(dir);
        if path.exists() && !lower.join(dir).exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("Removing /{dir}"))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(merged.join("var/log")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name.starts_with("dnf") || name == "hawkey.log")
                && !lower.join("var/log").join(&name).exists()
            {
                std::fs::remove_file(e.path()).with_context(|| format!("Removing {name}"))?;
            }
        }
    }
    Ok(())
}

/// Files the build added under `/var` (a deployment has the stateroot's `/var` instead).
fn var_content(upper: &Path) -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let rel = format!("{rel}/{}", e.file_name().to_string_lossy());
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), &rel, out),
                Ok(_) => out.push(rel),
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&upper.join("var"), "/var", &mut out);
    out
}

/// Free bytes for unprivileged writers on the filesystem holding `path`, and its device.
fn free_space(path: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let st = rustix::fs::statvfs(path)?;
    let dev = std::fs::metadata(path)?.dev();
    Ok((st.f_bavail.saturating_mul(st.f_frsize), dev))
}

/// The bytes of the regular files directly in `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

impl Context {
    /// Fails with `InsufficientSpace` unless the upper directory can take the packages `files`
    /// and a copy of the rpm database, and the repository their files (both, when they share a
    /// filesystem).
    fn check_space(
        &self,
        ws: &Workspace,
        dbpath: &str,
        files: &[&Path],
        cancel: &Cancel,
    ) -> Result<(), LayererError> {
        let installed = self.tools.rpm.installed_size(files, cancel)?;
        let rpmdb = dir_size(&ws.lower().join(dbpath));
        let upper = ws.upper();
        let (upper_free, upper_dev) =
            free_space(&upper).map_err(|e| failed("Checking free space", e))?;
        let (repo_free, repo_dev) =
            free_space(&self.repo).map_err(|e| failed("Checking free space", e))?;
        let mut needs = vec![(upper, installed + rpmdb, upper_free)];
        if repo_dev == upper_dev {
            needs[0].1 += installed;
        } else {
            needs.push((self.repo.clone(), installed, repo_free));
        }
        for (path, needed, available) in needs {
            if needed > available {
                return Err(LayererError::InsufficientSpace {
                    path: path.display().to_string(),
                    needed,
                    available,
                });
            }
        }
        Ok(())
    }

    fn sandboxed_rpm(
        &self,
        ws: &Workspace,
        args: Vec<std::ffi::OsString>,
        cancel: &Cancel,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), LayererError> {
        let (packages, home) = (ws.packages(), ws.home());
        let cmd = self.tools.sandbox.command(
            &ws.merged(),
            &[packages.as_path(), home.as_path()],
            &home,
            "rpm",
            &args,
        );
        // Every line is looked at as it comes: what is kept of a long output may leave out
        // the one saying a scriptlet failed (rpm exits 0 for that).
        let mut failed = None;
        let out = process::run(cmd, cancel, &mut |stream, line| {
            if failed.is_none() {
                failed = rpm::failed_scriptlet(line);
            }
            if stream == Stream::Stdout {
                on_line(line);
            }
        })
        .map_err(|e| run_error("Running rpm", e))?;
        tracing::debug!("rpm said: {}", out.text());
        rpm::classify_transaction(&out, failed)
    }
}

/// Runs one build; see the module documentation.
pub fn run(
    ctx: &Context,
    params: &Params,
    report: Report<'_>,
    cancel: &Cancel,
) -> Result<BuildResult, LayererError> {
    let repo = repo::open(&ctx.repo).map_err(|e| failed("Opening the repository", e))?;
    let rpm = &ctx.tools.rpm;
    report(progress(
        BuildPhase::Preparing,
        None,
        0,
        0,
        format!("Reading commit {}", params.base_commit),
    ));
    let not_found = |commit: &str| LayererError::CommitNotFound {
        commit: commit.to_string(),
    };
    let given = repo::resolve(&repo, &params.base_commit)
        .map_err(|e| failed("Resolving the base commit", e))?
        .ok_or_else(|| not_found(&params.base_commit))?;
    let given_meta = repo::commit_meta(&repo, &given).map_err(|e| failed("Reading commit", e))?;
    let is_layered = repo::layering_of(&given_meta)
        .map_err(|e| failed("Reading commit", e))?
        .is_some();
    let base = match (is_layered, &given_meta.parent) {
        (false, _) => given.clone(),
        (true, Some(parent)) => repo::resolve(&repo, parent)
            .map_err(|e| failed("Resolving the image commit", e))?
            .ok_or_else(|| not_found(parent))?,
        (true, None) => {
            return Err(failed(
                "Reading commit",
                format!("{given} is a layered commit without a parent"),
            ));
        }
    };
    let base_meta = repo::commit_meta(&repo, &base).map_err(|e| failed("Reading commit", e))?;
    let recorded = match &params.request_from {
        None => LayeringRequest::default(),
        Some(from) => {
            let csum = repo::resolve(&repo, from)
                .map_err(|e| failed("Resolving requestFrom", e))?
                .ok_or_else(|| not_found(from))?;
            let meta = repo::commit_meta(&repo, &csum).map_err(|e| failed("Reading commit", e))?;
            repo::layering_of(&meta)
                .map_err(|e| failed("Reading the recorded request", e))?
                .unwrap_or_default()
        }
    };

    // The local packages to replace with: each read once into a copy of the service's own,
    // and that copy checked (an RPM, signed with a configured key, readable).
    let mut sources: Vec<(String, Arc<File>)> = Vec::new();
    for f in &params.override_replace {
        check(cancel)?;
        sources.push((f.clone(), Arc::new(open_local_package(f, &ctx.builds)?)));
    }
    sources.extend(
        params
            .override_replace_files
            .iter()
            .map(|f| (f.name.clone(), f.file.clone())),
    );
    let mut replacing: Vec<(tempfile::NamedTempFile, Package)> = Vec::new();
    for (i, (label, file)) in sources.iter().enumerate() {
        check(cancel)?;
        report(progress(
            BuildPhase::Verifying,
            None,
            i as u64,
            sources.len() as u64,
            format!("Checking {label}"),
        ));
        let copy = stage(&ctx.overrides, file, label, cancel)?;
        plain_rpm(copy.path(), label)?;
        rpm.check_signature(&ctx.keyring, copy.path(), label, cancel)?;
        let package = rpm.read_file(copy.path(), label, cancel)?;
        replacing.push((copy, package));
    }
    drop(sources);
    let changes = Changes {
        install: params.install.clone(),
        uninstall: params.uninstall.clone(),
        override_remove: params.override_remove.clone(),
        override_replace: replacing.iter().map(|(_, p)| p.clone()).collect(),
        override_reset: params.override_reset.clone(),
    };
    let mut request = request::merge(&recorded, &changes)?;
    let configured = repos::configured(&ctx.repos_dir)
        .map_err(|e| failed("Reading the repository configuration", e))?;
    if let Some(wanted) = &params.repositories {
        let unknown = repos::unknown(&configured, wanted);
        if !unknown.is_empty() {
            return Err(LayererError::UnknownRepository {
                repositories: unknown,
            });
        }
    }
    if request::is_empty(&request) {
        report(progress(
            BuildPhase::Committing,
            None,
            0,
            0,
            format!(
                "Nothing is layered: the result is the image commit {}",
                short(&base)
            ),
        ));
        return Ok(BuildResult {
            commit: base.clone(),
            base_commit: base,
            request: LayeringRequest::default(),
            changes: PackageChanges {
                upgraded: vec![],
                downgraded: vec![],
                added: vec![],
                removed: vec![],
            },
        });
    }

    // The files of every replacement the request holds: given now, or kept from before.
    let mut replacement_files: Vec<PathBuf> = Vec::new();
    for p in &request.override_replace {
        if let Some((copy, _)) = replacing.iter().find(|(_, r)| r == p) {
            replacement_files.push(copy.path().to_path_buf());
            continue;
        }
        let kept = ctx.overrides.join(kept_file_name(p));
        if !kept.is_file() {
            return Err(LayererError::PackageNotFound {
                packages: vec![kept_file_name(p)],
                message: format!(
                    "The package replacing {} is no longer kept in {}",
                    p.name,
                    ctx.overrides.display()
                ),
            });
        }
        rpm.check_signature(&ctx.keyring, &kept, &kept_file_name(p), cancel)?;
        replacement_files.push(kept);
    }

    check(cancel)?;
    report(progress(
        BuildPhase::Preparing,
        None,
        0,
        0,
        format!("Checking out {}", short(&base)),
    ));
    let mut ws = Workspace::create(&ctx.builds, &ctx.repo.join("tmp"))
        .map_err(|e| failed("Creating the build directory", e))?;
    repo::checkout_hardlinked(&repo, &base, ws.lower(), cancel.cancellable())
        .map_err(|e| failed_or_cancelled(cancel, "Checking out the image commit", e))?;
    check(cancel)?;
    ws.mount().map_err(|e| failed("Preparing the overlay", e))?;
    let merged = ws.merged();
    let dbpath = rpmdb::find(&merged).ok_or_else(|| LayererError::NoPackageDatabase {
        commit: base.clone(),
    })?;
    rpmdb::write_macros(&ws.home(), dbpath).map_err(|e| failed("Preparing rpm", e))?;
    // Packages own /etc paths; the commit keeps them in /usr/etc, as the image does.
    let etc = merged.join("etc");
    let etc_link = std::fs::symlink_metadata(&etc).is_err() && merged.join("usr/etc").is_dir();
    if etc_link {
        symlink("usr/etc", &etc).map_err(|e| failed("Linking /etc to /usr/etc", e))?;
    }
    let base_packages = rpm.installed(&merged, dbpath, cancel)?;

    if !request.override_remove.is_empty() {
        let missing = rpm.missing(&merged, dbpath, &request.override_remove, cancel)?;
        if !missing.is_empty() {
            return Err(LayererError::PackageNotFound {
                message: format!("The image has no package {} to remove", missing.join(", ")),
                packages: missing,
            });
        }
        report(progress(
            BuildPhase::Installing,
            None,
            0,
            request.override_remove.len() as u64,
            format!("Removing {}", request.override_remove.join(", ")),
        ));
        let args = rpm.erase_args(&merged, dbpath, &request.override_remove);
        ctx.sandboxed_rpm(&ws, args, cancel, &mut |_| {})?;
    }

    if !request.override_replace.is_empty() {
        let names: Vec<String> = request
            .override_replace
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let missing = rpm.missing(&merged, dbpath, &names, cancel)?;
        if !missing.is_empty() {
            return Err(LayererError::PackageNotFound {
                message: format!("The image has no package {} to replace", missing.join(", ")),
                packages: missing,
            });
        }
        // Into the build directory: the sandbox reads nothing else.
        let dir = ws.packages().join("replace");
        std::fs::create_dir_all(&dir).map_err(|e| failed("Preparing the replacements", e))?;
        let mut copies = Vec::new();
        for (p, f) in request.override_replace.iter().zip(&replacement_files) {
            let copy = dir.join(kept_file_name(p));
            std::fs::copy(f, &copy).map_err(|e| failed(&format!("Copying {}", f.display()), e))?;
            copies.push(copy);
        }
        report(progress(
            BuildPhase::Installing,
            None,
            0,
            copies.len() as u64,
            format!("Replacing {}", names.join(", ")),
        ));
        let files: Vec<&Path> = copies.iter().map(PathBuf::as_path).collect();
        ctx.check_space(&ws, dbpath, &files, cancel)?;
        let args = rpm.upgrade_args(&merged, dbpath, &files, true);
        ctx.sandboxed_rpm(&ws, args, cancel, &mut |_| {})?;
    }

    let active = rpm.missing(&merged, dbpath, &request.packages, cancel)?;
    request.inactive = request
        .packages
        .iter()
        .filter(|p| !active.contains(p))
        .cloned()
        .collect();
    if !active.is_empty() {
        install(ctx, &ws, dbpath, &active, params, report, cancel)?;
    }
    let final_packages = rpm.installed(&merged, dbpath, cancel)?;

    check(cancel)?;
    report(progress(
        BuildPhase::Committing,
        None,
        0,
        0,
        "Cleaning the package database".into(),
    ));
    rpmdb::clean(&merged.join(dbpath), Some(&ws.lower().join(dbpath)))
        .map_err(|e| failed("Cleaning the rpm database", e))?;
    if etc_link {
        std::fs::remove_file(&etc).map_err(|e| failed("Removing the /etc link", e))?;
    }
    if merged.join("etc").exists() && merged.join("usr/etc").exists() {
        return Err(failed(
            "Checking the tree",
            "It has both /etc and /usr/etc: something replaced the /etc link",
        ));
    }
    remove_transient(&merged, ws.lower()).map_err(|e| failed("Removing temporary files", e))?;
    let kernel = kernel_of(&merged);
    if kernel.is_none() {
        tracing::warn!("The layered tree has no kernel in /usr/lib/modules: it will not boot");
    }
    ws.unmount()
        .map_err(|e| failed("Unmounting the overlay", e))?;
    let var = var_content(&ws.upper());
    if !var.is_empty() {
        tracing::warn!(
            "Packages put files under /var, which deployments do not see (they keep the \
             stateroot's /var); such packages must create them at boot (tmpfiles.d): {var:?}"
        );
    }
    check(cancel)?;
    report(progress(
        BuildPhase::Committing,
        None,
        0,
        0,
        format!("Committing on {}", short(&base)),
    ));
    let metadata = repo::layered_metadata(&base_meta, &request, kernel.as_deref())
        .map_err(|e| failed("Writing the commit metadata", e))?;
    let mut what: Vec<String> = request.packages.clone();
    what.extend(request.override_remove.iter().map(|n| format!("-{n}")));
    what.extend(
        request
            .override_replace
            .iter()
            .map(|p| format!("{}={}", p.name, p.version)),
    );
    let subject = format!("Layered on {}: {}", short(&base), what.join(" "));
    let commit = repo::commit_upper(
        &repo,
        &base,
        &ws.upper(),
        &subject,
        &metadata,
        cancel.cancellable(),
    )
    .map_err(|e| failed_or_cancelled(cancel, "Committing", e))?;

    // Keep the new replacement packages (the copies checked and installed) for later builds
    // (an upgrade re-applies them).
    for (copy, p) in replacing {
        let kept = ctx.overrides.join(kept_file_name(&p));
        copy.persist(&kept)
            .map_err(|e| failed(&format!("Keeping {}", kept.display()), e.error))?;
    }
    drop(ws);
    Ok(BuildResult {
        commit,
        base_commit: base,
        request,
        changes: diff(&base_packages, &final_packages),
    })
}

/// Resolves and downloads the `active` packages with dnf, checks them and installs them.
fn install(
    ctx: &Context,
    ws: &Workspace,
    dbpath: &str,
    active: &[String],
    params: &Params,
    report: Report<'_>,
    cancel: &Cancel,
) -> Result<(), LayererError> {
    let merged = ws.merged();
    check(cancel)?;
    report(progress(
        BuildPhase::Resolving,
        None,
        0,
        0,
        format!("Resolving {}", active.join(" ")),
    ));
    let resolve_root = ws.resolve_root();
    rpmdb::copy(&merged.join(dbpath), &resolve_root.join(dbpath))
        .map_err(|e| failed("Copying the rpm database for dnf", e))?;
    let config = ws.dir().join("dnf.conf");
    std::fs::write(
        &config,
        "[main]\ngpgcheck=0\nrepo_gpgcheck=0\nkeepcache=0\nskip_if_unavailable=0\n",
    )
    .map_err(|e| failed("Writing the dnf configuration", e))?;
    let releasever = version_id(&merged);
    let packages_dir = ws.packages();
    let download = Download {
        installroot: &resolve_root,
        config: &config,
        reposdir: &ctx.repos_dir,
        releasever: releasever.as_deref(),
        repositories: params.repositories.as_deref(),
        destdir: &packages_dir,
        packages: active,
        home: &ws.home(),
    };
    let (mut total, mut done, mut bytes) = (0u64, 0u64, 0u64);
    ctx.tools
        .dnf
        .download(&download, cancel, &mut |event| match event {
            dnf::Event::Total(n) => {
                total = n;
                report(progress(
                    BuildPhase::Downloading,
                    None,
                    done,
                    total,
                    format!("Downloading {total} packages"),
                ));
            }
            dnf::Event::Downloaded(file) => {
                done += 1;
                bytes += std::fs::metadata(packages_dir.join(&file))
                    .map(|m| m.len())
                    .unwrap_or(0);
                let mut p = progress(
                    BuildPhase::Downloading,
                    Some(file.trim_end_matches(".rpm").to_string()),
                    done,
                    total.max(done),
                    format!("Downloaded {file}"),
                );
                p.bytes_done = Some(bytes);
                report(p);
            }
        })?;
    let files = rpm_files(&packages_dir)?;
    if files.is_empty() {
        tracing::info!("dnf found nothing to download for {active:?}");
        return Ok(());
    }
    let n = files.len() as u64;
    check(cancel)?;
    report(progress(
        BuildPhase::Verifying,
        None,
        0,
        n,
        format!("Checking the signatures of {n} packages"),
    ));
    let labelled: Vec<(&Path, String)> =
        files.iter().map(|f| (f.as_path(), file_label(f))).collect();
    ctx.tools
        .rpm
        .check_signatures(&ctx.keyring, &labelled, cancel)?;
    report(progress(
        BuildPhase::Verifying,
        None,
        n,
        n,
        format!("{n} packages are signed with configured keys"),
    ));
    report(progress(
        BuildPhase::Installing,
        None,
        0,
        n,
        format!("Installing {n} packages"),
    ));
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    ctx.check_space(ws, dbpath, &refs, cancel)?;
    let args = ctx.tools.rpm.upgrade_args(&merged, dbpath, &refs, false);
    let mut installed = 0u64;
    let mut in_install_section = false;
    ctx.sandboxed_rpm(ws, args, cancel, &mut |line| {
        if line.starts_with("Updating / installing") {
            in_install_section = true;
            return;
        }
        if line.starts_with("Cleaning up / removing") {
            in_install_section = false;
            return;
        }
        if in_install_section && let Some(p) = rpm::installed_line(line) {
            installed += 1;
            report(progress(
                BuildPhase::Installing,
                Some(p.clone()),
                installed,
                n,
                format!("Installed {p}"),
            ));
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod local_package_tests {
    use super::*;

    #[test]
    fn refuses_paths_outside_what_a_package_may_be() {
        let dir = tempfile::tempdir().unwrap();
        let builds = dir.path().join("builds");
        std::fs::create_dir_all(&builds).unwrap();
        let ok = dir.path().join("k.rpm");
        std::fs::write(&ok, b"x").unwrap();
        let inside = builds.join("b.rpm");
        std::fs::write(&inside, b"x").unwrap();
        let not_rpm = dir.path().join("passwd");
        std::fs::write(&not_rpm, b"x").unwrap();
        let link = dir.path().join("link.rpm");
        std::os::unix::fs::symlink(&not_rpm, &link).unwrap();
        let folder = dir.path().join("dir.rpm");
        std::fs::create_dir(&folder).unwrap();
        let s = |p: &std::path::Path| p.display().to_string();
        let cases: Vec<(String, &str)> = vec![
            (s(&ok), "ok"),
            ("k.rpm".into(), "InvalidRequest"),
            (s(&inside), "InvalidRequest"),
            (s(&not_rpm), "InvalidRequest"),
            (s(&link), "InvalidRequest"),
            (s(&folder), "InvalidRequest"),
            ("/proc/self/environ".into(), "InvalidRequest"),
            (s(&dir.path().join("missing.rpm")), "PackageNotFound"),
        ];
        for (given, want) in cases {
            let got = match local_package(&given, &builds) {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("{e:?}"),
            };
            assert!(got.starts_with(want), "{given}: {got}");
        }
    }
}

#[cfg(test)]
mod passed_file_tests {
    use super::*;

    fn local(fd: u32, name: &str) -> LocalPackage {
        LocalPackage {
            fd,
            name: name.into(),
        }
    }

    #[test]
    fn pairs_descriptors_with_their_entries() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| -> OwnedFd {
            let path = dir.path().join(name);
            std::fs::write(&path, name).unwrap();
            File::open(path).unwrap().into()
        };
        let pipe = || -> OwnedFd { std::os::unix::net::UnixStream::pair().unwrap().0.into() };
        let folder = || -> OwnedFd { File::open(dir.path()).unwrap().into() };

        let got = passed_files(
            vec![local(1, "b.rpm"), local(0, "a.rpm")],
            vec![file("a"), file("b"), file("unnamed")],
        )
        .unwrap();
        let read = |f: &LocalFile| {
            let mut buf = [0u8; 1];
            f.file.read_at(&mut buf, 0).unwrap();
            buf[0]
        };
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].name.as_str(), read(&got[0])), ("b.rpm", b'b'));
        assert_eq!((got[1].name.as_str(), read(&got[1])), ("a.rpm", b'a'));
        assert!(passed_files(vec![], vec![file("c")]).unwrap().is_empty());

        let cases: Vec<(Vec<LocalPackage>, Vec<OwnedFd>, &str)> = vec![
            (vec![local(0, "x")], vec![], "no file descriptor 0"),
            (vec![local(2, "x")], vec![file("a"), file("b")], "(2 were)"),
            (
                vec![local(0, "x"), local(0, "y")],
                vec![file("a")],
                "named twice",
            ),
            (vec![local(0, "x")], vec![pipe()], "not a regular file"),
            (vec![local(0, "x")], vec![folder()], "not a regular file"),
        ];
        for (files, fds, want) in cases {
            let name = files.last().map(|f| f.name.clone()).unwrap_or_default();
            match passed_files(files, fds) {
                Err(LayererError::InvalidRequest { packages, message }) => {
                    assert!(message.contains(want), "{message}");
                    assert_eq!(packages, [name]);
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn stages_a_copy_from_the_start_and_knows_an_rpm_by_its_lead() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("p.rpm");
        let mut lead = vec![0u8; RPM_LEAD];
        lead[..4].copy_from_slice(&RPM_MAGIC);
        let content: Vec<u8> = lead
            .iter()
            .copied()
            .chain(std::iter::repeat_n(7u8, 3 << 19))
            .collect();
        std::fs::write(&source, &content).unwrap();
        let mut file = File::open(&source).unwrap();
        // The caller's offset does not matter: the copy starts at the file's start.
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(100)).unwrap();
        let copy = stage(dir.path(), &file, "p.rpm", &Cancel::new()).unwrap();
        assert_eq!(std::fs::read(copy.path()).unwrap(), content);
        assert!(
            copy.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".incoming-")
        );
        plain_rpm(copy.path(), "p.rpm").unwrap();

        // A descriptor open for writing only cannot be read.
        let write_only = std::fs::OpenOptions::new()
            .write(true)
            .open(&source)
            .unwrap();
        assert!(matches!(
            stage(dir.path(), &write_only, "w.rpm", &Cancel::new()),
            Err(LayererError::CorruptPackage { .. })
        ));

        let mut source_rpm = lead.clone();
        source_rpm[7] = 1;
        for (bytes, want) in [
            (
                b"root:x:0:0:root:/root:/bin/sh\n".repeat(10),
                "not an RPM package",
            ),
            (RPM_MAGIC.to_vec(), "too short"),
            (source_rpm, "a source package"),
        ] {
            let f = dir.path().join("bad.rpm");
            std::fs::write(&f, &bytes).unwrap();
            match plain_rpm(&f, "bad.rpm") {
                Err(LayererError::InvalidRequest { message, .. }) => {
                    assert!(message.contains(want), "{message}")
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_facts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        assert_eq!(kernel_of(root), None);
        for k in ["6.1.0-1", "6.10.0-1", "6.2.0-1"] {
            std::fs::create_dir_all(root.join("usr/lib/modules").join(k)).expect("mkdir");
            std::fs::write(root.join("usr/lib/modules").join(k).join("vmlinuz"), "").expect("w");
        }
        std::fs::create_dir_all(root.join("usr/lib/modules/7.0-nokernel")).expect("mkdir");
        assert_eq!(kernel_of(root).as_deref(), Some("6.10.0-1"));
        std::fs::write(
            root.join("usr/lib/os-release"),
            "NAME=x\nVERSION_ID=\"41\"\n",
        )
        .expect("write");
        assert_eq!(version_id(root).as_deref(), Some("41"));
        assert_eq!(
            kept_file_name(&Package {
                name: "k".into(),
                version: "1:6.2-1".into(),
                architecture: "x86_64".into()
            }),
            "k-1:6.2-1.x86_64.rpm"
        );
    }

    #[test]
    fn transient_files_go_and_var_content_is_found() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (merged, lower) = (tmp.path().join("m"), tmp.path().join("l"));
        for d in [
            "m/tmp/sub",
            "m/var/tmp",
            "m/var/cache/dnf",
            "m/var/log",
            "l/tmp",
            "l/var",
        ] {
            std::fs::create_dir_all(tmp.path().join(d)).expect("mkdir");
        }
        for f in [
            "m/tmp/a",
            "m/tmp/sub/b",
            "m/var/log/dnf.log",
            "m/var/log/app.log",
        ] {
            std::fs::write(tmp.path().join(f), "x").expect("write");
        }
        remove_transient(&merged, &lower).expect("cleans");
        assert!(merged.join("tmp").is_dir(), "the image's /tmp stays");
        assert_eq!(
            std::fs::read_dir(merged.join("tmp")).expect("ls").count(),
            0
        );
        assert!(
            !merged.join("var/tmp").exists(),
            "the image had no /var/tmp"
        );
        assert!(!merged.join("var/cache/dnf").exists());
        assert!(!merged.join("var/log/dnf.log").exists());
        assert_eq!(var_content(&merged), ["/var/log/app.log"]);
    }
}
