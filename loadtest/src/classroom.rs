//! Rooms of peers typing into one shared file while the others watch: the classroom scenario
//! (one teacher and 30-40 students per room) and, with one room of 200 typists, the hot
//! document. Every peer is a real yrs document that applies what it receives; the scenario
//! measures end-to-end propagation latency (from a keystroke's transaction to its arrival at
//! each other peer of the room), delivered updates per second and connection time, and ends by
//! checking that every keystroke reached every peer and that each room's copies are identical.

use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use collab_client::{DocPeer, REMOTE};
use rand::{Rng, SeedableRng};
use yrs::{Origin, Text};

use crate::stats::{Histogram, Stats};
use crate::target::Target;

#[derive(Debug, Clone)]
pub struct Classroom {
    pub target: Target,
    pub rooms: usize,
    /// Peers per room who only watch (the teacher).
    pub watchers: usize,
    /// Peers per room who type.
    pub typists: usize,
    /// Each typist types at a steady rate drawn from this range, in keystrokes per second
    /// (the traces show 5-9 while someone is typing).
    pub rate: (f64, f64),
    pub duration: Duration,
    pub seed: u64,
    /// A prefix for document names, so that runs against one server do not share rooms.
    pub prefix: String,
    /// The server's process, whose CPU time is read around the typing phase.
    pub server_pid: Option<u32>,
    /// Further nodes of the same cluster, with their processes: peer `i` of every room joins
    /// node `i % n`, `target` being node 0 (so most deliveries cross nodes).
    pub more_nodes: Vec<(Target, u32)>,
}

impl Classroom {
    /// The classroom: `rooms` rooms of one teacher and `students` students at 5-9 keystrokes/s.
    pub fn with_students(target: Target, rooms: usize, students: usize, duration: Duration) -> Classroom {
        Classroom {
            target,
            rooms,
            watchers: 1,
            typists: students,
            rate: (5.0, 9.0),
            duration,
            seed: 1,
            prefix: "class".into(),
            server_pid: None,
            more_nodes: Vec::new(),
        }
    }

    /// The hot document: one room where `writers` peers all type.
    pub fn hot_document(target: Target, writers: usize, rate: f64, duration: Duration) -> Classroom {
        Classroom {
            target,
            rooms: 1,
            watchers: 0,
            typists: writers,
            rate: (rate, rate),
            duration,
            seed: 1,
            prefix: "hot".into(),
            server_pid: None,
            more_nodes: Vec::new(),
        }
    }

    pub fn peers(&self) -> usize {
        self.rooms * (self.watchers + self.typists)
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub peers: usize,
    pub edits: u64,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    /// The typing phase.
    pub seconds: f64,
    pub latency: Histogram,
    /// From opening the socket to the end of the sync handshake, per peer.
    pub connect: Histogram,
    /// Every room's copies are identical and hold every keystroke typed into it.
    pub converged: bool,
    /// The server's CPU seconds from the first keystroke until every room settled.
    pub server_cpu_seconds: Option<f64>,
    /// This process's (the generator's) CPU seconds over the same span.
    pub generator_cpu_seconds: f64,
    /// Latency between peers of the same node and of different nodes (cluster runs).
    pub same_node: Histogram,
    pub cross_node: Histogram,
    /// Per node: its CPU seconds over the same span, and deliveries to its peers.
    pub nodes: Vec<NodeUse>,
}

#[derive(Debug, Clone, Copy)]
pub struct NodeUse {
    pub cpu_seconds: f64,
    pub deliveries: u64,
}

impl NodeUse {
    /// CPU microseconds per update delivered to this node's peers.
    pub fn cpu_us_per_delivery(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.deliveries.max(1) as f64
    }
}

impl Report {
    pub fn lost(&self) -> u64 {
        self.expected_deliveries.saturating_sub(self.deliveries)
    }

    pub fn delivered_per_second(&self) -> f64 {
        self.deliveries as f64 / self.seconds.max(1e-9)
    }

    /// Server CPU microseconds per delivered update.
    pub fn cpu_us_per_delivery(&self) -> Option<f64> {
        Some(self.server_cpu_seconds? * 1e6 / self.deliveries.max(1) as f64)
    }
}

/// One room: its document name, peers (watchers first) and how many keystrokes were typed.
pub struct Room {
    pub doc: String,
    pub peers: Vec<DocPeer>,
    pub typed: u64,
}

/// Joins `n` peers to `doc` (at most 64 handshakes at a time), each watched for latency; peer
/// `i` joins `nodes[i % nodes.len()]`.
pub async fn open_room(nodes: &[Target], doc: &str, n: usize, stats: &Stats) -> anyhow::Result<Room> {
    let mut peers = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let joins = chunk.iter().map(|i| async move {
            let started = Instant::now();
            let node = i % nodes.len();
            let peer = nodes[node].join(doc).await?;
            peer.wait_synced(Duration::from_secs(60)).await?;
            stats.record_connect(started.elapsed());
            anyhow::Ok((peer, node))
        });
        for joined in futures_util::future::join_all(joins).await {
            let (peer, node) = joined?;
            stats.set_home(peer.doc().client_id().get(), node);
            watch(&peer, stats, node)?;
            peers.push(peer);
        }
    }
    Ok(Room { doc: doc.to_owned(), peers, typed: 0 })
}

/// Records, for every remote update a peer (connected to server node `node`) applies, the
/// latency of each keystroke it completes.
pub fn watch(peer: &DocPeer, stats: &Stats, node: usize) -> anyhow::Result<()> {
    let remote = Origin::from(REMOTE);
    let own = peer.doc().client_id().get();
    let stats = stats.clone();
    let mut last: HashMap<u64, u32> = HashMap::new();
    peer.doc()
        .observe_update_v1("loadtest-latency", move |txn, _| {
            if txn.origin() != Some(&remote) {
                return;
            }
            let now = Instant::now();
            // The document's state after this update says how far each client's edits reached.
            let state = yrs::ReadTxn::state_vector(txn);
            for (client, clock) in state.iter() {
                let client = client.get();
                if client == own {
                    continue;
                }
                let from = last.get(&client).copied().unwrap_or(0);
                if *clock > from {
                    stats.delivered(client, from + 1..=*clock, now, node);
                    last.insert(client, *clock);
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("observer: {e}"))
}

/// Types one character at a random place in the room's text, as peer `typist`.
pub fn type_one(room: &mut Room, typist: usize, stats: &Stats, rng: &mut impl Rng) {
    let peer = &room.peers[typist];
    let id = peer.doc().client_id();
    // Recorded before the edit: a fast relay may beat the line after it.
    let next = yrs::ReadTxn::state_vector(&yrs::Transact::transact(peer.doc())).get(&id) + 1;
    stats.sent(id.get(), next, room.peers.len() as u32 - 1);
    peer.edit(|txn, text| {
        let len = text.len(txn);
        text.insert(txn, rng.random_range(0..=len), "x");
    });
    room.typed += 1;
}

/// Whether every peer of the room holds the same text, with every keystroke typed into it.
pub fn settled(room: &Room) -> bool {
    let first = room.peers[0].text();
    first.len() as u64 == room.typed && room.peers.iter().all(|p| p.text() == first)
}

/// Waits until every room has settled and every delivery arrived, or `timeout` passes.
pub async fn wait_settled(rooms: &[Room], stats: &Stats, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let done = stats.outstanding() == 0 && rooms.iter().all(settled);
        if done || Instant::now() >= deadline {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens the scenario's rooms, each under `{prefix}{r}/file`.
pub async fn open_rooms(scenario: &Classroom, stats: &Stats) -> anyhow::Result<Vec<Room>> {
    let per_room = scenario.watchers + scenario.typists;
    let mut rooms = Vec::with_capacity(scenario.rooms);
    let nodes: Vec<Target> =
        std::iter::once(scenario.target.clone()).chain(scenario.more_nodes.iter().map(|(t, _)| t.clone())).collect();
    for r in 0..scenario.rooms {
        rooms.push(open_room(&nodes, &format!("{}{r}/file", scenario.prefix), per_room, stats).await?);
    }
    Ok(rooms)
}

/// Every typist of every room types at its own steady rate (drawn from `rate`) for `duration`;
/// peers `watchers..` of each room type. Returns the seconds it took.
pub async fn type_for(
    rooms: &mut [Room],
    watchers: usize,
    rate: (f64, f64),
    duration: Duration,
    stats: &Stats,
    rng: &mut impl Rng,
) -> f64 {
    // Every typist's next keystroke, earliest first.
    let mut queue = BinaryHeap::new();
    let started = Instant::now();
    for (r, room) in rooms.iter().enumerate() {
        for t in watchers..room.peers.len() {
            let interval = Duration::from_secs_f64(1.0 / rng.random_range(rate.0..=rate.1));
            // Typists start spread over their first interval, not all at once.
            let first = started + interval.mul_f64(rng.random::<f64>());
            queue.push(std::cmp::Reverse((first, r, t, interval)));
        }
    }
    let end = started + duration;
    while let Some(std::cmp::Reverse((at, r, t, interval))) = queue.pop() {
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        type_one(&mut rooms[r], t, stats, rng);
        queue.push(std::cmp::Reverse((at + interval, r, t, interval)));
    }
    started.elapsed().as_secs_f64()
}

pub async fn run(scenario: &Classroom) -> anyhow::Result<Report> {
    let stats = Stats::default();
    let mut rooms = open_rooms(scenario, &stats).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(scenario.seed);
    let cpu = |pid: Option<u32>| pid.map(|p| crate::server::usage(p).map(|u| u.cpu_seconds)).transpose();
    let pids: Vec<u32> = scenario.server_pid.into_iter().chain(scenario.more_nodes.iter().map(|(_, p)| *p)).collect();
    let nodes_cpu =
        || pids.iter().map(|p| crate::server::usage(*p).map(|u| u.cpu_seconds)).collect::<Result<Vec<_>, _>>();
    let cpu_before = cpu(scenario.server_pid)?;
    let nodes_before = nodes_cpu()?;
    let own_before = crate::server::usage(std::process::id())?.cpu_seconds;
    let seconds = type_for(&mut rooms, scenario.watchers, scenario.rate, scenario.duration, &stats, &mut rng).await;
    let converged = wait_settled(&rooms, &stats, Duration::from_secs(60)).await;
    let cpu_after = cpu(scenario.server_pid)?;
    let nodes_after = nodes_cpu()?;
    let own_after = crate::server::usage(std::process::id())?.cpu_seconds;
    let snapshot = stats.snapshot();
    let nodes = nodes_before
        .iter()
        .zip(&nodes_after)
        .enumerate()
        .map(|(i, (before, after))| NodeUse {
            cpu_seconds: after - before,
            deliveries: snapshot.node_deliveries.get(i).copied().unwrap_or(0),
        })
        .collect();
    Ok(Report {
        peers: rooms.iter().map(|r| r.peers.len()).sum(),
        edits: snapshot.edits,
        deliveries: snapshot.deliveries,
        expected_deliveries: snapshot.expected,
        seconds,
        latency: snapshot.latency,
        connect: snapshot.connect,
        converged,
        server_cpu_seconds: cpu_after.zip(cpu_before).map(|(a, b)| a - b),
        generator_cpu_seconds: own_after - own_before,
        same_node: snapshot.same_node,
        cross_node: snapshot.cross_node,
        nodes,
    })
}
