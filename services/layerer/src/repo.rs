//! The ostree repository side of layering: commits and their metadata, the hardlinked checkout
//! an overlay goes over, the rpm database of a commit checked out alone, and the commit of an
//! overlay's upper directory on top of its base. ostree objects are not `Send`: everything here
//! runs on the thread that opened the repository.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use dnfimage_interfaces::deployer::LAYERING_METADATA_KEY;
use dnfimage_interfaces::layerer::LayeringRequest;
use ostree_ext::prelude::*;
use ostree_ext::{gio, glib, ostree};

use crate::rpmdb;

/// The ref that keeps the last commit `Build` made from being pruned before it is deployed.
pub const LAYERED_REF: &str = "dnfimage/layered";

/// Metadata keys ostree-ext writes on an imported image's merge commit: they describe the image
/// and are not copied to a layered commit (whose parent is that merge commit).
const IMAGE_KEYS: [&str; 5] = [
    "ostree.manifest-digest",
    "ostree.manifest",
    "ostree.container.image-config",
    "ostree.importer.version",
    "ostree.tar-filtered",
];

/// Opens the repository at `path`.
pub fn open(path: &Path) -> Result<ostree::Repo> {
    let repo = ostree::Repo::new_for_path(path);
    repo.open(gio::Cancellable::NONE)
        .with_context(|| format!("Opening the ostree repository {}", path.display()))?;
    Ok(repo)
}

/// Whether `s` is an ostree commit checksum: 64 lowercase hexadecimal digits.
pub fn is_checksum(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The checksum `rev` (a checksum or a ref) names, if the repository has that commit.
pub fn resolve(repo: &ostree::Repo, rev: &str) -> Result<Option<String>> {
    if rev.is_empty() || rev.starts_with('-') {
        return Ok(None);
    }
    let Some(csum) = repo
        .resolve_rev(rev, true)
        .with_context(|| format!("Resolving {rev}"))?
    else {
        return Ok(None);
    };
    let has = repo
        .has_object(ostree::ObjectType::Commit, &csum, gio::Cancellable::NONE)
        .with_context(|| format!("Looking for commit {csum}"))?;
    Ok(has.then(|| csum.to_string()))
}

/// A commit's metadata and parent.
pub struct CommitMeta {
    /// The metadata dictionary.
    pub metadata: glib::VariantDict,
    /// The parent commit, if any.
    pub parent: Option<String>,
}

/// Reads the metadata of commit `csum`.
pub fn commit_meta(repo: &ostree::Repo, csum: &str) -> Result<CommitMeta> {
    let (commit, _) = repo
        .load_commit(csum)
        .with_context(|| format!("Loading commit {csum}"))?;
    Ok(CommitMeta {
        metadata: glib::VariantDict::new(Some(&commit.child_value(0))),
        parent: ostree::commit_get_parent(&commit).map(|p| p.to_string()),
    })
}

/// The layering request a commit `Build` made records; `None` for any other commit.
pub fn layering_of(meta: &CommitMeta) -> Result<Option<LayeringRequest>> {
    let Some(json) = meta
        .metadata
        .lookup::<String>(LAYERING_METADATA_KEY)
        .with_context(|| format!("Reading the {LAYERING_METADATA_KEY} metadata"))?
    else {
        return Ok(None);
    };
    serde_json::from_str(&json)
        .map(Some)
        .with_context(|| format!("Parsing the {LAYERING_METADATA_KEY} metadata"))
}

/// The metadata of a commit layering `request` on `base`: the base's (but the image keys),
/// the bootable keys `ostree commit --bootable` writes (`ostree.bootable`, and `ostree.linux`
/// when the tree has a kernel), and the request as JSON under [`LAYERING_METADATA_KEY`].
pub fn layered_metadata(
    base: &CommitMeta,
    request: &LayeringRequest,
    kernel: Option<&str>,
) -> Result<glib::Variant> {
    let dict = glib::VariantDict::new(Some(&base.metadata.end()));
    for key in IMAGE_KEYS {
        dict.remove(key);
    }
    dict.insert_value("ostree.bootable", &true.to_variant());
    match kernel {
        Some(k) => dict.insert_value("ostree.linux", &k.to_variant()),
        None => {
            dict.remove("ostree.linux");
        }
    }
    let json = serde_json::to_string(request).context("Serializing the request")?;
    dict.insert_value(LAYERING_METADATA_KEY, &json.to_variant());
    Ok(dict.end())
}

/// Checks commit `csum` out at `dest` (which must not exist), hardlinking the files to the
/// repository's objects: only ever read it, or lay an overlay over it.
pub fn checkout_hardlinked(
    repo: &ostree::Repo,
    csum: &str,
    dest: &Path,
    cancellable: &gio::Cancellable,
) -> Result<()> {
    let opts = ostree::RepoCheckoutAtOptions {
        mode: if repo.mode() == ostree::RepoMode::Bare {
            ostree::RepoCheckoutMode::None
        } else {
            ostree::RepoCheckoutMode::User
        },
        ..Default::default()
    };
    repo.checkout_at(
        Some(&opts),
        rustix::fs::CWD.as_raw_fd(),
        dest,
        csum,
        Some(cancellable),
    )
    .with_context(|| format!("Checking out {csum}"))
}

/// Where commit `csum` keeps its rpm database (one of [`rpmdb::CANDIDATES`]), read from its
/// dirtree objects.
pub fn rpmdb_of(repo: &ostree::Repo, csum: &str) -> Result<Option<&'static str>> {
    let (root, _) = repo
        .read_commit(csum, gio::Cancellable::NONE)
        .with_context(|| format!("Reading commit {csum}"))?;
    for candidate in rpmdb::CANDIDATES {
        let dir = root.resolve_relative_path(candidate);
        let kind = dir.query_file_type(
            gio::FileQueryInfoFlags::NOFOLLOW_SYMLINKS,
            gio::Cancellable::NONE,
        );
        if kind == gio::FileType::Directory
            && ["rpmdb.sqlite", "Packages.db", "Packages"]
                .iter()
                .any(|m| dir.child(m).query_exists(gio::Cancellable::NONE))
        {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// Copies the directory `subpath` of commit `csum` out to `dest` (which must not exist): plain
/// copies owned by the caller, never hardlinks to objects.
pub fn checkout_copy(repo: &ostree::Repo, csum: &str, subpath: &str, dest: &Path) -> Result<()> {
    let opts = ostree::RepoCheckoutAtOptions {
        mode: ostree::RepoCheckoutMode::User,
        force_copy: true,
        subpath: Some(PathBuf::from(format!(
            "/{}",
            subpath.trim_start_matches('/')
        ))),
        ..Default::default()
    };
    repo.checkout_at(
        Some(&opts),
        rustix::fs::CWD.as_raw_fd(),
        dest,
        csum,
        gio::Cancellable::NONE,
    )
    .with_context(|| format!("Checking out {subpath} of {csum}"))
}

/// Whether the overlayfs upper entry `meta` is a whiteout (a 0/0 character device).
fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// The value of the extended attribute `name` of `path` (not following symlinks), if it has it.
fn xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    loop {
        let size = match rustix::fs::lgetxattr(path, name, &mut []) {
            Ok(size) => size,
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("Reading {name} of {}", path.display()));
            }
        };
        let mut value = vec![0u8; size];
        match rustix::fs::lgetxattr(path, name, &mut value) {
            Ok(n) => {
                value.truncate(n);
                return Ok(Some(value));
            }
            // It grew in between.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("Reading {name} of {}", path.display()));
            }
        }
    }
}

/// The names of the extended attributes of `path` (not following symlinks).
fn xattr_names(path: &Path) -> Result<Vec<Vec<u8>>> {
    loop {
        let size = rustix::fs::llistxattr(path, &mut [])
            .with_context(|| format!("Listing the extended attributes of {}", path.display()))?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut names = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut names) {
            Ok(n) => {
                return Ok(names[..n]
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("Listing the extended attributes of {}", path.display())
                });
            }
        }
    }
}

/// Whether an overlayfs upper directory hides everything below it in the lower layer.
fn is_opaque(path: &Path) -> Result<bool> {
    Ok(xattr(path, "trusted.overlay.opaque")?.is_some_and(|v| v == b"y"))
}

/// The extended attributes of `path` as ostree stores them (`a(ayay)`, names with their
/// trailing NUL, sorted), without overlayfs' own (`trusted.overlay.*`).
fn xattrs_variant(path: &Path) -> Result<glib::Variant> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for name in xattr_names(path)? {
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            continue;
        }
        let name_str = String::from_utf8_lossy(&name).into_owned();
        // Gone in between: nothing to keep.
        let Some(value) = xattr(path, &name_str)? else {
            continue;
        };
        let mut key = name;
        key.push(0);
        pairs.push((key, value));
    }
    pairs.sort();
    Ok(pairs.to_variant())
}

/// Removes from `mtree` (the tree of the lower layer at `rel`) what the overlayfs upper
/// directory `dir` deletes or replaces with another kind of entry, and then the whiteouts
/// themselves from `dir` (ostree refuses device files); returns how many entries were deleted.
fn apply_removals(mtree: Option<&ostree::MutableTree>, dir: &Path, rel: &str) -> Result<usize> {
    let mut deleted = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("Listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| anyhow!("{} is not UTF-8", entry.path().display()))?;
        let path = entry.path();
        let child_rel = format!("{rel}/{name}");
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("Reading {}", path.display()))?;
        let (file, subdir) = match mtree {
            Some(t) => match t.lookup(name) {
                Ok(found) => found,
                Err(e) if e.matches(gio::IOErrorEnum::NotFound) => (None, None),
                Err(e) => return Err(e).with_context(|| format!("Looking up {child_rel}")),
            },
            None => (None, None),
        };
        let remove = |what: &str| -> Result<()> {
            if let Some(t) = mtree {
                t.remove(name, true)
                    .with_context(|| format!("Removing {child_rel} ({what})"))?;
            }
            Ok(())
        };
        if is_whiteout(&meta) {
            remove("deleted")?;
            std::fs::remove_file(&path)
                .with_context(|| format!("Removing the whiteout {}", path.display()))?;
            deleted += 1;
        } else if meta.is_dir() {
            if is_opaque(&path)? {
                // Nothing of the lower directory shows: the upper one replaces it whole.
                remove("replaced")?;
                deleted += apply_removals(None, &path, &child_rel)?;
            } else if file.is_some() {
                remove("a file replaced by a directory")?;
                deleted += apply_removals(None, &path, &child_rel)?;
            } else {
                deleted += apply_removals(subdir.as_ref(), &path, &child_rel)?;
            }
        } else if subdir.is_some() {
            remove("a directory replaced by a file")?;
        }
    }
    Ok(deleted)
}

/// Commits the overlayfs upper directory `upper` (unmounted; consumed) on top of commit `base`:
/// the base's tree with the upper's files, directories and deletions applied (only what changed
/// is read and hashed), `base` as parent, `metadata`, and [`LAYERED_REF`] pointing at it.
/// Returns the new commit.
pub fn commit_upper(
    repo: &ostree::Repo,
    base: &str,
    upper: &Path,
    subject: &str,
    metadata: &glib::Variant,
    cancellable: &gio::Cancellable,
) -> Result<String> {
    let upper_str = upper
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", upper.display()))?
        .to_string();
    let mtree = ostree::MutableTree::from_commit(repo, base).context("Loading the base tree")?;
    let root_meta = mtree.metadata_checksum().to_string();
    let deleted = apply_removals(Some(&mtree), upper, "").context("Applying deletions")?;
    tracing::debug!("{deleted} paths of {base} deleted");

    let modifier = ostree::RepoCommitModifier::new(ostree::RepoCommitModifierFlags::CONSUME, None);
    let xattr_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let errors = xattr_errors.clone();
    let upper_root = upper.to_path_buf();
    modifier.set_xattr_callback(move |_repo, path, _info| {
        let file = upper_root.join(path.trim_start_matches('/'));
        xattrs_variant(&file).unwrap_or_else(|e| {
            errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{e:#}"));
            Vec::<(Vec<u8>, Vec<u8>)>::new().to_variant()
        })
    });

    repo.prepare_transaction(Some(cancellable))
        .context("Starting a repository transaction")?;
    let written = (|| -> Result<String> {
        repo.write_dfd_to_mtree(
            rustix::fs::CWD.as_raw_fd(),
            &upper_str,
            &mtree,
            Some(&modifier),
            Some(cancellable),
        )
        .context("Writing the changed files")?;
        if let Some(e) = xattr_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
        {
            bail!("Reading extended attributes: {e}");
        }
        // The upper directory's root is ours, not the image's.
        mtree.set_metadata_checksum(&root_meta);
        let root = repo
            .write_mtree(&mtree, Some(cancellable))
            .context("Writing the tree")?;
        let root = root
            .downcast::<ostree::RepoFile>()
            .map_err(|_| anyhow!("The written tree is not in the repository"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let commit = repo
            .write_commit_with_time(
                Some(base),
                Some(subject),
                None,
                Some(metadata),
                &root,
                now,
                Some(cancellable),
            )
            .context("Writing the commit")?;
        repo.transaction_set_ref(None, LAYERED_REF, Some(commit.as_str()));
        repo.commit_transaction(Some(cancellable))
            .context("Completing the repository transaction")?;
        Ok(commit.to_string())
    })();
    if written.is_err()
        && let Err(e) = repo.abort_transaction(gio::Cancellable::NONE)
    {
        tracing::debug!("Aborting the repository transaction, ignoring: {e}");
    }
    written
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn ostree(repo: &Path, args: &[&str]) -> String {
        let out = Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(args)
            .output()
            .expect("ostree runs");
        assert!(
            out.status.success(),
            "ostree {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// Committing an overlay's upper directory on its base gives the same tree as committing
    /// the merged directory whole, for every kind of change overlayfs records.
    #[test]
    fn upper_commit_equals_merged_commit() -> Result<()> {
        if !is_root() {
            eprintln!("skipped: mounting overlayfs needs root");
            return Ok(());
        }
        let tmp = tempfile::tempdir()?;
        let t = tmp.path();
        let repo_path = t.join("repo");
        ostree(&repo_path, &["init", "--mode=bare"]);
        let tree = t.join("tree");
        for d in [
            "usr/bin",
            "usr/lib/old",
            "usr/share/gone/sub",
            "usr/share/dir2file",
            "etc2",
        ] {
            std::fs::create_dir_all(tree.join(d))?;
        }
        for (f, c) in [
            ("usr/bin/keep", "keep"),
            ("usr/bin/change", "before"),
            ("usr/bin/delete", "x"),
            ("usr/lib/old/a", "a"),
            ("usr/share/gone/sub/b", "b"),
            ("usr/share/dir2file/c", "c"),
            ("usr/share/file2dir", "f"),
        ] {
            std::fs::write(tree.join(f), c)?;
        }
        let base = ostree(
            &repo_path,
            &[
                "commit",
                "--orphan",
                "--no-xattrs",
                &format!("--tree=dir={}", tree.display()),
            ],
        );

        let repo = open(&repo_path)?;
        let lower = repo_path.join("tmp/lower");
        checkout_hardlinked(&repo, &base, &lower, &gio::Cancellable::new())?;
        let (upper, work, merged) = (t.join("upper"), t.join("work"), t.join("merged"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir(d)?;
        }
        crate::overlay::mount(&lower, &upper, &work, &merged)?;
        let m = |p: &str| merged.join(p);
        let changed = (|| -> std::io::Result<()> {
            std::fs::write(m("usr/bin/change"), "after")?;
            std::fs::remove_file(m("usr/bin/delete"))?;
            std::fs::write(m("usr/bin/new"), "new")?;
            std::fs::remove_dir_all(m("usr/share/gone"))?;
            std::fs::remove_dir_all(m("usr/lib/old"))?;
            std::fs::create_dir(m("usr/lib/old"))?;
            std::fs::write(m("usr/lib/old/z"), "z")?;
            std::fs::remove_dir_all(m("usr/share/dir2file"))?;
            std::fs::write(m("usr/share/dir2file"), "now a file")?;
            std::fs::remove_file(m("usr/share/file2dir"))?;
            std::fs::create_dir(m("usr/share/file2dir"))?;
            std::fs::write(m("usr/share/file2dir/d"), "d")?;
            std::fs::set_permissions(
                m("etc2"),
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )?;
            Ok(())
        })();
        // The whole merged directory, committed the slow way, for comparison.
        let whole = ostree(
            &repo_path,
            &[
                "commit",
                "--orphan",
                "--no-xattrs",
                &format!("--tree=dir={}", merged.display()),
            ],
        );
        crate::overlay::unmount(&merged)?;
        changed?;

        let meta = commit_meta(&repo, &base)?;
        let metadata = layered_metadata(&meta, &LayeringRequest::default(), None)?;
        let layered = commit_upper(
            &repo,
            &base,
            &upper,
            "test",
            &metadata,
            &gio::Cancellable::new(),
        )?;
        let tree_of = |c: &str| -> Result<(String, String)> {
            let (root, _) = repo.read_commit(c, gio::Cancellable::NONE)?;
            let root = root
                .downcast::<ostree::RepoFile>()
                .map_err(|_| anyhow!("not a repo file"))?;
            root.ensure_resolved()?;
            Ok((
                root.tree_get_contents_checksum()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                root.tree_get_metadata_checksum()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            ))
        };
        assert_eq!(tree_of(&layered)?, tree_of(&whole)?);
        assert_eq!(
            commit_meta(&repo, &layered)?.parent.as_deref(),
            Some(base.as_str())
        );
        assert_eq!(
            resolve(&repo, LAYERED_REF)?.as_deref(),
            Some(layered.as_str())
        );
        ostree(&repo_path, &["fsck"]);
        Ok(())
    }
}
