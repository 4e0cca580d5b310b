//! The exec channel (`GET /exec/{project}`): runs and shared terminals of a project, through the
//! bridge this node hosts.
//!
//! A node started with `--sandbox local|docker` hosts one exec-bridge session per project that
//! has exec peers: a mirror peer that joins the project over this node's own sync endpoint (with
//! a token the node signs for itself) and keeps the project's files in a workspace folder, and
//! the project's runs and terminals in that sandbox. Sessions outlive their peers (a terminal
//! survives a closed browser tab) and are closed after `--exec-idle` without peers and with
//! nothing running.
//!
//! Invariants: a peer's role comes from its token and only editors change anything (the
//! session refuses viewers); a peer that cannot keep up with the project's events is
//! disconnected with 1013 and never holds back the others; malformed messages are answered with
//! an error message and change nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use exec_bridge::mirror::Mirror;
use exec_bridge::peer::{self, BridgeConfig};
use exec_bridge::protocol::{ClientMsg, ServerMsg};
use exec_bridge::sandbox::{PortStream, Sandbox};
use exec_bridge::session::{Actor, RunBarrier, Session, SessionConfig};
use futures_util::{SinkExt, StreamExt};
use sync_core::DocName;
use sync_core::Role;
use sync_core::tree;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use yrs::{ReadTxn, StateVector, Transact};

use crate::auth::{Identity, Keys};
use crate::project;
use crate::sync::bus::Bus;
use crate::sync::rooms::Rooms;

/// The user id and name the node's bridge peers join projects as.
pub const BRIDGE_USER: &str = "exec-bridge";
pub const BRIDGE_NAME: &str = "Run bridge";
/// How long a close frame may take to leave before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest message an exec peer may send (keystrokes and stdin come in small pieces).
pub const MAX_MESSAGE: usize = 64 << 10;

/// Which sandbox runs a node's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxKind {
    /// No runs or terminals: the exec channel answers 503.
    None,
    /// bubblewrap on this machine (the embedded default).
    Local,
    /// A Docker container per project.
    Docker,
}

/// One project's session and the bridge peer feeding it.
struct ProjectExec {
    session: Arc<Session>,
    peers: AtomicUsize,
    /// When the last peer left (meaningful while `peers` is 0).
    left: Mutex<Instant>,
    stop: CancellationToken,
}

/// Every project's exec session on this node.
pub struct ExecHub {
    sandbox: Option<Arc<dyn Sandbox>>,
    workspaces: PathBuf,
    keys: Keys,
    /// `ws://addr` of this node, set once it listens.
    server: OnceLock<String>,
    projects: Mutex<HashMap<String, Arc<ProjectExec>>>,
    idle: Duration,
    /// How long one send to a peer may take before the peer counts as stuck and is dropped.
    send_timeout: Duration,
    /// With a cluster bus: the lease that makes one node's bridge the project's only one.
    lease: Option<(Bus, Duration)>,
    /// The node's documents, which a run waits for the bridge to catch up with.
    rooms: OnceLock<Rooms>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for ExecHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHub")
            .field("workspaces", &self.workspaces)
            .field("enabled", &self.sandbox.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("runs and terminals are not enabled on this server (start it with --sandbox local or docker)")]
    Disabled,
    #[error("the server is not ready yet")]
    NotListening,
    #[error("this project's sandbox is on another node; try again")]
    OwnedElsewhere,
    #[error("the cluster bus is unreachable, so this node cannot take this project's sandbox; try again")]
    BusDown,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecPortError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Sandbox(#[from] exec_bridge::sandbox::SandboxError),
}

impl ExecHub {
    pub fn new(
        sandbox: Option<Arc<dyn Sandbox>>,
        workspaces: PathBuf,
        keys: Keys,
        (idle, send_timeout): (Duration, Duration),
        lease: Option<(Bus, Duration)>,
        shutdown: CancellationToken,
    ) -> ExecHub {
        ExecHub {
            sandbox,
            workspaces,
            keys,
            server: OnceLock::new(),
            projects: Mutex::default(),
            idle,
            send_timeout,
            lease,
            rooms: OnceLock::new(),
            shutdown,
        }
    }

    /// Records the node's own address, which bridge peers connect to.
    pub fn set_listening(&self, addr: std::net::SocketAddr) {
        let _ = self.server.set(format!("ws://{addr}"));
    }

    /// Gives the hub the node's documents, so runs see every edit made before them.
    pub fn set_rooms(&self, rooms: Rooms) {
        let _ = self.rooms.set(rooms);
    }

    pub fn enabled(&self) -> bool {
        self.sandbox.is_some()
    }

    /// The workspace folder of `project` on this node.
    pub fn workspace(&self, project: &str) -> PathBuf {
        self.workspaces.join(project)
    }

    /// The session of `project` (starting it if needed), counted as used by one more peer until
    /// the returned guard drops. In a cluster, a session starts only on the node that holds the
    /// project's lease.
    async fn join(&self, project: &str) -> Result<(Arc<Session>, PeerGuard), ExecError> {
        if let Some(joined) = self.join_hosted(project) {
            return Ok(joined);
        }
        let sandbox = self.sandbox.clone().ok_or(ExecError::Disabled)?;
        let server = self.server.get().ok_or(ExecError::NotListening)?.clone();
        if let Some((bus, ttl)) = &self.lease {
            match bus.hold_lease(&lease_key(project), *ttl).await {
                Ok(true) => {}
                Ok(false) => return Err(ExecError::OwnedElsewhere),
                Err(_) => return Err(ExecError::BusDown),
            }
        }
        let mut projects = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        let entry = projects.entry(project.to_owned()).or_insert_with(|| {
            let workspace = self.workspace(project);
            let (prepare_tx, prepare_rx) = mpsc::channel(8);
            let sandbox_for_warm = sandbox.clone();
            let mut config = SessionConfig::new(sandbox, workspace.clone());
            if let Some(rooms) = self.rooms.get() {
                config.barrier = Some(Arc::new(RoomsBarrier { rooms: rooms.clone(), project: project.to_owned() }));
            }
            let session = Session::new(config, prepare_tx);
            let stop = self.shutdown.child_token();
            let bridge = BridgeLink { server, project: project.to_owned(), keys: self.keys.clone(), workspace };
            tokio::spawn(bridge.run(prepare_rx, stop.clone(), sandbox_for_warm));
            if let Some((bus, ttl)) = &self.lease {
                tokio::spawn(keep_lease(bus.clone(), project.to_owned(), *ttl, session.clone(), stop.clone()));
            }
            info!(project, "exec session started");
            Arc::new(ProjectExec { session, peers: AtomicUsize::new(0), left: Mutex::new(Instant::now()), stop })
        });
        entry.peers.fetch_add(1, Ordering::SeqCst);
        Ok((entry.session.clone(), PeerGuard { project: entry.clone() }))
    }

    /// [`ExecHub::join`] when this node hosts the project's session already.
    fn join_hosted(&self, project: &str) -> Option<(Arc<Session>, PeerGuard)> {
        let projects = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        let entry = projects.get(project)?;
        entry.peers.fetch_add(1, Ordering::SeqCst);
        Some((entry.session.clone(), PeerGuard { project: entry.clone() }))
    }

    /// A connection to `port` in `project`'s sandbox, for its live preview.
    pub async fn connect_port(&self, project: &str, port: u16) -> Result<Box<dyn PortStream>, ExecPortError> {
        let sandbox = self.sandbox.as_ref().ok_or(ExecPortError::Exec(ExecError::Disabled))?;
        Ok(sandbox.connect_port(&self.workspace(project), port).await?)
    }

    /// Closes the sessions that had no peers for `idle` and run nothing.
    pub fn sweep(&self) -> usize {
        let mut projects = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        let before = projects.len();
        projects.retain(|name, p| {
            let idle = p.peers.load(Ordering::SeqCst) == 0
                && p.left.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= self.idle
                && !p.session.busy();
            if idle {
                info!(project = name, "exec session idle; closing it");
                p.session.close();
                p.stop.cancel();
            }
            !idle
        });
        before - projects.len()
    }

    /// Releases what the sandbox holds for projects idle for `idle` (Docker containers).
    pub async fn stop_idle_sandboxes(&self, idle: Duration) {
        if let Some(sandbox) = &self.sandbox {
            match sandbox.stop_idle(idle).await {
                Ok(0) => {}
                Ok(n) => info!(stopped = n, "stopped idle sandboxes"),
                Err(e) => warn!(error = %e, "stopping idle sandboxes failed"),
            }
        }
    }

    /// Closes every session (runs and terminals end).
    pub fn close_all(&self) {
        let projects = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        for p in projects.values() {
            p.session.close();
            p.stop.cancel();
        }
    }
}

struct PeerGuard {
    project: Arc<ProjectExec>,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        *self.project.left.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.project.peers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The states of a project's documents as this node holds them.
struct RoomsBarrier {
    rooms: Rooms,
    project: String,
}

#[async_trait::async_trait]
impl RunBarrier for RoomsBarrier {
    async fn states(&self) -> Vec<(String, StateVector)> {
        let mut states = Vec::new();
        let Ok(root_name) = DocName::parse(&self.project) else { return states };
        let Ok(root) = project::snapshot(&self.rooms, &root_name).await else { return states };
        let ids: Vec<String> = {
            let txn = root.transact();
            states.push((self.project.clone(), txn.state_vector()));
            tree::entries(&txn).into_iter().filter(|e| e.kind == tree::EntryKind::File).map(|e| e.id).collect()
        };
        for id in ids {
            let name = tree::file_doc_name(&self.project, &id);
            let Ok(doc_name) = DocName::parse(&name) else { continue };
            if let Ok(doc) = project::snapshot(&self.rooms, &doc_name).await {
                let sv = doc.transact().state_vector();
                states.push((name, sv));
            }
        }
        states
    }
}

fn lease_key(project: &str) -> String {
    format!("collab:exec-owner:{project}")
}

/// Renews the project's lease every third of `ttl` while the session lives, and gives it up when
/// the session stops. A lease taken by another node, or not renewed for a whole `ttl` (Redis
/// unreachable: another node may take it once it expires), closes the session: two bridges never
/// run one project's sandbox at once.
async fn keep_lease(bus: Bus, project: String, ttl: Duration, session: Arc<Session>, stop: CancellationToken) {
    let key = lease_key(&project);
    let mut renewed = Instant::now();
    let closed = session.closed();
    let mut tick = tokio::time::interval(ttl / 3);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
            _ = closed.cancelled() => break,
        }
        match bus.hold_lease(&key, ttl).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                warn!(project, "another node took this project's sandbox lease; closing the session here");
                break;
            }
            Err(e) if renewed.elapsed() >= ttl => {
                warn!(project, error = %e, "could not renew the sandbox lease in time; closing the session");
                break;
            }
            Err(_) => {}
        }
    }
    session.close();
    stop.cancel();
    let _ = bus.release_lease(&key).await;
}

/// The bridge peer of one project: mirrors its documents into the workspace, reconnecting with
/// the same mirror until stopped.
struct BridgeLink {
    server: String,
    project: String,
    keys: Keys,
    workspace: PathBuf,
}

impl BridgeLink {
    async fn run(
        self,
        mut prepare: mpsc::Receiver<peer::PrepareRequest>,
        stop: CancellationToken,
        sandbox: Arc<dyn Sandbox>,
    ) {
        if let Err(e) = std::fs::create_dir_all(&self.workspace) {
            warn!(error = %e, workspace = %self.workspace.display(), "cannot create the workspace");
            return;
        }
        // The warm start: the sandbox gets ready while the mirror writes the files.
        let workspace = self.workspace.clone();
        tokio::spawn(async move {
            if let Err(e) = sandbox.warm(&workspace).await {
                warn!(error = %e, "warming the sandbox failed; the first run will start it");
            }
        });
        let identity = Identity {
            user: BRIDGE_USER.to_owned(),
            name: BRIDGE_NAME.to_owned(),
            project: self.project.clone(),
            role: Role::Editor,
        };
        let mut mirror = Mirror::new();
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let token = match self.keys.sign(&identity, Duration::from_secs(24 * 3600)) {
                Ok(token) => token,
                Err(e) => {
                    warn!(error = %e, "cannot sign the bridge's token");
                    return;
                }
            };
            let mut config = BridgeConfig::new(&self.server, &self.project, &token, self.workspace.clone());
            config.display_name = BRIDGE_NAME.to_owned();
            match peer::run_serving(config, &mut mirror, stop.clone(), &mut prepare).await {
                Ok(()) => return,
                Err(e) => {
                    warn!(project = self.project, error = %e, retry_in = ?backoff, "bridge peer stopped; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Serves one exec peer until it leaves, is too slow, or the server shuts down.
pub async fn serve_peer(socket: WebSocket, hub: Arc<ExecHub>, identity: Identity, shutdown: CancellationToken) {
    let (tx, mut rx) = socket.split();
    let mut tx = Outbox { sink: tx, timeout: hub.send_timeout };
    let (session, _guard) = match hub.join(&identity.project).await {
        Ok(joined) => joined,
        Err(e) => {
            let _ = tx.send(&ServerMsg::Error { message: e.to_string() }).await;
            let code = if matches!(e, ExecError::Disabled) { 1011 } else { 1013 };
            let _ = tx.close(close_msg(code, "exec unavailable here; try again")).await;
            return;
        }
    };
    let session_closed = session.closed();
    let actor = Actor { name: identity.name.clone(), role: identity.role };
    let (hello, mut events) = session.subscribe(identity.role);
    if tx.send(&hello).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            frame = rx.next() => {
                let reply = match frame {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientMsg>(&text) {
                        Ok(msg) => session.handle(&actor, msg).await.err().map(|r| r.0),
                        Err(e) => Some(format!("not a valid exec message: {e}")),
                    },
                    Some(Ok(Message::Binary(_))) => Some("exec messages are JSON text frames".to_owned()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                if let Some(message) = reply
                    && tx.send(&ServerMsg::Error { message }).await.is_err()
                {
                    return;
                }
            }
            event = events.recv() => match event {
                Ok(msg) => {
                    if tx.send(&msg).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    info!(user_id = identity.user, "exec peer too slow; disconnecting it");
                    let _ = tx.close(close_msg(1013, "too slow: reconnect for a fresh copy")).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.cancelled() => {
                let _ = tx.close(close_msg(1001, "server shutting down")).await;
                return;
            }
            _ = session_closed.cancelled() => {
                let _ = tx.close(close_msg(1013, "this project's sandbox closed here; reconnect")).await;
                return;
            }
        }
    }
}

/// The sending half of a peer's socket, where every send has a deadline.
struct Outbox {
    sink: futures_util::stream::SplitSink<WebSocket, Message>,
    timeout: Duration,
}

impl Outbox {
    /// Sends one message; a peer that does not take it within the timeout fails the send.
    async fn send(&mut self, msg: &ServerMsg) -> Result<(), ()> {
        let text = serde_json::to_string(msg).map_err(|_| ())?;
        match tokio::time::timeout(self.timeout, self.sink.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Sends a close frame if the peer takes it soon; the socket is dropped after either way.
    async fn close(&mut self, frame: Message) -> Result<(), ()> {
        match tokio::time::timeout(CLOSE_TIMEOUT, self.sink.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }
}

fn close_msg(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}
