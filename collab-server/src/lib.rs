//! The collaboration server: y-websocket and Hocuspocus compatible sync over WebSockets, with
//! documents persisted through `doc-store`. The binary `collab` is a thin shell over [`start`].
//!
//! # Layers
//!
//! The modules form layers, lowest first. A module uses its own layer and the layers below it,
//! never one above: a lower layer that must reach up takes a callback or a channel instead (the
//! bus delivers into any inbox type, rooms know connections only by their sink).
//! `xtask/tests/tidy.rs` reads this list and checks every `crate::`, `super::` and `self::` path
//! of every file against it; a new module must be placed in it.
//!
//! - layer: `config` `metrics` `close` `archive` `tasks` (shared leaves: flags, metrics, close
//!   codes, archive codecs, supervised tasks)
//! - layer: `auth` `demo` (tokens and the access check; the demo seed, straight into the store)
//! - layer: `sync::sink` `sync::commit` `sync::bus` (a connection's outbound queue, the group
//!   committer, the cluster bus)
//! - layer: `sync::rooms` (the registry of loaded documents and their actors)
//! - layer: `sync::conn` (connections: read and write loops, the two endpoint handlers)
//! - layer: `project` `checkpoints` (services: whole-project reads and writes, versions)
//! - layer: `exec` (runs and terminals: the hub, sandbox leases, the bridge peer, exec sockets)
//! - layer: `edge` (HTTP: the router, access extractors, API handlers, upgrades, previews)
//!
//! The crate root (this file) assembles them all in [`start`].

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
pub mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::info;

pub use config::Config;
pub use edge::AppState;

use crate::auth::{Authorizer, Keys};
use crate::metrics::Metrics;
use crate::sync::conn::Connections;
use crate::sync::rooms::{RoomBus, RoomEnv, Rooms};
use crate::sync::{bus, commit};
use crate::tasks::Tasks;

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
        self.app.tasks.wait().await;
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
    let metrics = Arc::new(Metrics::new());
    let tasks = Tasks::new(metrics.clone());
    let shutdown = tasks.shutdown().clone();
    let commit = (config.limits.commit_interval, config.limits.commit_batch);
    let committer = commit::Committer::start(store.clone(), metrics.clone(), commit, &tasks);
    let bus: Option<RoomBus> = match &config.redis_url {
        Some(url) => Some(bus::Bus::start(url, metrics.clone(), &tasks).context("--redis-url")?),
        None => None,
    };
    let lease = bus.as_ref().map(|bus| (bus.leases(), config.exec_lease));
    let env = RoomEnv {
        bus,
        committer,
        store,
        metrics: metrics.clone(),
        limits: config.limits.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    };
    let rooms = Rooms::new(env);
    let sandbox = open_sandbox(config.sandbox).await?;
    let workspaces = config.workspaces_dir.clone().unwrap_or_else(|| config.data_dir.join("workspaces"));
    if let Some(sandbox) = &sandbox {
        // Said now rather than by every run: e.g. a data directory of mode 0700 that the local
        // sandbox's uid cannot reach its workspaces through.
        std::fs::create_dir_all(&workspaces)
            .with_context(|| format!("creating the workspaces folder {}", workspaces.display()))?;
        sandbox.check_reachable(&workspaces).context("--sandbox: the workspaces folder cannot be used")?;
    }
    let exec = Arc::new(exec::ExecHub::new(
        exec::HubConfig {
            sandbox,
            workspaces,
            idle: config.exec_idle,
            send_timeout: config.exec_send_timeout,
            lease,
            sockets_per_user: config.exec_sockets_per_user,
            ping_interval: config.limits.ping_interval,
            idle_timeout: config.limits.idle_timeout,
        },
        keys.clone(),
        rooms.clone(),
        tasks.clone(),
    ));
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let auth = Authorizer { keys: keys.clone(), allow_anonymous: config.allow_anonymous };
    let sync =
        Arc::new(Connections::new(config.limits.clone(), metrics.clone(), rooms.clone(), auth.clone(), tasks.clone()));
    let preview = edge::preview::bind(&config).await?;
    let app = Arc::new(AppState {
        keys,
        auth,
        rooms,
        sync,
        exec,
        metrics,
        tasks: tasks.clone(),
        shutdown: shutdown.clone(),
        preview: preview.as_ref().map(|(_, origin)| origin.clone()),
        config,
    });
    if let Some((listener, origin)) = preview {
        info!(addr = %origin.addr, url = %origin.url, "serving previews");
        tasks.spawn("preview listener", edge::preview::serve(listener, app.clone()));
    }
    app.exec.set_listening(addr);
    if app.exec.enabled() {
        tasks.spawn("exec sweep", sweep_exec(app.clone()));
    }
    if !app.config.auto_checkpoint_interval.is_zero() {
        tasks.spawn("automatic checkpoints", auto_checkpoints(app.clone()));
    }
    let router = edge::router(app.clone());
    let l = &app.config.limits;
    let conn_limits = edge::listen::ConnLimits::new(l.max_connections_per_ip, l.max_connections, l.header_timeout);
    let serve_tasks = tasks.clone();
    // Under the tracker like every task; its result also reaches `Running::shutdown` (a panic
    // there is a `JoinError`), so it is not wrapped by `Tasks::spawn`.
    let serve = tasks.tracker().spawn(async move {
        let served = edge::listen::serve(listener, router, conn_limits, shutdown.clone()).await;
        if let Err(e) = &served {
            serve_tasks.failed("listener", e);
        }
        served
    });
    info!(%addr, "listening");
    Ok(Running { addr, app, serve })
}

/// The sandbox `kind` names; a sandbox that cannot work here is an error at startup.
async fn open_sandbox(kind: config::SandboxKind) -> anyhow::Result<Option<Arc<dyn exec_bridge::sandbox::Sandbox>>> {
    use exec_bridge::sandbox::{docker, local};
    Ok(match kind {
        config::SandboxKind::None => None,
        config::SandboxKind::Local => {
            Some(Arc::new(local::LocalSandbox::new(local::LocalSandboxConfig::default()).context("--sandbox local")?))
        }
        config::SandboxKind::Docker => Some(Arc::new(
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
