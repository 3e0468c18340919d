//! What every dnfimage service shares: socket activation, the call guard (protocol errors and
//! authorisation), idle exit, one-job-at-a-time, `sd_notify` and logging.
//!
//! A service's `main` calls [`activation::take`] first (before threads exist), then
//! [`init_logging`], builds a tokio runtime and calls [`serve`] with its `#[zlink::service]`.

pub mod activation;
pub mod child;
pub mod connections;
pub mod disk;
pub mod guard;
pub mod idle;
pub mod jobs;
pub mod lock;
pub mod notify;
pub mod time;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result};
use zlink::Service;

pub use activation::Activation;
pub use connections::{Caller, ClientSocket, Limits};
pub use guard::{Guarded, Policy};
pub use idle::Activity;
pub use jobs::{Cancellation, Job, JobSlot, Progress, ReplyStream, refused, spawn_streamed};
pub use lock::InstanceLock;

/// Flags every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Directory of the service sockets when not socket-activated.
    #[arg(long, env = "DNFIMAGE_RUNTIME_DIR", default_value = dnfimage_interfaces::DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
    /// Exit after this many seconds with no client and no job; 0 never exits.
    #[arg(long, env = "DNFIMAGE_IDLE_TIMEOUT", default_value_t = 30)]
    pub idle_timeout: u64,
    /// Mode of the socket the service binds itself (octal); under systemd the unit sets it.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Connections served at once; more are refused with TooManyConnections (never above half
    /// the open-file limit).
    #[arg(long, default_value_t = connections::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections one user may have open at once.
    #[arg(long, default_value_t = connections::DEFAULT_MAX_CONNECTIONS_PER_UID)]
    pub max_connections_per_uid: usize,
    /// Seconds a connection may stay open without sending a call before it is closed (0: no
    /// limit).
    #[arg(long, default_value_t = connections::DEFAULT_CONNECTION_TIMEOUT.as_secs())]
    pub connection_timeout: u64,
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

    /// The connection limits, with the total kept under half the open-file limit (raised to
    /// its hard maximum first).
    fn limits(&self) -> Limits {
        let files = raise_nofile();
        let max_connections = self.max_connections.clamp(1, (files / 2).max(16));
        if max_connections < self.max_connections {
            tracing::info!(
                "Serving at most {max_connections} connections: the open-file limit is {files}"
            );
        }
        Limits {
            max_connections,
            max_per_uid: self.max_connections_per_uid.max(1),
            connection_timeout: (self.connection_timeout > 0)
                .then(|| Duration::from_secs(self.connection_timeout)),
            ..Limits::default()
        }
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
    // A client that started us on its socket (`varlinkctl call exec:`) stops us when the socket
    // closes: keep it open until a failure has been printed, so the client shows why.
    let held = activation
        .as_ref()
        .and_then(|a| std::os::fd::AsFd::as_fd(a).try_clone_to_owned().ok());
    let code = run_main(|| run(args, activation));
    drop(held);
    code
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
            // One write, so the line arrives whole even if the process is stopped right after.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("error: {e:#}\n").as_bytes(),
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves the service until idle or SIGTERM/SIGINT, each connection on its own (see
/// [`connections`]): `make` gives the service for one connection, knowing its caller.
///
/// `policy` says which methods change state; `activity` must be the one the service's
/// [`JobSlot`] counts in, so running jobs keep the service alive and SIGTERM waits for them
/// (after asking them to cancel through `jobs`).
pub async fn serve<S>(
    make: impl Fn(Caller) -> S,
    policy: Policy,
    args: &ServiceArgs,
    activation: Option<Activation>,
    activity: Activity,
    jobs: &JobSlot,
) -> Result<()>
where
    S: Service<ClientSocket> + 'static,
{
    let limits = args.limits();
    let interface = policy.interface().to_string();
    let mut bound = None;
    let source = match activation {
        Some(Activation::Listener(fd)) => {
            let std = std::os::unix::net::UnixListener::from(fd);
            std.set_nonblocking(true)
                .context("Making the activation socket non-blocking")?;
            Source::Listening(
                tokio::net::UnixListener::from_std(std)
                    .context("Adopting the activation socket")?,
            )
        }
        Some(Activation::Connected(fd)) => {
            let std = std::os::unix::net::UnixStream::from(fd);
            std.set_nonblocking(true)
                .context("Making the connected socket non-blocking")?;
            Source::Connected(Some(
                tokio::net::UnixStream::from_std(std).context("Adopting the connected socket")?,
            ))
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
            Source::Listening(listener)
        }
    };
    let policy = Rc::new(policy);
    let local = tokio::task::LocalSet::new();
    let result = local
        .run_until(async {
            let mut clients = tokio::task::JoinSet::new();
            let counts = Rc::new(RefCell::new(connections::Counts::default()));
            let mut source = source;
            notify::ready(&format!("Serving {interface}"));
            let mut sigterm =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("Installing the SIGTERM handler")?;
            let mut stopping: Option<&str> = None;
            let listening = matches!(source, Source::Listening(_));
            loop {
                let idle = async {
                    match (listening, args.idle(), stopping) {
                        (true, Some(timeout), None) => {
                            activity.idle_for(timeout).await
                        }
                        _ => std::future::pending().await,
                    }
                };
                let wound_down = async {
                    match stopping {
                        Some(signal) => stop(jobs, &activity, signal).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    accepted = source.accept(&activity) => match accepted {
                        Some(stream) => {
                            let uid = stream.peer_cred().ok().map(|c| c.uid());
                            match connections::admit(&counts, &limits, uid.unwrap_or(u32::MAX)) {
                                Ok(counted) => {
                                    let caller = Caller {
                                        uid,
                                        privileged: uid.is_some_and(|u| policy.is_privileged(u)),
                                    };
                                    let service = make(caller);
                                    let (policy, activity) = (policy.clone(), activity.clone());
                                    clients.spawn_local(async move {
                                        connections::serve_one(stream, uid, service, policy, activity, limits)
                                            .await;
                                        drop(counted);
                                    });
                                }
                                Err(over) => {
                                    clients.spawn_local(connections::refuse(
                                        stream,
                                        counts.clone(),
                                        interface.clone(),
                                        over,
                                    ));
                                }
                            }
                        }
                        None => break,
                    },
                    Some(_) = clients.join_next(), if !clients.is_empty() => {}
                    () = idle => {
                        tracing::info!("Idle, exiting");
                        break;
                    }
                    _ = sigterm.recv(), if stopping.is_none() => stopping = Some("SIGTERM"),
                    _ = tokio::signal::ctrl_c(), if stopping.is_none() => stopping = Some("SIGINT"),
                    () = wound_down => {
                        // Give the clients a moment to send what the job's end queued.
                        let _ = tokio::time::timeout(Duration::from_millis(200), async {
                            while clients.join_next().await.is_some() {}
                        })
                        .await;
                        clients.abort_all();
                        break;
                    }
                }
            }
            notify::stopping();
            // After the listener closed (idle, or the one connected client): serve those still
            // connected to the end.
            while clients.join_next().await.is_some() {}
            anyhow::Ok(())
        })
        .await;
    drop(bound);
    result
}

/// Where connections come from.
enum Source {
    Listening(tokio::net::UnixListener),
    /// One connected socket (`Accept=yes`, `varlinkctl call exec:`): served, then we are done.
    Connected(Option<tokio::net::UnixStream>),
}

impl Source {
    /// The next client, or `None` once the one connected socket was handed out. Accept errors
    /// (e.g. EMFILE under a flood) are logged and waited out, never fatal.
    async fn accept(&mut self, activity: &Activity) -> Option<tokio::net::UnixStream> {
        match self {
            Source::Connected(stream) => stream.take(),
            Source::Listening(listener) => loop {
                match listener.accept().await {
                    Ok((stream, _)) => return Some(stream),
                    Err(e) => {
                        connections::warn_throttled(
                            "accepting",
                            format_args!("Accepting a connection: {e}; retrying"),
                        );
                        // Out of descriptors or memory: wait for a connection to close, or a
                        // moment, rather than spin.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(100), activity.changed())
                                .await;
                    }
                }
            },
        }
    }
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

/// Raises the soft open-file limit to the hard one; returns the limit in force.
fn raise_nofile() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!("Raising the open-file limit, ignoring: {e}");
        }
        limit = getrlimit(Resource::Nofile);
    }
    limit
        .current
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        .unwrap_or(usize::MAX)
}

/// Makes `path` and its parents if missing; a helper for state directories.
pub fn ensure_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("Creating {}", path.display()))
}
