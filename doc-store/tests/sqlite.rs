//! Runs the doc-store conformance suite against SQLite, plus SQLite-only checks (URLs, kill -9 durability).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use doc_store::{DocStore, SqliteStore, StoreError, conformance, open_store};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_on_a_file_shared_by_two_handles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.db");
    let a = SqliteStore::open(&path).await.unwrap();
    let b = SqliteStore::open(&path).await.unwrap();
    conformance::run_all(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_in_memory() {
    // Each `sqlite::memory:` store is its own database, so both roles use one handle.
    let store = open_store("sqlite::memory:").await.unwrap();
    conformance::run_all(store.clone(), store).await;
}

#[tokio::test]
async fn open_store_by_url_creates_directories_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/docs.db");
    let url = format!("sqlite://{}", path.display());
    let store = open_store(&url).await.unwrap();
    assert_eq!(store.append("doc", &[b"hello".to_vec()]).await.unwrap(), 1);
    drop(store);
    assert!(path.exists());

    let reopened = open_store(&format!("sqlite:{}", path.display())).await.unwrap();
    assert_eq!(reopened.load("doc").await.unwrap().updates, vec![b"hello".to_vec()]);
}

#[tokio::test]
async fn open_store_rejects_other_schemes_without_echoing_the_url() {
    for url in ["mysql://user:secret@host/db", "no-scheme-here", "http://secret"] {
        match open_store(url).await {
            Err(err @ StoreError::Invalid(_)) => {
                let message = err.to_string();
                assert!(!message.contains("secret"), "{message}");
                assert!(message.contains("expected sqlite:"), "{message}");
            }
            Err(other) => panic!("{url}: expected Invalid, got {other}"),
            Ok(_) => panic!("{url}: opened a store"),
        }
    }
}

#[tokio::test]
async fn an_unopenable_file_is_reported_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the database file should be.
    let path = dir.path().join("docs.db");
    std::fs::create_dir(&path).unwrap();
    match SqliteStore::open(&path).await {
        Err(StoreError::Unavailable(_)) => {}
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("opened a directory as a database"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_creating_the_same_new_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..5 {
        let path = dir.path().join(format!("race-{round}.db"));
        let (a, b) = tokio::join!(SqliteStore::open(&path), SqliteStore::open(&path));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.append("doc", &[b"a".to_vec()]).await.unwrap(), 1);
        assert_eq!(b.append("doc", &[b"b".to_vec()]).await.unwrap(), 2);
    }
}

/// Appends acknowledged to the caller must survive a kill -9 of the process right after.
#[test]
fn confirmed_appends_survive_kill_9() {
    const CONFIRMATIONS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("durable.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_append_until_killed"))
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut confirmed = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while confirmed.len() < CONFIRMATIONS && Instant::now() < deadline {
        let Some(line) = lines.next() else { break };
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("confirmed ") {
            let (i, seq) = rest.split_once(' ').unwrap();
            confirmed.push((i.parse::<u64>().unwrap(), seq.parse::<i64>().unwrap()));
        }
    }
    // Child::kill sends SIGKILL on Unix.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(confirmed.len(), CONFIRMATIONS, "child stopped confirming appends");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = SqliteStore::open(&path).await.unwrap();
        let loaded = store.load("durable").await.unwrap();
        for (i, seq) in confirmed {
            let index = usize::try_from(seq - 1).unwrap();
            assert_eq!(
                loaded.updates.get(index),
                Some(&format!("update {i}").into_bytes()),
                "confirmed update {i} at seq {seq} is missing after kill -9"
            );
        }
    });
}
