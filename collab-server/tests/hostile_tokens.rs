//! Tokens on open sockets: a token's `exp` ends the y-websocket and exec sockets it opened (on
//! a timer, whether or not the client sends anything), nothing sent after it is applied or
//! started, and a token whose `nbf` is ahead is refused. The multiplexed endpoint's expiry and
//! re-authorisation are tested through @hocuspocus/provider (`web/test/tokens.test.mjs`).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use collab_server::auth::Identity;
use collab_server::exec::SandboxKind;
use common::exec_peer::ExecPeer;
use common::{TestServer, WAIT};
use exec_bridge::protocol::{ClientMsg, ServerMsg};
use futures_util::SinkExt;
use sync_core::Role;
use tokio_tungstenite::tungstenite::Message;
use yrs::{Doc, ReadTxn, StateVector, Text, Transact};

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

fn identity(project: &str, user: &str) -> Identity {
    Identity { user: user.into(), name: user.to_uppercase(), project: project.into(), role: Role::Editor }
}

/// An editor token of `project` that expires `secs` seconds from now (whole seconds, as `exp`
/// is), and that moment.
fn expiring(server: &TestServer, project: &str, user: &str, secs: u64) -> (String, u64) {
    let exp = unix_now() + secs;
    let token = server.app().keys.sign_window(&identity(project, user), None, exp).expect("sign");
    (token, exp)
}

/// Waits until the wall clock is past `exp` (the server allows no leeway).
async fn until_past(exp: u64) {
    common::until("the clock to pass the token's exp", || unix_now() > exp).await;
}

/// A y-websocket sync update message, encoded by hand: message type 0 (sync), sync type 2
/// (update), then the update as a length-prefixed byte string (lib0 varuints).
fn update_frame(text: &str) -> Vec<u8> {
    let doc = Doc::new();
    doc.get_or_insert_text("content").insert(&mut doc.transact_mut(), 0, text);
    let update = doc.transact().encode_state_as_update_v1(&StateVector::default());
    let mut frame = vec![0, 2];
    let mut n = update.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            frame.push(byte);
            break;
        }
        frame.push(byte | 0x80);
    }
    frame.extend_from_slice(&update);
    frame
}

use collab_test_support::ws::close_code;

/// The document's text as a fresh client with a valid token gets it from the server.
async fn text_now(server: &TestServer, doc: &str) -> String {
    let peer = server.connect(doc, "checker").await;
    peer.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_its_ywebsocket_socket_and_nothing_after_is_applied() {
    let server = TestServer::start().await;
    let doc = "tok1/doc";
    let writer = server.connect(doc, "writer").await;
    writer.insert(0, "before ");
    // Two raw y-protocols peers whose tokens expire in 2 s: one stays silent (the timer must
    // close it), the other sends an update once the token has expired.
    let (token, exp) = expiring(&server, "tok1", "quiet", 2);
    let (mut quiet, _) =
        tokio_tungstenite::connect_async(format!("{}/sync/{doc}?token={token}", server.url)).await.expect("opens");
    let (token, _) = expiring(&server, "tok1", "late", 2);
    let (mut late, _) =
        tokio_tungstenite::connect_async(format!("{}/sync/{doc}?token={token}", server.url)).await.expect("opens");
    // Before the deadline the late peer's token works: its first update is applied.
    late.send(Message::binary(update_frame("IN-TIME "))).await.expect("send");
    writer.wait_until("the in-time update", WAIT, |p| p.text().contains("IN-TIME")).await.expect("applied");

    until_past(exp).await;
    // The socket may already be closed by the timer; then this send fails, which is as good.
    let _ = late.send(Message::binary(update_frame("AFTER-EXPIRY "))).await;
    assert_eq!(close_code(&mut late).await, Some(1008), "the late peer is closed with 1008");
    let started = std::time::Instant::now();
    assert_eq!(close_code(&mut quiet).await, Some(1008), "the silent peer is closed with 1008, by the timer");
    assert!(started.elapsed() < Duration::from_secs(2), "closed at the token's exp, not later");

    let text = text_now(&server, doc).await;
    assert!(text.contains("IN-TIME"), "{text:?}");
    assert!(!text.contains("AFTER-EXPIRY"), "an update sent after the token expired was applied: {text:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_valid_yet_is_refused() {
    let server = TestServer::start_with(|c| c.sandbox = SandboxKind::Local).await;
    let now = unix_now();
    let early = server.app().keys.sign_window(&identity("tok2", "early"), Some(now + 600), now + 1200).expect("sign");
    for path in ["/sync/tok2/doc", "/exec/tok2"] {
        let url = format!("{}{path}?token={early}", server.url);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{path}");
            }
            other => panic!("{path}: a token with nbf ahead must be refused at the upgrade, got {other:?}"),
        }
    }
    // The same window starting a second ago is accepted.
    let started = server.app().keys.sign_window(&identity("tok2", "early"), Some(now - 1), now + 1200).expect("sign");
    let peer = collab_client::DocPeer::connect(&server.url, "tok2/doc", &started).await.expect("connects");
    peer.wait_synced(WAIT).await.expect("synced");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_its_exec_socket_and_opens_no_terminal() {
    let server = TestServer::start_with(|c| c.sandbox = SandboxKind::Local).await;
    let project = "tok3";
    let (token, exp) = expiring(&server, project, "late", 2);
    let mut late = ExecPeer::connect(&server.url, project, &token).await;
    let mut watcher = ExecPeer::connect(&server.url, project, &server.editor(project, "watcher")).await;
    until_past(exp).await;
    // Sent after expiry: refused whether the timer or the frame check comes first.
    let text = serde_json::to_string(&ClientMsg::TermOpen { cols: 80, rows: 24 }).expect("serialize");
    let _ = late.socket.send(Message::text(text)).await;
    assert_eq!(close_code(&mut late.socket).await, Some(1008), "the exec socket is closed with 1008");
    // The watcher's own terminal is the only one the project gets.
    watcher.send(&ClientMsg::TermOpen { cols: 80, rows: 24 }).await;
    let opened = watcher.until("a terminal opened", |m| matches!(m, ServerMsg::TermOpened { .. })).await;
    let fresh = ExecPeer::connect(&server.url, project, &server.editor(project, "fresh")).await;
    let Some(ServerMsg::Hello { terms, .. }) = fresh.seen.first() else { panic!("no hello: {:?}", fresh.seen) };
    assert_eq!(terms.len(), 1, "only the watcher's terminal exists: {terms:?} (watcher's: {opened:?})");
    assert_eq!(watcher.seen.iter().filter(|m| matches!(m, ServerMsg::TermOpened { .. })).count(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_exec_socket_is_closed_when_its_token_expires() {
    let server = TestServer::start_with(|c| c.sandbox = SandboxKind::Local).await;
    let (token, exp) = expiring(&server, "tok4", "quiet", 2);
    let mut quiet = ExecPeer::connect(&server.url, "tok4", &token).await;
    let code = close_code(&mut quiet.socket).await;
    let closed_at = unix_now();
    assert_eq!(code, Some(1008));
    assert!(closed_at <= exp + 1, "closed at {closed_at}, the token expired at {exp}");
    server.stop().await;
}

/// The documents-per-socket bound is lifted only for tokens the node signs for its own server
/// peers: a person's token is held to it even when it names the bridge's user, a service token
/// (what the node's exec bridge gets) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_service_token_opens_more_documents_than_a_socket_may() {
    let server = TestServer::start_with(|c| c.limits.max_docs_per_socket = 3).await;
    let project = "tok9";
    let posing = server.app().keys.sign(&identity(project, "exec-bridge"), Duration::from_secs(600)).expect("sign");
    let service =
        server.app().keys.sign_service(&identity(project, "exec-bridge"), Duration::from_secs(600)).expect("sign");
    let person = collab_client::MuxConnection::connect(&server.url).await.expect("connect");
    let mut opened = Vec::new();
    for i in 0..4 {
        opened.push(person.open(&format!("{project}/p{i}"), &posing).await.expect("open"));
    }
    for peer in &opened[..3] {
        peer.wait_synced(WAIT).await.expect("the first three are served");
    }
    opened[3].wait_until("the fourth is refused", WAIT, |p| !p.status().denied.is_empty()).await.expect("refused");
    let bridge = collab_client::MuxConnection::connect(&server.url).await.expect("connect");
    for i in 0..4 {
        let peer = bridge.open(&format!("{project}/s{i}"), &service).await.expect("open");
        peer.wait_synced(WAIT).await.expect("a service token is not held to the bound");
    }
    server.stop().await;
}
