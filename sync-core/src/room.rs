//! The state of one loaded document and the rules of its sync protocol, with no I/O.
//!
//! A caller feeds a batch of [`Input`]s (joins, leaves, decoded messages) and a `now`, and gets an
//! [`Output`]: replies for single peers plus at most one update and one awareness message to relay
//! to every peer. All writes in a batch are applied in one yrs transaction, so a burst of keystrokes
//! from a whole room costs one transaction and one relayed frame.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use yrs::sync::{Awareness, AwarenessUpdate};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, Options, ReadTxn, StateVector, Transact, Update};

use crate::Role;
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
    /// The peer sent an update that decodes as bytes but not as a Yjs update. Nothing of it was
    /// applied; the edge disconnects the peer with this reason.
    Invalid(String),
}

#[derive(Debug, Default)]
pub struct Output {
    pub replies: Vec<(PeerId, Reply)>,
    /// What this batch changed in the document: relay it to every peer and persist it.
    pub update: Option<Vec<u8>>,
    /// Awareness changes of this batch: relay them to every peer.
    pub awareness: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Peer {
    role: Role,
    /// Awareness client ids this peer introduced; removed for everyone when it leaves.
    clients: HashSet<ClientID>,
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
}

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
        DocState { awareness: Awareness::new(doc.clone()), doc, peers: HashMap::new(), seen: HashMap::new() }
    }

    /// Builds the state from a stored snapshot and the updates logged after it, in one transaction.
    pub fn load<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Result<DocState, LoadError> {
        let state = DocState::new();
        {
            let mut txn = state.doc.transact_mut();
            for (index, bytes) in parts.into_iter().enumerate() {
                let corrupt = |reason: String| LoadError::Corrupt { index, reason };
                let update = Update::decode_v1(bytes).map_err(|e| corrupt(e.to_string()))?;
                txn.apply_update(update).map_err(|e| corrupt(e.to_string()))?;
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

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The whole document as one update, for snapshots.
    pub fn encode_state(&self) -> Vec<u8> {
        self.doc.transact().encode_state_as_update_v1(&StateVector::default())
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
        Output { replies: batch.replies, update, awareness }
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
        self.peers.insert(peer, Peer { role, clients: HashSet::new() });
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
                let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                batch.replies.push((peer, Reply::SyncStep2(diff)));
            }
            DocMessage::Sync(SyncMessage::SyncStep2(bytes) | SyncMessage::Update(bytes)) => {
                // `wire` has already run `untrusted::check_update_v1` on these bytes.
                let update = match Update::decode_v1(&bytes) {
                    Ok(u) => u,
                    Err(e) => {
                        batch.replies.push((peer, Reply::Invalid(format!("bad update: {e}"))));
                        return;
                    }
                };
                if role.can_write() {
                    batch.pending.push((peer, update));
                } else {
                    self.flush(batch);
                    let had_changes = self.has_changes(&update);
                    batch.replies.push((peer, Reply::WriteRefused { had_changes }));
                }
            }
            DocMessage::Awareness(update) => self.apply_awareness(peer, update, now, batch),
            DocMessage::QueryAwareness => {
                let all = self.seen.keys().copied().collect();
                let full = self.encode_awareness(all).unwrap_or_else(|| vec![0]);
                batch.replies.push((peer, Reply::Awareness(full)));
            }
        }
    }

    fn apply_awareness(&mut self, peer: PeerId, mut update: AwarenessUpdate, now: Instant, batch: &mut Batch) {
        // A peer may only speak for client ids no other peer has claimed.
        update.clients.retain(|id, _| self.peers.iter().all(|(other, p)| *other == peer || !p.clients.contains(id)));
        if update.clients.is_empty() {
            return;
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
        for (peer, update) in batch.pending.drain(..) {
            // An update that starts past what the document holds would wait in yrs's pending
            // store, where fuzzing found a use-after-free and panics (fuzz/RESULTS.md). A peer of
            // this server never needs it: its edits build on what the server sent it.
            let reply = if crate::untrusted::has_gap(&update, &txn.state_vector()) {
                Reply::Invalid("update depends on content the document does not have".into())
            } else {
                match txn.apply_update(update) {
                    Ok(()) => Reply::WriteApplied,
                    Err(e) => Reply::Invalid(format!("update could not be applied: {e}")),
                }
            };
            batch.replies.push((peer, reply));
        }
        let delta = txn.encode_update_v1();
        drop(txn);
        if delta != EMPTY_UPDATE {
            batch.deltas.push(delta);
        }
    }
}

#[derive(Default)]
struct Batch {
    replies: Vec<(PeerId, Reply)>,
    pending: Vec<(PeerId, Update)>,
    deltas: Vec<Vec<u8>>,
    awareness_changed: HashSet<ClientID>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{GetString, Text};

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
}
