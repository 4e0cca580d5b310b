//! Check for `DocState::step`: arbitrary sync messages from an editor and a viewer never corrupt the document.

use std::collections::BTreeMap;
use std::time::Instant;

use sync_core::wire::{self, DocMessage, OutMsg};
use sync_core::{DocState, Input, PeerId, Reply, Role};
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, Snapshot, StateVector, Transact, Update};

pub const EDITOR: PeerId = 1;
pub const VIEWER: PeerId = 2;

/// Record flags (the first byte of each record): the low two bits pick the sender and how the
/// payload is read, [`SAME_BATCH`] adds the record to the previous record's batch, and [`STEP2`]
/// sends a raw payload as sync step 2 instead of an update.
pub const EDITOR_UPDATE: u8 = 0;
pub const VIEWER_UPDATE: u8 = 1;
pub const EDITOR_FRAME: u8 = 2;
pub const VIEWER_FRAME: u8 = 3;
pub const SAME_BATCH: u8 = 4;
pub const STEP2: u8 = 8;

/// Encodes one record of an `update_apply` input: `flags`, the payload length (u16 LE), the payload.
pub fn record(flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("a record payload fits in 64 KiB");
    let mut out = vec![flags];
    out.extend(len.to_le_bytes());
    out.extend(payload);
    out
}

/// Splits an input into records; a short last record takes what is left.
fn records(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let [flags, rest @ ..] = data {
        let (len, rest) = match rest {
            [lo, hi, rest @ ..] => (usize::from(u16::from_le_bytes([*lo, *hi])), rest),
            _ => (rest.len(), &[][..]),
        };
        let (payload, tail) = rest.split_at(len.min(rest.len()));
        out.push((*flags, payload));
        data = tail;
    }
    out
}

/// The messages one record sends, and from whom.
fn messages(flags: u8, payload: &[u8]) -> (PeerId, Vec<DocMessage>) {
    let peer = if flags & 1 == 0 { EDITOR } else { VIEWER };
    // A raw payload travels in a frame of its own. Either way the room only sees what the wire
    // decoder accepted: a frame that does not decode is closed at the edge (1007).
    let frame = match (flags & 2 == 0, flags & STEP2 == 0) {
        (true, true) => wire::encode_ywebsocket(OutMsg::Update(payload)),
        (true, false) => wire::encode_ywebsocket(OutMsg::SyncStep2(payload)),
        (false, _) => payload.to_vec(),
    };
    let msgs = wire::decode_ywebsocket(&frame).unwrap_or_default();
    (peer, msgs)
}

/// Everything about the document a refused write must leave alone: what is integrated, what is
/// deleted, and what waits for missing dependencies.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    snapshot: Snapshot,
    pending: Option<(StateVector, StateVector)>,
    pending_deletes: bool,
}

fn fingerprint(state: &DocState) -> Fingerprint {
    let txn = state.doc().transact();
    let store = txn.store();
    Fingerprint {
        snapshot: txn.snapshot(),
        pending: store.pending_update().map(|p| (p.update.state_vector(), p.missing.clone())),
        pending_deletes: store.pending_ds().is_some(),
    }
}

/// The state vector without clients at clock 0 (an update with an empty run of blocks leaves
/// such an entry behind, and it means the same as no entry).
fn state_vector(doc: &Doc) -> BTreeMap<u64, u32> {
    doc.transact().state_vector().iter().filter(|(_, clock)| **clock > 0).map(|(c, clock)| (c.get(), *clock)).collect()
}

fn run_batch(room: &mut DocState, mirror: &Doc, batch: Vec<Input>, now: Instant) {
    let before = fingerprint(room);
    let out = room.step(batch, now);
    let mut applied = false;
    for (peer, reply) in &out.replies {
        match reply {
            Reply::WriteApplied => {
                assert_eq!(*peer, EDITOR, "a viewer's write was applied");
                applied = true;
            }
            Reply::SyncStep2(diff) => {
                Update::decode_v1(diff).expect("a sync step 2 the room sends decodes");
            }
            _ => {}
        }
    }
    if !applied {
        assert!(out.update.is_none(), "a batch with no applied write relayed an update: {:?}", out.replies);
        assert_eq!(before, fingerprint(room), "a batch with no applied write changed the document: {:?}", out.replies);
    }
    if let Some(update) = &out.update {
        let update = Update::decode_v1(update).expect("the relayed update decodes");
        mirror.transact_mut().apply_update(update).expect("the relayed update applies");
    }
    assert_eq!(
        state_vector(mirror),
        state_vector(room.doc()),
        "a peer that applied every relayed update is not in the room's state"
    );
}

/// Drives one `DocState` with an editor and a viewer sending the records of `data`.
///
/// Properties: no panic; a viewer's write is never applied; a batch in which no write was applied
/// (refused, invalid or none) leaves the document exactly as it was and relays nothing; a peer that
/// applies every relayed update reaches the room's state vector; the document still encodes, and
/// loads back (`DocState::load`) with at least the room's state vector.
pub fn update_apply(data: &[u8]) {
    let now = Instant::now();
    let mut room = DocState::new();
    let mirror = Doc::new();
    room.step(
        [Input::Join { peer: EDITOR, role: Role::Editor }, Input::Join { peer: VIEWER, role: Role::Viewer }],
        now,
    );

    let mut batch = Vec::new();
    for (flags, payload) in records(data) {
        if flags & SAME_BATCH == 0 && !batch.is_empty() {
            run_batch(&mut room, &mirror, std::mem::take(&mut batch), now);
        }
        let (peer, msgs) = messages(flags, payload);
        batch.extend(msgs.into_iter().map(|msg| Input::Message { peer, msg }));
    }
    if !batch.is_empty() {
        run_batch(&mut room, &mirror, batch, now);
    }

    let encoded = room.encode_state();
    let loaded = DocState::load([encoded.as_slice()]).expect("the room's own state loads back");
    // Reloading may integrate more than the room did: `encode_state` merges the updates still
    // waiting for dependencies into the snapshot, and a peer that sent two different blocks under
    // one id can make that merge resolve what the room still holds back. It must never lose any.
    let reloaded = state_vector(loaded.doc());
    for (client, clock) in state_vector(room.doc()) {
        let got = reloaded.get(&client).copied().unwrap_or(0);
        assert!(got >= clock, "a reloaded document lost state: client {client} at {got}, room at {clock}");
    }
}
