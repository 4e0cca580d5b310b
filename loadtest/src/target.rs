//! Which server a scenario talks to, and how a simulated peer joins a document there: our two
//! endpoints, the y-websocket reference server, or Hocuspocus. Every peer is a real yrs document
//! behind `collab-client`, whatever the server.

use collab_client::{DocPeer, MuxConnection};

/// A server and the endpoint layout its peers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Ours, one y-websocket connection per document: `GET /sync/{doc}`.
    Collab,
    /// Ours, multiplexed with the Hocuspocus framing: `GET /sync`, one socket per peer.
    CollabMux,
    /// The y-websocket reference server (`y-websocket@1`, `bin/server.js`): `GET /{doc}`.
    YWebsocket,
    /// `@hocuspocus/server`: the Hocuspocus framing on `GET /`.
    Hocuspocus,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Collab, Kind::CollabMux, Kind::YWebsocket, Kind::Hocuspocus];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Collab => "collab (y-websocket endpoint)",
            Kind::CollabMux => "collab (multiplexed endpoint)",
            Kind::YWebsocket => "y-websocket@1 server",
            Kind::Hocuspocus => "@hocuspocus/server",
        }
    }

    /// A short name for file names and arguments.
    pub fn slug(self) -> &'static str {
        match self {
            Kind::Collab => "collab",
            Kind::CollabMux => "collab-mux",
            Kind::YWebsocket => "y-websocket",
            Kind::Hocuspocus => "hocuspocus",
        }
    }

    pub fn from_slug(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.slug() == s)
    }

    /// Whether the process behind it is ours (the other two run under Node.js).
    pub fn is_ours(self) -> bool {
        matches!(self, Kind::Collab | Kind::CollabMux)
    }
}

enum Endpoint {
    YWebsocket(String),
    Mux(String, &'static str),
}

/// A running server a scenario connects to. Ours must accept token-less peers
/// (`--allow-anonymous`); the reference servers run without authentication.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: Kind,
    /// `ws://host:port`.
    pub base: String,
}

impl Target {
    pub fn new(kind: Kind, base: impl Into<String>) -> Target {
        Target { kind, base: base.into() }
    }

    /// How a peer reaches `doc`: a y-websocket URL, or a multiplexed URL and the token to send.
    fn endpoint(&self, doc: &str) -> Endpoint {
        let base = &self.base;
        match self.kind {
            Kind::Collab => Endpoint::YWebsocket(format!("{base}/sync/{doc}")),
            Kind::YWebsocket => Endpoint::YWebsocket(format!("{base}/{doc}")),
            Kind::CollabMux => Endpoint::Mux(format!("{base}/sync"), ""),
            // Hocuspocus waits for a token message before it syncs; with no `onAuthenticate`
            // hook it accepts any.
            Kind::Hocuspocus => Endpoint::Mux(base.clone(), "anonymous"),
        }
    }

    /// Opens `doc` as a new peer on its own socket; the peer keeps the socket open.
    pub async fn join(&self, doc: &str) -> anyhow::Result<DocPeer> {
        Ok(match self.endpoint(doc) {
            Endpoint::YWebsocket(url) => DocPeer::connect_url(&url).await?,
            Endpoint::Mux(url, token) => MuxConnection::connect_url(&url).await?.open(doc, token).await?,
        })
    }

    /// Reconnects an existing peer (its document and content kept) to `doc`.
    pub async fn rejoin(&self, peer: &mut DocPeer, doc: &str) -> anyhow::Result<()> {
        match self.endpoint(doc) {
            Endpoint::YWebsocket(url) => peer.reconnect_url(&url).await?,
            Endpoint::Mux(url, token) => {
                let ydoc = peer.doc().clone();
                peer.disconnect();
                *peer = MuxConnection::connect_url(&url).await?.open_with(doc, token, ydoc).await?;
            }
        }
        Ok(())
    }
}
