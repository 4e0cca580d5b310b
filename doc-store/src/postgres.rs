//! [`PostgresStore`]: the document store in PostgreSQL, shared by any number of server processes.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::error::{from_migrate, from_sqlx};
use crate::{
    CheckpointInfo, DocStore, NewCheckpoint, StoreError, StoredDoc, checkpoint_info, compaction_past_end,
    prefix_can_match, validate_doc_name, validate_upto_seq,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per store handle (per server process).
const MAX_CONNECTIONS: u32 = 10;

/// How long a call waits for a free connection before failing with [`StoreError::Unavailable`].
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// First key of doc-store's advisory locks ("docs" in ASCII), so they cannot collide with
/// advisory locks taken by other software sharing the database.
const DOC_LOCK_CLASS: i32 = 0x646f_6373;

/// SQL for "the highest seq this document has used", covering a fully compacted log.
const LAST_SEQ_SQL: &str = "SELECT GREATEST(\
        COALESCE((SELECT MAX(seq) FROM doc_updates WHERE doc = $1), 0), \
        COALESCE((SELECT upto_seq FROM doc_snapshots WHERE doc = $1), 0))";

/// The document store in a PostgreSQL database.
///
/// # Durability
/// A call returns after PostgreSQL has committed, i.e. (with the server's default
/// `synchronous_commit = on`) after the commit is flushed to its WAL.
///
/// # Concurrency
/// Every write (append, compact, delete) first takes a per-document, transaction-scoped
/// advisory lock, `pg_advisory_xact_lock(0x646f6373, hashtext(doc))`, so the writes to one
/// document are serialized across all processes while different documents proceed in
/// parallel. Under that lock, reading `max(seq)` and inserting after it cannot race, so no
/// unique-violation retry loop is needed. An advisory lock is used rather than a row lock
/// because a new document has no row to lock yet; a hash collision between two names only
/// makes their writes wait for each other. The lock is released at commit, after the commit
/// is visible, so the next writer always sees the rows of the previous one.
///
/// [`DocStore::load`] reads in a `REPEATABLE READ` transaction, so the snapshot and the
/// updates it returns come from one consistent view.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to the database at a `postgres://` or `postgresql://` URL and brings its
    /// schema up to date. Fails with [`StoreError::Unavailable`] if the server cannot be
    /// reached, so a misconfigured deployment fails at startup.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("postgres:") || lower.starts_with("postgresql:")) {
            return Err(StoreError::Invalid("postgres store url must start with postgres: or postgresql:".to_owned()));
        }
        let options = PgConnectOptions::from_str(url).map_err(pg_error)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(pg_error)?;
        // sqlx serializes concurrent migrators with an advisory lock of its own.
        MIGRATOR.run(&pool).await.map_err(from_migrate)?;
        tracing::info!("connected to postgres document store");
        Ok(Self { pool })
    }

    /// Begins a write transaction holding the document's advisory lock.
    async fn begin_write(&self, doc: &str) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(pg_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(DOC_LOCK_CLASS)
            .bind(doc)
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?;
        Ok(tx)
    }
}

fn pg_error(err: sqlx::Error) -> StoreError {
    from_sqlx(err, is_unavailable)
}

/// SQLSTATE classes 08 (connection exception), 28 (invalid authorization), 53 (insufficient
/// resources) and 57P01-57P03 (server shutting down or starting up).
fn is_unavailable(err: &dyn DatabaseError) -> bool {
    let Some(code) = err.code() else {
        return false;
    };
    ["08", "28", "53"].iter().any(|class| code.starts_with(class)) || matches!(&*code, "57P01" | "57P02" | "57P03")
}

async fn last_seq(conn: &mut PgConnection, doc: &str) -> Result<i64, StoreError> {
    sqlx::query_scalar(LAST_SEQ_SQL).bind(doc).fetch_one(conn).await.map_err(pg_error)
}

#[async_trait]
impl DocStore for PostgresStore {
    async fn load(&self, doc: &str) -> Result<StoredDoc, StoreError> {
        validate_doc_name(doc)?;
        let mut tx =
            self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(pg_error)?;
        let snapshot: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT data, upto_seq FROM doc_snapshots WHERE doc = $1")
                .bind(doc)
                .fetch_optional(&mut *tx)
                .await
                .map_err(pg_error)?;
        let upto_seq = snapshot.as_ref().map_or(0, |(_, upto)| *upto);
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, data FROM doc_updates WHERE doc = $1 AND seq > $2 ORDER BY seq")
                .bind(doc)
                .bind(upto_seq)
                .fetch_all(&mut *tx)
                .await
                .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;

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
            let mut conn = self.pool.acquire().await.map_err(pg_error)?;
            return last_seq(&mut conn, doc).await;
        }
        let seqs = self.append_many(&[(doc, updates)]).await?;
        Ok(seqs[0])
    }

    async fn append_many(&self, batch: &[(&str, &[Vec<u8>])]) -> Result<Vec<i64>, StoreError> {
        for (doc, _) in batch {
            validate_doc_name(doc)?;
        }
        let mut tx = self.pool.begin().await.map_err(pg_error)?;
        // Per-document locks in one global order, so two processes' groups cannot deadlock.
        let mut names: Vec<&str> = batch.iter().map(|&(d, _)| d).collect();
        names.sort_unstable();
        names.dedup();
        for doc in names {
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                .bind(DOC_LOCK_CLASS)
                .bind(doc)
                .execute(&mut *tx)
                .await
                .map_err(pg_error)?;
        }
        let mut seqs = Vec::with_capacity(batch.len());
        for &(doc, updates) in batch {
            let first_seq = last_seq(&mut tx, doc).await? + 1;
            if !updates.is_empty() {
                sqlx::query(
                    "INSERT INTO doc_updates (doc, seq, data) \
                     SELECT $1, $2 + t.ord - 1, t.data \
                     FROM UNNEST($3::bytea[]) WITH ORDINALITY AS t(data, ord)",
                )
                .bind(doc)
                .bind(first_seq)
                .bind(updates)
                .execute(&mut *tx)
                .await
                .map_err(pg_error)?;
            }
            seqs.push(first_seq + i64::try_from(updates.len()).unwrap_or(i64::MAX) - 1);
        }
        tx.commit().await.map_err(pg_error)?;
        tracing::debug!(docs = batch.len(), "appended updates");
        Ok(seqs)
    }

    async fn compact(&self, doc: &str, snapshot: &[u8], upto_seq: i64) -> Result<bool, StoreError> {
        validate_doc_name(doc)?;
        if !validate_upto_seq(upto_seq)? {
            return Ok(false);
        }
        let mut tx = self.begin_write(doc).await?;
        let last = last_seq(&mut tx, doc).await?;
        if upto_seq > last {
            tx.rollback().await.map_err(pg_error)?;
            return Err(compaction_past_end(upto_seq, last));
        }
        // The WHERE makes the upsert a no-op when the stored snapshot already covers upto_seq.
        let replaced = sqlx::query(
            "INSERT INTO doc_snapshots (doc, data, upto_seq, updated_at) \
             VALUES ($1, $2, $3, now()) \
             ON CONFLICT (doc) DO UPDATE SET \
                 data = EXCLUDED.data, upto_seq = EXCLUDED.upto_seq, updated_at = EXCLUDED.updated_at \
             WHERE doc_snapshots.upto_seq < EXCLUDED.upto_seq",
        )
        .bind(doc)
        .bind(snapshot)
        .bind(upto_seq)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?
        .rows_affected()
            == 1;
        if !replaced {
            tx.rollback().await.map_err(pg_error)?;
            tracing::debug!(doc_id = doc, upto_seq, "skipped stale compaction");
            return Ok(false);
        }
        let removed = sqlx::query("DELETE FROM doc_updates WHERE doc = $1 AND seq <= $2")
            .bind(doc)
            .bind(upto_seq)
            .execute(&mut *tx)
            .await
            .map_err(pg_error)?
            .rows_affected();
        tx.commit().await.map_err(pg_error)?;
        tracing::debug!(doc_id = doc, upto_seq, removed, "compacted document");
        Ok(true)
    }

    async fn log_len(&self, doc: &str) -> Result<u64, StoreError> {
        validate_doc_name(doc)?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM doc_updates WHERE doc = $1 \
             AND seq > COALESCE((SELECT upto_seq FROM doc_snapshots WHERE doc = $1), 0)",
        )
        .bind(doc)
        .fetch_one(&self.pool)
        .await
        .map_err(pg_error)?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    async fn delete(&self, doc: &str) -> Result<(), StoreError> {
        validate_doc_name(doc)?;
        let mut tx = self.begin_write(doc).await?;
        for sql in ["DELETE FROM doc_updates WHERE doc = $1", "DELETE FROM doc_snapshots WHERE doc = $1"] {
            sqlx::query(sql).bind(doc).execute(&mut *tx).await.map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)?;
        tracing::debug!(doc_id = doc, "deleted document");
        Ok(())
    }

    async fn create_checkpoint(&self, c: &NewCheckpoint<'_>) -> Result<i64, StoreError> {
        for (doc, _) in c.docs {
            validate_doc_name(doc)?;
        }
        let mut tx = self.pool.begin().await.map_err(pg_error)?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO checkpoints (project, name, author, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(c.project)
        .bind(c.name)
        .bind(c.author)
        .bind(c.created_at)
        .fetch_one(&mut *tx)
        .await
        .map_err(pg_error)?;
        let names: Vec<&str> = c.docs.iter().map(|(d, _)| d.as_str()).collect();
        let datas: Vec<&[u8]> = c.docs.iter().map(|(_, b)| b.as_slice()).collect();
        sqlx::query(
            "INSERT INTO checkpoint_docs (checkpoint_id, doc, data) SELECT $1, d, b FROM UNNEST($2::text[], $3::bytea[]) AS t(d, b)",
        )
        .bind(id)
        .bind(&names)
        .bind(&datas)
        .execute(&mut *tx)
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        Ok(id)
    }

    async fn list_checkpoints(&self, project: &str) -> Result<Vec<CheckpointInfo>, StoreError> {
        let rows: Vec<(i64, String, String, i64, i64)> = sqlx::query_as(
            "SELECT c.id, c.name, c.author, c.created_at, \
             (SELECT COUNT(*) FROM checkpoint_docs d WHERE d.checkpoint_id = c.id) \
             FROM checkpoints c WHERE c.project = $1 ORDER BY c.id",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await
        .map_err(pg_error)?;
        Ok(rows.into_iter().map(checkpoint_info).collect())
    }

    async fn load_checkpoint(&self, project: &str, id: i64) -> Result<Option<Vec<(String, Vec<u8>)>>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(pg_error)?;
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM checkpoints WHERE id = $1 AND project = $2")
            .bind(id)
            .bind(project)
            .fetch_optional(&mut *tx)
            .await
            .map_err(pg_error)?;
        if found.is_none() {
            return Ok(None);
        }
        let docs =
            sqlx::query_as("SELECT doc, data FROM checkpoint_docs WHERE checkpoint_id = $1 ORDER BY doc COLLATE \"C\"")
                .bind(id)
                .fetch_all(&mut *tx)
                .await
                .map_err(pg_error)?;
        Ok(Some(docs))
    }

    async fn delete_checkpoint(&self, project: &str, id: i64) -> Result<(), StoreError> {
        // checkpoint_docs rows go with it (ON DELETE CASCADE).
        sqlx::query("DELETE FROM checkpoints WHERE id = $1 AND project = $2")
            .bind(id)
            .bind(project)
            .execute(&self.pool)
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        if !prefix_can_match(prefix) {
            return Ok(Vec::new());
        }
        // starts_with rather than LIKE, which treats % and _ specially; COLLATE "C" sorts by
        // bytes whatever the database's locale, matching SQLite and `str`'s `Ord`.
        sqlx::query_scalar(
            "SELECT doc FROM ( \
                 SELECT doc FROM doc_updates WHERE starts_with(doc, $1) \
                 UNION \
                 SELECT doc FROM doc_snapshots WHERE starts_with(doc, $1) \
             ) AS docs ORDER BY doc COLLATE \"C\"",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(pg_error)
    }
}
