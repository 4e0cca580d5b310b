//! Runs the doc-store conformance suite against PostgreSQL at `COLLAB_TEST_POSTGRES_URL`, failing if it is unset.
//!
//! Each test works in a fresh schema of that database (dropped when the test passes), so
//! tests and concurrent runs do not see each other's tables.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use doc_store::{DocStore, PostgresStore, StoreError, conformance, open_store};
use sqlx::postgres::PgPool;

const URL_ENV: &str = "COLLAB_TEST_POSTGRES_URL";

fn postgres_url() -> String {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{URL_ENV} is not set: the PostgreSQL tests need a running server, e.g. \
             {URL_ENV}=postgres://collab:collab@127.0.0.1:5432/collab_test \
             (a missing database fails these tests; it is never skipped)"
        ),
    }
}

/// A schema of its own in the test database, and a store URL whose connections use it.
struct TestSchema {
    admin: PgPool,
    name: String,
    url: String,
}

impl TestSchema {
    async fn create(test: &str) -> Self {
        let base_url = postgres_url();
        let admin = PgPool::connect(&base_url).await.unwrap_or_else(|err| panic!("cannot connect to {URL_ENV}: {err}"));
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let name = format!("doc_store_test_{test}_{}_{nanos}", std::process::id());
        sqlx::query(&format!("CREATE SCHEMA {name}")).execute(&admin).await.unwrap();
        let separator = if base_url.contains('?') { '&' } else { '?' };
        // `options=-c search_path=NAME`, percent-encoded.
        let url = format!("{base_url}{separator}options=-c%20search_path%3D{name}");
        Self { admin, name, url }
    }

    async fn drop(self) {
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.name)).execute(&self.admin).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_with_two_pools() {
    let schema = TestSchema::create("conformance").await;
    let a = PostgresStore::connect(&schema.url).await.unwrap();
    let b = PostgresStore::connect(&schema.url).await.unwrap();
    conformance::run_all(Arc::new(a), Arc::new(b)).await;
    schema.drop().await;
}

#[tokio::test]
async fn open_store_picks_postgres_for_both_schemes() {
    let schema = TestSchema::create("open_store").await;
    let suffix = schema.url.split_once(':').unwrap().1;
    for scheme in ["postgres", "postgresql"] {
        let store = open_store(&format!("{scheme}:{suffix}")).await.unwrap();
        assert_eq!(store.append(scheme, &[b"x".to_vec()]).await.unwrap(), 1);
    }
    // Both URLs reached the same schema.
    let store = open_store(&schema.url).await.unwrap();
    assert_eq!(store.list("").await.unwrap(), ["postgres", "postgresql"]);
    schema.drop().await;
}

#[tokio::test]
async fn migrations_are_idempotent_and_tables_live_in_the_schema() {
    let schema = TestSchema::create("migrations").await;
    let first = PostgresStore::connect(&schema.url).await.unwrap();
    first.append("doc", &[b"kept".to_vec()]).await.unwrap();
    let second = PostgresStore::connect(&schema.url).await.unwrap();
    assert_eq!(second.load("doc").await.unwrap().updates, vec![b"kept".to_vec()]);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = $1 ORDER BY table_name",
    )
    .bind(&schema.name)
    .fetch_all(&schema.admin)
    .await
    .unwrap();
    assert_eq!(tables, ["_sqlx_migrations", "checkpoint_docs", "checkpoints", "doc_snapshots", "doc_updates"]);
    schema.drop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_reported_unavailable() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    match PostgresStore::connect("postgres://collab:secret@127.0.0.1:1/none").await {
        Err(err @ StoreError::Unavailable(_)) => {
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
}
