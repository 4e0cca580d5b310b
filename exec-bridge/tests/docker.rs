//! Checks of the Docker sandbox beyond the conformance suite (`tests/sandbox.rs`): the project
//! and terminal containers' configuration as the engine reports it, Docker's OOM verdict,
//! container reuse, the end of every process a run leaves behind, terminals' containers, and
//! the resident runner that starts runs (and the engine's exec that stands in for it).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::HashMap;

use bollard::query_parameters::{ListContainersOptionsBuilder, TopOptionsBuilder};
use collab_test_support::wait;
use common::{docker_sandbox, workspace_with};
use exec_bridge::run::{Limits, Program, RunOutput, Verdict, run_program};
use exec_bridge::sandbox::docker::{DockerSandbox, DockerSandboxConfig, TERMINAL_LABEL};
use exec_bridge::sandbox::{Sandbox, TermSize, Terminal};

const PATIENCE: Duration = Duration::from_secs(60);

async fn python(sandbox: &Arc<DockerSandbox>, workspace: &Path, script: &str, limits: &Limits) -> RunOutput {
    let dyn_sandbox: Arc<dyn Sandbox> = sandbox.clone();
    let program = Program::python(script);
    let execution =
        run_program(&dyn_sandbox, workspace, &program, &Limits::compile(), limits).await.expect("the run starts");
    tokio::time::timeout(PATIENCE, execution.collect()).await.expect("the run ends in time").expect("a verdict")
}

#[tokio::test]
async fn the_project_container_is_locked_down() {
    let config = DockerSandboxConfig::default();
    let sandbox = docker_sandbox(config.clone()).await;
    let workspace = workspace_with(&[("id.py", "import os\nprint(os.getuid(), os.getgid())\n")]);
    let container = sandbox.prepare(workspace.path()).await.expect("the container starts");
    let inspect = sandbox.docker().inspect_container(&container, None).await.expect("inspect");
    let host = inspect.host_config.expect("host config");
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(host.readonly_rootfs, Some(true));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(host.security_opt, Some(vec!["no-new-privileges".to_owned()]));
    assert_eq!(host.pids_limit, Some(i64::from(config.pids)));
    assert_eq!(host.memory, Some(config.memory_bytes as i64));
    assert_eq!(host.memory_swap, host.memory, "memory+swap equals memory: no swap");
    assert_eq!(host.nano_cpus, Some(i64::from(config.cpu_millis) * 1_000_000));
    assert_eq!(host.init, Some(true));
    assert!(host.tmpfs.as_ref().is_some_and(|tmpfs| tmpfs.contains_key("/tmp")), "{:?}", host.tmpfs);
    let ulimits: Vec<(String, i64)> = host
        .ulimits
        .unwrap_or_default()
        .into_iter()
        .map(|ulimit| (ulimit.name.unwrap_or_default(), ulimit.hard.unwrap_or_default()))
        .collect();
    assert!(ulimits.contains(&("core".to_owned(), 0)), "{ulimits:?}");
    assert!(ulimits.contains(&("fsize".to_owned(), config.file_size_bytes as i64)), "{ulimits:?}");
    assert!(ulimits.iter().any(|(name, _)| name == "nofile"), "{ulimits:?}");
    let user = inspect.config.and_then(|config| config.user).unwrap_or_default();
    assert!(!user.is_empty() && !user.starts_with("0") && !user.starts_with("root"), "container user {user:?}");

    // Runs execute as the project's own unprivileged id.
    let out = python(&sandbox, workspace.path(), "id.py", &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    let id = DockerSandbox::project_id(&workspace.path().canonicalize().expect("canonical"));
    assert_eq!(out.stdout_text(), format!("{id} {id}\n"));
    sandbox.shutdown().await.expect("removed");
}

#[tokio::test]
async fn the_container_memory_limit_gives_an_exact_memory_verdict() {
    // The run may reserve 1 GiB but the project's container has 96 MiB: the cgroup's OOM
    // killer, not the run's own limit, stops the bomb, and Docker's `oom` event tells why.
    let config = DockerSandboxConfig { memory_bytes: 96 << 20, ..DockerSandboxConfig::default() };
    let sandbox = docker_sandbox(config).await;
    let workspace = workspace_with(&[("bomb.py", "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))\n")]);
    let limits = Limits { memory_bytes: 1 << 30, ..Limits::default() };
    let out = python(&sandbox, workspace.path(), "bomb.py", &limits).await;
    assert_eq!(out.verdict, Verdict::MemoryLimit, "stderr: {}", out.stderr_text());
    sandbox.shutdown().await.expect("removed");
}

#[tokio::test]
async fn a_project_reuses_its_container_and_no_process_outlives_a_run() {
    let sandbox = docker_sandbox(DockerSandboxConfig::default()).await;
    let script =
        "import subprocess\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\nprint('left a sleeper')\n";
    let workspace = workspace_with(&[("main.py", script)]);
    let started = Instant::now();
    let first = python(&sandbox, workspace.path(), "main.py", &Limits::default()).await;
    let cold = started.elapsed();
    assert_eq!(first.verdict, Verdict::Exited { code: 0 }, "stderr: {}", first.stderr_text());
    let container = sandbox.prepare(workspace.path()).await.expect("the same container");
    let started = Instant::now();
    let second = python(&sandbox, workspace.path(), "main.py", &Limits::default()).await;
    let warm = started.elapsed();
    assert_eq!(second.verdict, Verdict::Exited { code: 0 }, "stderr: {}", second.stderr_text());
    println!("first run (container start) {cold:?}, warm run {warm:?}");

    let top =
        sandbox.docker().top_processes(&container, Some(TopOptionsBuilder::new().ps_args("-eo pid,uid,args").build()));
    let top = top.await.expect("top");
    let processes: Vec<String> = top.processes.unwrap_or_default().into_iter().map(|row| row.join(" ")).collect();
    assert!(!processes.iter().any(|row| row.contains("sleep 300")), "a sleeper outlived its run: {processes:?}");
    assert!(processes.iter().any(|row| row.contains("sleep infinity")), "the container itself stays up: {processes:?}");
    sandbox.shutdown().await.expect("removed");
    let gone = sandbox.docker().inspect_container(&container, None).await;
    assert!(gone.is_err(), "the container is removed with the project");
}

/// A project that ran nothing for the idle time loses its container; its next run starts a new
/// one and works; a busy or recently used project keeps its container.
#[tokio::test]
async fn an_idle_project_stops_and_starts_again_on_demand() {
    let sandbox = docker_sandbox(DockerSandboxConfig::default()).await;
    let workspace = workspace_with(&[("main.py", "print('again')")]);
    let container = sandbox.prepare(workspace.path()).await.expect("container starts");
    let run = || async {
        let program = Program::python("main.py");
        let sandbox: Arc<dyn Sandbox> = sandbox.clone();
        let output = run_program(&sandbox, workspace.path(), &program, &Limits::compile(), &Limits::default())
            .await
            .expect("run starts")
            .collect()
            .await
            .expect("run ends");
        assert_eq!(output.verdict, Verdict::Exited { code: 0 });
        assert_eq!(String::from_utf8_lossy(&output.stdout), "again\n");
    };
    run().await;
    // A runner (re)started at the end of a run holds the project's turn until it is up; an idle
    // check skips a project whose turn is taken. Wait for it, so the checks below are exact.
    sandbox.runner_pid(workspace.path()).await;
    assert_eq!(sandbox.stop_idle(Duration::from_secs(3600)).await.unwrap(), 0, "used just now");
    assert_eq!(sandbox.stop_idle(Duration::ZERO).await.unwrap(), 1);
    assert!(sandbox.docker().inspect_container(&container, None).await.is_err(), "the idle container is gone");
    run().await;
    assert!(sandbox.docker().inspect_container(&container, None).await.is_ok(), "a new container runs it");
    sandbox.shutdown().await.unwrap();
}

/// The containers of `project`'s open terminals, by name.
async fn terminal_containers(sandbox: &DockerSandbox, project: &str) -> Vec<String> {
    let label = format!("{TERMINAL_LABEL}={project}");
    let filters = HashMap::from([("label", vec![label.as_str()])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let containers = sandbox.docker().list_containers(Some(options)).await.expect("list containers");
    containers.into_iter().flat_map(|container| container.names.unwrap_or_default()).collect()
}

async fn open_terminal(sandbox: &Arc<DockerSandbox>, workspace: &Path) -> Terminal {
    let dyn_sandbox: Arc<dyn Sandbox> = sandbox.clone();
    let limits = Limits { cpu_time: Duration::from_secs(3600), ..Limits::default() };
    dyn_sandbox.open_terminal(workspace, TermSize { cols: 80, rows: 24 }, &limits).await.expect("the terminal opens")
}

/// Drops the terminal's output and waits until the sandbox has ended it.
async fn close(terminal: Terminal) {
    let Terminal { output, exited, .. } = terminal;
    drop(output);
    let code = tokio::time::timeout(PATIENCE, exited).await.expect("ends in time");
    assert_eq!(code, Ok(None));
}

/// A terminal runs in a locked-down container of its own that shares only the project
/// container's (loopback-only) network namespace, and leaves no container behind.
#[tokio::test]
async fn a_terminal_has_a_locked_down_container_that_goes_with_it() {
    let config = DockerSandboxConfig::default();
    let sandbox = docker_sandbox(config.clone()).await;
    let workspace = workspace_with(&[]);
    let project = sandbox.prepare(workspace.path()).await.expect("the container starts");
    let terminal = open_terminal(&sandbox, workspace.path()).await;
    let terminals = terminal_containers(&sandbox, &project).await;
    assert_eq!(terminals.len(), 1, "{terminals:?}");
    let inspect =
        sandbox.docker().inspect_container(terminals[0].trim_start_matches('/'), None).await.expect("inspect");
    let host = inspect.host_config.expect("host config");
    let network = host.network_mode.unwrap_or_default();
    assert!(network.starts_with("container:"), "the project container's network namespace: {network}");
    assert_eq!(host.readonly_rootfs, Some(true));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(host.security_opt, Some(vec!["no-new-privileges".to_owned()]));
    assert_eq!(host.pids_limit, Some(i64::from(config.pids)));
    assert_eq!(host.memory, Some(config.memory_bytes as i64));
    assert_eq!(host.log_config.and_then(|log| log.typ).as_deref(), Some("none"), "no copy of the output is kept");
    let id = DockerSandbox::project_id(&workspace.path().canonicalize().expect("canonical"));
    let container_config = inspect.config.expect("config");
    assert_eq!(container_config.user, Some(format!("{id}:{id}")));
    assert_eq!(container_config.tty, Some(true));

    close(terminal).await;
    assert!(terminal_containers(&sandbox, &project).await.is_empty(), "the terminal's container is gone");
    assert!(sandbox.docker().inspect_container(&project, None).await.is_ok(), "the project's container stays");
    sandbox.shutdown().await.expect("removed");
}

/// An open terminal keeps its project's container (whose network namespace it shares) up.
#[tokio::test]
async fn a_project_with_an_open_terminal_is_not_stopped_as_idle() {
    let sandbox = docker_sandbox(DockerSandboxConfig::default()).await;
    let workspace = workspace_with(&[]);
    let project = sandbox.prepare(workspace.path()).await.expect("the container starts");
    // The runner `prepare` starts holds the project's turn until it is up (an idle check skips a
    // busy project): wait for it, so only the terminal keeps the container below.
    sandbox.runner_pid(workspace.path()).await;
    let terminal = open_terminal(&sandbox, workspace.path()).await;
    assert_eq!(sandbox.stop_idle(Duration::ZERO).await.expect("stop idle"), 0, "a terminal is open");
    close(terminal).await;
    assert_eq!(sandbox.stop_idle(Duration::ZERO).await.expect("stop idle"), 1);
    assert!(sandbox.docker().inspect_container(&project, None).await.is_err(), "the idle container is gone");
    sandbox.shutdown().await.expect("removed");
}

/// Removing a project ends its open terminals too.
#[tokio::test]
async fn removing_a_project_ends_its_terminals() {
    let sandbox = docker_sandbox(DockerSandboxConfig::default()).await;
    let workspace = workspace_with(&[]);
    let project = sandbox.prepare(workspace.path()).await.expect("the container starts");
    let mut terminal = open_terminal(&sandbox, workspace.path()).await;
    sandbox.remove_project(workspace.path()).await.expect("removed");
    assert!(terminal_containers(&sandbox, &project).await.is_empty(), "no terminal container is left");
    let ended = tokio::time::timeout(PATIENCE, async { while terminal.output.recv().await.is_some() {} });
    ended.await.expect("the terminal's output ends");
}

/// Finds the project's runner from inside (its command line names its socket) for a script.
const FIND_RUNNER: &str = "import os\nrunner = next(p for p in os.listdir('/proc') if p.isdigit() and b'runner.sock' in open('/proc/%s/cmdline' % p, 'rb').read())\n";

async fn runner_pid(sandbox: &DockerSandbox, workspace: &Path) -> u32 {
    wait::poll("the runner to start", PATIENCE, || sandbox.runner_pid(workspace), String::new).await
}

/// Runs go through the resident runner, which outlives them, also those it kills for a limit.
#[tokio::test]
async fn runs_go_through_the_resident_runner_which_outlives_them() {
    let sandbox = docker_sandbox(DockerSandboxConfig::default()).await;
    let workspace = workspace_with(&[
        ("main.py", "print('via the runner')\n"),
        ("sleep.py", "import time\ntime.sleep(600)\n"),
        ("loud.py", "while True:\n    print('y' * 999)\n"),
    ]);
    sandbox.prepare(workspace.path()).await.expect("the container starts");
    let pid = runner_pid(&sandbox, workspace.path()).await;
    let before = sandbox.runner_runs();
    for _ in 0..3 {
        let out = python(&sandbox, workspace.path(), "main.py", &Limits::default()).await;
        assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
        assert_eq!(out.stdout_text(), "via the runner\n");
    }
    let limits = Limits { wall_time: Duration::from_secs(1), output_bytes: 64 << 10, ..Limits::default() };
    let slept = python(&sandbox, workspace.path(), "sleep.py", &limits).await;
    assert_eq!(slept.verdict, Verdict::TimeLimit(exec_bridge::run::TimeLimit::Wall));
    let loud = python(&sandbox, workspace.path(), "loud.py", &limits).await;
    assert_eq!(loud.verdict, Verdict::OutputLimit);
    assert_eq!(sandbox.runner_runs() - before, 5, "every run went through the runner");
    assert_eq!(sandbox.runner_pid(workspace.path()).await, Some(pid), "the same runner throughout");
    sandbox.shutdown().await.expect("removed");
}

/// A runner killed from outside is not used (the run is an exec) and is started again.
#[tokio::test]
async fn a_dead_runner_falls_back_to_an_exec_and_is_replaced() {
    let sandbox = docker_sandbox(DockerSandboxConfig::default()).await;
    let workspace = workspace_with(&[("main.py", "print('still runs')\n")]);
    sandbox.prepare(workspace.path()).await.expect("the container starts");
    let pid = runner_pid(&sandbox, workspace.path()).await;
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill runs");
    assert!(killed.success());
    let before = sandbox.runner_runs();
    let out = python(&sandbox, workspace.path(), "main.py", &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    assert_eq!(out.stdout_text(), "still runs\n");
    assert_eq!(sandbox.runner_runs(), before, "the run was an exec");
    let replaced = runner_pid(&sandbox, workspace.path()).await;
    assert_ne!(replaced, pid, "a new runner");
    let out = python(&sandbox, workspace.path(), "main.py", &Limits::default()).await;
    assert_eq!(out.stdout_text(), "still runs\n");
    assert_eq!(sandbox.runner_runs(), before + 1, "the next run goes through the new runner");
    sandbox.shutdown().await.expect("removed");
}

/// A run can neither look into its runner (it is not dumpable) nor, by killing it, keep a
/// process alive after the run: the engine kills what the runner no longer can.
#[tokio::test]
async fn a_run_cannot_take_over_or_outlive_its_runner() {
    let sandbox = docker_sandbox(DockerSandboxConfig::default()).await;
    let probe = format!(
        "{FIND_RUNNER}import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint('ptrace', libc.ptrace(16, int(runner), 0, 0))\nfor what in ['mem', 'environ', 'fd/0']:\n    try:\n        open('/proc/%s/%s' % (runner, what), 'rb').read(1)\n        print('read', what)\n    except OSError as e:\n        print('denied', what)\n"
    );
    let rebel = format!(
        "{FIND_RUNNER}import signal, subprocess\nsubprocess.Popen(['sleep', '301'], start_new_session=True)\nos.kill(int(runner), signal.SIGKILL)\nprint('killed it', flush=True)\n"
    );
    let workspace = workspace_with(&[("probe.py", &probe), ("rebel.py", &rebel), ("main.py", "print('fine')\n")]);
    sandbox.prepare(workspace.path()).await.expect("the container starts");
    let pid = runner_pid(&sandbox, workspace.path()).await;
    let out = python(&sandbox, workspace.path(), "probe.py", &Limits::default()).await;
    assert_eq!(out.verdict, Verdict::Exited { code: 0 }, "stderr: {}", out.stderr_text());
    assert_eq!(out.stdout_text(), "ptrace -1\ndenied mem\ndenied environ\ndenied fd/0\n");

    let out = python(&sandbox, workspace.path(), "rebel.py", &Limits::default()).await;
    assert!(matches!(out.verdict, Verdict::Signaled { .. } | Verdict::Exited { .. }), "{:?}", out.verdict);
    let container = sandbox.prepare(workspace.path()).await.expect("the same container");
    let top =
        sandbox.docker().top_processes(&container, Some(TopOptionsBuilder::new().ps_args("-eo pid,uid,args").build()));
    let processes: Vec<String> =
        top.await.expect("top").processes.unwrap_or_default().into_iter().map(|row| row.join(" ")).collect();
    assert!(!processes.iter().any(|row| row.contains("sleep 301")), "a sleeper outlived its run: {processes:?}");
    let replaced = runner_pid(&sandbox, workspace.path()).await;
    assert_ne!(replaced, pid, "a new runner");
    let before = sandbox.runner_runs();
    let out = python(&sandbox, workspace.path(), "main.py", &Limits::default()).await;
    assert_eq!(out.stdout_text(), "fine\n");
    assert_eq!(sandbox.runner_runs(), before + 1);
    sandbox.shutdown().await.expect("removed");
}
