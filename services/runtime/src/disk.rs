//! The space a directory takes on disk, counted as `du` counts it.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What [`usage`] found under a directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Allocated bytes of every file and directory, the directory itself included; a file with
    /// several links under it counted once (`du -s -B1`).
    pub bytes: u64,
    /// Regular files, each inode once.
    pub files: u64,
}

/// Walks `root` without following symbolic links. Blocking: call it from a blocking thread.
/// Entries that vanish during the walk are skipped.
pub fn usage(root: &Path) -> Result<Usage> {
    let mut total = Usage::default();
    let mut seen = BTreeSet::new();
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    let meta =
        std::fs::symlink_metadata(root).with_context(|| format!("Reading {}", root.display()))?;
    anyhow::ensure!(meta.is_dir(), "{} is not a directory", root.display());
    total.bytes += meta.blocks() * 512;
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
            Err(e) => return Err(e).with_context(|| format!("Listing {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("Listing {}", dir.display()))?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("Reading {}", entry.path().display()));
                }
            };
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total.bytes += meta.blocks() * 512;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.is_file() {
                total.files += 1;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_du_counts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/one"), vec![7u8; 10_000]).unwrap();
        std::fs::write(root.join("a/b/two"), vec![7u8; 100_000]).unwrap();
        std::fs::hard_link(root.join("a/b/two"), root.join("a/twice")).unwrap();
        std::os::unix::fs::symlink("/usr", root.join("a/link")).unwrap();
        let got = usage(root).unwrap();
        assert_eq!(got.files, 2);
        let du = std::process::Command::new("du")
            .args(["-s", "-B1"])
            .arg(root)
            .output()
            .unwrap();
        let du: u64 = String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(got.bytes, du);
        assert!(usage(&root.join("a/one")).is_err());
    }
}
