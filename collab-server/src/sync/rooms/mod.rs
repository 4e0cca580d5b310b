//! Loaded documents: the registry, and one actor task per document around the sans-IO
//! [`DocState`](sync_core::DocState).
//!
//! A document unloads only when it has no peers, nothing unsaved, and no connection holds a lease
//! on it: the lease count is checked and the entry removed under the registry lock, so a joiner
//! either finds the running actor or starts a fresh one that loads everything saved.
//!
//! The parts: this registry; `actor` (the loop, batching, relaying through the pure
//! [`sync_core::relay`] policy); `persist` (appends, retries, compaction, loading); `cluster`
//! (what the room tells other nodes and takes from them); `frames` (encoding per framing).

mod actor;
mod cluster;
mod frames;
mod persist;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use doc_store::DocStore;
use futures_util::FutureExt;
use sync_core::peering::NodeMsg;
use sync_core::wire::DocMessage;
use sync_core::{DocName, PeerId, Role};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

pub use self::frames::Framing;
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::sync::bus::{Bus, BusEvent};
use crate::sync::commit::Committer;
use crate::sync::sink::ConnSink;
use crate::tasks::Tasks;

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

impl From<BusEvent> for RoomCmd {
    fn from(event: BusEvent) -> RoomCmd {
        match event {
            BusEvent::Msg(msg) => RoomCmd::Bus(msg),
            BusEvent::Up => RoomCmd::BusUp,
        }
    }
}

/// The cluster bus as rooms use it: it delivers into their inboxes.
pub type RoomBus = Bus<RoomCmd>;

/// What a room needs from the server around it.
#[derive(Clone)]
pub struct RoomEnv {
    pub store: Arc<dyn DocStore>,
    pub committer: Committer,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: CancellationToken,
    pub tasks: Tasks,
    /// The cluster bus; `None` when this node runs alone.
    pub bus: Option<RoomBus>,
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

    /// The node's supervised tasks (for work a room's caller moves off the runtime).
    pub fn tasks(&self) -> &Tasks {
        &self.env.tasks
    }

    pub fn loaded(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn spawn(&self, doc: DocName) -> Entry {
        let (tx, rx) = mpsc::channel(INBOX);
        let leases = Arc::new(AtomicUsize::new(0));
        let actor = actor::Actor::new(doc.clone(), self.clone(), leases.clone(), tx.downgrade());
        self.env.metrics.documents_loaded.inc();
        let span = info_span!("room", doc_id = %doc);
        let (rooms, inbox) = (self.clone(), tx.downgrade());
        self.env.tasks.spawn("room", async move {
            // A room that panics is counted and logged (by `Tasks`), and leaves the registry, so
            // its peers' connections close (1013) and reconnect to a fresh room that loads what
            // is saved; their clients resend the rest.
            let ran = AssertUnwindSafe(actor.run(rx).instrument(span)).catch_unwind().await;
            if let Err(panic) = ran {
                rooms.remove_dead(&doc, &inbox);
                rooms.env.metrics.documents_loaded.dec();
                std::panic::resume_unwind(panic);
            }
        });
        Entry { tx, leases }
    }

    /// Removes `doc` if its entry is still the room whose inbox is `inbox` (its actor died).
    fn remove_dead(&self, doc: &DocName, inbox: &mpsc::WeakSender<RoomCmd>) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let same = match (map.get(doc), inbox.upgrade()) {
            (Some(entry), Some(inbox)) => entry.tx.same_channel(&inbox),
            _ => false,
        };
        if same {
            map.remove(doc);
        }
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
