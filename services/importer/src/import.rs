//! One import: reads a local OCI image with skopeo, checks it, and imports it into the
//! repository with ostree-ext's `ImageImporter`, layer by layer, recording it under the image
//! reference the user asked for.
//!
//! The glib objects here are used from one thread: [`import`] runs on a current-thread tokio
//! runtime of its own (see `lib.rs`), and ostree-ext moves the blocking work to that runtime's
//! blocking pool itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnfimage_interfaces::importer::{
    ImportLayersResult, ImportPhase, ImportProgress, ImportResult, ImportWarning, ImporterError,
};
use dnfimage_interfaces::reference::ImageRef;
use ostree_ext::container::store::{
    self as ext_store, ImageImporter, ManifestLayerState, PrepareResult, PreparedImport,
};
use ostree_ext::container::{
    BOOTC_LABEL, DIFFID_LABEL, ImageReference, OstreeImageReference, SignatureSource,
};
use ostree_ext::containers_image_proxy::{self as image_proxy, ImageProxy, ImageProxyConfig};
use ostree_ext::oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageManifest};
use ostree_ext::prelude::*;
use ostree_ext::{gio, glib, ostree};
use tokio::io::AsyncReadExt;

use crate::journal::{self, Journal};
use crate::layers;
use crate::reference;
use crate::scan::{self, Rules};
use crate::store;

/// Content is stored uncompressed: the space an import needs is estimated as this many times
/// the compressed size of the layers it imports.
pub const UNCOMPRESSED_FACTOR: u64 = 2;
/// libostree's default `core.min-free-space-percent`.
const DEFAULT_MIN_FREE_PERCENT: u64 = 3;
/// Progress records about bytes are sent at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Where the sysroot and its repository are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The sysroot.
    pub sysroot: PathBuf,
    /// Its repository, `ostree/repo`.
    pub repo: PathBuf,
}

impl Paths {
    /// The paths of the sysroot at `sysroot`.
    pub fn new(sysroot: &Path) -> Self {
        Self {
            sysroot: sysroot.to_path_buf(),
            repo: sysroot.join("ostree/repo"),
        }
    }
}

/// What to import and under which reference.
#[derive(Debug, Clone)]
pub struct Request {
    /// Where the image is read from.
    pub source: ImageRef,
    /// The reference it is recorded under.
    pub image: ImageReference,
}

impl Request {
    /// What the import is called while it runs.
    pub fn operation(&self) -> String {
        format!("Importing {}", self.image)
    }
}

/// Receives the progress records.
pub type Emit<'a> = &'a dyn Fn(ImportProgress);

fn failed(message: impl Into<String>) -> ImporterError {
    ImporterError::Failed {
        message: message.into(),
    }
}

fn failed_with(context: &str, e: &anyhow::Error) -> ImporterError {
    failed(format!("{context}: {}", describe(e)))
}

/// The text of a skopeo proxy error, including what skopeo said (its `Display` hides that).
pub fn proxy_message(e: &image_proxy::Error) -> String {
    use image_proxy::Error as E;
    match e {
        E::RequestReturned(msg) | E::Other(msg) | E::Configuration(msg) => msg.to_string(),
        E::RequestInitiationFailure { method, error } => format!("{method}: {error}"),
        other => other.to_string(),
    }
}

/// An error chain as one line, with what skopeo said where the chain holds a proxy error.
pub fn describe(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<image_proxy::Error>() {
            Some(pe) => proxy_message(pe),
            None => cause.to_string(),
        };
        if parts.last() != Some(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// How to start skopeo: directly (not as "nobody", which may not read the fetcher's cache),
/// and bound to this process's life.
fn skopeo_command() -> std::process::Command {
    let mut cmd = std::process::Command::new("skopeo");
    dnfimage_runtime::child::die_with_parent(&mut cmd);
    cmd
}

fn proxy_config() -> ImageProxyConfig {
    ImageProxyConfig {
        skopeo_cmd: Some(skopeo_command()),
        ..Default::default()
    }
}

/// What skopeo said about the source, as a typed error.
fn source_error(source: &ImageRef, message: &str) -> ImporterError {
    let m = message.to_ascii_lowercase();
    let missing = [
        "no such file or directory",
        "not found",
        "does not exist",
        "no descriptor found",
        "manifest unknown",
    ];
    if missing.iter().any(|n| m.contains(n)) {
        ImporterError::ImageNotFound {
            image: source.to_string(),
            message: message.to_string(),
        }
    } else {
        failed(format!("Reading {source}: {message}"))
    }
}

/// Whether an error says the filesystem is full.
pub fn is_space_error(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("no space left on device") || m.contains("min-free-space")
}

/// Whether an error raised while a layer was being imported says the layer's bytes are bad:
/// truncated, not the compressed tar stream they claim to be, or not matching the digest.
pub fn is_corruption(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "corrupt",
        "digest did not match",
        "digest mismatch",
        "does not match digest",
        "unexpected end of file",
        "unexpected eof",
        "failed to fill whole buffer",
        "invalid gzip header",
        "invalid deflate",
        "invalid checksum",
        "truncated",
        "numeric field",
        "unknown frame descriptor",
        "expected checksum",
        "size mismatch",
    ]
    .iter()
    .any(|n| m.contains(n))
}

/// The image as the source describes it.
struct Opened {
    proxy: ImageProxy,
    image: image_proxy::OpenedImage,
    /// The digest of the manifest as the source holds it.
    digest: String,
    /// The digest the image is recorded and known by: `digest`, unless the source is the
    /// fetcher's copy of an image its registry serves in another form (see [`source_digest`]).
    recorded: String,
    manifest: ImageManifest,
    config: ImageConfiguration,
}

/// The annotation the fetcher's cache puts on each image of its index: the manifest digest the
/// image's source reported.
pub const SOURCE_DIGEST: &str = "org.dnfimage.digest";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The digest an image in an OCI layout is known by, from the layout's `index.json`: the one the
/// fetcher recorded as its source's ([`SOURCE_DIGEST`]) when that differs from `stored`, the
/// digest of the manifest the layout holds for `tag` (the only image when there is no tag).
///
/// They differ for an image the registry serves in Docker schema 2 form: skopeo converts it
/// to an OCI manifest (and configuration) on the way in, which is what the layout holds and
/// what skopeo reads back. ostree-ext, pulling from the registry itself, records the
/// registry's digest with the converted manifest; so does the importer, so that the digest a
/// deployment shows is the one the registry, the fetcher's update checks and signatures name.
/// `None`: the layout records nothing else than `stored`.
pub fn source_digest(index: &[u8], tag: Option<&str>, stored: &str) -> Result<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        digest: String,
        #[serde(default)]
        annotations: std::collections::BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(index).context("Parsing index.json")?;
    let entry = match tag {
        Some(tag) => index
            .manifests
            .iter()
            .find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(tag)),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => None,
    };
    // skopeo found the image a moment ago: not finding it now means the index changed.
    let entry = entry.with_context(|| {
        format!(
            "index.json has no image {}",
            tag.map_or("(the only one)".into(), |t| format!("tagged {t:?}"))
        )
    })?;
    anyhow::ensure!(
        entry.digest == stored,
        "index.json names manifest {} where skopeo read {stored}: the layout changed",
        entry.digest
    );
    let Some(source) = entry.annotations.get(SOURCE_DIGEST) else {
        return Ok(None);
    };
    anyhow::ensure!(
        sha256_hex(source).is_some(),
        "{SOURCE_DIGEST} {source:?} is not a sha256 digest"
    );
    Ok((source != stored).then(|| source.clone()))
}

/// The hex part of `digest` when it is a sha256 digest, "sha256:" and 64 lowercase hex digits.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// [`source_digest`] of `source` when it is an OCI layout.
fn recorded_digest(source: &ImageRef, stored: &str) -> Result<String, ImporterError> {
    let Some(layout) = source.layout_dir() else {
        return Ok(stored.to_string());
    };
    let path = layout.join("index.json");
    let recorded = std::fs::read(&path)
        .with_context(|| format!("Reading {}", path.display()))
        .and_then(|index| source_digest(&index, source.tag(), stored))
        .map_err(|e| failed_with(&format!("Reading {source}"), &e))?;
    Ok(recorded.unwrap_or_else(|| stored.to_string()))
}

impl Opened {
    async fn open(source: &ImageRef) -> Result<Self, ImporterError> {
        let proxy = ImageProxy::new_with_config(proxy_config())
            .await
            .map_err(|e| {
                failed(format!(
                    "Starting skopeo: {}; is skopeo installed?",
                    proxy_message(&e)
                ))
            })?;
        let err = |e: image_proxy::Error| source_error(source, &proxy_message(&e));
        let image = proxy.open_image(&source.to_string()).await.map_err(err)?;
        let (digest, manifest) = proxy.fetch_manifest(&image).await.map_err(err)?;
        let config = proxy.fetch_config(&image).await.map_err(err)?;
        let recorded = recorded_digest(source, &digest)?;
        Ok(Self {
            proxy,
            image,
            digest,
            recorded,
            manifest,
            config,
        })
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.config
            .config()
            .as_ref()?
            .labels()
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    /// The layers that are not part of the ostree commit (added by a derived build).
    fn derived_layers(&self) -> &[Descriptor] {
        let layers = self.manifest.layers();
        let last_ostree = self.label(DIFFID_LABEL).and_then(|diffid| {
            self.config
                .rootfs()
                .diff_ids()
                .iter()
                .position(|d| d == diffid)
        });
        match last_ostree {
            Some(i) if i < layers.len() => &layers[i + 1..],
            _ => &[],
        }
    }

    async fn close(self) {
        if let Err(e) = self.proxy.close_image(&self.image).await {
            tracing::debug!(
                "Closing the image in skopeo, ignoring: {}",
                proxy_message(&e)
            );
        }
        if let Err(e) = self.proxy.finalize().await {
            tracing::debug!("Stopping skopeo, ignoring: {}", proxy_message(&e));
        }
    }
}

/// Whether the labels mark a bootable OS image (as the fetcher decides it).
pub fn is_bootable(label: impl Fn(&str) -> Option<String>) -> bool {
    label(BOOTC_LABEL).is_some_and(|v| v == "1")
        || label(*ostree::METADATA_KEY_BOOTABLE).is_some_and(|v| v == "1" || v == "true")
}

/// Builds the progress records of one import.
struct Tracker<'a> {
    emit: Emit<'a>,
    record: ImportProgress,
    /// The layers being imported, with the bytes of each read so far.
    in_flight: Vec<(Descriptor, u64)>,
    /// Bytes of the layers completed.
    done_bytes: u64,
    last_sent: Option<Instant>,
}

impl<'a> Tracker<'a> {
    fn new(emit: Emit<'a>) -> Self {
        Self {
            emit,
            record: ImportProgress {
                phase: ImportPhase::Preparing,
                layer: None,
                layer_bytes_done: None,
                layer_bytes_total: None,
                layers_done: 0,
                layers_total: 0,
                bytes_done: 0,
                bytes_total: 0,
                warning: None,
                message: String::new(),
            },
            in_flight: Vec::new(),
            done_bytes: 0,
            last_sent: None,
        }
    }

    fn send(&mut self, force: bool) {
        let due = self
            .last_sent
            .is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
        if force || due {
            self.last_sent = Some(Instant::now());
            (self.emit)(self.record.clone());
        }
    }

    fn phase(&mut self, phase: ImportPhase, message: String) {
        self.record.phase = phase;
        self.record.layer = None;
        self.record.layer_bytes_done = None;
        self.record.layer_bytes_total = None;
        self.message(message);
    }

    fn message(&mut self, message: String) {
        tracing::debug!("{message}");
        self.record.message = message;
        self.send(true);
    }

    fn started(&mut self, layer: &Descriptor) {
        self.in_flight.push((layer.clone(), 0));
        self.record.layer = Some(layer.digest().to_string());
        self.record.layer_bytes_done = Some(0);
        self.record.layer_bytes_total = Some(layer.size());
        self.record.message = format!(
            "Importing layer {} ({} of {})",
            short(layer.digest().as_ref()),
            self.record.layers_done + self.in_flight.len() as u64,
            self.record.layers_total
        );
        self.send(true);
    }

    fn read(&mut self, digest: &str, bytes: u64) {
        let Some((layer, done)) = self
            .in_flight
            .iter_mut()
            .find(|(l, _)| l.digest().as_ref() == digest)
        else {
            return;
        };
        *done = bytes.min(layer.size());
        self.record.layer = Some(digest.to_string());
        self.record.layer_bytes_done = Some(*done);
        self.record.layer_bytes_total = Some(layer.size());
        self.record.bytes_done = self.bytes_done();
        self.send(false);
    }

    /// Bytes of the completed layers and of those in flight.
    fn bytes_done(&self) -> u64 {
        self.done_bytes + self.in_flight.iter().map(|(_, d)| d).sum::<u64>()
    }

    fn completed(&mut self, layer: &Descriptor) {
        self.in_flight.retain(|(l, _)| l != layer);
        self.done_bytes += layer.size();
        self.record.layers_done += 1;
        self.record.bytes_done = self.bytes_done();
        self.record.layer = Some(layer.digest().to_string());
        self.record.layer_bytes_done = Some(layer.size());
        self.record.layer_bytes_total = Some(layer.size());
        self.record.message = format!("Imported layer {}", short(layer.digest().as_ref()));
        tracing::debug!("{}", self.record.message);
        self.send(true);
    }

    fn warning(&mut self, warning: &ImportWarning) {
        tracing::warn!("{}", warning.message);
        self.record.warning = Some(warning.clone());
        self.record.layer = warning.layer.clone();
        self.record.layer_bytes_done = None;
        self.record.layer_bytes_total = None;
        self.record.message = warning.message.clone();
        self.send(true);
        self.record.warning = None;
    }
}

/// The first 12 characters of a digest's hex part (whole characters, whatever the text).
fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.char_indices().nth(12).map_or(hex, |(i, _)| &hex[..i])
}

/// Removes what an unfinished import may have left half-written (see [`journal`]).
pub fn recover(repo_path: &Path) -> Result<Vec<String>> {
    if journal::read(repo_path)?.is_none() {
        return Ok(Vec::new());
    }
    let repo = store::open_repo(repo_path)?;
    journal::recover(repo_path, |name| store::remove_ref(&repo, name))
}

/// Bytes the repository may still use on its filesystem: free blocks minus the reserve
/// libostree keeps (`core.min-free-space-size`, else `core.min-free-space-percent`).
fn usable_space(repo: &ostree::Repo, path: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(path).with_context(|| format!("Checking {}", path.display()))?;
    let config = repo.config();
    let size = config.string("core", "min-free-space-size").ok();
    let percent = config
        .integer("core", "min-free-space-percent")
        .ok()
        .and_then(|p| u64::try_from(p).ok());
    let reserve = reserved_blocks(size.as_deref(), percent, st.f_blocks, st.f_frsize)?;
    Ok(st
        .f_bavail
        .saturating_sub(reserve)
        .saturating_mul(st.f_frsize))
}

/// The blocks libostree keeps free on a filesystem of `blocks` blocks of `block_size` bytes.
pub fn reserved_blocks(
    min_size: Option<&str>,
    min_percent: Option<u64>,
    blocks: u64,
    block_size: u64,
) -> Result<u64> {
    if let Some(size) = min_size {
        let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit: u64 = match &size[digits.len()..] {
            "MB" => 1 << 20,
            "GB" => 1 << 30,
            "TB" => 1 << 40,
            other => anyhow::bail!("core.min-free-space-size {size:?}: unknown unit {other:?}"),
        };
        let n: u64 = digits
            .parse()
            .with_context(|| format!("Parsing core.min-free-space-size {size:?}"))?;
        return Ok((n.saturating_mul(unit)).div_ceil(block_size.max(1)));
    }
    let percent = min_percent.unwrap_or(DEFAULT_MIN_FREE_PERCENT).min(99);
    Ok(blocks.saturating_mul(percent) / 100)
}

/// The space importing `bytes` of layers needs, checked against what the repository's
/// filesystem still has.
fn space_needed(paths: &Paths, repo: &ostree::Repo, bytes: u64) -> Result<u64, ImporterError> {
    let needed = bytes.saturating_mul(UNCOMPRESSED_FACTOR);
    let available =
        usable_space(repo, &paths.repo).map_err(|e| failed_with("Checking free space", &e))?;
    if needed > available {
        return Err(ImporterError::InsufficientSpace {
            path: paths.repo.display().to_string(),
            needed,
            available,
        });
    }
    Ok(needed)
}

/// Checks that the layers to import are complete in an OCI layout source (a truncated or
/// missing blob is found before anything is written).
fn check_blobs(layout: &Path, layers: &[Descriptor], image: &str) -> Result<(), ImporterError> {
    for layer in layers {
        let digest = layer.digest().to_string();
        let (algorithm, hex) = digest.split_once(':').unwrap_or(("sha256", &digest));
        let path = layout.join("blobs").join(algorithm).join(hex);
        let corrupt = |message: String| ImporterError::CorruptLayer {
            image: image.to_string(),
            layer: digest.clone(),
            message,
        };
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == layer.size() => {}
            Ok(m) => {
                return Err(corrupt(format!(
                    "{} holds {} of the layer's {} bytes",
                    path.display(),
                    m.len(),
                    layer.size()
                )));
            }
            Err(e) => return Err(corrupt(format!("Reading {}: {e}", path.display()))),
        }
    }
    Ok(())
}

/// Whether the base commit enables a transient root (ostree-ext then keeps all top-level
/// directories of derived layers).
fn root_is_transient(repo: &ostree::Repo, base_commit: &str) -> Result<bool> {
    let (root, _) = repo
        .read_commit(base_commit, gio::Cancellable::NONE)
        .with_context(|| format!("Reading commit {base_commit}"))?;
    for path in [
        "etc/ostree/prepare-root.conf",
        "usr/lib/ostree/prepare-root.conf",
    ] {
        let file = root.resolve_relative_path(path);
        if !file.query_exists(gio::Cancellable::NONE) {
            continue;
        }
        let (bytes, _) = file
            .load_contents(gio::Cancellable::NONE)
            .with_context(|| format!("Reading {path}"))?;
        let keyfile = glib::KeyFile::new();
        keyfile
            .load_from_bytes(&glib::Bytes::from(&bytes[..]), glib::KeyFileFlags::NONE)
            .with_context(|| format!("Parsing {path}"))?;
        return ostree_ext::ostree_prepareroot::overlayfs_enabled_in_config(&keyfile);
    }
    Ok(false)
}

/// Reads derived layer `layer` from the source and counts what it holds outside `/usr` and
/// `/etc`.
async fn scan_layer(opened: &Opened, layer: &Descriptor) -> Result<scan::Summary> {
    let digest = layer.digest().to_string();
    let (mut reader, driver) = opened
        .proxy
        .get_blob(&opened.image, layer.digest(), layer.size())
        .await
        .map_err(|e| anyhow::anyhow!(proxy_message(&e)))
        .with_context(|| format!("Reading layer {digest}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let media_type = layer.media_type().to_string();
    let scan_digest = digest.clone();
    let scanner = tokio::task::spawn_blocking(move || {
        let reader = layers::ChannelReader::new(rx);
        scan::summarize_tar(layers::decompressor(&media_type, reader)?, &scan_digest)
    });
    let feed = async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            // When the scanner is done early the rest is still read, so skopeo finishes.
            let _ = tx.send(buf[..n].to_vec()).await;
        }
    };
    let (fed, finished, scanned) = tokio::join!(feed, driver, scanner);
    fed.with_context(|| format!("Reading layer {digest}"))?;
    finished
        .map_err(|e| anyhow::anyhow!(proxy_message(&e)))
        .with_context(|| format!("Reading layer {digest}"))?;
    scanned.context("Scanning thread")?
}

/// Opens the repository for an import, after removing what an earlier one left half-written.
/// The sysroot lock is not held while importing, so that the deployer can work meanwhile: a
/// prune of the repository leaves alone what a transaction stages under tmp/, and every commit
/// an import builds on (layer commits) has a reference before it is used.
fn open_for_import(paths: &Paths) -> Result<ostree::Repo, ImporterError> {
    let sysroot = store::load_sysroot_for_writing(&paths.sysroot)
        .map_err(|e| failed_with("Opening the sysroot", &e))?;
    if store::make_writable(&sysroot).map_err(|e| failed_with("Opening the sysroot", &e))? {
        sysroot.unlock();
    }
    let repo =
        store::open_repo(&paths.repo).map_err(|e| failed_with("Opening the repository", &e))?;
    recover(&paths.repo).map_err(|e| failed_with("Cleaning up after an earlier import", &e))?;
    Ok(repo)
}

/// Imports `request`, streaming progress to `emit`. On failure the repository may hold layer
/// references listed in the journal as not completed: the caller runs [`recover`] once nothing
/// of the import runs any more.
pub async fn import(
    paths: &Paths,
    request: &Request,
    emit: Emit<'_>,
) -> Result<ImportResult, ImporterError> {
    let source = &request.source;
    let mut tracker = Tracker::new(emit);
    let repo = open_for_import(paths)?;

    tracker.phase(ImportPhase::Preparing, format!("Reading {source}"));
    let opened = Opened::open(source).await?;
    let result = import_opened(paths, request, &repo, &opened, &mut tracker).await;
    opened.close().await;
    result
}

async fn import_opened(
    paths: &Paths,
    request: &Request,
    repo: &ostree::Repo,
    opened: &Opened,
    tracker: &mut Tracker<'_>,
) -> Result<ImportResult, ImporterError> {
    let image = request.image.to_string();
    let source = &request.source;
    if !is_bootable(|k| opened.label(k).map(str::to_string)) {
        return Err(ImporterError::NotBootable { image });
    }
    let arch = opened.config.architecture();
    if *arch != Arch::default() {
        return Err(failed(format!(
            "{image} is built for architecture {arch}, this host is {}",
            Arch::default()
        )));
    }
    if opened.label(DIFFID_LABEL).is_none() {
        return Err(failed(format!(
            "{image} is bootable but not an ostree container image (it has no {DIFFID_LABEL} \
             label): ostree-ext 0.15 imports only images built from an ostree commit"
        )));
    }
    let version = ostree_ext::container::version_for_config(&opened.config).map(str::to_string);
    let layers_in_image = opened.manifest.layers().len() as u64;

    // Already imported under this reference: nothing to write.
    let existing = ext_store::query_image(repo, &request.image)
        .map_err(|e| failed_with(&format!("Reading the image recorded as {image}"), &e))?;
    if let Some(state) = existing.filter(|s| s.manifest_digest.to_string() == opened.recorded) {
        tracker.message(format!(
            "{image} ({}) is already imported as commit {}",
            opened.recorded, state.merge_commit
        ));
        let warnings = store::warnings_of(repo, &state.merge_commit)
            .map_err(|e| failed_with("Reading the recorded warnings", &e))?;
        return Ok(ImportResult {
            reference: image,
            digest: opened.recorded.clone(),
            version,
            commit: state.merge_commit.clone(),
            layers_imported: 0,
            layers_skipped: layers_in_image,
            bytes_imported: 0,
            warnings,
        });
    }

    let mut importer = ImageImporter::new(repo, &reference::source_ref(source), proxy_config())
        .await
        .map_err(|e| failed_with(&format!("Opening {source}"), &e))?;
    importer.set_target(&OstreeImageReference {
        sigverify: SignatureSource::ContainerPolicyAllowInsecure,
        imgref: request.image.clone(),
    });
    // Layers no image uses any more are removed by Prune, not behind the caller's back.
    importer.disable_gc();
    let mut prepared = match importer
        .prepare()
        .await
        .map_err(|e| failed_with(&format!("Reading {source}"), &e))?
    {
        PrepareResult::Ready(prepared) => prepared,
        PrepareResult::AlreadyPresent(state) => {
            // Recorded under the source reference by someone else: record it under ours too.
            let target = refescape_image_ref(&request.image)?;
            repo.set_ref_immediate(
                None,
                &target,
                Some(&state.merge_commit),
                gio::Cancellable::NONE,
            )
            .map_err(|e| failed(format!("Recording {image}: {e}")))?;
            return Ok(ImportResult {
                reference: image,
                digest: state.manifest_digest.to_string(),
                version,
                commit: state.merge_commit.clone(),
                layers_imported: 0,
                layers_skipped: layers_in_image,
                bytes_imported: 0,
                warnings: store::warnings_of(repo, &state.merge_commit)
                    .map_err(|e| failed_with("Reading the recorded warnings", &e))?,
            });
        }
    };
    if prepared.manifest_digest.to_string() != opened.digest {
        return Err(failed(format!(
            "{source} changed while it was read (from {} to {}); import it again",
            opened.digest, prepared.manifest_digest
        )));
    }
    if opened.recorded != opened.digest {
        tracker.message(format!(
            "{source} holds the OCI conversion {} of {image}, recorded as {}",
            opened.digest, opened.recorded
        ));
        // ostree-ext uses this digest only to record it, in the merged commit and its result.
        prepared.manifest_digest = opened.recorded.parse().map_err(|e| {
            failed(format!(
                "Reading {source}: the digest {} recorded for it: {e}",
                opened.recorded
            ))
        })?;
    }
    let jobs = layer_jobs(&prepared);
    let to_import: Vec<Descriptor> = jobs.iter().map(|j| j.layer.clone()).collect();
    let pending_refs: Vec<String> = jobs.iter().map(|j| j.ostree_ref.clone()).collect();
    let bytes_to_import: u64 = to_import.iter().map(Descriptor::size).sum();
    let skipped = layers_in_image - to_import.len() as u64;
    tracker.record.layers_total = to_import.len() as u64;
    tracker.record.bytes_total = bytes_to_import;
    tracker.message(format!(
        "{skipped} of {layers_in_image} layers already in the repository; importing {} \
         ({bytes_to_import} bytes)",
        to_import.len()
    ));

    if let Some(layout) = source.layout_dir() {
        check_blobs(layout, &to_import, &image)?;
    }
    let needed = space_needed(paths, repo, bytes_to_import)?;

    let mut journal = Journal::begin(&paths.repo, &image, pending_refs)
        .map_err(|e| failed_with("Writing the import journal", &e))?;
    tracker.phase(
        ImportPhase::Importing,
        format!(
            "Importing {} layers ({bytes_to_import} bytes)",
            to_import.len()
        ),
    );
    // Each derived layer is read for what the commit does not hold once: while it is imported,
    // or (a layer an earlier version imported without recording it) through the source.
    let derived = opened.derived_layers();
    let mut summaries: BTreeMap<String, scan::Summary> = BTreeMap::new();
    for layer in derived {
        let digest = layer.digest().to_string();
        match store::layer_summary(repo, &digest) {
            Ok(Some(summary)) => {
                summaries.insert(digest, summary);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "Reading the recorded summary of layer {digest}, reading it again: {e:#}"
            ),
        }
    }
    let to_scan: Vec<&Descriptor> = derived
        .iter()
        .filter(|l| !summaries.contains_key(l.digest().as_ref()) && !to_import.contains(l))
        .collect();
    let scan_all = async {
        let mut out = Vec::with_capacity(to_scan.len());
        for layer in &to_scan {
            out.push(scan_layer(opened, layer).await);
        }
        out
    };

    let blobs = match source.layout_dir() {
        Some(dir) => layers::Blobs::Layout(dir.to_path_buf()),
        None => layers::Blobs::Proxy {
            proxy: &opened.proxy,
            image: &opened.image,
        },
    };
    let known_base = prepared.ostree_commit_layer.commit.clone();
    let layer_run = LayerRun {
        paths,
        repo,
        image: &image,
        needed,
    };
    let (commits, scanned) = layer_run
        .run(
            blobs,
            jobs,
            known_base,
            tracker,
            &mut journal,
            &mut summaries,
            scan_all,
        )
        .await;
    let commits = commits?;
    for layer in prepared
        .ostree_layers
        .iter_mut()
        .chain(std::iter::once(&mut prepared.ostree_commit_layer))
        .chain(prepared.layers.iter_mut())
    {
        if layer.commit.is_none() {
            layer.commit = commits.get(layer.layer().digest().as_ref()).cloned();
        }
    }
    tracker.phase(ImportPhase::Committing, "Writing the merged commit".into());
    let state = importer.import(prepared).await.map_err(|e| {
        let message = describe(&e);
        tracing::warn!("Importing {image} failed: {message}");
        if is_space_error(&message) {
            layer_run.space_error(tracker)
        } else {
            failed(format!("Importing {image}: {message}"))
        }
    })?;
    if let Err(e) = journal.finish() {
        tracing::warn!("Removing the import journal: {e:#}");
    }

    // What ostree-ext dropped or moved, from the derived layers themselves.
    let mut warnings = Vec::new();
    if !derived.is_empty() {
        let during = derived.iter().filter(|l| to_import.contains(l)).count();
        let again = match to_scan.len() {
            0 => String::new(),
            n => format!(", {n} read again"),
        };
        tracker.message(format!(
            "Checking {} derived layers for content the commit does not hold ({during} read \
             during the import, {} known from earlier imports{again})",
            derived.len(),
            derived.len() - during - to_scan.len(),
        ));
        for (layer, found) in to_scan.iter().zip(scanned) {
            let digest = layer.digest().to_string();
            match found {
                Ok(summary) => {
                    if let Err(e) = store::record_layer_summary(repo, &digest, &summary) {
                        tracing::warn!("Recording the summary of layer {digest}: {e:#}");
                    }
                    summaries.insert(digest, summary);
                }
                Err(e) => tracing::warn!(
                    "Looking for content the commit does not hold in layer {digest}, \
                     skipping: {e:#}"
                ),
            }
        }
        let rules = rules_for(repo, &state.base_commit);
        for layer in derived {
            let digest = layer.digest().to_string();
            let Some(summary) = summaries.get(&digest) else {
                continue;
            };
            for w in summary.warnings(&digest, rules) {
                tracker.warning(&w);
                warnings.push(w);
            }
        }
        if let Err(e) = store::record_warnings(repo, &state.merge_commit, &warnings) {
            tracing::warn!("Recording the warnings with {}: {e:#}", state.merge_commit);
        }
    }
    Ok(ImportResult {
        reference: image,
        digest: state.manifest_digest.to_string(),
        version,
        commit: state.merge_commit.clone(),
        layers_imported: to_import.len() as u64,
        layers_skipped: skipped,
        bytes_imported: bytes_to_import,
        warnings,
    })
}

/// What `ImportLayers` imports: the layers of the image whose manifest the layout holds.
#[derive(Debug, Clone)]
pub struct LayersRequest {
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// The digest of the manifest, "sha256:…".
    pub manifest: String,
}

impl LayersRequest {
    /// Checks the arguments of `ImportLayers`.
    pub fn new(layout: &str, manifest: &str) -> Result<Self, ImporterError> {
        let invalid = |message: &str| ImporterError::InvalidImageReference {
            image: dnfimage_interfaces::reference::excerpt(&format!("oci:{layout}@{manifest}"))
                .into_owned(),
            message: message.to_string(),
        };
        let path = Path::new(layout);
        if !path.is_absolute() {
            return Err(invalid("the layout must be an absolute path"));
        }
        if !path.join("oci-layout").is_file() {
            return Err(invalid(
                "the layout is not an OCI image layout (no oci-layout file)",
            ));
        }
        if sha256_hex(manifest).is_none() {
            return Err(invalid(
                "the manifest must be a sha256 digest, \"sha256:\" and 64 hex digits",
            ));
        }
        Ok(Self {
            layout: path.to_path_buf(),
            manifest: manifest.to_string(),
        })
    }

    /// What the import is called while it runs.
    pub fn operation(&self) -> String {
        format!(
            "Importing the layers of {} in {}",
            self.manifest,
            self.layout.display()
        )
    }
}

/// Reads blob `digest` of the layout, at most `limit` bytes, checked against its digest.
fn read_blob(layout: &Path, digest: &str, limit: u64) -> Result<Vec<u8>> {
    use sha2::Digest as _;
    let hex = sha256_hex(digest).with_context(|| format!("{digest} is not a sha256 digest"))?;
    let path = layout.join("blobs/sha256").join(hex);
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| {
            std::io::Read::read_to_end(&mut std::io::Read::take(f, limit + 1), &mut bytes)
        })
        .with_context(|| format!("Reading {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= limit,
        "{} is larger than {limit} bytes",
        path.display()
    );
    let found = hex::encode(sha2::Sha256::digest(&bytes));
    anyhow::ensure!(found == hex, "{} has digest sha256:{found}", path.display());
    Ok(bytes)
}

/// The largest manifest or configuration read from a layout (skopeo reads at most 4 MiB of a
/// manifest from a registry).
const MAX_METADATA: u64 = 4 << 20;

/// Which layers hold the ostree commit: the first (the commit), then the chunks up to the
/// layer whose diff ID the configuration's `DIFFID_LABEL` names; the rest are derived.
fn split_layers<'m>(
    manifest: &'m ImageManifest,
    config: &ImageConfiguration,
    label: &str,
) -> Result<(&'m Descriptor, Vec<&'m Descriptor>, Vec<&'m Descriptor>)> {
    let layers = manifest.layers();
    let first = layers.first().context("The manifest has no layers")?;
    let last_ostree = config
        .rootfs()
        .diff_ids()
        .iter()
        .position(|d| d == label)
        .with_context(|| format!("No diff ID of the configuration is {label}"))?;
    anyhow::ensure!(
        last_ostree < layers.len(),
        "The diff ID {label} is number {} of a manifest of {} layers",
        last_ostree + 1,
        layers.len()
    );
    let chunks = layers[1..=last_ostree].iter().collect();
    let derived = layers[last_ostree + 1..].iter().collect();
    Ok((first, chunks, derived))
}

/// Imports the layers `request` names that the repository lacks, following the fetcher's
/// download of them; records no image. `wake` stops readers waiting for a download.
pub async fn import_layers(
    paths: &Paths,
    request: &LayersRequest,
    emit: Emit<'_>,
    wake: std::sync::Arc<std::os::fd::OwnedFd>,
) -> Result<ImportLayersResult, ImporterError> {
    let mut tracker = Tracker::new(emit);
    let repo = open_for_import(paths)?;
    let name = format!("{}@{}", request.layout.display(), request.manifest);
    tracker.phase(ImportPhase::Preparing, format!("Reading {name}"));
    let not_found = |e: anyhow::Error| ImporterError::ImageNotFound {
        image: name.clone(),
        message: describe(&e),
    };
    let manifest: ImageManifest = read_blob(&request.layout, &request.manifest, MAX_METADATA)
        .and_then(|b| serde_json::from_slice(&b).context("Parsing the manifest"))
        .map_err(not_found)?;
    let config: ImageConfiguration = read_blob(
        &request.layout,
        manifest.config().digest().as_ref(),
        MAX_METADATA,
    )
    .and_then(|b| serde_json::from_slice(&b).context("Parsing the configuration"))
    .map_err(not_found)?;
    let label = |key: &str| {
        config
            .config()
            .as_ref()?
            .labels()
            .as_ref()?
            .get(key)
            .cloned()
    };
    if !is_bootable(label) {
        return Err(ImporterError::NotBootable { image: name });
    }
    let Some(diffid) = label(DIFFID_LABEL) else {
        return Err(failed(format!(
            "{name} is not an ostree container image (it has no {DIFFID_LABEL} label)"
        )));
    };
    let (commit_layer, chunks, derived) = split_layers(&manifest, &config, &diffid)
        .map_err(|e| failed_with(&format!("Reading {name}"), &e))?;
    let mut seen = std::collections::BTreeSet::new();
    let mut jobs = Vec::new();
    let mut skipped = 0u64;
    let all = chunks
        .into_iter()
        .map(|l| (layers::Kind::Chunk, l))
        .chain(std::iter::once((layers::Kind::Commit, commit_layer)))
        .chain(derived.into_iter().map(|l| (layers::Kind::Derived, l)));
    for (kind, layer) in all {
        let digest = layer.digest().to_string();
        if !seen.insert(digest.clone()) {
            continue;
        }
        let present = store::layer_commit(&repo, &digest)
            .map_err(|e| failed_with("Reading the repository", &e))?;
        if present.is_some() {
            skipped += 1;
            continue;
        }
        let ostree_ref = store::layer_ref(&digest)
            .map_err(|e| failed_with(&format!("Naming the reference of {digest}"), &e))?;
        jobs.push(layers::Job {
            kind,
            layer: layer.clone(),
            ostree_ref,
        });
    }
    let known_base = store::layer_commit(&repo, commit_layer.digest().as_ref())
        .map_err(|e| failed_with("Reading the repository", &e))?;
    let bytes_to_import: u64 = jobs.iter().map(|j| j.layer.size()).sum();
    let needed = space_needed(paths, &repo, bytes_to_import)?;
    let layers_imported = jobs.len() as u64;
    tracker.record.layers_total = layers_imported;
    tracker.record.bytes_total = bytes_to_import;
    let pending = jobs.iter().map(|j| j.ostree_ref.clone()).collect();
    let mut journal = Journal::begin(&paths.repo, &name, pending)
        .map_err(|e| failed_with("Writing the import journal", &e))?;
    tracker.phase(
        ImportPhase::Importing,
        format!("Importing {layers_imported} layers ({bytes_to_import} bytes) as they arrive"),
    );
    let run = LayerRun {
        paths,
        repo: &repo,
        image: &name,
        needed,
    };
    let blobs = layers::Blobs::Following {
        layout: request.layout.clone(),
        stop: wake,
    };
    let mut summaries = BTreeMap::new();
    run.run(
        blobs,
        jobs,
        known_base,
        &mut tracker,
        &mut journal,
        &mut summaries,
        async {},
    )
    .await
    .0?;
    if let Err(e) = journal.finish() {
        tracing::warn!("Removing the import journal: {e:#}");
    }
    Ok(ImportLayersResult {
        layers_imported,
        layers_skipped: skipped,
        bytes_imported: bytes_to_import,
    })
}

/// Runs the layer jobs of one import, recording each layer as it completes (journal, summary).
struct LayerRun<'a> {
    paths: &'a Paths,
    repo: &'a ostree::Repo,
    /// The image, for errors.
    image: &'a str,
    /// The space the import was estimated to need.
    needed: u64,
}

impl LayerRun<'_> {
    /// Imports `jobs` from `blobs` while `alongside` runs; returns each imported layer's commit
    /// by digest, and what `alongside` returned.
    #[allow(clippy::too_many_arguments)]
    async fn run<F: std::future::Future>(
        &self,
        blobs: layers::Blobs<'_>,
        jobs: Vec<layers::Job>,
        known_base: Option<String>,
        tracker: &mut Tracker<'_>,
        journal: &mut Journal,
        summaries: &mut BTreeMap<String, scan::Summary>,
        alongside: F,
    ) -> (Result<BTreeMap<String, String>, ImporterError>, F::Output) {
        let repo = self.repo;
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let ctx = layers::Shared {
            repo: self.paths.repo.clone(),
            blobs,
            jobs: layers::jobs(),
            events: events_tx,
        };
        let mut commits: BTreeMap<String, String> = BTreeMap::new();
        let mut on_event = |tracker: &mut Tracker<'_>, event: layers::Event| match event {
            layers::Event::Started(layer) => tracker.started(&layer),
            layers::Event::Read { digest, bytes } => tracker.read(&digest, bytes),
            layers::Event::Completed(done) => {
                tracker.completed(&done.layer);
                if let Err(e) = journal.complete(&done.ostree_ref) {
                    tracing::warn!("Recording layer {} as imported: {e:#}", done.layer.digest());
                }
                let digest = done.layer.digest().to_string();
                match done.summary {
                    Some(Ok(summary)) => {
                        if let Err(e) = store::record_layer_summary(repo, &digest, &summary) {
                            tracing::warn!("Recording the summary of layer {digest}: {e:#}");
                        }
                        summaries.insert(digest.clone(), summary);
                    }
                    Some(Err(e)) => tracing::warn!(
                        "Looking for content the commit does not hold in layer {digest}, \
                         skipping: {e:#}"
                    ),
                    None => {}
                }
                commits.insert(digest, done.commit);
            }
        };
        let (imported, beside) = {
            let run = layers::import(&ctx, jobs, known_base, |base| {
                let rules = rules_for(repo, base);
                layers::DerivedRules {
                    allow_nonusr: rules.allow_nonusr,
                    retain_var: rules.retain_var,
                }
            });
            let both = async { tokio::join!(run, alongside) };
            tokio::pin!(both);
            loop {
                tokio::select! {
                    r = &mut both => break r,
                    Some(event) = events.recv() => on_event(tracker, event),
                }
            }
        };
        drop(ctx);
        while let Some(event) = events.recv().await {
            on_event(tracker, event);
        }
        let image = self.image;
        let outcome = match imported {
            Ok(()) => Ok(commits),
            Err(f) => {
                let message = describe(&f.error);
                tracing::warn!("Importing {image}, layer {}: {message}", f.layer.digest());
                Err(if is_space_error(&message) {
                    self.space_error(tracker)
                } else if is_corruption(&message) {
                    ImporterError::CorruptLayer {
                        image: image.to_string(),
                        layer: f.layer.digest().to_string(),
                        message: format!("{message}; fetching the image again replaces the layer"),
                    }
                } else {
                    failed(format!(
                        "Importing {image}: layer {}: {message}",
                        f.layer.digest()
                    ))
                })
            }
        };
        (outcome, beside)
    }

    fn space_error(&self, tracker: &Tracker<'_>) -> ImporterError {
        ImporterError::InsufficientSpace {
            path: self.paths.repo.display().to_string(),
            needed: self.needed.saturating_sub(tracker.record.bytes_done),
            available: usable_space(self.repo, &self.paths.repo).unwrap_or(0),
        }
    }
}

/// The layers `prepared` still lacks, as import jobs.
fn layer_jobs(prepared: &PreparedImport) -> Vec<layers::Job> {
    let job = |kind, l: &ManifestLayerState| layers::Job {
        kind,
        layer: l.layer().clone(),
        ostree_ref: l.ostree_ref.clone(),
    };
    let chunks = prepared
        .ostree_layers
        .iter()
        .map(|l| (layers::Kind::Chunk, l));
    let commit = std::iter::once((layers::Kind::Commit, &prepared.ostree_commit_layer));
    let derived = prepared.layers.iter().map(|l| (layers::Kind::Derived, l));
    chunks
        .chain(commit)
        .chain(derived)
        .filter(|(_, l)| l.commit.is_none())
        .map(|(kind, l)| job(kind, l))
        .collect()
}

/// How ostree-ext writes derived layers on `base_commit`, and so what they lose.
fn rules_for(repo: &ostree::Repo, base_commit: &str) -> Rules {
    Rules {
        retain_var: ostree::check_version(2024, 3),
        allow_nonusr: root_is_transient(repo, base_commit).unwrap_or_else(|e| {
            tracing::warn!("Reading the base's prepare-root.conf, assuming no: {e:#}");
            false
        }),
    }
}

fn refescape_image_ref(image: &ImageReference) -> Result<String, ImporterError> {
    ostree_ext::refescape::prefix_escape_for_ref(store::IMAGE_PREFIX, &image.to_string())
        .map_err(|e| failed_with(&format!("Naming the reference of {image}"), &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_what_libostree_keeps_free() {
        // (min-free-space-size, min-free-space-percent, blocks, block size, reserved blocks)
        type Case<'a> = (Option<&'a str>, Option<u64>, u64, u64, Option<u64>);
        let cases: &[Case<'_>] = &[
            // Default: 3 % of the blocks.
            (None, None, 1000, 4096, Some(30)),
            (None, Some(0), 1000, 4096, Some(0)),
            (None, Some(10), 1000, 4096, Some(100)),
            // A size wins over a percentage, rounded up to whole blocks.
            (Some("1MB"), Some(10), 1000, 4096, Some(256)),
            (Some("1MB"), None, 1000, 1000, Some(1049)),
            (Some("2GB"), None, 1 << 30, 1 << 20, Some(2048)),
            (Some("1TB"), None, 1, 1 << 30, Some(1024)),
            (Some("500kB"), None, 1000, 4096, None),
            (Some("MB"), None, 1000, 4096, None),
        ];
        for (size, percent, blocks, block_size, want) in cases {
            let got = reserved_blocks(*size, *percent, *blocks, *block_size).ok();
            assert_eq!(got, *want, "{size:?} {percent:?}");
        }
    }

    #[test]
    fn classifies_errors() {
        let corrupt = [
            "Importing: Unencapsulating base: Layer sha256:ab: Corrupted blob, expecting sha256:ab",
            "Processing tar: failed to fill whole buffer",
            "Parsing layer blob sha256:cd: Processing tar: unexpected end of file",
            "invalid gzip header",
        ];
        for m in corrupt {
            assert!(is_corruption(m), "{m}");
            assert!(!is_space_error(m), "{m}");
        }
        for m in [
            "Writing content object: No space left on device",
            "min-free-space-percent '3%' would be exceeded, at least 12 bytes requested",
        ] {
            assert!(is_space_error(m), "{m}");
        }
        assert!(!is_corruption("Permission denied"));
    }

    #[test]
    fn bootable_labels() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("containers.bootc", "1")], true),
            (&[("ostree.bootable", "true")], true),
            (&[("ostree.bootable", "1")], true),
            (&[("containers.bootc", "0")], false),
            (&[("org.opencontainers.image.version", "1")], false),
            (&[], false),
        ];
        for (labels, want) in cases {
            let get = |k: &str| {
                labels
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            };
            assert_eq!(is_bootable(get), *want, "{labels:?}");
        }
    }

    #[test]
    fn finds_the_digest_the_source_reported() {
        let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let (stored, registry, other) = (digest('a'), digest('b'), digest('c'));
        let entry = |digest: &str, tag: Option<&str>, source: Option<&str>| {
            let mut annotations = serde_json::Map::new();
            if let Some(t) = tag {
                annotations.insert(REF_NAME.into(), t.into());
            }
            if let Some(s) = source {
                annotations.insert(SOURCE_DIGEST.into(), s.into());
            }
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": 100,
                "annotations": annotations,
            })
        };
        let index = |entries: Vec<serde_json::Value>| {
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": entries}))
                .unwrap()
        };
        // (index, tag, the digest skopeo read, Ok(recorded) or Err(part of the error))
        type Case<'a> = (
            Vec<u8>,
            Option<&'a str>,
            &'a str,
            Result<Option<&'a str>, &'a str>,
        );
        let cases: Vec<Case<'_>> = vec![
            // The fetcher's entry of a converted image: the registry's digest.
            (
                index(vec![
                    entry(&other, Some("x"), Some(&other)),
                    entry(&stored, Some("os"), Some(&registry)),
                ]),
                Some("os"),
                &stored,
                Ok(Some(&registry)),
            ),
            // An OCI image: the fetcher records the same digest.
            (
                index(vec![entry(&stored, Some("os"), Some(&stored))]),
                Some("os"),
                &stored,
                Ok(None),
            ),
            // A layout of anyone else: no annotation.
            (
                index(vec![entry(&stored, Some("os"), None)]),
                Some("os"),
                &stored,
                Ok(None),
            ),
            // No tag: the only image.
            (
                index(vec![entry(&stored, None, Some(&registry))]),
                None,
                &stored,
                Ok(Some(&registry)),
            ),
            (
                index(vec![entry(&stored, None, None), entry(&other, None, None)]),
                None,
                &stored,
                Err("no image (the only one)"),
            ),
            // The index changed since skopeo read it.
            (
                index(vec![entry(&other, Some("os"), Some(&registry))]),
                Some("os"),
                &stored,
                Err("the layout changed"),
            ),
            (
                index(vec![entry(&stored, Some("x"), Some(&registry))]),
                Some("os"),
                &stored,
                Err("no image tagged \"os\""),
            ),
            // Not a digest.
            (
                index(vec![entry(&stored, Some("os"), Some("sha256:AB"))]),
                Some("os"),
                &stored,
                Err("is not a sha256 digest"),
            ),
            (
                b"{".to_vec(),
                Some("os"),
                &stored,
                Err("Parsing index.json"),
            ),
        ];
        for (index, tag, read, want) in cases {
            let got = source_digest(&index, tag, read);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got.as_deref(), want, "{tag:?}"),
                (Err(e), Err(part)) => assert!(format!("{e:#}").contains(part), "{e:#}"),
                (got, want) => panic!("{tag:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn short_digests() {
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("sha256:aééééééééééééé"), "aééééééééééé");
    }
}
