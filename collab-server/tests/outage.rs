//! A PostgreSQL outage under load: the server keeps serving from memory, holds and retries what
//! it could not save, refuses new edits past its backlog bound, and loses nothing.
//!
//! The first test stops a private PostgreSQL server for several seconds and starts it again.
//! The second cuts a TCP proxy between the server and the shared test database (every
//! connection drops, new ones are refused), which leaves that database running for the other
//! tests.

mod common;

use collab_client::{DocPeer, MuxConnection};
use collab_test_support::net::CutProxy;
use collab_test_support::postgres::{self, PrivatePostgres};
use common::{TestServer, WAIT};
use rand::Rng;

/// A server whose PostgreSQL connections all go through a proxy the test can cut.
async fn proxied_server(tweak: impl FnOnce(&mut collab_server::Config)) -> (TestServer, CutProxy) {
    let (_, upstream) = postgres::with_addr(&postgres::test_url(), "");
    let proxy = CutProxy::start(&upstream).await;
    let (url, _) = postgres::with_addr(&postgres::test_url(), &proxy.addr.to_string());
    let server = TestServer::start_with(|c| {
        c.database_url = Some(url);
        tweak(c);
    })
    .await;
    (server, proxy)
}

fn project() -> String {
    format!("outage{}", rand::rng().random_range(0..u32::MAX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_nothing_and_is_visible_in_metrics() {
    let postgres = PrivatePostgres::start();
    let url = postgres.url();
    let mut server = TestServer::start_with(|c| c.database_url = Some(url)).await;
    let project = project();
    let doc = format!("{project}/file");
    let token = server.editor(&project, "w");
    let mux = MuxConnection::connect(&server.url).await.unwrap();
    let writer = mux.open(&doc, &token).await.unwrap();
    writer.wait_synced(WAIT).await.unwrap();
    let reader = server.connect(&doc, "reader").await;
    let mut sent = 0;
    let mut type_some = |n: usize| {
        for _ in 0..n {
            writer.insert(0, &format!("item{sent};"));
            sent += 1;
        }
        sent
    };
    let before = type_some(20);
    // Once the reader has the last item, the writer has sent every update message; each is
    // confirmed once (keystrokes typed at once go merged, as one message), plus the empty sync
    // step 2 sent on joining.
    let all_confirmed = |p: &DocPeer| p.status().applied == p.status().updates_sent + 1;
    reader.wait_until("first edits", WAIT, |p| p.text().contains(&format!("item{};", before - 1))).await.unwrap();
    writer.wait_until("confirmed", WAIT, all_confirmed).await.unwrap();
    let confirmed_before = writer.status().applied;

    postgres.down();
    let during = type_some(30);
    // Still served from memory: the reader sees every edit at once.
    reader
        .wait_until("live edits during the outage", WAIT, |p| p.text().contains(&format!("item{};", during - 1)))
        .await
        .unwrap();
    let first_errors = server.await_metric("collab_persist_errors_total", |n| n >= 1.0).await;
    assert!(server.metric("collab_unsaved_bytes") > 0.0, "the backlog is visible");
    // A retry fails too while the database is down (each attempt waits out the store's 10 s
    // connection timeout), and still nothing is lost or confirmed.
    server.await_metric("collab_persist_errors_total", |n| n > first_errors).await;
    assert!(server.metric("collab_unsaved_bytes") > 0.0, "the backlog is still held");
    assert_eq!(writer.status().applied, confirmed_before, "nothing is confirmed while the store is down");
    postgres.up();
    writer.wait_until("backlog confirmed", WAIT, all_confirmed).await.unwrap();
    assert_eq!(server.metric("collab_unsaved_bytes"), 0.0);

    server.restart().await;
    let checker = server.connect(&doc, "checker").await;
    for k in 0..during {
        assert!(checker.text().contains(&format!("item{k};")), "item{k} lost in the outage");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_backlog_bound_new_edits_are_refused_and_nothing_is_lost() {
    let (mut server, proxy) = proxied_server(|c| c.limits.max_unsaved_bytes = 2048).await;
    let project = project();
    let doc = format!("{project}/file");
    let token = server.editor(&project, "w");
    let mux = MuxConnection::connect(&server.url).await.unwrap();
    let writer = mux.open(&doc, &token).await.unwrap();
    writer.wait_synced(WAIT).await.unwrap();

    proxy.cut();
    let line = "x".repeat(200);
    for i in 0..40 {
        // Each edit once the server holds the one before (or has refused the writer), so each
        // arrives as its own update.
        let held = server.metric("collab_unsaved_bytes");
        writer.insert(0, &format!("{i}:{line};"));
        let taken = |s: &TestServer| s.metric("collab_unsaved_bytes") > held || !writer.status().connected;
        server.eventually("the edit held, or the writer refused", taken).await;
        if !writer.status().connected {
            break;
        }
    }
    let close = writer.wait_closed(WAIT).await.expect("refused writer is disconnected");
    assert_eq!(close.code, 1013, "{close:?}");
    assert!(close.reason.contains("document store unavailable"), "{close:?}");
    assert!(server.metric("collab_writes_refused_total") >= 1.0);
    let mine = writer.text();

    proxy.restore();
    let ydoc = writer.doc().clone();
    drop(writer);
    drop(mux);
    // Until the held backlog is saved, edits are still refused; a client retries until then.
    server.eventually("backlog saved", |s| s.metric("collab_unsaved_bytes") == 0.0).await;
    // The refused client reconnects once the store is back; the handshake resends its edits.
    let mux = MuxConnection::connect(&server.url).await.unwrap();
    let writer = mux.open_with(&doc, &token, ydoc).await.unwrap();
    writer.wait_synced(WAIT).await.unwrap();
    let checker = server.connect(&doc, "checker").await;
    checker.wait_text(&mine, WAIT).await.expect("every edit, refused or not, reaches the server");
    drop((writer, mux, checker));
    server.restart().await;
    let after = server.connect(&doc, "after").await;
    after.wait_text(&mine, WAIT).await.expect("and the store");
    server.stop().await;
}
