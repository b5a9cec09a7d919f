//! [`WsClient`]: a Phoenix-style WebSocket client on the reconnect layer.

use std::fmt;
use std::sync::Arc;

use tokio::sync::TryAcquireError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;

use super::builder::{WhenFull, WsClientBuilder};
use super::connector::endpoint_of;
use super::error::{SendError, WsError};
use super::future::{Permit, SendFuture};
use super::outbox::Stats;
use super::shared::Shared;
use super::sink::WsSink;
use crate::handle::Handle;

/// A Phoenix-style WebSocket client on the [reconnect layer](crate::ReconnectLayer).
///
/// - [`send`](Self::send) accepts messages at any time. While disconnected they wait in a
///   bounded outbound queue ([`WsClientBuilder::queue_capacity`]; when it is full, `send` waits
///   or fails, per [`WhenFull`], and never drops) and are written in order when a connection
///   opens.
/// - Only the connection itself writes to its socket: its monitor, in the layer's driver task,
///   while it is installed, then its teardown. A `send` hands the message over and waits.
/// - Incoming text and binary messages arrive on the [`Incoming`](super::Incoming) stream,
///   each tagged with the epoch of its connection. A consumer that reads slowly holds the
///   reading back, not the writing or the heartbeat.
/// - A heartbeat pings at an interval; a missing pong is a failure of that connection's epoch,
///   so half-open peers are found. No ping is sent once a connection is released.
/// - [`disconnect`](Handle::disconnect) is graceful: the connection writes what it owes, then
///   Close goes out with the configured code and reason and the client waits for the peer's
///   Close, each step bounded.
/// - A peer's normal close (1000) releases the connection without a reconnect, unless
///   [`WsClientBuilder::reconnect_on_normal_close`]; abnormal closes and drops reconnect.
///
/// # Delivery
///
/// A message accepted by `send`, `feed`, a [`Permit`] or a [`WsSink`] is written to a
/// connection, in sequence order across connections, or given back ([`SendError`],
/// [`take_unsent`](Self::take_unsent)); it is never silently dropped. A write that did not
/// complete when its connection ended (failed, or released and cut by the close-step timeout)
/// is written again, whole, on the next connection, so the peer may see it twice. What the
/// network loses after a completed write is not seen by the client: for that,
/// [`at_least_once`](WsClientBuilder::at_least_once) keeps each message until the peer
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
/// client.handle().disconnect().await; // what it owes, Close, the peer's Close
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
    pub(super) fn new(shared: Arc<Shared>, handle: Handle) -> WsClient {
        WsClient { shared, handle }
    }

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
        WsClientBuilder::new(Arc::new(request))
    }

    /// The handle of the connection: `connect`, `disconnect`, `suspend`, `resume`, state,
    /// ledger.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Sends a text or binary message, and waits until it is delivered: written to a
    /// connection (flushed), or, with [`at_least_once`](WsClientBuilder::at_least_once),
    /// acknowledged. Resolves with its sequence number.
    ///
    /// The message is accepted when this is called if the queue has room; if it is full, the
    /// future waits for room ([`WhenFull::Wait`]) or fails with [`SendError::Full`]. See
    /// [`SendFuture`] for what dropping the future means. While disconnected the future waits
    /// for the next connection: bound it with `tokio::time::timeout` where the connection may
    /// stay down.
    pub fn send(&self, message: Message) -> SendFuture {
        self.send_with(move |_| message)
    }

    /// Like [`send`](Self::send), with the message made from its sequence number (1, 2, ...),
    /// so the peer can acknowledge it by number (see
    /// [`at_least_once`](WsClientBuilder::at_least_once)). `make` runs once the message has
    /// room, under the client's lock: keep it short, and do not call the client from it.
    pub fn send_with(&self, make: impl FnOnce(u64) -> Message + Send + 'static) -> SendFuture {
        let shared = &self.shared;
        match shared.try_reserve() {
            Ok(()) => SendFuture::accept(shared, make),
            Err(TryAcquireError::NoPermits) if shared.settings.when_full == WhenFull::Wait => {
                SendFuture::wait_for_room(Arc::clone(shared), make)
            }
            Err(no_room) => SendFuture::refused(shared.refuse(make, no_room)),
        }
    }

    /// Waits for room in the queue and holds it: a [`Permit`] to send one message with that
    /// cannot find the queue full. Dropping the future (or the permit) loses nothing: no
    /// message is involved yet. This is the way to wait for room where the wait may be cut.
    ///
    /// # Errors
    ///
    /// [`SendError::Closed`] once the client has shut down.
    pub async fn reserve(&self) -> Result<Permit, SendError> {
        let permit = Arc::clone(&self.shared.room)
            .acquire_owned()
            .await
            .map_err(|_| SendError::Closed { message: None })?;
        Ok(Permit::new(Arc::clone(&self.shared), permit))
    }

    /// Accepts a message without waiting, like `Sink::feed`: it is written in the background.
    /// Returns its sequence number.
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] when the queue is full (`feed` never waits), [`SendError::NotData`]
    /// for a control frame, [`SendError::Closed`] once the client has shut down; each with the
    /// message.
    pub fn feed(&self, message: Message) -> Result<u64, SendError> {
        self.feed_with(move |_| message)
    }

    /// Like [`feed`](Self::feed), with the message made from its sequence number.
    pub fn feed_with(&self, make: impl FnOnce(u64) -> Message) -> Result<u64, SendError> {
        let shared = &self.shared;
        match shared.try_reserve() {
            Ok(()) => shared.accept(make, false).map(|(seq, _)| seq),
            Err(no_room) => Err(shared.refuse(make, no_room)),
        }
    }

    /// Waits until every message accepted so far is delivered (or taken back). While
    /// disconnected it waits for the next connection: bound it with `tokio::time::timeout`
    /// where the connection may stay down.
    ///
    /// # Errors
    ///
    /// [`SendError::Closed`] if the client shuts down first.
    pub async fn flush(&self) -> Result<(), SendError> {
        let last = self.shared.next_seq();
        match self.shared.settled(last).await {
            true => Ok(()),
            false => Err(SendError::Closed { message: None }),
        }
    }

    /// A [`WsSink`]: this client as a `Sink<Message>`. It keeps the client alive.
    pub fn sink(&self) -> WsSink {
        WsSink::new(self.clone())
    }

    /// Counters of the traffic.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Takes back every message accepted and not yet delivered, in order: for an application
    /// that gives up on a connection. The batch a connection is writing at this moment is not
    /// taken: it is delivered, or comes back to the queue. The [`SendFuture`]s of the messages
    /// taken resolve with [`SendError::Withdrawn`].
    pub fn take_unsent(&self) -> Vec<(u64, Message)> {
        self.shared.take_unsent()
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}
