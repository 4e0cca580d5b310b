//! HAProxy with deploy/haproxy.cfg in front of three `collab serve` processes: every socket of a
//! project, y-websocket or multiplexed, lands on one node; projects spread over the nodes; and
//! when a node dies, its projects move to live nodes while the others stay where they were.
//!
//! Only routing is checked, so each node keeps its own SQLite database (no Redis, no PostgreSQL);
//! they share the data directory, hence the token signing key.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use collab_client::{DocPeer, MuxConnection};
use collab_test_support::haproxy;
use collab_test_support::net::free_port;
use collab_test_support::process::{Serve, ServerProcess};
use collab_test_support::tokens::Tokens;
use collab_test_support::{http, wait};
use common::WAIT;

/// Fixed names, so the ring (which depends on the node names, not their ports) places them the
/// same way on every run: with these, all three nodes get some.
const PROJECTS: [&str; 12] =
    ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"];

/// Documents opened per project: the root, a file, and a file deeper down (only the first path
/// segment may count).
fn docs_of(project: &str) -> [String; 3] {
    [project.to_owned(), format!("{project}/notes"), format!("{project}/src/main")]
}

/// One `collab serve` process with its own SQLite database, killed on drop.
struct Node {
    server: ServerProcess,
    name: String,
}

impl Node {
    async fn spawn(name: &str, data_dir: &Path) -> Node {
        let database = format!("sqlite://{}", data_dir.join(format!("{name}.sqlite3")).display());
        let server = Serve::new(data_dir)
            .args(["--database-url", &database])
            .log_to(&data_dir.join(format!("{name}.log")))
            .start()
            .await;
        Node { server, name: name.to_owned() }
    }

    /// `collab_connections_active` of this node, or `None` once it is killed.
    async fn connections(&self) -> Option<f64> {
        self.server.is_alive().then_some(())?;
        Some(self.server.metric("collab_connections_active").await)
    }
}

/// Three nodes behind HAProxy, and the signing key their tokens need.
struct Balanced {
    nodes: Vec<Node>,
    haproxy: Child,
    /// `ws://` address of HAProxy.
    url: String,
    /// HAProxy's stdout and stderr: request log, and servers going down.
    haproxy_log: PathBuf,
    tokens: Tokens,
    _dir: tempfile::TempDir,
}

impl Balanced {
    async fn start() -> Balanced {
        assert!(
            Path::new(haproxy::BINARY).exists(),
            "{} is missing: `cargo xtask test` installs the haproxy package",
            haproxy::BINARY
        );
        let dir = tempfile::tempdir().unwrap();
        // Created before any node starts, so they all load this one key.
        let tokens = Tokens::for_data_dir(dir.path());
        let mut nodes = Vec::new();
        for i in 1..=3 {
            nodes.push(Node::spawn(&format!("node{i}"), dir.path()).await);
        }
        // Quick health checks, so a dead node is out within a fraction of a second.
        let servers: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} {} inter 200ms fastinter 100ms downinter 200ms", n.name, n.server.http_addr()))
            .collect();
        let listen = format!("127.0.0.1:{}", free_port());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let template = haproxy::read_template(root).expect("deploy/haproxy.cfg");
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(&config, haproxy::config(&template, &listen, &servers).expect("a config")).unwrap();
        let haproxy_log = dir.path().join("haproxy.log");
        let log = std::fs::File::create(&haproxy_log).unwrap();
        let haproxy = Command::new(haproxy::BINARY)
            .arg("-f")
            .arg(&config)
            .arg("-db")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let lb = Balanced { nodes, haproxy, url: format!("ws://{listen}"), haproxy_log, tokens, _dir: dir };
        lb.until("HAProxy answers /healthz", || async {
            http::get(&listen, "/healthz").await.is_ok_and(|response| response.status == 200)
        })
        .await;
        lb
    }

    fn token(&self, project: &str) -> String {
        self.tokens.editor(project, "u")
    }

    /// A y-websocket peer of `doc` through HAProxy, synced.
    async fn connect(&self, doc: &str) -> DocPeer {
        let project = doc.split('/').next().unwrap();
        let peer = DocPeer::connect(&self.url, doc, &self.token(project)).await.expect("connect through haproxy");
        peer.wait_synced(WAIT).await.expect("synced through haproxy");
        peer
    }

    /// Every node's open connections (`None` for a killed node).
    async fn connections(&self) -> Vec<Option<f64>> {
        let mut counts = Vec::new();
        for node in &self.nodes {
            counts.push(node.connections().await);
        }
        counts
    }

    /// The one node whose connections grew by `n` since `before`, once the growth adds up to `n`;
    /// fails if it is spread over several nodes.
    async fn node_gaining(&self, before: &[Option<f64>], n: f64) -> usize {
        let gains = || async {
            let now = self.connections().await;
            let gains: Vec<(usize, f64)> = now
                .iter()
                .zip(before)
                .enumerate()
                .filter_map(|(i, (now, before))| Some((i, (*now)? - (*before)?)))
                .filter(|(_, gain)| *gain != 0.0)
                .collect();
            (gains.iter().map(|(_, gain)| gain).sum::<f64>() == n).then_some(gains)
        };
        let gains = wait::poll(&format!("{n} new sockets after {before:?}"), WAIT, gains, || self.haproxy_log()).await;
        assert_eq!(gains.len(), 1, "{n} sockets of one project spread over nodes: gains {gains:?}");
        gains[0].0
    }

    /// Polls an async condition until it holds.
    async fn until<F: Future<Output = bool>>(&self, what: &str, cond: impl Fn() -> F) {
        let probe = || {
            let holds = cond();
            async move { holds.await.then_some(()) }
        };
        wait::poll(what, WAIT, probe, || format!("haproxy log:\n{}", self.haproxy_log())).await;
    }

    fn haproxy_log(&self) -> String {
        std::fs::read_to_string(&self.haproxy_log).unwrap_or_default()
    }
}

impl Drop for Balanced {
    fn drop(&mut self) {
        let _ = self.haproxy.kill();
        let _ = self.haproxy.wait();
        for node in &mut self.nodes {
            node.server.kill();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_keeps_each_project_on_one_node_and_moves_a_dead_nodes_projects() {
    let mut lb = Balanced::start().await;

    // Every y-websocket socket of a project lands on the same node.
    let mut home: BTreeMap<&str, usize> = BTreeMap::new();
    let mut peers: BTreeMap<String, DocPeer> = BTreeMap::new();
    for project in PROJECTS {
        let before = lb.connections().await;
        for doc in docs_of(project) {
            let peer = lb.connect(&doc).await;
            peers.insert(doc, peer);
        }
        home.insert(project, lb.node_gaining(&before, 3.0).await);
    }
    eprintln!("projects by node: {home:?}");

    // Projects spread over the nodes (with these names, over all three).
    let used: BTreeSet<usize> = home.values().copied().collect();
    assert!(used.len() > 1, "all 12 projects on one node: {home:?}");

    // A multiplexed socket naming its project meets that project's y-websocket peers.
    let mut muxes = Vec::new();
    for &node in &used {
        let project = *home.iter().find(|(_, n)| **n == node).unwrap().0;
        let before = lb.connections().await;
        let mux = MuxConnection::connect_url(&format!("{}/sync?project={project}", lb.url)).await.unwrap();
        let peer = mux.open(&format!("{project}/notes"), &lb.token(project)).await.unwrap();
        peer.wait_synced(WAIT).await.unwrap();
        assert_eq!(lb.node_gaining(&before, 1.0).await, node, "multiplexed socket of {project}");
        muxes.push((mux, peer));
    }

    // Kill the node of the first project; HAProxy takes it out.
    let victim = home[PROJECTS[0]];
    let doc = format!("{}/notes", PROJECTS[0]);
    let writer = peers.get_mut(&doc).unwrap();
    writer.insert(0, "written before the crash");
    lb.nodes[victim].server.kill();
    writer.wait_until("socket closed by the crash", WAIT, |p| !p.status().connected).await.unwrap();
    let down = format!("Server nodes/{} is DOWN", lb.nodes[victim].name);
    lb.until(&down, || async { lb.haproxy_log().contains(&down) }).await;

    // The writer reconnects through HAProxy, reaches a live node, and syncs its text there.
    let before = lb.connections().await;
    writer.reconnect(&lb.url, &doc, &lb.token(PROJECTS[0])).await.expect("reconnect through haproxy");
    writer.wait_synced(WAIT).await.unwrap();
    let new_home = lb.node_gaining(&before, 1.0).await;
    assert_ne!(new_home, victim);
    let reader = lb.connect(&doc).await;
    reader.wait_text("written before the crash", WAIT).await.unwrap();

    // The dead node's projects now live on live nodes; every other project stayed where it was.
    let mut more = Vec::new();
    for project in PROJECTS {
        let before = lb.connections().await;
        let peer = lb.connect(&format!("{project}/notes")).await;
        let node = lb.node_gaining(&before, 1.0).await;
        if home[project] == victim {
            assert_ne!(node, victim, "{project} still routed to the dead node");
        } else {
            assert_eq!(node, home[project], "{project} moved although its node is alive");
        }
        more.push(peer);
    }
}
