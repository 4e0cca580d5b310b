//! The idle-connections scenario: many peers connected and synced, none typing, to measure what
//! a connection costs the server in memory and how long connecting takes.

use std::time::{Duration, Instant};

use collab_client::DocPeer;

use crate::classroom::open_room;
use crate::stats::{Histogram, Stats};
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Idle {
    pub target: Target,
    pub connections: usize,
    /// Peers per document.
    pub per_doc: usize,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub connections: usize,
    pub docs: usize,
    /// From opening the socket to the end of the sync handshake, per peer.
    pub connect: Histogram,
    /// All connections open and synced.
    pub seconds: f64,
}

/// Connects every peer and returns them still connected, so the caller can measure the server.
pub async fn run(scenario: &Idle) -> anyhow::Result<(Report, Vec<DocPeer>)> {
    let stats = Stats::default();
    let started = Instant::now();
    let docs = scenario.connections.div_ceil(scenario.per_doc);
    let mut peers = Vec::with_capacity(scenario.connections);
    for d in 0..docs {
        let n = scenario.per_doc.min(scenario.connections - peers.len());
        peers.extend(
            open_room(std::slice::from_ref(&scenario.target), &format!("idle{d}/file"), n, &stats).await?.peers,
        );
    }
    anyhow::ensure!(peers.iter().all(|p| p.status().connected), "a connection closed while idle peers were connecting");
    let report = Report {
        connections: peers.len(),
        docs,
        connect: stats.snapshot().connect,
        seconds: started.elapsed().as_secs_f64(),
    };
    // Everyone is still there a moment later (no idle timeout or limit cut them off).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let open = peers.iter().filter(|p| p.status().connected).count();
    anyhow::ensure!(open == peers.len(), "{} of {} idle connections were closed", peers.len() - open, peers.len());
    Ok((report, peers))
}
