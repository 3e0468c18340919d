//! The local blob cache: an OCI image layout that skopeo and ostree-ext read as `oci:DIR:TAG`.
//!
//! Blobs are written under `tmp/`, hashed while written, synced, and renamed into
//! `blobs/sha256/` only when their digest and size match: a blob under its digest is always
//! complete. `index.json` is replaced atomically; each entry carries the reference it was fetched
//! from in annotations.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use dnfimage_interfaces::fetcher::SignatureCheck;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

/// OCI annotation naming the tag of an index entry.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANN_REFERENCE: &str = "org.dnfimage.reference";
const ANN_DIGEST: &str = "org.dnfimage.digest";
const ANN_VERSION: &str = "org.dnfimage.version";
const ANN_FETCHED: &str = "org.dnfimage.fetched";
const ANN_SIZE: &str = "org.dnfimage.size";
/// What the signature policy check found, JSON (`SignatureCheck`).
const ANN_SIGNATURE: &str = "org.dnfimage.signature";

/// How many references the update checks remember: checking one more forgets the one checked
/// least recently. (`CheckUpdate` is open to every caller; each distinct reference would
/// otherwise add a record for good.)
pub const MAX_CHECKS: usize = 64;
/// The most bytes one recorded check may take (its reference and version label are the only
/// parts of any length); a larger one is not kept.
pub const MAX_CHECK_RECORD: usize = 16 * 1024;

/// A content descriptor as OCI writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the blob.
    pub media_type: String,
    /// "sha256:…".
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Fields we do not interpret but keep.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// The parts of a manifest the cache needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// The configuration blob.
    pub config: Descriptor,
    /// The layers, base first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

impl Manifest {
    /// Checks that the sizes the manifest declares can be true: each one and their sum
    /// within int64 (the type OCI gives sizes, and what the interfaces carry), so that no
    /// total or free-space check overflows. (Negative sizes do not parse.)
    pub fn check_sizes(&self) -> Result<(), String> {
        let mut total: u64 = 0;
        for d in std::iter::once(&self.config).chain(&self.layers) {
            total = total
                .checked_add(d.size)
                .filter(|t| *t <= MAX_BLOB_SIZE)
                .ok_or_else(|| {
                    format!(
                        "blob {} declares {} bytes: the blobs would add up to more than {} \
                         bytes",
                        d.digest, d.size, MAX_BLOB_SIZE
                    )
                })?;
        }
        Ok(())
    }
}

/// The most bytes a descriptor may declare, and all the blobs of an image together: OCI sizes
/// are int64.
pub const MAX_BLOB_SIZE: u64 = i64::MAX as u64;

/// An image recorded in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The reference it was fetched from.
    pub reference: String,
    /// Its tag in the layout.
    pub tag: String,
    /// The manifest digest the source reported.
    pub digest: String,
    /// The digest of the manifest blob stored here (differs when skopeo converted it to OCI).
    pub manifest_digest: String,
    /// Size of the manifest blob.
    pub manifest_size: u64,
    /// The media type of the manifest blob.
    pub media_type: String,
    /// Version label.
    pub version: Option<String>,
    /// When it was fetched (RFC 3339).
    pub fetched: String,
    /// Sum of the layer sizes.
    pub size: u64,
    /// What the signature policy check found when it was fetched; none for older entries.
    pub signature: Option<SignatureCheck>,
}

/// Why a blob was not stored.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The bytes do not hash to the expected digest (or have the wrong length).
    #[error("blob {expected}: received {actual} ({received} bytes, expected {size})")]
    Mismatch {
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
        /// How many bytes arrived.
        received: u64,
        /// How many were expected.
        size: u64,
    },
    /// More bytes arrived than expected: the write stopped there.
    #[error("blob {expected}: more than the {size} bytes expected arrived")]
    TooLong {
        /// The digest asked for.
        expected: String,
        /// How many were expected.
        size: u64,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// What `prune` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneStats {
    /// References of the removed images.
    pub removed_images: Vec<String>,
    /// Blobs deleted.
    pub removed_blobs: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    /// Held while the update checks are read, changed and written back, so that two checks
    /// recorded at once both stay.
    checks_lock: Arc<Mutex<()>>,
}

/// Checks that `digest` is "sha256:" and 64 lowercase hex digits; returns the hex part.
pub fn sha256_hex(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("Digest {digest:?} is not sha256"))?;
    anyhow::ensure!(
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "Digest {digest:?} is malformed"
    );
    Ok(hex)
}

impl Cache {
    /// Opens (creating if needed) the layout at `root` and clears leftovers of killed writes.
    pub fn open(root: &Path) -> Result<Self> {
        let cache = Self {
            root: root.to_path_buf(),
            checks_lock: Arc::new(Mutex::new(())),
        };
        std::fs::create_dir_all(cache.blobs_dir())
            .with_context(|| format!("Creating the cache at {}", root.display()))?;
        let tmp = cache.tmp_dir();
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).context("Clearing partial downloads")?;
        }
        std::fs::create_dir_all(&tmp).context("Creating the cache's tmp directory")?;
        let layout = root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#, &tmp)?;
        }
        if !cache.index_path().exists() {
            cache.write_index(&Index {
                schema_version: 2,
                media_type: Some("application/vnd.oci.image.index.v1+json".into()),
                manifests: vec![],
            })?;
        }
        Ok(cache)
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// The `oci:` reference of a tag, for the importer.
    pub fn oci_reference(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.root.display())
    }

    /// Where the blob of `digest` lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.blobs_dir().join(sha256_hex(digest)?))
    }

    /// Whether a complete blob of `digest` and `size` is stored.
    pub fn has_blob(&self, digest: &str, size: u64) -> bool {
        self.blob_path(digest)
            .ok()
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.len() == size)
    }

    /// Where the blob of `digest` is written while it downloads (see `StagedImage`).
    pub fn partial_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .tmp_dir()
            .join(format!("{}.partial", sha256_hex(digest)?)))
    }

    /// Removes the blob of `digest`, if stored.
    pub fn remove_blob(&self, digest: &str) -> Result<()> {
        let path = self.blob_path(digest)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("Removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Streams a blob in, verifying digest and size; `progress` gets the bytes read so far.
    /// Stops as soon as more than `size` bytes arrive (a source sending more than the manifest
    /// declares never fills the disk).
    pub async fn write_blob(
        &self,
        digest: &str,
        size: u64,
        mut reader: impl AsyncRead + Unpin,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, BlobError> {
        let dest = self.blob_path(digest)?;
        // Under a name the importer can follow while it grows (one download of a blob at a
        // time: a fetch downloads each blob once and fetches are one at a time); a file of a
        // download that was stopped goes first.
        let partial = self.partial_path(digest)?;
        match std::fs::remove_file(&partial) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::Error::new(e)
                    .context(format!("Removing {}", partial.display()))
                    .into());
            }
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .with_context(|| format!("Creating {}", partial.display()))?;
        // Removes the partial file when dropped (error, cancel) unless persisted.
        let tmp_path = tempfile::TempPath::try_from_path(&partial)
            .with_context(|| format!("Naming {}", partial.display()))?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .with_context(|| format!("Reading blob {digest}"))?;
            if n == 0 {
                break;
            }
            if received + n as u64 > size {
                // `tmp_path` removes the partial file when dropped.
                return Err(BlobError::TooLong {
                    expected: digest.to_string(),
                    size,
                });
            }
            hasher.update(&buf[..n]);
            // A plain write: it lands in the page cache, so it does not block this thread for
            // long, and each tokio file write would be a trip to the blocking pool (measured:
            // a fifth of the fetch time on loopback).
            std::io::Write::write_all(&mut file, &buf[..n])
                .with_context(|| format!("Writing blob {digest}"))?;
            received += n as u64;
            progress(received);
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest || received != size {
            // `tmp_path` removes the partial file when dropped.
            return Err(BlobError::Mismatch {
                expected: digest.to_string(),
                actual,
                received,
                size,
            });
        }
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .context("Joining the sync task")?
            .with_context(|| format!("Syncing blob {digest}"))?;
        tmp_path
            .persist(&dest)
            .map_err(|e| anyhow::Error::new(e.error))
            .with_context(|| format!("Storing blob {digest}"))?;
        Ok(received)
    }

    /// Stores a small blob held in memory, verifying its digest.
    pub async fn write_bytes(&self, digest: &str, bytes: &[u8]) -> Result<(), BlobError> {
        if self.has_blob(digest, bytes.len() as u64) {
            return Ok(());
        }
        self.write_blob(digest, bytes.len() as u64, bytes, |_| {})
            .await
            .map(|_| ())
    }

    /// Reads a stored blob.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        std::fs::read(&path).with_context(|| format!("Reading {}", path.display()))
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.index_path();
        let bytes = std::fs::read(&path).with_context(|| format!("Reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("Parsing {}", path.display()))
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(index).context("Serializing the cache index")?;
        write_atomic(&self.index_path(), &bytes, &self.tmp_dir())
    }

    /// Every image recorded in the index.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        Ok(self
            .read_index()?
            .manifests
            .iter()
            .filter_map(entry_of)
            .collect())
    }

    /// The entry fetched from `reference`, if any.
    pub fn lookup(&self, reference: &str) -> Result<Option<Entry>> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|e| e.reference == reference))
    }

    /// Records `entry` (replacing any entry with the same tag). Its blobs must be stored.
    pub fn record(&self, entry: &Entry) -> Result<()> {
        let mut index = self.read_index()?;
        index
            .manifests
            .retain(|d| d.annotations.get(REF_NAME) != Some(&entry.tag));
        let mut annotations = BTreeMap::new();
        annotations.insert(REF_NAME.to_string(), entry.tag.clone());
        annotations.insert(ANN_REFERENCE.to_string(), entry.reference.clone());
        annotations.insert(ANN_DIGEST.to_string(), entry.digest.clone());
        annotations.insert(ANN_FETCHED.to_string(), entry.fetched.clone());
        annotations.insert(ANN_SIZE.to_string(), entry.size.to_string());
        if let Some(signature) = &entry.signature
            && let Ok(json) = serde_json::to_string(signature)
        {
            annotations.insert(ANN_SIGNATURE.to_string(), json);
        }
        if let Some(v) = &entry.version {
            annotations.insert(ANN_VERSION.to_string(), v.clone());
        }
        index.manifests.push(Descriptor {
            media_type: entry.media_type.clone(),
            digest: entry.manifest_digest.clone(),
            size: entry.manifest_size,
            annotations,
            other: BTreeMap::new(),
        });
        self.write_index(&index)
    }

    fn checks_path(&self) -> PathBuf {
        self.root.join("dnfimage-checks.json")
    }

    /// The recorded update checks, by reference.
    pub fn checks(&self) -> Result<BTreeMap<String, Value>> {
        Ok(self.check_list()?.into_iter().collect())
    }

    /// The recorded update checks, the least recently checked first.
    fn check_list(&self) -> Result<Vec<(String, Value)>> {
        let path = self.checks_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("Reading {}", path.display())),
        };
        let file: ChecksFile = serde_json::from_slice(&bytes)
            .with_context(|| format!("Parsing {}", path.display()))?;
        Ok(match file {
            ChecksFile::Ordered(list) => list,
            ChecksFile::Keyed(map) => {
                // Written before the order was kept: the time of each check orders them
                // (to the second).
                let mut list: Vec<(String, Value)> = map.into_iter().collect();
                list.sort_by_cached_key(|(_, check)| {
                    check
                        .get("checked")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                });
                list
            }
        })
    }

    /// Records the check of `reference`, replacing the previous one, and forgets the least
    /// recently checked references beyond [`MAX_CHECKS`]. Refuses a record larger than
    /// [`MAX_CHECK_RECORD`].
    pub fn record_check(&self, reference: &str, check: Value) -> Result<()> {
        let size = reference.len()
            + serde_json::to_vec(&check)
                .context("Serializing an update check")?
                .len();
        anyhow::ensure!(
            size <= MAX_CHECK_RECORD,
            "The check takes {size} bytes, more than the {MAX_CHECK_RECORD} a record may"
        );
        // Whatever panicked while holding the lock left the file whole (it is replaced
        // atomically): carry on.
        let _guard = self.checks_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut checks = self.check_list()?;
        checks.retain(|(r, _)| r != reference);
        checks.push((reference.to_string(), check));
        let excess = checks.len().saturating_sub(MAX_CHECKS);
        checks.drain(..excess);
        let bytes = serde_json::to_vec_pretty(&checks).context("Serializing update checks")?;
        write_atomic(&self.checks_path(), &bytes, &self.tmp_dir())
    }

    /// How many blobs are stored.
    pub fn blob_count(&self) -> Result<u64> {
        let dir = self.blobs_dir();
        let mut n = 0;
        for item in std::fs::read_dir(&dir).with_context(|| format!("Listing {}", dir.display()))? {
            item.context("Listing blobs")?;
            n += 1;
        }
        Ok(n)
    }

    /// Drops every image whose reference is not in `keep`, then deletes unreferenced blobs.
    pub fn prune(&self, keep: &[String]) -> Result<PruneStats> {
        let mut index = self.read_index()?;
        let mut stats = PruneStats::default();
        index.manifests.retain(|d| {
            let reference = d.annotations.get(ANN_REFERENCE);
            let kept = reference.is_some_and(|r| keep.contains(r));
            if !kept {
                stats
                    .removed_images
                    .push(reference.cloned().unwrap_or_else(|| d.digest.clone()));
            }
            kept
        });
        self.write_index(&index)?;
        let mut live = BTreeSet::new();
        for d in &index.manifests {
            live.insert(d.digest.clone());
            let manifest: Manifest = serde_json::from_slice(&self.read_blob(&d.digest)?)
                .with_context(|| format!("Parsing manifest {}", d.digest))?;
            live.insert(manifest.config.digest.clone());
            live.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        }
        let dir = self.blobs_dir();
        for item in std::fs::read_dir(&dir).with_context(|| format!("Listing {}", dir.display()))? {
            let item = item.context("Listing blobs")?;
            let name = item.file_name().to_string_lossy().to_string();
            if live.contains(&format!("sha256:{name}")) {
                continue;
            }
            let len = item.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(item.path()).with_context(|| format!("Removing blob {name}"))?;
            stats.removed_blobs += 1;
            stats.freed_bytes += len;
        }
        Ok(stats)
    }
}

/// `dnfimage-checks.json`: `[[reference, check], …]`, the least recently checked first; older
/// versions wrote `{reference: check, …}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ChecksFile {
    Ordered(Vec<(String, Value)>),
    Keyed(BTreeMap<String, Value>),
}

fn entry_of(d: &Descriptor) -> Option<Entry> {
    let a = &d.annotations;
    Some(Entry {
        reference: a.get(ANN_REFERENCE)?.clone(),
        tag: a.get(REF_NAME)?.clone(),
        digest: a
            .get(ANN_DIGEST)
            .cloned()
            .unwrap_or_else(|| d.digest.clone()),
        manifest_digest: d.digest.clone(),
        manifest_size: d.size,
        media_type: d.media_type.clone(),
        version: a.get(ANN_VERSION).cloned(),
        fetched: a.get(ANN_FETCHED).cloned().unwrap_or_default(),
        size: a.get(ANN_SIZE).and_then(|s| s.parse().ok()).unwrap_or(0),
        signature: a
            .get(ANN_SIGNATURE)
            .and_then(|s| serde_json::from_str(s).ok()),
    })
}

/// Writes `bytes` to `path` through a synced temporary file in `tmp` and a rename.
fn write_atomic(path: &Path, bytes: &[u8], tmp: &Path) -> Result<()> {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new_in(tmp).context("Creating a temporary file")?;
    file.write_all(bytes)
        .and_then(|()| file.as_file().sync_all())
        .with_context(|| format!("Writing {}", path.display()))?;
    file.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("Replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    #[test]
    fn rejects_malformed_digests() {
        for d in [
            "",
            "sha256:",
            "md5:00",
            "sha256:ABCDEF",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(sha256_hex(d).is_err(), "{d}");
        }
        assert!(sha256_hex(&digest_of(b"x")).is_ok());
    }

    #[tokio::test]
    async fn stores_only_verified_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let data = b"hello layer".to_vec();
        let good = digest_of(&data);
        let mut seen = 0;
        let n = cache
            .write_blob(&good, data.len() as u64, &data[..], |n| seen = n)
            .await
            .unwrap();
        assert_eq!((n, seen), (data.len() as u64, data.len() as u64));
        assert!(cache.has_blob(&good, data.len() as u64));
        assert!(!cache.has_blob(&good, 1));

        // Wrong content: refused, nothing stored, no temporary left behind.
        let other = digest_of(b"something else");
        let err = cache
            .write_blob(&other, data.len() as u64, &data[..], |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(err, BlobError::Mismatch { ref actual, .. } if *actual == good),
            "{err}"
        );
        assert!(!cache.blob_path(&other).unwrap().exists());
        // Right content, wrong size (truncated stream): refused too.
        let err = cache
            .write_blob(&good, 100, &data[..], |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(err, BlobError::Mismatch { received: 11, .. }),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn stops_at_the_declared_size() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        // 3 MiB where 1 KiB was declared: refused after the first read, nothing kept.
        let data = vec![7u8; 3 * 1024 * 1024];
        let digest = digest_of(&data);
        let mut seen = 0;
        let err = cache
            .write_blob(&digest, 1024, &data[..], |n| seen = n)
            .await
            .unwrap_err();
        assert!(
            matches!(err, BlobError::TooLong { size: 1024, ref expected } if *expected == digest),
            "{err}"
        );
        assert_eq!(seen, 0, "nothing was counted as written");
        assert!(!cache.has_blob(&digest, 1024));
        assert!(!cache.blob_path(&digest).unwrap().exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        // One byte too many is too many.
        let err = cache
            .write_blob(&digest_of(b"abc"), 2, &b"abc"[..], |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::TooLong { size: 2, .. }), "{err}");
    }

    #[test]
    fn checks_sizes_of_manifests() {
        let d = |size: u64| Descriptor {
            media_type: "m".into(),
            digest: digest_of(b"x"),
            size,
            annotations: BTreeMap::new(),
            other: BTreeMap::new(),
        };
        let manifest = |config: u64, layers: &[u64]| Manifest {
            config: d(config),
            layers: layers.iter().map(|s| d(*s)).collect(),
        };
        let cases: &[(Manifest, bool)] = &[
            (manifest(10, &[]), true),
            (manifest(10, &[1, 2, 3]), true),
            (manifest(0, &[MAX_BLOB_SIZE]), true),
            (manifest(1, &[MAX_BLOB_SIZE]), false),
            (manifest(u64::MAX, &[]), false),
            (
                manifest(0, &[MAX_BLOB_SIZE / 2 + 1, MAX_BLOB_SIZE / 2 + 1]),
                false,
            ),
            (manifest(0, &[u64::MAX, u64::MAX]), false),
        ];
        for (m, ok) in cases {
            assert_eq!(m.check_sizes().is_ok(), *ok, "{m:?}");
        }
        // A negative size is refused by the parser.
        let negative = serde_json::json!({
            "config": {"mediaType": "c", "digest": digest_of(b"x"), "size": 1},
            "layers": [{"mediaType": "l", "digest": digest_of(b"x"), "size": -5}],
        });
        assert!(serde_json::from_value::<Manifest>(negative).is_err());
    }

    fn check(reference: &str) -> Value {
        serde_json::json!({"reference": reference, "checked": "2024-01-01T00:00:00Z"})
    }

    #[test]
    fn update_checks_are_bounded_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let name = |i: usize| format!("docker://r/img:{i}");
        for i in 0..MAX_CHECKS + 6 {
            cache.record_check(&name(i), check(&name(i))).unwrap();
        }
        let checks = cache.checks().unwrap();
        assert_eq!(checks.len(), MAX_CHECKS);
        // The first six went; the rest stayed.
        for i in 0..6 {
            assert!(!checks.contains_key(&name(i)), "{i} kept");
        }
        for i in 6..MAX_CHECKS + 6 {
            assert_eq!(checks.get(&name(i)), Some(&check(&name(i))), "{i}");
        }
        // Checking one again replaces its record and makes it the most recent: the next new
        // reference pushes out the next oldest instead.
        let mut again = check(&name(6));
        again["version"] = "2".into();
        cache.record_check(&name(6), again.clone()).unwrap();
        assert_eq!(cache.checks().unwrap().len(), MAX_CHECKS);
        cache.record_check("docker://r/new", check("new")).unwrap();
        let checks = Cache::open(dir.path()).unwrap().checks().unwrap();
        assert_eq!(checks.len(), MAX_CHECKS);
        assert_eq!(checks.get(&name(6)), Some(&again));
        assert!(!checks.contains_key(&name(7)));
        assert!(checks.contains_key("docker://r/new"));
        // The file holds one entry a reference, nothing else.
        let text = std::fs::read_to_string(dir.path().join("dnfimage-checks.json")).unwrap();
        let list: Vec<(String, Value)> = serde_json::from_str(&text).unwrap();
        assert_eq!(list.len(), MAX_CHECKS);
        assert_eq!(list.last().map(|(r, _)| r.as_str()), Some("docker://r/new"));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        // A record of a huge version label is not kept; the others stay.
        let mut huge = check("docker://r/huge");
        huge["version"] = "9".repeat(MAX_CHECK_RECORD).into();
        assert!(cache.record_check("docker://r/huge", huge).is_err());
        let checks = cache.checks().unwrap();
        assert_eq!(checks.len(), MAX_CHECKS);
        assert!(!checks.contains_key("docker://r/huge"));
    }

    #[test]
    fn reads_update_checks_of_earlier_versions() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        // The keyed form, with more references than are kept now.
        let mut old = serde_json::Map::new();
        for i in 0..MAX_CHECKS + 2 {
            let reference = format!("docker://r/img:{i}");
            let mut c = check(&reference);
            c["checked"] = format!("2024-01-01T00:{:02}:{:02}Z", i / 60, i % 60).into();
            old.insert(reference, c);
        }
        std::fs::write(
            dir.path().join("dnfimage-checks.json"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        assert_eq!(cache.checks().unwrap().len(), MAX_CHECKS + 2);
        cache.record_check("docker://r/new", check("new")).unwrap();
        let checks = cache.checks().unwrap();
        assert_eq!(checks.len(), MAX_CHECKS);
        // The earliest checked went first.
        for i in 0..3 {
            assert!(!checks.contains_key(&format!("docker://r/img:{i}")), "{i}");
        }
        assert!(checks.contains_key(&format!("docker://r/img:{}", MAX_CHECKS + 1)));
    }

    #[tokio::test]
    async fn records_lists_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let mut entries = vec![];
        for (i, shared) in [(1u8, b"shared".as_slice()), (2, b"shared")] {
            let layer = vec![i; 10];
            let config = format!("{{\"n\":{i}}}").into_bytes();
            let (ld, sd, cd) = (digest_of(&layer), digest_of(shared), digest_of(&config));
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "config": {"mediaType": "c", "digest": cd, "size": config.len()},
                "layers": [
                    {"mediaType": "l", "digest": sd, "size": shared.len()},
                    {"mediaType": "l", "digest": ld, "size": layer.len()},
                ],
            }))
            .unwrap();
            for bytes in [&layer[..], shared, &config[..], &manifest[..]] {
                cache.write_bytes(&digest_of(bytes), bytes).await.unwrap();
            }
            let entry = Entry {
                reference: format!("docker://r/img:{i}"),
                tag: format!("img-{i}"),
                digest: digest_of(&manifest),
                manifest_digest: digest_of(&manifest),
                manifest_size: manifest.len() as u64,
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                version: Some(i.to_string()),
                fetched: dnfimage_runtime::time::now_rfc3339(),
                size: 16,
                signature: (i % 2 == 0).then(|| SignatureCheck {
                    checked: true,
                    verified: true,
                    requirement: Some("default: signedBy".into()),
                    signers: vec![format!("KEY{i}")],
                }),
            };
            cache.record(&entry).unwrap();
            entries.push(entry);
        }
        // Recording again replaces, not duplicates.
        cache.record(&entries[0]).unwrap();
        let reopened = Cache::open(dir.path()).unwrap();
        assert_eq!(reopened.entries().unwrap().len(), 2);
        assert_eq!(
            reopened.lookup("docker://r/img:2").unwrap(),
            Some(entries[1].clone())
        );

        let stats = reopened.prune(&["docker://r/img:2".to_string()]).unwrap();
        assert_eq!(stats.removed_images, vec!["docker://r/img:1".to_string()]);
        // Image 1's own layer, config and manifest go; the shared layer stays.
        assert_eq!(stats.removed_blobs, 3);
        assert_eq!(reopened.entries().unwrap(), vec![entries[1].clone()]);
        assert!(reopened.has_blob(&digest_of(b"shared"), 6));
    }
}
