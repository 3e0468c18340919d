//! Knowing when a service is idle: open connections and running jobs are counted, and the
//! listener stops accepting once both have been zero for the idle timeout.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use zlink::connection::socket::{self, ReadResult, Socket};
use zlink::{Connection, connection::PassedCredentials};

/// Counts of what keeps a service busy. Cheap to clone; every clone is the same counter.
#[derive(Debug, Clone)]
pub struct Activity {
    inner: Arc<ActivityInner>,
}

#[derive(Debug)]
struct ActivityInner {
    connections: AtomicUsize,
    jobs: AtomicUsize,
    /// Bumped on every change, so waiters restart their idle timer.
    changed: watch::Sender<u64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A new counter with nothing active.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ActivityInner {
                connections: AtomicUsize::new(0),
                jobs: AtomicUsize::new(0),
                changed: watch::channel(0).0,
            }),
        }
    }

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Running jobs.
    pub fn jobs(&self) -> usize {
        self.inner.jobs.load(Ordering::SeqCst)
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Marks a job as running until the guard is dropped.
    pub fn job(&self) -> ActivityGuard {
        self.inner.jobs.fetch_add(1, Ordering::SeqCst);
        self.bump();
        ActivityGuard {
            activity: self.clone(),
            kind: Kind::Job,
        }
    }

    fn connection(&self) -> ActivityGuard {
        self.inner.connections.fetch_add(1, Ordering::SeqCst);
        self.bump();
        ActivityGuard {
            activity: self.clone(),
            kind: Kind::Connection,
        }
    }

    /// Resolves once nothing has been active for `timeout` in a row.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut changes = self.inner.changed.subscribe();
        loop {
            changes.mark_unchanged();
            let busy = self.connections() > 0 || self.jobs() > 0;
            if busy {
                // Wait for something to change, then look again.
                if changes.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    if self.connections() == 0 && self.jobs() == 0 {
                        return;
                    }
                }
                r = changes.changed() => if r.is_err() { return },
            }
        }
    }

    /// Resolves once no job runs.
    pub async fn jobs_done(&self) {
        let mut changes = self.inner.changed.subscribe();
        while self.jobs() > 0 {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Connection,
    Job,
}

/// Keeps a connection or job counted while alive.
#[derive(Debug)]
pub struct ActivityGuard {
    activity: Activity,
    kind: Kind,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let counter = match self.kind {
            Kind::Connection => &self.activity.inner.connections,
            Kind::Job => &self.activity.inner.jobs,
        };
        counter.fetch_sub(1, Ordering::SeqCst);
        self.activity.bump();
    }
}

/// A client socket that counts as an open connection until both of its halves are dropped.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    guard: Arc<ActivityGuard>,
}

impl<S: Socket> Tracked<S> {
    /// Wraps `inner`, counting it in `activity`.
    pub fn new(inner: S, activity: &Activity) -> Self {
        Self {
            inner,
            guard: Arc::new(activity.connection()),
        }
    }
}

impl<S: Socket> Socket for Tracked<S>
where
    S::ReadHalf: socket::UnixSocket,
{
    type ReadHalf = TrackedHalf<S::ReadHalf>;
    type WriteHalf = TrackedHalf<S::WriteHalf>;
    const CAN_TRANSFER_FDS: bool = S::CAN_TRANSFER_FDS;

    fn split(self) -> (Self::ReadHalf, Self::WriteHalf) {
        let (read, write) = self.inner.split();
        (
            TrackedHalf {
                inner: read,
                _guard: self.guard.clone(),
            },
            TrackedHalf {
                inner: write,
                _guard: self.guard,
            },
        )
    }
}

/// One half of a [`Tracked`] socket.
#[derive(Debug)]
pub struct TrackedHalf<H> {
    inner: H,
    _guard: Arc<ActivityGuard>,
}

impl<H: socket::ReadHalf> socket::ReadHalf for TrackedHalf<H> {
    async fn read(&mut self, buf: &mut [u8]) -> zlink::Result<ReadResult> {
        self.inner.read(buf).await
    }
}

impl<H: socket::WriteHalf> socket::WriteHalf for TrackedHalf<H> {
    async fn write(
        &mut self,
        buf: &[u8],
        fds: &[impl AsFd],
        credentials: Option<&PassedCredentials>,
    ) -> zlink::Result<()> {
        self.inner.write(buf, fds, credentials).await
    }
}

impl<H: AsFd> AsFd for TrackedHalf<H> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl<H: socket::UnixSocket> socket::UnixSocket for TrackedHalf<H> {}

/// The client socket type every service serves.
pub type ClientSocket = Tracked<zlink::tokio::unix::Stream>;

/// Accepts clients until the service has been idle for the timeout, then reports closure so the
/// server returns once its last reply is out.
#[derive(Debug)]
pub struct IdleListener {
    source: Source,
    activity: Activity,
    idle_timeout: Option<Duration>,
}

#[derive(Debug)]
enum Source {
    Listening(tokio::net::UnixListener),
    /// One connected socket (`Accept=yes`, `varlinkctl call exec:`): served, then we are done.
    Connected(Option<tokio::net::UnixStream>),
    Closed,
}

impl IdleListener {
    /// Accepts on a listening socket. `idle_timeout` of `None` means never exit on idle.
    pub fn listening(
        listener: tokio::net::UnixListener,
        activity: Activity,
        idle_timeout: Option<Duration>,
    ) -> Self {
        Self {
            source: Source::Listening(listener),
            activity,
            idle_timeout,
        }
    }

    /// Serves one connected socket and then closes.
    pub fn connected(stream: tokio::net::UnixStream, activity: Activity) -> Self {
        Self {
            source: Source::Connected(Some(stream)),
            activity,
            idle_timeout: None,
        }
    }

    fn wrap(&self, stream: tokio::net::UnixStream) -> zlink::Result<Connection<ClientSocket>> {
        let stream = zlink::tokio::unix::Stream::try_from(stream)?;
        Ok(Connection::new(Tracked::new(stream, &self.activity)))
    }
}

impl zlink::Listener for IdleListener {
    type Socket = ClientSocket;

    async fn accept(&mut self) -> zlink::Result<Option<Connection<Self::Socket>>> {
        match &mut self.source {
            Source::Closed => std::future::pending().await,
            Source::Connected(stream) => match stream.take() {
                Some(stream) => self.wrap(stream).map(Some),
                None => {
                    self.source = Source::Closed;
                    Ok(None)
                }
            },
            Source::Listening(listener) => {
                let idle = async {
                    match self.idle_timeout {
                        Some(timeout) => self.activity.idle_for(timeout).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    accepted = listener.accept() => {
                        let (stream, _) = accepted?;
                        self.wrap(stream).map(Some)
                    }
                    () = idle => {
                        tracing::info!("Idle, exiting");
                        self.source = Source::Closed;
                        Ok(None)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_jobs_and_connections() {
        let activity = Activity::new();
        let job = activity.job();
        let waiter = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.idle_for(Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!waiter.is_finished(), "idle while a job runs");
        drop(job);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            !waiter.is_finished(),
            "idle before the timeout after the job ended"
        );
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(waiter.is_finished(), "not idle 35 s after the job ended");
    }

    #[tokio::test]
    async fn tracked_connection_counts_until_both_halves_drop() {
        let activity = Activity::new();
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let sock = Tracked::new(zlink::tokio::unix::Stream::try_from(a).unwrap(), &activity);
        assert_eq!(activity.connections(), 1);
        let (r, w) = sock.split();
        drop(r);
        assert_eq!(activity.connections(), 1);
        drop(w);
        assert_eq!(activity.connections(), 0);
    }
}
