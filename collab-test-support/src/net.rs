//! Ports and links: a port nothing listens on, and a TCP proxy whose link a test cuts (every
//! connection through it drops, new ones are refused) and restores.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// A port nothing listens on at the moment of asking (another process may take it after).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// A TCP proxy on 127.0.0.1 to `upstream`: put between a server and Redis or PostgreSQL (or a
/// client and a server), it is the cable a test pulls out.
pub struct CutProxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<LinkState>>,
    accept: AbortHandle,
}

#[derive(Default)]
struct LinkState {
    cut: bool,
    links: Vec<AbortHandle>,
}

impl CutProxy {
    /// Listens on a free port and forwards every connection to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(LinkState::default()));
        let shared = state.clone();
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else { continue };
                if shared.lock().expect("proxy state").cut {
                    // Closed at once: to the client, the other side is gone.
                    drop(down);
                    continue;
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                let mut state = shared.lock().expect("proxy state");
                state.links.retain(|l| !l.is_finished());
                state.links.push(link.abort_handle());
            }
        })
        .abort_handle();
        CutProxy { addr, state, accept }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Drops every open connection and refuses new ones until [`CutProxy::restore`].
    pub fn cut(&self) {
        let mut state = self.state.lock().expect("proxy state");
        state.cut = true;
        for link in state.links.drain(..) {
            link.abort();
        }
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.state.lock().expect("proxy state").cut = false;
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
