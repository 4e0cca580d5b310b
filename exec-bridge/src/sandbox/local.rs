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

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::{EVENT_QUEUE, Execution, Forwarded, OutputBudget, STDIN_QUEUE, Sandbox, SandboxCommand, SandboxError};
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
        Ok(LocalSandbox { config, drop_to })
    }

    /// The full command line for one run, starting with the program to execute.
    fn command_line(
        &self,
        workspace: &Path,
        report: &Path,
        command: &SandboxCommand,
        limits: &Limits,
    ) -> Vec<OsString> {
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
        line.extend(bwrap_args(workspace, report));
        line.push("--".into());
        line.extend(inner_args(command, limits));
        line
    }
}

fn require(path: &Path, what: &'static str) -> Result<(), SandboxError> {
    if path.is_file() {
        return Ok(());
    }
    Err(SandboxError::ToolMissing { tool: what, hint: INSTALL_HINT })
}

fn bwrap_args(workspace: &Path, report: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]);
    push(&["--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin"]);
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
    args.extend(["--bind".into(), report.as_os_str().to_owned(), REPORT_MOUNT.into()]);
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["--chdir", WORKSPACE_MOUNT, "--remount-ro", "/"]);
    args
}

/// `prlimit` and `time` inside the sandbox, then the program.
fn inner_args(command: &SandboxCommand, limits: &Limits) -> Vec<OsString> {
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
        TIME.into(),
        "-o".into(),
        REPORT_MOUNT.into(),
        "-f".into(),
        "%x %U %S %M".into(),
        "--".into(),
        command.program.clone().into(),
    ];
    args.extend(command.args.iter().map(OsString::from));
    args
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
    async fn open_terminal(
        &self,
        _workspace: &Path,
        _size: super::TermSize,
        _limits: &Limits,
    ) -> Result<super::Terminal, SandboxError> {
        Err(SandboxError::Spawn(std::io::Error::other("terminals are not built yet")))
    }

    async fn connect_port(&self, _workspace: &Path, port: u16) -> Result<Box<dyn super::PortStream>, SandboxError> {
        Err(SandboxError::NotListening { port })
    }

    async fn start(
        &self,
        workspace: &Path,
        command: &SandboxCommand,
        limits: &Limits,
    ) -> Result<Execution, SandboxError> {
        let workspace_error = |source| SandboxError::Workspace { path: workspace.display().to_string(), source };
        let workspace = tokio::fs::canonicalize(workspace).await.map_err(workspace_error)?;
        let report = tempfile::Builder::new()
            .prefix("exec-bridge-report-")
            .tempfile_in(&self.config.scratch_dir)
            .map_err(SandboxError::Spawn)?;
        if let Some(id) = self.drop_to {
            let (dir, report_path) = (workspace.clone(), report.path().to_owned());
            let given = tokio::task::spawn_blocking(move || {
                give_workspace(&dir, id)?;
                std::os::unix::fs::chown(report_path, Some(id), Some(id))
            })
            .await
            .map_err(|join| SandboxError::Spawn(std::io::Error::other(join)))?;
            given.map_err(|source| SandboxError::Workspace { path: workspace.display().to_string(), source })?;
        }
        let line = self.command_line(&workspace, report.path(), command, limits);
        let mut child = Command::new(&line[0])
            .args(&line[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(SandboxError::Spawn)?;
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
        let run = Supervised { child, report, limits: limits.clone() };
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

struct Supervised {
    child: Child,
    report: tempfile::NamedTempFile,
    limits: Limits,
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
