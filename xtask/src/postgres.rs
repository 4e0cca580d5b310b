//! A throwaway PostgreSQL cluster for the tests, in the system temp dir, apart from any system service.
//!
//! Layout: `data/` (the cluster), `postgres.log`, and `superuser-password` (the random password
//! of the `postgres` superuser, used only by xtask to create the `collab` role). The server
//! listens on 127.0.0.1 only, over TCP with password authentication, and has no Unix socket.
//! When xtask runs as root the server runs as the `postgres` system user (initdb refuses root).

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The port a new server tries first, so the URL stays the same from run to run when it can.
const PREFERRED_PORT: u16 = 54329;
/// The role, password and database the tests connect with.
const TEST_USER: &str = "collab";
/// Where Debian installs the server binaries, one directory per major version.
const INSTALL_ROOT: &str = "/usr/lib/postgresql";
/// How long a reused server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the processes of a killed server may take to notice and exit.
const LEFTOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL the tests use for a server on `port`.
pub fn url(port: u16) -> String {
    format!("postgres://{TEST_USER}:{TEST_USER}@127.0.0.1:{port}/{TEST_USER}")
}

/// Where the cluster lives: a directory under the system temp dir named after the target
/// directory. Not inside the checkout itself: the `postgres` user must be able to reach it, and a
/// checkout under a private home (`/root/...`) is not reachable by other users.
struct Paths {
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    password: PathBuf,
}

fn paths(target_dir: &Path) -> Paths {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    target_dir.hash(&mut hasher);
    let dir = std::env::temp_dir().join(format!("collab-xtask-pg-{:016x}", hasher.finish()));
    Paths { data: dir.join("data"), log: dir.join("postgres.log"), password: dir.join("superuser-password"), dir }
}

/// The system user that owns the cluster: `postgres` when we are root, else ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    PostgresUser,
    CurrentUser,
}

fn owner() -> Result<Owner> {
    Ok(if cmd::is_root()? { Owner::PostgresUser } else { Owner::CurrentUser })
}

/// `program` run as the cluster's owner, in the cluster's directory.
fn as_owner(owner: Owner, paths: &Paths, program: &Path) -> Command {
    let mut cmd = match owner {
        Owner::PostgresUser => {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", "postgres", "--"]).arg(program);
            runuser
        }
        Owner::CurrentUser => Command::new(program),
    };
    cmd.current_dir(&paths.dir);
    cmd
}

/// Makes sure the cluster exists, runs and has the test role and database; returns its port.
///
/// Reuses a server still running from an earlier run, survives a stale pid file from a killed
/// one, and recreates the cluster once if it does not start.
pub fn start(target_dir: &Path) -> Result<u16> {
    let paths = paths(target_dir);
    let owner = owner()?;
    prepare_dir(&paths, owner)?;
    let bin = ensure_cluster(&paths, owner)?;
    let port = if is_running(&paths)? {
        let port = running_port(&paths)?;
        println!("reusing the server already running from {} on port {port}", paths.data.display());
        wait_until_ready(&bin, port)?;
        port
    } else {
        match start_server(&bin, &paths, owner) {
            Ok(port) => port,
            Err(err) => {
                eprintln!("xtask: {err:#}");
                eprintln!("xtask: recreating the throwaway cluster and starting it once more");
                discard_cluster(&bin, &paths, owner)?;
                let bin = ensure_cluster(&paths, owner)?;
                start_server(&bin, &paths, owner)?
            }
        }
    };
    ensure_test_database(&bin, &paths, port)?;
    println!("PostgreSQL ready at {}", url(port));
    Ok(port)
}

/// Whether the server runs now (clearing the pid file a killed one left).
pub fn is_up(target_dir: &Path) -> Result<bool> {
    let paths = paths(target_dir);
    if cluster_version(&paths)?.is_none() {
        return Ok(false);
    }
    is_running(&paths)
}

/// Stops the server if it runs; returns a note for the summary.
pub fn stop(target_dir: &Path) -> Result<String> {
    let paths = paths(target_dir);
    let Some(version) = cluster_version(&paths)? else {
        return Ok("no cluster".to_owned());
    };
    let bin = bin_dir(Some(&version))?;
    let owner = owner()?;
    if !is_running(&paths)? {
        return Ok("was not running".to_owned());
    }
    let pg_ctl = bin.join("pg_ctl");
    let fast = cmd::run(as_owner(owner, &paths, &pg_ctl).arg("-D").arg(&paths.data).args(["-m", "fast", "-w", "stop"]));
    if let Err(err) = fast {
        eprintln!("xtask: {err:#}; stopping it immediately instead");
        cmd::run(as_owner(owner, &paths, &pg_ctl).arg("-D").arg(&paths.data).args(["-m", "immediate", "-w", "stop"]))?;
    }
    Ok("stopped".to_owned())
}

/// Creates the cluster's directory, owned by the cluster's owner, who must be able to reach it.
fn prepare_dir(paths: &Paths, owner: Owner) -> Result<()> {
    fs::create_dir_all(&paths.dir).with_context(|| format!("cannot create {}", paths.dir.display()))?;
    if owner == Owner::PostgresUser {
        let (uid, gid) = cmd::user_ids("postgres")?;
        std::os::unix::fs::chown(&paths.dir, Some(uid), Some(gid))
            .with_context(|| format!("cannot hand {} to the postgres user", paths.dir.display()))?;
        let writable = cmd::succeeds(as_owner(owner, paths, Path::new("test")).arg("-w").arg(&paths.dir));
        if !writable {
            bail!(
                "the postgres user cannot write to {}: every directory above it must be searchable \
                 by other users (chmod o+x)",
                paths.dir.display()
            );
        }
    }
    Ok(())
}

/// The major version that initialised the cluster, or `None` if there is no complete cluster.
fn cluster_version(paths: &Paths) -> Result<Option<String>> {
    let file = paths.data.join("PG_VERSION");
    match fs::read_to_string(&file) {
        Ok(version) => Ok(Some(version.trim().to_owned())),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", file.display())),
    }
}

/// Initialises the cluster unless a usable one exists; returns the binaries that match it.
fn ensure_cluster(paths: &Paths, owner: Owner) -> Result<PathBuf> {
    if let Some(version) = cluster_version(paths)? {
        match (bin_dir(Some(&version)), paths.password.exists()) {
            (Ok(bin), true) => return Ok(bin),
            (Ok(bin), false) => {
                println!("{} is missing: recreating the cluster", paths.password.display());
                discard_cluster(&bin, paths, owner)?;
            }
            // Without its binaries no server of this cluster can be running.
            (Err(err), _) => {
                println!("{err:#}: recreating the cluster");
                fs::remove_dir_all(&paths.data).with_context(|| format!("cannot remove {}", paths.data.display()))?;
            }
        }
    }
    let bin = bin_dir(None)?;
    init(&bin, paths, owner)?;
    Ok(bin)
}

/// Runs initdb into a scratch directory and renames it into place, so a `data` directory is
/// always a complete cluster even if initdb was interrupted.
fn init(bin: &Path, paths: &Paths, owner: Owner) -> Result<()> {
    let scratch = paths.dir.join("data.partial");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("cannot remove {}", scratch.display()))?;
    }
    write_password_file(&paths.password, owner)?;
    let mut pwfile = std::ffi::OsString::from("--pwfile=");
    pwfile.push(&paths.password);
    cmd::run(
        as_owner(owner, paths, &bin.join("initdb"))
            .arg("-D")
            .arg(&scratch)
            .args(["--username=postgres", "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"])
            .arg("--no-instructions")
            .arg(pwfile),
    )?;
    let conf = scratch.join("postgresql.conf");
    let mut file =
        fs::OpenOptions::new().append(true).open(&conf).with_context(|| format!("cannot open {}", conf.display()))?;
    file.write_all(b"\n# Set by cargo xtask: TCP on loopback only, no Unix socket.\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n")
        .with_context(|| format!("cannot write {}", conf.display()))?;
    fs::rename(&scratch, &paths.data)
        .with_context(|| format!("cannot move {} to {}", scratch.display(), paths.data.display()))
}

/// Writes a fresh random superuser password, readable only by the cluster's owner.
fn write_password_file(path: &Path, owner: Owner) -> Result<()> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if path.exists() {
        fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(password.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    if owner == Owner::PostgresUser {
        let (uid, gid) = cmd::user_ids("postgres")?;
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("cannot hand {} to the postgres user", path.display()))?;
    }
    Ok(())
}

/// Stops whatever may be left of the cluster and deletes it.
fn discard_cluster(bin: &Path, paths: &Paths, owner: Owner) -> Result<()> {
    // Best effort: a server that failed to start is usually not running at all.
    cmd::succeeds(as_owner(owner, paths, &bin.join("pg_ctl")).arg("-D").arg(&paths.data).args([
        "-m",
        "immediate",
        "-w",
        "stop",
    ]));
    fs::remove_dir_all(&paths.data).with_context(|| format!("cannot remove {}", paths.data.display()))
}

/// The `bin` directory of the installed server of major `version`, or of the newest one.
fn bin_dir(version: Option<&str>) -> Result<PathBuf> {
    let entries = fs::read_dir(INSTALL_ROOT)
        .with_context(|| format!("cannot list {INSTALL_ROOT}: is the postgresql package installed?"))?;
    let mut installed: Vec<(Vec<u32>, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {INSTALL_ROOT}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let bin = entry.path().join("bin");
        let wanted = version.is_none_or(|v| v == name);
        if wanted && bin.join("initdb").exists() && bin.join("pg_ctl").exists() {
            installed.push((version_key(&name), bin));
        }
    }
    installed.sort();
    match (installed.pop(), version) {
        (Some((_, bin)), _) => Ok(bin),
        (None, Some(v)) => {
            bail!("PostgreSQL {v} server binaries are not installed under {INSTALL_ROOT}")
        }
        (None, None) => bail!("no PostgreSQL server binaries under {INSTALL_ROOT}/*/bin"),
    }
}

/// Orders version directory names numerically ("9.6" < "15").
fn version_key(name: &str) -> Vec<u32> {
    name.split('.').map(|part| part.parse().unwrap_or(0)).collect()
}

/// Whether the server recorded in `postmaster.pid` is alive.
///
/// A pid file whose process is gone, a zombie, or not a server of this cluster is left by a
/// killed server: it is removed (postgres would refuse to start while a zombie holds the pid),
/// once no live process works in the data directory any more.
fn is_running(paths: &Paths) -> Result<bool> {
    let pid_file = paths.data.join("postmaster.pid");
    let text = match fs::read_to_string(&pid_file) {
        Ok(text) => text,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", pid_file.display())),
    };
    let data = fs::canonicalize(&paths.data).with_context(|| format!("cannot resolve {}", paths.data.display()))?;
    let pid = text.lines().next().and_then(|line| line.trim().trim_start_matches('-').parse().ok());
    if pid.is_some_and(|pid| works_in(pid, &data)) {
        return Ok(true);
    }
    let deadline = Instant::now() + LEFTOVER_TIMEOUT;
    loop {
        let leftovers = processes_working_in(&data)?;
        if leftovers.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the server that wrote {} is gone, but processes {leftovers:?} still work in {}: \
                 stop them first",
                pid_file.display(),
                data.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("removing {}, left by a server that is no longer running", pid_file.display());
    fs::remove_file(&pid_file).with_context(|| format!("cannot remove {}", pid_file.display()))?;
    Ok(false)
}

/// Live (not zombie) processes whose working directory is `dir`, as every postgres process's is.
fn processes_working_in(dir: &Path) -> Result<Vec<u32>> {
    let entries = fs::read_dir("/proc").context("cannot list /proc")?;
    let pids = entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok());
    Ok(pids.filter(|&pid| works_in(pid, dir)).collect())
}

/// Whether process `pid` is alive, not a zombie, and works in `dir`.
fn works_in(pid: u32, dir: &Path) -> bool {
    let in_dir = fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir);
    in_dir && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !is_dead_stat(&stat))
}

/// Whether a `/proc/PID/stat` line describes a zombie or dead process (state after the name).
fn is_dead_stat(stat: &str) -> bool {
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    state.is_none_or(|state| state.starts_with('Z') || state.starts_with('X'))
}

/// The port of the running server, from the fourth line of its `postmaster.pid`.
fn running_port(paths: &Paths) -> Result<u16> {
    let file = paths.data.join("postmaster.pid");
    let text = fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    port_from_pid_file(&text).with_context(|| format!("no port in {}", file.display()))
}

fn port_from_pid_file(text: &str) -> Option<u16> {
    text.lines().nth(3)?.trim().parse().ok()
}

/// Starts the server on a free port and waits until it accepts connections; returns the port.
fn start_server(bin: &Path, paths: &Paths, owner: Owner) -> Result<u16> {
    let port = free_port()?;
    let started = cmd::run(
        as_owner(owner, paths, &bin.join("pg_ctl")).arg("-D").arg(&paths.data).arg("-l").arg(&paths.log).args([
            "-w",
            "-t",
            "60",
            "-o",
            &format!("-p {port}"),
            "start",
        ]),
    );
    if let Err(err) = started {
        print_log_tail(&paths.log);
        return Err(err);
    }
    Ok(port)
}

/// `PREFERRED_PORT` if nothing listens on it, else one the kernel picks.
fn free_port() -> Result<u16> {
    if TcpListener::bind(("127.0.0.1", PREFERRED_PORT)).is_ok() {
        return Ok(PREFERRED_PORT);
    }
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free port")?;
    Ok(listener.local_addr().context("cannot find a free port")?.port())
}

/// Prints the end of the server log, where the reason a start failed is.
fn print_log_tail(log: &Path) {
    let Ok(text) = fs::read_to_string(log) else {
        eprintln!("xtask: no server log at {}", log.display());
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("xtask: last lines of {}:", log.display());
    for line in &lines[lines.len().saturating_sub(20)..] {
        eprintln!("    {line}");
    }
}

/// Polls `pg_isready` until the server on `port` accepts connections or `READY_TIMEOUT` passes.
fn wait_until_ready(bin: &Path, port: u16) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let port = port.to_string();
    loop {
        let ready = cmd::succeeds(Command::new(bin.join("pg_isready")).args(["-q", "-h", "127.0.0.1", "-p", &port]));
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the server on port {port} did not accept connections within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates the `collab` role (password `collab`) and its database unless they exist.
fn ensure_test_database(bin: &Path, paths: &Paths, port: u16) -> Result<()> {
    let password =
        fs::read_to_string(&paths.password).with_context(|| format!("cannot read {}", paths.password.display()))?;
    let psql = |sql: &str| {
        cmd::output(
            Command::new(bin.join("psql"))
                .args(["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-c", sql])
                .env("PGPASSWORD", password.trim())
                .env("PGCONNECT_TIMEOUT", "10"),
        )
    };
    if psql(&format!("SELECT 1 FROM pg_roles WHERE rolname = '{TEST_USER}'"))?.trim() != "1" {
        psql(&format!("CREATE ROLE {TEST_USER} LOGIN PASSWORD '{TEST_USER}'"))?;
        println!("created role {TEST_USER}");
    }
    if psql(&format!("SELECT 1 FROM pg_database WHERE datname = '{TEST_USER}'"))?.trim() != "1" {
        psql(&format!("CREATE DATABASE {TEST_USER} OWNER {TEST_USER}"))?;
        println!("created database {TEST_USER}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_the_fourth_line_of_the_pid_file() {
        let text = "4242\n/x/data\n1700000000\n54329\n\n127.0.0.1\n  1234  5678\nready   \n";
        assert_eq!(port_from_pid_file(text), Some(54329));
        assert_eq!(port_from_pid_file("4242\n/x/data\n"), None);
    }

    #[test]
    fn zombies_count_as_dead() {
        assert!(is_dead_stat("13203 (postgres) Z 1 13203 13203 0 -1"));
        assert!(!is_dead_stat("13203 (postgres: 15/main: walwriter ) S 1 13203"));
        assert!(!is_dead_stat("7 (a) b) R 1"));
        assert!(is_dead_stat(""));
    }

    #[test]
    fn versions_sort_numerically() {
        let mut names = vec!["15", "9.6", "10", "16"];
        names.sort_by_key(|name| version_key(name));
        assert_eq!(names, ["9.6", "10", "15", "16"]);
    }
}
