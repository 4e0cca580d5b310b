//! The bridge's side of the resident runner: a small Python process (`runner.py`) started once
//! in a Docker project's container, as the project's uid, that starts runs on request over a
//! Unix socket in the project's report folder, so a run needs no Docker API round trip.
//!
//! # Protocol
//!
//! One connection per run. Frames both ways are a kind byte, a big-endian `u32` length and the
//! payload. The bridge sends `R` (the command line, NUL-separated) first, then `I` (stdin bytes)
//! and `E` (end of stdin); closing its half of the connection means "kill the run". The runner
//! answers `s` (started) or `f` (failed to start), then `o` / `e` (stdout / stderr) and `x` (the
//! status as `sh` would report it) once the program has ended **and every other process of the
//! uid is dead** (`kill(-1, SIGKILL)`, which spares the caller).
//!
//! # Trust
//!
//! The runner runs as the same uid as the programs it starts, so a program can signal it. What
//! the bridge takes from it is only what a run's own output could claim anyway (output bytes;
//! an exit status, which the program could forge through `time`'s report already), plus one
//! thing it must trust: that `x` comes after the kill. That trust rests on a program being
//! unable to take the runner over: its code is its command line (no file a run could edit),
//! `-I -S` keep the workspace, `HOME` and the environment out of its imports, all imported at
//! start, and it makes itself non-dumpable (no `ptrace`, no `/proc/PID/mem` or `fd` for the same
//! uid). A program can only stop or kill it; the bridge then sees no `s`, no `x`, or an early end
//! of the connection, and kills the uid's processes through the engine as before (see
//! `docker.rs`), which ends the runner too; it is started again after that run.
//!
//! The socket lies in the report folder, which the uid may write: a run can remove or replace
//! it. A listener the run puts there dies in the kill at the run's end, and every connection
//! is checked (`SO_PEERCRED`) to come from the pid of the exec the bridge started; a missing
//! socket only means execs until the runner is started again. Nothing else of the uid runs in
//! the container between runs (terminals have containers of their own, without the folder).
//! The runner is one process of the uid, as the `sh` wrapper of an exec was; it counts toward
//! the uid's `RLIMIT_NPROC` while idle too. A program's stdin, stdout and stderr are pipes, as
//! under an exec.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::run::Stream as OutputStream;

/// The runner's code, passed on its command line.
pub(super) const SOURCE: &str = include_str!("runner.py");
/// The socket's name in the project's report folder.
pub(super) const SOCKET: &str = "runner.sock";
/// Longest wait for the runner to accept a run and say it started it.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest frame the bridge accepts from the runner (which sends at most 64 KiB of output).
const MAX_FRAME: usize = 1 << 20;
/// Largest stdin frame the bridge sends.
const STDIN_FRAME: usize = 64 << 10;

/// A started runner: where it listens and its pid (as the bridge sees it).
#[derive(Debug, Clone)]
pub(super) struct RunnerAddr {
    pub socket: PathBuf,
    pub pid: u32,
}

/// Why the runner could not take a run (the bridge then uses the engine instead).
#[derive(Debug, thiserror::Error)]
pub(super) enum RunnerError {
    #[error("talking to the runner failed")]
    Io(#[from] std::io::Error),
    #[error("the runner did not answer in time")]
    Timeout,
    #[error("the socket's peer is pid {peer:?}, not the runner's {runner}")]
    Impostor { peer: Option<i32>, runner: u32 },
    #[error("the runner could not start the run: {0}")]
    Refused(String),
    #[error("the runner broke the protocol")]
    Protocol,
}

/// What the runner sends during a run.
#[derive(Debug)]
pub(super) enum FromRunner {
    Output(OutputStream, Bytes),
    /// The program's status as `sh` reports it; every leftover process is dead.
    Exited(i32),
}

/// A run the runner started.
pub(super) struct RunnerRun {
    pub reader: OwnedReadHalf,
    pub writer: OwnedWriteHalf,
}

/// Connects to the runner at `addr`, checks it is the process the bridge started, and asks it
/// to run `argv`; returns once it has started it.
pub(super) async fn start(addr: &RunnerAddr, argv: &[String]) -> Result<RunnerRun, RunnerError> {
    let started = async {
        let stream = connect(addr).await?;
        let (mut reader, mut writer) = stream.into_split();
        writer.write_all(&frame(b'R', argv.join("\0").as_bytes())).await?;
        match read_frame(&mut reader).await? {
            Some((b's', _)) => Ok(RunnerRun { reader, writer }),
            Some((b'f', message)) => Err(RunnerError::Refused(String::from_utf8_lossy(&message).into_owned())),
            _ => Err(RunnerError::Protocol),
        }
    };
    tokio::time::timeout(START_TIMEOUT, started).await.map_err(|_| RunnerError::Timeout)?
}

/// Connects to the runner and checks the peer's pid.
pub(super) async fn connect(addr: &RunnerAddr) -> Result<UnixStream, RunnerError> {
    let stream = UnixStream::connect(&addr.socket).await?;
    let peer = stream.peer_cred()?.pid();
    if peer != i32::try_from(addr.pid).ok() {
        return Err(RunnerError::Impostor { peer, runner: addr.pid });
    }
    Ok(stream)
}

/// Waits until the runner started as `pid` listens on `socket`.
pub(super) async fn wait_ready(socket: &Path, pid: u32, patience: Duration) -> Result<RunnerAddr, RunnerError> {
    let addr = RunnerAddr { socket: socket.to_path_buf(), pid };
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match connect(&addr).await {
            // The runner reads the end of this connection as a request that never came.
            Ok(_) => return Ok(addr),
            Err(err) if tokio::time::Instant::now() >= deadline => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Forwards stdin chunks as `I` frames, then `E` (and cancels `closed`); returns (closing the
/// connection's writing half, which tells the runner to kill the run) once `kill` is cancelled.
pub(super) async fn feed(
    mut writer: OwnedWriteHalf,
    mut stdin: mpsc::Receiver<Bytes>,
    kill: CancellationToken,
    closed: CancellationToken,
) {
    let feeding = async {
        while let Some(chunk) = stdin.recv().await {
            for part in chunk.chunks(STDIN_FRAME) {
                writer.write_all(&frame(b'I', part)).await?;
            }
        }
        writer.write_all(&frame(b'E', &[])).await?;
        std::io::Result::Ok(())
    };
    tokio::select! {
        _ = feeding => {
            closed.cancel();
            kill.cancelled().await;
        }
        () = kill.cancelled() => {}
    }
    drop(writer);
}

/// Reads the runner's frames into `out` until its `x`; sends the status on `exited` (nothing
/// when the connection ends without one, or breaks the protocol).
pub(super) async fn read(
    mut reader: OwnedReadHalf,
    out: mpsc::Sender<(OutputStream, Bytes)>,
    exited: oneshot::Sender<i32>,
) {
    let mut out = Some(out);
    loop {
        let message = match read_frame(&mut reader).await {
            Ok(Some((b'o', bytes))) => FromRunner::Output(OutputStream::Stdout, bytes),
            Ok(Some((b'e', bytes))) => FromRunner::Output(OutputStream::Stderr, bytes),
            Ok(Some((b'x', bytes))) if bytes.len() == 4 => {
                FromRunner::Exited(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            }
            _ => return,
        };
        match message {
            FromRunner::Output(stream, bytes) => {
                // Nobody reads any more (the run is being killed): keep draining, so the
                // runner is not blocked writing and can report the end.
                if let Some(sender) = &out
                    && sender.send((stream, bytes)).await.is_err()
                {
                    out = None;
                }
            }
            FromRunner::Exited(code) => {
                drop(out);
                let _ = exited.send(code);
                return;
            }
        }
    }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(5 + payload.len());
    bytes.push(kind);
    // Payloads are far below 4 GiB: stdin is cut into frames, command lines are short.
    bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

async fn read_frame(reader: &mut OwnedReadHalf) -> Result<Option<(u8, Bytes)>, RunnerError> {
    let mut head = [0u8; 5];
    match reader.read_exact(&mut head).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(RunnerError::Protocol);
    }
    let mut payload = BytesMut::zeroed(len);
    reader.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload.freeze())))
}
