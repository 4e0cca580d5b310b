//! The sandbox seam: run one command in a project's workspace under [`Limits`], streaming its
//! output and taking its stdin while it runs. Implemented by bubblewrap ([`local`]) and by
//! Docker ([`docker`]), both held to one conformance suite (`tests/sandbox.rs`).

pub mod docker;
pub mod local;
mod netns;
mod owner;
mod runner;
mod verdict;

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use crate::job::{
    EVENT_QUEUE, Execution, PortStream, RESIZE_QUEUE, STDIN_QUEUE, SandboxCommand, SandboxError, TERM_CHUNK,
    TERM_QUEUE, TermSize, Terminal,
};
use crate::job::{Limits, RunEvent, Stream};

/// Runs commands in a project's workspace, isolated from the host and from each other.
///
/// Every implementation gives the same guarantees, checked by one test suite: no network, the
/// workspace (mounted at `/workspace`, the working directory) is the only writable place that
/// outlives the run, nothing of the host beyond the system's programs and libraries is
/// visible, and every limit in [`Limits`] holds.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// Starts `command` in `workspace` (a directory on the host). Returns once the command
    /// runs; its output and verdict come through the returned [`Execution`].
    async fn start(
        &self,
        workspace: &Path,
        command: &SandboxCommand,
        limits: &Limits,
    ) -> Result<Execution, SandboxError>;

    /// Opens an interactive shell (`/bin/bash`) on a pty in `workspace`, with the same isolation
    /// as a run. Of `limits`, CPU time, memory, processes and file size apply; wall time and
    /// output bytes do not (a terminal lives until closed; its output is flow-controlled).
    async fn open_terminal(&self, workspace: &Path, size: TermSize, limits: &Limits) -> Result<Terminal, SandboxError>;

    /// Checks, at the server's start, that workspaces in `dir` can be run in; `Err` says what is
    /// wrong (e.g. [`SandboxError::Unreachable`]). Every run and terminal fails the same way
    /// until it is fixed.
    fn check_reachable(&self, _dir: &Path) -> Result<(), SandboxError> {
        Ok(())
    }

    /// Gets `workspace`'s sandbox ready ahead of its first run (the warm start): called when
    /// people open a project, so Run does not wait for a container to start. Does nothing where
    /// there is nothing to prepare.
    async fn warm(&self, _workspace: &Path) -> Result<(), SandboxError> {
        Ok(())
    }

    /// Releases what projects that ran nothing for `idle` hold (a Docker container); their next
    /// run or terminal starts it again. Returns how many were released.
    async fn stop_idle(&self, _idle: std::time::Duration) -> Result<usize, SandboxError> {
        Ok(0)
    }

    /// Connects to `port` on which a program of this workspace's sandbox listens (on any of its
    /// addresses inside the sandbox), for live previews. Reaches nothing outside the sandbox.
    async fn connect_port(&self, workspace: &Path, port: u16) -> Result<Box<dyn PortStream>, SandboxError>;
}

/// A run's wall time limit as both sandboxes enforce it: [`Limits::interactive_wall_time`] from
/// the start while its stdin is open (someone may still type into it), [`Limits::wall_time`]
/// from the start once its stdin is closed.
pub(crate) struct WallClock {
    started: tokio::time::Instant,
    wall: std::time::Duration,
    interactive: std::time::Duration,
    /// Cancelled by the run's stdin feeder once the program's stdin is closed.
    stdin_closed: tokio_util::sync::CancellationToken,
}

impl WallClock {
    pub(crate) fn new(limits: &Limits, stdin_closed: tokio_util::sync::CancellationToken) -> WallClock {
        let interactive = limits.interactive_wall_time.max(limits.wall_time);
        WallClock { started: tokio::time::Instant::now(), wall: limits.wall_time, interactive, stdin_closed }
    }

    /// Resolves once the run is past its wall time.
    pub(crate) async fn expired(&self) {
        if !self.stdin_closed.is_cancelled() {
            tokio::select! {
                () = tokio::time::sleep_until(self.started + self.interactive) => return,
                () = self.stdin_closed.cancelled() => {}
            }
        }
        tokio::time::sleep_until(self.started + self.wall).await;
    }
}

/// Resolves once the workspace at `root` takes more than `limit` bytes on disk, measured now
/// and every [`crate::job::DISK_CHECK`] on the blocking pool. A workspace that cannot be
/// measured is not held against the run.
pub(crate) async fn over_disk_limit(root: std::path::PathBuf, limit: u64) {
    loop {
        let dir = root.clone();
        let used = tokio::task::spawn_blocking(move || owner::disk_usage(&dir)).await;
        if let Ok(Ok(used)) = used
            && used > limit
        {
            tracing::debug!(used, limit, workspace = %root.display(), "a run's workspace is over its size limit");
            return;
        }
        tokio::time::sleep(crate::job::DISK_CHECK).await;
    }
}

/// Resolves once the workspace at `root` grows past `limit`, or past what it takes now if that
/// is more: for a terminal, which must open on a workspace already over its limit (it is how
/// people clean one up) but may not make it any bigger.
pub(crate) async fn grows_past_disk_limit(root: std::path::PathBuf, limit: u64) {
    let dir = root.clone();
    let now = tokio::task::spawn_blocking(move || owner::disk_usage(&dir)).await;
    let bound = match now {
        Ok(Ok(used)) => used.max(limit),
        _ => limit,
    };
    over_disk_limit(root, bound).await;
}

/// What forwarding one chunk of a run's output did.
pub(crate) enum Forwarded {
    Sent,
    /// The chunk reached the output limit: what fitted was sent, the run must be stopped.
    OverLimit,
    /// The events receiver is gone: nobody wants the run any more.
    NobodyListens,
}

/// A run's output counted against its limit on the way to the events channel.
pub(crate) struct OutputBudget {
    written: u64,
    limit: u64,
}

impl OutputBudget {
    pub(crate) fn new(limit: u64) -> OutputBudget {
        OutputBudget { written: 0, limit }
    }

    /// Sends `bytes`, cut at the limit, as an output event.
    pub(crate) async fn forward(&mut self, events: &mpsc::Sender<RunEvent>, stream: Stream, bytes: Bytes) -> Forwarded {
        let room = self.limit.saturating_sub(self.written);
        let over = bytes.len() as u64 > room;
        let bytes = if over { bytes.slice(..room as usize) } else { bytes };
        self.written += bytes.len() as u64;
        if !bytes.is_empty() && events.send(RunEvent::Output { stream, bytes }).await.is_err() {
            return Forwarded::NobodyListens;
        }
        if over { Forwarded::OverLimit } else { Forwarded::Sent }
    }
}
