//! A room's actor: one task per loaded document that drains its inbox in batches, applies each
//! batch to the [`DocState`] in one step, and sends what the [`Relay`] policy says goes out now.
//!
//! The actor drains up to [`BATCH`] commands at once and applies every write among them in one
//! transaction; it relays one shared frame per batch to every peer, and persists through one
//! commit in flight at a time (see `persist.rs`), so the store sees one write per batch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use bytes::Bytes;
use sync_core::relay::{Held, Persist, Relay, Release, Writer};
use sync_core::room::Reply;
use sync_core::wire::{DocMessage, OutMsg, SyncMessage};
use sync_core::{DocName, DocState, Input, Output, PeerId, Role};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::cluster::RemoteBatch;
use super::frames::{Framing, ReplyFrame, encode, reply_frame};
use super::persist::{CommitFuture, landed};
use super::{RoomCmd, RoomEnv, Rooms};
use crate::close::{self, CloseReason};
use crate::sync::sink::ConnSink;

/// The peer id of the server's own writes: joined as an editor, with no connection.
pub(super) const SERVER_PEER: PeerId = 0;
/// The peer id of the other nodes' writes and awareness (cluster mode): an editor and an
/// awareness relay, with no connection.
pub(super) const BUS_PEER: PeerId = PeerId::MAX;
/// Most commands applied in one batch.
const BATCH: usize = 1024;

/// The relay policy with this room's frames and server-write waiters. A held confirmation is an
/// encoded frame; a held echo is the writer's raw part of an update, encoded at release, when a
/// writer's echoes of every batch the commit covers go merged, as one frame (after a long
/// outage that may be hundreds: one each would overflow the writer's queue).
pub(super) type RoomRelay = Relay<Bytes, oneshot::Sender<()>>;

pub(super) struct PeerSlot {
    pub(super) sink: ConnSink,
    pub(super) framing: Framing,
    pub(super) role: Role,
}

pub(super) struct Actor {
    pub(super) doc: DocName,
    pub(super) rooms: Rooms,
    leases: Arc<AtomicUsize>,
    pub(super) peers: HashMap<PeerId, PeerSlot>,
    /// Unsaved updates, held confirmations and the retry schedule: the pure policy.
    pub(super) relay: RoomRelay,
    /// Other nodes' updates applied here. Their own node saves them; this node saves them too,
    /// merged, at its next comparison or before unloading, so an update survives the crash of
    /// the node it came from (storing an update twice is harmless: updates are idempotent).
    pub(super) remote_unsaved: Vec<Vec<u8>>,
    /// This room's inbox, for the bus to route the document's channel to.
    pub(super) tx: mpsc::WeakSender<RoomCmd>,
    /// The store append in flight, if any (the policy knows what it covers).
    pub(super) commit: Option<CommitFuture>,
    pub(super) compacting: Arc<AtomicBool>,
    pub(super) log_len: u64,
    pub(super) last_seq: i64,
    /// Comparison intervals since the room started, and the last one in which the document
    /// changed: a document that stopped changing compares less often.
    pub(super) compare_ticks: u64,
    pub(super) changed_at_tick: u64,
}

/// Whose change an output is, which decides who is told and who saves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// This node's peers (or the server itself): relayed to the other nodes, saved now.
    Local,
    /// Another node's update, saved by that node: saved here lazily, as a safety net.
    Remote,
    /// Content a state comparison found missing here: saved now (its origin may be gone).
    Repair,
}

impl Actor {
    pub(super) fn new(doc: DocName, rooms: Rooms, leases: Arc<AtomicUsize>, tx: mpsc::WeakSender<RoomCmd>) -> Actor {
        Actor {
            doc,
            rooms,
            leases,
            peers: HashMap::new(),
            relay: Relay::new(),
            remote_unsaved: Vec::new(),
            tx,
            commit: None,
            compacting: Arc::default(),
            log_len: 0,
            last_seq: 0,
            compare_ticks: 0,
            changed_at_tick: 0,
        }
    }

    pub(super) fn env(&self) -> &RoomEnv {
        &self.rooms.env
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<RoomCmd>) {
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
            let retry_at = self.relay.retry_at().map(Instant::from_std);
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
                _ = compare.tick(), if self.env().bus.is_some() => self.compare_tick(&mut state),
                result = landed(&mut self.commit) => self.commit_landed(result),
                _ = sleep_until_opt(retry_at) => {
                    let next = self.relay.retry();
                    self.drive(next);
                }
                _ = sleep_until_opt(unload_at) => {
                    self.save_remote();
                    if self.relay.is_saved() && self.rooms.try_remove(&self.doc, &self.leases, &mut rx) {
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

    async fn process(&mut self, state: &mut DocState, cmds: impl Iterator<Item = RoomCmd>) {
        let refusing = self.relay.unsaved_bytes() >= self.env().limits.max_unsaved_bytes;
        let mut refused: HashSet<PeerId> = HashSet::new();
        let mut inputs = Vec::new();
        // Other nodes' inputs are applied in a step of their own, before this node's: the
        // result of each step then says whose it is (who relays and who saves it).
        let mut remote = RemoteBatch::default();
        for cmd in cmds {
            match cmd {
                RoomCmd::Join { peer, role, sink, framing } => {
                    self.peers.insert(peer, PeerSlot { sink, framing, role });
                    inputs.push(Input::Join { peer, role });
                }
                RoomCmd::Leave { peer } => inputs.push(Input::Leave { peer }),
                RoomCmd::Msg { peer, .. } if refused.contains(&peer) => {}
                RoomCmd::Msg { peer, msg } if refusing && self.is_write(state, peer, &msg) => {
                    // The store is behind by more than the bound: take no new edit. The client
                    // still holds it and sends it again on reconnecting. A viewer's message, or
                    // a step 2 that brings nothing new (a fresh joiner's), is no edit.
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
                    self.relay.server_write(done);
                }
            }
        }
        self.step_remote(state, &mut remote);
        let out = state.step(inputs, Instant::now().into_std());
        self.broadcast(state, out, Origin::Local);
        // Peers that left are dropped from the slot map once the core has forgotten them.
        self.peers.retain(|peer, _| state.has_peer(*peer));
        let next = self.relay.after_batch();
        self.drive(next);
    }

    /// Whether `msg` would change the document (see [`DocState::is_write`]); a peer that joined
    /// in this batch is judged by the role it joined with.
    fn is_write(&self, state: &DocState, peer: PeerId, msg: &DocMessage) -> bool {
        let role = self.peers.get(&peer).map(|slot| slot.role);
        role.is_some_and(|role| state.is_write(role, msg))
    }

    /// Does what the policy says about saving: start a commit, or send confirmations.
    pub(super) fn drive(&mut self, persist: Persist<Bytes, oneshot::Sender<()>>) {
        match persist {
            Persist::Append(updates) => self.start_commit(updates),
            Persist::Release(release) => self.confirm(release),
            Persist::Wait => {}
        }
    }

    /// Sends replies and relays; evicts peers whose connection is gone or too slow. Who gets
    /// what now and what after the commit is the [`Relay`] policy's decision; this encodes the
    /// frames: the whole update for a peer that did not write in this step, and for a writer its
    /// own part (its echo) and everyone else's apart.
    pub(super) fn broadcast(&mut self, state: &mut DocState, out: Output, origin: Origin) {
        let mut evict = Vec::new();
        // Every write applied for a peer, with its confirmation frame where the framing has one.
        let mut acks: Vec<(PeerId, Option<Bytes>)> = Vec::new();
        for (peer, reply) in out.replies {
            let Some(slot) = self.peers.get(&peer) else { continue };
            let frame = match reply_frame(&slot.framing, &reply) {
                ReplyFrame::Send(frame) => Some(frame),
                ReplyFrame::Nothing => None,
                ReplyFrame::Kill(reason) => {
                    self.env().metrics.protocol_errors.inc();
                    slot.sink.killer().kill(reason);
                    evict.push(peer);
                    continue;
                }
            };
            if reply == Reply::WriteApplied {
                acks.push((peer, frame));
            } else if let Some(frame) = frame
                && slot.sink.push(frame).is_err()
            {
                evict.push(peer);
            }
        }
        let mut parts: HashMap<PeerId, Vec<Vec<u8>>> = HashMap::new();
        for (peer, part) in out.writes {
            parts.entry(peer).or_default().push(part);
        }
        let mut writers: Vec<Writer<Bytes>> = Vec::new();
        let mut readers = Vec::new();
        let mut is_writer: HashSet<PeerId> = HashSet::new();
        for (peer, ack) in acks {
            let first = is_writer.insert(peer);
            writers.push(Writer { peer, ack, own: None, others: None });
            if !first {
                continue;
            }
            let (Some(update), Some(slot)) = (&out.update, self.peers.get(&peer)) else { continue };
            let last = writers.last_mut().expect("just pushed");
            let Some(own) = parts.get(&peer) else {
                // Its write added nothing: the whole update is everyone else's.
                last.others = Some(encode(&slot.framing, OutMsg::Update(update)));
                continue;
            };
            last.own = merged(own.iter(), update).map(Bytes::from);
            let others = parts.iter().filter(|(p, _)| **p != peer).flat_map(|(_, v)| v.iter());
            last.others = merged(others, update).map(|others| encode(&slot.framing, OutMsg::Update(&others)));
        }
        if let Some(update) = &out.update {
            self.changed_at_tick = self.compare_ticks;
            let mut frames: HashMap<&Framing, Bytes> = HashMap::new();
            for (peer, slot) in self.peers.iter().filter(|(peer, _)| !is_writer.contains(peer)) {
                let frame =
                    frames.entry(&slot.framing).or_insert_with(|| encode(&slot.framing, OutMsg::Update(update)));
                readers.push((*peer, frame.clone()));
            }
        }
        for (peer, frame) in self.relay.relay(writers, readers) {
            if let Some(slot) = self.peers.get(&peer)
                && slot.sink.push(frame).is_err()
            {
                evict.push(peer);
            }
        }
        if let Some(update) = out.update {
            if origin == Origin::Local {
                if let Some(bus) = &self.env().bus {
                    bus.publish_encoded(&self.doc, sync_core::peering::NodeMsg::encode_update(bus.node(), &update));
                }
            }
            if origin == Origin::Remote {
                self.remote_unsaved.push(update);
            } else {
                self.env().metrics.unsaved_bytes.inc_by(update.len() as i64);
                self.relay.unsaved(update);
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
                self.publish_awareness(awareness);
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

    /// Sends the confirmations held for writes whose updates are now in the store: each
    /// writer's acknowledgements, and its echoes merged into one frame.
    pub(super) fn confirm(&mut self, release: Release<Bytes, oneshot::Sender<()>>) {
        for done in release.server {
            let _ = done.send(());
        }
        let mut echoes: Vec<(PeerId, Vec<Vec<u8>>)> = Vec::new();
        for (peer, held) in release.peers {
            match held {
                Held::Ack(frame) => {
                    if let Some(slot) = self.peers.get(&peer) {
                        // A full queue ends that connection; its client resyncs and loses nothing.
                        let _ = slot.sink.push_ack(frame);
                    }
                }
                Held::Frame(part) => match echoes.iter_mut().find(|(p, _)| *p == peer) {
                    Some((_, parts)) => parts.push(part.to_vec()),
                    None => echoes.push((peer, vec![part.to_vec()])),
                },
            }
        }
        for (peer, parts) in echoes {
            let Some(slot) = self.peers.get(&peer) else { continue };
            let whole = match parts.as_slice() {
                [one] => one.clone(),
                many => match yrs::merge_updates_v1(many.iter().map(Vec::as_slice)) {
                    Ok(whole) => whole,
                    Err(_) => {
                        // Cannot happen for parts the room applied; one frame each then.
                        for part in many {
                            let _ = slot.sink.push(encode(&slot.framing, OutMsg::Update(part)));
                        }
                        continue;
                    }
                },
            };
            let _ = slot.sink.push(encode(&slot.framing, OutMsg::Update(&whole)));
        }
    }
}

/// One update holding every given part of `whole` (none for none). Should parts not merge, the
/// whole update stands in: it holds them all, and what else it holds the peer already has.
fn merged<'a>(parts: impl Iterator<Item = &'a Vec<u8>>, whole: &[u8]) -> Option<Vec<u8>> {
    let parts: Vec<&[u8]> = parts.map(Vec::as_slice).collect();
    match parts.as_slice() {
        [] => None,
        [one] => Some(one.to_vec()),
        many => Some(yrs::merge_updates_v1(many.iter().copied()).unwrap_or_else(|_| whole.to_vec())),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
