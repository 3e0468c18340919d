//! A tiny static HTTP server on 127.0.0.1 for rpm-md repositories: GET and HEAD of the files
//! under one directory, one thread a connection, `Connection: close`. Stopping it closes the
//! port, so clients then see "connection refused" (what an unreachable repository looks like).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// A request the server answered: method, path and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedRequest {
    /// `GET` or `HEAD` (anything else is answered 405).
    pub method: String,
    /// The request path, e.g. `/repodata/repomd.xml`.
    pub path: String,
    /// The status sent.
    pub status: u16,
}

/// Serves the files of a directory over HTTP on a free 127.0.0.1 port until stopped or dropped.
#[derive(Debug)]
pub struct RepoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    log: Arc<Mutex<Vec<ServedRequest>>>,
}

impl RepoServer {
    /// Starts serving `dir`.
    pub fn serve(dir: &Path) -> Result<Self> {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("Binding a port on 127.0.0.1")?;
        listener
            .set_nonblocking(true)
            .context("Making the listener non-blocking")?;
        let addr = listener.local_addr().context("Reading the bound address")?;
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let root = dir.to_path_buf();
        let (stop2, delay2, log2) = (stop.clone(), delay_ms.clone(), log.clone());
        let thread = std::thread::Builder::new()
            .name("repo-server".into())
            .spawn(move || accept_loop(listener, root, stop2, delay2, log2))
            .context("Starting the server thread")?;
        Ok(RepoServer {
            addr,
            stop,
            delay_ms,
            thread: Some(thread),
            log,
        })
    }

    /// The base URL, `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes every later response wait `delay` before it starts (a slow repository).
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Stops serving and closes the port.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("The repository server thread panicked");
        }
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<ServedRequest> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for RepoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: TcpListener,
    root: PathBuf,
    stop: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<ServedRequest>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (root, log) = (root.clone(), log.clone());
                let delay = Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    if let Err(e) = handle(stream, &root, &log) {
                        eprintln!("repo server: {e:#}");
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                eprintln!("repo server: accepting, ignoring: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// `%XX` escapes decoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file under `root` a request path names; `None` if it tries to leave `root`.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let path = percent_decode(path.split(['?', '#']).next().unwrap_or_default());
    let rel = Path::new(path.trim_start_matches('/'));
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| root.join(rel))
}

fn handle(stream: TcpStream, root: &Path, log: &Mutex<Vec<ServedRequest>>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut out = stream;
    let file = resolve(root, &path).filter(|p| p.is_file());
    let status = match (method.as_str(), &file) {
        ("GET" | "HEAD", Some(file)) => {
            let mut f = std::fs::File::open(file)?;
            let len = f.metadata()?.len();
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\
                 Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
            )?;
            if method == "GET" {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n])?;
                }
            }
            200
        }
        ("GET" | "HEAD", None) => {
            out.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            404
        }
        _ => {
            out.write_all(
                b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            405
        }
    };
    out.flush()?;
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ServedRequest {
            method,
            path,
            status,
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(addr)?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = match text.find("\r\n\r\n") {
            Some(i) => buf[i + 4..].to_vec(),
            None => Vec::new(),
        };
        Ok((status, body))
    }

    #[test]
    fn serves_files_and_stops() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        std::fs::create_dir(tmp.path().join("sub"))?;
        std::fs::write(tmp.path().join("sub/a b.txt"), "content")?;
        let mut server = RepoServer::serve(tmp.path())?;
        assert_eq!(
            get(server.addr(), "/sub/a%20b.txt")?,
            (200, b"content".to_vec())
        );
        assert_eq!(get(server.addr(), "/missing")?.0, 404);
        assert_eq!(get(server.addr(), "/../etc/passwd")?.0, 404);
        assert_eq!(server.requests().len(), 3);
        server.stop();
        // Stopped: its thread has ended and its listener is closed. (Connecting to the port says
        // nothing: another test running alongside may already have been given it.)
        assert!(server.thread.is_none(), "the server thread was not joined");
        if let Ok(mut stream) = TcpStream::connect(server.addr()) {
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let _ = stream.write_all(b"GET /sub/a%20b.txt HTTP/1.0\r\n\r\n");
            let _ = stream.read(&mut [0u8; 64]);
        }
        assert_eq!(server.requests().len(), 3, "a stopped server answered");
        Ok(())
    }

    #[test]
    fn request_paths_stay_inside_the_root() {
        let root = Path::new("/srv");
        let cases = [
            ("/repodata/repomd.xml", Some("/srv/repodata/repomd.xml")),
            ("/a%2Bb.rpm?x=1", Some("/srv/a+b.rpm")),
            ("/../x", None),
            ("/a/../../x", None),
        ];
        for (path, want) in cases {
            assert_eq!(resolve(root, path), want.map(PathBuf::from), "{path}");
        }
    }
}
