//! The importer service (`org.dnfimage.Importer`): imports bootable container images from the
//! fetcher's local OCI cache into the sysroot's ostree repository with ostree-ext, records them
//! under their registry references, and removes those no deployment uses.
//!
//! ostree and glib objects never cross threads here: each import or prune runs on a thread of
//! its own (an import with a current-thread tokio runtime, as ostree-ext's importer is async),
//! feeding the method's reply stream through a channel. The varlink server stays on the main
//! task and answers other calls meanwhile; `Cancel` and SIGTERM reach the job through its
//! [`Job`].

pub mod import;
pub mod journal;
pub mod layers;
pub mod reference;
pub mod scan;
pub mod store;

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dnfimage_interfaces::importer::{
    CancelReply, GetDiskUsageReply, IDL, ImportLayersReply, ImportLayersResult, ImportPhase,
    ImportProgress, ImportReply, ImportResult, ImportWarning, ImportWarningKind, ImportedImage,
    ImporterError, ListImagesReply, PrunePhase, PruneProgress, PruneReply, PruneResult,
};
use dnfimage_interfaces::reference::{ImageRef, ReferenceError, excerpt};
use dnfimage_runtime::{
    Activation, Activity, Cancellation, InstanceLock, JobSlot, Policy, Progress, ReplyStream,
    ServiceArgs, refused, spawn_streamed,
};
use futures_util::Stream;
use tokio::sync::{oneshot, watch};
use zlink::Reply;

use import::{Paths, Request};

/// Methods that change state: only root may call them.
pub const PRIVILEGED: &[&str] = &["Import", "ImportLayers", "Cancel", "Prune"];

/// How long a cancelled job's blocking work may take to stop before the job is let go.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the processes a killed import left to end.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a prune looks for the sysroot lock while another process holds it.
const LOCK_POLL: Duration = Duration::from_millis(250);

/// Command line of `dnfimage-importer`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    version,
    about = "The dnfimage importer service (org.dnfimage.Importer)"
)]
pub struct Args {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The sysroot whose repository (`ostree/repo`) images are imported into.
    #[arg(long, env = "DNFIMAGE_SYSROOT", default_value = "/")]
    pub sysroot: PathBuf,
}

/// Runs the service until idle or stopped.
pub async fn run(args: Args, activation: Option<Activation>) -> Result<()> {
    let paths = Paths::new(&args.sysroot);
    // One importer per repository. The lock passes to the processes an import starts, so when
    // an importer was killed, this waits for the `ostree commit` it left to end (their input
    // ended with it) before removing what they may have half-written.
    let repo = paths.repo.clone();
    let _lock = tokio::task::spawn_blocking(move || {
        store::open_repo(&repo)?;
        let lock = InstanceLock::acquire_inherited(
            &repo.join(journal::LOCK_NAME),
            &format!("The repository {}", repo.display()),
            ORPHAN_TIMEOUT,
        )?;
        // An import killed last time may have left half-written layer references.
        import::recover(&repo)?;
        anyhow::Ok(lock)
    })
    .await
    .context("Checking the repository")??;
    let activity = Activity::new();
    let jobs = JobSlot::new(activity.clone());
    let importer = Importer::new(paths, jobs.clone());
    let policy = Policy::new(IDL, PRIVILEGED)?;
    dnfimage_runtime::serve(
        |_| importer.clone(),
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
pub struct Importer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    paths: Paths,
    jobs: JobSlot,
}

/// Sends progress records of a `more` call.
type Sink<R> = Progress<R, ImporterError>;

/// Asks a job's thread to stop.
#[derive(Debug, Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn requested(&self) -> bool {
        *self.0.borrow()
    }

    async fn wait(&mut self) {
        // An error means the job's task is gone, which is a reason to stop too.
        let _ = self.0.wait_for(|s| *s).await;
    }
}

fn failed(message: impl Into<String>) -> ImporterError {
    ImporterError::Failed {
        message: message.into(),
    }
}

/// The replies of a `more` call.
type Replies<R> = ReplyStream<R, ImporterError>;

impl Importer {
    /// An importer writing the repository of `paths`, running jobs in `jobs`.
    pub fn new(paths: Paths, jobs: JobSlot) -> Self {
        Self {
            shared: Arc::new(Shared { paths, jobs }),
        }
    }

    /// Runs `work` as the service's job on a thread of its own; its progress goes to the
    /// stream returned, then its result. `wrap` turns the result into the last reply.
    fn spawn_job<R, T>(
        &self,
        what: String,
        more: bool,
        work: impl FnOnce(Sink<R>, Stop) -> Result<T, ImporterError> + Send + 'static,
        wrap: impl FnOnce(T) -> R + Send + 'static,
    ) -> Replies<R>
    where
        R: Send + 'static,
        T: Send + 'static,
    {
        spawn_streamed(
            &self.shared.jobs,
            what.clone(),
            more,
            |running| ImporterError::AlreadyInProgress { operation: running },
            move |cancellation, sink| async move {
                let result = run_on_thread(&what, cancellation, sink, work).await;
                if result.is_ok() {
                    tracing::info!("{what}: done");
                }
                result.map(wrap)
            },
        )
    }
}

/// Runs `work` on a new thread until it returns; asks it to stop when the job is cancelled.
async fn run_on_thread<R, T>(
    what: &str,
    cancellation: Cancellation,
    sink: Sink<R>,
    work: impl FnOnce(Sink<R>, Stop) -> Result<T, ImporterError> + Send + 'static,
) -> Result<T, ImporterError>
where
    R: Send + 'static,
    T: Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = oneshot::channel();
    let stop = Stop(stop_rx);
    let spawned = std::thread::Builder::new()
        .name("job".into())
        .spawn(move || {
            // The receiver waits for this; if it is gone there is nobody to tell.
            let _ = done_tx.send(work(sink, stop));
        });
    if let Err(e) = spawned {
        return Err(failed(format!("Starting a thread for {what}: {e}")));
    }
    let mut done_rx = done_rx;
    let done = tokio::select! {
        r = &mut done_rx => r,
        () = cancellation.cancelled() => {
            tracing::info!("Cancelling {what}");
            stop_tx.send_replace(true);
            done_rx.await
        }
    };
    done.unwrap_or_else(|_| Err(failed(format!("{what}: the job's thread panicked"))))
}

/// The import job, on its thread.
fn import_job(
    paths: Paths,
    request: Request,
    sink: Sink<ImportReply>,
    stop: Stop,
) -> Result<ImportResult, ImporterError> {
    let emit = |progress| {
        sink.send(ImportReply {
            progress: Some(progress),
            result: None,
        })
    };
    in_runtime(&paths, request.operation(), stop, |_| {
        import::import(&paths, &request, &emit)
    })
}

/// The job of `ImportLayers`, on its thread.
fn import_layers_job(
    paths: Paths,
    request: import::LayersRequest,
    sink: Sink<ImportLayersReply>,
    stop: Stop,
) -> Result<ImportLayersResult, ImporterError> {
    let emit = |progress| {
        sink.send(ImportLayersReply {
            progress: Some(progress),
            result: None,
        })
    };
    in_runtime(&paths, request.operation(), stop, |wake| {
        import::import_layers(&paths, &request, &emit, wake)
    })
}

/// Runs `work` on a current-thread runtime of this thread until it ends or `stop` asks; on
/// stop, `work`'s readers waiting for a download are woken through the event fd it gets.
/// After a failure, removes what the journal says the import left half-written.
fn in_runtime<T, F: std::future::Future<Output = Result<T, ImporterError>>>(
    paths: &Paths,
    operation: String,
    mut stop: Stop,
    work: impl FnOnce(Arc<OwnedFd>) -> F,
) -> Result<T, ImporterError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("Starting an async runtime for the import: {e}")))?;
    let wake = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .map(Arc::new)
    .map_err(|e| failed(format!("Creating an event fd: {e}")))?;
    let work = work(wake.clone());
    let result = runtime.block_on(async {
        tokio::select! {
            r = work => r,
            () = stop.wait() => {
                if let Err(e) = rustix::io::write(&*wake, &1u64.to_ne_bytes()) {
                    tracing::warn!("Waking the readers of the cancelled import: {e}");
                }
                Err(ImporterError::Cancelled { operation: operation.clone() })
            }
        }
    });
    // Dropping the import (on cancel) leaves ostree-ext's blocking work to notice; wait for it
    // before cleaning up after it.
    runtime.shutdown_timeout(STOP_TIMEOUT);
    if result.is_err() {
        match import::recover(&paths.repo) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!("Removed {} incomplete layer references", removed.len());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("Cleaning up after the failed import: {e:#}"),
        }
    }
    result
}

/// The prune job, on its thread.
fn prune_job(
    paths: Paths,
    keep: BTreeSet<String>,
    sink: Sink<PruneReply>,
    stop: Stop,
) -> Result<PruneResult, ImporterError> {
    let operation = "Pruning the repository".to_string();
    let progress = |phase: PrunePhase, message: String| {
        tracing::debug!("{message}");
        sink.send(PruneReply {
            progress: Some(PruneProgress { phase, message }),
            result: None,
        })
    };
    let cancelled = || ImporterError::Cancelled {
        operation: operation.clone(),
    };
    let err = |context: &str, e: anyhow::Error| failed(format!("{context}: {e:#}"));
    import::recover(&paths.repo).map_err(|e| err("Cleaning up after an earlier import", e))?;
    let sysroot = store::load_sysroot_for_writing(&paths.sysroot)
        .map_err(|e| err("Opening the sysroot", e))?;
    let mut waiting = false;
    loop {
        match store::make_writable(&sysroot) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(err("Locking the sysroot", e)),
        }
        if stop.requested() {
            return Err(cancelled());
        }
        if !waiting {
            waiting = true;
            progress(
                PrunePhase::RemovingImages,
                "Waiting for another process to release the sysroot lock".into(),
            );
        }
        std::thread::sleep(LOCK_POLL);
    }
    let result = (|| {
        // Deployments may have changed while someone else held the lock.
        sysroot
            .load_if_changed(ostree_ext::gio::Cancellable::NONE)
            .context("Loading the sysroot")?;
        let repo = sysroot.repo();
        store::prune(
            &sysroot,
            &repo,
            &keep,
            &|step, message| {
                let phase = match step {
                    store::PruneStep::Images => PrunePhase::RemovingImages,
                    store::PruneStep::Layers => PrunePhase::RemovingLayers,
                    store::PruneStep::Objects => PrunePhase::RemovingObjects,
                };
                progress(phase, message)
            },
            &|| stop.requested(),
        )
    })();
    sysroot.unlock();
    match result {
        Ok(p) => {
            tracing::info!(
                "Pruned {} images, {} layered commits, {} layers, {} objects ({} bytes)",
                p.images.len(),
                p.commits,
                p.layers,
                p.objects,
                p.bytes
            );
            Ok(PruneResult {
                removed_images: p.images,
                removed_commits: p.commits,
                removed_layers: p.layers,
                removed_objects: p.objects,
                freed_bytes: p.bytes,
            })
        }
        Err(_) if stop.requested() => Err(cancelled()),
        Err(e) => Err(err("Pruning the repository", e)),
    }
}

/// What [`disk_usage`] measured.
struct RepoUsage {
    bytes: u64,
    objects: u64,
}

/// The repository's size on disk and the files under `objects/`.
fn disk_usage(repo: &std::path::Path) -> Result<RepoUsage> {
    let all = dnfimage_runtime::disk::usage(repo)?;
    let objects = dnfimage_runtime::disk::usage(&repo.join("objects"))?;
    Ok(RepoUsage {
        bytes: all.bytes,
        objects: objects.files,
    })
}

fn list_images(paths: &Paths) -> Result<Vec<ImportedImage>> {
    let repo = store::open_repo(&paths.repo)?;
    let sysroot = store::load_sysroot(&paths.sysroot)?;
    let in_use = store::in_use(&sysroot, &repo).context("Reading the deployments")?;
    store::images(&repo, &in_use)
}

fn invalid_reference(image: &str, message: String) -> ImporterError {
    ImporterError::InvalidImageReference {
        image: excerpt(image).into_owned(),
        message,
    }
}

fn parse_image(image: &str) -> Result<ImageRef, ImporterError> {
    ImageRef::parse(image).map_err(|e| invalid_reference(image, e.to_string()))
}

fn parse_source(source: &str) -> Result<ImageRef, ImporterError> {
    ImageRef::parse_local(source).map_err(|e| {
        let message = match e {
            ReferenceError::NotLocal => "the source must be on local disk: \"oci:/path[:tag]\" or \
                 \"oci-archive:/path.tar[:tag]\" (the fetcher's cacheReference)"
                .to_string(),
            e => e.to_string(),
        };
        invalid_reference(source, message)
    })
}

/// Imports bootable container images from the fetcher's local OCI cache into the sysroot's
/// ostree repository, layer by layer, and removes those no deployment uses.
#[zlink::service(
    interface = "org.dnfimage.Importer",
    types = [
        ImportPhase, ImportWarningKind, ImportWarning, ImportProgress, ImportResult,
        ImportLayersResult, ImportedImage, PrunePhase, PruneProgress, PruneResult,
    ],
    vendor = "dnfimage",
    product = "dnfimage-importer",
    version = env!("CARGO_PKG_VERSION"),
    url = "https://example.invalid/dnfimage"
)]
impl Importer {
    /// Imports the image at `source` (a local "oci:" or "oci-archive:" reference, normally
    /// the fetcher's `cacheReference`) into the sysroot's ostree repository, layer by layer,
    /// skipping the layers already there, and records it under `image` (the registry
    /// reference the user asked for, "docker://…", never the cache path).
    /// Warns about content the installed libostree drops or moves. Streams progress records,
    /// then one record with the result. Refuses images that are not bootable, fails before
    /// writing when the repository's filesystem lacks space, and on any failure or cancel
    /// leaves no reference to a half-imported image (complete layers are kept for the next
    /// try).
    #[zlink(more)]
    async fn import(
        &self,
        more: bool,
        source: String,
        image: String,
    ) -> impl Stream<Item = Result<Reply<ImportReply>, ImporterError>> + Unpin + use<> {
        let parsed = parse_source(&source).and_then(|source| {
            Ok(Request {
                source,
                image: reference::to_ostree(&parse_image(&image)?),
            })
        });
        let request = match parsed {
            Ok(r) => r,
            Err(e) => return refused(e),
        };
        let paths = self.shared.paths.clone();
        self.spawn_job(
            request.operation(),
            more,
            move |sink, stop| import_job(paths, request, sink, stop),
            |result| ImportReply {
                progress: None,
                result: Some(result),
            },
        )
    }

    /// Imports the layers of the image whose manifest `manifest` ("sha256:…", as stored) the
    /// OCI layout at `layout` holds, while the fetcher still downloads them there (the
    /// `staged` image of its progress records): each layer is read as it arrives, from
    /// `tmp/HEX.partial` and then `blobs/sha256/HEX`, checked against its digest, and kept
    /// as a layer commit, which the `Import` of the image then reuses. Records no image.
    /// Streams progress records, then one record with the result. Fails when a download stops
    /// before its layer is complete; on any failure or cancel, complete layers stay and no
    /// reference to a half-imported layer does.
    #[zlink(more)]
    async fn import_layers(
        &self,
        more: bool,
        layout: String,
        manifest: String,
    ) -> impl Stream<Item = Result<Reply<ImportLayersReply>, ImporterError>> + Unpin + use<> {
        let request = match import::LayersRequest::new(&layout, &manifest) {
            Ok(r) => r,
            Err(e) => return refused(e),
        };
        let paths = self.shared.paths.clone();
        self.spawn_job(
            request.operation(),
            more,
            move |sink, stop| import_layers_job(paths, request, sink, stop),
            |result| ImportLayersReply {
                progress: None,
                result: Some(result),
            },
        )
    }

    /// Cancels the running import or prune; complete layers stay in the repository.
    async fn cancel(&self) -> CancelReply {
        CancelReply {
            cancelled: self.shared.jobs.cancel(),
        }
    }

    /// Lists the images in the repository.
    async fn list_images(&self) -> Result<ListImagesReply, ImporterError> {
        let paths = self.shared.paths.clone();
        let images = tokio::task::spawn_blocking(move || list_images(&paths))
            .await
            .map_err(|e| failed(format!("Listing images: {e}")))?
            .map_err(|e| failed(format!("Listing images: {e:#}")))?;
        Ok(ListImagesReply { images })
    }

    /// Removes every image that no deployment uses and whose reference is not in `keep`
    /// (default: none), the commits the layerer built that no deployment uses, then the
    /// layers no remaining image uses and every object nothing refers to. Streams progress
    /// records, then one record with the result.
    #[zlink(more)]
    async fn prune(
        &self,
        more: bool,
        keep: Option<Vec<String>>,
    ) -> impl Stream<Item = Result<Reply<PruneReply>, ImporterError>> + Unpin + use<> {
        let keep: Result<BTreeSet<String>, ImporterError> = keep
            .unwrap_or_default()
            .iter()
            .map(|k| parse_image(k).map(|r| r.to_string()))
            .collect();
        let keep = match keep {
            Ok(k) => k,
            Err(e) => return refused(e),
        };
        let paths = self.shared.paths.clone();
        self.spawn_job(
            "Pruning the repository".to_string(),
            more,
            move |sink, stop| prune_job(paths, keep, sink, stop),
            |result| PruneReply {
                progress: None,
                result: Some(result),
            },
        )
    }

    /// The space the repository takes on disk: every file and directory under it, counted
    /// as `du` does. Reads the whole repository: takes a while on a large one.
    async fn get_disk_usage(&self) -> Result<GetDiskUsageReply, ImporterError> {
        let repo = self.shared.paths.repo.clone();
        let usage = tokio::task::spawn_blocking(move || disk_usage(&repo))
            .await
            .map_err(|e| failed(format!("Measuring the repository: {e}")))?
            .map_err(|e| failed(format!("Measuring the repository: {e:#}")))?;
        Ok(GetDiskUsageReply {
            path: self.shared.paths.repo.display().to_string(),
            bytes: usage.bytes,
            objects: usage.objects,
        })
    }
}
