//! The ostree sysroot: reading its deployments and writing, ordering, pinning and removing them
//! with libostree.
//!
//! The ostree objects are glib objects and not `Send`: every function here opens its own
//! [`Loaded`] sysroot and runs to its end on one blocking thread; only plain data leaves it.
//! Mutations hold libostree's sysroot lock (which `ostree admin`, rpm-ostree and bootc take
//! too), write the new list of deployments in one `write_deployments` call (libostree swaps
//! the boot entries atomically) and never prune the repository: unused objects are the
//! importer's to free, and a prune here could delete the objects of an import in progress.

use std::path::{Path, PathBuf};

use dnfimage_interfaces::deployer::{
    ApplyLiveReply, CheckSpaceReply, CleanupPhase, CleanupResult, DeployPhase, DeployResult,
    DeployerError, Deployment, FilesystemSpace, ImageTrust, deployment_id,
};
use ostree_ext::glib;
use ostree_ext::ostree;
use ostree_ext::ostree::gio;
use ostree_ext::prelude::*;

use crate::commit::{self, TreeSummary};
use crate::kargs::{self, Edits};
use crate::live;
use crate::origin::{self, ImageRef};
use crate::plan::{self, Slot};

/// Exists when the running system was booted by ostree.
const OSTREE_BOOTED: &str = "/run/ostree-booted";
/// The running kernel's command line.
const PROC_CMDLINE: &str = "/proc/cmdline";
/// While it exists, ostree-finalize-staged.service leaves the staged deployment alone
/// (libostree 2022.7's mechanism behind `ostree admin deploy --lock-finalization`).
const STAGED_LOCKED: &str = "/run/ostree/staged-deployment-locked";
/// The stateroot of the first deployment onto an empty sysroot (ostree-ext's default).
pub const DEFAULT_STATEROOT: &str = ostree_ext::container::deploy::STATEROOT_DEFAULT;
/// Room kept on the sysroot filesystem besides the estimate (origin, `/var` bits, journal).
const ROOT_MARGIN: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// A progress callback: phase and a message for people.
pub type Progress<'a, P> = &'a dyn Fn(P, String);

/// An unexpected failure, with what was being done.
pub fn failed(context: &str, e: impl std::fmt::Display) -> DeployerError {
    DeployerError::Failed {
        message: format!("{context}: {e:#}"),
    }
}

/// `context` failing with a libostree error; a cancellation becomes `Cancelled`.
fn ostree_failed(context: &str, e: glib::Error, operation: &str) -> DeployerError {
    if e.matches(gio::IOErrorEnum::Cancelled) {
        DeployerError::Cancelled {
            operation: operation.to_string(),
        }
    } else {
        failed(context, e)
    }
}

/// How long a change waits for the sysroot lock another program holds; set once at start.
static LOCK_TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
/// How often a waiting change looks at the sysroot lock again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Sets how long changes wait for the sysroot lock (the service's `--lock-timeout`).
pub fn set_lock_timeout(timeout: std::time::Duration) {
    let _ = LOCK_TIMEOUT.set(timeout);
}

/// How a change waits for the sysroot lock while another program (`ostree admin`, rpm-ostree,
/// bootc) holds it: as `ostree admin` does, but cancellable and for a limited time.
pub struct LockWait<'a> {
    /// Stops the wait (`Cancel`, SIGTERM).
    pub cancellable: &'a gio::Cancellable,
    /// The change, for the `Cancelled` error.
    pub operation: &'a str,
    /// Called once, when the change starts waiting.
    pub waiting: &'a dyn Fn(String),
}

impl LockWait<'_> {
    fn take(&self, sysroot: &ostree::Sysroot) -> Result<(), DeployerError> {
        let timeout = LOCK_TIMEOUT
            .get()
            .copied()
            .unwrap_or(std::time::Duration::from_secs(300));
        let deadline = std::time::Instant::now() + timeout;
        let mut told = false;
        loop {
            match sysroot.try_lock() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(failed("Locking the sysroot", e)),
            }
            check_cancelled(self.cancellable, self.operation)?;
            if std::time::Instant::now() >= deadline {
                return Err(DeployerError::AlreadyInProgress {
                    operation: format!(
                        "Another program (ostree admin, rpm-ostree or bootc) has held the \
                         sysroot lock for over {} s",
                        timeout.as_secs()
                    ),
                });
            }
            if !told {
                told = true;
                let message = "Waiting for another program (ostree admin, rpm-ostree or bootc) \
                               to release the sysroot lock";
                tracing::info!("{}: {message}", self.operation);
                (self.waiting)(message.to_string());
            }
            std::thread::sleep(LOCK_POLL);
        }
    }
}

fn check_cancelled(cancellable: &gio::Cancellable, operation: &str) -> Result<(), DeployerError> {
    if cancellable.is_cancelled() {
        return Err(DeployerError::Cancelled {
            operation: operation.to_string(),
        });
    }
    Ok(())
}

/// The value of the `ostree=` argument of a kernel command line.
pub fn ostree_karg(cmdline: &str) -> Option<String> {
    kargs::split(cmdline).into_iter().find_map(|a| {
        a.strip_prefix("ostree=")
            .map(|v| v.trim_matches('"').to_string())
    })
}

/// Checks a stateroot name as `ostree admin os-init` would take it, and as a directory name.
pub fn check_stateroot(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("A stateroot name has 1 to 128 characters".into());
    }
    if name.starts_with(['.', '-']) {
        return Err("A stateroot name cannot start with '.' or '-'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(format!(
            "Character {c:?} is not allowed in a stateroot name"
        ));
    }
    Ok(())
}

/// The first 12 characters of a commit id (whole characters: the id may be a caller's text).
fn short(commit: &str) -> &str {
    commit
        .char_indices()
        .nth(12)
        .map_or(commit, |(i, _)| &commit[..i])
}

/// Free bytes and device of the filesystem holding `path`.
fn filesystem(path: &Path) -> Result<(u64, u64), DeployerError> {
    use std::os::unix::fs::MetadataExt;
    let context = || format!("Checking free space on {}", path.display());
    let st = rustix::fs::statvfs(path).map_err(|e| failed(&context(), e))?;
    let dev = std::fs::metadata(path)
        .map_err(|e| failed(&context(), e))?
        .dev();
    Ok((dev, st.f_bavail.saturating_mul(st.f_frsize)))
}

/// A sysroot loaded for one operation, locked when it is to be changed.
pub struct Loaded {
    path: PathBuf,
    sysroot: ostree::Sysroot,
    repo: ostree::Repo,
    deployments: Vec<ostree::Deployment>,
    /// The booted deployment, by the rules of the `Status` description.
    booted: Option<usize>,
    /// Whether libostree itself knows the booted deployment (then new deployments are staged).
    staging: bool,
    locked: bool,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if self.locked {
            self.sysroot.unlock();
        }
    }
}

/// A deployment to write.
struct NewDeployment {
    commit: String,
    stateroot: String,
    origin: glib::KeyFile,
    kernel_arguments: Vec<String>,
    /// On a booted system: lock (true) or unlock (false) finalization; `None` leaves it.
    lock_finalization: Option<bool>,
}

impl Loaded {
    /// Loads the sysroot at `path`; with `lock`, takes the sysroot lock first, waiting as it
    /// says while another program holds it.
    pub fn open(path: &Path, lock: Option<&LockWait<'_>>) -> Result<Self, DeployerError> {
        let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(path)));
        let locked = match lock {
            Some(wait) => {
                wait.take(&sysroot)?;
                true
            }
            None => false,
        };
        let unlock = |sysroot: &ostree::Sysroot| {
            if locked {
                sysroot.unlock();
            }
        };
        if let Err(e) = sysroot.load(gio::Cancellable::NONE) {
            unlock(&sysroot);
            return Err(failed(
                &format!("Loading the sysroot {}", path.display()),
                e,
            ));
        }
        let repo = sysroot.repo();
        let deployments = sysroot.deployments();
        let (booted, staging) = find_booted(path, &sysroot, &deployments);
        Ok(Self {
            path: path.to_path_buf(),
            sysroot,
            repo,
            deployments,
            booted,
            staging,
            locked,
        })
    }

    /// [`open`](Self::open) with the sysroot lock, waiting for it cancellably and saying so
    /// through `waiting`.
    fn open_reporting(
        path: &Path,
        cancellable: &gio::Cancellable,
        operation: &str,
        waiting: &dyn Fn(String),
    ) -> Result<Self, DeployerError> {
        Self::open(
            path,
            Some(&LockWait {
                cancellable,
                operation,
                waiting,
            }),
        )
    }

    fn slots(&self) -> Vec<Slot> {
        self.deployments
            .iter()
            .enumerate()
            .map(|(i, d)| Slot {
                stateroot: d.osname().to_string(),
                booted: self.booted == Some(i),
                staged: d.is_staged(),
                pinned: d.is_pinned(),
            })
            .collect()
    }

    /// Refuses a change prepared against other deployments: unless the deployment a change
    /// starts from is still `expected` (`None`: no check), `StateChanged`. Called right after
    /// loading with the sysroot lock held; the lock is kept until the change is written, so the
    /// deployments cannot move between this check and the write.
    fn check_expected(&self, expected: Option<&str>) -> Result<(), DeployerError> {
        let ids: Vec<String> = self
            .deployments
            .iter()
            .map(|d| {
                let serial = u64::try_from(d.deployserial()).unwrap_or_default();
                deployment_id(d.osname().as_str(), d.csum().as_str(), serial)
            })
            .collect();
        plan::check_expected(expected, &self.slots(), &ids).map_err(|moved| {
            let message = moved.message();
            tracing::info!("Refusing the change: {message}");
            DeployerError::StateChanged {
                expected: moved.expected,
                actual: moved.actual,
                message,
            }
        })
    }

    /// Whether the running system was booted from this sysroot.
    pub fn is_booted(&self) -> bool {
        self.booted.is_some()
    }

    /// Every deployment as `Status` shows it.
    pub fn views(&self) -> Vec<Deployment> {
        (0..self.deployments.len()).map(|i| self.view(i)).collect()
    }

    fn kernel_arguments(d: &ostree::Deployment) -> Vec<String> {
        d.bootconfig()
            .and_then(|b| b.get("options"))
            .map(|o| kargs::user_arguments(&o))
            .unwrap_or_default()
    }

    /// The kernel version of a checked-out deployment: the directory under `usr/lib/modules`
    /// that has a `vmlinuz`.
    fn kernel_version(&self, d: &ostree::Deployment) -> Option<String> {
        let modules = self
            .path
            .join(self.sysroot.deployment_dirpath(d).as_str())
            .join("usr/lib/modules");
        let mut names: Vec<String> = std::fs::read_dir(&modules)
            .ok()?
            .flatten()
            .filter(|e| e.path().join("vmlinuz").exists())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names.pop()
    }

    /// Deployment `i` as `Status` shows it, after a change: an error if another program
    /// removed it meanwhile.
    fn view_after_change(&self, i: usize) -> Result<Deployment, DeployerError> {
        if i >= self.deployments.len() {
            return Err(DeployerError::Failed {
                message: format!(
                    "Deployment {i} vanished after the change: another program changed the \
                     deployments"
                ),
            });
        }
        Ok(self.view(i))
    }

    /// Deployment `i` (which must exist) as `Status` shows it.
    pub fn view(&self, i: usize) -> Deployment {
        let d = &self.deployments[i];
        let csum = d.csum().to_string();
        let serial = d.deployserial();
        // One unreadable origin must not hide every deployment from `Status`.
        let recorded = match d.origin().map(|o| origin::read(&o)) {
            Some(Ok(recorded)) => recorded,
            Some(Err(e)) => {
                tracing::warn!("Reading the origin of deployment {csum}.{serial}, ignoring: {e}");
                origin::Recorded::default()
            }
            None => origin::Recorded::default(),
        };
        let info = commit::image_info(&self.repo, &csum).unwrap_or_else(|e| {
            tracing::warn!("Reading commit {csum} of deployment {i}, ignoring: {e:#}");
            commit::CommitInfo::default()
        });
        let kernel_version = self
            .kernel_version(d)
            .or_else(|| {
                commit::kernel(&self.repo, &csum)
                    .ok()
                    .flatten()
                    .map(|k| k.version)
            })
            .unwrap_or_default();
        let slots = self.slots();
        let layered = !origin::is_empty(&recorded.layering);
        Deployment {
            index: i as u64,
            stateroot: d.osname().to_string(),
            commit: csum.clone(),
            serial: u64::try_from(serial).unwrap_or_default(),
            base_commit: if layered { info.parent.clone() } else { None },
            image: recorded.image,
            image_digest: info.manifest_digest,
            version: info.version,
            timestamp: dnfimage_runtime::time::rfc3339(info.timestamp),
            kernel_version,
            kernel_arguments: Self::kernel_arguments(d),
            booted: self.booted == Some(i),
            staged: d.is_staged(),
            default: i == 0,
            rollback: plan::rollback(&slots) == Some(i),
            pinned: d.is_pinned(),
            finalization_locked: d.is_staged() && Path::new(STAGED_LOCKED).exists(),
            layering: recorded.layering,
            trust: recorded.trust,
            unlocked: match d.unlocked() {
                ostree::DeploymentUnlockedState::None => None,
                state => Some(ostree::Deployment::unlocked_state_to_string(state).to_string()),
            },
            live_commit: if self.booted == Some(i) {
                crate::live::live_commit(&deployment_id(
                    d.osname().as_str(),
                    &csum,
                    u64::try_from(serial).unwrap_or_default(),
                ))
            } else {
                None
            },
        }
    }

    /// The index `index` names (default: the deployment that boots next).
    fn index(&self, index: Option<u64>) -> Result<usize, DeployerError> {
        let n = self.deployments.len();
        match index {
            None if n > 0 => Ok(0),
            None => Err(DeployerError::NoSuchDeployment {
                index: None,
                message: "The sysroot has no deployment".into(),
            }),
            Some(i) if (i as usize) < n && i <= u64::from(u32::MAX) => Ok(i as usize),
            Some(i) => Err(DeployerError::NoSuchDeployment {
                index: Some(i),
                message: match n {
                    0 => "The sysroot has no deployment".into(),
                    1 => "There is one deployment, index 0".into(),
                    n => format!("There are {n} deployments, indices 0 to {}", n - 1),
                },
            }),
        }
    }

    /// The stateroot of the deployment that boots next, or the default one.
    fn default_stateroot(&self) -> String {
        self.deployments
            .first()
            .map(|d| d.osname().to_string())
            .unwrap_or_else(|| DEFAULT_STATEROOT.to_string())
    }

    /// Checks that `csum` is a complete commit of the repository that can boot.
    fn inspect(&self, csum: &str) -> Result<TreeSummary, DeployerError> {
        let not_found = || DeployerError::CommitNotFound {
            commit: csum.to_string(),
        };
        // Only a checksum: never a path, a ref or a remote.
        if ostree::validate_checksum_string(csum).is_err() {
            return Err(not_found());
        }
        let complete = commit::is_complete(&self.repo, csum)
            .map_err(|e| failed(&format!("Reading commit {csum}"), e))?;
        if !complete {
            return Err(not_found());
        }
        let summary = commit::summarize(&self.repo, csum)
            .map_err(|e| failed(&format!("Reading the tree of commit {csum}"), e))?;
        let not_bootable = |message: &str| DeployerError::NotBootable {
            commit: csum.to_string(),
            message: message.to_string(),
        };
        if summary.kernel.is_none() {
            return Err(not_bootable(
                "It has no kernel: no /usr/lib/modules/VERSION/vmlinuz",
            ));
        }
        if summary.etc_and_usr_etc {
            return Err(not_bootable("It has both /etc and /usr/etc"));
        }
        Ok(summary)
    }

    /// The kernel arguments the kargs.d files of commit `csum` declare for this architecture;
    /// `InvalidKernelArgumentsFile` when one cannot be read or parsed.
    fn declared_kernel_arguments(&self, csum: &str) -> Result<Vec<String>, DeployerError> {
        let files = commit::kargs_files(&self.repo, csum)
            .map_err(|e| failed(&format!("Reading the kargs.d files of commit {csum}"), e))?;
        kargs::declared(&files, kargs::host_architecture()).map_err(|e| {
            DeployerError::InvalidKernelArgumentsFile {
                commit: csum.to_string(),
                file: format!("/{}/{}", kargs::KARGS_D.join("/"), e.name),
                message: e.message,
            }
        })
    }

    /// The kernel arguments the image of the deployment that boots next declares in its kargs.d
    /// files: those a new deployment replaces with its own image's. None when that deployment is
    /// not from an image (its origin names none) or when there is no deployment; a file that
    /// cannot be parsed (written by another tool) counts as declaring none, so an upgrade can
    /// still replace the image.
    fn replaced_image_kernel_arguments(&self) -> Vec<String> {
        let Some(d) = self.deployments.first() else {
            return Vec::new();
        };
        let from_image = d
            .origin()
            .and_then(|o| origin::read(&o).ok())
            .is_some_and(|recorded| recorded.image.is_some());
        if !from_image {
            return Vec::new();
        }
        let csum = d.csum();
        self.declared_kernel_arguments(&csum).unwrap_or_else(|e| {
            tracing::warn!(
                "Reading the kernel arguments the image of deployment 0 declares, ignoring: {e:?}"
            );
            Vec::new()
        })
    }

    /// What deploying a tree into `stateroot` needs on `/boot` and the sysroot, against what
    /// they have free.
    fn space(
        &self,
        summary: &TreeSummary,
        stateroot: &str,
    ) -> Result<CheckSpaceReply, DeployerError> {
        let shares_boot_dir = summary.kernel.as_ref().is_none_or(|kernel| {
            self.deployments
                .iter()
                .filter(|d| d.osname() == stateroot)
                .any(|d| {
                    commit::kernel(&self.repo, &d.csum())
                        .ok()
                        .flatten()
                        .is_some_and(|k| k.same_boot_files(kernel))
                })
        });
        let kernel_bytes = match (&summary.kernel, shares_boot_dir) {
            (Some(k), false) => {
                commit::blocks(k.vmlinuz.size)
                    + k.initramfs.as_ref().map_or(0, |i| commit::blocks(i.size))
            }
            _ => 0,
        };
        // A new loader directory with one entry per deployment.
        let entries = BLOCK * (self.deployments.len() as u64 + 2);
        let boot_need = kernel_bytes + entries;
        let root_need = summary.directories * BLOCK + summary.usr_etc_bytes + ROOT_MARGIN;

        let boot_dir = self.path.join("boot");
        let deploy_dir = self.path.join("ostree/deploy");
        let (boot_dev, boot_free) = filesystem(&boot_dir)?;
        let (root_dev, root_free) = filesystem(&deploy_dir)?;
        let filesystems = if boot_dev == root_dev {
            vec![FilesystemSpace {
                path: self.path.display().to_string(),
                needed: boot_need + root_need,
                available: root_free,
            }]
        } else {
            vec![
                FilesystemSpace {
                    path: boot_dir.display().to_string(),
                    needed: boot_need,
                    available: boot_free,
                },
                FilesystemSpace {
                    path: self.path.display().to_string(),
                    needed: root_need,
                    available: root_free,
                },
            ]
        };
        Ok(CheckSpaceReply {
            fits: filesystems.iter().all(|f| f.needed <= f.available),
            filesystems,
        })
    }

    fn ensure_stateroot(&self, stateroot: &str) -> Result<(), DeployerError> {
        check_stateroot(stateroot).map_err(|m| DeployerError::Failed {
            message: format!("Invalid stateroot {stateroot:?}: {m}"),
        })?;
        if self.path.join("ostree/deploy").join(stateroot).is_dir() {
            return Ok(());
        }
        tracing::info!("Creating stateroot {stateroot}");
        self.sysroot
            .init_osname(stateroot, gio::Cancellable::NONE)
            .map_err(|e| failed(&format!("Creating stateroot {stateroot}"), e))
    }

    /// Deletes the files of deployments that are not listed (a half-written one, removed
    /// ones) and unused boot directories. Never prunes the repository.
    fn remove_unlisted(&self) -> Result<(), DeployerError> {
        self.sysroot
            .prepare_cleanup(gio::Cancellable::NONE)
            .map_err(|e| failed("Deleting unlisted deployments", e))
    }

    fn remove_unlisted_or_warn(&self) {
        if let Err(e) = self.remove_unlisted() {
            tracing::warn!("{e:?}; the next change retries");
        }
    }

    /// Makes `list` the deployments, in boot order (libostree swaps the boot entries
    /// atomically: on failure the previous ones stay).
    fn write_deployments(&self, list: &[ostree::Deployment]) -> Result<(), DeployerError> {
        let opts = ostree::SysrootWriteDeploymentsOpts {
            do_postclean: false,
        };
        self.sysroot
            .write_deployments_with_options(list, &opts, gio::Cancellable::NONE)
            .map_err(|e| failed("Writing the boot entries", e))
    }

    /// The deployments at `indices`, as the very objects libostree loaded (it recognises the
    /// staged one by identity; `Deployment::clone` would make a copy).
    fn pick(&self, indices: &[usize]) -> Vec<ostree::Deployment> {
        indices
            .iter()
            .map(|&i| Clone::clone(&self.deployments[i]))
            .collect()
    }

    /// Writes a new deployment that boots next, after checking the space it needs.
    fn write_new(
        &self,
        new: NewDeployment,
        summary: &TreeSummary,
        progress: Progress<'_, DeployPhase>,
        cancellable: &gio::Cancellable,
        operation: &str,
    ) -> Result<Deployment, DeployerError> {
        let space = self.space(summary, &new.stateroot)?;
        if let Some(fs) = space.filesystems.iter().find(|f| f.needed > f.available) {
            return Err(DeployerError::InsufficientSpace {
                path: fs.path.clone(),
                needed: fs.needed,
                available: fs.available,
            });
        }
        check_cancelled(cancellable, operation)?;
        self.ensure_stateroot(&new.stateroot)?;
        let slots = self.slots();
        let merge = plan::merge(&slots, &new.stateroot).map(|i| &self.deployments[i]);
        let argv: Vec<&str> = new.kernel_arguments.iter().map(String::as_str).collect();
        let opts = ostree::SysrootDeployTreeOpts {
            override_kernel_argv: Some(&argv),
            ..Default::default()
        };
        let commit = &new.commit;
        let written = if self.staging {
            progress(
                DeployPhase::Staging,
                format!("Staging {} in {}", short(commit), new.stateroot),
            );
            // Locked before staging (as `ostree admin deploy --lock-finalization` does), so no
            // shutdown can finalize it in between; unlocked only once the new one is staged,
            // so a failure leaves a previously staged deployment as it was.
            let lock_file = Path::new(STAGED_LOCKED);
            let mut created = false;
            if new.lock_finalization == Some(true) {
                if let Some(dir) = lock_file.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| failed("Creating /run/ostree", e))?;
                }
                created = !lock_file.exists();
                std::fs::write(lock_file, b"")
                    .map_err(|e| failed("Locking the finalization", e))?;
            }
            let staged = match self.sysroot.stage_tree_with_options(
                Some(&new.stateroot),
                commit,
                Some(&new.origin),
                merge,
                &opts,
                Some(cancellable),
            ) {
                Ok(d) => d,
                Err(e) => {
                    if created && let Err(e) = remove_staged_lock() {
                        tracing::warn!("{e:?}");
                    }
                    self.remove_unlisted_or_warn();
                    return Err(ostree_failed("Staging the deployment", e, operation));
                }
            };
            if new.lock_finalization == Some(false) {
                remove_staged_lock()?;
            }
            staged
        } else {
            progress(
                DeployPhase::Deploying,
                format!(
                    "Checking out {} in {} and merging /etc",
                    short(commit),
                    new.stateroot
                ),
            );
            let deployment = self
                .sysroot
                .deploy_tree_with_options(
                    Some(&new.stateroot),
                    commit,
                    Some(&new.origin),
                    merge,
                    Some(&opts),
                    Some(cancellable),
                )
                .map_err(|e| {
                    self.remove_unlisted_or_warn();
                    ostree_failed("Writing the deployment", e, operation)
                })?;
            if let Err(e) = check_cancelled(cancellable, operation) {
                self.remove_unlisted_or_warn();
                return Err(e);
            }
            progress(
                DeployPhase::UpdatingBootEntries,
                "Writing the boot entries".into(),
            );
            let mut list = vec![Clone::clone(&deployment)];
            list.extend(self.pick(&plan::after_deploy(&slots, &new.stateroot)));
            if let Err(e) = self.write_deployments(&list) {
                self.remove_unlisted_or_warn();
                return Err(e);
            }
            self.remove_unlisted_or_warn();
            deployment
        };
        let fresh = Loaded::open(&self.path, None)?;
        let index = fresh
            .deployments
            .iter()
            .position(|d| {
                d.osname() == written.osname()
                    && d.csum() == written.csum()
                    && d.deployserial() == written.deployserial()
            })
            .ok_or_else(|| DeployerError::Failed {
                message: "The new deployment is not listed after writing it".into(),
            })?;
        Ok(fresh.view(index))
    }
}

fn remove_staged_lock() -> Result<(), DeployerError> {
    match std::fs::remove_file(STAGED_LOCKED) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed(&format!("Removing {STAGED_LOCKED}"), e)),
    }
}

/// The booted deployment: the one libostree knows as booted, else (when `/run/ostree-booted`
/// exists) the one the `ostree=` kernel argument leads to. The second item says whether
/// libostree knows it, which staging needs.
fn find_booted(
    path: &Path,
    sysroot: &ostree::Sysroot,
    deployments: &[ostree::Deployment],
) -> (Option<usize>, bool) {
    if let Some(booted) = sysroot.booted_deployment()
        && let Some(i) = deployments.iter().position(|d| d.equal(&booted))
    {
        return (Some(i), true);
    }
    if !Path::new(OSTREE_BOOTED).exists() {
        return (None, false);
    }
    let Some(target) = std::fs::read_to_string(PROC_CMDLINE)
        .ok()
        .and_then(|c| ostree_karg(&c))
    else {
        return (None, false);
    };
    let Ok(target) = std::fs::canonicalize(path.join(target.trim_start_matches('/'))) else {
        return (None, false);
    };
    let booted = deployments.iter().position(|d| {
        !d.is_staged()
            && std::fs::canonicalize(path.join(sysroot.deployment_dirpath(d).as_str()))
                .is_ok_and(|p| p == target)
    });
    (booted, false)
}

/// `Status`: whether the sysroot is booted, and its deployments.
pub fn status(path: &Path) -> Result<(bool, Vec<Deployment>), DeployerError> {
    let loaded = Loaded::open(path, None)?;
    Ok((loaded.is_booted(), loaded.views()))
}

/// `CheckSpace`.
pub fn check_space(path: &Path, commit: &str) -> Result<CheckSpaceReply, DeployerError> {
    let loaded = Loaded::open(path, None)?;
    let summary = loaded.inspect(commit)?;
    loaded.space(&summary, &loaded.default_stateroot())
}

/// What `Deploy` is asked.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// The commit to deploy.
    pub commit: String,
    /// The image its origin records.
    pub image: ImageRef,
    /// The stateroot (default: that of the deployment that boots next).
    pub stateroot: Option<String>,
    /// The kernel arguments (default: those of the deployment that boots next).
    pub kernel_arguments: Option<Vec<String>>,
    /// Lock the finalization of the staged deployment.
    pub lock_finalization: bool,
    /// The deployment the change was prepared against (`expectedDeployment`).
    pub expected: Option<String>,
    /// How the image is held to the signature policy, for its origin.
    pub trust: ImageTrust,
}

/// `Deploy`.
pub fn deploy(
    path: &Path,
    request: DeployRequest,
    progress: Progress<'_, DeployPhase>,
    cancellable: &gio::Cancellable,
    operation: &str,
) -> Result<DeployResult, DeployerError> {
    if let Some(args) = &request.kernel_arguments {
        for a in args {
            kargs::check(a).map_err(|e| DeployerError::InvalidKernelArgument {
                argument: e.argument,
                message: e.message,
            })?;
        }
    }
    let loaded = Loaded::open_reporting(path, cancellable, operation, &|m| {
        progress(DeployPhase::Checking, m)
    })?;
    loaded.check_expected(request.expected.as_deref())?;
    progress(
        DeployPhase::Checking,
        format!(
            "Checking commit {} and the free space",
            short(&request.commit)
        ),
    );
    let summary = loaded.inspect(&request.commit)?;
    let info = commit::info(&loaded.repo, &request.commit)
        .map_err(|e| failed(&format!("Reading commit {}", request.commit), e))?;
    let declared = loaded.declared_kernel_arguments(&request.commit)?;
    let stateroot = request
        .stateroot
        .unwrap_or_else(|| loaded.default_stateroot());
    let kernel_arguments = request.kernel_arguments.unwrap_or_else(|| {
        loaded
            .deployments
            .first()
            .map(Loaded::kernel_arguments)
            .unwrap_or_default()
    });
    let carried = kargs::carry(
        &kernel_arguments,
        &loaded.replaced_image_kernel_arguments(),
        &declared,
    );
    if !carried.added.is_empty() || !carried.removed.is_empty() {
        tracing::info!(
            "Kernel arguments from the image: adding {:?}, removing {:?}",
            carried.added,
            carried.removed
        );
    }
    let new = NewDeployment {
        origin: origin::new_origin(
            &request.image,
            &request.trust,
            &info.layering.unwrap_or_default(),
        ),
        commit: request.commit,
        stateroot,
        kernel_arguments: carried.arguments,
        lock_finalization: Some(request.lock_finalization),
    };
    let deployment = loaded.write_new(new, &summary, progress, cancellable, operation)?;
    Ok(DeployResult {
        changed: true,
        deployment,
        added_kernel_arguments: carried.added,
        removed_kernel_arguments: carried.removed,
    })
}

/// `SetKernelArguments`.
pub fn set_kernel_arguments(
    path: &Path,
    index: Option<u64>,
    edits: &Edits,
    expected: Option<&str>,
    progress: Progress<'_, DeployPhase>,
    cancellable: &gio::Cancellable,
    operation: &str,
) -> Result<DeployResult, DeployerError> {
    let loaded = Loaded::open_reporting(path, cancellable, operation, &|m| {
        progress(DeployPhase::Checking, m)
    })?;
    loaded.check_expected(expected)?;
    let i = loaded.index(index)?;
    let d = &loaded.deployments[i];
    let current = Loaded::kernel_arguments(d);
    let wanted = edits
        .apply(&current)
        .map_err(|e| DeployerError::InvalidKernelArgument {
            argument: e.argument,
            message: e.message,
        })?;
    if wanted == current {
        return Ok(DeployResult {
            changed: false,
            deployment: loaded.view(i),
            added_kernel_arguments: Vec::new(),
            removed_kernel_arguments: Vec::new(),
        });
    }
    let commit = d.csum().to_string();
    progress(
        DeployPhase::Checking,
        format!("Checking commit {} and the free space", short(&commit)),
    );
    let summary = loaded.inspect(&commit)?;
    let origin = match d.origin() {
        Some(o) => origin::copy(&o).map_err(|m| failed("Copying the origin", m))?,
        None => glib::KeyFile::new(),
    };
    let new = NewDeployment {
        commit,
        stateroot: d.osname().to_string(),
        origin,
        kernel_arguments: wanted,
        lock_finalization: None,
    };
    let deployment = loaded.write_new(new, &summary, progress, cancellable, operation)?;
    Ok(DeployResult {
        changed: true,
        deployment,
        added_kernel_arguments: Vec::new(),
        removed_kernel_arguments: Vec::new(),
    })
}

/// `Rollback`: returns the deployment that now boots next.
pub fn rollback(
    path: &Path,
    expected: Option<&str>,
    lock: &LockWait<'_>,
) -> Result<Deployment, DeployerError> {
    let loaded = Loaded::open(path, Some(lock))?;
    loaded.check_expected(expected)?;
    let slots = loaded.slots();
    let (order, target) = plan::after_rollback(&slots).ok_or(DeployerError::NoRollback)?;
    let drops_staged = slots.iter().any(|s| s.staged);
    tracing::info!(
        "Rolling back to deployment {target} ({})",
        loaded.deployments[target].csum()
    );
    loaded.write_deployments(&loaded.pick(&order))?;
    if drops_staged {
        remove_staged_lock()?;
        loaded.remove_unlisted_or_warn();
    }
    Loaded::open(path, None)?.view_after_change(0)
}

/// `ApplyLive`: the additions of the pending deployment (the one that boots next, when it is
/// not the booted one) copied into the running `/usr` by [`live::run_helper`], after the
/// refusals: a sysroot that is not booted, changed files without `allow_replacement`.
pub fn apply_live(
    path: &Path,
    allow_replacement: bool,
    lock: &LockWait<'_>,
) -> Result<ApplyLiveReply, DeployerError> {
    let loaded = Loaded::open(path, Some(lock))?;
    let booted = match loaded.booted {
        Some(i) if loaded.staging => i,
        _ => {
            return Err(DeployerError::NotBooted {
                sysroot: path.display().to_string(),
            });
        }
    };
    let nothing = |why: &str| {
        tracing::info!("Nothing to apply live: {why}");
        Ok(ApplyLiveReply {
            live_commit: None,
            added: 0,
            replaced: 0,
            removed_kept: 0,
            nothing_to_apply: Some(why.to_string()),
        })
    };
    if booted == 0 {
        return nothing("No pending deployment: the booted one boots next");
    }
    let (b, pending) = (&loaded.deployments[booted], &loaded.deployments[0]);
    let (from, to) = (b.csum().to_string(), pending.csum().to_string());
    let id = deployment_id(
        b.osname().as_str(),
        &from,
        u64::try_from(b.deployserial()).unwrap_or_default(),
    );
    if live::live_commit(&id).as_deref() == Some(to.as_str()) {
        return nothing(&format!(
            "The additions of commit {} are already applied",
            short(&to)
        ));
    }
    let diff = live::diff(&loaded.repo, &from, &to)
        .map_err(|e| failed("Comparing the booted and the pending commits", e))?;
    if let Some(why) = live::decide(&diff, short(&to), allow_replacement)? {
        return nothing(&why);
    }
    tracing::info!(
        "Applying commit {to} live: {} additions, {} replacements, {} removals left",
        diff.added.len(),
        if allow_replacement {
            diff.changed.len()
        } else {
            0
        },
        diff.removed.len()
    );
    let copied = live::run_helper(path, &from, &to, allow_replacement)
        .map_err(|e| failed("Applying the pending deployment's additions", e))?;
    Ok(ApplyLiveReply {
        live_commit: Some(to),
        added: copied.added,
        replaced: copied.replaced,
        removed_kept: diff.removed.len() as u64,
        nothing_to_apply: None,
    })
}

/// `Pin`.
pub fn pin(
    path: &Path,
    index: u64,
    pinned: bool,
    lock: &LockWait<'_>,
) -> Result<Deployment, DeployerError> {
    let loaded = Loaded::open(path, Some(lock))?;
    let i = loaded.index(Some(index))?;
    let d = &loaded.deployments[i];
    if d.is_staged() {
        return Err(DeployerError::Failed {
            message: format!(
                "Deployment {index} is staged and cannot be pinned until it is finalized"
            ),
        });
    }
    if d.is_pinned() != pinned {
        loaded
            .sysroot
            .deployment_set_pinned(d, pinned)
            .map_err(|e| failed("Writing the pin to the origin", e))?;
        tracing::info!(
            "{} deployment {index} ({})",
            if pinned { "Pinned" } else { "Unpinned" },
            d.csum()
        );
    }
    Loaded::open(path, None)?.view_after_change(i)
}

/// `UnlockStaged`.
pub fn unlock_staged(path: &Path, lock: &LockWait<'_>) -> Result<Deployment, DeployerError> {
    let loaded = Loaded::open(path, Some(lock))?;
    let i = loaded
        .deployments
        .iter()
        .position(|d| d.is_staged())
        .ok_or_else(|| DeployerError::NoSuchDeployment {
            index: None,
            message: "No deployment is staged".into(),
        })?;
    remove_staged_lock()?;
    Ok(loaded.view(i))
}

/// `Cleanup`.
pub fn cleanup(
    path: &Path,
    pending: bool,
    rollback: bool,
    expected: Option<&str>,
    progress: Progress<'_, CleanupPhase>,
    cancellable: &gio::Cancellable,
    operation: &str,
) -> Result<CleanupResult, DeployerError> {
    let loaded = Loaded::open_reporting(path, cancellable, operation, &|m| {
        progress(CleanupPhase::UpdatingBootEntries, m)
    })?;
    loaded.check_expected(expected)?;
    let slots = loaded.slots();
    let (keep, remove) =
        plan::cleanup(&slots, pending, rollback).map_err(|plan::CleanupRefused::Pinned(i)| {
            DeployerError::DeploymentPinned { index: i as u64 }
        })?;
    let removed: Vec<Deployment> = remove.iter().map(|&i| loaded.view(i)).collect();
    check_cancelled(cancellable, operation)?;
    if !remove.is_empty() {
        progress(
            CleanupPhase::UpdatingBootEntries,
            format!(
                "Writing the boot entries without deployment{} {}",
                if remove.len() > 1 { "s" } else { "" },
                remove
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        );
        loaded.write_deployments(&loaded.pick(&keep))?;
        if remove.iter().any(|&i| slots[i].staged) {
            remove_staged_lock()?;
        }
    }
    progress(
        CleanupPhase::RemovingFiles,
        "Deleting the files of deployments no longer listed".into(),
    );
    loaded.remove_unlisted_or_warn();
    Ok(CleanupResult {
        removed_deployments: removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortens_commits_by_characters() {
        let hex = "0123456789abcdef".repeat(4);
        for (commit, want) in [
            (hex.as_str(), "0123456789ab"),
            ("abc", "abc"),
            ("", ""),
            // Byte 12 is inside a character.
            ("aéééééééééééééé", "aééééééééééé"),
        ] {
            assert_eq!(short(commit), want, "{commit}");
        }
    }

    #[test]
    fn finds_the_ostree_argument() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", None),
            ("root=/dev/vda quiet", None),
            (
                "BOOT_IMAGE=/x ostree=/ostree/boot.1/fedora/abc/0 rw\n",
                Some("/ostree/boot.1/fedora/abc/0"),
            ),
            (
                "ostree=\"/ostree/boot.0/os/x/1\"",
                Some("/ostree/boot.0/os/x/1"),
            ),
            ("ostreefoo=1", None),
        ];
        for (cmdline, want) in cases {
            assert_eq!(ostree_karg(cmdline).as_deref(), *want, "{cmdline:?}");
        }
    }

    #[test]
    fn checks_stateroot_names() {
        for (name, ok) in [
            ("default", true),
            ("fedora-42", true),
            ("os_1.x", true),
            ("", false),
            (".hidden", false),
            ("-x", false),
            ("a/b", false),
            ("a b", false),
            ("..", false),
        ] {
            assert_eq!(check_stateroot(name).is_ok(), ok, "{name:?}");
        }
    }
}
