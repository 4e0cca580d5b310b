//! The sandbox seam: run one command in a project's workspace under [`Limits`], streaming its
//! output and taking its stdin while it runs. Implemented by bubblewrap ([`local`]) and by
//! Docker ([`docker`]), both held to one conformance suite (`tests/sandbox.rs`).

pub mod docker;
pub mod local;
mod netns;
mod runner;

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use crate::run::{Limits, RunEvent, RunOutput, Stream};

/// Chunks of stdin that may wait for the program before a writer waits.
pub const STDIN_QUEUE: usize = 16;
/// Events that may wait for the reader before the program's output is no longer read (the
/// program then blocks writing, and its wall time runs on).
pub const EVENT_QUEUE: usize = 64;

/// A command as seen inside the sandbox: `program` is a path there (e.g. `/usr/bin/python3`, or
/// `./a.out` relative to the workspace, which is the working directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCommand {
    pub program: String,
    pub args: Vec<String>,
}

impl SandboxCommand {
    pub fn new(program: impl Into<String>, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        SandboxCommand { program: program.into(), args: args.into_iter().map(Into::into).collect() }
    }
}

/// A command running in a sandbox.
///
/// Dropping `events` kills the command; dropping `stdin` closes the command's stdin.
#[derive(Debug)]
pub struct Execution {
    /// Bytes for the command's stdin, written as they arrive.
    pub stdin: mpsc::Sender<Bytes>,
    /// Output chunks in order, then one [`RunEvent::Finished`] as last event.
    pub events: mpsc::Receiver<RunEvent>,
}

impl Execution {
    /// Closes stdin and waits for the end, gathering all output.
    pub async fn collect(self) -> Result<RunOutput, SandboxError> {
        let Execution { stdin, mut events } = self;
        drop(stdin);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(event) = events.recv().await {
            match event {
                RunEvent::Output { stream: Stream::Stdout, bytes } => stdout.extend_from_slice(&bytes),
                RunEvent::Output { stream: Stream::Stderr, bytes } => stderr.extend_from_slice(&bytes),
                RunEvent::Finished(verdict) => return Ok(RunOutput { stdout, stderr, verdict }),
            }
        }
        Err(SandboxError::Vanished)
    }
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    pub cols: u16,
    pub rows: u16,
}

/// Chunks of terminal output that may wait for the reader. When they are not read, the pty's
/// buffer fills and the shell's programs block writing: this is the terminal's flow control.
pub const TERM_QUEUE: usize = 16;
/// The largest chunk of terminal output, in bytes.
pub const TERM_CHUNK: usize = 4096;
/// Resizes of a terminal that may wait to be applied.
pub const RESIZE_QUEUE: usize = 4;

/// An interactive shell on a pseudo-terminal in a sandbox, in the workspace.
///
/// Dropping `output` ends the shell and everything it started; dropping `input` does not.
#[derive(Debug)]
pub struct Terminal {
    /// Keystrokes, written to the pty as they arrive.
    pub input: mpsc::Sender<Bytes>,
    /// New sizes for the pty (the shell's programs get `SIGWINCH`). A resize sent before a
    /// keystroke is applied before that keystroke is written.
    pub resize: mpsc::Sender<TermSize>,
    /// What the pty prints, in order, in chunks of at most [`TERM_CHUNK`] bytes; ends when the
    /// shell has exited. At most [`TERM_QUEUE`] chunks wait here: a terminal nobody reads
    /// blocks its programs' writes.
    pub output: mpsc::Receiver<Bytes>,
    /// The shell's exit code once it ended; `None` when the sandbox killed it (its output was
    /// dropped) or the sandbox itself died by a signal. A shell killed by signal N inside the
    /// sandbox reads as 128+N, as its parent shell would report it.
    pub exited: oneshot::Receiver<Option<i32>>,
}

/// A byte stream to a port inside a sandbox (for live previews).
pub trait PortStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PortStream for T {}

/// Why a command could not be run at all (as opposed to a run that ended with a bad verdict).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox tool {tool} is not installed ({hint})")]
    ToolMissing { tool: &'static str, hint: &'static str },
    #[error("preparing the workspace {path} failed")]
    Workspace {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the sandbox failed")]
    Spawn(#[source] std::io::Error),
    #[error("the run ended without a verdict")]
    Vanished,
    #[error("the container engine cannot be reached ({hint})")]
    EngineUnavailable {
        hint: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the runtime image {image} does not exist ({hint})")]
    ImageMissing { image: String, hint: &'static str },
    #[error("nothing listens on port {port} in this project's sandbox")]
    NotListening { port: u16 },
    #[error("the container engine failed")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
}

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
