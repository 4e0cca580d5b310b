//! Group commit: every room's appends go through one task that writes whatever has queued up
//! into the store in one transaction (`DocStore::append_many`), so a busy server pays one
//! commit, one fsync, for many documents' updates.
//!
//! Batching needs no timer: while one transaction commits, the next requests queue, and the
//! next transaction takes all of them (up to `--commit-batch`). `--commit-interval` can add a
//! short wait to gather more per transaction, at the cost of that much confirmation latency.

use std::sync::Arc;
use std::time::Duration;

use doc_store::{DocStore, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

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
    /// Starts the task. It ends when every handle is dropped, after serving what is queued.
    pub fn start(store: Arc<dyn DocStore>, metrics: Arc<Metrics>, interval: Duration, max_batch: usize) -> Committer {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        tokio::spawn(run(store, metrics, rx, interval, max_batch));
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

async fn run(
    store: Arc<dyn DocStore>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Request>,
    interval: Duration,
    max_batch: usize,
) {
    let mut requests = Vec::with_capacity(max_batch);
    loop {
        if rx.recv_many(&mut requests, max_batch).await == 0 {
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
