//! dnf, used only to resolve a request against an image's package database and download the
//! packages: never to install (`--downloadonly`), never with its own signature checks (the
//! layerer checks each package against the configured keys, so no key lands in the image), and
//! never on the image itself (its `--installroot` is a throwaway root holding a copy of the
//! image's rpm database). Every dnf invocation is here, for dnf4 (Debian, tested) and dnf5
//! (Fedora 41 and later) argument forms, and so is the reading of what dnf prints.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use dnfimage_interfaces::layerer::LayererError;

use crate::process::{self, Cancel, Output, Stream, version_line};
use crate::rpm::run_error;

/// Which dnf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// dnf 4 (Python).
    Dnf4,
    /// dnf 5 (C++).
    Dnf5,
}

/// The host's dnf.
#[derive(Debug, Clone)]
pub struct Dnf {
    /// dnf4 or dnf5.
    pub flavor: Flavor,
    /// What `dnf --version` printed first, when it runs.
    pub version: Option<String>,
}

/// The flavor from the first line of `dnf --version`: "4.14.0", or "dnf5 version 5.2.6.2".
pub fn flavor_of(version_line: &str) -> Flavor {
    let v = version_line.trim();
    if v.starts_with("dnf5") || v.starts_with('5') {
        Flavor::Dnf5
    } else {
        Flavor::Dnf4
    }
}

/// One download to make.
#[derive(Debug, Clone)]
pub struct Download<'a> {
    /// The throwaway root whose rpm database dnf resolves against.
    pub installroot: &'a Path,
    /// The dnf configuration file.
    pub config: &'a Path,
    /// The directory of `.repo` files.
    pub reposdir: &'a Path,
    /// `$releasever` (the image's VERSION_ID), if known.
    pub releasever: Option<&'a str>,
    /// Only these repositories; all enabled ones when `None`.
    pub repositories: Option<&'a [String]>,
    /// Where the packages go.
    pub destdir: &'a Path,
    /// What to install, as the user wrote it.
    pub packages: &'a [String],
    /// `HOME` for dnf: holds the `.rpmmacros` naming the image's rpm database path.
    pub home: &'a Path,
}

/// What dnf reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The number of packages the transaction downloads.
    Total(u64),
    /// A package file finished downloading.
    Downloaded(String),
}

impl Dnf {
    /// Looks at the host's dnf.
    pub fn detect() -> Self {
        let version = version_line("dnf");
        Dnf {
            flavor: version.as_deref().map_or(Flavor::Dnf4, flavor_of),
            version,
        }
    }

    /// The arguments of a resolve-and-download run.
    pub fn download_args(&self, d: &Download<'_>) -> Vec<OsString> {
        let mut a: Vec<String> = vec![
            "-y".into(),
            format!("--installroot={}", d.installroot.display()),
            format!("--config={}", d.config.display()),
            format!("--setopt=reposdir={}", d.reposdir.display()),
            "--setopt=skip_if_unavailable=False".into(),
        ];
        if let Some(v) = d.releasever {
            a.push(format!("--releasever={v}"));
        }
        match self.flavor {
            Flavor::Dnf4 => {
                a.extend(["--nogpgcheck".into(), "--disableplugin=*".into()]);
                if let Some(repos) = d.repositories {
                    a.push("--disablerepo=*".into());
                    a.extend(repos.iter().map(|r| format!("--enablerepo={r}")));
                }
                a.extend([
                    "--downloadonly".into(),
                    format!("--downloaddir={}", d.destdir.display()),
                    "install".into(),
                ]);
            }
            Flavor::Dnf5 => {
                a.extend(["--no-gpgchecks".into(), "--no-plugins".into()]);
                if let Some(repos) = d.repositories {
                    a.extend(repos.iter().map(|r| format!("--repo={r}")));
                }
                a.extend([
                    format!("--setopt=destdir={}", d.destdir.display()),
                    "install".into(),
                    "--downloadonly".into(),
                ]);
            }
        }
        a.extend(d.packages.iter().cloned());
        a.into_iter().map(OsString::from).collect()
    }

    /// Resolves `d.packages` and downloads what the transaction needs into `d.destdir`,
    /// reporting progress to `on_event`.
    pub fn download(
        &self,
        d: &Download<'_>,
        cancel: &Cancel,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), LayererError> {
        let mut cmd = Command::new("dnf");
        cmd.args(self.download_args(d))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", d.home)
            .env("LC_ALL", "C.UTF-8");
        for var in [
            "http_proxy",
            "https_proxy",
            "ftp_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
        ] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        let mut lines = LineReader::default();
        let out = process::run(cmd, cancel, &mut |stream, line| {
            if stream == Stream::Stdout
                && let Some(e) = lines.read(line)
            {
                on_event(e);
            }
        })
        .map_err(|e| run_error("Resolving packages", e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(classify(&out))
    }
}

/// Reads dnf's stdout line by line.
#[derive(Debug, Default)]
struct LineReader {
    in_summary: bool,
    total: u64,
}

impl LineReader {
    fn read(&mut self, line: &str) -> Option<Event> {
        let trimmed = line.trim();
        if trimmed.starts_with("Transaction Summary") {
            self.in_summary = true;
            return None;
        }
        if self.in_summary {
            // dnf4 "Install  2 Packages"; dnf5 " Installing:  2 packages"
            let words: Vec<&str> = trimmed.split_whitespace().collect();
            if let [verb, n, unit] = words[..]
                && unit.to_ascii_lowercase().starts_with("package")
                && let Ok(n) = n.parse::<u64>()
                && [
                    "Install",
                    "Upgrade",
                    "Downgrade",
                    "Reinstall",
                    "Installing:",
                    "Upgrading:",
                    "Downgrading:",
                    "Reinstalling:",
                ]
                .contains(&verb)
            {
                self.total += n;
                return Some(Event::Total(self.total));
            }
            if trimmed.starts_with("Total") || trimmed.contains("will only download") {
                self.in_summary = false;
            }
            return None;
        }
        // dnf4 "(1/2): name-1.0-1.noarch.rpm   1.1 MB/s | 6.1 kB  00:00", or the same without
        // "(1/2): " for a single package; dnf5 "[1/2] name-1.0-1.noarch   100% | …".
        let rest = match trimmed.strip_prefix('(') {
            Some(r) => r.split_once("): ").map(|(_, rest)| rest)?,
            None => trimmed,
        };
        if let Some(r) = rest.strip_prefix('[') {
            let (counter, rest) = r.split_once(']')?;
            if counter.contains('/') && counter.split('/').all(|n| n.parse::<u64>().is_ok()) {
                let name = rest.split_whitespace().next()?;
                return (!name.is_empty()).then(|| Event::Downloaded(format!("{name}.rpm")));
            }
            return None;
        }
        let first = rest.split_whitespace().next()?;
        first
            .ends_with(".rpm")
            .then(|| Event::Downloaded(first.to_string()))
    }
}

/// Package name → repository id, from the transaction table dnf4 prints.
fn repositories_of(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.starts_with(" Package") && line.contains("Repository") {
            in_table = true;
            continue;
        }
        if in_table && line.starts_with("Transaction Summary") {
            break;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if in_table && line.starts_with(' ') && words.len() >= 5 {
            map.insert(words[0].to_string(), words[3].to_string());
        }
    }
    map
}

/// The id quoted after `marker` in `line` ('id' or "id").
fn quoted_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let rest = rest.trim_start();
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    rest[1..].split(quote).next()
}

/// The package name in "NAME-VERSION-RELEASE.ARCH[.rpm]".
fn package_name(nevra: &str) -> &str {
    let nevra = nevra.trim_end_matches(".rpm");
    let mut parts = nevra.rsplitn(3, '-');
    let (_r, _v) = (parts.next(), parts.next());
    parts.next().unwrap_or(nevra)
}

/// Reads what a failed dnf run printed into the service's error.
pub fn classify(out: &Output) -> LayererError {
    let text = out.text();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();

    // Repository metadata: dnf4 "Failed to download metadata for repo 'id'", "Errors during
    // downloading metadata for repository 'id'"; dnf5 "… for repository "id"".
    for marker in [
        "Failed to download metadata for repo",
        "downloading metadata for repository",
        "Failed to download metadata",
    ] {
        if let Some(line) = lines.iter().find(|l| l.contains(marker)) {
            let repository = quoted_after(line, "repository")
                .or_else(|| quoted_after(line, "repo"))
                .unwrap_or_default();
            return LayererError::RepositoryUnreachable {
                repository: repository.to_string(),
                message: text.trim().to_string(),
            };
        }
    }

    // No such package: dnf4 "Error: Unable to find a match: a b", "No match for argument: a".
    let mut missing: Vec<String> = Vec::new();
    for line in &lines {
        let names = line
            .strip_prefix("Error: Unable to find a match:")
            .or_else(|| line.strip_prefix("No match for argument:"))
            .or_else(|| {
                line.strip_prefix("Failed to resolve the transaction: No match for argument:")
            });
        for name in names.into_iter().flat_map(str::split_whitespace) {
            if !missing.iter().any(|m| m == name) {
                missing.push(name.to_string());
            }
        }
    }
    if !missing.is_empty() {
        return LayererError::PackageNotFound {
            packages: missing,
            message: text.trim().to_string(),
        };
    }

    // Resolution problems: " Problem: conflicting requests\n  - nothing provides X needed by Y".
    let problems: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("- "))
        .chain(lines.iter().filter_map(|l| l.strip_prefix("Problem: ")))
        .filter(|p| *p != "conflicting requests")
        .map(str::to_string)
        .collect();
    if !problems.is_empty() || text.contains("nothing provides") {
        let mut packages: Vec<String> = Vec::new();
        for p in &problems {
            let named = p
                .split(" needed by ")
                .nth(1)
                .or_else(|| p.strip_prefix("package ").and_then(|r| r.split(' ').next()))
                .map(|n| package_name(n.split_whitespace().next().unwrap_or(n)));
            if let Some(name) = named
                && !packages.iter().any(|x| x == name)
            {
                packages.push(name.to_string());
            }
        }
        return LayererError::DependencyProblem { packages, problems };
    }

    // Package downloads: "[MIRROR] x-1.0-1.noarch.rpm: Curl error (7): …", "… Inconsistent
    // server data …", "… checksum doesn't match …".
    let table = repositories_of(&out.stdout);
    let download_errors: Vec<(&str, &str)> = lines
        .iter()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("[MIRROR] ")
                .or_else(|| l.strip_prefix("[FAILED] "))?;
            rest.split_once(": ")
        })
        .collect();
    let corrupt = |reason: &str| {
        let r = reason.to_ascii_lowercase();
        r.contains("checksum") || r.contains("inconsistent server data") || r.contains("size")
    };
    if let Some((file, _)) = download_errors.iter().find(|(_, r)| corrupt(r)) {
        return LayererError::CorruptPackage {
            package: file.trim_end_matches(".rpm").to_string(),
            message: text.trim().to_string(),
        };
    }
    if let Some((file, _)) = download_errors.first() {
        let name = package_name(file);
        return LayererError::RepositoryUnreachable {
            repository: table.get(name).cloned().unwrap_or_default(),
            message: text.trim().to_string(),
        };
    }
    if text.contains("Curl error") || text.contains("Cannot download") {
        return LayererError::RepositoryUnreachable {
            repository: String::new(),
            message: text.trim().to_string(),
        };
    }
    LayererError::Failed {
        message: format!("dnf failed ({}): {}", out.status, text.trim()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::path::PathBuf;
    use std::process::ExitStatus;

    use super::*;

    fn out(stdout: &str, stderr: &str) -> Output {
        Output {
            status: ExitStatus::from_raw(1 << 8),
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn flavors_and_arguments() {
        assert_eq!(flavor_of("4.14.0"), Flavor::Dnf4);
        assert_eq!(flavor_of("dnf5 version 5.2.6.2"), Flavor::Dnf5);
        assert_eq!(flavor_of("5.2.6"), Flavor::Dnf5);
        let p = |s: &str| PathBuf::from(s);
        let (root, conf, repos, dest, home) = (p("/r"), p("/c"), p("/d"), p("/o"), p("/h"));
        let ids = vec!["test".to_string()];
        let pkgs = vec!["vim".to_string()];
        let d = Download {
            installroot: &root,
            config: &conf,
            reposdir: &repos,
            releasever: Some("41"),
            repositories: Some(&ids),
            destdir: &dest,
            packages: &pkgs,
            home: &home,
        };
        let args = |flavor| -> String {
            Dnf {
                flavor,
                version: None,
            }
            .download_args(&d)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
        };
        assert_eq!(
            args(Flavor::Dnf4),
            "-y --installroot=/r --config=/c --setopt=reposdir=/d \
             --setopt=skip_if_unavailable=False --releasever=41 --nogpgcheck --disableplugin=* \
             --disablerepo=* --enablerepo=test --downloadonly --downloaddir=/o install vim"
        );
        assert_eq!(
            args(Flavor::Dnf5),
            "-y --installroot=/r --config=/c --setopt=reposdir=/d \
             --setopt=skip_if_unavailable=False --releasever=41 --no-gpgchecks --no-plugins \
             --repo=test --setopt=destdir=/o install --downloadonly vim"
        );
    }

    #[test]
    fn progress_lines() {
        let stdout = "test   159 kB/s | 1.5 kB     00:00\n\
            Dependencies resolved.\n\
            Transaction Summary\n\
            ================\n\
            Install  2 Packages\n\
            Upgrade  1 Package\n\
            \n\
            Total download size: 12 k\n\
            DNF will only download packages for the transaction.\n\
            Downloading Packages:\n\
            (1/3): dnfimage-hello-1.0-1.noarch.rpm   1.1 MB/s | 6.1 kB     00:00\n\
            (2/3): dnfimage-libhello-1.0-1.noarch.rpm   1.1 MB/s | 6.1 kB     00:00\n\
            single-1.0-1.noarch.rpm     1.1 MB/s | 6.1 kB     00:00\n\
            [1/2] dnf5-pkg-1.0-1.noarch 100% |  1.0 MiB/s |   6.1 KiB |  00m00s\n\
            --------\n\
            Total  606 kB/s | 6.1 kB     00:00\n\
            Complete!\n";
        let mut reader = LineReader::default();
        let events: Vec<Event> = stdout.lines().filter_map(|l| reader.read(l)).collect();
        assert_eq!(
            events,
            [
                Event::Total(2),
                Event::Total(3),
                Event::Downloaded("dnfimage-hello-1.0-1.noarch.rpm".into()),
                Event::Downloaded("dnfimage-libhello-1.0-1.noarch.rpm".into()),
                Event::Downloaded("single-1.0-1.noarch.rpm".into()),
                Event::Downloaded("dnf5-pkg-1.0-1.noarch.rpm".into()),
            ]
        );
    }

    #[test]
    fn failures_map_to_typed_errors() {
        let unreachable = out(
            "test    0.0  B/s |   0  B     00:00\n",
            "Errors during downloading metadata for repository 'testrepo':\n  - Curl error (7): \
             Couldn't connect to server for http://127.0.0.1:1/repodata/repomd.xml\n\
             Error: Failed to download metadata for repo 'testrepo': Cannot download repomd.xml",
        );
        assert!(matches!(
            classify(&unreachable),
            LayererError::RepositoryUnreachable { repository, .. } if repository == "testrepo"
        ));

        let missing = out(
            "No match for argument: nosuch\n",
            "Error: Unable to find a match: nosuch other\n",
        );
        assert!(matches!(
            classify(&missing),
            LayererError::PackageNotFound { packages, .. } if packages == ["nosuch", "other"]
        ));

        let deps = out(
            "(try to add '--skip-broken' to skip uninstallable packages)\n",
            "Error: \n Problem: conflicting requests\n  - nothing provides dnfimage-nonexistent \
             needed by dnfimage-needs-missing-1.0-1.noarch\n",
        );
        match classify(&deps) {
            LayererError::DependencyProblem { packages, problems } => {
                assert_eq!(packages, ["dnfimage-needs-missing"]);
                assert_eq!(
                    problems,
                    ["nothing provides dnfimage-nonexistent needed by \
                      dnfimage-needs-missing-1.0-1.noarch"]
                );
            }
            other => panic!("{other:?}"),
        }

        let table = "================================================================================\n \
            Package           Architecture     Version           Repository           Size\n\
            ================================================================================\n\
            Installing:\n \
            badpost           noarch           1.0-1             testrepo2           6.1 k\n\
            \n\
            Transaction Summary\n";
        let corrupt = out(
            &format!(
                "{table}[MIRROR] badpost-1.0-1.noarch.rpm: Interrupted by header callback: \
                 Inconsistent server data, reported file Content-Length: 2000, repository \
                 metadata states file length: 6203\n\
                 [FAILED] badpost-1.0-1.noarch.rpm: No more mirrors to try\n"
            ),
            "Error: Error downloading packages:\n  badpost-1.0-1.noarch: Cannot download",
        );
        assert!(matches!(
            classify(&corrupt),
            LayererError::CorruptPackage { package, .. } if package == "badpost-1.0-1.noarch"
        ));
        let gone = out(
            &format!(
                "{table}[MIRROR] badpost-1.0-1.noarch.rpm: Curl error (7): Couldn't connect\n"
            ),
            "Error: Error downloading packages:\n  badpost-1.0-1.noarch: Cannot download",
        );
        assert!(matches!(
            classify(&gone),
            LayererError::RepositoryUnreachable { repository, .. } if repository == "testrepo2"
        ));
        assert!(matches!(
            classify(&out("", "Traceback: boom")),
            LayererError::Failed { .. }
        ));
    }
}
