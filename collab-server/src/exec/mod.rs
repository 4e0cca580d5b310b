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

mod bridge;
mod lease;
mod socket;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use exec_bridge::sandbox::{PortStream, Sandbox};
use exec_bridge::session::{Session, SessionConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::bridge::{BridgeLink, RoomsBarrier};
use self::lease::{Lease, keep_lease, lease_key};
pub use self::socket::serve_peer;
use crate::auth::Keys;
pub use crate::config::SandboxKind;
use crate::sync::bus::Leases;
use crate::sync::rooms::Rooms;
use crate::tasks::Tasks;

/// The user id and name the node's bridge peers join projects as.
pub const BRIDGE_USER: &str = "exec-bridge";
pub const BRIDGE_NAME: &str = "Run bridge";
/// Largest message an exec peer may send (keystrokes and stdin come in small pieces).
pub const MAX_MESSAGE: usize = 64 << 10;

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
    lease: Option<(Leases, Duration)>,
    /// The node's documents, which a run waits for the bridge to catch up with.
    rooms: Rooms,
    tasks: Tasks,
    /// Exec sockets one user may have open on this node at once.
    sockets_per_user: usize,
    /// Open exec sockets per user id on this node.
    sockets: Mutex<HashMap<String, usize>>,
    /// A peer's liveness: pinged every `ping_interval`, closed after `idle_timeout` without a
    /// frame.
    ping_interval: Duration,
    idle_timeout: Duration,
}

/// How a node's exec hub is set up.
pub struct HubConfig {
    /// `None`: runs and terminals are off.
    pub sandbox: Option<Arc<dyn Sandbox>>,
    pub workspaces: PathBuf,
    /// How long a session without peers and runs stays.
    pub idle: Duration,
    /// How long one send to a peer may take.
    pub send_timeout: Duration,
    /// With a cluster bus: the node's leases and their time to live.
    pub lease: Option<(Leases, Duration)>,
    /// Exec sockets one user may have open on this node at once (`--exec-sockets-per-user`).
    pub sockets_per_user: usize,
    /// How often a peer is pinged (`--ping-interval`).
    pub ping_interval: Duration,
    /// How long a peer may send no frame before it is closed (`--idle-timeout`).
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for ExecHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHub")
            .field("workspaces", &self.workspaces)
            .field("enabled", &self.sandbox.is_some())
            .finish()
    }
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig").field("workspaces", &self.workspaces).finish_non_exhaustive()
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
    #[error("this project's workspace could not be created on the server, so runs and terminals cannot start")]
    Workspace,
    #[error("too many exec connections for this user on this server: close one first")]
    TooManySockets,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecPortError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Sandbox(#[from] exec_bridge::sandbox::SandboxError),
}

impl ExecHub {
    pub fn new(config: HubConfig, keys: Keys, rooms: Rooms, tasks: Tasks) -> ExecHub {
        let HubConfig { sandbox, workspaces, idle, send_timeout, lease, sockets_per_user, ping_interval, idle_timeout } =
            config;
        ExecHub {
            sandbox,
            workspaces,
            keys,
            server: OnceLock::new(),
            projects: Mutex::default(),
            idle,
            send_timeout,
            lease,
            rooms,
            tasks,
            sockets_per_user,
            sockets: Mutex::default(),
            ping_interval,
            idle_timeout,
        }
    }

    /// Records the node's own address, which bridge peers connect to.
    pub fn set_listening(&self, addr: std::net::SocketAddr) {
        let _ = self.server.set(format!("ws://{addr}"));
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
        // The lease lasts `ttl` from when Redis took it: at the latest, from now.
        let held_at = Instant::now();
        if let Some((bus, ttl)) = &self.lease {
            match bus.hold_lease(&lease_key(project), *ttl).await {
                Ok(true) => {}
                Ok(false) => return Err(ExecError::OwnedElsewhere),
                Err(_) => return Err(ExecError::BusDown),
            }
        }
        // Before the session (and only on the node that holds the lease): a bridge without a
        // workspace could only fail every run after a timeout, where this fails the peer at
        // once with a message it can show.
        let workspace = self.workspace(project);
        let dir = workspace.clone();
        let created = self.tasks.blocking("create workspace", move || std::fs::create_dir_all(&dir)).await;
        if !matches!(created, Ok(Ok(()))) {
            if let Ok(Err(e)) = &created {
                warn!(project, error = %e, workspace = %workspace.display(), "cannot create the workspace");
            }
            if let Some((bus, ttl)) = &self.lease {
                let _ = tokio::time::timeout(*ttl / 4, bus.release_lease(&lease_key(project))).await;
            }
            return Err(ExecError::Workspace);
        }
        let mut projects = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        let entry = projects.entry(project.to_owned()).or_insert_with(|| {
            let (prepare_tx, prepare_rx) = mpsc::channel(8);
            let sandbox_for_warm = sandbox.clone();
            let mut config = SessionConfig::new(sandbox, workspace.clone());
            config.barrier = Some(Arc::new(RoomsBarrier { rooms: self.rooms.clone(), project: project.to_owned() }));
            let session = Session::new(config, prepare_tx);
            let stop = self.tasks.shutdown().child_token();
            let bridge = BridgeLink {
                server,
                project: project.to_owned(),
                keys: self.keys.clone(),
                workspace,
                tasks: self.tasks.clone(),
            };
            self.tasks.spawn("exec bridge", bridge.run(prepare_rx, stop.clone(), sandbox_for_warm));
            if let Some((bus, ttl)) = &self.lease {
                let lease = Lease { bus: bus.clone(), key: lease_key(project), ttl: *ttl };
                self.tasks.spawn("exec lease", keep_lease(lease, held_at, session.clone(), stop.clone()));
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

    /// Counts one more exec socket of `user`; `None` when the user has as many open as allowed.
    fn open_socket(self: &Arc<Self>, user: &str) -> Option<SocketGuard> {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let open = sockets.entry(user.to_owned()).or_default();
        if *open >= self.sockets_per_user {
            return None;
        }
        *open += 1;
        Some(SocketGuard { hub: self.clone(), user: user.to_owned() })
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

/// One open exec socket of a user, counted until it drops.
struct SocketGuard {
    hub: Arc<ExecHub>,
    user: String,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let mut sockets = self.hub.sockets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = sockets.get_mut(&self.user) {
            *open -= 1;
            if *open == 0 {
                sockets.remove(&self.user);
            }
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
