//! The trace-replay scenario: a recorded editing session typed through a server as fast as it
//! accepts while other peers watch, ending with every copy equal to the trace's `endContent`.
//! A sequential trace is typed by one client, one yrs transaction per recorded transaction. The
//! concurrent trace is typed by one client per agent: each agent's edits are first made
//! offline against exactly the versions the trace names as their parents (so that positions
//! mean what they meant to the person typing), then each client sends its agent's edits in order
//! while receiving the others' from the server.

use std::time::{Duration, Instant};

use collab_client::DocPeer;
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, ReadTxn, Text, Transact, TransactionMut, Update};

use crate::target::Target;
use crate::trace::{self, Patch};

/// A fresh document name for each replay, so that replays against one server never share one.
fn fresh_doc(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("replay-{name}-{}-{n}/file", std::process::id())
}

/// Local updates a writer lets pile up unsent before it waits for its socket.
const WINDOW: usize = 64;

#[derive(Debug, Clone)]
pub struct Report {
    pub trace: String,
    pub writers: usize,
    pub watchers: usize,
    /// Recorded transactions typed.
    pub txns: usize,
    /// From the first keystroke until every peer holds `endContent`.
    pub seconds: f64,
    /// Every peer ended with exactly `endContent`.
    pub exact: bool,
    /// When not exact: each peer's text length and connection state.
    pub peers: Vec<String>,
}

impl Report {
    pub fn txns_per_second(&self) -> f64 {
        self.txns as f64 / self.seconds.max(1e-9)
    }
}

fn apply_patches(txn: &mut TransactionMut<'_>, text: &yrs::TextRef, patches: &[Patch]) {
    for (pos, del, ins) in patches {
        if *del > 0 {
            text.remove_range(txn, *pos, *del);
        }
        if !ins.is_empty() {
            text.insert(txn, *pos, ins);
        }
    }
}

/// Sends local transactions no faster than the socket takes them.
async fn keep_up(peer: &DocPeer) {
    while peer.unsent() > WINDOW {
        tokio::task::yield_now().await;
    }
}

/// Waits until every peer holds `expected`; false if `timeout` passes first, with each peer's
/// text length and connection status.
async fn all_reach(peers: &[DocPeer], expected: &str, timeout: Duration) -> (bool, Vec<String>) {
    let deadline = Instant::now() + timeout;
    loop {
        if peers.iter().all(|p| p.text_len() == expected.len() as u32 && p.text() == expected) {
            return (true, Vec::new());
        }
        if Instant::now() >= deadline {
            let states = peers
                .iter()
                .map(|p| format!("{} of {} characters, {:?}", p.text_len(), expected.len(), p.status()))
                .collect();
            return (false, states);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Types `sequential/{name}` through the server with one writer while `watchers` peers watch.
pub async fn sequential(target: &Target, name: &str, watchers: usize, timeout: Duration) -> anyhow::Result<Report> {
    let trace = trace::load_sequential(name)?;
    let doc = fresh_doc(name);
    let writer = target.join(&doc).await?;
    writer.wait_synced(Duration::from_secs(30)).await?;
    let mut peers = Vec::with_capacity(watchers + 1);
    for _ in 0..watchers {
        let peer = target.join(&doc).await?;
        peer.wait_synced(Duration::from_secs(30)).await?;
        peers.push(peer);
    }
    let started = Instant::now();
    for txn in &trace.txns {
        writer.edit(|t, text| apply_patches(t, text, &txn.patches));
        keep_up(&writer).await;
    }
    peers.push(writer);
    let (exact, states) = all_reach(&peers, &trace.end_content, timeout).await;
    Ok(Report {
        trace: name.to_owned(),
        writers: 1,
        watchers,
        txns: trace.txns.len(),
        seconds: started.elapsed().as_secs_f64(),
        exact,
        peers: states,
    })
}

/// One recorded transaction of a concurrent trace, made offline as a yrs update.
#[derive(Debug, Clone)]
pub struct Edit {
    pub agent: usize,
    pub update: Vec<u8>,
    /// What the agent had seen of the others when it typed: `(client id, clock)` its document
    /// must reach before this edit is made live, as a person types after seeing the others'.
    pub seen: Vec<(u64, u32)>,
}

/// Each agent's edits of a concurrent trace as yrs updates, made against the versions the trace
/// names as their parents, in trace order. Agent `a` is yrs client `a + 1`.
pub fn concurrent_updates(trace: &trace::ConcurrentTrace) -> anyhow::Result<Vec<Edit>> {
    let agents: Vec<Doc> = (0..trace.num_agents).map(|a| Doc::with_client_id(a as u64 + 1)).collect();
    // Which transactions each agent's document holds; always closed under "parent of".
    let mut holds = vec![vec![false; trace.txns.len()]; trace.num_agents];
    let mut updates: Vec<Edit> = Vec::with_capacity(trace.txns.len());
    // Each transaction's agent's clock after it.
    let mut clock_after: Vec<u32> = Vec::with_capacity(trace.txns.len());
    for (i, txn) in trace.txns.iter().enumerate() {
        let a = txn.agent;
        anyhow::ensure!(a < trace.num_agents, "txn {i}: agent {a} out of range");
        // The ancestors this agent's document lacks, found by walking parents until held ones.
        let mut missing = Vec::new();
        let mut stack: Vec<usize> = txn.parents.clone();
        while let Some(p) = stack.pop() {
            anyhow::ensure!(p < i, "txn {i}: parent {p} does not come before it");
            if !holds[a][p] {
                holds[a][p] = true;
                missing.push(p);
                stack.extend_from_slice(&trace.txns[p].parents);
            }
        }
        missing.sort_unstable();
        let doc = &agents[a];
        let text = doc.get_or_insert_text("content");
        {
            let mut t = doc.transact_mut();
            for p in missing {
                t.apply_update(Update::decode_v1(&updates[p].update)?)?;
            }
        }
        let mut t = doc.transact_mut();
        apply_patches(&mut t, &text, &txn.patches);
        let update = t.encode_update_v1();
        drop(t);
        clock_after.push(doc.transact().state_vector().get(&doc.client_id()));
        let mut seen: Vec<(u64, u32)> = Vec::new();
        for &p in &txn.parents {
            let other = trace.txns[p].agent;
            if other == a {
                continue;
            }
            let client = other as u64 + 1;
            match seen.iter_mut().find(|(c, _)| *c == client) {
                Some(entry) => entry.1 = entry.1.max(clock_after[p]),
                None => seen.push((client, clock_after[p])),
            }
        }
        updates.push(Edit { agent: a, update, seen });
        holds[a][i] = true;
    }
    Ok(updates)
}

fn has_seen(peer: &DocPeer, seen: &[(u64, u32)]) -> bool {
    if seen.is_empty() {
        return true;
    }
    let state = peer.doc().transact().state_vector();
    seen.iter().all(|(client, clock)| state.get(&yrs::block::ClientID::new(*client)) >= *clock)
}

/// Replays `concurrent/{name}` with one client per agent, plus `watchers` watching peers.
pub async fn concurrent(target: &Target, name: &str, watchers: usize, timeout: Duration) -> anyhow::Result<Report> {
    let trace = trace::load_concurrent(name)?;
    let updates = concurrent_updates(&trace)?;
    let doc = fresh_doc(name);
    let mut peers = Vec::with_capacity(trace.num_agents + watchers);
    for _ in 0..trace.num_agents + watchers {
        let peer = target.join(&doc).await?;
        peer.wait_synced(Duration::from_secs(30)).await?;
        peers.push(peer);
    }
    let started = Instant::now();
    let writers = (0..trace.num_agents).map(|a| {
        let peer = &peers[a];
        let mine: Vec<&Edit> = updates.iter().filter(|e| e.agent == a).collect();
        async move {
            for edit in mine {
                // Typed only once the others' edits it was typed after have arrived: an update
                // missing its dependencies would wait inside yrs and never be sent.
                while !has_seen(peer, &edit.seen) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                // Applied as a local transaction, so the client sends it like its own typing.
                peer.doc().transact_mut().apply_update(Update::decode_v1(&edit.update)?)?;
                keep_up(peer).await;
            }
            anyhow::Ok(())
        }
    });
    for done in futures_util::future::join_all(writers).await {
        done?;
    }
    let (exact, states) = all_reach(&peers, &trace.end_content, timeout).await;
    Ok(Report {
        trace: name.to_owned(),
        writers: trace.num_agents,
        watchers,
        txns: trace.txns.len(),
        seconds: started.elapsed().as_secs_f64(),
        exact,
        peers: states,
    })
}

/// The names of the traces in the traces folder: `(sequential, concurrent)`.
pub fn available() -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let list = |kind: &str| -> anyhow::Result<Vec<String>> {
        let dir = trace::traces_dir().join(kind);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json.gz").map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    };
    Ok((list("sequential")?, list("concurrent")?))
}

/// The text a document ends with (for checks outside a server).
pub fn text_of(doc: &Doc) -> String {
    doc.get_or_insert_text("content").get_string(&doc.transact())
}
