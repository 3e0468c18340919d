//! The deployer service (`org.dnfimage.Deployer`): the only writer of the ostree sysroot's
//! deployments. It lists them, deploys commits the importer or the layerer wrote into the
//! sysroot's repository, and rolls back, pins, removes and re-deploys them with other kernel
//! arguments.
//!
//! The zlink server runs on the main task; the sysroot work runs on blocking threads (libostree's
//! objects are not `Send`), one change at a time ([`JobSlot`]), under libostree's sysroot lock.

pub mod commit;
pub mod kargs;
pub mod live;
pub mod origin;
pub mod plan;
pub mod sysroot;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use dnfimage_interfaces::deployer::{
    ApplyLiveReply, CancelReply, CheckSpaceReply, CleanupPhase, CleanupProgress, CleanupReply,
    CleanupResult, DeployPhase, DeployProgress, DeployReply, DeployResult, DeployerError,
    Deployment, DeploymentReply, FilesystemSpace, IDL, ImageTrust, LayeringRequest, Package,
    StatusReply,
};
use dnfimage_interfaces::reference::excerpt;
use dnfimage_runtime::{
    Activation, Activity, JobSlot, Policy, ReplyStream, ServiceArgs, refused, spawn_streamed,
};
use futures_util::Stream;
use ostree_ext::gio;
use ostree_ext::prelude::*;
use zlink::Reply;

use origin::ImageRef;
use sysroot::{DeployRequest, failed};

/// Methods that change state: only root may call them.
pub const PRIVILEGED: &[&str] = &[
    "Deploy",
    "SetKernelArguments",
    "UnlockStaged",
    "Rollback",
    "Pin",
    "Cleanup",
    "Cancel",
    "ApplyLive",
];

/// Command line of `dnfimage-deployer`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    version,
    about = "The dnfimage deployer service (org.dnfimage.Deployer)"
)]
pub struct Args {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The ostree sysroot whose deployments the service manages.
    #[arg(long, env = "DNFIMAGE_SYSROOT", default_value = "/")]
    pub sysroot: PathBuf,
    /// Seconds a change waits for the sysroot lock while another program (ostree admin,
    /// rpm-ostree, bootc) holds it, before it fails with AlreadyInProgress.
    #[arg(long, default_value_t = 300)]
    pub lock_timeout: u64,
    /// Not for people: the step of ApplyLive that runs outside the service's mount namespace
    /// (the service starts it with systemd-run): unlock the booted deployment's /usr
    /// (transient) and copy into it what commit TO adds to commit FROM.
    #[arg(long, hide = true, num_args = 2, value_names = ["FROM", "TO"])]
    pub apply_live: Option<Vec<String>>,
    /// Not for people: with --apply-live, replace changed files too.
    #[arg(long, hide = true, requires = "apply_live")]
    pub allow_replacement: bool,
}

/// Runs the service until idle or stopped.
pub async fn run(args: Args, activation: Option<Activation>) -> Result<()> {
    if let Some([from, to]) = args.apply_live.as_deref() {
        return live::helper(&args.sysroot, from, to, args.allow_replacement);
    }
    let activity = Activity::new();
    let jobs = JobSlot::new(activity.clone());
    if !args.sysroot.join("ostree").is_dir() {
        // Not fatal: socket activation would restart us in a loop; every call says it.
        tracing::warn!(
            "{} has no ostree/ directory; is it an ostree sysroot?",
            args.sysroot.display()
        );
    }
    sysroot::set_lock_timeout(std::time::Duration::from_secs(args.lock_timeout));
    let deployer = Deployer::new(args.sysroot.clone(), jobs.clone());
    let policy = Policy::new(IDL, PRIVILEGED)?;
    dnfimage_runtime::serve(
        |_| deployer.clone(),
        policy,
        &args.service,
        activation,
        activity,
        &jobs,
    )
    .await
}

/// The service state.
#[derive(Debug, Clone)]
pub struct Deployer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    sysroot: PathBuf,
    jobs: JobSlot,
}

/// A reply stream of a `more` method.
type Replies<T> = ReplyStream<T, DeployerError>;

/// The reply of a `more` method: progress records, then the outcome.
trait Streamed: Sized + Send + 'static {
    type Phase: Send + 'static;
    type Outcome: Send + 'static;
    fn progress(phase: Self::Phase, message: String) -> Self;
    fn outcome(outcome: Self::Outcome) -> Self;
}

impl Streamed for DeployReply {
    type Phase = DeployPhase;
    type Outcome = DeployResult;
    fn progress(phase: DeployPhase, message: String) -> Self {
        Self {
            progress: Some(DeployProgress { phase, message }),
            result: None,
        }
    }
    fn outcome(outcome: DeployResult) -> Self {
        Self {
            progress: None,
            result: Some(outcome),
        }
    }
}

impl Streamed for CleanupReply {
    type Phase = CleanupPhase;
    type Outcome = CleanupResult;
    fn progress(phase: CleanupPhase, message: String) -> Self {
        Self {
            progress: Some(CleanupProgress { phase, message }),
            result: None,
        }
    }
    fn outcome(outcome: CleanupResult) -> Self {
        Self {
            progress: None,
            result: Some(outcome),
        }
    }
}

/// Runs sysroot work on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DeployerError> + Send + 'static,
) -> Result<T, DeployerError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(failed("Running the sysroot task", e)))
}

fn one_error<T: Send + 'static>(e: DeployerError) -> Replies<T> {
    tracing::warn!("Refused: {e:?}");
    refused(e)
}

impl Deployer {
    /// A deployer of the sysroot at `sysroot`, running changes in `jobs`.
    pub fn new(sysroot: PathBuf, jobs: JobSlot) -> Self {
        Self {
            shared: Arc::new(Shared { sysroot, jobs }),
        }
    }

    fn path(&self) -> PathBuf {
        self.shared.sysroot.clone()
    }

    /// Runs a quick change (well under a second once it holds the sysroot lock) as the one
    /// running job; `Cancel` stops it while it waits for the lock.
    async fn exclusive<T: Send + 'static>(
        &self,
        what: &str,
        work: impl FnOnce(&sysroot::LockWait<'_>) -> Result<T, DeployerError> + Send + 'static,
    ) -> Result<T, DeployerError> {
        let job = self
            .shared
            .jobs
            .try_start(what)
            .map_err(|running| DeployerError::AlreadyInProgress { operation: running })
            .inspect_err(|e| tracing::warn!("{what} refused: {e:?}"))?;
        let cancellable = gio::Cancellable::new();
        let operation = what.to_string();
        let task = blocking({
            let cancellable = cancellable.clone();
            move || {
                work(&sysroot::LockWait {
                    cancellable: &cancellable,
                    operation: &operation,
                    waiting: &|_| {},
                })
            }
        });
        tokio::pin!(task);
        let result = tokio::select! {
            r = &mut task => r,
            () = job.cancelled() => {
                cancellable.cancel();
                task.await
            }
        };
        drop(job);
        if let Err(e) = &result {
            tracing::warn!("{what} failed: {e:?}");
        }
        result
    }

    /// Runs a long change as the one running job on a blocking thread, streaming its progress
    /// records (when the client asked for `more`) and then its outcome. `Cancel` cancels the
    /// `gio::Cancellable` the work checks until it starts writing boot entries.
    fn streamed<T: Streamed>(
        &self,
        more: bool,
        what: String,
        work: impl FnOnce(
            sysroot::Progress<'_, T::Phase>,
            &gio::Cancellable,
            &str,
        ) -> Result<T::Outcome, DeployerError>
        + Send
        + 'static,
    ) -> Replies<T> {
        spawn_streamed(
            &self.shared.jobs,
            what.clone(),
            more,
            |running| DeployerError::AlreadyInProgress { operation: running },
            move |cancellation, progress| async move {
                let cancellable = gio::Cancellable::new();
                let mut task = {
                    let cancellable = cancellable.clone();
                    let what = what.clone();
                    tokio::task::spawn_blocking(move || {
                        let report = |phase: T::Phase, message: String| {
                            tracing::debug!("{message}");
                            progress.send(T::progress(phase, message));
                        };
                        work(&report, &cancellable, &what)
                    })
                };
                let mut asked = false;
                let result = loop {
                    tokio::select! {
                        r = &mut task => {
                            break r.unwrap_or_else(|e| Err(failed("Running the sysroot task", e)));
                        }
                        () = cancellation.cancelled(), if !asked => {
                            asked = true;
                            tracing::info!("Cancelling: {what}");
                            cancellable.cancel();
                        }
                    }
                };
                if result.is_ok() {
                    tracing::info!("Done: {what}");
                }
                result.map(T::outcome)
            },
        )
    }
}

/// Owns the ostree sysroot: lists its deployments and writes, orders, pins and removes
/// them. It is the only writer of deployments; a second change while one runs is refused,
/// and so is one prepared against deployments that changed since (`expectedDeployment`); a
/// failed one leaves the deployments as they were.
#[zlink::service(
    interface = "org.dnfimage.Deployer",
    types = [
        Package, LayeringRequest, ImageTrust, Deployment, FilesystemSpace, DeployPhase,
        DeployProgress,
        DeployResult, CleanupPhase, CleanupProgress, CleanupResult,
    ],
    vendor = "dnfimage",
    product = "dnfimage-deployer",
    version = env!("CARGO_PKG_VERSION"),
    url = "https://example.invalid/dnfimage"
)]
impl Deployer {
    /// Lists every deployment of the sysroot with its image, commit, kernel, kernel
    /// arguments, flags and layering request. The booted deployment is the one the
    /// "ostree=" kernel argument names when "/run/ostree-booted" exists; on a sysroot that
    /// is not booted (e.g. a test sysroot) none is booted and every method still works.
    async fn status(&self) -> Result<StatusReply, DeployerError> {
        let path = self.path();
        let (booted, deployments) = blocking(move || sysroot::status(&path))
            .await
            .inspect_err(|e| tracing::warn!("Status failed: {e:?}"))?;
        Ok(StatusReply {
            sysroot: self.shared.sysroot.display().to_string(),
            booted,
            deployments,
            operation: self.shared.jobs.running(),
        })
    }

    /// Tells whether deploying `commit` fits: what it needs on "/boot" (its kernel and
    /// initramfs, unless a deployment already has the same ones) and on the sysroot, against
    /// what is free. `Deploy` makes the same check before writing anything.
    async fn check_space(&self, commit: String) -> Result<CheckSpaceReply, DeployerError> {
        let path = self.path();
        blocking(move || sysroot::check_space(&path, &commit))
            .await
            .inspect_err(|e| tracing::warn!("CheckSpace failed: {e:?}"))
    }

    /// Deploys `commit` (an Import or Build result) into `stateroot` (default: the
    /// stateroot of the deployment that boots next, or "default" on an empty sysroot; it is
    /// created when missing), with an origin that records `image` (the image reference
    /// upgrades follow, "docker://…") and the layering request Build recorded in the commit,
    /// if any. The new deployment boots next, with `kernelArguments` (default: those of the
    /// deployment that boots next now, none on an empty sysroot), without those the image of
    /// the deployment that boots next declares in "/usr/lib/bootc/kargs.d/*.toml" and the new
    /// image no longer declares, then with those the new image declares there and that image
    /// did not (bootc's rules: the files in name order, those for another architecture
    /// ignored; one that cannot be parsed fails the call with `InvalidKernelArgumentsFile`).
    /// On a booted system it is
    /// staged and made bootable at shutdown, after `UnlockStaged` when `lockFinalization` is
    /// true (default false); on a sysroot that is not booted it is written at once and
    /// `lockFinalization` is ignored. The booted (or default) deployment stays as the
    /// rollback, pinned ones stay too, and older ones are removed. Checks free space first
    /// and writes nothing when it lacks. Streams progress records, then one record with the
    /// result. `expectedDeployment` (default null: no check) names the deployment the caller
    /// prepared the change against, "STATEROOT/COMMIT.SERIAL" of the one a change starts from:
    /// the staged one, else the booted one, else the one that boots next ("" for a sysroot
    /// without deployments). When that is no longer so once the sysroot lock is held, nothing is
    /// written and the call fails with `StateChanged`. `trust` (default: enforced, nothing
    /// verified recorded) says whether upgrades must check the image against the host's
    /// signature policy, recorded as the origin's scheme ("ostree-image-signed:" when
    /// enforced, else "ostree-unverified-registry:"), and what the fetch's check found.
    #[zlink(more)]
    #[allow(clippy::too_many_arguments)]
    async fn deploy(
        &self,
        more: bool,
        commit: String,
        image: String,
        stateroot: Option<String>,
        #[zlink(rename = "kernelArguments")] kernel_arguments: Option<Vec<String>>,
        #[zlink(rename = "lockFinalization")] lock_finalization: Option<bool>,
        #[zlink(rename = "expectedDeployment")] expected_deployment: Option<String>,
        trust: Option<ImageTrust>,
    ) -> impl Stream<Item = Result<Reply<DeployReply>, DeployerError>> + Unpin + use<> {
        let image_ref = match ImageRef::parse(&image) {
            Ok(r) => r,
            Err(e) => {
                return one_error(DeployerError::InvalidImageReference {
                    image: excerpt(&image).into_owned(),
                    message: e.to_string(),
                });
            }
        };
        let path = self.path();
        let what = format!("Deploying {image_ref}");
        let request = DeployRequest {
            commit,
            image: image_ref,
            stateroot,
            kernel_arguments,
            lock_finalization: lock_finalization.unwrap_or(false),
            expected: expected_deployment,
            trust: trust.unwrap_or(ImageTrust {
                enforced: true,
                ..Default::default()
            }),
        };
        self.streamed(more, what, move |progress, cancellable, operation| {
            sysroot::deploy(&path, request, progress, cancellable, operation)
        })
    }

    /// Deploys the commit of deployment `index` (default: the one that boots next, so a
    /// pending update is kept) again, with the same origin and changed kernel arguments:
    /// `delete` removes arguments ("K" every K, "K=V" that one), `replace` changes them
    /// ("K=V" sets every K to V, "K=OLD=NEW" changes one value), then `append` adds
    /// arguments ("K" or "K=V"); each defaults to none. Like `Deploy` it checks out a
    /// deployment and writes boot entries, seconds of work, so it streams the same progress
    /// records and result; the result's `changed` is false, and nothing is written, when
    /// the arguments already are as asked. `expectedDeployment` is checked first, as by
    /// `Deploy`.
    #[zlink(more)]
    async fn set_kernel_arguments(
        &self,
        more: bool,
        index: Option<u64>,
        append: Option<Vec<String>>,
        delete: Option<Vec<String>>,
        replace: Option<Vec<String>>,
        #[zlink(rename = "expectedDeployment")] expected_deployment: Option<String>,
    ) -> impl Stream<Item = Result<Reply<DeployReply>, DeployerError>> + Unpin + use<> {
        let path = self.path();
        let edits = kargs::Edits {
            delete: delete.unwrap_or_default(),
            replace: replace.unwrap_or_default(),
            append: append.unwrap_or_default(),
        };
        let what = "Changing kernel arguments".to_string();
        self.streamed(more, what, move |progress, cancellable, operation| {
            sysroot::set_kernel_arguments(
                &path,
                index,
                &edits,
                expected_deployment.as_deref(),
                progress,
                cancellable,
                operation,
            )
        })
    }

    /// Lets the staged deployment that `Deploy` locked with `lockFinalization` be made
    /// bootable at the next shutdown.
    async fn unlock_staged(&self) -> Result<DeploymentReply, DeployerError> {
        let path = self.path();
        let deployment = self
            .exclusive("Unlocking the staged deployment", move |lock| {
                sysroot::unlock_staged(&path, lock)
            })
            .await?;
        Ok(DeploymentReply { deployment })
    }

    /// Makes the next boot start the previous deployment again: the booted one when a
    /// pending deployment would boot next (a staged one is dropped), else the rollback one.
    /// It only reorders the deployments and rewrites the boot entries, which takes well
    /// under a second, so it is not a 'more' method. `expectedDeployment` is checked first, as
    /// by `Deploy`.
    async fn rollback(
        &self,
        #[zlink(rename = "expectedDeployment")] expected_deployment: Option<String>,
    ) -> Result<DeploymentReply, DeployerError> {
        let path = self.path();
        let deployment = self
            .exclusive("Rolling back", move |lock| {
                sysroot::rollback(&path, expected_deployment.as_deref(), lock)
            })
            .await?;
        Ok(DeploymentReply { deployment })
    }

    /// Pins deployment `index` so that no deploy or cleanup removes it (`pinned` true), or
    /// unpins it (false). A staged deployment cannot be pinned.
    async fn pin(&self, index: u64, pinned: bool) -> Result<DeploymentReply, DeployerError> {
        let path = self.path();
        let what = if pinned {
            format!("Pinning deployment {index}")
        } else {
            format!("Unpinning deployment {index}")
        };
        let deployment = self
            .exclusive(&what, move |lock| sysroot::pin(&path, index, pinned, lock))
            .await?;
        Ok(DeploymentReply { deployment })
    }

    /// Removes the pending deployment (`pending`, default false: the staged one, or the one
    /// that boots next when it is not the booted one) and the rollback deployment
    /// (`rollback`, default false), rewrites the boot entries, then deletes the files of
    /// every deployment no longer listed. When one of them is pinned nothing is removed;
    /// when one does not exist that is not an error. Deleting a deployment takes seconds,
    /// hence progress records, then one record with the result. The repository objects
    /// left unused are freed by org.dnfimage.Importer.Prune. `expectedDeployment` is checked
    /// first, as by `Deploy`.
    #[zlink(more)]
    async fn cleanup(
        &self,
        more: bool,
        pending: Option<bool>,
        rollback: Option<bool>,
        #[zlink(rename = "expectedDeployment")] expected_deployment: Option<String>,
    ) -> impl Stream<Item = Result<Reply<CleanupReply>, DeployerError>> + Unpin + use<> {
        let path = self.path();
        let (pending, rollback) = (pending.unwrap_or(false), rollback.unwrap_or(false));
        let what = "Cleaning up deployments".to_string();
        self.streamed(more, what, move |progress, cancellable, operation| {
            sysroot::cleanup(
                &path,
                pending,
                rollback,
                expected_deployment.as_deref(),
                progress,
                cancellable,
                operation,
            )
        })
    }

    /// Cancels the running deploy, kernel argument change or cleanup if it has not started
    /// writing the boot entries yet; after that it runs to its end.
    async fn cancel(&self) -> Result<CancelReply, DeployerError> {
        Ok(CancelReply {
            cancelled: self.shared.jobs.cancel(),
        })
    }

    /// Makes the additions of the pending deployment (the one that boots next, when it is not
    /// the booted one) usable now, without a reboot: the files, directories and symbolic links
    /// under "/usr" its commit has and the booted one's does not are copied into the running
    /// "/usr", over a transient overlay (libostree's transient unlock, gone at the next boot, when
    /// the deployment itself has them), and so are the rpm database files it changes, which list
    /// the added packages. Other files both commits have with other contents are refused with
    /// `ReplacementRefused` unless `allowReplacement` (default false), then replaced too; paths
    /// the pending deployment removes, and its "/etc" changes, are left alone. Nothing to apply
    /// (no pending deployment, no additions, already applied) is no error: the reply says why.
    /// Refused with `NotBooted` on a sysroot that is not booted.
    async fn apply_live(
        &self,
        #[zlink(rename = "allowReplacement")] allow_replacement: Option<bool>,
    ) -> Result<ApplyLiveReply, DeployerError> {
        let path = self.path();
        let allow = allow_replacement.unwrap_or(false);
        self.exclusive("Applying the pending deployment live", move |lock| {
            sysroot::apply_live(&path, allow, lock)
        })
        .await
    }
}
