//! The HTTP API checks credentials before it reads a request's body: an upload without a valid
//! editor's token is answered at once, while its body has not even been sent.

use std::time::Duration;

use collab_server::auth::{Identity, Keys};
use collab_server::{Config, Running};
use sync_core::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn start() -> (Running, Keys, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::for_data_dir(dir.path().to_path_buf());
    config.web_dir = "/nonexistent".into();
    let keys = Keys::load_or_create(&config.data_dir).expect("keys");
    let running = collab_server::start(config).await.expect("server starts");
    (running, keys, dir)
}

/// Sends the head of a 32 MiB upload and none of its body; returns the status the server
/// answers with while it waits for the body that never comes.
async fn stalled_upload(running: &Running, path: &str, token: Option<&str>) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(running.addr).await.expect("connect");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n", 32 << 20);
    stream.write_all(head.as_bytes()).await.expect("write head");
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("answered before the body was sent")
            .expect("read");
        assert!(n > 0, "connection closed without an answer");
        response.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&response);
    head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status")
}

#[tokio::test]
async fn an_import_without_an_editors_token_is_refused_before_its_body_is_read() {
    let (running, keys, _dir) = start().await;
    let sign = |role| {
        let identity = Identity { user: "u".into(), name: "U".into(), project: "p".into(), role };
        keys.sign(&identity, Duration::from_secs(60)).expect("sign")
    };
    let import = "/api/projects/p/import";
    assert_eq!(stalled_upload(&running, import, None).await, 401, "no token");
    assert_eq!(stalled_upload(&running, import, Some("forged")).await, 401, "a forged token");
    assert_eq!(stalled_upload(&running, import, Some(&sign(Role::Viewer))).await, 403, "a viewer's token");
    let other = Identity { user: "u".into(), name: "U".into(), project: "q".into(), role: Role::Editor };
    let other = keys.sign(&other, Duration::from_secs(60)).expect("sign");
    assert_eq!(stalled_upload(&running, import, Some(&other)).await, 401, "another project's token");
    running.shutdown().await.expect("clean shutdown");
}
