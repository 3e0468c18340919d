//! Client-side layering: install, uninstall, override, reset. The layerer builds a commit on
//! the image commit (carrying the request the current deployment has), the deployer deploys it.

use anyhow::{Context, Result};
use clap::Subcommand;
use dnfimage_interfaces::deployer::{Deployment, StatusReply};
use dnfimage_interfaces::layerer::{self, BuildResult, LayererProxy, LocalPackage, PackageChanges};

use crate::errors::service_error;
use crate::host::{current, deploy, status_of};
use crate::{Cli, Output, connect, progress};

/// `dnf-image override …`.
#[derive(Debug, Subcommand)]
pub enum OverrideCommand {
    /// Replace image packages with these local RPM files (e.g. another kernel).
    Replace {
        /// Paths of .rpm files.
        #[arg(required = true)]
        rpms: Vec<std::path::PathBuf>,
    },
    /// Remove packages of the image on this machine.
    Remove {
        /// Package names.
        #[arg(required = true)]
        packages: Vec<String>,
    },
    /// Undo overrides of these packages (or of all with --all).
    Reset {
        /// Package names.
        packages: Vec<String>,
        /// Undo every override.
        #[arg(long, conflicts_with = "packages")]
        all: bool,
    },
}

/// What to change in the layering request.
#[derive(Debug, Default, Clone)]
pub struct Change {
    pub install: Vec<String>,
    pub uninstall: Vec<String>,
    pub override_remove: Vec<String>,
    /// Local RPM files: opened here and passed to the layerer as descriptors.
    pub override_replace: Vec<std::path::PathBuf>,
    pub override_reset: Vec<String>,
    pub repositories: Vec<String>,
}

/// Whether a deployment carries packages or overrides of this machine.
pub(crate) fn has_layering(d: &Deployment) -> bool {
    let l = &d.layering;
    !(l.packages.is_empty() && l.override_remove.is_empty() && l.override_replace.is_empty())
}

/// Builds a layered commit on `base` carrying `request_from`'s request changed by `change`.
pub(crate) async fn build(
    cli: &Cli,
    out: &Output,
    base: &str,
    request_from: Option<&str>,
    change: &Change,
) -> Result<BuildResult> {
    let opt = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
    let (install, uninstall) = (opt(&change.install), opt(&change.uninstall));
    let remove = opt(&change.override_remove);
    let (reset, repos) = (opt(&change.override_reset), opt(&change.repositories));
    let (files, fds) = open_local_packages(&change.override_replace)?;
    let files = (!files.is_empty()).then_some(files);
    let mut conn = connect(cli, layerer::INTERFACE).await?;
    let call = progress::Call {
        interface: layerer::INTERFACE,
        doing: "building the layered commit",
    };
    let stream = conn
        .build(
            base,
            request_from,
            install.as_deref(),
            uninstall.as_deref(),
            remove.as_deref(),
            None,
            files.as_deref(),
            reset.as_deref(),
            repos.as_deref(),
            fds,
        )
        .await
        .map_err(|e| progress::call_failed(call, "Calling Build", false, e))?;
    progress::drive(call, stream, out.progress("Layering"), || {
        progress::cancel(cli, layerer::INTERFACE)
    })
    .await
}

/// Opens the local packages `paths` for the layerer, which reads them through the descriptors
/// passed with the call (it may not see the paths: a home directory, under the units'
/// sandboxing); each is named by its absolute path in messages.
fn open_local_packages(
    paths: &[std::path::PathBuf],
) -> Result<(Vec<LocalPackage>, Vec<std::os::fd::OwnedFd>)> {
    let mut files = Vec::with_capacity(paths.len());
    let mut fds = Vec::with_capacity(paths.len());
    for (i, p) in paths.iter().enumerate() {
        let name = std::path::absolute(p)
            .with_context(|| format!("Resolving {}", p.display()))?
            .display()
            .to_string();
        let file = std::fs::File::open(p).with_context(|| format!("Opening {}", p.display()))?;
        files.push(LocalPackage {
            fd: u32::try_from(i).context("Too many packages")?,
            name,
        });
        fds.push(file.into());
    }
    Ok((files, fds))
}

/// Changes this machine's layering and deploys the result.
pub(crate) async fn apply(cli: &Cli, out: &Output, change: Change) -> Result<u8> {
    let (_, status) = status_of(cli).await?;
    apply_on(cli, out, &status, change).await
}

/// [`apply`] as a change prepared on `status`: the deploy is refused if the deployments moved
/// since it was read.
async fn apply_on(cli: &Cli, out: &Output, status: &StatusReply, change: Change) -> Result<u8> {
    let from =
        current(status).context("Nothing is deployed yet: `dnf-image rebase IMAGE` first")?;
    let image = from
        .image
        .clone()
        .context("The deployment does not follow an image: `dnf-image rebase IMAGE` first")?;
    let base = from.base_commit.as_deref().unwrap_or(&from.commit);
    let built = build(cli, out, base, Some(&from.commit), &change).await?;
    out.package_changes(&built.changes)?;
    if built.commit == from.commit {
        out.note("Nothing to do: the deployment already has that.");
        return Ok(0);
    }
    let trust = crate::host::trust_of(from);
    let deployed = deploy(cli, out, status, &built.commit, &image, None, &trust).await?;
    out.deployed(status, &deployed)?;
    Ok(0)
}

/// `override …`.
pub(crate) async fn override_command(cli: &Cli, out: &Output, cmd: &OverrideCommand) -> Result<u8> {
    let change = match cmd {
        OverrideCommand::Replace { rpms } => Change {
            override_replace: rpms.clone(),
            ..Default::default()
        },
        OverrideCommand::Remove { packages } => Change {
            override_remove: packages.clone(),
            ..Default::default()
        },
        OverrideCommand::Reset { all: true, .. } => {
            // The overrides to reset and the change are read from one status, so that the
            // deploy is refused if other overrides were made meanwhile.
            let (_, status) = status_of(cli).await?;
            let from = current(&status).context("Nothing is deployed yet")?;
            let l = &from.layering;
            let packages: Vec<String> = l
                .override_remove
                .iter()
                .cloned()
                .chain(l.override_replace.iter().map(|p| p.name.clone()))
                .collect();
            anyhow::ensure!(!packages.is_empty(), "No overrides to reset");
            let change = Change {
                override_reset: packages,
                ..Default::default()
            };
            return apply_on(cli, out, &status, change).await;
        }
        OverrideCommand::Reset { packages, .. } => {
            anyhow::ensure!(!packages.is_empty(), "No overrides to reset");
            Change {
                override_reset: packages.clone(),
                ..Default::default()
            }
        }
    };
    apply(cli, out, change).await
}

/// `reset`: deploy the image commit itself.
pub(crate) async fn reset(cli: &Cli, out: &Output) -> Result<u8> {
    let (_, status) = status_of(cli).await?;
    let from = current(&status).context("Nothing is deployed yet")?;
    let Some(base) = from.base_commit.clone() else {
        out.note("Nothing to reset: the deployment is the image as built.");
        return Ok(0);
    };
    let image = from
        .image
        .clone()
        .context("The deployment does not follow an image")?;
    let trust = crate::host::trust_of(from);
    let deployed = deploy(cli, out, &status, &base, &image, None, &trust).await?;
    out.deployed(&status, &deployed)?;
    Ok(0)
}

/// The package changes between two commits.
pub(crate) async fn package_diff(cli: &Cli, from: &str, to: &str) -> Result<PackageChanges> {
    let mut conn = connect(cli, layerer::INTERFACE).await?;
    conn.package_diff(from, to)
        .await
        .context("Calling PackageDiff")?
        .map_err(service_error)
}
