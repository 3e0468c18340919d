//! The layering request: what a build applies on an image commit, merged from the request a
//! commit recorded and the changes a caller asks for. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use dnfimage_interfaces::layerer::{LayererError, LayeringRequest, Package};

/// What a caller asks to change, with the local packages to replace with already read.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Packages to add to the request.
    pub install: Vec<String>,
    /// Requested packages to drop.
    pub uninstall: Vec<String>,
    /// Image packages to remove.
    pub override_remove: Vec<String>,
    /// Image packages to replace, by the packages in the given files.
    pub override_replace: Vec<Package>,
    /// Packages whose override (removal or replacement) to drop.
    pub override_reset: Vec<String>,
}

fn invalid(packages: Vec<String>, message: &str) -> LayererError {
    LayererError::InvalidRequest {
        packages,
        message: message.to_string(),
    }
}

/// Whether `name` can be handed to dnf and rpm as one package argument.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Whether a request layers nothing.
pub fn is_empty(r: &LayeringRequest) -> bool {
    r.packages.is_empty() && r.override_remove.is_empty() && r.override_replace.is_empty()
}

/// The request that results from applying `changes` to `recorded`; `inactive` is left empty
/// for the build to fill in. Lists come out sorted and without duplicates.
pub fn merge(
    recorded: &LayeringRequest,
    changes: &Changes,
) -> Result<LayeringRequest, LayererError> {
    let bad: Vec<String> = changes
        .install
        .iter()
        .chain(&changes.uninstall)
        .chain(&changes.override_remove)
        .chain(&changes.override_reset)
        .filter(|n| !valid_name(n))
        .cloned()
        .collect();
    if !bad.is_empty() {
        return Err(invalid(bad, "These are not package names"));
    }

    let both: Vec<String> = changes
        .install
        .iter()
        .filter(|n| changes.uninstall.contains(n))
        .cloned()
        .collect();
    if !both.is_empty() {
        return Err(invalid(
            both,
            "Installing and uninstalling the same packages",
        ));
    }
    let mut packages: BTreeSet<String> = recorded.packages.iter().cloned().collect();
    packages.extend(changes.install.iter().cloned());
    let not_requested: Vec<String> = changes
        .uninstall
        .iter()
        .filter(|n| !packages.contains(*n))
        .cloned()
        .collect();
    if !not_requested.is_empty() {
        return Err(invalid(
            not_requested,
            "Only requested packages can be uninstalled; remove image packages with \
             overrideRemove",
        ));
    }
    for n in &changes.uninstall {
        packages.remove(n);
    }

    let mut remove: BTreeSet<String> = recorded.override_remove.iter().cloned().collect();
    remove.extend(changes.override_remove.iter().cloned());
    let mut replace: BTreeMap<String, Package> = recorded
        .override_replace
        .iter()
        .map(|p| (p.name.clone(), p.clone()))
        .collect();
    let mut seen = BTreeSet::new();
    let twice: Vec<String> = changes
        .override_replace
        .iter()
        .filter(|p| !seen.insert(p.name.clone()))
        .map(|p| p.name.clone())
        .collect();
    if !twice.is_empty() {
        return Err(invalid(twice, "Several files replace the same package"));
    }
    for p in &changes.override_replace {
        replace.insert(p.name.clone(), p.clone());
    }

    let reset_and_changed: Vec<String> = changes
        .override_reset
        .iter()
        .filter(|n| {
            changes.override_remove.contains(n)
                || changes.override_replace.iter().any(|p| &p.name == *n)
        })
        .cloned()
        .collect();
    if !reset_and_changed.is_empty() {
        return Err(invalid(
            reset_and_changed,
            "Resetting and overriding the same packages",
        ));
    }
    let not_overridden: Vec<String> = changes
        .override_reset
        .iter()
        .filter(|n| !remove.contains(*n) && !replace.contains_key(*n))
        .cloned()
        .collect();
    if !not_overridden.is_empty() {
        return Err(invalid(
            not_overridden,
            "These packages have no override to reset",
        ));
    }
    for n in &changes.override_reset {
        remove.remove(n);
        replace.remove(n);
    }

    let removed_and_replaced: Vec<String> = remove
        .iter()
        .filter(|n| replace.contains_key(*n))
        .cloned()
        .collect();
    if !removed_and_replaced.is_empty() {
        return Err(invalid(
            removed_and_replaced,
            "A package cannot be both removed and replaced",
        ));
    }
    let removed_and_requested: Vec<String> = remove.intersection(&packages).cloned().collect();
    if !removed_and_requested.is_empty() {
        return Err(invalid(
            removed_and_requested,
            "A package cannot be both removed from the image and requested",
        ));
    }

    Ok(LayeringRequest {
        packages: packages.into_iter().collect(),
        inactive: Vec::new(),
        override_remove: remove.into_iter().collect(),
        override_replace: replace.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn kernel(version: &str) -> Package {
        Package {
            name: "kernel".into(),
            version: version.into(),
            architecture: "x86_64".into(),
        }
    }

    fn recorded() -> LayeringRequest {
        LayeringRequest {
            packages: names(&["htop", "vim"]),
            inactive: names(&["vim"]),
            override_remove: names(&["nano"]),
            override_replace: vec![kernel("6.1-1")],
        }
    }

    #[test]
    fn merges_changes_into_the_recorded_request() {
        struct Case {
            name: &'static str,
            changes: Changes,
            want: Result<LayeringRequest, &'static str>,
        }
        let cases = [
            Case {
                name: "nothing changes",
                changes: Changes::default(),
                want: Ok(LayeringRequest {
                    inactive: vec![],
                    ..recorded()
                }),
            },
            Case {
                name: "install and uninstall",
                changes: Changes {
                    install: names(&["zsh", "vim"]),
                    uninstall: names(&["htop"]),
                    ..Default::default()
                },
                want: Ok(LayeringRequest {
                    packages: names(&["vim", "zsh"]),
                    inactive: vec![],
                    override_remove: names(&["nano"]),
                    override_replace: vec![kernel("6.1-1")],
                }),
            },
            Case {
                name: "replace again and reset a removal",
                changes: Changes {
                    override_replace: vec![kernel("6.2-1")],
                    override_reset: names(&["nano"]),
                    ..Default::default()
                },
                want: Ok(LayeringRequest {
                    packages: names(&["htop", "vim"]),
                    inactive: vec![],
                    override_remove: vec![],
                    override_replace: vec![kernel("6.2-1")],
                }),
            },
            Case {
                name: "reset everything",
                changes: Changes {
                    uninstall: names(&["htop", "vim"]),
                    override_reset: names(&["nano", "kernel"]),
                    ..Default::default()
                },
                want: Ok(LayeringRequest::default()),
            },
            Case {
                name: "uninstall what is not requested",
                changes: Changes {
                    uninstall: names(&["bash"]),
                    ..Default::default()
                },
                want: Err("bash"),
            },
            Case {
                name: "install and uninstall the same",
                changes: Changes {
                    install: names(&["zsh"]),
                    uninstall: names(&["zsh"]),
                    ..Default::default()
                },
                want: Err("zsh"),
            },
            Case {
                name: "reset what is not overridden",
                changes: Changes {
                    override_reset: names(&["bash"]),
                    ..Default::default()
                },
                want: Err("bash"),
            },
            Case {
                name: "remove what is replaced",
                changes: Changes {
                    override_remove: names(&["kernel"]),
                    ..Default::default()
                },
                want: Err("kernel"),
            },
            Case {
                name: "remove what is requested",
                changes: Changes {
                    override_remove: names(&["vim"]),
                    ..Default::default()
                },
                want: Err("vim"),
            },
            Case {
                name: "not a name",
                changes: Changes {
                    install: names(&["--nogpgcheck"]),
                    ..Default::default()
                },
                want: Err("--nogpgcheck"),
            },
        ];
        for case in cases {
            let got = merge(&recorded(), &case.changes);
            match (got, case.want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{}", case.name),
                (Err(LayererError::InvalidRequest { packages, .. }), Err(name)) => {
                    assert_eq!(packages, [name], "{}", case.name)
                }
                (got, want) => panic!("{}: got {got:?}, want {want:?}", case.name),
            }
        }
        assert!(is_empty(&LayeringRequest::default()));
        assert!(!is_empty(&recorded()));
    }
}
