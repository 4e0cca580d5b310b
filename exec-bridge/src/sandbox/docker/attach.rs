//! Attaching to a container's stdio over a connection of our own to the engine's Unix socket.

use std::path::Path;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::ATTACH_HEAD_LIMIT;

/// Attaches to a container's stdio over a connection of our own to the engine's Unix socket
/// (see the module documentation for why not bollard's); `path` is the attach endpoint with its
/// query. Returns what came after the answer's header, and the raw stream.
pub(super) async fn attach_raw(socket: &Path, path: &str) -> std::io::Result<(Bytes, UnixStream)> {
    let mut stream = UnixStream::connect(socket).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(at) = head.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() > ATTACH_HEAD_LIMIT {
            return Err(std::io::Error::other("the engine's answer to an attach has no end of header"));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let status = String::from_utf8_lossy(head.split(|byte| *byte == b'\r').next().unwrap_or_default()).into_owned();
    // 101 for an upgraded connection; engines before API 1.2x answer 200 and hijack all the same.
    let code = status.split_whitespace().nth(1);
    if !matches!(code, Some("101" | "200")) {
        let body = String::from_utf8_lossy(&head[end..]).into_owned();
        return Err(std::io::Error::other(format!("attaching failed: {status} {body}")));
    }
    Ok((Bytes::copy_from_slice(&head[end..]), stream))
}
