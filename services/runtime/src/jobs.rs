//! One state-changing job at a time, cancellable, visible in `systemctl status`.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

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

impl Job {
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
}
