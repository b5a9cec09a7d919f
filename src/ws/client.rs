//! [`WsClient`]: a Phoenix-style WebSocket client on the reconnect layer.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tower::ServiceExt;
use tower::retry::backoff::{Backoff, ExponentialBackoffMaker, MakeBackoff};

use super::conn::{self, Heartbeat, WsConn};
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
    pub(crate) message: Message,
    /// Completed writes of this message (more than one after an at-least-once re-send).
    writes: u32,
}

#[derive(Default)]
struct Outbox {
    /// Accepted, not yet written, in order.
    queue: VecDeque<Pending>,
    /// At-least-once: written, waiting for an acknowledgement, in order.
    unacked: VecDeque<Pending>,
    /// Batches taken by writers and being written: (first sequence number, length).
    in_flight: Vec<(u64, usize)>,
    next_seq: u64,
    /// Messages held: queued, in flight, or unacknowledged.
    held: usize,
    /// An empty buffer to swap with the queue when a writer takes a batch (no reallocation).
    spare: VecDeque<Pending>,
    /// The installed connection, while its monitor runs.
    current: Option<(Epoch, WsConn)>,
    stats: Stats,
}

impl Outbox {
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
            .map(|(first, _)| *first)
            .chain(self.queue.front().map(|p| p.seq))
            .min()
            .unwrap_or(self.next_seq + 1);
        first_unwritten - 1
    }
}

/// A batch being written. Dropped before [`InFlight::written`], it goes back to the front of
/// the queue: a write that did not complete is retried on the next connection.
pub(crate) struct InFlight<'a> {
    shared: &'a Shared,
    first: u64,
    batch: Option<VecDeque<Pending>>,
}

impl InFlight<'_> {
    fn messages(&self) -> &VecDeque<Pending> {
        self.batch.as_ref().expect("held until written or dropped")
    }

    /// The batch was written and flushed.
    fn written(mut self) {
        let mut batch = self.batch.take().expect("written once");
        let shared = self.shared;
        let mut outbox = shared.lock();
        outbox.in_flight.retain(|(first, _)| *first != self.first);
        outbox.stats.written += batch.len() as u64;
        if shared.settings.ack.is_some() {
            // Kept until acknowledged; a second write of one is a re-send.
            for pending in &mut batch {
                outbox.stats.resent += u64::from(pending.writes > 0);
                pending.writes += 1;
            }
            outbox.unacked.extend(batch.drain(..));
        } else {
            // Without acknowledgements a message is written once: a batch is only written
            // again if its write did not complete, and then `writes` was never counted.
            outbox.held -= batch.len();
            batch.clear();
        }
        if outbox.spare.capacity() < batch.capacity() {
            outbox.spare = batch;
        }
        let written = outbox.written_up_to();
        drop(outbox);
        shared.written.fetch_max(written, Ordering::SeqCst);
        shared.progress.notify();
        shared.space.notify();
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            let mut outbox = self.shared.lock();
            outbox.in_flight.retain(|(first, _)| *first != self.first);
            outbox.requeue(batch);
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
        let _turn = conn.writer().await;
        while let Some(batch) = self.take_batch(scope) {
            let result = conn.write_all(batch.messages()).await;
            if let Err(error) = result {
                drop(batch); // back to the queue
                conn.mark_broken();
                return Err(WsError::from_transport(error));
            }
            batch.written();
        }
        Ok(())
    }

    /// Takes the next batch off the queue, as `scope` allows.
    fn take_batch(&self, scope: Drain) -> Option<InFlight<'_>> {
        let mut outbox = self.lock();
        let batch: VecDeque<Pending> = match scope {
            Drain::Installed(epoch) if self.clock.is_current(epoch) => {
                let spare = std::mem::take(&mut outbox.spare);
                std::mem::replace(&mut outbox.queue, spare)
            }
            Drain::Installed(_) => return None,
            Drain::Closing(epoch) => {
                let n = outbox
                    .queue
                    .iter()
                    .position(|p| p.accepted > epoch)
                    .unwrap_or(outbox.queue.len());
                outbox.queue.drain(..n).collect()
            }
        };
        let first = batch.front()?.seq;
        outbox.in_flight.push((first, batch.len()));
        Some(InFlight {
            shared: self,
            first,
            batch: Some(batch),
        })
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
        let message = make(seq);
        if !matches!(message, Message::Text(_) | Message::Binary(_)) {
            return Err(SendError::NotData(message));
        }
        if outbox.held >= self.settings.capacity {
            return Err(SendError::Full {
                message,
                capacity: self.settings.capacity,
            });
        }
        outbox.next_seq = seq;
        let was_empty = outbox.queue.is_empty();
        outbox.queue.push_back(Pending {
            seq,
            accepted: self.clock.now(),
            message,
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

    /// Waits until `seq` and everything before it is written, writing it ourselves when a
    /// connection is installed (no hop to another task on the hot path).
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
        let shared = Arc::clone(&self.shared);
        let (seq, state) = match shared.accept(make, false) {
            Ok(seq) => (Some(seq), None),
            Err(SendError::Full { message, .. }) if shared.settings.when_full == WhenFull::Wait => {
                (None, Some(message))
            }
            Err(error) => {
                return SendFuture {
                    shared,
                    seq: None,
                    inner: Box::pin(std::future::ready(Err(error))),
                };
            }
        };
        let inner = {
            let shared = Arc::clone(&shared);
            Box::pin(async move {
                let seq = match (seq, state) {
                    (Some(seq), _) => seq,
                    (None, Some(message)) => shared.wait_for_room(message).await?,
                    (None, None) => unreachable!("either accepted or waiting with the message"),
                };
                shared.written(seq).await
            }) as Pin<Box<dyn Future<Output = Result<u64, SendError>> + Send>>
        };
        SendFuture { shared, seq, inner }
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
        Arc::clone(&self.shared).written(last).await.map(drop)
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
            .map(|p| (p.seq, p.message))
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
            let capacity = self.settings.capacity;
            self.space
                .wait_until(|| self.lock().held < capacity || self.closed.load(Ordering::SeqCst))
                .await;
        }
    }
}

/// Future of [`WsClient::send`]: resolves with the message's sequence number once it is written.
#[must_use = "the message is queued; await this to know it was written"]
pub struct SendFuture {
    shared: Arc<Shared>,
    seq: Option<u64>,
    inner: Pin<Box<dyn Future<Output = Result<u64, SendError>> + Send>>,
}

impl SendFuture {
    /// The message's sequence number, if it was accepted when `send` was called.
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }
}

impl Future for SendFuture {
    type Output = Result<u64, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = std::task::ready!(self.inner.as_mut().poll(cx));
        self.seq = None;
        Poll::Ready(out)
    }
}

impl Drop for SendFuture {
    fn drop(&mut self) {
        // Accepted and not seen through: the background writer takes it from here.
        if self.seq.is_some() {
            self.shared.wake_writer.notify_one();
        }
    }
}

impl fmt::Debug for SendFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendFuture")
            .field("seq", &self.seq)
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
