//! A local cluster for one test: a private Redis, `collab serve` processes sharing it, the test
//! PostgreSQL and one data directory, and a [`CutProxy`] in front of every node's Redis and
//! PostgreSQL connection. Each fault is one call: [`Cluster::kill_node`],
//! [`Cluster::restart_node`], [`Cluster::cut_redis`] / [`Cluster::restore_redis`],
//! [`Cluster::kill_redis`] / [`Cluster::restart_redis`], [`Cluster::cut_store`] /
//! [`Cluster::restore_store`], [`Cluster::stall_store`].

use std::path::PathBuf;

use collab_client::DocPeer;
use sync_core::Role;

use crate::net::CutProxy;
use crate::postgres::{self, StoreStall};
use crate::process::{Serve, ServerProcess};
use crate::redis::Redis;
use crate::tokens::Tokens;
use crate::wait::WAIT;

/// One `collab serve` process, reaching Redis and PostgreSQL through its own proxies.
pub struct Node {
    pub server: ServerProcess,
    pub redis: CutProxy,
    pub postgres: CutProxy,
}

impl Node {
    pub fn is_alive(&self) -> bool {
        self.server.is_alive()
    }

    /// `ws://host:port`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// SIGKILL, as a crash: nothing is flushed.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// The value of one metric of this node now.
    pub async fn metric(&self, name: &str) -> f64 {
        self.server.metric(name).await
    }

    /// Waits until metric `name` of this node equals `want`.
    pub async fn await_metric(&self, name: &str, want: f64) {
        self.server.await_metric(name, |v| v == want).await;
    }

    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }
}

pub struct Cluster {
    pub redis: Redis,
    pub nodes: Vec<Node>,
    pub postgres_url: String,
    pub project: String,
    dir: tempfile::TempDir,
    tokens: Tokens,
    /// More `collab serve` arguments for every node.
    extra: Vec<String>,
}

impl Cluster {
    /// Redis, then `n` nodes; each compares its documents' states with the others every 0.3 s.
    pub async fn start(n: usize, project: &str) -> Cluster {
        Cluster::start_with(n, project, &[]).await
    }

    /// [`Cluster::start`] with more `collab serve` arguments for every node.
    pub async fn start_with(n: usize, project: &str, extra: &[&str]) -> Cluster {
        let redis = Redis::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        // Before any node starts, so that they all load this one key.
        let tokens = Tokens::for_data_dir(dir.path());
        let mut cluster = Cluster {
            redis,
            nodes: Vec::new(),
            postgres_url: postgres::test_url(),
            project: project.into(),
            dir,
            tokens,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        for _ in 0..n {
            cluster.add_node().await;
        }
        cluster
    }

    /// Starts one more node, like the others, and waits until it is on the bus; returns its index.
    pub async fn add_node(&mut self) -> usize {
        self.add_node_with(&[]).await
    }

    /// [`Cluster::add_node`] with more arguments for this node alone (none the cluster's
    /// arguments for every node already give).
    pub async fn add_node_with(&mut self, args: &[&str]) -> usize {
        let i = self.nodes.len();
        let redis = CutProxy::start(&self.redis.addr()).await;
        let (_, pg_addr) = postgres::with_addr(&self.postgres_url, "");
        let postgres = CutProxy::start(&pg_addr).await;
        let (pg_url, _) = postgres::with_addr(&self.postgres_url, &postgres.addr.to_string());
        let workspaces = self.dir.path().join(format!("workspaces{i}"));
        let server = Serve::new(self.dir.path())
            .args(["--repair-interval", "0.3", "--unload-delay", "1", "--compact-threshold", "25"])
            .args(["--redis-url", &format!("redis://{}", redis.addr), "--database-url", &pg_url])
            .args(["--workspaces-dir", &workspaces.display().to_string()])
            .args(&self.extra)
            .args(args)
            .env("RUST_LOG", "info,collab_server=debug")
            .log_to(&self.dir.path().join(format!("node{i}.log")))
            .start()
            .await;
        let node = Node { server, redis, postgres };
        node.await_metric("collab_bus_connected", 1.0).await;
        self.nodes.push(node);
        i
    }

    /// SIGKILL to node `i`, as a crash: nothing is flushed, its lease is not given back.
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again (killing it first if it runs) on its data, arguments and port, and
    /// waits until it is back on the bus.
    pub async fn restart_node(&mut self, i: usize) {
        self.nodes[i].server.restart().await;
        self.nodes[i].await_metric("collab_bus_connected", 1.0).await;
    }

    /// Cuts node `i` off from Redis and waits until it knows.
    pub async fn cut_redis(&self, i: usize) {
        self.nodes[i].redis.cut();
        self.nodes[i].await_metric("collab_bus_connected", 0.0).await;
    }

    /// Gives node `i` its Redis link back and waits until it is on the bus again.
    pub async fn restore_redis(&self, i: usize) {
        self.nodes[i].redis.restore();
        self.nodes[i].await_metric("collab_bus_connected", 1.0).await;
    }

    /// SIGKILL to Redis itself: every node loses the bus, every message in flight is lost.
    pub fn kill_redis(&mut self) {
        self.redis.kill();
    }

    /// Starts Redis again and waits until every live node is back on the bus.
    pub async fn restart_redis(&mut self) {
        self.redis.up().await;
        self.await_on_bus().await;
    }

    /// Waits until every live node is connected to Redis.
    pub async fn await_on_bus(&self) {
        for node in self.nodes.iter().filter(|n| n.is_alive()) {
            node.await_metric("collab_bus_connected", 1.0).await;
        }
    }

    /// Cuts node `i` off from PostgreSQL: its connections drop, new ones are refused.
    pub fn cut_store(&self, i: usize) {
        self.nodes[i].postgres.cut();
    }

    pub fn restore_store(&self, i: usize) {
        self.nodes[i].postgres.restore();
    }

    /// Stalls the store for every node until the returned guard is dropped (or released): the
    /// update log is locked, so saves hang instead of failing. The lock is on the shared test
    /// database, so other tests' saves wait too: hold it for seconds, not longer.
    pub async fn stall_store(&self) -> StoreStall {
        StoreStall::start(&self.postgres_url).await
    }

    /// The workspace folder of the cluster's project on node `i`.
    pub fn workspace(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("workspaces{i}")).join(&self.project)
    }

    /// An editor token for `user` in the cluster's project.
    pub fn token(&self, user: &str) -> String {
        self.tokens.token(&self.project, Role::Editor, user)
    }

    /// A client of `doc` on node `i`, synced.
    pub async fn peer(&self, i: usize, doc: &str, user: &str) -> DocPeer {
        let peer = DocPeer::connect(&self.nodes[i].url(), doc, &self.token(user)).await.expect("connect to a node");
        peer.wait_synced(WAIT).await.expect("synced");
        peer
    }

    /// The indexes of the nodes still running.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_alive()).collect()
    }

    /// Every node's log tail, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes.iter().enumerate().map(|(i, n)| format!("--- node {i}\n{}\n", n.log_tail())).collect()
    }
}
