//! An ostree commit → a chunked OCI image, the pattern of `testimage/src/base.rs` applied to a
//! real OS tree: each content object belongs to a component chosen by path, and ostree-ext
//! makes one layer of each (largest first). The components are picked so that a small change
//! (os-release, a file under `/usr/share/dnfimage-os`) touches only small layers.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow};
use ostree_ext::chunking::ObjectMetaSized;
use ostree_ext::container::{Config, ExportOpts, ImageReference, Transport};
use ostree_ext::objectsource::{ObjectMeta, ObjectSourceMeta};
use ostree_ext::prelude::*;
use ostree_ext::{gio, ostree};

/// The component (layer) of a path in the committed tree.
pub fn component_of(path: &str) -> &'static str {
    const RULES: &[(&str, &str)] = &[
        ("/usr/lib/modules/", "kernel"),
        ("/usr/lib/firmware/", "kernel"),
        ("/usr/libexec/dnfimage/", "dnfimage"),
        ("/usr/bin/dnf-image", "dnfimage"),
        ("/usr/lib/systemd/system/dnfimage-", "dnfimage"),
        ("/usr/share/dnfimage-os/", "release"),
        ("/usr/lib/os-release", "release"),
        ("/usr/lib/python3", "python"),
        ("/usr/share/python3", "python"),
        ("/usr/bin/python3", "python"),
        ("/usr/lib/x86_64-linux-gnu/", "libraries"),
        ("/usr/share/", "data"),
        ("/usr/etc/", "config"),
    ];
    RULES
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix))
        .map_or("base", |(_, c)| c)
}

fn object_meta(repo: &ostree::Repo, rev: &str) -> Result<ObjectMeta> {
    fn walk(dir: &gio::File, path: &str, meta: &mut ObjectMeta) -> Result<()> {
        let children = dir.enumerate_children(
            "standard::name,standard::type",
            gio::FileQueryInfoFlags::NOFOLLOW_SYMLINKS,
            gio::Cancellable::NONE,
        )?;
        for info in children {
            let info = info?;
            let name = info.name();
            let child = dir.child(&name);
            let path = format!("{path}/{}", name.display());
            match info.file_type() {
                gio::FileType::Directory => walk(&child, &path, meta)?,
                gio::FileType::Regular | gio::FileType::SymbolicLink => {
                    let file = child
                        .downcast::<ostree::RepoFile>()
                        .map_err(|_| anyhow!("{path} is not in an ostree repo"))?;
                    let checksum = file.checksum().to_string();
                    // A hardlinked object shared by two components stays in the first one.
                    if meta.map.contains_key(&checksum) {
                        continue;
                    }
                    let id: Rc<str> = Rc::from(component_of(&path));
                    meta.map.insert(checksum, Rc::clone(&id));
                    meta.set.insert(ObjectSourceMeta {
                        identifier: Rc::clone(&id),
                        name: Rc::clone(&id),
                        srcid: id,
                        change_time_offset: 0,
                        change_frequency: 1,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
    let (root, _) = repo
        .read_commit(rev, gio::Cancellable::NONE)
        .with_context(|| format!("Reading commit {rev}"))?;
    let mut meta = ObjectMeta::default();
    walk(&root, "", &mut meta)?;
    Ok(meta)
}

/// Encapsulate `rev` of `repo` into the OCI layout and tag `oci` (`DIR:TAG`).
pub fn encapsulate(repo_path: &Path, rev: &str, oci: &str, version: &str) -> Result<()> {
    let (dir, _tag) = oci
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--oci must be DIR:TAG, not {oci}"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("Creating {dir}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Starting tokio runtime")?;
    let repo = ostree::Repo::new_for_path(repo_path);
    repo.open(gio::Cancellable::NONE)
        .with_context(|| format!("Opening ostree repo {}", repo_path.display()))?;
    let (_, commit) = repo
        .read_commit(rev, gio::Cancellable::NONE)
        .with_context(|| format!("Reading commit {rev}"))?;
    let commit = commit.to_string();
    let meta = object_meta(&repo, &commit).context("Mapping objects to components")?;
    let sized = ObjectMetaSized::compute_sizes(&repo, meta).context("Sizing components")?;
    let mut opts = ExportOpts::default();
    opts.contentmeta = Some(&sized);
    let labels = BTreeMap::from([(
        "org.opencontainers.image.version".to_string(),
        version.to_string(),
    )]);
    let config = Config {
        labels: Some(labels),
        cmd: Some(vec!["/usr/bin/bash".to_string()]),
    };
    let dest = ImageReference {
        transport: Transport::OciDir,
        name: oci.to_string(),
    };
    let digest = rt
        .block_on(ostree_ext::container::encapsulate(
            &repo,
            &commit,
            &config,
            Some(opts),
            &dest,
        ))
        .with_context(|| format!("Encapsulating {commit} into {oci}"))?;
    println!("{digest}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::component_of;

    #[test]
    fn components() {
        for (path, want) in [
            ("/usr/lib/modules/6.1.0-28-amd64/vmlinuz", "kernel"),
            ("/usr/libexec/dnfimage/dnfimage-fetcher", "dnfimage"),
            ("/usr/bin/dnf-image", "dnfimage"),
            ("/usr/lib/os-release", "release"),
            ("/usr/share/dnfimage-os/v2", "release"),
            ("/usr/share/zoneinfo/UTC", "data"),
            ("/usr/lib/python3/dist-packages/x.py", "python"),
            ("/usr/etc/hostname", "config"),
            ("/usr/bin/bash", "base"),
        ] {
            assert_eq!(component_of(path), want, "{path}");
        }
    }
}
