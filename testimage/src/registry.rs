//! A throwaway `docker-registry` on 127.0.0.1 whose access log tests can read.
//!
//! The registry stores blobs on the filesystem under the work directory, so a test can corrupt
//! one ([`Registry::blob_data_path`]) and can see which blobs a client fetched
//! ([`Registry::blob_requests_since`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The registry binary (Debian package `docker-registry`); `DNFIMAGE_DOCKER_REGISTRY` overrides.
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// How long a starting registry may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Query parameter of the marker requests that flush the access log.
const SYNC_MARKER: &str = "dnfimage-log-sync=";

/// A running `docker-registry serve` on a free 127.0.0.1 port. Stopped on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    port: u16,
    workdir: PathBuf,
    sync_counter: AtomicU64,
    credentials: Option<(String, String)>,
}

/// One request from the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request URI including any query string, e.g. `/v2/dnfimage/base/blobs/sha256:…`.
    pub path: String,
    /// HTTP status code of the response.
    pub status: u16,
    /// Response body bytes the registry sent.
    pub bytes: u64,
}

impl AccessLogEntry {
    /// The blob digest (`sha256:<hex>`) when this is a request for `/v2/<name>/blobs/<digest>`.
    pub fn blob_digest(&self) -> Option<&str> {
        let path = self.path.split('?').next().unwrap_or_default();
        let (name, digest) = path.strip_prefix("/v2/")?.split_once("/blobs/")?;
        let hex = digest.strip_prefix("sha256:")?;
        let valid = !name.is_empty()
            && hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then_some(digest)
    }
}

/// Parse one line of the registry's combined-format access log; `None` for any other line.
///
/// `127.0.0.1 - - [26/Nov/2026:03:33:06 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`
pub fn parse_access_log_line(line: &str) -> Option<AccessLogEntry> {
    // The request is the first quoted field; logrus lines (`time="…" level=…`) fail below.
    let (prefix, rest) = line.split_once('"')?;
    if !prefix.contains(" - ") || !prefix.trim_end().ends_with(']') {
        return None;
    }
    let (request, rest) = rest.split_once('"')?;
    let mut request = request.split(' ');
    let method = request.next()?;
    let path = request.next()?;
    if !request.next()?.starts_with("HTTP/") || !path.starts_with('/') {
        return None;
    }
    if !["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"].contains(&method) {
        return None;
    }
    let mut rest = rest.split_whitespace();
    let status = rest.next()?.parse().ok()?;
    let bytes = rest.next()?.parse().ok()?;
    Some(AccessLogEntry {
        method: method.to_string(),
        path: path.to_string(),
        status,
        bytes,
    })
}

/// Pick a port that is free right now: bind :0, read the port, release it.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("Binding a free port")?;
    Ok(listener
        .local_addr()
        .context("Reading bound address")?
        .port())
}

/// A minimal HTTP/1.0 GET; returns the status code.
pub(crate) fn http_get_status(addr: &str, path: &str) -> Result<u16> {
    let sockaddr: SocketAddr = addr.parse().with_context(|| format!("Parsing {addr}"))?;
    let mut stream = TcpStream::connect_timeout(&sockaddr, Duration::from_secs(2))
        .with_context(|| format!("Connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("Sending GET {path}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("Reading response to GET {path}"))?;
    let response = String::from_utf8_lossy(&response);
    let status_line = response.lines().next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    match (parts.next(), parts.next().and_then(|s| s.parse().ok())) {
        (Some(proto), Some(status)) if proto.starts_with("HTTP/") => Ok(status),
        _ => bail!("Unexpected HTTP response to GET {path}: {status_line:?}"),
    }
}

impl Registry {
    /// Start a registry storing its data under `workdir` (created if missing).
    ///
    /// Files in `workdir`: `config.yml`, `registry.log` (stdout and stderr, including the access
    /// log) and `storage/`. Returns once `GET /v2/` answers 200.
    pub fn start(workdir: &Path) -> Result<Registry> {
        Self::start_with(workdir, None)
    }

    /// Like [`Registry::start`], for a registry that serves only `user` with `password`
    /// (htpasswd auth, the password bcrypt-hashed by `htpasswd -Bbc` from apache2-utils, in
    /// `workdir/htpasswd`): anything else is answered 401 "authentication required".
    /// [`Registry::credentials`] gives them to pushes.
    pub fn start_with_auth(workdir: &Path, user: &str, password: &str) -> Result<Registry> {
        Self::start_with(workdir, Some((user.to_string(), password.to_string())))
    }

    fn start_with(workdir: &Path, credentials: Option<(String, String)>) -> Result<Registry> {
        std::fs::create_dir_all(workdir.join("storage"))
            .with_context(|| format!("Creating {}", workdir.display()))?;
        let workdir = std::path::absolute(workdir).context("Resolving registry workdir")?;
        let mut last_err = None;
        // Another process can take the port between our probe and the registry's bind: retry.
        for _ in 0..5 {
            let mut registry = Registry {
                child: None,
                port: free_port()?,
                workdir: workdir.clone(),
                sync_counter: AtomicU64::new(0),
                credentials: credentials.clone(),
            };
            match registry.spawn() {
                Ok(()) => return Ok(registry),
                Err(e) if registry.log_tail().contains("address already in use") => {
                    last_err = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("No free port"))).context("Starting docker-registry")
    }

    /// `USER:PASSWORD` for `skopeo --dest-creds`/`--creds`, when the registry requires them.
    pub fn credentials(&self) -> Option<String> {
        self.credentials
            .as_ref()
            .map(|(user, password)| format!("{user}:{password}"))
    }

    fn htpasswd_path(&self) -> PathBuf {
        self.workdir.join("htpasswd")
    }

    fn config_path(&self) -> PathBuf {
        self.workdir.join("config.yml")
    }

    /// The file holding the registry's stdout and stderr, including the access log.
    pub fn log_path(&self) -> PathBuf {
        self.workdir.join("registry.log")
    }

    /// Root of the registry's filesystem storage.
    pub fn storage_dir(&self) -> PathBuf {
        self.workdir.join("storage")
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:PORT/<name_and_tag>`, e.g. for `dnfimage/base:v1`.
    pub fn docker_ref(&self, name_and_tag: &str) -> String {
        format!("docker://{}/{name_and_tag}", self.addr())
    }

    fn write_config(&self) -> Result<()> {
        let mut config = format!(
            "version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {addr}
  secret: dnfimage-test-registry
",
            storage = self.storage_dir().display(),
            addr = self.addr()
        );
        if let Some((user, password)) = &self.credentials {
            crate::cmd::run(
                Command::new("htpasswd")
                    .arg("-Bbc")
                    .arg(self.htpasswd_path())
                    .args([user, password]),
            )
            .context("Writing the registry's htpasswd (htpasswd is in apache2-utils)")?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: dnfimage-test\n    path: {}\n",
                self.htpasswd_path().display()
            ));
        }
        std::fs::write(self.config_path(), config).context("Writing registry config")
    }

    fn spawn(&mut self) -> Result<()> {
        self.write_config()?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("Opening registry log")?;
        let bin = std::env::var_os("DNFIMAGE_DOCKER_REGISTRY").unwrap_or(REGISTRY_BIN.into());
        let child = Command::new(&bin)
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("Duplicating log fd")?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "Spawning {} (Debian package docker-registry)",
                    Path::new(&bin).display()
                )
            })?;
        self.child = Some(child);
        let ready = self.wait_ready();
        if ready.is_err() {
            self.stop();
        }
        ready
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().context("Registry is not running")?;
            if let Some(status) = child.try_wait().context("Polling registry process")? {
                self.child = None;
                bail!(
                    "docker-registry exited with {status} on {}: {}",
                    self.addr(),
                    self.log_tail()
                );
            }
            match http_get_status(&self.addr(), "/v2/") {
                Ok(200) => return Ok(()),
                // Serving, and asking for the credentials it was started with.
                Ok(401) if self.credentials.is_some() => return Ok(()),
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(status) => bail!("GET /v2/ answered {status}"),
                Err(e) => {
                    return Err(e.context(format!(
                        "Waiting for docker-registry on {}: {}",
                        self.addr(),
                        self.log_tail()
                    )));
                }
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Whether the registry process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kill the registry and wait for it. Storage and log stay; idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                eprintln!("Killing docker-registry, ignoring: {e}");
            }
            if let Err(e) = child.wait() {
                eprintln!("Waiting for docker-registry, ignoring: {e}");
            }
        }
    }

    /// Stop (if running) and start again on the same port with the same storage.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
            .with_context(|| format!("Restarting docker-registry on {}", self.addr()))
    }

    /// The current end of the log; pass it to the `*_since` methods to see only later requests.
    pub fn log_position(&self) -> Result<u64> {
        Ok(std::fs::metadata(self.log_path())
            .context("Reading registry log size")?
            .len())
    }

    /// Make sure every request answered so far is in the log: send a marker request and wait
    /// until its line appears. (The registry logs a request when its handler returns.)
    fn sync_log(&self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let n = self.sync_counter.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{SYNC_MARKER}{}-{n}", std::process::id());
        http_get_status(&self.addr(), &format!("/v2/?{marker}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = std::fs::read(self.log_path()).context("Reading registry log")?;
            if log.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Access log marker {marker} did not appear");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every request logged after byte offset `pos` (see [`Registry::log_position`]), oldest first.
    pub fn requests_since(&self, pos: u64) -> Result<Vec<AccessLogEntry>> {
        self.sync_log()?;
        let mut log = File::open(self.log_path()).context("Opening registry log")?;
        log.seek(SeekFrom::Start(pos))
            .context("Seeking in registry log")?;
        let mut text = Vec::new();
        log.read_to_end(&mut text).context("Reading registry log")?;
        // Only complete lines: a line being written has no newline yet.
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        Ok(String::from_utf8_lossy(&text[..complete])
            .lines()
            .filter_map(parse_access_log_line)
            .filter(|e| !e.path.contains(SYNC_MARKER))
            .collect())
    }

    fn blob_digests_since(&self, pos: u64, method: &str) -> Result<Vec<String>> {
        Ok(self
            .requests_since(pos)?
            .iter()
            .filter(|e| e.method == method)
            .filter_map(|e| e.blob_digest().map(str::to_string))
            .collect())
    }

    /// Digests (`sha256:<hex>`) of every `GET /v2/<name>/blobs/<digest>` so far, in order,
    /// whatever the status.
    pub fn blob_requests(&self) -> Result<Vec<String>> {
        self.blob_requests_since(0)
    }

    /// Like [`Registry::blob_requests`], but only requests logged after `pos`.
    pub fn blob_requests_since(&self, pos: u64) -> Result<Vec<String>> {
        self.blob_digests_since(pos, "GET")
    }

    /// Digests of every `HEAD /v2/<name>/blobs/<digest>` so far (existence checks, e.g. by a push).
    pub fn blob_heads(&self) -> Result<Vec<String>> {
        self.blob_heads_since(0)
    }

    /// Like [`Registry::blob_heads`], but only requests logged after `pos`.
    pub fn blob_heads_since(&self, pos: u64) -> Result<Vec<String>> {
        self.blob_digests_since(pos, "HEAD")
    }

    /// The file holding a blob's bytes in the registry storage (`sha256:<hex>` or `<hex>`), so
    /// a test can corrupt or remove it.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(hex))
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_access_log_lines() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let get_blob = format!(
            r#"127.0.0.1 - - [26/Nov/2026:03:33:06 +0000] "GET /v2/dnfimage/base/blobs/{digest} HTTP/1.1" 200 5462 "" "skopeo/1.9.3""#
        );
        let head_blob = format!(
            r#"127.0.0.1 - - [26/Nov/2026:03:33:06 +0000] "HEAD /v2/a/blobs/{digest} HTTP/1.1" 404 157 "" "curl/7.88.1""#
        );
        /// Method, status, bytes, blob digest.
        type Parsed<'a> = (&'a str, u16, u64, Option<&'a str>);
        let cases: &[(&str, Option<Parsed>)] = &[
            (&get_blob, Some(("GET", 200, 5462, Some(&digest)))),
            (&head_blob, Some(("HEAD", 404, 157, Some(&digest)))),
            (
                r#"127.0.0.1 - - [26/Nov/2026:03:33:06 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1""#,
                Some(("GET", 200, 2, None)),
            ),
            (
                r#"127.0.0.1 - - [26/Nov/2026:03:33:06 +0000] "GET /v2/a/manifests/v1 HTTP/1.1" 200 2 "" "x""#,
                Some(("GET", 200, 2, None)),
            ),
            // A truncated digest is not a blob digest.
            (
                r#"127.0.0.1 - - [x] "GET /v2/a/blobs/sha256:abcd HTTP/1.1" 404 1 "" "x""#,
                Some(("GET", 404, 1, None)),
            ),
            (
                r#"time="2026-11-26T03:33:05Z" level=warning msg="No HTTP secret provided" go.version=go1.19.8"#,
                None,
            ),
            (
                r#"time="2026-11-26T03:33:06Z" level=error msg="response completed with error" http.request.method=HEAD http.request.uri="/v2/foo/blobs/sha256:00""#,
                None,
            ),
            ("", None),
            ("127.0.0.1 - - [x] \"GET /v2/ HTTP/1.1\" 200", None),
        ];
        for (line, want) in cases {
            let got = parse_access_log_line(line);
            let got = got
                .as_ref()
                .map(|e| (e.method.as_str(), e.status, e.bytes, e.blob_digest()));
            assert_eq!(got, *want, "line: {line}");
        }
    }

    #[test]
    fn blob_data_path_layout() {
        let registry = Registry {
            child: None,
            port: 1,
            workdir: PathBuf::from("/w"),
            sync_counter: AtomicU64::new(0),
            credentials: None,
        };
        let hex = "0123".repeat(16);
        let want = PathBuf::from(format!(
            "/w/storage/docker/registry/v2/blobs/sha256/01/{hex}/data"
        ));
        assert_eq!(registry.blob_data_path(&format!("sha256:{hex}")), want);
        assert_eq!(registry.blob_data_path(&hex), want);
    }

    #[test]
    fn start_answer_restart_stop() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let mut registry = Registry::start(tmp.path())?;
        let addr = registry.addr();
        assert_eq!(http_get_status(&addr, "/v2/")?, 200);
        let pos = registry.log_position()?;
        let missing = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            http_get_status(&addr, &format!("/v2/none/blobs/{missing}"))?,
            404
        );
        assert_eq!(registry.blob_requests_since(pos)?, vec![missing.clone()]);
        assert!(registry.blob_heads_since(pos)?.is_empty());

        registry.restart()?;
        assert_eq!(registry.addr(), addr);
        assert_eq!(http_get_status(&addr, "/v2/")?, 200);
        // The log survives a restart, and positions stay valid.
        assert_eq!(registry.blob_requests()?, vec![missing]);
        assert!(
            registry
                .blob_requests_since(registry.log_position()?)?
                .is_empty()
        );

        registry.stop();
        assert!(!registry.is_running());
        assert!(http_get_status(&addr, "/v2/").is_err());
        Ok(())
    }

    #[test]
    fn auth_registry_refuses_without_credentials_and_takes_pushes_with_them() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let registry = Registry::start_with_auth(tmp.path(), "alice", "s3cret")?;
        assert_eq!(registry.credentials().as_deref(), Some("alice:s3cret"));
        assert_eq!(http_get_status(&registry.addr(), "/v2/")?, 401);
        let layout = crate::Fixtures::shared()?;
        let dest = registry.docker_ref("auth/base:v1");
        let src = layout.oci_ref(crate::tags::BASE_V1);
        let refused = crate::skopeo::copy(&src, &dest).expect_err("a push without credentials");
        assert!(
            format!("{refused:#}").contains("authentication required"),
            "{refused:#}"
        );
        crate::skopeo::copy_with_creds(&src, &dest, "alice:wrong")
            .expect_err("a push with a wrong password");
        crate::skopeo::copy_with_creds(&src, &dest, "alice:s3cret")?;
        Ok(())
    }
}
