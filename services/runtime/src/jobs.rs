//! One state-changing job at a time, cancellable, visible in `systemctl status`; and the one
//! way a `more` method runs its job: [`spawn_streamed`] starts it in the slot, streams its
//! progress records and ends with its outcome.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use zlink::Reply;

use crate::idle::{Activity, ActivityGuard};
use crate::notify;

/// The single slot for a service's state-changing job.
#[derive(Debug, Clone)]
pub struct JobSlot {
    current: Arc<Mutex<Option<Running>>>,
    activity: Activity,
}

#[derive(Debug)]
struct Running {
    what: String,
    cancel: watch::Sender<bool>,
}

/// A running job; the slot frees when it is dropped.
#[derive(Debug)]
pub struct Job {
    slot: JobSlot,
    cancel: watch::Receiver<bool>,
    _activity: ActivityGuard,
}

impl JobSlot {
    /// An empty slot whose jobs count in `activity`.
    pub fn new(activity: Activity) -> Self {
        Self {
            current: Arc::new(Mutex::new(None)),
            activity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        // A panic while holding this lock cannot leave the Option inconsistent.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a job described by `what`, or returns the description of the one running.
    pub fn try_start(&self, what: &str) -> Result<Job, String> {
        let mut current = self.lock();
        if let Some(running) = current.as_ref() {
            return Err(running.what.clone());
        }
        let (tx, rx) = watch::channel(false);
        *current = Some(Running {
            what: what.to_string(),
            cancel: tx,
        });
        notify::status(what);
        Ok(Job {
            slot: self.clone(),
            cancel: rx,
            _activity: self.activity.job(),
        })
    }

    /// What the running job is, if one runs.
    pub fn running(&self) -> Option<String> {
        self.lock().as_ref().map(|r| r.what.clone())
    }

    /// Asks the running job to stop; returns what was cancelled.
    pub fn cancel(&self) -> Option<String> {
        let current = self.lock();
        let running = current.as_ref()?;
        running.cancel.send_replace(true);
        Some(running.what.clone())
    }
}

/// What a job's work sees of it: whether it was asked to stop. Cheap to clone, and it does not
/// keep the slot taken.
#[derive(Debug, Clone)]
pub struct Cancellation(watch::Receiver<bool>);

impl Cancellation {
    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when cancellation is asked for.
    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        // An error means the slot's sender is gone, which only happens after the job ended.
        let _ = rx.wait_for(|c| *c).await;
    }
}

impl Job {
    /// The job's cancellation, for its work.
    pub fn cancellation(&self) -> Cancellation {
        Cancellation(self.cancel.clone())
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves when cancellation is asked for.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.clone();
        // An error means the slot's sender is gone, which only happens after this job ended.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Shows `text` as the service's status (`systemctl status`).
    pub fn status(&self, text: &str) {
        notify::status(text);
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        *self.slot.lock() = None;
        notify::status("Idle");
    }
}

/// The replies of a `more` method.
pub type ReplyStream<R, E> = Pin<Box<dyn Stream<Item = Result<Reply<R>, E>> + Send>>;

/// Sends a `more` call's progress records (nothing when the caller did not ask for them).
#[derive(Debug)]
pub struct Progress<R, E> {
    tx: mpsc::Sender<Result<Reply<R>, E>>,
    more: bool,
}

impl<R, E> Clone for Progress<R, E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            more: self.more,
        }
    }
}

impl<R, E> Progress<R, E> {
    /// Whether the caller asked for progress records.
    pub fn wanted(&self) -> bool {
        self.more
    }

    /// Sends `record` with `continues`. A slow client misses intermediate records rather than
    /// slowing the job.
    pub fn send(&self, record: R) {
        if self.more {
            let _ = self
                .tx
                .try_send(Ok(Reply::new(Some(record)).set_continues(Some(true))));
        }
    }
}

/// The replies of a `more` call refused before it started: the one error.
pub fn refused<R: Send + 'static, E: Send + 'static>(e: E) -> ReplyStream<R, E> {
    Box::pin(futures_util::stream::once(async move { Err(e) }))
}

/// Runs `work` as the service's one job, described by `what` (`AlreadyInProgress`, made by
/// `busy` from what runs, when the slot is taken): its progress records go to the stream
/// returned, then its outcome as the last reply. The job is released before that reply is
/// sent, so a client that sees it can start the next job at once.
pub fn spawn_streamed<R, E, Fut>(
    jobs: &JobSlot,
    what: String,
    more: bool,
    busy: impl FnOnce(String) -> E,
    work: impl FnOnce(Cancellation, Progress<R, E>) -> Fut,
) -> ReplyStream<R, E>
where
    R: Send + 'static,
    E: std::fmt::Debug + Send + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    let job = match jobs.try_start(&what) {
        Ok(job) => job,
        Err(running) => {
            tracing::info!("{what}: refused, {running} is running");
            return refused(busy(running));
        }
    };
    let (tx, rx) = mpsc::channel(64);
    let progress = Progress {
        tx: tx.clone(),
        more,
    };
    let running = work(job.cancellation(), progress);
    tokio::spawn(async move {
        let result = running.await;
        match &result {
            Ok(_) => tracing::debug!("{what}: done"),
            Err(e) => tracing::warn!("{what} failed: {e:?}"),
        }
        let last = result.map(|r| Reply::new(Some(r)).set_continues(Some(false)));
        drop(job);
        if tx.send(last).await.is_err() {
            tracing::debug!("The client left before the end: {what}");
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_job_at_a_time_and_cancel() {
        let activity = Activity::new();
        let slot = JobSlot::new(activity.clone());
        let job = slot.try_start("Fetching a").unwrap();
        assert_eq!(activity.jobs(), 1);
        assert_eq!(slot.try_start("Fetching b").unwrap_err(), "Fetching a");
        assert!(!job.is_cancelled());
        assert_eq!(slot.cancel().as_deref(), Some("Fetching a"));
        job.cancelled().await;
        assert!(job.is_cancelled());
        drop(job);
        assert_eq!(activity.jobs(), 0);
        assert!(slot.cancel().is_none());
        assert!(slot.try_start("Fetching b").is_ok());
    }

    #[tokio::test]
    async fn streams_progress_then_the_outcome_and_frees_the_slot_first() {
        use futures_util::StreamExt;
        let slot = JobSlot::new(Activity::new());
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let mut stream = spawn_streamed(
            &slot,
            "Building".into(),
            true,
            |running| format!("busy: {running}"),
            |_, progress: Progress<u32, String>| async move {
                progress.send(1);
                let _ = wait.await;
                Ok(2)
            },
        );
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(
            (first.parameters(), first.continues()),
            (Some(&1), Some(true))
        );
        // The slot is taken while it runs: a second job is refused with `busy`.
        let mut second = spawn_streamed(
            &slot,
            "Other".into(),
            true,
            |r| r,
            |_, _: Progress<u32, String>| async { Ok(0) },
        );
        assert_eq!(second.next().await.unwrap().unwrap_err(), "Building");
        go.send(()).unwrap();
        let last = stream.next().await.unwrap().unwrap();
        assert_eq!(
            (last.parameters(), last.continues()),
            (Some(&2), Some(false))
        );
        assert!(stream.next().await.is_none());
        assert!(slot.running().is_none());
    }

    #[tokio::test]
    async fn cancellation_reaches_the_work() {
        use futures_util::StreamExt;
        let slot = JobSlot::new(Activity::new());
        let mut stream = spawn_streamed(
            &slot,
            "Fetching".into(),
            false,
            |r| r,
            |cancel, _: Progress<u32, String>| async move {
                cancel.cancelled().await;
                Err("cancelled".to_string())
            },
        );
        assert_eq!(slot.cancel().as_deref(), Some("Fetching"));
        assert_eq!(stream.next().await.unwrap().unwrap_err(), "cancelled");
    }
}
