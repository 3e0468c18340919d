//! Drives a service's `more` stream to its result, showing progress and turning Ctrl-C into the
//! service's `Cancel`; says which service went away when one stops in the middle of a call.

use std::future::Future;

use anyhow::{Context, Result};
use dnfimage_interfaces::{deployer, fetcher, importer, layerer};
use futures_util::{Stream, StreamExt};
use serde::Serialize;

use crate::errors::service_error;
use crate::output::ProgressView;
use crate::{Cli, connect};

/// A record of a `more` stream: progress, or the final result.
pub trait Streamed {
    /// The result type.
    type Result;
    /// Shows the progress part, if any; returns the result part, if any.
    fn take(self, view: &mut ProgressView) -> Option<Self::Result>;
    /// Whether this record says the service has started the part of the change that outlives
    /// it (e.g. writing boot entries), so that stopping now may have left it changed.
    fn writing(&self) -> bool {
        false
    }
}

/// A call in flight, for what to say when its service goes away.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The service's interface, e.g. "org.dnfimage.Deployer".
    pub interface: &'a str,
    /// What the call does, e.g. "deploying".
    pub doing: &'a str,
}

/// The service behind a call went away before it answered: it stopped, crashed or was killed.
#[derive(Debug)]
pub struct Stopped {
    /// Its interface.
    pub interface: String,
    /// What the call was doing.
    pub doing: String,
    /// Whether it may have changed the system before it went (it had started writing, or the
    /// call streams no progress that would tell).
    pub may_have_changed: bool,
    /// What is known of the system afterwards, set by a caller that looked; else what the
    /// service and `may_have_changed` imply.
    pub outcome: Option<String>,
}

impl Stopped {
    /// "deployer" for "org.dnfimage.Deployer".
    fn service(&self) -> String {
        self.interface
            .rsplit('.')
            .next()
            .unwrap_or(&self.interface)
            .to_lowercase()
    }

    /// What stopping means for the system when nobody looked.
    fn default_outcome(&self) -> String {
        match (self.interface.as_str(), self.may_have_changed) {
            (deployer::INTERFACE, false) => {
                "it had not started writing the boot entries, so the deployments were not changed"
                    .to_string()
            }
            (deployer::INTERFACE, true) => {
                "it may have changed the deployments; `dnf-image status` shows them once the \
                 deployer runs again"
                    .to_string()
            }
            (fetcher::INTERFACE, _) => {
                "nothing was deployed; the layers downloaded completely stay in the cache"
                    .to_string()
            }
            _ => "nothing was deployed".to_string(),
        }
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let outcome = self
            .outcome
            .clone()
            .unwrap_or_else(|| self.default_outcome());
        write!(
            f,
            "The {} ({}) stopped while {}: {outcome}. Run the command again.",
            self.service(),
            self.interface,
            self.doing
        )
    }
}

impl std::error::Error for Stopped {}

/// Whether a client error means the connection is gone (the service stopped), not that a
/// message was wrong.
pub fn connection_lost(e: &zlink::Error) -> bool {
    matches!(
        e,
        zlink::Error::SocketRead
            | zlink::Error::SocketWrite
            | zlink::Error::UnexpectedEof
            | zlink::Error::Io(_)
    )
}

/// A failed call: [`Stopped`] when the service went away (`may_have_changed`: whether it could
/// have acted on the call), else the error with `context`.
pub fn call_failed(
    call: Call<'_>,
    context: &str,
    may_have_changed: bool,
    e: zlink::Error,
) -> anyhow::Error {
    if connection_lost(&e) {
        Stopped {
            interface: call.interface.to_string(),
            doing: call.doing.to_string(),
            may_have_changed,
            outcome: None,
        }
        .into()
    } else {
        anyhow::Error::new(e).context(context.to_string())
    }
}

impl Streamed for fetcher::FetchReply {
    type Result = fetcher::FetchResult;
    fn take(self, view: &mut ProgressView) -> Option<Self::Result> {
        if let Some(p) = &self.progress {
            let msg = format!("{}/{} layers, {}", p.layers_done, p.layers_total, p.message);
            view.set(Some((p.bytes_done, p.bytes_total)), &msg);
        }
        self.result
    }
}

impl Streamed for importer::ImportReply {
    type Result = importer::ImportResult;
    fn take(self, view: &mut ProgressView) -> Option<Self::Result> {
        if let Some(p) = &self.progress {
            show_import(view, p);
        }
        self.result
    }
}

fn show_import(view: &mut ProgressView, p: &importer::ImportProgress) {
    if let Some(w) = &p.warning {
        view.note(&format!("warning: {}", w.message));
    }
    let msg = format!("{}/{} layers, {}", p.layers_done, p.layers_total, p.message);
    view.set(Some((p.bytes_done, p.bytes_total)), &msg);
}

impl Streamed for importer::ImportLayersReply {
    type Result = importer::ImportLayersResult;
    fn take(self, view: &mut ProgressView) -> Option<Self::Result> {
        if let Some(p) = &self.progress {
            show_import(view, p);
        }
        self.result
    }
}

impl Streamed for deployer::DeployReply {
    type Result = deployer::DeployResult;
    fn take(self, view: &mut ProgressView) -> Option<Self::Result> {
        if let Some(p) = &self.progress {
            view.set(None, &p.message);
        }
        self.result
    }
    fn writing(&self) -> bool {
        self.progress.as_ref().is_some_and(|p| {
            matches!(
                p.phase,
                deployer::DeployPhase::Staging | deployer::DeployPhase::UpdatingBootEntries
            )
        })
    }
}

impl Streamed for layerer::BuildReply {
    type Result = layerer::BuildResult;
    fn take(self, view: &mut ProgressView) -> Option<Self::Result> {
        if let Some(p) = &self.progress {
            let bytes = p.bytes_done.zip(p.bytes_total);
            let msg = if p.packages_total > 0 {
                format!(
                    "{}/{} packages, {}",
                    p.packages_done, p.packages_total, p.message
                )
            } else {
                p.message.clone()
            };
            view.set(bytes, &msg);
        }
        self.result
    }
}

impl Streamed for deployer::CleanupReply {
    type Result = deployer::CleanupResult;
    fn take(self, view: &mut ProgressView) -> Option<Self::Result> {
        if let Some(p) = &self.progress {
            view.set(None, &p.message);
        }
        self.result
    }
    fn writing(&self) -> bool {
        // Every record of a cleanup comes after its check.
        self.progress.is_some()
    }
}

impl Streamed for importer::PruneReply {
    type Result = importer::PruneResult;
    fn take(self, view: &mut ProgressView) -> Option<Self::Result> {
        if let Some(p) = &self.progress {
            view.set(None, &p.message);
        }
        self.result
    }
}

/// Asks the service behind `interface` to cancel its running job, on a second connection.
pub async fn cancel(cli: &Cli, interface: &str) -> Result<()> {
    use dnfimage_interfaces::deployer::DeployerProxy;
    use dnfimage_interfaces::fetcher::FetcherProxy;
    use dnfimage_interfaces::importer::ImporterProxy;
    use dnfimage_interfaces::layerer::LayererProxy;
    let mut conn = connect(cli, interface).await?;
    let what = match interface {
        fetcher::INTERFACE => {
            FetcherProxy::cancel(&mut conn)
                .await
                .context("Calling Cancel")?
                .map_err(service_error)?
                .cancelled
        }
        importer::INTERFACE => {
            ImporterProxy::cancel(&mut conn)
                .await
                .context("Calling Cancel")?
                .map_err(service_error)?
                .cancelled
        }
        deployer::INTERFACE => {
            DeployerProxy::cancel(&mut conn)
                .await
                .context("Calling Cancel")?
                .map_err(service_error)?
                .cancelled
        }
        layerer::INTERFACE => {
            LayererProxy::cancel(&mut conn)
                .await
                .context("Calling Cancel")?
                .map_err(service_error)?
                .cancelled
        }
        other => anyhow::bail!("{other} has no Cancel"),
    };
    if what.is_none() {
        eprintln!("Nothing was running any more.");
    }
    Ok(())
}

/// Reads `stream` of `call` to its result. The first Ctrl-C calls `cancel` (the service then
/// ends the stream with its `Cancelled` error); a second one leaves at once. When the
/// connection ends first, the error is [`Stopped`].
pub async fn drive<R, E, S, C, F>(
    call: Call<'_>,
    stream: S,
    mut view: ProgressView,
    cancel: C,
) -> Result<R::Result>
where
    R: Streamed,
    E: Serialize + std::fmt::Debug,
    S: Stream<Item = zlink::Result<Result<R, E>>>,
    C: FnOnce() -> F,
    F: Future<Output = Result<()>>,
{
    futures_util::pin_mut!(stream);
    let mut cancel = Some(cancel);
    let mut writing = false;
    let stopped = |writing: bool| Stopped {
        interface: call.interface.to_string(),
        doing: call.doing.to_string(),
        may_have_changed: writing,
        outcome: None,
    };
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = tokio::signal::ctrl_c() => {
                match cancel.take() {
                    Some(cancel) => {
                        view.note("Cancelling… (Ctrl-C again to leave without waiting)");
                        cancel().await?;
                        continue;
                    }
                    None => anyhow::bail!("Interrupted; the service is still cancelling"),
                }
            }
        };
        let Some(item) = item else {
            view.finish();
            return Err(stopped(writing).into());
        };
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                view.finish();
                if connection_lost(&e) {
                    return Err(stopped(writing).into());
                }
                return Err(anyhow::Error::new(e).context("Reading progress"));
            }
        };
        match item {
            Err(e) => {
                view.finish();
                return Err(service_error(e));
            }
            Ok(record) => {
                writing |= record.writing();
                if let Some(result) = record.take(&mut view) {
                    view.finish();
                    return Ok(result);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(e: &anyhow::Error) -> String {
        format!("{e:#}")
    }

    #[test]
    fn a_lost_connection_names_the_service_and_what_it_means() {
        let call = |interface| Call {
            interface,
            doing: "doing it",
        };
        // (interface, may have changed, what follows "stopped while doing it: ")
        let cases = [
            (
                deployer::INTERFACE,
                false,
                "it had not started writing the boot entries, so the deployments were not \
                 changed",
            ),
            (
                deployer::INTERFACE,
                true,
                "it may have changed the deployments; `dnf-image status` shows them once the \
                 deployer runs again",
            ),
            (
                fetcher::INTERFACE,
                false,
                "nothing was deployed; the layers downloaded completely stay in the cache",
            ),
            (importer::INTERFACE, false, "nothing was deployed"),
            (layerer::INTERFACE, true, "nothing was deployed"),
        ];
        for (interface, may_have_changed, outcome) in cases {
            for lost in [
                zlink::Error::UnexpectedEof,
                zlink::Error::SocketRead,
                zlink::Error::SocketWrite,
                zlink::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
                zlink::Error::Io(std::io::ErrorKind::BrokenPipe.into()),
            ] {
                let e = call_failed(call(interface), "Calling It", may_have_changed, lost);
                let service = interface
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_lowercase();
                assert_eq!(
                    text(&e),
                    format!(
                        "The {service} ({interface}) stopped while doing it: {outcome}. Run the \
                         command again."
                    )
                );
                assert!(e.downcast_ref::<Stopped>().is_some());
            }
        }
        // What a caller that looked found replaces the guess.
        let mut e = call_failed(
            call(deployer::INTERFACE),
            "Calling It",
            true,
            zlink::Error::UnexpectedEof,
        );
        if let Some(s) = e.downcast_mut::<Stopped>() {
            s.outcome = Some("the deployments were not changed".into());
        }
        assert_eq!(
            text(&e),
            "The deployer (org.dnfimage.Deployer) stopped while doing it: the deployments were \
             not changed. Run the command again."
        );
    }

    #[test]
    fn other_client_errors_keep_their_context() {
        let e = call_failed(
            Call {
                interface: deployer::INTERFACE,
                doing: "deploying",
            },
            "Calling Deploy",
            false,
            zlink::Error::BufferOverflow,
        );
        assert!(e.downcast_ref::<Stopped>().is_none());
        assert_eq!(text(&e), "Calling Deploy: Buffer overflow");
    }

    #[test]
    fn deploy_and_cleanup_records_tell_when_writing_starts() {
        let deploy = |phase| deployer::DeployReply {
            progress: Some(deployer::DeployProgress {
                phase,
                message: String::new(),
            }),
            result: None,
        };
        use deployer::DeployPhase::*;
        for (phase, writing) in [
            (Checking, false),
            (Deploying, false),
            (Staging, true),
            (UpdatingBootEntries, true),
        ] {
            assert_eq!(deploy(phase).writing(), writing, "{phase:?}");
        }
        let cleanup = deployer::CleanupReply {
            progress: Some(deployer::CleanupProgress {
                phase: deployer::CleanupPhase::UpdatingBootEntries,
                message: String::new(),
            }),
            result: None,
        };
        assert!(cleanup.writing());
    }
}
