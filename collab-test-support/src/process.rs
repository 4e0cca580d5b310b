//! `collab serve` as its own process, the way it runs in production: started on 127.0.0.1:0,
//! its address read from the `collab listening on` line it prints first, killed with SIGKILL
//! (a crash: nothing flushed) or stopped with SIGTERM, and started again on the same data
//! directory and port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::tokens::Tokens;
use crate::wait::{self, WAIT};

/// The `collab` binary of this build: `target/<profile>/collab`, beside the `deps/` folder the
/// running test binary is in (nextest names it in `NEXTEST_BIN_EXE_collab`). Cargo builds it
/// for collab-server's own tests.
pub fn collab_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NEXTEST_BIN_EXE_collab") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("collab");
    assert!(bin.exists(), "{} is missing: `cargo build -p collab-server --bin collab` builds it", bin.display());
    bin
}

/// How to start a `collab serve`: its data directory, more arguments, and where its log goes.
#[derive(Debug, Clone)]
pub struct Serve {
    data_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: Option<PathBuf>,
}

impl Serve {
    /// `collab serve --listen 127.0.0.1:0 --data-dir {data_dir}`, without a web front end or a
    /// per-connection message rate.
    pub fn new(data_dir: &Path) -> Serve {
        Serve { data_dir: data_dir.to_owned(), args: Vec::new(), env: Vec::new(), log: None }
    }

    /// More arguments (none of `--listen`, `--data-dir`, `--web-dir`, `--rate-messages`).
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Serve {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Serve {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The server's stderr (its log) goes to `path`; without this it is discarded.
    pub fn log_to(mut self, path: &Path) -> Serve {
        self.log = Some(path.to_owned());
        self
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Starts the server and waits until it listens.
    pub async fn start(self) -> ServerProcess {
        let tokens = Tokens::for_data_dir(&self.data_dir);
        let (child, addr) = self.spawn("127.0.0.1:0").await;
        ServerProcess { child: Some(child), serve: self, addr, tokens }
    }

    async fn spawn(&self, listen: &str) -> (Child, SocketAddr) {
        let mut cmd = Command::new(collab_bin());
        cmd.args(["serve", "--listen", listen, "--web-dir", "/nonexistent", "--rate-messages", "0"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        match &self.log {
            // Appended to: a restarted server's log follows the one it had before.
            Some(path) => {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("server log");
                cmd.stderr(file)
            }
            None => cmd.stderr(Stdio::null()),
        };
        let mut child = cmd.spawn().expect("spawn collab");
        let stdout = child.stdout.take().expect("stdout");
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        // Reads the first line, then drains stdout to its end, so the server never writes into
        // a closed pipe.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = first_tx.send(lines.next().and_then(Result::ok).unwrap_or_default());
            lines.for_each(drop);
        });
        let line = match tokio::time::timeout(WAIT, first_rx).await {
            Ok(Ok(line)) => line,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("collab printed no address within {WAIT:?}\n{}", self.log_tail());
            }
        };
        let Some(addr) = line.trim().strip_prefix("collab listening on http://").and_then(|a| a.parse().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("collab printed {line:?} instead of its address\n{}", self.log_tail());
        };
        (child, addr)
    }

    /// The last 40 lines of the log, if it has one.
    fn log_tail(&self) -> String {
        let Some(path) = &self.log else { return "(log discarded)".to_owned() };
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A running (or killed) `collab serve`; killed on drop.
pub struct ServerProcess {
    child: Option<Child>,
    serve: Serve,
    addr: SocketAddr,
    tokens: Tokens,
}

impl ServerProcess {
    /// `ws://host:port`.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// `host:port`, for HTTP.
    pub fn http_addr(&self) -> String {
        self.addr.to_string()
    }

    /// Tokens signed with the data directory's key.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    pub fn is_alive(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash: nothing is flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (what `docker stop`, systemd and Kubernetes send): a request to stop cleanly.
    pub fn terminate(&self) {
        let pid = self.pid().expect("the server is running");
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill(1) runs");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits up to `within` for the process to exit; panics if it does not.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("the server is running");
        let status = wait::poll(
            "collab to exit",
            within,
            || std::future::ready(child.try_wait().expect("wait for collab")),
            || self.serve.log_tail(),
        )
        .await;
        self.child = None;
        status
    }

    /// Kills the server if it still runs, then starts it again on the same data directory,
    /// arguments and port.
    pub async fn restart(&mut self) {
        self.kill();
        let (child, addr) = self.serve.spawn(&self.addr.to_string()).await;
        assert_eq!(addr, self.addr, "restarted on another address");
        self.child = Some(child);
    }

    /// Metric `name` as the server reports it now.
    pub async fn metric(&self, name: &str) -> f64 {
        match crate::metrics::scrape(&self.http_addr(), name).await {
            Some(value) => value,
            None => panic!("no metric {name} from {}\n{}", self.addr, self.log_tail()),
        }
    }

    /// Waits until metric `name` satisfies `want`; returns its value then.
    pub async fn await_metric(&self, name: &str, want: impl Fn(f64) -> bool) -> f64 {
        crate::metrics::await_value(&self.http_addr(), name, want, || self.log_tail()).await
    }

    /// The last 40 lines of the server's log (`(log discarded)` without [`Serve::log_to`]).
    pub fn log_tail(&self) -> String {
        self.serve.log_tail()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
