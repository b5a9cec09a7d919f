//! [`Shared`]: the client's state, shared by its clones, sinks and futures and by the
//! connections that write for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, Semaphore, SemaphorePermit, TryAcquireError, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::builder::Settings;
use super::error::{SendError, WsError};
use super::outbox::{Outbox, Pending, Scope, Stats, Take};
use crate::epoch::{Clock, Epoch};

/// Gives back one slot of room when dropped (unless forgotten).
struct Refund<'a>(&'a Semaphore);

impl Drop for Refund<'_> {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// An accepted message: its sequence number, and its outcome to come if it was awaited.
pub(crate) type Accepted = (u64, Option<oneshot::Receiver<Result<u64, SendError>>>);

pub(crate) struct Shared {
    outbox: Mutex<Outbox>,
    /// Room in the queue: one permit per message the client may still take. A message
    /// accepted keeps its permit (forgotten) until it leaves; then the permit comes back.
    pub(crate) room: Arc<Semaphore>,
    /// Work for a writer: a message queued into an empty queue, a batch back in the queue,
    /// an older writer gone, the shutdown.
    pub(crate) work: Arc<Notify>,
    /// Everything up to this sequence number has left the client (delivered or given back),
    /// or `u64::MAX` once it has shut down: what flushes wait for.
    settled: AtomicU64,
    /// `settled` moved.
    progress: Notify,
    /// Everything up to this sequence number has been handed to a connection (at least once):
    /// an acknowledgement beyond it is impossible.
    fed: AtomicU64,
    /// At-least-once: everything up to here is acknowledged (a copy of the outbox's, read
    /// without the lock by a writer about to write a message again).
    acked: AtomicU64,
    received: AtomicU64,
    undelivered: AtomicU64,
    /// The managed connection's clock: a connection is installed while it reads its epoch.
    clock: Arc<Clock>,
    pub(crate) settings: Settings,
}

impl Shared {
    pub(crate) fn new(settings: Settings, clock: Arc<Clock>) -> Shared {
        Shared {
            outbox: Mutex::new(Outbox::default()),
            room: Arc::new(Semaphore::new(settings.capacity)),
            work: Arc::new(Notify::new()),
            settled: AtomicU64::new(0),
            progress: Notify::new(),
            fed: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            received: AtomicU64::new(0),
            undelivered: AtomicU64::new(0),
            clock,
            settings,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        // Nothing is left half-updated by a panic under this lock (the only user code that
        // runs under it, `send_with`'s closure, runs before anything changes).
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn at_least_once(&self) -> bool {
        self.settings.ack.is_some()
    }

    // ----- accepting -----

    /// Takes room for one message now, without waiting: a permit of `room`, forgotten,
    /// that [`accept`](Self::accept) uses.
    pub(crate) fn try_reserve(&self) -> Result<(), TryAcquireError> {
        self.room.try_acquire().map(SemaphorePermit::forget)
    }

    /// Accepts the message `make` returns for its sequence number, in room the caller took
    /// (a forgotten permit of `room`; given back if the message is refused). `awaited`: the
    /// caller waits for the outcome.
    ///
    /// `make` runs under the client's lock, before anything changes: keep it short, and do
    /// not call the client from it.
    pub(crate) fn accept(
        &self,
        make: impl FnOnce(u64) -> Message,
        awaited: bool,
    ) -> Result<Accepted, SendError> {
        // Gives the room back if `make` panics (the caller's code).
        let refund = Refund(&self.room);
        let mut outbox = self.lock();
        let message = make(outbox.next_seq() + 1);
        let refused = if !(message.is_text() || message.is_binary()) {
            SendError::NotData(message)
        } else if message.len() > self.settings.max_message {
            SendError::TooLarge {
                message,
                max: self.settings.max_message,
            }
        } else if outbox.is_closed() {
            SendError::Closed {
                message: Some(message),
            }
        } else {
            let (done, outcome) = match awaited {
                true => {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                }
                false => (None, None),
            };
            let was_empty = outbox.queue_is_empty();
            let seq = outbox.push(self.clock.now(), message, done);
            drop(outbox);
            std::mem::forget(refund);
            if was_empty {
                self.work.notify_waiters();
            }
            return Ok((seq, outcome));
        };
        drop(outbox);
        drop(refund);
        Err(refused)
    }

    /// Refuses what `make` returns, for the reason `no_room` gives: the message comes back in
    /// the error.
    pub(crate) fn refuse(
        &self,
        make: impl FnOnce(u64) -> Message,
        no_room: TryAcquireError,
    ) -> SendError {
        let message = make(self.next_seq() + 1);
        match no_room {
            TryAcquireError::NoPermits if message.is_text() || message.is_binary() => {
                SendError::Full {
                    message,
                    capacity: self.settings.capacity,
                }
            }
            TryAcquireError::NoPermits => SendError::NotData(message),
            TryAcquireError::Closed => SendError::Closed {
                message: Some(message),
            },
        }
    }

    // ----- writing -----

    /// Moves the next batch for the writer of `scope` into `batch` (empty).
    pub(crate) fn take_batch(&self, scope: Scope, batch: &mut VecDeque<Pending>) -> Take {
        self.lock()
            .take_batch(scope, self.clock.now(), self.at_least_once(), batch)
    }

    /// Everything up to `seq` has now been handed to a connection.
    pub(crate) fn fed(&self, seq: u64) {
        self.fed.fetch_max(seq, Ordering::AcqRel);
    }

    /// At-least-once: whether `seq` was acknowledged while it waited to be written again.
    pub(crate) fn is_acked(&self, seq: u64) -> bool {
        seq <= self.acked.load(Ordering::Acquire)
    }

    /// The batch was written and flushed, but for `skipped` of its messages (acknowledged
    /// while they waited to go again). `delivered` is an empty buffer to reuse. The batch is
    /// empty afterwards.
    pub(crate) fn finish(
        &self,
        batch: &mut VecDeque<Pending>,
        skipped: usize,
        delivered: &mut Vec<Pending>,
    ) {
        let mut outbox = self.lock();
        outbox.finish(batch, skipped, self.at_least_once(), delivered);
        self.publish(&outbox);
        drop(outbox);
        // Without at-least-once the whole batch is delivered.
        self.room.add_permits(batch.len());
        for pending in batch.drain(..) {
            let seq = pending.seq;
            pending.settle(|_| Ok(seq));
        }
        self.deliver(delivered);
    }

    /// The batch was not completely written: back to the front of the queue, and a writer
    /// is woken for it.
    pub(crate) fn requeue(&self, batch: &mut VecDeque<Pending>) {
        if batch.is_empty() {
            return;
        }
        let mut delivered = Vec::new();
        let mut outbox = self.lock();
        outbox.requeue(batch, &mut delivered);
        let given_back = outbox.give_back_awaited();
        self.publish(&outbox);
        drop(outbox);
        self.deliver(&mut delivered);
        self.give_back(given_back);
        self.work.notify_waiters();
    }

    /// A connection installed at `epoch` will write, after the older ones.
    pub(crate) fn register(&self, epoch: Epoch) {
        self.lock().register(epoch);
    }

    /// The connection of `epoch` writes no more: the next one may.
    pub(crate) fn deregister(&self, epoch: Epoch) {
        if self.lock().deregister(epoch) {
            self.work.notify_waiters();
        }
    }

    // ----- reading -----

    /// A text or binary message arrived. With at-least-once it may acknowledge earlier sends.
    ///
    /// The acknowledgement function is the caller's code: a panic in it is a failure of the
    /// connection that read the message, not of the client.
    pub(crate) fn received(&self, message: &Message) -> Result<(), WsError> {
        self.received.fetch_add(1, Ordering::Relaxed);
        let Some(ack) = &self.settings.ack else {
            return Ok(());
        };
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ack(message)));
        let Some(upto) = read.map_err(|_| WsError::AckPanicked)? else {
            return Ok(());
        };
        let mut delivered = Vec::new();
        let mut outbox = self.lock();
        outbox.ack(upto, self.fed.load(Ordering::Acquire), &mut delivered);
        if outbox.is_acked(upto) {
            self.acked.fetch_max(upto, Ordering::AcqRel);
        }
        self.publish(&outbox);
        drop(outbox);
        self.deliver(&mut delivered);
        Ok(())
    }

    /// A message arrived while nobody held the `Incoming` stream.
    pub(crate) fn undelivered(&self) {
        self.undelivered.fetch_add(1, Ordering::Relaxed);
    }

    // ----- giving back -----

    /// Every message held outside the batch being written, in order.
    pub(crate) fn take_unsent(&self) -> Vec<(u64, Message)> {
        let mut outbox = self.lock();
        let taken = outbox.take_unsent();
        self.publish(&outbox);
        drop(outbox);
        self.room.add_permits(taken.len());
        taken
            .into_iter()
            .map(
                |Pending {
                     seq, message, done, ..
                 }| {
                    if let Some(done) = done {
                        let _ = done.send(Err(SendError::Withdrawn { seq }));
                    }
                    (seq, message)
                },
            )
            .collect()
    }

    /// The driver has stopped: nothing more is accepted or written. Awaited messages go back
    /// to their senders; waits for room and flushes end.
    pub(crate) fn close(&self) {
        let mut outbox = self.lock();
        let given_back = outbox.close();
        self.room.close();
        self.publish(&outbox);
        drop(outbox);
        self.give_back(given_back);
        self.work.notify_waiters();
    }

    // ----- observing -----

    /// Waits until everything up to `seq` has left the client; `false` if it shut down first.
    pub(crate) async fn settled(&self, seq: u64) -> bool {
        loop {
            let moved = self.progress.notified();
            let mut moved = std::pin::pin!(moved);
            // Registered before the look: a move after it wakes us.
            moved.as_mut().enable();
            match self.settled.load(Ordering::Acquire) {
                u64::MAX => return self.lock().settled() >= seq,
                settled if settled >= seq => return true,
                _ => moved.await,
            }
        }
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.lock().next_seq()
    }

    pub(crate) fn stats(&self) -> Stats {
        let outbox = self.lock();
        Stats {
            held: outbox.held() as u64,
            received: self.received.load(Ordering::Relaxed),
            undelivered: self.undelivered.load(Ordering::Relaxed),
            ..outbox.stats
        }
    }

    /// Publishes the settled watermark (under the outbox lock, so that it never goes back).
    fn publish(&self, outbox: &Outbox) {
        let now = match outbox.is_closed() {
            true => u64::MAX,
            false => outbox.settled(),
        };
        if self.settled.swap(now, Ordering::AcqRel) != now {
            self.progress.notify_waiters();
        }
    }

    /// Messages delivered: their room comes back and their senders learn it.
    fn deliver(&self, delivered: &mut Vec<Pending>) {
        if delivered.is_empty() {
            return;
        }
        self.room.add_permits(delivered.len());
        for pending in delivered.drain(..) {
            let seq = pending.seq;
            pending.settle(|_| Ok(seq));
        }
    }

    fn give_back(&self, given_back: Vec<Pending>) {
        for pending in given_back {
            pending.settle(|message| {
                Err(SendError::Closed {
                    message: Some(message),
                })
            });
        }
    }
}
