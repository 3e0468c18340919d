//! Knowing when a service is idle: open connections and running jobs are counted, and the
//! service stops accepting once both have been zero for the idle timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// Counts of what keeps a service busy. Cheap to clone; every clone is the same counter.
#[derive(Debug, Clone)]
pub struct Activity {
    inner: Arc<ActivityInner>,
}

#[derive(Debug)]
struct ActivityInner {
    connections: AtomicUsize,
    jobs: AtomicUsize,
    /// Bumped on every change, so waiters restart their idle timer.
    changed: watch::Sender<u64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A new counter with nothing active.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ActivityInner {
                connections: AtomicUsize::new(0),
                jobs: AtomicUsize::new(0),
                changed: watch::channel(0).0,
            }),
        }
    }

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Running jobs.
    pub fn jobs(&self) -> usize {
        self.inner.jobs.load(Ordering::SeqCst)
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Marks a job as running until the guard is dropped.
    pub fn job(&self) -> ActivityGuard {
        self.inner.jobs.fetch_add(1, Ordering::SeqCst);
        self.bump();
        ActivityGuard {
            activity: self.clone(),
            kind: Kind::Job,
        }
    }

    pub(crate) fn connection(&self) -> ActivityGuard {
        self.inner.connections.fetch_add(1, Ordering::SeqCst);
        self.bump();
        ActivityGuard {
            activity: self.clone(),
            kind: Kind::Connection,
        }
    }

    /// Resolves once nothing has been active for `timeout` in a row.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut changes = self.inner.changed.subscribe();
        loop {
            changes.mark_unchanged();
            let busy = self.connections() > 0 || self.jobs() > 0;
            if busy {
                // Wait for something to change, then look again.
                if changes.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {
                    if self.connections() == 0 && self.jobs() == 0 {
                        return;
                    }
                }
                r = changes.changed() => if r.is_err() { return },
            }
        }
    }

    /// Resolves at the next change of either count.
    pub async fn changed(&self) {
        let mut changes = self.inner.changed.subscribe();
        let _ = changes.changed().await;
    }

    /// Resolves once no job runs.
    pub async fn jobs_done(&self) {
        let mut changes = self.inner.changed.subscribe();
        while self.jobs() > 0 {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Connection,
    Job,
}

/// Keeps a connection or job counted while alive.
#[derive(Debug)]
pub struct ActivityGuard {
    activity: Activity,
    kind: Kind,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let counter = match self.kind {
            Kind::Connection => &self.activity.inner.connections,
            Kind::Job => &self.activity.inner.jobs,
        };
        counter.fetch_sub(1, Ordering::SeqCst);
        self.activity.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_jobs_and_connections() {
        let activity = Activity::new();
        let job = activity.job();
        let waiter = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.idle_for(Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!waiter.is_finished(), "idle while a job runs");
        drop(job);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            !waiter.is_finished(),
            "idle before the timeout after the job ended"
        );
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(waiter.is_finished(), "not idle 35 s after the job ended");
    }
}
