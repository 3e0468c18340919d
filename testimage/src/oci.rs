//! Plain OCI images written directly with `ocidir`: the derived layer, the not-bootable image
//! and the bench image; and reading images back for tests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, anyhow};
use oci_spec::image::{
    ConfigBuilder, Descriptor, HistoryBuilder, ImageConfiguration, ImageManifest, MediaType,
    Platform,
};
use ocidir::OciDir;
use ocidir::cap_std::{ambient_authority, fs::Dir};

/// Creation time written into every config and history entry, so builds are reproducible.
pub const CREATED: &str = "2024-01-01T00:00:00Z";
/// The label ostree-ext and bootc use to recognise a bootable image.
pub const BOOTC_LABEL: &str = "containers.bootc";
/// The OCI version label.
pub const VERSION_LABEL: &str = "org.opencontainers.image.version";
/// The file the derived image adds on top of base v1.
pub const DERIVED_FILE: &str = "usr/share/dnfimage-derived/hello.txt";
/// Its content.
pub const DERIVED_CONTENT: &str = "hello from the derived layer\n";

/// Open the OCI layout at `path`, creating it (and missing parents) if needed.
pub(crate) fn open_or_create(path: &Path) -> Result<OciDir> {
    std::fs::create_dir_all(path).with_context(|| format!("Creating {}", path.display()))?;
    let dir = Dir::open_ambient_dir(path, ambient_authority())
        .with_context(|| format!("Opening {}", path.display()))?;
    OciDir::ensure(&dir).with_context(|| format!("Initialising OCI layout {}", path.display()))
}

fn open(path: &Path) -> Result<OciDir> {
    let dir = Dir::open_ambient_dir(path, ambient_authority())
        .with_context(|| format!("Opening {}", path.display()))?;
    OciDir::open(&dir).with_context(|| format!("Opening OCI layout {}", path.display()))
}

/// The tags in an OCI layout's index, in index order.
pub fn list_tags(oci_dir: &Path) -> Result<Vec<String>> {
    let index = open(oci_dir)?
        .read_index()
        .context("Reading index.json")?
        .ok_or_else(|| anyhow!("No index.json in {}", oci_dir.display()))?;
    Ok(index
        .manifests()
        .iter()
        .filter_map(|d| {
            d.annotations()
                .as_ref()?
                .get(oci_spec::image::ANNOTATION_REF_NAME)
                .cloned()
        })
        .collect())
}

/// An image read back from an OCI layout.
#[derive(Debug)]
pub struct Image {
    /// Manifest digest, `sha256:<hex>`.
    pub digest: String,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The config.
    pub config: ImageConfiguration,
}

impl Image {
    /// Layer digests (`sha256:<hex>`, compressed blobs), bottom first.
    pub fn layer_digests(&self) -> Vec<String> {
        self.manifest
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .collect()
    }

    /// Total compressed size of the layers.
    pub fn layers_size(&self) -> u64 {
        self.manifest.layers().iter().map(|l| l.size()).sum()
    }

    /// A config label.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.config
            .config()
            .as_ref()?
            .labels()
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
}

/// Read the image tagged `tag` from the OCI layout at `oci_dir`.
pub fn read_image(oci_dir: &Path, tag: &str) -> Result<Image> {
    let oci = open(oci_dir)?;
    let index = oci
        .read_index()
        .context("Reading index.json")?
        .ok_or_else(|| anyhow!("No index.json in {}", oci_dir.display()))?;
    let desc = index
        .manifests()
        .iter()
        .find(|d| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(oci_spec::image::ANNOTATION_REF_NAME))
                .is_some_and(|t| t == tag)
        })
        .ok_or_else(|| anyhow!("No tag {tag} in {}", oci_dir.display()))?;
    let manifest: ImageManifest = oci
        .read_json_blob(desc)
        .with_context(|| format!("Reading manifest of {tag}"))?;
    let config = oci
        .read_json_blob(manifest.config())
        .with_context(|| format!("Reading config of {tag}"))?;
    Ok(Image {
        digest: desc.digest().to_string(),
        manifest,
        config,
    })
}

/// The path of a blob in an OCI layout.
pub fn blob_path(oci_dir: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    oci_dir.join("blobs/sha256").join(hex)
}

/// Hard-link (or copy, across filesystems) a blob from one OCI layout to another.
fn link_blob(src_dir: &Path, dst_dir: &Path, digest: &str) -> Result<()> {
    let (src, dst) = (blob_path(src_dir, digest), blob_path(dst_dir, digest));
    if dst.exists() {
        return Ok(());
    }
    if std::fs::hard_link(&src, &dst).is_err() {
        std::fs::copy(&src, &dst).with_context(|| format!("Copying blob {digest}"))?;
    }
    Ok(())
}

/// Copy the image `src_tag` from `src_dir` into `dst_dir` as `dst_tag`, with every history
/// timestamp set to [`CREATED`] (ostree-ext stamps the build time there); returns the new
/// manifest digest.
pub(crate) fn import_normalized(
    src_dir: &Path,
    src_tag: &str,
    dst_dir: &Path,
    dst_tag: &str,
) -> Result<String> {
    let image = read_image(src_dir, src_tag)?;
    let mut config = image.config;
    for h in config.history_mut() {
        h.set_created(Some(CREATED.to_string()));
    }
    let dst = open_or_create(dst_dir)?;
    for layer in image.manifest.layers() {
        link_blob(src_dir, dst_dir, layer.digest().as_ref())?;
    }
    let desc = dst
        .insert_manifest_and_config(image.manifest, config, Some(dst_tag), Platform::default())
        .with_context(|| format!("Writing manifest {dst_tag}"))?;
    Ok(desc.digest().to_string())
}

/// Deterministic pseudo-random bytes (SplitMix64): incompressible, same seed same bytes.
pub(crate) struct Prng {
    state: u64,
    remaining: u64,
}

impl Prng {
    /// A reader of `len` bytes derived from `seed`.
    pub(crate) fn new(seed: u64, len: u64) -> Self {
        Prng {
            state: seed ^ 0x6a09_e667_f3bc_c908,
            remaining: len,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// All remaining bytes.
    pub(crate) fn into_vec(mut self) -> Vec<u8> {
        let mut v = Vec::new();
        self.read_to_end(&mut v)
            .expect("reading from memory cannot fail");
        v
    }
}

impl Read for Prng {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        for chunk in buf[..n].chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(entry_type);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// Append a directory entry (root-owned, mode 0755, mtime 0).
fn append_dir(b: &mut tar::Builder<impl Write>, path: &str) -> Result<()> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, path, std::io::empty())
        .with_context(|| format!("Writing {path} to layer"))
}

/// Append a regular file (root-owned, mtime 0) and all its parent directories.
fn append_file_with_parents(
    b: &mut tar::Builder<impl Write>,
    path: &str,
    mode: u32,
    size: u64,
    data: impl Read,
) -> Result<()> {
    let mut parent = String::new();
    for component in path
        .split('/')
        .collect::<Vec<_>>()
        .split_last()
        .map_or(&[][..], |s| s.1)
    {
        parent.push_str(component);
        parent.push('/');
        append_dir(b, &parent)?;
    }
    let mut h = header(tar::EntryType::Regular, mode, size);
    b.append_data(&mut h, path, data)
        .with_context(|| format!("Writing {path} to layer"))
}

/// Add `layer` on top of the image: manifest descriptor, config diff ID, history entry.
fn push_layer(
    manifest: &mut ImageManifest,
    config: &mut ImageConfiguration,
    layer: ocidir::Layer,
    created_by: &str,
) -> Result<()> {
    manifest.layers_mut().push(
        layer
            .descriptor()
            .build()
            .context("Building layer descriptor")?,
    );
    let mut rootfs = config.rootfs().clone();
    rootfs
        .diff_ids_mut()
        .push(layer.uncompressed_sha256_as_digest().to_string());
    config.set_rootfs(rootfs);
    config.history_mut().push(
        HistoryBuilder::default()
            .created(CREATED)
            .created_by(created_by)
            .build()
            .context("Building history entry")?,
    );
    Ok(())
}

/// An empty image (no layers) with the given labels.
fn new_image(labels: &[(&str, &str)]) -> Result<(ImageManifest, ImageConfiguration)> {
    let manifest = ocidir::new_empty_manifest()
        .media_type(MediaType::ImageManifest)
        .build()
        .context("Building manifest")?;
    let labels: HashMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut config = ImageConfiguration::default();
    config.set_created(Some(CREATED.to_string()));
    config.set_config(Some(
        ConfigBuilder::default()
            .labels(labels)
            .cmd(vec!["/usr/bin/sh".to_string()])
            .build()
            .context("Building container config")?,
    ));
    Ok((manifest, config))
}

fn insert(
    oci: &OciDir,
    manifest: ImageManifest,
    config: ImageConfiguration,
    tag: &str,
) -> Result<String> {
    let desc: Descriptor = oci
        .insert_manifest_and_config(manifest, config, Some(tag), Platform::default())
        .with_context(|| format!("Writing manifest {tag}"))?;
    Ok(desc.digest().to_string())
}

/// Tag `tag`: the image `base_tag` plus one layer adding [`DERIVED_FILE`], as a derived
/// Containerfile build would make it (config labels inherited, manifest annotations dropped).
/// Returns the manifest digest.
pub fn build_derived(oci_dir: &Path, base_tag: &str, tag: &str) -> Result<String> {
    let base = read_image(oci_dir, base_tag)?;
    let oci = open(oci_dir)?;
    let mut manifest = base.manifest;
    let mut config = base.config;
    manifest.set_annotations(None);
    let mut w = oci.create_layer(None).context("Creating derived layer")?;
    append_file_with_parents(
        &mut w,
        DERIVED_FILE,
        0o644,
        DERIVED_CONTENT.len() as u64,
        DERIVED_CONTENT.as_bytes(),
    )?;
    let layer = w
        .into_inner()
        .context("Finishing derived layer")?
        .complete()
        .context("Writing derived layer")?;
    push_layer(
        &mut manifest,
        &mut config,
        layer,
        &format!("dnfimage-testimage: add /{DERIVED_FILE}"),
    )?;
    insert(&oci, manifest, config, tag)
}

/// Tag `tag`: a plain one-layer image without bootable labels (for `NotBootable` errors).
pub fn build_not_bootable(oci_dir: &Path, tag: &str) -> Result<String> {
    let oci = open_or_create(oci_dir)?;
    let (mut manifest, mut config) = new_image(&[(VERSION_LABEL, "1")])?;
    let mut w = oci.create_layer(None).context("Creating layer")?;
    let text = "an ordinary application image, not bootable\n";
    append_file_with_parents(
        &mut w,
        "usr/share/dnfimage-plain/README",
        0o644,
        text.len() as u64,
        text.as_bytes(),
    )?;
    let layer = w
        .into_inner()
        .context("Finishing layer")?
        .complete()
        .context("Writing layer")?;
    push_layer(
        &mut manifest,
        &mut config,
        layer,
        "dnfimage-testimage: plain",
    )?;
    insert(&oci, manifest, config, tag)
}

/// Shape of the bench image.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Number of layers.
    pub layers: u32,
    /// Total uncompressed payload in MiB, spread evenly over the layers.
    pub total_mib: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            layers: 9,
            total_mib: 210,
        }
    }
}

/// Tag `tag`: [`BenchOptions::layers`] layers of incompressible pseudo-random data, labelled
/// bootable but not an ostree commit (only for fetch benchmarks). Layers are gzipped at the
/// fast level on all cores. Returns the manifest digest.
pub fn build_bench(oci_dir: &Path, tag: &str, opts: &BenchOptions) -> Result<String> {
    anyhow::ensure!(opts.layers > 0, "The bench image needs at least one layer");
    let oci = open_or_create(oci_dir)?;
    let total = opts.total_mib * 1024 * 1024;
    let n = opts.layers as usize;
    let size_of = |i: usize| {
        let base = total / n as u64;
        if i + 1 == n {
            total - base * (n as u64 - 1)
        } else {
            base
        }
    };
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<ocidir::Layer>>> = Mutex::new((0..n).map(|_| None).collect());
    let workers = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .min(n);
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        let mut w = oci
                            .create_layer(Some(flate2::Compression::fast()))
                            .context("Creating bench layer")?;
                        let size = size_of(i);
                        let path = format!("usr/share/dnfimage-bench/layer-{i:03}.bin");
                        append_file_with_parents(
                            &mut w,
                            &path,
                            0o644,
                            size,
                            Prng::new(i as u64, size),
                        )?;
                        let layer = w
                            .into_inner()
                            .context("Finishing bench layer")?
                            .complete()
                            .with_context(|| format!("Writing bench layer {i}"))?;
                        done.lock().map_err(|_| anyhow!("Bench worker panicked"))?[i] = Some(layer);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("Bench worker panicked"))??;
        }
        Ok(())
    })?;
    let (mut manifest, mut config) = new_image(&[(BOOTC_LABEL, "1"), (VERSION_LABEL, "bench")])?;
    let layers = done
        .into_inner()
        .map_err(|_| anyhow!("Bench worker panicked"))?;
    for (i, layer) in layers.into_iter().enumerate() {
        let layer = layer.ok_or_else(|| anyhow!("Bench layer {i} missing"))?;
        push_layer(
            &mut manifest,
            &mut config,
            layer,
            &format!("bench layer {i}"),
        )?;
    }
    insert(&oci, manifest, config, tag)
}

/// Helpers for tests that look inside layers.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use flate2::read::GzDecoder;
    use sha2::{Digest as _, Sha256};

    /// The uncompressed sha256 of every layer, as `sha256:<hex>`.
    pub(crate) fn diff_ids_of_blobs(oci_dir: &Path, image: &Image) -> Result<Vec<String>> {
        image
            .layer_digests()
            .iter()
            .map(|d| {
                let mut gz = GzDecoder::new(std::fs::File::open(blob_path(oci_dir, d))?);
                let mut hasher = Sha256::new();
                std::io::copy(&mut gz, &mut hasher)?;
                Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
            })
            .collect()
    }

    /// Path → (mode, content) of every regular file and directory in a layer.
    pub(crate) fn layer_entries(
        oci_dir: &Path,
        digest: &str,
    ) -> Result<Vec<(String, u32, Vec<u8>)>> {
        let gz = GzDecoder::new(std::fs::File::open(blob_path(oci_dir, digest))?);
        let mut archive = tar::Archive::new(gz);
        let mut out = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.to_string_lossy().into_owned();
            let mode = entry.header().mode()?;
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            out.push((path, mode, data));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{diff_ids_of_blobs, layer_entries};
    use super::*;

    #[test]
    fn prng_is_deterministic_and_sized() {
        let cases = [(0u64, 0u64), (1, 1), (1, 7), (2, 8), (3, 1000)];
        for (seed, len) in cases {
            let a = Prng::new(seed, len).into_vec();
            assert_eq!(a.len() as u64, len);
            assert_eq!(a, Prng::new(seed, len).into_vec());
        }
        // A prefix of a longer stream is the shorter stream; other seeds differ.
        assert_eq!(
            Prng::new(5, 100).into_vec()[..13],
            Prng::new(5, 13).into_vec()[..]
        );
        assert_ne!(Prng::new(5, 64).into_vec(), Prng::new(6, 64).into_vec());
    }

    #[test]
    fn bench_image_shape() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let oci_dir = tmp.path().join("oci");
        let opts = BenchOptions {
            layers: 3,
            total_mib: 2,
        };
        let digest = build_bench(&oci_dir, "bench", &opts)?;
        let image = read_image(&oci_dir, "bench")?;
        assert_eq!(image.digest, digest);
        assert_eq!(image.manifest.layers().len(), 3);
        assert_eq!(image.label(BOOTC_LABEL), Some("1"));
        assert_eq!(
            image.config.rootfs().diff_ids(),
            &diff_ids_of_blobs(&oci_dir, &image)?
        );
        // Pseudo-random data does not compress: the blobs are about as big as the payload.
        assert!(
            image.layers_size() >= 2 * 1024 * 1024,
            "{}",
            image.layers_size()
        );
        let payload: usize = image
            .layer_digests()
            .iter()
            .map(|d| {
                let entries = layer_entries(&oci_dir, d)?;
                Ok(entries.iter().map(|e| e.2.len()).sum::<usize>())
            })
            .sum::<Result<usize>>()?;
        assert_eq!(payload, 2 * 1024 * 1024);
        // Same options, same image.
        let again = tmp.path().join("again");
        assert_eq!(build_bench(&again, "bench", &opts)?, digest);
        Ok(())
    }

    #[test]
    fn not_bootable_has_no_bootable_labels() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let digest = build_not_bootable(tmp.path(), "plain")?;
        let image = read_image(tmp.path(), "plain")?;
        assert_eq!(image.digest, digest);
        assert_eq!(image.label(BOOTC_LABEL), None);
        assert_eq!(image.label("ostree.bootable"), None);
        assert_eq!(image.manifest.layers().len(), 1);
        assert_eq!(list_tags(tmp.path())?, vec!["plain".to_string()]);
        assert_eq!(
            image.config.rootfs().diff_ids(),
            &diff_ids_of_blobs(tmp.path(), &image)?
        );
        Ok(())
    }
}
