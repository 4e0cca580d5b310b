//! What a project's container and a terminal's container are made of, creating and finding
//! them, and the kill of a project's processes through the engine.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32};

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, ResourcesUlimits};
use bollard::query_parameters::CreateContainerOptionsBuilder;
use futures_util::StreamExt;
use tokio::sync::Mutex;

use super::{
    DockerSandbox, DockerSandboxConfig, ENV, KEEPER_USER, PRLIMIT, Project, REPORT_MOUNT, TERMINAL_LABEL,
    WORKSPACE_LABEL, canonical, engine,
};
use crate::job::{Limits, PortStream, SandboxError};
use crate::sandbox::local::{TERM, WORKSPACE_MOUNT};
use crate::sandbox::netns;

impl DockerSandbox {
    /// The running project of `workspace` (canonical), created on first use.
    pub(super) async fn project(&self, workspace: &Path) -> Result<Arc<Project>, SandboxError> {
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

    pub(super) async fn connect_to_port(
        &self,
        workspace: &Path,
        port: u16,
    ) -> Result<Box<dyn PortStream>, SandboxError> {
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
}

/// The `prlimit` options of a run or terminal.
pub(super) fn prlimit_args(limits: &Limits) -> Vec<String> {
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
pub(super) fn terminal_body(
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

/// Kills every process of the project's uid in its container (the run holds the project's
/// lock, so these are the run's), and waits for the kill to be done.
pub(super) async fn kill_project_processes(
    docker: &Docker,
    container: &str,
    id: u32,
) -> Result<(), bollard::errors::Error> {
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
