//! Confirmed saves survive SIGKILL: a real `collab` process under write load is killed, and
//! after a restart every update it had confirmed is there; the clients resend the rest.

mod common;

use std::time::Duration;

use collab_client::{DocPeer, MuxConnection};
use collab_test_support::process::{Serve, ServerProcess};
use collab_test_support::tokens::Tokens;
use common::WAIT;
use rand::Rng;

/// A `collab serve` on `data_dir`, with its own database there (SQLite) or at `database_url`.
async fn spawn(data_dir: &std::path::Path, database_url: Option<&str>) -> ServerProcess {
    spawn_with(data_dir, database_url, &[]).await
}

async fn spawn_with(data_dir: &std::path::Path, database_url: Option<&str>, extra: &[&str]) -> ServerProcess {
    let database = database_url.map(|url| ["--database-url", url]);
    Serve::new(data_dir).args(extra).args(database.iter().flatten()).start().await
}

/// A data directory, a document in a fresh project, and an editor token signed with the
/// directory's key (which every server started on that directory uses).
fn fresh_project(prefix: &str) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let project = format!("{prefix}{}", rand::rng().random_range(0..u32::MAX));
    let token = Tokens::for_data_dir(dir.path()).editor(&project, "w");
    (dir, format!("{project}/file"), token)
}

/// Each writer inserts items `w{i}:{n};`; SyncStatus acknowledgements come in order, one per
/// update, after the update is committed, so the first `applied - 1` items are confirmed
/// (the first acknowledgement is for the empty sync step 2 sent on joining).
fn confirmed(peer: &DocPeer) -> u64 {
    peer.status().applied.saturating_sub(1)
}

async fn crash_and_recover(database_url: Option<&str>) {
    let (dir, doc, token) = fresh_project("crash");

    let mut server = spawn(dir.path(), database_url).await;
    let mut writers = Vec::new();
    for _ in 0..4 {
        let mux = MuxConnection::connect(&server.url()).await.unwrap();
        let peer = mux.open(&doc, &token).await.unwrap();
        peer.wait_synced(WAIT).await.unwrap();
        writers.push((mux, peer, 0u64));
    }
    // Type until a good number of edits are confirmed, then kill -9 mid-stream.
    let mut round = 0u64;
    loop {
        for (i, (_, peer, sent)) in writers.iter_mut().enumerate() {
            peer.insert(0, &format!("w{i}:{sent};"));
            *sent += 1;
        }
        round += 1;
        if round % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let total: u64 = writers.iter().map(|(_, p, _)| confirmed(p)).sum();
        if total >= 400 {
            break;
        }
        assert!(round < 100_000, "edits are not being confirmed");
    }
    // A last burst, killed before it can all be confirmed: those the clients must resend.
    for _ in 0..20 {
        for (i, (_, peer, sent)) in writers.iter_mut().enumerate() {
            peer.insert(0, &format!("w{i}:{sent};"));
            *sent += 1;
        }
    }
    tokio::task::yield_now().await;
    server.kill();
    for (_, peer, _) in &writers {
        peer.wait_until("socket closed", WAIT, |p| !p.status().connected).await.unwrap();
    }
    let confirmed_at_kill: Vec<u64> = writers.iter().map(|(_, p, _)| confirmed(p)).collect();
    let sent: Vec<u64> = writers.iter().map(|(_, _, s)| *s).collect();

    server.restart().await;
    let restarted = server;
    let checker_mux = MuxConnection::connect(&restarted.url()).await.unwrap();
    let checker = checker_mux.open(&doc, &token).await.unwrap();
    checker.wait_synced(WAIT).await.unwrap();
    let text = checker.text();
    let mut present = 0;
    for (i, n) in confirmed_at_kill.iter().enumerate() {
        for k in 0..*n {
            assert!(text.contains(&format!("w{i}:{k};")), "confirmed item w{i}:{k} lost after SIGKILL");
            present += 1;
        }
    }
    eprintln!("sent {sent:?}, confirmed {confirmed_at_kill:?}: all {present} confirmed items survived kill -9");

    // The surviving clients reconnect with their documents; the sync handshake resends the rest.
    let mut again = Vec::new();
    for (mux, peer, _) in writers {
        let ydoc = peer.doc().clone();
        drop(peer);
        drop(mux);
        let mux = MuxConnection::connect(&restarted.url()).await.unwrap();
        let peer = mux.open_with(&doc, &token, ydoc).await.unwrap();
        peer.wait_synced(WAIT).await.unwrap();
        again.push((mux, peer));
    }
    let has_all = |t: &str| sent.iter().enumerate().all(|(i, n)| (0..*n).all(|k| t.contains(&format!("w{i}:{k};"))));
    common::until("convergence on every item sent, confirmed or not", || {
        let t = checker.text();
        again.iter().all(|(_, p)| p.text() == t) && has_all(&t)
    })
    .await;
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_updates_survive_sigkill_on_sqlite() {
    crash_and_recover(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_updates_survive_sigkill_on_postgres() {
    crash_and_recover(Some(&collab_test_support::postgres::test_url())).await;
}

/// Two server processes on one database, each with a writer on the same document and a tiny
/// compaction threshold, so their compactions race; a third process then finds every update.
async fn two_processes_compacting(database_url: Option<&str>) {
    let (dir, doc, token) = fresh_project("compact");
    let extra = ["--compact-threshold", "3"];
    let (a, b) =
        (spawn_with(dir.path(), database_url, &extra).await, spawn_with(dir.path(), database_url, &extra).await);
    let mut writers = Vec::new();
    for (name, server) in [("a", &a), ("b", &b)] {
        let mux = MuxConnection::connect(&server.url()).await.unwrap();
        let peer = mux.open(&doc, &token).await.unwrap();
        peer.wait_synced(WAIT).await.unwrap();
        writers.push((name, mux, peer));
    }
    const ITEMS: u64 = 60;
    for k in 0..ITEMS {
        for (name, _, peer) in &writers {
            peer.insert(0, &format!("{name}{k};"));
        }
        // Let each edit commit on its own, so every process compacts many times.
        for (_, _, peer) in &writers {
            peer.wait_until("confirmed", WAIT, |p| p.status().applied > k + 1).await.unwrap();
        }
    }
    drop(writers);
    drop((a, b));
    let c = spawn(dir.path(), database_url).await;
    let mux = MuxConnection::connect(&c.url()).await.unwrap();
    let checker = mux.open(&doc, &token).await.unwrap();
    checker.wait_synced(WAIT).await.unwrap();
    let text = checker.text();
    for name in ["a", "b"] {
        for k in 0..ITEMS {
            assert!(text.contains(&format!("{name}{k};")), "{name}{k} lost to a compaction race");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_compacting_one_document_lose_nothing_on_sqlite() {
    two_processes_compacting(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_compacting_one_document_lose_nothing_on_postgres() {
    two_processes_compacting(Some(&collab_test_support::postgres::test_url())).await;
}

/// SIGTERM (what `docker stop`, systemd and Kubernetes send) is a clean shutdown: the process
/// exits successfully and every edit it applied is in the store.
#[tokio::test]
async fn sigterm_flushes_and_exits_cleanly() {
    let (dir, doc, token) = fresh_project("term");
    let mut server = spawn(dir.path(), None).await;
    let writer = DocPeer::connect(&server.url(), &doc, &token).await.unwrap();
    writer.wait_synced(WAIT).await.unwrap();
    let watcher = DocPeer::connect(&server.url(), &doc, &token).await.unwrap();
    writer.insert(0, "saved on SIGTERM");
    watcher.wait_text("saved on SIGTERM", WAIT).await.unwrap();
    server.terminate();
    let exited = server.wait_exit(WAIT).await;
    assert!(exited.success(), "collab exited with {exited}");
    let server = spawn(dir.path(), None).await;
    let reader = DocPeer::connect(&server.url(), &doc, &token).await.unwrap();
    reader.wait_synced(WAIT).await.unwrap();
    assert_eq!(reader.text(), "saved on SIGTERM");
}
