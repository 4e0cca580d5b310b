//! Every task the server spawns runs here: under one `TaskTracker` (shutdown waits for all of
//! them) and one `CancellationToken`, and a task that panics or returns an error is logged and
//! counted in `collab_task_failures_total{task=...}`, never lost silently.
//!
//! Shutdown has two phases: [`Tasks::wait`] waits for every task, then stops and waits for the
//! services those tasks needed to the end (the group committer, which the rooms flush through on
//! their way out), spawned with [`Tasks::spawn_service`].
//!
//! Blocking or CPU-heavy work (archives, diffs, snapshot decodes, compaction, filesystem walks)
//! goes through [`Tasks::blocking`], onto tokio's blocking pool, never onto a runtime worker.

use std::any::Any;
use std::fmt::Display;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

use crate::metrics::Metrics;

/// The node's task set; cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Services stop once every other task ended.
    services: TaskTracker,
    services_stop: CancellationToken,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").field("tracked", &self.tracker.len()).finish_non_exhaustive()
    }
}

/// A blocking job panicked (it was logged and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an internal task failed")]
pub struct TaskFailed;

impl Tasks {
    pub fn new(metrics: Arc<Metrics>) -> Tasks {
        Tasks {
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            services: TaskTracker::new(),
            services_stop: CancellationToken::new(),
            metrics,
        }
    }

    /// Waits for every task, then stops the services and waits for them (call after the
    /// shutdown token is cancelled).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
        self.services_stop.cancel();
        self.services.close();
        self.services.wait().await;
    }

    /// Spawns a service: a task that other tasks depend on until they end. `stop` is cancelled
    /// once every other task ended; the service then finishes what it holds and returns.
    pub fn spawn_service<F>(&self, name: &'static str, service: impl FnOnce(CancellationToken) -> F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let task = self.track_on(&self.services, name, service(self.services_stop.clone()));
        self.services.spawn(task)
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// The one shutdown signal.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Spawns `task` under the tracker; a panic is logged and counted as a failure of `name`.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(self.track(name, task))
    }

    fn track_on<F>(&self, tracker: &TaskTracker, name: &'static str, task: F) -> impl Future<Output = ()> + use<F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let tasks = self.clone();
        tracker.track_future(async move {
            if let Err(panic) = AssertUnwindSafe(task).catch_unwind().await {
                tasks.failed(name, &panic_message(panic.as_ref()));
            }
        })
    }

    /// [`Tasks::spawn`] for a task that can fail: an error is logged and counted like a panic.
    pub fn spawn_fallible<F, E>(&self, name: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let tasks = self.clone();
        self.spawn(name, async move {
            if let Err(e) = task.await {
                tasks.failed(name, &e);
            }
        })
    }

    /// `task` tracked and watched, for a caller that runs it itself (axum's upgrade handlers).
    pub fn track<F>(&self, name: &'static str, task: F) -> impl Future<Output = ()> + Send + 'static + use<F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.track_on(&self.tracker, name, task)
    }

    /// Runs `job` on the blocking pool under the tracker and returns what it returns; a panic is
    /// logged, counted, and returned as [`TaskFailed`].
    pub async fn blocking<R, J>(&self, name: &'static str, job: J) -> Result<R, TaskFailed>
    where
        J: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        match self.tracker.spawn_blocking(job).await {
            Ok(value) => Ok(value),
            Err(e) => {
                let what = if e.is_panic() { panic_message(e.into_panic().as_ref()) } else { e.to_string() };
                self.failed(name, &what);
                Err(TaskFailed)
            }
        }
    }

    /// Logs and counts a failure of the task `name`.
    pub fn failed(&self, name: &'static str, what: &dyn Display) {
        self.metrics.task_failures.get_or_create(&vec![("task".to_owned(), name.to_owned())]).inc();
        error!(task = name, error = %what, "task failed");
    }
}

/// The text a panic carried, if it was a string.
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => format!("panicked: {s}"),
        (_, Some(s)) => format!("panicked: {s}"),
        _ => "panicked".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failures(metrics: &Metrics, task: &str) -> String {
        let text = metrics.render();
        let prefix = format!("collab_task_failures_total{{task=\"{task}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or("0").to_owned()
    }

    #[tokio::test]
    async fn a_panicking_or_failing_task_is_counted() {
        let metrics = Arc::new(Metrics::new());
        let tasks = Tasks::new(metrics.clone());
        tasks.spawn("boom", async { panic!("on purpose") });
        tasks.spawn_fallible("err", async { Err::<(), _>("on purpose") });
        tasks.spawn("fine", async {});
        assert_eq!(tasks.blocking("job", || panic!("on purpose")).await, Err::<(), _>(TaskFailed));
        assert_eq!(tasks.blocking("job", || 7).await, Ok(7));
        tasks.tracker().close();
        tokio::time::timeout(std::time::Duration::from_secs(10), tasks.tracker().wait()).await.expect("all ended");
        assert_eq!(failures(&metrics, "boom"), "1");
        assert_eq!(failures(&metrics, "err"), "1");
        assert_eq!(failures(&metrics, "job"), "1");
        assert_eq!(failures(&metrics, "fine"), "0");
    }
}
