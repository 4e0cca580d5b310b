//! A local cluster for one test: a private Redis the test may kill and restart, `collab serve`
//! processes sharing it and the test PostgreSQL, and a TCP proxy in front of every node's Redis
//! and PostgreSQL connection that the test can cut and heal.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use collab_server::auth::{Identity, Keys};
use sync_core::Role;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use super::WAIT;

const REDIS_SERVER: &str = "/usr/bin/redis-server";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A redis-server process on a fixed port, without persistence.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        assert!(
            Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} is missing: `cargo xtask test` installs the redis-server package"
        );
        let mut redis = Redis { child: None, port: free_port() };
        redis.up().await;
        redis
    }

    pub async fn up(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let port = self.port.to_string();
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok() {
                        return;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "redis-server did not start on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: every connection drops and every message in flight is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy to `upstream`; `cut` drops every connection and refuses new ones until `heal`.
pub struct Proxy {
    pub port: u16,
    state: Arc<Mutex<ProxyState>>,
    accept: AbortHandle,
}

#[derive(Default)]
struct ProxyState {
    cut: bool,
    links: Vec<AbortHandle>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else { continue };
                if st.lock().unwrap().cut {
                    drop(down);
                    continue;
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                let mut st = st.lock().unwrap();
                st.links.retain(|l| !l.is_finished());
                st.links.push(link.abort_handle());
            }
        })
        .abort_handle();
        Proxy { port, state, accept }
    }

    pub fn cut(&self) {
        let mut st = self.state.lock().unwrap();
        st.cut = true;
        for link in st.links.drain(..) {
            link.abort();
        }
    }

    pub fn heal(&self) {
        self.state.lock().unwrap().cut = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// One `collab serve` process, reaching Redis and PostgreSQL through its own proxies.
pub struct Node {
    child: Option<Child>,
    pub url: String,
    pub redis: Proxy,
    pub postgres: Proxy,
    pub log: PathBuf,
}

impl Node {
    pub fn is_alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, as a crash: nothing is flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn http_addr(&self) -> &str {
        self.url.trim_start_matches("ws://")
    }

    /// The value of one metric of this node (first sample line starting with `name `).
    pub async fn metric(&self, name: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(self.http_addr()).await.expect("connect to node");
        let head = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.http_addr());
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found"))
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub redis: Redis,
    pub nodes: Vec<Node>,
    pub postgres_url: String,
    pub project: String,
    dir: tempfile::TempDir,
    keys: Keys,
    /// More `collab serve` arguments for every node.
    extra: Vec<String>,
}

pub fn postgres_url() -> String {
    std::env::var("COLLAB_TEST_POSTGRES_URL")
        .expect("COLLAB_TEST_POSTGRES_URL must point at a PostgreSQL server (cargo xtask test starts one)")
}

/// `postgres://user:pw@host:port/db` with its `host:port` replaced.
fn with_addr(url: &str, addr: &str) -> (String, String) {
    let at = url.rfind('@').expect("user in the PostgreSQL URL") + 1;
    let end = url[at..].find('/').map_or(url.len(), |i| at + i);
    (format!("{}{addr}{}", &url[..at], &url[end..]), url[at..end].to_owned())
}

impl Cluster {
    /// Redis, then `n` nodes; each node compares states every `repair` seconds.
    pub async fn start(n: usize, project: &str) -> Cluster {
        Cluster::start_with(n, project, &[]).await
    }

    /// [`Cluster::start`] with more `collab serve` arguments for every node.
    pub async fn start_with(n: usize, project: &str, extra: &[&str]) -> Cluster {
        let redis = Redis::start().await;
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::load_or_create(dir.path()).unwrap();
        let extra = extra.iter().map(|a| (*a).to_owned()).collect();
        let mut cluster = Cluster {
            redis,
            nodes: Vec::new(),
            postgres_url: postgres_url(),
            project: project.into(),
            dir,
            keys,
            extra,
        };
        for _ in 0..n {
            let node = cluster.spawn_node().await;
            cluster.nodes.push(node);
        }
        cluster
    }

    async fn spawn_node(&self) -> Node {
        let i = self.nodes.len();
        let redis = Proxy::start(format!("127.0.0.1:{}", self.redis.port)).await;
        let (_, pg_addr) = with_addr(&self.postgres_url, "");
        let postgres = Proxy::start(pg_addr).await;
        let (pg_url, _) = with_addr(&self.postgres_url, &format!("127.0.0.1:{}", postgres.port));
        let log = self.dir.path().join(format!("node{i}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_collab"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--web-dir", "/nonexistent", "--rate-messages", "0"])
            .args(["--repair-interval", "0.3", "--unload-delay", "1", "--compact-threshold", "25"])
            .args(["--redis-url", &format!("redis://127.0.0.1:{}", redis.port)])
            .args(["--database-url", &pg_url])
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--workspaces-dir")
            .arg(self.dir.path().join(format!("workspaces{i}")))
            .args(&self.extra)
            .env("RUST_LOG", "info,collab_server=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().expect("spawn collab");
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .unwrap()
        .expect("first line");
        let addr =
            line.trim().strip_prefix("collab listening on http://").unwrap_or_else(|| panic!("unexpected {line:?}"));
        let node = Node { child: Some(child), url: format!("ws://{addr}"), redis, postgres, log };
        let deadline = tokio::time::Instant::now() + WAIT;
        while node.metric("collab_bus_connected").await != 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "node {i} did not connect to redis:\n{}", node.log_tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node
    }

    /// The workspace folder of the cluster's project on node `node`.
    pub fn workspace(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("workspaces{node}")).join(&self.project)
    }

    /// Starts one more node, like the others.
    pub async fn add_node(&mut self) -> usize {
        let node = self.spawn_node().await;
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub fn token(&self, user: &str) -> String {
        let identity =
            Identity { user: user.into(), name: user.into(), project: self.project.clone(), role: Role::Editor };
        self.keys.sign(&identity, Duration::from_secs(3600)).unwrap()
    }

    /// A client of `doc` on node `node`, synced.
    pub async fn peer(&self, node: usize, doc: &str, user: &str) -> collab_client::DocPeer {
        let peer = collab_client::DocPeer::connect(&self.nodes[node].url, doc, &self.token(user)).await.unwrap();
        peer.wait_synced(WAIT).await.unwrap();
        peer
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_alive()).collect()
    }

    /// Every node's log tail, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes.iter().enumerate().map(|(i, n)| format!("--- node {i}\n{}\n", n.log_tail())).collect()
    }
}
