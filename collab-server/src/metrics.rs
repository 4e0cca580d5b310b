//! Prometheus metrics of the server, rendered in the text exposition format at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections_total: Counter,
    pub connections_active: Gauge,
    pub documents_loaded: Gauge,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub queue_overflows: Counter,
    pub protocol_errors: Counter,
    pub auth_failures: Counter,
    pub throttled: Counter,
    pub persist_errors: Counter,
    pub commits: Counter,
    pub commit_appends: Counter,
    pub unsaved_bytes: Gauge,
    pub writes_refused: Counter,
    pub persist_seconds: Histogram,
    pub awareness_swept: Counter,
    pub tasks_alive: Gauge,
    pub bus_connected: Gauge,
    pub bus_published: Counter,
    pub bus_received: Counter,
    pub bus_dropped: Counter,
    pub bus_malformed: Counter,
    pub bus_repairs: Counter,
    pub bus_refused: Counter,
    /// Tasks that panicked or returned an error, by task name.
    pub task_failures: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("collab");
        let m = Metrics {
            connections_total: Counter::default(),
            connections_active: Gauge::default(),
            documents_loaded: Gauge::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            queue_overflows: Counter::default(),
            protocol_errors: Counter::default(),
            auth_failures: Counter::default(),
            throttled: Counter::default(),
            persist_errors: Counter::default(),
            commits: Counter::default(),
            commit_appends: Counter::default(),
            unsaved_bytes: Gauge::default(),
            writes_refused: Counter::default(),
            persist_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            awareness_swept: Counter::default(),
            tasks_alive: Gauge::default(),
            bus_connected: Gauge::default(),
            bus_published: Counter::default(),
            bus_received: Counter::default(),
            bus_dropped: Counter::default(),
            bus_malformed: Counter::default(),
            bus_repairs: Counter::default(),
            bus_refused: Counter::default(),
            task_failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register("connections", "WebSocket connections accepted", m.connections_total.clone());
        registry.register("connections_active", "WebSocket connections open now", m.connections_active.clone());
        registry.register("documents_loaded", "Documents loaded in memory", m.documents_loaded.clone());
        registry.register("bus_connected", "1 while the cluster bus (Redis) is connected", m.bus_connected.clone());
        registry.register("bus_published", "Messages published to other nodes", m.bus_published.clone());
        registry.register("bus_received", "Messages received from other nodes", m.bus_received.clone());
        registry.register(
            "bus_dropped",
            "Bus messages dropped (Redis unreachable, queue or room inbox full); repaired by state comparison",
            m.bus_dropped.clone(),
        );
        registry.register("bus_malformed", "Bus messages that did not decode", m.bus_malformed.clone());
        registry.register("bus_repairs", "State comparisons that changed this node's document", m.bus_repairs.clone());
        registry.register("bus_refused", "Updates from other nodes the document could not take", m.bus_refused.clone());
        registry.register(
            "task_failures",
            "Server tasks that panicked or returned an error, by task",
            m.task_failures.clone(),
        );
        registry.register("tasks_alive", "Tokio tasks alive (read when metrics are rendered)", m.tasks_alive.clone());
        registry.register("messages_in", "WebSocket frames received", m.messages_in.clone());
        registry.register("messages_out", "WebSocket frames sent", m.messages_out.clone());
        registry.register("bytes_in", "Bytes received in WebSocket frames", m.bytes_in.clone());
        registry.register("bytes_out", "Bytes sent in WebSocket frames", m.bytes_out.clone());
        registry.register(
            "queue_overflows",
            "Clients disconnected because their outbound queue was full",
            m.queue_overflows.clone(),
        );
        registry.register("protocol_errors", "Connections closed for malformed input", m.protocol_errors.clone());
        registry.register("auth_failures", "Refused tokens", m.auth_failures.clone());
        registry.register(
            "throttled",
            "Frames a client sent faster than its rate limit; reading paused until they fit",
            m.throttled.clone(),
        );
        registry.register("persist_errors", "Failed writes to the document store", m.persist_errors.clone());
        registry.register(
            "unsaved_bytes",
            "Bytes of applied updates not yet in the store (grows during a store outage)",
            m.unsaved_bytes.clone(),
        );
        registry.register(
            "writes_refused",
            "Edits refused because a document's unsaved backlog reached its bound",
            m.writes_refused.clone(),
        );
        registry.register("store_commits", "Store transactions written by the group committer", m.commits.clone());
        registry.register(
            "store_commit_appends",
            "Document appends written by the group committer (several per transaction under load)",
            m.commit_appends.clone(),
        );
        registry.register("persist_seconds", "Latency of writes to the document store", m.persist_seconds.clone());
        registry.register("awareness_swept", "Stale awareness states removed by the server", m.awareness_swept.clone());
        Metrics { registry, ..m }
    }

    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tasks_alive.set(runtime.metrics().num_alive_tasks() as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
