//! A TCP proxy that makes a loopback registry behave like one across the Internet: every HTTP
//! request waits a fixed delay before it is forwarded, and each connection's responses are
//! capped to a byte rate. (This kernel has no `netem`; `tc tbf` caps the whole link, which hides
//! what concurrency gains.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the proxy slows traffic down.
#[derive(Debug, Clone, Copy)]
pub struct Shaping {
    /// Added before each request is forwarded.
    pub request_delay: Duration,
    /// Response bytes per second on one connection.
    pub bytes_per_second: u64,
    /// After this many response bytes, counted over all connections, the proxy goes silent:
    /// connections stay open, nothing more is sent (a registry that hangs midway).
    pub silent_after: Option<u64>,
}

/// A running proxy; stops when dropped.
pub struct SlowProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream` ("127.0.0.1:PORT").
    pub async fn start(upstream: &str, shaping: Shaping) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("Binding the proxy")?;
        let addr = listener.local_addr()?;
        let upstream = upstream.to_string();
        let sent_in_all = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let sent_in_all = Arc::clone(&sent_in_all);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let _ = relay(client, server, shaping, &sent_in_all).await;
                    }
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const METHODS: [&[u8]; 6] = [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"PATCH ", b"DELETE "];

async fn relay(
    client: TcpStream,
    server: TcpStream,
    shaping: Shaping,
    sent_in_all: &AtomicU64,
) -> std::io::Result<()> {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return server_write.shutdown().await;
            }
            if METHODS.iter().any(|m| buf[..n].starts_with(m)) {
                tokio::time::sleep(shaping.request_delay).await;
            }
            server_write.write_all(&buf[..n]).await?;
        }
    };
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut start = Instant::now();
        let mut sent = 0u64;
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 {
                return client_write.shutdown().await;
            }
            // An idle connection earns no credit for a later burst.
            let due = Duration::from_secs_f64(sent as f64 / shaping.bytes_per_second as f64);
            if start.elapsed() > due + Duration::from_millis(20) {
                start = Instant::now();
                sent = 0;
            }
            if let Some(limit) = shaping.silent_after {
                let before = sent_in_all.fetch_add(n as u64, Ordering::SeqCst);
                if before + n as u64 > limit {
                    let keep = limit.saturating_sub(before) as usize;
                    client_write.write_all(&buf[..keep]).await?;
                    // Hold the connection open, say nothing more.
                    std::future::pending::<()>().await;
                }
            }
            client_write.write_all(&buf[..n]).await?;
            sent += n as u64;
            let due = Duration::from_secs_f64(sent as f64 / shaping.bytes_per_second as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    };
    let (a, b) = tokio::join!(upstream, downstream);
    a.and(b)
}
