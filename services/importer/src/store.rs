//! The sysroot's repository as the importer sees it: the references ostree-ext keeps for images
//! and layers, the commits deployments use, the warnings recorded with an image, and pruning.
//!
//! Everything here is blocking glib work: call it from a blocking thread.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use dnfimage_interfaces::importer::{ImportWarning, ImportedImage};
use ostree_ext::container::ImageReference;
use ostree_ext::container::store::{self as ext_store, META_FILTERED, MetaFilteredData};
use ostree_ext::oci_spec::image::{ImageConfiguration, ImageManifest};
use ostree_ext::{gio, glib, ostree, refescape};

use crate::scan;

/// Where ostree-ext keeps the merged commit of each image, by image reference.
pub const IMAGE_PREFIX: &str = "ostree/container/image";
/// Where ostree-ext keeps the commit of each layer, by layer digest.
pub const LAYER_PREFIX: &str = "ostree/container/blob";
/// Where the layerer keeps the commits it builds (`Prune` removes those no deployment uses).
pub const LAYERED_PREFIX: &str = "dnfimage/layered";
/// References that protect deployment commits while objects are pruned.
const PROTECT_PREFIX: &str = "dnfimage/prune-protect";
/// References whose commits ostree-ext treats as in use by deployments.
const DEPLOYMENT_REF_PREFIXES: &[&str] = &[
    "ostree/0",
    "ostree/1",
    "rpmostree/base",
    "ostree/container/baseimage",
];
/// Commit metadata holding the manifest (written by ostree-ext).
const META_MANIFEST: &str = "ostree.manifest";
/// Detached metadata of an image's merged commit holding the importer's warnings (JSON).
const META_WARNINGS: &str = "dnfimage.import-warnings";
/// How far parents are followed from a deployment's commit (a layered commit's parent is the
/// image commit).
const MAX_PARENTS: usize = 8;

/// Opens the repository at `path`.
pub fn open_repo(path: &Path) -> Result<ostree::Repo> {
    let repo = ostree::Repo::new_for_path(path);
    repo.open(gio::Cancellable::NONE)
        .with_context(|| format!("Opening the ostree repository {}", path.display()))?;
    Ok(repo)
}

/// The reference ostree-ext keeps layer `digest` under.
pub fn layer_ref(digest: &str) -> Result<String> {
    refescape::prefix_escape_for_ref(LAYER_PREFIX, digest)
}

/// Removes reference `name` if it exists; tells whether it did.
pub fn remove_ref(repo: &ostree::Repo, name: &str) -> Result<bool> {
    let found = repo
        .resolve_rev(name, true)
        .with_context(|| format!("Resolving {name}"))?
        .is_some();
    if found {
        repo.set_ref_immediate(None, name, None, gio::Cancellable::NONE)
            .with_context(|| format!("Removing reference {name}"))?;
    }
    Ok(found)
}

/// Every reference under `prefix` with its commit.
fn refs_under(repo: &ostree::Repo, prefix: &str) -> Result<BTreeMap<String, String>> {
    Ok(repo
        .list_refs_ext(
            Some(prefix),
            ostree::RepoListRefsExtFlags::empty(),
            gio::Cancellable::NONE,
        )
        .with_context(|| format!("Listing references under {prefix}"))?
        .into_iter()
        .collect())
}

/// The commits deployments use.
#[derive(Debug, Default)]
pub struct InUse {
    /// The deployments' own commits (staged included) and those of ostree's deployment
    /// references.
    pub roots: BTreeSet<String>,
    /// The roots and their parents (a layered commit's parent is its image's commit).
    pub with_parents: BTreeSet<String>,
}

/// Reads the deployments of the sysroot at `sysroot` (without locking or changing anything) and
/// the deployment references of its repository.
pub fn in_use(sysroot: &ostree::Sysroot, repo: &ostree::Repo) -> Result<InUse> {
    let mut roots = BTreeSet::new();
    let deployments = sysroot.deployments();
    for d in deployments.iter().chain(sysroot.staged_deployment().iter()) {
        roots.insert(d.csum().to_string());
    }
    for prefix in DEPLOYMENT_REF_PREFIXES {
        roots.extend(refs_under(repo, prefix)?.into_values());
    }
    let mut with_parents = BTreeSet::new();
    for root in &roots {
        let mut commit = Some(root.clone());
        for _ in 0..=MAX_PARENTS {
            let Some(c) = commit.take() else { break };
            if !with_parents.insert(c.clone()) {
                break;
            }
            commit = match repo.load_commit(&c) {
                Ok((variant, _)) => ostree::commit_get_parent(&variant).map(|p| p.to_string()),
                // A deployment's commit may lack its parent (ostree prunes history).
                Err(e) => {
                    tracing::debug!("Loading commit {c}, ignoring: {e}");
                    None
                }
            };
        }
    }
    Ok(InUse {
        roots,
        with_parents,
    })
}

/// Loads the sysroot at `path` for writing. On a booted host whose `/sysroot` is mounted
/// read-only (Fedora's default), libostree remounts it writable when a lock is asked for, but
/// only when the process has a mount namespace of its own (the unit's `PrivateMounts=yes`):
/// call [`make_writable`] next.
pub fn load_sysroot_for_writing(path: &Path) -> Result<ostree::Sysroot> {
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(path)));
    if private_mount_namespace() {
        sysroot.set_mount_namespace_in_use();
    }
    sysroot
        .load(gio::Cancellable::NONE)
        .with_context(|| format!("Loading the sysroot {}", path.display()))?;
    Ok(sysroot)
}

/// Remounts a read-only `/sysroot` of a booted host writable (see
/// [`load_sysroot_for_writing`]) and tells whether the sysroot lock was free; the lock is
/// held when it was.
pub fn make_writable(sysroot: &ostree::Sysroot) -> Result<bool> {
    // libostree makes the sysroot writable before it tries the lock.
    sysroot.try_lock().context("Making the sysroot writable")
}

fn private_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/1/ns/mnt"),
        std::fs::read_link("/proc/self/ns/mnt"),
    ) {
        (Ok(init), Ok(own)) => init != own,
        _ => false,
    }
}

/// Loads the sysroot at `path` read-only.
pub fn load_sysroot(path: &Path) -> Result<ostree::Sysroot> {
    let sysroot = ostree::Sysroot::new(Some(&gio::File::for_path(path)));
    sysroot
        .load(gio::Cancellable::NONE)
        .with_context(|| format!("Loading the sysroot {}", path.display()))?;
    Ok(sysroot)
}

fn commit_meta(repo: &ostree::Repo, commit: &str) -> Result<glib::VariantDict> {
    let (variant, _) = repo
        .load_commit(commit)
        .with_context(|| format!("Loading commit {commit}"))?;
    Ok(glib::VariantDict::new(Some(&variant.child_value(0))))
}

/// The manifest of an image commit, if `commit` is one.
fn manifest_of(repo: &ostree::Repo, commit: &str) -> Result<Option<ImageManifest>> {
    let meta = commit_meta(repo, commit)?;
    let Some(text) = meta.lookup::<String>(META_MANIFEST).ok().flatten() else {
        return Ok(None);
    };
    let manifest = serde_json::from_str(&text)
        .with_context(|| format!("Parsing the manifest recorded in commit {commit}"))?;
    Ok(Some(manifest))
}

/// The warnings recorded with the image commit `commit`: the importer's own, or else what
/// ostree-ext recorded of the content it dropped.
pub fn warnings_of(repo: &ostree::Repo, commit: &str) -> Result<Vec<ImportWarning>> {
    let detached = repo
        .read_commit_detached_metadata(commit, gio::Cancellable::NONE)
        .with_context(|| format!("Reading the detached metadata of {commit}"))?;
    if let Some(text) = detached
        .as_ref()
        .and_then(|v| {
            glib::VariantDict::new(Some(v))
                .lookup::<String>(META_WARNINGS)
                .ok()
        })
        .flatten()
    {
        return serde_json::from_str(&text)
            .with_context(|| format!("Parsing the warnings recorded with {commit}"));
    }
    let filtered = commit_meta(repo, commit)?
        .lookup::<MetaFilteredData>(META_FILTERED)
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut warnings = Vec::new();
    for (layer, tops) in filtered.into_iter().collect::<BTreeMap<_, _>>() {
        for (top, _entries) in tops.into_iter().collect::<BTreeMap<_, _>>() {
            warnings.push(scan::dropped_warning(Some(&layer), &top, None));
        }
    }
    Ok(warnings)
}

/// Records `warnings` with the image commit `commit` (in its detached metadata, keeping what
/// else is there).
pub fn record_warnings(
    repo: &ostree::Repo,
    commit: &str,
    warnings: &[ImportWarning],
) -> Result<()> {
    let detached = repo
        .read_commit_detached_metadata(commit, gio::Cancellable::NONE)
        .with_context(|| format!("Reading the detached metadata of {commit}"))?;
    let dict = glib::VariantDict::new(detached.as_ref());
    let text = serde_json::to_string(warnings).context("Serializing the warnings")?;
    dict.insert(META_WARNINGS, text);
    repo.write_commit_detached_metadata(commit, Some(&dict.end()), gio::Cancellable::NONE)
        .with_context(|| format!("Writing the detached metadata of {commit}"))?;
    Ok(())
}

/// Detached metadata of a layer's commit holding what the layer has outside `/usr` and `/etc`
/// ([`scan::Summary`], JSON), so that each layer is read for it once.
const META_LAYER_SUMMARY: &str = "dnfimage.layer-summary";

/// The commit of layer `digest`, if the repository has it.
pub fn layer_commit(repo: &ostree::Repo, digest: &str) -> Result<Option<String>> {
    let name = layer_ref(digest)?;
    Ok(repo
        .resolve_rev(&name, true)
        .with_context(|| format!("Resolving {name}"))?
        .map(|c| c.to_string()))
}

/// The summary recorded with layer `digest`, if the repository has the layer and one is
/// recorded.
pub fn layer_summary(repo: &ostree::Repo, digest: &str) -> Result<Option<scan::Summary>> {
    let Some(commit) = layer_commit(repo, digest)? else {
        return Ok(None);
    };
    let detached = repo
        .read_commit_detached_metadata(&commit, gio::Cancellable::NONE)
        .with_context(|| format!("Reading the detached metadata of {commit}"))?;
    let Some(text) = detached
        .as_ref()
        .and_then(|v| {
            glib::VariantDict::new(Some(v))
                .lookup::<String>(META_LAYER_SUMMARY)
                .ok()
        })
        .flatten()
    else {
        return Ok(None);
    };
    let summary = serde_json::from_str(&text)
        .with_context(|| format!("Parsing the layer summary recorded with {commit}"))?;
    Ok(Some(summary))
}

/// Records `summary` with the commit of layer `digest` (which the repository must have).
pub fn record_layer_summary(
    repo: &ostree::Repo,
    digest: &str,
    summary: &scan::Summary,
) -> Result<()> {
    let commit = layer_commit(repo, digest)?
        .with_context(|| format!("The repository has no commit of layer {digest}"))?;
    let detached = repo
        .read_commit_detached_metadata(&commit, gio::Cancellable::NONE)
        .with_context(|| format!("Reading the detached metadata of {commit}"))?;
    let dict = glib::VariantDict::new(detached.as_ref());
    let text = serde_json::to_string(summary).context("Serializing the layer summary")?;
    dict.insert(META_LAYER_SUMMARY, text);
    repo.write_commit_detached_metadata(&commit, Some(&dict.end()), gio::Cancellable::NONE)
        .with_context(|| format!("Writing the detached metadata of {commit}"))?;
    Ok(())
}

/// Commit metadata holding the manifest digest and the image configuration (ostree-ext's).
const META_MANIFEST_DIGEST: &str = "ostree.manifest-digest";
const META_CONFIG: &str = "ostree.container.image-config";

/// Every image in the repository, with whether a deployment uses it. Read from the image
/// commits' metadata alone, so that an image whose layer references are gone is still listed.
pub fn images(repo: &ostree::Repo, in_use: &InUse) -> Result<Vec<ImportedImage>> {
    let mut out = Vec::new();
    for (name, commit) in refs_under(repo, IMAGE_PREFIX)? {
        let reference = refescape::unprefix_unescape_ref(IMAGE_PREFIX, &name)
            .with_context(|| format!("Reading the image reference of {name}"))?;
        let meta = commit_meta(repo, &commit)?;
        let digest = meta
            .lookup::<String>(META_MANIFEST_DIGEST)
            .ok()
            .flatten()
            .with_context(|| {
                format!("Commit {commit} of {reference} records no manifest digest")
            })?;
        let config: Option<ImageConfiguration> = meta
            .lookup::<String>(META_CONFIG)
            .ok()
            .flatten()
            .and_then(|text| match serde_json::from_str(&text) {
                Ok(config) => Some(config),
                Err(e) => {
                    tracing::warn!("Parsing the configuration recorded in {commit}: {e}");
                    None
                }
            });
        out.push(ImportedImage {
            reference,
            digest,
            version: config
                .as_ref()
                .and_then(ostree_ext::container::version_for_config)
                .map(str::to_string),
            created: config.as_ref().and_then(|c| c.created().clone()),
            deployed: in_use.with_parents.contains(&commit),
            warnings: warnings_of(repo, &commit)?,
            commit,
        });
    }
    out.sort_by(|a, b| a.reference.cmp(&b.reference));
    Ok(out)
}

/// What [`prune`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// References of the removed images.
    pub images: Vec<String>,
    /// Layered commits whose references were removed.
    pub commits: u64,
    /// Layers whose references were removed.
    pub layers: u64,
    /// Objects deleted.
    pub objects: u64,
    /// Bytes freed.
    pub bytes: u64,
}

/// The steps of [`prune`], for progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneStep {
    /// Removing image and layered-commit references.
    Images,
    /// Removing layer references.
    Layers,
    /// Deleting unreferenced objects.
    Objects,
}

/// Removes the images no deployment uses and `keep` does not name, the layered commits no
/// deployment uses, the layers no remaining image or deployment uses, then every object
/// nothing refers to. The caller holds the sysroot lock.
pub fn prune(
    sysroot: &ostree::Sysroot,
    repo: &ostree::Repo,
    keep: &BTreeSet<String>,
    step: &dyn Fn(PruneStep, String),
    cancelled: &dyn Fn() -> bool,
) -> Result<Pruned> {
    let check = || -> Result<()> {
        anyhow::ensure!(!cancelled(), "Cancelled");
        Ok(())
    };
    let mut pruned = Pruned::default();
    // Left by a prune that was killed: they protect nothing any more.
    for name in refs_under(repo, PROTECT_PREFIX)?.keys() {
        remove_ref(repo, name)?;
    }
    let in_use = in_use(sysroot, repo)?;

    step(
        PruneStep::Images,
        "Removing images no deployment uses".into(),
    );
    for name in ext_store::list_images(repo).context("Listing images")? {
        check()?;
        let imgref = ImageReference::try_from(name.as_str())
            .with_context(|| format!("Parsing image reference {name}"))?;
        let reference = imgref.to_string();
        let commit = repo
            .resolve_rev(
                &refescape::prefix_escape_for_ref(IMAGE_PREFIX, &name)?,
                true,
            )?
            .map(|c| c.to_string());
        let used = commit
            .as_ref()
            .is_some_and(|c| in_use.with_parents.contains(c));
        if used || keep.contains(&reference) {
            continue;
        }
        ext_store::remove_image(repo, &imgref)?;
        tracing::info!("Removed image {reference}");
        step(PruneStep::Images, format!("Removed image {reference}"));
        pruned.images.push(reference);
    }
    for (name, commit) in refs_under(repo, LAYERED_PREFIX)? {
        if !in_use.roots.contains(&commit) {
            remove_ref(repo, &name)?;
            tracing::info!("Removed layered commit {commit} ({name})");
            pruned.commits += 1;
        }
    }

    check()?;
    step(PruneStep::Layers, "Removing layers no image uses".into());
    let mut used_layers = BTreeSet::new();
    let image_commits = refs_under(repo, IMAGE_PREFIX)?.into_values();
    for commit in image_commits.chain(in_use.with_parents.iter().cloned()) {
        if let Some(manifest) = manifest_of(repo, &commit)? {
            used_layers.extend(manifest.layers().iter().map(|l| l.digest().to_string()));
        }
    }
    for name in refs_under(repo, LAYER_PREFIX)?.keys() {
        let digest = refescape::unprefix_unescape_ref(LAYER_PREFIX, name)?;
        if !used_layers.contains(&digest) {
            remove_ref(repo, name)?;
            pruned.layers += 1;
        }
    }

    check()?;
    step(
        PruneStep::Objects,
        "Deleting objects nothing refers to".into(),
    );
    // ostree's own sysroot prune also keeps the staged deployment, which has no reference. The
    // parents go too: a layered deployment's image commit is what the layerer builds on again
    // after a rollback, and the prune below does not follow parents.
    let mut kept = Vec::new();
    for commit in in_use.roots.union(&in_use.with_parents) {
        let present = repo
            .has_object(ostree::ObjectType::Commit, commit, gio::Cancellable::NONE)
            .with_context(|| format!("Looking for commit {commit}"))?;
        if present {
            kept.push(commit);
        }
    }
    let protect: Vec<String> = kept
        .into_iter()
        .enumerate()
        .map(|(i, commit)| {
            let name = format!("{PROTECT_PREFIX}/{i}");
            repo.set_ref_immediate(None, &name, Some(commit), gio::Cancellable::NONE)
                .with_context(|| format!("Protecting commit {commit}"))?;
            Ok(name)
        })
        .collect::<Result<_>>()?;
    let result = repo
        .prune(ostree::RepoPruneFlags::REFS_ONLY, 0, gio::Cancellable::NONE)
        .context("Deleting unreferenced objects");
    for name in &protect {
        remove_ref(repo, name)?;
    }
    let (_total, objects, bytes) = result?;
    pruned.objects = u64::try_from(objects).unwrap_or(0);
    pruned.bytes = bytes;
    Ok(pruned)
}
