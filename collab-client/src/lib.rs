//! A Rust peer of the collaboration server: a yrs document kept in sync over either endpoint.
//!
//! Used by the integration tests, the load generator, the exec bridge and the agent. Local edits
//! are sent as they happen (several pending updates share one y-websocket frame); remote updates
//! are applied with the [`REMOTE`] origin so they are not echoed back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use sync_core::wire::{self, ClientIn, DocMessage, HocusClientIn, OutMsg, SyncMessage};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use yrs::sync::Awareness;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, Origin, ReadTxn, StateVector, Text, TextRef, Transact, TransactionMut, Update};

/// Origin of transactions that apply what the server sent.
pub const REMOTE: &str = "remote";
/// The text every file document holds.
pub const CONTENT: &str = sync_core::tree::CONTENT;
/// Largest frame the client packs pending updates into.
/// The most pending local updates merged into one message.
const MERGE_LIMIT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("connection closed")]
    Closed,
}

/// How a connection ended, as the server said it (code 1006 when the socket just dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
}

/// What the peer has heard from the server so far.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub connected: bool,
    /// A sync step 2 from the server arrived (the initial state is in).
    pub synced: bool,
    pub denied: Vec<String>,
    /// Hocuspocus scope, once authenticated.
    pub scope: Option<String>,
    /// Hocuspocus sync-status replies: applied and refused.
    pub applied: u64,
    pub refused: u64,
    /// Update messages this peer sent (local updates that piled up go merged, as one).
    pub updates_sent: u64,
    pub close: Option<CloseInfo>,
    /// Frames received.
    pub frames: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    YWebsocket,
    Hocus,
}

/// The live link between a document and a socket.
#[derive(Clone)]
struct Link {
    framing: Framing,
    key: Arc<str>,
    out: mpsc::Sender<Bytes>,
    pending: Arc<Mutex<Vec<Vec<u8>>>>,
    wake: Arc<Notify>,
}

struct Inner {
    doc: Doc,
    awareness: Mutex<Awareness>,
    link: Mutex<Option<Link>>,
    status: Mutex<Status>,
    changed: watch::Sender<u64>,
}

impl Inner {
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn link(&self) -> Option<Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn status_mut<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        let r = f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
        self.bump();
        r
    }

    /// Handles one message from the server; returns frames to send back.
    fn receive(&self, msg: ClientIn, framing: Framing, key: &str) -> Vec<Bytes> {
        let frame = |m: OutMsg<'_>| -> Bytes {
            match framing {
                Framing::YWebsocket => Bytes::from(wire::encode_ywebsocket(m)),
                Framing::Hocus => Bytes::from(wire::encode_hocus_client(key, m)),
            }
        };
        let mut replies = Vec::new();
        match msg {
            ClientIn::Message(DocMessage::Sync(SyncMessage::SyncStep1(sv))) => {
                let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                replies.push(frame(OutMsg::SyncStep2(&diff)));
            }
            ClientIn::Message(DocMessage::Sync(SyncMessage::SyncStep2(bytes))) => {
                self.apply(&bytes);
                self.status_mut(|s| s.synced = true);
            }
            ClientIn::Message(DocMessage::Sync(SyncMessage::Update(bytes))) => self.apply(&bytes),
            ClientIn::Message(DocMessage::Awareness(update)) => {
                let _ = self.awareness.lock().unwrap_or_else(|e| e.into_inner()).apply_update(update);
            }
            ClientIn::Message(DocMessage::QueryAwareness) => {
                let aw = self.awareness.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(update) = aw.update() {
                    replies.push(frame(OutMsg::Awareness(&update.encode_v1())));
                }
            }
            ClientIn::PermissionDenied(reason) => self.status_mut(|s| s.denied.push(reason)),
            ClientIn::Authenticated(scope) => self.status_mut(|s| s.scope = Some(scope)),
            ClientIn::SyncStatus(true) => self.status_mut(|s| s.applied += 1),
            ClientIn::SyncStatus(false) => self.status_mut(|s| s.refused += 1),
            ClientIn::Close(reason) => self.status_mut(|s| s.close = Some(CloseInfo { code: 1000, reason })),
        }
        self.bump();
        replies
    }

    fn apply(&self, bytes: &[u8]) {
        let Ok(update) = Update::decode_v1(bytes) else {
            tracing::warn!("server sent an undecodable update");
            return;
        };
        let mut txn = self.doc.transact_mut_with(REMOTE);
        if let Err(e) = txn.apply_update(update) {
            tracing::warn!(error = %e, "server sent an update that could not be applied");
        }
    }
}

/// One document kept in sync with the server.
pub struct DocPeer {
    inner: Arc<Inner>,
    conn: Option<Arc<Socket>>,
}

impl std::fmt::Debug for DocPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocPeer").field("status", &self.status()).finish()
    }
}

fn new_inner(doc: Doc) -> Arc<Inner> {
    let (changed, _) = watch::channel(0);
    Arc::new(Inner {
        awareness: Mutex::new(Awareness::new(doc.clone())),
        doc,
        link: Mutex::new(None),
        status: Mutex::new(Status::default()),
        changed,
    })
}

/// Sends local updates through whatever link the document has; one observer per document.
fn observe(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let remote = Origin::from(REMOTE);
    inner
        .doc
        .observe_update_v1("collab-client", move |txn, event| {
            if txn.origin() == Some(&remote) {
                return;
            }
            let Some(inner) = weak.upgrade() else { return };
            if let Some(link) = inner.link() {
                link.pending.lock().unwrap_or_else(|e| e.into_inner()).push(event.update.clone());
                link.wake.notify_one();
            }
        })
        .expect("a document accepts an update observer");
}

impl DocPeer {
    /// Connects to `GET {server}/sync/{doc}?token=...` (`server` like `ws://127.0.0.1:8080`).
    pub async fn connect(server: &str, doc: &str, token: &str) -> Result<DocPeer, ClientError> {
        DocPeer::connect_with(server, doc, token, Doc::new()).await
    }

    /// Like [`DocPeer::connect`], with an existing document (its client id and content are kept).
    pub async fn connect_with(server: &str, doc: &str, token: &str, ydoc: Doc) -> Result<DocPeer, ClientError> {
        DocPeer::connect_url_with(&format!("{server}/sync/{doc}?token={token}"), ydoc).await
    }

    /// Drops the current connection (if any) and connects again; the sync handshake then sends
    /// whatever either side missed meanwhile.
    pub async fn reconnect(&mut self, server: &str, doc: &str, token: &str) -> Result<(), ClientError> {
        self.reconnect_url(&format!("{server}/sync/{doc}?token={token}")).await
    }

    /// Connects a new document to a y-websocket endpoint given by its full URL (another server's
    /// layout, such as the y-websocket reference server's `ws://host:port/{doc}`).
    pub async fn connect_url(url: &str) -> Result<DocPeer, ClientError> {
        DocPeer::connect_url_with(url, Doc::new()).await
    }

    async fn connect_url_with(url: &str, ydoc: Doc) -> Result<DocPeer, ClientError> {
        let inner = new_inner(ydoc);
        observe(&inner);
        let mut peer = DocPeer { inner, conn: None };
        peer.reconnect_url(url).await?;
        Ok(peer)
    }

    /// Like [`DocPeer::reconnect`], to a full y-websocket URL.
    pub async fn reconnect_url(&mut self, url: &str) -> Result<(), ClientError> {
        self.disconnect();
        // The document is registered before the reader starts: the server speaks first.
        let socket = Socket::open(url, Framing::YWebsocket, Some(("", &self.inner))).await?;
        let step1 = wire::encode_ywebsocket(OutMsg::SyncStep1(&self.inner.doc.transact().state_vector()));
        socket.out.send(Bytes::from(step1)).await.map_err(|_| ClientError::Closed)?;
        self.conn = Some(socket);
        Ok(())
    }

    /// Drops the connection at once, without a close handshake (as a crashed client would).
    pub fn disconnect(&mut self) {
        *self.inner.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(conn) = self.conn.take() {
            conn.abort();
        }
        self.inner.status_mut(|s| s.connected = false);
    }

    pub fn doc(&self) -> &Doc {
        &self.inner.doc
    }

    pub fn text_ref(&self) -> TextRef {
        self.inner.doc.get_or_insert_text(CONTENT)
    }

    /// The `content` text.
    pub fn text(&self) -> String {
        let text = self.text_ref();
        text.get_string(&self.inner.doc.transact())
    }

    /// The length of the `content` text, without copying it.
    pub fn text_len(&self) -> u32 {
        self.text_ref().len(&self.inner.doc.transact())
    }

    /// Makes a local edit to `content`; it is sent to the server right away.
    pub fn edit<R>(&self, f: impl FnOnce(&mut TransactionMut, &TextRef) -> R) -> R {
        let text = self.text_ref();
        let mut txn = self.inner.doc.transact_mut();
        f(&mut txn, &text)
    }

    pub fn insert(&self, index: u32, s: &str) {
        self.edit(|txn, text| text.insert(txn, index, s));
    }

    pub fn delete(&self, index: u32, len: u32) {
        self.edit(|txn, text| text.remove_range(txn, index, len));
    }

    pub fn status(&self) -> Status {
        self.inner.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets this peer's awareness state (a JSON object) and sends it.
    pub fn set_awareness(&self, json: &str) {
        let update = {
            let mut aw = self.inner.awareness.lock().unwrap_or_else(|e| e.into_inner());
            aw.set_local_state_raw(json);
            aw.update_with_clients([aw.client_id()]).map(|u| u.encode_v1())
        };
        if let (Ok(update), Some(link)) = (update, self.inner.link()) {
            let frame = match link.framing {
                Framing::YWebsocket => wire::encode_ywebsocket(OutMsg::Awareness(&update)),
                Framing::Hocus => wire::encode_hocus_client(&link.key, OutMsg::Awareness(&update)),
            };
            let _ = link.out.try_send(Bytes::from(frame));
        }
    }

    /// Other clients' awareness states, as JSON strings (removed states are left out).
    pub fn peers_awareness(&self) -> Vec<String> {
        let aw = self.inner.awareness.lock().unwrap_or_else(|e| e.into_inner());
        let me = aw.client_id();
        aw.iter().filter(|(id, _)| *id != me).filter_map(|(_, state)| state.data.map(|d| d.to_string())).collect()
    }

    /// Waits until `cond` holds, re-checking whenever anything arrives from the server.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&DocPeer) -> bool,
    ) -> Result<(), ClientError> {
        let mut rx = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return if cond(self) { Ok(()) } else { Err(ClientError::Timeout(timeout, what.to_owned())) };
                }
            }
        }
    }

    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), ClientError> {
        self.wait_until("initial sync", timeout, |p| p.status().synced).await
    }

    pub async fn wait_text(&self, expected: &str, timeout: Duration) -> Result<(), ClientError> {
        self.wait_until(&format!("text of {} chars", expected.len()), timeout, |p| p.text() == expected).await
    }

    pub async fn wait_closed(&self, timeout: Duration) -> Result<CloseInfo, ClientError> {
        self.wait_until("close", timeout, |p| p.status().close.is_some()).await?;
        self.status().close.ok_or(ClientError::Closed)
    }

    /// Updates sent but possibly not yet written to the socket.
    pub fn unsent(&self) -> usize {
        self.inner.link().map_or(0, |l| l.pending.lock().unwrap_or_else(|e| e.into_inner()).len())
    }
}

/// Links a document to a socket's outbound queue and starts its pump.
fn attach(inner: &Arc<Inner>, framing: Framing, out: &mpsc::Sender<Bytes>, key: &str) -> JoinHandle<()> {
    let link = Link {
        framing,
        key: Arc::from(key),
        out: out.clone(),
        pending: Arc::new(Mutex::new(Vec::new())),
        wake: Arc::new(Notify::new()),
    };
    *inner.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
    inner.status_mut(|s| {
        s.connected = true;
        s.close = None;
        s.synced = false;
    });
    tokio::spawn(pump(link, Arc::downgrade(inner)))
}

/// Sends a document's pending local updates. Updates that piled up while the socket was busy
/// are merged into one update message per frame (at most `MERGE_LIMIT` at a time): one message
/// per frame is what every y-websocket and Hocuspocus server reads.
async fn pump(link: Link, inner: std::sync::Weak<Inner>) {
    loop {
        link.wake.notified().await;
        let updates = std::mem::take(&mut *link.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for chunk in updates.chunks(MERGE_LIMIT) {
            let merged = match chunk {
                [_] => None,
                many => yrs::merge_updates_v1(many.iter().map(Vec::as_slice))
                    .inspect_err(|e| tracing::warn!(error = %e, "local updates not merged, sent one by one"))
                    .ok(),
            };
            let updates = merged.as_ref().map_or(chunk, std::slice::from_ref);
            for update in updates {
                let frame = match link.framing {
                    Framing::YWebsocket => wire::encode_ywebsocket(OutMsg::Update(update)),
                    Framing::Hocus => wire::encode_hocus_client(&link.key, OutMsg::Update(update)),
                };
                if link.out.send(Bytes::from(frame)).await.is_err() {
                    return;
                }
                if let Some(inner) = inner.upgrade() {
                    inner.status_mut(|s| s.updates_sent += 1);
                }
            }
        }
    }
}

/// One WebSocket and its reader and writer tasks.
struct Socket {
    out: mpsc::Sender<Bytes>,
    docs: Arc<Mutex<HashMap<String, Arc<Inner>>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Socket {
    /// Connects and starts the reader and writer; `first` is attached before the reader starts.
    async fn open(url: &str, framing: Framing, first: Option<(&str, &Arc<Inner>)>) -> Result<Arc<Socket>, ClientError> {
        // Small buffers: a load generator holds thousands of these.
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20))
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (mut tx, mut rx) = ws.split();
        let (out, mut out_rx) = mpsc::channel::<Bytes>(1024);
        let docs: Arc<Mutex<HashMap<String, Arc<Inner>>>> = Arc::default();
        let mut tasks = Vec::new();
        if let Some((key, inner)) = first {
            docs.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_owned(), inner.clone());
            tasks.push(attach(inner, framing, &out, key));
        }
        let writer = tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if tx.send(Message::Binary(frame)).await.is_err() {
                    break;
                }
            }
            let _ = tx.close().await;
        });
        let reader_docs = docs.clone();
        let reply = out.clone();
        let reader = tokio::spawn(async move {
            let mut close = CloseInfo { code: 1006, reason: "connection dropped".into() };
            while let Some(msg) = rx.next().await {
                let data = match msg {
                    Ok(Message::Binary(data)) => data,
                    Ok(Message::Close(frame)) => {
                        if let Some(f) = frame {
                            close = CloseInfo { code: f.code.into(), reason: f.reason.to_string() };
                        }
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                };
                for frame in route(&reader_docs, framing, &data) {
                    if reply.send(frame).await.is_err() {
                        break;
                    }
                }
            }
            let all: Vec<Arc<Inner>> =
                reader_docs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
            for inner in all {
                {
                    // Only this socket's link: the document may already be on a newer socket.
                    let mut link = inner.link.lock().unwrap_or_else(|e| e.into_inner());
                    if link.as_ref().is_some_and(|l| l.out.same_channel(&reply)) {
                        *link = None;
                    } else {
                        continue;
                    }
                }
                let close = close.clone();
                inner.status_mut(|s| {
                    s.connected = false;
                    if s.close.is_none() {
                        s.close = Some(close);
                    }
                });
            }
        });
        tasks.extend([writer, reader]);
        Ok(Arc::new(Socket { out, docs, tasks: Mutex::new(tasks) }))
    }

    fn abort(&self) {
        for task in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            task.abort();
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.abort();
    }
}

fn route(docs: &Mutex<HashMap<String, Arc<Inner>>>, framing: Framing, data: &[u8]) -> Vec<Bytes> {
    let lookup = |key: &str| docs.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned();
    match framing {
        Framing::YWebsocket => {
            let Some(inner) = lookup("") else { return Vec::new() };
            inner.status_mut(|s| s.frames += 1);
            match wire::decode_ywebsocket_client(data) {
                Ok(msgs) => msgs.into_iter().flat_map(|m| inner.receive(m, framing, "")).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable frame from server");
                    Vec::new()
                }
            }
        }
        Framing::Hocus => match wire::decode_hocus_client(data) {
            Ok(HocusClientIn::Ping) => vec![Bytes::from(wire::hocus_pong())],
            Ok(HocusClientIn::Pong) => Vec::new(),
            Ok(HocusClientIn::Doc { key, msg }) => {
                let Some(inner) = lookup(&key) else { return Vec::new() };
                inner.status_mut(|s| s.frames += 1);
                inner.receive(msg, framing, &key)
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame from server");
                Vec::new()
            }
        },
    }
}

/// A multiplexed connection (`GET {server}/sync`) carrying many documents.
pub struct MuxConnection {
    socket: Arc<Socket>,
}

impl std::fmt::Debug for MuxConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MuxConnection")
    }
}

impl MuxConnection {
    pub async fn connect(server: &str) -> Result<MuxConnection, ClientError> {
        MuxConnection::connect_url(&format!("{server}/sync")).await
    }

    /// Connects to a multiplexed (Hocuspocus-framed) endpoint given by its full URL.
    pub async fn connect_url(url: &str) -> Result<MuxConnection, ClientError> {
        Ok(MuxConnection { socket: Socket::open(url, Framing::Hocus, None).await? })
    }

    /// Opens a document on this connection: sends the token, then sync step 1 (as the
    /// Hocuspocus provider does, without waiting for the reply to the token).
    pub async fn open(&self, doc: &str, token: &str) -> Result<DocPeer, ClientError> {
        self.open_with(doc, token, Doc::new()).await
    }

    /// Like [`MuxConnection::open`], with an existing document: after a reconnect, the sync
    /// handshake sends whatever the server lacks of it.
    pub async fn open_with(&self, doc: &str, token: &str, ydoc: Doc) -> Result<DocPeer, ClientError> {
        let inner = new_inner(ydoc);
        observe(&inner);
        self.socket.docs.lock().unwrap_or_else(|e| e.into_inner()).insert(doc.to_owned(), inner.clone());
        // The server says nothing about this document before it has the token sent below.
        let pump = attach(&inner, Framing::Hocus, &self.socket.out, doc);
        self.socket.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(pump);
        let out = &self.socket.out;
        out.send(Bytes::from(wire::encode_hocus_token(doc, token))).await.map_err(|_| ClientError::Closed)?;
        let sv = inner.doc.transact().state_vector();
        out.send(Bytes::from(wire::encode_hocus_client(doc, OutMsg::SyncStep1(&sv))))
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(DocPeer { inner, conn: Some(self.socket.clone()) })
    }

    /// Sends a raw frame (for tests of hostile input).
    pub async fn send_raw(&self, frame: Vec<u8>) -> Result<(), ClientError> {
        self.socket.out.send(Bytes::from(frame)).await.map_err(|_| ClientError::Closed)
    }

    /// Detaches a document from this connection.
    pub async fn close_doc(&self, doc: &str) -> Result<(), ClientError> {
        self.socket.docs.lock().unwrap_or_else(|e| e.into_inner()).remove(doc);
        self.send_raw(wire::encode_hocus_close(doc)).await
    }
}

/// The full state of a document as one update (for comparisons in tests).
pub fn full_state(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_state_as_update_v1(&StateVector::default())
}
