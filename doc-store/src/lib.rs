//! Persistence for CRDT documents: an append-only log of opaque update blobs per document, plus compacted snapshots.
//!
//! doc-store knows nothing about WebSockets, HTTP or yrs: the server hands it bytes (Yjs v1
//! updates) and gets the same bytes back. It never parses or merges them; merging a snapshot
//! with the updates it covers is the caller's job, done before [`DocStore::compact`].
//!
//! Two implementations share one conformance suite ([`conformance`]):
//! [`SqliteStore`] (one file, several processes may share it) and [`PostgresStore`].
//! [`open_store`] picks one from a URL.
//!
//! # Model
//! Each document has a log of updates numbered by `seq` (1, 2, 3, ... per document, never
//! reused while the document exists) and at most one snapshot, which is the merged state of
//! every update with `seq <= upto_seq`. Loading a document returns the snapshot and every
//! update logged after it; applying them in order rebuilds the document.

use std::sync::Arc;

use async_trait::async_trait;

#[doc(hidden)]
pub mod conformance;
mod error;
mod postgres;
mod sqlite;

pub use error::{BoxError, StoreError};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// A document as stored: the latest snapshot and the updates logged after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDoc {
    /// Merged state of every update with `seq <= upto_seq` of the snapshot, if the document
    /// was ever compacted.
    pub snapshot: Option<Vec<u8>>,
    /// Updates logged after the snapshot, in `seq` order.
    pub updates: Vec<Vec<u8>>,
    /// The highest `seq` covered by the snapshot or the updates; 0 for an empty document.
    /// A caller that merged everything loaded may pass it to [`DocStore::compact`].
    pub last_seq: i64,
}

/// Stores CRDT documents as opaque byte blobs.
///
/// Document names are free-form UTF-8 (slashes and any Unicode allowed) but must be non-empty
/// and contain no NUL character; others are rejected with [`StoreError::Invalid`].
///
/// Every method is safe to call concurrently, from several tasks and from several processes
/// sharing one database.
#[async_trait]
pub trait DocStore: Send + Sync + 'static {
    /// Loads the latest snapshot and every update logged after it, in order, as one
    /// consistent read (a concurrent compaction is seen entirely or not at all).
    /// A document that does not exist loads as [`StoredDoc::default()`].
    async fn load(&self, doc: &str) -> Result<StoredDoc, StoreError>;

    /// Appends updates to the document's log in one transaction and returns the `seq` of the
    /// last one. They get consecutive `seq`s, higher than any existing one. Once this returns
    /// `Ok`, the updates are durable. With no updates, writes nothing and returns the current
    /// last `seq` (0 for an empty document).
    async fn append(&self, doc: &str, updates: &[Vec<u8>]) -> Result<i64, StoreError>;

    /// Appends to several documents' logs in ONE transaction (group commit) and returns, in
    /// input order, the `seq` of the last update appended to each. All or nothing: if any name
    /// is invalid or the transaction fails, nothing is written.
    async fn append_many(&self, batch: &[(&str, &[Vec<u8>])]) -> Result<Vec<i64>, StoreError>;

    /// Atomically replaces the snapshot and every log entry with `seq <= upto_seq` by
    /// `snapshot`, and returns `Ok(true)`.
    ///
    /// `snapshot` must be the merged state of the current snapshot and *every* update with
    /// `seq <= upto_seq`, including ones appended by other processes: the simplest safe way is
    /// to merge what [`load`](DocStore::load) returned and pass its `last_seq`.
    ///
    /// Returns `Ok(false)` and changes nothing if the stored snapshot already covers
    /// `upto_seq` (another process compacted further) or if `upto_seq` is 0. Fails with
    /// [`StoreError::Invalid`] if `upto_seq` is negative or beyond the last `seq` of the log.
    async fn compact(&self, doc: &str, snapshot: &[u8], upto_seq: i64) -> Result<bool, StoreError>;

    /// Number of log entries after the snapshot (to decide when to compact).
    async fn log_len(&self, doc: &str) -> Result<u64, StoreError>;

    /// Deletes the document's snapshot and log. Deleting a missing document is not an error.
    /// A document appended to afterwards starts again at `seq` 1.
    async fn delete(&self, doc: &str) -> Result<(), StoreError>;

    /// Names of stored documents starting with `prefix` (compared exactly, case-sensitively),
    /// sorted by their UTF-8 bytes, as `str`'s `Ord` does.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Saves a named checkpoint of a project: the full state of each of its documents, in one
    /// transaction. Returns the checkpoint's id (increasing).
    async fn create_checkpoint(&self, checkpoint: &NewCheckpoint<'_>) -> Result<i64, StoreError>;

    /// A project's checkpoints, oldest first.
    async fn list_checkpoints(&self, project: &str) -> Result<Vec<CheckpointInfo>, StoreError>;

    /// The documents saved in one checkpoint of `project`, sorted by name; `None` if there is no
    /// such checkpoint in that project.
    async fn load_checkpoint(&self, project: &str, id: i64) -> Result<Option<Vec<(String, Vec<u8>)>>, StoreError>;

    /// Deletes a checkpoint of `project` (for retention); deleting a missing one is not an error.
    async fn delete_checkpoint(&self, project: &str, id: i64) -> Result<(), StoreError>;
}

/// A checkpoint to save.
#[derive(Debug, Clone)]
pub struct NewCheckpoint<'a> {
    pub project: &'a str,
    pub name: &'a str,
    pub author: &'a str,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Each document's full state.
    pub docs: &'a [(String, Vec<u8>)],
}

/// A saved checkpoint, without its documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub id: i64,
    pub name: String,
    pub author: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub docs: i64,
}

/// Opens the store named by `url`, creating the database schema if needed.
///
/// - `sqlite://PATH`, `sqlite:PATH` or `sqlite::memory:`: see [`SqliteStore::open_url`].
/// - `postgres://...` or `postgresql://...`: see [`PostgresStore::connect`].
pub async fn open_store(url: &str) -> Result<Arc<dyn DocStore>, StoreError> {
    let Some((scheme, _)) = url.split_once(':') else {
        return Err(StoreError::Invalid(
            "store url has no scheme: expected sqlite:, postgres: or postgresql:".to_owned(),
        ));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => Ok(Arc::new(SqliteStore::open_url(url).await?)),
        "postgres" | "postgresql" => Ok(Arc::new(PostgresStore::connect(url).await?)),
        // Only the scheme is echoed: the rest of a URL may hold a password.
        _ => Err(StoreError::Invalid(format!(
            "unsupported store url scheme `{scheme}`: expected sqlite:, postgres: or postgresql:"
        ))),
    }
}

/// A `checkpoints` row with its document count, as both backends select it.
fn checkpoint_info((id, name, author, created_at, docs): (i64, String, String, i64, i64)) -> CheckpointInfo {
    CheckpointInfo { id, name, author, created_at, docs }
}

/// Rejects names that one backend could not store the same way as the other.
fn validate_doc_name(doc: &str) -> Result<(), StoreError> {
    if doc.is_empty() {
        return Err(StoreError::Invalid("document name is empty".to_owned()));
    }
    if doc.contains('\0') {
        return Err(StoreError::Invalid("document name contains a NUL character".to_owned()));
    }
    Ok(())
}

/// Whether any valid document name can start with `prefix` (none contains NUL, which
/// PostgreSQL cannot even compare).
fn prefix_can_match(prefix: &str) -> bool {
    !prefix.contains('\0')
}

/// Checks a compaction's `upto_seq` before touching the database; `Ok(false)` means there is
/// nothing to compact.
fn validate_upto_seq(upto_seq: i64) -> Result<bool, StoreError> {
    if upto_seq < 0 {
        return Err(StoreError::Invalid(format!("compaction upto_seq {upto_seq} is negative")));
    }
    Ok(upto_seq > 0)
}

/// The error for a compaction claiming to cover updates that were never logged.
fn compaction_past_end(upto_seq: i64, last_seq: i64) -> StoreError {
    StoreError::Invalid(format!("compaction upto_seq {upto_seq} is beyond the last logged seq {last_seq}"))
}
