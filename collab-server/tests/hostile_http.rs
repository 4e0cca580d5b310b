//! No single client takes the HTTP edge down (#14 item 7): idle connections from one address
//! are bounded and time out, `/healthz` and editors keep working with few descriptors left, and
//! every endpoint that opens a socket or works for a token is rate limited per address.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use collab_test_support::http;
use collab_test_support::process::Serve;
use common::{TestServer, WAIT};
use tokio::io::AsyncReadExt;

/// `count` TCP connections to `addr` from loopback address `from`, kept open and silent.
async fn idle_flood(addr: SocketAddr, from: &str, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        match tokio::time::timeout(Duration::from_secs(2), socket.connect(addr)).await {
            Ok(Ok(tcp)) => held.push(tcp),
            // The listen backlog is full: the server is not accepting (the old behaviour).
            Ok(Err(_)) | Err(_) => break,
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_flood_with_few_descriptors_leaves_healthz_and_editors_working() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::new(dir.path()).args(["--max-connections", "400"]).start().await;
    // 512 descriptors for the whole server, as a small container would give it.
    let pid = server.pid().expect("running").to_string();
    let status = Command::new("prlimit").args(["--pid", &pid, "--nofile=512:512"]).status().expect("prlimit runs");
    assert!(status.success(), "prlimit failed");
    let addr: SocketAddr = server.http_addr().parse().unwrap();
    let held = idle_flood(addr, "127.0.0.2", 1500).await;
    assert!(!held.is_empty());
    let health = http::get(&server.http_addr(), "/healthz").await.expect("/healthz answers during the flood");
    assert_eq!(health.status, 200);
    let token = server.tokens().editor("flood", "editor");
    let editor = collab_client::DocPeer::connect(&server.url(), "flood/doc", &token).await.expect("an editor connects");
    editor.wait_synced(WAIT).await.expect("and syncs");
    drop(held);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let server = TestServer::start_with(|c| c.limits.header_timeout = Duration::from_millis(300)).await;
    let mut silent = tokio::net::TcpStream::connect(server.http_addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf)).await.expect("the server closes a silent socket");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // One that started a request head and stalls is closed too.
    let mut stalled = tokio::net::TcpStream::connect(server.http_addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // Ends (EOF, or a reset) well before the deadline, whatever hyper answers first.
    let _ended =
        tokio::time::timeout(WAIT, stalled.read_to_end(&mut Vec::new())).await.expect("a stalled head is closed");
    server.stop().await;
}

#[tokio::test]
async fn exec_preview_and_api_requests_are_rate_limited_per_address() {
    let server = TestServer::start_with(|c| c.limits.connect_rate = 1).await;
    let token = server.editor("p", "x");
    for path in [
        format!("/exec/p?token={token}"),
        format!("/preview/p/3000/?token={token}"),
        format!("/api/projects/p/checkpoints?token={token}"),
    ] {
        let mut limited = 0;
        for _ in 0..30 {
            let response = http::get(server.http_addr(), &path).await.expect("an answer");
            if response.status == 429 {
                limited += 1;
            }
        }
        assert!(limited >= 10, "{path}: only {limited} of 30 rapid requests were refused with 429");
    }
    // Health checks are never limited.
    for _ in 0..30 {
        assert_eq!(http::get(server.http_addr(), "/healthz").await.unwrap().status, 200);
    }
    server.stop().await;
}
