//! `cargo xtask cluster`: the throwaway PostgreSQL, a private Redis, N `collab serve` nodes and
//! HAProxy in front of them on 127.0.0.1:8080, all stopped together on Ctrl-C or as soon as one
//! of them exits.
//!
//! Every process is started in its own process group, so Ctrl-C reaches only xtask, which then
//! stops them in order: HAProxy, the nodes (SIGINT: each flushes its documents), Redis, and
//! PostgreSQL unless it was already running before. Their pids are kept under the target
//! directory, so a run that was killed outright has its leftovers stopped by the next one.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haproxy_config as haproxy;

use crate::{cmd, postgres, redis, steps};

/// Where HAProxy listens: the address people open. Node `i` (from 1) listens on port 8080 + `i`.
const LB_PORT: u16 = 8080;
/// The data directory all nodes share (it holds the token signing key), relative to the root.
const DATA_DIR: &str = "data/cluster";
/// How long a node may take to print its address, connect to Redis, or HAProxy to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to flush its documents and exit after SIGINT.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long anything else may take to exit after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often waits and the supervisor look again.
const TICK: Duration = Duration::from_millis(100);

/// Starts the cluster, watches it until Ctrl-C or until one of its processes exits, then stops it.
pub fn run(root: &Path, nodes: u16) -> Result<ExitCode> {
    let target_dir = steps::target_dir(root);
    let state = target_dir.join("xtask").join("cluster");
    fs::create_dir_all(state.join("pids")).with_context(|| format!("cannot create {}", state.display()))?;
    stop_leftovers(&state.join("pids"))?;
    for (program, package) in [(redis::SERVER, "redis-server"), (haproxy::BINARY, "haproxy")] {
        if !Path::new(program).exists() {
            bail!("{program} is missing: install the {package} package (cargo xtask cluster does)");
        }
    }
    for port in LB_PORT..=LB_PORT + nodes {
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!("127.0.0.1:{port} is in use: is another `cargo xtask run` or `cargo xtask cluster` running?");
        }
    }
    steps::catch_ctrl_c()?;
    // A server that already runs (`cargo xtask postgres start`, a test run) is left running.
    let pg_was_up = postgres::is_up(&target_dir)?;
    let pg_port = postgres::start(&target_dir)?;
    let mut cluster = Cluster { state, redis: None, nodes: Vec::new(), haproxy: None };
    let outcome = cluster.start(root, nodes, &postgres::url(pg_port)).and_then(|()| cluster.supervise());
    if let Err(err) = &outcome {
        eprintln!("xtask: {err:#}");
    }
    println!("\n==> stopping the cluster");
    let stopped = cluster.stop();
    if pg_was_up {
        println!("postgres: left running, as it was before");
    } else {
        println!("postgres: {}", postgres::stop(&target_dir)?);
    }
    stopped?;
    Ok(if outcome.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The running processes, each `None` or empty until started.
struct Cluster {
    state: PathBuf,
    redis: Option<Service>,
    nodes: Vec<Node>,
    haproxy: Option<Service>,
}

/// A `collab serve` process and the lines it prints on stdout.
struct Node {
    service: Service,
    addr: String,
    stdout: Receiver<String>,
}

impl Cluster {
    fn start(&mut self, root: &Path, nodes: u16, database_url: &str) -> Result<()> {
        println!("\n==> starting redis");
        let redis_port = free_port()?;
        let redis_dir = self.state.join("redis");
        fs::create_dir_all(&redis_dir).with_context(|| format!("cannot create {}", redis_dir.display()))?;
        let mut redis_cmd = redis::command(&redis_dir, redis_port);
        let redis = self.redis.insert(Service::spawn("redis", redis_cmd.stdout(Stdio::null()), &self.state)?);
        wait_for(&format!("redis to answer on port {redis_port}"), redis, || redis::answers_ping(redis_port))?;
        println!("Redis ready at {} (log: {})", redis::url(redis_port), redis_dir.join("redis.log").display());

        for i in 1..=nodes {
            println!("\n==> starting node{i}");
            let node = start_node(root, &self.state, i, database_url, &redis::url(redis_port))?;
            self.nodes.push(node);
        }

        println!("\n==> starting haproxy");
        let template_path = root.join(haproxy::TEMPLATE);
        let template =
            fs::read_to_string(&template_path).with_context(|| format!("cannot read {}", template_path.display()))?;
        let servers: Vec<String> = self.nodes.iter().map(|n| format!("{} {}", n.service.name, n.addr)).collect();
        let lb_addr = format!("127.0.0.1:{LB_PORT}");
        let config = haproxy::config(&template, &lb_addr, &servers)?;
        let config_path = self.state.join("haproxy.cfg");
        fs::write(&config_path, config).with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut haproxy_cmd = Command::new(haproxy::BINARY);
        haproxy_cmd.arg("-f").arg(&config_path).arg("-db").stdout(Stdio::piped()).stderr(Stdio::piped());
        let haproxy = self.haproxy.insert(Service::spawn("haproxy", &mut haproxy_cmd, &self.state)?);
        haproxy.forward_output();
        wait_for(&format!("HAProxy to answer on {lb_addr}"), haproxy, || {
            http_get(&lb_addr, "/healthz").is_some_and(|(status, _)| status == 200)
        })?;

        let base = format!("http://{lb_addr}");
        println!("\n==> the cluster is up: open {base}");
        for node in &self.nodes {
            println!("  {} listens on http://{}", node.service.name, node.addr);
        }
        println!("  HAProxy routes each project to one node ({})", config_path.display());
        println!("  Redis {}, PostgreSQL {database_url}, shared data dir {DATA_DIR}", redis::url(redis_port));
        // The demo links the first node printed after its address, pointed at HAProxy instead.
        for line in self.nodes[0].stdout.try_iter() {
            println!("{}", line.replace(&format!("http://{}", self.nodes[0].addr), &base));
        }
        println!("Ctrl-C stops everything.");
        Ok(())
    }

    /// Waits for Ctrl-C (success) or for a process to exit on its own (failure); meanwhile
    /// prints whatever the nodes print on stdout.
    fn supervise(&mut self) -> Result<()> {
        loop {
            std::thread::sleep(TICK);
            if steps::interrupted() {
                return Ok(());
            }
            for node in &self.nodes {
                for line in node.stdout.try_iter() {
                    println!("[{}] {line}", node.service.name);
                }
            }
            let services = self.redis.iter_mut().chain(self.nodes.iter_mut().map(|n| &mut n.service));
            for service in services.chain(self.haproxy.iter_mut()) {
                if let Some(status) = service.exited()? {
                    bail!("{} exited ({status})", service.name);
                }
            }
        }
    }

    /// Stops HAProxy, then every node at once, then Redis; kills whatever does not stop in time.
    fn stop(&mut self) -> Result<()> {
        let mut late = Vec::new();
        if let Some(mut haproxy) = self.haproxy.take() {
            haproxy.interrupt();
            late.extend(haproxy.wait_or_kill(Instant::now() + STOP_TIMEOUT)?);
        }
        let nodes: Vec<Node> = self.nodes.drain(..).collect();
        for node in &nodes {
            node.service.interrupt();
        }
        let deadline = Instant::now() + NODE_STOP_TIMEOUT;
        for mut node in nodes {
            late.extend(node.service.wait_or_kill(deadline)?);
        }
        if let Some(mut redis) = self.redis.take() {
            redis.interrupt();
            late.extend(redis.wait_or_kill(Instant::now() + STOP_TIMEOUT)?);
        }
        if !late.is_empty() {
            bail!("killed {} after they did not stop in time", late.join(", "));
        }
        Ok(())
    }
}

/// Starts node `i` on port 8080 + `i` and waits until it listens and has joined the Redis bus.
fn start_node(root: &Path, state: &Path, i: u16, database_url: &str, redis_url: &str) -> Result<Node> {
    let name = format!("node{i}");
    let mut serve = Command::new(steps::collab_bin(root));
    serve
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{}", LB_PORT + i)])
        .args(["--database-url", database_url, "--redis-url", redis_url])
        .args(["--data-dir", DATA_DIR, "--web-dir", "web/dist"])
        // HAProxy limits new sockets per client address (deploy/haproxy.cfg); a node would see
        // every client as HAProxy's one address.
        .args(["--connect-rate", "0"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if i == 1 {
        serve.arg("--demo");
    }
    let mut service = Service::spawn(&name, &mut serve, state)?;
    let stdout = lines_of(service.child.stdout.take().context("no stdout pipe")?);
    service.forward_output();
    let deadline = Instant::now() + START_TIMEOUT;
    let first = loop {
        if steps::interrupted() {
            bail!("interrupted");
        }
        match stdout.recv_timeout(TICK) {
            Ok(line) => break line,
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => bail!("{name} printed nothing within {START_TIMEOUT:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                let status = service.child.wait().context("cannot wait for the node")?;
                bail!("{name} exited ({status}) before listening; its log is above");
            }
        }
    };
    let addr = first
        .trim()
        .strip_prefix("collab listening on http://")
        .with_context(|| format!("{name} printed {first:?} instead of its address"))?
        .to_owned();
    wait_for(&format!("{name} to join the Redis bus"), &mut service, || {
        http_get(&addr, "/metrics").is_some_and(|(_, body)| metric(&body, "collab_bus_connected") == Some(1.0))
    })?;
    println!("{name} listening on http://{addr}, connected to Redis");
    Ok(Node { service, addr, stdout })
}

/// A child process with its own process group, its pid recorded in `state/pids/{name}.pid`.
struct Service {
    name: String,
    child: Child,
    pid_file: PathBuf,
}

impl Service {
    fn spawn(name: &str, command: &mut Command, state: &Path) -> Result<Service> {
        command.stdin(Stdio::null()).process_group(0);
        println!("$ {}", cmd::describe(command));
        let child = command.spawn().with_context(|| format!("cannot start {}", cmd::describe(command)))?;
        // `spawn` returns after the exec, so this is the program's own image.
        let exe = fs::read_link(format!("/proc/{}/exe", child.id())).context("cannot read the new process's exe")?;
        let pid_file = state.join("pids").join(format!("{name}.pid"));
        let service = Service { name: name.to_owned(), child, pid_file };
        fs::write(&service.pid_file, format!("{}\n{}\n", service.child.id(), exe.display()))
            .with_context(|| format!("cannot write {}", service.pid_file.display()))?;
        Ok(service)
    }

    /// Copies the process's piped stdout and stderr to ours, each line prefixed with its name.
    fn forward_output(&mut self) {
        let prefix = format!("[{}] ", self.name);
        if let Some(stdout) = self.child.stdout.take() {
            forward(prefix.clone(), stdout);
        }
        if let Some(stderr) = self.child.stderr.take() {
            forward(prefix, stderr);
        }
    }

    fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.child.try_wait().with_context(|| format!("cannot check on {}", self.name))
    }

    /// SIGINT: every program here takes it as a request to stop cleanly.
    fn interrupt(&self) {
        signal(self.child.id(), "INT");
    }

    /// Waits until the process exits, or kills it at `deadline`; returns its name if killed.
    fn wait_or_kill(&mut self, deadline: Instant) -> Result<Option<String>> {
        let mut killed = None;
        while self.exited()?.is_none() {
            if Instant::now() >= deadline {
                eprintln!("xtask: {} did not stop in time; killing it", self.name);
                self.child.kill().with_context(|| format!("cannot kill {}", self.name))?;
                self.child.wait().with_context(|| format!("cannot wait for {}", self.name))?;
                killed = Some(self.name.clone());
                break;
            }
            std::thread::sleep(TICK);
        }
        println!("{} stopped", self.name);
        let _ = fs::remove_file(&self.pid_file);
        Ok(killed)
    }
}

impl Drop for Service {
    /// Only on the way out of an error: a service still running then is killed outright.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.pid_file);
    }
}

/// Polls `ready` until it holds; fails if `service` exits, Ctrl-C is pressed or time runs out.
fn wait_for(what: &str, service: &mut Service, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready() {
        if let Some(status) = service.exited()? {
            bail!("{} exited ({status}) while waiting for {what}", service.name);
        }
        if steps::interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        if Instant::now() >= deadline {
            bail!("timed out after {START_TIMEOUT:?} waiting for {what}");
        }
        std::thread::sleep(TICK);
    }
    Ok(())
}

/// Stops the processes an earlier run recorded in `pids/` and did not stop (it was killed), if
/// they still run the program they ran then.
fn stop_leftovers(pids: &Path) -> Result<()> {
    let mut files = Vec::new();
    for entry in fs::read_dir(pids).with_context(|| format!("cannot list {}", pids.display()))? {
        files.push(entry.with_context(|| format!("cannot list {}", pids.display()))?.path());
    }
    // By name: haproxy, the nodes, redis; the order they stop in normally.
    files.sort();
    for path in files {
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut lines = text.lines();
        let (Some(pid), Some(exe)) = (lines.next().and_then(|p| p.parse::<u32>().ok()), lines.next()) else {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            continue;
        };
        if runs(pid, exe) {
            println!("stopping pid {pid} ({exe}), left running by an earlier `cargo xtask cluster`");
            signal(pid, "INT");
            let deadline = Instant::now() + NODE_STOP_TIMEOUT;
            while is_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(TICK);
            }
            if is_alive(pid) {
                signal(pid, "KILL");
                let deadline = Instant::now() + STOP_TIMEOUT;
                while is_alive(pid) {
                    if Instant::now() >= deadline {
                        bail!("pid {pid} ({exe}) is still alive after SIGKILL");
                    }
                    std::thread::sleep(TICK);
                }
            }
        }
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

/// Whether process `pid` is alive and runs `exe` (which may have been rebuilt since).
fn runs(pid: u32, exe: &str) -> bool {
    let image = fs::read_link(format!("/proc/{pid}/exe"));
    is_alive(pid) && image.is_ok_and(|image| image.to_string_lossy().trim_end_matches(" (deleted)") == exe)
}

/// Whether process `pid` exists and has not exited (a zombie has: its files, sockets included,
/// are closed). Its exe link is no test of that: it goes before the files are closed.
fn is_alive(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"));
    stat.is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])))
}

/// Sends `sig` (a name such as `INT`) to `pid`, with kill(1): xtask has no unsafe code for libc.
fn signal(pid: u32, sig: &str) {
    cmd::succeeds(Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()));
}

/// A port nothing listens on now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free port")?;
    Ok(listener.local_addr().context("cannot find a free port")?.port())
}

/// The lines `pipe` yields, read by a thread; the channel closes at end of file.
fn lines_of(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if tx.send(String::from_utf8_lossy(&line).trim_end().to_owned()).is_err() {
                break;
            }
            line.clear();
        }
    });
    rx
}

/// Copies `pipe` line by line to our stdout, each line after `prefix`. (Stdout, not stderr: one
/// lock orders its lines with xtask's own, whole.)
fn forward(prefix: String, pipe: impl Read + Send + 'static) {
    let lines = lines_of(pipe);
    std::thread::spawn(move || {
        for line in lines {
            println!("{prefix}{line}");
        }
    });
}

/// `GET http://{addr}{path}` over a fresh connection: the status and the body, or `None` if
/// nothing answers properly.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Some((status, body.to_owned()))
}

/// The value of an unlabelled sample `name` in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_by_exact_name() {
        let text = "# HELP collab_bus_connected 1 while...\ncollab_bus_connected_total 5\ncollab_bus_connected 1\n";
        assert_eq!(metric(text, "collab_bus_connected"), Some(1.0));
        assert_eq!(metric(text, "collab_documents_loaded"), None);
    }

    #[test]
    fn a_process_counts_as_running_only_with_its_own_program() {
        let me = std::process::id();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        assert!(runs(me, &exe.to_string_lossy()));
        assert!(!runs(me, "/usr/bin/something-else"));
    }
}
