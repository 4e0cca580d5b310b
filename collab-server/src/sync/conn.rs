//! One WebSocket connection: the read loop, the write loop, liveness, rate limits, and the two
//! endpoint handlers (y-websocket: one document per socket; Hocuspocus: many, multiplexed).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sync_core::wire::{self, DocMessage, HocusDocIn, HocusIn, HocusOut, OutMsg};
use sync_core::{DocName, PeerId, Role};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::auth::{AuthError, Authorizer, Grant, Identity};
use crate::close::{self, CloseReason};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::sync::rooms::{Framing, RoomCmd, RoomLease, Rooms};
use crate::sync::sink::{ConnSink, Killer, Outbox};
use crate::tasks::Tasks;

/// What every connection shares: limits, metrics, the rooms, the access check and the tasks.
#[derive(Debug)]
pub struct Connections {
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub rooms: Rooms,
    pub auth: Authorizer,
    pub tasks: Tasks,
    next_peer: AtomicU64,
}

impl Connections {
    pub fn new(limits: Limits, metrics: Arc<Metrics>, rooms: Rooms, auth: Authorizer, tasks: Tasks) -> Connections {
        Connections { limits, metrics, rooms, auth, tasks, next_peer: AtomicU64::new(1) }
    }

    fn next_peer(&self) -> PeerId {
        self.next_peer.fetch_add(1, Ordering::Relaxed)
    }
}

/// What differs between the two endpoints: how frames are read and which rooms they reach.
pub trait Handler: Send {
    /// Called once the socket is open, before any frame is read.
    fn start(&mut self, sink: &ConnSink) -> impl Future<Output = Result<(), CloseReason>> + Send;
    /// Handles one frame; every message in it first waits for its cost in `throttle`.
    fn frame(
        &mut self,
        data: &[u8],
        sink: &ConnSink,
        throttle: &Throttle,
    ) -> impl Future<Output = Result<(), CloseReason>> + Send;
    /// Called on every liveness tick.
    fn tick(&mut self, now: Instant) -> Result<(), CloseReason>;
    /// The earliest moment a token this connection holds expires; `None` if none does.
    fn deadline(&self) -> Option<Instant>;
    /// Called when [`Handler::deadline`] is reached: ends what the expired tokens held, or the
    /// whole connection.
    fn expire(&mut self, now: Instant, sink: &ConnSink) -> impl Future<Output = Result<(), CloseReason>> + Send;
    /// Leaves every room. Runs whatever ended the connection.
    fn finish(self) -> impl Future<Output = ()> + Send;
    /// A frame sent when the connection has been quiet for a ping interval, so that clients
    /// whose watchdogs only see data frames (browsers cannot see WebSocket pings) stay connected.
    fn keepalive() -> Bytes;
}

/// Per-connection throttles: excess input waits (TCP backpressure), it is never dropped.
///
/// Bytes are counted per frame; messages are counted inside frames, each weighed by
/// [`sync_core::cost::units`], so one frame holding a million step 1s costs what a million
/// frames would, while a client sending one small update per keystroke or paste is never slowed.
pub struct Throttle {
    messages: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
    bytes: Option<DefaultDirectRateLimiter>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Throttle {
    fn new(l: &Limits, metrics: Arc<crate::metrics::Metrics>) -> Throttle {
        let messages = NonZeroU32::new(l.rate_messages).map(|rate| {
            let burst = NonZeroU32::new(l.rate_burst.max(l.rate_messages)).unwrap_or(rate);
            (RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)), burst)
        });
        let bytes = NonZeroU32::new(l.rate_bytes).map(|rate| {
            let burst = u32::try_from(l.max_message_size).unwrap_or(u32::MAX).max(l.rate_bytes);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)))
        });
        Throttle { messages, bytes, metrics }
    }

    /// Waits until a frame of `len` bytes fits the connection's byte rate.
    async fn frame(&self, len: usize) {
        if let (Some(b), Some(n)) = (&self.bytes, NonZeroU32::new(u32::try_from(len).unwrap_or(u32::MAX))) {
            // A frame never exceeds the burst (it is at least the message size limit).
            if !matches!(b.check_n(n), Ok(Ok(()))) {
                self.metrics.throttled.inc();
                let _ = b.until_n_ready(n).await;
            }
        }
    }

    /// Waits until `msg` fits the connection's message rate.
    pub async fn message(&self, msg: &DocMessage) {
        let Some((m, burst)) = &self.messages else { return };
        // A weight above a (tightened) burst would never fit: it waits for a whole burst instead.
        let Some(n) = NonZeroU32::new(sync_core::cost::units(msg)).map(|n| n.min(*burst)) else { return };
        if !matches!(m.check_n(n), Ok(Ok(()))) {
            self.metrics.throttled.inc();
            let _ = m.until_n_ready(n).await;
        }
    }
}

/// Runs a connection until it closes, then leaves its rooms and closes the socket with a reason.
pub async fn run<H: Handler>(socket: WebSocket, app: Arc<Connections>, mut handler: H) {
    let limits = app.limits.clone();
    let metrics = app.metrics.clone();
    metrics.connections_total.inc();
    metrics.connections_active.inc();
    let (sink, rx, killer) = ConnSink::new(limits.outbound_queue, limits.outbound_queue_bytes);
    let (ws_tx, mut ws_rx) = socket.split();
    let writer =
        app.tasks.spawn("connection writer", write_loop(ws_tx, rx, killer.clone(), H::keepalive(), app.clone()));
    let throttle = Throttle::new(&limits, metrics.clone());
    let mut last_seen = Instant::now();
    let mut tick = tokio::time::interval(limits.ping_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    if let Err(reason) = handler.start(&sink).await {
        killer.kill(reason);
    }
    // Tokens expire on a timer of their own: an idle socket is closed at its token's `exp` too.
    let mut deadline = handler.deadline();
    let expiry = tokio::time::sleep_until(deadline.unwrap_or_else(far_future));
    // Futures and the idle timer live across iterations: re-creating them for every frame was
    // a timer-wheel insertion and two waiter registrations per message (seen in callgrind).
    let killed = killer.killed();
    let shutdown = app.tasks.shutdown().cancelled();
    let idle = tokio::time::sleep_until(last_seen + limits.idle_timeout);
    tokio::pin!(killed, shutdown, idle, expiry);
    while !killer.is_killed() {
        tokio::select! {
            _ = &mut killed => break,
            // Both end the loop: neither completed future is polled again.
            _ = &mut shutdown => killer.kill(CloseReason::shutdown()),
            _ = &mut idle => {
                // The deadline moves only when it is reached: a message resets `last_seen`, not the timer.
                let deadline = last_seen + limits.idle_timeout;
                if deadline > Instant::now() {
                    idle.as_mut().reset(deadline);
                } else {
                    killer.kill(CloseReason::new(close::GOING_AWAY, "no message from the client within the idle timeout"));
                }
            }
            _ = tick.tick() => {
                if let Err(reason) = handler.tick(Instant::now()) {
                    killer.kill(reason);
                }
            }
            _ = &mut expiry, if deadline.is_some() => {
                if let Err(reason) = handler.expire(Instant::now(), &sink).await {
                    killer.kill(reason);
                }
            }
            incoming = ws_rx.next() => match incoming {
                None => break,
                Some(Err(e)) => {
                    if is_capacity_error(e) {
                        killer.kill(CloseReason::new(
                            close::MESSAGE_TOO_BIG,
                            format!("message larger than {} bytes", limits.max_message_size),
                        ));
                    } else {
                        break;
                    }
                }
                Some(Ok(Message::Binary(data))) => {
                    last_seen = Instant::now();
                    metrics.messages_in.inc();
                    metrics.bytes_in.inc_by(data.len() as u64);
                    throttle.frame(data.len()).await;
                    if let Err(reason) = handler.frame(&data, &sink, &throttle).await {
                        if reason.code == close::INVALID_PAYLOAD || reason.code == close::POLICY_VIOLATION {
                            metrics.protocol_errors.inc();
                        }
                        killer.kill(reason);
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    metrics.protocol_errors.inc();
                    killer.kill(CloseReason::new(close::UNSUPPORTED_DATA, "text frames are not supported: send binary y-protocols messages"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => last_seen = Instant::now(),
                Some(Ok(Message::Close(_))) => break,
            }
        }
        let next = handler.deadline();
        if next != deadline {
            deadline = next;
            expiry.as_mut().reset(next.unwrap_or_else(far_future));
        }
    }
    handler.finish().await;
    killer.kill(CloseReason::new(close::NORMAL, ""));
    drop(sink);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    metrics.connections_active.dec();
}

/// A moment no connection lives to see, for a timer that is off.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// How a connection ends when its token expires: 1008, like any other refused token, so a
/// client fetches a new token before it reconnects.
pub fn token_expired() -> CloseReason {
    CloseReason::new(close::POLICY_VIOLATION, "token expired: reconnect with a new token")
}

/// Whether a read failed because the client's message exceeded the size limit.
fn is_capacity_error(e: axum::Error) -> bool {
    let inner = e.into_inner();
    let capacity = matches!(inner.downcast_ref::<tungstenite::Error>(), Some(tungstenite::Error::Capacity(_)));
    if !capacity {
        debug!(error = %inner, "connection read error");
    }
    capacity
}

/// Bytes of queued frames written together at most.
const WRITE_BATCH: usize = 64 * 1024;

async fn write_loop(
    mut tx: SplitSink<WebSocket, Message>,
    mut rx: Outbox,
    killer: Killer,
    keepalive: Bytes,
    app: Arc<Connections>,
) {
    let metrics = app.metrics.clone();
    let mut ping = tokio::time::interval(app.limits.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut quiet = true;
    let killed = killer.killed();
    tokio::pin!(killed);
    loop {
        let outgoing = tokio::select! {
            biased;
            _ = &mut killed => break,
            frame = rx.recv() => match frame {
                Some(frame) => {
                    quiet = false;
                    Message::Binary(frame)
                }
                None => break,
            },
            _ = ping.tick() => {
                if quiet {
                    metrics.messages_out.inc();
                    if tx.send(Message::Binary(keepalive.clone())).await.is_err() {
                        return;
                    }
                }
                quiet = true;
                Message::Ping(Bytes::new())
            }
        };
        let written = async {
            let mut next = Some(outgoing);
            let mut batched = 0;
            // Frames already queued go out with this one in a single write: under load that
            // is one system call for many frames; when idle it is one frame, sent at once.
            while let Some(message) = next.take() {
                if let Message::Binary(b) = &message {
                    metrics.messages_out.inc();
                    metrics.bytes_out.inc_by(b.len() as u64);
                    batched += b.len();
                }
                tx.feed(message).await?;
                if batched < WRITE_BATCH {
                    next = rx.try_recv().map(Message::Binary);
                }
            }
            tx.flush().await
        };
        tokio::select! {
            sent = written => if sent.is_err() {
                killer.kill(CloseReason::new(close::GOING_AWAY, "write failed"));
                return;
            },
            // Killed while blocked on a full socket (a slow reader). The frame being written is
            // whole in the WebSocket's buffer (a sink takes frames whole), so the close frame
            // can follow it: it leaves if the reader takes it before the deadline below.
            _ = &mut killed => break,
        }
    }
    if let Some(reason) = killer.reason() {
        let frame = CloseFrame { code: reason.code, reason: reason.reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(2), tx.send(Message::Close(Some(frame)))).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.close()).await;
}

/// The y-websocket endpoint: the socket is bound to one document, authorized at the upgrade.
pub struct YwsHandler {
    identity: Identity,
    deadline: Option<Instant>,
    lease: RoomLease,
    peer: PeerId,
}

impl YwsHandler {
    pub fn new(app: &Connections, doc: &DocName, grant: Grant) -> YwsHandler {
        let lease = app.rooms.lease(doc);
        let peer = app.next_peer();
        let deadline = grant.deadline();
        YwsHandler { identity: grant.identity, deadline, lease, peer }
    }
}

/// Whether `deadline` has passed at `now`.
fn expired(deadline: Option<Instant>, now: Instant) -> bool {
    deadline.is_some_and(|d| d <= now)
}

fn room_gone() -> CloseReason {
    CloseReason::new(close::TRY_AGAIN_LATER, "document is unavailable, reconnect")
}

impl Handler for YwsHandler {
    async fn start(&mut self, sink: &ConnSink) -> Result<(), CloseReason> {
        info!(user_id = %self.identity.user, role = self.identity.role.as_str(), "peer joined");
        let join = RoomCmd::Join {
            peer: self.peer,
            role: self.identity.role,
            sink: sink.clone(),
            framing: Framing::YWebsocket,
        };
        self.lease.send(join).await.map_err(|_| room_gone())
    }

    async fn frame(&mut self, data: &[u8], _sink: &ConnSink, throttle: &Throttle) -> Result<(), CloseReason> {
        // The timer may not have fired yet: a frame read after the deadline is never applied.
        if expired(self.deadline, Instant::now()) {
            return Err(token_expired());
        }
        let msgs = wire::decode_ywebsocket(data).map_err(CloseReason::malformed)?;
        for msg in msgs {
            throttle.message(&msg).await;
            self.lease.send(RoomCmd::Msg { peer: self.peer, msg }).await.map_err(|_| room_gone())?;
        }
        Ok(())
    }

    fn tick(&mut self, _now: Instant) -> Result<(), CloseReason> {
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    async fn expire(&mut self, now: Instant, _sink: &ConnSink) -> Result<(), CloseReason> {
        if expired(self.deadline, now) {
            info!(user_id = %self.identity.user, "token expired; closing the connection");
            return Err(token_expired());
        }
        Ok(())
    }

    async fn finish(self) {
        let _ = self.lease.send(RoomCmd::Leave { peer: self.peer }).await;
        debug!(user_id = %self.identity.user, "peer left");
    }

    fn keepalive() -> Bytes {
        // An awareness update with no entries: a no-op for every y-websocket client.
        Bytes::from(wire::encode_ywebsocket(OutMsg::Awareness(&[0])))
    }
}

struct Bound {
    lease: RoomLease,
    peer: PeerId,
    role: Role,
    /// When the token that opened (or last re-authorised) this document expires.
    deadline: Option<Instant>,
}

/// The multiplexed endpoint: documents are opened one by one, each with its own token.
pub struct MuxHandler {
    app: Arc<Connections>,
    bound: HashMap<String, Bound>,
    /// Messages for documents whose token has not arrived yet, in order.
    preauth: HashMap<String, Vec<DocMessage>>,
    preauth_messages: usize,
    preauth_bytes: usize,
    opened: Instant,
    authenticated_once: bool,
}

impl MuxHandler {
    pub fn new(app: Arc<Connections>) -> MuxHandler {
        MuxHandler {
            app,
            bound: HashMap::new(),
            preauth: HashMap::new(),
            preauth_messages: 0,
            preauth_bytes: 0,
            opened: Instant::now(),
            authenticated_once: false,
        }
    }

    fn reply(sink: &ConnSink, key: &str, msg: HocusOut<'_>) -> Result<(), CloseReason> {
        sink.push(Bytes::from(wire::encode_hocus(key, msg))).map_err(|_| CloseReason::too_slow())
    }

    async fn authenticate(&mut self, key: String, token: &str, sink: &ConnSink) -> Result<(), CloseReason> {
        let doc = match DocName::parse(wire::doc_name_of_key(&key)) {
            Ok(doc) => doc,
            Err(e) => {
                self.preauth.remove(&key);
                return Self::reply(sink, &key, HocusOut::PermissionDenied(&format!("invalid document name: {e}")));
            }
        };
        let grant = match self.app.auth.authorize_grant(token, &doc) {
            Ok(grant) => grant,
            Err(e) => {
                self.app.metrics.auth_failures.inc();
                if let Some(dropped) = self.preauth.remove(&key) {
                    self.preauth_messages -= dropped.len();
                }
                // A refused token ends the binding it came for: the client was told "denied",
                // so the document must not go on as if it had been authorised.
                if let Some(b) = self.bound.remove(&key) {
                    let _ = b.lease.send(RoomCmd::Leave { peer: b.peer }).await;
                }
                info!(doc_id = %doc, reason = %e, "token refused");
                return Self::reply(sink, &key, HocusOut::PermissionDenied(&e.to_string()));
            }
        };
        let deadline = grant.deadline();
        let service = grant.service;
        let identity = grant.identity;
        let read_write = identity.role.can_write();
        if let Some(b) = self.bound.get_mut(&key) {
            let fresh = self.app.next_peer();
            return Self::reauthorize(b, fresh, identity, deadline, &key, sink).await;
        }
        // The bound is for people's sockets; the node's own bridge opens every file of a project.
        if !service && self.bound.len() >= self.app.limits.max_docs_per_socket {
            return Self::reply(sink, &key, HocusOut::PermissionDenied("too many documents open on one connection"));
        }
        Self::reply(sink, &key, HocusOut::Authenticated { read_write })?;
        self.authenticated_once = true;
        let lease = self.app.rooms.lease(&doc);
        let peer = self.app.next_peer();
        info!(doc_id = %doc, user_id = %identity.user, role = identity.role.as_str(), "peer joined");
        let framing = Framing::Hocus { key: Arc::from(key.as_str()) };
        lease
            .send(RoomCmd::Join { peer, role: identity.role, sink: sink.clone(), framing })
            .await
            .map_err(|_| room_gone())?;
        for msg in self.preauth.remove(&key).unwrap_or_default() {
            self.preauth_messages -= 1;
            lease.send(RoomCmd::Msg { peer, msg }).await.map_err(|_| room_gone())?;
        }
        self.bound.insert(key, Bound { lease, peer, role: identity.role, deadline });
        Ok(())
    }

    /// A new token for a document already open on this socket re-authorises it for real: the
    /// binding takes the new token's expiry, and its role. A changed role (a downgrade to
    /// viewer, or an upgrade to editor) rejoins the room as a new peer with that role, so the
    /// answer the client gets (read-write or read-only) is exactly what the room enforces.
    async fn reauthorize(
        b: &mut Bound,
        fresh: PeerId,
        identity: Identity,
        deadline: Option<Instant>,
        key: &str,
        sink: &ConnSink,
    ) -> Result<(), CloseReason> {
        b.deadline = deadline;
        if identity.role != b.role {
            info!(user_id = %identity.user, from = b.role.as_str(), to = identity.role.as_str(), "document re-authorised with another role");
            let _ = b.lease.send(RoomCmd::Leave { peer: b.peer }).await;
            // A new peer id: nothing the room knew of the old peer (its role) carries over.
            let framing = Framing::Hocus { key: Arc::from(key) };
            b.lease
                .send(RoomCmd::Join { peer: fresh, role: identity.role, sink: sink.clone(), framing })
                .await
                .map_err(|_| room_gone())?;
            b.peer = fresh;
            b.role = identity.role;
        }
        Self::reply(sink, key, HocusOut::Authenticated { read_write: identity.role.can_write() })
    }
}

impl Handler for MuxHandler {
    async fn start(&mut self, _sink: &ConnSink) -> Result<(), CloseReason> {
        Ok(())
    }

    async fn frame(&mut self, data: &[u8], sink: &ConnSink, throttle: &Throttle) -> Result<(), CloseReason> {
        let (key, msg) = match wire::decode_hocus(data).map_err(CloseReason::malformed)? {
            HocusIn::Ping => return sink.push(Bytes::from(wire::hocus_pong())).map_err(|_| CloseReason::too_slow()),
            HocusIn::Pong => return Ok(()),
            HocusIn::Doc { key, msg } => (key, msg),
        };
        match msg {
            HocusDocIn::Token(token) => self.authenticate(key, &token, sink).await,
            HocusDocIn::Message(msg) => {
                throttle.message(&msg).await;
                if self.bound.get(&key).is_some_and(|b| expired(b.deadline, Instant::now())) {
                    // The timer has not fired yet; the message must not be applied all the same.
                    self.expire(Instant::now(), sink).await?;
                }
                if let Some(b) = self.bound.get(&key) {
                    return b.lease.send(RoomCmd::Msg { peer: b.peer, msg }).await.map_err(|_| room_gone());
                }
                let limits = &self.app.limits;
                self.preauth_messages += 1;
                self.preauth_bytes += data.len();
                if self.preauth_messages > limits.preauth_messages || self.preauth_bytes > limits.preauth_bytes {
                    return Err(CloseReason::new(close::POLICY_VIOLATION, "too many messages before authentication"));
                }
                self.preauth.entry(key).or_default().push(msg);
                Ok(())
            }
            HocusDocIn::Close => {
                if let Some(b) = self.bound.remove(&key) {
                    let _ = b.lease.send(RoomCmd::Leave { peer: b.peer }).await;
                }
                if let Some(dropped) = self.preauth.remove(&key) {
                    self.preauth_messages -= dropped.len();
                }
                Ok(())
            }
            HocusDocIn::Stateless(_) | HocusDocIn::Ignored(_) => Ok(()),
        }
    }

    fn tick(&mut self, now: Instant) -> Result<(), CloseReason> {
        if !self.authenticated_once && now.duration_since(self.opened) >= self.app.limits.auth_timeout {
            return Err(CloseReason::new(close::POLICY_VIOLATION, "no document was authenticated in time"));
        }
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        self.bound.values().filter_map(|b| b.deadline).min()
    }

    /// Ends the binding of every document whose token expired, telling the client so
    /// (permission-denied: "token expired"); messages for it after that are never applied. A
    /// socket left with no document at all is closed.
    async fn expire(&mut self, now: Instant, sink: &ConnSink) -> Result<(), CloseReason> {
        let gone: Vec<String> =
            self.bound.iter().filter(|(_, b)| expired(b.deadline, now)).map(|(k, _)| k.clone()).collect();
        if gone.is_empty() {
            return Ok(());
        }
        for key in gone {
            if let Some(b) = self.bound.remove(&key) {
                let _ = b.lease.send(RoomCmd::Leave { peer: b.peer }).await;
                info!(key, "token expired; document closed on this connection");
                Self::reply(sink, &key, HocusOut::PermissionDenied(&AuthError::Expired.to_string()))?;
            }
        }
        if self.bound.is_empty() {
            return Err(token_expired());
        }
        Ok(())
    }

    async fn finish(self) {
        for (_, b) in self.bound {
            let _ = b.lease.send(RoomCmd::Leave { peer: b.peer }).await;
        }
    }

    fn keepalive() -> Bytes {
        Bytes::from(wire::hocus_ping())
    }
}
