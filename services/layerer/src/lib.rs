//! The layerer service (`org.dnfimage.Layerer`): builds ostree commits that layer RPM packages
//! and overrides on image commits, in a sandbox, recording the request in the commit so that an
//! upgrade can apply it again; and reads the package databases of commits.
//!
//! The request goes into the new commit's metadata under
//! [`dnfimage_interfaces::deployer::LAYERING_METADATA_KEY`] (`dnfimage.layering`): a string,
//! the [`LayeringRequest`] as JSON in its wire form (camelCase). `packages` lists every requested
//! package, `inactive` the requested ones the image already had.
//!
//! Paths: the repository is `<sysroot>/ostree/repo`; the state directory holds
//! `layerer/overrides` (the kept local packages of `overrideReplace`), `layerer/keyring` (an rpm
//! keyring made at start from the key directory) and `layerer/tmp`. Builds happen beside the
//! repository, on its filesystem and mount (hardlinks and the commit's links need both): the
//! hardlinked checkout in `<repo>/tmp/`, the overlay's directories in
//! `<repo>/tmp/dnfimage-builds/` (one per running build, removed when it ends).

pub mod build;
pub mod dnf;
pub mod overlay;
pub mod packages;
pub mod process;
pub mod repo;
pub mod repos;
pub mod request;
pub mod rpm;
pub mod rpmdb;
pub mod sandbox;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context as _, Result};
use dnfimage_interfaces::layerer::{
    BuildPhase, BuildProgress, BuildReply, BuildResult, CancelReply, IDL, LayererError,
    LayeringRequest, ListPackagesReply, LocalPackage, Package, PackageChange, PackageChanges,
};
use dnfimage_runtime::{
    Activation, Activity, InstanceLock, JobSlot, Policy, ServiceArgs, refused, spawn_streamed,
};
use futures_util::Stream;
use zlink::Reply;

use crate::process::Cancel;

/// Methods that change state: only root may call them.
pub const PRIVILEGED: &[&str] = &["Build", "Cancel"];

/// How many commits' package lists `ListPackages` and `PackageDiff` remember (commits never
/// change).
const REMEMBERED_LISTS: usize = 16;

/// Command line of `dnfimage-layerer`.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about = "The dnfimage layerer service (org.dnfimage.Layerer)")]
pub struct Args {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The sysroot whose repository (`<sysroot>/ostree/repo`) holds the commits.
    #[arg(long, env = "DNFIMAGE_SYSROOT", default_value = "/")]
    pub sysroot: PathBuf,
    /// State directory; the layerer uses its `layerer/` subdirectory.
    #[arg(long, env = "DNFIMAGE_STATE_DIR", default_value = "/var/lib/dnfimage")]
    pub state_dir: PathBuf,
    /// Directory of the `.repo` files (dnf's format) naming the repositories packages come
    /// from.
    #[arg(long, env = "DNFIMAGE_REPOS_DIR", default_value = "/etc/yum.repos.d")]
    pub repos_dir: PathBuf,
    /// Directory of the public keys (ASCII-armoured, one a file) packages must be signed with.
    #[arg(long, env = "DNFIMAGE_GPG_KEY_DIR", default_value = "/etc/pki/rpm-gpg")]
    pub gpg_key_dir: PathBuf,
}

static MOUNT_NAMESPACE: OnceLock<Result<(), String>> = OnceLock::new();

/// Gives the process its own mount namespace when it runs as root (see
/// [`overlay::private_mount_namespace`]); call first in `main`, before any thread exists.
pub fn isolate_mounts() {
    let outcome = if rustix::process::geteuid().is_root() {
        overlay::private_mount_namespace().map_err(|e| format!("{e:#}"))
    } else {
        Err("not running as root".to_string())
    };
    let _ = MOUNT_NAMESPACE.set(outcome);
}

/// The service's error for anything unexpected.
pub(crate) fn failed(context: &str, e: impl std::fmt::Display) -> LayererError {
    LayererError::Failed {
        message: format!("{context}: {e:#}"),
    }
}

/// The first 12 characters of `s` (whole characters, whatever the text).
fn short(s: &str) -> &str {
    s.char_indices().nth(12).map_or(s, |(i, _)| &s[..i])
}

/// Refuses a commit a caller names by anything but its checksum (64 hexadecimal digits, as
/// the deployer reports commits): the repository has no such commit, and nothing else is
/// looked up, sliced or handed to libostree.
fn commit_id(commit: &str) -> Result<(), LayererError> {
    if repo::is_checksum(commit) {
        Ok(())
    } else {
        Err(LayererError::CommitNotFound {
            commit: commit.to_string(),
        })
    }
}

/// Runs the service until idle or stopped.
pub async fn run(args: Args, activation: Option<Activation>) -> Result<()> {
    match MOUNT_NAMESPACE.get() {
        Some(Ok(())) => tracing::debug!("Running in a private mount namespace"),
        Some(Err(e)) => tracing::warn!("Overlays mounted by builds are visible to the host: {e}"),
        None => {}
    }
    let state = args.state_dir.join("layerer");
    let repo = args.sysroot.join("ostree/repo");
    // Build directories live beside the repository, not under the state directory: the commit
    // links files from the overlay's upper layer into the repository, and on a booted host
    // /var is another mount than /sysroot (link() across mounts fails with EXDEV).
    let (builds, tmp) = (repo.join("tmp/dnfimage-builds"), state.join("tmp"));
    for dir in [&tmp, &state.join("overrides")] {
        dnfimage_runtime::ensure_dir(dir)?;
    }
    if !repo.join("config").exists() {
        tracing::warn!("{} is not an ostree repository (yet)", repo.display());
    }
    let tools = build::Tools {
        rpm: rpm::Rpm::detect(),
        dnf: dnf::Dnf::detect(),
        sandbox: sandbox::Sandbox::detect(),
    };
    tracing::info!(
        "Tools: rpm {:?}, dnf {:?} ({:?}), bwrap {:?}, sqlite3 {:?}",
        tools.rpm.version,
        tools.dnf.version,
        tools.dnf.flavor,
        tools.sandbox.version,
        rpmdb::sqlite_version()
    );
    let keyring = state.join("keyring");
    let keys = key_files(&args.gpg_key_dir)?;
    let key_refs: Vec<&Path> = keys.iter().map(PathBuf::as_path).collect();
    let imported = tools
        .rpm
        .make_keyring(&keyring, &key_refs)
        .context("Making the rpm keyring")?;
    if imported == 0 {
        tracing::warn!(
            "No key in {}: every package will be rejected as signed with an unknown key",
            args.gpg_key_dir.display()
        );
    } else {
        tracing::info!(
            "Packages must be signed with one of {imported} keys from {}",
            args.gpg_key_dir.display()
        );
    }
    // One layerer per repository: another one's build directories are not stale.
    let _lock = InstanceLock::acquire(
        &repo.join("tmp/dnfimage-builds.lock"),
        &format!("The build directory {}", builds.display()),
    )?;
    let incoming = remove_incoming(&state.join("overrides"));
    if incoming > 0 {
        tracing::info!("Removed {incoming} package copies an interrupted build left");
    }
    let stale = overlay::remove_stale(&builds, &repo.join("tmp"));
    if stale > 0 {
        tracing::info!("Removed {stale} build directories an earlier run left");
    }
    let activity = Activity::new();
    let jobs = JobSlot::new(activity.clone());
    let layerer = Layerer {
        shared: Arc::new(Shared {
            ctx: build::Context {
                overrides: state.join("overrides"),
                repo,
                builds,
                keyring,
                repos_dir: args.repos_dir.clone(),
                tools,
            },
            tmp,
            jobs: jobs.clone(),
            lists: Mutex::new(VecDeque::new()),
        }),
    };
    let policy = Policy::new(IDL, PRIVILEGED)?;
    dnfimage_runtime::serve(
        |_| layerer.clone(),
        policy,
        &args.service,
        activation,
        activity,
        &jobs,
    )
    .await
}

/// Removes the copies of callers' packages (`.incoming-*`) a build that was killed left in the
/// overrides directory; returns how many.
fn remove_incoming(overrides: &Path) -> usize {
    std::fs::read_dir(overrides)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".incoming-"))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// The regular files of the key directory, sorted; none when it is missing.
fn key_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("Listing {}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The service state.
#[derive(Debug, Clone)]
pub struct Layerer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    ctx: build::Context,
    tmp: PathBuf,
    jobs: JobSlot,
    lists: Mutex<VecDeque<(String, Vec<Package>)>>,
}

impl Layerer {
    /// The packages of commit `commit`: its rpm database alone copied out of the repository
    /// and queried. Blocking.
    fn packages_of(&self, commit: &str) -> Result<Vec<Package>, LayererError> {
        commit_id(commit)?;
        let ctx = &self.shared.ctx;
        let repo = repo::open(&ctx.repo).map_err(|e| failed("Opening the repository", e))?;
        let csum = repo::resolve(&repo, commit)
            .map_err(|e| failed("Resolving the commit", e))?
            .ok_or_else(|| LayererError::CommitNotFound {
                commit: commit.to_string(),
            })?;
        let remembered = |lists: &VecDeque<(String, Vec<Package>)>| {
            lists
                .iter()
                .find(|(c, _)| *c == csum)
                .map(|(_, p)| p.clone())
        };
        if let Some(p) = remembered(&self.lock_lists()) {
            return Ok(p);
        }
        let dbpath = repo::rpmdb_of(&repo, &csum)
            .map_err(|e| failed("Reading the commit", e))?
            .ok_or_else(|| LayererError::NoPackageDatabase {
                commit: commit.to_string(),
            })?;
        let tmp = tempfile::tempdir_in(&self.shared.tmp)
            .map_err(|e| failed("Creating a temporary directory", e))?;
        let db = tmp.path().join("rpmdb");
        repo::checkout_copy(&repo, &csum, dbpath, &db)
            .map_err(|e| failed("Copying the rpm database out", e))?;
        let packages = ctx.tools.rpm.installed_in(&db, &Cancel::new())?;
        let mut lists = self.lock_lists();
        lists.push_front((csum, packages.clone()));
        lists.truncate(REMEMBERED_LISTS);
        Ok(packages)
    }

    fn lock_lists(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, Vec<Package>)>> {
        // The list stays consistent whatever panicked while holding it.
        self.shared.lists.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn packages_blocking(&self, commit: String) -> Result<Vec<Package>, LayererError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.packages_of(&commit))
            .await
            .map_err(|e| failed("Reading the package database", e))?
    }
}

/// Layers RPM packages and overrides on image commits, in a sandbox, so that they survive
/// image upgrades, and reads the package databases of commits.
#[zlink::service(
    interface = "org.dnfimage.Layerer",
    types = [
        Package, LocalPackage, PackageChange, PackageChanges, LayeringRequest, BuildPhase,
        BuildProgress, BuildResult,
    ],
    vendor = "dnfimage",
    product = "dnfimage-layerer",
    version = env!("CARGO_PKG_VERSION"),
    url = "https://example.invalid/dnfimage"
)]
impl Layerer {
    /// Builds a commit whose parent is the image commit `baseCommit` (a commit Build made
    /// stands for the image commit under it) and that holds a layering request: the one
    /// recorded in commit `requestFrom` (default: an empty one; pass the booted deployment's
    /// commit to change what is layered on it, or to carry it over to a new image), with
    /// `install` packages added, requested `uninstall` packages dropped, `overrideRemove`
    /// image packages removed, image packages replaced by the local RPM files
    /// `overrideReplaceFiles` (passed as file descriptors, each read once: the copy read is
    /// the one checked, installed and kept for later builds) and `overrideReplace` (paths
    /// the layerer opens itself, for root callers that have no way to pass descriptors),
    /// and the overrides of the `overrideReset` packages dropped; each of these defaults to
    /// none. Packages come from
    /// the configured repositories with the ids `repositories` (default: every enabled one)
    /// and must be signed with a configured key. dnf resolves against the image's own
    /// package database; requested packages the image already has stay in the request as
    /// inactive; rpm installs in a sandbox without network, and a failing scriptlet fails
    /// the build. When the request ends up empty nothing is built and the result's commit is
    /// the image commit. Streams progress records, then one record with the result; nothing
    /// is committed on failure.
    #[zlink(more)]
    #[allow(clippy::too_many_arguments)]
    async fn build(
        &self,
        more: bool,
        #[zlink(rename = "baseCommit")] base_commit: String,
        #[zlink(rename = "requestFrom")] request_from: Option<String>,
        install: Option<Vec<String>>,
        uninstall: Option<Vec<String>>,
        #[zlink(rename = "overrideRemove")] override_remove: Option<Vec<String>>,
        #[zlink(rename = "overrideReplace")] override_replace: Option<Vec<String>>,
        #[zlink(rename = "overrideReplaceFiles")] override_replace_files: Option<Vec<LocalPackage>>,
        #[zlink(rename = "overrideReset")] override_reset: Option<Vec<String>>,
        repositories: Option<Vec<String>>,
        #[zlink(fds)] fds: Vec<std::os::fd::OwnedFd>,
    ) -> impl Stream<Item = Result<Reply<BuildReply>, LayererError>> + Unpin + use<> {
        let files = match build::passed_files(override_replace_files.unwrap_or_default(), fds) {
            Ok(files) => files,
            Err(e) => return refused(e),
        };
        let params = build::Params {
            base_commit,
            request_from,
            install: install.unwrap_or_default(),
            uninstall: uninstall.unwrap_or_default(),
            override_remove: override_remove.unwrap_or_default(),
            override_replace: override_replace.unwrap_or_default(),
            override_replace_files: files,
            override_reset: override_reset.unwrap_or_default(),
            repositories,
        };
        let checked = commit_id(&params.base_commit)
            .and_then(|()| params.request_from.as_deref().map_or(Ok(()), commit_id));
        if let Err(e) = checked {
            return refused(e);
        }
        let what = describe(&params);
        let shared = self.shared.clone();
        spawn_streamed(
            &self.shared.jobs,
            what.clone(),
            more,
            |running| LayererError::AlreadyInProgress { operation: running },
            move |cancellation, progress| async move {
                let cancel = Cancel::new();
                let timings = Arc::new(Timings::default());
                let reporter = {
                    let timings = timings.clone();
                    move |p: BuildProgress| {
                        timings.enter(Some(p.phase));
                        if progress.wanted() {
                            tracing::debug!("{:?}: {}", p.phase, p.message);
                        }
                        progress.send(BuildReply {
                            progress: Some(p),
                            result: None,
                        });
                    }
                };
                let worker_cancel = cancel.clone();
                let worker = tokio::task::spawn_blocking(move || {
                    build::run(&shared.ctx, &params, &reporter, &worker_cancel)
                });
                tokio::pin!(worker);
                let mut asked = false;
                let joined = loop {
                    tokio::select! {
                        r = &mut worker => break r,
                        () = cancellation.cancelled(), if !asked => {
                            asked = true;
                            tracing::info!("Cancelling: {what}");
                            cancel.cancel();
                        }
                    }
                };
                let result = match joined {
                    Ok(r) => r,
                    Err(e) => Err(failed("Running the build", e)),
                };
                let result = match result {
                    Err(_) if cancel.is_cancelled() => Err(LayererError::Cancelled {
                        operation: what.clone(),
                    }),
                    r => r,
                };
                if let Ok(r) = &result {
                    tracing::info!(
                        "Built {} on {}: {} added, {} removed, {} upgraded, {} downgraded ({})",
                        r.commit,
                        r.base_commit,
                        r.changes.added.len(),
                        r.changes.removed.len(),
                        r.changes.upgraded.len(),
                        r.changes.downgraded.len(),
                        timings.summary()
                    );
                }
                result.map(|r| BuildReply {
                    progress: None,
                    result: Some(r),
                })
            },
        )
    }

    /// Cancels the running build; nothing is committed.
    async fn cancel(&self) -> Result<CancelReply, LayererError> {
        Ok(CancelReply {
            cancelled: self.shared.jobs.cancel(),
        })
    }

    /// Lists the packages in the rpm database of `commit`, without checking the commit out.
    async fn list_packages(&self, commit: String) -> Result<ListPackagesReply, LayererError> {
        Ok(ListPackagesReply {
            packages: self.packages_blocking(commit).await?,
        })
    }

    /// Compares the rpm databases of `fromCommit` and `toCommit` (e.g. the booted commit and
    /// a downloaded one), without checking the commits out.
    async fn package_diff(
        &self,
        #[zlink(rename = "fromCommit")] from_commit: String,
        #[zlink(rename = "toCommit")] to_commit: String,
    ) -> Result<PackageChanges, LayererError> {
        let from = self.packages_blocking(from_commit).await?;
        let to = self.packages_blocking(to_commit).await?;
        Ok(packages::diff(&from, &to))
    }
}

/// Time spent in each build phase, from the progress records.
#[derive(Debug, Default)]
struct Timings {
    state: Mutex<TimingState>,
}

#[derive(Debug, Default)]
struct TimingState {
    /// The phase being timed, since when.
    current: Option<(BuildPhase, std::time::Instant)>,
    /// Seconds spent in each phase so far, in the order first seen.
    spent: Vec<(BuildPhase, f64)>,
}

impl Timings {
    /// Starts timing `phase` (`None`: stops), adding the time since the last change to the
    /// phase before.
    fn enter(&self, phase: Option<BuildPhase>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if let Some((current, since)) = state.current {
            if Some(current) == phase {
                return;
            }
            let spent = now.duration_since(since).as_secs_f64();
            match state.spent.iter_mut().find(|(p, _)| *p == current) {
                Some((_, total)) => *total += spent,
                None => state.spent.push((current, spent)),
            }
        }
        state.current = phase.map(|p| (p, now));
    }

    /// "preparing 0.05 s, resolving 0.30 s, …", up to now.
    fn summary(&self) -> String {
        self.enter(None);
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .spent
            .iter()
            .map(|(p, s)| format!("{} {s:.2} s", format!("{p:?}").to_lowercase()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a build is, for `AlreadyInProgress`, `Cancelled` and the service status.
fn describe(p: &build::Params) -> String {
    let mut what: Vec<String> = Vec::new();
    if !p.install.is_empty() {
        what.push(format!("installing {}", p.install.join(" ")));
    }
    if !p.uninstall.is_empty() {
        what.push(format!("uninstalling {}", p.uninstall.join(" ")));
    }
    if !p.override_remove.is_empty() {
        what.push(format!("removing {}", p.override_remove.join(" ")));
    }
    let replacements: Vec<&str> = p
        .override_replace
        .iter()
        .map(String::as_str)
        .chain(p.override_replace_files.iter().map(|f| f.name.as_str()))
        .collect();
    if !replacements.is_empty() {
        what.push(format!("replacing with {}", replacements.join(" ")));
    }
    if !p.override_reset.is_empty() {
        what.push(format!("resetting {}", p.override_reset.join(" ")));
    }
    if what.is_empty() {
        what.push("rebuilding".to_string());
    }
    format!("Layering on {}: {}", short(&p.base_commit), what.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_named_by_checksum_only() {
        let hex = "0123456789abcdef".repeat(4);
        let cases: &[(&str, bool)] = &[
            (&hex, true),
            (&"f".repeat(64), true),
            ("", false),
            ("0123456789ab", false),
            (&hex[..63], false),
            (&format!("{hex}0"), false),
            (&hex.to_uppercase(), false),
            (&format!("{}g", &hex[..63]), false),
            ("dnfimage/layered", false),
            ("-v", false),
            // 64 bytes, not 64 ASCII characters; byte 12 is inside one (the slicing that
            // panicked).
            (&"é".repeat(32), false),
            (&format!("a{}b", "é".repeat(31)), false),
            (&format!("{}é", &hex[..62]), false),
            ("ééééééééééééé", false),
        ];
        for (commit, ok) in cases {
            assert_eq!(commit_id(commit).is_ok(), *ok, "{commit:?}");
            if !ok {
                assert_eq!(
                    commit_id(commit),
                    Err(LayererError::CommitNotFound {
                        commit: commit.to_string()
                    })
                );
            }
        }
    }

    #[test]
    fn describes_builds_on_any_text() {
        let hex = "0123456789abcdef".repeat(4);
        for (base, shown) in [
            (hex.as_str(), "0123456789ab"),
            ("ééééééééééééé", "éééééééééééé"),
            ("aéééééééééééééé", "aééééééééééé"),
            ("abc", "abc"),
            ("", ""),
        ] {
            let params = build::Params {
                base_commit: base.to_string(),
                install: vec!["x".into()],
                ..Default::default()
            };
            assert_eq!(
                describe(&params),
                format!("Layering on {shown}: installing x")
            );
        }
    }
}
