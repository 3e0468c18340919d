//! What the layerer tests need: the test packages' repository served over HTTP on 127.0.0.1
//! (plus a damaged copy and one whose server is stopped), the `.repo` files naming them, the
//! layerer started on a test sysroot holding the fixture images, `Build` calls over raw JSON,
//! and looks into the repository (commits, refs, files, metadata).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use dnfimage_interfaces::layerer::{BuildProgress, BuildResult, INTERFACE};
use dnfimage_testimage::{Fixtures, RepoServer, TestRpms};
use serde_json::{Value, json};

use crate::deploy_support::{self, Imported};
use crate::sysroot::TestSysroot;
use crate::{Scratch, ServiceProcess, error_name, raw_call, run_ok};

/// The repository id of the test packages.
pub const REPO: &str = "dnfimage-test";
/// The id of a copy whose `dnfimage-libhello` is truncated (disabled unless asked for).
pub const CORRUPT_REPO: &str = "dnfimage-corrupt";
/// The id of a repository whose server is stopped (disabled unless asked for).
pub const GONE_REPO: &str = "dnfimage-gone";

/// Writes a `.repo` file for repository `id` at `url` into `dir`.
pub fn write_repo_file(dir: &Path, id: &str, url: &str, enabled: bool) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{id}.repo"));
    std::fs::write(
        &path,
        format!(
            "[{id}]\nname=dnfimage test packages ({id})\nbaseurl={url}\nenabled={}\n\
             gpgcheck=1\nmetadata_expire=0\n",
            u8::from(enabled)
        ),
    )?;
    Ok(path)
}

/// Copies the directory `from` to `to` (which must not exist).
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to))?;
    Ok(())
}

/// The test repositories: the good one served, a damaged copy served, and one whose server
/// is stopped; and the directory of `.repo` files naming them.
pub struct Repositories {
    /// Serves the test repository.
    pub server: RepoServer,
    /// Serves the damaged copy.
    pub corrupt: RepoServer,
    /// Stopped.
    pub gone: RepoServer,
    /// The `.repo` files.
    pub repos_dir: PathBuf,
}

impl Repositories {
    /// Serves the shared test packages; scratch files under `dir`.
    pub fn start(dir: &Path) -> Result<Self> {
        let rpms = TestRpms::shared()?;
        let server = RepoServer::serve(&rpms.repo_dir)?;
        let damaged = dir.join("corrupt-repo");
        copy_dir(&rpms.repo_dir, &damaged)?;
        let victim = damaged.join(
            rpms.repo_package(dnfimage_testimage::rpms::packages::LIBHELLO)
                .file_name()
                .context("file name")?,
        );
        let len = std::fs::metadata(&victim)?.len();
        std::fs::File::options()
            .write(true)
            .open(&victim)?
            .set_len(len / 2)?;
        let corrupt = RepoServer::serve(&damaged)?;
        let mut gone = RepoServer::serve(&rpms.repo_dir)?;
        gone.stop();
        let repos_dir = dir.join("repos.d");
        write_repo_file(&repos_dir, REPO, &server.url(), true)?;
        write_repo_file(&repos_dir, CORRUPT_REPO, &corrupt.url(), false)?;
        write_repo_file(&repos_dir, GONE_REPO, &gone.url(), false)?;
        Ok(Repositories {
            server,
            corrupt,
            gone,
            repos_dir,
        })
    }
}

/// The outcome of a call: the reply parameters, or the error name (without the interface)
/// and its parameters.
pub type Outcome = std::result::Result<Value, (String, Value)>;

/// A layerer on a test sysroot whose repository holds base v1 (and v2 when asked), with the
/// test repositories. Dropped in field order: service, repositories, sysroot, scratch.
pub struct Layering {
    /// The service.
    pub service: ServiceProcess,
    /// The repositories it uses.
    pub repos: Repositories,
    /// The sysroot.
    pub sysroot: TestSysroot,
    /// Base v1 in the repository.
    pub v1: Imported,
    /// The scratch directory (sockets, state, logs).
    pub scratch: Scratch,
}

impl Layering {
    /// Imports base v1 into a fresh sysroot and starts the layerer on it.
    pub fn start() -> Result<Self> {
        let scratch = Scratch::new()?;
        let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
        let v1 = deploy_support::import(
            &sysroot.repo(),
            &Fixtures::shared()?.oci_ref(dnfimage_testimage::tags::BASE_V1),
        )?;
        let repos = Repositories::start(scratch.path())?;
        let rpms = TestRpms::shared()?;
        let state = scratch.state_dir();
        let args: Vec<&std::ffi::OsStr> = vec![
            "--sysroot".as_ref(),
            sysroot.path().as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--repos-dir".as_ref(),
            repos.repos_dir.as_os_str(),
            "--gpg-key-dir".as_ref(),
            rpms.key_dir.as_os_str(),
        ];
        let service = ServiceProcess::start(&scratch, "layerer", INTERFACE, &args)?;
        Ok(Layering {
            service,
            repos,
            sysroot,
            v1,
            scratch,
        })
    }

    /// The service socket.
    pub fn socket(&self) -> PathBuf {
        self.scratch.socket(INTERFACE)
    }

    /// The repository.
    pub fn repo(&self) -> PathBuf {
        self.sysroot.repo()
    }

    /// Imports another fixture image (e.g. base v2) into the repository.
    pub fn import(&self, tag: &str) -> Result<Imported> {
        deploy_support::import(&self.repo(), &Fixtures::shared()?.oci_ref(tag))
    }

    /// Calls `method` with `params` (`more` for `Build`); returns the progress records and the
    /// final outcome.
    pub fn call(&self, method: &str, params: Value) -> Result<(Vec<Value>, Outcome)> {
        let mut call = json!({"method": format!("{INTERFACE}.{method}"), "parameters": params});
        if method == "Build" {
            call["more"] = json!(true);
        }
        let mut replies = raw_call(&self.socket(), &call)?;
        let last = replies.pop().context("no reply")?;
        let progress = replies
            .into_iter()
            .map(|r| r["parameters"]["progress"].clone())
            .collect();
        let outcome = match error_name(&last) {
            Some(name) => Err((
                name.trim_start_matches(&format!("{INTERFACE}."))
                    .to_string(),
                last["parameters"].clone(),
            )),
            None => Ok(last["parameters"].clone()),
        };
        Ok((progress, outcome))
    }

    /// `Build` with `params`; the progress records and the result or error.
    pub fn build(&self, params: Value) -> Result<(Vec<BuildProgress>, Outcome)> {
        let (progress, outcome) = self.call("Build", params)?;
        let progress = progress
            .into_iter()
            .map(serde_json::from_value)
            .collect::<std::result::Result<_, _>>()
            .context("Parsing progress records")?;
        Ok((progress, outcome.map(|v| v["result"].clone())))
    }

    /// `Build` that must succeed; checks the repository with `ostree fsck` afterwards.
    pub fn build_ok(&self, params: Value) -> Result<(Vec<BuildProgress>, BuildResult)> {
        let (progress, outcome) = self.build(params.clone())?;
        let result = outcome.map_err(|(name, p)| {
            anyhow::anyhow!(
                "Build {params} failed: {name} {p}\nservice log:\n{}",
                self.service.log_text()
            )
        })?;
        let result: BuildResult = serde_json::from_value(result).context("Parsing the result")?;
        self.sysroot.fsck().context("ostree fsck after a build")?;
        Ok((progress, result))
    }

    /// The commit objects in the repository.
    pub fn commits(&self) -> Result<BTreeSet<String>> {
        commit_objects(&self.repo())
    }

    /// `ostree refs` output, sorted.
    pub fn refs(&self) -> Result<Vec<String>> {
        let out = run_ok(
            Command::new("ostree")
                .arg(format!("--repo={}", self.repo().display()))
                .arg("refs"),
        )?;
        let mut refs: Vec<String> = out.lines().map(str::to_string).collect();
        refs.sort();
        Ok(refs)
    }

    /// What builds leave behind (nothing once they ended): the build directories in the state
    /// directory and the checkouts in the repository's `tmp`.
    pub fn leftovers(&self) -> Result<Vec<PathBuf>> {
        let mut left = Vec::new();
        for dir in [
            self.repo().join("tmp/dnfimage-builds"),
            self.repo().join("tmp"),
        ] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_name()
                        .to_string_lossy()
                        .starts_with("dnfimage-layerer-")
                    {
                        left.push(e.path());
                    }
                }
            }
        }
        Ok(left)
    }

    /// The kept replacement packages.
    pub fn kept_overrides(&self) -> Result<Vec<String>> {
        let dir = self.scratch.state_dir().join("layerer/overrides");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("Listing {}", dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// Every commit object of the repository at `repo`.
pub fn commit_objects(repo: &Path) -> Result<BTreeSet<String>> {
    let mut commits = BTreeSet::new();
    let objects = repo.join("objects");
    for prefix in std::fs::read_dir(&objects)? {
        let prefix = prefix?;
        for obj in std::fs::read_dir(prefix.path())? {
            let name = obj?.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_suffix(".commit") {
                commits.insert(format!("{}{rest}", prefix.file_name().to_string_lossy()));
            }
        }
    }
    Ok(commits)
}

/// The names in directory `path` of commit `commit` (`ostree ls`), sorted.
pub fn ls(repo: &Path, commit: &str, path: &str) -> Result<Vec<String>> {
    let out = run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(["ls", "--nul-filenames-only", commit, path]),
    )?;
    let prefix = format!("{}/", path.trim_end_matches('/'));
    let mut names: Vec<String> = out
        .split('\0')
        .filter(|n| !n.is_empty() && *n != path)
        .map(|n| n.strip_prefix(&prefix).unwrap_or(n).to_string())
        .collect();
    names.sort();
    Ok(names)
}

/// Whether commit `commit` has `path`.
pub fn exists(repo: &Path, commit: &str, path: &str) -> bool {
    Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(["ls", "-d", commit, path])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The metadata value `key` of commit `commit`, as `ostree show --print-metadata-key` prints
/// it (GVariant text), if it has one.
pub fn metadata(repo: &Path, commit: &str, key: &str) -> Option<String> {
    let out = Command::new("ostree")
        .arg(format!("--repo={}", repo.display()))
        .args(["show", &format!("--print-metadata-key={key}"), commit])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The parent of commit `commit`.
pub fn parent(repo: &Path, commit: &str) -> Result<String> {
    Ok(run_ok(
        Command::new("ostree")
            .arg(format!("--repo={}", repo.display()))
            .args(["rev-parse", &format!("{commit}^")]),
    )?
    .trim()
    .to_string())
}
