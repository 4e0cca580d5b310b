//! The project's sandbox lease in a cluster: one node's bridge runs a project at a time; the
//! lease (`collab:exec-owner:{project}`) is taken through the bus and renewed every third of its
//! time to live, and a session that cannot keep it closes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exec_bridge::session::Session;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::sync::bus::Leases;

pub(super) fn lease_key(project: &str) -> String {
    format!("collab:exec-owner:{project}")
}

/// Renews the project's lease every third of `ttl` while the session lives, and gives it up when
/// the session stops. A lease taken by another node, or not renewed for a whole `ttl` (Redis
/// unreachable: another node may take it once it expires), closes the session: two bridges never
/// run one project's sandbox at once.
pub(super) async fn keep_lease(
    bus: Leases,
    project: String,
    ttl: Duration,
    session: Arc<Session>,
    stop: CancellationToken,
) {
    let key = lease_key(&project);
    let mut renewed = Instant::now();
    let closed = session.closed();
    let mut tick = tokio::time::interval(ttl / 3);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
            _ = closed.cancelled() => break,
        }
        match bus.hold_lease(&key, ttl).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                warn!(project, "another node took this project's sandbox lease; closing the session here");
                break;
            }
            Err(e) if renewed.elapsed() >= ttl => {
                warn!(project, error = %e, "could not renew the sandbox lease in time; closing the session");
                break;
            }
            Err(_) => {}
        }
    }
    session.close();
    stop.cancel();
    let _ = bus.release_lease(&key).await;
}
