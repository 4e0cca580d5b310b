//! [`SqliteStore`]: the document store in one SQLite file, which several processes may share.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use crate::error::{from_migrate, from_sqlx};
use crate::{
    CheckpointInfo, DocStore, NewCheckpoint, StoreError, StoredDoc, checkpoint_info, compaction_past_end,
    prefix_can_match, validate_doc_name, validate_upto_seq,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for another connection or process to release the write lock
/// before failing with [`StoreError::Unavailable`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Rows per `INSERT` statement, well under SQLite's limit of 32766 bound parameters
/// (3 per row). A larger batch becomes several statements in the same transaction.
const INSERT_CHUNK_ROWS: usize = 1000;

/// How often opening retries when a concurrent opener holds the new file's lock.
const CONNECT_RETRIES: u32 = 20;

/// Connections for concurrent reads (WAL lets them run alongside the writer).
const READ_CONNECTIONS: u32 = 4;

/// SQL for "the highest seq this document has used", covering a fully compacted log.
const LAST_SEQ_SQL: &str = "SELECT MAX(\
        COALESCE((SELECT MAX(seq) FROM doc_updates WHERE doc = ?1), 0), \
        COALESCE((SELECT upto_seq FROM doc_snapshots WHERE doc = ?1), 0))";

/// The document store in a SQLite database file.
///
/// # Durability
/// The file uses the WAL journal with `synchronous = FULL`: every committed transaction is
/// fsynced to the WAL before [`DocStore::append`] or [`DocStore::compact`] returns. A
/// confirmed save therefore survives a `kill -9` of the process (which `NORMAL` would also
/// give, since the WAL is written before commit returns) *and* an OS crash or power loss
/// (which `NORMAL` would not: it may roll back the last commits). The cost is one fsync per
/// append; the server batches updates into one append per flush, so that is cheap enough,
/// and a collaboration tool that says "saved" must mean it.
///
/// # Concurrency
/// Writes run in `BEGIN IMMEDIATE` transactions, which take SQLite's database write lock
/// up front, so reading the last `seq` and inserting after it cannot interleave with another
/// writer, in this process or another one sharing the file; a writer waits up to 10 seconds
/// (the busy timeout) for the lock. Within a process, writes go through a single connection,
/// so they queue fairly in the pool instead of spinning in SQLite's busy handler. Reads use a
/// separate pool and, thanks to WAL, never wait for writers.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if needed) the database file at `path`
    /// and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        create_parent_dirs(path).await?;
        Self::open_with(SqliteConnectOptions::new().filename(path), false).await
    }

    /// Opens the database named by a `sqlite:` URL: `sqlite://relative/path.db`,
    /// `sqlite:///absolute/path.db`, or `sqlite::memory:` for a private in-memory database
    /// (lost when the store is dropped; for tests). The file and its parent directories are
    /// created if missing.
    pub async fn open_url(url: &str) -> Result<Self, StoreError> {
        let Some(rest) = url.strip_prefix("sqlite:") else {
            return Err(StoreError::Invalid("sqlite store url must start with sqlite:".to_owned()));
        };
        let in_memory = rest.starts_with(":memory:") || rest.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url).map_err(sqlite_error)?;
        if !in_memory {
            create_parent_dirs(options.get_filename()).await?;
        }
        Self::open_with(options, in_memory).await
    }

    async fn open_with(options: SqliteConnectOptions, in_memory: bool) -> Result<Self, StoreError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let filename = options.get_filename().display().to_string();

        let mut writer_options = SqlitePoolOptions::new().max_connections(1);
        if in_memory {
            // The database lives only as long as a connection to it: never close the last one.
            writer_options = writer_options.min_connections(1).idle_timeout(None).max_lifetime(None);
        }
        let writer = connect_pool(writer_options, &options).await?;
        migrate(&writer).await?;

        // A shared-cache in-memory database locks per table and reports SQLITE_LOCKED, which
        // the busy timeout does not retry: keep it on the single writer connection.
        let reader = if in_memory {
            writer.clone()
        } else {
            let reader_options = SqlitePoolOptions::new().max_connections(READ_CONNECTIONS);
            connect_pool(reader_options, &options).await?
        };
        tracing::info!(path = %filename, "opened sqlite document store");
        Ok(Self { reader, writer })
    }
}

/// Connects a pool, retrying while SQLite reports the file busy.
///
/// Switching a new file to WAL needs an exclusive lock. When two processes open a new file at
/// once, SQLite can detect a lock deadlock and answer SQLITE_BUSY at once, without waiting
/// for the busy timeout; the other process then goes on, so a short retry resolves it.
async fn connect_pool(
    pool_options: SqlitePoolOptions,
    options: &SqliteConnectOptions,
) -> Result<SqlitePool, StoreError> {
    let mut attempt = 0;
    loop {
        let err = match pool_options.clone().connect_with(options.clone()).await {
            Ok(pool) => return Ok(pool),
            Err(err) => err,
        };
        if attempt >= CONNECT_RETRIES || !is_busy(&err) {
            return Err(sqlite_error(err));
        }
        attempt += 1;
        tracing::debug!(attempt, error = %err, "sqlite file busy while connecting, retrying");
        tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))).await;
    }
}

/// Runs migrations under the database write lock, so that two processes opening a new file
/// at once do not both try to create the schema.
async fn migrate(writer: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await.map_err(sqlite_error)?;
    MIGRATOR.run(&mut *tx).await.map_err(from_migrate)?;
    tx.commit().await.map_err(sqlite_error)
}

async fn create_parent_dirs(path: &Path) -> Result<(), StoreError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(|err| StoreError::Unavailable(format!("cannot create directory {}: {err}", parent.display()).into()))
}

fn sqlite_error(err: sqlx::Error) -> StoreError {
    from_sqlx(err, is_unavailable)
}

const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CANTOPEN: i32 = 14;

/// SQLITE_BUSY (lock not released within the busy timeout), SQLITE_LOCKED, SQLITE_IOERR and
/// SQLITE_CANTOPEN: the database cannot be used right now, whatever the statement.
fn is_unavailable(err: &dyn DatabaseError) -> bool {
    matches!(primary_code_of(err), Some(SQLITE_BUSY | SQLITE_LOCKED | SQLITE_IOERR | SQLITE_CANTOPEN))
}

/// The primary SQLite result code of a database error (extended codes share its low byte).
fn primary_code_of(err: &dyn DatabaseError) -> Option<i32> {
    err.code()?.parse::<i32>().ok().map(|code| code & 0xff)
}

fn is_busy(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if primary_code_of(db.as_ref()) == Some(SQLITE_BUSY))
}

async fn last_seq(conn: &mut SqliteConnection, doc: &str) -> Result<i64, StoreError> {
    sqlx::query_scalar(LAST_SEQ_SQL).bind(doc).fetch_one(conn).await.map_err(sqlite_error)
}

#[async_trait]
impl DocStore for SqliteStore {
    async fn load(&self, doc: &str) -> Result<StoredDoc, StoreError> {
        validate_doc_name(doc)?;
        // In WAL mode the first SELECT pins a read snapshot for the whole transaction.
        let mut tx = self.reader.begin().await.map_err(sqlite_error)?;
        let snapshot: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT data, upto_seq FROM doc_snapshots WHERE doc = ?1")
                .bind(doc)
                .fetch_optional(&mut *tx)
                .await
                .map_err(sqlite_error)?;
        let upto_seq = snapshot.as_ref().map_or(0, |(_, upto)| *upto);
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, data FROM doc_updates WHERE doc = ?1 AND seq > ?2 ORDER BY seq")
                .bind(doc)
                .bind(upto_seq)
                .fetch_all(&mut *tx)
                .await
                .map_err(sqlite_error)?;
        tx.commit().await.map_err(sqlite_error)?;

        let last_seq = rows.last().map_or(upto_seq, |(seq, _)| *seq);
        Ok(StoredDoc {
            snapshot: snapshot.map(|(data, _)| data),
            updates: rows.into_iter().map(|(_, data)| data).collect(),
            last_seq,
        })
    }

    async fn append(&self, doc: &str, updates: &[Vec<u8>]) -> Result<i64, StoreError> {
        validate_doc_name(doc)?;
        if updates.is_empty() {
            let mut conn = self.reader.acquire().await.map_err(sqlite_error)?;
            return last_seq(&mut conn, doc).await;
        }
        let seqs = self.append_many(&[(doc, updates)]).await?;
        Ok(seqs[0])
    }

    async fn append_many(&self, batch: &[(&str, &[Vec<u8>])]) -> Result<Vec<i64>, StoreError> {
        for (doc, _) in batch {
            validate_doc_name(doc)?;
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(sqlite_error)?;
        let mut seqs = Vec::with_capacity(batch.len());
        for &(doc, updates) in batch {
            let mut seq = last_seq(&mut tx, doc).await?;
            for chunk in updates.chunks(INSERT_CHUNK_ROWS) {
                let mut insert = QueryBuilder::<Sqlite>::new("INSERT INTO doc_updates (doc, seq, data) ");
                insert.push_values(chunk, |mut row, data| {
                    seq += 1;
                    row.push_bind(doc).push_bind(seq).push_bind(data.as_slice());
                });
                insert.build().execute(&mut *tx).await.map_err(sqlite_error)?;
            }
            seqs.push(seq);
        }
        tx.commit().await.map_err(sqlite_error)?;
        tracing::debug!(docs = batch.len(), "appended updates");
        Ok(seqs)
    }

    async fn compact(&self, doc: &str, snapshot: &[u8], upto_seq: i64) -> Result<bool, StoreError> {
        validate_doc_name(doc)?;
        if !validate_upto_seq(upto_seq)? {
            return Ok(false);
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(sqlite_error)?;
        let last = last_seq(&mut tx, doc).await?;
        if upto_seq > last {
            tx.rollback().await.map_err(sqlite_error)?;
            return Err(compaction_past_end(upto_seq, last));
        }
        // The WHERE makes the upsert a no-op when the stored snapshot already covers upto_seq.
        let replaced = sqlx::query(
            "INSERT INTO doc_snapshots (doc, data, upto_seq, updated_at) \
             VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
             ON CONFLICT (doc) DO UPDATE SET \
                 data = excluded.data, upto_seq = excluded.upto_seq, updated_at = excluded.updated_at \
             WHERE doc_snapshots.upto_seq < excluded.upto_seq",
        )
        .bind(doc)
        .bind(snapshot)
        .bind(upto_seq)
        .execute(&mut *tx)
        .await
        .map_err(sqlite_error)?
        .rows_affected()
            == 1;
        if !replaced {
            tx.rollback().await.map_err(sqlite_error)?;
            tracing::debug!(doc_id = doc, upto_seq, "skipped stale compaction");
            return Ok(false);
        }
        let removed = sqlx::query("DELETE FROM doc_updates WHERE doc = ?1 AND seq <= ?2")
            .bind(doc)
            .bind(upto_seq)
            .execute(&mut *tx)
            .await
            .map_err(sqlite_error)?
            .rows_affected();
        tx.commit().await.map_err(sqlite_error)?;
        tracing::debug!(doc_id = doc, upto_seq, removed, "compacted document");
        Ok(true)
    }

    async fn log_len(&self, doc: &str) -> Result<u64, StoreError> {
        validate_doc_name(doc)?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM doc_updates WHERE doc = ?1 \
             AND seq > COALESCE((SELECT upto_seq FROM doc_snapshots WHERE doc = ?1), 0)",
        )
        .bind(doc)
        .fetch_one(&self.reader)
        .await
        .map_err(sqlite_error)?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    async fn delete(&self, doc: &str) -> Result<(), StoreError> {
        validate_doc_name(doc)?;
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(sqlite_error)?;
        for sql in ["DELETE FROM doc_updates WHERE doc = ?1", "DELETE FROM doc_snapshots WHERE doc = ?1"] {
            sqlx::query(sql).bind(doc).execute(&mut *tx).await.map_err(sqlite_error)?;
        }
        tx.commit().await.map_err(sqlite_error)?;
        tracing::debug!(doc_id = doc, "deleted document");
        Ok(())
    }

    async fn create_checkpoint(&self, c: &NewCheckpoint<'_>) -> Result<i64, StoreError> {
        for (doc, _) in c.docs {
            validate_doc_name(doc)?;
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(sqlite_error)?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO checkpoints (project, name, author, created_at) VALUES (?1, ?2, ?3, ?4) RETURNING id",
        )
        .bind(c.project)
        .bind(c.name)
        .bind(c.author)
        .bind(c.created_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(sqlite_error)?;
        for (doc, data) in c.docs {
            sqlx::query("INSERT INTO checkpoint_docs (checkpoint_id, doc, data) VALUES (?1, ?2, ?3)")
                .bind(id)
                .bind(doc)
                .bind(data)
                .execute(&mut *tx)
                .await
                .map_err(sqlite_error)?;
        }
        tx.commit().await.map_err(sqlite_error)?;
        Ok(id)
    }

    async fn list_checkpoints(&self, project: &str) -> Result<Vec<CheckpointInfo>, StoreError> {
        let rows: Vec<(i64, String, String, i64, i64)> = sqlx::query_as(
            "SELECT c.id, c.name, c.author, c.created_at, \
             (SELECT COUNT(*) FROM checkpoint_docs d WHERE d.checkpoint_id = c.id) \
             FROM checkpoints c WHERE c.project = ?1 ORDER BY c.id",
        )
        .bind(project)
        .fetch_all(&self.reader)
        .await
        .map_err(sqlite_error)?;
        Ok(rows.into_iter().map(checkpoint_info).collect())
    }

    async fn load_checkpoint(&self, project: &str, id: i64) -> Result<Option<Vec<(String, Vec<u8>)>>, StoreError> {
        let mut tx = self.reader.begin().await.map_err(sqlite_error)?;
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM checkpoints WHERE id = ?1 AND project = ?2")
            .bind(id)
            .bind(project)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sqlite_error)?;
        if found.is_none() {
            return Ok(None);
        }
        let docs = sqlx::query_as("SELECT doc, data FROM checkpoint_docs WHERE checkpoint_id = ?1 ORDER BY doc")
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(sqlite_error)?;
        Ok(Some(docs))
    }

    async fn delete_checkpoint(&self, project: &str, id: i64) -> Result<(), StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(sqlite_error)?;
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM checkpoints WHERE id = ?1 AND project = ?2")
            .bind(id)
            .bind(project)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sqlite_error)?;
        if found.is_some() {
            // Explicit rather than relying on foreign-key enforcement being switched on.
            sqlx::query("DELETE FROM checkpoint_docs WHERE checkpoint_id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(sqlite_error)?;
            sqlx::query("DELETE FROM checkpoints WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(sqlite_error)?;
        }
        tx.commit().await.map_err(sqlite_error)?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        if !prefix_can_match(prefix) {
            return Ok(Vec::new());
        }
        // substr/length rather than LIKE, which is case-insensitive and treats % and _ specially.
        // The default BINARY collation orders by UTF-8 bytes.
        sqlx::query_scalar(
            "SELECT doc FROM doc_updates WHERE substr(doc, 1, length(?1)) = ?1 \
             UNION \
             SELECT doc FROM doc_snapshots WHERE substr(doc, 1, length(?1)) = ?1 \
             ORDER BY doc",
        )
        .bind(prefix)
        .fetch_all(&self.reader)
        .await
        .map_err(sqlite_error)
    }
}

#[cfg(test)]
mod tests {
    //! Checks that the durability settings documented on [`SqliteStore`] are really applied.

    use super::*;

    #[tokio::test]
    async fn connections_use_wal_full_sync_and_busy_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("nested/dir/docs.db")).await.unwrap();
        for pool in [&store.reader, &store.writer] {
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(pool).await.unwrap();
            assert_eq!(journal, "wal");
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(pool).await.unwrap();
            assert_eq!(synchronous, 2, "synchronous should be FULL");
            let busy_timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout").fetch_one(pool).await.unwrap();
            assert_eq!(busy_timeout, 10_000);
        }
    }
}
