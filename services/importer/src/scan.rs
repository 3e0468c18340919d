//! Finds the content of non-ostree (derived) layers that the imported commit does not hold where
//! the image has it.
//!
//! ostree-ext 0.15.3 rewrites derived layers on import (`tar::write::normalize_validate_path`):
//! `/usr` stays, `/etc` goes to `/usr/etc` (ostree's own place for it, not a loss), `/var` goes to
//! `/usr/share/factory/var` when libostree is older than 2024.3, the children of `/run`, `/tmp`,
//! `/proc`, `/sys` and `/dev` are dropped, and every other top-level directory (`/opt`, `/srv`,
//! `/root`, `/home`, …) is dropped unless the base enables a transient root. It records only
//! counts of the dropped entries (`ostree.tar-filtered`, and only for layers imported in the same
//! call), so the importer reads the derived layers itself, with the same rules.

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::{Context, Result};
use dnfimage_interfaces::importer::{ImportWarning, ImportWarningKind};

/// Where ostree-ext moves `/var` of derived layers on libostree older than 2024.3.
pub const FACTORY_VAR: &str = "/usr/share/factory/var";
/// Top-level directories whose children are never imported.
const API_DIRS: &[&str] = &["run", "tmp", "proc", "sys", "dev"];
/// Hard links into the repository of an ostree-ext "container commit": handled apart.
const SYSROOT_REPO: &str = "sysroot/ostree/repo/";

/// How the import rewrites layers, which depends on the host and the base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// libostree 2024.3 or newer: `/var` stays `/var`.
    pub retain_var: bool,
    /// The base enables a transient root: top-level directories stay.
    pub allow_nonusr: bool,
}

/// What the import does with one path of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate<'a> {
    /// Imported where the layer has it (or where ostree always puts it, like `/etc`).
    Kept,
    /// Imported under [`FACTORY_VAR`]; the argument is the top-level directory.
    Moved(&'a str),
    /// Not imported; the argument is the top-level directory.
    Dropped(&'a str),
}

/// What the import does with `path` (as a tar entry names it).
pub fn fate(path: &str, rules: Rules) -> Fate<'_> {
    let relative = path.trim_start_matches('/');
    let relative = relative.trim_start_matches("./");
    if relative.starts_with(SYSROOT_REPO) {
        return Fate::Kept;
    }
    let mut parts = relative.split('/').filter(|p| !p.is_empty() && *p != ".");
    let Some(top) = parts.next() else {
        return Fate::Kept;
    };
    let has_child = parts.next().is_some();
    match top {
        "usr" | "etc" => Fate::Kept,
        "var" if rules.retain_var || !has_child => Fate::Kept,
        "var" => Fate::Moved(top),
        t if API_DIRS.contains(&t) => {
            if has_child {
                Fate::Dropped(t)
            } else {
                Fate::Kept
            }
        }
        _ if rules.allow_nonusr => Fate::Kept,
        t => Fate::Dropped(t),
    }
}

/// Entries and files found under one top-level directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Count {
    entries: u64,
    files: u64,
}

/// What one top-level directory of a layer holds: the entry of the directory itself (or a file
/// of that name) and the entries below it, counted apart because the rules treat them apart.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopCount {
    /// Entries naming the top-level path itself.
    pub own_entries: u64,
    /// Of those, the ones that are not directories.
    pub own_files: u64,
    /// Entries below it.
    pub entries: u64,
    /// Of those, the ones that are not directories.
    pub files: u64,
}

/// What a layer holds outside `/usr` and `/etc`, by top-level directory, whatever the rules:
/// read once per layer and kept with the layer's commit, so that the warnings of an image are
/// found again without reading its layers (see [`Summary::warnings`]).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Counts by top-level directory (without `usr` and `etc`, which are always kept).
    pub tops: BTreeMap<String, TopCount>,
}

impl Summary {
    /// The warnings for layer `digest` under `rules`, the same as [`scan_tar`] gives.
    pub fn warnings(&self, digest: &str, rules: Rules) -> Vec<ImportWarning> {
        let mut moved: BTreeMap<&str, Count> = BTreeMap::new();
        let mut dropped: BTreeMap<&str, Count> = BTreeMap::new();
        for (top, count) in &self.tops {
            let child = format!("{top}/x");
            for (path, entries, files) in [
                (top.as_str(), count.own_entries, count.own_files),
                (child.as_str(), count.entries, count.files),
            ] {
                if entries == 0 {
                    continue;
                }
                let map = match fate(path, rules) {
                    Fate::Kept => continue,
                    Fate::Moved(_) => &mut moved,
                    Fate::Dropped(_) => &mut dropped,
                };
                let c = map.entry(top.as_str()).or_default();
                c.entries += entries;
                c.files += files;
            }
        }
        let mut warnings = Vec::new();
        for (top, count) in dropped {
            warnings.push(dropped_warning(Some(digest), top, Some(count.files)));
        }
        for (top, count) in moved {
            warnings.push(moved_warning(Some(digest), top, Some(count.files)));
        }
        warnings
    }
}

/// Reads the (uncompressed) tar stream of layer `digest` and counts what it holds outside
/// `/usr` and `/etc`.
pub fn summarize_tar(reader: impl Read, digest: &str) -> Result<Summary> {
    let mut summary = Summary::default();
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .with_context(|| format!("Reading layer {digest}"))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("Reading layer {digest}"))?;
        let is_dir = entry.header().entry_type().is_dir();
        let path = entry
            .path()
            .with_context(|| format!("Reading a path in layer {digest}"))?;
        let path = path.to_string_lossy();
        let relative = path.trim_start_matches('/').trim_start_matches("./");
        if relative.starts_with(SYSROOT_REPO) {
            continue;
        }
        let mut parts = relative.split('/').filter(|p| !p.is_empty() && *p != ".");
        let Some(top) = parts.next() else { continue };
        if top == "usr" || top == "etc" {
            continue;
        }
        let has_child = parts.next().is_some();
        let count = summary.tops.entry(top.to_string()).or_default();
        if has_child {
            count.entries += 1;
            count.files += u64::from(!is_dir);
        } else {
            count.own_entries += 1;
            count.own_files += u64::from(!is_dir);
        }
    }
    Ok(summary)
}

/// Reads the (uncompressed) tar stream of layer `digest` and returns a warning for each
/// top-level directory whose content the commit does not hold where the layer has it.
pub fn scan_tar(reader: impl Read, digest: &str, rules: Rules) -> Result<Vec<ImportWarning>> {
    Ok(summarize_tar(reader, digest)?.warnings(digest, rules))
}

fn files_text(files: Option<u64>) -> String {
    match files {
        Some(1) => " (1 file)".to_string(),
        Some(n) => format!(" ({n} files)"),
        None => String::new(),
    }
}

/// The warning for content under `/<top>` that the commit does not hold.
pub fn dropped_warning(layer: Option<&str>, top: &str, files: Option<u64>) -> ImportWarning {
    let path = format!("/{top}");
    let message = if API_DIRS.contains(&top) {
        format!(
            "{path}{}: not imported; {path} is empty in every deployment",
            files_text(files)
        )
    } else {
        format!(
            "{path}{}: not imported; this host's libostree only takes /usr, /etc and /var \
             from container layers, so the deployment will not have it (install it under /usr)",
            files_text(files)
        )
    };
    ImportWarning {
        kind: ImportWarningKind::Dropped,
        layer: layer.map(str::to_string),
        path,
        moved_to: None,
        files,
        message,
    }
}

/// The warning for content under `/<top>` that the commit holds under [`FACTORY_VAR`].
pub fn moved_warning(layer: Option<&str>, top: &str, files: Option<u64>) -> ImportWarning {
    let path = format!("/{top}");
    ImportWarning {
        kind: ImportWarningKind::Moved,
        layer: layer.map(str::to_string),
        message: format!(
            "{path}{}: imported under {FACTORY_VAR}; libostree older than 2024.3 never updates \
             a machine's {path}, so the deployment's {path} will not have it unless a \
             tmpfiles.d rule copies it",
            files_text(files)
        ),
        path,
        moved_to: Some(FACTORY_VAR.to_string()),
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: Rules = Rules {
        retain_var: false,
        allow_nonusr: false,
    };
    const NEW: Rules = Rules {
        retain_var: true,
        allow_nonusr: false,
    };
    const TRANSIENT: Rules = Rules {
        retain_var: false,
        allow_nonusr: true,
    };

    #[test]
    fn fates_of_paths() {
        let cases: &[(&str, Rules, Fate<'_>)] = &[
            ("usr/bin/x", OLD, Fate::Kept),
            ("./usr/bin/x", OLD, Fate::Kept),
            ("/usr/", OLD, Fate::Kept),
            ("etc/hostname", OLD, Fate::Kept),
            ("./", OLD, Fate::Kept),
            ("", OLD, Fate::Kept),
            ("var/", OLD, Fate::Kept),
            ("var/lib/app/state", OLD, Fate::Moved("var")),
            ("./var/log/", OLD, Fate::Moved("var")),
            ("var/lib/app/state", NEW, Fate::Kept),
            ("opt/", OLD, Fate::Dropped("opt")),
            ("opt/app/bin", OLD, Fate::Dropped("opt")),
            ("./opt/app/bin", NEW, Fate::Dropped("opt")),
            ("opt/app/bin", TRANSIENT, Fate::Kept),
            ("srv/www/index.html", OLD, Fate::Dropped("srv")),
            ("tmp/", OLD, Fate::Kept),
            ("tmp/build.log", OLD, Fate::Dropped("tmp")),
            ("run/lock/x", TRANSIENT, Fate::Dropped("run")),
            ("sysroot/ostree/repo/objects/00/x.file", OLD, Fate::Kept),
            ("sysroot/other", OLD, Fate::Dropped("sysroot")),
        ];
        for (path, rules, want) in cases {
            assert_eq!(fate(path, *rules), *want, "{path} with {rules:?}");
        }
    }

    fn layer(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_ustar();
            match content {
                Some(data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, path, data.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_cksum();
                    b.append_data(&mut h, path, std::io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn scans_a_layer() {
        let tar = layer(&[
            ("usr/", None),
            ("usr/share/app/data", Some("x")),
            ("opt/", None),
            ("opt/app/", None),
            ("opt/app/run", Some("#!/bin/sh")),
            ("opt/app/lib", Some("y")),
            ("var/", None),
            ("var/lib/app/", None),
            ("var/lib/app/db", Some("z")),
            ("tmp/", None),
            ("etc/app.conf", Some("k=v")),
        ]);
        let warnings = scan_tar(&tar[..], "sha256:ab", OLD).unwrap();
        let summary: Vec<_> = warnings
            .iter()
            .map(|w| (w.kind, w.path.as_str(), w.moved_to.as_deref(), w.files))
            .collect();
        assert_eq!(
            summary,
            [
                (ImportWarningKind::Dropped, "/opt", None, Some(2)),
                (ImportWarningKind::Moved, "/var", Some(FACTORY_VAR), Some(1)),
            ]
        );
        assert!(
            warnings
                .iter()
                .all(|w| w.layer.as_deref() == Some("sha256:ab"))
        );
        assert!(
            warnings[0]
                .message
                .starts_with("/opt (2 files): not imported")
        );

        // A newer libostree keeps /var; a layer with only /usr has nothing to say.
        let warnings = scan_tar(&tar[..], "sha256:ab", NEW).unwrap();
        assert_eq!(warnings.len(), 1);
        let clean = layer(&[("usr/", None), ("usr/lib/x", Some("1"))]);
        assert!(scan_tar(&clean[..], "sha256:cd", OLD).unwrap().is_empty());
    }

    #[test]
    fn a_recorded_summary_gives_what_reading_each_path_gives() {
        let entries: &[(&str, Option<&str>)] = &[
            ("usr/", None),
            ("usr/lib/x", Some("1")),
            ("opt", Some("a file named opt")),
            ("srv/", None),
            ("srv/www/", None),
            ("srv/www/index.html", Some("<p>")),
            ("var/", None),
            ("var/lib/app/db", Some("z")),
            ("tmp/", None),
            ("tmp/x", Some("t")),
            ("run/lock/y", Some("r")),
            ("sysroot/ostree/repo/objects/00/x.file", Some("o")),
            ("sysroot/other", Some("s")),
            ("./root/.bashrc", Some("b")),
        ];
        let tar = layer(entries);
        let summary = summarize_tar(&tar[..], "sha256:ab").unwrap();
        let text = serde_json::to_string(&summary).unwrap();
        let recorded: Summary = serde_json::from_str(&text).unwrap();
        assert_eq!(recorded, summary);
        for rules in [OLD, NEW, TRANSIENT] {
            // Every path through `fate`, one at a time, as the import rewrites it.
            let mut moved: BTreeMap<&str, u64> = BTreeMap::new();
            let mut dropped: BTreeMap<&str, u64> = BTreeMap::new();
            for (path, content) in entries {
                let (map, top) = match fate(path, rules) {
                    Fate::Kept => continue,
                    Fate::Moved(top) => (&mut moved, top),
                    Fate::Dropped(top) => (&mut dropped, top),
                };
                *map.entry(top).or_default() += u64::from(content.is_some());
            }
            let want: Vec<_> = dropped
                .iter()
                .map(|(t, n)| dropped_warning(Some("sha256:ab"), t, Some(*n)))
                .chain(
                    moved
                        .iter()
                        .map(|(t, n)| moved_warning(Some("sha256:ab"), t, Some(*n))),
                )
                .collect();
            assert!(!want.is_empty());
            assert_eq!(recorded.warnings("sha256:ab", rules), want, "{rules:?}");
        }
    }

    #[test]
    fn truncated_layer_is_an_error() {
        let tar = layer(&[("opt/big", Some(&"x".repeat(4096)))]);
        assert!(scan_tar(&tar[..1024], "sha256:ab", OLD).is_err());
    }
}
