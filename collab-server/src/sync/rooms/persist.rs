//! A room's saving: loading its document, appending through the group committer with one commit
//! in flight at a time, retrying with backoff after a failure (the schedule is the
//! [`sync_core::relay`] policy's), flushing before the room ends, and compacting the log.
//!
//! Store outages: a failed append keeps the updates in memory and retries (0.1 s doubling to
//! 5 s); peers keep editing and see each other live, confirmations wait. Nothing is dropped.

use std::sync::atomic::Ordering;
use std::time::Duration;

use doc_store::DocStore;
use sync_core::relay::Landed;
use sync_core::{DocName, DocState};
use tokio::time::Instant;
use tracing::{Instrument, error, info, warn};

use super::actor::Actor;
use crate::sync::commit::CommitError;
use crate::tasks::Tasks;

/// A store append running while the room goes on applying and relaying.
pub(super) type CommitFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, CommitError>> + Send>>;

/// Resolves the commit in flight, or never if there is none.
pub(super) async fn landed(commit: &mut Option<CommitFuture>) -> Result<i64, CommitError> {
    match commit {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Actor {
    /// Loads the document from the store; decoding a big document is CPU work, done off the
    /// runtime's workers.
    pub(super) async fn load(&mut self) -> anyhow::Result<DocState> {
        let stored = self.env().store.load(self.doc.as_str()).await?;
        self.log_len = stored.updates.len() as u64;
        self.last_seq = stored.last_seq;
        let mut state = self
            .env()
            .tasks
            .blocking("load document", move || {
                DocState::load(stored.snapshot.iter().chain(stored.updates.iter()).map(Vec::as_slice))
            })
            .await??;
        state.set_awareness_cap(self.env().limits.max_awareness_clients);
        if self.doc.is_root() {
            state.set_tree_cap(sync_core::tree::MAX_ENTRIES);
        }
        Ok(state)
    }

    /// Starts appending `updates` (every unsaved one) to the store. The room keeps applying and
    /// relaying meanwhile; only confirmations wait.
    pub(super) fn start_commit(&mut self, updates: Vec<Vec<u8>>) {
        let committer = self.env().committer.clone();
        let doc = self.doc.as_str().to_owned();
        let metrics = self.env().metrics.clone();
        let started = Instant::now();
        self.commit = Some(Box::pin(async move {
            let result = committer.append(&doc, updates).await;
            metrics.persist_seconds.observe(started.elapsed().as_secs_f64());
            result
        }));
    }

    /// The commit in flight ended: on success its writes are confirmed and the next commit
    /// starts with whatever arrived meanwhile; on failure everything stays unsaved and a retry
    /// is scheduled.
    pub(super) fn commit_landed(&mut self, result: Result<i64, CommitError>) {
        self.commit = None;
        match self.relay.landed(result.is_ok(), Instant::now().into_std()) {
            None => {}
            Some(Landed::Saved { release, count, bytes, recovered }) => {
                if recovered {
                    let unsaved = count + self.relay.unsaved_count();
                    info!(unsaved, "document store reachable again; backlog saved");
                }
                self.log_len += count as u64;
                if let Ok(seq) = result {
                    self.last_seq = seq;
                }
                self.env().metrics.unsaved_bytes.dec_by(bytes as i64);
                self.rooms.mark_active(self.doc.project());
                self.confirm(release);
                if self.log_len >= self.env().limits.compact_threshold {
                    self.compact();
                }
                let next = self.relay.persist();
                self.drive(next);
            }
            Some(Landed::Failed { backoff, .. }) => {
                self.env().metrics.persist_errors.inc();
                let e = result.err().map(|e| e.to_string()).unwrap_or_default();
                error!(error = %e, unsaved = self.relay.unsaved_count(), retry_in = ?backoff, "could not save document; holding updates");
            }
        }
    }

    /// Merges the log into a snapshot in the background: the room keeps applying and saving
    /// while the snapshot is written. One compaction per document at a time.
    ///
    /// The snapshot is built from a fresh load of the store, not from this room's memory: it
    /// then covers exactly the updates up to the `last_seq` it passes, including any another
    /// process appended, so no process's updates can be compacted away.
    fn compact(&mut self) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, doc, tasks) = (self.env().store.clone(), self.doc.clone(), self.env().tasks.clone());
        let flag = self.compacting.clone();
        self.log_len = 0;
        let span = tracing::Span::current();
        self.env().tasks.spawn(
            "compaction",
            async move {
                if let Err(e) = compact_from_store(store.as_ref(), &doc, &tasks).await {
                    warn!(error = %e, "compaction failed; the log stays as it is");
                }
                flag.store(false, Ordering::Release);
            }
            .instrument(span),
        );
    }

    /// Saves what is unsaved before the room ends, retrying a few times.
    pub(super) async fn flush_before_exit(&mut self) {
        for attempt in 0..5u32 {
            let next = self.relay.retry();
            self.drive(next);
            while self.commit.is_some() {
                let result = landed(&mut self.commit).await;
                self.commit_landed(result);
            }
            if self.relay.is_saved() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
        }
        error!(
            unsaved = self.relay.unsaved_count(),
            "updates could not be saved before unloading; their clients still hold them"
        );
        self.env().metrics.unsaved_bytes.dec_by(self.relay.unsaved_bytes() as i64);
    }
}

/// Loads a document, merges it (off the runtime's workers), and replaces the log it covers by
/// that snapshot.
async fn compact_from_store(store: &dyn DocStore, doc: &DocName, tasks: &Tasks) -> anyhow::Result<bool> {
    let stored = store.load(doc.as_str()).await?;
    if stored.updates.is_empty() {
        return Ok(false);
    }
    let last_seq = stored.last_seq;
    let snapshot = tasks
        .blocking("compaction", move || {
            let parts = stored.snapshot.iter().chain(stored.updates.iter()).map(Vec::as_slice);
            DocState::load(parts).map(|state| state.encode_state())
        })
        .await??;
    Ok(store.compact(doc.as_str(), &snapshot, last_seq).await?)
}
