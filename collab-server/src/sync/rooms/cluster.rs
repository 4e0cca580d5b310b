//! A room's part in the cluster: joining (asking the other nodes for what they hold), relaying
//! its peers' updates and awareness to them, taking theirs, and repairing what the lossy bus
//! dropped by comparing states (hello, diff, repair; see `sync_core::peering`).

use std::time::Duration;

use sync_core::peering::{NodeId, NodeMsg, Summary};
use sync_core::room::Reply;
use sync_core::wire::{DocMessage, SyncMessage};
use sync_core::{DocState, Input};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::RoomCmd;
use super::actor::{Actor, BUS_PEER, Origin};

/// Comparisons a room makes after its document last changed, one per `--repair-interval`: a hello
/// that is itself lost is followed by another.
const HELLOS_AFTER_CHANGE: u64 = 3;
/// Past those, a document with peers that does not change compares every this many intervals.
const QUIET_HELLO_EVERY: u64 = 15;
/// How long a node that loads a document waits for the other nodes' state of it before it
/// answers its peers (the other nodes answer within a round trip unless they are overloaded).
const CLUSTER_WAIT: Duration = Duration::from_secs(1);

/// The remote inputs of one batch.
#[derive(Default)]
pub(super) struct RemoteBatch {
    inputs: Vec<Input>,
    /// Whether any input came from a state comparison.
    repairing: bool,
    /// The senders' states of the diffs among the inputs, to compare with once they are applied.
    compare: Vec<Summary>,
}

impl Actor {
    /// Subscribes to the document's channel, asks every node that has the document loaded for
    /// what this node lacks, and waits (at most [`CLUSTER_WAIT`]) for all their answers, so the
    /// first peers get updates other nodes have not saved yet. Commands arriving meanwhile are
    /// left in `buf`, answers included, for the caller to process in order.
    pub(super) async fn join_cluster(
        &mut self,
        state: &mut DocState,
        rx: &mut mpsc::Receiver<RoomCmd>,
        buf: &mut Vec<RoomCmd>,
    ) {
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

    /// One `--repair-interval` passed: save the other nodes' updates applied here, and compare
    /// states if the document changed recently (or now and then while it is quiet).
    pub(super) fn compare_tick(&mut self, state: &mut DocState) {
        self.save_remote();
        self.compare_ticks += 1;
        let quiet = self.compare_ticks.saturating_sub(self.changed_at_tick);
        if !self.peers.is_empty() && (quiet <= HELLOS_AFTER_CHANGE || quiet % QUIET_HELLO_EVERY == 0) {
            self.hello(state, false);
        }
    }

    fn publish(&self, msg: &NodeMsg) {
        if let Some(bus) = &self.env().bus {
            bus.publish(&self.doc, msg);
        }
    }

    /// Tells the other nodes the awareness change this node's peers made.
    pub(super) fn publish_awareness(&self, update: Vec<u8>) {
        if let Some(from) = self.node() {
            self.publish(&NodeMsg::Awareness { from, update });
        }
    }

    fn node(&self) -> Option<NodeId> {
        self.env().bus.as_ref().map(|bus| bus.node())
    }

    /// Tells the other nodes this node's state of the document; those whose state differs (all
    /// of them, with `reply`) answer with a diff.
    pub(super) fn hello(&mut self, state: &mut DocState, reply: bool) {
        if let Some(from) = self.node() {
            self.publish(&NodeMsg::Hello { from, state: state.summary().clone(), reply });
        }
    }

    /// Queues the other nodes' updates applied here for saving, merged into one.
    pub(super) fn save_remote(&mut self) {
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
            self.relay.unsaved(update);
        }
        let next = self.relay.persist_unless_retrying();
        self.drive(next);
    }

    /// Takes a message from another node: updates become inputs of the bus peer (applied with
    /// the batch's other remote inputs); a hello is answered at once; a diff for this node is
    /// applied and, once applied, answered with a repair if the sender lacks something.
    pub(super) fn on_bus(&mut self, state: &mut DocState, msg: NodeMsg, remote: &mut RemoteBatch) {
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
    pub(super) fn step_remote(&mut self, state: &mut DocState, remote: &mut RemoteBatch) {
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
}
