//! Compile-then-run programs on top of any [`Sandbox`]; the limits, verdicts and events of a
//! run are in [`crate::job`] (re-exported here, where callers have always found them).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::job::{EVENT_QUEUE, Execution, STDIN_QUEUE, SandboxCommand, SandboxError};
pub use crate::job::{Limits, RunEvent, RunOutput, Stream, TimeLimit, Verdict};
use crate::sandbox::Sandbox;

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
    let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
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
