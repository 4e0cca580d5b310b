//! One sync socket cannot take the server down or slow an honest fast client to a crawl (#14
//! items 8 and 9): awareness ids per peer are capped, the outbound queue is bounded in bytes,
//! the throttle counts and weighs the messages inside a frame, and a raw y-protocols peer that
//! sends one message per transaction at full speed is not held back.
//!
//! The peers here are raw y-protocols clients over plain tungstenite, not our client library.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{TestServer, WAIT};
use futures_util::SinkExt;
use sync_core::wire::{self, OutMsg};
use tokio_tungstenite::tungstenite::Message;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::encoder::Encode;
use yrs::{ClientID, StateVector};

use collab_test_support::ws::{RawSocket as Ws, close_code};

async fn raw(server: &TestServer, doc: &str, token: &str) -> Ws {
    let url = format!("{}/sync/{doc}?token={token}", server.url);
    tokio_tungstenite::connect_async(url).await.expect("raw peer connects").0
}

fn awareness_frame(ids: std::ops::Range<u64>) -> Vec<u8> {
    let entry = || AwarenessUpdateEntry { clock: 1, json: r#"{"user":{"name":"x"}}"#.into() };
    let update = AwarenessUpdate { clients: ids.map(|id| (ClientID::new(id), entry())).collect::<HashMap<_, _>>() };
    wire::encode_ywebsocket(OutMsg::Awareness(&update.encode_v1()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_speaking_for_thousands_of_awareness_clients_is_refused_and_joiners_stay_fast() {
    let server = TestServer::start().await;
    let doc = "aw/doc";
    let viewer = server.token("aw", sync_core::Role::Viewer, "many");
    let mut honest = raw(&server, doc, &viewer).await;
    // A tab with one awareness client, then a few renewals: within the cap.
    for _ in 0..3 {
        honest.send(Message::Binary(awareness_frame(1..2).into())).await.unwrap();
    }
    let mut hostile = raw(&server, doc, &viewer).await;
    hostile.send(Message::Binary(awareness_frame(1000..101_000).into())).await.unwrap();
    assert_eq!(close_code(&mut hostile).await, Some(1007), "awareness past the cap closes the socket with 1007");
    let started = Instant::now();
    let joiner = server.connect(doc, "joiner").await;
    joiner
        .wait_until("the honest awareness state", WAIT, |p| p.peers_awareness().len() == 1)
        .await
        .expect("the joiner sees exactly the honest peer's state");
    assert!(started.elapsed() < Duration::from_secs(5), "a joiner waited {:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_step1s_from_a_peer_that_does_not_read_fill_the_byte_bound_and_disconnect_it() {
    let server = TestServer::start_with(|c| c.limits.outbound_queue_bytes = 4 << 20).await;
    let doc = "big/doc";
    let writer = server.connect(doc, "writer").await;
    writer.insert(0, &"x".repeat(1 << 20));
    let reader = server.connect(doc, "reader").await;
    reader.wait_until("the megabyte", WAIT, |p| p.text().len() == 1 << 20).await.unwrap();
    let before = server.metric("collab_connections_active");
    // A tiny receive buffer, never read: the socket fills at once, then the server's queue.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.http_addr().parse().unwrap()).await.unwrap();
    let url = format!("{}/sync/{doc}?token={}", server.url, server.editor("big", "sloth"));
    let (mut sloth, _) = tokio_tungstenite::client_async(url, tcp).await.expect("connect");
    // Twenty step 1s (far fewer than the queue's frame bound), each answered with the megabyte.
    let step1 = wire::encode_ywebsocket(OutMsg::SyncStep1(&StateVector::default()));
    sloth.send(Message::Binary(step1.repeat(20).into())).await.unwrap();
    server.await_metric("collab_connections_active", |n| n <= before).await;
    assert!(server.metric("collab_queue_overflows_total") >= 1.0, "the sloth was cut off as too slow");
    // The room goes on.
    writer.insert(0, "after");
    reader.wait_until("edit after the sloth", WAIT, |p| p.text().starts_with("after")).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_many_messages_is_throttled_per_message() {
    let server = TestServer::start().await;
    let doc = "flood/doc";
    let mut ws = raw(&server, doc, &server.editor("flood", "hostile")).await;
    // One frame, 200,000 empty updates: one frame for a frame counter, four bursts of messages.
    let empty = wire::encode_ywebsocket(OutMsg::Update(&[0, 0]));
    ws.send(Message::Binary(empty.repeat(200_000).into())).await.unwrap();
    server.await_metric("collab_throttled_total", |n| n >= 1.0).await;
    // Meanwhile the server answers others.
    let other = server.connect("flood/other", "other").await;
    other.insert(0, "fine");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_step1s_is_throttled_by_their_weight() {
    let server = TestServer::start().await;
    let mut ws = raw(&server, "steps/doc", &server.editor("steps", "hostile")).await;
    // 1,000 step 1s weigh 256,000 messages: past the default burst of 50,000.
    let step1 = wire::encode_ywebsocket(OutMsg::SyncStep1(&StateVector::default()));
    ws.send(Message::Binary(step1.repeat(1000).into())).await.unwrap();
    server.await_metric("collab_throttled_total", |n| n >= 1.0).await;
    server.stop().await;
}

#[derive(serde::Deserialize)]
struct Trace {
    #[serde(rename = "endContent")]
    end_content: String,
    txns: Vec<Txn>,
}

#[derive(serde::Deserialize)]
struct Txn {
    patches: Vec<(u32, u32, String)>,
}

fn load_trace(name: &str) -> Trace {
    let root = std::env::var_os("COLLAB_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/editing-traces"));
    let path = root.join("sequential").join(name);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("trace {} missing: {e}", path.display()));
    let mut json = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut json).expect("gunzip");
    serde_json::from_str(&json).expect("trace json")
}

/// The default limits let a raw y-protocols peer that sends each recorded transaction as its own
/// frame, as fast as it can (what the y-websocket provider does when a script types or pastes),
/// reach a watcher quickly. The old throttle (200 frames/s, burst 1,000) took 86 s for this trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_peer_replaying_a_trace_one_message_per_transaction_is_not_slowed() {
    let trace = load_trace("sveltecomponent.json.gz");
    assert_eq!(trace.txns.len(), 18_335);
    let server = TestServer::start().await;
    let doc = "svelte/doc";
    let watcher = server.connect(doc, "watcher").await;
    let mut typist = raw(&server, doc, &server.editor("svelte", "typist")).await;
    let local = yrs::Doc::new();
    let text = local.get_or_insert_text("content");
    let started = Instant::now();
    for txn in &trace.txns {
        let mut t = yrs::Transact::transact_mut(&local);
        for (pos, del, ins) in &txn.patches {
            if *del > 0 {
                yrs::Text::remove_range(&text, &mut t, *pos, *del);
            }
            if !ins.is_empty() {
                yrs::Text::insert(&text, &mut t, *pos, ins);
            }
        }
        let update = t.encode_update_v1();
        drop(t);
        typist.feed(Message::Binary(wire::encode_ywebsocket(OutMsg::Update(&update)).into())).await.unwrap();
    }
    typist.flush().await.unwrap();
    watcher.wait_text(&trace.end_content, WAIT).await.expect("the watcher ends with endContent");
    let elapsed = started.elapsed();
    eprintln!("replayed {} transactions as frames to a watcher in {elapsed:.2?}", trace.txns.len());
    assert!(elapsed < Duration::from_secs(20), "the replay took {elapsed:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_past_the_tree_bound_is_refused_whole_and_export_stays_small() {
    let server = TestServer::start().await;
    let token = server.editor("wide", "hostile");
    let mut ws = raw(&server, "wide", &token).await;
    let author = yrs::Doc::new();
    let update = {
        let mut txn = yrs::Transact::transact_mut(&author);
        sync_core::tree::init(&mut txn);
        // `put_entry` under fresh ids, not `create`, which looks for a clash in the whole tree.
        for i in 0..=sync_core::tree::MAX_ENTRIES {
            let id = format!("{i:016x}");
            sync_core::tree::put_entry(&mut txn, &id, &format!("f{i}"), sync_core::tree::EntryKind::File).unwrap();
        }
        txn.encode_update_v1()
    };
    ws.send(Message::Binary(wire::encode_ywebsocket(OutMsg::Update(&update)).into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1007), "a tree past the bound closes the socket with 1007");
    let (status, body) = common::http(&server, "GET", "/api/projects/wide/export?format=zip", &token, b"").await;
    assert_eq!(status, 200);
    assert!(body.len() < 1024, "nothing of the refused update is exported ({} bytes)", body.len());
    server.stop().await;
}
