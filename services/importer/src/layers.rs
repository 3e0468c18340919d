//! The layers an import still lacks, imported several at once.
//!
//! ostree-ext's `ImageImporter` imports an image's layers one after the other, each on one
//! thread. Here each layer is a job: its blob is read (from the OCI layout itself, checked
//! against its digest as it is read, or through skopeo, which checks it), decompressed once,
//! and handed to ostree-ext's own writers — `import_tar_objects` for a chunk of the ostree
//! commit, `import_tar` for the commit, `write_tar` for a derived layer — while the same bytes
//! are summarized for what the commit will not hold (derived layers). Up to [`jobs`] layers are
//! imported at a time, in three waves, each needing what the one before wrote: the chunks, then
//! the commit that names their objects (so that no complete commit is ever missing objects),
//! then the derived layers, labeled with the base's SELinux policy. A layer's reference is
//! written once its blob is verified; what is left for `ImageImporter` is the merged commit.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use ostree_ext::containers_image_proxy::{ImageProxy, OpenedImage};
use ostree_ext::gio;
use ostree_ext::oci_spec::image::{Descriptor, MediaType};
use sha2::Digest as _;
use tokio::sync::mpsc::UnboundedSender;

use crate::scan;
use crate::store;

/// Bytes between two progress records of a layer.
const PROGRESS_BYTES: u64 = 1 << 20;
/// Size of the reads of a blob and of the pipe to ostree-ext's writer.
const CHUNK: usize = 256 * 1024;

/// How many layers are imported at once: two per core, because a layer's import waits on the
/// disk for part of its time (each object is synced). Measured with `bench-upgrade` on 2 cores,
/// 8 derived layers of 25 MiB: 1, 2, 3 and 4 at once import at 1.43, 1.51, 1.80 and 1.86 times
/// ostree-ext's rate.
pub fn jobs() -> usize {
    2 * std::thread::available_parallelism().map_or(1, usize::from)
}

/// What a layer is to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Content objects of the ostree commit.
    Chunk,
    /// The ostree commit itself (and the objects not in a chunk).
    Commit,
    /// A layer a derived build added: a tar stream of files.
    Derived,
}

/// One layer to import, under the reference ostree-ext keeps it as.
#[derive(Debug, Clone)]
pub struct Job {
    /// What it is.
    pub kind: Kind,
    /// The layer.
    pub layer: Descriptor,
    /// The reference of its commit.
    pub ostree_ref: String,
}

/// What the imports report while they run.
#[derive(Debug)]
pub enum Event {
    /// A layer's import started.
    Started(Descriptor),
    /// `bytes` of the blob of layer `digest` were read.
    Read {
        /// The layer.
        digest: String,
        /// Bytes read so far.
        bytes: u64,
    },
    /// A layer is in the repository under its reference.
    Completed(Done),
}

/// A layer imported.
#[derive(Debug)]
pub struct Done {
    /// The layer.
    pub layer: Descriptor,
    /// Its reference.
    pub ostree_ref: String,
    /// Its commit.
    pub commit: String,
    /// What it holds outside `/usr` and `/etc` (derived layers), or why that is not known.
    pub summary: Option<Result<scan::Summary>>,
}

/// The layer whose import failed, and why.
#[derive(Debug)]
pub struct Failed {
    /// The layer.
    pub layer: Descriptor,
    /// Why.
    pub error: anyhow::Error,
}

/// Where the blobs are read from.
pub enum Blobs<'a> {
    /// An OCI layout directory: read directly, and verified here.
    Layout(PathBuf),
    /// The fetcher's cache while it downloads the image: each blob is read as it is written
    /// (see [`Following`]), and verified here.
    Following {
        /// The layout directory.
        layout: PathBuf,
        /// Stops every reader waiting for bytes when it becomes readable.
        stop: Arc<OwnedFd>,
    },
    /// skopeo, with the image open.
    Proxy {
        /// The proxy.
        proxy: &'a ImageProxy,
        /// The image.
        image: &'a OpenedImage,
    },
}

/// How derived layers are written (ostree-ext's `WriteTarOptions`, less the base).
#[derive(Debug, Clone, Copy)]
pub struct DerivedRules {
    /// Keep top-level directories other than `/usr` and `/etc` (a transient root).
    pub allow_nonusr: bool,
    /// Keep `/var` where it is rather than moving it to the factory directory.
    pub retain_var: bool,
}

/// What every job of an import shares.
pub struct Shared<'a> {
    /// The repository.
    pub repo: PathBuf,
    /// Where the blobs are.
    pub blobs: Blobs<'a>,
    /// Layers imported at once.
    pub jobs: usize,
    /// Where progress goes.
    pub events: UnboundedSender<Event>,
}

/// Imports `jobs` (the chunks, then the commit, then the derived layers), reporting each layer
/// as it completes. `base` is the ostree commit when the repository already has it;
/// `derived_rules` says how to write derived layers on the base commit. On failure, the layers
/// not reported completed may have left references the caller's journal removes; the jobs
/// still running when one fails are waited for, and no new one is started.
pub async fn import(
    ctx: &Shared<'_>,
    jobs: Vec<Job>,
    base: Option<String>,
    derived_rules: impl FnOnce(&str) -> DerivedRules,
) -> Result<(), Failed> {
    let (mut chunks, mut commit, mut derived) = (Vec::new(), Vec::new(), Vec::new());
    for job in jobs {
        match job.kind {
            Kind::Chunk => chunks.push(job),
            Kind::Commit => commit.push(job),
            Kind::Derived => derived.push(job),
        }
    }
    wave(ctx, chunks, None).await?;
    let written = wave(ctx, commit, None).await?;
    if derived.is_empty() {
        return Ok(());
    }
    let base = written.into_iter().next().or(base);
    let Some(base) = base else {
        return Err(Failed {
            layer: derived[0].layer.clone(),
            error: anyhow::anyhow!("The image's ostree commit is not in the repository"),
        });
    };
    let rules = derived_rules(&base);
    wave(ctx, derived, Some((&base, rules))).await?;
    Ok(())
}

/// Runs `jobs`, up to `ctx.jobs` at once; returns their commits.
async fn wave(
    ctx: &Shared<'_>,
    jobs: Vec<Job>,
    base: Option<(&str, DerivedRules)>,
) -> Result<Vec<String>, Failed> {
    let mut pending = jobs.into_iter();
    let mut running = FuturesUnordered::new();
    let mut commits = Vec::new();
    let mut failed = None;
    loop {
        while failed.is_none() && running.len() < ctx.jobs.max(1) {
            let Some(job) = pending.next() else { break };
            running.push(one(ctx, job, base));
        }
        match running.next().await {
            Some(Ok(commit)) => commits.push(commit),
            Some(Err(f)) => {
                tracing::debug!("Importing layer {} failed: {:#}", f.layer.digest(), f.error);
                failed.get_or_insert(f);
            }
            None => break,
        }
    }
    failed.map_or(Ok(commits), Err)
}

/// Imports one layer.
async fn one(
    ctx: &Shared<'_>,
    job: Job,
    base: Option<(&str, DerivedRules)>,
) -> Result<String, Failed> {
    let layer = job.layer.clone();
    run(ctx, job, base)
        .await
        .map_err(|error| Failed { layer, error })
}

async fn run(ctx: &Shared<'_>, job: Job, base: Option<(&str, DerivedRules)>) -> Result<String> {
    let digest = job.layer.digest().to_string();
    let _ = ctx.events.send(Event::Started(job.layer.clone()));
    let repo = store::open_repo(&ctx.repo)?;
    let progress = Progress {
        digest: digest.clone(),
        events: ctx.events.clone(),
        read: 0,
        sent: 0,
    };
    let (source, driver): (Box<dyn Read + Send>, _) = match &ctx.blobs {
        Blobs::Layout(dir) => {
            let source = Verified::open(dir, &job.layer)?;
            (Box::new(source), None)
        }
        Blobs::Following { layout, stop } => {
            let source = Following::new(layout, &job.layer, stop.clone())?;
            (Box::new(source), None)
        }
        Blobs::Proxy { proxy, image } => {
            let (reader, driver) = proxy
                .get_blob(image, job.layer.digest(), job.layer.size())
                .await
                .map_err(|e| anyhow::anyhow!(crate::import::proxy_message(&e)))?;
            let reader = tokio_util::io::SyncIoBridge::new(reader);
            (Box::new(reader), Some(driver))
        }
    };
    let (to_writer, from_pump) = tokio::io::duplex(CHUNK);
    let (scan_tx, scan_rx) = if job.kind == Kind::Derived {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let media_type = job.layer.media_type().to_string();
    let pump = tokio::task::spawn_blocking(move || {
        let sink = tokio_util::io::SyncIoBridge::new(to_writer);
        pump(source, progress, &media_type, sink, scan_tx)
    });
    let scanner = async {
        let rx = scan_rx?;
        let digest = digest.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            scan::summarize_tar(ChannelReader::new(rx), &digest)
        })
        .await;
        Some(scanned.context("Scanning thread").and_then(|r| r))
    };
    let consumer = async {
        match (job.kind, base) {
            (Kind::Chunk, _) => ostree_ext::tar::import_tar_objects(&repo, from_pump).await,
            (Kind::Commit, _) => ostree_ext::tar::import_tar(&repo, from_pump, None).await,
            (Kind::Derived, Some((base, rules))) => {
                // Labeled with the base's SELinux policy, as ostree-ext's importer does.
                let mut opts = ostree_ext::tar::WriteTarOptions::default();
                opts.base = Some(base.to_string());
                opts.selinux = true;
                opts.allow_nonusr = rules.allow_nonusr;
                opts.retain_var = rules.retain_var;
                ostree_ext::tar::write_tar(
                    &repo,
                    from_pump,
                    MediaType::ImageLayer,
                    &job.ostree_ref,
                    Some(opts),
                )
                .await
                .map(|r| r.commit)
            }
            (Kind::Derived, None) => Err(anyhow::anyhow!("No base commit for a derived layer")),
        }
    };
    let driven = async {
        match driver {
            Some(driver) => driver
                .await
                .map_err(|e| anyhow::anyhow!(crate::import::proxy_message(&e))),
            None => Ok(()),
        }
    };
    let (pumped, consumed, scanned, driven) = tokio::join!(pump, consumer, scanner, driven);
    // What the source said first: a blob that skopeo or the digest rejects explains a tar
    // stream that ends early.
    driven?;
    pumped.context("Reading thread")??;
    let commit = consumed?;
    if job.kind != Kind::Derived {
        repo.set_ref_immediate(None, &job.ostree_ref, Some(&commit), gio::Cancellable::NONE)
            .with_context(|| format!("Writing reference {}", job.ostree_ref))?;
    }
    tracing::debug!("Layer {digest} is commit {commit}");
    let _ = ctx.events.send(Event::Completed(Done {
        layer: job.layer,
        ostree_ref: job.ostree_ref,
        commit: commit.clone(),
        summary: scanned,
    }));
    Ok(commit)
}

/// Counts the bytes read from a blob for the progress records.
struct Progress {
    digest: String,
    events: UnboundedSender<Event>,
    read: u64,
    sent: u64,
}

impl Progress {
    fn add(&mut self, n: usize) {
        self.read += n as u64;
        if self.read - self.sent >= PROGRESS_BYTES {
            self.sent = self.read;
            let _ = self.events.send(Event::Read {
                digest: self.digest.clone(),
                bytes: self.read,
            });
        }
    }
}

/// A blob as it is read, counted.
struct Counted<R> {
    inner: R,
    progress: Progress,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n);
        Ok(n)
    }
}

/// Reads the blob `source`, decompresses it and writes the tar stream to `sink` (and to
/// `scan`), then reads the blob to its end, so that all of it is verified and skopeo finishes.
/// When the writer is done before the stream is (the tar's end is padded), the rest still goes
/// to the scanner.
fn pump(
    source: Box<dyn Read + Send>,
    progress: Progress,
    media_type: &str,
    mut sink: impl Write,
    scan: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
) -> Result<()> {
    let mut blob = Counted {
        inner: source,
        progress,
    };
    {
        let mut tar = decompressor(media_type, &mut blob)?;
        let mut writing = true;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = tar.read(&mut buf).context("Decompressing")?;
            if n == 0 {
                break;
            }
            if let Some(tx) = &scan {
                // A scanner that stopped early is told by the summary it returns.
                let _ = tx.blocking_send(buf[..n].to_vec());
            }
            if writing && sink.write_all(&buf[..n]).is_err() {
                // The writer read the end of the archive and stopped: what follows is padding.
                writing = false;
                if scan.is_none() {
                    break;
                }
            }
        }
    }
    drop(sink);
    drop(scan);
    std::io::copy(&mut blob, &mut std::io::sink()).context("Reading the blob's end")?;
    Ok(())
}

/// Checks the bytes of a blob against the size and digest of its layer as they are read, with
/// errors [`crate::import::is_corruption`] recognizes.
struct Digest {
    /// What the blob is called in errors.
    name: String,
    hex: String,
    size: u64,
    hasher: sha2::Sha256,
    read: u64,
}

impl Digest {
    fn of(layer: &Descriptor, name: impl FnOnce(&str) -> String) -> Result<Self> {
        let digest = layer.digest().to_string();
        let hex = crate::import::sha256_hex(&digest)
            .with_context(|| format!("Layer {digest}: only sha256 digests are read"))?
            .to_string();
        Ok(Self {
            name: name(&hex),
            hex,
            size: layer.size(),
            hasher: sha2::Sha256::new(),
            read: 0,
        })
    }

    fn corrupt(&self, what: String) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} {what}", self.name),
        )
    }

    /// Takes the next `bytes`: fails past the size, and at the size unless the digest matches.
    fn update(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.read += bytes.len() as u64;
        if self.read > self.size {
            return Err(self.corrupt(format!(
                "is larger than the layer's {} bytes: size mismatch",
                self.size
            )));
        }
        if self.read == self.size {
            let found = hex::encode(self.hasher.clone().finalize());
            if found != self.hex {
                return Err(self.corrupt(format!("has digest sha256:{found}: digest mismatch")));
            }
        }
        Ok(())
    }

    /// Whether all of the blob was read (and matched).
    fn complete(&self) -> bool {
        self.read == self.size
    }

    /// The error of a blob that ends before its size.
    fn truncated(&self) -> std::io::Error {
        self.corrupt(format!(
            "holds {} of the layer's {} bytes: truncated",
            self.read, self.size
        ))
    }
}

/// A blob of an OCI layout, checked against its size and digest as it is read: the last read
/// fails when they do not match.
struct Verified {
    file: std::fs::File,
    digest: Digest,
}

impl Verified {
    fn open(layout: &Path, layer: &Descriptor) -> Result<Self> {
        let digest = Digest::of(layer, |hex| {
            layout.join("blobs/sha256").join(hex).display().to_string()
        })?;
        let file = std::fs::File::open(&digest.name)
            .with_context(|| format!("Reading {}", digest.name))?;
        Ok(Self { file, digest })
    }
}

impl Read for Verified {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        if n == 0 && !self.digest.complete() {
            return Err(self.digest.truncated());
        }
        self.digest.update(&buf[..n])?;
        Ok(n)
    }
}

/// How long a reader of a blob being downloaded waits without any sign of the download (no
/// write to any file of the cache's `tmp/`, no blob completed) before giving up.
const STALLED: Duration = Duration::from_secs(120);

/// A blob of the fetcher's cache read while the fetcher writes it: from `tmp/HEX.partial` as
/// it grows, then (the same file, renamed once complete and verified) `blobs/sha256/HEX`;
/// checked against its size and digest as [`Verified`] does. Waits for the download to start
/// and for each new write with inotify; fails when the partial file goes away before the blob
/// is complete (the download failed or was cancelled), after [`STALLED`] without news, or when
/// `stop` becomes readable.
pub struct Following {
    layout: PathBuf,
    file: Option<std::fs::File>,
    inotify: OwnedFd,
    stop: Arc<OwnedFd>,
    digest: Digest,
}

impl Following {
    /// Starts following the blob of `layer` in `layout`.
    pub fn new(layout: &Path, layer: &Descriptor, stop: Arc<OwnedFd>) -> Result<Self> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let digest = Digest::of(layer, |hex| format!("Blob sha256:{hex}"))?;
        // Watching before looking, so that no change between a look and the wait is missed.
        let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .context("Starting inotify")?;
        let tmp = layout.join("tmp");
        inotify::add_watch(
            &inotify,
            &tmp,
            WatchFlags::MODIFY
                | WatchFlags::CREATE
                | WatchFlags::DELETE
                | WatchFlags::MOVED_FROM
                | WatchFlags::CLOSE_WRITE,
        )
        .with_context(|| format!("Watching {}", tmp.display()))?;
        let blobs = layout.join("blobs/sha256");
        inotify::add_watch(&inotify, &blobs, WatchFlags::MOVED_TO | WatchFlags::CREATE)
            .with_context(|| format!("Watching {}", blobs.display()))?;
        Ok(Self {
            layout: layout.to_path_buf(),
            file: None,
            inotify,
            stop,
            digest,
        })
    }

    fn complete_path(&self) -> PathBuf {
        self.layout.join("blobs/sha256").join(&self.digest.hex)
    }

    fn partial_path(&self) -> PathBuf {
        self.layout
            .join("tmp")
            .join(format!("{}.partial", self.digest.hex))
    }

    /// Whether `path` is the file being read.
    fn is_ours(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Some(file), Ok(there)) = (&self.file, std::fs::metadata(path)) else {
            return false;
        };
        file.metadata()
            .is_ok_and(|m| m.ino() == there.ino() && m.dev() == there.dev())
    }

    /// Waits for a change in the cache, or fails on `stop` or after [`STALLED`].
    fn wait(&self) -> std::io::Result<()> {
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds = [
            PollFd::new(&self.inotify, PollFlags::IN),
            PollFd::new(&*self.stop, PollFlags::IN),
        ];
        let timeout = i32::try_from(STALLED.as_millis()).unwrap_or(i32::MAX);
        let ready = loop {
            match poll(&mut fds, timeout) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other?,
            }
        };
        if fds[1].revents().contains(PollFlags::IN) {
            // Not `Interrupted`: readers of readers (gzip, `io::copy`) retry on that.
            return Err(std::io::Error::other(
                "Stopped while waiting for the download",
            ));
        }
        if ready == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("Nothing of the download arrived in {} s", STALLED.as_secs()),
            ));
        }
        // The events only say that something changed: drain them and look again.
        let mut buf = [0u8; 4096];
        while rustix::io::read(&self.inotify, &mut buf).is_ok_and(|n| n > 0) {}
        Ok(())
    }
}

impl Read for Following {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(file) = &mut self.file {
                let n = file.read(buf)?;
                if n > 0 || self.digest.complete() {
                    self.digest.update(&buf[..n])?;
                    return Ok(n);
                }
            }
            // At the end of what is there: the file being read is still written, was
            // completed (renamed), or went away.
            let complete = self.complete_path();
            let partial = self.partial_path();
            match &self.file {
                None if complete.exists() => {
                    self.file = Some(std::fs::File::open(&complete)?);
                    continue;
                }
                None => match std::fs::File::open(&partial) {
                    Ok(file) => {
                        self.file = Some(file);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                },
                Some(_) if self.is_ours(&complete) => {
                    // Renamed once written in full: what is left is there to read.
                    let n = self.file.as_mut().map_or(Ok(0), |f| f.read(buf))?;
                    if n == 0 {
                        return Err(self.digest.truncated());
                    }
                    self.digest.update(&buf[..n])?;
                    return Ok(n);
                }
                Some(_) if self.is_ours(&partial) => {}
                Some(_) => {
                    return Err(std::io::Error::other(format!(
                        "The download of blob sha256:{} stopped after {} of {} bytes",
                        self.digest.hex, self.digest.read, self.digest.size
                    )));
                }
            }
            self.wait()?;
        }
    }
}

/// The decompressed stream of a blob of `media_type`.
pub fn decompressor<'r>(media_type: &str, reader: impl Read + 'r) -> Result<Box<dyn Read + 'r>> {
    Ok(if media_type.ends_with("gzip") {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::stream::read::Decoder::new(reader).context("Starting zstd")?)
    } else if media_type.ends_with("tar") {
        Box::new(reader)
    } else {
        anyhow::bail!("Unknown layer media type {media_type}")
    })
}

/// Reads a stream fed through a channel, on a blocking thread.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    /// Reads what `rx` receives, until its senders are gone.
    pub fn new(rx: tokio::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        Self {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(bytes: &[u8]) -> Descriptor {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        Descriptor::new(
            MediaType::ImageLayer,
            bytes.len() as u64,
            digest
                .parse::<ostree_ext::oci_spec::image::Digest>()
                .unwrap(),
        )
    }

    fn layout_with(name_of: &[u8], content: &[u8]) -> (tempfile::TempDir, Descriptor) {
        let dir = tempfile::tempdir().unwrap();
        let layer = descriptor(name_of);
        let hex = layer.digest().to_string()[7..].to_string();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        std::fs::write(dir.path().join("blobs/sha256").join(hex), content).unwrap();
        (dir, layer)
    }

    #[test]
    fn verifies_blobs_as_they_are_read() {
        let good = b"layer bytes".repeat(100_000);
        // (what the file holds, Ok or part of the error), for a descriptor of `good`
        let mut flipped = good.clone();
        flipped[500_000] ^= 1;
        let cases: Vec<(Vec<u8>, Result<(), &str>)> = vec![
            (good.clone(), Ok(())),
            (good[..good.len() - 1].to_vec(), Err("truncated")),
            ([&good[..], b"x"].concat(), Err("size mismatch")),
            (flipped, Err("digest mismatch")),
        ];
        for (held, want) in cases {
            let (dir, layer) = layout_with(&good, &held);
            let mut reader = Verified::open(dir.path(), &layer).unwrap();
            let got = std::io::copy(&mut reader, &mut std::io::sink());
            match (got, want) {
                (Ok(n), Ok(())) => assert_eq!(n, good.len() as u64),
                (Err(e), Err(part)) => {
                    let m = e.to_string();
                    assert!(m.contains(part), "{m}");
                    assert!(crate::import::is_corruption(&m), "{m}");
                }
                (got, want) => panic!("got {got:?}, want {want:?}"),
            }
        }
    }
}
