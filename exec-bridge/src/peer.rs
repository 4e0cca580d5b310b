//! The bridge as a peer of the server: one multiplexed connection carrying the project's root
//! document and every file document, kept in step with a workspace folder through [`Mirror`].
//!
//! Documents to files: every update to a document (other than the mirror's own) marks it; a
//! [`Debounce`] writes marked documents once they are quiet for `quiet` (or at most `max_delay`
//! after the first mark), so a burst of keystrokes is one write and a single keystroke reaches the
//! disk within milliseconds. Files to documents: an inotify watcher (the `notify` crate, not
//! following symlinks) wakes the mirror when anything in the workspace changes, which then
//! scans it (at most once per [`SCAN_GAP`]); a full scan every `scan_every` (1 s) is the safety
//! net for what inotify misses (a full event queue, a watch limit reached, a folder created and
//! filled before its watch was added). What changed becomes minimal CRDT edits.
//!
//! Scans and writes touch the disk, so they run on tokio's blocking pool (`spawn_blocking`),
//! never on a runtime worker: the mirror's state goes to the blocking thread and comes back.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use collab_client::{DocPeer, MuxConnection};
use sync_core::tree;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use yrs::{Doc, Origin, ReadTxn, StateVector, Transact};

use crate::mirror::{Debounce, FileDocs, MIRROR_ORIGIN, Mirror};
use crate::workspace::{Scan, Workspace, WorkspaceConfig, WorkspaceError};

/// Where the bridge connects and what it mirrors.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// `ws://host:port` of a collab server.
    pub server: String,
    pub project: String,
    /// An editor token for the project, issued to the bridge (its own user id and name).
    pub token: String,
    /// The name other peers see in awareness.
    pub display_name: String,
    pub workspace: PathBuf,
    pub workspace_config: WorkspaceConfig,
    pub quiet: Duration,
    pub max_delay: Duration,
    pub scan_every: Duration,
}

impl BridgeConfig {
    /// Defaults: writes 5 ms after the last keystroke (at most 50 ms after the first), a scan
    /// whenever the workspace changes and every second.
    pub fn new(server: &str, project: &str, token: &str, workspace: PathBuf) -> BridgeConfig {
        BridgeConfig {
            server: server.to_owned(),
            project: project.to_owned(),
            token: token.to_owned(),
            display_name: "Run bridge".to_owned(),
            workspace,
            workspace_config: WorkspaceConfig::default(),
            quiet: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
            scan_every: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("connecting to the server: {0}")]
    Connect(#[from] collab_client::ClientError),
    #[error(transparent)]
    Workspace(#[from] crate::workspace::WorkspaceError),
    #[error("the connection to the server closed")]
    Disconnected,
}

/// Shortest time between two scans, however often the workspace changes.
pub const SCAN_GAP: Duration = Duration::from_millis(10);

/// Key of the root document in the debounce set (file ids are 16 hex characters).
const ROOT: &str = "";

/// Which documents changed since the mirror last looked.
#[derive(Default)]
struct Marks {
    changed: Mutex<Vec<String>>,
    wake: Notify,
}

impl Marks {
    fn mark(&self, id: &str) {
        self.changed.lock().unwrap_or_else(|e| e.into_inner()).push(id.to_owned());
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Marks `id` on every update to `doc` that the mirror did not make itself.
fn watch(doc: &Doc, id: &str, marks: &Arc<Marks>) {
    let (id, marks) = (id.to_owned(), marks.clone());
    let own = Origin::from(MIRROR_ORIGIN);
    doc.observe_update_v1("exec-bridge", move |txn, _| {
        if txn.origin() != Some(&own) {
            marks.mark(&id);
        }
    })
    .expect("a document accepts an update observer");
}

/// The file documents the bridge holds, and the ones the mirror created but that are not yet
/// opened on the connection.
#[derive(Default)]
struct Files {
    peers: HashMap<String, DocPeer>,
    created: Vec<(String, Doc)>,
}

impl Files {
    /// Every file document held, for a pass on a blocking thread.
    fn docs(&self) -> HashMap<String, Doc> {
        let peers = self.peers.iter().map(|(id, peer)| (id.clone(), peer.doc().clone()));
        peers.chain(self.created.iter().cloned()).collect()
    }
}

impl FileDocs for Files {
    fn get(&self, id: &str) -> Option<Doc> {
        self.peers
            .get(id)
            .map(|p| p.doc().clone())
            .or_else(|| self.created.iter().find(|(c, _)| c == id).map(|(_, d)| d.clone()))
    }

    fn create(&mut self, id: &str) -> Doc {
        let doc = Doc::new();
        self.created.push((id.to_owned(), doc.clone()));
        doc
    }
}

/// What a run needs to know of the project, read after every pending document edit is written.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub settings: tree::Settings,
    /// Every file's path in the tree.
    pub paths: Vec<String>,
}

/// Asks the bridge to write out every edit it holds now (skipping the debounce) and answer
/// with the project's settings and files: sent before each run.
///
/// `wait_for` lists documents (by name) with the state the server held when the run was
/// requested; the bridge first waits (up to [`CATCH_UP`]) until its replicas hold at least that,
/// so a run started right after a keystroke sees the keystroke.
#[derive(Debug)]
pub struct PrepareRequest {
    pub wait_for: Vec<(String, StateVector)>,
    pub reply: oneshot::Sender<Prepared>,
}

/// Longest a run waits for the bridge to receive the edits made before it was requested.
pub const CATCH_UP: Duration = Duration::from_secs(2);

/// Runs the bridge until `shutdown`: connects, mirrors both ways, and returns on shutdown or
/// when the connection fails. The caller restarts it with the same `mirror`: its memory of what
/// both sides last agreed on is what lets files written while the bridge was away merge into
/// the documents instead of being overwritten by them.
pub async fn run(config: BridgeConfig, mirror: &mut Mirror, shutdown: CancellationToken) -> Result<(), BridgeError> {
    let (_keep, mut requests) = mpsc::channel(1);
    run_serving(config, mirror, shutdown, &mut requests).await
}

/// [`run`], also answering [`PrepareRequest`]s.
pub async fn run_serving(
    config: BridgeConfig,
    mirror: &mut Mirror,
    shutdown: CancellationToken,
    requests: &mut mpsc::Receiver<PrepareRequest>,
) -> Result<(), BridgeError> {
    let ws = Arc::new(Workspace::open(&config.workspace, &config.workspace_config)?);
    let mux = MuxConnection::connect(&config.server).await?;
    let root = mux.open(&config.project, &config.token).await?;
    root.wait_synced(Duration::from_secs(30)).await?;
    root.set_awareness(&serde_json::json!({ "user": { "name": config.display_name, "bridge": true } }).to_string());
    let marks = Arc::new(Marks::default());
    watch(root.doc(), ROOT, &marks);
    let mut files = Files::default();
    let mut debounce: Debounce<String> = Debounce::new(config.quiet, config.max_delay);
    open_files(&mux, &config, root.doc(), &mut files, &marks).await?;
    write_out(mirror, &ws, root.doc(), &files).await;
    info!(project = config.project, workspace = %config.workspace.display(), "bridge mirroring");
    let changed = Arc::new(Notify::new());
    let _watcher = watch_workspace(&config.workspace, &changed);
    let mut last_scan = Instant::now();
    let mut scan_every = tokio::time::interval(config.scan_every);
    let mut refused: HashSet<String> = HashSet::new();
    scan_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = debounce.deadline().map(Instant::from_std);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(PrepareRequest { wait_for, reply }) = requests.recv() => {
                catch_up(&mux, &config, root.doc(), &mut files, &marks, &wait_for).await?;
                for id in marks.take() {
                    debounce.touch(id, std::time::Instant::now());
                }
                if debounce.take_all() {
                    open_files(&mux, &config, root.doc(), &mut files, &marks).await?;
                    write_out(mirror, &ws, root.doc(), &files).await;
                }
                let prepared = {
                    let txn = root.doc().transact();
                    let paths = tree::entries(&txn)
                        .into_iter()
                        .filter(|e| e.kind == tree::EntryKind::File)
                        .map(|e| e.path)
                        .collect();
                    Prepared { settings: tree::settings(&txn), paths }
                };
                let _ = reply.send(prepared);
            }
            _ = marks.wake.notified() => {
                let now = std::time::Instant::now();
                for id in marks.take() {
                    debounce.touch(id, now);
                }
            }
            _ = sleep_until_opt(deadline) => {
                let Some(due) = debounce.take_due(std::time::Instant::now()) else { continue };
                if due.contains(ROOT) {
                    open_files(&mux, &config, root.doc(), &mut files, &marks).await?;
                }
                write_out(mirror, &ws, root.doc(), &files).await;
            }
            () = next_scan(&changed, &mut scan_every) => {
                tokio::time::sleep_until(last_scan + SCAN_GAP).await;
                last_scan = Instant::now();
                if !root.status().connected {
                    return Err(BridgeError::Disconnected);
                }
                let scanned = scan(&ws).await;
                // Checked again: the connection may have dropped while the scan ran, and edits
                // made now would be lost with it while the mirror counts them as agreed.
                if !root.status().connected {
                    return Err(BridgeError::Disconnected);
                }
                match scanned {
                    Ok(found) => {
                        let report = mirror.files_to_docs(&found, root.doc(), &mut files);
                        // Said once per refusal, not on every scan while it lasts.
                        let now_refused: HashSet<String> = report.refused.iter().map(ToString::to_string).collect();
                        let fresh: Vec<&String> = now_refused.difference(&refused).collect();
                        if !fresh.is_empty() {
                            warn!(refused = ?fresh, "workspace files not mirrored");
                        }
                        refused = now_refused;
                        // A merge that kept other people's typing leaves the document ahead of
                        // the file: write it back (the mirror's own edits mark nothing).
                        let now = std::time::Instant::now();
                        for id in report.edited {
                            debounce.touch(id, now);
                        }
                        open_created(&mux, &config, &mut files, &marks).await?;
                    }
                    Err(e) => warn!(error = %e, "workspace scan failed; trying again"),
                }
            }
        }
    }
}

/// Waits until the bridge's replicas hold at least the states in `wait_for` (opening files the
/// tree gained meanwhile), or [`CATCH_UP`] passed; updates arrive on the connection's own task.
async fn catch_up(
    mux: &MuxConnection,
    config: &BridgeConfig,
    root: &Doc,
    files: &mut Files,
    marks: &Arc<Marks>,
    wait_for: &[(String, StateVector)],
) -> Result<(), BridgeError> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        open_files(mux, config, root, files, marks).await?;
        let behind = wait_for.iter().find(|(name, wanted)| {
            let doc = if *name == config.project {
                Some(root.clone())
            } else {
                name.strip_prefix(&format!("{}/", config.project)).and_then(|id| files.get(id))
            };
            let have = doc.map(|d| d.transact().state_vector()).unwrap_or_default();
            wanted.iter().any(|(client, clock)| have.get(client) < *clock)
        });
        let Some((name, _)) = behind else { return Ok(()) };
        // Every update the connection applies to a watched document wakes `marks` (and a wake
        // that came before this wait is kept as a permit), so this sleeps until one arrives.
        if tokio::time::timeout_at(deadline, marks.wake.notified()).await.is_err() {
            warn!(doc = name, "a run starts before the bridge received every edit made before it");
            return Ok(());
        }
    }
}

/// Watches the workspace for changes (recursively, not following symlinks), waking `changed`
/// on every event; `None` (and the periodic scan alone) when inotify refuses.
fn watch_workspace(workspace: &std::path::Path, changed: &Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let wake = Arc::clone(changed);
    let handler = move |_: notify::Result<notify::Event>| wake.notify_one();
    let config = notify::Config::default().with_follow_symlinks(false);
    let watched = notify::RecommendedWatcher::new(handler, config)
        .and_then(|mut watcher| watcher.watch(workspace, notify::RecursiveMode::Recursive).map(|()| watcher));
    match watched {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            warn!(error = %err, workspace = %workspace.display(), "cannot watch the workspace; scanning it every so often only");
            None
        }
    }
}

/// Resolves when the workspace changed or the periodic scan is due.
async fn next_scan(changed: &Notify, every: &mut tokio::time::Interval) {
    tokio::select! {
        () = changed.notified() => {}
        _ = every.tick() => {}
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes what changed in the documents to the workspace, on a blocking thread.
async fn write_out(mirror: &mut Mirror, ws: &Arc<Workspace>, root: &Doc, files: &Files) {
    let (mut taken, ws, root, docs) = (std::mem::take(mirror), Arc::clone(ws), root.clone(), files.docs());
    let written = tokio::task::spawn_blocking(move || {
        let report = taken.docs_to_files(&ws, &root, &docs);
        (taken, report)
    })
    .await;
    match written {
        Ok((back, report)) => {
            *mirror = back;
            if !report.refused.is_empty() {
                warn!(refused = ?report.refused, "documents not written to the workspace");
            }
        }
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        // Only when the runtime shuts down, before the pass started: the bridge is going away.
        Err(_) => warn!("the runtime stopped before documents were written to the workspace"),
    }
}

/// Scans the workspace (reading every file) on a blocking thread.
async fn scan(ws: &Arc<Workspace>) -> Result<Scan, WorkspaceError> {
    let ws = Arc::clone(ws);
    match tokio::task::spawn_blocking(move || ws.scan()).await {
        Ok(found) => found,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(join) => Err(WorkspaceError::Io { path: "workspace root".to_owned(), source: std::io::Error::other(join) }),
    }
}

/// Opens every file of the tree not open yet, and waits until each holds the server's state.
async fn open_files(
    mux: &MuxConnection,
    config: &BridgeConfig,
    root: &Doc,
    files: &mut Files,
    marks: &Arc<Marks>,
) -> Result<(), BridgeError> {
    let ids: Vec<String> = {
        let txn = root.transact();
        tree::entries(&txn).into_iter().filter(|e| e.kind == tree::EntryKind::File).map(|e| e.id).collect()
    };
    let mut opened = Vec::new();
    for id in ids {
        if files.peers.contains_key(&id) {
            continue;
        }
        let peer = mux.open(&tree::file_doc_name(&config.project, &id), &config.token).await?;
        watch(peer.doc(), &id, marks);
        opened.push(id.clone());
        files.peers.insert(id, peer);
    }
    for id in opened {
        files.peers[&id].wait_synced(Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// Opens on the connection the file documents the mirror created for new files on disk: their
/// content goes to the server with the sync handshake.
async fn open_created(
    mux: &MuxConnection,
    config: &BridgeConfig,
    files: &mut Files,
    marks: &Arc<Marks>,
) -> Result<(), BridgeError> {
    for (id, doc) in std::mem::take(&mut files.created) {
        let peer = mux.open_with(&tree::file_doc_name(&config.project, &id), &config.token, doc).await?;
        watch(peer.doc(), &id, marks);
        files.peers.insert(id, peer);
    }
    Ok(())
}
