//! [`WsSink`]: a [`WsClient`] as a `Sink` of messages.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::Sink;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, TryAcquireError};
use tokio_tungstenite::tungstenite::Message;

use super::client::WsClient;
use super::error::SendError;

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A `Sink<Message>` into a [`WsClient`], made by [`WsClient::sink`], for code written against
/// `futures::Sink` (`SinkExt::feed`, `send_all`, `StreamExt::forward`), as it would be against
/// tokio-tungstenite's stream.
///
/// - `poll_ready` takes room for one message in the client's queue, and waits while there is
///   none, whatever [`WhenFull`](super::WhenFull) says: a `Sink` applies backpressure. An idle
///   sink holds at most that one slot.
/// - `start_send` accepts the message into the queue at once, in that room; from then on it is
///   the client's, with the guarantees of [`WsClient::send`](super::WsClient::send).
/// - `poll_flush` resolves once every message given to the sink is delivered. While
///   disconnected it waits for the next connection: bound it with `tokio::time::timeout` where
///   the connection may stay down.
/// - `poll_close` flushes. The client stays open.
///
/// The sink holds a clone of its client, so the client lives while the sink does. Messages of
/// different sinks (or sent with `send` meanwhile) are ordered by when `start_send` took them.
/// If the client's driver stops, the sink fails with [`SendError::Closed`], with the message
/// when `start_send` is given one.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use futures_util::{SinkExt, StreamExt, stream};
/// use tower_epoch::ws::{Message, WsClient};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let addr = listener.local_addr()?;
/// # tokio::spawn(async move {
/// #     while let Ok((socket, _)) = listener.accept().await {
/// #         tokio::spawn(async move {
/// #             let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else { return };
/// #             while let Some(Ok(m)) = ws.next().await {
/// #                 if m.is_text() { let _ = ws.send(m).await; }
/// #             }
/// #         });
/// #     }
/// # });
/// // An echo server listens on `addr`.
/// let (client, mut incoming) = WsClient::builder(format!("ws://{addr}/socket"))?.build()?;
/// client.handle().connect()?;
///
/// let mut sink = client.sink();
/// let mut messages = stream::iter(1..=3).map(|n| Ok(Message::text(format!("message {n}"))));
/// sink.send_all(&mut messages).await?; // fed one by one, flushed once
///
/// for n in 1..=3 {
///     let echo = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await?.unwrap();
///     assert_eq!(echo.message, Message::text(format!("message {n}")));
/// }
/// # Ok(()) }
/// ```
pub struct WsSink {
    client: WsClient,
    /// Room taken by `poll_ready` for the next `start_send`.
    room: Option<OwnedSemaphorePermit>,
    acquiring: Option<Acquire>,
    /// The sequence number of the last message this sink accepted (0: none yet).
    last: u64,
    /// A flush in progress: waiting for `last`, as it was when the flush began.
    flushing: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
}

// A sink moves between tasks and threads.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<WsSink>();
};

impl WsSink {
    pub(super) fn new(client: WsClient) -> WsSink {
        WsSink {
            client,
            room: None,
            acquiring: None,
            last: 0,
            flushing: None,
        }
    }
}

fn closed() -> SendError {
    SendError::Closed { message: None }
}

impl Sink<Message> for WsSink {
    type Error = SendError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let this = self.get_mut();
        loop {
            if this.room.is_some() {
                return Poll::Ready(Ok(()));
            }
            if let Some(acquiring) = &mut this.acquiring {
                let acquired = ready!(acquiring.as_mut().poll(cx));
                this.acquiring = None;
                this.room = Some(acquired.map_err(|_| closed())?);
                continue;
            }
            let room = &this.client.shared().room;
            match Arc::clone(room).try_acquire_owned() {
                Ok(permit) => this.room = Some(permit),
                Err(TryAcquireError::NoPermits) => {
                    this.acquiring = Some(Box::pin(Arc::clone(room).acquire_owned()));
                }
                Err(TryAcquireError::Closed) => return Poll::Ready(Err(closed())),
            }
        }
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), SendError> {
        let this = self.get_mut();
        let Some(room) = this.room.take() else {
            return Err(SendError::NotReady(message));
        };
        room.forget();
        let (seq, _) = this.client.shared().accept(move |_| message, false)?;
        this.last = seq;
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let this = self.get_mut();
        let flushing = this.flushing.get_or_insert_with(|| {
            let (shared, last) = (Arc::clone(this.client.shared()), this.last);
            Box::pin(async move { shared.settled(last).await })
        });
        let settled = ready!(flushing.as_mut().poll(cx));
        this.flushing = None;
        Poll::Ready(if settled { Ok(()) } else { Err(closed()) })
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        self.poll_flush(cx)
    }
}

impl fmt::Debug for WsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsSink")
            .field("ready", &self.room.is_some())
            .field("last", &self.last)
            .field("flushing", &self.flushing.is_some())
            .finish_non_exhaustive()
    }
}
