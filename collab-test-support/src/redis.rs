//! A private redis-server for one test, without persistence, which the test may kill and start
//! again on the same port.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::net::free_port;
use crate::wait;

const REDIS_SERVER: &str = "/usr/bin/redis-server";

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        assert!(
            Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} is missing: `cargo xtask test` installs the redis-server package"
        );
        let mut redis = Redis { child: None, port: free_port() };
        redis.up().await;
        redis
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    pub async fn up(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let port = self.port.to_string();
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let url = self.url();
        wait::until_async(&format!("redis-server to answer on {port}"), || answers_ping(&url)).await;
    }

    /// SIGKILL: every connection drops and every message in flight is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

async fn answers_ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else { return false };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return false };
    redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
