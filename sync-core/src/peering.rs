//! What server nodes tell each other about one document over the cluster bus, with no I/O.
//!
//! Every node that has a document loaded subscribes to the document's channel. A node publishes
//! what its own peers changed ([`NodeMsg::Update`], [`NodeMsg::Awareness`]); the bus may lose any
//! message, so nodes also compare states ([`NodeMsg::Hello`]) when a document loads, when the bus
//! reconnects and periodically, and send each other what is missing ([`NodeMsg::Diff`],
//! [`NodeMsg::Repair`]). Updates are CRDT updates: applying one twice, or out of order, is safe.

use std::hash::{Hash, Hasher};

use yrs::ReadTxn;
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;

/// Identifies one server process in the cluster (random per start).
pub type NodeId = u64;

const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeMsg {
    /// What the sender's own peers changed (a Yjs v1 update).
    Update { from: NodeId, update: Vec<u8> },
    /// Awareness changes of the sender's own peers.
    Awareness { from: NodeId, update: Vec<u8> },
    /// The sender's state of the document. Nodes whose state differs answer with a [`NodeMsg::Diff`];
    /// with `reply`, every node answers (a node that just loaded the document waits for them).
    Hello { from: NodeId, state: Summary, reply: bool },
    /// What `to` lacks according to its hello, and the sender's own state, so `to` can send back
    /// what the sender lacks.
    Diff { from: NodeId, to: NodeId, update: Vec<u8>, state: Summary },
    /// What the receivers lacked according to a diff: apply it.
    Repair { from: NodeId, update: Vec<u8> },
}

/// A node's state of a document, small enough to send often: its state vector (which inserts it
/// has) and a digest of its delete set (which deletions it has; a state vector does not count
/// deletions).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// Encoded (v1) state vector.
    pub sv: Vec<u8>,
    pub deletes: u64,
}

impl Summary {
    pub fn of(txn: &impl ReadTxn) -> Summary {
        use yrs::updates::encoder::Encode;
        let mut hasher = std::hash::DefaultHasher::new();
        // The delete set is ordered by client and its ranges are merged: equal sets hash equally.
        txn.snapshot().delete_set.hash(&mut hasher);
        Summary { sv: txn.state_vector().encode_v1(), deletes: hasher.finish() }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed node message: {0}")]
pub struct DecodeError(String);

impl NodeMsg {
    pub fn from(&self) -> NodeId {
        match self {
            NodeMsg::Update { from, .. }
            | NodeMsg::Awareness { from, .. }
            | NodeMsg::Hello { from, .. }
            | NodeMsg::Diff { from, .. }
            | NodeMsg::Repair { from, .. } => *from,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.write_u8(VERSION);
        match self {
            NodeMsg::Update { from, update } => return NodeMsg::encode_update(*from, update),
            NodeMsg::Awareness { from, update } => {
                out.write_u8(1);
                out.write_var(*from);
                out.write_buf(update);
            }
            NodeMsg::Hello { from, state, reply } => {
                out.write_u8(2);
                out.write_var(*from);
                write_summary(&mut out, state);
                out.write_u8(u8::from(*reply));
            }
            NodeMsg::Diff { from, to, update, state } => {
                out.write_u8(3);
                out.write_var(*from);
                out.write_var(*to);
                out.write_buf(update);
                write_summary(&mut out, state);
            }
            NodeMsg::Repair { from, update } => {
                out.write_u8(4);
                out.write_var(*from);
                out.write_buf(update);
            }
        }
        out
    }

    /// [`NodeMsg::Update`] encoded from a borrowed update: the hot path, one copy of the bytes.
    pub fn encode_update(from: NodeId, update: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(update.len() + 16);
        out.write_u8(VERSION);
        out.write_u8(0);
        out.write_var(from);
        out.write_buf(update);
        out
    }

    /// Decodes a message; the updates inside are only carried, not checked.
    pub fn decode(bytes: &[u8]) -> Result<NodeMsg, DecodeError> {
        let bad = |e: yrs::encoding::read::Error| DecodeError(e.to_string());
        let mut cur = Cursor::new(bytes);
        let version = cur.read_u8().map_err(bad)?;
        if version != VERSION {
            return Err(DecodeError(format!("version {version}, expected {VERSION}")));
        }
        let kind = cur.read_u8().map_err(bad)?;
        let from: NodeId = cur.read_var().map_err(bad)?;
        let msg = match kind {
            0 => NodeMsg::Update { from, update: cur.read_buf().map_err(bad)?.to_vec() },
            1 => NodeMsg::Awareness { from, update: cur.read_buf().map_err(bad)?.to_vec() },
            2 => {
                let state = read_summary(&mut cur).map_err(bad)?;
                NodeMsg::Hello { from, state, reply: cur.read_u8().map_err(bad)? != 0 }
            }
            3 => {
                let to = cur.read_var().map_err(bad)?;
                let update = cur.read_buf().map_err(bad)?.to_vec();
                NodeMsg::Diff { from, to, update, state: read_summary(&mut cur).map_err(bad)? }
            }
            4 => NodeMsg::Repair { from, update: cur.read_buf().map_err(bad)?.to_vec() },
            other => return Err(DecodeError(format!("unknown kind {other}"))),
        };
        if cur.has_content() {
            return Err(DecodeError("trailing bytes".into()));
        }
        Ok(msg)
    }
}

fn write_summary(out: &mut Vec<u8>, state: &Summary) {
    out.write_buf(&state.sv);
    out.write_var(state.deletes);
}

fn read_summary(cur: &mut Cursor<'_>) -> Result<Summary, yrs::encoding::read::Error> {
    let sv = cur.read_buf()?.to_vec();
    Ok(Summary { sv, deletes: cur.read_var()? })
}

#[cfg(test)]
mod tests {
    use yrs::{GetString, Text, Transact};

    use super::*;

    fn summary() -> Summary {
        Summary { sv: vec![1, 2, 3], deletes: u64::MAX - 7 }
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            NodeMsg::Update { from: 1, update: vec![0, 0] },
            NodeMsg::Awareness { from: u64::MAX, update: vec![1, 2] },
            NodeMsg::Hello { from: 3, state: summary(), reply: true },
            NodeMsg::Hello { from: 3, state: Summary::default(), reply: false },
            NodeMsg::Diff { from: 4, to: 5, update: vec![9; 300], state: summary() },
            NodeMsg::Repair { from: 6, update: Vec::new() },
        ];
        for msg in msgs {
            assert_eq!(NodeMsg::decode(&msg.encode()).unwrap(), msg);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = NodeMsg::Diff { from: 4, to: 5, update: vec![9; 30], state: summary() }.encode();
        for cut in 0..good.len() {
            assert!(NodeMsg::decode(&good[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(NodeMsg::decode(&trailing).is_err());
        assert!(NodeMsg::decode(&[2, 0, 0]).is_err(), "other version");
        assert!(NodeMsg::decode(&[VERSION, 9, 0]).is_err(), "unknown kind");
    }

    #[test]
    fn summaries_tell_deletions_apart_where_state_vectors_do_not() {
        let a = yrs::Doc::with_client_id(1);
        let text = a.get_or_insert_text("t");
        text.insert(&mut a.transact_mut(), 0, "hello");
        let b = yrs::Doc::with_client_id(2);
        let update = a.transact().encode_state_as_update_v1(&yrs::StateVector::default());
        b.transact_mut().apply_update(yrs::updates::decoder::Decode::decode_v1(&update).unwrap()).unwrap();
        assert_eq!(Summary::of(&a.transact()), Summary::of(&b.transact()));

        let b_text = b.get_or_insert_text("t");
        b_text.remove_range(&mut b.transact_mut(), 1, 2);
        let (sa, sb) = (Summary::of(&a.transact()), Summary::of(&b.transact()));
        assert_eq!(sa.sv, sb.sv, "a deletion adds nothing to the state vector");
        assert_ne!(sa.deletes, sb.deletes);

        text.remove_range(&mut a.transact_mut(), 1, 2);
        assert_eq!(text.get_string(&a.transact()), b_text.get_string(&b.transact()));
        assert_eq!(Summary::of(&a.transact()), Summary::of(&b.transact()));
    }
}
