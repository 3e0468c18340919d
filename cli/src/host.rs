//! Commands on the host: status, rebase, upgrade, rollback, pin, cleanup, kargs. They orchestrate
//! the services: the fetcher downloads, the importer commits, the deployer deploys.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use dnfimage_interfaces::deployer::{self, DeployerProxy, Deployment, ImageTrust, StatusReply};
use dnfimage_interfaces::fetcher::{self, FetcherProxy};
use dnfimage_interfaces::importer::{self, ImportResult, ImporterProxy};
use dnfimage_interfaces::reference::ImageRef;

use crate::errors::{ServiceError, service_error};
use crate::output::{DiskUsage, ProgressView};
use crate::progress::{Call, Stopped, Streamed};
use crate::{Cli, EXIT_UNCHANGED, Output, connect, image, progress};

/// How long the deployer may take to answer `Status` again after a change failed.
const STATUS_AGAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags of `rebase`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebaseOptions<'a> {
    pub stateroot: Option<&'a str>,
    pub concurrency: Option<u64>,
    pub force: bool,
    pub unchanged_exit_77: bool,
    /// Hold the image to the host's signature policy (not `--no-signature-verification`).
    pub verify: bool,
    /// Reboot once the new deployment is staged (`--apply`).
    pub apply: bool,
}

/// Flags of `upgrade`.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeOptions {
    pub check: bool,
    pub download_only: bool,
    pub preview: bool,
    pub from_downloaded: bool,
    pub unchanged_exit_77: bool,
    pub concurrency: Option<u64>,
    /// Reboot once the new deployment is staged (`--apply`).
    pub apply: bool,
}

/// What `upgrade --auto` does, from `[upgrade] policy` in the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Nothing.
    None,
    /// Check and record the available update.
    Check,
    /// Download, import and stage it.
    Stage,
    /// Stage it, then reboot into it inside the maintenance window after taking a reboot slot
    /// from the fleet's coordination backend (see `crate::fleet`).
    Apply,
}

/// Where the configuration lives (`DNFIMAGE_CONFIG` overrides it).
pub const CONFIG_PATH: &str = "/etc/dnfimage/dnfimage.conf";

impl Policy {
    /// Reads the policy; a missing file or key means `check`.
    pub fn load() -> Result<Self> {
        let path = std::env::var("DNFIMAGE_CONFIG").unwrap_or_else(|_| CONFIG_PATH.to_string());
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).with_context(|| format!("Reading {path}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::Check),
            Err(e) => Err(e).with_context(|| format!("Reading {path}")),
        }
    }

    /// Finds `policy = "…"` in the `[upgrade]` table of a TOML text.
    fn parse(text: &str) -> Result<Self> {
        let mut table = String::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                table = name.trim().to_string();
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if table == "upgrade" && key.trim() == "policy" {
                return match value.trim().trim_matches('"') {
                    "none" => Ok(Self::None),
                    "check" => Ok(Self::Check),
                    "stage" => Ok(Self::Stage),
                    "apply" => Ok(Self::Apply),
                    other => anyhow::bail!(
                        "[upgrade] policy is {other:?}; it must be \"none\", \"check\", \"stage\" \
                         or \"apply\""
                    ),
                };
            }
        }
        Ok(Self::Check)
    }

    /// The value as the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Check => "check",
            Self::Stage => "stage",
            Self::Apply => "apply",
        }
    }
}

/// A reference as the services record it: a bare `host/name:tag` is a registry reference.
/// One the shared parser refuses is passed on as given, for the fetcher to refuse with its
/// typed error (which says why, about the text the user typed).
fn normalize(image: &str) -> String {
    ImageRef::parse(image).map_or_else(|_| image.to_string(), |r| r.to_string())
}

/// The deployer's status, checked against `--sysroot`.
pub(crate) async fn status_of(cli: &Cli) -> Result<(dnfimage_interfaces::Connection, StatusReply)> {
    let mut conn = connect(cli, deployer::INTERFACE).await?;
    let status = conn
        .status()
        .await
        .context("Calling Status")?
        .map_err(service_error)?;
    if let Some(wanted) = &cli.sysroot {
        let same = |a: &Path, b: &Path| {
            a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
        };
        anyhow::ensure!(
            same(wanted, Path::new(&status.sysroot)),
            "The deployer at {} manages {}, not {}; start it with --sysroot {} or use its socket directory",
            cli.runtime_dir.display(),
            status.sysroot,
            wanted.display(),
            wanted.display()
        );
    }
    Ok((conn, status))
}

/// How deployment `d`'s image is held to the signature policy: what its origin records, else
/// enforced (the default for an origin that says nothing).
pub(crate) fn trust_of(d: &Deployment) -> ImageTrust {
    d.trust.clone().unwrap_or(ImageTrust {
        enforced: true,
        ..Default::default()
    })
}

/// What a deployment records about an image fetched with `enforced` verification.
fn trust_from(enforced: bool, check: &fetcher::SignatureCheck) -> ImageTrust {
    ImageTrust {
        enforced,
        verified: check.verified,
        requirement: check.requirement.clone(),
        signers: check.signers.clone(),
    }
}

/// The booted deployment, else the one that boots next.
pub(crate) fn booted_or_default(status: &StatusReply) -> Option<&Deployment> {
    status
        .deployments
        .iter()
        .find(|d| d.booted)
        .or_else(|| status.deployments.iter().find(|d| d.default))
        .or_else(|| status.deployments.first())
}

/// The deployment a change starts from: the staged one when a change is already pending (so
/// `install` then `upgrade` before a reboot keeps the package), else the booted one, else the
/// one that boots next.
pub(crate) fn current(status: &StatusReply) -> Option<&Deployment> {
    status
        .deployments
        .iter()
        .find(|d| d.staged)
        .or_else(|| booted_or_default(status))
}

/// What a change prepared on `status` passes as `expectedDeployment`: the deployment it starts
/// from ([`current`], the deployer's rule too), "" when nothing is deployed.
pub(crate) fn expected(status: &StatusReply) -> String {
    current(status).map(Deployment::id).unwrap_or_default()
}

/// The deployment that boots next: the pending one, else the booted one.
pub(crate) fn next_boot(status: &StatusReply) -> Option<&Deployment> {
    status
        .deployments
        .iter()
        .find(|d| d.default)
        .or_else(|| status.deployments.first())
}

/// The deployer's status read again after a change failed; `None` when it does not answer.
async fn status_again(cli: &Cli) -> Option<StatusReply> {
    let read = async {
        let mut conn = connect(cli, deployer::INTERFACE).await.ok()?;
        conn.status().await.ok()?.ok()
    };
    tokio::time::timeout(STATUS_AGAIN_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// What differs between the deployments of `before` and `now`, for people.
fn what_changed(before: &StatusReply, now: &StatusReply) -> String {
    if before.deployments == now.deployments {
        return "the deployments were not changed".to_string();
    }
    let ids =
        |s: &StatusReply| -> Vec<String> { s.deployments.iter().map(Deployment::id).collect() };
    let (then_ids, now_ids) = (ids(before), ids(now));
    let mut parts: Vec<String> = now
        .deployments
        .iter()
        .filter(|d| !then_ids.contains(&d.id()))
        .map(|d| format!("{} was added", crate::errors::deployment(&d.id(), Some(d))))
        .collect();
    parts.extend(
        before
            .deployments
            .iter()
            .filter(|d| !now_ids.contains(&d.id()))
            .map(|d| {
                format!(
                    "{} was removed",
                    crate::errors::deployment(&d.id(), Some(d))
                )
            }),
    );
    if parts.is_empty() {
        parts.push("their order or flags changed".to_string());
    }
    format!(
        "the deployments changed: {} (`dnf-image status` shows them)",
        parts.join(", ")
    )
}

/// A failed change of the deployments prepared on `before`, explained further after a look at
/// the deployer: for `StateChanged`, what the deployment changes now start from holds; when the
/// deployer stopped, whether the deployments changed.
async fn explained<T>(cli: &Cli, before: &StatusReply, result: Result<T>) -> Result<T> {
    let Err(mut e) = result else {
        return result;
    };
    let stopped = e
        .downcast_ref::<Stopped>()
        .is_some_and(|s| s.interface == deployer::INTERFACE);
    let moved = ServiceError::named(&e, "StateChanged").is_some();
    if !(stopped || moved) {
        return Err(e);
    }
    let Some(now) = status_again(cli).await else {
        return Err(e);
    };
    if let Some(s) = e.downcast_mut::<Stopped>() {
        s.outcome = Some(what_changed(before, &now));
    } else if let Some(se) = e.downcast_mut::<ServiceError>() {
        let find = |status: &StatusReply, key: &str| {
            let id = se.parameters.get(key)?.as_str()?;
            status.deployments.iter().find(|d| d.id() == id).cloned()
        };
        let (then, current) = (find(before, "expected"), find(&now, "actual"));
        se.text = crate::errors::state_changed(&se.parameters, then.as_ref(), current.as_ref());
    }
    Err(e)
}

pub(crate) async fn status(cli: &Cli, out: &Output, booted_only: bool, disk: bool) -> Result<u8> {
    let (_, mut status) = status_of(cli).await?;
    let update = available_update(cli, &status).await;
    let disk = if disk {
        Some(disk_usage(cli, out).await)
    } else {
        None
    };
    if booted_only {
        let keep = booted_or_default(&status).map(|d| d.index);
        status.deployments.retain(|d| Some(d.index) == keep);
    }
    out.status(&status, update.as_ref(), disk.as_ref())?;
    if !cli.json
        && let Some(line) = crate::fleet::summary()
    {
        println!("{line}");
    }
    Ok(0)
}

/// The space the repository and the fetcher's cache take, each `None` (with a warning) when
/// its service cannot tell.
async fn disk_usage(cli: &Cli, out: &Output) -> DiskUsage {
    let repository = async {
        let mut conn = connect(cli, importer::INTERFACE).await?;
        ImporterProxy::get_disk_usage(&mut conn)
            .await
            .context("Calling GetDiskUsage")?
            .map_err(service_error)
    }
    .await;
    let cache = async {
        let mut conn = connect(cli, fetcher::INTERFACE).await?;
        FetcherProxy::get_disk_usage(&mut conn)
            .await
            .context("Calling GetDiskUsage")?
            .map_err(service_error)
    }
    .await;
    let warn = |what: &str, e: anyhow::Error| {
        out.warn(&format!("Measuring the {what}: {e:#}"));
    };
    DiskUsage {
        repository: repository.map_err(|e| warn("repository", e)).ok(),
        cache: cache.map_err(|e| warn("image cache", e)).ok(),
    }
}

/// The image references the deployments follow, as the fetcher and the importer record them
/// (one the shared parser refuses was never fetched, so it names nothing to keep).
fn followed_images(status: &StatusReply) -> Vec<String> {
    let mut images: Vec<String> = status
        .deployments
        .iter()
        .filter_map(|d| d.image.as_deref())
        .filter_map(|image| ImageRef::parse(image).ok())
        .map(|r| r.to_string())
        .collect();
    images.sort();
    images.dedup();
    images
}

/// After a deployment change succeeded: removes from the fetcher's cache every image that no
/// remaining deployment follows, and the blobs only those used. Rollback and re-layering read
/// the repository, not the cache; keeping each followed image's newest blobs keeps the next
/// upgrade's download small. A failure is a warning: the deployment is done.
async fn prune_cache(cli: &Cli, out: &Output) {
    let pruned = async {
        let (_, status) = status_of(cli).await?;
        let keep = followed_images(&status);
        let mut conn = connect(cli, fetcher::INTERFACE).await?;
        FetcherProxy::prune(&mut conn, keep)
            .await
            .context("Calling Prune")?
            .map_err(service_error)
    }
    .await;
    match pruned {
        Ok(p) if p.removed_blobs > 0 || !p.removed_images.is_empty() => out.note(&format!(
            "Pruned the image cache: removed {}{} no deployment needs, {} freed",
            match p.removed_images.len() {
                0 => String::new(),
                n => format!("{} and ", crate::output::count(n as u64, "image")),
            },
            crate::output::count(p.removed_blobs, "blob"),
            crate::output::bytes(p.freed_bytes)
        )),
        Ok(_) => {}
        Err(e) => out.warn(&format!(
            "The deployment is done, but pruning the image cache failed: {e:#}. \
             `dnf-image image prune --keep IMAGE` tries again"
        )),
    }
}

/// The update the last check found for the image the host follows, if it is not deployed yet.
/// Asks the fetcher's record, never the network; silent when the fetcher is not there.
async fn available_update(cli: &Cli, status: &StatusReply) -> Option<fetcher::UpdateCheck> {
    let from = current(status)?;
    let image = from.image.as_deref()?;
    let mut conn = connect(cli, fetcher::INTERFACE).await.ok()?;
    let check = conn.last_check(image).await.ok()?.ok()?.check?;
    let deployed = status
        .deployments
        .iter()
        .any(|d| d.image_digest.as_deref() == Some(check.digest.as_str()));
    (check.update_available && !deployed).then_some(check)
}

async fn import(cli: &Cli, out: &Output, source: &str, image: &str) -> Result<ImportResult> {
    let mut conn = connect(cli, importer::INTERFACE).await?;
    let call = Call {
        interface: importer::INTERFACE,
        doing: "importing",
    };
    let stream = conn
        .import(source, image)
        .await
        .map_err(|e| progress::call_failed(call, "Calling Import", false, e))?;
    let result = progress::drive(call, stream, out.progress("Importing"), || {
        progress::cancel(cli, importer::INTERFACE)
    })
    .await?;
    for w in &result.warnings {
        out.warn(&w.message);
    }
    Ok(result)
}

/// Imports the layers of the image the fetcher is storing (`staged`, once it says where) while
/// they download; cancels that when the fetch fails (`fetch_done` is `Some(false)`), and shows
/// its progress once the fetch succeeded. `None` when the fetch stored nothing.
async fn import_early(
    cli: &Cli,
    out: &Output,
    staged: tokio::sync::oneshot::Receiver<fetcher::StagedImage>,
    mut fetch_done: tokio::sync::watch::Receiver<Option<bool>>,
) -> Result<Option<importer::ImportLayersResult>> {
    use futures_util::StreamExt;
    let Ok(staged) = staged.await else {
        return Ok(None);
    };
    let mut conn = connect(cli, importer::INTERFACE).await?;
    let stream = conn
        .import_layers(&staged.layout, &staged.manifest)
        .await
        .context("Calling ImportLayers")?;
    futures_util::pin_mut!(stream);
    let mut view: Option<ProgressView> = None;
    // Once the fetch failed, the job is cancelled as soon as it is known to be ours (it sent a
    // record), and only once.
    let (mut stop, mut stopped) = (false, false);
    let mut ours = false;
    let mut watching = true;
    let outcome = loop {
        if stop && ours && !stopped {
            stopped = true;
            progress::cancel(cli, importer::INTERFACE).await?;
        }
        let item = tokio::select! {
            item = stream.next() => item,
            changed = fetch_done.changed(), if watching => {
                match (changed, *fetch_done.borrow_and_update()) {
                    (Ok(()), None) => {}
                    (Ok(()), Some(true)) => {
                        watching = false;
                        view = Some(out.progress("Importing"));
                    }
                    // The fetch failed (or went): what waits for its downloads must stop.
                    _ => {
                        watching = false;
                        stop = true;
                    }
                }
                continue;
            }
        };
        // The importer went: what `Import` would say, since it would find it gone too.
        let stopped = || Stopped {
            interface: importer::INTERFACE.to_string(),
            doing: "importing".to_string(),
            may_have_changed: false,
            outcome: None,
        };
        let record = match item {
            None => break Err(stopped().into()),
            Some(Err(e)) if progress::connection_lost(&e) => break Err(stopped().into()),
            Some(Err(e)) => break Err(anyhow::Error::new(e).context("Reading progress")),
            Some(Ok(Err(e))) => break Err(service_error(e)),
            Some(Ok(Ok(record))) => record,
        };
        ours = true;
        let result = match view.as_mut() {
            Some(view) => record.take(view),
            None => record.result,
        };
        if let Some(result) = result {
            break Ok(Some(result));
        }
    };
    if let Some(mut view) = view {
        view.finish();
    }
    outcome
}

/// Deploys `commit` as a change prepared on `before`: refused with `StateChanged` when the
/// deployments moved since.
pub(crate) async fn deploy(
    cli: &Cli,
    out: &Output,
    before: &StatusReply,
    commit: &str,
    image: &str,
    stateroot: Option<&str>,
    trust: &ImageTrust,
) -> Result<deployer::DeployResult> {
    let expected = expected(before);
    let call = Call {
        interface: deployer::INTERFACE,
        doing: "deploying",
    };
    let result = async {
        let mut conn = connect(cli, deployer::INTERFACE).await?;
        let stream = conn
            .deploy(
                commit,
                image,
                stateroot,
                None,
                None,
                Some(&expected),
                Some(trust),
            )
            .await
            .map_err(|e| progress::call_failed(call, "Calling Deploy", false, e))?;
        progress::drive(call, stream, out.progress("Deploying"), || {
            progress::cancel(cli, deployer::INTERFACE)
        })
        .await
    }
    .await;
    explained(cli, before, result).await
}

/// Fetch → import → deploy, as a change prepared on `before`; the image is checked against the
/// signature policy when `verify`.
#[allow(clippy::too_many_arguments)]
async fn fetch_import_deploy(
    cli: &Cli,
    out: &Output,
    before: &StatusReply,
    image: &str,
    stateroot: Option<&str>,
    concurrency: Option<u64>,
    verify: bool,
    deploy_it: bool,
) -> Result<(ImportResult, ImageTrust, Option<deployer::DeployResult>)> {
    let mut fetcher = connect(cli, fetcher::INTERFACE).await?;
    // The layers are imported as they download; the import of the image then finds them.
    let (staged_tx, staged_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::watch::channel(None);
    let fetch = async {
        let fetched = image::fetch(
            cli,
            &mut fetcher,
            out,
            image,
            concurrency,
            verify,
            Some(staged_tx),
        )
        .await;
        done_tx.send_replace(Some(fetched.is_ok()));
        if let Ok(fetched) = &fetched {
            let trust = trust_from(verify, &fetched.signature);
            out.note(&format!(
                "Signature: {}",
                crate::output::trust_words(&trust)
            ));
            out.note(&format!(
                "Fetched {} ({} layers downloaded, {} cached)",
                crate::output::named(fetched.version.as_deref(), &fetched.digest),
                fetched.layers_fetched,
                fetched.layers_cached
            ));
        }
        fetched
    };
    let (fetched, early) = tokio::join!(fetch, import_early(cli, out, staged_rx, done_rx));
    let fetched = fetched?;
    // A failed early import only means that `Import` imports the rest, and says why if it
    // cannot; unless the importer is gone.
    if let Err(e) = early
        && e.downcast_ref::<Stopped>().is_some()
    {
        return Err(e);
    }
    let trust = trust_from(verify, &fetched.signature);
    let imported = import(cli, out, &fetched.cache_reference, image).await?;
    out.note(&format!(
        "Imported {} as commit {}",
        crate::output::named(imported.version.as_deref(), &imported.digest),
        short(&imported.commit)
    ));
    if !deploy_it {
        return Ok((imported, trust, None));
    }
    let deployed = deploy(cli, out, before, &imported.commit, image, stateroot, &trust).await?;
    Ok((imported, trust, Some(deployed)))
}

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

/// The deployment that boots next and `image`'s digest, when that deployment already is
/// `image` at that digest, as built (nothing layered), in `stateroot` if one is asked: then a
/// rebase to `image` would deploy the same again. Asks the fetcher for the digest (manifest only,
/// nothing downloaded) only when the rest already matches.
async fn same_image<'a>(
    cli: &Cli,
    status: &'a StatusReply,
    image: &str,
    stateroot: Option<&str>,
    verify: bool,
) -> Result<Option<(&'a Deployment, String)>> {
    let Some(next) = next_boot(status) else {
        return Ok(None);
    };
    let Some(deployed) = next.image_digest.as_deref() else {
        return Ok(None);
    };
    if next.image.as_deref() != Some(image)
        || next.base_commit.is_some()
        || crate::layer::has_layering(next)
        || stateroot.is_some_and(|s| s != next.stateroot)
        || trust_of(next).enforced != verify
    {
        return Ok(None);
    }
    let mut fetcher = connect(cli, fetcher::INTERFACE).await?;
    let info = fetcher
        .inspect(image)
        .await
        .context("Calling Inspect")?
        .map_err(service_error)?;
    Ok((info.image.digest == deployed).then_some((next, info.image.digest)))
}

pub(crate) async fn rebase(
    cli: &Cli,
    out: &Output,
    image: &str,
    opts: &RebaseOptions<'_>,
) -> Result<u8> {
    let image = normalize(image);
    let (_, status) = status_of(cli).await?;
    if !opts.force
        && let Some((next, digest)) =
            same_image(cli, &status, &image, opts.stateroot, opts.verify).await?
    {
        out.note(&format!(
            "No change: the image specification is unchanged. Deployment {} already is {image} \
             at {digest}; `--force` deploys it again.",
            next.index
        ));
        no_reboot(out, opts.apply);
        if cli.json {
            out.deployed(
                &status,
                &deployer::DeployResult {
                    changed: false,
                    deployment: next.clone(),
                    added_kernel_arguments: Vec::new(),
                    removed_kernel_arguments: Vec::new(),
                },
            )?;
        }
        return Ok(if opts.unchanged_exit_77 {
            EXIT_UNCHANGED
        } else {
            0
        });
    }
    let (_, _, deployed) = fetch_import_deploy(
        cli,
        out,
        &status,
        &image,
        opts.stateroot,
        opts.concurrency,
        opts.verify,
        true,
    )
    .await?;
    let deployed = deployed.context("The deploy step gave no result")?;
    let reboot = reboot_wanted(out, opts.apply, &status, deployed.changed);
    out.deployed_then(&status, &deployed, reboot)?;
    prune_cache(cli, out).await;
    if reboot {
        self::reboot(out)?;
    }
    Ok(0)
}

pub(crate) async fn upgrade(cli: &Cli, out: &Output, opts: &UpgradeOptions) -> Result<u8> {
    let (_, status) = status_of(cli).await?;
    let Some(from) = current(&status) else {
        anyhow::bail!("Nothing is deployed yet: use `dnf-image rebase IMAGE` first");
    };
    let Some(image) = from.image.clone() else {
        anyhow::bail!(
            "Deployment {} does not follow a container image: use `dnf-image rebase IMAGE`",
            from.index
        );
    };
    let unchanged = if opts.unchanged_exit_77 {
        EXIT_UNCHANGED
    } else {
        0
    };
    // The origin's choice holds: an image held to the signature policy stays held to it.
    let enforced = trust_of(from).enforced;

    if opts.from_downloaded {
        let mut importer = connect(cli, importer::INTERFACE).await?;
        let images = importer
            .list_images()
            .await
            .context("Calling ListImages")?
            .map_err(service_error)?;
        let Some(downloaded) = images.images.iter().find(|i| i.reference == image) else {
            anyhow::bail!(
                "Nothing was downloaded for {image}: run `dnf-image upgrade --download-only` first"
            );
        };
        if from.image_digest.as_deref() == Some(downloaded.digest.as_str()) {
            out.note(&format!(
                "No downloaded update: {image} is deployed at {}",
                downloaded.digest
            ));
            no_reboot(out, opts.apply);
            return Ok(unchanged);
        }
        let trust = downloaded_trust(cli, &image, &downloaded.digest, enforced).await?;
        let commit = if crate::layer::has_layering(from) {
            let change = crate::layer::Change::default();
            crate::layer::build(cli, out, &downloaded.commit, Some(&from.commit), &change)
                .await
                .context("Applying this machine's packages to the new image; nothing was deployed")?
                .commit
        } else {
            downloaded.commit.clone()
        };
        let deployed = deploy(cli, out, &status, &commit, &image, None, &trust).await?;
        let reboot = reboot_wanted(out, opts.apply, &status, deployed.changed);
        out.deployed_then(&status, &deployed, reboot)?;
        prune_cache(cli, out).await;
        if reboot {
            self::reboot(out)?;
        }
        return Ok(0);
    }

    let mut fetcher = connect(cli, fetcher::INTERFACE).await?;
    let check = fetcher
        .check_update(&image, from.image_digest.as_deref(), Some(enforced))
        .await
        .context("Calling CheckUpdate")?
        .map_err(service_error)?;
    if opts.check {
        let mut changes = None;
        if check.update_available {
            // Already downloaded (`--download-only`): say what it changes in packages.
            let mut importer = connect(cli, importer::INTERFACE).await?;
            let images = importer
                .list_images()
                .await
                .context("Calling ListImages")?
                .map_err(service_error)?;
            if let Some(downloaded) = images
                .images
                .iter()
                .find(|i| i.reference == image && i.digest == check.digest)
            {
                let base = from.base_commit.as_deref().unwrap_or(&from.commit);
                match crate::layer::package_diff(cli, base, &downloaded.commit).await {
                    Ok(c) => changes = Some(c),
                    Err(e) => out.warn(&format!("Comparing packages: {e:#}")),
                }
            }
        }
        out.check_with_changes(&image, &check, changes.as_ref())?;
        return Ok(if check.update_available { 0 } else { unchanged });
    }
    if !check.update_available {
        out.note(&format!("No update: {image} is still {}", check.digest));
        no_reboot(out, opts.apply);
        return Ok(unchanged);
    }
    let (imported, trust, _) = fetch_import_deploy(
        cli,
        out,
        &status,
        &image,
        None,
        opts.concurrency,
        enforced,
        false,
    )
    .await?;
    if opts.download_only {
        if opts.preview {
            let base = from.base_commit.as_deref().unwrap_or(&from.commit);
            let changes = crate::layer::package_diff(cli, base, &imported.commit).await?;
            out.package_changes(&changes)?;
        }
        out.downloaded(&imported)?;
        return Ok(0);
    }
    // This machine's packages and overrides, applied again on the new image.
    let commit = if crate::layer::has_layering(from) {
        let change = crate::layer::Change::default();
        let built = crate::layer::build(cli, out, &imported.commit, Some(&from.commit), &change)
            .await
            .context("Applying this machine's packages to the new image; nothing was deployed")?;
        built.commit
    } else {
        imported.commit.clone()
    };
    let deployed = deploy(cli, out, &status, &commit, &image, None, &trust).await?;
    let reboot = reboot_wanted(out, opts.apply, &status, deployed.changed);
    out.deployed_then(&status, &deployed, reboot)?;
    prune_cache(cli, out).await;
    if reboot {
        self::reboot(out)?;
    }
    Ok(0)
}

/// What the fetch of `image` at `digest` (by `upgrade --download-only`) found about its
/// signatures, from the fetcher's cache record. An image that must meet the policy (`enforced`)
/// and was not checked then is refused: fetching it again checks it.
async fn downloaded_trust(
    cli: &Cli,
    image: &str,
    digest: &str,
    enforced: bool,
) -> Result<ImageTrust> {
    if !enforced {
        return Ok(trust_from(false, &fetcher::SignatureCheck::default()));
    }
    let mut fetcher = connect(cli, fetcher::INTERFACE).await?;
    let cached = fetcher
        .list_cached()
        .await
        .context("Calling ListCached")?
        .map_err(service_error)?;
    let check = cached
        .images
        .into_iter()
        .find(|i| i.reference == image && i.digest == digest)
        .and_then(|i| i.signature)
        .filter(|s| s.checked);
    match check {
        Some(check) => Ok(trust_from(true, &check)),
        None => anyhow::bail!(
            "The downloaded {image} ({digest}) was not checked against the signature policy \
             when it was fetched, and this deployment requires it: run `dnf-image upgrade` \
             (which fetches and checks it) instead of `--from-downloaded`; nothing was deployed"
        ),
    }
}

/// Whether `--apply` (`apply`) reboots after a change that `changed` the deployments: only when
/// the sysroot is the running system's, and says why not otherwise.
fn reboot_wanted(out: &Output, apply: bool, before: &StatusReply, changed: bool) -> bool {
    if !apply {
        return false;
    }
    if !changed {
        no_reboot(out, true);
        return false;
    }
    if !before.booted {
        out.note(&format!(
            "--apply: not booted: nothing to reboot ({} is not the running system's sysroot).",
            before.sysroot
        ));
        return false;
    }
    true
}

/// Says that `--apply` (`apply`) reboots nothing because nothing changed.
fn no_reboot(out: &Output, apply: bool) {
    if apply {
        out.note("--apply: nothing changed, so no reboot.");
    }
}

/// The reboot of `--apply`, asked of systemd as any administrator would (`systemctl reboot`):
/// the CLI runs it itself rather than through a service, since rebooting is no change to the
/// sysroot, the cache or a registry, and the deployer (no network, a private mount namespace)
/// should not gain the right to stop the machine.
fn reboot(out: &Output) -> Result<()> {
    out.note("--apply: rebooting (`systemctl reboot`).");
    let status = std::process::Command::new("systemctl")
        .arg("reboot")
        .status()
        .context("Running `systemctl reboot`; the change is made: reboot to use it")?;
    anyhow::ensure!(
        status.success(),
        "`systemctl reboot` failed ({status}); the change is made: reboot to use it"
    );
    Ok(())
}

pub(crate) async fn rollback(cli: &Cli, out: &Output, apply: bool) -> Result<u8> {
    let (mut conn, status) = status_of(cli).await?;
    let call = Call {
        interface: deployer::INTERFACE,
        doing: "rolling back",
    };
    let result = conn
        .rollback(Some(&expected(&status)))
        .await
        .map_err(|e| progress::call_failed(call, "Calling Rollback", true, e))
        .and_then(|r| r.map_err(service_error));
    let reply = explained(cli, &status, result).await?;
    let reboot = reboot_wanted(out, apply, &status, true);
    out.next_boot_then("Rolled back", &reply.deployment, reboot)?;
    if reboot {
        self::reboot(out)?;
    }
    Ok(0)
}

pub(crate) async fn apply_live(cli: &Cli, out: &Output, allow_replacement: bool) -> Result<u8> {
    let mut conn = connect(cli, deployer::INTERFACE).await?;
    let reply = conn
        .apply_live(allow_replacement.then_some(true))
        .await
        .context("Calling ApplyLive")?
        .map_err(service_error)?;
    out.applied_live(&reply)?;
    Ok(0)
}

pub(crate) async fn pin(cli: &Cli, out: &Output, index: u64, pinned: bool) -> Result<u8> {
    let (mut conn, _) = status_of(cli).await?;
    let reply = conn
        .pin(index, pinned)
        .await
        .context("Calling Pin")?
        .map_err(service_error)?;
    out.pinned(&reply.deployment)?;
    Ok(0)
}

pub(crate) async fn cleanup(
    cli: &Cli,
    out: &Output,
    pending: bool,
    rollback: bool,
    repo: bool,
) -> Result<u8> {
    let (mut conn, status) = status_of(cli).await?;
    let removed = if pending || rollback {
        let call = Call {
            interface: deployer::INTERFACE,
            doing: "cleaning up",
        };
        let expected = expected(&status);
        let result = async {
            let stream = conn
                .cleanup(Some(pending), Some(rollback), Some(&expected))
                .await
                .map_err(|e| progress::call_failed(call, "Calling Cleanup", false, e))?;
            progress::drive(call, stream, out.progress("Cleaning"), || {
                progress::cancel(cli, deployer::INTERFACE)
            })
            .await
        }
        .await;
        explained(cli, &status, result).await?.removed_deployments
    } else {
        Vec::new()
    };
    let repository = if repo {
        // What the deployments follow now, so that an update downloaded for one of them stays.
        let (_, now) = status_of(cli).await?;
        let keep = followed_images(&now);
        let call = Call {
            interface: importer::INTERFACE,
            doing: "pruning the repository",
        };
        let mut importer = connect(cli, importer::INTERFACE).await?;
        let stream = ImporterProxy::prune(&mut importer, Some(&keep))
            .await
            .map_err(|e| progress::call_failed(call, "Calling Prune", false, e))?;
        let pruned = progress::drive(call, stream, out.progress("Pruning"), || {
            progress::cancel(cli, importer::INTERFACE)
        })
        .await?;
        Some(pruned)
    } else {
        None
    };
    out.cleaned(&crate::output::Cleaned {
        removed_deployments: removed,
        repository,
    })?;
    Ok(0)
}

pub(crate) async fn kargs(
    cli: &Cli,
    out: &Output,
    append: &[String],
    delete: &[String],
    replace: &[String],
) -> Result<u8> {
    let (mut conn, status) = status_of(cli).await?;
    if append.is_empty() && delete.is_empty() && replace.is_empty() {
        let next = status
            .deployments
            .iter()
            .find(|d| d.default)
            .or_else(|| status.deployments.first())
            .context("Nothing is deployed yet")?;
        out.kargs(next)?;
        return Ok(0);
    }
    let opt = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
    let (append, delete, replace) = (opt(append), opt(delete), opt(replace));
    let call = Call {
        interface: deployer::INTERFACE,
        doing: "changing the kernel arguments",
    };
    let expected = expected(&status);
    let result = async {
        let stream = conn
            .set_kernel_arguments(
                None,
                append.as_deref(),
                delete.as_deref(),
                replace.as_deref(),
                Some(&expected),
            )
            .await
            .map_err(|e| progress::call_failed(call, "Calling SetKernelArguments", false, e))?;
        progress::drive(call, stream, out.progress("Deploying"), || {
            progress::cancel(cli, deployer::INTERFACE)
        })
        .await
    }
    .await;
    let result = explained(cli, &status, result).await?;
    out.deployed(&status, &result)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(index: u64, booted: bool, staged: bool, default: bool) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "index": index, "stateroot": "default", "commit": format!("c{index}"), "serial": 0,
            "baseCommit": null, "image": "docker://r/os:latest", "imageDigest": null,
            "version": null, "timestamp": "", "kernelVersion": "", "kernelArguments": [],
            "booted": booted, "staged": staged, "default": default, "rollback": false,
            "pinned": false, "finalizationLocked": false,
            "layering": {"packages": [], "inactive": [], "overrideRemove": [], "overrideReplace": []},
        }))
        .expect("a valid deployment")
    }

    #[test]
    fn changes_start_from_the_pending_deployment() {
        let status = |deployments| StatusReply {
            sysroot: "/".into(),
            booted: true,
            deployments,
            operation: None,
        };
        // (deployments, where a change starts, what status --booted shows)
        let cases = [
            (
                vec![
                    deployment(0, false, true, true),
                    deployment(1, true, false, false),
                ],
                Some(0),
                Some(1),
            ),
            (
                vec![
                    deployment(0, true, false, true),
                    deployment(1, false, false, false),
                ],
                Some(0),
                Some(0),
            ),
            (
                vec![
                    deployment(0, false, false, true),
                    deployment(1, false, false, false),
                ],
                Some(0),
                Some(0),
            ),
            (vec![], None, None),
        ];
        for (deployments, change, booted) in cases {
            let s = status(deployments);
            assert_eq!(current(&s).map(|d| d.index), change);
            assert_eq!(booted_or_default(&s).map(|d| d.index), booted);
        }
    }

    #[test]
    fn names_what_changed_in_the_deployments() {
        let status = |deployments| StatusReply {
            sysroot: "/".into(),
            booted: false,
            deployments,
            operation: None,
        };
        let (d0, d1) = (
            deployment(0, false, false, true),
            deployment(1, false, false, false),
        );
        let before = status(vec![d0.clone(), d1.clone()]);
        assert_eq!(
            what_changed(&before, &before),
            "the deployments were not changed"
        );
        // Deployed: a new one in front, the oldest gone.
        let mut new = deployment(0, false, false, true);
        new.commit = "c9".into();
        let after = status(vec![new, d0.clone()]);
        assert_eq!(
            what_changed(&before, &after),
            "the deployments changed: default/c9.0 (docker://r/os:latest) was added, \
             default/c1.0 (docker://r/os:latest) was removed (`dnf-image status` shows them)"
        );
        // Rolled back: the same ones in another order.
        let after = status(vec![d1, d0]);
        assert_eq!(
            what_changed(&before, &after),
            "the deployments changed: their order or flags changed (`dnf-image status` shows \
             them)"
        );
    }

    #[test]
    fn a_change_names_the_deployment_it_starts_from() {
        let status = |deployments| StatusReply {
            sysroot: "/".into(),
            booted: true,
            deployments,
            operation: None,
        };
        let staged = status(vec![
            deployment(0, false, true, true),
            deployment(1, true, false, false),
        ]);
        assert_eq!(expected(&staged), "default/c0.0");
        let booted = status(vec![
            deployment(0, false, false, true),
            deployment(1, true, false, false),
        ]);
        assert_eq!(expected(&booted), "default/c1.0");
        assert_eq!(next_boot(&booted).map(|d| d.index), Some(0));
        assert_eq!(expected(&status(vec![])), "");
    }

    #[test]
    fn parses_the_policy() {
        let cases = [
            ("", Some(Policy::Check)),
            ("[upgrade]\npolicy = \"stage\"\n", Some(Policy::Stage)),
            (
                "[upgrade]\n# policy = \"stage\"\npolicy=\"none\" # off\n",
                Some(Policy::None),
            ),
            ("[other]\npolicy = \"stage\"\n", Some(Policy::Check)),
            ("[upgrade]\npolicy = \"apply\"\n", Some(Policy::Apply)),
            ("[upgrade]\npolicy = \"sometimes\"\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(Policy::parse(text).ok(), want, "{text:?}");
        }
    }

    #[test]
    fn normalizes_references() {
        let cases = [
            ("quay.io/os:1", "docker://quay.io/os:1"),
            ("docker://quay.io/os:1", "docker://quay.io/os:1"),
            ("oci:/x:1", "oci:/x:1"),
            ("oci-archive:/x.tar", "oci-archive:/x.tar"),
            // Refused: sent as typed, for the fetcher to say why.
            ("quay.io/Os:1", "quay.io/Os:1"),
            ("containers-storage:os", "containers-storage:os"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), want);
        }
    }
}
