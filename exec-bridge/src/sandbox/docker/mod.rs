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
//!
//! # Where the code is
//!
//! This module holds the sandbox and a project's lifecycle (containers started, reused, stopped
//! when idle, pruned); `container` what the containers are made of; `run` a run (runner or exec)
//! and its verdict; `oom` the engine's OOM events; `terminal` a terminal's container and its
//! stream, `attach` the raw attach connection.

mod attach;
mod container;
mod oom;
mod run;
mod terminal;

use run::ensure_runner;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{Execution, PortStream, Sandbox, SandboxCommand, SandboxError, TermSize, Terminal, runner};
use crate::job::Limits;

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

#[async_trait]
impl Sandbox for DockerSandbox {
    async fn warm(&self, workspace: &Path) -> Result<(), SandboxError> {
        self.prepare(workspace).await.map(|_| ())
    }

    async fn stop_idle(&self, idle: Duration) -> Result<usize, SandboxError> {
        DockerSandbox::stop_idle(self, idle).await
    }

    async fn open_terminal(&self, workspace: &Path, size: TermSize, limits: &Limits) -> Result<Terminal, SandboxError> {
        self.open_container_terminal(workspace, size, limits).await
    }

    async fn connect_port(&self, workspace: &Path, port: u16) -> Result<Box<dyn PortStream>, SandboxError> {
        self.connect_to_port(workspace, port).await
    }

    async fn start(
        &self,
        workspace: &Path,
        command: &SandboxCommand,
        limits: &Limits,
    ) -> Result<Execution, SandboxError> {
        self.start_run(workspace, command, limits).await
    }
}

#[cfg(test)]
mod tests {
    use super::run::run_command;
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
