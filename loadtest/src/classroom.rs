//! The classroom scenario: rooms of one teacher and many students, each student typing into the
//! room's file at a human rate while everyone watches. Measures end-to-end propagation latency
//! (from a keystroke's transaction to its arrival at every other peer), delivered updates per
//! second, and lost edits, with every peer a real yrs document that applies what it receives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use collab_client::{DocPeer, REMOTE};
use yrs::{Origin, Text};

#[derive(Debug, Clone)]
pub struct Classroom {
    /// `ws://host:port` of a server that accepts token-less connections (`--allow-anonymous`).
    pub server: String,
    pub rooms: usize,
    pub students: usize,
    /// Keystrokes per second per typing student.
    pub rate: f64,
    pub duration: Duration,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub peers: usize,
    pub edits: u64,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    pub seconds: f64,
    /// Sorted propagation latencies.
    pub latencies: Vec<Duration>,
    pub converged: bool,
}

impl Report {
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }

    pub fn lost(&self) -> u64 {
        self.expected_deliveries.saturating_sub(self.deliveries)
    }
}

/// When each keystroke was made, by (client id, clock after it).
type Sent = Arc<Mutex<HashMap<(u64, u32), Instant>>>;

struct Receiver {
    last: HashMap<u64, u32>,
    latencies: Vec<Duration>,
    deliveries: u64,
}

/// Records, for every remote update a peer applies, the latency of each keystroke it completes.
fn watch(peer: &DocPeer, sent: Sent, out: Arc<Mutex<Receiver>>) -> anyhow::Result<()> {
    let remote = Origin::from(REMOTE);
    let own = peer.doc().client_id().get();
    peer.doc()
        .observe_update_v1("loadtest-latency", move |txn, _| {
            if txn.origin() != Some(&remote) {
                return;
            }
            let now = Instant::now();
            // The document's state after this update says how far each client's edits reached.
            let state = yrs::ReadTxn::state_vector(txn);
            let sent = sent.lock().unwrap_or_else(|e| e.into_inner());
            let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
            for (client, clock) in state.iter() {
                let client = client.get();
                if client == own {
                    continue;
                }
                let from = out.last.get(&client).copied().unwrap_or(0);
                for c in from + 1..=*clock {
                    if let Some(at) = sent.get(&(client, c)) {
                        out.latencies.push(now.duration_since(*at));
                        out.deliveries += 1;
                    }
                }
                if *clock > from {
                    out.last.insert(client, *clock);
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("observer: {e}"))
}

pub async fn run(scenario: &Classroom) -> anyhow::Result<Report> {
    let sent: Sent = Arc::default();
    let mut rooms = Vec::new();
    for r in 0..scenario.rooms {
        let doc = format!("class{r}/file");
        let mut peers = Vec::new();
        for _ in 0..=scenario.students {
            let peer = DocPeer::connect(&scenario.server, &doc, "").await?;
            peer.wait_synced(Duration::from_secs(30)).await?;
            let receiver =
                Arc::new(Mutex::new(Receiver { last: HashMap::new(), latencies: Vec::new(), deliveries: 0 }));
            watch(&peer, sent.clone(), receiver.clone())?;
            peers.push((peer, receiver));
        }
        rooms.push(peers);
    }
    let peers: usize = rooms.iter().map(Vec::len).sum();
    let interval = Duration::from_secs_f64(1.0 / scenario.rate);
    let started = Instant::now();
    let mut edits = 0u64;
    let mut expected = 0u64;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while started.elapsed() < scenario.duration {
        tick.tick().await;
        for room in &rooms {
            // Peer 0 is the teacher, who watches; every student types one character.
            for (student, _) in room.iter().skip(1) {
                let id = student.doc().client_id();
                // Recorded before the edit: a fast relay may beat the line after it.
                let next = yrs::ReadTxn::state_vector(&yrs::Transact::transact(student.doc())).get(&id) + 1;
                sent.lock().unwrap_or_else(|e| e.into_inner()).insert((id.get(), next), Instant::now());
                student.edit(|txn, text| {
                    let len = text.len(txn);
                    text.insert(txn, len / 2, "x");
                });
                edits += 1;
                expected += (room.len() - 1) as u64;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Quiesce: every room's peers reach the same text, or the wait times out.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut converged = false;
    while Instant::now() < deadline {
        converged = rooms.iter().all(|room| {
            let first = room[0].0.text();
            room.iter().all(|(p, _)| p.text() == first)
        });
        let delivered: u64 = rooms.iter().flatten().map(|(_, r)| r.lock().map_or(0, |r| r.deliveries)).sum();
        if converged && delivered >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut latencies = Vec::new();
    let mut deliveries = 0;
    for (_, receiver) in rooms.iter().flatten() {
        let r = receiver.lock().unwrap_or_else(|e| e.into_inner());
        latencies.extend_from_slice(&r.latencies);
        deliveries += r.deliveries;
    }
    latencies.sort();
    Ok(Report { peers, edits, deliveries, expected_deliveries: expected, seconds, latencies, converged })
}
