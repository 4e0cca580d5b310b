//! The accept loop: connections bounded per address and in total, a deadline for the first byte
//! and the request head, TCP_NODELAY, a back-off when descriptors run out, and graceful shutdown.
//!
//! One client with many idle sockets used to take every descriptor, after which nothing, not even
//! `/healthz`, was accepted. Here each accepted socket takes a slot of its address and of the
//! total before anything is read, and gives it back when the socket closes, WebSocket upgrades
//! included (the slot travels with the socket into the upgrade).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How many connections the listener keeps open, and how long one may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub per_ip: usize,
    pub total: usize,
    /// Deadline for the first byte of a new connection, and for each request head.
    pub header_timeout: Duration,
}

impl ConnLimits {
    /// `total` 0 means seven eighths of the open-file limit (see `--max-connections`).
    pub fn new(per_ip: usize, total: usize, header_timeout: Duration) -> ConnLimits {
        let total = match total {
            0 => rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map_or(4096, |(soft, _)| usize::try_from(soft / 8 * 7).unwrap_or(usize::MAX))
                .max(1),
            n => n,
        };
        ConnLimits { per_ip: per_ip.max(1), total, header_timeout }
    }
}

/// Open connections, per address and in all.
#[derive(Debug, Default)]
struct Open {
    counts: Mutex<(HashMap<IpAddr, usize>, usize)>,
}

impl Open {
    /// A slot for a connection from `ip`, unless its address or the server is at its bound.
    fn take(self: &Arc<Open>, ip: IpAddr, limits: &ConnLimits) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (per_ip, total) = &mut *counts;
        let mine = per_ip.entry(ip).or_insert(0);
        if *mine >= limits.per_ip || *total >= limits.total {
            if *mine == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Slot { open: self.clone(), ip })
    }
}

/// One connection's place in [`Open`], given back on drop.
#[derive(Debug)]
struct Slot {
    open: Arc<Open>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.open.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (per_ip, total) = &mut *counts;
        *total -= 1;
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// A socket holding its slot for as long as it lives.
#[derive(Debug)]
struct Counted {
    tcp: TcpStream,
    _slot: Slot,
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Pause after an accept error that is not about one connection (out of descriptors, memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts and serves connections until `shutdown`, then waits for the HTTP exchanges under way
/// (upgraded WebSockets are the server's task tracker's to wait for).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let open = Arc::new(Open::default());
    let conns = TaskTracker::new();
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            // The peer gave up before we took the connection: nothing wrong here.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => continue,
            Err(e) => {
                // Out of descriptors (EMFILE) or memory: retrying at once would spin. One warning
                // per run of failures, not one per retry.
                if !failing {
                    warn!(error = %e, "accept failed; retrying every {ACCEPT_BACKOFF:?}");
                    failing = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        failing = false;
        let Some(slot) = open.take(peer.ip(), &limits) else {
            debug!(%peer, "connection refused: too many open connections");
            drop(tcp);
            continue;
        };
        // Small frames go out at once: without TCP_NODELAY, Nagle's algorithm and delayed
        // acknowledgements hold a keystroke back for up to 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            warn!(error = %e, "cannot set TCP_NODELAY");
        }
        conns.spawn(serve_one(
            Counted { tcp, _slot: slot },
            peer,
            router.clone(),
            limits.header_timeout,
            shutdown.clone(),
        ));
    }
    conns.close();
    conns.wait().await;
    Ok(())
}

async fn serve_one(
    conn: Counted,
    peer: SocketAddr,
    router: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    // hyper's header timeout starts with a request; a socket that never sends a byte is dropped
    // here instead of holding its slot forever.
    let mut probe = [0u8; 1];
    match tokio::time::timeout(header_timeout, conn.tcp.peek(&mut probe)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let service = tower::ServiceExt::map_request(router, move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let served = builder.serve_connection(TokioIo::new(conn), TowerToHyperService::new(service)).with_upgrades();
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        _ = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}
