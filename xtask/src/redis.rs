//! The private redis-server of `cargo xtask cluster`: loopback only, no persistence, its working
//! directory and log under the target directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Where Debian's redis-server package installs the server.
pub const SERVER: &str = "/usr/bin/redis-server";

/// `redis-server` on 127.0.0.1:`port`, keeping nothing on disk but its log, in `dir`.
pub fn command(dir: &Path, port: u16) -> Command {
    let mut redis = Command::new(SERVER);
    redis
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .current_dir(dir);
    redis
}

/// `redis://127.0.0.1:port`.
pub fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// Whether the server on `port` answers PING.
pub fn answers_ping(port: u16) -> bool {
    let reply = (|| -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })();
    reply.is_ok_and(|reply| reply.starts_with("+PONG"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Stdio;
    use std::time::Instant;

    /// Polls `done` every 20 ms for up to 20 s.
    fn within_20s(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server as `command` starts it, given a key and then shut down (which saves, if
    /// anything is configured to), leaves only its log in its directory.
    #[test]
    fn the_server_keeps_nothing_on_disk() {
        assert!(Path::new(SERVER).exists(), "{SERVER} is missing: cargo xtask test installs redis-server");
        let dir = std::env::temp_dir().join(format!("xtask-redis-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = command(&dir, port).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        within_20s("redis to answer", || answers_ping(port));
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        conn.write_all(b"SET kept nowhere\r\n").unwrap();
        let mut reply = [0u8; 5];
        conn.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+OK\r\n");
        conn.write_all(b"SHUTDOWN\r\n").unwrap();
        within_20s("redis to exit", || redis.try_wait().unwrap().is_some());
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(left, ["redis.log"]);
    }
}
