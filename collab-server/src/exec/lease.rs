//! The project's sandbox lease in a cluster: one node's bridge runs a project at a time; the
//! lease (`collab:exec-owner:{project}`) is taken through the bus and renewed every quarter of
//! its time to live, and a session that cannot keep it closes half a time to live before it
//! could expire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exec_bridge::session::Session;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::sync::bus::Leases;

pub(super) fn lease_key(project: &str) -> String {
    format!("collab:exec-owner:{project}")
}

/// A project's sandbox lease in Redis.
pub(super) struct Lease {
    pub(super) bus: Leases,
    pub(super) key: String,
    pub(super) ttl: Duration,
}

/// Renews the project's lease every quarter of its `ttl` while the session lives, and gives it
/// up when the session stops. A lease taken by another node closes the session; so does a lease
/// not renewed for half its `ttl` (Redis unreachable, or too slow to answer): that is still half
/// a `ttl` before the lease can expire and another node take the project, so two bridges never
/// run one project's sandbox at once. `held_at` is when the lease was last taken (before the
/// request, so the lease lasts at least `ttl` from then).
pub(super) async fn keep_lease(lease: Lease, held_at: Instant, session: Arc<Session>, stop: CancellationToken) {
    let Lease { bus, key, ttl } = lease;
    let mut renewed = held_at;
    let give_up = ttl / 2;
    let closed = session.closed();
    let mut tick = tokio::time::interval(ttl / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
            _ = closed.cancelled() => break,
        }
        let asked = Instant::now();
        // An unanswered request counts as a failed one: the deadline must hold even when
        // Redis hangs rather than refuses.
        let left = give_up.saturating_sub(renewed.elapsed());
        match tokio::time::timeout(left.min(ttl / 4), bus.hold_lease(&key, ttl)).await {
            Ok(Ok(true)) => renewed = asked,
            Ok(Ok(false)) => {
                warn!(key, "another node took this project's sandbox lease; closing the session here");
                break;
            }
            Ok(Err(_)) | Err(_) if renewed.elapsed() >= give_up => {
                warn!(key, "could not renew the sandbox lease in time; closing the session before it expires");
                break;
            }
            Ok(Err(_)) | Err(_) => {}
        }
    }
    session.close();
    stop.cancel();
    let _ = tokio::time::timeout(ttl / 4, bus.release_lease(&key)).await;
}
