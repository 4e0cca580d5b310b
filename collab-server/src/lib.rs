//! The collaboration server: y-websocket and Hocuspocus compatible sync over WebSockets, with
//! documents persisted through `doc-store`. The binary `collab` is a thin shell over [`start`].

pub mod archive;
pub mod auth;
pub mod checkpoints;
pub mod close;
pub mod config;
pub mod demo;
pub mod edge;
pub mod exec;
pub mod metrics;
pub mod project;
pub mod sync;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use config::Config;

use crate::auth::Keys;
use crate::metrics::Metrics;
use crate::sync::rooms::{RoomEnv, Rooms};
use crate::sync::{bus, commit};

/// Everything a connection needs, shared by all of them.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub keys: Keys,
    pub rooms: Rooms,
    pub exec: Arc<exec::ExecHub>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    next_peer: AtomicU64,
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<AppState>,
    serve: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Closes every connection, flushes every document to the store and waits for both.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.app.shutdown.cancel();
        self.app.tracker.close();
        self.app.tracker.wait().await;
        self.serve.await??;
        Ok(())
    }

    /// Waits until the server stops (after a shutdown signal).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.app.shutdown.cancelled().await;
        self.shutdown().await
    }
}

/// The store URL for a config: the explicit one, or SQLite in the data directory.
pub fn store_url(config: &Config) -> String {
    match &config.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", config.data_dir.join("collab.sqlite3").display()),
    }
}

/// Opens the store, binds the listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let keys = Keys::load_or_create(&config.data_dir)?;
    let store = doc_store::open_store(&store_url(&config)).await.context("opening the document store")?;
    if config.demo {
        demo::seed(store.as_ref()).await.context("creating the demo project")?;
    }
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let metrics = Arc::new(Metrics::new());
    let committer = commit::Committer::start(
        store.clone(),
        metrics.clone(),
        config.limits.commit_interval,
        config.limits.commit_batch,
    );
    let bus = match &config.redis_url {
        Some(url) => Some(bus::Bus::start(url, metrics.clone(), shutdown.clone(), &tracker).context("--redis-url")?),
        None => None,
    };
    let lease = bus.clone().map(|bus| (bus, config.exec_lease));
    let env = RoomEnv {
        bus,
        committer,
        store,
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    };
    let sandbox = open_sandbox(config.sandbox).await?;
    let workspaces = config.workspaces_dir.clone().unwrap_or_else(|| config.data_dir.join("workspaces"));
    let exec = Arc::new(exec::ExecHub::new(
        sandbox,
        workspaces,
        keys.clone(),
        (config.exec_idle, config.exec_send_timeout),
        lease,
        shutdown.clone(),
    ));
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let app = Arc::new(AppState {
        keys,
        rooms: Rooms::new(env),
        exec,
        metrics,
        shutdown: shutdown.clone(),
        tracker,
        next_peer: AtomicU64::new(1),
        config,
    });
    app.exec.set_listening(addr);
    app.exec.set_rooms(app.rooms.clone());
    if app.exec.enabled() {
        app.tracker.spawn(sweep_exec(app.clone()));
    }
    if !app.config.auto_checkpoint_interval.is_zero() {
        app.tracker.spawn(auto_checkpoints(app.clone()));
    }
    let router = edge::router(app.clone());
    let l = &app.config.limits;
    let conn_limits = edge::listen::ConnLimits::new(l.max_connections_per_ip, l.max_connections, l.header_timeout);
    let serve = tokio::spawn(edge::listen::serve(listener, router, conn_limits, shutdown.clone()));
    info!(%addr, "listening");
    Ok(Running { addr, app, serve })
}

/// The sandbox `kind` names; a sandbox that cannot work here is an error at startup.
async fn open_sandbox(kind: exec::SandboxKind) -> anyhow::Result<Option<Arc<dyn exec_bridge::sandbox::Sandbox>>> {
    use exec_bridge::sandbox::{docker, local};
    Ok(match kind {
        exec::SandboxKind::None => None,
        exec::SandboxKind::Local => {
            Some(Arc::new(local::LocalSandbox::new(local::LocalSandboxConfig::default()).context("--sandbox local")?))
        }
        exec::SandboxKind::Docker => Some(Arc::new(
            docker::DockerSandbox::connect(docker::DockerSandboxConfig::default()).await.context("--sandbox docker")?,
        )),
    })
}

/// Closes idle exec sessions now and then, and every session at shutdown.
async fn sweep_exec(app: Arc<AppState>) {
    let every = (app.config.exec_idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                app.exec.sweep();
                app.exec.stop_idle_sandboxes(app.config.sandbox_idle).await;
            }
            _ = app.shutdown.cancelled() => {
                app.exec.close_all();
                return;
            }
        }
    }
}

/// Checkpoints every project that saved changes during the last interval, then prunes the
/// automatic checkpoints past the retention count.
async fn auto_checkpoints(app: Arc<AppState>) {
    let mut tick = tokio::time::interval(app.config.auto_checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for project in app.rooms.take_active_projects() {
            let name = format!("{}after activity", checkpoints::AUTO_PREFIX);
            let made = checkpoints::create(&app.rooms, &project, &name, "server").await;
            let pruned = match made {
                Ok(_) => checkpoints::prune_automatic(&app.rooms, &project, app.config.auto_checkpoints_kept).await,
                Err(e) => Err(e),
            };
            if let Err(e) = pruned {
                tracing::warn!(project = %project, error = %e, "automatic checkpoint failed");
            }
        }
    }
}
