//! What every dnfimage service shares: socket activation, the call guard (protocol errors and
//! authorisation), idle exit, one-job-at-a-time, `sd_notify` and logging.
//!
//! A service's `main` calls [`activation::take`] first (before threads exist), then
//! [`init_logging`], builds a tokio runtime and calls [`serve`] with its `#[zlink::service]`.

pub mod activation;
pub mod child;
pub mod guard;
pub mod idle;
pub mod jobs;
pub mod notify;
pub mod time;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use zlink::{Server, Service};

pub use activation::Activation;
pub use guard::{Guarded, Policy};
pub use idle::{Activity, ClientSocket, IdleListener};
pub use jobs::{Job, JobSlot};

/// Flags every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Directory of the service sockets when not socket-activated.
    #[arg(long, env = "DNFIMAGE_RUNTIME_DIR", default_value = dnfimage_interfaces::DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
    /// Exit after this many seconds with no client and no job; 0 never exits.
    #[arg(long, env = "DNFIMAGE_IDLE_TIMEOUT", default_value_t = 30)]
    pub idle_timeout: u64,
    /// Also let this user call state-changing methods (root always may). For tests.
    #[arg(long = "allow-uid", env = "DNFIMAGE_ALLOW_UID", value_delimiter = ',')]
    pub allow_uids: Vec<u32>,
    /// Mode of the socket the service binds itself (octal); under systemd the unit sets it.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("not an octal mode: {e}"))
}

impl ServiceArgs {
    /// The socket path for `interface` under the runtime directory.
    pub fn socket_path(&self, interface: &str) -> PathBuf {
        self.runtime_dir.join(interface)
    }

    fn idle(&self) -> Option<Duration> {
        (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout))
    }
}

/// Sets up `tracing`: to the journal when stderr is connected to it, else compact to stderr.
/// The filter comes from `DNFIMAGE_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    // zlink logs every client that disconnects; that is not news.
    let filter = tracing_subscriber::EnvFilter::try_from_env("DNFIMAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zlink_core=warn"));
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .without_time()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

/// The whole `main` of a service: takes the activation socket (before any thread exists), runs
/// `before_threads` (for process-wide setup that must happen single-threaded), parses the
/// command line, sets up logging and runs `run` on a fresh runtime.
pub fn service_main<A, F>(
    before_threads: impl FnOnce(),
    run: impl FnOnce(A, Option<Activation>) -> F,
) -> std::process::ExitCode
where
    A: clap::Parser,
    F: std::future::Future<Output = Result<()>>,
{
    let activation = match activation::take() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    before_threads();
    let args = A::parse();
    init_logging();
    run_main(|| run(args, activation))
}

/// Runs `main` on a fresh multi-threaded runtime, printing a failure once as `error: …`.
pub fn run_main<F>(main: impl FnOnce() -> F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: Starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves `service` until idle or SIGTERM/SIGINT.
///
/// `policy` says which methods change state; `activity` must be the one the service's
/// [`JobSlot`] counts in, so running jobs keep the service alive and SIGTERM waits for them
/// (after asking them to cancel through `jobs`).
pub async fn serve<S>(
    service: S,
    policy: Policy,
    args: &ServiceArgs,
    activation: Option<Activation>,
    activity: Activity,
    jobs: &JobSlot,
) -> Result<()>
where
    S: Service<ClientSocket>,
{
    let mut policy = policy;
    for uid in &args.allow_uids {
        policy = policy.allow_uid(*uid);
    }
    let interface = policy.interface().to_string();
    let mut bound = None;
    let listener = match activation {
        Some(Activation::Listener(fd)) => {
            let std = std::os::unix::net::UnixListener::from(fd);
            std.set_nonblocking(true)
                .context("Making the activation socket non-blocking")?;
            let listener = tokio::net::UnixListener::from_std(std)
                .context("Adopting the activation socket")?;
            IdleListener::listening(listener, activity.clone(), args.idle())
        }
        Some(Activation::Connected(fd)) => {
            let std = std::os::unix::net::UnixStream::from(fd);
            std.set_nonblocking(true)
                .context("Making the connected socket non-blocking")?;
            let stream =
                tokio::net::UnixStream::from_std(std).context("Adopting the connected socket")?;
            IdleListener::connected(stream, activity.clone())
        }
        None => {
            let path = args.socket_path(&interface);
            let std = activation::bind(&path, Some(args.socket_mode))?;
            std.set_nonblocking(true)
                .context("Making the socket non-blocking")?;
            let listener =
                tokio::net::UnixListener::from_std(std).context("Adopting the bound socket")?;
            tracing::info!("Listening on {}", path.display());
            bound = Some(RemoveOnDrop(path));
            IdleListener::listening(listener, activity.clone(), args.idle())
        }
    };
    let server = Server::new(listener, Guarded::new(service, policy));
    notify::ready(&format!("Serving {interface}"));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("Installing the SIGTERM handler")?;
    let run = server.run();
    futures_util::pin_mut!(run);
    let signal = tokio::select! {
        r = &mut run => {
            notify::stopping();
            drop(bound);
            return r.context("Serving clients");
        }
        _ = sigterm.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    // Keep serving while the job winds down, so its client gets the final (Cancelled) reply.
    tokio::select! {
        r = &mut run => r.context("Serving clients")?,
        () = stop(jobs, &activity, signal) => {
            // Give the server a moment to send what the job's end queued.
            let _ = tokio::time::timeout(Duration::from_millis(200), &mut run).await;
        }
    }
    notify::stopping();
    drop(bound);
    Ok(())
}

async fn stop(jobs: &JobSlot, activity: &Activity, signal: &str) {
    notify::stopping();
    match jobs.cancel() {
        Some(what) => {
            tracing::info!("{signal}: cancelling {what:?} and exiting");
            if tokio::time::timeout(Duration::from_secs(60), activity.jobs_done())
                .await
                .is_err()
            {
                tracing::warn!("The job did not stop within 60 s; exiting anyway");
            }
        }
        None => tracing::info!("{signal}: exiting"),
    }
}

/// Removes the socket file the service bound itself when the service exits.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::debug!("Removing {}, ignoring: {e}", self.0.display());
        }
    }
}

/// Makes `path` and its parents if missing; a helper for state directories.
pub fn ensure_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("Creating {}", path.display()))
}
