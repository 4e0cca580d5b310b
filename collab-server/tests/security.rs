//! Hostile input: bad tokens, viewers writing, malformed and oversized messages, floods before
//! authentication. Each is refused with a clear answer and leaves documents intact.

mod common;

use std::time::Duration;

use collab_client::{DocPeer, MuxConnection};
use common::{TestServer, WAIT};
use futures_util::SinkExt;
use sync_core::Role;
use sync_core::wire::{self, OutMsg};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use collab_test_support::ws::RawSocket as Ws;

async fn raw(server: &TestServer, doc: &str) -> Ws {
    let project = doc.split('/').next().unwrap();
    let url = format!("{}/sync/{doc}?token={}", server.url, server.editor(project, "raw"));
    tokio_tungstenite::connect_async(url).await.expect("raw connect").0
}

/// Reads until the server closes; returns the close code (1006 if the socket just dropped).
async fn close_code(ws: &mut Ws) -> u16 {
    collab_test_support::ws::close_code(ws).await.unwrap_or(1006)
}

async fn refused_status(url: String) -> String {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("connection accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().to_string(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_at_the_upgrade_before_anything_loads() {
    let server = TestServer::start().await;
    let forged = {
        let other = TestServer::start().await;
        let t = other.editor("p", "mallory");
        other.stop().await;
        t
    };
    let cases = [
        ("missing", format!("{}/sync/p/doc", server.url)),
        ("garbage", format!("{}/sync/p/doc?token=not-a-token", server.url)),
        ("forged", format!("{}/sync/p/doc?token={forged}", server.url)),
        ("other project", format!("{}/sync/p/doc?token={}", server.url, server.editor("q", "x"))),
    ];
    for (what, url) in cases {
        assert_eq!(refused_status(url).await, "401 Unauthorized", "{what}");
    }
    let bad_name = format!("{}/sync/P%20Q/doc?token={}", server.url, server.editor("p", "x"));
    assert_eq!(refused_status(bad_name).await, "400 Bad Request");
    assert_eq!(server.loaded_documents(), 0, "nothing was loaded for refused connections");
    assert!(server.metric("collab_auth_failures_total") >= 4.0);
    server.stop().await;
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let server = TestServer::start().await;
    let expired = server.token_expired("p");
    let url = format!("{}/sync/p/doc?token={expired}", server.url);
    assert_eq!(refused_status(url).await, "401 Unauthorized");
    let mux = MuxConnection::connect(&server.url).await.unwrap();
    let d = mux.open("p/doc", &expired).await.unwrap();
    d.wait_until("denied", WAIT, |p| !p.status().denied.is_empty()).await.unwrap();
    assert_eq!(d.status().denied, vec!["token expired".to_string()]);
    server.stop().await;
}

#[tokio::test]
async fn multiplexed_bad_tokens_get_permission_denied_and_nothing_loads() {
    let server = TestServer::start().await;
    let mux = MuxConnection::connect(&server.url).await.unwrap();
    let wrong_project = mux.open("p/doc", &server.editor("q", "x")).await.unwrap();
    let garbage = mux.open("p/other", "garbage").await.unwrap();
    let good = mux.open("p/fine", &server.editor("p", "x")).await.unwrap();
    for (peer, reason) in [(&wrong_project, "token does not cover this document"), (&garbage, "invalid token")] {
        peer.wait_until("denied", WAIT, |p| !p.status().denied.is_empty()).await.unwrap();
        assert_eq!(peer.status().denied, vec![reason.to_string()]);
        assert!(!peer.status().synced);
    }
    good.wait_synced(WAIT).await.expect("the socket still serves the authorized document");
    assert_eq!(server.loaded_documents(), 1, "only the authorized document was loaded");
    server.stop().await;
}

#[tokio::test]
async fn a_viewer_cannot_write_and_is_told() {
    let server = TestServer::start().await;
    let editor = server.connect("v/doc", "ed").await;
    editor.insert(0, "original");
    let viewer_token = server.token("v", Role::Viewer, "viewer");
    let viewer = DocPeer::connect(&server.url, "v/doc", &viewer_token).await.unwrap();
    viewer.wait_text("original", WAIT).await.expect("viewer reads");
    viewer.insert(0, "VANDALISM ");
    viewer.wait_until("permission denied", WAIT, |p| !p.status().denied.is_empty()).await.unwrap();
    // A later editor edit reaches the viewer; the viewer's edit never reached the editor.
    editor.insert(8, "!");
    viewer.wait_until("editor edit", WAIT, |p| p.text().ends_with('!')).await.unwrap();
    assert_eq!(editor.text(), "original!");
    let fresh = server.connect("v/doc", "fresh").await;
    assert_eq!(fresh.text(), "original!");

    let mux = MuxConnection::connect(&server.url).await.unwrap();
    let mux_viewer = mux.open("v/doc", &viewer_token).await.unwrap();
    mux_viewer.wait_synced(WAIT).await.unwrap();
    assert_eq!(mux_viewer.status().scope.as_deref(), Some("readonly"));
    mux_viewer.insert(0, "NOPE ");
    mux_viewer.wait_until("sync status refused", WAIT, |p| p.status().refused >= 1).await.unwrap();
    let fresh = server.connect("v/doc", "fresh2").await;
    assert_eq!(fresh.text(), "original!");
    server.stop().await;
}

#[tokio::test]
async fn malformed_truncated_and_oversized_messages_get_close_codes_and_leave_the_document_intact() {
    let server = TestServer::start_with(|c| c.limits.max_message_size = 64 * 1024).await;
    let doc = "bad/doc";
    let keeper = server.connect(doc, "keeper").await;
    keeper.insert(0, "intact");

    let update = {
        let d = yrs::Doc::new();
        let t = d.get_or_insert_text("content");
        let mut txn = yrs::Transact::transact_mut(&d);
        yrs::Text::insert(&t, &mut txn, 0, "x");
        txn.encode_update_v1()
    };
    let full = wire::encode_ywebsocket(OutMsg::Update(&update));
    let truncated = full[..full.len() - 2].to_vec();
    // Decodes as a sync update frame, but the payload is not a Yjs update.
    let not_an_update = wire::encode_ywebsocket(OutMsg::Update(&[200, 200, 200, 200, 1, 2, 3]));
    let cases: Vec<(&str, Message, CloseCode)> = vec![
        ("garbage", Message::Binary(vec![99, 1, 2, 3].into()), CloseCode::Invalid),
        ("truncated", Message::Binary(truncated.into()), CloseCode::Invalid),
        ("not an update", Message::Binary(not_an_update.into()), CloseCode::Invalid),
        ("empty", Message::Binary(Vec::new().into()), CloseCode::Invalid),
        ("text frame", Message::Text("hello".into()), CloseCode::Unsupported),
        ("oversized", Message::Binary(vec![0u8; 100 * 1024].into()), CloseCode::Size),
    ];
    for (what, msg, expected) in cases {
        let mut ws = raw(&server, doc).await;
        ws.send(msg).await.expect("send");
        assert_eq!(close_code(&mut ws).await, u16::from(expected), "{what}");
    }
    keeper.insert(6, "!");
    let fresh = server.connect(doc, "fresh").await;
    assert_eq!(fresh.text(), "intact!");
    assert!(server.metric("collab_protocol_errors_total") >= 5.0);

    // The multiplexed endpoint too.
    let mut ws = tokio_tungstenite::connect_async(format!("{}/sync", server.url)).await.unwrap().0;
    ws.send(Message::Binary(vec![3, b'a', b'b'].into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1007);
    server.stop().await;
}

#[tokio::test]
async fn a_flood_before_authentication_is_cut_off() {
    let server = TestServer::start_with(|c| c.limits.preauth_messages = 16).await;
    let mut ws = tokio_tungstenite::connect_async(format!("{}/sync", server.url)).await.unwrap().0;
    let step1 = wire::encode_hocus_client("p/doc", OutMsg::SyncStep1(&yrs::StateVector::default()));
    let flood = async {
        for _ in 0..100 {
            if ws.send(Message::Binary(step1.clone().into())).await.is_err() {
                break;
            }
        }
    };
    flood.await;
    assert_eq!(close_code(&mut ws).await, 1008);
    assert_eq!(server.loaded_documents(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_socket_that_never_authenticates_is_closed() {
    let server = TestServer::start_with(|c| {
        c.limits.auth_timeout = Duration::from_millis(300);
        c.limits.ping_interval = Duration::from_millis(50);
    })
    .await;
    let mut ws = tokio_tungstenite::connect_async(format!("{}/sync", server.url)).await.unwrap().0;
    assert_eq!(close_code(&mut ws).await, 1008);
    server.stop().await;
}

#[tokio::test]
async fn a_dead_connection_is_closed_after_the_idle_timeout() {
    let server = TestServer::start_with(|c| {
        c.limits.idle_timeout = Duration::from_millis(600);
        c.limits.ping_interval = Duration::from_millis(100);
        c.limits.unload_delay = Duration::from_millis(50);
    })
    .await;
    // A client that connects and then never reads: it never answers a ping.
    let ws = raw(&server, "dead/doc").await;
    server.eventually("connection registered", |s| s.metric("collab_connections_active") == 1.0).await;
    server.eventually("dead connection closed", |s| s.metric("collab_connections_active") == 0.0).await;
    server.eventually("its document unloaded", |s| s.loaded_documents() == 0).await;
    drop(ws);
    server.stop().await;
}

#[tokio::test]
async fn anonymous_access_is_off_by_default() {
    let server = TestServer::start().await;
    assert_eq!(refused_status(format!("{}/sync/anon/doc", server.url)).await, "401 Unauthorized");
    server.stop().await;
    let open = TestServer::start_with(|c| c.allow_anonymous = true).await;
    let peer = DocPeer::connect(&open.url, "anon/doc", "").await.expect("anonymous allowed when asked");
    peer.wait_synced(WAIT).await.unwrap();
    // A bad token is still refused: anonymous means no token, not any token.
    assert_eq!(refused_status(format!("{}/sync/anon/doc?token=bad", open.url)).await, "401 Unauthorized");
    open.stop().await;
}

#[tokio::test]
async fn a_fast_sender_is_throttled_and_loses_nothing() {
    let server = TestServer::start_with(|c| {
        c.limits.rate_messages = 100;
        c.limits.rate_burst = 20;
    })
    .await;
    let doc = "flood/doc";
    let mut ws = raw(&server, doc).await;
    let writer = yrs::Doc::new();
    let text = writer.get_or_insert_text("content");
    for i in 0..150 {
        let mut txn = yrs::Transact::transact_mut(&writer);
        yrs::Text::push(&text, &mut txn, &format!("{i},"));
        let frame = wire::encode_ywebsocket(OutMsg::Update(&txn.encode_update_v1()));
        drop(txn);
        ws.send(Message::Binary(frame.into())).await.expect("send");
    }
    let expected = yrs::GetString::get_string(&text, &yrs::Transact::transact(&writer));
    let reader = server.connect(doc, "reader").await;
    reader.wait_text(&expected, WAIT).await.expect("every throttled frame is applied, none dropped");
    assert!(server.metric("collab_throttled_total") >= 1.0, "the flood was throttled");
    server.stop().await;
}

#[tokio::test]
async fn connection_attempts_are_rate_limited_per_ip() {
    let server = TestServer::start_with(|c| c.limits.connect_rate = 1).await;
    let url = format!("{}/sync/p/doc?token={}", server.url, server.editor("p", "x"));
    let mut limited = 0;
    let mut sockets = Vec::new();
    for _ in 0..30 {
        match tokio_tungstenite::connect_async(&url).await {
            Ok((ws, _)) => sockets.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) if resp.status() == 429 => limited += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(limited >= 10, "only {limited} of 30 rapid connection attempts were refused with 429");
    assert!(!sockets.is_empty(), "the burst allowance let some through");
    server.stop().await;
}
