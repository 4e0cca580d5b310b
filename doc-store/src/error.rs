//! `StoreError`: what can go wrong in a document store, classified for operators and callers.

use sqlx::error::DatabaseError;

/// A boxed cause, so that no database driver type appears in doc-store's public API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a [`DocStore`](crate::DocStore) call failed.
///
/// Messages are written for operators (logs, startup failures). They may contain database
/// details and must not be forwarded to clients: map them to a generic error at the edge.
/// Each message already includes its cause, so the variants report no separate `source()`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The request was rejected before reaching the database: an unsupported or malformed
    /// store URL, an invalid document name or sequence number. Retrying will not help.
    #[error("invalid document store request: {0}")]
    Invalid(String),
    /// The database could not be reached, or was too busy or short of resources to answer.
    /// Retrying later may succeed; nothing was written.
    #[error("document store unavailable: {0}")]
    Unavailable(BoxError),
    /// The schema could not be brought up to date when the store was opened.
    #[error("document store schema migration failed: {0}")]
    Migration(BoxError),
    /// Any other database failure (constraint violation, corrupt data, driver bug).
    #[error("document store database error: {0}")]
    Database(BoxError),
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Classifies a sqlx error. `is_unavailable` decides, per backend, which database error
/// codes mean "could not reach or use the database right now" rather than a failed statement.
pub(crate) fn from_sqlx(err: sqlx::Error, is_unavailable: impl Fn(&dyn DatabaseError) -> bool) -> StoreError {
    match &err {
        sqlx::Error::Configuration(_) => StoreError::Invalid(err.to_string()),
        sqlx::Error::Database(db) if is_unavailable(db.as_ref()) => StoreError::Unavailable(Box::new(err)),
        _ if is_connection_failure(&err) => StoreError::Unavailable(Box::new(err)),
        sqlx::Error::Migrate(_) => StoreError::Migration(Box::new(err)),
        _ => StoreError::Database(Box::new(err)),
    }
}

/// Classifies a failure to run migrations: a lost connection is still `Unavailable`.
pub(crate) fn from_migrate(err: sqlx::migrate::MigrateError) -> StoreError {
    match &err {
        sqlx::migrate::MigrateError::Execute(inner) if is_connection_failure(inner) => {
            StoreError::Unavailable(Box::new(err))
        }
        _ => StoreError::Migration(Box::new(err)),
    }
}

/// Driver-level failures that mean no usable connection, whatever the backend.
fn is_connection_failure(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}
