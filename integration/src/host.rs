//! A scratch host for end-to-end tests through `dnf-image`: a sysroot made with `ostree admin`, a
//! registry where `dnfimage/os:latest` moves between fixture images, and the services.

use std::ffi::OsStr;
use std::process::Command;

use anyhow::{Context, Result};
use dnfimage_interfaces::{deployer, importer, layerer};
use dnfimage_testimage::{Fixtures, Registry, tags};
use serde_json::Value;

use crate::rpm_support::Repositories;
use crate::sysroot::TestSysroot;
use crate::{FetcherOptions, Scratch, ServiceProcess, run_ok};

/// A scratch host: a sysroot, a registry following `dnfimage/os:latest`, the three services.
pub struct Host {
    /// Sockets, state, logs.
    pub scratch: Scratch,
    /// The host's sysroot.
    pub sysroot: TestSysroot,
    /// The registry.
    pub registry: Registry,
    /// fetcher, importer, deployer (and layerer), in that order.
    pub services: Vec<ServiceProcess>,
    /// `docker://…/dnfimage/os:latest`.
    pub latest: String,
    /// The package repositories, when the host layers packages.
    pub repos: Option<Repositories>,
    /// The fetcher's `--authfile`, when the registry requires credentials.
    pub authfile: Option<std::path::PathBuf>,
    /// The fetcher's `--policy` and `--registries-d` (default: the machine's), taken by the
    /// next [`Host::start_services`].
    pub signature_policy: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Host {
    /// A host following `dnfimage/os:latest` (v1 for now), without the layerer.
    pub fn new() -> Result<Self> {
        Self::build(false, None)
    }

    /// A host whose registry requires `user` and `password` (htpasswd auth); the fetcher
    /// has no credentials until [`Host::log_in`] gives them.
    pub fn with_registry_auth(user: &str, password: &str) -> Result<Self> {
        Self::build(false, Some((user, password)))
    }

    /// Writes the fetcher's auth file, as `skopeo login --authfile` does (checking them with
    /// the registry).
    pub fn log_in(&self, user: &str, password: &str) -> Result<()> {
        let authfile = self
            .authfile
            .as_ref()
            .context("The registry requires no login")?;
        run_ok(
            Command::new("skopeo")
                .arg("login")
                .arg("--authfile")
                .arg(authfile)
                .args([
                    "--tls-verify=false",
                    "--username",
                    user,
                    "--password",
                    password,
                ])
                .arg(self.registry.addr()),
        )?;
        Ok(())
    }

    /// The same with the layerer and the signed test package repository.
    pub fn with_layerer() -> Result<Self> {
        Self::build(true, None)
    }

    fn build(layering: bool, credentials: Option<(&str, &str)>) -> Result<Self> {
        let scratch = Scratch::new()?;
        let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
        let workdir = scratch.path().join("registry");
        let registry = match credentials {
            Some((user, password)) => Registry::start_with_auth(&workdir, user, password)?,
            None => Registry::start(&workdir)?,
        };
        let authfile = credentials.map(|_| scratch.path().join("auth.json"));
        let latest = Fixtures::shared()?.push_as(&registry, tags::BASE_V1, "dnfimage/os:latest")?;
        let repos = if layering {
            Some(Repositories::start(scratch.path())?)
        } else {
            None
        };
        let mut host = Self {
            scratch,
            sysroot,
            registry,
            services: Vec::new(),
            latest,
            repos,
            authfile,
            signature_policy: None,
        };
        host.start_services()?;
        Ok(host)
    }

    /// (Re)starts the services.
    pub fn start_services(&mut self) -> Result<()> {
        let conf = self.scratch.registries_conf(&self.registry.addr())?;
        self.services.clear();
        self.services = image_services(
            &self.scratch,
            &self.sysroot,
            &FetcherOptions {
                registries_conf: Some(conf),
                authfile: self.authfile.clone(),
                policy: self.signature_policy.as_ref().map(|p| p.0.clone()),
                registries_d: self.signature_policy.as_ref().map(|p| p.1.clone()),
                ..Default::default()
            },
        )?;
        let sysroot = self.sysroot.path().as_os_str().to_owned();
        if let Some(repos) = &self.repos {
            let rpms = dnfimage_testimage::rpms::TestRpms::shared()?;
            let state = self.scratch.state_dir();
            self.services.push(ServiceProcess::start(
                &self.scratch,
                "layerer",
                layerer::INTERFACE,
                &[
                    OsStr::new("--sysroot"),
                    &sysroot,
                    OsStr::new("--state-dir"),
                    state.as_os_str(),
                    OsStr::new("--repos-dir"),
                    repos.repos_dir.as_os_str(),
                    OsStr::new("--gpg-key-dir"),
                    rpms.key_dir.as_os_str(),
                ],
            )?);
        }
        Ok(())
    }

    /// Moves `dnfimage/os:latest` to a fixture tag.
    pub fn publish(&self, tag: &str) -> Result<()> {
        Fixtures::shared()?.push_as(&self.registry, tag, "dnfimage/os:latest")?;
        Ok(())
    }

    pub fn cli(&self) -> Command {
        let mut cmd = self.scratch.cli();
        cmd.arg("--sysroot").arg(self.sysroot.path());
        cmd
    }

    pub fn ok(&self, args: &[&str]) -> Result<String> {
        run_ok(self.cli().args(args))
    }

    pub fn status(&self) -> Result<Value> {
        let out = self.ok(&["status", "--json"])?;
        let doc: Value = serde_json::from_str(&out)?;
        check_schema(&out)?;
        Ok(doc)
    }

    pub fn deployments(&self) -> Result<Vec<Value>> {
        Ok(self.status()?["deployments"]
            .as_array()
            .context("deployments")?
            .clone())
    }

    /// The text of the file at `path` inside deployment `index`'s root.
    pub fn deployed_file(&self, index: usize, path: &str) -> Result<String> {
        let root = self.deployment_dir(&self.deployments()?[index])?;
        std::fs::read_to_string(root.join(path.trim_start_matches('/')))
            .with_context(|| format!("Reading {path} in {}", root.display()))
    }

    /// The origin file of deployment `d` (as `status --json` shows it).
    pub fn origin_of(&self, d: &Value) -> Result<String> {
        let mut path = self.deployment_dir(d)?.into_os_string();
        path.push(".origin");
        let path = std::path::PathBuf::from(path);
        std::fs::read_to_string(&path).with_context(|| format!("Reading {}", path.display()))
    }

    /// The directory of deployment `d`: `ostree/deploy/STATEROOT/deploy/COMMIT.SERIAL`.
    fn deployment_dir(&self, d: &Value) -> Result<std::path::PathBuf> {
        Ok(self.sysroot.path().join(format!(
            "ostree/deploy/{}/deploy/{}.{}",
            d["stateroot"].as_str().context("stateroot")?,
            d["commit"].as_str().context("commit")?,
            d["serial"]
        )))
    }
}

/// The fetcher (with `fetcher`'s options), importer and deployer of a scratch host on `sysroot`,
/// in that order.
pub fn image_services(
    scratch: &Scratch,
    sysroot: &TestSysroot,
    fetcher: &FetcherOptions,
) -> Result<Vec<ServiceProcess>> {
    let mut services = vec![ServiceProcess::fetcher(scratch, fetcher)?];
    let sysroot = sysroot.path().as_os_str().to_owned();
    for (name, interface) in [
        ("importer", importer::INTERFACE),
        ("deployer", deployer::INTERFACE),
    ] {
        services.push(ServiceProcess::start(
            scratch,
            name,
            interface,
            &[OsStr::new("--sysroot"), &sysroot],
        )?);
    }
    Ok(services)
}

/// Validates `status --json` output against the committed JSON Schema (Python's jsonschema).
pub fn check_schema(doc: &str) -> Result<()> {
    let schema = crate::repo_root().join("cli/schema/status.schema.json");
    let script = "import json,sys,jsonschema\n\
                  jsonschema.validate(json.loads(sys.stdin.read()), json.load(open(sys.argv[1])))";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(&schema)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, doc.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "status --json does not match cli/schema/status.schema.json:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
