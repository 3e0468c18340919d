//! Which deployments a change keeps, and in which order: the rules of `Deploy`, `Rollback` and
//! `Cleanup` on the list of deployments, without a sysroot. Indices are positions in the
//! current list (boot order, 0 boots next).

/// What the rules need to know about one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Its stateroot.
    pub stateroot: String,
    /// Whether the running system was booted from it.
    pub booted: bool,
    /// Whether it is staged (then it is first).
    pub staged: bool,
    /// Whether it is pinned.
    pub pinned: bool,
}

/// The booted deployment, or else the first one that is not staged: what the next boot falls
/// back to, the point between pending and rollback deployments.
pub fn anchor(slots: &[Slot]) -> Option<usize> {
    slots
        .iter()
        .position(|s| s.booted)
        .or_else(|| slots.iter().position(|s| !s.staged))
}

/// The rollback deployment: the one after the anchor.
pub fn rollback(slots: &[Slot]) -> Option<usize> {
    anchor(slots).map(|a| a + 1).filter(|r| *r < slots.len())
}

/// The pending deployment: the staged one, or the first one when it is not the booted one
/// (on a sysroot that is not booted nothing is pending: the first one is the anchor).
pub fn pending(slots: &[Slot]) -> Option<usize> {
    let first = slots.first()?;
    let booted = slots.iter().position(|s| s.booted);
    (first.staged || booted.is_some_and(|b| b != 0)).then_some(0)
}

/// The deployment a change starts from, as the CLI chooses it: the staged one (a change already
/// pending), else the booted one, else the one that boots next.
pub fn current(slots: &[Slot]) -> Option<usize> {
    slots
        .iter()
        .position(|s| s.staged)
        .or_else(|| slots.iter().position(|s| s.booted))
        .or_else(|| (!slots.is_empty()).then_some(0))
}

/// A change prepared against a deployment that is no longer the one a change starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The deployment the caller named.
    pub expected: String,
    /// The one a change starts from now; `None` when there is no deployment.
    pub actual: Option<String>,
}

impl Moved {
    /// What changed, for people.
    pub fn message(&self) -> String {
        let then = if self.expected.is_empty() {
            "on a sysroot without deployments".to_string()
        } else {
            format!("on deployment {}", self.expected)
        };
        let now = match &self.actual {
            Some(actual) => format!("deployment {actual} is the one a change starts from now"),
            None => "the sysroot has no deployment now".to_string(),
        };
        format!(
            "The change was prepared {then}, but {now}: the deployments changed since it was \
             prepared"
        )
    }
}

/// Checks that the deployment a change starts from is still `expected` (its id, "" for none);
/// `ids` are the ids of the deployments `slots` describe. `None` checks nothing.
pub fn check_expected(expected: Option<&str>, slots: &[Slot], ids: &[String]) -> Result<(), Moved> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let actual = current(slots).and_then(|i| ids.get(i));
    if actual.map_or("", String::as_str) == expected {
        return Ok(());
    }
    Err(Moved {
        expected: expected.to_string(),
        actual: actual.cloned(),
    })
}

/// The deployment whose `/etc` a new deployment in `stateroot` merges: the booted one when it is
/// in that stateroot, else the first one of that stateroot that is not staged.
pub fn merge(slots: &[Slot], stateroot: &str) -> Option<usize> {
    slots
        .iter()
        .position(|s| s.booted && s.stateroot == stateroot)
        .or_else(|| {
            slots
                .iter()
                .position(|s| !s.staged && s.stateroot == stateroot)
        })
}

/// The deployments kept, in order, after a new deployment in `stateroot` is put first (as
/// libostree's `simple_write_deployment` keeps them): the booted one, the default one when
/// nothing is booted, the merge one, pinned ones and those of other stateroots. A staged one
/// is replaced.
pub fn after_deploy(slots: &[Slot], stateroot: &str) -> Vec<usize> {
    let anchor = anchor(slots);
    let merge = merge(slots, stateroot);
    (0..slots.len())
        .filter(|&i| {
            let s = &slots[i];
            !s.staged
                && (s.booted
                    || Some(i) == anchor
                    || Some(i) == merge
                    || s.pinned
                    || s.stateroot != stateroot)
        })
        .collect()
}

/// The new order after a rollback, and the (current) index of the deployment that then boots
/// next. With a pending deployment in front of the booted one, the booted one goes first again
/// (a staged one is dropped); else the rollback deployment goes first.
pub fn after_rollback(slots: &[Slot]) -> Option<(Vec<usize>, usize)> {
    let booted = slots.iter().position(|s| s.booted);
    let target = match (booted, pending(slots)) {
        (Some(b), Some(_)) => b,
        _ => rollback(slots)?,
    };
    let mut order = vec![target];
    order.extend((0..slots.len()).filter(|&i| i != target && !slots[i].staged));
    Some((order, target))
}

/// Why a cleanup removes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CleanupRefused {
    /// This deployment is pinned.
    Pinned(usize),
}

/// The deployments a cleanup removes (`pending`, `rollback`), and those it keeps in order.
pub fn cleanup(
    slots: &[Slot],
    pending_too: bool,
    rollback_too: bool,
) -> Result<(Vec<usize>, Vec<usize>), CleanupRefused> {
    let mut remove = Vec::new();
    if pending_too {
        remove.extend(pending(slots));
    }
    if rollback_too {
        remove.extend(rollback(slots));
    }
    remove.sort_unstable();
    remove.dedup();
    if let Some(&i) = remove.iter().find(|&&i| slots[i].pinned) {
        return Err(CleanupRefused::Pinned(i));
    }
    let keep = (0..slots.len()).filter(|i| !remove.contains(i)).collect();
    Ok((keep, remove))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots from a compact notation: one letter per deployment, `d` plain, `b` booted, `s`
    /// staged, `p` pinned, `o` another stateroot ("other"); `B`/`P` combine booted/pinned.
    fn slots(spec: &str) -> Vec<Slot> {
        spec.chars()
            .map(|c| Slot {
                stateroot: if c == 'o' { "other" } else { "os" }.to_string(),
                booted: matches!(c, 'b' | 'B'),
                staged: c == 's',
                pinned: matches!(c, 'p' | 'P' | 'B'),
            })
            .collect()
    }

    #[test]
    fn finds_anchor_pending_rollback_and_merge() {
        // spec, anchor, pending, rollback, merge("os")
        type Case<'a> = (
            &'a str,
            Option<usize>,
            Option<usize>,
            Option<usize>,
            Option<usize>,
        );
        let cases: &[Case] = &[
            ("", None, None, None, None),
            ("d", Some(0), None, None, Some(0)),
            ("dd", Some(0), None, Some(1), Some(0)),
            ("ddd", Some(0), None, Some(1), Some(0)),
            ("bd", Some(0), None, Some(1), Some(0)),
            ("db", Some(1), Some(0), None, Some(1)),
            ("dbd", Some(1), Some(0), Some(2), Some(1)),
            ("sbd", Some(1), Some(0), Some(2), Some(1)),
            ("sd", Some(1), Some(0), None, Some(1)),
            ("od", Some(0), None, Some(1), Some(1)),
            ("pd", Some(0), None, Some(1), Some(0)),
        ];
        for (spec, a, p, r, m) in cases {
            let s = slots(spec);
            assert_eq!(anchor(&s), *a, "anchor {spec}");
            assert_eq!(pending(&s), *p, "pending {spec}");
            assert_eq!(rollback(&s), *r, "rollback {spec}");
            assert_eq!(merge(&s, "os"), *m, "merge {spec}");
        }
    }

    #[test]
    fn a_change_starts_from_the_staged_else_the_booted_else_the_first() {
        let cases: &[(&str, Option<usize>)] = &[
            ("", None),
            ("d", Some(0)),
            ("dd", Some(0)),
            ("bd", Some(0)),
            ("db", Some(1)),
            ("sbd", Some(0)),
            ("sd", Some(0)),
            ("pb", Some(1)),
            ("od", Some(0)),
        ];
        for (spec, want) in cases {
            assert_eq!(current(&slots(spec)), *want, "{spec}");
        }
    }

    #[test]
    fn refuses_a_change_prepared_against_another_deployment() {
        let ids =
            |spec: &str| -> Vec<String> { (0..spec.len()).map(|i| format!("os/c{i}.0")).collect() };
        let moved = |expected: &str, actual: Option<&str>| {
            Err(Moved {
                expected: expected.to_string(),
                actual: actual.map(str::to_string),
            })
        };
        // (deployments, expected, outcome)
        let cases: &[(&str, Option<&str>, Result<(), Moved>)] = &[
            // No expectation: never refused.
            ("", None, Ok(())),
            ("sbd", None, Ok(())),
            // Still the one a change starts from.
            ("d", Some("os/c0.0"), Ok(())),
            ("db", Some("os/c1.0"), Ok(())),
            ("sbd", Some("os/c0.0"), Ok(())),
            ("", Some(""), Ok(())),
            // Something was deployed meanwhile: the first one (unbooted) or the staged one.
            ("dd", Some("os/c1.0"), moved("os/c1.0", Some("os/c0.0"))),
            ("sb", Some("os/c1.0"), moved("os/c1.0", Some("os/c0.0"))),
            ("d", Some(""), moved("", Some("os/c0.0"))),
            // Everything was removed.
            ("", Some("os/c0.0"), moved("os/c0.0", None)),
            // The staged one was removed meanwhile.
            ("b", Some("os/c9.0"), moved("os/c9.0", Some("os/c0.0"))),
            // Same commit, another serial: another deployment (e.g. new kernel arguments).
            ("d", Some("os/c0.1"), moved("os/c0.1", Some("os/c0.0"))),
            // Not an id at all: never matches.
            ("d", Some("c0"), moved("c0", Some("os/c0.0"))),
        ];
        for (spec, expected, want) in cases {
            let got = check_expected(*expected, &slots(spec), &ids(spec));
            assert_eq!(got, *want, "{spec} {expected:?}");
        }
        let message = |expected: &str, actual: Option<&str>| {
            Moved {
                expected: expected.into(),
                actual: actual.map(str::to_string),
            }
            .message()
        };
        assert_eq!(
            message("os/a.0", Some("os/b.0")),
            "The change was prepared on deployment os/a.0, but deployment os/b.0 is the one a \
             change starts from now: the deployments changed since it was prepared"
        );
        assert!(message("", Some("os/b.0")).contains("on a sysroot without deployments"));
        assert!(message("os/a.0", None).contains("the sysroot has no deployment now"));
    }

    #[test]
    fn deploy_keeps_default_booted_merge_pinned_and_other_stateroots() {
        let cases: &[(&str, &[usize])] = &[
            ("", &[]),
            ("d", &[0]),
            ("dd", &[0]),
            ("ddd", &[0]),
            ("dpd", &[0, 1]),
            ("ddp", &[0, 2]),
            ("bd", &[0]),
            ("db", &[1]),
            ("sbd", &[1]),
            ("sbp", &[1, 2]),
            ("odd", &[0, 1]),
            ("dod", &[0, 1]),
        ];
        for (spec, want) in cases {
            assert_eq!(after_deploy(&slots(spec), "os"), *want, "{spec}");
        }
        // Into another stateroot: its own merge deployment and everything of "os" stays.
        assert_eq!(after_deploy(&slots("ddo"), "other"), [0, 1, 2]);
    }

    #[test]
    fn rollback_orders() {
        type Case<'a> = (&'a str, Option<(&'a [usize], usize)>);
        let cases: &[Case] = &[
            ("", None),
            ("d", None),
            ("dd", Some((&[1, 0], 1))),
            ("ddd", Some((&[1, 0, 2], 1))),
            ("bd", Some((&[1, 0], 1))),
            ("b", None),
            // A pending deployment: the booted one goes first again.
            ("db", Some((&[1, 0], 1))),
            ("dbd", Some((&[1, 0, 2], 1))),
            // A staged one is dropped.
            ("sbd", Some((&[1, 2], 1))),
            ("sb", Some((&[1], 1))),
        ];
        for (spec, want) in cases {
            let got = after_rollback(&slots(spec));
            let want = want.map(|(o, t)| (o.to_vec(), t));
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn cleanup_removes_pending_and_rollback_unless_pinned() {
        type Want = Result<(&'static [usize], &'static [usize]), usize>;
        let cases: &[(&str, bool, bool, Want)] = &[
            ("ddd", false, false, Ok((&[0, 1, 2], &[]))),
            ("ddd", false, true, Ok((&[0, 2], &[1]))),
            // Not booted: nothing is pending.
            ("ddd", true, false, Ok((&[0, 1, 2], &[]))),
            ("dbd", true, false, Ok((&[1, 2], &[0]))),
            ("dbd", true, true, Ok((&[1], &[0, 2]))),
            ("sbd", true, false, Ok((&[1, 2], &[0]))),
            ("dp", false, true, Err(1)),
            ("d", true, true, Ok((&[0], &[]))),
            ("", true, true, Ok((&[], &[]))),
        ];
        for (spec, p, r, want) in cases {
            let got = cleanup(&slots(spec), *p, *r);
            let want = want
                .map(|(k, rm)| (k.to_vec(), rm.to_vec()))
                .map_err(CleanupRefused::Pinned);
            assert_eq!(got, want, "{spec} pending={p} rollback={r}");
        }
    }
}
