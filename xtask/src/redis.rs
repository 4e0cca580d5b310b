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

    #[test]
    fn the_server_keeps_nothing_on_disk() {
        let redis = command(Path::new("/tmp/r"), 6390);
        let args: Vec<String> = redis.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.windows(2).any(|w| w == ["--save", ""]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--appendonly", "no"]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--bind", "127.0.0.1"]), "{args:?}");
    }
}
