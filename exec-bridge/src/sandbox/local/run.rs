//! A run in the local sandbox: bwrap started with pipes, its output forwarded under the output
//! limit, its wall time enforced from outside, and its verdict from GNU `time`'s report.

use std::path::Path;
use std::process::{ExitStatus, Stdio};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::LocalSandbox;
use super::command::Purpose;
use super::live::Registration;
use crate::job::{
    EVENT_QUEUE, Execution, Limits, RunEvent, STDIN_QUEUE, SandboxCommand, SandboxError, Stream, TimeLimit, Verdict,
};
use crate::sandbox::verdict::judge;
use crate::sandbox::{Forwarded, OutputBudget, WallClock, over_disk_limit};

impl LocalSandbox {
    pub(super) async fn start_run(
        &self,
        workspace: &Path,
        command: &SandboxCommand,
        limits: &Limits,
    ) -> Result<Execution, SandboxError> {
        let report = tempfile::Builder::new()
            .prefix("exec-bridge-report-")
            .tempfile_in(&self.config.scratch_dir)
            .map_err(SandboxError::Spawn)?;
        let workspace = self.prepare(workspace, Some(report.path())).await?;
        let purpose = Purpose::Run { command, report: report.path() };
        let line = self.command_line(&workspace, &purpose, limits);
        // Nothing of the server's environment (database URLs, passwords) reaches bwrap, whose
        // own process is the sandbox's init and readable there as `/proc/1/environ`: the
        // program's variables are set by `--setenv`.
        let mut child = Command::new(&line[0])
            .args(&line[1..])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(SandboxError::Spawn)?;
        let registered = child.id().map(|pid| self.live.register(&workspace, pid));
        let registration = match registered {
            Some(Ok((registration, _))) => registration,
            Some(Err(err)) => {
                let _ = child.start_kill();
                return Err(SandboxError::Spawn(err));
            }
            None => return Err(SandboxError::Vanished),
        };
        tracing::debug!(program = %command.program, pid = child.id(), "sandboxed run started");
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (out_tx, out_rx) = mpsc::channel(EVENT_QUEUE);
        let stdin_closed = CancellationToken::new();
        match child.stdin.take() {
            Some(stdin) => drop(tokio::spawn(feed_stdin(stdin, stdin_rx, stdin_closed.clone()))),
            None => stdin_closed.cancel(),
        }
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(read_output(stdout, Stream::Stdout, out_tx.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(read_output(stderr, Stream::Stderr, out_tx));
        }
        let wall = WallClock::new(limits, stdin_closed);
        let run = Supervised { child, report, limits: limits.clone(), wall, workspace, _registration: registration };
        tokio::spawn(supervise(run, out_rx, events_tx));
        Ok(Execution { stdin: stdin_tx, events: events_rx })
    }
}

/// Writes stdin chunks to the program; cancels `closed` once its stdin is closed (nobody sends
/// any more, or the program stopped reading).
async fn feed_stdin(mut stdin: ChildStdin, mut chunks: mpsc::Receiver<Bytes>, closed: CancellationToken) {
    let _closed = closed.drop_guard();
    while let Some(chunk) = chunks.recv().await {
        // A program that stopped reading (or exited) is not an error of the run.
        if stdin.write_all(&chunk).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
    }
}

async fn read_output(mut pipe: impl AsyncRead + Unpin, stream: Stream, out: mpsc::Sender<(Stream, Bytes)>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.send((stream, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                    return;
                }
            }
        }
    }
}

struct Supervised {
    child: Child,
    report: tempfile::NamedTempFile,
    limits: Limits,
    wall: WallClock,
    /// The canonical workspace, measured against the size limit.
    workspace: std::path::PathBuf,
    /// Keeps the run where previews look until it has ended.
    _registration: Registration,
}

/// Forwards output, enforces the wall-time and output limits, and sends the verdict.
async fn supervise(mut run: Supervised, mut output: mpsc::Receiver<(Stream, Bytes)>, events: mpsc::Sender<RunEvent>) {
    let mut budget = OutputBudget::new(run.limits.output_bytes);
    let disk = over_disk_limit(run.workspace.clone(), run.limits.workspace_bytes);
    tokio::pin!(disk);
    let mut status: Option<ExitStatus> = None;
    let mut output_open = true;
    let killed = loop {
        if status.is_some() && !output_open {
            break None;
        }
        tokio::select! {
            chunk = output.recv(), if output_open => {
                let Some((stream, bytes)) = chunk else {
                    output_open = false;
                    continue;
                };
                match budget.forward(&events, stream, bytes).await {
                    Forwarded::Sent => {}
                    Forwarded::OverLimit => break Some(Some(Verdict::OutputLimit)),
                    Forwarded::NobodyListens => break Some(None),
                }
            }
            exited = run.child.wait(), if status.is_none() => match exited {
                Ok(exited) => status = Some(exited),
                Err(err) => {
                    tracing::warn!(error = %err, "waiting for the sandbox failed");
                    break Some(None);
                }
            },
            () = run.wall.expired() => break Some(Some(Verdict::TimeLimit(TimeLimit::Wall))),
            () = &mut disk => break Some(Some(Verdict::DiskLimit)),
        }
    };
    let verdict = match killed {
        Some(verdict) => {
            // SIGKILL to bwrap; its init in the pid namespace dies with it (--die-with-parent),
            // and with the init every process of the run.
            let _ = run.child.start_kill();
            let _ = run.child.wait().await;
            verdict
        }
        None => {
            let report = tokio::fs::read_to_string(run.report.path()).await.unwrap_or_default();
            status.map(|status| judge(status, &report, &run.limits))
        }
    };
    if let Some(verdict) = verdict {
        tracing::debug!(?verdict, "sandboxed run finished");
        let _ = events.send(RunEvent::Finished(verdict)).await;
    }
}
