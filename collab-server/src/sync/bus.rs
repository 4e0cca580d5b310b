//! The cluster bus: one Redis pub/sub channel per document, carrying [`NodeMsg`]s between the
//! server nodes that have the document loaded.
//!
//! Channels are Redis 7 sharded channels (`SSUBSCRIBE`/`SPUBLISH`): a Redis Cluster spreads them
//! over its shards by channel name, and a single Redis serves them like plain channels. A node
//! subscribes to a document's channel while the document is loaded, and only then.
//!
//! The bus is lossy by design, like Redis pub/sub itself: a message published while Redis is
//! unreachable, or pushed to a room whose inbox is full, is dropped and counted, never waited for.
//! Rooms repair what was lost by comparing states (see `rooms/cluster.rs`); the bus tells every
//! subscriber when the connection comes back so they compare at once. Nothing here blocks a room:
//! publishing queues the message for one task that sends queued messages in pipelines.
//!
//! The bus does not know what a room is: it delivers [`BusEvent`]s into whatever inbox type a
//! subscriber hands it (anything `From<BusEvent>`), so it sits below the rooms that use it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{AsyncPushSender, MultiplexedConnection, SendError};
use redis::{AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use sync_core::DocName;
use sync_core::peering::{NodeId, NodeMsg};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::tasks::Tasks;

/// Messages waiting to be published; past this, new ones are dropped (and later repaired).
const OUTBOX: usize = 1 << 16;
/// Most messages sent in one pipeline.
const PIPELINE: usize = 512;
/// How long a command may take before the connection counts as lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval of the liveness ping (a silently dead connection is noticed within ~2 intervals).
const PING_EVERY: Duration = Duration::from_secs(1);

/// What the bus delivers to a subscriber's inbox.
#[derive(Debug)]
pub enum BusEvent {
    /// A message another node published on the subscribed document's channel.
    Msg(NodeMsg),
    /// The connection came back (and every route is subscribed again): compare states now.
    Up,
}

/// A handle on the node's bus connection, delivering into inboxes of `T`; cheap to clone.
pub struct Bus<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Bus<T> {
    fn clone(&self) -> Self {
        Bus { inner: self.inner.clone() }
    }
}

impl<T> std::fmt::Debug for Bus<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("node", &self.inner.node).finish_non_exhaustive()
    }
}

struct Inner<T> {
    node: NodeId,
    client: redis::Client,
    /// The live connection, if any; `None` while Redis is unreachable. Shared with [`Leases`].
    live: Arc<Mutex<Option<Live>>>,
    /// The inbox of each subscribed channel.
    routes: Arc<Mutex<HashMap<Vec<u8>, mpsc::Sender<T>>>>,
    /// Serialises subscribe and unsubscribe commands, so an unloading room's unsubscribe cannot
    /// overtake the subscribe of the same document loading again.
    subscribing: tokio::sync::Mutex<()>,
    outbox: mpsc::Sender<(Vec<u8>, Bytes)>,
    metrics: Arc<Metrics>,
}

/// One connection, and what is woken when it fails.
#[derive(Clone)]
struct Live {
    conn: MultiplexedConnection,
    lost: Arc<Notify>,
}

impl Live {
    /// Reports this connection lost (a later connection is not affected).
    fn lost(&self) {
        self.lost.notify_one();
    }
}

/// The bus could not be reached; the caller goes on alone and repairs when it comes back.
#[derive(Debug, thiserror::Error)]
#[error("cluster bus unavailable: {0}")]
pub struct BusDown(String);

/// Takes or renews a lease atomically: `KEYS[1]` held by `ARGV[1]` for `ARGV[2]` ms.
const HOLD_LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Deletes a lease only when `ARGV[1]` holds it.
const RELEASE_LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

fn live(live: &Mutex<Option<Live>>) -> Result<Live, BusDown> {
    live.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| BusDown("not connected".into()))
}

/// Leases held through the bus connection (one node at a time holds a key), for callers that
/// need no subscriptions; cheap to clone.
#[derive(Clone)]
pub struct Leases {
    node: NodeId,
    live: Arc<Mutex<Option<Live>>>,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").field("node", &self.node).finish_non_exhaustive()
    }
}

impl Leases {
    fn live(&self) -> Result<Live, BusDown> {
        live(&self.live)
    }

    /// Holds the lease `key` for this node for `ttl` from now: takes it when nobody holds it,
    /// renews it when this node does. True when this node holds it after the call.
    pub async fn hold_lease(&self, key: &str, ttl: Duration) -> Result<bool, BusDown> {
        let mut live = self.live()?;
        let held: Result<i64, _> = redis::Script::new(HOLD_LEASE)
            .key(key)
            .arg(self.node.to_string())
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut live.conn)
            .await;
        held.map(|h| h == 1).map_err(|e| {
            live.lost();
            BusDown(e.to_string())
        })
    }

    /// Gives up the lease `key` if this node holds it.
    pub async fn release_lease(&self, key: &str) -> Result<(), BusDown> {
        let mut live = self.live()?;
        let released: Result<i64, _> =
            redis::Script::new(RELEASE_LEASE).key(key).arg(self.node.to_string()).invoke_async(&mut live.conn).await;
        released.map(|_| ()).map_err(|e| {
            live.lost();
            BusDown(e.to_string())
        })
    }
}

fn channel(doc: &DocName) -> Vec<u8> {
    format!("collab:doc:{doc}").into_bytes()
}

impl<T: From<BusEvent> + Send + 'static> Bus<T> {
    /// Connects to Redis at `url` (retrying in the background if it is down) and starts the tasks
    /// that keep the connection and send published messages.
    pub fn start(url: &str, metrics: Arc<Metrics>, tasks: &Tasks) -> anyhow::Result<Bus<T>> {
        let info = url.into_connection_info()?;
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let (outbox, queued) = mpsc::channel(OUTBOX);
        let bus = Bus {
            inner: Arc::new(Inner {
                node: rand::random::<u64>() | 1,
                client,
                live: Arc::default(),
                routes: Arc::default(),
                subscribing: tokio::sync::Mutex::new(()),
                outbox,
                metrics,
            }),
        };
        let shutdown = tasks.shutdown().clone();
        tasks.spawn("bus connection", bus.clone().keep_connected(shutdown.clone()));
        tasks.spawn("bus publisher", bus.clone().publish_queued(queued, shutdown));
        Ok(bus)
    }

    /// This process's id on the bus.
    pub fn node(&self) -> NodeId {
        self.inner.node
    }

    fn live(&self) -> Result<Live, BusDown> {
        live(&self.inner.live)
    }

    /// The node's leases, over the same connection.
    pub fn leases(&self) -> Leases {
        Leases { node: self.inner.node, live: self.inner.live.clone() }
    }

    /// Routes `doc`'s channel to `room` and subscribes to it. On error the route stays: the
    /// subscription is made when the connection comes back, and the room hears `BusUp`.
    pub async fn subscribe(&self, doc: &DocName, room: mpsc::Sender<T>) -> Result<(), BusDown> {
        let ch = channel(doc);
        let _order = self.inner.subscribing.lock().await;
        self.inner.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(ch.clone(), room);
        let mut live = self.live()?;
        let result = redis::cmd("SSUBSCRIBE").arg(&ch).exec_async(&mut live.conn).await;
        result.map_err(|e| {
            live.lost();
            BusDown(e.to_string())
        })
    }

    /// Stops routing `doc`'s channel to `room` and unsubscribes, unless a newer room took the
    /// route over meanwhile.
    pub async fn unsubscribe(&self, doc: &DocName, room: &mpsc::Sender<T>) {
        let ch = channel(doc);
        let _order = self.inner.subscribing.lock().await;
        {
            let mut routes = self.inner.routes.lock().unwrap_or_else(|e| e.into_inner());
            match routes.get(&ch) {
                Some(current) if current.same_channel(room) => {
                    routes.remove(&ch);
                }
                _ => return,
            }
        }
        if let Ok(mut live) = self.live() {
            if let Err(e) = redis::cmd("SUNSUBSCRIBE").arg(&ch).exec_async(&mut live.conn).await {
                debug!(error = %e, "unsubscribe failed; the connection is replaced anyway");
            }
        }
    }

    /// Queues `msg` for every other node with `doc` loaded. Never waits: when the queue is full or
    /// Redis is down the message is dropped and counted, and the state comparison repairs it.
    pub fn publish(&self, doc: &DocName, msg: &NodeMsg) {
        self.publish_encoded(doc, msg.encode());
    }

    /// [`Bus::publish`] for a message already encoded.
    pub fn publish_encoded(&self, doc: &DocName, msg: Vec<u8>) {
        if self.inner.outbox.try_send((channel(doc), Bytes::from(msg))).is_err() {
            self.inner.metrics.bus_dropped.inc();
        }
    }

    /// Publishes `msg` at once and returns how many subscribers received it (this node's own
    /// subscription included), for a room that waits for everyone's answer.
    pub async fn publish_now(&self, doc: &DocName, msg: &NodeMsg) -> Result<usize, BusDown> {
        let mut live = self.live()?;
        let result = redis::cmd("SPUBLISH").arg(channel(doc)).arg(msg.encode()).query_async(&mut live.conn).await;
        result.map_err(|e| {
            live.lost();
            BusDown(e.to_string())
        })
    }

    /// Connects, resubscribes every routed channel and tells their rooms; then pings until the
    /// connection fails, and starts over with backoff (0.1 s doubling to 2 s).
    async fn keep_connected(self, shutdown: CancellationToken) {
        let mut backoff = Duration::ZERO;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match self.connect().await {
                Ok(live) => {
                    if !backoff.is_zero() {
                        info!("cluster bus reachable again; documents compare states with the other nodes");
                    }
                    backoff = Duration::ZERO;
                    self.inner.metrics.bus_connected.set(1);
                    self.watch(live, &shutdown).await;
                    self.inner.metrics.bus_connected.set(0);
                    if shutdown.is_cancelled() {
                        return;
                    }
                    warn!("cluster bus connection lost; serving local peers alone until it is back");
                }
                Err(e) => {
                    if backoff.is_zero() {
                        warn!(error = %e, "cannot reach the cluster bus; retrying");
                    }
                }
            }
            backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
        }
    }

    async fn connect(&self) -> redis::RedisResult<Live> {
        let lost = Arc::new(Notify::new());
        let pushes = Dispatch {
            node: self.inner.node,
            routes: self.inner.routes.clone(),
            lost: lost.clone(),
            metrics: self.inner.metrics.clone(),
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_push_sender(pushes);
        let mut conn = self.inner.client.get_multiplexed_async_connection_with_config(&config).await?;
        let _order = self.inner.subscribing.lock().await;
        let (channels, rooms): (Vec<Vec<u8>>, Vec<mpsc::Sender<T>>) = self
            .inner
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(c, r)| (c.clone(), r.clone()))
            .unzip();
        for chunk in channels.chunks(256) {
            redis::cmd("SSUBSCRIBE").arg(chunk).exec_async(&mut conn).await?;
        }
        let live = Live { conn, lost };
        *self.inner.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(live.clone());
        for room in rooms {
            // A full inbox skips this nudge; the room's periodic comparison covers it.
            let _ = room.try_send(T::from(BusEvent::Up));
        }
        Ok(live)
    }

    /// Returns once the connection fails (a push says so, a command fails, or a ping times out).
    async fn watch(&self, live: Live, shutdown: &CancellationToken) {
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut conn = live.conn.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = live.lost.notified() => break,
                _ = ping.tick() => {
                    if let Err(e) = redis::cmd("PING").exec_async(&mut conn).await {
                        debug!(error = %e, "bus ping failed");
                        break;
                    }
                }
            }
        }
        *self.inner.live.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Sends queued messages, many per round trip. While disconnected, drops them (counted).
    async fn publish_queued(self, mut queued: mpsc::Receiver<(Vec<u8>, Bytes)>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(PIPELINE);
        loop {
            let n = tokio::select! {
                n = queued.recv_many(&mut batch, PIPELINE) => n,
                _ = shutdown.cancelled() => return,
            };
            if n == 0 {
                return;
            }
            let Ok(mut live) = self.live() else {
                self.inner.metrics.bus_dropped.inc_by(batch.len() as u64);
                batch.clear();
                continue;
            };
            let mut pipe = redis::pipe();
            for (ch, payload) in batch.drain(..) {
                pipe.cmd("SPUBLISH").arg(ch).arg(payload.as_ref()).ignore();
            }
            match pipe.exec_async(&mut live.conn).await {
                Ok(()) => {
                    self.inner.metrics.bus_published.inc_by(n as u64);
                }
                Err(e) => {
                    debug!(error = %e, "publishing failed");
                    self.inner.metrics.bus_dropped.inc_by(n as u64);
                    live.lost();
                }
            }
        }
    }
}

/// Hands pushed messages to their rooms from the connection's reader, without waiting.
struct Dispatch<T> {
    /// This node: Redis delivers a node's own publications back to it; they stop here.
    node: NodeId,
    routes: Arc<Mutex<HashMap<Vec<u8>, mpsc::Sender<T>>>>,
    lost: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl<T: From<BusEvent> + Send + 'static> AsyncPushSender for Dispatch<T> {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        match info.kind {
            PushKind::Disconnection => self.lost.notify_one(),
            PushKind::SMessage => {
                let [Value::BulkString(ch), Value::BulkString(payload)] = info.data.as_slice() else {
                    self.metrics.bus_malformed.inc();
                    return Ok(());
                };
                let msg = match NodeMsg::decode(payload) {
                    Ok(msg) => msg,
                    Err(e) => {
                        self.metrics.bus_malformed.inc();
                        warn!(error = %e, "ignoring a malformed bus message");
                        return Ok(());
                    }
                };
                if msg.from() == self.node {
                    return Ok(());
                }
                let room = self.routes.lock().unwrap_or_else(|e| e.into_inner()).get(ch).cloned();
                match room.map(|room| room.try_send(T::from(BusEvent::Msg(msg)))) {
                    Some(Ok(())) => {
                        self.metrics.bus_received.inc();
                    }
                    // A room too busy to take it repairs the loss at its next comparison.
                    Some(Err(_)) => {
                        self.metrics.bus_dropped.inc();
                    }
                    None => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}
