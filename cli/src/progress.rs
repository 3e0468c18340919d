//! Drives a service's `more` stream to its result, showing progress and turning Ctrl-C into the
//! service's `Cancel`.

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
            if let Some(w) = &p.warning {
                view.note(&format!("warning: {}", w.message));
            }
            let msg = format!("{}/{} layers, {}", p.layers_done, p.layers_total, p.message);
            view.set(Some((p.bytes_done, p.bytes_total)), &msg);
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

/// Reads `stream` to its result. The first Ctrl-C calls `cancel` (the service then ends the
/// stream with its `Cancelled` error); a second one leaves at once.
pub async fn drive<R, E, S, C, F>(stream: S, mut view: ProgressView, cancel: C) -> Result<R::Result>
where
    R: Streamed,
    E: Serialize + std::fmt::Debug,
    S: Stream<Item = zlink::Result<Result<R, E>>>,
    C: FnOnce() -> F,
    F: Future<Output = Result<()>>,
{
    futures_util::pin_mut!(stream);
    let mut cancel = Some(cancel);
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
            anyhow::bail!("The service closed the connection before the operation ended");
        };
        match item.context("Reading progress")? {
            Err(e) => {
                view.finish();
                return Err(service_error(e));
            }
            Ok(record) => {
                if let Some(result) = record.take(&mut view) {
                    view.finish();
                    return Ok(result);
                }
            }
        }
    }
}
