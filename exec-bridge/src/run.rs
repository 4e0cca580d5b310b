//! Runs with verdicts: the limits a run gets, the verdict it ends with, the events it streams,
//! and a compile-then-run driver on top of any [`Sandbox`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::sandbox::{Execution, Sandbox, SandboxCommand, SandboxError};

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
    /// Address space of each process; default 256 MiB. Enforced by `RLIMIT_AS`.
    pub memory_bytes: u64,
    /// Processes (and threads) in the sandbox at once, counting the sandbox's own init and
    /// reporter; default 64. Enforced by `RLIMIT_NPROC`, see `sandbox::local` for why it bites.
    pub processes: u32,
    /// stdout and stderr together; default 1 MiB. The bridge counts and kills past it.
    pub output_bytes: u64,
    /// Largest file a process may write; default 16 MiB. Enforced by `RLIMIT_FSIZE`.
    pub file_size_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_time: Duration::from_secs(5),
            wall_time: Duration::from_secs(10),
            memory_bytes: 256 << 20,
            processes: 64,
            output_bytes: 1 << 20,
            file_size_bytes: 16 << 20,
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

/// A program to run: an optional compile step, then the run. Both run in the same workspace,
/// so the compile step leaves its output there for the run.
#[derive(Debug, Clone)]
pub struct Program {
    pub compile: Option<SandboxCommand>,
    pub run: SandboxCommand,
}

impl Program {
    /// A C program: `gcc` compiles `source` (relative to the workspace) to `./a.out`, which runs.
    pub fn c(source: &str) -> Self {
        let compile = SandboxCommand::new("/usr/bin/gcc", ["-O2", "-o", "a.out", source, "-lm"]);
        Program { compile: Some(compile), run: SandboxCommand::new("./a.out", Vec::<String>::new()) }
    }

    /// A Python 3 script, `source` relative to the workspace.
    pub fn python(source: &str) -> Self {
        Program { compile: None, run: SandboxCommand::new("/usr/bin/python3", [source]) }
    }
}

/// Compiles (if the program has a compile step) then runs `program` in `workspace`.
///
/// The compile step's output is streamed like the run's (a compiler's diagnostics are on its
/// stderr); stdin written before the run starts is
/// held for it. A compile step that does not exit 0 ends the run with
/// [`Verdict::CompileError`] and the program is not started.
pub async fn run_program(
    sandbox: &Arc<dyn Sandbox>,
    workspace: &Path,
    program: &Program,
    compile_limits: &Limits,
    run_limits: &Limits,
) -> Result<Execution, SandboxError> {
    let Some(compile) = &program.compile else {
        return sandbox.start(workspace, &program.run, run_limits).await;
    };
    let compiling = sandbox.start(workspace, compile, compile_limits).await?;
    let (stdin_tx, stdin_rx) = mpsc::channel(crate::sandbox::STDIN_QUEUE);
    let (events_tx, events_rx) = mpsc::channel(crate::sandbox::EVENT_QUEUE);
    // The run is started from a task, which needs owned copies of what `start` borrows.
    let ctx = Stage { workspace: workspace.to_path_buf(), run: program.run.clone(), limits: run_limits.clone() };
    tokio::spawn(drive(compiling, Arc::clone(sandbox), ctx, stdin_rx, events_tx));
    Ok(Execution { stdin: stdin_tx, events: events_rx })
}

struct Stage {
    workspace: PathBuf,
    run: SandboxCommand,
    limits: Limits,
}

/// Forwards the compile step's events, then starts the run and forwards its events and stdin.
async fn drive(
    mut compiling: Execution,
    sandbox: Arc<dyn Sandbox>,
    stage: Stage,
    mut stdin_rx: mpsc::Receiver<Bytes>,
    events_tx: mpsc::Sender<RunEvent>,
) {
    drop(compiling.stdin);
    while let Some(event) = compiling.events.recv().await {
        match event {
            RunEvent::Finished(verdict) if verdict.is_success() => break,
            RunEvent::Finished(verdict) => {
                let _ = events_tx.send(RunEvent::Finished(Verdict::CompileError(Box::new(verdict)))).await;
                return;
            }
            output => {
                if events_tx.send(output).await.is_err() {
                    return; // nobody listens: dropping `compiling` kills the compiler
                }
            }
        }
    }
    let mut running = match sandbox.start(&stage.workspace, &stage.run, &stage.limits).await {
        Ok(running) => running,
        Err(err) => {
            tracing::warn!(error = %err, "starting the compiled program failed");
            return; // the events end without `Finished`, which `Execution::collect` reports
        }
    };
    let stdin = running.stdin;
    tokio::spawn(async move {
        while let Some(bytes) = stdin_rx.recv().await {
            if stdin.send(bytes).await.is_err() {
                break;
            }
        }
    });
    while let Some(event) = running.events.recv().await {
        if events_tx.send(event).await.is_err() {
            return;
        }
    }
}
