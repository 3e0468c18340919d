//! All fixture images in one OCI layout, built once and shared by every test process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::base::{BaseOptions, build_base};
use crate::oci::{Image, build_derived, build_not_bootable, read_image};
use crate::registry::Registry;
use crate::skopeo;

/// Bump when the fixture content changes for reasons outside this crate's source (the cache
/// key also covers the factory's source, see [`Fixtures::build`]).
pub const FIXTURES_VERSION: &str = "2";
/// Environment variable naming the fixture cache directory (default: `<target>/dnfimage-fixtures`).
pub const FIXTURES_DIR_ENV: &str = "DNFIMAGE_FIXTURES_DIR";

/// Tags of the fixture images in the OCI layout (pushed under the same tags).
pub mod tags {
    /// Bootable base, version 1.
    pub const BASE_V1: &str = "base-v1";
    /// Bootable base, version 2: only the ostree commit layer and the `os` layer differ from v1.
    pub const BASE_V2: &str = "base-v2";
    /// Base v1 plus one layer adding `/usr/share/dnfimage-derived/hello.txt`.
    pub const DERIVED: &str = "derived";
    /// A plain image without bootable labels.
    pub const NOT_BOOTABLE: &str = "not-bootable";
    /// All of them, in build order.
    pub const ALL: [&str; 4] = [BASE_V1, BASE_V2, DERIVED, NOT_BOOTABLE];
}

/// What was built for one tag.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    /// OCI tag.
    pub tag: String,
    /// Manifest digest.
    pub digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Compressed size of all layers.
    pub bytes: u64,
    /// Build time of this image.
    pub elapsed: Duration,
}

/// Names the cached build: [`FIXTURES_VERSION`] plus a hash of the factory's source, so an edit
/// to the factory never reuses images built by older code.
fn cache_key() -> String {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for source in [
        include_str!("base.rs"),
        include_str!("oci.rs"),
        include_str!("fixtures.rs"),
        include_str!("rpms.rs"),
    ] {
        h.update(source.as_bytes());
    }
    let hash = hex::encode(h.finalize());
    format!("v{FIXTURES_VERSION}-{}", &hash[..12])
}

/// Build every fixture image (see [`tags`]) into the OCI layout `oci_dir`, without caching.
pub fn build_all(oci_dir: &Path, opts: &BaseOptions) -> Result<Vec<ImageSummary>> {
    let mut out = Vec::new();
    for tag in tags::ALL {
        let start = Instant::now();
        match tag {
            tags::BASE_V1 => build_base(oci_dir, tag, 1, opts),
            tags::BASE_V2 => build_base(oci_dir, tag, 2, opts),
            tags::DERIVED => build_derived(oci_dir, tags::BASE_V1, tag),
            _ => build_not_bootable(oci_dir, tag),
        }
        .with_context(|| format!("Building {tag}"))?;
        let image = read_image(oci_dir, tag)?;
        out.push(ImageSummary {
            tag: tag.to_string(),
            digest: image.digest.clone(),
            layers: image.layer_digests(),
            bytes: image.layers_size(),
            elapsed: start.elapsed(),
        });
    }
    Ok(out)
}

/// Docker references of the pushed fixture images.
#[derive(Debug, Clone)]
pub struct PushedRefs {
    /// `docker://ADDR/REPO:base-v1`.
    pub base_v1: String,
    /// `docker://ADDR/REPO:base-v2`.
    pub base_v2: String,
    /// `docker://ADDR/REPO:derived`.
    pub derived: String,
    /// `docker://ADDR/REPO:not-bootable`.
    pub not_bootable: String,
}

/// The fixture images, built (or found already built) in one OCI layout. The layout is shared
/// by concurrent tests: treat it as read-only (corrupt blobs in a registry's storage instead).
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// The OCI layout holding every tag in [`tags`].
    pub oci_dir: PathBuf,
}

/// Builds into `<cache_dir>/<key>` once: a file lock makes concurrent processes wait for one
/// build, a `complete` stamp marks a finished one, and a build that died half-way (or failed) is
/// removed. Returns the directory. Older keys' builds are left in place.
pub(crate) fn cached_build(
    cache_dir: &Path,
    key: &str,
    what: &str,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("Creating {}", cache_dir.display()))?;
    let lock_path = cache_dir.join(format!("{key}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("Opening {}", lock_path.display()))?;
    // Held until `lock` is dropped when this function returns.
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("Locking {}", lock_path.display()))?;
    let dir = cache_dir.join(key);
    let stamp = dir.join("complete");
    if stamp.exists() {
        return Ok(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("Removing {}", dir.display()))?;
    }
    if let Err(e) = build(&dir) {
        if let Err(rm) = std::fs::remove_dir_all(&dir) {
            eprintln!("Removing the failed {what} build, ignoring: {rm}");
        }
        return Err(e.context(format!("Building {what} in {}", dir.display())));
    }
    std::fs::write(&stamp, key).with_context(|| format!("Writing the {what} stamp"))?;
    Ok(dir)
}

impl Fixtures {
    /// Build the fixtures under `cache_dir`, or reuse a complete build there made by the same
    /// [`FIXTURES_VERSION`] and factory source (in `<cache_dir>/v<VERSION>-<hash>/oci`). A file
    /// lock makes concurrent processes wait for one build. Older builds are left in place.
    pub fn build(cache_dir: &Path) -> Result<Fixtures> {
        let dir = cached_build(cache_dir, &cache_key(), "fixtures", |dir| {
            build_all(&dir.join("oci"), &BaseOptions::default()).map(|_| ())
        })?;
        let fixtures = Fixtures {
            oci_dir: dir.join("oci"),
        };
        Ok(fixtures)
    }

    /// The fixtures shared by all tests of all processes: built at most once, in
    /// `$DNFIMAGE_FIXTURES_DIR` or `<cargo target dir>/dnfimage-fixtures`.
    pub fn shared() -> Result<&'static Fixtures> {
        static CELL: OnceLock<Fixtures> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(f) = CELL.get() {
            return Ok(f);
        }
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = CELL.get() {
            return Ok(f);
        }
        let fixtures = Fixtures::build(&shared_cache_dir())?;
        Ok(CELL.get_or_init(|| fixtures))
    }

    /// `oci:<oci_dir>:<tag>`.
    pub fn oci_ref(&self, tag: &str) -> String {
        skopeo::oci_ref(&self.oci_dir, tag)
    }

    /// Manifest and config of a fixture image.
    pub fn image(&self, tag: &str) -> Result<Image> {
        read_image(&self.oci_dir, tag)
    }

    /// Push every fixture image to `registry` as `<repo>:<tag>` (with its credentials, if it
    /// requires some).
    pub fn push(&self, registry: &Registry, repo: &str) -> Result<PushedRefs> {
        let refs = tags::ALL
            .iter()
            .map(|tag| self.push_as(registry, tag, &format!("{repo}:{tag}")))
            .collect::<Result<Vec<_>>>()?;
        let [base_v1, base_v2, derived, not_bootable] = <[String; 4]>::try_from(refs)
            .map_err(|_| anyhow!("Expected four pushed references"))?;
        Ok(PushedRefs {
            base_v1,
            base_v2,
            derived,
            not_bootable,
        })
    }

    /// Push one fixture image under any name, e.g. `push_as(&r, tags::BASE_V2,
    /// "dnfimage/base:latest")` to move a tag to a new version; returns the docker reference.
    pub fn push_as(&self, registry: &Registry, tag: &str, name_and_tag: &str) -> Result<String> {
        let dest = registry.docker_ref(name_and_tag);
        skopeo::copy_as(&self.oci_ref(tag), &dest, registry.credentials().as_deref())?;
        Ok(dest)
    }
}

/// `$DNFIMAGE_FIXTURES_DIR`, else `dnfimage-fixtures` in the cargo target directory holding the
/// running executable (found by its `CACHEDIR.TAG`), else in the temporary directory.
pub(crate) fn shared_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(FIXTURES_DIR_ENV) {
        return dir.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|d| d.join("CACHEDIR.TAG").exists())
                .map(|d| d.join("dnfimage-fixtures"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("dnfimage-fixtures"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::process::Command;

    use ostree_ext::container::store::{ImageImporter, PrepareResult};
    use ostree_ext::container::{ImageReference, OstreeImageReference, SignatureSource, Transport};
    use ostree_ext::{gio, ostree};

    use super::*;
    use crate::base::{HOSTNAME, KERNEL_VERSION};
    use crate::cmd::run;
    use crate::oci::testutil::{diff_ids_of_blobs, layer_entries};
    use crate::oci::{BOOTC_LABEL, DERIVED_CONTENT, DERIVED_FILE, VERSION_LABEL};

    #[test]
    fn base_images_differ_in_one_layer() -> Result<()> {
        let f = Fixtures::shared()?;
        let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);
        let (l1, l2) = (v1.layer_digests(), v2.layer_digests());
        assert!((4..=6).contains(&l1.len()), "{} layers", l1.len());
        assert_eq!(l1.len(), l2.len());
        let changed: Vec<usize> = (0..l1.len()).filter(|&i| l1[i] != l2[i]).collect();
        // The ostree commit layer (first) and the `os` component's layer change.
        assert_eq!(changed.len(), 2, "{changed:?}");
        assert_eq!(changed[0], 0);
        let os_layer = &v2.manifest.layers()[changed[1]];
        let content = os_layer
            .annotations()
            .as_ref()
            .and_then(|a| a.get("ostree.components"))
            .map(String::as_str);
        assert_eq!(content, Some("os"));
        for (image, version) in [(&v1, "1"), (&v2, "2")] {
            assert_eq!(image.label(BOOTC_LABEL), Some("1"));
            assert_eq!(image.label("ostree.bootable"), Some("true"));
            assert_eq!(image.label("ostree.linux"), Some(KERNEL_VERSION));
            assert_eq!(image.label(VERSION_LABEL), Some(version));
            assert_eq!(
                image.config.rootfs().diff_ids(),
                &diff_ids_of_blobs(&f.oci_dir, image)?
            );
        }
        Ok(())
    }

    #[test]
    fn derived_adds_one_layer() -> Result<()> {
        let f = Fixtures::shared()?;
        let (base, derived) = (f.image(tags::BASE_V1)?, f.image(tags::DERIVED)?);
        let (lb, ld) = (base.layer_digests(), derived.layer_digests());
        assert_eq!(ld.len(), lb.len() + 1);
        assert_eq!(ld[..lb.len()], lb[..]);
        assert_eq!(
            derived.config.rootfs().diff_ids(),
            &diff_ids_of_blobs(&f.oci_dir, &derived)?
        );
        assert_eq!(derived.config.history().len(), ld.len());
        assert_eq!(derived.label(BOOTC_LABEL), Some("1"));
        let entries = layer_entries(&f.oci_dir, &ld[lb.len()])?;
        let paths: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "usr/",
                "usr/share/",
                "usr/share/dnfimage-derived/",
                DERIVED_FILE
            ]
        );
        assert_eq!(entries[3].2, DERIVED_CONTENT.as_bytes());
        Ok(())
    }

    #[test]
    fn cached_build_is_reused() -> Result<()> {
        let f = Fixtures::shared()?;
        let start = Instant::now();
        let again = Fixtures::build(
            f.oci_dir
                .parent()
                .and_then(Path::parent)
                .context("cache dir")?,
        )?;
        assert_eq!(again.oci_dir, f.oci_dir);
        assert!(start.elapsed() < Duration::from_secs(1));
        let tags: BTreeSet<String> = crate::oci::list_tags(&f.oci_dir)?.into_iter().collect();
        assert_eq!(tags, tags::ALL.iter().map(|t| t.to_string()).collect());
        Ok(())
    }

    /// Read one file of an ostree commit.
    fn cat(repo: &Path, commit: &str, path: &str) -> Result<String> {
        run(Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(["cat", commit, path]))
    }

    /// Removes the immutable attribute ostree puts on deployment roots, so the sysroot's
    /// temporary directory can be removed.
    struct MutableDeployments(PathBuf);

    impl Drop for MutableDeployments {
        fn drop(&mut self) {
            for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
                if let Err(e) = run(Command::new("chattr").arg("-i").arg(entry.path())) {
                    eprintln!("Making {} mutable, ignoring: {e}", entry.path().display());
                }
            }
        }
    }

    /// The images are what ostree-ext (the importer's library) accepts, and they deploy:
    /// import them into a test sysroot's repo and deploy the derived one.
    #[test]
    fn images_import_and_deploy() -> Result<()> {
        let f = Fixtures::shared()?;
        let tmp = tempfile::tempdir()?;
        let sysroot = tmp.path().join("sysroot");
        let admin = |args: &[&str]| -> Result<String> {
            run(Command::new("ostree")
                .arg("admin")
                .arg(format!("--sysroot={}", sysroot.display()))
                .args(args))
        };
        std::fs::create_dir(&sysroot)?;
        admin(&["init-fs", "--modern", &sysroot.display().to_string()])?;
        admin(&["os-init", "testos"])?;
        let _cleanup = MutableDeployments(sysroot.join("ostree/deploy/testos/deploy"));
        let repo_path = sysroot.join("ostree/repo");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let repo = ostree::Repo::new_for_path(&repo_path);
        repo.open(gio::Cancellable::NONE)?;
        let import = |tag: &str| -> Result<_> {
            rt.block_on(async {
                let imgref = OstreeImageReference {
                    sigverify: SignatureSource::ContainerPolicyAllowInsecure,
                    imgref: ImageReference {
                        transport: Transport::OciDir,
                        name: format!("{}:{tag}", f.oci_dir.display()),
                    },
                };
                let mut importer = ImageImporter::new(&repo, &imgref, Default::default()).await?;
                importer.require_bootable();
                match importer.prepare().await? {
                    PrepareResult::Ready(prep) => Ok(importer.import(prep).await?),
                    PrepareResult::AlreadyPresent(state) => Ok(state),
                }
            })
        };
        let v1 = import(tags::BASE_V1)?;
        let os_release = cat(&repo_path, &v1.merge_commit, "/usr/lib/os-release")?;
        assert!(os_release.contains("VERSION=\"1\""), "{os_release}");
        assert_eq!(
            cat(&repo_path, &v1.merge_commit, "/usr/etc/hostname")?,
            format!("{HOSTNAME}\n")
        );
        let v2 = import(tags::BASE_V2)?;
        assert!(
            cat(&repo_path, &v2.merge_commit, "/usr/lib/os-release")?.contains("VERSION=\"2\"")
        );
        let derived = import(tags::DERIVED)?;
        assert_eq!(derived.base_commit, v1.base_commit);
        assert_eq!(
            cat(
                &repo_path,
                &derived.merge_commit,
                &format!("/{DERIVED_FILE}")
            )?,
            DERIVED_CONTENT
        );
        let err = import(tags::NOT_BOOTABLE).expect_err("not bootable");
        assert!(format!("{err:#}").contains("bootable"), "{err:#}");

        admin(&["deploy", "--os=testos", &derived.merge_commit])?;
        let deployment = sysroot.join(format!(
            "ostree/deploy/testos/deploy/{}.0",
            derived.merge_commit
        ));
        let read = |p: &str| std::fs::read_to_string(deployment.join(p));
        assert_eq!(read("etc/hostname")?, format!("{HOSTNAME}\n"));
        assert_eq!(read(DERIVED_FILE)?, DERIVED_CONTENT);
        let entries = std::fs::read_dir(sysroot.join("boot/loader/entries"))?.count();
        assert_eq!(entries, 1);
        Ok(())
    }

    /// Push, pull v1 then v2 into one OCI layout: the second pull fetches only the changed
    /// layer and the config; a corrupted blob in storage makes a pull fail.
    #[test]
    fn registry_sees_blob_fetches() -> Result<()> {
        let f = Fixtures::shared()?;
        let tmp = tempfile::tempdir()?;
        let registry = Registry::start(&tmp.path().join("registry"))?;
        let refs = f.push(&registry, "dnfimage/base")?;
        assert_eq!(refs.base_v1, registry.docker_ref("dnfimage/base:base-v1"));

        let pulled = tmp.path().join("pulled");
        let (v1, v2) = (f.image(tags::BASE_V1)?, f.image(tags::BASE_V2)?);
        let pos = registry.log_position()?;
        skopeo::copy(&refs.base_v1, &skopeo::oci_ref(&pulled, "v1"))?;
        let got: BTreeSet<String> = registry.blob_requests_since(pos)?.into_iter().collect();
        let mut want: BTreeSet<String> = v1.layer_digests().into_iter().collect();
        want.insert(v1.manifest.config().digest().to_string());
        assert_eq!(got, want);

        let pos = registry.log_position()?;
        skopeo::copy(&refs.base_v2, &skopeo::oci_ref(&pulled, "v2"))?;
        let got = registry.blob_requests_since(pos)?;
        let (l1, l2) = (v1.layer_digests(), v2.layer_digests());
        let mut want: Vec<String> = l2.iter().filter(|d| !l1.contains(d)).cloned().collect();
        assert_eq!(want.len(), 2);
        want.push(v2.manifest.config().digest().to_string());
        assert_eq!(
            got.iter().collect::<BTreeSet<_>>(),
            want.iter().collect::<BTreeSet<_>>()
        );

        // Moving a tag; the manifest digest survives push and pull.
        let latest = f.push_as(&registry, tags::BASE_V2, "dnfimage/base:latest")?;
        skopeo::copy(&latest, &skopeo::oci_ref(&pulled, "latest"))?;
        assert_eq!(read_image(&pulled, "latest")?.digest, v2.digest);

        let derived = f.image(tags::DERIVED)?;
        let top = derived.layer_digests().pop().context("no layers")?;
        std::fs::write(registry.blob_data_path(&top), b"corrupted")?;
        let err = skopeo::copy(
            &refs.derived,
            &skopeo::oci_ref(&tmp.path().join("bad"), "d"),
        )
        .expect_err("corrupted blob");
        assert!(
            format!("{err:#}").contains("Digest did not match"),
            "{err:#}"
        );
        Ok(())
    }
}
