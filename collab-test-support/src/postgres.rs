//! PostgreSQL for tests: the shared test database (`COLLAB_TEST_POSTGRES_URL`), a stall of its
//! update log, and a private server for one test, which the test may stop and start (the shared
//! database keeps serving every other test). The private server runs as the `postgres` user when
//! the tests run as root, since PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::{Connection, PgConnection};

use crate::net::free_port;

/// The shared test database's URL; `cargo xtask test` starts the server and sets it.
pub fn test_url() -> String {
    std::env::var("COLLAB_TEST_POSTGRES_URL")
        .expect("COLLAB_TEST_POSTGRES_URL must point at a PostgreSQL server (cargo xtask test starts one)")
}

/// `url` (`postgres://user:pw@host:port/db`) with its `host:port` replaced by `addr`, and the
/// `host:port` it had.
pub fn with_addr(url: &str, addr: &str) -> (String, String) {
    let at = url.rfind('@').expect("user in the PostgreSQL URL") + 1;
    let end = url[at..].find('/').map_or(url.len(), |i| at + i);
    (format!("{}{addr}{}", &url[..at], &url[end..]), url[at..end].replace("localhost", "127.0.0.1"))
}

/// A stalled store: one connection holds `LOCK TABLE doc_updates IN ACCESS EXCLUSIVE MODE` in an
/// open transaction, so every read and write of the update log waits (connections stay up, no
/// error is returned). Released on drop: closing the connection ends the transaction.
pub struct StoreStall {
    conn: Option<PgConnection>,
}

impl StoreStall {
    /// Takes the lock in the database at `url`; returns once it is held.
    pub async fn start(url: &str) -> StoreStall {
        let mut conn = PgConnection::connect(url).await.expect("connect to PostgreSQL to stall it");
        sqlx::raw_sql("BEGIN; LOCK TABLE doc_updates IN ACCESS EXCLUSIVE MODE")
            .execute(&mut conn)
            .await
            .expect("lock doc_updates");
        StoreStall { conn: Some(conn) }
    }

    /// Releases the lock now (a rollback), rather than when the connection closes on drop.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.expect("release doc_updates");
            let _ = conn.close().await;
        }
    }
}

/// A PostgreSQL server of its own, in a temporary directory, stopped on drop.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (cargo xtask test installs them)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version with pg_ctl")
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let dir = tempfile::Builder::new().prefix("collab-test-pg-").tempdir_in("/tmp").unwrap();
        if is_root() {
            let status = Command::new("chown").args(["postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(status.success(), "chown to postgres");
        }
        let pg = PrivatePostgres { dir, bin: bin_dir(), port: free_port() };
        let data = pg.data();
        pg.run(pg.bin.join("initdb"), &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "--no-sync"]);
        pg.up();
        let createdb = pg.bin.join("createdb");
        pg.run(createdb, &["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "collab"]);
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: PathBuf, args: &[&str]) {
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).current_dir(self.dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{} {args:?} failed:\n{}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        let mut all = vec!["-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run(self.bin.join("pg_ctl"), &all);
    }

    /// Starts the server (again) on its port, waiting until it accepts connections.
    pub fn up(&self) {
        let options = format!("-p {} -c listen_addresses=127.0.0.1 -k {}", self.port, self.dir.path().display());
        let log = self.dir.path().join("log");
        self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &options, "start"]);
    }

    /// Stops the server at once, as a crash or an operator would.
    pub fn down(&self) {
        self.pg_ctl(&["-w", "-m", "immediate", "stop"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/collab", self.port)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = cmd.arg("-D").arg(&data).args(["-m", "immediate", "-w", "stop"]).output();
    }
}
