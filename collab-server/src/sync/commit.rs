//! Group commit: every room's appends go through one task that writes whatever has queued up
//! into the store in one transaction (`DocStore::append_many`), so a busy server pays one
//! commit, one fsync, for many documents' updates.
//!
//! Batching needs no timer: while one transaction commits, the next requests queue, and the
//! next transaction takes all of them (up to `--commit-batch`). `--commit-interval` can add a
//! short wait to gather more per transaction, at the cost of that much confirmation latency.
//!
//! The committer is supervised: every room's saving depends on it, so if it dies (a panic in the
//! store, say) it must not die quietly, leaving every append to be retried forever. A death is
//! logged at ERROR and counted (`collab_task_failures_total{task="committer"}`), the appends it
//! held fail (their rooms retry them), and it restarts at once with the same queue. Dying
//! [`DEATHS_BEFORE_SHUTDOWN`] times within [`DEATH_WINDOW`] shuts the server down (every room still
//! flushes through the restarted committer on its way out).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use doc_store::{DocStore, StoreError};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::metrics::Metrics;
use crate::tasks::{Tasks, panic_message};

/// Deaths of the committer within [`DEATH_WINDOW`] that make the server shut down.
pub const DEATHS_BEFORE_SHUTDOWN: usize = 5;
pub const DEATH_WINDOW: Duration = Duration::from_secs(60);

struct Request {
    doc: String,
    updates: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<i64, Arc<StoreError>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("{0}")]
    Store(Arc<StoreError>),
    #[error("the committer stopped")]
    Stopped,
}

/// A handle to the group-commit task; cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Committer")
    }
}

impl Committer {
    /// Starts the task, supervised (see the module docs). It ends when every handle is dropped,
    /// after serving what is queued.
    pub fn start(
        store: Arc<dyn DocStore>,
        metrics: Arc<Metrics>,
        (interval, max_batch): (Duration, usize),
        tasks: &Tasks,
    ) -> Committer {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let supervised = tasks.clone();
        tasks.spawn_service("committer", |stop| supervise(store, metrics, rx, (interval, max_batch), supervised, stop));
        Committer { tx }
    }

    /// Appends `updates` to `doc`'s log as part of the next group; returns its last `seq` once
    /// the transaction holding it has committed.
    pub async fn append(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<i64, CommitError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request { doc: doc.to_owned(), updates, reply }).await.map_err(|_| CommitError::Stopped)?;
        rx.await.map_err(|_| CommitError::Stopped)?.map_err(CommitError::Store)
    }
}

/// Runs the committer, restarting it whenever it dies; shuts the server down when it keeps dying.
async fn supervise(
    store: Arc<dyn DocStore>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Request>,
    (interval, max_batch): (Duration, usize),
    tasks: Tasks,
    stop: CancellationToken,
) {
    let mut deaths: VecDeque<Instant> = VecDeque::new();
    loop {
        let run = run(store.as_ref(), &metrics, &mut rx, (interval, max_batch), &stop);
        let ran = AssertUnwindSafe(run).catch_unwind().await;
        let Err(panic) = ran else { return };
        tasks.failed("committer", &panic_message(panic.as_ref()));
        let now = Instant::now();
        deaths.push_back(now);
        while deaths.front().is_some_and(|t| now.duration_since(*t) > DEATH_WINDOW) {
            deaths.pop_front();
        }
        if deaths.len() >= DEATHS_BEFORE_SHUTDOWN && !tasks.shutdown().is_cancelled() {
            error!(deaths = deaths.len(), "the group committer keeps dying; shutting the server down");
            tasks.shutdown().cancel();
        } else {
            error!("the group committer died; restarting it (the appends it held are retried by their rooms)");
        }
    }
}

async fn run(
    store: &dyn DocStore,
    metrics: &Metrics,
    rx: &mut mpsc::Receiver<Request>,
    (interval, max_batch): (Duration, usize),
    stop: &CancellationToken,
) {
    let mut requests = Vec::with_capacity(max_batch);
    loop {
        // Queued requests first: `stop` comes once nobody appends any more.
        let received = tokio::select! {
            biased;
            n = rx.recv_many(&mut requests, max_batch) => n,
            _ = stop.cancelled() => 0,
        };
        if received == 0 {
            return;
        }
        if !interval.is_zero() && requests.len() < max_batch {
            tokio::time::sleep(interval).await;
            while requests.len() < max_batch {
                match rx.try_recv() {
                    Ok(request) => requests.push(request),
                    Err(_) => break,
                }
            }
        }
        let batch: Vec<(&str, &[Vec<u8>])> = requests.iter().map(|r| (r.doc.as_str(), r.updates.as_slice())).collect();
        metrics.commits.inc();
        metrics.commit_appends.inc_by(batch.len() as u64);
        let result = store.append_many(&batch).await;
        drop(batch);
        match result {
            Ok(seqs) => {
                for (request, seq) in requests.drain(..).zip(seqs) {
                    let _ = request.reply.send(Ok(seq));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for request in requests.drain(..) {
                    let _ = request.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use doc_store::{CheckpointInfo, NewCheckpoint, StoredDoc};

    use super::*;

    /// A store whose group appends panic the first `panics` times, and then succeed.
    struct Dying {
        panics: AtomicUsize,
    }

    #[async_trait]
    impl DocStore for Dying {
        async fn load(&self, _: &str) -> Result<StoredDoc, StoreError> {
            Ok(StoredDoc::default())
        }
        async fn append(&self, _: &str, _: &[Vec<u8>]) -> Result<i64, StoreError> {
            Ok(1)
        }
        async fn append_many(&self, batch: &[(&str, &[Vec<u8>])]) -> Result<Vec<i64>, StoreError> {
            let left = self.panics.load(Ordering::SeqCst);
            if left > 0 {
                self.panics.store(left - 1, Ordering::SeqCst);
                panic!("the store broke");
            }
            Ok(vec![1; batch.len()])
        }
        async fn compact(&self, _: &str, _: &[u8], _: i64) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn log_len(&self, _: &str) -> Result<u64, StoreError> {
            Ok(0)
        }
        async fn delete(&self, _: &str) -> Result<(), StoreError> {
            Ok(())
        }
        async fn list(&self, _: &str) -> Result<Vec<String>, StoreError> {
            Ok(Vec::new())
        }
        async fn create_checkpoint(&self, _: &NewCheckpoint<'_>) -> Result<i64, StoreError> {
            Ok(1)
        }
        async fn list_checkpoints(&self, _: &str) -> Result<Vec<CheckpointInfo>, StoreError> {
            Ok(Vec::new())
        }
        async fn load_checkpoint(&self, _: &str, _: i64) -> Result<Option<Vec<(String, Vec<u8>)>>, StoreError> {
            Ok(None)
        }
        async fn delete_checkpoint(&self, _: &str, _: i64) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn failures(metrics: &Metrics) -> String {
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix("collab_task_failures_total{task=\"committer\"} "))
            .unwrap_or("0")
            .to_owned()
    }

    fn start(panics: usize) -> (Committer, Arc<Metrics>, Tasks) {
        let metrics = Arc::new(Metrics::new());
        let tasks = Tasks::new(metrics.clone());
        let store = Arc::new(Dying { panics: AtomicUsize::new(panics) });
        let committer = Committer::start(store, metrics.clone(), (Duration::ZERO, 8), &tasks);
        (committer, metrics, tasks)
    }

    #[tokio::test]
    async fn a_dying_committer_is_noticed_and_restarted() {
        let (committer, metrics, tasks) = start(1);
        let first = tokio::time::timeout(Duration::from_secs(10), committer.append("d", vec![vec![1]])).await;
        assert!(matches!(first, Ok(Err(CommitError::Stopped))), "the append it held fails, for its room to retry");
        assert_eq!(failures(&metrics), "1", "the death is counted");
        let second = tokio::time::timeout(Duration::from_secs(10), committer.append("d", vec![vec![1]])).await;
        assert!(matches!(second, Ok(Ok(1))), "the restarted committer saves the retry");
        assert!(!tasks.shutdown().is_cancelled());
    }

    #[tokio::test]
    async fn a_committer_that_keeps_dying_shuts_the_server_down() {
        let (committer, metrics, tasks) = start(DEATHS_BEFORE_SHUTDOWN);
        for _ in 0..DEATHS_BEFORE_SHUTDOWN {
            let append = tokio::time::timeout(Duration::from_secs(10), committer.append("d", vec![vec![1]])).await;
            assert!(matches!(append, Ok(Err(CommitError::Stopped))));
        }
        assert_eq!(failures(&metrics), DEATHS_BEFORE_SHUTDOWN.to_string());
        tokio::time::timeout(Duration::from_secs(10), tasks.shutdown().cancelled()).await.expect("shutdown");
        let after = tokio::time::timeout(Duration::from_secs(10), committer.append("d", vec![vec![1]])).await;
        assert!(matches!(after, Ok(Ok(1))), "it still serves the flush on the way out");
    }
}
