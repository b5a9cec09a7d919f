//! The outbound queue: sequence numbers, which connection writes next, acknowledgements.
//!
//! Plain data under the client's lock, no I/O: the writers ([`super::writer`]) take batches
//! from it and give them back, written or not.
//!
//! # Invariants
//!
//! - Every message held is in exactly one of three places, and the places are in sequence
//!   order: `unacked` (written, waiting for an acknowledgement) < the batch in flight (taken
//!   by the one connection that writes) < `queue` (not yet taken).
//! - One connection writes at a time: the oldest registered writer. A connection registers
//!   when it is installed and leaves when it has nothing more to write (its graceful close has
//!   written what it owed, or it failed). So a newer connection never writes while an older
//!   one still holds an earlier message: order is by sequence number across connections.
//! - Messages leave in sequence order (written, acknowledged) or all at once (taken back);
//!   so everything below the lowest message held has been settled.

use std::collections::VecDeque;

use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use super::error::SendError;
use crate::epoch::Epoch;

/// Where an awaited message's outcome goes: its sequence number once delivered, or the error.
pub(crate) type Done = oneshot::Sender<Result<u64, SendError>>;

/// A batch ends at this many payload bytes (or with its first message, if that is larger):
/// an awaited send waits for its own batch, not for the whole queue.
const BATCH_BYTES: usize = 64 * 1024;

/// A message accepted and not yet settled.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) seq: u64,
    /// The clock when it was accepted: a closing connection writes only what was accepted
    /// while it was installed (or before).
    pub(crate) accepted: Epoch,
    /// A text or binary message.
    pub(crate) message: Message,
    /// Completed writes (more than one after an at-least-once re-send).
    pub(crate) writes: u32,
    /// The waiting `send`, if any.
    pub(crate) done: Option<Done>,
}

impl Pending {
    fn len(&self) -> usize {
        self.message.len()
    }

    /// Tells the waiting `send`, if any, how it ended.
    pub(crate) fn settle(self, outcome: impl FnOnce(Message) -> Result<u64, SendError>) {
        if let Some(done) = self.done {
            let _ = done.send(outcome(self.message));
        }
    }
}

/// Counters of the client's traffic, read with [`WsClient::stats`](super::WsClient::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages accepted by `send`, `feed`, permits and sinks.
    pub accepted: u64,
    /// Messages written to a connection (each write of a re-sent message counts again).
    pub written: u64,
    /// At-least-once: messages acknowledged by the peer.
    pub acknowledged: u64,
    /// Messages written again after a completed write: at-least-once messages not
    /// acknowledged before their connection ended.
    pub resent: u64,
    /// Messages held now: queued, being written, or waiting for an acknowledgement.
    pub held: u64,
    /// At-least-once: acknowledgements of messages not yet written (a peer that acknowledges
    /// ahead, or an acknowledgement function that misreads a message), ignored.
    pub acks_ignored: u64,
    /// Text and binary messages received.
    pub received: u64,
    /// Messages received while nobody held the [`Incoming`](super::Incoming) stream, and
    /// so delivered to nobody.
    pub undelivered: u64,
}

/// Which messages a writer may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The installed connection of this epoch: anything queued, while the clock still reads
    /// its epoch (nothing accepted after its release goes to it).
    Installed(Epoch),
    /// A connection of this epoch that closes gracefully: what was accepted up to its epoch.
    Closing(Epoch),
}

impl Scope {
    fn epoch(self) -> Epoch {
        match self {
            Scope::Installed(epoch) | Scope::Closing(epoch) => epoch,
        }
    }
}

/// What [`Outbox::take_batch`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// A batch was moved into the writer's buffer.
    Batch,
    /// Nothing to take now: wait for the queue or for an older writer.
    Wait,
    /// Nothing more for this writer, ever (its scope is exhausted or it is not a writer).
    Done,
}

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Accepted, not yet taken, in order.
    queue: VecDeque<Pending>,
    /// At-least-once: written, waiting for an acknowledgement, in order.
    unacked: VecDeque<Pending>,
    /// The first sequence number and length of the batch in flight.
    in_flight: Option<(u64, usize)>,
    /// The last sequence number handed out.
    next_seq: u64,
    held: usize,
    /// Connections that may still write, by epoch; the oldest writes.
    writers: Vec<Epoch>,
    /// The connection that took the last batch: unacknowledged messages go again, first,
    /// on any other.
    last_writer: Option<Epoch>,
    /// At-least-once: everything up to here is acknowledged.
    acked: u64,
    closed: bool,
    pub(crate) stats: Stats,
}

impl Outbox {
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub(crate) fn held(&self) -> usize {
        self.held
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Adds a message at the end, numbered `self.next_seq() + 1`. Returns whether the queue
    /// was empty (the writer may be waiting for it).
    pub(crate) fn push(&mut self, accepted: Epoch, message: Message, done: Option<Done>) -> u64 {
        self.next_seq += 1;
        self.queue.push_back(Pending {
            seq: self.next_seq,
            accepted,
            message,
            writes: 0,
            done,
        });
        self.held += 1;
        self.stats.accepted += 1;
        self.next_seq
    }

    pub(crate) fn queue_is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Everything up to this sequence number has left the client (delivered or given back).
    pub(crate) fn settled(&self) -> u64 {
        let lowest_held = [
            self.unacked.front().map(|p| p.seq),
            self.in_flight.map(|(first, _)| first),
            self.queue.front().map(|p| p.seq),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.next_seq + 1);
        (lowest_held - 1).max(self.acked)
    }

    // ----- writers -----

    /// A connection installed at `epoch` may write, after the older ones.
    pub(crate) fn register(&mut self, epoch: Epoch) {
        if let Err(at) = self.writers.binary_search(&epoch) {
            self.writers.insert(at, epoch);
        }
    }

    /// The connection of `epoch` writes no more. Returns whether it was registered.
    pub(crate) fn deregister(&mut self, epoch: Epoch) -> bool {
        match self.writers.binary_search(&epoch) {
            Ok(at) => {
                self.writers.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// Moves the next batch into `batch` (empty) for the writer of `scope`, if it is the
    /// connection that writes now. `now` is the clock.
    pub(crate) fn take_batch(
        &mut self,
        scope: Scope,
        now: Epoch,
        at_least_once: bool,
        batch: &mut VecDeque<Pending>,
    ) -> Take {
        debug_assert!(batch.is_empty());
        let epoch = scope.epoch();
        if !self.writers.contains(&epoch) {
            return Take::Done;
        }
        if self.writers[0] != epoch {
            return Take::Wait;
        }
        // Only the writer asking now takes batches, and it has none in flight.
        debug_assert!(self.in_flight.is_none());
        if at_least_once && self.last_writer != Some(epoch) {
            // Written to another connection and not acknowledged: they go again, first.
            let mut unacked = std::mem::take(&mut self.unacked);
            unacked.append(&mut self.queue);
            self.queue = unacked;
        }
        self.last_writer = Some(epoch);
        let take = |p: &Pending| match scope {
            Scope::Installed(epoch) => now == epoch,
            Scope::Closing(epoch) => p.accepted <= epoch,
        };
        let (mut n, mut bytes) = (0, 0);
        for next in &self.queue {
            if !take(next) || (n > 0 && bytes + next.len() > BATCH_BYTES) {
                break;
            }
            n += 1;
            bytes += next.len();
        }
        if n == self.queue.len() {
            // The whole queue (the common case): no message moves.
            std::mem::swap(&mut self.queue, batch);
        } else {
            batch.extend(self.queue.drain(..n));
        }
        match batch.front() {
            Some(first) => {
                self.in_flight = Some((first.seq, batch.len()));
                Take::Batch
            }
            None => match scope {
                Scope::Installed(epoch) if now == epoch => Take::Wait,
                _ => Take::Done,
            },
        }
    }

    /// The batch in flight was written and flushed, but for `skipped` of its messages: each
    /// message is delivered (or, with at-least-once, waits for its acknowledgement). What
    /// leaves the client is left in `batch` (without at-least-once, the whole batch) or pushed
    /// onto `delivered` (acknowledged meanwhile); the caller settles both.
    pub(crate) fn finish(
        &mut self,
        batch: &mut VecDeque<Pending>,
        skipped: usize,
        at_least_once: bool,
        delivered: &mut Vec<Pending>,
    ) {
        self.in_flight = None;
        self.stats.written += (batch.len() - skipped) as u64;
        if at_least_once {
            for mut pending in batch.drain(..) {
                if pending.seq <= self.acked {
                    self.retire_acked(pending, delivered);
                    continue;
                }
                self.stats.resent += u64::from(pending.writes > 0);
                pending.writes += 1;
                self.unacked.push_back(pending);
            }
        } else {
            self.held -= batch.len();
        }
    }

    /// The batch in flight was not completely written: it goes back to the front of the
    /// queue, in its order, for the next writer.
    /// What was acknowledged meanwhile (at-least-once) leaves instead, pushed onto `delivered`.
    pub(crate) fn requeue(&mut self, batch: &mut VecDeque<Pending>, delivered: &mut Vec<Pending>) {
        self.in_flight = None;
        while let Some(pending) = batch.pop_back() {
            self.queue.push_front(pending);
        }
        while self.queue.front().is_some_and(|p| p.seq <= self.acked) {
            let pending = self.queue.pop_front().expect("checked");
            self.retire_acked(pending, delivered);
        }
    }

    // ----- acknowledgements -----

    /// An acknowledgement of everything up to `upto`, where everything up to `fed` has been
    /// handed to a connection. An acknowledgement of a message not yet written retires
    /// nothing and is counted as ignored. Pushes onto `delivered` what it retires.
    pub(crate) fn ack(&mut self, upto: u64, fed: u64, delivered: &mut Vec<Pending>) {
        if upto > fed {
            self.stats.acks_ignored += 1;
            return;
        }
        if upto <= self.acked {
            return;
        }
        self.acked = upto;
        while self.unacked.front().is_some_and(|p| p.seq <= upto) {
            let pending = self.unacked.pop_front().expect("checked");
            self.retire_acked(pending, delivered);
        }
        // Written to a connection that ended, queued again, acknowledged late.
        while self.queue.front().is_some_and(|p| p.seq <= upto) {
            let pending = self.queue.pop_front().expect("checked");
            self.retire_acked(pending, delivered);
        }
    }

    /// Whether `seq` has been acknowledged (a batch in flight skips it).
    pub(crate) fn is_acked(&self, seq: u64) -> bool {
        seq <= self.acked
    }

    fn retire_acked(&mut self, pending: Pending, delivered: &mut Vec<Pending>) {
        self.held -= 1;
        self.stats.acknowledged += 1;
        delivered.push(pending);
    }

    // ----- giving back -----

    /// Takes back everything held outside the batch in flight, in order.
    pub(crate) fn take_unsent(&mut self) -> Vec<Pending> {
        let mut taken: Vec<Pending> = self.unacked.drain(..).collect();
        taken.extend(self.queue.drain(..));
        self.held -= taken.len();
        taken
    }

    /// The client has shut down: nothing more is accepted. Every message held whose `send`
    /// still waits goes back to it (returned, for the caller to settle); the others stay for
    /// [`take_unsent`](Self::take_unsent).
    pub(crate) fn close(&mut self) -> Vec<Pending> {
        self.closed = true;
        self.give_back_awaited()
    }

    /// After the shutdown: the messages whose `send` still waits leave for it.
    pub(crate) fn give_back_awaited(&mut self) -> Vec<Pending> {
        let mut given_back = Vec::new();
        if !self.closed {
            return given_back;
        }
        for place in [&mut self.unacked, &mut self.queue] {
            let mut kept = VecDeque::with_capacity(place.len());
            for pending in place.drain(..) {
                if pending.done.as_ref().is_some_and(|done| !done.is_closed()) {
                    given_back.push(pending);
                } else {
                    kept.push_back(pending);
                }
            }
            *place = kept;
        }
        self.held -= given_back.len();
        given_back
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: u64) -> Epoch {
        Epoch::from_u64(n)
    }

    fn outbox_with(n: u64, accepted: Epoch) -> Outbox {
        let mut outbox = Outbox::default();
        for i in 1..=n {
            outbox.push(accepted, Message::text(format!("m{i}")), None);
        }
        outbox
    }

    fn seqs(batch: &VecDeque<Pending>) -> Vec<u64> {
        batch.iter().map(|p| p.seq).collect()
    }

    #[test]
    fn the_oldest_writer_writes_and_a_newer_one_waits_for_it() {
        let mut outbox = outbox_with(3, e(1));
        let mut batch = VecDeque::new();
        assert_eq!(
            outbox.take_batch(Scope::Installed(e(1)), e(1), false, &mut batch),
            Take::Done,
            "not registered"
        );
        outbox.register(e(3));
        outbox.register(e(1));
        assert_eq!(
            outbox.take_batch(Scope::Installed(e(3)), e(3), false, &mut batch),
            Take::Wait,
            "connection 1 writes first"
        );
        assert_eq!(
            outbox.take_batch(Scope::Closing(e(1)), e(3), false, &mut batch),
            Take::Batch
        );
        assert_eq!(seqs(&batch), [1, 2, 3]);
        outbox.requeue(&mut batch, &mut Vec::new());
        assert!(outbox.deregister(e(1)));
        assert!(!outbox.deregister(e(1)));
        assert_eq!(
            outbox.take_batch(Scope::Installed(e(3)), e(3), false, &mut batch),
            Take::Batch
        );
        assert_eq!(
            seqs(&batch),
            [1, 2, 3],
            "what came back goes first, in order"
        );
    }

    #[test]
    fn a_released_connection_takes_nothing_new_and_a_closing_one_only_its_own() {
        let mut outbox = outbox_with(2, e(1));
        outbox.push(e(2), Message::text("after the release"), None);
        outbox.register(e(1));
        let mut batch = VecDeque::new();
        assert_eq!(
            outbox.take_batch(Scope::Installed(e(1)), e(2), false, &mut batch),
            Take::Done,
            "the clock moved on"
        );
        assert_eq!(
            outbox.take_batch(Scope::Closing(e(1)), e(2), false, &mut batch),
            Take::Batch
        );
        assert_eq!(seqs(&batch), [1, 2]);
        let mut delivered = Vec::new();
        outbox.finish(&mut batch, 0, false, &mut delivered);
        assert_eq!(batch.len(), 2, "delivered, for the caller to settle");
        batch.clear();
        assert_eq!(
            outbox.take_batch(Scope::Closing(e(1)), e(2), false, &mut batch),
            Take::Done,
            "message 3 waits for the next connection"
        );
        assert_eq!(outbox.held(), 1);
        assert_eq!(outbox.settled(), 2);
    }

    #[test]
    fn a_batch_ends_at_its_byte_limit_but_holds_at_least_one_message() {
        let mut outbox = Outbox::default();
        let big = "x".repeat(BATCH_BYTES);
        outbox.push(e(1), Message::text(big.clone()), None);
        outbox.push(e(1), Message::text(big), None);
        outbox.push(e(1), Message::text("small"), None);
        outbox.register(e(1));
        let mut batch = VecDeque::new();
        let mut delivered = Vec::new();
        for expected in [vec![1], vec![2], vec![3]] {
            assert_eq!(
                outbox.take_batch(Scope::Installed(e(1)), e(1), false, &mut batch),
                Take::Batch
            );
            assert_eq!(seqs(&batch), expected);
            outbox.finish(&mut batch, 0, false, &mut delivered);
            batch.clear();
        }
        assert_eq!(
            outbox.take_batch(Scope::Installed(e(1)), e(1), false, &mut batch),
            Take::Wait
        );
    }

    #[test]
    fn small_messages_go_in_one_batch_up_to_the_limit_exactly() {
        let mut outbox = Outbox::default();
        for _ in 0..1_000 {
            outbox.push(e(1), Message::text("x".repeat(32)), None);
        }
        let half = "y".repeat(BATCH_BYTES / 2);
        for _ in 0..3 {
            outbox.push(e(1), Message::text(half.clone()), None);
        }
        outbox.register(e(1));
        let (mut batch, mut delivered) = (VecDeque::new(), Vec::new());
        outbox.take_batch(Scope::Installed(e(1)), e(1), false, &mut batch);
        assert_eq!(batch.len(), 1_000 + 1, "32 KB, then the first half fits");
        outbox.finish(&mut batch, 0, false, &mut delivered);
        batch.clear();
        outbox.take_batch(Scope::Installed(e(1)), e(1), false, &mut batch);
        assert_eq!(batch.len(), 2, "two halves make the limit exactly");
    }

    #[test]
    fn skipped_messages_are_not_counted_as_written() {
        let mut outbox = outbox_with(3, e(1));
        outbox.register(e(1));
        let (mut batch, mut delivered) = (VecDeque::new(), Vec::new());
        outbox.take_batch(Scope::Installed(e(1)), e(1), false, &mut batch);
        outbox.finish(&mut batch, 1, false, &mut delivered);
        assert_eq!(outbox.stats.written, 2);
    }

    #[test]
    fn acknowledgements_are_clamped_to_what_was_fed() {
        let mut outbox = outbox_with(4, e(1));
        outbox.register(e(1));
        let mut batch = VecDeque::new();
        let mut delivered = Vec::new();
        outbox.take_batch(Scope::Installed(e(1)), e(1), true, &mut batch);
        outbox.finish(&mut batch, 0, true, &mut delivered);
        assert!(delivered.is_empty(), "kept until acknowledged");
        outbox.push(e(1), Message::text("m5"), None);

        outbox.ack(1_000, 4, &mut delivered);
        assert!(delivered.is_empty(), "ahead of the writes: nothing retired");
        assert_eq!(outbox.stats.acks_ignored, 1);

        outbox.ack(2, 4, &mut delivered);
        assert_eq!(delivered.len(), 2);
        outbox.ack(1, 4, &mut delivered);
        assert_eq!(delivered.len(), 2, "behind: nothing more");
        assert_eq!(outbox.stats.acks_ignored, 1, "behind is not ahead");
        assert_eq!(outbox.held(), 3);
        assert_eq!(outbox.settled(), 2);
        assert!(outbox.is_acked(2) && !outbox.is_acked(3));
    }

    #[test]
    fn unacknowledged_messages_go_again_first_on_another_connection_only() {
        let mut outbox = outbox_with(2, e(1));
        outbox.register(e(1));
        let mut batch = VecDeque::new();
        let mut delivered = Vec::new();
        outbox.take_batch(Scope::Installed(e(1)), e(1), true, &mut batch);
        outbox.finish(&mut batch, 0, true, &mut delivered);
        outbox.push(e(1), Message::text("m3"), None);
        outbox.take_batch(Scope::Installed(e(1)), e(1), true, &mut batch);
        assert_eq!(
            seqs(&batch),
            [3],
            "the same connection does not write them again"
        );
        outbox.finish(&mut batch, 0, true, &mut delivered);
        outbox.deregister(e(1));
        outbox.register(e(3));
        outbox.take_batch(Scope::Installed(e(3)), e(3), true, &mut batch);
        assert_eq!(seqs(&batch), [1, 2, 3]);
        outbox.finish(&mut batch, 0, true, &mut delivered);
        assert_eq!(outbox.stats.resent, 3);
        assert_eq!(outbox.stats.written, 6);
    }

    #[test]
    fn a_closed_outbox_gives_awaited_messages_back_and_keeps_the_others() {
        let mut outbox = Outbox::default();
        let (tx, mut rx) = oneshot::channel();
        let (dropped_tx, dropped_rx) = oneshot::channel();
        drop(dropped_rx);
        outbox.push(e(1), Message::text("awaited"), Some(tx));
        outbox.push(e(1), Message::text("fed"), None);
        outbox.push(e(1), Message::text("given up"), Some(dropped_tx));
        let given_back = outbox.close();
        assert_eq!(given_back.len(), 1);
        for pending in given_back {
            pending.settle(|message| {
                Err(SendError::Closed {
                    message: Some(message),
                })
            });
        }
        match rx.try_recv() {
            Ok(Err(SendError::Closed {
                message: Some(message),
            })) => assert_eq!(message, Message::text("awaited")),
            other => panic!("{other:?}"),
        }
        let left: Vec<_> = outbox.take_unsent().into_iter().map(|p| p.seq).collect();
        assert_eq!(left, [2, 3]);
        assert_eq!(outbox.held(), 0);
        assert!(outbox.is_closed());
    }
}
