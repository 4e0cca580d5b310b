//! The command line of a local sandbox: `setpriv` (as root), bwrap's namespaces and mounts,
//! then `prlimit` and GNU `time` around the program, or a terminal's shell.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{LocalSandbox, PRLIMIT, REPORT_MOUNT, SETPRIV, SHELL, TERM, TIME, TMP_SIZE_BYTES, WORKSPACE_MOUNT};
use crate::job::{Limits, SandboxCommand};

/// What a sandbox is started for.
pub(super) enum Purpose<'a> {
    /// A run of `command`, on which GNU `time` writes its report to `report`.
    Run { command: &'a SandboxCommand, report: &'a Path },
    /// An interactive shell on a pty.
    Terminal,
}

impl LocalSandbox {
    /// The full command line of one sandbox, starting with the program to execute.
    pub(super) fn command_line(&self, workspace: &Path, purpose: &Purpose<'_>, limits: &Limits) -> Vec<OsString> {
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
