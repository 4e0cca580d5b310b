//! A run in a project's container: through the resident runner, or an exec when the runner is
//! not available; its output under the output limit, its wall time and its verdict.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::container::{kill_project_processes, prlimit_args};
use super::oom::{OomWatch, watch_oom};
use super::{
    DockerSandbox, ENV, OOM_GRACE, PRLIMIT, PYTHON, Project, REPORT_MOUNT, RUNNER_ATTEMPTS, RUNNER_KILL_GRACE,
    RUNNER_PATIENCE, SIGKILL, TIME, Turn, canonical, engine, runner,
};
use crate::job::{
    EVENT_QUEUE, Execution, Limits, RunEvent, STDIN_QUEUE, SandboxCommand, SandboxError, Stream as OutputStream,
    TimeLimit, Verdict,
};
use crate::sandbox::local::WORKSPACE_MOUNT;
use crate::sandbox::owner::give_workspace;
use crate::sandbox::verdict::judge;
use crate::sandbox::{Forwarded, OutputBudget, WallClock, over_disk_limit};

impl DockerSandbox {
    pub(super) async fn start_run(
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
        let stdin_closed = CancellationToken::new();
        let wall = WallClock::new(limits, stdin_closed.clone());
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
                tokio::spawn(runner::feed(run.writer, stdin_rx, kill.clone(), stdin_closed.clone()));
                tokio::spawn(runner::read(run.reader, out_tx, exited_tx));
                Ending::Runner { exited: exited_rx, kill }
            }
            None => {
                let exec = self.start_exec(&workspace, &project, &report_inside, command, limits).await?;
                let StartExecResults::Attached { output, input } = exec.1 else {
                    return Err(SandboxError::Vanished);
                };
                tracing::debug!(program = %command.program, container = %project.container, "docker run started");
                tokio::spawn(feed_stdin(input, stdin_rx, stdin_closed.clone()));
                tokio::spawn(read_output(output, out_tx));
                Ending::Exec { exec: exec.0 }
            }
        };
        let run = Supervised {
            docker: self.docker.clone(),
            project,
            ending,
            report,
            limits: limits.clone(),
            wall,
            workspace: workspace.clone(),
            oom,
            turn,
        };
        tokio::spawn(supervise(run, out_rx, events_tx));
        Ok(Execution { stdin: stdin_tx, events: events_rx })
    }

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

/// The exec's command line: the `sh` wrapper that kills leftovers, then [`limited_command`].
pub(super) fn run_command(report: &str, command: &SandboxCommand, limits: &Limits) -> Vec<String> {
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

/// Starts the project's runner unless it runs or failed too often; call it during a turn.
pub(super) async fn ensure_runner(docker: &Docker, project: &Project) {
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

/// Writes stdin chunks to the exec; cancels `closed` once the program's stdin is closed.
async fn feed_stdin(
    mut stdin: std::pin::Pin<Box<dyn AsyncWrite + Send>>,
    mut chunks: mpsc::Receiver<Bytes>,
    closed: CancellationToken,
) {
    let _closed = closed.drop_guard();
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
    wall: WallClock,
    /// The canonical workspace, measured against the size limit.
    workspace: PathBuf,
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
    let mut budget = OutputBudget::new(run.limits.output_bytes);
    let disk = over_disk_limit(run.workspace.clone(), run.limits.workspace_bytes);
    tokio::pin!(disk);
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
            () = run.wall.expired() => break Some(Some(Verdict::TimeLimit(TimeLimit::Wall))),
            () = &mut disk => break Some(Some(Verdict::DiskLimit)),
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
