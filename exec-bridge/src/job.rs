//! What the sandbox seam speaks: the command a sandbox is asked to run and its [`Limits`], the
//! events and [`Verdict`] a run ends with, terminals, port streams and the sandbox's errors.
//!
//! The lowest module of the run path: [`crate::sandbox`] implements runs in these terms and
//! [`crate::run`] drives them; this module imports neither.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

/// Resource limits of one sandboxed command.
///
/// The defaults follow the spirit of Judge0 and Piston: enough for a student's program, small
/// enough that a runaway one costs the machine little.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// CPU time (user + system) of each process; default 5 s. Enforced by `RLIMIT_CPU`.
    pub cpu_time: Duration,
    /// Time from start to end of the whole run; default 10 s. Enforced by the bridge, which kills
    /// the whole sandbox (a sleeping or blocked program uses no CPU time).
    pub wall_time: Duration,
    /// Time from start to end of a run while its stdin is open, i.e. while someone connected may
    /// still type into it; default 10 min. Once stdin is closed, `wall_time` applies again,
    /// counted from the start. Enforced by the bridge, as `wall_time` is.
    pub interactive_wall_time: Duration,
    /// Address space of each process; default 256 MiB. Enforced by `RLIMIT_AS`.
    pub memory_bytes: u64,
    /// Processes (and threads) in the sandbox at once, counting the sandbox's own init and
    /// reporter; default 64. Enforced by `RLIMIT_NPROC`, see `sandbox::local` for why it bites.
    pub processes: u32,
    /// stdout and stderr together; default 1 MiB. The bridge counts and kills past it.
    pub output_bytes: u64,
    /// Largest file a process may write; default 16 MiB. Enforced by `RLIMIT_FSIZE`.
    pub file_size_bytes: u64,
    /// Bytes the whole workspace may take on disk while the run goes; default 128 MiB. The
    /// bridge measures it every [`DISK_CHECK`] and kills the run past it, so a run can write at
    /// most one interval's worth beyond (many files each under `file_size_bytes` add up).
    pub workspace_bytes: u64,
}

/// How often a run's workspace is measured against [`Limits::workspace_bytes`].
pub const DISK_CHECK: Duration = Duration::from_millis(100);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_time: Duration::from_secs(5),
            wall_time: Duration::from_secs(10),
            interactive_wall_time: Duration::from_secs(600),
            memory_bytes: 256 << 20,
            processes: 64,
            output_bytes: 1 << 20,
            file_size_bytes: 16 << 20,
            workspace_bytes: 128 << 20,
        }
    }
}

impl Limits {
    /// Limits of a compile step: compilers need more memory and time than the programs they
    /// build (gcc's cc1 alone reserves over 100 MiB of address space).
    pub fn compile() -> Self {
        Limits {
            cpu_time: Duration::from_secs(10),
            wall_time: Duration::from_secs(20),
            memory_bytes: 1 << 30,
            ..Limits::default()
        }
    }
}

/// Which limit on time a run hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeLimit {
    Cpu,
    Wall,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The program exited by itself with this code (0 is success).
    Exited { code: i32 },
    /// The program was killed by this signal, not by a limit the sandbox recognised.
    Signaled { signal: i32 },
    /// The program used up its CPU time or the run its wall time, and was killed.
    TimeLimit(TimeLimit),
    /// The program failed near its memory limit (see `sandbox::local` for how this is told).
    MemoryLimit,
    /// The program wrote more than its output limit and was killed.
    OutputLimit,
    /// The workspace grew past its size limit while the program ran, and it was killed.
    DiskLimit,
    /// The compile step did not succeed; the program never ran. Holds the compiler's verdict.
    CompileError(Box<Verdict>),
}

impl Verdict {
    pub fn is_success(&self) -> bool {
        *self == Verdict::Exited { code: 0 }
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What a run streams: output chunks as they come, then exactly one `Finished` as last event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    Output { stream: Stream, bytes: Bytes },
    Finished(Verdict),
}

/// A whole run collected, for tests and batch callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub verdict: Verdict,
}

impl RunOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

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
    #[error(
        "the sandbox's uid {id} cannot reach {path} (mode {mode:04o}): give others search permission on it \
         (chmod o+x: that lets them reach names inside, not list or read them), or keep the workspaces elsewhere"
    )]
    Unreachable { path: String, mode: u32, id: u32 },
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
