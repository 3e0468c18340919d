//! The fetcher service (`org.dnfimage.Fetcher`): inspects images in registries and OCI layouts,
//! tells whether an image moved, and fetches the missing layers concurrently into a local OCI
//! layout that the importer reads.

pub mod cache;
pub mod policy;
pub mod reference;
pub mod registry;
pub mod signers;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use dnfimage_interfaces::fetcher::{
    CachedImage, CancelReply, CheckUpdateReply, FetchPhase, FetchProgress, FetchReply, FetchResult,
    FetcherError, GetDiskUsageReply, IDL, ImageInfo, InspectReply, LastCheckReply, Layer,
    ListCachedReply, PruneReply, SignatureCheck, StagedImage, UpdateCheck,
};
use dnfimage_interfaces::reference::{ImageRef, excerpt};
use dnfimage_runtime::{
    Activation, Activity, Caller, InstanceLock, JobSlot, Policy, ServiceArgs, refused,
    spawn_streamed,
};
use futures_util::Stream;
use serde::Deserialize;
use zlink::Reply;

use cache::{BlobError, Cache, Descriptor, Entry, Manifest};
use registry::{Opened, ProxySettings, classify, proxy_message};

/// Methods that change state: only root may call them.
pub const PRIVILEGED: &[&str] = &["Fetch", "Cancel", "Prune"];

pub use dnfimage_interfaces::fetcher::DEFAULT_CONCURRENCY;
const MAX_CONCURRENCY: u64 = 32;

/// The largest manifest the fetcher takes. containers/image, which skopeo (and podman, bootc)
/// use, reads at most 4 MiB of a manifest (`iolimits.MaxManifestBodySize`), as the registry
/// does (distribution's limit): an image any of them can pull fits. A chunked OS image's
/// manifest is a few KiB.
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// The largest configuration blob the fetcher reads: containers/image's
/// `iolimits.MaxConfigBodySize`, 4 MiB, for the same reason. An OS image's configuration (its
/// labels and one history entry a layer) is a few KiB; this one is held in memory whole.
pub const MAX_CONFIG_SIZE: u64 = 4 << 20;

/// Command line of `dnfimage-fetcher`.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about = "The dnfimage fetcher service (org.dnfimage.Fetcher)")]
pub struct Args {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// State directory; the blob cache is its `cache/` subdirectory.
    #[arg(long, env = "DNFIMAGE_STATE_DIR", default_value = "/var/lib/dnfimage")]
    pub state_dir: PathBuf,
    /// registries.conf handed to skopeo (e.g. to mark a plain-HTTP registry insecure).
    #[arg(long, env = "DNFIMAGE_REGISTRIES_CONF")]
    pub registries_conf: Option<PathBuf>,
    /// Registry credentials (auth.json) handed to skopeo. Unset: the first that exists of
    /// $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json (without XDG_RUNTIME_DIR:
    /// /run/containers/UID/auth.json, where `skopeo login` writes), /run/ostree/auth.json,
    /// /etc/ostree/auth.json, /usr/lib/ostree/auth.json (bootc's and rpm-ostree's).
    #[arg(long, env = "DNFIMAGE_AUTHFILE")]
    pub authfile: Option<PathBuf>,
    /// Seconds a registry may stay silent before the call fails with RegistryUnreachable: in
    /// all, answering for an image's manifest and configuration; during a fetch, with no byte
    /// of any layer arriving (0:
    /// wait as long as skopeo does, which is forever for a registry that accepts connections
    /// and never answers; the service answers no one else meanwhile, and a fetch never ends).
    #[arg(long, env = "DNFIMAGE_REGISTRY_TIMEOUT", default_value_t = 60)]
    pub registry_timeout: u64,
    /// Signature policy (containers-policy.json) an image must meet before it is fetched or
    /// reported as an update; read at each check.
    #[arg(long, env = "DNFIMAGE_POLICY", default_value = registry::DEFAULT_POLICY)]
    pub policy: PathBuf,
    /// registries.d directory saying where each registry's signatures are (lookaside).
    #[arg(long, env = "DNFIMAGE_REGISTRIES_D", default_value = registry::DEFAULT_REGISTRIES_D)]
    pub registries_d: PathBuf,
}

/// Runs the service until idle or stopped.
pub async fn run(args: Args, activation: Option<Activation>) -> Result<()> {
    // Before the cache clears its tmp/: a second instance must not touch a running one's files.
    // Inside the cache, the one directory the unit lets the fetcher write.
    let _lock = InstanceLock::acquire(
        &args.state_dir.join("cache/fetcher.lock"),
        &format!("The fetcher state directory {}", args.state_dir.display()),
    )?;
    let activity = Activity::new();
    let jobs = JobSlot::new(activity.clone());
    let fetcher = Fetcher::new(
        Cache::open(&args.state_dir.join("cache"))?,
        ProxySettings {
            registries_conf: args.registries_conf.clone(),
            authfile: args.authfile.clone(),
            registry_timeout: (args.registry_timeout > 0)
                .then(|| std::time::Duration::from_secs(args.registry_timeout)),
            policy: args.policy.clone(),
            registries_d: args.registries_d.clone(),
        },
        jobs.clone(),
    );
    let policy = Policy::new(IDL, PRIVILEGED)?;
    dnfimage_runtime::serve(
        |caller| fetcher.for_caller(caller),
        policy,
        &args.service,
        activation,
        activity,
        &jobs,
    )
    .await
}

/// The service as one connection sees it: the shared state and who is calling.
#[derive(Debug, Clone)]
pub struct Fetcher {
    shared: Arc<Shared>,
    caller: Caller,
}

#[derive(Debug)]
struct Shared {
    cache: Cache,
    proxy: ProxySettings,
    jobs: JobSlot,
    /// The image the last privileged `CheckUpdate` resolved, for the `Fetch` that follows.
    checked: std::sync::Mutex<Option<Checked>>,
}

/// How long a `Fetch` may use what a `CheckUpdate` resolved instead of asking the registry
/// again: `dnf-image upgrade` fetches right after its check.
const CHECKED_REUSE: Duration = Duration::from_secs(60);

/// An image a `CheckUpdate` resolved (manifest, configuration, policy check, skopeo's open
/// image), kept for the `Fetch` of the same reference with the same verification.
struct Checked {
    reference: String,
    verify: bool,
    at: Instant,
    resolved: Resolved,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("reference", &self.reference)
            .field("verify", &self.verify)
            .field("digest", &self.resolved.digest)
            .finish_non_exhaustive()
    }
}

/// What the source says about an image before any layer is fetched.
struct Resolved {
    opened: Opened,
    /// The manifest digest the source reported: the registry's, also when skopeo converted
    /// a Docker schema 2 manifest to OCI.
    digest: String,
    /// The digest of `manifest_bytes`, the manifest as stored in the cache: `digest` unless
    /// skopeo converted it.
    manifest_digest: String,
    manifest_bytes: Vec<u8>,
    manifest: Manifest,
    config_bytes: Vec<u8>,
    config: ConfigSummary,
    /// What the signature policy check found (not checked unless asked).
    signature: SignatureCheck,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigSummary {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    config: Option<ConfigInner>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigInner {
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

impl ConfigSummary {
    fn labels(&self) -> BTreeMap<String, String> {
        self.config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default()
    }
}

fn version_of(labels: &BTreeMap<String, String>) -> Option<String> {
    labels.get("org.opencontainers.image.version").cloned()
}

/// Whether the labels mark a bootable OS image.
pub fn is_bootable(labels: &BTreeMap<String, String>) -> bool {
    labels.get("containers.bootc").is_some_and(|v| v == "1")
        || labels
            .get("ostree.bootable")
            .is_some_and(|v| v == "1" || v == "true")
}

fn failed(context: &str, e: impl std::fmt::Display) -> FetcherError {
    FetcherError::Failed {
        message: format!("{context}: {e:#}"),
    }
}

fn parse_ref(image: &str) -> Result<ImageRef, FetcherError> {
    ImageRef::parse(image).map_err(|e| FetcherError::InvalidImageReference {
        image: excerpt(image).into_owned(),
        message: e.to_string(),
    })
}

impl Fetcher {
    /// A fetcher over `cache`, starting skopeo as `proxy` says, running jobs in `jobs`.
    pub fn new(cache: Cache, proxy: ProxySettings, jobs: JobSlot) -> Self {
        Self {
            shared: Arc::new(Shared {
                cache,
                proxy,
                jobs,
                checked: std::sync::Mutex::new(None),
            }),
            caller: Caller::ROOT,
        }
    }

    /// The same fetcher, serving `caller`.
    pub fn for_caller(&self, caller: Caller) -> Self {
        Self {
            shared: self.shared.clone(),
            caller,
        }
    }

    /// Refuses to let an unprivileged caller make the service read a local image: the service
    /// runs as root, so an `oci:` path would read what the caller itself may not.
    fn may_read(&self, image: &ImageRef, method: &str) -> Result<(), FetcherError> {
        if image.transport() == dnfimage_interfaces::reference::Transport::Registry
            || self.caller.privileged
        {
            return Ok(());
        }
        tracing::info!(
            "Refusing {method} of local image {image} to uid {:?}",
            self.caller.uid
        );
        Err(FetcherError::PermissionDenied {
            method: format!("{method} of a local (oci:, oci-archive:) image"),
        })
    }

    /// Opens `image` and reads its manifest and configuration, within the registry timeout.
    /// `verify`: check the manifest against the signature policy first (see
    /// [`ProxySettings::verify`]); everything read afterwards is what that manifest names, by
    /// digest.
    async fn resolve(&self, image: &ImageRef, verify: bool) -> Result<Resolved, FetcherError> {
        let Some(limit) = self.shared.proxy.registry_timeout else {
            return self.resolve_unbounded(image, verify).await;
        };
        // On timeout the proxy is dropped, which closes skopeo's socket: skopeo exits.
        tokio::time::timeout(limit, self.resolve_unbounded(image, verify))
            .await
            .unwrap_or_else(|_| {
                Err(FetcherError::RegistryUnreachable {
                    image: image.to_string(),
                    message: format!(
                        "no answer for the manifest and configuration within {} s \
                         (the fetcher's --registry-timeout)",
                        limit.as_secs()
                    ),
                })
            })
    }

    async fn resolve_unbounded(
        &self,
        image: &ImageRef,
        verify: bool,
    ) -> Result<Resolved, FetcherError> {
        let reference = image.to_string();
        let opened = self.shared.proxy.open(image).await?;
        let proxy_err = |e: containers_image_proxy::Error| {
            match opened.explain(classify(&reference, &proxy_message(&e))) {
                // skopeo refused a manifest that is not the one a pinned reference names.
                FetcherError::DigestMismatch {
                    expected,
                    actual,
                    message,
                } if expected.is_empty() => FetcherError::DigestMismatch {
                    expected: image.digest().unwrap_or_default().to_string(),
                    actual,
                    message: format!("{message}; nothing was kept"),
                },
                other => other,
            }
        };
        // containers-image-proxy reads the manifest whole (it has no bounded read); skopeo
        // reads at most 4 MiB from a registry, so only a local layout can make it larger.
        // Refusing it here keeps it out of the cache and of every later parse.
        let (digest, manifest_bytes) = opened
            .proxy
            .fetch_manifest_raw_oci(&opened.image)
            .await
            .map_err(proxy_err)?;
        // skopeo's proxy compares the manifest with the digest a pinned reference names (above);
        // checked again here, so that the cache never records an image under a digest it
        // does not have whatever skopeo does.
        if let Some(wanted) = image.digest()
            && wanted != digest
        {
            return Err(FetcherError::DigestMismatch {
                expected: wanted.to_string(),
                actual: Some(digest.clone()),
                message: format!(
                    "{reference}: the registry (or a mirror registries.conf names) sent the \
                     manifest {digest} for it, another image; nothing was kept"
                ),
            });
        }
        if manifest_bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(FetcherError::MetadataTooLarge {
                image: reference,
                blob: "manifest".into(),
                size: manifest_bytes.len() as u64,
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let signature = if verify {
            self.shared.proxy.verify(image, &digest).await?
        } else {
            SignatureCheck::default()
        };
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| failed(&format!("Parsing the manifest of {reference}"), e))?;
        manifest
            .check_sizes()
            .map_err(|e| failed(&format!("Checking the manifest of {reference}"), e))?;
        // skopeo's proxy gives every manifest as OCI, and the source's digest with it: a
        // Docker schema 2 manifest arrives converted, its bytes no longer hashing to it.
        let manifest_digest = sha256_digest(&manifest_bytes);
        let converted = manifest_digest != digest;
        let config_bytes = self
            .config_blob(&opened, &reference, &manifest.config, converted)
            .await?;
        let config: ConfigSummary = serde_json::from_slice(&config_bytes)
            .map_err(|e| failed(&format!("Parsing the configuration of {reference}"), e))?;
        Ok(Resolved {
            opened,
            digest,
            manifest_digest,
            manifest_bytes,
            manifest,
            config_bytes,
            config,
            signature,
        })
    }

    /// The configuration blob as stored: from the cache when it is there, else from the source
    /// (skopeo's GetFullConfig re-serializes it, which would change its digest). At most
    /// [`MAX_CONFIG_SIZE`] bytes, and never more than the manifest declares.
    ///
    /// When skopeo `converted` the manifest, the configuration it names is skopeo's conversion
    /// of the source's (re-serialized: another digest, which the registry does not have): that
    /// one is GetFullConfig's, checked against the digest and size the converted manifest names.
    async fn config_blob(
        &self,
        opened: &Opened,
        reference: &str,
        config: &Descriptor,
        converted: bool,
    ) -> Result<Vec<u8>, FetcherError> {
        if config.size > MAX_CONFIG_SIZE {
            return Err(FetcherError::MetadataTooLarge {
                image: reference.to_string(),
                blob: "configuration".into(),
                size: config.size,
                limit: MAX_CONFIG_SIZE,
            });
        }
        let cache = &self.shared.cache;
        if cache.has_blob(&config.digest, config.size) {
            return cache
                .read_blob(&config.digest)
                .map_err(|e| failed("Reading a cached configuration", e));
        }
        let proxy_err = |e: containers_image_proxy::Error| classify(reference, &proxy_message(&e));
        if converted {
            // skopeo read the source's configuration within containers/image's 4 MiB limit.
            let bytes = opened
                .proxy
                .fetch_config_raw(&opened.image)
                .await
                .map_err(proxy_err)?;
            check_converted_config(config, &bytes).map_err(|actual| {
                FetcherError::DigestMismatch {
                    expected: config.digest.clone(),
                    message: format!(
                        "{reference}: skopeo converted the image's Docker schema 2 manifest to \
                         OCI, and the configuration it converted with it is {actual} \
                         ({} bytes), not the {} ({} bytes) its manifest names; nothing was kept",
                        bytes.len(),
                        config.digest,
                        config.size
                    ),
                    actual: Some(actual),
                }
            })?;
            return Ok(bytes);
        }
        let digest: containers_image_proxy::oci_spec::image::Digest = config
            .digest
            .parse()
            .map_err(|e| failed(&format!("Parsing the config digest of {reference}"), e))?;
        let (reader, finish) = opened
            .proxy
            .get_blob(&opened.image, &digest, config.size)
            .await
            .map_err(proxy_err)?;
        // One byte more than declared is enough to know the source sends too much.
        let read = async move {
            let mut bytes = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(
                &mut tokio::io::AsyncReadExt::take(reader, config.size + 1),
                &mut bytes,
            )
            .await
            .map(|_| bytes)
        };
        let read_error =
            |e: std::io::Error| failed(&format!("Reading the configuration of {reference}"), e);
        let too_long = || FetcherError::DigestMismatch {
            expected: config.digest.clone(),
            actual: None,
            message: format!(
                "{reference}: the configuration {} is longer than the {} bytes its manifest \
                 declares; nothing was kept",
                config.digest, config.size
            ),
        };
        tokio::pin!(read, finish);
        // When it sends too much, skopeo never finishes writing: no waiting on it then.
        let bytes = tokio::select! {
            read = &mut read => {
                let bytes = read.map_err(read_error)?;
                if bytes.len() as u64 > config.size {
                    return Err(too_long());
                }
                finish.await.map_err(proxy_err)?;
                bytes
            }
            finished = &mut finish => {
                // Our count says more than skopeo's error ("expected N bytes in blob").
                let bytes = read.await.map_err(read_error)?;
                if bytes.len() as u64 > config.size {
                    return Err(too_long());
                }
                finished.map_err(proxy_err)?;
                bytes
            }
        };
        Ok(bytes)
    }

    /// `CheckUpdate`; `record`: whether the answer is kept for `LastCheck` (bounded and one
    /// record a reference, see [`cache::MAX_CHECKS`]); `verify`: whether the signature policy
    /// is checked.
    async fn check(
        &self,
        image: String,
        current_digest: Option<String>,
        record: bool,
        verify: bool,
    ) -> Result<CheckUpdateReply, FetcherError> {
        let image_ref = parse_ref(&image)?;
        self.may_read(&image_ref, "CheckUpdate")?;
        // An image the policy rejects is no update: say so now rather than at the fetch.
        let resolved = self.resolve(&image_ref, verify).await?;
        let current = match current_digest {
            Some(d) => Some(d),
            None => self
                .shared
                .cache
                .lookup(&image_ref.to_string())
                .map_err(|e| failed("Reading the cache index", e))?
                .map(|e| e.digest),
        };
        let layers = self.layers(&resolved.manifest);
        let missing: Vec<_> = layers.iter().filter(|l| !l.cached).collect();
        let reply = CheckUpdateReply {
            update_available: current.as_deref() != Some(resolved.digest.as_str()),
            version: version_of(&resolved.config.labels()),
            digest: resolved.digest.clone(),
            layers_missing: missing.len() as u64,
            bytes_missing: missing.iter().map(|l| l.size).sum(),
            layers_total: layers.len() as u64,
            bytes_total: layers.iter().map(|l| l.size).sum(),
        };
        if !record {
            return Ok(reply);
        }
        // What an unprivileged caller had resolved is not handed to a fetch.
        if reply.update_available {
            *self.lock_checked() = Some(Checked {
                reference: image_ref.to_string(),
                verify,
                at: Instant::now(),
                resolved,
            });
        }
        let check = UpdateCheck {
            reference: image_ref.to_string(),
            checked: dnfimage_runtime::time::now_rfc3339(),
            current_digest: current,
            digest: reply.digest.clone(),
            version: reply.version.clone(),
            update_available: reply.update_available,
            layers_missing: reply.layers_missing,
            bytes_missing: reply.bytes_missing,
        };
        let recorded = serde_json::to_value(&check)
            .map_err(anyhow::Error::from)
            .and_then(|v| self.shared.cache.record_check(&check.reference, v));
        if let Err(e) = recorded {
            tracing::warn!("Recording the update check of {image_ref}: {e:#}");
        }
        Ok(reply)
    }

    fn lock_checked(&self) -> std::sync::MutexGuard<'_, Option<Checked>> {
        self.shared
            .checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// What the last `CheckUpdate` resolved for `image` with `verify`, if it is recent; taken
    /// (a fetch uses it once), and anything else kept is dropped.
    fn take_checked(&self, image: &ImageRef, verify: bool) -> Option<Resolved> {
        let checked = self.lock_checked().take()?;
        let usable = checked.reference == image.to_string()
            && checked.verify == verify
            && checked.at.elapsed() < CHECKED_REUSE;
        usable.then_some(checked.resolved)
    }

    fn layers(&self, manifest: &Manifest) -> Vec<Layer> {
        manifest
            .layers
            .iter()
            .map(|l| Layer {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
                cached: self.shared.cache.has_blob(&l.digest, l.size),
            })
            .collect()
    }
}

/// Fetches bootable container images from registries and OCI layouts into a local OCI blob
/// cache, several layers at once, for the importer to read.
#[zlink::service(
    interface = "org.dnfimage.Fetcher",
    types = [
        Layer, ImageInfo, UpdateCheck, FetchPhase, FetchProgress, StagedImage, SignatureCheck,
        FetchResult, CachedImage,
    ],
    vendor = "dnfimage",
    product = "dnfimage-fetcher",
    version = env!("CARGO_PKG_VERSION"),
    url = "https://example.invalid/dnfimage"
)]
impl Fetcher {
    /// Reads an image's manifest and configuration (no layer is downloaded). `image` is
    /// "docker://host/name:tag" (the default transport), "oci:/path[:tag]" or
    /// "oci-archive:/path.tar[:tag]".
    async fn inspect(&self, image: String) -> Result<InspectReply, FetcherError> {
        let image_ref = parse_ref(&image)?;
        self.may_read(&image_ref, "Inspect")?;
        // Reading metadata trusts nothing: no policy check (as `skopeo inspect`), so a rejected
        // image can still be looked at.
        let resolved = self.resolve(&image_ref, false).await?;
        let labels = resolved.config.labels();
        let layers = self.layers(&resolved.manifest);
        Ok(InspectReply {
            image: ImageInfo {
                reference: image_ref.to_string(),
                digest: resolved.digest,
                version: version_of(&labels),
                created: resolved.config.created.clone(),
                architecture: resolved.config.architecture.clone(),
                os: resolved.config.os.clone(),
                bootable: is_bootable(&labels),
                total_size: layers.iter().map(|l| l.size).sum(),
                labels,
                layers,
            },
        })
    }

    /// Tells whether `image` now points to another manifest than `currentDigest` (default: the
    /// digest last fetched into the cache from this reference), and what fetching it would cost.
    /// Reads only the manifest and configuration. An image the host's signature policy rejects
    /// fails with `SignatureRejected`, unless `signatureVerification` is false (default true).
    async fn check_update(
        &self,
        image: String,
        #[zlink(rename = "currentDigest")] current_digest: Option<String>,
        #[zlink(rename = "signatureVerification")] signature_verification: Option<bool>,
    ) -> Result<CheckUpdateReply, FetcherError> {
        // What status shows as the host's available update: only privileged callers (the CLI
        // as root, the timer) write it, so other users cannot grow or rewrite it.
        self.check(
            image,
            current_digest,
            self.caller.privileged,
            signature_verification.unwrap_or(true),
        )
        .await
    }

    /// The last `CheckUpdate` answer for `image` (what `dnf-image status` shows as an available
    /// update); null when the image was never checked. No network access.
    async fn last_check(&self, image: String) -> Result<LastCheckReply, FetcherError> {
        let image_ref = parse_ref(&image)?;
        let checks = self
            .shared
            .cache
            .checks()
            .map_err(|e| failed("Reading the update checks", e))?;
        let check = checks
            .get(&image_ref.to_string())
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        Ok(LastCheckReply { check })
    }

    /// Downloads the layers of `image` that are not in the cache, `concurrency` at once (default
    /// 8, at most 32), verifying each digest, and records the image in the cache. Streams
    /// progress records, then one record with the result. Refuses images that are not bootable
    /// and fails before downloading when the cache filesystem lacks space. First checks the
    /// image against the host's signature policy (containers-policy.json) and fails with
    /// `SignatureRejected`, keeping nothing, when the policy does not accept it; with
    /// `signatureVerification` false (default true) the image is fetched unchecked.
    #[zlink(more)]
    async fn fetch(
        &self,
        more: bool,
        image: String,
        concurrency: Option<u64>,
        #[zlink(rename = "signatureVerification")] signature_verification: Option<bool>,
    ) -> impl Stream<Item = Result<Reply<FetchReply>, FetcherError>> + Unpin + use<> {
        let image_ref = match parse_ref(&image) {
            Ok(r) => r,
            Err(e) => return refused(e),
        };
        let fetcher = self.clone();
        let concurrency = concurrency
            .unwrap_or(DEFAULT_CONCURRENCY)
            .clamp(1, MAX_CONCURRENCY) as usize;
        let verify = signature_verification.unwrap_or(true);
        spawn_streamed(
            &self.shared.jobs,
            format!("Fetching {image_ref}"),
            more,
            |running| FetcherError::AlreadyInProgress { image: running },
            move |cancellation, sink| async move {
                let progress = Arc::new(Progress::new(sink));
                let result = tokio::select! {
                    r = fetcher.run_fetch(&image_ref, concurrency, verify, &progress) => r,
                    () = cancellation.cancelled() => Err(FetcherError::Cancelled {
                        image: image_ref.to_string(),
                    }),
                };
                if let Ok(r) = &result {
                    tracing::info!(
                        "Fetched {image_ref} ({}): {} layers, {} bytes downloaded",
                        r.digest,
                        r.layers_fetched,
                        r.bytes_fetched
                    );
                }
                result.map(|r| FetchReply {
                    progress: None,
                    result: Some(r),
                })
            },
        )
    }

    /// Cancels the running fetch or prune; the blobs completed so far stay in the cache.
    async fn cancel(&self) -> CancelReply {
        CancelReply {
            cancelled: self.shared.jobs.cancel(),
        }
    }

    /// Lists the images in the cache.
    async fn list_cached(&self) -> Result<ListCachedReply, FetcherError> {
        let entries = self
            .shared
            .cache
            .entries()
            .map_err(|e| failed("Reading the cache index", e))?;
        Ok(ListCachedReply {
            images: entries
                .into_iter()
                .map(|e| CachedImage {
                    cache_reference: self.shared.cache.oci_reference(&e.tag),
                    reference: e.reference,
                    digest: e.digest,
                    version: e.version,
                    size: e.size,
                    fetched: e.fetched,
                    signature: e.signature,
                })
                .collect(),
        })
    }

    /// Removes from the cache every image whose reference is not in `keep`, then every blob no
    /// remaining image uses.
    async fn prune(&self, keep: Vec<String>) -> Result<PruneReply, FetcherError> {
        let _job = self
            .shared
            .jobs
            .try_start("Pruning the cache")
            .map_err(|running| FetcherError::AlreadyInProgress { image: running })?;
        let keep: Vec<String> = keep
            .iter()
            .map(|k| parse_ref(k).map(|r| r.to_string()))
            .collect::<Result<_, _>>()?;
        // Deleting blobs can take a while: off the thread that serves the connections.
        let cache = self.shared.cache.clone();
        let stats = tokio::task::spawn_blocking(move || cache.prune(&keep))
            .await
            .map_err(|e| failed("Pruning the cache", e))?
            .map_err(|e| failed("Pruning the cache", e))?;
        Ok(PruneReply {
            removed_images: stats.removed_images,
            removed_blobs: stats.removed_blobs,
            freed_bytes: stats.freed_bytes,
        })
    }

    /// The space the cache takes on disk: every file and directory under it, counted as `du`
    /// does.
    async fn get_disk_usage(&self) -> Result<GetDiskUsageReply, FetcherError> {
        let cache = self.shared.cache.clone();
        let measured = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let usage = dnfimage_runtime::disk::usage(cache.root())?;
            Ok((usage, cache.entries()?.len(), cache.blob_count()?))
        })
        .await
        .map_err(|e| failed("Measuring the cache", e))?
        .map_err(|e| failed("Measuring the cache", e))?;
        let (usage, images, blobs) = measured;
        Ok(GetDiskUsageReply {
            path: self.shared.cache.root().display().to_string(),
            bytes: usage.bytes,
            images: images as u64,
            blobs,
        })
    }
}

/// Progress shared by the concurrent layer downloads of one fetch.
struct Progress {
    sink: dnfimage_runtime::Progress<FetchReply, FetcherError>,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    record: FetchProgress,
    per_layer: BTreeMap<String, u64>,
    last_sent: Option<Instant>,
}

const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

impl Progress {
    fn new(sink: dnfimage_runtime::Progress<FetchReply, FetcherError>) -> Self {
        Self {
            sink,
            state: Mutex::new(ProgressState {
                record: FetchProgress {
                    phase: FetchPhase::Resolving,
                    layer: None,
                    layer_bytes_done: None,
                    layer_bytes_total: None,
                    layers_done: 0,
                    layers_total: 0,
                    bytes_done: 0,
                    bytes_total: 0,
                    message: String::new(),
                    staged: None,
                },
                per_layer: BTreeMap::new(),
                last_sent: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the record after `update`; throttled unless `force`.
    fn update(&self, force: bool, update: impl FnOnce(&mut ProgressState)) {
        let mut state = self.lock();
        update(&mut state);
        let due = state
            .last_sent
            .is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
        if !self.sink.wanted() || !(force || due) {
            return;
        }
        state.last_sent = Some(Instant::now());
        self.sink.send(FetchReply {
            progress: Some(state.record.clone()),
            result: None,
        });
    }

    fn phase(&self, phase: FetchPhase, message: String) {
        self.update(true, |s| {
            s.record.phase = phase;
            s.record.layer = None;
            s.record.layer_bytes_done = None;
            s.record.layer_bytes_total = None;
            s.record.message = message;
        });
    }

    fn layer_bytes(&self, layer: &Descriptor, done: u64, finished: bool) {
        self.update(finished, |s| {
            let before = s.per_layer.insert(layer.digest.clone(), done).unwrap_or(0);
            s.record.bytes_done = s.record.bytes_done + done - before.min(done);
            if finished {
                s.record.layers_done += 1;
            }
            s.record.layer = Some(layer.digest.clone());
            s.record.layer_bytes_done = Some(done);
            s.record.layer_bytes_total = Some(layer.size);
            s.record.message = if finished {
                format!("Fetched layer {}", short(&layer.digest))
            } else {
                format!("Fetching layer {}", short(&layer.digest))
            };
        });
    }
}

/// The manifest and configuration a fetch stored before its layers: removed when the fetch
/// fails or is cancelled before it recorded the image (unless they were there before).
struct Unstage<'a> {
    cache: &'a Cache,
    blobs: Vec<String>,
}

impl Drop for Unstage<'_> {
    fn drop(&mut self) {
        for digest in &self.blobs {
            if let Err(e) = self.cache.remove_blob(digest) {
                tracing::warn!("Removing blob {digest} of an unfinished fetch: {e:#}");
            }
        }
    }
}

/// "sha256:HEX" of `bytes`.
fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
    )
}

/// Checks that a configuration skopeo converted is the one the converted manifest names (both
/// come from the same conversion); else the digest of what arrived.
fn check_converted_config(config: &Descriptor, bytes: &[u8]) -> Result<(), String> {
    let actual = sha256_digest(bytes);
    if actual == config.digest && bytes.len() as u64 == config.size {
        Ok(())
    } else {
        Err(actual)
    }
}

/// The first 12 characters of a digest's hex part (whole characters, whatever the text).
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.char_indices().nth(12).map_or(hex, |(i, _)| &hex[..i])
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
fn available_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Fetcher {
    async fn run_fetch(
        &self,
        image: &ImageRef,
        concurrency: usize,
        verify: bool,
        progress: &Arc<Progress>,
    ) -> Result<FetchResult, FetcherError> {
        let reference = image.to_string();
        let cache = &self.shared.cache;
        progress.phase(FetchPhase::Resolving, format!("Resolving {reference}"));
        // Nothing is written before the policy accepted the manifest; then only the blobs it
        // names are fetched, by digest, so a tag moved meanwhile changes nothing.
        // The manifest `upgrade` checked a moment ago is the one it fetches: not asked again.
        let mut resolved = match self.take_checked(image, verify) {
            Some(checked) => {
                tracing::debug!("Fetching {reference} as its update check resolved it");
                checked
            }
            None => self.resolve(image, verify).await?,
        };
        if resolved.signature.verified {
            resolved.signature.signers = self.shared.proxy.signers(image, &resolved.digest).await;
        }
        let labels = resolved.config.labels();
        if !is_bootable(&labels) {
            return Err(FetcherError::NotBootable { image: reference });
        }
        let layers = &resolved.manifest.layers;
        let mut missing: Vec<&Descriptor> = layers
            .iter()
            .filter(|l| !cache.has_blob(&l.digest, l.size))
            .collect();
        // A blob a manifest names twice is downloaded once.
        let mut seen = BTreeSet::new();
        missing.retain(|l| seen.insert(l.digest.as_str()));
        let bytes_missing: u64 = missing.iter().map(|l| l.size).sum();
        let needed = bytes_missing
            + resolved.manifest_bytes.len() as u64
            + resolved.config_bytes.len() as u64;
        let available =
            available_bytes(cache.root()).map_err(|e| failed("Checking free space", e))?;
        if needed > available {
            return Err(FetcherError::InsufficientSpace {
                path: cache.root().display().to_string(),
                needed,
                available,
            });
        }
        // The manifest and configuration first, so that the importer can import the layers as
        // they arrive (`staged`); removed again if the fetch fails and they were not there.
        let config = &resolved.manifest.config;
        let mut staged = Unstage {
            cache,
            blobs: Vec::new(),
        };
        for (digest, bytes) in [
            (&config.digest, &resolved.config_bytes),
            (&resolved.manifest_digest, &resolved.manifest_bytes),
        ] {
            if !cache.has_blob(digest, bytes.len() as u64) {
                staged.blobs.push(digest.clone());
            }
            cache
                .write_bytes(digest, bytes)
                .await
                .map_err(|e| blob_error(&reference, e))?;
        }
        progress.update(true, |s| {
            s.record.staged = Some(StagedImage {
                layout: cache.root().display().to_string(),
                manifest: resolved.manifest_digest.clone(),
            });
            s.record.phase = FetchPhase::Fetching;
            s.record.layers_total = missing.len() as u64;
            s.record.bytes_total = bytes_missing;
            s.record.message = format!(
                "Fetching {} of {} layers ({bytes_missing} bytes)",
                missing.len(),
                layers.len()
            );
        });
        dnfimage_runtime::notify::status(&format!(
            "Fetching {reference}: {} layers, {bytes_missing} bytes",
            missing.len()
        ));

        // One task a layer, so hashing and writing spread over the cores; at most
        // `concurrency` downloads at once. Dropping the set (error, cancel) aborts the rest, and
        // their partial files go with them.
        let opened = Arc::new(resolved.opened);
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for layer in missing.iter().map(|l| (*l).clone()) {
            let (opened, permits, progress) = (opened.clone(), permits.clone(), progress.clone());
            let (cache, reference) = (cache.clone(), reference.clone());
            tasks.spawn(async move {
                let _permit = permits
                    .acquire_owned()
                    .await
                    .map_err(|e| failed("Waiting for a download slot", e))?;
                fetch_layer(&cache, &opened, &reference, &layer, &progress).await
            });
        }
        let outcome = {
            let all = async {
                let mut fetched = Vec::with_capacity(missing.len());
                while let Some(joined) = tasks.join_next().await {
                    fetched.push(joined.map_err(|e| failed("Joining a layer download", e))??);
                }
                Ok(fetched)
            };
            // A registry silent midway would hold the downloads (and this job) forever: give
            // up when no byte arrived for the registry timeout.
            match self.shared.proxy.registry_timeout {
                None => all.await,
                Some(limit) => tokio::select! {
                    fetched = all => fetched,
                    stalled = stalled(progress, limit, &reference) => Err(stalled),
                },
            }
        };
        if outcome.is_err() {
            // Stop the other downloads and wait until their partial files are gone, so the
            // caller that sees the error finds only complete blobs. skopeo goes with `opened`.
            tasks.shutdown().await;
        }
        let fetched = outcome?;

        progress.phase(FetchPhase::Finishing, "Writing the manifest".into());
        if resolved.manifest_digest != resolved.digest {
            tracing::info!(
                "{reference} ({}) is a Docker schema 2 image: the cache holds skopeo's OCI \
                 conversion {}",
                resolved.digest,
                resolved.manifest_digest
            );
        }
        // The entry records both digests: the source's, which everything shows and compares,
        // and the stored manifest's, which the importer reads (see the cache's `Entry`).
        let entry = Entry {
            reference: reference.clone(),
            tag: reference::cache_tag(image),
            digest: resolved.digest.clone(),
            manifest_digest: resolved.manifest_digest.clone(),
            manifest_size: resolved.manifest_bytes.len() as u64,
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            version: version_of(&labels),
            fetched: dnfimage_runtime::time::now_rfc3339(),
            size: layers.iter().map(|l| l.size).sum(),
            signature: Some(resolved.signature.clone()),
        };
        cache
            .record(&entry)
            .map_err(|e| failed("Recording the image in the cache", e))?;
        staged.blobs.clear();
        match Arc::try_unwrap(opened) {
            Ok(opened) => {
                if let Err(e) = opened.proxy.finalize().await {
                    tracing::debug!("Stopping skopeo, ignoring: {}", proxy_message(&e));
                }
            }
            Err(_) => tracing::debug!("A layer task still holds skopeo; it stops when dropped"),
        }
        Ok(FetchResult {
            digest: entry.digest,
            version: entry.version,
            cache_reference: cache.oci_reference(&entry.tag),
            layers_fetched: fetched.len() as u64,
            layers_cached: (layers.len() - missing.len()) as u64,
            bytes_fetched: fetched.iter().sum(),
            signature: resolved.signature,
        })
    }
}

/// Resolves when the downloads of `progress` received nothing for `limit`.
async fn stalled(progress: &Progress, limit: Duration, reference: &str) -> FetcherError {
    let bytes_done = || progress.lock().record.bytes_done;
    let (mut last, mut since) = (bytes_done(), Instant::now());
    loop {
        tokio::time::sleep((limit / 4).max(Duration::from_millis(100))).await;
        let now = bytes_done();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= limit {
            let total = progress.lock().record.bytes_total;
            return FetcherError::RegistryUnreachable {
                image: reference.to_string(),
                message: format!(
                    "nothing arrived for {} s after {last} of {total} bytes (the fetcher's \
                     --registry-timeout); the layers completed so far are kept: fetching \
                     again resumes",
                    limit.as_secs()
                ),
            };
        }
    }
}

async fn fetch_layer(
    cache: &Cache,
    opened: &Opened,
    reference: &str,
    layer: &Descriptor,
    progress: &Progress,
) -> Result<u64, FetcherError> {
    let digest: containers_image_proxy::oci_spec::image::Digest = layer
        .digest
        .parse()
        .map_err(|e| failed(&format!("Parsing layer digest {}", layer.digest), e))?;
    let (reader, finish) = opened
        .proxy
        .get_blob(&opened.image, &digest, layer.size)
        .await
        .map_err(|e| classify(reference, &proxy_message(&e)))?;
    let write = cache.write_blob(&layer.digest, layer.size, reader, |n| {
        progress.layer_bytes(layer, n, false)
    });
    tokio::pin!(write, finish);
    // Our check of the bytes says more than skopeo's (which digest arrived, how many bytes),
    // so its error wins; and when it fails, skopeo's side may never finish: no waiting on it.
    let written = tokio::select! {
        written = &mut write => {
            let written = written.map_err(|e| blob_error(reference, e))?;
            finish.await.map_err(|e| classify(reference, &proxy_message(&e)))?;
            written
        }
        finished = &mut finish => {
            // skopeo has closed the pipe: the write ends too.
            let written = write.await.map_err(|e| blob_error(reference, e))?;
            finished.map_err(|e| classify(reference, &proxy_message(&e)))?;
            written
        }
    };
    progress.layer_bytes(layer, written, true);
    Ok(written)
}

fn blob_error(reference: &str, e: BlobError) -> FetcherError {
    match e {
        BlobError::Mismatch {
            expected,
            actual,
            received,
            size,
        } => FetcherError::DigestMismatch {
            message: format!(
                "{reference}: blob {expected} arrived as {actual} ({received} of {size} bytes); \
                 the registry's copy is damaged or was replaced, nothing was kept"
            ),
            expected,
            actual: Some(actual),
        },
        BlobError::TooLong { expected, size } => FetcherError::DigestMismatch {
            message: format!(
                "{reference}: blob {expected} is longer than the {size} bytes its manifest \
                 declares; the registry's copy is damaged or was replaced, nothing was kept"
            ),
            expected,
            actual: None,
        },
        BlobError::Io(e) => failed(&format!("Storing a blob of {reference}"), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_converted_configurations() {
        let bytes = br#"{"architecture":"amd64"}"#;
        let descriptor = |digest: String, size: u64| Descriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            digest,
            size,
            annotations: BTreeMap::new(),
            other: BTreeMap::new(),
        };
        let right = sha256_digest(bytes);
        let other = sha256_digest(b"{}");
        let len = bytes.len() as u64;
        for (config, ok) in [
            (descriptor(right.clone(), len), true),
            // Another configuration, or the right one declared with another size.
            (descriptor(other, len), false),
            (descriptor(right.clone(), len + 1), false),
            (descriptor(right.clone(), 0), false),
        ] {
            let checked = check_converted_config(&config, bytes);
            assert_eq!(checked.is_ok(), ok, "{config:?}");
            if let Err(actual) = checked {
                assert_eq!(actual, right, "the digest of what arrived");
            }
        }
    }

    #[test]
    fn shortens_digests_by_characters() {
        for (digest, want) in [
            ("sha256:0123456789abcdef", "0123456789ab"),
            ("sha256:abc", "abc"),
            ("", ""),
            // Byte 12 is inside a character.
            ("sha256:aééééééééééééé", "aééééééééééé"),
        ] {
            assert_eq!(short(digest), want, "{digest}");
        }
    }
}
