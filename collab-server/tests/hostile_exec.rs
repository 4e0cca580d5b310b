//! The exec channel against clients that push its limits: concurrent terminal opens past the
//! cap, one user opening socket after socket, a half-open socket that never answers, a bridge
//! that cannot start, and a node cut off from the Redis that holds its project's lease.

mod common;

use std::time::{Duration, Instant};

use collab_server::exec::SandboxKind;
use common::exec_peer::ExecPeer;
use common::{TestServer, WAIT};
use exec_bridge::protocol::{ClientMsg, ServerMsg};
use exec_bridge::session::MAX_TERMINALS;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use collab_test_support::ws::{RawSocket as Socket, close_code};

async fn exec_server(tweak: impl FnOnce(&mut collab_server::Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.sandbox = SandboxKind::Local;
        c.exec_send_timeout = Duration::from_secs(1);
        tweak(c);
    })
    .await
}

/// The first message a node answers an exec socket with, and the socket.
async fn first_answer(server: &TestServer, project: &str, user: &str) -> (ServerMsg, Socket) {
    let url = format!("{}/exec/{project}?token={}", server.url, server.editor(project, user));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("exec socket opens");
    let first = tokio::time::timeout(WAIT, socket.next()).await.expect("an answer in time");
    let Some(Ok(Message::Text(text))) = first else { panic!("no first message: {first:?}") };
    (serde_json::from_str(&text).expect("server messages parse"), socket)
}

/// 40 terminal opens at once from 5 sockets: the cap check and the new terminal's record are
/// one step, so no more than [`MAX_TERMINALS`] terminals ever exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_terminal_opens_never_pass_the_cap() {
    let server = exec_server(|_| {}).await;
    let project = "cap";
    let mut peers = Vec::new();
    for i in 0..5 {
        peers.push(ExecPeer::connect(&server.url, project, &server.editor(project, &format!("user{i}"))).await);
    }
    // Every socket sends its 8 opens before any socket reads an answer.
    let open = serde_json::to_string(&ClientMsg::TermOpen { cols: 80, rows: 24 }).expect("serialize");
    for peer in &mut peers {
        for _ in 0..8 {
            peer.socket.feed(Message::text(open.clone())).await.expect("send");
        }
    }
    futures_util::future::join_all(peers.iter_mut().map(|p| p.socket.flush())).await;
    // Each socket hears of its own 8 requests: a terminal opened by it, or an error to it.
    let answers = futures_util::future::join_all(peers.iter_mut().enumerate().map(|(i, peer)| async move {
        let me = format!("USER{i}");
        let mut opened = 0;
        let mut refused = 0;
        let deadline = tokio::time::Instant::now() + WAIT;
        while opened + refused < 8 {
            let frame = tokio::time::timeout_at(deadline, peer.socket.next()).await.expect("every open answered");
            let Some(Ok(Message::Text(text))) = frame else { continue };
            match serde_json::from_str::<ServerMsg>(&text).expect("parses") {
                ServerMsg::TermOpened { by, .. } if by == me => opened += 1,
                ServerMsg::Error { message } => {
                    assert!(message.contains("at most"), "refused for another reason: {message}");
                    refused += 1;
                }
                _ => {}
            }
        }
        opened
    }))
    .await;
    let opened: usize = answers.iter().sum();
    assert!(opened <= MAX_TERMINALS, "{opened} terminals opened ({answers:?}), the cap is {MAX_TERMINALS}");
    assert!(opened > 0, "no terminal opened at all");
    let fresh = ExecPeer::connect(&server.url, project, &server.editor(project, "fresh")).await;
    let Some(ServerMsg::Hello { terms, .. }) = fresh.seen.first() else { panic!("no hello") };
    assert_eq!(terms.len(), opened, "the session holds what was announced");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_sockets_per_user_are_bounded() {
    let server = exec_server(|c| c.exec_sockets_per_user = 3).await;
    let mut ann = Vec::new();
    for _ in 0..3 {
        ann.push(ExecPeer::connect(&server.url, "lim", &server.editor("lim", "ann")).await);
    }
    let (first, mut fourth) = first_answer(&server, "lim", "ann").await;
    let ServerMsg::Error { message } = first else { panic!("a fourth socket of one user got {first:?}") };
    assert!(message.contains("too many exec connections"), "{message}");
    assert_eq!(close_code(&mut fourth).await, Some(1013));
    // The limit is per user, across projects: ann's next socket elsewhere is refused too, and
    // another user's is not.
    let (first, _) = first_answer(&server, "lim2", "ann").await;
    assert!(matches!(first, ServerMsg::Error { .. }), "{first:?}");
    let (first, _) = first_answer(&server, "lim", "bob").await;
    assert!(matches!(first, ServerMsg::Hello { .. }), "{first:?}");
    // A closed socket frees its place.
    let mut gone = ann.pop().expect("three sockets");
    gone.socket.close(None).await.expect("close");
    drop(gone);
    common::until_async("ann's closed socket to free its place", || async {
        matches!(first_answer(&server, "lim", "ann").await.0, ServerMsg::Hello { .. })
    })
    .await;
    server.stop().await;
}

/// A socket that completed the upgrade and then never reads or writes (half-open, as after a
/// lost network): the server pings it and closes it once the idle timeout passes without a
/// frame from it. A peer that answers pings stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_exec_socket_is_closed_within_the_idle_timeout() {
    let idle = Duration::from_secs(1);
    let server = exec_server(|c| {
        c.limits.ping_interval = Duration::from_millis(200);
        c.limits.idle_timeout = idle;
    })
    .await;
    let mut alive = ExecPeer::connect(&server.url, "idle", &server.editor("idle", "alive")).await;

    let mut tcp = tokio::net::TcpStream::connect(server.http_addr()).await.expect("connect");
    let request = format!(
        "GET /exec/idle?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.editor("idle", "ghost"),
        server.http_addr()
    );
    tcp.write_all(request.as_bytes()).await.expect("upgrade request");
    let upgraded = Instant::now();
    // From here the ghost never writes. Reading raw bytes answers nothing (no WebSocket
    // library behind it); it only shows when the server ends the connection. Meanwhile the
    // live peer reads (and so answers pings) for longer than that.
    let ghost = async {
        let mut received = Vec::new();
        let read = tokio::time::timeout(idle * 4, tcp.read_to_end(&mut received)).await;
        (read.is_ok(), upgraded.elapsed(), received)
    };
    let live = tokio::time::timeout(idle * 3, async {
        loop {
            match alive.socket.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return other,
            }
        }
    });
    let ((ended, lasted, received), quiet) = tokio::join!(ghost, live);
    eprintln!("the half-open socket was closed {lasted:?} after its upgrade (idle timeout {idle:?})");
    assert!(ended, "the half-open socket was still open after {lasted:?}");
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 101"), "the upgrade succeeded");
    assert!(lasted >= idle, "closed after {lasted:?}, before the idle timeout");
    assert!(lasted < idle * 3, "closed after {lasted:?}, the idle timeout is {idle:?}");
    assert!(quiet.is_err(), "the live peer got {quiet:?}");
    alive.send_raw(Message::binary(vec![1])).await;
    alive.until_error("JSON text frames").await;
    server.stop().await;
}

/// A workspace folder that cannot be created (a file holds its name in the workspaces folder)
/// is an error the peer is told at once, with a fixed phrase, not a silent bridge and runs that
/// time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_that_cannot_start_is_an_error_on_the_channel() {
    let dir = tempfile::tempdir().expect("temp dir");
    let workspaces = dir.path().join("workspaces");
    std::fs::create_dir(&workspaces).expect("workspaces folder");
    // The server checks the workspaces folder at start; the project's own folder is what fails.
    let blocker = workspaces.join("broken");
    std::fs::write(&blocker, "not a folder").expect("write");
    let server = exec_server(|c| c.workspaces_dir = Some(workspaces.clone())).await;
    let started = Instant::now();
    let (first, mut socket) = first_answer(&server, "broken", "ann").await;
    let ServerMsg::Error { message } = first else { panic!("a peer of a broken bridge got {first:?}") };
    assert!(message.contains("workspace could not be created"), "{message}");
    assert!(!message.contains("os error") && !message.contains(&blocker.display().to_string()), "{message}");
    assert_eq!(close_code(&mut socket).await, Some(1011));
    assert!(started.elapsed() < Duration::from_secs(2), "told after {:?}", started.elapsed());
    server.stop().await;
}

/// A node cut off from Redis cannot renew its project's lease: it closes the session while the
/// lease still has time left (checked on Redis itself at that moment), so another node can
/// never take the project while this one still runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_renew_closes_its_session_before_the_lease_expires() {
    let project = format!("lease-{:08x}", rand::random::<u32>());
    let ttl_ms = 3000;
    let cluster = common::cluster::Cluster::start_with(2, &project, &["--sandbox", "local", "--exec-lease", "3"]).await;
    let mut peer = ExecPeer::connect(&cluster.nodes[0].url(), &project, &cluster.token("ann")).await;
    let client = redis::Client::open(cluster.redis.url()).expect("redis url");
    let mut redis = client.get_multiplexed_async_connection().await.expect("redis connection");
    let key = format!("collab:exec-owner:{project}");
    let owner: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut redis).await.expect("GET");
    assert!(owner.is_some(), "node 0 holds the lease");

    cluster.nodes[0].redis.cut();
    let cut = Instant::now();
    let code = close_code(&mut peer.socket).await;
    let left: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut redis).await.expect("PTTL");
    let after = cut.elapsed();
    eprintln!("node 0 closed its session {after:?} after the cut; the lease had {left} ms left");
    assert_eq!(code, Some(1013), "the session closed here");
    assert!(left > 0, "node 0 closed its session {after:?} after the cut, when the lease had {left} ms left");
    assert!(after < Duration::from_millis(ttl_ms), "closed {after:?} after the cut");
    // And node 1 takes the project once the lease is over.
    let url = format!("{}/exec/{project}?token={}", cluster.nodes[1].url(), cluster.token("bob"));
    common::until_async("node 1 to take the project", || async {
        let Ok((mut socket, _)) = tokio_tungstenite::connect_async(&url).await else { return false };
        let first = tokio::time::timeout(WAIT, socket.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = first else { return false };
        matches!(serde_json::from_str::<ServerMsg>(&text), Ok(ServerMsg::Hello { .. }))
    })
    .await;
}
