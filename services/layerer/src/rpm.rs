//! `rpm` and `rpmkeys`: queries of package databases and package files, signature checks
//! against the configured keys, and the install and erase commands (which `build` runs inside
//! the sandbox). Every invocation of these tools is here, and so is the reading of what they
//! print into typed errors.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use dnfimage_interfaces::layerer::{LayererError, Package};

use crate::failed;
use crate::packages::{QUERY_FORMAT, parse_query};
use crate::process::{self, Cancel, Output, RunError, version_line};

/// How to run rpm on this host.
#[derive(Debug, Clone)]
pub struct Rpm {
    /// `rpm --version`, when it runs.
    pub version: Option<String>,
    /// Debian's rpm wants `--force-debian` to install without a warning.
    force_debian: bool,
}

/// Turns a failure to run a tool into the service's error.
pub fn run_error(what: &str, e: RunError) -> LayererError {
    match e {
        RunError::Cancelled => LayererError::Cancelled {
            operation: what.to_string(),
        },
        RunError::Io(..) | RunError::TooMuchOutput(..) => failed(what, e),
    }
}

fn command(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut cmd = Command::new("rpm");
    cmd.args(args).env("LC_ALL", "C");
    cmd
}

impl Rpm {
    /// Looks at the host's rpm.
    pub fn detect() -> Self {
        let help = Command::new("rpm")
            .arg("--help")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        Rpm {
            version: version_line("rpm"),
            force_debian: help.contains("--force-debian"),
        }
    }

    fn root_args(root: &Path, dbpath: &str) -> Vec<OsString> {
        vec![
            "--root".into(),
            root.into(),
            "--dbpath".into(),
            format!("/{}", dbpath.trim_start_matches('/')).into(),
        ]
    }

    /// The packages of the database `dbpath` (relative to `root`).
    pub fn installed(
        &self,
        root: &Path,
        dbpath: &str,
        cancel: &Cancel,
    ) -> Result<Vec<Package>, LayererError> {
        let mut cmd = command(&[]);
        cmd.args(Self::root_args(root, dbpath))
            .args(["-qa", "--qf", QUERY_FORMAT]);
        query(cmd, cancel)
    }

    /// The packages of the database in the directory `dbdir`.
    pub fn installed_in(
        &self,
        dbdir: &Path,
        cancel: &Cancel,
    ) -> Result<Vec<Package>, LayererError> {
        let cmd = command(&[&"--dbpath", &dbdir, &"-qa", &"--qf", &QUERY_FORMAT]);
        query(cmd, cancel)
    }

    /// The names among `names` (names, or NAME-VERSION…) that the database `dbpath` under
    /// `root` has no package for.
    pub fn missing(
        &self,
        root: &Path,
        dbpath: &str,
        names: &[String],
        cancel: &Cancel,
    ) -> Result<Vec<String>, LayererError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = command(&[]);
        cmd.args(Self::root_args(root, dbpath))
            .arg("-q")
            .args(names);
        let out = process::output(cmd, cancel).map_err(|e| run_error("Querying rpm", e))?;
        if out.stderr.contains("error:") {
            return Err(failed("Querying the package database", out.text()));
        }
        Ok(not_installed(&out.stdout))
    }

    /// The package in the file `file`, read from its header. `label` names it in errors.
    pub fn read_file(
        &self,
        file: &Path,
        label: &str,
        cancel: &Cancel,
    ) -> Result<Package, LayererError> {
        let cmd = command(&[&"-qp", &"--nosignature", &"--qf", &QUERY_FORMAT, &file]);
        let out =
            process::output(cmd, cancel).map_err(|e| run_error(&format!("Reading {label}"), e))?;
        let corrupt = |message: String| LayererError::CorruptPackage {
            package: label.to_string(),
            message,
        };
        if !out.status.success() {
            return Err(corrupt(out.text()));
        }
        let mut packages = parse_query(&out.stdout).map_err(corrupt)?;
        match (packages.pop(), packages.is_empty()) {
            (Some(p), true) => Ok(p),
            _ => Err(corrupt(format!("Not one package: {}", out.stdout.trim()))),
        }
    }

    /// What the packages in the files `files` take once installed, in bytes.
    pub fn installed_size(&self, files: &[&Path], cancel: &Cancel) -> Result<u64, LayererError> {
        if files.is_empty() {
            return Ok(0);
        }
        let mut cmd = command(&[&"-qp", &"--nosignature", &"--qf", &"%{LONGSIZE}\\n"]);
        cmd.args(files);
        let out = process::output(cmd, cancel).map_err(|e| run_error("Reading packages", e))?;
        if !out.status.success() {
            return Err(failed("Reading the size of packages", out.text()));
        }
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum())
    }

    /// Makes a fresh keyring (an rpm database holding only keys) in `keyring` from the key
    /// files `keys`; returns how many were imported.
    pub fn make_keyring(&self, keyring: &Path, keys: &[&Path]) -> anyhow::Result<usize> {
        use anyhow::Context as _;
        if keyring.exists() {
            std::fs::remove_dir_all(keyring)
                .with_context(|| format!("Removing {}", keyring.display()))?;
        }
        std::fs::create_dir_all(keyring)
            .with_context(|| format!("Creating {}", keyring.display()))?;
        let mut imported = 0;
        for key in keys {
            let out = Command::new("rpmkeys")
                .arg("--dbpath")
                .arg(keyring)
                .arg("--import")
                .arg(key)
                .env("LC_ALL", "C")
                .output()
                .context("Running rpmkeys")?;
            if out.status.success() {
                imported += 1;
            } else {
                tracing::warn!(
                    "{} is not a key rpm can import, ignoring: {}",
                    key.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(imported)
    }

    /// Checks the digests and the signature of `file` against the keys in `keyring`; `label`
    /// names the package in errors.
    pub fn check_signature(
        &self,
        keyring: &Path,
        file: &Path,
        label: &str,
        cancel: &Cancel,
    ) -> Result<(), LayererError> {
        self.check_signatures(keyring, &[(file, label.to_string())], cancel)
    }

    /// [`Rpm::check_signature`] of several files with one `rpmkeys`; the first failure, in the
    /// order given, is the error.
    pub fn check_signatures(
        &self,
        keyring: &Path,
        files: &[(&Path, String)],
        cancel: &Cancel,
    ) -> Result<(), LayererError> {
        if files.is_empty() {
            return Ok(());
        }
        let mut cmd = Command::new("rpmkeys");
        cmd.arg("--dbpath")
            .arg(keyring)
            .arg("-Kv")
            .args(files.iter().map(|(f, _)| f))
            .env("LC_ALL", "C");
        let out = process::output(cmd, cancel)
            .map_err(|e| run_error("Checking package signatures", e))?;
        let paths: Vec<String> = files.iter().map(|(f, _)| f.display().to_string()).collect();
        let sections = split_sections(&out.stdout, &out.stderr, &paths);
        for ((_, label), (text, clean)) in files.iter().zip(sections) {
            classify_signature(label, &text, clean)?;
        }
        if !out.status.success() && out.stderr.contains("error:") {
            return Err(failed("Checking package signatures", out.text()));
        }
        Ok(())
    }

    fn transaction_args(&self, root: &Path, dbpath: &str) -> Vec<OsString> {
        let mut a = Self::root_args(root, dbpath);
        if self.force_debian {
            a.push("--force-debian".into());
        }
        // The signatures were checked against the configured keys already; the image's own
        // keyring is not consulted. Host plugins (SELinux labels, inhibitors) stay out.
        a.extend(["--nosignature", "--noplugins"].map(OsString::from));
        a
    }

    /// Arguments that erase the packages `names` (refusing when something needs them).
    pub fn erase_args(&self, root: &Path, dbpath: &str, names: &[String]) -> Vec<OsString> {
        let mut a = self.transaction_args(root, dbpath);
        a.push("-e".into());
        a.push("-v".into());
        a.extend(names.iter().map(OsString::from));
        a
    }

    /// Arguments that install or upgrade to the package files `files`; `downgrade` allows older
    /// versions than the installed ones (overrides).
    pub fn upgrade_args(
        &self,
        root: &Path,
        dbpath: &str,
        files: &[&Path],
        downgrade: bool,
    ) -> Vec<OsString> {
        let mut a = self.transaction_args(root, dbpath);
        a.extend(["-U", "-v", "--hash"].map(OsString::from));
        if downgrade {
            a.push("--oldpackage".into());
        }
        a.extend(files.iter().map(OsString::from));
        a
    }
}

fn query(cmd: Command, cancel: &Cancel) -> Result<Vec<Package>, LayererError> {
    let out = process::output(cmd, cancel).map_err(|e| run_error("Querying rpm", e))?;
    if !out.status.success() {
        return Err(failed("Querying the package database", out.text()));
    }
    parse_query(&out.stdout).map_err(|e| failed("Reading the package list", e))
}

/// The names `rpm -q` says are not installed ("package X is not installed").
fn not_installed(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("package ")?
                .strip_suffix(" is not installed")
                .map(str::to_string)
        })
        .collect()
}

/// The package name in "NAME-VERSION-RELEASE.ARCH" (or NAME-VERSION-RELEASE).
fn name_of_nevra(nevra: &str) -> &str {
    let mut parts = nevra.rsplitn(3, '-');
    let (_release, _version) = (parts.next(), parts.next());
    parts.next().unwrap_or(nevra)
}

/// Splits `rpmkeys -Kv` output for several files into one text a file (its "PATH:" section of
/// stdout and the stderr lines naming it), with whether stderr said nothing about it.
fn split_sections(stdout: &str, stderr: &str, paths: &[String]) -> Vec<(String, bool)> {
    let mut sections: Vec<(String, bool)> = vec![(String::new(), true); paths.len()];
    let mut current: Option<usize> = None;
    for line in stdout.lines() {
        if !line.starts_with(char::is_whitespace)
            && let Some(i) = paths.iter().position(|p| line == format!("{p}:"))
        {
            current = Some(i);
        }
        if let Some(i) = current {
            sections[i].0.push_str(line);
            sections[i].0.push('\n');
        }
    }
    for line in stderr.lines() {
        // The longest path that matches, should one path be a prefix of another.
        let owner = paths
            .iter()
            .enumerate()
            .filter(|(_, p)| line.contains(&format!("{p}:")))
            .max_by_key(|(_, p)| p.len())
            .map(|(i, _)| i);
        if let Some(i) = owner {
            sections[i].0.push_str(line);
            sections[i].0.push('\n');
            sections[i].1 = false;
        }
    }
    sections
}

/// Reads `rpmkeys -Kv` output: bad digests make a corrupt package; no signature, a key that is
/// not configured (NOKEY) or a bad signature make a rejected one.
pub fn classify_signature(label: &str, text: &str, success: bool) -> Result<(), LayererError> {
    let corrupt = || LayererError::CorruptPackage {
        package: label.to_string(),
        message: text.trim().to_string(),
    };
    let digest_bad = text
        .lines()
        .any(|l| l.contains("digest") && l.contains("BAD"));
    let read_error = text.contains("error:") || text.contains("not an rpm package");
    if digest_bad || (read_error && !text.contains("Signature")) {
        return Err(corrupt());
    }
    let signatures: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("Signature, key ID"))
        .collect();
    let key_id = |line: &str| {
        line.split("key ID ")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .map(str::to_string)
    };
    let rejected = |key: Option<String>, why: &str| LayererError::SignatureRejected {
        package: label.to_string(),
        key_id: key,
        message: format!("{why}: {}", text.trim()),
    };
    if signatures.is_empty() {
        return Err(rejected(None, "The package is not signed"));
    }
    if let Some(line) = signatures.iter().find(|l| !l.ends_with(": OK")) {
        let why = if line.ends_with("NOKEY") {
            "The package is signed with a key that is not configured"
        } else {
            "The package signature is not valid"
        };
        return Err(rejected(key_id(line), why));
    }
    if !success {
        return Err(corrupt());
    }
    Ok(())
}

/// The package and the scriptlet a line of rpm says failed:
/// "warning: %post(pkg-1.0-1.noarch) scriptlet failed, exit status 3",
/// "error: %prein(pkg-1.0-1.noarch) scriptlet failed, exit status 1".
pub fn failed_scriptlet(line: &str) -> Option<(String, String)> {
    let i = line.find(") scriptlet failed")?;
    let open = line[..i].rfind('(')?;
    let pct = line[..open].rfind('%')?;
    Some((line[open + 1..i].to_string(), line[pct..open].to_string()))
}

/// Reads what a failed (or warning) rpm transaction printed into the service's error; `Ok`
/// when it succeeded without a failed scriptlet. A failed scriptlet is fatal even though rpm
/// exits 0 for it. `failed` is the first failed scriptlet seen while rpm ran (the output kept
/// may have left its line out), else the output kept is searched for one.
pub fn classify_transaction(
    out: &Output,
    failed: Option<(String, String)>,
) -> Result<(), LayererError> {
    let text = out.text();
    let failed = failed.or_else(|| text.lines().find_map(|l| failed_scriptlet(l.trim())));
    if let Some((package, scriptlet)) = failed {
        return Err(LayererError::ScriptletFailed {
            package,
            scriptlet,
            message: text.trim().to_string(),
        });
    }
    if out.status.success() {
        return Ok(());
    }
    let conflicts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(" conflicts with file from package "))
        .collect();
    if let Some(first) = conflicts.first() {
        // "file /usr/lib/os-release from install of c-1.0-1.noarch conflicts with file from
        // package dnfimage-base-1.0-1.noarch"
        let path = first
            .strip_prefix("file ")
            .and_then(|r| r.split(" from install of ").next())
            .unwrap_or_default();
        let package = first
            .split(" from install of ")
            .nth(1)
            .and_then(|r| r.split(" conflicts with ").next())
            .unwrap_or_default();
        let owner = first
            .split(" conflicts with file from package ")
            .nth(1)
            .unwrap_or_default();
        return Err(LayererError::FileConflict {
            path: path.to_string(),
            package: package.to_string(),
            owner: owner.to_string(),
            message: conflicts.join("\n"),
        });
    }
    // "error: Failed dependencies:" then "\tX is needed by (installed) Y"
    let problems: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(" is needed by ") || l.contains(" conflicts with "))
        .collect();
    if !problems.is_empty() {
        let mut packages: Vec<String> = Vec::new();
        for p in &problems {
            let (what, by) = p
                .split_once(" is needed by ")
                .or_else(|| p.split_once(" conflicts with "))
                .unwrap_or((p, ""));
            let by = by.trim_start_matches("(installed) ");
            for name in [
                what.split_whitespace().next().unwrap_or_default(),
                name_of_nevra(by),
            ] {
                if !name.is_empty() && !packages.iter().any(|n| n == name) {
                    packages.push(name.to_string());
                }
            }
        }
        return Err(LayererError::DependencyProblem {
            packages,
            problems: problems.iter().map(|p| p.to_string()).collect(),
        });
    }
    // "error: package foo is not installed"
    let missing: Vec<String> = text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("error: package ")?
                .strip_suffix(" is not installed")
                .map(str::to_string)
        })
        .collect();
    if !missing.is_empty() {
        return Err(LayererError::PackageNotFound {
            packages: missing,
            message: text.trim().to_string(),
        });
    }
    let corrupt_markers = [
        "unpacking of archive failed",
        "is not an RPM package",
        "Digest mismatch",
        "BAD",
        "read failed",
    ];
    if corrupt_markers.iter().any(|m| text.contains(m)) {
        let package = text
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("error: ")?
                    .split(':')
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_default();
        return Err(LayererError::CorruptPackage {
            package,
            message: text.trim().to_string(),
        });
    }
    Err(LayererError::Failed {
        message: format!("rpm failed ({}): {}", out.status, text.trim()),
    })
}

/// The package an `rpm -U -v --hash` progress line is about ("   1:name-1.0-1   ####…").
pub fn installed_line(line: &str) -> Option<String> {
    let line = line.trim();
    let (name, hashes) = line.split_once(char::is_whitespace)?;
    let hashes = hashes.trim();
    if hashes.is_empty() || !hashes.starts_with('#') {
        return None;
    }
    let name = name.split_once(':').map_or(name, |(_, n)| n);
    (!name.is_empty() && !name.ends_with("...")).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    fn out(code: i32, stdout: &str, stderr: &str) -> Output {
        Output {
            status: ExitStatus::from_raw(code << 8),
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn transactions_map_to_typed_errors() {
        let conflict = out(
            1,
            "Verifying...\nPreparing...\n",
            "\tfile /usr/lib/os-release from install of dnfimage-conflict-1.0-1.noarch conflicts \
             with file from package dnfimage-base-1.0-1.noarch\n",
        );
        match classify_transaction(&conflict, None) {
            Err(LayererError::FileConflict {
                path,
                package,
                owner,
                ..
            }) => {
                assert_eq!(path, "/usr/lib/os-release");
                assert_eq!(package, "dnfimage-conflict-1.0-1.noarch");
                assert_eq!(owner, "dnfimage-base-1.0-1.noarch");
            }
            other => panic!("{other:?}"),
        }

        // rpm exits 0 when %post fails.
        let scriptlet = out(
            0,
            "Updating / installing...\nbadpost-1.0-1   ####\n",
            "oops\nwarning: %post(dnfimage-badpost-1.0-1.noarch) scriptlet failed, exit status 3\n",
        );
        match classify_transaction(&scriptlet, None) {
            Err(LayererError::ScriptletFailed {
                package,
                scriptlet,
                message,
            }) => {
                assert_eq!(package, "dnfimage-badpost-1.0-1.noarch");
                assert_eq!(scriptlet, "%post");
                assert!(message.contains("oops") && message.contains("exit status 3"));
            }
            other => panic!("{other:?}"),
        }
        // A failure seen while rpm ran counts even when the output kept lost its line.
        let kept = out(0, "Updating / installing...\n[… 9 bytes omitted …]\n", "");
        assert!(classify_transaction(&kept, None).is_ok());
        let seen =
            failed_scriptlet("xxwarning: %pretrans(a-1-1.noarch) scriptlet failed, exit status 1");
        assert_eq!(
            seen,
            Some(("a-1-1.noarch".to_string(), "%pretrans".to_string()))
        );
        match classify_transaction(&kept, seen) {
            Err(LayererError::ScriptletFailed {
                package, message, ..
            }) => {
                assert_eq!(package, "a-1-1.noarch");
                assert!(message.contains("bytes omitted"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        for line in [
            "",
            "scriptlet failed",
            ") scriptlet failed",
            "%post) scriptlet failed",
            "(pkg) scriptlet failed",
            "é(%é) scriptlet failed",
        ] {
            assert_eq!(failed_scriptlet(line), None, "{line}");
        }

        let deps = out(
            1,
            "",
            "error: Failed dependencies:\n\tdnfimage-busybox is needed by (installed) \
             dnfimage-base-1.0-1.noarch\n",
        );
        match classify_transaction(&deps, None) {
            Err(LayererError::DependencyProblem { packages, problems }) => {
                assert_eq!(packages, ["dnfimage-busybox", "dnfimage-base"]);
                assert_eq!(
                    problems,
                    ["dnfimage-busybox is needed by (installed) dnfimage-base-1.0-1.noarch"]
                );
            }
            other => panic!("{other:?}"),
        }

        let missing = out(1, "", "error: package nosuch is not installed\n");
        assert!(matches!(
            classify_transaction(&missing, None),
            Err(LayererError::PackageNotFound { packages, .. }) if packages == ["nosuch"]
        ));
        assert!(matches!(
            classify_transaction(&out(1, "", "something else\n"), None),
            Err(LayererError::Failed { .. })
        ));
        assert!(classify_transaction(&out(0, "Preparing...\n", ""), None).is_ok());
    }

    #[test]
    fn signature_checks_map_to_typed_errors() {
        let ok = "x.rpm:\n    Header V4 RSA/SHA512 Signature, key ID cf4dad86: OK\n    \
                  Header SHA256 digest: OK\n    Payload SHA256 digest: OK\n";
        assert!(classify_signature("x", ok, true).is_ok());
        let unsigned = "x.rpm:\n    Header SHA256 digest: OK\n    Payload SHA256 digest: OK\n";
        assert!(matches!(
            classify_signature("x", unsigned, true),
            Err(LayererError::SignatureRejected { key_id: None, .. })
        ));
        let nokey = "x.rpm:\n    Header V4 RSA/SHA512 Signature, key ID cf4dad86: NOKEY\n    \
                     Header SHA256 digest: OK\n";
        assert!(matches!(
            classify_signature("x", nokey, false),
            Err(LayererError::SignatureRejected { key_id: Some(k), .. }) if k == "cf4dad86"
        ));
        let bad = "x.rpm:\n    Header V4 RSA/SHA512 Signature, key ID cf4dad86: BAD\n    \
                   Header SHA256 digest: BAD (Expected 1 != 2)\n";
        assert!(matches!(
            classify_signature("x", bad, false),
            Err(LayererError::CorruptPackage { .. })
        ));
        let truncated = "x.rpm:\nerror: x.rpm: signature hdr blob(4388): BAD, read returned 0";
        assert!(matches!(
            classify_signature("x", truncated, false),
            Err(LayererError::CorruptPackage { .. })
        ));
    }

    #[test]
    fn several_files_checked_at_once() {
        let stdout = "/p/a.rpm:\n    Header V4 RSA/SHA512 Signature, key ID cf4dad86: OK\n    \
                      Header SHA256 digest: OK\n/p/b.rpm:\n/p/c.rpm:\n    Header SHA256 digest: OK\n";
        let stderr = "error: /p/b.rpm: signature hdr blob(4388): BAD, read returned 0\n";
        let paths: Vec<String> = ["/p/a.rpm", "/p/b.rpm", "/p/c.rpm"]
            .map(String::from)
            .to_vec();
        let sections = split_sections(stdout, stderr, &paths);
        assert!(classify_signature("a", &sections[0].0, sections[0].1).is_ok());
        assert!(matches!(
            classify_signature("b", &sections[1].0, sections[1].1),
            Err(LayererError::CorruptPackage { .. })
        ));
        assert!(matches!(
            classify_signature("c", &sections[2].0, sections[2].1),
            Err(LayererError::SignatureRejected { key_id: None, .. })
        ));
    }

    #[test]
    fn progress_lines_name_packages() {
        let cases = [
            (
                "dnfimage-libhello-1.0-1               ########################################",
                Some("dnfimage-libhello-1.0-1"),
            ),
            ("   1:bash-5.2-1     ######### [ 50%]", Some("bash-5.2-1")),
            (
                "Preparing...                          ########################################",
                None,
            ),
            ("Updating / installing...", None),
        ];
        for (line, want) in cases {
            assert_eq!(installed_line(line).as_deref(), want, "{line}");
        }
        assert_eq!(name_of_nevra("dnfimage-base-1.0-1.noarch"), "dnfimage-base");
        assert_eq!(
            not_installed(
                "dnfimage-base-1-1.noarch\npackage nosuch is not installed\n\
                 kernel-6.1-1.x86_64\nkernel-6.2-1.x86_64\npackage other is not installed\n"
            ),
            ["nosuch", "other"]
        );
    }
}
