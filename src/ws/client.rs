//! [`WsClient`]: a Phoenix-style WebSocket client on the reconnect layer.

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Bytes, Message, Utf8Bytes};
use tower::ServiceExt;
use tower::retry::backoff::{Backoff, ExponentialBackoffMaker, MakeBackoff};

use super::conn::{self, Heartbeat, WriterTurn, WsConn};
use super::connector::{WsConnector, endpoint_of};
use super::error::{SendError, WsError};
use crate::backoff::default_backoff;
use crate::epoch::{Clock, Epoch};
use crate::handle::Handle;
use crate::reconnect::ReconnectLayer;

/// A message received, tagged with the epoch of the connection it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// The epoch of the connection that delivered it.
    pub epoch: Epoch,
    /// The message (text or binary).
    pub message: Message,
}

/// What [`WsClient::send`] does when the outbound queue is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Wait for room (the default). The message is accepted when room frees up.
    #[default]
    Wait,
    /// Fail at once with [`SendError::Full`], handing the message back.
    Fail,
}

type AckFn = Arc<dyn Fn(&Message) -> Option<u64> + Send + Sync>;

pub(crate) struct Settings {
    pub(crate) capacity: usize,
    pub(crate) when_full: WhenFull,
    pub(crate) heartbeat: Option<Heartbeat>,
    pub(crate) close_code: CloseCode,
    pub(crate) close_reason: String,
    pub(crate) close_step_timeout: Duration,
    pub(crate) reconnect_on_normal_close: bool,
    ack: Option<AckFn>,
}

/// A message accepted and not yet acknowledged (or, without at-least-once, not yet written).
pub(crate) struct Pending {
    seq: u64,
    /// The clock when it was accepted: a closing connection takes only what was accepted while
    /// it was installed (or before).
    accepted: Epoch,
    held: Held,
    /// Completed writes of this message (more than one after an at-least-once re-send).
    writes: u32,
}

/// A held message: its payload alone (a `Message` is 56 bytes, for the sake of its `Frame`
/// variant, which is never held). While its write is in flight the batch keeps it for a retry
/// if the write does not complete: the payload itself, with a clone written; or, for a small
/// message without at-least-once, a copy of its bytes in the write's buffers, with the payload
/// itself written (a copy of a few bytes costs less than a second reference to them).
enum Held {
    Text(Utf8Bytes),
    Binary(Bytes),
    Copied { len: u32, text: bool },
}

/// Messages up to this size are kept as copies while in flight; larger ones by reference.
const COPY_MAX: usize = 256;

impl Held {
    /// The payload of a data message, or the message back.
    fn new(message: Message) -> Result<Held, Message> {
        match message {
            Message::Text(text) => Ok(Held::Text(text)),
            Message::Binary(bytes) => Ok(Held::Binary(bytes)),
            other => Err(other),
        }
    }

    fn into_message(self) -> Message {
        match self {
            Held::Text(text) => Message::Text(text),
            Held::Binary(bytes) => Message::Binary(bytes),
            Held::Copied { .. } => unreachable!("copies live only in a batch in flight"),
        }
    }
}

#[derive(Default)]
struct Outbox {
    /// Accepted, not yet written, in order.
    queue: VecDeque<Pending>,
    /// At-least-once: written, waiting for an acknowledgement, in order.
    unacked: VecDeque<Pending>,
    /// Batches taken by writers and being written, by their first sequence number.
    in_flight: Vec<u64>,
    next_seq: u64,
    /// Messages held: queued, in flight, or unacknowledged.
    held: usize,
    /// Room promised to [`WsSink`]s for messages they buffer and have not handed over yet.
    reserved: usize,
    /// Empty buffers for the next write (no reallocation).
    spare: Buffers,
    /// The installed connection, while its monitor runs.
    current: Option<(Epoch, WsConn)>,
    stats: Stats,
}

impl Outbox {
    /// How many more messages fit: the capacity less what is held and reserved.
    fn room(&self, capacity: usize) -> usize {
        capacity.saturating_sub(self.held + self.reserved)
    }

    /// Puts `messages` back at the front of the queue, in their order: they go out first.
    fn requeue(&mut self, mut messages: VecDeque<Pending>) {
        messages.append(&mut self.queue);
        self.queue = messages;
    }

    /// Every sequence number up to this one has been written at least once.
    fn written_up_to(&self) -> u64 {
        let first_unwritten = self
            .in_flight
            .iter()
            .copied()
            .chain(self.queue.front().map(|p| p.seq))
            .min()
            .unwrap_or(self.next_seq + 1);
        first_unwritten - 1
    }
}

/// A batch taken off the queue to be written, with the writer's turn on its connection. Its
/// owner finishes it ([`Shared::finish`]) once written and flushed, or abandons it
/// ([`Shared::abandon`]) otherwise: the batch goes back to the front of the queue, and a write
/// that did not complete is retried on the next connection.
pub(crate) struct WriteJob {
    turn: WriterTurn,
    scope: Drain,
    /// The sequence number of the batch's first message.
    first: u64,
    buffers: Buffers,
    /// How many of the batch's messages the connection has taken.
    next: usize,
    /// Small messages may be kept as copies (not with at-least-once, which keeps messages).
    copy: bool,
}

/// The buffers of a write, kept between writes so that a batch allocates nothing.
#[derive(Default)]
struct Buffers {
    batch: VecDeque<Pending>,
    /// The bytes of the batch's [`Held::Copied`] messages, in order.
    copies: Vec<u8>,
}

impl WriteJob {
    /// Feeds the rest of the batch and flushes once, taking the stream's lock once per poll
    /// rather than once per message; `next` keeps the place across polls.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tungstenite::Error>> {
        let mut ws = self.turn.stream();
        let Buffers { batch, copies } = &mut self.buffers;
        while let Some(pending) = batch.get_mut(self.next) {
            ready!(ws.poll_ready_unpin(cx))?;
            ws.start_send_unpin(pending.take_for_write(self.copy, copies))?;
            self.next += 1;
        }
        ws.poll_flush_unpin(cx)
    }

    /// The batch whole again, as it was taken, for the queue; and the turn, to hold until the
    /// batch is back.
    fn into_parts(self) -> (WriterTurn, VecDeque<Pending>) {
        let Buffers { mut batch, copies } = self.buffers;
        let mut at = 0;
        for pending in &mut batch {
            if let Held::Copied { len, text } = pending.held {
                let bytes = &copies[at..at + len as usize];
                at += len as usize;
                pending.held = if text {
                    let text = std::str::from_utf8(bytes).expect("copied from a text message");
                    Held::Text(text.into())
                } else {
                    Held::Binary(Bytes::copy_from_slice(bytes))
                };
            }
        }
        (self.turn, batch)
    }
}

impl Pending {
    /// The message for the connection; the batch keeps it, or a copy, until the flush.
    fn take_for_write(&mut self, copy: bool, copies: &mut Vec<u8>) -> Message {
        let copied = match &self.held {
            Held::Text(text) if !copy || text.len() > COPY_MAX => {
                return Message::Text(text.clone());
            }
            Held::Binary(bytes) if !copy || bytes.len() > COPY_MAX => {
                return Message::Binary(bytes.clone());
            }
            Held::Text(text) => {
                copies.extend_from_slice(text.as_bytes());
                Held::Copied {
                    len: text.len() as u32, // at most COPY_MAX
                    text: true,
                }
            }
            Held::Binary(bytes) => {
                copies.extend_from_slice(bytes);
                Held::Copied {
                    len: bytes.len() as u32,
                    text: false,
                }
            }
            Held::Copied { .. } => unreachable!("a message is written once per batch"),
        };
        std::mem::replace(&mut self.held, copied).into_message()
    }
}

/// Abandons the job it holds when dropped: a write cut short goes back to the queue.
struct Abandon<'a> {
    shared: &'a Shared,
    job: Option<WriteJob>,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.shared.abandon(job);
        }
    }
}

/// Which messages a writer takes: see [`Shared::drain`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Drain {
    Installed(Epoch),
    Closing(Epoch),
}

/// Counters of the client's outbound traffic, read with [`WsClient::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages accepted by `send`/`feed`.
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
}

/// State shared by the client's clones, the monitor and the teardown of its connections.
pub(crate) struct Shared {
    outbox: Mutex<Outbox>,
    /// The connection's clock: a connection is still installed while it reads its epoch.
    clock: Arc<Clock>,
    /// The highest sequence number such that it and everything before it has been written.
    written: AtomicU64,
    /// `written` advanced, or the client closed.
    progress: Signal,
    /// Room in the queue, or the client closed.
    space: Signal,
    /// The driver has stopped: nothing is accepted any more.
    closed: AtomicBool,
    pub(crate) wake_writer: Notify,
    incoming: mpsc::Sender<Received>,
    pub(crate) settings: Settings,
}

/// A notification that costs one atomic load when nobody waits.
#[derive(Default)]
struct Signal {
    notify: Notify,
    waiters: AtomicUsize,
}

impl Signal {
    /// Call after changing what waiters check.
    fn notify(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Waits until `ready` holds (checked after registering, so no notification is missed).
    async fn wait_until(&self, ready: impl Fn() -> bool) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiters.fetch_add(1, Ordering::SeqCst);
            let done = ready();
            if !done {
                notified.await;
            }
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            if done {
                return;
            }
        }
    }
}

/// Held by the driver's closures: when the driver stops, the client is closed.
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.progress.notify();
        self.0.space.notify();
    }
}

/// Clears the installed connection when its monitor ends.
pub(crate) struct Installed<'a> {
    shared: &'a Shared,
    epoch: Epoch,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let mut outbox = self.shared.lock();
        if outbox
            .current
            .as_ref()
            .is_some_and(|(e, _)| *e == self.epoch)
        {
            outbox.current = None;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn incoming(&self) -> &mpsc::Sender<Received> {
        &self.incoming
    }

    /// A new connection is installed: at-least-once messages that were written and not
    /// acknowledged go first, in order, then the queue.
    pub(crate) fn install(&self, epoch: Epoch, conn: WsConn) -> Installed<'_> {
        let mut outbox = self.lock();
        let unacked = std::mem::take(&mut outbox.unacked);
        outbox.requeue(unacked);
        outbox.current = Some((epoch, conn));
        Installed {
            shared: self,
            epoch,
        }
    }

    /// The installed connection, if its epoch is still current.
    fn current(&self) -> Option<(Epoch, WsConn)> {
        let outbox = self.lock();
        let (epoch, conn) = outbox.current.as_ref()?;
        self.clock
            .is_current(*epoch)
            .then(|| (*epoch, conn.clone()))
    }

    /// Writes what is queued to `conn`, in order, in batches: every message of a batch is fed,
    /// then the batch is flushed once. A batch whose write fails goes back to the front of the
    /// queue for the next connection, and the connection is marked broken.
    ///
    /// `Drain::Installed(e)` writes while the connection of epoch `e` is still installed (one
    /// clock load per batch): nothing accepted after a disconnect goes to the released
    /// connection. `Drain::Closing(e)` writes what was accepted up to epoch `e`, the last
    /// messages of a connection that closes gracefully (P18).
    ///
    /// Cancel-safe: if the future is dropped during a write (a timeout, a released
    /// connection), the batch goes back to the front of the queue, as after a failed write.
    pub(crate) async fn drain(&self, conn: &WsConn, scope: Drain) -> Result<(), WsError> {
        let turn = match scope {
            // Any other writer of the installed connection empties the queue as it goes: wait
            // for it to be done, not in line behind it, so that the send fast path stays open.
            Drain::Installed(_) => conn.free_turn().await,
            // The last writes of a closing connection, in line with its ping and its Close.
            Drain::Closing(_) => conn.turn().await,
        };
        let mut job = Abandon {
            shared: self,
            job: self.take_job(turn, scope),
        };
        while let Some(current) = job.job.as_mut() {
            if let Err(error) = poll_fn(|cx| current.poll_write(cx)).await {
                let current = job.job.take().expect("held until written or abandoned");
                self.write_failed(current);
                return Err(WsError::from_transport(error));
            }
            if !self.finish(current) {
                job.job = None; // the turn is released
            }
        }
        Ok(())
    }

    /// The fast path of a writer: the installed connection's turn and the queue, if the turn
    /// is free and there is something to write. One lock, no waiting.
    fn try_job(&self) -> Option<WriteJob> {
        let mut outbox = self.lock();
        let (epoch, conn) = outbox.current.as_ref()?;
        let (epoch, turn) = (*epoch, conn.try_turn()?);
        // `take_batch` checks that the epoch is current and the queue not empty; if not, the
        // turn is released unused.
        self.job(&mut outbox, turn, Drain::Installed(epoch))
    }

    /// A job for the writer that holds `turn`, if `scope` allows a batch.
    fn take_job(&self, turn: WriterTurn, scope: Drain) -> Option<WriteJob> {
        self.job(&mut self.lock(), turn, scope)
    }

    fn job(&self, outbox: &mut Outbox, turn: WriterTurn, scope: Drain) -> Option<WriteJob> {
        let mut buffers = std::mem::take(&mut outbox.spare);
        let Some(first) = self.take_batch(outbox, scope, &mut buffers.batch) else {
            outbox.spare = buffers;
            return None;
        };
        Some(WriteJob {
            turn,
            scope,
            first,
            buffers,
            next: 0,
            copy: self.settings.ack.is_none(),
        })
    }

    /// Moves the next batch off the queue into `batch` (empty), as `scope` allows, and
    /// returns its first sequence number.
    fn take_batch(
        &self,
        outbox: &mut Outbox,
        scope: Drain,
        batch: &mut VecDeque<Pending>,
    ) -> Option<u64> {
        debug_assert!(batch.is_empty());
        match scope {
            Drain::Installed(epoch) => {
                if outbox.queue.is_empty() || !self.clock.is_current(epoch) {
                    return None;
                }
                std::mem::swap(&mut outbox.queue, batch);
            }
            Drain::Closing(epoch) => {
                let n = outbox
                    .queue
                    .iter()
                    .position(|p| p.accepted > epoch)
                    .unwrap_or(outbox.queue.len());
                batch.extend(outbox.queue.drain(..n));
            }
        }
        let first = batch.front()?.seq;
        outbox.in_flight.push(first);
        Some(first)
    }

    /// The job's batch was written and flushed: it is retired (or, at-least-once, kept until
    /// acknowledged). Returns whether the job has the next batch, if `scope` allows one: a
    /// writer keeps its turn until the queue is empty.
    fn finish(&self, job: &mut WriteJob) -> bool {
        let mut outbox = self.lock();
        let buffers = &mut job.buffers;
        outbox.in_flight.retain(|first| *first != job.first);
        outbox.stats.written += buffers.batch.len() as u64;
        if self.settings.ack.is_some() {
            // Kept until acknowledged; a second write of one is a re-send.
            for pending in &mut buffers.batch {
                outbox.stats.resent += u64::from(pending.writes > 0);
                pending.writes += 1;
            }
            outbox.unacked.extend(buffers.batch.drain(..));
        } else {
            // Without acknowledgements a message is written once: a batch is only written
            // again if its write did not complete, and then `writes` was never counted.
            outbox.held -= buffers.batch.len();
            buffers.batch.clear();
        }
        buffers.copies.clear();
        let next = self.take_batch(&mut outbox, job.scope, &mut buffers.batch);
        if next.is_none() && outbox.spare.batch.capacity() < buffers.batch.capacity() {
            std::mem::swap(&mut outbox.spare, buffers);
        }
        let written = outbox.written_up_to();
        drop(outbox);
        self.written.fetch_max(written, Ordering::SeqCst);
        self.progress.notify();
        self.space.notify();
        if let Some(first) = next {
            job.first = first;
            job.next = 0;
        }
        next.is_some()
    }

    /// The job's write failed: its batch goes back to the queue and the connection is marked
    /// broken; the monitor reports it, and the batch waits for the next connection.
    fn write_failed(&self, job: WriteJob) {
        let conn = job.turn.conn().clone();
        self.abandon(job);
        conn.mark_broken();
    }

    /// The job's write did not complete: its batch goes back to the front of the queue.
    fn abandon(&self, job: WriteJob) {
        let first = job.first;
        let (turn, batch) = job.into_parts();
        let mut outbox = self.lock();
        outbox.in_flight.retain(|f| *f != first);
        outbox.requeue(batch);
        drop(outbox);
        // Released only now: no other writer takes the queue before the batch is back.
        drop(turn);
    }

    /// An incoming data message: with at-least-once, it may acknowledge earlier sends.
    pub(crate) fn received(&self, message: &Message) {
        let Some(ack) = &self.settings.ack else {
            return;
        };
        let Some(upto) = ack(message) else {
            return;
        };
        let mut outbox = self.lock();
        let mut acked = 0;
        while outbox.unacked.front().is_some_and(|p| p.seq <= upto) {
            outbox.unacked.pop_front();
            acked += 1;
        }
        // Re-queued after a reconnect and acknowledged late by the old connection.
        while outbox.queue.front().is_some_and(|p| p.seq <= upto) {
            outbox.queue.pop_front();
            acked += 1;
        }
        outbox.stats.acknowledged += acked;
        outbox.held -= acked as usize;
        drop(outbox);
        if acked > 0 {
            self.space.notify();
        }
    }

    /// Accepts a message now, or says why not.
    fn accept(&self, make: impl FnOnce(u64) -> Message, notify: bool) -> Result<u64, SendError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        let mut outbox = self.lock();
        let seq = outbox.next_seq + 1;
        let held = Held::new(make(seq)).map_err(SendError::NotData)?;
        if outbox.room(self.settings.capacity) == 0 {
            return Err(SendError::Full {
                message: held.into_message(),
                capacity: self.settings.capacity,
            });
        }
        outbox.next_seq = seq;
        let was_empty = outbox.queue.is_empty();
        outbox.queue.push_back(Pending {
            seq,
            accepted: self.clock.now(),
            held,
            writes: 0,
        });
        outbox.stats.accepted += 1;
        outbox.held += 1;
        drop(outbox);
        if notify && was_empty {
            self.wake_writer.notify_one();
        }
        Ok(seq)
    }

    /// The slow path of [`Written`]: waits until `seq` and everything before it is written,
    /// writing it from this task whenever a connection is installed and waiting for progress
    /// otherwise.
    async fn written(self: Arc<Self>, seq: u64) -> Result<u64, SendError> {
        let done = || self.written.load(Ordering::SeqCst) >= seq;
        loop {
            if done() {
                return Ok(seq);
            }
            if self.closed.load(Ordering::SeqCst) {
                return Err(SendError::Closed);
            }
            if let Some((epoch, conn)) = self.current() {
                // A failure marks the connection broken; its monitor reports it and the
                // message waits for the next connection.
                let _ = self.drain(&conn, Drain::Installed(epoch)).await;
                if done() {
                    return Ok(seq);
                }
            }
            // Another writer has it, or no connection is installed: wait for progress.
            self.progress
                .wait_until(|| done() || self.closed.load(Ordering::SeqCst))
                .await;
        }
    }
}

/// Resolves once a sequence number and everything before it has been written. While a
/// connection is installed and its writer's turn is free, it writes from the caller's task,
/// with no allocation and no hop to another task; otherwise it falls back to
/// [`Shared::written`].
pub(super) struct Written {
    shared: Arc<Shared>,
    seq: u64,
    state: WrittenState,
}

enum WrittenState {
    /// Check, then try the fast path.
    Start,
    /// The fast path: our write, in progress.
    Writing(WriteJob),
    /// The slow path.
    Waiting(Pin<Box<dyn Future<Output = Result<u64, SendError>> + Send>>),
    Done,
}

impl Written {
    pub(super) fn new(shared: Arc<Shared>, seq: u64) -> Written {
        Written {
            shared,
            seq,
            state: WrittenState::Start,
        }
    }

    fn slow(&self) -> WrittenState {
        WrittenState::Waiting(Box::pin(Arc::clone(&self.shared).written(self.seq)))
    }
}

impl Future for Written {
    type Output = Result<u64, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                WrittenState::Start => {
                    if this.shared.written.load(Ordering::SeqCst) >= this.seq {
                        this.state = WrittenState::Done;
                        return Poll::Ready(Ok(this.seq));
                    }
                    this.state = match this.shared.try_job() {
                        Some(job) => WrittenState::Writing(job),
                        None => this.slow(),
                    };
                }
                WrittenState::Writing(job) => match ready!(job.poll_write(cx)) {
                    Ok(()) => {
                        if !this.shared.finish(job) {
                            this.state = WrittenState::Start; // the turn is released
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "write failed");
                        let WrittenState::Writing(job) =
                            std::mem::replace(&mut this.state, WrittenState::Start)
                        else {
                            unreachable!("matched above")
                        };
                        this.shared.write_failed(job);
                        this.state = this.slow();
                    }
                },
                WrittenState::Waiting(slow) => {
                    let out = ready!(slow.as_mut().poll(cx));
                    this.state = WrittenState::Done;
                    return Poll::Ready(out);
                }
                WrittenState::Done => panic!("`Written` polled after completion"),
            }
        }
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, WrittenState::Done) {
            WrittenState::Done => {}
            state => {
                if let WrittenState::Writing(job) = state {
                    self.shared.abandon(job);
                }
                // Not seen through: the background writer takes it from here.
                self.shared.wake_writer.notify_one();
            }
        }
    }
}

/// A Phoenix-style WebSocket client on the [reconnect layer](crate::ReconnectLayer).
///
/// - [`send`](Self::send) accepts messages at any time. While disconnected they wait in a
///   bounded outbound queue ([`WsClientBuilder::queue_capacity`]; when it is full, `send` waits
///   or fails, per [`WhenFull`], and never drops) and are written in order when a connection
///   opens. While connected, an awaited `send` writes at once, from the caller's task.
/// - Incoming text and binary messages arrive on the [`Incoming`] stream, each tagged with the
///   epoch of its connection.
/// - A heartbeat pings at an interval; a missing pong is a failure of that connection's epoch,
///   so half-open peers are found. No ping is sent once a connection is released.
/// - [`disconnect`](Handle::disconnect) is graceful: the queue is written, then Close goes out
///   with the configured code and reason and the client waits for the peer's Close, each step
///   bounded.
/// - A peer's normal close (1000) releases the connection without a reconnect, unless
///   [`WsClientBuilder::reconnect_on_normal_close`]; abnormal closes and drops reconnect.
///
/// # Delivery
///
/// A message accepted by `send` or `feed` is written to a connection, in order, or given back
/// ([`SendError`], [`take_unsent`](Self::take_unsent)); it is never silently dropped. A batch
/// whose write did not complete is written again on the next connection (so the peer may see
/// some of it twice). What the network loses after a completed write is not seen by the client:
/// for that, [`at_least_once`](WsClientBuilder::at_least_once) keeps each message until the peer
/// acknowledges it and re-sends unacknowledged ones, in order, after a reconnect.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use futures_util::StreamExt;
/// use tower_epoch::ws::{Message, WsClient};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let addr = listener.local_addr()?;
/// # tokio::spawn(async move {
/// #     use futures_util::SinkExt;
/// #     while let Ok((socket, _)) = listener.accept().await {
/// #         tokio::spawn(async move {
/// #             let mut ws = tokio_tungstenite::accept_async(socket).await.unwrap();
/// #             while let Some(Ok(m)) = ws.next().await {
/// #                 if m.is_text() { let _ = ws.send(m).await; }
/// #             }
/// #         });
/// #     }
/// # });
/// // An echo server listens on `addr`.
/// let (client, mut incoming) = WsClient::builder(format!("ws://{addr}/socket"))?.build()?;
///
/// // Accepted while disconnected: queued, written in order once connected.
/// let queued = client.send(Message::text("queued"));
/// let epoch = client.handle().connect()?;
/// queued.await?;
///
/// let echo = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await?.unwrap();
/// assert_eq!(echo.epoch, epoch);
/// assert_eq!(echo.message, Message::text("queued"));
///
/// client.handle().disconnect().await; // queue, Close, the peer's Close
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WsClient {
    shared: Arc<Shared>,
    handle: Handle,
}

impl fmt::Debug for WsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsClient")
            .field("handle", &self.handle)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl WsClient {
    /// A builder for a client of `request` (a URL, or an `http` request with headers). The URL
    /// is checked now: a bad one is an error before anything else happens.
    pub fn builder<R>(request: R) -> Result<WsClientBuilder, WsError>
    where
        R: IntoClientRequest + Clone + Send + Sync + 'static,
    {
        let first = request
            .clone()
            .into_client_request()
            .map_err(|e| WsError::InvalidUrl(e.to_string()))?;
        endpoint_of(&first)?;
        Ok(Self::builder_with(move || {
            request
                .clone()
                .into_client_request()
                .expect("checked when the builder was made")
        }))
    }

    /// A builder whose request is made anew for every attempt, so that a refreshed header (an
    /// auth token) is used by the next reconnect. [`WsClientBuilder::build`] checks the first one.
    pub fn builder_with<F>(request: F) -> WsClientBuilder
    where
        F: Fn() -> Request + Send + Sync + 'static,
    {
        WsClientBuilder {
            request: Arc::new(request),
            connector: WsConnector::new(),
            backoff: default_backoff(),
            incoming_capacity: 1024,
            settings: Settings {
                capacity: 1024,
                when_full: WhenFull::Wait,
                heartbeat: Some(Heartbeat {
                    interval: Duration::from_secs(30),
                    timeout: Duration::from_secs(10),
                }),
                close_code: CloseCode::Normal,
                close_reason: String::new(),
                close_step_timeout: Duration::from_secs(2),
                reconnect_on_normal_close: false,
                ack: None,
            },
            configure: Box::new(|layer| layer),
        }
    }

    /// The handle of the connection: `connect`, `disconnect`, `suspend`, `resume`, state,
    /// ledger.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Sends a text or binary message.
    ///
    /// The message is accepted when this is called (or, if the queue is full under
    /// [`WhenFull::Wait`], when the returned future finds room). The future resolves with the
    /// message's sequence number once it has been written to a connection; awaiting it while
    /// connected writes it from this task. Dropping the future does not withdraw an accepted
    /// message. While disconnected the future waits for the next connection: bound it with
    /// `tokio::time::timeout` where the connection may stay down.
    pub fn send(&self, message: Message) -> SendFuture {
        self.send_with(move |_| message)
    }

    /// Like [`send`](Self::send), with the message made from its sequence number (1, 2, ...),
    /// so the peer can acknowledge it by number (see
    /// [`at_least_once`](WsClientBuilder::at_least_once)).
    pub fn send_with(&self, make: impl FnOnce(u64) -> Message + Send + 'static) -> SendFuture {
        let shared = &self.shared;
        let inner = match shared.accept(make, false) {
            Ok(seq) => SendInner::Accepted(Written::new(Arc::clone(shared), seq)),
            Err(SendError::Full { message, .. }) if shared.settings.when_full == WhenFull::Wait => {
                let shared = Arc::clone(shared);
                SendInner::Waiting(Box::pin(async move {
                    let seq = shared.wait_for_room(message).await?;
                    Written::new(shared, seq).await
                }))
            }
            Err(error) => SendInner::Failed(Some(error)),
        };
        SendFuture { inner }
    }

    /// Accepts a message without waiting, like `Sink::feed`: it is written in the background,
    /// or by the next [`flush`](Self::flush). Returns its sequence number.
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] when the queue is full (`feed` never waits), [`SendError::NotData`]
    /// for a control frame, [`SendError::Closed`] once the client has shut down.
    pub fn feed(&self, message: Message) -> Result<u64, SendError> {
        self.feed_with(move |_| message)
    }

    /// Like [`feed`](Self::feed), with the message made from its sequence number.
    pub fn feed_with(&self, make: impl FnOnce(u64) -> Message) -> Result<u64, SendError> {
        self.shared.accept(make, true)
    }

    /// Waits until every message accepted so far has been written, writing them from this task
    /// when a connection is installed. While disconnected it waits for the next connection:
    /// bound it with `tokio::time::timeout` where the connection may stay down.
    pub async fn flush(&self) -> Result<(), SendError> {
        let last = self.shared.lock().next_seq;
        Written::new(Arc::clone(&self.shared), last).await.map(drop)
    }

    /// A [`WsSink`](super::WsSink): this client as a `Sink<Message>`, which takes messages
    /// without a lock and hands them to the queue in runs. Each sink keeps its own messages in
    /// order; make one per task that sends.
    pub fn sink(&self) -> super::WsSink {
        super::WsSink::new(Arc::clone(&self.shared))
    }

    /// Counters of the outbound traffic.
    pub fn stats(&self) -> Stats {
        let outbox = self.shared.lock();
        Stats {
            held: outbox.held as u64,
            ..outbox.stats
        }
    }

    /// Takes back every message accepted and not yet written (or, with at-least-once, not yet
    /// acknowledged), in order: for an application that gives up on a connection.
    pub fn take_unsent(&self) -> Vec<(u64, Message)> {
        let mut outbox = self.shared.lock();
        let unacked = std::mem::take(&mut outbox.unacked);
        let queue = std::mem::take(&mut outbox.queue);
        outbox.held -= unacked.len() + queue.len();
        drop(outbox);
        self.shared.space.notify();
        unacked
            .into_iter()
            .chain(queue)
            .map(|p| (p.seq, p.held.into_message()))
            .collect()
    }
}

impl Shared {
    async fn wait_for_room(&self, message: Message) -> Result<u64, SendError> {
        let mut message = Some(message);
        loop {
            match self.accept(|_| message.take().expect("taken once"), true) {
                Ok(seq) => return Ok(seq),
                Err(SendError::Full { message: back, .. }) => message = Some(back),
                Err(error) => return Err(error),
            }
            self.room_or_closed().await;
        }
    }

    fn has_room(&self) -> bool {
        self.lock().room(self.settings.capacity) > 0
    }

    /// Returns once the queue has room (which another sender may take first) or the client
    /// has closed.
    pub(super) async fn room_or_closed(&self) {
        self.space
            .wait_until(|| self.has_room() || self.closed.load(Ordering::SeqCst))
            .await;
    }

    /// Hands a sink's buffered messages to the queue, in order, numbered in turn and accepted
    /// at the clock of now; then gives back what is left of the sink's reservation and
    /// reserves up to `want` slots, as far as there is room. Returns the last sequence number
    /// handed over, if any. One lock for the lot.
    ///
    /// Once the client has closed, the messages are queued all the same (so that
    /// [`WsClient::take_unsent`] gives them back), nothing is reserved, and the result is
    /// [`SendError::Closed`].
    pub(super) fn hand_over(
        &self,
        buffered: &mut Buffered,
        want: usize,
    ) -> Result<Option<u64>, SendError> {
        let mut outbox = self.lock();
        let n = buffered.messages.len();
        let mut last = None;
        let mut was_empty = false;
        if n > 0 {
            let accepted = self.clock.now();
            let mut seq = outbox.next_seq;
            for pending in &mut buffered.messages {
                seq += 1;
                pending.seq = seq;
                pending.accepted = accepted;
            }
            outbox.next_seq = seq;
            was_empty = outbox.queue.is_empty();
            // The sink keeps its buffer, with its capacity, for the next run.
            outbox.queue.append(&mut buffered.messages);
            outbox.held += n;
            outbox.stats.accepted += n as u64;
            last = Some(seq);
        }
        let closed = self.closed.load(Ordering::Acquire);
        // The slots reserved and not used; the messages handed over hold the used ones now.
        let unused = buffered.reserved - n;
        outbox.reserved -= buffered.reserved;
        buffered.reserved = if closed {
            0
        } else {
            want.min(outbox.room(self.settings.capacity))
        };
        outbox.reserved += buffered.reserved;
        drop(outbox);
        if was_empty {
            self.wake_writer.notify_one();
        }
        if buffered.reserved < unused {
            // Room given back.
            self.space.notify();
        }
        if closed {
            return Err(SendError::Closed);
        }
        Ok(last)
    }
}

/// The messages a [`WsSink`](super::WsSink) has taken and not yet handed to the queue, and
/// the room reserved for them.
#[derive(Default)]
pub(super) struct Buffered {
    messages: VecDeque<Pending>,
    /// Slots reserved in the queue: at least as many as `messages`.
    reserved: usize,
}

impl Buffered {
    /// A reserved slot is free.
    pub(super) fn has_slot(&self) -> bool {
        self.messages.len() < self.reserved
    }

    /// Takes a data message into a reserved slot; numbered when it is handed over.
    pub(super) fn push(&mut self, message: Message) -> Result<(), SendError> {
        if !self.has_slot() {
            return Err(SendError::NotReady(message));
        }
        let held = Held::new(message).map_err(SendError::NotData)?;
        self.messages.push_back(Pending {
            seq: 0,
            accepted: Epoch::ZERO,
            held,
            writes: 0,
        });
        Ok(())
    }

    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }
}

/// Future of [`WsClient::send`]: resolves with the message's sequence number once it is written.
#[must_use = "the message is queued; await this to know it was written"]
pub struct SendFuture {
    inner: SendInner,
}

enum SendInner {
    /// Accepted when `send` was called.
    Accepted(Written),
    /// The queue was full: waiting for room, then for the write.
    Waiting(Pin<Box<dyn Future<Output = Result<u64, SendError>> + Send>>),
    /// Refused when `send` was called.
    Failed(Option<SendError>),
}

impl SendFuture {
    /// The message's sequence number, if it was accepted when `send` was called.
    pub fn seq(&self) -> Option<u64> {
        match &self.inner {
            SendInner::Accepted(written) => Some(written.seq),
            SendInner::Waiting(_) | SendInner::Failed(_) => None,
        }
    }
}

impl Future for SendFuture {
    type Output = Result<u64, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.inner {
            SendInner::Accepted(written) => Pin::new(written).poll(cx),
            SendInner::Waiting(waiting) => waiting.as_mut().poll(cx),
            SendInner::Failed(error) => Poll::Ready(Err(error
                .take()
                .expect("`SendFuture` polled after completion"))),
        }
    }
}

impl fmt::Debug for SendFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendFuture")
            .field("seq", &self.seq())
            .finish_non_exhaustive()
    }
}

/// The stream of incoming messages, each tagged with its connection's epoch. It ends when the
/// client has shut down.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Received>,
}

impl futures_core::Stream for Incoming {
    type Item = Received;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Received>> {
        self.rx.poll_recv(cx)
    }
}

type Configure = Box<
    dyn FnOnce(
            ReconnectLayer<Request, ExponentialBackoffMaker>,
        ) -> ReconnectLayer<Request, ExponentialBackoffMaker>
        + Send,
>;

/// Builds a [`WsClient`]. Made by [`WsClient::builder`].
pub struct WsClientBuilder<B = ExponentialBackoffMaker> {
    request: Arc<dyn Fn() -> Request + Send + Sync>,
    connector: WsConnector,
    backoff: B,
    incoming_capacity: usize,
    settings: Settings,
    configure: Configure,
}

impl<B: fmt::Debug> fmt::Debug for WsClientBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.settings;
        f.debug_struct("WsClientBuilder")
            .field("backoff", &self.backoff)
            .field("capacity", &settings.capacity)
            .field("when_full", &settings.when_full)
            .field("heartbeat", &settings.heartbeat)
            .field("close_code", &settings.close_code)
            .field("at_least_once", &settings.ack.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> WsClientBuilder<B> {
    /// The connector (a custom [`Dial`](super::Dial), TLS settings, protocol limits).
    pub fn connector(mut self, connector: WsConnector) -> Self {
        self.connector = connector;
        self
    }

    /// The backoff between reconnect attempts (any `MakeBackoff`).
    pub fn backoff<B2>(self, backoff: B2) -> WsClientBuilder<B2> {
        WsClientBuilder {
            request: self.request,
            connector: self.connector,
            backoff,
            incoming_capacity: self.incoming_capacity,
            settings: self.settings,
            configure: self.configure,
        }
    }

    /// Further settings of the underlying [`ReconnectLayer`]: connect and close timeouts,
    /// stable period, attempt limit.
    pub fn layer(
        mut self,
        configure: impl FnOnce(
            ReconnectLayer<Request, ExponentialBackoffMaker>,
        ) -> ReconnectLayer<Request, ExponentialBackoffMaker>
        + Send
        + 'static,
    ) -> Self {
        self.configure = Box::new(configure);
        self
    }

    /// How many messages the client holds at most: queued, being written, or (at-least-once)
    /// waiting for an acknowledgement. Default 1024; at least 1.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.settings.capacity = capacity.max(1);
        self
    }

    /// How many received messages wait for the [`Incoming`] stream's reader before the client
    /// stops reading (backpressure). Default 1024; at least 1.
    pub fn incoming_capacity(mut self, capacity: usize) -> Self {
        self.incoming_capacity = capacity.max(1);
        self
    }

    /// What `send` does when the queue is full.
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.settings.when_full = policy;
        self
    }

    /// Pings every `interval`; no pong within `timeout` is a failure of the connection.
    /// Default: every 30 s, 10 s to answer.
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.settings.heartbeat = Some(Heartbeat { interval, timeout });
        self
    }

    /// No heartbeat.
    pub fn no_heartbeat(mut self) -> Self {
        self.settings.heartbeat = None;
        self
    }

    /// The code and reason of the Close frame a deliberate disconnect sends (default 1000, no
    /// reason).
    pub fn close_with(mut self, code: CloseCode, reason: impl Into<String>) -> Self {
        self.settings.close_code = code;
        self.settings.close_reason = reason.into();
        self
    }

    /// Bounds each step of a graceful close (writing the queue, sending Close, waiting for the
    /// peer's Close). Default 2 s. The layer's close timeout bounds the whole.
    pub fn close_step_timeout(mut self, timeout: Duration) -> Self {
        self.settings.close_step_timeout = timeout;
        self
    }

    /// Reconnect after the peer closes with 1000 (normal closure) too. Default: no.
    pub fn reconnect_on_normal_close(mut self, reconnect: bool) -> Self {
        self.settings.reconnect_on_normal_close = reconnect;
        self
    }

    /// At-least-once delivery: messages stay held until acknowledged, and unacknowledged ones
    /// are re-sent, in order, first thing on the next connection. `ack` reads an incoming
    /// message and returns the highest sequence number it acknowledges (cumulatively: every
    /// message up to it), or `None`. Build messages with [`WsClient::send_with`] to put their
    /// sequence number on the wire.
    pub fn at_least_once(
        mut self,
        ack: impl Fn(&Message) -> Option<u64> + Send + Sync + 'static,
    ) -> Self {
        self.settings.ack = Some(Arc::new(ack));
        self
    }

    /// Builds the client and spawns its driver on the current tokio runtime. Nothing connects
    /// until [`Handle::connect`].
    ///
    /// # Errors
    ///
    /// The first request is checked ([`WsError::UnsupportedScheme`], [`WsError::EmptyHost`],
    /// [`WsError::PortOutOfRange`], [`WsError::TlsUnavailable`]).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn build(self) -> Result<(WsClient, Incoming), WsError>
    where
        B: MakeBackoff + Clone + Send + 'static,
        B::Backoff: Send,
        <B::Backoff as Backoff>::Future: Send + 'static,
    {
        endpoint_of(&(self.request)())?;
        let (incoming_tx, incoming_rx) = mpsc::channel(self.incoming_capacity);
        let request = Arc::clone(&self.request);
        let base = (self.configure)(ReconnectLayer::with_target_fn(move || request()));
        let handle = base.handle();
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox::default()),
            clock: handle.clock(),
            written: AtomicU64::new(0),
            progress: Signal::default(),
            closed: AtomicBool::new(false),
            wake_writer: Notify::new(),
            space: Signal::default(),
            incoming: incoming_tx,
            settings: self.settings,
        });
        let monitor = {
            // Dropped with the driver's last copy of this closure: the client closes.
            let alive = Arc::new(Alive(Arc::clone(&shared)));
            move |conn: &WsConn, epoch: Epoch| {
                let shared = Arc::clone(&alive.0);
                let conn = conn.clone();
                async move { conn::run(shared, conn, epoch).await }
            }
        };
        let teardown = {
            let shared = Arc::clone(&shared);
            move |conn: WsConn, cause| conn::close(Arc::clone(&shared), conn, cause)
        };
        let layer = base
            .with_backoff(self.backoff)
            .with_teardown(teardown)
            .with_monitor(monitor);
        let connector = self.connector.map_response(WsConn::new);
        let (service, driver) = layer.build(connector);
        drop(service);
        tokio::spawn(driver);
        Ok((WsClient { shared, handle }, Incoming { rx: incoming_rx }))
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::ws::BoxIo;

    fn pending(seq: u64, message: Message) -> Pending {
        Pending {
            seq,
            accepted: Epoch::ZERO,
            held: Held::new(message).expect("data"),
            writes: 0,
        }
    }

    /// A write cut short halfway (the peer reads nothing) gives the batch back whole: small
    /// messages kept as copies are put back together, text as text and binary as binary, in
    /// their places among the large ones kept by reference.
    #[tokio::test]
    async fn a_batch_cut_short_comes_back_whole_from_its_copies() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let stream =
            WebSocketStream::from_raw_socket(Box::new(ours) as BoxIo, Role::Client, None).await;
        let conn = WsConn::new(stream);
        let big = "x".repeat(COPY_MAX + 1);
        let messages = vec![
            Message::text("small text"),
            Message::binary(vec![0u8, 159, 146, 150]),
            Message::text(big.clone()),
            Message::binary(big.clone().into_bytes()),
            Message::text(""),
            Message::text("ünïcödé"),
        ];
        let batch: VecDeque<Pending> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| pending(i as u64 + 1, m.clone()))
            .collect();
        let mut job = WriteJob {
            turn: conn.try_turn().expect("free"),
            scope: Drain::Installed(Epoch::ZERO),
            first: 1,
            buffers: Buffers {
                batch,
                copies: Vec::new(),
            },
            next: 0,
            copy: true,
        };
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            job.poll_write(&mut cx).is_pending(),
            "the peer reads nothing"
        );
        assert_eq!(job.next, messages.len(), "all fed, the flush waits");
        let copied = job
            .buffers
            .batch
            .iter()
            .filter(|p| matches!(p.held, Held::Copied { .. }))
            .count();
        assert_eq!(copied, 4, "the small ones are kept as copies");

        let (turn, batch) = job.into_parts();
        assert!(
            conn.try_turn().is_none(),
            "the turn is held until the batch is back"
        );
        drop(turn);
        let back: Vec<(u64, Message)> = batch
            .into_iter()
            .map(|p| (p.seq, p.held.into_message()))
            .collect();
        let expected: Vec<(u64, Message)> = (1..).zip(messages).collect();
        assert_eq!(back, expected);
        assert!(conn.try_turn().is_some(), "released");
    }
}
