//! The relay and confirmation policy of one loaded document, without I/O: which frame goes to
//! which peer now, which waits for a commit to land, and when a failed commit is retried.
//!
//! The room around it encodes frames (per framing) and owns the sockets, the store and the
//! timers; it hands this policy what one step produced and does what the policy answers. The
//! rules, pinned by the tests below:
//!
//! - A writer hears about its own write only once the update is in the store: its write
//!   confirmation (where the framing has one) and the echo of its own part of the batch wait for
//!   the commit that covers them. Every peer whose write a step applied is a writer, whether or
//!   not its framing has a confirmation frame: a y-websocket client's echo is its confirmation.
//! - Everyone else's part of the batch goes to a writer at once, and the whole batch to every
//!   other peer: nothing waits behind a held echo, so a writer keeps seeing the others while the
//!   store is down. A held echo is only content the writer already has, so sending it late
//!   breaks no update order.
//! - One commit is in flight at a time; it covers every unsaved update at the time it starts and
//!   releases the confirmations held until then. Whatever arrives meanwhile waits for the next.
//! - A failed commit keeps everything unsaved and held (its confirmations before later ones) and
//!   is retried after a backoff of 0.1 s doubling to 5 s; a success resets the backoff.
//!
//! `now` is always a parameter: nothing here reads a clock.

use std::time::{Duration, Instant};

use crate::PeerId;

/// The backoff after the first failed commit.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest backoff between retries.
pub const MAX_RETRY: Duration = Duration::from_secs(5);

/// Something held for a peer until the commit covering its write lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held<F> {
    /// A write confirmation (counted by the connection, not queued frame by frame).
    Ack(F),
    /// The echo of a writer's own part of an update.
    Frame(F),
}

/// What one step produced for a peer whose write it applied.
#[derive(Debug)]
pub struct Writer<F> {
    pub peer: PeerId,
    /// The frame confirming the write, where the peer's framing has one.
    pub ack: Option<F>,
    /// The peer's own part of the step's update: its echo, held until saved.
    pub own: Option<F>,
    /// Everyone else's part of the step's update, if any: sent at once.
    pub others: Option<F>,
}

/// Confirmations whose writes are now in the store, in the order they were held.
#[derive(Debug)]
pub struct Release<F, S> {
    /// The server's own writes (imports, restores) waiting for their commit.
    pub server: Vec<S>,
    pub peers: Vec<(PeerId, Held<F>)>,
}

impl<F, S> Default for Release<F, S> {
    fn default() -> Self {
        Release { server: Vec::new(), peers: Vec::new() }
    }
}

/// What the room does next about saving.
#[derive(Debug)]
pub enum Persist<F, S> {
    /// Append these updates (every unsaved one, oldest first) and report with [`Relay::landed`].
    Append(Vec<Vec<u8>>),
    /// Nothing is unsaved: send these confirmations now.
    Release(Release<F, S>),
    /// A commit is in flight or a retry is scheduled; nothing to do now.
    Wait,
}

/// What a landed commit means.
#[derive(Debug)]
pub enum Landed<F, S> {
    Saved {
        release: Release<F, S>,
        /// Updates and bytes the commit saved.
        count: usize,
        bytes: usize,
        /// Whether earlier commits had failed (the store is reachable again).
        recovered: bool,
    },
    Failed {
        /// When to call [`Relay::retry`].
        retry_at: Instant,
        backoff: Duration,
    },
}

/// The commit in flight: it covers the first `count` unsaved updates.
#[derive(Debug)]
struct InFlight<F, S> {
    count: usize,
    bytes: usize,
    held: Vec<(PeerId, Held<F>)>,
    server: Vec<S>,
}

/// One document's relay and confirmation state. `F` is an encoded frame, `S` what a server-side
/// write waits on.
#[derive(Debug)]
pub struct Relay<F, S> {
    /// Updates applied in memory but not yet in the store, oldest first.
    unsaved: Vec<Vec<u8>>,
    unsaved_bytes: usize,
    /// Confirmations to send once the next commit lands.
    held: Vec<(PeerId, Held<F>)>,
    server: Vec<S>,
    in_flight: Option<InFlight<F, S>>,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl<F, S> Default for Relay<F, S> {
    fn default() -> Self {
        Relay {
            unsaved: Vec::new(),
            unsaved_bytes: 0,
            held: Vec::new(),
            server: Vec::new(),
            in_flight: None,
            backoff: Duration::ZERO,
            retry_at: None,
        }
    }
}

impl<F, S> Relay<F, S> {
    pub fn new() -> Relay<F, S> {
        Relay::default()
    }

    /// Takes one step's frames and answers what to send now: `writers` are the peers whose
    /// writes the step applied, `readers` every other peer with the step's whole update. A
    /// writer's confirmation and echo are held until the commit covering them lands.
    pub fn relay(&mut self, writers: Vec<Writer<F>>, readers: Vec<(PeerId, F)>) -> Vec<(PeerId, F)> {
        let mut now = readers;
        for Writer { peer, ack, own, others } in writers {
            self.held.extend(ack.map(|frame| (peer, Held::Ack(frame))));
            self.held.extend(own.map(|frame| (peer, Held::Frame(frame))));
            now.extend(others.map(|frame| (peer, frame)));
        }
        now
    }

    /// A write of the server's own, confirmed with the commit of the step that applied it.
    pub fn server_write(&mut self, done: S) {
        self.server.push(done);
    }

    /// Adds an applied update to the unsaved list; it is saved with the next commit.
    pub fn unsaved(&mut self, update: Vec<u8>) {
        self.unsaved_bytes += update.len();
        self.unsaved.push(update);
    }

    pub fn unsaved_bytes(&self) -> usize {
        self.unsaved_bytes
    }

    pub fn unsaved_count(&self) -> usize {
        self.unsaved.len()
    }

    pub fn is_saved(&self) -> bool {
        self.unsaved.is_empty()
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// After a batch: with nothing unsaved and no commit in flight, release everything held;
    /// otherwise start a commit unless a retry is scheduled.
    pub fn after_batch(&mut self) -> Persist<F, S> {
        if self.unsaved.is_empty() && self.in_flight.is_none() {
            return Persist::Release(self.take_held());
        }
        self.persist_unless_retrying()
    }

    /// [`Relay::persist`] unless a retry is scheduled (a failed store is not hammered).
    pub fn persist_unless_retrying(&mut self) -> Persist<F, S> {
        if self.retry_at.is_some() {
            return Persist::Wait;
        }
        self.persist()
    }

    /// The scheduled retry is due: try again now.
    pub fn retry(&mut self) -> Persist<F, S> {
        self.retry_at = None;
        self.persist()
    }

    /// Starts a commit of every unsaved update, unless one is in flight (the next starts when it
    /// lands); with nothing unsaved, releases everything held.
    pub fn persist(&mut self) -> Persist<F, S> {
        if self.in_flight.is_some() {
            return Persist::Wait;
        }
        if self.unsaved.is_empty() {
            return Persist::Release(self.take_held());
        }
        // What is held until now rides with this commit; it is released when the commit lands.
        let (held, server) = (std::mem::take(&mut self.held), std::mem::take(&mut self.server));
        self.in_flight = Some(InFlight { count: self.unsaved.len(), bytes: self.unsaved_bytes, held, server });
        Persist::Append(self.unsaved.clone())
    }

    /// The commit in flight ended at `now`: on success its writes are confirmed (call
    /// [`Relay::persist`] next for whatever arrived meanwhile); on failure everything stays
    /// unsaved and held, and a retry is due after the backoff.
    pub fn landed(&mut self, saved: bool, now: Instant) -> Option<Landed<F, S>> {
        let done = self.in_flight.take()?;
        if saved {
            let recovered = !self.backoff.is_zero();
            self.backoff = Duration::ZERO;
            self.unsaved.drain(..done.count);
            self.unsaved_bytes -= done.bytes;
            let release = Release { server: done.server, peers: done.held };
            return Some(Landed::Saved { release, count: done.count, bytes: done.bytes, recovered });
        }
        self.backoff = (self.backoff * 2).clamp(FIRST_RETRY, MAX_RETRY);
        // Earlier writes first: they are confirmed with the retry, before later ones.
        let later = std::mem::replace(&mut self.held, done.held);
        self.held.extend(later);
        let later = std::mem::replace(&mut self.server, done.server);
        self.server.extend(later);
        let retry_at = now + self.backoff;
        self.retry_at = Some(retry_at);
        Some(Landed::Failed { retry_at, backoff: self.backoff })
    }

    fn take_held(&mut self) -> Release<F, S> {
        Release { server: std::mem::take(&mut self.server), peers: std::mem::take(&mut self.held) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames are named after what they carry; server writes by a number.
    type Policy = Relay<&'static str, u32>;

    const ADA: PeerId = 1;
    const BOB: PeerId = 2;
    const CAROL: PeerId = 3;

    /// What the store does with the next commit: the tests play the committer.
    fn commit(relay: &mut Policy, saved: bool, now: Instant) -> Landed<&'static str, u32> {
        relay.landed(saved, now).expect("a commit was in flight")
    }

    fn appended(persist: Persist<&'static str, u32>) -> Vec<Vec<u8>> {
        match persist {
            Persist::Append(updates) => updates,
            other => panic!("expected a commit to start, got {other:?}"),
        }
    }

    fn released(landed: Landed<&'static str, u32>) -> Release<&'static str, u32> {
        match landed {
            Landed::Saved { release, .. } => release,
            other => panic!("expected a saved commit, got {other:?}"),
        }
    }

    fn writer(
        peer: PeerId,
        ack: Option<&'static str>,
        own: &'static str,
        others: Option<&'static str>,
    ) -> Writer<&'static str> {
        Writer { peer, ack, own: Some(own), others }
    }

    /// Ada writes (her framing confirms writes); Bob and Carol only read.
    fn ada_writes(relay: &mut Policy, update: &'static str) -> Vec<(PeerId, &'static str)> {
        relay.unsaved(update.as_bytes().to_vec());
        relay.relay(vec![writer(ADA, Some("ack"), update, None)], vec![(BOB, update), (CAROL, update)])
    }

    #[test]
    fn a_writer_hears_its_echo_and_ack_only_after_commit() {
        let now = Instant::now();
        let mut relay = Policy::new();
        let sent = ada_writes(&mut relay, "u1");
        assert!(!sent.iter().any(|(peer, _)| *peer == ADA), "nothing for the writer before the commit");
        assert_eq!(appended(relay.after_batch()), vec![b"u1".to_vec()]);
        let release = released(commit(&mut relay, true, now));
        assert_eq!(release.peers, vec![(ADA, Held::Ack("ack")), (ADA, Held::Frame("u1"))]);
        assert!(relay.is_saved());
    }

    #[test]
    fn other_peers_get_the_update_at_once() {
        let mut relay = Policy::new();
        let sent = ada_writes(&mut relay, "u1");
        assert_eq!(sent, vec![(BOB, "u1"), (CAROL, "u1")]);
    }

    #[test]
    fn a_writer_whose_framing_confirms_nothing_gets_its_echo_after_commit() {
        // y-websocket: no write confirmation, so the echo is the confirmation and waits too.
        let mut relay = Policy::new();
        relay.unsaved(b"u1".to_vec());
        let sent = relay.relay(vec![writer(ADA, None, "u1", None)], vec![(BOB, "u1")]);
        assert_eq!(sent, vec![(BOB, "u1")]);
        assert_eq!(appended(relay.after_batch()), vec![b"u1".to_vec()]);
        assert_eq!(released(commit(&mut relay, true, Instant::now())).peers, vec![(ADA, Held::Frame("u1"))]);
    }

    #[test]
    fn during_an_outage_a_writer_sees_others_updates() {
        // Ada wrote and waits for her echo while the store is down; Bob's later update, and his
        // part of a batch both wrote in, reach her at once.
        let now = Instant::now();
        let mut relay = Policy::new();
        ada_writes(&mut relay, "u1");
        appended(relay.after_batch());
        assert!(matches!(commit(&mut relay, false, now), Landed::Failed { .. }));
        relay.unsaved(b"u2".to_vec());
        let sent = relay.relay(vec![writer(BOB, Some("ack"), "u2", None)], vec![(ADA, "u2"), (CAROL, "u2")]);
        assert_eq!(sent, vec![(ADA, "u2"), (CAROL, "u2")], "only Bob waits, for his own echo");
        relay.unsaved(b"a3b3".to_vec());
        let both = vec![writer(ADA, Some("ack"), "a3", Some("b3")), writer(BOB, Some("ack"), "b3", Some("a3"))];
        let sent = relay.relay(both, vec![(CAROL, "a3b3")]);
        assert_eq!(sent, vec![(CAROL, "a3b3"), (ADA, "b3"), (BOB, "a3")]);
        assert!(matches!(relay.after_batch(), Persist::Wait), "the retry is scheduled");
        assert_eq!(appended(relay.retry()), vec![b"u1".to_vec(), b"u2".to_vec(), b"a3b3".to_vec()]);
        let release = released(commit(&mut relay, true, now + FIRST_RETRY));
        assert_eq!(
            release.peers,
            vec![
                (ADA, Held::Ack("ack")),
                (ADA, Held::Frame("u1")),
                (BOB, Held::Ack("ack")),
                (BOB, Held::Frame("u2")),
                (ADA, Held::Ack("ack")),
                (ADA, Held::Frame("a3")),
                (BOB, Held::Ack("ack")),
                (BOB, Held::Frame("b3")),
            ]
        );
    }

    #[test]
    fn others_updates_never_wait_behind_an_echo() {
        let now = Instant::now();
        let mut relay = Policy::new();
        ada_writes(&mut relay, "u1");
        appended(relay.after_batch());
        // Bob writes while Ada's commit is in flight: Ada gets u2 at once, her echo still held.
        relay.unsaved(b"u2".to_vec());
        let sent = relay.relay(vec![writer(BOB, Some("ack"), "u2", None)], vec![(ADA, "u2"), (CAROL, "u2")]);
        assert_eq!(sent, vec![(ADA, "u2"), (CAROL, "u2")]);
        assert!(matches!(relay.after_batch(), Persist::Wait), "one commit in flight at a time");
        let first = released(commit(&mut relay, true, now));
        assert_eq!(first.peers, vec![(ADA, Held::Ack("ack")), (ADA, Held::Frame("u1"))]);
        assert_eq!(appended(relay.persist()), vec![b"u2".to_vec()], "the next commit takes what came meanwhile");
        let second = released(commit(&mut relay, true, now));
        assert_eq!(second.peers, vec![(BOB, Held::Ack("ack")), (BOB, Held::Frame("u2"))]);
    }

    #[test]
    fn failed_commits_retry_with_backoff_doubling_from_100ms_to_5s() {
        let start = Instant::now();
        let mut relay = Policy::new();
        ada_writes(&mut relay, "u1");
        appended(relay.after_batch());
        let mut now = start;
        let mut backoffs = Vec::new();
        for _ in 0..9 {
            let Landed::Failed { retry_at, backoff } = commit(&mut relay, false, now) else { panic!("failed") };
            assert_eq!(retry_at, now + backoff);
            assert_eq!(relay.retry_at(), Some(retry_at));
            backoffs.push(backoff.as_millis());
            assert!(matches!(relay.persist_unless_retrying(), Persist::Wait), "no commit before the retry is due");
            now = retry_at;
            appended(relay.retry());
        }
        assert_eq!(backoffs, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        let Landed::Saved { recovered, count, .. } = commit(&mut relay, true, now) else { panic!("saved") };
        assert!(recovered && count == 1);
        // A success resets the backoff.
        ada_writes(&mut relay, "u2");
        appended(relay.after_batch());
        let Landed::Failed { backoff, .. } = commit(&mut relay, false, now) else { panic!("failed") };
        assert_eq!(backoff, FIRST_RETRY);
    }

    #[test]
    fn with_nothing_unsaved_held_frames_go_at_once() {
        // A write that added nothing (a resend of what is saved already) is confirmed once
        // nothing of this node's is unsaved, without a commit.
        let mut relay = Policy::new();
        ada_writes(&mut relay, "u1");
        appended(relay.after_batch());
        released(commit(&mut relay, true, Instant::now()));
        relay.relay(vec![Writer { peer: ADA, ack: Some("ack"), own: None, others: None }], vec![]);
        let Persist::Release(release) = relay.after_batch() else { panic!("released at once") };
        assert_eq!(release.peers, vec![(ADA, Held::Ack("ack"))]);
    }

    #[test]
    fn server_writes_are_confirmed_with_their_commit() {
        let now = Instant::now();
        let mut relay = Policy::new();
        relay.unsaved(b"import".to_vec());
        relay.server_write(7);
        appended(relay.after_batch());
        relay.server_write(8);
        assert!(matches!(commit(&mut relay, false, now), Landed::Failed { .. }));
        appended(relay.retry());
        let release = released(commit(&mut relay, true, now));
        assert_eq!(release.server, vec![7, 8], "the failed commit's writes first");
        assert!(relay.is_saved() && relay.unsaved_bytes() == 0);
    }
}
