//! Serving every client connection on its own, within limits.
//!
//! zlink's `Server` handles one method call at a time across all of its connections, so one slow
//! call (a registry that does not answer, a lock held by another process) would hold every
//! other caller, `Cancel` included. Like sd-varlink, the runtime instead accepts connections
//! itself and serves each with a one-connection server on its own local task: calls on different
//! connections never wait for each other, and the service's state is shared behind its own
//! locks. The same loop enforces the limits a socket open to every local user needs: connections
//! in total and per user (refused with `<interface>.TooManyConnections`, never by exiting), the
//! size of one message, and how long a connection may sit without sending a call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zlink::connection::PassedCredentials;
use zlink::connection::socket::{self, ReadResult, Socket};
use zlink::{Connection, Service};

use crate::guard::{Guarded, Policy};
use crate::idle::{Activity, ActivityGuard};

/// The largest message a client may send. Calls carry a few references, commit ids and package
/// names; the largest real one (a layering request of a few hundred packages) is a few KiB. 1 MiB
/// leaves room for any honest call while bounding what a client can make a service buffer:
/// systemd's 16 MiB also covers its replies, which we do not limit.
pub const DEFAULT_MAX_MESSAGE: usize = 1024 * 1024;
/// Connections served at once; more are refused (and the limit never exceeds half the open
/// file limit, so a flood cannot make `accept` fail for lack of descriptors).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Connections one user may have open at once (sd-varlink caps per user too).
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 128;
/// How long a connection may sit without sending a call before it is closed.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a refused client has to send its first call before the refusal is sent anyway.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Refusals being written at once; past that a connection is just closed.
const MAX_REFUSALS: usize = 64;

/// The limits of one service's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest message, in bytes.
    pub max_message: usize,
    /// Connections at once.
    pub max_connections: usize,
    /// Connections at once per user.
    pub max_per_uid: usize,
    /// Time a connection may wait between calls; `None` for no limit.
    pub connection_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message: DEFAULT_MAX_MESSAGE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            connection_timeout: Some(DEFAULT_CONNECTION_TIMEOUT),
        }
    }
}

/// Who is on the other end of a connection, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The peer's user id, when the kernel told it.
    pub uid: Option<u32>,
    /// Whether the caller may change state (root).
    pub privileged: bool,
}

impl Caller {
    /// A caller with every right: for services driven in-process (tests, tools).
    pub const ROOT: Caller = Caller {
        uid: Some(0),
        privileged: true,
    };
}

/// The open connections, counted in total and per user, for the limits.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    total: usize,
    per_uid: HashMap<u32, usize>,
    refusals: usize,
}

/// Keeps one connection counted until dropped.
#[derive(Debug)]
pub(crate) struct Counted {
    counts: Rc<RefCell<Counts>>,
    uid: u32,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.counts.borrow_mut();
        counts.total -= 1;
        if let Some(n) = counts.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                counts.per_uid.remove(&self.uid);
            }
        }
    }
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    Total(usize),
    PerUid(usize),
}

/// Counts a new connection of `uid`, or says which limit it would exceed.
pub(crate) fn admit(
    counts: &Rc<RefCell<Counts>>,
    limits: &Limits,
    uid: u32,
) -> Result<Counted, Over> {
    let mut c = counts.borrow_mut();
    if c.total >= limits.max_connections {
        return Err(Over::Total(limits.max_connections));
    }
    let mine = c.per_uid.entry(uid).or_insert(0);
    if *mine >= limits.max_per_uid {
        return Err(Over::PerUid(limits.max_per_uid));
    }
    *mine += 1;
    c.total += 1;
    Ok(Counted {
        counts: counts.clone(),
        uid,
    })
}

/// Serves one accepted connection until the client closes it, a limit closes it, or the service
/// stops.
pub(crate) async fn serve_one<S>(
    stream: tokio::net::UnixStream,
    uid: Option<u32>,
    service: S,
    policy: Rc<Policy>,
    activity: Activity,
    limits: Limits,
) where
    S: Service<ClientSocket>,
{
    let socket = match zlink::tokio::unix::Stream::try_from(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("Adopting a client connection: {e}");
            return;
        }
    };
    let conn = Connection::new(Tracked::new(socket, &activity, &limits));
    let server = zlink::Server::new(
        Once::Ready(Box::new(conn)),
        Guarded::new(service, policy, uid),
    );
    if let Err(e) = server.run().await {
        tracing::debug!("Serving a client, ignoring: {e}");
    }
}

/// Tells a client over a limit so in a varlink error, answering its first call, then closes.
pub(crate) async fn refuse(
    mut stream: tokio::net::UnixStream,
    counts: Rc<RefCell<Counts>>,
    interface: String,
    over: Over,
) {
    {
        let mut c = counts.borrow_mut();
        if c.refusals >= MAX_REFUSALS {
            return;
        }
        c.refusals += 1;
    }
    let (scope, limit) = match over {
        Over::Total(n) => ("in all", n),
        Over::PerUid(n) => ("for your user", n),
    };
    warn_throttled(
        "refusing",
        format_args!("Refusing a connection: {limit} connections {scope} are open"),
    );
    // Wait (briefly, reading a bounded amount) for the first call so the error is its reply.
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 || buf[..n].contains(&0) {
                break;
            }
        }
    })
    .await;
    let reply = serde_json::json!({
        "error": format!("{interface}.TooManyConnections"),
        "parameters": {"limit": limit, "scope": if matches!(over, Over::Total(_)) { "total" } else { "user" }},
    });
    let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
    bytes.push(0);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, stream.write_all(&bytes)).await;
    counts.borrow_mut().refusals -= 1;
}

thread_local! {
    static LAST_WARNED: RefCell<HashMap<&'static str, std::time::Instant>> =
        RefCell::new(HashMap::new());
}

/// Logs `message` at warn level at most once a second for each `kind`, the rest at debug: a
/// flood of clients must not flood the journal too.
pub(crate) fn warn_throttled(kind: &'static str, message: std::fmt::Arguments<'_>) {
    let now = std::time::Instant::now();
    let due = LAST_WARNED.with(|last| {
        let mut last = last.borrow_mut();
        let due = last
            .get(kind)
            .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(1));
        if due {
            last.insert(kind, now);
        }
        due
    });
    if due {
        tracing::warn!("{message}");
    } else {
        tracing::debug!("{message}");
    }
}

/// A listener that yields one connection, then reports closure once: a zlink server over it
/// serves that connection alone and returns when it is done.
#[derive(Debug)]
enum Once {
    Ready(Box<Connection<ClientSocket>>),
    Taken,
    Closed,
}

impl zlink::Listener for Once {
    type Socket = ClientSocket;

    async fn accept(&mut self) -> zlink::Result<Option<Connection<Self::Socket>>> {
        match std::mem::replace(self, Once::Closed) {
            Once::Ready(conn) => {
                *self = Once::Taken;
                Ok(Some(*conn))
            }
            Once::Taken => Ok(None),
            // The server polls a closed listener again on every turn: it must pend, not spin.
            Once::Closed => std::future::pending().await,
        }
    }
}

/// A client socket that counts as an open connection until both of its halves are dropped, and
/// whose read half enforces the message-size and between-calls limits.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    guard: std::sync::Arc<ActivityGuard>,
    limits: Limits,
}

impl<S: Socket> Tracked<S> {
    /// Wraps `inner`, counting it in `activity`, reading within `limits`.
    pub fn new(inner: S, activity: &Activity, limits: &Limits) -> Self {
        Self {
            inner,
            guard: std::sync::Arc::new(activity.connection()),
            limits: *limits,
        }
    }
}

impl<S: Socket> Socket for Tracked<S>
where
    S::ReadHalf: socket::UnixSocket,
{
    type ReadHalf = TrackedRead<S::ReadHalf>;
    type WriteHalf = TrackedWrite<S::WriteHalf>;
    const CAN_TRANSFER_FDS: bool = S::CAN_TRANSFER_FDS;

    fn split(self) -> (Self::ReadHalf, Self::WriteHalf) {
        let (read, write) = self.inner.split();
        (
            TrackedRead {
                inner: read,
                _guard: self.guard.clone(),
                max_message: self.limits.max_message,
                timeout: self.limits.connection_timeout,
                pending: 0,
            },
            TrackedWrite {
                inner: write,
                _guard: self.guard,
            },
        )
    }
}

/// The read half of a [`Tracked`] socket.
#[derive(Debug)]
pub struct TrackedRead<H> {
    inner: H,
    _guard: std::sync::Arc<ActivityGuard>,
    max_message: usize,
    timeout: Option<Duration>,
    /// Bytes of the message being received so far (since the last NUL).
    pending: usize,
}

fn closing(kind: std::io::ErrorKind, message: String) -> zlink::Error {
    tracing::info!("Closing a connection: {message}");
    zlink::Error::Io(std::io::Error::new(kind, message))
}

impl<H: socket::ReadHalf> socket::ReadHalf for TrackedRead<H> {
    async fn read(&mut self, buf: &mut [u8]) -> zlink::Result<ReadResult> {
        // Never read past the size limit, so no more than it is ever buffered.
        let room = (self.max_message + 1).saturating_sub(self.pending).max(1);
        let len = buf.len().min(room);
        let read = self.inner.read(&mut buf[..len]);
        let result = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, read).await.map_err(|_| {
                closing(
                    std::io::ErrorKind::TimedOut,
                    format!("no call for {} s", limit.as_secs()),
                )
            })??,
            None => read.await?,
        };
        let got = &buf[..result.bytes_read()];
        self.pending = match got.iter().rposition(|b| *b == 0) {
            Some(last_nul) => got.len() - last_nul - 1,
            None => self.pending + got.len(),
        };
        if self.pending > self.max_message {
            return Err(closing(
                std::io::ErrorKind::InvalidData,
                format!("a message exceeds {} bytes", self.max_message),
            ));
        }
        Ok(result)
    }
}

impl<H: AsFd> AsFd for TrackedRead<H> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl<H: socket::UnixSocket> socket::UnixSocket for TrackedRead<H> {}

/// The write half of a [`Tracked`] socket.
#[derive(Debug)]
pub struct TrackedWrite<H> {
    inner: H,
    _guard: std::sync::Arc<ActivityGuard>,
}

impl<H: socket::WriteHalf> socket::WriteHalf for TrackedWrite<H> {
    async fn write(
        &mut self,
        buf: &[u8],
        fds: &[impl AsFd],
        credentials: Option<&PassedCredentials>,
    ) -> zlink::Result<()> {
        self.inner.write(buf, fds, credentials).await
    }
}

impl<H: AsFd> AsFd for TrackedWrite<H> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

/// The client socket type every service serves.
pub type ClientSocket = Tracked<zlink::tokio::unix::Stream>;

#[cfg(test)]
mod tests {
    use super::*;
    use zlink::connection::socket::ReadHalf;

    #[test]
    fn admits_within_the_limits() {
        let counts = Rc::new(RefCell::new(Counts::default()));
        let limits = Limits {
            max_connections: 3,
            max_per_uid: 2,
            ..Limits::default()
        };
        let a = admit(&counts, &limits, 1000).unwrap();
        let _b = admit(&counts, &limits, 1000).unwrap();
        assert_eq!(admit(&counts, &limits, 1000).unwrap_err(), Over::PerUid(2));
        let _c = admit(&counts, &limits, 0).unwrap();
        assert_eq!(admit(&counts, &limits, 5).unwrap_err(), Over::Total(3));
        drop(a);
        let _d = admit(&counts, &limits, 1000).unwrap();
        assert_eq!(counts.borrow().total, 3);
    }

    fn pair(
        limits: &Limits,
    ) -> (
        TrackedRead<<zlink::tokio::unix::Stream as Socket>::ReadHalf>,
        tokio::net::UnixStream,
    ) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let sock = Tracked::new(
            zlink::tokio::unix::Stream::try_from(a).unwrap(),
            &Activity::new(),
            limits,
        );
        (sock.split().0, b)
    }

    #[tokio::test]
    async fn closes_on_an_oversized_message() {
        let limits = Limits {
            max_message: 100,
            ..Limits::default()
        };
        let (mut read, mut peer) = pair(&limits);
        let mut buf = vec![0u8; 4096];
        // Two messages of 60 bytes each pass: the count restarts after each NUL.
        let mut two = vec![b'x'; 60];
        two.push(0);
        two.extend(vec![b'y'; 60]);
        two.push(0);
        peer.write_all(&two).await.unwrap();
        let mut seen = 0;
        while seen < two.len() {
            seen += read.read(&mut buf).await.unwrap().bytes_read();
        }
        peer.write_all(&[b'z'; 150]).await.unwrap();
        let err = loop {
            match read.read(&mut buf).await {
                Ok(r) => assert!(r.bytes_read() > 0),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("exceeds 100 bytes"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn closes_a_connection_that_sends_nothing() {
        let limits = Limits {
            connection_timeout: Some(Duration::from_secs(60)),
            ..Limits::default()
        };
        let (mut read, _peer) = pair(&limits);
        let mut buf = vec![0u8; 64];
        let err = read.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("no call for 60 s"), "{err}");
    }
}
