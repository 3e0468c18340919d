//! What the importer tests need around the fixture images: writable copies of OCI layouts (to
//! damage), derived images with chosen content, a large bootable image to interrupt, a
//! streaming varlink call that hands over each reply as it arrives, and ostree queries.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::run_ok;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The path of blob `digest` in the OCI layout `layout`.
pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    layout.join("blobs").join(algorithm).join(hex)
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("Reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("Parsing {}", path.display()))
}

fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("Opening {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), size))
}

/// Stores `bytes` as a blob of `layout`; returns its descriptor fields (digest, size).
fn write_blob(layout: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    std::fs::write(blob_path(layout, &digest), bytes)?;
    Ok((digest, bytes.len() as u64))
}

/// The index entry of `tag` in `layout`.
fn index_entry(layout: &Path, tag: &str) -> Result<Value> {
    let index = read_json(&layout.join("index.json"))?;
    index["manifests"]
        .as_array()
        .context("index.json has no manifests")?
        .iter()
        .find(|d| d["annotations"][REF_NAME] == tag)
        .cloned()
        .with_context(|| format!("No tag {tag} in {}", layout.display()))
}

/// The manifest of `tag` in `layout`.
pub fn manifest(layout: &Path, tag: &str) -> Result<Value> {
    let entry = index_entry(layout, tag)?;
    read_json(&blob_path(
        layout,
        entry["digest"].as_str().context("digest")?,
    ))
}

/// The layer digests of `tag` in `layout`, bottom first.
pub fn layer_digests(layout: &Path, tag: &str) -> Result<Vec<String>> {
    Ok(manifest(layout, tag)?["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect())
}

/// The manifest digest of `tag` in `layout`.
pub fn manifest_digest(layout: &Path, tag: &str) -> Result<String> {
    Ok(index_entry(layout, tag)?["digest"]
        .as_str()
        .context("digest")?
        .to_string())
}

fn ensure_layout(layout: &Path) -> Result<()> {
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    if !layout.join("oci-layout").exists() {
        std::fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
    }
    if !layout.join("index.json").exists() {
        std::fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": []}))?,
        )?;
    }
    Ok(())
}

/// Points `tag` of `layout` at the manifest `digest` of `size` bytes.
fn tag_manifest(layout: &Path, tag: &str, digest: &str, size: u64) -> Result<()> {
    let path = layout.join("index.json");
    let mut index = read_json(&path)?;
    let manifests = index["manifests"]
        .as_array_mut()
        .context("index.json has no manifests")?;
    manifests.retain(|d| d["annotations"][REF_NAME] != tag);
    manifests.push(json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": size,
        "annotations": { REF_NAME: tag },
    }));
    std::fs::write(&path, serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// Copies the images `tags` of the OCI layout `src` into `dst` (created if needed), blob files
/// copied rather than linked, so that `dst` can be damaged without touching `src`.
pub fn copy_layout(src: &Path, tags: &[&str], dst: &Path) -> Result<()> {
    ensure_layout(dst)?;
    for tag in tags {
        let entry = index_entry(src, tag)?;
        let digest = entry["digest"].as_str().context("digest")?;
        let manifest = read_json(&blob_path(src, digest))?;
        let mut blobs = vec![
            digest.to_string(),
            manifest["config"]["digest"]
                .as_str()
                .context("config")?
                .to_string(),
        ];
        for layer in manifest["layers"].as_array().context("layers")? {
            blobs.push(
                layer["digest"]
                    .as_str()
                    .context("layer digest")?
                    .to_string(),
            );
        }
        for blob in blobs {
            let to = blob_path(dst, &blob);
            if !to.exists() {
                std::fs::copy(blob_path(src, &blob), &to)
                    .with_context(|| format!("Copying blob {blob}"))?;
            }
        }
        tag_manifest(dst, tag, digest, entry["size"].as_u64().context("size")?)?;
    }
    Ok(())
}

/// Adds image `tag` to the writable OCI layout `layout`: image `base_tag` plus one gzipped layer
/// holding the tree under `root` (owned by root, times zero), as a Containerfile build makes it.
/// Returns the new layer's digest.
pub fn derive(layout: &Path, base_tag: &str, tag: &str, root: &Path) -> Result<String> {
    let base = manifest(layout, base_tag)?;
    let mut config = read_json(&blob_path(
        layout,
        base["config"]["digest"].as_str().context("config")?,
    ))?;
    let work = tempfile::tempdir_in(layout)?;
    let tar = work.path().join("layer.tar");
    let mut entries: Vec<String> = std::fs::read_dir(root)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    entries.sort();
    run_ok(
        Command::new("tar")
            .args([
                "--sort=name",
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--mtime=@0",
            ])
            .arg("-C")
            .arg(root)
            .arg("-cf")
            .arg(&tar)
            .args(&entries),
    )?;
    let (diff_id, _) = sha256_file(&tar)?;
    let gz = work.path().join("layer.tar.gz");
    let out = std::fs::File::create(&gz)?;
    let status = Command::new("gzip")
        .args(["-n", "-1", "-c"])
        .arg(&tar)
        .stdout(out)
        .status()?;
    anyhow::ensure!(status.success(), "gzip failed: {status}");
    let (layer_digest, layer_size) = sha256_file(&gz)?;
    std::fs::rename(&gz, blob_path(layout, &layer_digest))?;

    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("diff_ids")?
        .push(json!(diff_id));
    if let Some(history) = config["history"].as_array_mut() {
        history.push(json!({
            "created": "2024-01-01T00:00:00Z",
            "created_by": format!("importer test: add {entries:?}"),
        }));
    }
    let (config_digest, config_size) = write_blob(layout, &serde_json::to_vec(&config)?)?;
    let mut manifest = base;
    manifest["config"]["digest"] = json!(config_digest);
    manifest["config"]["size"] = json!(config_size);
    manifest["layers"]
        .as_array_mut()
        .context("layers")?
        .push(json!({"mediaType": LAYER_GZIP, "digest": layer_digest, "size": layer_size}));
    if let Some(m) = manifest.as_object_mut() {
        m.remove("annotations");
    }
    let (manifest_digest, manifest_size) = write_blob(layout, &serde_json::to_vec(&manifest)?)?;
    tag_manifest(layout, tag, &manifest_digest, manifest_size)?;
    Ok(layer_digest)
}

/// Writes `len` bytes of random data to `path` (creating parents).
pub fn random_file(path: &Path, len: u64) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut urandom = std::fs::File::open("/dev/urandom")?.take(len);
    let mut out = std::fs::File::create(path)?;
    std::io::copy(&mut urandom, &mut out)?;
    Ok(())
}

/// Size of the filler component of [`big_base`]: one chunked layer this big.
pub const BIG_FILLER_BYTES: u64 = 96 << 20;

/// A bootable base image with one chunked layer of [`BIG_FILLER_BYTES`] of incompressible data,
/// built once (next to the shared fixtures) and shared; returns its OCI layout and tag.
pub fn big_base() -> Result<(PathBuf, &'static str)> {
    const TAG: &str = "big";
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    if let Some(dir) = BUILT.get() {
        return Ok((dir.clone(), TAG));
    }
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = BUILT.get() {
        return Ok((dir.clone(), TAG));
    }
    let fixtures = dnfimage_testimage::Fixtures::shared()?;
    let cache = fixtures
        .oci_dir
        .parent()
        .and_then(Path::parent)
        .context("fixture cache directory")?;
    let key = format!(
        "importer-big-{}-{}",
        dnfimage_testimage::FIXTURES_VERSION,
        BIG_FILLER_BYTES >> 20
    );
    let dir = cache.join(&key);
    if !dir.join("index.json").exists() {
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{key}-"))
            .tempdir_in(cache)?;
        let oci = tmp.path().join("oci");
        let opts = dnfimage_testimage::BaseOptions {
            fillers: vec![("big".to_string(), BIG_FILLER_BYTES)],
            ..Default::default()
        };
        dnfimage_testimage::build_base(&oci, TAG, 1, &opts).context("Building the big image")?;
        // Another process may have won the race; its image is as good.
        if std::fs::rename(&oci, &dir).is_err() {
            anyhow::ensure!(dir.join("index.json").exists(), "Publishing the big image");
        }
    }
    Ok((BUILT.get_or_init(|| dir).clone(), TAG))
}

/// A varlink call on its own connection whose replies are read one at a time.
pub struct Call {
    stream: UnixStream,
    buf: Vec<u8>,
    done: bool,
}

impl Call {
    /// Sends `method` with `parameters`, asking for more replies when `more`.
    pub fn start(socket: &Path, method: &str, parameters: Value, more: bool) -> Result<Self> {
        let mut stream = UnixStream::connect(socket)
            .with_context(|| format!("Connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut call = json!({"method": method, "parameters": parameters});
        if more {
            call["more"] = json!(true);
        }
        let mut bytes = serde_json::to_vec(&call)?;
        bytes.push(0);
        stream.write_all(&bytes)?;
        Ok(Self {
            stream,
            buf: Vec::new(),
            done: false,
        })
    }

    /// The next reply, or `None` after the last one.
    pub fn next_reply(&mut self) -> Result<Option<Value>> {
        if self.done {
            return Ok(None);
        }
        let mut chunk = [0u8; 65536];
        loop {
            if let Some(reply) = crate::take_message(&mut self.buf)? {
                self.done = reply.get("continues").and_then(Value::as_bool) != Some(true);
                return Ok(Some(reply));
            }
            // A signal to the test process (a child's exit) interrupts the read: read again.
            let n = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.context("Reading replies")?,
            };
            anyhow::ensure!(n > 0, "The service closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the last reply has arrived, reading only what is there already (the replies
    /// read are kept for [`next_reply`](Self::next_reply)).
    pub fn finished_yet(&mut self) -> Result<bool> {
        if self.done {
            return Ok(true);
        }
        self.stream.set_nonblocking(true)?;
        let mut chunk = [0u8; 65536];
        let read = loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break Ok(true),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) => break Err(e).context("Reading replies"),
            }
        };
        self.stream.set_nonblocking(false)?;
        let closed = read?;
        let last_seen = self
            .buf
            .split(|b| *b == 0)
            .filter(|m| !m.is_empty())
            .filter_map(|m| serde_json::from_slice::<Value>(m).ok())
            .any(|r| r.get("continues").and_then(Value::as_bool) != Some(true));
        Ok(closed || last_seen)
    }

    /// Waits until the service closes the connection (nothing more may arrive first).
    pub fn closed_by_peer(&mut self) -> Result<bool> {
        let mut chunk = [0u8; 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
            Err(e) => Err(e).context("Waiting for the service to close the connection"),
        }
    }

    /// Every remaining reply.
    pub fn rest(&mut self) -> Result<Vec<Value>> {
        let mut replies = Vec::new();
        while let Some(r) = self.next_reply()? {
            replies.push(r);
        }
        Ok(replies)
    }
}

/// `ostree refs` of the repository at `repo`, sorted.
pub fn refs(repo: &Path) -> Result<Vec<String>> {
    let out = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .arg("refs"),
    )?;
    let mut refs: Vec<String> = out.lines().map(str::to_string).collect();
    refs.sort();
    Ok(refs)
}

/// `ostree cat` of `path` in `commit`.
pub fn cat(repo: &Path, commit: &str, path: &str) -> Result<String> {
    run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(["cat", commit, path]),
    )
}

/// Whether `path` exists in `commit`.
pub fn exists(repo: &Path, commit: &str, path: &str) -> Result<bool> {
    let out = crate::run(
        Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(["ls", commit, path]),
    )?;
    Ok(out.status.success())
}

/// A tmpfs of `bytes` mounted on `dir` (created if needed), unmounted when dropped.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts it.
    pub fn mount(dir: &Path, bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
                .arg("tmpfs")
                .arg(dir),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = run_ok(Command::new("umount").arg("-l").arg(&self.dir)) {
            eprintln!("Unmounting {}, ignoring: {e:#}", self.dir.display());
        }
    }
}
