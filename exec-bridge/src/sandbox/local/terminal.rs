//! A terminal in the local sandbox: bash on a `portable-pty` pty inside the same bwrap command
//! line, read and written by threads of its own, killed through a pidfd.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use portable_pty::{CommandBuilder, MasterPty, PtySize};
use rustix::process::{Signal, pidfd_send_signal};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::LocalSandbox;
use super::command::Purpose;
use super::live::Registration;
use crate::job::{Limits, RESIZE_QUEUE, STDIN_QUEUE, SandboxError, TERM_CHUNK, TERM_QUEUE, TermSize, Terminal};

impl LocalSandbox {
    pub(super) async fn open_pty_terminal(
        &self,
        workspace: &Path,
        size: TermSize,
        limits: &Limits,
    ) -> Result<Terminal, SandboxError> {
        let workspace = self.prepare(workspace, None).await?;
        let line = self.command_line(&workspace, &Purpose::Terminal, limits);
        let pty = portable_pty::native_pty_system().openpty(pty_size(size)).map_err(pty_error)?;
        let mut builder = CommandBuilder::new(&line[0]);
        builder.args(&line[1..]);
        builder.cwd("/");
        // As for a run: none of the server's environment reaches bwrap (see `run`).
        builder.env_clear();
        let mut child = pty.slave.spawn_command(builder).map_err(pty_error)?;
        // Only the sandbox holds the pty's slave now: when its last process ends, reading the
        // master fails and the output ends.
        drop(pty.slave);
        let Some(pid) = child.process_id() else {
            let _ = child.kill();
            return Err(SandboxError::Spawn(std::io::Error::other("the terminal's process has no pid")));
        };
        let (registration, pidfd) = match self.live.register(&workspace, pid) {
            Ok(registered) => registered,
            Err(err) => {
                let _ = child.kill();
                return Err(SandboxError::Spawn(err));
            }
        };
        let kill = {
            let pidfd = Arc::clone(&pidfd);
            move || {
                let _ = pidfd_send_signal(pidfd.as_fd(), Signal::KILL);
            }
        };
        let started = start_terminal_threads(child, pty.master);
        let threads = match started {
            Ok(threads) => threads,
            Err(err) => {
                kill();
                return Err(err);
            }
        };
        tracing::debug!(pid, "sandboxed terminal started");
        let (exited_tx, exited_rx) = oneshot::channel();
        let terminal =
            Terminal { input: threads.input, resize: threads.resize, output: threads.output, exited: exited_rx };
        let supervised = SupervisedTerminal {
            exit: threads.exit,
            output: threads.output_tx,
            kill: Box::new(kill),
            done: threads.done,
            registration,
        };
        tokio::spawn(supervise_terminal(supervised, exited_tx));
        Ok(terminal)
    }
}

fn pty_size(size: TermSize) -> PtySize {
    PtySize { rows: size.rows, cols: size.cols, pixel_width: 0, pixel_height: 0 }
}

fn pty_error(err: anyhow::Error) -> SandboxError {
    SandboxError::Spawn(std::io::Error::other(err))
}

/// A started terminal's channels, and the ends its supervisor keeps.
struct TerminalThreads {
    input: mpsc::Sender<Bytes>,
    resize: mpsc::Sender<TermSize>,
    output: mpsc::Receiver<Bytes>,
    /// A sender of `output`, whose `closed()` tells that nobody reads it any more.
    output_tx: mpsc::Sender<Bytes>,
    /// The exit code, or `None` for a death by signal, once the terminal's bwrap has ended.
    exit: oneshot::Receiver<Option<i32>>,
    /// Cancelled by the supervisor once the terminal has ended; the writer thread then ends.
    done: CancellationToken,
}

/// Starts a terminal's three blocking threads: one reads the pty, one waits for the process,
/// one writes keystrokes and applies resizes in the order they were sent.
fn start_terminal_threads(
    child: Box<dyn portable_pty::Child + Send + Sync>,
    master: Box<dyn MasterPty + Send>,
) -> Result<TerminalThreads, SandboxError> {
    let reader = master.try_clone_reader().map_err(pty_error)?;
    let writer = master.take_writer().map_err(pty_error)?;
    let (input, input_rx) = mpsc::channel(STDIN_QUEUE);
    let (resize, resize_rx) = mpsc::channel(RESIZE_QUEUE);
    let (output_tx, output) = mpsc::channel(TERM_QUEUE);
    let (exit_tx, exit) = oneshot::channel();
    let done = CancellationToken::new();
    let runtime = tokio::runtime::Handle::current();
    let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new().name(name.to_owned()).spawn(body).map(drop).map_err(SandboxError::Spawn)
    };
    let out = output_tx.clone();
    spawn("exec-bridge-pty-read", Box::new(move || read_pty(reader, out)))?;
    spawn(
        "exec-bridge-pty-wait",
        Box::new(move || {
            let _ = exit_tx.send(wait_for_exit(child));
        }),
    )?;
    let control = control_pty(writer, master, input_rx, resize_rx, done.clone());
    spawn("exec-bridge-pty-write", Box::new(move || runtime.block_on(control)))?;
    Ok(TerminalThreads { input, resize, output, output_tx, exit, done })
}

/// Forwards what the pty prints, one chunk of at most [`TERM_CHUNK`] at a time, waiting while
/// the output queue is full (the flow control); ends when every process of the terminal has
/// ended (reading then fails with `EIO`) or nobody reads any more.
fn read_pty(mut reader: Box<dyn Read + Send>, output: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; TERM_CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if output.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    return;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The terminal's exit code; `None` when bwrap itself died by a signal.
fn wait_for_exit(mut child: Box<dyn portable_pty::Child + Send + Sync>) -> Option<i32> {
    let status = child.wait().ok()?;
    if status.signal().is_some() {
        return None;
    }
    i32::try_from(status.exit_code()).ok()
}

/// Writes keystrokes to the pty and applies resizes, on a thread of its own (a write blocks
/// while the pty's input buffer is full). A resize sent before a keystroke is applied before it.
async fn control_pty(
    mut writer: Box<dyn Write + Send>,
    master: Box<dyn MasterPty + Send>,
    mut input: mpsc::Receiver<Bytes>,
    mut resize: mpsc::Receiver<TermSize>,
    done: CancellationToken,
) {
    let (mut input_open, mut resize_open) = (true, true);
    loop {
        tokio::select! {
            biased;
            () = done.cancelled() => break,
            size = resize.recv(), if resize_open => match size {
                Some(size) => {
                    if let Err(err) = master.resize(pty_size(size)) {
                        tracing::debug!(error = %err, "resizing a terminal failed");
                    }
                }
                None => resize_open = false,
            },
            chunk = input.recv(), if input_open => match chunk {
                Some(chunk) => input_open = writer.write_all(&chunk).and_then(|()| writer.flush()).is_ok(),
                None => input_open = false,
            },
        }
    }
    // Only now, with the terminal gone, is the writer dropped: portable-pty's writer types an
    // end-of-file when dropped, which must not end a shell whose input sender went away.
    drop(writer);
}

struct SupervisedTerminal {
    exit: oneshot::Receiver<Option<i32>>,
    output: mpsc::Sender<Bytes>,
    kill: Box<dyn FnOnce() + Send>,
    done: CancellationToken,
    registration: Registration,
}

/// Kills the terminal when nobody reads its output any more; reports its exit otherwise.
async fn supervise_terminal(terminal: SupervisedTerminal, exited: oneshot::Sender<Option<i32>>) {
    let SupervisedTerminal { mut exit, output, kill, done, registration } = terminal;
    let code = tokio::select! {
        code = &mut exit => code.ok().flatten(),
        () = output.closed() => {
            // SIGKILL to bwrap; its init in the pid namespace dies with it (--die-with-parent),
            // and with the init every process of the terminal.
            kill();
            let _ = exit.await;
            None
        }
    };
    drop(output);
    done.cancel();
    drop(registration);
    tracing::debug!(?code, "sandboxed terminal ended");
    let _ = exited.send(code);
}
