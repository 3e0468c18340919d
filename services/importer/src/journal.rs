//! The import journal: which layer references an import may write, and which of them it saw
//! completed and verified.
//!
//! ostree-ext writes each layer's reference as soon as the layer's objects are committed, and for
//! a derived (non-ostree) layer that happens in an `ostree commit` child process reading the
//! layer as a tar stream. libarchive accepts a stream that stops between two entries, so an import
//! killed there (or a layer whose digest turns out wrong only after it was parsed) can leave a
//! layer reference to a partial layer, which the next import would reuse. The journal lists those
//! references before the import starts; whatever is not marked complete when the import ends
//! without success, or when the service starts again after being killed, is removed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The journal file inside the repository.
pub const FILE_NAME: &str = "dnfimage-import-journal.json";
/// The importer's instance lock inside the repository, inherited by the processes an import
/// starts (ostree-ext's `ostree commit`), so it is held until the last of them ends.
pub const LOCK_NAME: &str = "dnfimage-importer.lock";

/// What the journal records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entries {
    /// The image being imported, for logs.
    pub image: String,
    /// References of the layers the import may write: `ostree/container/blob/…`.
    pub pending: Vec<String>,
    /// Those completed and verified.
    pub completed: BTreeSet<String>,
}

impl Entries {
    /// The references to remove when the import did not end well.
    pub fn suspect(&self) -> Vec<&str> {
        self.pending
            .iter()
            .filter(|r| !self.completed.contains(*r))
            .map(String::as_str)
            .collect()
    }
}

/// The journal of the repository at `repo`.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
    entries: Entries,
}

impl Journal {
    /// The journal path of the repository at `repo`.
    pub fn path_in(repo: &Path) -> PathBuf {
        repo.join(FILE_NAME)
    }

    /// Starts a journal for an import of `image` that may write `pending`.
    pub fn begin(repo: &Path, image: &str, pending: Vec<String>) -> Result<Self> {
        let journal = Self {
            path: Self::path_in(repo),
            entries: Entries {
                image: image.to_string(),
                pending,
                completed: BTreeSet::new(),
            },
        };
        journal.save()?;
        Ok(journal)
    }

    /// Marks the layer reference `layer_ref` complete and verified.
    pub fn complete(&mut self, layer_ref: &str) -> Result<()> {
        if self.entries.completed.insert(layer_ref.to_string()) {
            self.save()?;
        }
        Ok(())
    }

    /// Ends the journal of a successful import.
    pub fn finish(self) -> Result<()> {
        remove(&self.path)
    }

    fn save(&self) -> Result<()> {
        use std::io::Write;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut file = tempfile_in(dir)?;
        let bytes = serde_json::to_vec(&self.entries).context("Serializing the import journal")?;
        file.write_all(&bytes)
            .and_then(|()| file.as_file().sync_all())
            .context("Writing the import journal")?;
        file.persist(&self.path)
            .map_err(|e| e.error)
            .context("Replacing the import journal")?;
        Ok(())
    }
}

fn tempfile_in(dir: &Path) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".dnfimage-journal-")
        .tempfile_in(dir)
        .with_context(|| format!("Creating a temporary file in {}", dir.display()))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("Removing {}", path.display())),
    }
}

/// Reads the journal a previous import left in `repo`, if any.
pub fn read(repo: &Path) -> Result<Option<Entries>> {
    let path = Journal::path_in(repo);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(entries) => Ok(Some(entries)),
            Err(e) => {
                // A journal is written whole through a rename, so this is not ours to interpret.
                tracing::warn!(
                    "Ignoring the unreadable import journal {}: {e}",
                    path.display()
                );
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("Reading {}", path.display())),
    }
}

/// Removes the references an unfinished import may have left half-written (`remove_ref` is
/// called for each that exists), then the journal. Returns the references removed.
///
/// Call it holding the importer's [`LOCK_NAME`] lock: the processes a killed import left (its
/// `ostree commit` children inherit the lock) have then ended, so what is removed stays removed.
pub fn recover(
    repo: &Path,
    mut remove_ref: impl FnMut(&str) -> Result<bool>,
) -> Result<Vec<String>> {
    let Some(entries) = read(repo)? else {
        return Ok(Vec::new());
    };
    let suspect = entries.suspect();
    let mut removed = Vec::new();
    for layer_ref in suspect {
        if remove_ref(layer_ref).with_context(|| format!("Removing reference {layer_ref}"))? {
            removed.push(layer_ref.to_string());
        }
    }
    if !removed.is_empty() {
        tracing::info!(
            "The import of {} did not finish; removed {} layer references it may have left \
             half-written: {removed:?}",
            entries.image,
            removed.len()
        );
    }
    remove(&Journal::path_in(repo))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_only_what_was_not_completed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            recover(dir.path(), |_| panic!("no journal")).unwrap(),
            Vec::<String>::new()
        );

        let pending = vec!["blob/a".to_string(), "blob/b".into(), "blob/c".into()];
        let mut journal = Journal::begin(dir.path(), "docker://r/os:1", pending).unwrap();
        journal.complete("blob/a").unwrap();
        // Simulate a kill: the journal stays; a new process reads it.
        let on_disk = read(dir.path()).unwrap().unwrap();
        assert_eq!(on_disk.suspect(), ["blob/b", "blob/c"]);
        drop(journal);

        // Only b was written before the kill.
        let mut asked = vec![];
        let removed = recover(dir.path(), |r| {
            asked.push(r.to_string());
            Ok(r == "blob/b")
        })
        .unwrap();
        assert_eq!(asked, ["blob/b", "blob/c"]);
        assert_eq!(removed, ["blob/b"]);
        assert!(read(dir.path()).unwrap().is_none());

        // A finished import leaves nothing to recover.
        let journal = Journal::begin(dir.path(), "x", vec!["blob/z".into()]).unwrap();
        journal.finish().unwrap();
        assert!(!Journal::path_in(dir.path()).exists());
    }

    #[test]
    fn ignores_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Journal::path_in(dir.path()), b"not json").unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        assert!(
            recover(dir.path(), |_| panic!("nothing to remove"))
                .unwrap()
                .is_empty()
        );
    }
}
