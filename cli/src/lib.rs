//! `dnf-image`: the command line. A pure varlink client: it never touches the sysroot, the cache
//! or a registry itself; it asks the services and shows what they say.

mod output;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dnfimage_interfaces::fetcher::{self, FetchReply, FetcherError, FetcherProxy};
use futures_util::StreamExt;

pub use output::Output;

/// Exit code when there is nothing to do and `--unchanged-exit-77` was given.
pub const EXIT_UNCHANGED: u8 = 77;

/// Container-native OS updates for ostree-based systems.
#[derive(Debug, Parser)]
#[command(name = "dnf-image", version, propagate_version = true)]
pub struct Cli {
    /// Directory holding the service sockets.
    #[arg(long, global = true, env = "DNFIMAGE_RUNTIME_DIR", default_value = dnfimage_interfaces::DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with images in registries and in the local cache.
    #[command(subcommand)]
    Image(ImageCommand),
}

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
    },
    /// Download an image's missing layers into the local cache.
    Fetch {
        /// The image reference.
        image: String,
        /// How many layers to download at once (default 4).
        #[arg(long)]
        concurrency: Option<u64>,
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

/// Connects to a service, saying what to do when it is not there.
async fn connect(cli: &Cli, interface: &str) -> Result<dnfimage_interfaces::Connection> {
    let path = dnfimage_interfaces::socket_path(&cli.runtime_dir, interface);
    dnfimage_interfaces::connect(&cli.runtime_dir, interface)
        .await
        .with_context(|| {
            format!(
                "Connecting to {interface} at {} (is its socket unit active? \
                 `systemctl start dnfimage-{}.socket`)",
                path.display(),
                interface
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_lowercase()
            )
        })
}

/// A fetcher error as a sentence.
pub fn describe(e: &FetcherError) -> String {
    use FetcherError as E;
    match e {
        E::InvalidImageReference { image, message } => {
            format!("Invalid image reference {image:?}: {message}")
        }
        E::ImageNotFound { image, message } => format!("Image {image} not found: {message}"),
        E::RegistryUnreachable { image, message } => {
            format!("Cannot reach the registry of {image}: {message}")
        }
        E::AuthenticationRequired { image, message } => format!(
            "The registry wants credentials for {image}: {message} (give the fetcher an auth file)"
        ),
        E::DigestMismatch { message, .. } => format!("Digest mismatch: {message}"),
        E::NotBootable { image } => format!(
            "{image} is not a bootable OS image (no containers.bootc=1 or ostree.bootable label)"
        ),
        E::InsufficientSpace {
            path,
            needed,
            available,
        } => format!(
            "Not enough space in {path}: {} needed, {} available; free some space or prune the cache",
            output::bytes(*needed),
            output::bytes(*available)
        ),
        E::AlreadyInProgress { image } => {
            format!("Busy: {image}; wait for it or cancel it")
        }
        E::Cancelled { image } => format!("Cancelled fetching {image}"),
        E::PermissionDenied { method } => format!("Permission denied: {method} needs root"),
        E::Failed { message } => message.clone(),
    }
}

fn fetcher_err(e: FetcherError) -> anyhow::Error {
    anyhow::anyhow!(describe(&e))
}

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> Result<u8> {
    let out = Output::new(cli.json);
    match &cli.command {
        Command::Image(cmd) => image(&cli, &out, cmd).await,
    }
}

async fn image(cli: &Cli, out: &Output, cmd: &ImageCommand) -> Result<u8> {
    let mut conn = connect(cli, fetcher::INTERFACE).await?;
    match cmd {
        ImageCommand::Inspect { image } => {
            let reply = conn
                .inspect(image)
                .await
                .context("Calling Inspect")?
                .map_err(fetcher_err)?;
            out.image_info(&reply.image)?;
            Ok(0)
        }
        ImageCommand::Check {
            image,
            current_digest,
            unchanged_exit_77,
        } => {
            let reply = conn
                .check_update(image, current_digest.as_deref())
                .await
                .context("Calling CheckUpdate")?
                .map_err(fetcher_err)?;
            out.check(image, &reply)?;
            Ok(if *unchanged_exit_77 && !reply.update_available {
                EXIT_UNCHANGED
            } else {
                0
            })
        }
        ImageCommand::Fetch { image, concurrency } => {
            let result = fetch(cli, &mut conn, out, image, *concurrency).await?;
            out.fetched(&result)?;
            Ok(0)
        }
        ImageCommand::List => {
            let reply = conn
                .list_cached()
                .await
                .context("Calling ListCached")?
                .map_err(fetcher_err)?;
            out.cached(&reply.images)?;
            Ok(0)
        }
        ImageCommand::Prune { keep } => {
            let reply = conn
                .prune(keep.clone())
                .await
                .context("Calling Prune")?
                .map_err(fetcher_err)?;
            out.pruned(&reply)?;
            Ok(0)
        }
    }
}

/// Fetches with progress; Ctrl-C cancels the fetch in the service.
pub async fn fetch(
    cli: &Cli,
    conn: &mut dnfimage_interfaces::Connection,
    out: &Output,
    image: &str,
    concurrency: Option<u64>,
) -> Result<fetcher::FetchResult> {
    let stream = conn
        .fetch(image, concurrency)
        .await
        .context("Calling Fetch")?;
    futures_util::pin_mut!(stream);
    let mut bar = out.progress("Fetching");
    let mut cancelled = false;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                bar.note("Cancelling…");
                let mut other = connect(cli, fetcher::INTERFACE).await?;
                other.cancel().await.context("Calling Cancel")?.map_err(fetcher_err)?;
                continue;
            }
        };
        let Some(item) = item else {
            anyhow::bail!("The fetcher closed the connection before the fetch ended");
        };
        match item.context("Reading fetch progress")? {
            Err(e) => {
                bar.finish();
                return Err(fetcher_err(e));
            }
            Ok(FetchReply {
                result: Some(result),
                ..
            }) => {
                bar.finish();
                return Ok(result);
            }
            Ok(FetchReply {
                progress: Some(p), ..
            }) => bar.update(&p),
            Ok(_) => {}
        }
    }
}
