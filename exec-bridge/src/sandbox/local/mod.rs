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
//! * **The workspace belongs to the sandbox id.** Running as root, the sandbox re-owns the
//!   workspace tree to that id before each run, so the program can change the project's files;
//!   the bridge, being root, still reads and writes them. The walk goes through directory
//!   handles and never follows a symlink (see `sandbox::owner`), since a program in an open
//!   terminal can swap a folder for a symlink to the host while it runs. bwrap, running as that
//!   id, opens the workspace by its path, so every folder above it must let the id search it:
//!   [`Sandbox::check_reachable`] says at the server's start when one does not (a data
//!   directory of mode 0700), and so does every run.
//! * **Nothing of the server's environment.** bwrap is started with an empty environment (its
//!   own process is the sandbox's init, whose `/proc/1/environ` the program can read); the
//!   program's variables are only those of `--setenv`.
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
//!
//! # Where the code is
//!
//! `command` builds the command line above, `run` starts and supervises a run, `terminal` a
//! terminal on its pty, `live` keeps the running sandboxes for previews; the ownership walk is
//! `super::owner` and the verdict from `time`'s report `super::verdict` (both shared with Docker).

mod command;
mod live;
mod run;
mod terminal;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use super::{Execution, PortStream, Sandbox, SandboxCommand, SandboxError, TermSize, Terminal, owner};
use crate::job::Limits;
use live::Live;

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

    /// Checks that the sandbox's uid can reach workspaces in `dir`: bwrap runs as that uid and
    /// opens the workspace by its path, so every folder above it must let the uid search it (a
    /// data directory of mode 0700 does not). The server calls this at start for its
    /// workspaces folder; every run and terminal checks its own workspace again.
    fn check_folders(&self, dir: &Path) -> Result<(), SandboxError> {
        let Some(id) = self.drop_to else { return Ok(()) };
        let dir = std::fs::canonicalize(dir)
            .map_err(|source| SandboxError::Workspace { path: dir.display().to_string(), source })?;
        for folder in dir.ancestors() {
            let meta = std::fs::metadata(folder)
                .map_err(|source| SandboxError::Workspace { path: folder.display().to_string(), source })?;
            let mode = meta.mode() & 0o7777;
            let search = match (meta.uid() == id, meta.gid() == id) {
                (true, _) => mode & 0o100,
                (false, true) => mode & 0o010,
                (false, false) => mode & 0o001,
            };
            if search == 0 {
                return Err(SandboxError::Unreachable { path: folder.display().to_string(), mode, id });
            }
        }
        Ok(())
    }

    /// The canonical workspace, given (with `report`, if any) to the sandbox id when the bridge
    /// runs as root.
    async fn prepare(&self, workspace: &Path, report: Option<&Path>) -> Result<PathBuf, SandboxError> {
        let workspace_error = |source| SandboxError::Workspace { path: workspace.display().to_string(), source };
        let workspace = tokio::fs::canonicalize(workspace).await.map_err(workspace_error)?;
        if let Some(parent) = workspace.parent() {
            self.check_folders(parent)?;
        }
        if let Some(id) = self.drop_to {
            let (dir, report) = (workspace.clone(), report.map(Path::to_owned));
            let given = tokio::task::spawn_blocking(move || {
                owner::give_workspace(&dir, id)?;
                report.map_or(Ok(()), |report| std::os::unix::fs::chown(report, Some(id), Some(id)))
            })
            .await
            .map_err(|join| SandboxError::Spawn(std::io::Error::other(join)))?;
            given.map_err(|source| SandboxError::Workspace { path: workspace.display().to_string(), source })?;
        }
        Ok(workspace)
    }
}

fn require(path: &Path, what: &'static str) -> Result<(), SandboxError> {
    if path.is_file() {
        return Ok(());
    }
    Err(SandboxError::ToolMissing { tool: what, hint: INSTALL_HINT })
}

#[async_trait]
impl Sandbox for LocalSandbox {
    fn check_reachable(&self, dir: &Path) -> Result<(), SandboxError> {
        self.check_folders(dir)
    }

    async fn open_terminal(&self, workspace: &Path, size: TermSize, limits: &Limits) -> Result<Terminal, SandboxError> {
        self.open_pty_terminal(workspace, size, limits).await
    }

    async fn connect_port(&self, workspace: &Path, port: u16) -> Result<Box<dyn PortStream>, SandboxError> {
        self.connect_to_port(workspace, port).await
    }

    async fn start(
        &self,
        workspace: &Path,
        command: &SandboxCommand,
        limits: &Limits,
    ) -> Result<Execution, SandboxError> {
        self.start_run(workspace, command, limits).await
    }
}
