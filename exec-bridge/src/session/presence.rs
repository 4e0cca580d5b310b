//! Who is connected to a session: each subscribed peer holds a [`Presence`] in the session's
//! count, and the last one to leave tells the session (which then closes runs' stdin).

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use super::Session;
use crate::protocol::ServerMsg;

/// A peer's subscription to a session's events; the peer counts as present until it is dropped.
pub struct Subscription {
    pub(super) events: broadcast::Receiver<ServerMsg>,
    pub(super) _present: Presence,
}

impl Subscription {
    /// The next event, as [`broadcast::Receiver::recv`] gives it.
    pub async fn recv(&mut self) -> Result<ServerMsg, broadcast::error::RecvError> {
        self.events.recv().await
    }
}

/// One subscribed peer in a session's count.
pub(super) struct Presence {
    pub(super) peers: Arc<watch::Sender<usize>>,
    pub(super) session: std::sync::Weak<Session>,
}

impl Drop for Presence {
    fn drop(&mut self) {
        let mut left = false;
        self.peers.send_modify(|peers| {
            *peers = peers.saturating_sub(1);
            left = *peers == 0;
        });
        if left && let Some(session) = self.session.upgrade() {
            session.nobody_left();
        }
    }
}
