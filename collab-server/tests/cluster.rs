//! Three nodes sharing documents over a real Redis and PostgreSQL, with clients on random nodes
//! making random edits while a node is killed (and restarted), Redis is restarted, one node is
//! cut off from Redis, or the store stalls. After each fault heals, every edit of every client is
//! on every node and in the store, and every node holds the same document. Each test prints its
//! seed; `TEST_SEED` replays it.

mod common;

use std::collections::BTreeSet;

use collab_client::DocPeer;
use collab_test_support::wait;
use common::cluster::Cluster;
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
            w.peer.reconnect(&cluster.nodes[w.node].url(), &w.doc, &token).await.unwrap();
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
        let writers_done = || self.writers.iter().all(|w| tokens(&w.peer.text()) == self.expected(&w.doc));
        let writers_report = || {
            let mut report = String::new();
            for w in &self.writers {
                let have = tokens(&w.peer.text());
                let want = self.expected(&w.doc);
                let missing: Vec<_> = want.difference(&have).collect();
                report += &format!("writer {} on node {} {}: missing {missing:?}\n", w.id, w.node, w.doc);
            }
            report + &cluster.logs()
        };
        let writers_what = format!("{what}: the writers to converge");
        wait::poll(&writers_what, WAIT, || std::future::ready(writers_done().then_some(())), writers_report).await;
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
        let report = || {
            let mut report = String::new();
            for (node, doc, peer) in &observers {
                let have = tokens(&peer.text());
                let want = self.expected(doc);
                let missing: Vec<_> = want.difference(&have).collect();
                let extra: Vec<_> = have.difference(&want).collect();
                report += &format!("node {node} {doc}: missing {missing:?}, extra {extra:?}\n");
            }
            report + &cluster.logs()
        };
        let all_what = format!("{what}: every node to converge");
        wait::poll(&all_what, WAIT, || std::future::ready(done().then_some(())), report).await;
        // Same tokens in the same order on every node: the documents are identical.
        for doc in &self.docs {
            let texts: BTreeSet<String> =
                observers.iter().filter(|(_, d, _)| d == doc).map(|(_, _, p)| p.text()).collect();
            assert_eq!(texts.len(), 1, "{what}: {doc} differs between nodes: {texts:?}");
        }
        let store = doc_store::open_store(&cluster.postgres_url).await.unwrap();
        for doc in &self.docs {
            let want = self.expected(doc);
            let store_what = format!("{what}: the store to hold every token of {doc}");
            let stored = || async { (tokens(&stored_text(store.as_ref(), doc).await) == want).then_some(()) };
            wait::poll(&store_what, WAIT, stored, || format!("wanted {want:?}")).await;
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
    let stored = || async { (stored_text(store.as_ref(), doc).await == text).then_some(()) };
    wait::poll(&format!("{text:?} in the store"), WAIT, stored, || cluster.logs()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_edit() {
    let seed = seed("a_killed_node_loses_no_edit");
    let mut cluster = Cluster::start(3, &project("kill", seed)).await;
    let mut load = Workload::start(&cluster, seed).await;
    load.edits(300).await;
    let victim = load.writers[0].node;
    cluster.kill_node(victim);
    load.edits(100).await;
    load.reconnect_stranded(&cluster).await;
    load.edits(200).await;
    load.converged(&cluster, "after the kill").await;
    // Back on the same data and port, the node serves the documents with every edit.
    cluster.restart_node(victim).await;
    load.edits(100).await;
    load.converged(&cluster, "after the restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_converge_after_redis_restarts_under_load() {
    let seed = seed("nodes_converge_after_redis_restarts_under_load");
    let mut cluster = Cluster::start(3, &project("redis", seed)).await;
    let mut load = Workload::start(&cluster, seed).await;
    load.edits(200).await;
    cluster.kill_redis();
    // Every node keeps serving its own peers while Redis is gone, and while it reconnects.
    load.edits(200).await;
    cluster.redis.up().await;
    load.edits(100).await;
    cluster.await_on_bus().await;
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
    cluster.cut_redis(cut).await;
    load.edits(300).await;
    cluster.restore_redis(cut).await;
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
    cluster.cut_store(0);
    writer.insert(0, "only in node 0's memory");
    cluster.nodes[0].server.await_metric("collab_persist_errors_total", |n| n >= 1.0).await;
    let reader = cluster.peer(1, &doc, "b").await;
    // Synced means the initial state is in: no waiting for a later relay.
    assert_eq!(reader.text(), "only in node 0's memory", "{}", cluster.logs());
    // Node 1 saved what it got from node 0, so the edit is durable although node 0 is cut off.
    cluster.restore_store(0);
    stored_eventually(&cluster, &doc, "only in node 0's memory").await;
}

/// A store that hangs (its update log locked, every save waiting) slows nothing live: edits
/// cross nodes while saves wait, and once the store answers again every edit is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_delays_saves_and_loses_nothing() {
    let (cluster, doc, a, b, _) = two_nodes("a_stalled_store_delays_saves_and_loses_nothing", "stall", "s.txt").await;
    a.insert(0, "saved;");
    stored_eventually(&cluster, &doc, "saved;").await;
    // b types at the start of what it has: it must have "saved;" first, or its "b: " is
    // concurrent with it and may sort after it.
    b.wait_text("saved;", WAIT).await.unwrap();
    let stall = cluster.stall_store().await;
    a.insert(6, " while stalled;");
    b.insert(0, "b: ");
    a.wait_text("b: saved; while stalled;", WAIT).await.unwrap();
    b.wait_text("b: saved; while stalled;", WAIT).await.unwrap();
    // Node 0 holds its peer's edit unsaved: its save waits on the lock.
    cluster.nodes[0].server.await_metric("collab_unsaved_bytes", |n| n > 0.0).await;
    stall.release().await;
    stored_eventually(&cluster, &doc, "b: saved; while stalled;").await;
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
    cluster.cut_store(0);
    writer.insert(0, "relayed, never saved by its node");
    reader.wait_text("relayed, never saved by its node", WAIT).await.unwrap();
    cluster.kill_node(0);
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
    let node = &cluster.nodes[1].server;
    node.await_metric("collab_bus_malformed_total", |n| n >= 4.0).await;
    node.await_metric("collab_bus_refused_total", |n| n >= 1.0).await;
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
    cluster.cut_redis(0).await;
    a.delete(4, 6);
    assert_eq!(a.text(), "keep, keep");
    cluster.restore_redis(0).await;
    b.wait_text("keep, keep", WAIT).await.unwrap();
}
