//! End-to-end sync over real WebSockets: convergence, late joiners, persistence, unloading.

mod common;

use std::time::Duration;

use collab_test_support::wait;
use common::{TestServer, WAIT, seed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sync_core::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_editors_with_random_reconnects_converge() {
    let seed = seed("concurrent_editors_with_random_reconnects_converge");
    let mut rng = StdRng::seed_from_u64(seed);
    let server = TestServer::start().await;
    let doc = "conv/file";
    let token = server.editor("conv", "u");
    let mut peers = Vec::new();
    for i in 0..8 {
        peers.push(server.connect(doc, &format!("user{i}")).await);
    }
    for _round in 0..300 {
        let i = rng.random_range(0..peers.len());
        let peer = &mut peers[i];
        match rng.random_range(0..100) {
            0..4 => {
                // Drop the socket without a goodbye; edits made while away must still arrive.
                peer.disconnect();
            }
            4..8 if !peer.status().connected => {
                peer.reconnect(&server.url, doc, &token).await.expect("reconnect");
            }
            n => {
                let len = peer.text().len() as u32;
                if n < 70 || len == 0 {
                    let at = rng.random_range(0..=len);
                    let s: String =
                        (0..rng.random_range(1..6)).map(|_| rng.random_range(b'a'..=b'z') as char).collect();
                    peer.insert(at, &s);
                } else {
                    let at = rng.random_range(0..len);
                    let n = rng.random_range(1..=(len - at).min(4));
                    peer.delete(at, n);
                }
            }
        }
        if rng.random_range(0..10) == 0 {
            tokio::task::yield_now().await;
        }
    }
    for peer in &mut peers {
        if !peer.status().connected {
            peer.reconnect(&server.url, doc, &token).await.expect("reconnect");
        }
    }
    let observer = server.connect(doc, "observer").await;
    // Everyone converges on the text a fresh joiner sees once every peer's edits are in.
    let converged = || {
        let reference = observer.text();
        std::future::ready(peers.iter().all(|p| p.text() == reference).then_some(()))
    };
    let report = || {
        let reference = observer.text();
        let report: Vec<String> =
            peers.iter().map(|p| format!("len {} vs {}: {:?}", p.text().len(), reference.len(), p.status())).collect();
        format!("seed {seed}:\n{}", report.join("\n"))
    };
    wait::poll("every peer to converge", WAIT, converged, report).await;
    assert!(!observer.text().is_empty(), "some edits were made (seed {seed})");
    server.stop().await;
}

#[tokio::test]
async fn late_joiner_gets_the_full_state_and_names_may_contain_slashes() {
    let server = TestServer::start().await;
    let doc = "late/src/deep/main.rs";
    let first = server.connect(doc, "first").await;
    first.insert(0, "fn main() {}\n");
    first.insert(0, "// hello\n");
    let late = server.connect(doc, "late").await;
    late.wait_text("// hello\nfn main() {}\n", WAIT).await.expect("late joiner sees everything");
    server.stop().await;
}

#[tokio::test]
async fn documents_persist_across_a_restart() {
    let mut server = TestServer::start().await;
    let doc = "persist/notes";
    {
        let peer = server.connect(doc, "writer").await;
        for i in 0..50 {
            peer.insert(0, &format!("line {i}\n"));
        }
        let expected = peer.text();
        // Wait until the server holds every edit: a second peer sees them all.
        let check = server.connect(doc, "checker").await;
        check.wait_text(&expected, WAIT).await.expect("server has the edits");
    }
    let before = {
        let p = server.connect(doc, "before").await;
        p.text()
    };
    server.restart().await;
    let after = server.connect(doc, "after").await;
    after.wait_text(&before, WAIT).await.expect("state survives the restart");
    assert_eq!(after.text().lines().count(), 50);
    server.stop().await;
}

#[tokio::test]
async fn documents_unload_after_the_last_peer_leaves_and_reload_from_the_store() {
    let server = TestServer::start_with(|c| {
        c.limits.unload_delay = Duration::from_millis(100);
        c.limits.compact_threshold = 10;
    })
    .await;
    let doc = "unload/a";
    {
        let mut peer = server.connect(doc, "w").await;
        for i in 0..25 {
            peer.insert(0, &format!("{i},"));
        }
        let check = server.connect(doc, "c").await;
        check.wait_text(&peer.text(), WAIT).await.expect("edits reached the server");
        peer.disconnect();
    }
    server.eventually("document unloaded", |s| s.loaded_documents() == 0).await;
    assert_eq!(server.metric("collab_documents_loaded"), 0.0);
    let again = server.connect(doc, "again").await;
    let text = again.text();
    for i in 0..25 {
        assert!(text.contains(&format!("{i},")), "{i} missing from {text:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn many_documents_over_one_multiplexed_socket() {
    let server = TestServer::start().await;
    let mux = collab_client::MuxConnection::connect(&server.url).await.expect("mux connect");
    let token = server.editor("mux", "m");
    let mut docs = Vec::new();
    for i in 0..10 {
        let d = mux.open(&format!("mux/doc{i}"), &token).await.expect("open");
        d.wait_synced(WAIT).await.expect("synced");
        assert_eq!(d.status().scope.as_deref(), Some("read-write"));
        d.insert(0, &format!("doc {i}"));
        docs.push(d);
    }
    for i in 0..10 {
        let direct = server.connect(&format!("mux/doc{i}"), "direct").await;
        direct.wait_text(&format!("doc {i}"), WAIT).await.expect("each document got its own edit");
    }
    for d in &docs {
        d.wait_until("sync status", WAIT, |p| p.status().applied >= 1).await.expect("SyncStatus(applied) received");
    }
    server.stop().await;
}

#[tokio::test]
async fn y_websocket_and_multiplexed_peers_share_a_document() {
    let server = TestServer::start().await;
    let yws = server.connect("both/doc", "y").await;
    let mux = collab_client::MuxConnection::connect(&server.url).await.expect("mux");
    let hp = mux.open("both/doc", &server.token("both", Role::Editor, "h")).await.expect("open");
    hp.wait_synced(WAIT).await.expect("synced");
    yws.insert(0, "from y-websocket;");
    hp.wait_text("from y-websocket;", WAIT).await.expect("mux peer sees it");
    hp.insert(0, "from mux;");
    yws.wait_text("from mux;from y-websocket;", WAIT).await.expect("y-websocket peer sees it");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_while_a_document_unloads_loses_nothing() {
    // Unload as soon as the last peer leaves, so every join races an unload.
    let server = TestServer::start_with(|c| c.limits.unload_delay = Duration::ZERO).await;
    let token = server.editor("race", "r");
    for i in 0..30 {
        let mux = collab_client::MuxConnection::connect(&server.url).await.expect("mux");
        let peer = mux.open("race/doc", &token).await.expect("open");
        peer.wait_synced(WAIT).await.expect("synced");
        let expected: String = (0..i).rev().map(|k| format!("{k},")).collect();
        assert_eq!(peer.text(), expected, "round {i} starts from everything saved before");
        peer.insert(0, &format!("{i},"));
        // Two acknowledgements: the sync step 2 sent on joining, then this edit.
        peer.wait_until("applied", WAIT, |p| p.status().applied >= 2).await.expect("server applied the edit");
        drop(peer);
        drop(mux);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_many_documents_share_store_transactions() {
    let server = TestServer::start_with(|c| c.limits.commit_interval = Duration::from_millis(5)).await;
    let mut peers = Vec::new();
    for i in 0..20 {
        peers.push(server.connect(&format!("group/doc{i}"), "w").await);
    }
    for round in 0..5 {
        for peer in &peers {
            peer.insert(0, &format!("{round};"));
        }
        let checkers: Vec<_> = peers.iter().map(|p| p.text()).collect();
        for (i, text) in checkers.iter().enumerate() {
            let check = server.connect(&format!("group/doc{i}"), "c").await;
            check.wait_text(text, WAIT).await.expect("edit applied");
        }
    }
    server.eventually("all saved", |s| s.metric("collab_unsaved_bytes") == 0.0).await;
    let commits = server.metric("collab_store_commits_total");
    let appends = server.metric("collab_store_commit_appends_total");
    assert!(appends >= 100.0, "every edit was appended: {appends}");
    assert!(commits < appends / 2.0, "{commits} transactions for {appends} appends: no group commit");
    server.stop().await;
}
