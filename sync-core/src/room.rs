//! The state of one loaded document and the rules of its sync protocol, with no I/O.
//!
//! A caller feeds a batch of [`Input`]s (joins, leaves, decoded messages) and a `now`, and gets an
//! [`Output`]: replies for single peers plus at most one update and one awareness message to relay
//! to every peer. All writes in a batch are applied in one yrs transaction, so a burst of keystrokes
//! from a whole room costs one transaction and one relayed frame.
//!
//! Why one long file: the code is under 600 lines; the rest is its unit tests, which drive
//! `step` through every rule here and read best beside them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use yrs::sync::{Awareness, AwarenessUpdate};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, Options, ReadTxn, StateVector, Transact, Update};

use crate::Role;
use crate::peering::Summary;
use crate::untrusted::{self, BlockId, Shape};
use crate::wire::{DocMessage, SyncMessage};

/// Identifies one peer's attachment to one document (unique per server process).
pub type PeerId = u64;

/// The empty Yjs update (v1): no blocks, empty delete set.
const EMPTY_UPDATE: &[u8] = &[0, 0];

#[derive(Debug)]
pub enum Input {
    Join { peer: PeerId, role: Role },
    Leave { peer: PeerId },
    Message { peer: PeerId, msg: DocMessage },
}

/// Something to send to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    SyncStep1(StateVector),
    SyncStep2(Vec<u8>),
    Awareness(Vec<u8>),
    /// The peer's update was applied.
    WriteApplied,
    /// The peer may not write; `had_changes` tells whether the refused update held anything new.
    WriteRefused {
        had_changes: bool,
    },
    /// The peer sent an update the document can never take whole: it does not decode, it has a
    /// hole or a parent that is not a nested type ([`crate::untrusted::Shape::fits`]), or it would
    /// wait for missing content while the peer's hold is full. Nothing of it was applied; the edge
    /// disconnects the peer with this reason.
    Invalid(String),
}

#[derive(Debug, Default)]
pub struct Output {
    pub replies: Vec<(PeerId, Reply)>,
    /// What this batch changed in the document: relay it to every peer and persist it.
    pub update: Option<Vec<u8>>,
    /// Awareness changes of this batch: relay them to every peer.
    pub awareness: Option<Vec<u8>>,
    /// Each applied write of this batch, with the peer that sent it: the part of `update` that
    /// write added (what the document did not hold yet), in the order applied. A room holds a
    /// writer's own part until it is saved and sends it everyone else's at once.
    pub writes: Vec<(PeerId, Vec<u8>)>,
}

#[derive(Debug)]
struct Peer {
    role: Role,
    /// Awareness client ids this peer introduced; removed for everyone when it leaves.
    clients: HashSet<ClientID>,
    /// Size and number of this peer's updates in [`DocState::held`].
    held_bytes: usize,
    held_updates: usize,
    /// Relays awareness of clients that live elsewhere (another server node): a client id it
    /// speaks for passes to a peer that connects here and claims it.
    relay: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("stored update {index} is not a valid Yjs update: {reason}")]
    Corrupt { index: usize, reason: String },
}

pub struct DocState {
    doc: Doc,
    awareness: Awareness,
    peers: HashMap<PeerId, Peer>,
    /// When each client with a live awareness state last renewed it.
    seen: HashMap<ClientID, Instant>,
    /// Ids of the document's nested-type items: the only blocks an update may name as a parent.
    types: HashSet<BlockId>,
    /// Editors' updates waiting for content the document does not have yet, in arrival order.
    held: Vec<Held>,
    /// The document's [`Summary`], until the document next changes.
    summary: Option<Summary>,
    /// The last sync step 2 answered and the state vector it answered, until the document next
    /// changes: a step 1 repeated (every joiner sends the same empty one) costs a copy, not an
    /// encoding of the whole document.
    answered: Option<(StateVector, Vec<u8>)>,
    /// Most awareness client ids one (non-relay) peer may speak for; see [`DocState::set_awareness_cap`].
    awareness_cap: usize,
    /// Most entries of the project tree's `files` map, when this is a project's root document.
    tree_cap: Option<usize>,
}

/// Awareness client ids one peer may speak for by default. A browser tab uses one; a few more
/// leave room for a client that restarts its awareness without leaving.
pub const MAX_AWARENESS_CLIENTS: usize = 16;

impl std::fmt::Debug for DocState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocState").field("peers", &self.peers.len()).finish()
    }
}

impl Default for DocState {
    fn default() -> Self {
        DocState::new()
    }
}

impl DocState {
    pub fn new() -> DocState {
        // Garbage collection stays on: deleted content is dropped from memory and snapshots.
        // History for checkpoints is kept by the store as snapshots, not inside the live doc.
        let doc = Doc::with_options(Options { skip_gc: false, ..Options::default() });
        DocState {
            awareness: Awareness::new(doc.clone()),
            doc,
            peers: HashMap::new(),
            seen: HashMap::new(),
            types: HashSet::new(),
            held: Vec::new(),
            summary: None,
            answered: None,
            awareness_cap: MAX_AWARENESS_CLIENTS,
            tree_cap: None,
        }
    }

    /// Builds the state from a stored snapshot and the updates logged after it, in one transaction.
    pub fn load<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Result<DocState, LoadError> {
        let mut state = DocState::new();
        {
            let mut txn = state.doc.transact_mut();
            for (index, bytes) in parts.into_iter().enumerate() {
                let corrupt = |reason: String| LoadError::Corrupt { index, reason };
                // Stored parts passed the same checks when they arrived; this only indexes types.
                let shape = untrusted::shape_v1(bytes).map_err(|e| corrupt(e.to_string()))?;
                let update = Update::decode_v1(bytes).map_err(|e| corrupt(e.to_string()))?;
                txn.apply_update(update).map_err(|e| corrupt(e.to_string()))?;
                state.types.extend(shape.types);
            }
        }
        Ok(state)
    }

    pub fn doc(&self) -> &Doc {
        &self.doc
    }

    pub fn has_peer(&self, peer: PeerId) -> bool {
        self.peers.contains_key(&peer)
    }

    /// Whether `msg` from a peer with `role` would change the document: an editor's sync step 2
    /// or update with something the document does not hold. A viewer's, or one that repeats what
    /// is here (a fresh joiner's empty step 2), is no write; one that does not decode is left to
    /// [`DocState::step`] to refuse.
    pub fn is_write(&self, role: Role, msg: &DocMessage) -> bool {
        let DocMessage::Sync(SyncMessage::SyncStep2(bytes) | SyncMessage::Update(bytes)) = msg else {
            return false;
        };
        if !role.can_write() || bytes == EMPTY_UPDATE {
            return false;
        }
        Update::decode_v1(bytes).is_ok_and(|update| self.has_changes(&update))
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The whole document as one update, for snapshots.
    pub fn encode_state(&self) -> Vec<u8> {
        self.doc.transact().encode_state_as_update_v1(&StateVector::default())
    }

    /// Sets how many awareness client ids one peer may speak for. An awareness message that would
    /// take a peer past it is refused whole ([`Reply::Invalid`]): thousands of ids from one socket
    /// made every joiner wait for, and every peer hold, all of their states.
    pub fn set_awareness_cap(&mut self, cap: usize) {
        self.awareness_cap = cap.max(1);
    }

    /// Makes this a project's root document whose tree holds at most `cap` entries: an update
    /// that could take the `files` map past it is refused whole ([`Reply::Invalid`]). One update
    /// with 100,000 entries made every export and checkpoint load 100,000 documents.
    pub fn set_tree_cap(&mut self, cap: usize) {
        self.tree_cap = Some(cap);
    }

    /// Marks a joined peer as a relay of clients connected elsewhere (see [`Peer::relay`]).
    pub fn set_relay(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.relay = true;
        }
    }

    /// The document's state vector and delete-set digest.
    pub fn summary(&mut self) -> &Summary {
        self.summary.get_or_insert_with(|| Summary::of(&self.doc.transact()))
    }

    /// Everything the document has that a holder of `sv` (an encoded state vector) lacks, as one
    /// update: the blocks past `sv` and the whole delete set.
    pub fn diff_since(&self, sv: &[u8]) -> Result<Vec<u8>, String> {
        let sv = StateVector::decode_v1(sv).map_err(|e| format!("bad state vector: {e}"))?;
        Ok(self.doc.transact().encode_state_as_update_v1(&sv))
    }

    /// Whether a holder of `other` lacks something this document has: inserts past its state
    /// vector, or deletions (told apart by digest; equal digests count as equal sets).
    pub fn is_ahead_of(&mut self, other: &Summary) -> bool {
        let Ok(theirs) = StateVector::decode_v1(&other.sv) else {
            return true;
        };
        let mine = self.summary().clone();
        let ahead = StateVector::decode_v1(&mine.sv)
            .map(|sv| sv.iter().any(|(client, clock)| *clock > theirs.get(client)))
            .unwrap_or(true);
        ahead || mine.deletes != other.deletes
    }

    /// Applies a batch of inputs in order. Writes are applied in one transaction.
    pub fn step(&mut self, inputs: impl IntoIterator<Item = Input>, now: Instant) -> Output {
        let mut batch = Batch::default();
        for input in inputs {
            match input {
                Input::Join { peer, role } => self.join(peer, role, &mut batch),
                Input::Leave { peer } => self.leave(peer, &mut batch),
                Input::Message { peer, msg } => self.message(peer, msg, now, &mut batch),
            }
        }
        self.flush(&mut batch);
        let update = match batch.deltas.len() {
            0 => None,
            1 => batch.deltas.pop(),
            _ => yrs::merge_updates_v1(batch.deltas.iter().map(Vec::as_slice)).ok(),
        };
        let awareness = self.encode_awareness(batch.awareness_changed);
        Output { replies: batch.replies, update, awareness, writes: batch.writes }
    }

    /// Removes awareness states not renewed within `timeout` (clients renew every 15 s).
    pub fn sweep_awareness(&mut self, now: Instant, timeout: Duration) -> Option<Vec<u8>> {
        let stale: Vec<ClientID> = self
            .seen
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            self.forget_client(*id);
        }
        self.encode_awareness(stale.into_iter().collect())
    }

    /// Number of live (non-removed) awareness states.
    pub fn awareness_len(&self) -> usize {
        self.seen.len()
    }

    fn join(&mut self, peer: PeerId, role: Role, batch: &mut Batch) {
        self.peers.insert(peer, Peer { role, clients: HashSet::new(), held_bytes: 0, held_updates: 0, relay: false });
        let sv = self.doc.transact().state_vector();
        batch.replies.push((peer, Reply::SyncStep1(sv)));
        if !self.seen.is_empty() {
            if let Some(full) = self.encode_awareness(self.seen.keys().copied().collect()) {
                batch.replies.push((peer, Reply::Awareness(full)));
            }
        }
    }

    fn leave(&mut self, peer: PeerId, batch: &mut Batch) {
        let Some(gone) = self.peers.remove(&peer) else {
            return;
        };
        batch.pending.retain(|(p, _)| *p != peer);
        // Never confirmed to the peer: a client that comes back sends them again in its step 2.
        self.held.retain(|h| h.peer != peer);
        for id in gone.clients {
            if self.seen.contains_key(&id) {
                self.forget_client(id);
                batch.awareness_changed.insert(id);
            }
        }
    }

    fn message(&mut self, peer: PeerId, msg: DocMessage, now: Instant, batch: &mut Batch) {
        let Some(role) = self.peers.get(&peer).map(|p| p.role) else {
            return;
        };
        match msg {
            DocMessage::Sync(SyncMessage::SyncStep1(sv)) => {
                self.flush(batch);
                let diff = self.answer_step1(sv);
                batch.replies.push((peer, Reply::SyncStep2(diff)));
            }
            DocMessage::Sync(SyncMessage::SyncStep2(bytes) | SyncMessage::Update(bytes)) => {
                if role.can_write() {
                    batch.pending.push((peer, bytes));
                    return;
                }
                // `wire` has already run `untrusted::check_update_v1` on these bytes.
                let update = match Update::decode_v1(&bytes) {
                    Ok(u) => u,
                    Err(e) => {
                        batch.replies.push((peer, Reply::Invalid(format!("bad update: {e}"))));
                        return;
                    }
                };
                self.flush(batch);
                let had_changes = self.has_changes(&update);
                batch.replies.push((peer, Reply::WriteRefused { had_changes }));
            }
            DocMessage::Awareness(update) => self.apply_awareness(peer, update, now, batch),
            DocMessage::QueryAwareness => {
                let all = self.seen.keys().copied().collect();
                let full = self.encode_awareness(all).unwrap_or_else(|| vec![0]);
                batch.replies.push((peer, Reply::Awareness(full)));
            }
        }
    }

    /// The diff a holder of `sv` lacks, encoded once per document version and state vector.
    fn answer_step1(&mut self, sv: StateVector) -> Vec<u8> {
        match &self.answered {
            Some((known, diff)) if *known == sv => diff.clone(),
            _ => {
                let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                self.answered = Some((sv, diff.clone()));
                diff
            }
        }
    }

    fn apply_awareness(&mut self, peer: PeerId, mut update: AwarenessUpdate, now: Instant, batch: &mut Batch) {
        if let Some(me) = self.peers.get(&peer).filter(|p| !p.relay) {
            let new = update.clients.keys().filter(|id| !me.clients.contains(id)).count();
            if me.clients.len() + new > self.awareness_cap {
                let reason = format!("awareness for more than {} clients from one connection", self.awareness_cap);
                batch.replies.push((peer, Reply::Invalid(reason)));
                return;
            }
        }
        // A peer may only speak for client ids no other peer has claimed, except a relay: a client
        // that reconnects here from another node takes its id back from the relay at once.
        update
            .clients
            .retain(|id, _| self.peers.iter().all(|(other, p)| *other == peer || p.relay || !p.clients.contains(id)));
        if update.clients.is_empty() {
            return;
        }
        if self.peers.get(&peer).is_some_and(|p| !p.relay) {
            for p in self.peers.values_mut().filter(|p| p.relay) {
                p.clients.retain(|id| !update.clients.contains_key(id));
            }
        }
        let Ok(Some(summary)) = self.awareness.apply_update_summary(update) else {
            return;
        };
        let Some(me) = self.peers.get_mut(&peer) else {
            return;
        };
        for id in summary.added.iter().chain(&summary.updated) {
            me.clients.insert(*id);
            self.seen.insert(*id, now);
        }
        for id in &summary.removed {
            me.clients.remove(id);
            self.seen.remove(id);
        }
        batch.awareness_changed.extend(summary.all_changes());
    }

    fn forget_client(&mut self, id: ClientID) {
        self.seen.remove(&id);
        self.awareness.remove_state(id);
        for p in self.peers.values_mut() {
            p.clients.remove(&id);
        }
    }

    fn encode_awareness(&self, ids: HashSet<ClientID>) -> Option<Vec<u8>> {
        if ids.is_empty() {
            return None;
        }
        let known = ids.into_iter().filter(|id| self.awareness.meta(*id).is_some());
        let update = self.awareness.update_with_clients(known).ok()?;
        (!update.clients.is_empty()).then(|| update.encode_v1())
    }

    /// Whether applying `update` would add anything: blocks past our state or new deletions.
    fn has_changes(&self, update: &Update) -> bool {
        let txn = self.doc.transact();
        let sv = txn.state_vector();
        if update.extends(&sv) {
            return true;
        }
        let beyond = update.state_vector().iter().any(|(client, clock)| *clock > sv.get(client));
        beyond || !update.delete_set().diff(&txn.snapshot().delete_set).is_empty()
    }

    fn flush(&mut self, batch: &mut Batch) {
        if batch.pending.is_empty() {
            return;
        }
        let mut txn = self.doc.transact_mut();
        let mut progress = false;
        for (peer, bytes) in batch.pending.drain(..) {
            match take(&mut txn, &bytes, &mut self.types, self.tree_cap) {
                Ok((reply, part)) => {
                    progress |= reply == Reply::WriteApplied;
                    batch.writes.extend(part.map(|part| (peer, part)));
                    batch.replies.push((peer, reply));
                }
                Err(Admit::Wait(reason)) => {
                    if let Some(refused) = hold(&mut self.held, &mut self.peers, peer, bytes, reason) {
                        batch.replies.push((peer, refused));
                    }
                }
                Err(Admit::Refuse(reason)) => batch.replies.push((peer, Reply::Invalid(reason))),
            }
        }
        // Held updates are retried, in arrival order, for as long as the document moves on.
        while progress && !self.held.is_empty() {
            progress = false;
            for held in std::mem::take(&mut self.held) {
                match take(&mut txn, &held.bytes, &mut self.types, self.tree_cap) {
                    Ok((reply, part)) => {
                        progress |= reply == Reply::WriteApplied;
                        batch.writes.extend(part.map(|part| (held.peer, part)));
                        release(&mut self.peers, &held);
                        batch.replies.push((held.peer, reply));
                    }
                    Err(Admit::Wait(_)) => self.held.push(held),
                    Err(Admit::Refuse(reason)) => {
                        release(&mut self.peers, &held);
                        batch.replies.push((held.peer, Reply::Invalid(reason)));
                    }
                }
            }
        }
        let delta = txn.encode_update_v1();
        drop(txn);
        if delta != EMPTY_UPDATE {
            self.summary = None;
            self.answered = None;
            batch.deltas.push(delta);
        }
    }
}

/// An editor's update that waits for content the document does not have yet.
#[derive(Debug)]
struct Held {
    peer: PeerId,
    bytes: Vec<u8>,
}

/// Most bytes of updates one peer may have waiting; past it the peer is refused.
pub const MAX_HELD_BYTES: usize = 1 << 20;
/// Most updates one peer may have waiting.
pub const MAX_HELD_UPDATES: usize = 256;

/// Keeps `bytes` until the document has what it refers to, within the peer's allowance.
///
/// A real client does send such updates: one that reconnects after typing offline sends its next
/// keystroke as soon as the socket opens, before its sync step 2 (which carries the offline edits
/// the keystroke follows) has gone out. yrs would park it in its own pending store, where fuzzing
/// found crashes; here it waits outside the document, which it cannot touch until it fits whole.
fn hold(
    held: &mut Vec<Held>,
    peers: &mut HashMap<PeerId, Peer>,
    peer: PeerId,
    bytes: Vec<u8>,
    reason: String,
) -> Option<Reply> {
    let p = peers.get_mut(&peer)?;
    if p.held_bytes + bytes.len() > MAX_HELD_BYTES || p.held_updates >= MAX_HELD_UPDATES {
        return Some(Reply::Invalid(format!("{reason}, and too many updates already wait")));
    }
    p.held_bytes += bytes.len();
    p.held_updates += 1;
    held.push(Held { peer, bytes });
    None
}

/// Applies an editor's update if [`admit`] lets it in and it keeps the tree within `tree_cap`,
/// and indexes its nested types. An applied update comes back with the part of it the document
/// did not hold yet (`None` if it was empty).
fn take(
    txn: &mut yrs::TransactionMut,
    bytes: &[u8],
    types: &mut HashSet<BlockId>,
    tree_cap: Option<usize>,
) -> Result<(Reply, Option<Vec<u8>>), Admit> {
    let (update, shape, part) = admit(bytes, &txn.state_vector(), types)?;
    if let Some(cap) = tree_cap {
        let adding = shape.root_keys.get(crate::tree::FILES).copied().unwrap_or(0);
        let present = txn.get_map(crate::tree::FILES).map_or(0, |files| yrs::Map::len(&files, txn) as usize);
        if adding > 0 && present + adding > cap {
            return Err(Admit::Refuse(format!("update refused: the project tree holds at most {cap} entries")));
        }
    }
    Ok(match txn.apply_update(update) {
        Ok(()) => {
            types.extend(shape.types);
            (Reply::WriteApplied, (part != EMPTY_UPDATE).then_some(part))
        }
        // `admit` leaves no way to get here that fuzzing has found.
        Err(e) => (Reply::Invalid(format!("update could not be applied: {e}")), None),
    })
}

fn release(peers: &mut HashMap<PeerId, Peer>, held: &Held) {
    if let Some(p) = peers.get_mut(&held.peer) {
        p.held_bytes -= held.bytes.len();
        p.held_updates -= 1;
    }
}

enum Admit {
    /// The update refers to content the document may still receive.
    Wait(String),
    /// The update can never be integrated whole.
    Refuse(String),
}

/// Readies an editor's update for a document at state `known` with nested types `types`: strips
/// what the document already holds, then lets it in only if yrs can integrate all of it at once.
///
/// yrs integrates an update block by block. Blocks whose dependencies are missing wait in its
/// pending store, where fuzzing found a use-after-free and lost clock ticks; a parent that is not
/// a nested type stops integration half way with an error; and blocks that overlap known content
/// with different content reached a use-after-free (fuzz/RESULTS.md). A peer of this server never
/// needs any of that: its edits build on what the server sent it. Stripping the overlap (yrs's own
/// `diff_updates_v1`) keeps honest resends, such as an offline client's sync step 2 that repeats
/// content which reached the server another way, working.
fn admit(bytes: &[u8], known: &StateVector, types: &HashSet<BlockId>) -> Result<(Update, Shape, Vec<u8>), Admit> {
    let refuse = |e: &dyn std::fmt::Display| Admit::Refuse(format!("update refused: {e}"));
    let mut shape = untrusted::shape_v1(bytes).map_err(|e| refuse(&e))?;
    let stripped;
    let bytes = if shape.overlaps(known) {
        stripped = yrs::diff_updates_v1(bytes, &known.encode_v1()).map_err(|e| refuse(&e))?;
        shape = untrusted::shape_v1(&stripped).map_err(|e| refuse(&e))?;
        &stripped[..]
    } else {
        bytes
    };
    shape
        .fits(known, |id| types.contains(&id))
        .map_err(|e| if e.is_missing() { Admit::Wait(format!("update waits: {e}")) } else { refuse(&e) })?;
    let update = Update::decode_v1(bytes).map_err(|e| refuse(&e))?;
    Ok((update, shape, bytes.to_vec()))
}

#[derive(Default)]
struct Batch {
    replies: Vec<(PeerId, Reply)>,
    pending: Vec<(PeerId, Vec<u8>)>,
    deltas: Vec<Vec<u8>>,
    writes: Vec<(PeerId, Vec<u8>)>,
    awareness_changed: HashSet<ClientID>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{GetString, Map, Text, WriteTxn};

    fn edit(doc: &Doc, at: u32, s: &str) -> Vec<u8> {
        let text = doc.get_or_insert_text("content");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, at, s);
        txn.encode_update_v1()
    }

    fn text_of(doc: &Doc) -> String {
        doc.get_or_insert_text("content").get_string(&doc.transact())
    }

    fn update_msg(peer: PeerId, bytes: Vec<u8>) -> Input {
        Input::Message { peer, msg: DocMessage::Sync(SyncMessage::Update(bytes)) }
    }

    #[test]
    fn a_batch_is_one_relayed_update() {
        let mut room = DocState::new();
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }, Input::Join { peer: 2, role: Role::Editor }], now);
        let (a, b) = (Doc::new(), Doc::new());
        let out = room.step([update_msg(1, edit(&a, 0, "hello ")), update_msg(2, edit(&b, 0, "world"))], now);
        assert_eq!(out.replies, vec![(1, Reply::WriteApplied), (2, Reply::WriteApplied)]);
        let relayed = Doc::new();
        relayed.transact_mut().apply_update(Update::decode_v1(&out.update.unwrap()).unwrap()).unwrap();
        assert_eq!(text_of(&relayed), text_of(room.doc()));
        assert_eq!(text_of(&relayed).len(), 11);
    }

    #[test]
    fn each_writer_gets_its_own_part_of_the_batch() {
        let mut room = DocState::new();
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }, Input::Join { peer: 2, role: Role::Editor }], now);
        let (a, b) = (Doc::new(), Doc::new());
        let hello = edit(&a, 0, "hello ");
        let out = room.step([update_msg(1, hello.clone()), update_msg(2, edit(&b, 0, "world"))], now);
        let parts: HashMap<PeerId, Vec<u8>> = out.writes.into_iter().collect();
        // Ada's part plus Bob's is the whole batch, and Bob's alone is what Ada lacks.
        a.transact_mut().apply_update(Update::decode_v1(&parts[&2]).unwrap()).unwrap();
        assert_eq!(text_of(&a), text_of(room.doc()));
        assert!(!text_of(&a).is_empty() && parts[&1] == hello);
        // A resend of what the document holds is applied, but adds no part.
        let out = room.step([update_msg(1, hello)], now);
        assert_eq!(out.replies, vec![(1, Reply::WriteApplied)]);
        assert!(out.writes.is_empty() && out.update.is_none());
    }

    #[test]
    fn only_what_would_change_the_document_is_a_write() {
        let mut room = DocState::new();
        let now = Instant::now();
        let a = Doc::new();
        let hello = edit(&a, 0, "hello");
        room.step([Input::Join { peer: 1, role: Role::Editor }, update_msg(1, hello.clone())], now);
        let msg = |bytes: Vec<u8>| DocMessage::Sync(SyncMessage::SyncStep2(bytes));
        assert!(room.is_write(Role::Editor, &msg(edit(&a, 0, "more"))));
        assert!(!room.is_write(Role::Viewer, &msg(edit(&a, 0, "more"))), "a viewer's is refused anyway");
        assert!(!room.is_write(Role::Editor, &msg(EMPTY_UPDATE.to_vec())), "a fresh joiner's step 2");
        assert!(!room.is_write(Role::Editor, &msg(hello)), "a resend of what is here");
        assert!(!room.is_write(Role::Editor, &DocMessage::Sync(SyncMessage::SyncStep1(StateVector::default()))));
    }

    #[test]
    fn viewer_writes_are_refused_and_told_apart_from_empty_ones() {
        let mut room = DocState::new();
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Viewer }], now);
        let out = room.step([update_msg(1, edit(&Doc::new(), 0, "x"))], now);
        assert_eq!(out.replies, vec![(1, Reply::WriteRefused { had_changes: true })]);
        assert!(out.update.is_none());
        assert_eq!(text_of(room.doc()), "");
        // A step 2 with nothing new (what every viewer sends after connecting) is not a violation.
        let step2 = Input::Message { peer: 1, msg: DocMessage::Sync(SyncMessage::SyncStep2(EMPTY_UPDATE.to_vec())) };
        let out = room.step([step2], now);
        assert_eq!(out.replies, vec![(1, Reply::WriteRefused { had_changes: false })]);
    }

    #[test]
    fn garbage_update_is_invalid_and_leaves_the_doc_intact() {
        let mut room = DocState::new();
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }], now);
        room.step([update_msg(1, edit(&Doc::new(), 0, "keep"))], now);
        let out = room.step([update_msg(1, vec![1, 2, 3, 200, 200, 200])], now);
        assert!(matches!(out.replies.as_slice(), [(1, Reply::Invalid(_))]), "{:?}", out.replies);
        assert_eq!(text_of(room.doc()), "keep");
    }

    #[test]
    fn awareness_is_removed_on_leave_and_swept_when_stale() {
        let mut room = DocState::new();
        let t0 = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Viewer }, Input::Join { peer: 2, role: Role::Editor }], t0);
        let mut aw1 = Awareness::new(Doc::with_client_id(11));
        aw1.set_local_state_raw(r#"{"user":{"name":"a"}}"#);
        let mut aw2 = Awareness::new(Doc::with_client_id(22));
        aw2.set_local_state_raw(r#"{"user":{"name":"b"}}"#);
        let msg = |peer, aw: &Awareness| Input::Message { peer, msg: DocMessage::Awareness(aw.update().unwrap()) };
        let out = room.step([msg(1, &aw1), msg(2, &aw2)], t0);
        assert!(out.awareness.is_some());
        assert_eq!(room.awareness_len(), 2);

        let out = room.step([Input::Leave { peer: 1 }], t0);
        let removal = AwarenessUpdate::decode_v1(&out.awareness.unwrap()).unwrap();
        assert_eq!(removal.clients.keys().map(|c| c.get()).collect::<Vec<_>>(), vec![11]);
        assert_eq!(&*removal.clients.values().next().unwrap().json, "null");
        assert_eq!(room.awareness_len(), 1);

        assert!(room.sweep_awareness(t0 + Duration::from_secs(29), Duration::from_secs(30)).is_none());
        let swept = room.sweep_awareness(t0 + Duration::from_secs(30), Duration::from_secs(30));
        assert!(swept.is_some());
        assert_eq!(room.awareness_len(), 0);
    }

    #[test]
    fn step1_gets_the_missing_state() {
        let mut room = DocState::new();
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }], now);
        room.step([update_msg(1, edit(&Doc::new(), 0, "abc"))], now);
        room.step([Input::Join { peer: 2, role: Role::Viewer }], now);
        let step1 = Input::Message { peer: 2, msg: DocMessage::Sync(SyncMessage::SyncStep1(StateVector::default())) };
        let out = room.step([step1], now);
        let [(2, Reply::SyncStep2(diff))] = out.replies.as_slice() else { panic!("{:?}", out.replies) };
        let late = Doc::new();
        late.transact_mut().apply_update(Update::decode_v1(diff).unwrap()).unwrap();
        assert_eq!(text_of(&late), "abc");
    }

    fn awareness_of(ids: std::ops::Range<u64>) -> DocMessage {
        let entry = || yrs::sync::awareness::AwarenessUpdateEntry { clock: 1, json: r#"{"u":1}"#.into() };
        DocMessage::Awareness(AwarenessUpdate { clients: ids.map(|id| (ClientID::new(id), entry())).collect() })
    }

    #[test]
    fn a_peer_speaks_for_a_bounded_number_of_awareness_clients() {
        let mut room = DocState::new();
        room.set_awareness_cap(4);
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Viewer }], now);
        let out = room.step([Input::Message { peer: 1, msg: awareness_of(1..4) }], now);
        assert!(out.replies.is_empty() && out.awareness.is_some(), "{:?}", out.replies);
        // Renewing the same ids and adding one more stays within the cap.
        let out = room.step([Input::Message { peer: 1, msg: awareness_of(1..5) }], now);
        assert!(out.replies.is_empty(), "{:?}", out.replies);
        assert_eq!(room.awareness_len(), 4);
        // One id past it: the whole message is refused, nothing of it applied.
        let out = room.step([Input::Message { peer: 1, msg: awareness_of(3..6) }], now);
        assert!(matches!(out.replies.as_slice(), [(1, Reply::Invalid(_))]), "{:?}", out.replies);
        assert!(out.awareness.is_none());
        assert_eq!(room.awareness_len(), 4);
        let out = room.step(
            [Input::Join { peer: 2, role: Role::Viewer }, Input::Message { peer: 2, msg: awareness_of(100..100_000) }],
            now,
        );
        assert!(
            matches!(
                out.replies.as_slice(),
                [(2, Reply::SyncStep1(_)), (2, Reply::Awareness(_)), (2, Reply::Invalid(_))]
            ),
            "{:?}",
            out.replies
        );
        assert_eq!(room.awareness_len(), 4);
    }

    #[test]
    fn a_repeated_step1_is_answered_from_the_last_answer_until_the_document_changes() {
        let mut room = DocState::new();
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }], now);
        let author = Doc::new();
        room.step([update_msg(1, edit(&author, 0, "abc"))], now);
        let step1 =
            || Input::Message { peer: 1, msg: DocMessage::Sync(SyncMessage::SyncStep1(StateVector::default())) };
        let out = room.step([step1(), step1()], now);
        let [(1, Reply::SyncStep2(a)), (1, Reply::SyncStep2(b))] = out.replies.as_slice() else {
            panic!("{:?}", out.replies)
        };
        assert_eq!(a, b);
        assert!(room.answered.is_some(), "the answer is kept");
        // An edit in the same batch as the next step 1 is in its answer.
        let out = room.step([update_msg(1, edit(&author, 3, "d")), step1()], now);
        let Some((1, Reply::SyncStep2(after))) = out.replies.last() else { panic!("{:?}", out.replies) };
        let late = Doc::new();
        late.transact_mut().apply_update(Update::decode_v1(after).unwrap()).unwrap();
        assert_eq!(text_of(&late), "abcd");
    }

    #[test]
    fn a_root_document_refuses_updates_past_its_tree_cap_whole() {
        let mut room = DocState::new();
        room.set_tree_cap(3);
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }], now);
        let author = Doc::new();
        let write = |f: &dyn Fn(&mut yrs::TransactionMut)| {
            let mut txn = author.transact_mut();
            f(&mut txn);
            txn.encode_update_v1()
        };
        let three = write(&|txn| {
            crate::tree::init(txn);
            for path in ["a", "b", "c"] {
                crate::tree::create(txn, path, crate::tree::EntryKind::File).unwrap();
            }
        });
        let out = room.step([update_msg(1, three)], now);
        assert_eq!(out.replies, vec![(1, Reply::WriteApplied)]);
        // A rename rewrites an entry's path, not the map's keys: allowed at the cap.
        let id = crate::tree::find_by_path(&author.transact(), "a").unwrap().id;
        let renamed = write(&|txn| crate::tree::rename(txn, &id, "z").unwrap());
        assert_eq!(room.step([update_msg(1, renamed)], now).replies, vec![(1, Reply::WriteApplied)]);
        let fourth = write(&|txn| {
            crate::tree::create(txn, "d", crate::tree::EntryKind::File).unwrap();
        });
        let out = room.step([update_msg(1, fourth)], now);
        assert!(matches!(out.replies.as_slice(), [(1, Reply::Invalid(_))]), "{:?}", out.replies);
        assert!(out.update.is_none(), "nothing of the refused update is applied");
        assert_eq!(crate::tree::entries(&room.doc().transact()).len(), 3);
    }

    /// A room with one editor, peer 1.
    fn room_with_editor() -> (DocState, Instant) {
        let mut room = DocState::new();
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }], now);
        (room, now)
    }

    fn invalid(out: &Output) -> bool {
        matches!(out.replies.as_slice(), [(_, Reply::Invalid(_))]) && out.update.is_none()
    }

    #[test]
    fn an_overlapping_resend_applies_only_what_is_new() {
        let (mut room, now) = room_with_editor();
        let a = Doc::with_client_id(5);
        let first = edit(&a, 0, "abc");
        room.step([update_msg(1, first)], now);
        edit(&a, 3, "def");
        // The whole state again, as an offline client's sync step 2 can repeat it.
        let all = a.transact().encode_state_as_update_v1(&StateVector::default());
        let out = room.step([update_msg(1, all)], now);
        assert_eq!(out.replies, vec![(1, Reply::WriteApplied)]);
        assert_eq!(text_of(room.doc()), "abcdef");
        let relayed = Update::decode_v1(&out.update.unwrap()).unwrap();
        assert_eq!(relayed.state_vector_lower().get(&ClientID::new(5)), 3, "only the new blocks are relayed");
    }

    fn assert_untouched(room: &DocState, before: &[u8], what: &str) {
        assert_eq!(room.encode_state(), before, "{what} changed the document");
        let txn = room.doc().transact();
        assert!(txn.store().pending_update().is_none(), "{what} left blocks pending in yrs");
        assert!(txn.store().pending_ds().is_none(), "{what} left deletions pending in yrs");
    }

    #[test]
    fn updates_that_can_never_fit_are_refused_whole() {
        let (mut room, now) = room_with_editor();
        room.step([update_msg(1, edit(&Doc::with_client_id(5), 0, "abc"))], now);
        let before = room.encode_state();
        // An item whose parent is the text item 5:0 rather than a nested type: 1 client, 1
        // block, client 6 at clock 0, info 0x04 (string content), parent by id (0) 5:0, "x".
        let bad_parent = vec![1, 1, 6, 0, 0x04, 0, 5, 0, 1, b'x', 0];
        // A skip inside a run: "y" at 6:0, a hole of 3, "z" at 6:4, both under root type "c".
        let hole = vec![1, 3, 6, 0, 0x04, 1, 1, b'c', 1, b'y', 10, 3, 0x04, 1, 1, b'c', 1, b'z', 0];
        for (what, bytes) in [("bad parent", bad_parent), ("hole", hole)] {
            crate::untrusted::check_update_v1(&bytes).unwrap_or_else(|e| panic!("{what} is well formed: {e}"));
            let out = room.step([update_msg(1, bytes)], now);
            assert!(invalid(&out), "{what}: {:?}", out.replies);
            assert_untouched(&room, &before, what);
        }
    }

    #[test]
    fn updates_that_wait_for_content_are_held_until_it_arrives() {
        let mut room = DocState::new();
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }, Input::Join { peer: 2, role: Role::Editor }], now);
        let other = Doc::with_client_id(7);
        let first = edit(&other, 0, "abc");
        // Typed after `first` by a writer who has it: its origin is content the room lacks.
        let follower = Doc::with_client_id(6);
        follower.transact_mut().apply_update(Update::decode_v1(&first).unwrap()).unwrap();
        let after = edit(&follower, 3, "!");
        let deletion = {
            let text = follower.get_or_insert_text("content");
            let mut txn = follower.transact_mut();
            text.remove_range(&mut txn, 0, 1);
            txn.encode_update_v1()
        };
        // And a gap: client 7's second edit before its first.
        let second = edit(&other, 3, "def");
        let before = room.encode_state();
        let reference = Doc::new();
        for u in [&first, &after, &deletion, &second] {
            reference.transact_mut().apply_update(Update::decode_v1(u).unwrap()).unwrap();
        }
        for (what, bytes) in [("missing origin", after), ("unknown deletion", deletion), ("gap", second)] {
            let out = room.step([update_msg(1, bytes)], now);
            assert!(out.replies.is_empty() && out.update.is_none(), "{what} was not held: {:?}", out.replies);
            assert_untouched(&room, &before, what);
        }
        let out = room.step([update_msg(2, first)], now);
        let mut replies = out.replies.clone();
        replies.sort_by_key(|(peer, _)| *peer);
        assert_eq!(
            replies,
            vec![
                (1, Reply::WriteApplied),
                (1, Reply::WriteApplied),
                (1, Reply::WriteApplied),
                (2, Reply::WriteApplied)
            ]
        );
        assert_eq!(text_of(room.doc()), text_of(&reference));
        assert_eq!(text_of(room.doc()).len(), 6);
        assert_eq!(room.held.len(), 0);
    }

    #[test]
    fn a_peer_may_only_hold_so_much() {
        let (mut room, now) = room_with_editor();
        let far = Doc::with_client_id(9);
        edit(&far, 0, "first, never sent");
        for i in 0..MAX_HELD_UPDATES {
            let out = room.step([update_msg(1, edit(&far, 0, "x"))], now);
            assert!(out.replies.is_empty(), "update {i} was not held");
        }
        let out = room.step([update_msg(1, edit(&far, 0, "x"))], now);
        assert!(invalid(&out), "{:?}", out.replies);
        room.step([Input::Leave { peer: 1 }], now);
        assert!(room.held.is_empty(), "a peer's held updates go when it leaves");
    }

    #[test]
    fn nested_types_stay_editable_after_a_reload() {
        let a = Doc::with_client_id(5);
        let first = {
            let mut txn = a.transact_mut();
            let files = txn.get_or_insert_map("files");
            files.insert(&mut txn, "f1", yrs::MapPrelim::from([("path".to_owned(), yrs::Any::from("a.py"))]));
            txn.encode_update_v1()
        };
        let room = DocState::load([first.as_slice()]).unwrap();
        let mut room = room;
        let now = Instant::now();
        room.step([Input::Join { peer: 1, role: Role::Editor }], now);
        // A second writer, who got the tree from the room, sets a key in the nested map: its item
        // names the nested map by id as its parent.
        let b = Doc::with_client_id(6);
        b.transact_mut().apply_update(Update::decode_v1(&room.encode_state()).unwrap()).unwrap();
        let second = {
            let mut txn = b.transact_mut();
            let files = txn.get_or_insert_map("files");
            let Some(yrs::Out::YMap(entry)) = files.get(&txn, "f1") else { panic!("nested map") };
            entry.insert(&mut txn, "kind", "file");
            txn.encode_update_v1()
        };
        let out = room.step([update_msg(1, second)], now);
        assert_eq!(out.replies, vec![(1, Reply::WriteApplied)]);
    }
}
