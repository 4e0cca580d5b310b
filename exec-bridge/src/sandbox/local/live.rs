//! The local sandboxes running now, per workspace, and how a preview finds the one whose network
//! namespace has a listener on a port.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::process::{Pid, PidfdFlags, pidfd_open};

use super::LocalSandbox;
use crate::job::{PortStream, SandboxError};
use crate::sandbox::netns;

/// The sandboxes running now, by canonical workspace: [`Sandbox::connect_port`] looks in their
/// network namespaces for a listener.
#[derive(Debug, Default)]
pub(super) struct Live {
    next_key: AtomicU64,
    sandboxes: Mutex<HashMap<PathBuf, Vec<LiveSandbox>>>,
}

/// One running bwrap, of a run or a terminal.
#[derive(Debug, Clone)]
struct LiveSandbox {
    key: u64,
    /// The outer bwrap process, in the bridge's namespaces; its one child is the sandbox's init.
    pid: u32,
    /// Opened before anyone could reap `pid`, so it names that process and never a later one.
    pidfd: Arc<OwnedFd>,
}

/// A sandbox's entry in [`Live`], removed when dropped.
pub(super) struct Registration {
    live: Arc<Live>,
    workspace: PathBuf,
    key: u64,
}

impl Live {
    /// Records the bwrap process `pid`, which must not have been waited for yet.
    pub(super) fn register(
        self: &Arc<Self>,
        workspace: &Path,
        pid: u32,
    ) -> std::io::Result<(Registration, Arc<OwnedFd>)> {
        let raw = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or_else(|| std::io::Error::other("no pid"))?;
        let pidfd = Arc::new(pidfd_open(raw, PidfdFlags::empty())?);
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let sandbox = LiveSandbox { key, pid, pidfd: Arc::clone(&pidfd) };
        let mut sandboxes = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
        sandboxes.entry(workspace.to_owned()).or_default().push(sandbox);
        Ok((Registration { live: Arc::clone(self), workspace: workspace.to_owned(), key }, pidfd))
    }

    /// The live sandboxes of `workspace`, newest first.
    fn of(&self, workspace: &Path) -> Vec<LiveSandbox> {
        let sandboxes = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
        sandboxes.get(workspace).map(|list| list.iter().rev().cloned().collect()).unwrap_or_default()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut sandboxes = self.live.sandboxes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = sandboxes.get_mut(&self.workspace) {
            list.retain(|sandbox| sandbox.key != self.key);
            if list.is_empty() {
                sandboxes.remove(&self.workspace);
            }
        }
    }
}

/// Whether the process of `pidfd` has ended (a pidfd is readable once it has).
fn has_ended(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(pidfd, rustix::event::PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    rustix::event::poll(&mut fds, Some(&zero)).map_or(true, |ready| ready > 0)
}

/// The network namespace and address of a listener on `port` in one of `sandboxes`, if any.
///
/// Every step is checked against a recycled pid: the namespace is opened only from bwrap's
/// child, which is checked to still be that child (and bwrap, through its pidfd, to still be
/// running) after the namespace was opened.
fn find_listener(sandboxes: &[LiveSandbox], port: u16) -> Option<(std::fs::File, std::net::SocketAddr)> {
    sandboxes.iter().find_map(|sandbox| {
        if has_ended(&sandbox.pidfd) {
            return None;
        }
        let pid = sandbox.pid;
        let init = first_child(pid)?;
        let addr = netns::listening_address(init, port).ok()??;
        let namespace = netns::open(init).ok()?;
        let still_ours = parent_of(init) == Some(pid) && !has_ended(&sandbox.pidfd);
        still_ours.then_some((namespace, addr))
    })
}

/// A child of `pid` (bwrap has one): from `/proc/PID/task/PID/children`, or, on kernels built
/// without it, by looking through every process's parent.
fn first_child(pid: u32) -> Option<u32> {
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        return children.split_whitespace().next()?.parse().ok();
    }
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let candidate: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        (parent_of(candidate) == Some(pid)).then_some(candidate)
    })
}

/// The parent of `pid`, from `/proc/PID/stat` (whose second field, the name, may hold spaces).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

impl LocalSandbox {
    pub(super) async fn connect_to_port(
        &self,
        workspace: &Path,
        port: u16,
    ) -> Result<Box<dyn PortStream>, SandboxError> {
        let workspace = tokio::fs::canonicalize(workspace)
            .await
            .map_err(|source| SandboxError::Workspace { path: workspace.display().to_string(), source })?;
        let sandboxes = self.live.of(&workspace);
        let found = tokio::task::spawn_blocking(move || find_listener(&sandboxes, port))
            .await
            .map_err(|join| SandboxError::Spawn(std::io::Error::other(join)))?;
        let Some((namespace, addr)) = found else {
            return Err(SandboxError::NotListening { port });
        };
        let stream = netns::connect_inside(namespace, addr).await?;
        Ok(Box::new(stream))
    }
}
