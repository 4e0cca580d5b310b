//! The Docker sandbox: one long-lived container per project, each run executed in it through
//! the exec API, with the limits, verdicts and isolation of the bubblewrap sandbox.
//!
//! # The project container
//!
//! Created on a project's first run from a runtime image (built from Debian packages by
//! `cargo xtask images`, never pulled), kept running, reused by every later run; its runner is
//! started when the project is prepared ([`Sandbox::warm`]) or after its first run:
//!
//! ```text
//! network_mode none, read-only root, tmpfs /tmp, WORKSPACE bound at /workspace,
//! a per-project report folder bound at /.exec-bridge-reports,
//! cap_drop ALL, security_opt no-new-privileges, user nobody (65534) for `sleep infinity`,
//! memory = memory+swap, nano_cpus, pids_limit, ulimits nofile/fsize/core=0, init (tini)
//! ```
//!
//! # A run
//!
//! ```text
//! through the project's resident runner (see `sandbox::runner`), one Unix-socket connection:
//!   prlimit --as=.. --cpu=C:C+1 --fsize=.. --nproc=.. --core=0 --
//!     time -o /.exec-bridge-reports/run-N -f '%x %U %S %M' -- PROGRAM ARGS..
//!   then, in the runner, kill(-1, SIGKILL) (every process of the uid but the runner itself)
//! or, when the runner is not available, an exec as PROJECT_ID:PROJECT_ID in /workspace:
//!   sh -c '"$@"; s=$?; kill -KILL -1; exit $s' sh  prlimit .. -- time .. -- PROGRAM ARGS..
//! ```
//!
//! * **The resident runner** is a small Python process (`runner.py`, its code passed on its
//!   command line) that the bridge starts once per container, as a detached exec of the
//!   project's uid, in a turn of the project; it listens on `runner.sock` in the report
//!   folder. A run through it costs no Docker API round trip (about 12 ms to the first byte of
//!   a Python hello-world here, against about 70 for an exec). It runs as the project's uid
//!   (with `cap_drop ALL` and `no-new-privileges` nothing else can start a run's processes), so
//!   it does the kill after a run itself: `kill(-1)` spares its caller. Whenever it fails to
//!   answer, dies during a run, or does not report a killed run's end within
//!   [`RUNNER_KILL_GRACE`], the bridge kills the uid's processes through the engine (the runner
//!   with them), and starts a runner again at the end of that run's turn; runs in between are
//!   execs. What the bridge trusts it with is in `sandbox::runner`.
//! * **A uid per project.** Runs execute as a uid derived from the workspace path (no passwd
//!   entry needed), not as the container's user. Docker uses no user namespace, so
//!   `RLIMIT_NPROC` counts a uid's processes across the whole host: a uid per project makes
//!   the process limit this project's own, and a fork bomb in one project cannot starve the
//!   runs of another. The container's own `sleep` runs as `nobody`, so it survives the kills.
//! * **One run at a time per project.** A run holds its project's lock until it has ended and
//!   every process it left behind is dead; the next run of the same project waits. This is
//!   what makes "kill every process of the project's uid" exactly "kill this run": `kill -1`
//!   reaches processes that changed session or process group, which a group kill misses.
//! * **Leftovers die with the run.** The runner (or the `sh` wrapper) kills every process of
//!   the uid once the program ends (as bubblewrap's pid namespace does), so a background child cannot keep the
//!   output open or outlive the run. `/tmp` and `/dev/shm` do outlive a run: they belong to
//!   the project's container and vanish with it.
//! * **Wall time and output** are enforced by the bridge, which then closes its half of the
//!   runner's connection (the runner kills), or executes `sh -c 'kill -KILL -1'` as the
//!   project's uid. The container's pids limit, set above the run's process limit, leaves room
//!   for that exec even while a fork bomb is going off.
//! * **CPU time and file size** are rlimits set by `prlimit`; **memory** is bounded twice: the
//!   run's `RLIMIT_AS` (as in the local sandbox) and the container's cgroup limit (memory equal
//!   to memory+swap) for the project as a whole.
//!
//! # A terminal
//!
//! ```text
//! a container of its own, like the project's but: network_mode container:PROJECT_CONTAINER,
//! no report folder, tty, open stdin (closed when the bridge's attachment goes: stdin_once),
//! log driver none, user PROJECT_ID:PROJECT_ID, TERM=xterm-256color, auto-removed;
//!   prlimit --as=.. --cpu=.. --fsize=.. --nproc=.. --core=0 -- /bin/bash
//! ```
//!
//! * **A container, not an exec in the project's container.** A run's end kills every process
//!   of the project's uid in the project container (see above), which would take an open
//!   terminal with it; and a terminal's own processes can leave its session and process group,
//!   so no kill inside a shared container would be exact. A container per terminal has its own
//!   pid namespace: runs cannot reach it, and removing it ends exactly the terminal's
//!   processes. It shares the project container's network namespace (still loopback only), so
//!   the terminal reaches a server a run started and a preview reaches a server started in the
//!   terminal. It costs a container start (a terminal opened in about 130 ms here, where a
//!   run's exec of `true` took 80) and its own memory, CPU and pids budget of
//!   [`DockerSandboxConfig`]; `RLIMIT_NPROC` counts the project's uid across the host, so runs
//!   and terminals of a project share the process limit.
//! * **The raw stream.** The bridge attaches to the container over a connection of its own to
//!   the engine's Unix socket and reads the tty's bytes as they are: bollard's attach decodes
//!   the stream as Docker's multiplexed frames whenever a read starts with a byte below 3, which
//!   a tty's output can do (`printf '\1'`), and would then buffer a "frame" of up to 4 GiB.
//!   Chunks of at most [`TERM_CHUNK`] go to the bounded output channel; when it is full the
//!   bridge stops reading, the socket, the engine's copy and the pty fill, and the terminal's
//!   programs block writing. No log driver keeps a copy.
//! * **Kill on drop** is the removal of the container (SIGKILL to all it runs). A project with
//!   an open terminal is never stopped as idle.
//!
//! # Previews
//!
//! The project container keeps `network_mode none`. [`Sandbox::connect_port`] connects to a
//! listening port from inside the project container's network namespace (that of its init,
//! as the engine reports it, checked again after the namespace is opened), the way the local
//! sandbox does; see `sandbox::netns`. This needs the bridge on the Docker host, in its pid
//! namespace, as root. A Docker network with `internal: true` was the alternative, and fails
//! here: with the engine run as `cargo xtask` runs it (`--iptables=false`), a container on such
//! a network reached the host's own addresses (any service listening on all of them) and the
//! other projects' containers, whatever `enable_icc` said, since both rules are iptables rules.
//!
//! # Telling the limits apart
//!
//! As in [`super::local`], from GNU `time`'s report, plus Docker's own OOM information: a run
//! killed by SIGKILL while Docker reported an `oom` event for the container is
//! [`Verdict::MemoryLimit`], whatever its peak resident size.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, ResourcesUlimits};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    ResizeContainerTTYOptionsBuilder, WaitContainerOptionsBuilder,
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, OwnedMutexGuard, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::local::{TERM, WORKSPACE_MOUNT, give_workspace, judge};
use super::{
    EVENT_QUEUE, Execution, Forwarded, OutputBudget, PortStream, RESIZE_QUEUE, STDIN_QUEUE, Sandbox, SandboxCommand,
    SandboxError, TERM_CHUNK, TERM_QUEUE, TermSize, Terminal, netns, runner,
};
use crate::run::{Limits, RunEvent, Stream as OutputStream, TimeLimit, Verdict};

/// The runtime image `cargo xtask images` builds: python3, gcc, g++, Node.js and GNU time on Debian
/// bookworm. (xtask names it too; the two must agree.)
pub const DEFAULT_IMAGE: &str = "collab-runtime:2";

/// The label every project and terminal container carries, holding its workspace path on the host.
pub const WORKSPACE_LABEL: &str = "dev.collab.exec-bridge.workspace";
/// The label of a terminal's container, holding the name of its project's container.
pub const TERMINAL_LABEL: &str = "dev.collab.exec-bridge.terminal-of";

const REPORT_MOUNT: &str = "/.exec-bridge-reports";
const CONTAINER_PREFIX: &str = "collab-sandbox-";
/// The container's own user (`nobody`), which runs only the idle `sleep`.
const KEEPER_USER: &str = "65534:65534";
/// Project uids are `PROJECT_ID_BASE + hash(workspace) % PROJECT_ID_SPAN`: above the local
/// sandbox's id, below 2^31.
const PROJECT_ID_BASE: u32 = 2_100_000_000;
const PROJECT_ID_SPAN: u64 = 40_000_000;
const PRLIMIT: &str = "/usr/bin/prlimit";
const TIME: &str = "/usr/bin/time";
const PYTHON: &str = "/usr/bin/python3";
/// Longest wait for a newly started runner to listen.
const RUNNER_PATIENCE: Duration = Duration::from_secs(5);
/// Longest wait for the runner to report a run it was told to kill as ended.
const RUNNER_KILL_GRACE: Duration = Duration::from_secs(2);
/// Failed starts of a project's runner in a row after which its runs keep to the engine.
const RUNNER_ATTEMPTS: u32 = 3;
const HINT: &str = "`cargo xtask test` starts dockerd and builds the runtime images";
const SIGKILL: i32 = 9;
/// How long a SIGKILLed run waits for Docker's `oom` event, which may trail the exit.
const OOM_GRACE: Duration = Duration::from_millis(500);
const ENV: &[&str] =
    &["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/workspace", "LANG=C.UTF-8", "TMPDIR=/tmp", "PYTHONUNBUFFERED=1"];
/// The engine's socket when `DOCKER_HOST` names none (as bollard's local defaults).
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Longest wait for the engine's answer to an attach request.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest answer header to an attach request.
const ATTACH_HEAD_LIMIT: usize = 16 << 10;

/// Configuration of [`DockerSandbox`]: the image and the limits of each project's container
/// (a run's own limits come with the run, in [`Limits`]).
#[derive(Debug, Clone)]
pub struct DockerSandboxConfig {
    /// The runtime image, which must exist already (it is built, never pulled).
    pub image: String,
    /// Memory of the whole container, also its memory+swap (so no swap).
    pub memory_bytes: u64,
    /// CPU quota of the container, in thousandths of a CPU.
    pub cpu_millis: u32,
    /// Processes and threads in the container at once. Keep it well above a run's
    /// [`Limits::processes`]: the bridge needs room to start its kill.
    pub pids: u32,
    /// Size of the container's `/tmp`.
    pub tmp_bytes: u64,
    /// `ulimit -f` of the whole container; a run's own limit can only be lower.
    pub file_size_bytes: u64,
    /// `ulimit -n` of the whole container.
    pub open_files: u64,
    /// Where the per-project report folders are created on the host (outside every workspace).
    pub scratch_dir: PathBuf,
}

impl Default for DockerSandboxConfig {
    fn default() -> Self {
        DockerSandboxConfig {
            image: DEFAULT_IMAGE.to_owned(),
            memory_bytes: 1 << 30,
            cpu_millis: 1000,
            pids: 256,
            tmp_bytes: 64 << 20,
            file_size_bytes: 64 << 20,
            open_files: 1024,
            scratch_dir: std::env::temp_dir(),
        }
    }
}

/// Runs commands in per-project Docker containers; see the module documentation.
pub struct DockerSandbox {
    docker: Docker,
    config: DockerSandboxConfig,
    /// Projects by canonical workspace path. An async lock: creating a container awaits.
    projects: Mutex<HashMap<PathBuf, Arc<Project>>>,
    runs: AtomicU64,
    /// Runs started through a project's resident runner rather than an exec.
    runner_runs: AtomicU64,
    /// The engine's Unix socket, for attaching to terminals (see the module documentation).
    socket: PathBuf,
    terminals: AtomicU64,
}

impl std::fmt::Debug for DockerSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerSandbox").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A project's running container.
struct Project {
    container: String,
    id: u32,
    /// Bound at [`REPORT_MOUNT`]; removed with the project.
    reports: tempfile::TempDir,
    /// Held by the project's run from start to the death of its last process.
    run_lock: Arc<Mutex<()>>,
    /// When the project's last run ended (or its container started).
    last_used: Arc<std::sync::Mutex<std::time::Instant>>,
    /// Set by [`DockerSandbox::stop_idle`] as it removes the container: a run that was waiting
    /// for its turn starts over on a new container.
    retired: AtomicBool,
    /// The containers of the project's open terminals. Its lock also orders a terminal's
    /// opening against [`DockerSandbox::stop_idle`] retiring the project.
    terminals: std::sync::Mutex<HashSet<String>>,
    /// The resident runner, while it is believed alive; changed only during a turn.
    runner: std::sync::Mutex<Option<runner::RunnerAddr>>,
    /// Failed starts of the runner in a row.
    runner_failures: AtomicU32,
}

impl Project {
    fn terminals(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.terminals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn runner(&self) -> Option<runner::RunnerAddr> {
        self.runner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_runner(&self, addr: Option<runner::RunnerAddr>) {
        *self.runner.lock().unwrap_or_else(|e| e.into_inner()) = addr;
    }
}

/// A terminal's place in its project, given up when dropped: the project counts as used until
/// then and is not stopped as idle.
struct TerminalSlot {
    project: Arc<Project>,
    container: String,
}

impl Drop for TerminalSlot {
    fn drop(&mut self) {
        self.project.terminals().remove(&self.container);
        *self.project.last_used.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }
}

/// A project's turn to run, from a run's start to the death of its last process; the project
/// counts as used until the turn ends.
struct Turn {
    _guard: OwnedMutexGuard<()>,
    last_used: Arc<std::sync::Mutex<std::time::Instant>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }
}

fn engine(err: bollard::errors::Error) -> SandboxError {
    SandboxError::Engine(Box::new(err))
}

impl DockerSandbox {
    /// Connects to the local Docker engine (`DOCKER_HOST` or `/var/run/docker.sock`) and checks
    /// that the runtime image exists.
    pub async fn connect(config: DockerSandboxConfig) -> Result<Self, SandboxError> {
        let unavailable =
            |err: bollard::errors::Error| SandboxError::EngineUnavailable { hint: HINT, source: Box::new(err) };
        let docker = Docker::connect_with_local_defaults().map_err(unavailable)?;
        let docker = docker.negotiate_version().await.map_err(unavailable)?;
        docker.ping().await.map_err(unavailable)?;
        if docker.inspect_image(&config.image).await.is_err() {
            return Err(SandboxError::ImageMissing { image: config.image.clone(), hint: HINT });
        }
        // As bollard's `connect_with_local_defaults` chooses it.
        let socket = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|host| host.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        Ok(DockerSandbox {
            docker,
            config,
            projects: Mutex::new(HashMap::new()),
            runs: AtomicU64::new(0),
            runner_runs: AtomicU64::new(0),
            socket,
            terminals: AtomicU64::new(0),
        })
    }

    /// The engine client, e.g. for inspecting a project's container.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The name of the container that runs `workspace`'s commands (whether it exists yet or not).
    pub fn container_name(workspace: &Path) -> String {
        format!("{CONTAINER_PREFIX}{:016x}", fnv1a(workspace))
    }

    /// The uid and gid `workspace`'s runs execute as.
    pub fn project_id(workspace: &Path) -> u32 {
        // The modulus keeps the sum below 2^31, so the cast is lossless.
        PROJECT_ID_BASE + (fnv1a(workspace) % PROJECT_ID_SPAN) as u32
    }

    /// How many runs went through a project's resident runner (the others were execs).
    pub fn runner_runs(&self) -> u64 {
        self.runner_runs.load(Ordering::Relaxed)
    }

    /// The host pid of `workspace`'s resident runner, once it has started (it starts with the
    /// project's container, and again after a run in which it died).
    pub async fn runner_pid(&self, workspace: &Path) -> Option<u32> {
        let workspace = canonical(workspace).await.ok()?;
        let project = self.projects.lock().await.get(&workspace).cloned()?;
        let _turn = project.run_lock.lock().await;
        project.runner().map(|addr| addr.pid)
    }

    /// Starts `workspace`'s container now rather than on its first run; returns its name.
    /// Its runner starts too, in a turn of its own (a run that is faster to ask starts it at its
    /// end instead: a project's first run is an exec unless the project was prepared).
    pub async fn prepare(&self, workspace: &Path) -> Result<String, SandboxError> {
        let workspace = canonical(workspace).await?;
        let project = self.project(&workspace).await?;
        if project.runner().is_none()
            && let Ok(guard) = Arc::clone(&project.run_lock).try_lock_owned()
        {
            let (docker, starting) = (self.docker.clone(), Arc::clone(&project));
            tokio::spawn(async move {
                ensure_runner(&docker, &starting).await;
                drop(guard);
            });
        }
        Ok(project.container.clone())
    }

    /// Removes `workspace`'s container (killing a run in it) and its terminals, if this sandbox
    /// started them.
    pub async fn remove_project(&self, workspace: &Path) -> Result<(), SandboxError> {
        let workspace = canonical(workspace).await?;
        let project = self.projects.lock().await.remove(&workspace);
        match project {
            Some(project) => self.remove_project_containers(&project).await,
            None => Ok(()),
        }
    }

    /// Removes a project's terminals, then its container.
    async fn remove_project_containers(&self, project: &Project) -> Result<(), SandboxError> {
        let terminals: Vec<String> = project.terminals().iter().cloned().collect();
        for terminal in terminals {
            self.remove_container(&terminal).await?;
        }
        self.remove_container(&project.container).await
    }

    /// Removes the containers of projects that ran nothing for `idle` and run nothing now; a
    /// project's next run starts a new container (a cold run, about 170 ms, instead of a warm
    /// one, about 12 through the runner; see BENCHMARKS.md). Returns how many were stopped. The
    /// bridge calls it periodically.
    pub async fn stop_idle(&self, idle: Duration) -> Result<usize, SandboxError> {
        let mut stopped = Vec::new();
        self.projects.lock().await.retain(|_, project| {
            let used = *project.last_used.lock().unwrap_or_else(|e| e.into_inner());
            if used.elapsed() < idle {
                return true;
            }
            let Ok(turn) = Arc::clone(&project.run_lock).try_lock_owned() else { return true };
            // Under the terminals' lock: a terminal that opens now either sees the project
            // retired or is seen here.
            let terminals = project.terminals();
            if !terminals.is_empty() {
                return true;
            }
            project.retired.store(true, Ordering::Release);
            drop(terminals);
            stopped.push((Arc::clone(project), turn));
            false
        });
        // The turns are held until the containers are gone, so no run starts in one.
        for (project, _turn) in &stopped {
            self.remove_container(&project.container).await?;
        }
        Ok(stopped.len())
    }

    /// Removes every container this sandbox started.
    pub async fn shutdown(&self) -> Result<(), SandboxError> {
        let projects: Vec<Arc<Project>> = self.projects.lock().await.drain().map(|(_, project)| project).collect();
        for project in projects {
            self.remove_project_containers(&project).await?;
        }
        Ok(())
    }

    /// Removes project containers (of any sandbox on this engine) whose workspace no longer
    /// exists on this host, left behind by a bridge that died; returns how many.
    pub async fn prune_orphans(&self) -> Result<usize, SandboxError> {
        let filters = HashMap::from([("label", vec![WORKSPACE_LABEL])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers = self.docker.list_containers(Some(options)).await.map_err(engine)?;
        let mut removed = 0;
        for container in containers {
            let workspace = container.labels.as_ref().and_then(|labels| labels.get(WORKSPACE_LABEL));
            let (Some(id), Some(workspace)) = (&container.id, workspace) else { continue };
            if Path::new(workspace).exists() {
                continue;
            }
            self.remove_container(id).await?;
            removed += 1;
        }
        Ok(removed)
    }

    async fn remove_container(&self, container: &str) -> Result<(), SandboxError> {
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            // Gone already (removed elsewhere, or auto-removed) or being removed.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404 | 409, .. }) => Ok(()),
            Err(err) => Err(engine(err)),
        }
    }

    /// The running project of `workspace` (canonical), created on first use.
    async fn project(&self, workspace: &Path) -> Result<Arc<Project>, SandboxError> {
        let mut projects = self.projects.lock().await;
        if let Some(project) = projects.get(workspace) {
            return Ok(Arc::clone(project));
        }
        let project = Arc::new(self.create_project(workspace).await?);
        projects.insert(workspace.to_path_buf(), Arc::clone(&project));
        Ok(project)
    }

    async fn create_project(&self, workspace: &Path) -> Result<Project, SandboxError> {
        let id = Self::project_id(workspace);
        let container = Self::container_name(workspace);
        let reports = tempfile::Builder::new()
            .prefix("exec-bridge-reports-")
            .tempdir_in(&self.config.scratch_dir)
            .map_err(SandboxError::Spawn)?;
        std::os::unix::fs::chown(reports.path(), Some(id), Some(id)).map_err(SandboxError::Spawn)?;
        // A container of the same name is a leftover of an earlier bridge, maybe configured
        // differently: start afresh.
        self.remove_container(&container).await?;
        let body = container_body(&self.config, workspace, reports.path());
        let options = CreateContainerOptionsBuilder::new().name(&container).build();
        let created = self.docker.create_container(Some(options), body).await.map_err(engine)?;
        for warning in created.warnings {
            tracing::warn!(%container, %warning, "the engine changed the sandbox container's configuration");
        }
        self.docker.start_container(&container, None).await.map_err(engine)?;
        tracing::info!(%container, workspace = %workspace.display(), "project container started");
        Ok(Project {
            container,
            id,
            reports,
            run_lock: Arc::new(Mutex::new(())),
            last_used: Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
            retired: AtomicBool::new(false),
            terminals: std::sync::Mutex::new(HashSet::new()),
            runner: std::sync::Mutex::new(None),
            runner_failures: AtomicU32::new(0),
        })
    }

    /// A place for a new terminal in `workspace`'s project (started if need be).
    async fn terminal_slot(&self, workspace: &Path) -> Result<TerminalSlot, SandboxError> {
        loop {
            let project = self.project(workspace).await?;
            let container = format!(
                "{}-term-{}-{}",
                project.container,
                std::process::id(),
                self.terminals.fetch_add(1, Ordering::Relaxed)
            );
            let mut terminals = project.terminals();
            if project.retired.load(Ordering::Acquire) {
                continue;
            }
            terminals.insert(container.clone());
            drop(terminals);
            return Ok(TerminalSlot { project, container });
        }
    }

    /// The host pid of `container`'s init while it runs.
    async fn container_pid(&self, container: &str) -> Result<Option<u32>, SandboxError> {
        match self.docker.inspect_container(container, None).await {
            Ok(inspect) => {
                let state = inspect.state.unwrap_or_default();
                let pid = state.pid.and_then(|pid| u32::try_from(pid).ok()).filter(|pid| *pid > 0);
                Ok(pid.filter(|_| state.running == Some(true)))
            }
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(err) => Err(engine(err)),
        }
    }

    /// Starts a terminal's container for `slot` and attaches to it; removes it on failure.
    async fn start_terminal(
        &self,
        slot: &TerminalSlot,
        workspace: &Path,
        size: TermSize,
        limits: &Limits,
    ) -> Result<(Bytes, UnixStream), SandboxError> {
        let container = &slot.container;
        let body = terminal_body(&self.config, workspace, &slot.project, limits);
        let options = CreateContainerOptionsBuilder::new().name(container).build();
        let created = self.docker.create_container(Some(options), body).await.map_err(engine)?;
        for warning in created.warnings {
            tracing::warn!(%container, %warning, "the engine changed the terminal container's configuration");
        }
        let started = async {
            // Attached before the start, so nothing the shell prints first is lost.
            let version = self.docker.client_version();
            let path = format!(
                "/v{}.{}/containers/{container}/attach?stream=1&stdin=1&stdout=1&stderr=1",
                version.major_version, version.minor_version
            );
            let attached = tokio::time::timeout(ATTACH_TIMEOUT, attach_raw(&self.socket, &path)).await;
            let attached = attached
                .map_err(|elapsed| SandboxError::Spawn(std::io::Error::other(elapsed)))?
                .map_err(SandboxError::Spawn)?;
            self.docker.start_container(container, None).await.map_err(engine)?;
            resize_terminal(&self.docker, container, size).await.map_err(engine)?;
            Ok(attached)
        };
        let started = started.await;
        if started.is_err()
            && let Err(err) = self.remove_container(container).await
        {
            tracing::warn!(error = %err, %container, "removing a terminal that failed to start failed");
        }
        started
    }
}

/// The `prlimit` options of a run or terminal.
fn prlimit_args(limits: &Limits) -> Vec<String> {
    let cpu = limits.cpu_time.as_secs().max(1);
    vec![
        format!("--as={}", limits.memory_bytes),
        // SIGXCPU at the limit, SIGKILL one second later for a program that ignores it.
        format!("--cpu={cpu}:{}", cpu + 1),
        format!("--fsize={}", limits.file_size_bytes),
        format!("--nproc={}", limits.processes),
        "--core=0".to_owned(),
    ]
}

/// What a project's container and its terminals' containers share; see the module
/// documentation.
fn host_config(config: &DockerSandboxConfig, binds: Vec<String>, network_mode: String) -> HostConfig {
    let ulimit = |name: &str, value: u64| {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        ResourcesUlimits { name: Some(name.to_owned()), soft: Some(value), hard: Some(value) }
    };
    let memory = i64::try_from(config.memory_bytes).unwrap_or(i64::MAX);
    let tmp_options = format!("rw,nosuid,nodev,size={},mode=1777", config.tmp_bytes);
    HostConfig {
        network_mode: Some(network_mode),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([("/tmp".to_owned(), tmp_options)])),
        binds: Some(binds),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: Some(i64::from(config.cpu_millis) * 1_000_000),
        pids_limit: Some(i64::from(config.pids)),
        ulimits: Some(vec![
            ulimit("nofile", config.open_files),
            ulimit("fsize", config.file_size_bytes),
            ulimit("core", 0),
        ]),
        init: Some(true),
        auto_remove: Some(true),
        ..HostConfig::default()
    }
}

/// The container of one project; see the module documentation.
fn container_body(config: &DockerSandboxConfig, workspace: &Path, reports: &Path) -> ContainerCreateBody {
    let binds = vec![
        format!("{}:{WORKSPACE_MOUNT}:rw", workspace.display()),
        format!("{}:{REPORT_MOUNT}:rw", reports.display()),
    ];
    ContainerCreateBody {
        image: Some(config.image.clone()),
        user: Some(KEEPER_USER.to_owned()),
        cmd: Some(vec!["sleep".to_owned(), "infinity".to_owned()]),
        working_dir: Some(WORKSPACE_MOUNT.to_owned()),
        env: Some(ENV.iter().map(|var| (*var).to_owned()).collect()),
        network_disabled: Some(true),
        labels: Some(HashMap::from([(WORKSPACE_LABEL.to_owned(), workspace.display().to_string())])),
        host_config: Some(host_config(config, binds, "none".to_owned())),
        ..ContainerCreateBody::default()
    }
}

/// The container of one terminal of `project`; see the module documentation.
fn terminal_body(
    config: &DockerSandboxConfig,
    workspace: &Path,
    project: &Project,
    limits: &Limits,
) -> ContainerCreateBody {
    let binds = vec![format!("{}:{WORKSPACE_MOUNT}:rw", workspace.display())];
    let mut host = host_config(config, binds, format!("container:{}", project.container));
    host.log_config = Some(HostConfigLogConfig { typ: Some("none".to_owned()), config: None });
    let mut cmd = vec![PRLIMIT.to_owned()];
    cmd.extend(prlimit_args(limits));
    cmd.extend(["--".to_owned(), "/bin/bash".to_owned()]);
    let mut env: Vec<String> = ENV.iter().map(|var| (*var).to_owned()).collect();
    env.push(format!("TERM={TERM}"));
    let id = project.id;
    ContainerCreateBody {
        image: Some(config.image.clone()),
        user: Some(format!("{id}:{id}")),
        cmd: Some(cmd),
        working_dir: Some(WORKSPACE_MOUNT.to_owned()),
        env: Some(env),
        tty: Some(true),
        open_stdin: Some(true),
        stdin_once: Some(true),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        labels: Some(HashMap::from([
            (WORKSPACE_LABEL.to_owned(), workspace.display().to_string()),
            (TERMINAL_LABEL.to_owned(), project.container.clone()),
        ])),
        host_config: Some(host),
        ..ContainerCreateBody::default()
    }
}

/// FNV-1a of the path's bytes: stable across processes and releases, unlike `DefaultHasher`.
fn fnv1a(path: &Path) -> u64 {
    path.as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

async fn canonical(workspace: &Path) -> Result<PathBuf, SandboxError> {
    tokio::fs::canonicalize(workspace)
        .await
        .map_err(|source| SandboxError::Workspace { path: workspace.display().to_string(), source })
}

/// The exec's command line: the `sh` wrapper that kills leftovers, then [`limited_command`].
fn run_command(report: &str, command: &SandboxCommand, limits: &Limits) -> Vec<String> {
    let mut line: Vec<String> =
        ["/bin/sh", "-c", "\"$@\"; status=$?; kill -KILL -1 2>/dev/null; exit $status", "sh"].map(str::to_owned).into();
    line.extend(limited_command(report, command, limits));
    line
}

/// `prlimit`, `time`, the program: what the runner starts (it kills leftovers itself).
fn limited_command(report: &str, command: &SandboxCommand, limits: &Limits) -> Vec<String> {
    let mut line = vec![PRLIMIT.to_owned()];
    line.extend(prlimit_args(limits));
    line.extend(["--", TIME, "-o", report, "-f", "%x %U %S %M", "--"].map(str::to_owned));
    line.push(command.program.clone());
    line.extend(command.args.iter().cloned());
    line
}

#[async_trait]
impl Sandbox for DockerSandbox {
    async fn warm(&self, workspace: &Path) -> Result<(), SandboxError> {
        self.prepare(workspace).await.map(|_| ())
    }

    async fn stop_idle(&self, idle: Duration) -> Result<usize, SandboxError> {
        DockerSandbox::stop_idle(self, idle).await
    }

    async fn open_terminal(&self, workspace: &Path, size: TermSize, limits: &Limits) -> Result<Terminal, SandboxError> {
        let workspace = canonical(workspace).await?;
        let slot = self.terminal_slot(&workspace).await?;
        let (dir, id) = (workspace.clone(), slot.project.id);
        let given = tokio::task::spawn_blocking(move || give_workspace(&dir, id))
            .await
            .map_err(|join| SandboxError::Spawn(std::io::Error::other(join)))?;
        given.map_err(|source| SandboxError::Workspace { path: workspace.display().to_string(), source })?;
        let (first, stream) = self.start_terminal(&slot, &workspace, size, limits).await?;
        tracing::debug!(container = %slot.container, "docker terminal started");

        let (reader, writer) = stream.into_split();
        let (input_tx, input_rx) = mpsc::channel(STDIN_QUEUE);
        let (resize_tx, resize_rx) = mpsc::channel(RESIZE_QUEUE);
        let (output_tx, output_rx) = mpsc::channel(TERM_QUEUE);
        let (exited_tx, exited_rx) = oneshot::channel();
        let done = CancellationToken::new();
        // Asked for now, long before the shell can end: an auto-removed container that is gone
        // when asked has no exit code any more.
        let exit = tokio::spawn(terminal_exit(self.docker.clone(), slot.container.clone()));
        tokio::spawn(read_terminal(first, reader, output_tx.clone()));
        let control = TerminalControl {
            docker: self.docker.clone(),
            container: slot.container.clone(),
            writer,
            input: input_rx,
            resize: resize_rx,
            done: done.clone(),
        };
        tokio::spawn(control_terminal(control));
        let supervised = SupervisedTerminal { docker: self.docker.clone(), slot, exit, output: output_tx, done };
        tokio::spawn(supervise_terminal(supervised, exited_tx));
        Ok(Terminal { input: input_tx, resize: resize_tx, output: output_rx, exited: exited_rx })
    }

    async fn connect_port(&self, workspace: &Path, port: u16) -> Result<Box<dyn PortStream>, SandboxError> {
        let workspace = canonical(workspace).await?;
        let project = self.projects.lock().await.get(&workspace).cloned();
        let Some(project) = project else { return Err(SandboxError::NotListening { port }) };
        let Some(pid) = self.container_pid(&project.container).await? else {
            return Err(SandboxError::NotListening { port });
        };
        let found = tokio::task::spawn_blocking(move || {
            let Some(addr) = netns::listening_address(pid, port)? else { return Ok(None) };
            netns::open(pid).map(|namespace| Some((namespace, addr)))
        })
        .await
        .map_err(|join| SandboxError::Spawn(std::io::Error::other(join)))?;
        let Some((namespace, addr)) = found.map_err(SandboxError::Spawn)? else {
            return Err(SandboxError::NotListening { port });
        };
        // The pid was the container's when the engine was asked; it still is, now that the
        // namespace is open, if the container still runs with it.
        if self.container_pid(&project.container).await? != Some(pid) {
            return Err(SandboxError::NotListening { port });
        }
        let stream = netns::connect_inside(namespace, addr).await?;
        Ok(Box::new(stream))
    }

    async fn start(
        &self,
        workspace: &Path,
        command: &SandboxCommand,
        limits: &Limits,
    ) -> Result<Execution, SandboxError> {
        let workspace = canonical(workspace).await?;
        let (project, turn) = loop {
            let project = self.project(&workspace).await?;
            let guard = Arc::clone(&project.run_lock).lock_owned().await;
            if !project.retired.load(Ordering::Acquire) {
                let turn = Turn { _guard: guard, last_used: Arc::clone(&project.last_used) };
                break (project, turn);
            }
        };
        let id = project.id;
        let report_name = format!("run-{}", self.runs.fetch_add(1, Ordering::Relaxed));
        let report = project.reports.path().join(&report_name);
        let (dir, report_path) = (workspace.clone(), report.clone());
        let given = tokio::task::spawn_blocking(move || {
            give_workspace(&dir, id)?;
            std::fs::write(&report_path, "")?;
            std::os::unix::fs::chown(&report_path, Some(id), Some(id))
        })
        .await
        .map_err(|join| SandboxError::Spawn(std::io::Error::other(join)))?;
        given.map_err(|source| SandboxError::Workspace { path: workspace.display().to_string(), source })?;

        let started_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let oom = watch_oom(self.docker.clone(), project.container.clone(), started_at);
        let report_inside = format!("{REPORT_MOUNT}/{report_name}");
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (out_tx, out_rx) = mpsc::channel(EVENT_QUEUE);
        let via_runner = match project.runner() {
            Some(addr) => match runner::start(&addr, &limited_command(&report_inside, command, limits)).await {
                Ok(run) => Some(run),
                Err(err) => {
                    // Its turn is ours: whatever state it is in, the exec's kill ends it, and
                    // it starts again after this run.
                    tracing::warn!(error = %err, container = %project.container, "the runner failed, using an exec");
                    project.set_runner(None);
                    None
                }
            },
            None => None,
        };
        let ending = match via_runner {
            Some(run) => {
                self.runner_runs.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(program = %command.program, container = %project.container, "runner run started");
                let kill = CancellationToken::new();
                let (exited_tx, exited_rx) = oneshot::channel();
                tokio::spawn(runner::feed(run.writer, stdin_rx, kill.clone()));
                tokio::spawn(runner::read(run.reader, out_tx, exited_tx));
                Ending::Runner { exited: exited_rx, kill }
            }
            None => {
                let exec = self.start_exec(&workspace, &project, &report_inside, command, limits).await?;
                let StartExecResults::Attached { output, input } = exec.1 else {
                    return Err(SandboxError::Vanished);
                };
                tracing::debug!(program = %command.program, container = %project.container, "docker run started");
                tokio::spawn(feed_stdin(input, stdin_rx));
                tokio::spawn(read_output(output, out_tx));
                Ending::Exec { exec: exec.0 }
            }
        };
        let run =
            Supervised { docker: self.docker.clone(), project, ending, report, limits: limits.clone(), oom, turn };
        tokio::spawn(supervise(run, out_rx, events_tx));
        Ok(Execution { stdin: stdin_tx, events: events_rx })
    }
}

impl DockerSandbox {
    /// Starts a run as an exec in the project's container (when its runner is not available).
    async fn start_exec(
        &self,
        workspace: &Path,
        project: &Project,
        report: &str,
        command: &SandboxCommand,
        limits: &Limits,
    ) -> Result<(String, StartExecResults), SandboxError> {
        let cmd = run_command(report, command, limits);
        let id = project.id;
        let user = format!("{id}:{id}");
        let options = CreateExecOptions {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(ENV.to_vec()),
            cmd: Some(cmd.iter().map(String::as_str).collect()),
            user: Some(user.as_str()),
            working_dir: Some(WORKSPACE_MOUNT),
            ..CreateExecOptions::default()
        };
        let exec = match self.docker.create_exec(&project.container, options).await {
            Ok(exec) => exec,
            Err(err) => {
                // The container may be gone (removed by hand, the engine restarted): forget it,
                // so the project's next run starts a new one.
                self.projects.lock().await.remove(workspace);
                return Err(engine(err));
            }
        };
        let start = StartExecOptions { detach: false, tty: false, output_capacity: None };
        let started = self.docker.start_exec(&exec.id, Some(start)).await.map_err(engine)?;
        Ok((exec.id, started))
    }
}

/// Starts the project's runner unless it runs or failed too often; call it during a turn.
async fn ensure_runner(docker: &Docker, project: &Project) {
    if project.runner().is_some()
        || project.retired.load(Ordering::Acquire)
        || project.runner_failures.load(Ordering::Relaxed) >= RUNNER_ATTEMPTS
    {
        return;
    }
    match start_runner(docker, project).await {
        Ok(addr) => {
            tracing::debug!(container = %project.container, pid = addr.pid, "runner started");
            project.runner_failures.store(0, Ordering::Relaxed);
            project.set_runner(Some(addr));
        }
        Err(err) => {
            project.runner_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, container = %project.container, "starting the runner failed");
        }
    }
}

/// Starts the resident runner as a detached exec of the project's uid and waits until it
/// listens; see `sandbox::runner`.
async fn start_runner(docker: &Docker, project: &Project) -> Result<runner::RunnerAddr, SandboxError> {
    let id = project.id;
    let user = format!("{id}:{id}");
    let inside = format!("{REPORT_MOUNT}/{}", runner::SOCKET);
    let options = CreateExecOptions {
        env: Some(ENV.to_vec()),
        cmd: Some(vec![PYTHON, "-I", "-S", "-c", runner::SOURCE, inside.as_str()]),
        user: Some(user.as_str()),
        working_dir: Some(WORKSPACE_MOUNT),
        ..CreateExecOptions::default()
    };
    let exec = docker.create_exec(&project.container, options).await.map_err(engine)?;
    let start = StartExecOptions { detach: true, tty: false, output_capacity: None };
    docker.start_exec(&exec.id, Some(start)).await.map_err(engine)?;
    let mut pid = None;
    for _ in 0..50 {
        let inspect = docker.inspect_exec(&exec.id).await.map_err(engine)?;
        pid = inspect.pid.and_then(|pid| u32::try_from(pid).ok()).filter(|pid| *pid > 0);
        if pid.is_some() || inspect.running == Some(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = pid.ok_or_else(|| SandboxError::Spawn(std::io::Error::other("the runner has no pid")))?;
    let socket = project.reports.path().join(runner::SOCKET);
    runner::wait_ready(&socket, pid, RUNNER_PATIENCE)
        .await
        .map_err(|err| SandboxError::Spawn(std::io::Error::other(err)))
}

async fn feed_stdin(mut stdin: std::pin::Pin<Box<dyn AsyncWrite + Send>>, mut chunks: mpsc::Receiver<Bytes>) {
    while let Some(chunk) = chunks.recv().await {
        // A program that stopped reading (or exited) is not an error of the run.
        if stdin.write_all(&chunk).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
    }
    // Half-closes the connection: the engine closes the program's stdin.
    let _ = stdin.shutdown().await;
}

async fn read_output(
    mut output: std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
    out: mpsc::Sender<(OutputStream, Bytes)>,
) {
    while let Some(Ok(chunk)) = output.next().await {
        let (stream, bytes) = match chunk {
            LogOutput::StdOut { message } | LogOutput::Console { message } => (OutputStream::Stdout, message),
            LogOutput::StdErr { message } => (OutputStream::Stderr, message),
            LogOutput::StdIn { .. } => continue,
        };
        if out.send((stream, bytes)).await.is_err() {
            return;
        }
    }
}

/// Resolves once Docker reports an `oom` event for `container` at or after `since`.
struct OomWatch {
    seen: oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
}

fn watch_oom(docker: Docker, container: String, since: Duration) -> OomWatch {
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let filters = HashMap::from([("container", vec![container.as_str()]), ("event", vec!["oom"])]);
        let options = EventsOptionsBuilder::new().since(&since.as_secs().to_string()).filters(&filters).build();
        let mut events = docker.events(Some(options));
        let since_nanos = i64::try_from(since.as_nanos()).unwrap_or(i64::MAX);
        while let Some(Ok(event)) = events.next().await {
            if event.time_nano.unwrap_or(i64::MAX) >= since_nanos {
                let _ = tx.send(());
                return;
            }
        }
    });
    OomWatch { seen: rx, task }
}

/// How a run's end is learnt: from its exec, or from the runner.
enum Ending {
    Exec {
        exec: String,
    },
    Runner {
        /// The status, sent once every leftover is dead.
        exited: oneshot::Receiver<i32>,
        /// Cancelled to tell the runner to kill the run.
        kill: CancellationToken,
    },
}

struct Supervised {
    docker: Docker,
    project: Arc<Project>,
    ending: Ending,
    report: PathBuf,
    limits: Limits,
    oom: OomWatch,
    /// The project's turn, released once every process of the run is dead.
    turn: Turn,
}

/// Forwards output, enforces the wall-time and output limits, and sends the verdict.
async fn supervise(
    mut run: Supervised,
    mut output: mpsc::Receiver<(OutputStream, Bytes)>,
    events: mpsc::Sender<RunEvent>,
) {
    let deadline = tokio::time::sleep(run.limits.wall_time);
    tokio::pin!(deadline);
    let mut budget = OutputBudget::new(run.limits.output_bytes);
    let killed = loop {
        tokio::select! {
            chunk = output.recv() => {
                // The output ends when the program has exited and every leftover is dead.
                let Some((stream, bytes)) = chunk else { break None };
                match budget.forward(&events, stream, bytes).await {
                    Forwarded::Sent => {}
                    Forwarded::OverLimit => break Some(Some(Verdict::OutputLimit)),
                    Forwarded::NobodyListens => break Some(None),
                }
            }
            () = &mut deadline => break Some(Some(Verdict::TimeLimit(TimeLimit::Wall))),
        }
    };
    let verdict = match killed {
        Some(verdict) => {
            // Stop reading first: an engine stuck writing output it cannot deliver would not
            // start the kill. Dropping the receiver ends the reader, which closes the stream
            // (the runner's reader drains instead, so the runner can report the end).
            drop(output);
            kill_run(&mut run).await;
            verdict
        }
        None => Some(judge_run(&mut run).await),
    };
    run.oom.task.abort();
    let _ = tokio::fs::remove_file(&run.report).await;
    if let Some(verdict) = verdict {
        tracing::debug!(?verdict, "docker run finished");
        let _ = events.send(RunEvent::Finished(verdict)).await;
    }
    // Still in the run's turn, after its verdict: a runner that died (or was never started)
    // starts again here, off the run's critical path.
    ensure_runner(&run.docker, &run.project).await;
    drop(run.turn);
}

/// Kills a run that is still going: through the runner if it answers in time, through the
/// engine otherwise (which ends the runner too).
async fn kill_run(run: &mut Supervised) {
    if let Ending::Runner { exited, kill } = &mut run.ending {
        kill.cancel();
        if let Ok(Ok(_)) = tokio::time::timeout(RUNNER_KILL_GRACE, exited).await {
            return;
        }
        tracing::warn!(container = %run.project.container, "the runner did not end a run, killing through the engine");
        run.project.set_runner(None);
    }
    if let Err(err) = kill_project_processes(&run.docker, &run.project.container, run.project.id).await {
        tracing::warn!(error = %err, container = %run.project.container, "killing a run failed");
    }
}

/// The verdict of a run that ended by itself: `time`'s report, the exit status, and Docker's
/// OOM events.
async fn judge_run(run: &mut Supervised) -> Verdict {
    let code = match &mut run.ending {
        Ending::Exec { exec } => exit_code(&run.docker, exec).await,
        Ending::Runner { exited, .. } => match exited.await {
            Ok(code) => code,
            Err(_) => {
                // The runner died (the program may have killed it): nothing vouches that the
                // run's processes are gone, so the engine kills them, and the runner with them.
                tracing::warn!(container = %run.project.container, "the runner died during a run");
                run.project.set_runner(None);
                if let Err(err) = kill_project_processes(&run.docker, &run.project.container, run.project.id).await {
                    tracing::warn!(error = %err, container = %run.project.container, "killing a run failed");
                }
                128 + SIGKILL
            }
        },
    };
    let report = tokio::fs::read_to_string(&run.report).await.unwrap_or_default();
    let verdict = judge(ExitStatus::from_raw((code & 0xff) << 8), &report, &run.limits);
    let oom = &mut run.oom.seen;
    let oom_killed = match verdict {
        Verdict::Signaled { signal: SIGKILL } => {
            tokio::time::timeout(OOM_GRACE, oom).await.is_ok_and(|seen| seen.is_ok())
        }
        _ => false,
    };
    if oom_killed { Verdict::MemoryLimit } else { verdict }
}

/// The exit code of a finished exec; the engine may take a moment to record the exit.
async fn exit_code(docker: &Docker, exec: &str) -> i32 {
    for _ in 0..50 {
        match docker.inspect_exec(exec).await {
            Ok(inspect) if inspect.running != Some(true) => {
                return inspect.exit_code.and_then(|code| i32::try_from(code).ok()).unwrap_or(-1);
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(err) => {
                tracing::warn!(error = %err, "inspecting a finished run failed");
                return -1;
            }
        }
    }
    -1
}

/// Sets the size of a terminal's tty (its programs get `SIGWINCH`).
async fn resize_terminal(docker: &Docker, container: &str, size: TermSize) -> Result<(), bollard::errors::Error> {
    let options = ResizeContainerTTYOptionsBuilder::new().h(i32::from(size.rows)).w(i32::from(size.cols)).build();
    docker.resize_container_tty(container, options).await
}

/// Attaches to a container's stdio over a connection of our own to the engine's Unix socket
/// (see the module documentation for why not bollard's); `path` is the attach endpoint with its
/// query. Returns what came after the answer's header, and the raw stream.
async fn attach_raw(socket: &Path, path: &str) -> std::io::Result<(Bytes, UnixStream)> {
    let mut stream = UnixStream::connect(socket).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(at) = head.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() > ATTACH_HEAD_LIMIT {
            return Err(std::io::Error::other("the engine's answer to an attach has no end of header"));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let status = String::from_utf8_lossy(head.split(|byte| *byte == b'\r').next().unwrap_or_default()).into_owned();
    // 101 for an upgraded connection; engines before API 1.2x answer 200 and hijack all the same.
    let code = status.split_whitespace().nth(1);
    if !matches!(code, Some("101" | "200")) {
        let body = String::from_utf8_lossy(&head[end..]).into_owned();
        return Err(std::io::Error::other(format!("attaching failed: {status} {body}")));
    }
    Ok((Bytes::copy_from_slice(&head[end..]), stream))
}

/// Forwards the tty's bytes in chunks of at most [`TERM_CHUNK`], waiting while the output
/// queue is full (the flow control); ends when the container's tty closes or nobody reads.
async fn read_terminal(first: Bytes, mut reader: OwnedReadHalf, output: mpsc::Sender<Bytes>) {
    for start in (0..first.len()).step_by(TERM_CHUNK) {
        let chunk = first.slice(start..(start + TERM_CHUNK).min(first.len()));
        if output.send(chunk).await.is_err() {
            return;
        }
    }
    let mut buf = vec![0u8; TERM_CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if output.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The exit code of a terminal's container once it stops.
async fn terminal_exit(docker: Docker, container: String) -> Option<i32> {
    let options = WaitContainerOptionsBuilder::new().condition("not-running").build();
    let mut wait = docker.wait_container(&container, Some(options));
    match wait.next().await? {
        Ok(response) => i32::try_from(response.status_code).ok(),
        // bollard reports a non-zero exit as an error carrying the code.
        Err(bollard::errors::Error::DockerContainerWaitError { code, .. }) => i32::try_from(code).ok(),
        Err(err) => {
            tracing::warn!(error = %err, %container, "waiting for a terminal failed");
            None
        }
    }
}

struct TerminalControl {
    docker: Docker,
    container: String,
    writer: OwnedWriteHalf,
    input: mpsc::Receiver<Bytes>,
    resize: mpsc::Receiver<TermSize>,
    done: CancellationToken,
}

/// Writes keystrokes and applies resizes, a resize sent before a keystroke before it. Keeps the
/// connection's writing half until the terminal has ended: closing it would close the shell's
/// stdin (the container's stdin is closed when its attached client goes).
async fn control_terminal(control: TerminalControl) {
    let TerminalControl { docker, container, mut writer, mut input, mut resize, done } = control;
    let (mut input_open, mut resize_open) = (true, true);
    loop {
        tokio::select! {
            biased;
            () = done.cancelled() => break,
            size = resize.recv(), if resize_open => match size {
                Some(size) => {
                    if let Err(err) = resize_terminal(&docker, &container, size).await {
                        tracing::debug!(error = %err, %container, "resizing a terminal failed");
                    }
                }
                None => resize_open = false,
            },
            chunk = input.recv(), if input_open => match chunk {
                Some(chunk) => {
                    tokio::select! {
                        written = writer.write_all(&chunk) => input_open = written.is_ok(),
                        () = done.cancelled() => break,
                    }
                }
                None => input_open = false,
            },
        }
    }
    drop(writer);
}

struct SupervisedTerminal {
    docker: Docker,
    slot: TerminalSlot,
    exit: tokio::task::JoinHandle<Option<i32>>,
    output: mpsc::Sender<Bytes>,
    done: CancellationToken,
}

/// Removes the terminal's container when nobody reads its output any more; reports its exit
/// otherwise.
async fn supervise_terminal(terminal: SupervisedTerminal, exited: oneshot::Sender<Option<i32>>) {
    let SupervisedTerminal { docker, slot, mut exit, output, done } = terminal;
    let code = tokio::select! {
        code = &mut exit => code.ok().flatten(),
        () = output.closed() => None,
    };
    exit.abort();
    // Close our end of the attach connection first: with a program still writing, the engine
    // waits to copy its output to us, and does not finish removing the container until then.
    done.cancel();
    // Gone already when the shell exited (auto-removed); killed and removed otherwise.
    let options = RemoveContainerOptionsBuilder::new().force(true).build();
    match docker.remove_container(&slot.container, Some(options)).await {
        Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404 | 409, .. }) => {}
        Err(err) => tracing::warn!(error = %err, container = %slot.container, "removing a terminal failed"),
    }
    drop(output);
    tracing::debug!(?code, container = %slot.container, "docker terminal ended");
    drop(slot);
    let _ = exited.send(code);
}

/// Kills every process of the project's uid in its container (the run holds the project's
/// lock, so these are the run's), and waits for the kill to be done.
async fn kill_project_processes(docker: &Docker, container: &str, id: u32) -> Result<(), bollard::errors::Error> {
    let user = format!("{id}:{id}");
    let options = CreateExecOptions {
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        cmd: Some(vec!["/bin/sh", "-c", "kill -KILL -1"]),
        user: Some(user.as_str()),
        ..CreateExecOptions::default()
    };
    let exec = docker.create_exec(container, options).await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await? {
        while output.next().await.is_some() {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids_are_stable_and_in_range() {
        let id = DockerSandbox::project_id(Path::new("/srv/projects/42"));
        assert_eq!(id, DockerSandbox::project_id(Path::new("/srv/projects/42")));
        assert!((PROJECT_ID_BASE..i32::MAX as u32).contains(&id));
        assert_ne!(DockerSandbox::container_name(Path::new("/a")), DockerSandbox::container_name(Path::new("/b")));
    }

    #[test]
    fn a_run_is_wrapped_in_the_killer_prlimit_and_time() {
        let limits = Limits::default();
        let line =
            run_command("/.exec-bridge-reports/run-0", &SandboxCommand::new("/usr/bin/python3", ["a.py"]), &limits);
        assert_eq!(&line[..4], ["/bin/sh", "-c", "\"$@\"; status=$?; kill -KILL -1 2>/dev/null; exit $status", "sh"]);
        assert!(line.contains(&format!("--nproc={}", limits.processes)));
        assert_eq!(&line[line.len() - 2..], ["/usr/bin/python3", "a.py"]);
    }
}
