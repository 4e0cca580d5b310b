//! The local sandbox: bubblewrap, with rlimits set by util-linux's `prlimit` and the verdict's
//! evidence gathered by GNU `time`.
//!
//! # The command line
//!
//! ```text
//! setpriv --reuid=ID --regid=ID --clear-groups --inh-caps=-all --bounding-set=-all --   (only as root)
//! bwrap --unshare-all --unshare-user --disable-userns --die-with-parent --new-session
//!       --clearenv --setenv PATH .. --setenv HOME /workspace --setenv LANG C.UTF-8 ..
//!       --ro-bind /usr /usr  --symlink usr/bin /bin  (each of /bin /sbin /lib* as on the host)
//!       --proc /proc --dev /dev --size 64MiB --tmpfs /tmp
//!       --bind WORKSPACE /workspace --bind REPORT /.exec-bridge-report --chdir /workspace
//!       --remount-ro /
//!       -- /usr/bin/prlimit --as=.. --cpu=C:C+1 --fsize=.. --nproc=.. --core=0
//!       -- /usr/bin/time -o /.exec-bridge-report -f '%x %U %S %M' -- PROGRAM ARGS..
//! ```
//!
//! * **Nothing of the host but `/usr`.** No `/etc` at all (python3 and gcc need none: the
//!   loader finds libraries in its built-in paths), no `/home`, `/root`, `/var`, `/run` or the
//!   bridge's data; `/tmp` is a fresh size-capped tmpfs; the root is remounted read-only so the
//!   only writable places are the workspace, `/tmp` and the report file.
//! * **No network**: `--unshare-all` gives a new network namespace with only a down loopback.
//!   It also unshares pid (so killing bwrap kills every process of the run: when the pid
//!   namespace's init dies the kernel kills the rest), ipc, uts and cgroup namespaces.
//!   `--disable-userns` stops the program from nesting user namespaces.
//! * **The process limit bites only for a non-root uid.** The kernel exempts uid 0 from
//!   `RLIMIT_NPROC` (a root fork bomb forked 32,000 processes in a trial), and a user namespace
//!   created by root maps the sandbox's uid back to real uid 0, so `bwrap --uid` alone is not
//!   enough. When the bridge runs as root, `setpriv` therefore switches to a dedicated
//!   unprivileged id ([`DEFAULT_SANDBOX_ID`]) before bwrap, which then sets up its namespaces
//!   unprivileged (this needs unprivileged user namespaces, which Debian enables). `prlimit`
//!   runs *inside* the new user namespace: since Linux 5.14 `RLIMIT_NPROC` is counted per
//!   (user namespace, uid), so the 64 processes are this run's own, and concurrent runs under
//!   the same id do not share (or exhaust) one budget. (A cgroup `pids.max` would also work
//!   but needs a writable cgroup tree, which CI containers often lack.)
//! * **The workspace belongs to the sandbox id.** Running as root, the sandbox `lchown`s the
//!   workspace tree to that id before each run, so the program can change the project's files;
//!   the bridge, being root, still reads and writes them.
//! * **Verdict evidence from GNU `time`.** bwrap reports a child killed by signal N as exit code
//!   128+N, which a program could also exit with. `time` waits for the program with `wait4` and
//!   writes to a report file bound from the host: "Command terminated by signal N" when it was
//!   signalled, then exit code, user and system CPU seconds and peak resident KiB. The program
//!   could overwrite that file (same uid), but only to mislead its own author about its own run;
//!   every limit is enforced by rlimits set before it started or by the bridge from outside.
//!
//! # Terminals
//!
//! A terminal is the same command line with `/bin/bash` in place of `time` and the program, on a
//! pseudo-terminal (`portable-pty`), with `TERM=xterm-256color` and without `--new-session`:
//! the pty is the controlling terminal of the session `portable-pty` starts for `setpriv`, and
//! the shell inside must share that session for job control, Ctrl-C and `SIGWINCH` to reach
//! its programs. (`--new-session` guards against `TIOCSTI` pushing keystrokes into the
//! terminal of whoever started bwrap; this pty belongs to the sandbox alone, so nothing outside
//! it can be typed into.) A blocking thread reads the pty master in chunks of at most
//! [`TERM_CHUNK`] into the bounded output channel and waits when it is full: the pty's buffer
//! then fills and the shell's programs block writing. Dropping the output receiver sends
//! SIGKILL to bwrap through a pidfd opened at spawn (so never to a recycled pid), which takes
//! the pid namespace and every process of the terminal with it, as for a run.
//!
//! # Previews
//!
//! Every run and terminal has a network namespace of its own, so a server started in one is
//! reachable only from inside it. The sandbox keeps the outer bwrap process of each live run and
//! terminal per workspace; [`Sandbox::connect_port`] finds bwrap's one child (the sandbox's
//! init, inside the namespaces), reads which of their network namespaces has a socket listening
//! on the port, and connects from a thread that enters that namespace (see `sandbox::netns`
//! for the privilege this needs: root, as the bridge runs). A preview thus reaches the newest
//! program that listens on the port, and nothing else: not the host, not another workspace.
//!
//! # Telling the limits apart
//!
//! * wall time and output: the bridge killed the run itself, so it knows.
//! * CPU time: `RLIMIT_CPU` sends SIGXCPU at the limit and SIGKILL a second later; either
//!   signal with the CPU time `time` reports at or past the limit is [`TimeLimit::Cpu`].
//! * memory: `RLIMIT_AS` makes allocations fail, so a memory bomb dies by its own hand (Python's
//!   `MemoryError` exits 1, C's unchecked `malloc` segfaults, C++ aborts). A run that ends
//!   abnormally (non-zero exit or a signal) with a peak resident size of at least 3/4 of the
//!   limit is [`Verdict::MemoryLimit`]; the quarter leaves room for address space a process
//!   reserves but never touches (libraries, thread stacks). One huge allocation refused while
//!   the process is small shows as the program's own failure, which is what it is.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use portable_pty::{CommandBuilder, MasterPty, PtySize};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    EVENT_QUEUE, Execution, Forwarded, OutputBudget, PortStream, RESIZE_QUEUE, STDIN_QUEUE, Sandbox, SandboxCommand,
    SandboxError, TERM_CHUNK, TERM_QUEUE, TermSize, Terminal, netns,
};
use crate::run::{Limits, RunEvent, Stream, TimeLimit, Verdict};

/// The uid and gid sandboxed programs run as when the bridge runs as root: outside passwd,
/// Debian's reserved ranges and the usual subuid ranges, so no host process shares it. (Ids of
/// 2^31 and above fail: bwrap 0.8 cannot map them.)
pub const DEFAULT_SANDBOX_ID: u32 = 2_000_000_000;

/// Where the workspace appears inside the sandbox; also the working directory.
pub const WORKSPACE_MOUNT: &str = "/workspace";

const REPORT_MOUNT: &str = "/.exec-bridge-report";
const TMP_SIZE_BYTES: u64 = 64 << 20;
const PRLIMIT: &str = "/usr/bin/prlimit";
const TIME: &str = "/usr/bin/time";
const SETPRIV: &str = "/usr/bin/setpriv";
const INSTALL_HINT: &str = "`cargo xtask test` installs it with apt";
const SIGKILL: i32 = 9;
const SIGXCPU: i32 = 24;
/// The shell of a terminal.
const SHELL: &str = "/bin/bash";
/// `TERM` of a terminal: what the browser's terminal emulator understands.
pub const TERM: &str = "xterm-256color";

/// Configuration of [`LocalSandbox`].
#[derive(Debug, Clone)]
pub struct LocalSandboxConfig {
    /// The bubblewrap binary.
    pub bwrap: PathBuf,
    /// The uid and gid of sandboxed programs when the bridge runs as root.
    pub sandbox_id: u32,
    /// Where per-run report files are created (outside every workspace).
    pub scratch_dir: PathBuf,
}

impl Default for LocalSandboxConfig {
    fn default() -> Self {
        LocalSandboxConfig {
            bwrap: PathBuf::from("/usr/bin/bwrap"),
            sandbox_id: DEFAULT_SANDBOX_ID,
            scratch_dir: std::env::temp_dir(),
        }
    }
}

/// Runs commands with bubblewrap on this machine; see the module documentation.
#[derive(Debug, Clone)]
pub struct LocalSandbox {
    config: LocalSandboxConfig,
    /// `Some(id)` when the bridge runs as root and must drop to `id` before bwrap.
    drop_to: Option<u32>,
    /// The runs and terminals running now (shared by clones), where previews look for listeners.
    live: Arc<Live>,
}

/// What a sandbox is started for.
enum Purpose<'a> {
    /// A run of `command`, on which GNU `time` writes its report to `report`.
    Run { command: &'a SandboxCommand, report: &'a Path },
    /// An interactive shell on a pty.
    Terminal,
}

impl LocalSandbox {
    /// Checks that the tools are installed and whether the bridge runs as root.
    pub fn new(config: LocalSandboxConfig) -> Result<Self, SandboxError> {
        let as_root = std::fs::metadata("/proc/self").map(|meta| meta.uid() == 0).unwrap_or(false);
        let bwrap = config.bwrap.clone();
        require(&bwrap, "bwrap (Debian package bubblewrap)")?;
        require(Path::new(PRLIMIT), "prlimit (Debian package util-linux)")?;
        require(Path::new(TIME), "time (Debian package time)")?;
        if as_root {
            require(Path::new(SETPRIV), "setpriv (Debian package util-linux)")?;
        }
        let drop_to = as_root.then_some(config.sandbox_id);
        Ok(LocalSandbox { config, drop_to, live: Arc::default() })
    }

    /// The canonical workspace, given (with `report`, if any) to the sandbox id when the bridge
    /// runs as root.
    async fn prepare(&self, workspace: &Path, report: Option<&Path>) -> Result<PathBuf, SandboxError> {
        let workspace_error = |source| SandboxError::Workspace { path: workspace.display().to_string(), source };
        let workspace = tokio::fs::canonicalize(workspace).await.map_err(workspace_error)?;
        if let Some(id) = self.drop_to {
            let (dir, report) = (workspace.clone(), report.map(Path::to_owned));
            let given = tokio::task::spawn_blocking(move || {
                give_workspace(&dir, id)?;
                report.map_or(Ok(()), |report| std::os::unix::fs::chown(report, Some(id), Some(id)))
            })
            .await
            .map_err(|join| SandboxError::Spawn(std::io::Error::other(join)))?;
            given.map_err(|source| SandboxError::Workspace { path: workspace.display().to_string(), source })?;
        }
        Ok(workspace)
    }

    /// The full command line of one sandbox, starting with the program to execute.
    fn command_line(&self, workspace: &Path, purpose: &Purpose<'_>, limits: &Limits) -> Vec<OsString> {
        let mut line: Vec<OsString> = Vec::new();
        if let Some(id) = self.drop_to {
            line.push(SETPRIV.into());
            for arg in [format!("--reuid={id}"), format!("--regid={id}")] {
                line.push(arg.into());
            }
            for arg in ["--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"] {
                line.push(arg.into());
            }
        }
        line.push(self.config.bwrap.clone().into());
        line.extend(bwrap_args(workspace, purpose));
        line.push("--".into());
        line.extend(inner_args(purpose, limits));
        line
    }
}

fn require(path: &Path, what: &'static str) -> Result<(), SandboxError> {
    if path.is_file() {
        return Ok(());
    }
    Err(SandboxError::ToolMissing { tool: what, hint: INSTALL_HINT })
}

fn bwrap_args(workspace: &Path, purpose: &Purpose<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]);
    push(&["--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin"]);
    match purpose {
        Purpose::Run { .. } => push(&["--new-session"]),
        // The shell needs the pty as its controlling terminal; see the module documentation.
        Purpose::Terminal => push(&["--setenv", "TERM", TERM]),
    }
    push(&["--setenv", "HOME", WORKSPACE_MOUNT, "--setenv", "LANG", "C.UTF-8", "--setenv", "TMPDIR", "/tmp"]);
    // Output appears as the program writes it, which an IDE's console wants.
    push(&["--setenv", "PYTHONUNBUFFERED", "1"]);
    push(&["--ro-bind", "/usr", "/usr"]);
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = PathBuf::from("/").join(top);
        let Ok(meta) = host.symlink_metadata() else { continue };
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&host) {
                args.extend(["--symlink".into(), target.into_os_string(), host.into_os_string()]);
            }
        } else if meta.is_dir() {
            args.extend(["--ro-bind".into(), host.clone().into_os_string(), host.into_os_string()]);
        }
    }
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["--proc", "/proc", "--dev", "/dev"]);
    push(&["--size", &TMP_SIZE_BYTES.to_string(), "--tmpfs", "/tmp"]);
    args.extend(["--bind".into(), workspace.as_os_str().to_owned(), WORKSPACE_MOUNT.into()]);
    if let Purpose::Run { report, .. } = purpose {
        args.extend(["--bind".into(), report.as_os_str().to_owned(), REPORT_MOUNT.into()]);
    }
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["--chdir", WORKSPACE_MOUNT, "--remount-ro", "/"]);
    args
}

/// `prlimit` inside the sandbox, then `time` and the program of a run, or a terminal's shell.
fn inner_args(purpose: &Purpose<'_>, limits: &Limits) -> Vec<OsString> {
    let cpu = limits.cpu_time.as_secs().max(1);
    let mut args: Vec<OsString> = vec![
        PRLIMIT.into(),
        format!("--as={}", limits.memory_bytes).into(),
        // SIGXCPU at the limit, SIGKILL one second later for a program that ignores it.
        format!("--cpu={cpu}:{}", cpu + 1).into(),
        format!("--fsize={}", limits.file_size_bytes).into(),
        format!("--nproc={}", limits.processes).into(),
        "--core=0".into(),
        "--".into(),
    ];
    match purpose {
        Purpose::Run { command, .. } => {
            let time = [TIME, "-o", REPORT_MOUNT, "-f", "%x %U %S %M", "--", &command.program];
            args.extend(time.into_iter().map(OsString::from));
            args.extend(command.args.iter().map(OsString::from));
        }
        Purpose::Terminal => args.push(SHELL.into()),
    }
    args
}

/// The sandboxes running now, by canonical workspace: [`Sandbox::connect_port`] looks in their
/// network namespaces for a listener.
#[derive(Debug, Default)]
struct Live {
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
struct Registration {
    live: Arc<Live>,
    workspace: PathBuf,
    key: u64,
}

impl Live {
    /// Records the bwrap process `pid`, which must not have been waited for yet.
    fn register(self: &Arc<Self>, workspace: &Path, pid: u32) -> std::io::Result<(Registration, Arc<OwnedFd>)> {
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

/// Gives the workspace tree to `id` (not following symlinks), so the sandboxed program can
/// change the project's files.
pub(super) fn give_workspace(dir: &Path, id: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(id), Some(id))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            give_workspace(&path, id)?;
        } else {
            std::os::unix::fs::lchown(&path, Some(id), Some(id))?;
        }
    }
    Ok(())
}

#[async_trait]
impl Sandbox for LocalSandbox {
    async fn open_terminal(&self, workspace: &Path, size: TermSize, limits: &Limits) -> Result<Terminal, SandboxError> {
        let workspace = self.prepare(workspace, None).await?;
        let line = self.command_line(&workspace, &Purpose::Terminal, limits);
        let pty = portable_pty::native_pty_system().openpty(pty_size(size)).map_err(pty_error)?;
        let mut builder = CommandBuilder::new(&line[0]);
        builder.args(&line[1..]);
        builder.cwd("/");
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

    async fn connect_port(&self, workspace: &Path, port: u16) -> Result<Box<dyn PortStream>, SandboxError> {
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

    async fn start(
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
        let mut child = Command::new(&line[0])
            .args(&line[1..])
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
        if let Some(stdin) = child.stdin.take() {
            tokio::spawn(feed_stdin(stdin, stdin_rx));
        }
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(read_output(stdout, Stream::Stdout, out_tx.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(read_output(stderr, Stream::Stderr, out_tx));
        }
        let run = Supervised { child, report, limits: limits.clone(), _registration: registration };
        tokio::spawn(supervise(run, out_rx, events_tx));
        Ok(Execution { stdin: stdin_tx, events: events_rx })
    }
}

async fn feed_stdin(mut stdin: ChildStdin, mut chunks: mpsc::Receiver<Bytes>) {
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

struct Supervised {
    child: Child,
    report: tempfile::NamedTempFile,
    limits: Limits,
    /// Keeps the run where previews look until it has ended.
    _registration: Registration,
}

/// Forwards output, enforces the wall-time and output limits, and sends the verdict.
async fn supervise(mut run: Supervised, mut output: mpsc::Receiver<(Stream, Bytes)>, events: mpsc::Sender<RunEvent>) {
    let deadline = tokio::time::sleep(run.limits.wall_time);
    tokio::pin!(deadline);
    let mut budget = OutputBudget::new(run.limits.output_bytes);
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
            () = &mut deadline => break Some(Some(Verdict::TimeLimit(TimeLimit::Wall))),
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

/// What GNU `time` wrote about the program.
#[derive(Debug, PartialEq)]
struct Report {
    signal: Option<i32>,
    code: i32,
    cpu: Duration,
    max_resident_bytes: u64,
}

fn parse_report(text: &str) -> Option<Report> {
    let signal = text
        .lines()
        .find_map(|line| line.strip_prefix("Command terminated by signal "))
        .and_then(|n| n.trim().parse().ok());
    let mut fields = text.lines().last()?.split_whitespace();
    let code = fields.next()?.parse().ok()?;
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    let max_resident_kib: u64 = fields.next()?.parse().ok()?;
    let cpu = Duration::try_from_secs_f64(user + system).ok()?;
    Some(Report { signal, code, cpu, max_resident_bytes: max_resident_kib * 1024 })
}

/// The verdict of a run that ended by itself, from bwrap's status and `time`'s report.
pub(super) fn judge(status: ExitStatus, report: &str, limits: &Limits) -> Verdict {
    let Some(report) = parse_report(report) else {
        // `time` never ran (bwrap failed to set up, which it explains on stderr) or the
        // program mangled the report: fall back on bwrap's status, 128+N meaning signal N.
        return match status.code() {
            Some(code) if code > 128 => Verdict::Signaled { signal: code - 128 },
            Some(code) => Verdict::Exited { code },
            None => Verdict::Signaled { signal: std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0) },
        };
    };
    let near_memory_limit = report.max_resident_bytes >= limits.memory_bytes / 4 * 3;
    match report.signal {
        Some(SIGXCPU) => Verdict::TimeLimit(TimeLimit::Cpu),
        Some(SIGKILL) if report.cpu >= limits.cpu_time => Verdict::TimeLimit(TimeLimit::Cpu),
        Some(_) if near_memory_limit => Verdict::MemoryLimit,
        Some(signal) => Verdict::Signaled { signal },
        None if report.code != 0 && near_memory_limit => Verdict::MemoryLimit,
        None => Verdict::Exited { code: report.code },
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn check(report: &str, expected: Verdict) {
        let limits = Limits::default();
        assert_eq!(judge(ExitStatus::from_raw(0), report, &limits), expected, "report {report:?}");
    }

    #[test]
    fn judges_time_reports() {
        check("0 0.01 0.00 9000\n", Verdict::Exited { code: 0 });
        check("Command exited with non-zero status 139\n139 0.01 0.00 9000\n", Verdict::Exited { code: 139 });
        check("Command terminated by signal 11\n0 0.01 0.00 9000\n", Verdict::Signaled { signal: 11 });
        check("Command terminated by signal 24\n0 5.00 0.00 9000\n", Verdict::TimeLimit(TimeLimit::Cpu));
        check("Command terminated by signal 9\n0 5.90 0.10 9000\n", Verdict::TimeLimit(TimeLimit::Cpu));
        check("Command terminated by signal 9\n0 0.10 0.10 9000\n", Verdict::Signaled { signal: 9 });
        check("Command exited with non-zero status 1\n1 0.20 0.10 250000\n", Verdict::MemoryLimit);
        check("Command terminated by signal 11\n0 0.20 0.10 250000\n", Verdict::MemoryLimit);
        check("0 0.20 0.10 250000\n", Verdict::Exited { code: 0 });
    }

    #[test]
    fn falls_back_on_bwrap_status_without_a_report() {
        let limits = Limits::default();
        assert_eq!(judge(ExitStatus::from_raw(139 << 8), "", &limits), Verdict::Signaled { signal: 11 });
        assert_eq!(judge(ExitStatus::from_raw(1 << 8), "garbage", &limits), Verdict::Exited { code: 1 });
    }
}
