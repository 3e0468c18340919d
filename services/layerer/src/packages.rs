//! Installed packages: rpm's version comparison and the difference between two package lists.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use dnfimage_interfaces::layerer::{Package, PackageChange, PackageChanges};

/// The `--queryformat` that [`parse_query`] reads: name, epoch (empty when none), version,
/// release and architecture, tab-separated, a line each.
pub const QUERY_FORMAT: &str =
    "%{NAME}\\t%|EPOCH?{%{EPOCH}}:{}|\\t%{VERSION}\\t%{RELEASE}\\t%{ARCH}\\n";

/// The version of a package as the interface writes it: "VERSION-RELEASE", after "EPOCH:" when
/// it has an epoch.
pub fn evr(epoch: &str, version: &str, release: &str) -> String {
    if epoch.is_empty() {
        format!("{version}-{release}")
    } else {
        format!("{epoch}:{version}-{release}")
    }
}

/// Reads `rpm -qa --qf QUERY_FORMAT` output, sorted by name; the `gpg-pubkey` entries (keys,
/// not packages) are left out.
pub fn parse_query(output: &str) -> Result<Vec<Package>, String> {
    let mut packages = Vec::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, epoch, version, release, arch] = fields[..] else {
            return Err(format!("Unexpected rpm query line {line:?}"));
        };
        if name == "gpg-pubkey" {
            continue;
        }
        packages.push(Package {
            name: name.to_string(),
            version: evr(epoch, version, release),
            architecture: arch.to_string(),
        });
    }
    packages.sort_by(|a, b| {
        (&a.name, &a.architecture)
            .cmp(&(&b.name, &b.architecture))
            .then_with(|| compare_evr(&a.version, &b.version))
    });
    Ok(packages)
}

/// rpm's `rpmvercmp`: compares version (or release) strings segment by segment, numbers as
/// numbers, `~` sorting before anything and `^` after the end.
pub fn rpmvercmp(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let separator = |c: u8| !c.is_ascii_alphanumeric() && c != b'~' && c != b'^';
    while i < a.len() || j < b.len() {
        while i < a.len() && separator(a[i]) {
            i += 1;
        }
        while j < b.len() && separator(b[j]) {
            j += 1;
        }
        let (ca, cb) = (a.get(i).copied(), b.get(j).copied());
        if ca == Some(b'~') || cb == Some(b'~') {
            if ca != Some(b'~') {
                return Ordering::Greater;
            }
            if cb != Some(b'~') {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        if ca == Some(b'^') || cb == Some(b'^') {
            if ca.is_none() {
                return Ordering::Less;
            }
            if cb.is_none() {
                return Ordering::Greater;
            }
            if ca != Some(b'^') {
                return Ordering::Greater;
            }
            if cb != Some(b'^') {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        let (Some(ca), Some(_)) = (ca, cb) else {
            break;
        };
        let numeric = ca.is_ascii_digit();
        let class = |c: &u8| {
            if numeric {
                c.is_ascii_digit()
            } else {
                c.is_ascii_alphabetic()
            }
        };
        let seg_a_len = a[i..].iter().take_while(|c| class(c)).count();
        let seg_b_len = b[j..].iter().take_while(|c| class(c)).count();
        let (seg_a, seg_b) = (&a[i..i + seg_a_len], &b[j..j + seg_b_len]);
        if seg_b.is_empty() {
            return if numeric {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let order = if numeric {
            let strip = |s: &[u8]| -> usize { s.iter().take_while(|c| **c == b'0').count() };
            let (na, nb) = (&seg_a[strip(seg_a)..], &seg_b[strip(seg_b)..]);
            na.len().cmp(&nb.len()).then_with(|| na.cmp(nb))
        } else {
            seg_a.cmp(seg_b)
        };
        if order != Ordering::Equal {
            return order;
        }
        i += seg_a_len;
        j += seg_b_len;
    }
    match (i >= a.len(), j >= b.len()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        _ => Ordering::Greater,
    }
}

/// Splits `[EPOCH:]VERSION-RELEASE` into its parts; a missing epoch is 0.
fn split_evr(evr: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match evr.split_once(':') {
        Some((e, rest)) if e.bytes().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), rest),
        _ => (0, evr),
    };
    let (version, release) = rest.rsplit_once('-').unwrap_or((rest, ""));
    (epoch, version, release)
}

/// Compares two `[EPOCH:]VERSION-RELEASE` strings as rpm does.
pub fn compare_evr(a: &str, b: &str) -> Ordering {
    let (ea, va, ra) = split_evr(a);
    let (eb, vb, rb) = split_evr(b);
    ea.cmp(&eb)
        .then_with(|| rpmvercmp(va, vb))
        .then_with(|| rpmvercmp(ra, rb))
}

/// How the packages `to` differ from the packages `from`. Packages are matched by name and
/// architecture; where either side holds several versions (kernels), the versions only one
/// side has count as added or removed.
pub fn diff(from: &[Package], to: &[Package]) -> PackageChanges {
    fn index(packages: &[Package]) -> BTreeMap<(&str, &str), Vec<&str>> {
        let mut map: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
        for p in packages {
            map.entry((&p.name, &p.architecture))
                .or_default()
                .push(&p.version);
        }
        map
    }
    let (old, new) = (index(from), index(to));
    let mut changes = PackageChanges {
        upgraded: Vec::new(),
        downgraded: Vec::new(),
        added: Vec::new(),
        removed: Vec::new(),
    };
    let package = |(name, arch): (&str, &str), version: &str| Package {
        name: name.to_string(),
        version: version.to_string(),
        architecture: arch.to_string(),
    };
    let mut keys: Vec<_> = old.keys().chain(new.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let before = old.get(&key).map(Vec::as_slice).unwrap_or_default();
        let after = new.get(&key).map(Vec::as_slice).unwrap_or_default();
        if let ([b], [a]) = (before, after) {
            let change = || PackageChange {
                name: key.0.to_string(),
                architecture: key.1.to_string(),
                from_version: b.to_string(),
                to_version: a.to_string(),
            };
            match compare_evr(b, a) {
                Ordering::Less => changes.upgraded.push(change()),
                Ordering::Greater => changes.downgraded.push(change()),
                // Same EVR written differently ("0:1-1" and "1-1") is no change.
                Ordering::Equal => {}
            }
            continue;
        }
        for v in before.iter().filter(|v| !after.contains(v)) {
            changes.removed.push(package(key, v));
        }
        for v in after.iter().filter(|v| !before.contains(v)) {
            changes.added.push(package(key, v));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpmvercmp_matches_rpm() {
        // From rpm's own test suite (tests/rpmvercmp.at).
        let cases = [
            ("1.0", "1.0", 0),
            ("1.0", "2.0", -1),
            ("2.0", "1.0", 1),
            ("2.0.1", "2.0.1", 0),
            ("2.0", "2.0.1", -1),
            ("2.0.1", "2.0", 1),
            ("2.0.1a", "2.0.1a", 0),
            ("2.0.1a", "2.0.1", 1),
            ("2.0.1", "2.0.1a", -1),
            ("5.5p1", "5.5p1", 0),
            ("5.5p1", "5.5p2", -1),
            ("5.5p2", "5.5p1", 1),
            ("5.5p10", "5.5p10", 0),
            ("5.5p1", "5.5p10", -1),
            ("5.5p10", "5.5p1", 1),
            ("10xyz", "10.1xyz", -1),
            ("10.1xyz", "10xyz", 1),
            ("xyz10", "xyz10", 0),
            ("xyz10", "xyz10.1", -1),
            ("xyz10.1", "xyz10", 1),
            ("xyz.4", "xyz.4", 0),
            ("xyz.4", "8", -1),
            ("8", "xyz.4", 1),
            ("xyz.4", "2", -1),
            ("2", "xyz.4", 1),
            ("5.5p2", "5.6p1", -1),
            ("5.6p1", "5.5p2", 1),
            ("5.6p1", "6.5p1", -1),
            ("6.5p1", "5.6p1", 1),
            ("6.0.rc1", "6.0", 1),
            ("6.0", "6.0.rc1", -1),
            ("10b2", "10a1", 1),
            ("10a2", "10b2", -1),
            ("1.0aa", "1.0aa", 0),
            ("1.0a", "1.0aa", -1),
            ("1.0aa", "1.0a", 1),
            ("10.0001", "10.0001", 0),
            ("10.0001", "10.1", 0),
            ("10.1", "10.0001", 0),
            ("10.0001", "10.0039", -1),
            ("10.0039", "10.0001", 1),
            ("4.999.9", "5.0", -1),
            ("5.0", "4.999.9", 1),
            ("20101121", "20101121", 0),
            ("20101121", "20101122", -1),
            ("20101122", "20101121", 1),
            ("2_0", "2_0", 0),
            ("2.0", "2_0", 0),
            ("2_0", "2.0", 0),
            ("a", "a", 0),
            ("a+", "a+", 0),
            ("a+", "a_", 0),
            ("a_", "a+", 0),
            ("+a", "+a", 0),
            ("+a", "_a", 0),
            ("_a", "+a", 0),
            ("+_", "+_", 0),
            ("_+", "+_", 0),
            ("_+", "_+", 0),
            ("+", "_", 0),
            ("_", "+", 0),
            ("1.0~rc1", "1.0~rc1", 0),
            ("1.0~rc1", "1.0", -1),
            ("1.0", "1.0~rc1", 1),
            ("1.0~rc1", "1.0~rc2", -1),
            ("1.0~rc2", "1.0~rc1", 1),
            ("1.0~rc1~git123", "1.0~rc1~git123", 0),
            ("1.0~rc1~git123", "1.0~rc1", -1),
            ("1.0~rc1", "1.0~rc1~git123", 1),
            ("1.0^", "1.0^", 0),
            ("1.0^", "1.0", 1),
            ("1.0", "1.0^", -1),
            ("1.0^git1", "1.0^git1", 0),
            ("1.0^git1", "1.0", 1),
            ("1.0", "1.0^git1", -1),
            ("1.0^git1", "1.0^git2", -1),
            ("1.0^git2", "1.0^git1", 1),
            ("1.0^git1", "1.01", -1),
            ("1.01", "1.0^git1", 1),
            ("1.0^20160101", "1.0^20160101", 0),
            ("1.0^20160101", "1.0.1", -1),
            ("1.0.1", "1.0^20160101", 1),
            ("1.0^20160101^git1", "1.0^20160101^git1", 0),
            ("1.0^20160102", "1.0^20160101^git1", 1),
            ("1.0^20160101^git1", "1.0^20160102", -1),
            ("1.0~rc1^git1", "1.0~rc1^git1", 0),
            ("1.0~rc1^git1", "1.0~rc1", 1),
            ("1.0~rc1", "1.0~rc1^git1", -1),
            ("1.0^git1~pre", "1.0^git1~pre", 0),
            ("1.0^git1", "1.0^git1~pre", 1),
            ("1.0^git1~pre", "1.0^git1", -1),
        ];
        for (a, b, want) in cases {
            let want = want.cmp(&0);
            assert_eq!(rpmvercmp(a, b), want, "rpmvercmp({a:?}, {b:?})");
        }
    }

    #[test]
    fn evr_comparison_and_formatting() {
        assert_eq!(evr("", "1.0", "1"), "1.0-1");
        assert_eq!(evr("2", "1.0", "1.fc41"), "2:1.0-1.fc41");
        let cases = [
            ("1.0-1", "1.0-2", Ordering::Less),
            ("1:1.0-1", "2.0-1", Ordering::Greater),
            ("0:1.0-1", "1.0-1", Ordering::Equal),
            ("6.1.0-1", "6.2.0-1", Ordering::Less),
            ("1.0-1.fc41", "1.0-1.fc40", Ordering::Greater),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_evr(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn query_output_parses_and_skips_keys() {
        let out = "zsh\t\t5.9\t1\tx86_64\n\
                   gpg-pubkey\t\tcf4dad86\t6554a6f1\t(none)\n\
                   bash\t1\t5.2\t3.fc41\tx86_64\n";
        let packages = parse_query(out).expect("parses");
        let names: Vec<(&str, &str)> = packages
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect();
        assert_eq!(names, [("bash", "1:5.2-3.fc41"), ("zsh", "5.9-1")]);
        assert!(parse_query("bash\t5.2\n").is_err());
    }

    fn p(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            architecture: "noarch".into(),
        }
    }

    #[test]
    fn diff_sorts_changes_into_four_lists() {
        let from = [
            p("base", "1.0-1"),
            p("kernel", "6.1.0-1"),
            p("docs", "1.0-1"),
            p("old", "2.0-1"),
            p("same", "1-1"),
        ];
        let to = [
            p("base", "2.0-1"),
            p("kernel", "6.1.0-1"),
            p("kernel", "6.2.0-1"),
            p("old", "1.0-1"),
            p("hello", "1.0-1"),
            p("same", "0:1-1"),
        ];
        let d = diff(&from, &to);
        assert_eq!(
            d.upgraded,
            [PackageChange {
                name: "base".into(),
                architecture: "noarch".into(),
                from_version: "1.0-1".into(),
                to_version: "2.0-1".into(),
            }]
        );
        assert_eq!(d.downgraded.len(), 1);
        assert_eq!(d.downgraded[0].name, "old");
        assert_eq!(d.added, [p("hello", "1.0-1"), p("kernel", "6.2.0-1")]);
        assert_eq!(d.removed, [p("docs", "1.0-1")]);
        let none = diff(&from, &from);
        assert!(none.upgraded.is_empty() && none.added.is_empty() && none.removed.is_empty());
    }
}
