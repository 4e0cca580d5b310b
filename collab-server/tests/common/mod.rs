//! Test harness: a real server on 127.0.0.1:0 with its own data directory, and helpers to mint
//! tokens, restart the server and read its metrics.
#![allow(dead_code)]

pub mod cluster;
pub mod exec_peer;

use std::path::PathBuf;
use std::time::Duration;

use collab_client::DocPeer;
use collab_server::auth::{Identity, Keys};
use collab_server::{Config, Running};
use sync_core::Role;

pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestServer {
    running: Option<Running>,
    config: Config,
    _dir: Option<tempfile::TempDir>,
    pub url: String,
    keys: Keys,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// Starts a server; `tweak` adjusts the configuration (limits, timings) first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::for_data_dir(dir.path().to_path_buf());
        config.web_dir = PathBuf::from("/nonexistent");
        tweak(&mut config);
        let keys = Keys::load_or_create(&config.data_dir).expect("keys");
        let running = collab_server::start(config.clone()).await.expect("server starts");
        let url = format!("ws://{}", running.addr);
        TestServer { running: Some(running), config, _dir: Some(dir), url, keys }
    }

    pub fn token(&self, project: &str, role: Role, user: &str) -> String {
        let identity = Identity { user: user.into(), name: user.to_uppercase(), project: project.into(), role };
        self.keys.sign(&identity, Duration::from_secs(3600)).expect("sign")
    }

    /// A correctly signed token that expired ten seconds ago.
    pub fn token_expired(&self, project: &str) -> String {
        let identity =
            Identity { user: "late".into(), name: "Late".into(), project: project.into(), role: Role::Editor };
        self.keys.sign_expired(&identity).expect("sign")
    }

    pub fn editor(&self, project: &str, user: &str) -> String {
        self.token(project, Role::Editor, user)
    }

    pub async fn connect(&self, doc: &str, user: &str) -> DocPeer {
        let project = doc.split('/').next().unwrap();
        let peer = DocPeer::connect(&self.url, doc, &self.editor(project, user)).await.expect("connect");
        peer.wait_synced(WAIT).await.expect("synced");
        peer
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("server running")
    }

    pub fn metrics(&self) -> String {
        self.running().app.metrics.render()
    }

    /// The value of one metric (first sample line starting with `name `).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found in\n{}", self.metrics()))
    }

    pub fn app(&self) -> &std::sync::Arc<collab_server::AppState> {
        &self.running().app
    }

    pub fn loaded_documents(&self) -> usize {
        self.running().app.rooms.loaded()
    }

    /// Polls `cond` until it holds or the deadline passes.
    pub async fn eventually(&self, what: &str, cond: impl Fn(&TestServer) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful stop (every document flushed), then a fresh process-equivalent on the same data.
    pub async fn restart(&mut self) {
        self.running.take().expect("running").shutdown().await.expect("clean shutdown");
        let mut config = self.config.clone();
        // Reuse the port so clients can reconnect to the same URL.
        config.listen = self.url.trim_start_matches("ws://").parse().expect("addr");
        let running = collab_server::start(config).await.expect("server restarts");
        self.running = Some(running);
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }
}

/// Polls `cond` until it holds; for conditions that span several peers (no one peer's
/// notifications cover them).
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fixed seed from `TEST_SEED`, or a fresh one; printed so a failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (replay with TEST_SEED={seed})");
    seed
}

/// A minimal HTTP/1.1 request over a fresh connection; returns the status and the body.
pub async fn http(server: &TestServer, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = server.url.trim_start_matches("ws://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write body");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let headers = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let status = headers.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
    let mut rest = &response[split + 4..];
    if !headers.contains("transfer-encoding: chunked") {
        return (status, rest.to_vec());
    }
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size");
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).expect("hex").trim(), 16).expect("size");
        if size == 0 {
            return (status, body);
        }
        body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
        rest = &rest[line_end + 2 + size + 2..];
    }
}
