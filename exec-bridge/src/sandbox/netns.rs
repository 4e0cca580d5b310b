//! Reaching a port inside a sandbox's network namespace from the bridge (for live previews):
//! which address listens on it, read from the namespace's own `/proc/PID/net/tcp{,6}`, and a
//! connection made by a short-lived thread that enters the namespace with `setns(2)`.
//!
//! Both sandboxes keep their programs off every network (a bubblewrap run has a network
//! namespace of its own with only a loopback; a Docker project container has `network_mode
//! none`), so the only way in is from inside that namespace. `setns` into a network namespace
//! needs `CAP_SYS_ADMIN` both in the bridge's own user namespace and in the one owning the target
//! namespace: a bridge running as root on the host has both (the sandboxes' user namespaces are
//! its descendants). A bridge without it gets [`SandboxError::Spawn`] with `EPERM`.
//!
//! The thread exists only to connect: the socket stays in the namespace it was created in, and
//! the thread exits right after, so no other work ever runs in the sandbox's namespace (a thread
//! of tokio's blocking pool would carry it into unrelated tasks).

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::sync::oneshot;

use super::SandboxError;

/// How long a connection to a listening port inside a sandbox may take (it is a loopback).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `st` of a listening socket in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// The address to connect to for `port` in the network namespace of `pid`: the address a socket
/// listens on, or the loopback of its family when it listens on every address. `None` when
/// nothing listens on `port` there.
pub(super) fn listening_address(pid: u32, port: u16) -> io::Result<Option<SocketAddr>> {
    for (table, ipv6) in [("tcp", false), ("tcp6", true)] {
        let text = match std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) => text,
            // No IPv6 in this kernel, or the process is gone.
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        if let Some(addr) = find_listener(&text, ipv6, port) {
            return Ok(Some(addr));
        }
    }
    Ok(None)
}

/// The listener on `port` in one `/proc/net/tcp{,6}` table, as an address to connect to.
fn find_listener(table: &str, ipv6: bool, port: u16) -> Option<SocketAddr> {
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        let (ip, listening_port) = local.split_once(':')?;
        if state != TCP_LISTEN || u16::from_str_radix(listening_port, 16).ok()? != port {
            return None;
        }
        let ip = parse_proc_ip(ip, ipv6)?;
        let ip = match ip {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Some(SocketAddr::new(ip, port))
    })
}

/// An address as the kernel prints it in `/proc/net/tcp{,6}`: 32-bit words in hexadecimal,
/// each in the machine's byte order.
fn parse_proc_ip(hex: &str, ipv6: bool) -> Option<IpAddr> {
    let words = if ipv6 { 4 } else { 1 };
    if hex.len() != words * 8 {
        return None;
    }
    let mut bytes = Vec::with_capacity(words * 4);
    for word in 0..words {
        let value = u32::from_str_radix(&hex[word * 8..word * 8 + 8], 16).ok()?;
        bytes.extend_from_slice(&value.to_ne_bytes());
    }
    if ipv6 {
        let octets: [u8; 16] = bytes.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(octets)))
    } else {
        let octets: [u8; 4] = bytes.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(octets)))
    }
}

/// Opens the network namespace of `pid`, refusing the bridge's own (which a sandbox never has):
/// whatever goes wrong in finding a sandbox's process, a preview must not reach the host.
pub(super) fn open(pid: u32) -> io::Result<File> {
    let namespace = File::open(format!("/proc/{pid}/ns/net"))?;
    let theirs = namespace.metadata()?;
    let ours = std::fs::metadata("/proc/self/ns/net")?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(io::Error::other(format!("process {pid} shares the bridge's network namespace")));
    }
    Ok(namespace)
}

/// Connects to `addr` from inside `namespace` (see the module documentation).
pub(super) async fn connect_inside(namespace: File, addr: SocketAddr) -> Result<tokio::net::TcpStream, SandboxError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("exec-bridge-preview-connect".to_owned())
        .spawn(move || {
            let _ = tx.send(connect_in(&namespace, addr));
        })
        .map_err(SandboxError::Spawn)?;
    let connected = rx.await.map_err(|_| SandboxError::Spawn(io::Error::other("the connecting thread died")))?;
    let stream = match connected {
        Ok(stream) => stream,
        // Closed between the look at its table and the connection.
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(SandboxError::NotListening { port: addr.port() });
        }
        Err(err) => return Err(SandboxError::Spawn(err)),
    };
    tokio::net::TcpStream::from_std(stream).map_err(SandboxError::Spawn)
}

/// Runs on a thread of its own, which it leaves in `namespace`: the caller lets it end.
fn connect_in(namespace: &File, addr: SocketAddr) -> io::Result<TcpStream> {
    move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network)).map_err(|err| {
        io::Error::new(
            io::Error::from(err).kind(),
            format!("entering a sandbox's network namespace needs CAP_SYS_ADMIN (the bridge runs as root): {err}"),
        )
    })?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The tables below are as a little-endian machine prints them.
    #[cfg(target_endian = "little")]
    #[test]
    fn finds_listeners_in_proc_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 100 0 0 10 0\n   2: 0100007F:1F92 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 3 1 0 100 0 0 10 0\n";
        assert_eq!(find_listener(v4, false, 8080), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(find_listener(v4, false, 8081), Some("127.0.0.1:8081".parse().unwrap()));
        assert_eq!(find_listener(v4, false, 8082), None, "an established connection is not a listener");
        assert_eq!(find_listener(v4, false, 9), None);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n";
        assert_eq!(find_listener(v6, true, 8080), Some("[::1]:8080".parse().unwrap()));
        assert_eq!(find_listener(v6, true, 8081), Some("[::1]:8081".parse().unwrap()));
    }
}
