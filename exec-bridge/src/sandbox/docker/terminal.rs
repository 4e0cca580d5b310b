//! A terminal of a Docker project: a container of its own in the project container's network
//! namespace, read and written over the raw attach stream, removed when nobody reads it.

use std::path::Path;
use std::sync::atomic::Ordering;

use bollard::Docker;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, ResizeContainerTTYOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::attach::attach_raw;
use super::container::terminal_body;
use super::{ATTACH_TIMEOUT, DockerSandbox, TerminalSlot, canonical, engine};
use crate::job::{Limits, RESIZE_QUEUE, STDIN_QUEUE, SandboxError, TERM_CHUNK, TERM_QUEUE, TermSize, Terminal};
use crate::sandbox::owner::give_workspace;

impl DockerSandbox {
    pub(super) async fn open_container_terminal(
        &self,
        workspace: &Path,
        size: TermSize,
        limits: &Limits,
    ) -> Result<Terminal, SandboxError> {
        let workspace = canonical(workspace).await?;
        let slot = self.terminal_slot(&workspace).await?;
        let (dir, id) = (workspace.clone(), slot.project.id);
        let given = tokio::task::spawn_blocking(move || give_workspace(&dir, id))
            .await
            .map_err(|join| SandboxError::Spawn(std::io::Error::other(join)))?;
        given.map_err(|source| SandboxError::Workspace { path: workspace.display().to_string(), source })?;
        let (first, stream) = self.start_terminal(&slot, &workspace, size, limits).await?;
        tracing::debug!(container = %slot.container, "docker terminal started");

        let (reader, writer) = stream.into_split();
        let (input_tx, input_rx) = mpsc::channel(STDIN_QUEUE);
        let (resize_tx, resize_rx) = mpsc::channel(RESIZE_QUEUE);
        let (output_tx, output_rx) = mpsc::channel(TERM_QUEUE);
        let (exited_tx, exited_rx) = oneshot::channel();
        let done = CancellationToken::new();
        // Asked for now, long before the shell can end: an auto-removed container that is gone
        // when asked has no exit code any more.
        let exit = tokio::spawn(terminal_exit(self.docker.clone(), slot.container.clone()));
        tokio::spawn(read_terminal(first, reader, output_tx.clone()));
        let control = TerminalControl {
            docker: self.docker.clone(),
            container: slot.container.clone(),
            writer,
            input: input_rx,
            resize: resize_rx,
            done: done.clone(),
        };
        tokio::spawn(control_terminal(control));
        let supervised = SupervisedTerminal { docker: self.docker.clone(), slot, exit, output: output_tx, done };
        tokio::spawn(supervise_terminal(supervised, exited_tx));
        Ok(Terminal { input: input_tx, resize: resize_tx, output: output_rx, exited: exited_rx })
    }

    /// A place for a new terminal in `workspace`'s project (started if need be).
    async fn terminal_slot(&self, workspace: &Path) -> Result<TerminalSlot, SandboxError> {
        loop {
            let project = self.project(workspace).await?;
            let container = format!(
                "{}-term-{}-{}",
                project.container,
                std::process::id(),
                self.terminals.fetch_add(1, Ordering::Relaxed)
            );
            let mut terminals = project.terminals();
            if project.retired.load(Ordering::Acquire) {
                continue;
            }
            terminals.insert(container.clone());
            drop(terminals);
            return Ok(TerminalSlot { project, container });
        }
    }

    /// Starts a terminal's container for `slot` and attaches to it; removes it on failure.
    async fn start_terminal(
        &self,
        slot: &TerminalSlot,
        workspace: &Path,
        size: TermSize,
        limits: &Limits,
    ) -> Result<(Bytes, UnixStream), SandboxError> {
        let container = &slot.container;
        let body = terminal_body(&self.config, workspace, &slot.project, limits);
        let options = CreateContainerOptionsBuilder::new().name(container).build();
        let created = self.docker.create_container(Some(options), body).await.map_err(engine)?;
        for warning in created.warnings {
            tracing::warn!(%container, %warning, "the engine changed the terminal container's configuration");
        }
        let started = async {
            // Attached before the start, so nothing the shell prints first is lost.
            let version = self.docker.client_version();
            let path = format!(
                "/v{}.{}/containers/{container}/attach?stream=1&stdin=1&stdout=1&stderr=1",
                version.major_version, version.minor_version
            );
            let attached = tokio::time::timeout(ATTACH_TIMEOUT, attach_raw(&self.socket, &path)).await;
            let attached = attached
                .map_err(|elapsed| SandboxError::Spawn(std::io::Error::other(elapsed)))?
                .map_err(SandboxError::Spawn)?;
            self.docker.start_container(container, None).await.map_err(engine)?;
            resize_terminal(&self.docker, container, size).await.map_err(engine)?;
            Ok(attached)
        };
        let started = started.await;
        if started.is_err()
            && let Err(err) = self.remove_container(container).await
        {
            tracing::warn!(error = %err, %container, "removing a terminal that failed to start failed");
        }
        started
    }
}

/// Sets the size of a terminal's tty (its programs get `SIGWINCH`).
async fn resize_terminal(docker: &Docker, container: &str, size: TermSize) -> Result<(), bollard::errors::Error> {
    let options = ResizeContainerTTYOptionsBuilder::new().h(i32::from(size.rows)).w(i32::from(size.cols)).build();
    docker.resize_container_tty(container, options).await
}

/// Forwards the tty's bytes in chunks of at most [`TERM_CHUNK`], waiting while the output
/// queue is full (the flow control); ends when the container's tty closes or nobody reads.
async fn read_terminal(first: Bytes, mut reader: OwnedReadHalf, output: mpsc::Sender<Bytes>) {
    for start in (0..first.len()).step_by(TERM_CHUNK) {
        let chunk = first.slice(start..(start + TERM_CHUNK).min(first.len()));
        if output.send(chunk).await.is_err() {
            return;
        }
    }
    let mut buf = vec![0u8; TERM_CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if output.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The exit code of a terminal's container once it stops.
async fn terminal_exit(docker: Docker, container: String) -> Option<i32> {
    let options = WaitContainerOptionsBuilder::new().condition("not-running").build();
    let mut wait = docker.wait_container(&container, Some(options));
    match wait.next().await? {
        Ok(response) => i32::try_from(response.status_code).ok(),
        // bollard reports a non-zero exit as an error carrying the code.
        Err(bollard::errors::Error::DockerContainerWaitError { code, .. }) => i32::try_from(code).ok(),
        Err(err) => {
            tracing::warn!(error = %err, %container, "waiting for a terminal failed");
            None
        }
    }
}

struct TerminalControl {
    docker: Docker,
    container: String,
    writer: OwnedWriteHalf,
    input: mpsc::Receiver<Bytes>,
    resize: mpsc::Receiver<TermSize>,
    done: CancellationToken,
}

/// Writes keystrokes and applies resizes, a resize sent before a keystroke before it. Keeps the
/// connection's writing half until the terminal has ended: closing it would close the shell's
/// stdin (the container's stdin is closed when its attached client goes).
async fn control_terminal(control: TerminalControl) {
    let TerminalControl { docker, container, mut writer, mut input, mut resize, done } = control;
    let (mut input_open, mut resize_open) = (true, true);
    loop {
        tokio::select! {
            biased;
            () = done.cancelled() => break,
            size = resize.recv(), if resize_open => match size {
                Some(size) => {
                    if let Err(err) = resize_terminal(&docker, &container, size).await {
                        tracing::debug!(error = %err, %container, "resizing a terminal failed");
                    }
                }
                None => resize_open = false,
            },
            chunk = input.recv(), if input_open => match chunk {
                Some(chunk) => {
                    tokio::select! {
                        written = writer.write_all(&chunk) => input_open = written.is_ok(),
                        () = done.cancelled() => break,
                    }
                }
                None => input_open = false,
            },
        }
    }
    drop(writer);
}

struct SupervisedTerminal {
    docker: Docker,
    slot: TerminalSlot,
    exit: tokio::task::JoinHandle<Option<i32>>,
    output: mpsc::Sender<Bytes>,
    done: CancellationToken,
}

/// Removes the terminal's container when nobody reads its output any more; reports its exit
/// otherwise.
async fn supervise_terminal(terminal: SupervisedTerminal, exited: oneshot::Sender<Option<i32>>) {
    let SupervisedTerminal { docker, slot, mut exit, output, done } = terminal;
    let code = tokio::select! {
        code = &mut exit => code.ok().flatten(),
        () = output.closed() => None,
    };
    exit.abort();
    // Close our end of the attach connection first: with a program still writing, the engine
    // waits to copy its output to us, and does not finish removing the container until then.
    done.cancel();
    // Gone already when the shell exited (auto-removed); killed and removed otherwise.
    let options = RemoveContainerOptionsBuilder::new().force(true).build();
    match docker.remove_container(&slot.container, Some(options)).await {
        Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404 | 409, .. }) => {}
        Err(err) => tracing::warn!(error = %err, container = %slot.container, "removing a terminal failed"),
    }
    drop(output);
    tracing::debug!(?code, container = %slot.container, "docker terminal ended");
    drop(slot);
    let _ = exited.send(code);
}
