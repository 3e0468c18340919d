//! What the deployer reads from a commit in the repository: its image metadata (as ostree-ext
//! records it), the layering request the layerer recorded, the shape of its tree (kernel,
//! `/etc`, directories) and its kargs.d files, read from the dirtree and file objects without
//! checking anything out.

use std::collections::HashMap;

use anyhow::{Context, Result};
use dnfimage_interfaces::deployer::{LAYERING_METADATA_KEY, LayeringRequest};
use ostree_ext::glib;
use ostree_ext::ostree;
use ostree_ext::prelude::*;

use crate::kargs::{self, KargsEntry};

/// Commit metadata keys ostree-ext 0.15 writes on the merge commit of an imported image
/// (`container/store.rs`).
const META_MANIFEST_DIGEST: &str = "ostree.manifest-digest";
const META_CONFIG: &str = "ostree.container.image-config";
/// The plain ostree version key (`ostree commit --add-metadata-string=version=…`).
const META_VERSION: &str = "version";
/// Image version labels, in the order ostree-ext's `version_for_config` reads them.
const VERSION_LABELS: [&str; 2] = ["org.opencontainers.image.version", "version"];

/// The image facts of a commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitInfo {
    /// Seconds since the epoch.
    pub timestamp: u64,
    /// The parent commit.
    pub parent: Option<String>,
    /// The manifest digest, when the commit is an imported image.
    pub manifest_digest: Option<String>,
    /// The image version label, else the commit's `version`.
    pub version: Option<String>,
    /// The layering request the layerer recorded, when the commit is a layered one.
    pub layering: Option<LayeringRequest>,
}

fn lookup_string(meta: &glib::VariantDict, key: &str) -> Result<Option<String>> {
    meta.lookup::<String>(key)
        .with_context(|| format!("Reading commit metadata {key}"))
}

/// The version label of an image configuration (JSON as ostree-ext stores it).
pub fn version_of_config(config: &str) -> Option<String> {
    let config: serde_json::Value = serde_json::from_str(config).ok()?;
    let labels = config.get("config")?.get("Labels")?;
    VERSION_LABELS
        .iter()
        .find_map(|k| labels.get(*k)?.as_str().map(str::to_string))
}

/// Whether `repo` holds the complete commit `csum`.
pub fn is_complete(repo: &ostree::Repo, csum: &str) -> Result<bool> {
    if !repo
        .has_object(
            ostree::ObjectType::Commit,
            csum,
            ostree::gio::Cancellable::NONE,
        )
        .context("Looking the commit up")?
    {
        return Ok(false);
    }
    let (_, state) = repo.load_commit(csum).context("Loading the commit")?;
    Ok(!state.contains(ostree::RepoCommitState::PARTIAL))
}

/// Reads the image facts of commit `csum`.
pub fn info(repo: &ostree::Repo, csum: &str) -> Result<CommitInfo> {
    let (commit, _) = repo
        .load_commit(csum)
        .with_context(|| format!("Loading commit {csum}"))?;
    let meta = glib::VariantDict::new(Some(&commit.child_value(0)));
    let config = lookup_string(&meta, META_CONFIG)?;
    let version = config
        .as_deref()
        .and_then(version_of_config)
        .map(Ok)
        .or_else(|| lookup_string(&meta, META_VERSION).transpose())
        .transpose()?;
    let layering = lookup_string(&meta, LAYERING_METADATA_KEY)?
        .map(|json| {
            serde_json::from_str::<LayeringRequest>(&json)
                .with_context(|| format!("Parsing the {LAYERING_METADATA_KEY} metadata"))
        })
        .transpose()?;
    Ok(CommitInfo {
        timestamp: ostree::commit_get_timestamp(&commit),
        parent: ostree::commit_get_parent(&commit).map(|p| p.to_string()),
        manifest_digest: lookup_string(&meta, META_MANIFEST_DIGEST)?,
        version,
        layering,
    })
}

/// The image facts of a deployment's commit: those of `csum`, else (for a layered commit) of
/// its parent, the image commit.
pub fn image_info(repo: &ostree::Repo, csum: &str) -> Result<CommitInfo> {
    let mut info = info(repo, csum)?;
    if info.manifest_digest.is_none()
        && let Some(parent) = info.parent.clone()
        && is_complete(repo, &parent)?
    {
        let base = self::info(repo, &parent)?;
        info.manifest_digest = base.manifest_digest;
        if info.version.is_none() {
            info.version = base.version;
        }
    }
    Ok(info)
}

/// A file of a tree: its object checksum and size in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileObject {
    /// The file object checksum.
    pub checksum: String,
    /// Bytes it takes.
    pub size: u64,
}

/// The kernel of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Its directory name under `/usr/lib/modules`.
    pub version: String,
    /// `vmlinuz`.
    pub vmlinuz: FileObject,
    /// `initramfs.img`, when there is one.
    pub initramfs: Option<FileObject>,
}

impl Kernel {
    /// What it takes in `/boot`.
    pub fn boot_bytes(&self) -> u64 {
        self.vmlinuz.size + self.initramfs.as_ref().map_or(0, |i| i.size)
    }

    /// Whether two trees would share their boot directory (same kernel and initramfs).
    pub fn same_boot_files(&self, other: &Kernel) -> bool {
        self.vmlinuz.checksum == other.vmlinuz.checksum
            && self.initramfs.as_ref().map(|i| &i.checksum)
                == other.initramfs.as_ref().map(|i| &i.checksum)
    }
}

/// The shape of a commit's tree, as far as deploying it is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSummary {
    /// Its kernel, if it has one under `/usr/lib/modules`.
    pub kernel: Option<Kernel>,
    /// Whether it has both `/etc` and `/usr/etc` (libostree refuses to deploy it).
    pub etc_and_usr_etc: bool,
    /// How many directories a checkout creates.
    pub directories: u64,
    /// Bytes of the files under `/usr/etc`, which a deployment copies to `/etc`, in 4 KiB blocks.
    pub usr_etc_bytes: u64,
}

/// The entries of a dirtree object.
pub(crate) struct DirTree {
    /// Name and content checksum.
    pub files: Vec<(String, String)>,
    /// Name, dirtree and dirmeta checksums.
    pub dirs: Vec<(String, String, String)>,
}

impl DirTree {
    pub(crate) fn load(repo: &ostree::Repo, csum: &str) -> Result<Self> {
        let v = repo
            .load_variant(ostree::ObjectType::DirTree, csum)
            .with_context(|| format!("Loading dirtree {csum}"))?;
        let name = |e: &glib::Variant| e.child_value(0).str().unwrap_or_default().to_string();
        let sum =
            |e: &glib::Variant, i| ostree::checksum_from_bytes_v(&e.child_value(i)).to_string();
        Ok(Self {
            files: v
                .child_value(0)
                .iter()
                .map(|e| (name(&e), sum(&e, 1)))
                .collect(),
            dirs: v
                .child_value(1)
                .iter()
                .map(|e| (name(&e), sum(&e, 1), sum(&e, 2)))
                .collect(),
        })
    }

    /// The content checksum of the file `name`.
    pub(crate) fn file(&self, name: &str) -> Option<&str> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.as_str())
    }

    /// The dirtree checksum of the directory `name`.
    pub(crate) fn dir(&self, name: &str) -> Option<&str> {
        self.dirs
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, t, _)| t.as_str())
    }

    /// Whether it has an entry `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.file(name).is_some() || self.dir(name).is_some()
    }
}

const BLOCK: u64 = 4096;

/// `bytes` rounded up to whole 4 KiB blocks.
pub fn blocks(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK) * BLOCK
}

struct Walker<'a> {
    repo: &'a ostree::Repo,
    trees: HashMap<String, std::rc::Rc<DirTree>>,
    counts: HashMap<String, u64>,
}

impl<'a> Walker<'a> {
    fn tree(&mut self, csum: &str) -> Result<std::rc::Rc<DirTree>> {
        if let Some(t) = self.trees.get(csum) {
            return Ok(t.clone());
        }
        let t = std::rc::Rc::new(DirTree::load(self.repo, csum)?);
        self.trees.insert(csum.to_string(), t.clone());
        Ok(t)
    }

    fn path(&mut self, root: &str, path: &[&str]) -> Result<Option<std::rc::Rc<DirTree>>> {
        let mut tree = self.tree(root)?;
        for name in path {
            let Some(next) = tree.dir(name).map(str::to_string) else {
                return Ok(None);
            };
            tree = self.tree(&next)?;
        }
        Ok(Some(tree))
    }

    /// Directories under (and including) `csum`.
    fn directories(&mut self, csum: &str) -> Result<u64> {
        if let Some(n) = self.counts.get(csum) {
            return Ok(*n);
        }
        let tree = self.tree(csum)?;
        let mut n = 1;
        for (_, child, _) in &tree.dirs {
            n += self.directories(child)?;
        }
        self.counts.insert(csum.to_string(), n);
        Ok(n)
    }

    fn file(&self, csum: &str) -> Result<FileObject> {
        let size = self
            .repo
            .query_object_storage_size(
                ostree::ObjectType::File,
                csum,
                ostree::gio::Cancellable::NONE,
            )
            .with_context(|| format!("Reading the size of file object {csum}"))?;
        Ok(FileObject {
            checksum: csum.to_string(),
            size,
        })
    }

    /// Bytes of the files under `tree`, each rounded up to whole blocks.
    fn file_bytes(&mut self, tree: &DirTree) -> Result<u64> {
        let mut total = 0;
        for (_, csum) in &tree.files {
            total += blocks(self.file(csum)?.size);
        }
        for (_, child, _) in &tree.dirs {
            let child = self.tree(child)?;
            total += self.file_bytes(&child)?;
        }
        Ok(total)
    }
}

/// The tree of commit `csum`: its root dirtree checksum.
fn root_dirtree(repo: &ostree::Repo, csum: &str) -> Result<String> {
    let (commit, _) = repo
        .load_commit(csum)
        .with_context(|| format!("Loading commit {csum}"))?;
    Ok(ostree::checksum_from_bytes_v(&commit.child_value(6)).to_string())
}

/// Reads the shape of the tree of commit `csum`.
pub fn summarize(repo: &ostree::Repo, csum: &str) -> Result<TreeSummary> {
    let root = root_dirtree(repo, csum)?;
    let mut w = Walker {
        repo,
        trees: HashMap::new(),
        counts: HashMap::new(),
    };
    let kernel = kernel_of(&mut w, &root)?;
    let root_tree = w.tree(&root)?;
    let usr_etc = w.path(&root, &["usr", "etc"])?;
    let usr_etc_bytes = match &usr_etc {
        Some(t) => w.file_bytes(t)?,
        None => 0,
    };
    Ok(TreeSummary {
        kernel,
        etc_and_usr_etc: root_tree.dir("etc").is_some() && usr_etc.is_some(),
        directories: w.directories(&root)?,
        usr_etc_bytes,
    })
}

/// The kernel of the tree of commit `csum`, if it has one.
pub fn kernel(repo: &ostree::Repo, csum: &str) -> Result<Option<Kernel>> {
    let root = root_dirtree(repo, csum)?;
    let mut w = Walker {
        repo,
        trees: HashMap::new(),
        counts: HashMap::new(),
    };
    kernel_of(&mut w, &root)
}

fn kernel_of(w: &mut Walker<'_>, root: &str) -> Result<Option<Kernel>> {
    let Some(modules) = w.path(root, &["usr", "lib", "modules"])? else {
        return Ok(None);
    };
    for (version, dir, _) in &modules.dirs {
        let dir = w.tree(dir)?;
        let Some(vmlinuz) = dir.file("vmlinuz") else {
            continue;
        };
        return Ok(Some(Kernel {
            version: version.clone(),
            vmlinuz: w.file(vmlinuz)?,
            initramfs: dir.file("initramfs.img").map(|c| w.file(c)).transpose()?,
        }));
    }
    Ok(None)
}

/// The files of the commit's kargs.d directory (none when it has none) whose names end in
/// `.toml`, in name order, with their bytes; a symbolic link or a file over
/// [`kargs::KARGS_FILE_LIMIT`] comes with why it is not read.
pub fn kargs_files(repo: &ostree::Repo, csum: &str) -> Result<Vec<KargsEntry>> {
    let root = root_dirtree(repo, csum)?;
    let mut w = Walker {
        repo,
        trees: HashMap::new(),
        counts: HashMap::new(),
    };
    let Some(dir) = w.path(&root, &kargs::KARGS_D)? else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::new();
    for (name, checksum) in dir.files.iter().filter(|(n, _)| kargs::is_kargs_file(n)) {
        let content = read_small_file(repo, checksum, kargs::KARGS_FILE_LIMIT)
            .with_context(|| format!("Reading {} of commit {csum}", kargs::KARGS_D.join("/")))?;
        entries.push(KargsEntry {
            name: name.clone(),
            content,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// The bytes of file object `checksum`, or why they are not read: it is a symbolic link, or
/// larger than `limit`.
fn read_small_file(
    repo: &ostree::Repo,
    checksum: &str,
    limit: u64,
) -> Result<std::result::Result<Vec<u8>, String>> {
    let (stream, info, _) = repo
        .load_file(checksum, ostree::gio::Cancellable::NONE)
        .with_context(|| format!("Loading file object {checksum}"))?;
    if info.file_type() == ostree::gio::FileType::SymbolicLink {
        return Ok(Err(format!(
            "It is a symbolic link (to {:?}), not a file",
            info.symlink_target()
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        )));
    }
    let size = u64::try_from(info.size()).unwrap_or(u64::MAX);
    if size > limit {
        return Ok(Err(format!(
            "It has {size} bytes, more than the {limit} read"
        )));
    }
    let Some(stream) = stream else {
        return Ok(Ok(Vec::new()));
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(stream.into_read(), limit + 1),
        &mut bytes,
    )
    .with_context(|| format!("Reading file object {checksum}"))?;
    Ok(Ok(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_version_labels() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"{"config":{"Labels":{"org.opencontainers.image.version":"42","version":"x"}}}"#,
                Some("42"),
            ),
            (r#"{"config":{"Labels":{"version":"7"}}}"#, Some("7")),
            (r#"{"config":{"Labels":{}}}"#, None),
            (r#"{"config":{}}"#, None),
            (r#"{}"#, None),
            ("null", None),
            ("not json", None),
        ];
        for (config, want) in cases {
            assert_eq!(version_of_config(config).as_deref(), *want, "{config}");
        }
    }

    #[test]
    fn rounds_to_blocks() {
        for (bytes, want) in [(0, 0), (1, 4096), (4096, 4096), (4097, 8192)] {
            assert_eq!(blocks(bytes), want);
        }
    }
}
