//! `dnf-image image …`: registries and the fetcher's cache.

use anyhow::{Context, Result};
use clap::Subcommand;
use dnfimage_interfaces::fetcher::{self, FetchResult, FetcherProxy};

use crate::errors::service_error;
use crate::{Cli, EXIT_UNCHANGED, Output, connect, progress};

/// `dnf-image image …`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Show an image's digest, version, labels and layers without downloading it.
    Inspect {
        /// The image: docker://host/name:tag (default transport), oci:/dir[:tag] or oci-archive:/file[:tag].
        image: String,
    },
    /// Tell whether an image moved and how much fetching it would download.
    Check {
        /// The image reference.
        image: String,
        /// Compare with this manifest digest instead of the one last fetched.
        #[arg(long)]
        current_digest: Option<String>,
        /// Exit with 77 when there is no update.
        #[arg(long)]
        unchanged_exit_77: bool,
        /// Do not check the image against the host's signature policy.
        #[arg(long)]
        no_signature_verification: bool,
    },
    /// Download an image's missing layers into the local cache.
    Fetch {
        /// The image reference.
        image: String,
        /// How many layers to download at once (default 8).
        #[arg(long)]
        concurrency: Option<u64>,
        /// Do not check the image against the host's signature policy.
        #[arg(long)]
        no_signature_verification: bool,
    },
    /// List the images in the local cache.
    List,
    /// Remove cached images, keeping the ones named.
    Prune {
        /// Keep this image (repeatable).
        #[arg(long)]
        keep: Vec<String>,
    },
}

pub(crate) async fn run(cli: &Cli, out: &Output, cmd: &ImageCommand) -> Result<u8> {
    let mut conn = connect(cli, fetcher::INTERFACE).await?;
    match cmd {
        ImageCommand::Inspect { image } => {
            let reply = conn
                .inspect(image)
                .await
                .context("Calling Inspect")?
                .map_err(service_error)?;
            out.image_info(&reply.image)?;
            Ok(0)
        }
        ImageCommand::Check {
            image,
            current_digest,
            unchanged_exit_77,
            no_signature_verification,
        } => {
            let reply = conn
                .check_update(
                    image,
                    current_digest.as_deref(),
                    Some(!no_signature_verification),
                )
                .await
                .context("Calling CheckUpdate")?
                .map_err(service_error)?;
            out.check(image, &reply)?;
            Ok(if *unchanged_exit_77 && !reply.update_available {
                EXIT_UNCHANGED
            } else {
                0
            })
        }
        ImageCommand::Fetch {
            image,
            concurrency,
            no_signature_verification,
        } => {
            let result = fetch(
                cli,
                &mut conn,
                out,
                image,
                *concurrency,
                !no_signature_verification,
                None,
            )
            .await?;
            out.fetched(&result)?;
            Ok(0)
        }
        ImageCommand::List => {
            let reply = conn
                .list_cached()
                .await
                .context("Calling ListCached")?
                .map_err(service_error)?;
            out.cached(&reply.images)?;
            Ok(0)
        }
        ImageCommand::Prune { keep } => {
            let reply = conn
                .prune(keep.clone())
                .await
                .context("Calling Prune")?
                .map_err(service_error)?;
            out.pruned(&reply)?;
            Ok(0)
        }
    }
}

/// Fetches with progress; Ctrl-C cancels the fetch in the service. `staged` receives where
/// the image is stored as soon as the fetcher says (its layers can be imported while they
/// download).
pub(crate) async fn fetch(
    cli: &Cli,
    conn: &mut dnfimage_interfaces::Connection,
    out: &Output,
    image: &str,
    concurrency: Option<u64>,
    verify: bool,
    staged: Option<tokio::sync::oneshot::Sender<fetcher::StagedImage>>,
) -> Result<FetchResult> {
    use futures_util::StreamExt;
    let call = progress::Call {
        interface: fetcher::INTERFACE,
        doing: "fetching",
    };
    let stream = conn
        .fetch(image, concurrency, Some(verify))
        .await
        .map_err(|e| progress::call_failed(call, "Calling Fetch", false, e))?;
    let mut staged = staged;
    let stream = stream.inspect(move |item| {
        if let Ok(Ok(record)) = item
            && let Some(found) = record.progress.as_ref().and_then(|p| p.staged.clone())
            && let Some(tx) = staged.take()
        {
            let _ = tx.send(found);
        }
    });
    progress::drive(call, stream, out.progress("Fetching"), || {
        progress::cancel(cli, fetcher::INTERFACE)
    })
    .await
}
