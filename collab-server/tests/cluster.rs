//! Three nodes sharing documents over a real Redis and PostgreSQL, with clients on random nodes
//! making random edits while a node is killed, Redis is restarted, or one node is cut off from
//! Redis. After each fault heals, every edit of every client is on every node and in the store,
//! and every node holds the same document. Each test prints its seed; `TEST_SEED` replays it.

mod common;

use std::collections::BTreeSet;

use collab_client::DocPeer;
use common::cluster::{Cluster, Node};
use common::{WAIT, seed, until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use yrs::{GetString, Text};

const DOCS: usize = 3;
const WRITERS: usize = 6;

/// A client that inserts numbered tokens `<w3.17>` at token boundaries and sometimes deletes one
/// of its own, remembering which of its tokens should be in the document.
struct Writer {
    id: usize,
    doc: String,
    node: usize,
    peer: DocPeer,
    next: u64,
    live: BTreeSet<String>,
}

impl Writer {
    /// Reads and edits in one transaction: the client applies remote updates concurrently, so a
    /// position read outside the transaction may be stale by the time it is used.
    fn edit(&mut self, rng: &mut StdRng) {
        let (id, next) = (self.id, self.next);
        let live = &mut self.live;
        let inserted = self.peer.edit(|txn, text| {
            let current = text.get_string(txn);
            if !live.is_empty() && rng.random_bool(0.2) {
                let nth = rng.random_range(0..live.len());
                let token = live.iter().nth(nth).cloned().expect("a live token");
                if let Some(at) = current.find(&token) {
                    text.remove_range(txn, at as u32, token.len() as u32);
                    live.remove(&token);
                    return false;
                }
            }
            let mut boundaries = vec![0];
            boundaries.extend(current.match_indices('>').map(|(i, _)| i + 1));
            let at = boundaries[rng.random_range(0..boundaries.len())];
            let token = format!("<w{id}.{next}>");
            text.insert(txn, at as u32, &token);
            live.insert(token);
            true
        });
        self.next += u64::from(inserted);
    }
}

struct Workload {
    rng: StdRng,
    writers: Vec<Writer>,
    docs: Vec<String>,
}

impl Workload {
    async fn start(cluster: &Cluster, seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let docs: Vec<String> = (0..DOCS).map(|d| format!("{}/file{d}.txt", cluster.project)).collect();
        let mut writers = Vec::new();
        // Each document's writers sit on different nodes, so every document crosses the bus.
        let mut first_node = [0; DOCS];
        for id in 0..WRITERS {
            let doc = docs[id % DOCS].clone();
            let node = if id < DOCS {
                rng.random_range(0..cluster.nodes.len())
            } else {
                (first_node[id % DOCS] + rng.random_range(1..cluster.nodes.len())) % cluster.nodes.len()
            };
            if id < DOCS {
                first_node[id] = node;
            }
            let peer = cluster.peer(node, &doc, &format!("w{id}")).await;
            writers.push(Writer { id, doc, node, peer, next: 0, live: BTreeSet::new() });
        }
        Workload { rng, writers, docs }
    }

    /// `n` random edits by random writers, yielding now and then so the sockets move.
    async fn edits(&mut self, n: usize) {
        for i in 0..n {
            let w = self.rng.random_range(0..self.writers.len());
            self.writers[w].edit(&mut self.rng);
            if i % 8 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }

    /// Moves every writer whose node is dead (or whose socket closed) to a random live node, as a
    /// load balancer would; the sync handshake resends what the old node never confirmed.
    async fn reconnect_stranded(&mut self, cluster: &Cluster) {
        let live = cluster.live();
        for w in &mut self.writers {
            if cluster.nodes[w.node].is_alive() && w.peer.status().connected {
                continue;
            }
            w.node = live[self.rng.random_range(0..live.len())];
            let token = cluster.token(&format!("w{}", w.id));
            w.peer.reconnect(&cluster.nodes[w.node].url, &w.doc, &token).await.unwrap();
            w.peer.wait_synced(WAIT).await.unwrap();
        }
    }

    fn expected(&self, doc: &str) -> BTreeSet<String> {
        self.writers.iter().filter(|w| w.doc == doc).flat_map(|w| w.live.iter().cloned()).collect()
    }

    /// Waits until every writer and a fresh observer on every live node hold, for each document,
    /// exactly the tokens the writers left in it; then until the store holds them too.
    async fn converged(&self, cluster: &Cluster, what: &str) {
        // The writers first: a fresh observer loading a document on a node would make that node
        // ask the others for their state, and so repair what the check is about.
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.writers.iter().all(|w| tokens(&w.peer.text()) == self.expected(&w.doc)) {
            if tokio::time::Instant::now() > deadline {
                let mut report = format!("{what}: writers did not converge\n");
                for w in &self.writers {
                    let have = tokens(&w.peer.text());
                    let want = self.expected(&w.doc);
                    let missing: Vec<_> = want.difference(&have).collect();
                    report += &format!("writer {} on node {} {}: missing {missing:?}\n", w.id, w.node, w.doc);
                }
                panic!("{report}{}", cluster.logs());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut observers = Vec::new();
        for node in cluster.live() {
            for doc in &self.docs {
                let peer = cluster.peer(node, doc, "observer").await;
                observers.push((node, doc.clone(), peer));
            }
        }
        let ok = |text: &str, doc: &str| tokens(text) == self.expected(doc);
        let done = || {
            self.writers.iter().all(|w| ok(&w.peer.text(), &w.doc))
                && observers.iter().all(|(_, d, p)| ok(&p.text(), d))
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done() {
            if tokio::time::Instant::now() > deadline {
                let mut report = format!("{what}: not converged\n");
                for (node, doc, peer) in &observers {
                    let have = tokens(&peer.text());
                    let want = self.expected(doc);
                    let missing: Vec<_> = want.difference(&have).collect();
                    let extra: Vec<_> = have.difference(&want).collect();
                    report += &format!("node {node} {doc}: missing {missing:?}, extra {extra:?}\n");
                }
                panic!("{report}{}", cluster.logs());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Same tokens in the same order on every node: the documents are identical.
        for doc in &self.docs {
            let texts: BTreeSet<String> =
                observers.iter().filter(|(_, d, _)| d == doc).map(|(_, _, p)| p.text()).collect();
            assert_eq!(texts.len(), 1, "{what}: {doc} differs between nodes: {texts:?}");
        }
        let store = doc_store::open_store(&cluster.postgres_url).await.unwrap();
        for doc in &self.docs {
            let want = self.expected(doc);
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let have = tokens(&stored_text(store.as_ref(), doc).await);
                if have == want {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "{what}: the store lacks {:?}", want.difference(&have));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn tokens(text: &str) -> BTreeSet<String> {
    let all: Vec<String> = text.split_inclusive('>').map(str::to_owned).collect();
    let set: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(set.len(), all.len(), "a token appears twice in {text:?}");
    set
}

async fn stored_text(store: &dyn doc_store::DocStore, doc: &str) -> String {
    use yrs::{GetString, Transact};
    let stored = store.load(doc).await.unwrap();
    let parts = stored.snapshot.iter().chain(stored.updates.iter()).map(Vec::as_slice);
    let state = sync_core::DocState::load(parts).unwrap();
    let text = state.doc().get_or_insert_text("content");
    text.get_string(&state.doc().transact())
}

/// Waits until the store holds `doc` with exactly `text`.
async fn stored_eventually(cluster: &Cluster, doc: &str, text: &str) {
    let store = doc_store::open_store(&cluster.postgres_url).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while stored_text(store.as_ref(), doc).await != text {
        assert!(tokio::time::Instant::now() < deadline, "{text:?} never stored:\n{}", cluster.logs());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Two nodes, and one document with a synced client on each (users `a` and `b`); and the seed.
async fn two_nodes(test: &str, prefix: &str, file: &str) -> (Cluster, String, DocPeer, DocPeer, u64) {
    let seed = seed(test);
    let cluster = Cluster::start(2, &project(prefix, seed)).await;
    let doc = format!("{}/{file}", cluster.project);
    let a = cluster.peer(0, &doc, "a").await;
    let b = cluster.peer(1, &doc, "b").await;
    (cluster, doc, a, b, seed)
}

fn project(name: &str, seed: u64) -> String {
    format!("{name}{}", seed % 1_000_000_007)
}

async fn await_metric(node: &Node, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.metric(name).await != want {
        assert!(tokio::time::Instant::now() < deadline, "{name} never became {want}:\n{}", node.log_tail());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_edit() {
    let seed = seed("a_killed_node_loses_no_edit");
    let mut cluster = Cluster::start(3, &project("kill", seed)).await;
    let mut load = Workload::start(&cluster, seed).await;
    load.edits(300).await;
    let victim = load.writers[0].node;
    cluster.nodes[victim].kill();
    load.edits(100).await;
    load.reconnect_stranded(&cluster).await;
    load.edits(200).await;
    load.converged(&cluster, "after the kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_converge_after_redis_restarts_under_load() {
    let seed = seed("nodes_converge_after_redis_restarts_under_load");
    let mut cluster = Cluster::start(3, &project("redis", seed)).await;
    let mut load = Workload::start(&cluster, seed).await;
    load.edits(200).await;
    cluster.redis.kill();
    // Every node keeps serving its own peers while Redis is gone.
    load.edits(200).await;
    cluster.redis.up().await;
    load.edits(100).await;
    for node in &cluster.nodes {
        await_metric(node, "collab_bus_connected", 1.0).await;
    }
    load.edits(100).await;
    load.converged(&cluster, "after the Redis restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_catches_up() {
    let seed = seed("a_node_cut_off_from_redis_catches_up");
    let cluster = Cluster::start(3, &project("cut", seed)).await;
    let mut load = Workload::start(&cluster, seed).await;
    load.edits(200).await;
    let cut = load.writers[0].node;
    cluster.nodes[cut].redis.cut();
    await_metric(&cluster.nodes[cut], "collab_bus_connected", 0.0).await;
    load.edits(300).await;
    cluster.nodes[cut].redis.heal();
    await_metric(&cluster.nodes[cut], "collab_bus_connected", 1.0).await;
    load.edits(100).await;
    load.converged(&cluster, "after the cut healed").await;
}

/// A node that loads a document gets what another node holds but has not saved: here the other
/// node cannot reach PostgreSQL at all, so the edits exist only in its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_gets_unsaved_edits_from_the_others() {
    let seed = seed("a_joining_node_gets_unsaved_edits_from_the_others");
    let cluster = Cluster::start(2, &project("join", seed)).await;
    let doc = format!("{}/notes.txt", cluster.project);
    let writer = cluster.peer(0, &doc, "a").await;
    cluster.nodes[0].postgres.cut();
    writer.insert(0, "only in node 0's memory");
    let persist_errors = || cluster.nodes[0].metric("collab_persist_errors_total");
    let deadline = tokio::time::Instant::now() + WAIT;
    while persist_errors().await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "node 0 never failed to save:\n{}", cluster.logs());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let reader = cluster.peer(1, &doc, "b").await;
    // Synced means the initial state is in: no waiting for a later relay.
    assert_eq!(reader.text(), "only in node 0's memory", "{}", cluster.logs());
    // Node 1 saved what it got from node 0, so the edit is durable although node 0 is cut off.
    cluster.nodes[0].postgres.heal();
    stored_eventually(&cluster, &doc, "only in node 0's memory").await;
}

/// Cursors and presence cross nodes, and a client's state leaves with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awareness_crosses_nodes() {
    let (_cluster, _doc, a, mut b, _) = two_nodes("awareness_crosses_nodes", "aw", "a.txt").await;
    b.set_awareness(r#"{"user":"b"}"#);
    until("a sees b", || a.peers_awareness().iter().any(|s| s.contains(r#""user":"b""#))).await;
    b.disconnect();
    until("b's state leaves a", || !a.peers_awareness().iter().any(|s| s.contains(r#""user":"b""#))).await;
}

/// An edit relayed to another node and then lost with its own node (which could not save it) is
/// saved by the node it reached, even if its writer never comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_edit_outlives_the_crash_of_its_node() {
    let (mut cluster, doc, mut writer, reader, _) =
        two_nodes("a_relayed_edit_outlives_the_crash_of_its_node", "relay", "notes.txt").await;
    cluster.nodes[0].postgres.cut();
    writer.insert(0, "relayed, never saved by its node");
    reader.wait_text("relayed, never saved by its node", WAIT).await.unwrap();
    cluster.nodes[0].kill();
    writer.disconnect();
    stored_eventually(&cluster, &doc, "relayed, never saved by its node").await;
}

/// Whatever reaches a document's channel from elsewhere (garbage, an update that does not decode,
/// a hello with a bad state vector) is counted and ignored: the document stays whole and keeps
/// syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bus_messages_are_refused_without_harm() {
    use sync_core::peering::{NodeMsg, Summary};
    let (cluster, doc, a, b, seed) =
        two_nodes("hostile_bus_messages_are_refused_without_harm", "hostile", "h.txt").await;
    a.insert(0, "before");
    b.wait_text("before", WAIT).await.unwrap();

    let client = redis::Client::open(cluster.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("collab:doc:{doc}");
    let mut garbage = rand::rngs::StdRng::seed_from_u64(seed);
    let hostile: Vec<Vec<u8>> = vec![
        Vec::new(),
        (0..64).map(|_| garbage.random()).collect(),
        NodeMsg::Update { from: 7, update: vec![1, 2, 3, 4, 5] }.encode(),
        NodeMsg::Hello { from: 7, state: Summary { sv: vec![0xff; 9], deletes: 0 }, reply: true }.encode(),
        NodeMsg::Awareness { from: 7, update: vec![9, 9, 9] }.encode(),
    ];
    for msg in &hostile {
        let _: i64 = redis::cmd("SPUBLISH").arg(&channel).arg(msg).query_async(&mut conn).await.unwrap();
    }
    let node = &cluster.nodes[1];
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.metric("collab_bus_malformed_total").await < 4.0 || node.metric("collab_bus_refused_total").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "hostile messages not all counted:\n{}", node.log_tail());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.insert(6, " and after");
    b.wait_text("before and after", WAIT).await.unwrap();
    b.insert(0, "still: ");
    a.wait_text("still: before and after", WAIT).await.unwrap();
}

/// A lost message that only deleted text leaves both nodes with equal state vectors: the digest
/// of the delete set is what tells them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_deletion_is_repaired() {
    let (cluster, _doc, a, b, _) = two_nodes("a_lost_deletion_is_repaired", "del", "d.txt").await;
    a.insert(0, "keep, drop, keep");
    b.wait_text("keep, drop, keep", WAIT).await.unwrap();
    let node = &cluster.nodes[0];
    node.redis.cut();
    await_metric(node, "collab_bus_connected", 0.0).await;
    a.delete(4, 6);
    assert_eq!(a.text(), "keep, keep");
    node.redis.heal();
    await_metric(node, "collab_bus_connected", 1.0).await;
    b.wait_text("keep, keep", WAIT).await.unwrap();
}
