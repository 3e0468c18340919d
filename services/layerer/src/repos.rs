//! The configured package repositories: the `*.repo` files (dnf's INI format) of one
//! directory. The layerer only needs their ids and whether they are enabled; dnf reads the
//! files itself.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

/// Repository id → enabled, from the text of one `.repo` file. `enabled` defaults to true.
pub fn parse(text: &str) -> BTreeMap<String, bool> {
    let mut repos = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let id = section.trim().to_string();
            current = (id != "main").then(|| {
                repos.insert(id.clone(), true);
                id
            });
            continue;
        }
        if let (Some(id), Some((key, value))) = (&current, line.split_once('='))
            && key.trim() == "enabled"
        {
            let on = matches!(
                value.trim().to_ascii_lowercase().as_str(),
                "1" | "yes" | "true" | "on"
            );
            repos.insert(id.clone(), on);
        }
    }
    repos
}

/// Every repository configured in `dir` (`*.repo` files); empty when the directory is missing.
pub fn configured(dir: &Path) -> Result<BTreeMap<String, bool>> {
    let mut repos = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(repos),
        Err(e) => return Err(e).with_context(|| format!("Listing {}", dir.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("Listing {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "repo") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("Reading {}", path.display()))?;
            repos.extend(parse(&text));
        }
    }
    Ok(repos)
}

/// The ids among `wanted` that `configured` lacks.
pub fn unknown(configured: &BTreeMap<String, bool>, wanted: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|w| !configured.contains_key(*w))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_enabled_flags() {
        let text = "[main]\ngpgcheck=1\n\n# comment\n[fedora]\nname=Fedora\nbaseurl=http://x/\n\
                    [updates-testing]\nenabled = 0\n[local]\nenabled=True\n";
        let repos = parse(text);
        assert_eq!(
            repos.into_iter().collect::<Vec<_>>(),
            [
                ("fedora".to_string(), true),
                ("local".to_string(), true),
                ("updates-testing".to_string(), false)
            ]
        );
        let configured = parse("[a]\n[b]\n");
        assert_eq!(
            unknown(&configured, &["a".into(), "c".into()]),
            ["c".to_string()]
        );
    }
}
