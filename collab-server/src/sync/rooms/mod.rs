//! Loaded documents: one actor task per document around the sans-IO [`DocState`].
//!
//! The actor drains its inbox in batches, applies each batch in one transaction, relays one shared
//! frame per batch to every peer, and appends the batch's update to the store before taking the
//! next batch (so the store sees one write per batch: group commit for free). A document unloads
//! only when it has no peers, nothing unsaved, and no connection holds a lease on it: the lease
//! count is checked and the entry removed under the registry lock, so a joiner either finds the
//! running actor or starts a fresh one that loads everything saved.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use doc_store::DocStore;
use sync_core::peering::{NodeMsg, Summary};
use sync_core::room::Reply;
use sync_core::wire::{self, DocMessage, HocusOut, OutMsg, SyncMessage};
use sync_core::{DocName, DocState, Input, Output, PeerId, Role};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::close::{self, CloseReason};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::sync::bus::Bus;
use crate::sync::sink::ConnSink;

/// How a peer frames messages: y-websocket (one document per socket) or Hocuspocus (routing key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Framing {
    YWebsocket,
    Hocus { key: Arc<str> },
}

#[derive(Debug)]
pub enum RoomCmd {
    Join {
        peer: PeerId,
        role: Role,
        sink: ConnSink,
        framing: Framing,
    },
    Leave {
        peer: PeerId,
    },
    Msg {
        peer: PeerId,
        msg: DocMessage,
    },
    /// The whole document, encoded as one update.
    Snapshot {
        reply: oneshot::Sender<Vec<u8>>,
    },
    /// A write made by the server itself (imports, restores); `done` fires once it is committed.
    Apply {
        update: Vec<u8>,
        done: oneshot::Sender<()>,
    },
    /// A message from another node serving this document.
    Bus(NodeMsg),
    /// The bus connection came back: compare states with the other nodes now.
    BusUp,
}

/// What a room needs from the server around it.
#[derive(Clone)]
pub struct RoomEnv {
    pub store: Arc<dyn DocStore>,
    pub committer: crate::sync::commit::Committer,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// The cluster bus; `None` when this node runs alone.
    pub bus: Option<Bus>,
}

impl std::fmt::Debug for RoomEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomEnv").field("limits", &self.limits).finish_non_exhaustive()
    }
}

struct Entry {
    tx: mpsc::Sender<RoomCmd>,
    leases: Arc<AtomicUsize>,
}

/// The registry of loaded documents.
#[derive(Clone)]
pub struct Rooms {
    inner: Arc<Mutex<HashMap<DocName, Entry>>>,
    env: RoomEnv,
    /// Projects with saved changes since the last automatic checkpoint.
    active: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl std::fmt::Debug for Rooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rooms").finish_non_exhaustive()
    }
}

/// A connection's hold on a room: while any lease exists the room stays loaded.
#[derive(Debug)]
pub struct RoomLease {
    tx: mpsc::Sender<RoomCmd>,
    leases: Arc<AtomicUsize>,
}

impl Drop for RoomLease {
    fn drop(&mut self) {
        self.leases.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RoomLease {
    /// Sends a command to the room, waiting for inbox space (backpressure on the sender).
    pub async fn send(&self, cmd: RoomCmd) -> Result<(), RoomGone> {
        self.tx.send(cmd).await.map_err(|_| RoomGone)
    }
}

/// The room's actor ended (shutdown, or its document could not be loaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomGone;

const INBOX: usize = 4096;
/// The peer id of the server's own writes: joined as an editor, with no connection.
const SERVER_PEER: PeerId = 0;
/// The peer id of the other nodes' writes and awareness (cluster mode): an editor and an
/// awareness relay, with no connection.
const BUS_PEER: PeerId = PeerId::MAX;
const BATCH: usize = 1024;
/// Comparisons a room makes after its document last changed, one per `--repair-interval`: a hello
/// that is itself lost is followed by another.
const HELLOS_AFTER_CHANGE: u64 = 3;
/// Past those, a document with peers that does not change compares every this many intervals.
const QUIET_HELLO_EVERY: u64 = 15;
/// How long a node that loads a document waits for the other nodes' state of it before it
/// answers its peers (the other nodes answer within a round trip unless they are overloaded).
const CLUSTER_WAIT: Duration = Duration::from_secs(1);

impl Rooms {
    pub fn new(env: RoomEnv) -> Rooms {
        Rooms { inner: Arc::new(Mutex::new(HashMap::new())), env, active: Arc::default() }
    }

    /// Takes a lease on `doc`, starting its actor (which loads it) if it is not loaded.
    pub fn lease(&self, doc: &DocName) -> RoomLease {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(doc.clone()).or_insert_with(|| self.spawn(doc.clone()));
        entry.leases.fetch_add(1, Ordering::AcqRel);
        RoomLease { tx: entry.tx.clone(), leases: entry.leases.clone() }
    }

    /// Takes the projects that saved changes since the last call.
    pub fn take_active_projects(&self) -> Vec<String> {
        std::mem::take(&mut *self.active.lock().unwrap_or_else(|e| e.into_inner())).into_iter().collect()
    }

    fn mark_active(&self, project: &str) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if !active.contains(project) {
            active.insert(project.to_owned());
        }
    }

    pub fn store(&self) -> &Arc<dyn DocStore> {
        &self.env.store
    }

    pub fn loaded(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn spawn(&self, doc: DocName) -> Entry {
        let (tx, rx) = mpsc::channel(INBOX);
        let leases = Arc::new(AtomicUsize::new(0));
        let actor = Actor {
            doc: doc.clone(),
            rooms: self.clone(),
            leases: leases.clone(),
            peers: HashMap::new(),
            unsaved: Vec::new(),
            unsaved_bytes: 0,
            remote_unsaved: Vec::new(),
            tx: tx.downgrade(),
            echo_pending: HashMap::new(),
            awaiting: Vec::new(),
            backoff: Duration::ZERO,
            server_awaiting: Vec::new(),
            compacting: Arc::default(),
            log_len: 0,
            last_seq: 0,
            retry_at: None,
            in_flight: None,
            compare_ticks: 0,
            changed_at_tick: 0,
        };
        self.env.metrics.documents_loaded.inc();
        let span = info_span!("room", doc_id = %doc);
        self.env.tracker.spawn(actor.run(rx).instrument(span));
        Entry { tx, leases }
    }

    /// Removes `doc` from the registry if nobody holds a lease; true if it was removed.
    fn try_remove(&self, doc: &DocName, leases: &Arc<AtomicUsize>, rx: &mut mpsc::Receiver<RoomCmd>) -> bool {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if leases.load(Ordering::Acquire) != 0 || !rx.is_empty() {
            return false;
        }
        map.remove(doc);
        rx.close();
        true
    }

    fn remove_unconditionally(&self, doc: &DocName) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).remove(doc);
    }
}

/// What a writer hears once its write is in the store.
#[derive(Debug)]
enum Awaiting {
    /// A write confirmation (counted by the connection, not queued frame by frame).
    Ack(Bytes),
    /// The echo of an update it took part in.
    Frame(Bytes),
}

struct PeerSlot {
    sink: ConnSink,
    framing: Framing,
}

struct Actor {
    doc: DocName,
    rooms: Rooms,
    leases: Arc<AtomicUsize>,
    peers: HashMap<PeerId, PeerSlot>,
    /// Updates applied in memory but not yet in the store, oldest first.
    unsaved: Vec<Vec<u8>>,
    unsaved_bytes: usize,
    /// Other nodes' updates applied here. Their own node saves them; this node saves them too,
    /// merged, at its next comparison or before unloading, so an update survives the crash of
    /// the node it came from (storing an update twice is harmless: updates are idempotent).
    remote_unsaved: Vec<Vec<u8>>,
    /// This room's inbox, for the bus to route the document's channel to.
    tx: mpsc::WeakSender<RoomCmd>,
    /// Update frames held (in `awaiting` or the commit in flight) per peer: while a peer has
    /// any, its later update frames queue behind them.
    echo_pending: HashMap<PeerId, usize>,
    /// Confirmations (echoes, sync statuses) to send once `unsaved` is in the store.
    awaiting: Vec<(PeerId, Awaiting)>,
    backoff: Duration,
    /// Server-side writes waiting for their commit.
    server_awaiting: Vec<oneshot::Sender<()>>,
    compacting: Arc<AtomicBool>,
    log_len: u64,
    last_seq: i64,
    retry_at: Option<Instant>,
    /// The commit in flight, if any: it covers the first `count` entries of `unsaved`.
    in_flight: Option<InFlight>,
    /// Comparison intervals since the room started, and the last one in which the document
    /// changed: a document that stopped changing compares less often.
    compare_ticks: u64,
    changed_at_tick: u64,
}

/// A store append running while the room goes on applying and relaying: the writes it covers
/// are confirmed when it lands, later writes wait for the next one.
struct InFlight {
    commit: std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, crate::sync::commit::CommitError>> + Send>>,
    count: usize,
    bytes: usize,
    awaiting: Vec<(PeerId, Awaiting)>,
    server_awaiting: Vec<oneshot::Sender<()>>,
}

/// Resolves the in-flight commit, or never if there is none.
async fn landed(in_flight: &mut Option<InFlight>) -> Result<i64, crate::sync::commit::CommitError> {
    match in_flight {
        Some(f) => f.commit.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Actor {
    fn env(&self) -> &RoomEnv {
        &self.rooms.env
    }

    async fn run(mut self, mut rx: mpsc::Receiver<RoomCmd>) {
        let mut state = match self.load().await {
            Ok(state) => state,
            Err(e) => {
                error!(error = %e, "document could not be loaded; refusing its peers");
                self.rooms.remove_unconditionally(&self.doc);
                rx.close();
                while let Some(cmd) = rx.recv().await {
                    if let RoomCmd::Join { sink, .. } = cmd {
                        sink.killer().kill(CloseReason::new(close::INTERNAL_ERROR, "document could not be loaded"));
                    }
                }
                self.env().metrics.documents_loaded.dec();
                return;
            }
        };
        state.step([Input::Join { peer: SERVER_PEER, role: Role::Editor }], Instant::now().into_std());
        let limits = self.env().limits.clone();
        let sweep_every = (limits.awareness_timeout / 3).clamp(Duration::from_millis(50), Duration::from_secs(10));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut compare = tokio::time::interval(limits.repair_interval.max(Duration::from_millis(50)));
        compare.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut idle_since: Option<Instant> = Some(Instant::now());
        let mut buf = Vec::with_capacity(BATCH);
        if self.env().bus.is_some() {
            state.step([Input::Join { peer: BUS_PEER, role: Role::Editor }], Instant::now().into_std());
            state.set_relay(BUS_PEER);
            self.join_cluster(&mut state, &mut rx, &mut buf).await;
            self.process(&mut state, buf.drain(..)).await;
        }
        let shutdown = self.env().shutdown.clone();
        loop {
            let unload_at = idle_since.map(|t| t + limits.unload_delay);
            let retry_at = self.retry_at;
            tokio::select! {
                n = rx.recv_many(&mut buf, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    // Let connections that are ready hand in their writes too: under load a
                    // batch then carries several keystrokes, relayed as one frame per peer.
                    // An idle room pays one yield.
                    tokio::task::yield_now().await;
                    while buf.len() < BATCH {
                        match rx.try_recv() {
                            Ok(cmd) => buf.push(cmd),
                            Err(_) => break,
                        }
                    }
                    self.process(&mut state, buf.drain(..)).await;
                }
                _ = sweep.tick() => {
                    let swept = state.sweep_awareness(Instant::now().into_std(), limits.awareness_timeout);
                    if let Some(update) = swept {
                        self.env().metrics.awareness_swept.inc();
                        // Every node sweeps on its own clock: nothing to tell the others.
                        let out = Output { awareness: Some(update), ..Output::default() };
                        self.broadcast(&mut state, out, Origin::Remote);
                    }
                }
                _ = compare.tick(), if self.env().bus.is_some() => {
                    self.save_remote();
                    self.compare_ticks += 1;
                    let quiet = self.compare_ticks.saturating_sub(self.changed_at_tick);
                    if !self.peers.is_empty() && (quiet <= HELLOS_AFTER_CHANGE || quiet % QUIET_HELLO_EVERY == 0) {
                        self.hello(&mut state, false);
                    }
                }
                result = landed(&mut self.in_flight) => self.commit_landed(result),
                _ = sleep_until_opt(retry_at) => {
                    self.retry_at = None;
                    self.persist();
                }
                _ = sleep_until_opt(unload_at) => {
                    self.save_remote();
                    if self.unsaved.is_empty() && self.rooms.try_remove(&self.doc, &self.leases, &mut rx) {
                        debug!("document unloaded");
                        break;
                    }
                    idle_since = None;
                }
                _ = shutdown.cancelled() => {
                    rx.close();
                    while let Ok(cmd) = rx.try_recv() {
                        buf.push(cmd);
                    }
                    self.process(&mut state, buf.drain(..)).await;
                    break;
                }
            }
            if self.peers.is_empty() && idle_since.is_none() {
                idle_since = Some(Instant::now());
            } else if !self.peers.is_empty() {
                idle_since = None;
            }
        }
        if let (Some(bus), Some(tx)) = (self.env().bus.clone(), self.tx.upgrade()) {
            bus.unsubscribe(&self.doc, &tx).await;
        }
        self.save_remote();
        self.flush_before_exit().await;
        self.env().metrics.documents_loaded.dec();
    }

    /// Subscribes to the document's channel, asks every node that has the document loaded for
    /// what this node lacks, and waits (at most [`CLUSTER_WAIT`]) for all their answers, so the
    /// first peers get updates other nodes have not saved yet. Commands arriving meanwhile are
    /// left in `buf`, answers included, for the caller to process in order.
    async fn join_cluster(&mut self, state: &mut DocState, rx: &mut mpsc::Receiver<RoomCmd>, buf: &mut Vec<RoomCmd>) {
        let (Some(bus), Some(tx)) = (self.env().bus.clone(), self.tx.upgrade()) else { return };
        let deadline = Instant::now() + CLUSTER_WAIT;
        let asked = async {
            bus.subscribe(&self.doc, tx).await?;
            let hello = NodeMsg::Hello { from: bus.node(), state: state.summary().clone(), reply: true };
            bus.publish_now(&self.doc, &hello).await
        };
        let receivers = match tokio::time::timeout_at(deadline, asked).await {
            Ok(Ok(receivers)) => receivers,
            Ok(Err(e)) => {
                warn!(error = %e, "serving the document from the store alone; it compares with the other nodes once the bus is back");
                return;
            }
            Err(_) => return,
        };
        // Every subscriber but this node answers.
        let mut missing = receivers.saturating_sub(1);
        while missing > 0 {
            let Ok(Some(cmd)) = tokio::time::timeout_at(deadline, rx.recv()).await else { break };
            if matches!(&cmd, RoomCmd::Bus(NodeMsg::Diff { to, .. }) if *to == bus.node()) {
                missing -= 1;
            }
            buf.push(cmd);
        }
        if missing > 0 {
            debug!(missing, "some nodes did not answer in time; the periodic comparison covers them");
        }
    }

    fn publish(&self, msg: &NodeMsg) {
        if let Some(bus) = &self.env().bus {
            bus.publish(&self.doc, msg);
        }
    }

    fn node(&self) -> Option<sync_core::peering::NodeId> {
        self.env().bus.as_ref().map(Bus::node)
    }

    /// Tells the other nodes this node's state of the document; those whose state differs (all
    /// of them, with `reply`) answer with a diff.
    fn hello(&mut self, state: &mut DocState, reply: bool) {
        if let Some(from) = self.node() {
            self.publish(&NodeMsg::Hello { from, state: state.summary().clone(), reply });
        }
    }

    /// Queues the other nodes' updates applied here for saving, merged into one.
    fn save_remote(&mut self) {
        if self.remote_unsaved.is_empty() {
            return;
        }
        let parts = std::mem::take(&mut self.remote_unsaved);
        let merged = match parts.len() {
            1 => parts,
            // Each part was applied here, so they merge; should yrs refuse, they are saved apart.
            _ => match yrs::merge_updates_v1(parts.iter().map(Vec::as_slice)) {
                Ok(merged) => vec![merged],
                Err(e) => {
                    warn!(error = %e, "could not merge other nodes' updates; saving them one by one");
                    parts
                }
            },
        };
        for update in merged {
            self.env().metrics.unsaved_bytes.inc_by(update.len() as i64);
            self.unsaved_bytes += update.len();
            self.unsaved.push(update);
        }
        if self.retry_at.is_none() {
            self.persist();
        }
    }

    /// Takes a message from another node: updates become inputs of the bus peer (applied with
    /// the batch's other remote inputs); a hello is answered at once; a diff for this node is
    /// applied and, once applied, answered with a repair if the sender lacks something.
    fn on_bus(&mut self, state: &mut DocState, msg: NodeMsg, remote: &mut RemoteBatch) {
        let Some(me) = self.node() else { return };
        if msg.from() == me {
            return;
        }
        let update =
            |bytes: Vec<u8>| Input::Message { peer: BUS_PEER, msg: DocMessage::Sync(SyncMessage::Update(bytes)) };
        match msg {
            NodeMsg::Update { update: bytes, .. } => remote.inputs.push(update(bytes)),
            NodeMsg::Awareness { update: bytes, .. } => match yrs::updates::decoder::Decode::decode_v1(&bytes) {
                Ok(aw) => remote.inputs.push(Input::Message { peer: BUS_PEER, msg: DocMessage::Awareness(aw) }),
                Err(e) => {
                    self.env().metrics.bus_malformed.inc();
                    warn!(error = %e, "ignoring malformed awareness from another node");
                }
            },
            NodeMsg::Hello { from, state: theirs, reply } => {
                let mine = state.summary().clone();
                if !reply && mine == theirs {
                    return;
                }
                match state.diff_since(&theirs.sv) {
                    Ok(diff) => self.publish(&NodeMsg::Diff { from: me, to: from, update: diff, state: mine }),
                    Err(e) => {
                        self.env().metrics.bus_malformed.inc();
                        warn!(error = %e, "ignoring a malformed hello from another node");
                    }
                }
            }
            NodeMsg::Diff { to, update: bytes, state: theirs, .. } if to == me => {
                remote.repairing = true;
                remote.inputs.push(update(bytes));
                remote.compare.push(theirs);
            }
            NodeMsg::Diff { .. } => {}
            NodeMsg::Repair { update: bytes, .. } => {
                remote.repairing = true;
                remote.inputs.push(update(bytes));
            }
        }
    }

    /// Applies a batch's remote inputs, relays the result to this node's peers, and sends a
    /// repair to each node whose diff showed it lacks something.
    fn step_remote(&mut self, state: &mut DocState, remote: &mut RemoteBatch) {
        if remote.inputs.is_empty() {
            return;
        }
        let mut out = state.step(remote.inputs.drain(..), Instant::now().into_std());
        let mut origin = if remote.repairing { Origin::Repair } else { Origin::Remote };
        let mut refused = false;
        out.replies.retain(|(peer, reply)| {
            if *peer == BUS_PEER {
                refused |= matches!(reply, Reply::Invalid(_));
                return false;
            }
            // A peer's update that waited for another node's content went in with it.
            if *reply == Reply::WriteApplied {
                origin = Origin::Local;
            }
            true
        });
        if remote.repairing && out.update.is_some() {
            self.env().metrics.bus_repairs.inc();
        }
        self.broadcast(state, out, origin);
        if refused {
            // Held too long for content that never came: ask the others for everything missing.
            self.env().metrics.bus_refused.inc();
            warn!("an update from another node could not be applied; comparing states");
            self.hello(state, false);
        }
        for theirs in remote.compare.drain(..) {
            if state.is_ahead_of(&theirs) {
                if let (Some(from), Ok(update)) = (self.node(), state.diff_since(&theirs.sv)) {
                    self.publish(&NodeMsg::Repair { from, update });
                }
            }
        }
        remote.repairing = false;
    }

    async fn load(&mut self) -> anyhow::Result<DocState> {
        let stored = self.env().store.load(self.doc.as_str()).await?;
        self.log_len = stored.updates.len() as u64;
        self.last_seq = stored.last_seq;
        let parts = stored.snapshot.iter().chain(stored.updates.iter()).map(Vec::as_slice);
        let mut state = DocState::load(parts)?;
        state.set_awareness_cap(self.env().limits.max_awareness_clients);
        if self.doc.is_root() {
            state.set_tree_cap(sync_core::tree::MAX_ENTRIES);
        }
        Ok(state)
    }

    async fn process(&mut self, state: &mut DocState, cmds: impl Iterator<Item = RoomCmd>) {
        let refusing = self.unsaved_bytes >= self.env().limits.max_unsaved_bytes;
        let mut refused: HashSet<PeerId> = HashSet::new();
        let mut inputs = Vec::new();
        // Other nodes' inputs are applied in a step of their own, before this node's: the
        // result of each step then says whose it is (who relays and who saves it).
        let mut remote = RemoteBatch::default();
        for cmd in cmds {
            match cmd {
                RoomCmd::Join { peer, role, sink, framing } => {
                    self.peers.insert(peer, PeerSlot { sink, framing });
                    inputs.push(Input::Join { peer, role });
                }
                RoomCmd::Leave { peer } => inputs.push(Input::Leave { peer }),
                RoomCmd::Msg { peer, .. } if refused.contains(&peer) => {}
                RoomCmd::Msg { peer, msg } if refusing && is_write(&msg) => {
                    // The store is behind by more than the bound: take no new edit. The client
                    // still holds it and sends it again on reconnecting.
                    self.env().metrics.writes_refused.inc();
                    if let Some(slot) = self.peers.get(&peer) {
                        slot.sink.killer().kill(CloseReason::new(
                            close::TRY_AGAIN_LATER,
                            "document store unavailable: edit not accepted, reconnect later",
                        ));
                    }
                    refused.insert(peer);
                    inputs.push(Input::Leave { peer });
                }
                RoomCmd::Msg { peer, msg } => inputs.push(Input::Message { peer, msg }),
                RoomCmd::Snapshot { reply } => {
                    // Earlier inputs of this batch first, so the snapshot includes them.
                    self.step_remote(state, &mut remote);
                    let out = state.step(inputs.drain(..), Instant::now().into_std());
                    self.broadcast(state, out, Origin::Local);
                    let _ = reply.send(state.encode_state());
                }
                RoomCmd::Bus(msg) => self.on_bus(state, msg, &mut remote),
                RoomCmd::BusUp => self.hello(state, false),
                RoomCmd::Apply { update, done } => {
                    let msg = DocMessage::Sync(SyncMessage::Update(update));
                    inputs.push(Input::Message { peer: SERVER_PEER, msg });
                    self.server_awaiting.push(done);
                }
            }
        }
        self.step_remote(state, &mut remote);
        let out = state.step(inputs, Instant::now().into_std());
        self.broadcast(state, out, Origin::Local);
        // Peers that left are dropped from the slot map once the core has forgotten them.
        self.peers.retain(|peer, _| state.has_peer(*peer));
        if self.unsaved.is_empty() && self.in_flight.is_none() {
            let (awaiting, server_awaiting) = self.take_awaiting();
            self.confirm(awaiting, server_awaiting);
        } else if self.retry_at.is_none() {
            self.persist();
        }
    }

    fn take_awaiting(&mut self) -> (Vec<(PeerId, Awaiting)>, Vec<oneshot::Sender<()>>) {
        (std::mem::take(&mut self.awaiting), std::mem::take(&mut self.server_awaiting))
    }

    /// Sends replies and relays; evicts peers whose connection is gone or too slow.
    ///
    /// Writers hear about their own writes (the echo of the update, and SyncStatus on the
    /// multiplexed endpoint) only once the update is in the store: that is the confirmation.
    /// Everyone else gets the update at once.
    fn broadcast(&mut self, state: &mut DocState, out: Output, origin: Origin) {
        let mut evict = Vec::new();
        let mut writers: HashSet<PeerId> = HashSet::new();
        for (peer, reply) in out.replies {
            let Some(slot) = self.peers.get(&peer) else { continue };
            let frame = match reply_frame(&slot.framing, &reply) {
                ReplyFrame::Send(frame) => frame,
                ReplyFrame::Nothing => continue,
                ReplyFrame::Kill(reason) => {
                    self.env().metrics.protocol_errors.inc();
                    slot.sink.killer().kill(reason);
                    evict.push(peer);
                    continue;
                }
            };
            if reply == Reply::WriteApplied {
                writers.insert(peer);
                self.awaiting.push((peer, Awaiting::Ack(frame)));
            } else if slot.sink.push(frame).is_err() {
                evict.push(peer);
            }
        }
        if let Some(update) = out.update {
            self.changed_at_tick = self.compare_ticks;
            let mut frames: HashMap<&Framing, Bytes> = HashMap::new();
            for (peer, slot) in &self.peers {
                let frame =
                    frames.entry(&slot.framing).or_insert_with(|| encode(&slot.framing, OutMsg::Update(&update)));
                // A writer hears this update once it is saved. So does a peer still waiting for
                // an earlier one: updates reach every peer in order, or its document would hold
                // content it cannot integrate yet (yrs keeps it pending, and a client's sync
                // step 2 then carries a hole the room refuses).
                if writers.contains(peer) || self.echo_pending.contains_key(peer) {
                    *self.echo_pending.entry(*peer).or_default() += 1;
                    self.awaiting.push((*peer, Awaiting::Frame(frame.clone())));
                } else if slot.sink.push(frame.clone()).is_err() {
                    evict.push(*peer);
                }
            }
            if origin == Origin::Local {
                if let Some(bus) = &self.env().bus {
                    bus.publish_encoded(&self.doc, NodeMsg::encode_update(bus.node(), &update));
                }
            }
            if origin == Origin::Remote {
                self.remote_unsaved.push(update);
            } else {
                self.unsaved_bytes += update.len();
                self.env().metrics.unsaved_bytes.inc_by(update.len() as i64);
                self.unsaved.push(update);
            }
        }
        if let Some(awareness) = out.awareness {
            let mut frames: HashMap<&Framing, Bytes> = HashMap::new();
            for (peer, slot) in &self.peers {
                let frame =
                    frames.entry(&slot.framing).or_insert_with(|| encode(&slot.framing, OutMsg::Awareness(&awareness)));
                if slot.sink.push(frame.clone()).is_err() {
                    evict.push(*peer);
                }
            }
            if origin == Origin::Local {
                if let Some(from) = self.node() {
                    self.publish(&NodeMsg::Awareness { from, update: awareness });
                }
            }
        }
        self.evict(state, evict);
    }

    fn evict(&mut self, state: &mut DocState, evict: Vec<PeerId>) {
        if evict.is_empty() {
            return;
        }
        for peer in &evict {
            if let Some(slot) = self.peers.remove(peer) {
                if slot.sink.killer().reason().is_some_and(|r| r.reason == CloseReason::too_slow().reason) {
                    self.env().metrics.queue_overflows.inc();
                    warn!(peer, "client too slow: disconnected");
                }
            }
        }
        let leaves = evict.into_iter().map(|peer| Input::Leave { peer });
        let out = state.step(leaves, Instant::now().into_std());
        if out.awareness.is_some() {
            self.broadcast(state, Output { awareness: out.awareness, ..Output::default() }, Origin::Local);
        }
    }

    /// Sends the confirmations held for writes whose updates are now in the store.
    fn confirm(&mut self, awaiting: Vec<(PeerId, Awaiting)>, server_awaiting: Vec<oneshot::Sender<()>>) {
        for done in server_awaiting {
            let _ = done.send(());
        }
        for (peer, awaiting) in awaiting {
            if matches!(awaiting, Awaiting::Frame(_)) {
                if let Some(left) = self.echo_pending.get_mut(&peer) {
                    *left -= 1;
                    if *left == 0 {
                        self.echo_pending.remove(&peer);
                    }
                }
            }
            if let Some(slot) = self.peers.get(&peer) {
                // A full queue ends that connection; its client resyncs and loses nothing.
                let _ = match awaiting {
                    Awaiting::Ack(frame) => slot.sink.push_ack(frame),
                    Awaiting::Frame(frame) => slot.sink.push(frame),
                };
            }
        }
    }

    /// Starts appending every unsaved update to the store, unless a commit is already in flight
    /// (the next starts when it lands) or a retry is scheduled. The room keeps applying and
    /// relaying meanwhile; only confirmations wait. With nothing unsaved, confirms at once.
    fn persist(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        if self.unsaved.is_empty() {
            let (awaiting, server_awaiting) = self.take_awaiting();
            self.confirm(awaiting, server_awaiting);
            return;
        }
        let (awaiting, server_awaiting) = self.take_awaiting();
        let committer = self.env().committer.clone();
        let doc = self.doc.as_str().to_owned();
        let updates = self.unsaved.clone();
        let metrics = self.env().metrics.clone();
        let started = Instant::now();
        self.in_flight = Some(InFlight {
            commit: Box::pin(async move {
                let result = committer.append(&doc, updates).await;
                metrics.persist_seconds.observe(started.elapsed().as_secs_f64());
                result
            }),
            count: self.unsaved.len(),
            bytes: self.unsaved_bytes,
            awaiting,
            server_awaiting,
        });
    }

    /// The in-flight commit ended: on success its writes are confirmed and the next commit
    /// starts with whatever arrived meanwhile; on failure everything stays unsaved and a retry
    /// is scheduled with exponential backoff (0.1 s doubling to 5 s).
    fn commit_landed(&mut self, result: Result<i64, crate::sync::commit::CommitError>) {
        let Some(done) = self.in_flight.take() else { return };
        match result {
            Ok(seq) => {
                if !self.backoff.is_zero() {
                    info!(unsaved = self.unsaved.len(), "document store reachable again; backlog saved");
                }
                self.backoff = Duration::ZERO;
                self.log_len += done.count as u64;
                self.last_seq = seq;
                self.env().metrics.unsaved_bytes.dec_by(done.bytes as i64);
                self.rooms.mark_active(self.doc.project());
                self.unsaved.drain(..done.count);
                self.unsaved_bytes -= done.bytes;
                self.confirm(done.awaiting, done.server_awaiting);
                if self.log_len >= self.env().limits.compact_threshold {
                    self.compact();
                }
                self.persist();
            }
            Err(e) => {
                self.env().metrics.persist_errors.inc();
                self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                error!(error = %e, unsaved = self.unsaved.len(), retry_in = ?self.backoff, "could not save document; holding updates");
                // Earlier writes first: they are confirmed with the retry, before later ones.
                let later = std::mem::replace(&mut self.awaiting, done.awaiting);
                self.awaiting.extend(later);
                let later = std::mem::replace(&mut self.server_awaiting, done.server_awaiting);
                self.server_awaiting.extend(later);
                self.retry_at = Some(Instant::now() + self.backoff);
            }
        }
    }

    /// Merges the log into a snapshot in the background: the room keeps applying and saving
    /// while the snapshot is written. One compaction per document at a time.
    ///
    /// The snapshot is built from a fresh load of the store, not from this room's memory: it
    /// then covers exactly the updates up to the `last_seq` it passes, including any another
    /// process appended, so no process's updates can be compacted away.
    fn compact(&mut self) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, doc) = (self.env().store.clone(), self.doc.clone());
        let flag = self.compacting.clone();
        self.log_len = 0;
        let span = tracing::Span::current();
        self.env().tracker.spawn(
            async move {
                if let Err(e) = compact_from_store(store.as_ref(), &doc).await {
                    warn!(error = %e, "compaction failed; the log stays as it is");
                }
                flag.store(false, Ordering::Release);
            }
            .instrument(span),
        );
    }

    async fn flush_before_exit(&mut self) {
        for attempt in 0..5u32 {
            self.retry_at = None;
            self.persist();
            while self.in_flight.is_some() {
                let result = landed(&mut self.in_flight).await;
                self.commit_landed(result);
            }
            if self.unsaved.is_empty() {
                return;
            }
            self.retry_at = None;
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
        }
        error!(
            unsaved = self.unsaved.len(),
            "updates could not be saved before unloading; their clients still hold them"
        );
        self.env().metrics.unsaved_bytes.dec_by(self.unsaved_bytes as i64);
    }
}

/// Loads a document, merges it, and replaces the log it covers by that snapshot.
async fn compact_from_store(store: &dyn DocStore, doc: &DocName) -> anyhow::Result<bool> {
    let stored = store.load(doc.as_str()).await?;
    if stored.updates.is_empty() {
        return Ok(false);
    }
    let parts = stored.snapshot.iter().chain(stored.updates.iter()).map(Vec::as_slice);
    let snapshot = DocState::load(parts)?.encode_state();
    Ok(store.compact(doc.as_str(), &snapshot, stored.last_seq).await?)
}

/// Whose change an output is, which decides who is told and who saves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// This node's peers (or the server itself): relayed to the other nodes, saved now.
    Local,
    /// Another node's update, saved by that node: saved here lazily, as a safety net.
    Remote,
    /// Content a state comparison found missing here: saved now (its origin may be gone).
    Repair,
}

/// The remote inputs of one batch.
#[derive(Default)]
struct RemoteBatch {
    inputs: Vec<Input>,
    /// Whether any input came from a state comparison.
    repairing: bool,
    /// The senders' states of the diffs among the inputs, to compare with once they are applied.
    compare: Vec<Summary>,
}

fn is_write(msg: &DocMessage) -> bool {
    matches!(msg, DocMessage::Sync(SyncMessage::SyncStep2(_) | SyncMessage::Update(_)))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum ReplyFrame {
    Send(Bytes),
    Nothing,
    Kill(CloseReason),
}

fn reply_frame(framing: &Framing, reply: &Reply) -> ReplyFrame {
    let msg = match reply {
        Reply::SyncStep1(sv) => OutMsg::SyncStep1(sv),
        Reply::SyncStep2(update) => OutMsg::SyncStep2(update),
        Reply::Awareness(update) => OutMsg::Awareness(update),
        Reply::Invalid(reason) => return ReplyFrame::Kill(CloseReason::malformed(reason)),
        Reply::WriteApplied | Reply::WriteRefused { .. } => return status_frame(framing, reply),
    };
    ReplyFrame::Send(encode(framing, msg))
}

/// Hocuspocus peers get a SyncStatus for every write; y-websocket peers hear only of refused
/// writes that held changes (auth permission-denied), as the y-protocols auth message defines.
fn status_frame(framing: &Framing, reply: &Reply) -> ReplyFrame {
    let applied = matches!(reply, Reply::WriteApplied | Reply::WriteRefused { had_changes: false });
    match framing {
        Framing::Hocus { key } => ReplyFrame::Send(Bytes::from(wire::encode_hocus(key, HocusOut::SyncStatus(applied)))),
        Framing::YWebsocket if !applied => ReplyFrame::Send(Bytes::from(wire::encode_ywebsocket_permission_denied(
            "read-only access: this token's role is viewer",
        ))),
        Framing::YWebsocket => ReplyFrame::Nothing,
    }
}

fn encode(framing: &Framing, msg: OutMsg<'_>) -> Bytes {
    match framing {
        Framing::YWebsocket => Bytes::from(wire::encode_ywebsocket(msg)),
        Framing::Hocus { key } => Bytes::from(wire::encode_hocus(key, HocusOut::Doc(msg))),
    }
}
