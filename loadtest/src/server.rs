//! Starting the server under test as its own process, pinned to one core, and reading its CPU
//! time and memory from `/proc`: ours (`collab serve`) or a reference server under Node.js.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::target::{Kind, Target};

/// Where the programs come from.
#[derive(Debug, Clone)]
pub struct Programs {
    /// Our `collab` binary.
    pub collab: PathBuf,
    /// `loadtest/servers`, with `npm ci` done.
    pub reference: PathBuf,
    /// The core the server is pinned to (`taskset -c`), if any.
    pub core: Option<usize>,
}

/// A server process; killed on drop.
#[derive(Debug)]
pub struct ServerProcess {
    pub target: Target,
    child: Child,
    _data: Option<tempfile::TempDir>,
}

/// CPU seconds (user + system) and memory of a process, from `/proc/{pid}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ServerProcess {
    /// Starts a fresh server of `kind` with an empty data directory and waits until it accepts
    /// connections. Ours runs with its limits opened up for load (no per-connection throttle, no
    /// connect rate) and token-less peers allowed; the reference servers run with their defaults.
    pub fn start(kind: Kind, programs: &Programs, extra_args: &[&str]) -> anyhow::Result<ServerProcess> {
        let port = free_port()?;
        let mut cmd = match programs.core {
            Some(core) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &core.to_string()]);
                c
            }
            None => Command::new("env"),
        };
        let mut data = None;
        if kind.is_ours() {
            let dir = tempfile::tempdir()?;
            cmd.arg(&programs.collab)
                .args(["serve", "--web-dir", "/nonexistent", "--allow-anonymous"])
                .args(["--rate-messages", "0", "--rate-bytes", "0", "--connect-rate", "0"])
                // Every simulated peer comes from one loopback address.
                .args(["--max-connections-per-ip", "1000000"])
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(dir.path())
                .args(extra_args);
            data = Some(dir);
        } else {
            let script = match kind {
                Kind::YWebsocket => Path::new("node_modules/y-websocket/bin/server.js"),
                _ => Path::new("hocuspocus.mjs"),
            };
            anyhow::ensure!(
                programs.reference.join(script).exists(),
                "{} is missing: run `npm ci` in {}",
                script.display(),
                programs.reference.display()
            );
            cmd.arg("node")
                .arg(script)
                .current_dir(&programs.reference)
                .env("HOST", "127.0.0.1")
                .env("PORT", port.to_string());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", kind.label()))?;
        let mut server =
            ServerProcess { target: Target::new(kind, format!("ws://127.0.0.1:{port}")), child, _data: data };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("{} exited at start: {status}", kind.label());
            }
            anyhow::ensure!(Instant::now() < deadline, "{} did not listen within 30 s", kind.label());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// The server's own process id: `taskset` and `env` exec their command, so it is the child's.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.pid())
    }

    /// Resets the peak RSS the kernel keeps (`VmHWM`), so a phase can measure its own peak.
    pub fn reset_peak(&self) -> anyhow::Result<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").context("resetting VmHWM (needs root)")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads utime + stime and VmRSS / VmHWM of a process.
pub fn usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command name: state is field 0, utime 11, stime 12 (in clock ticks of 1/100 s).
    let cpu_seconds = (field(11) + field(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Usage { cpu_seconds, rss_kib: kib("VmRSS:"), peak_rss_kib: kib("VmHWM:") })
}
