//! The outbound side of one WebSocket connection: a bounded frame queue and a kill switch.
//!
//! Rooms push encoded frames with `try_send`. A full queue is a decision, not a drop: the
//! connection is closed with 1013 so the client reconnects and resyncs, and the room moves on.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::close::CloseReason;

#[derive(Debug, Clone)]
pub struct ConnSink {
    tx: mpsc::Sender<Bytes>,
    kill: Killer,
}

/// Ends a connection with a close code and reason; the first reason given wins.
#[derive(Debug, Clone, Default)]
pub struct Killer {
    token: CancellationToken,
    reason: Arc<Mutex<Option<CloseReason>>>,
}

impl Killer {
    pub fn kill(&self, reason: CloseReason) {
        {
            let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(reason);
            }
        }
        self.token.cancel();
    }

    pub fn is_killed(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn killed(&self) {
        self.token.cancelled().await;
    }

    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Why a push failed: the connection is gone or was just ended for being too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

impl ConnSink {
    pub fn new(capacity: usize) -> (ConnSink, mpsc::Receiver<Bytes>, Killer) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let kill = Killer::default();
        (ConnSink { tx, kill: kill.clone() }, rx, kill)
    }

    /// Queues a frame. On a full queue the connection is ended with 1013 and `Gone` returned.
    pub fn push(&self, frame: Bytes) -> Result<(), Gone> {
        if self.kill.is_killed() {
            return Err(Gone);
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kill.kill(CloseReason::too_slow());
                Err(Gone)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Gone),
        }
    }

    pub fn killer(&self) -> &Killer {
        &self.kill
    }
}
