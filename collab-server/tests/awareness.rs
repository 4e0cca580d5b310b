//! Awareness (cursors, names): relayed to every peer, removed when a peer leaves, swept when stale.

mod common;

use std::time::Duration;

use common::{TestServer, WAIT};

#[tokio::test]
async fn awareness_is_relayed_and_removed_when_its_peer_disconnects() {
    let server = TestServer::start().await;
    let a = server.connect("aw/doc", "a").await;
    let mut b = server.connect("aw/doc", "b").await;
    b.set_awareness(r#"{"user":{"name":"B"}}"#);
    a.wait_until("b's cursor", WAIT, |p| p.peers_awareness().iter().any(|s| s.contains("\"B\""))).await.unwrap();
    let c = server.connect("aw/doc", "c").await;
    c.wait_until("b's cursor for a late joiner", WAIT, |p| p.peers_awareness().iter().any(|s| s.contains("\"B\"")))
        .await
        .unwrap();
    // A crash, not a goodbye: the server still removes B's state for everyone.
    b.disconnect();
    a.wait_until("b's cursor gone", WAIT, |p| p.peers_awareness().is_empty()).await.unwrap();
    c.wait_until("b's cursor gone", WAIT, |p| p.peers_awareness().is_empty()).await.unwrap();
    server.stop().await;
}

/// The exact 30 s boundary is tested on a controlled clock in `sync_core::room`; here a real
/// server with a short timeout shows the sweep reaches peers while the silent one stays connected.
#[tokio::test]
async fn stale_awareness_is_swept_while_its_peer_stays_connected() {
    let timeout = Duration::from_millis(600);
    let server = TestServer::start_with(|c| c.limits.awareness_timeout = timeout).await;
    let watcher = server.connect("sweep/doc", "w").await;
    let silent = server.connect("sweep/doc", "s").await;
    silent.set_awareness(r#"{"user":{"name":"Silent"}}"#);
    watcher.wait_until("state seen", WAIT, |p| p.peers_awareness().len() == 1).await.unwrap();
    let set_at = tokio::time::Instant::now();
    // The silent peer stays connected (it answers pings) but never renews its state.
    watcher.wait_until("stale state swept", WAIT, |p| p.peers_awareness().is_empty()).await.unwrap();
    let after = set_at.elapsed();
    assert!(after >= timeout / 2, "swept too early, after {after:?}");
    assert!(silent.status().connected, "the silent peer was not disconnected");
    assert!(server.metric("collab_awareness_swept_total") >= 1.0);
    server.stop().await;
}
