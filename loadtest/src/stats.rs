//! What a scenario counts while it runs: when each keystroke was sent and to how many receivers,
//! deliveries, and latency histograms (microseconds, HdrHistogram), shared by every peer's
//! observer.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A latency histogram in microseconds, from 1 µs to 10 minutes at 3 significant figures.
#[derive(Debug, Clone)]
pub struct Histogram(hdrhistogram::Histogram<u64>);

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram(hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Histogram {
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record((d.as_micros() as u64).max(1));
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value at quantile `q` (0.0-1.0), in milliseconds; 0 when empty.
    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() { 0.0 } else { self.0.value_at_quantile(q) as f64 / 1e3 }
    }

    pub fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1e3
    }

    /// `p50 / p90 / p99 / max` in milliseconds.
    pub fn summary(&self) -> String {
        format!("{:.2} / {:.2} / {:.2} / {:.2}", self.ms(0.5), self.ms(0.9), self.ms(0.99), self.max_ms())
    }

    pub fn add(&mut self, other: &Histogram) {
        self.0.add(&other.0).expect("histograms with the same bounds");
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Keystrokes not yet received by every receiver: (client, clock) → (sent at, receivers left).
    pending: HashMap<(u64, u32), (Instant, u32)>,
    latency: Histogram,
    connect: Histogram,
    edits: u64,
    deliveries: u64,
    expected: u64,
    /// The server node each client is connected to (cluster runs; absent means node 0).
    home: HashMap<u64, usize>,
    /// Latency between peers on the same node and on different nodes.
    same_node: Histogram,
    cross_node: Histogram,
    /// Deliveries to the peers of each node.
    node_deliveries: Vec<u64>,
}

/// Shared counters; cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<Mutex<Inner>>);

/// A copy of the counters at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub latency: Histogram,
    pub connect: Histogram,
    pub edits: u64,
    pub deliveries: u64,
    pub expected: u64,
    pub same_node: Histogram,
    pub cross_node: Histogram,
    pub node_deliveries: Vec<u64>,
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A keystroke `(client, clock)` is about to be sent to `receivers` peers.
    pub fn sent(&self, client: u64, clock: u32, receivers: u32) {
        let mut s = self.lock();
        s.edits += 1;
        s.expected += u64::from(receivers);
        if receivers > 0 {
            s.pending.insert((client, clock), (Instant::now(), receivers));
        }
    }

    /// `client` is connected to server node `node`.
    pub fn set_home(&self, client: u64, node: usize) {
        self.lock().home.insert(client, node);
    }

    /// A receiver on server node `node` now holds `client`'s keystrokes with these clocks.
    pub fn delivered(&self, client: u64, clocks: RangeInclusive<u32>, now: Instant, node: usize) {
        let mut s = self.lock();
        let same = s.home.get(&client).copied().unwrap_or(0) == node;
        if s.node_deliveries.len() <= node {
            s.node_deliveries.resize(node + 1, 0);
        }
        s.node_deliveries[node] += clocks.clone().count() as u64;
        for clock in clocks {
            let key = (client, clock);
            let Some((at, left)) = s.pending.get_mut(&key) else { continue };
            let at = *at;
            *left -= 1;
            if *left == 0 {
                s.pending.remove(&key);
            }
            s.deliveries += 1;
            let latency = now.duration_since(at);
            s.latency.record(latency);
            if same {
                s.same_node.record(latency);
            } else {
                s.cross_node.record(latency);
            }
        }
    }

    pub fn record_connect(&self, d: Duration) {
        self.lock().connect.record(d);
    }

    /// Deliveries still expected.
    pub fn outstanding(&self) -> u64 {
        let s = self.lock();
        s.expected.saturating_sub(s.deliveries)
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            latency: s.latency.clone(),
            connect: s.connect.clone(),
            edits: s.edits,
            deliveries: s.deliveries,
            expected: s.expected,
            same_node: s.same_node.clone(),
            cross_node: s.cross_node.clone(),
            node_deliveries: s.node_deliveries.clone(),
        }
    }

    /// Takes the latency histogram recorded so far, leaving an empty one (for time series).
    pub fn take_latency(&self) -> Histogram {
        std::mem::take(&mut self.lock().latency)
    }
}
