//! The outbound side of one WebSocket connection: a bounded frame queue and a kill switch.
//!
//! Rooms push encoded frames with `try_send`. A full queue is a decision, not a drop: the
//! connection is closed with 1013 so the client reconnects and resyncs, and the room moves on.
//! The queue is bounded in frames and in bytes: a client that asks for the whole document again
//! and again without reading would otherwise hold a thousand copies of it here.
//!
//! Write confirmations (Hocuspocus `SyncStatus`, one per message a client wrote) are counted,
//! not queued one frame each: a commit confirms every write since the last one at once, and a
//! fast writer's thousand confirmations must not fill the queue and cut off a client that reads
//! perfectly well. Consecutive identical confirmations share one entry with a count.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::close::CloseReason;

#[derive(Debug, Clone)]
pub struct ConnSink {
    tx: mpsc::Sender<Bytes>,
    kill: Killer,
    acks: Arc<Acks>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// Confirmations waiting to be written: runs of one frame repeated `n` times. The first run
/// after the writer emptied them puts an empty frame in the queue to wake it (if the queue is
/// full the writer is busy and looks at the runs before it next waits); empty frames are never
/// written.
#[derive(Debug, Default)]
struct Acks {
    runs: Mutex<VecDeque<(Bytes, u64)>>,
}

/// The most runs of confirmations kept: interleaved confirmations for more documents than
/// this, unread, make the client too slow.
const MAX_ACK_RUNS: usize = 1024;

impl Acks {
    fn pop(&self) -> Option<Bytes> {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        let (frame, n) = runs.front_mut()?;
        let frame = frame.clone();
        *n -= 1;
        if *n == 0 {
            runs.pop_front();
        }
        Some(frame)
    }
}

/// The writer's side: queued frames first, then confirmations.
#[derive(Debug)]
pub struct Outbox {
    rx: mpsc::Receiver<Bytes>,
    acks: Arc<Acks>,
    /// Bytes of frames in `rx` (confirmations are not counted: they are bounded in runs).
    queued: Arc<AtomicUsize>,
}

impl Outbox {
    /// The next frame if one is ready now.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        loop {
            match self.rx.try_recv() {
                Ok(frame) if frame.is_empty() => continue,
                Ok(frame) => return Some(self.taken(frame)),
                Err(_) => return self.acks.pop(),
            }
        }
    }

    /// The next frame to write; `None` once every sink is dropped and nothing is left.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
            match self.rx.recv().await {
                // The wake-up a confirmation sends when it finds no others waiting.
                Some(frame) if frame.is_empty() => continue,
                Some(frame) => return Some(self.taken(frame)),
                None => return self.acks.pop(),
            }
        }
    }

    fn taken(&self, frame: Bytes) -> Bytes {
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        frame
    }
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
    /// A queue of at most `capacity` frames and `max_bytes` bytes (a single larger frame is
    /// let into an empty queue: the whole document for a joiner may be bigger than the bound).
    pub fn new(capacity: usize, max_bytes: usize) -> (ConnSink, Outbox, Killer) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let kill = Killer::default();
        let acks = Arc::new(Acks::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let sink = ConnSink { tx, kill: kill.clone(), acks: acks.clone(), queued: queued.clone(), max_bytes };
        (sink, Outbox { rx, acks, queued }, kill)
    }

    /// Queues a write confirmation; it takes no room in the frame queue.
    pub fn push_ack(&self, frame: Bytes) -> Result<(), Gone> {
        if self.kill.is_killed() {
            return Err(Gone);
        }
        {
            let mut runs = self.acks.runs.lock().unwrap_or_else(|e| e.into_inner());
            let full = runs.len() >= MAX_ACK_RUNS;
            match runs.back_mut() {
                Some((last, n)) if *last == frame => *n += 1,
                _ if full => {
                    drop(runs);
                    self.kill.kill(CloseReason::too_slow());
                    return Err(Gone);
                }
                _ => runs.push_back((frame, 1)),
            }
            if runs.len() == 1 && runs.front().is_some_and(|(_, n)| *n == 1) {
                let _ = self.tx.try_send(Bytes::new());
            }
        }
        Ok(())
    }

    /// Queues a frame. On a full queue (in frames or in bytes) the connection is ended with 1013
    /// and `Gone` returned.
    pub fn push(&self, frame: Bytes) -> Result<(), Gone> {
        if self.kill.is_killed() {
            return Err(Gone);
        }
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.kill.kill(CloseReason::too_slow());
            return Err(Gone);
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.kill.kill(CloseReason::too_slow());
                }
                Err(Gone)
            }
        }
    }

    pub fn killer(&self) -> &Killer {
        &self.kill
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn confirmations_take_no_queue_room_and_all_arrive() {
        let (sink, mut outbox, killer) = ConnSink::new(4, 1 << 20);
        let ack = Bytes::from_static(b"ack");
        for _ in 0..3000 {
            sink.push_ack(ack.clone()).unwrap();
        }
        sink.push(Bytes::from_static(b"update")).unwrap();
        assert!(!killer.is_killed(), "a burst of confirmations is not a slow client");
        assert_eq!(outbox.recv().await.unwrap(), "update", "queued frames go first");
        for _ in 0..3000 {
            assert_eq!(outbox.recv().await.unwrap(), ack);
        }
        drop(sink);
        assert_eq!(outbox.recv().await, None);
    }

    #[tokio::test]
    async fn a_queue_full_in_bytes_ends_the_connection_and_a_read_frame_frees_its_bytes() {
        let (sink, mut outbox, killer) = ConnSink::new(100, 10);
        // One frame larger than the bound passes into an empty queue.
        sink.push(Bytes::from(vec![1; 25])).unwrap();
        assert_eq!(outbox.recv().await.unwrap().len(), 25);
        sink.push(Bytes::from(vec![1; 6])).unwrap();
        sink.push(Bytes::from(vec![1; 4])).unwrap();
        assert_eq!(outbox.recv().await.unwrap().len(), 6);
        sink.push(Bytes::from(vec![1; 6])).unwrap();
        assert!(!killer.is_killed(), "10 bytes queued are within the bound");
        assert_eq!(sink.push(Bytes::from(vec![1; 1])), Err(Gone));
        assert_eq!(killer.reason().map(|r| r.code), Some(crate::close::TRY_AGAIN_LATER));
    }

    #[tokio::test]
    async fn unread_confirmations_for_many_documents_end_the_connection() {
        let (sink, _outbox, killer) = ConnSink::new(4, 1 << 20);
        for i in 0..MAX_ACK_RUNS {
            sink.push_ack(Bytes::from(format!("ack {}", i % 2))).unwrap();
        }
        assert_eq!(sink.push_ack(Bytes::from_static(b"ack 0")), Err(Gone));
        assert!(killer.is_killed());
        assert_eq!(killer.reason().map(|r| r.code), Some(crate::close::TRY_AGAIN_LATER));
    }
}
