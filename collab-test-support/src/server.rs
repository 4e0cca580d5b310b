//! A real server in the test's own process, on 127.0.0.1:0 with its own data directory: tokens
//! for it, clients of it, its metrics and state, and a restart on the same data and port.

use std::path::PathBuf;
use std::sync::Arc;

use collab_client::DocPeer;
use collab_server::{AppState, Config, Running};
use sync_core::Role;

use crate::tokens::Tokens;
use crate::wait::{self, WAIT};

pub struct TestServer {
    running: Option<Running>,
    config: Config,
    _dir: tempfile::TempDir,
    /// `ws://host:port`.
    pub url: String,
    tokens: Tokens,
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
        let tokens = Tokens::for_data_dir(&config.data_dir);
        let running = collab_server::start(config.clone()).await.expect("server starts");
        let url = format!("ws://{}", running.addr);
        // A restart reuses the port, so clients reconnect to the same URL.
        config.listen = running.addr;
        TestServer { running: Some(running), config, _dir: dir, url, tokens }
    }

    /// `host:port`, for HTTP.
    pub fn http_addr(&self) -> &str {
        self.url.trim_start_matches("ws://")
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    pub fn token(&self, project: &str, role: Role, user: &str) -> String {
        self.tokens.token(project, role, user)
    }

    /// A correctly signed token that expired ten seconds ago.
    pub fn token_expired(&self, project: &str) -> String {
        self.tokens.expired(project)
    }

    pub fn editor(&self, project: &str, user: &str) -> String {
        self.tokens.editor(project, user)
    }

    /// A y-websocket client of `doc` as editor `user`, synced.
    pub async fn connect(&self, doc: &str, user: &str) -> DocPeer {
        let project = doc.split('/').next().expect("a project");
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
        crate::metrics::value(&self.metrics(), name)
            .unwrap_or_else(|| panic!("metric {name} not found in\n{}", self.metrics()))
    }

    /// Waits until metric `name` satisfies `want`; returns its value then.
    pub async fn await_metric(&self, name: &str, want: impl Fn(f64) -> bool) -> f64 {
        let what = format!("{name} to reach the wanted value");
        wait::poll(&what, WAIT, || std::future::ready(Some(self.metric(name)).filter(|v| want(*v))), || self.metrics())
            .await
    }

    pub fn app(&self) -> &Arc<AppState> {
        &self.running().app
    }

    pub fn loaded_documents(&self) -> usize {
        self.running().app.rooms.loaded()
    }

    /// Polls `cond` until it holds or the deadline passes.
    pub async fn eventually(&self, what: &str, cond: impl Fn(&TestServer) -> bool) {
        wait::until(what, || cond(self)).await;
    }

    /// Graceful stop (every document flushed), then a fresh process-equivalent on the same data
    /// and port.
    pub async fn restart(&mut self) {
        self.restart_after(|| {}).await;
    }

    /// Graceful stop, `meanwhile` (with the server down), then [`TestServer::restart`]'s start.
    pub async fn restart_after(&mut self, meanwhile: impl FnOnce()) {
        self.running.take().expect("running").shutdown().await.expect("clean shutdown");
        meanwhile();
        let running = collab_server::start(self.config.clone()).await.expect("server restarts");
        self.running = Some(running);
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }
}

/// `method path` at `server` with a bearer `token` and `body`: the status and the body.
pub async fn http(server: &TestServer, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let response = crate::http::Request::new(method, path)
        .bearer(token)
        .body(body)
        .send(server.http_addr())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (response.status, response.body)
}
