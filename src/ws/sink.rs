//! [`WsSink`]: a [`WsClient`] as a `Sink` of messages.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::Sink;
use tokio_tungstenite::tungstenite::Message;

use super::client::{Buffered, Shared, Written};
use super::error::SendError;

/// How many messages a sink reserves room for at a time, and so takes between two locks of
/// the queue.
const CHUNK: usize = 128;

/// A `Sink<Message>` into a [`WsClient`], made by [`WsClient::sink`], for code written against
/// `futures::Sink` (`SinkExt::feed`, `send_all`, `StreamExt::forward`), as it would be against
/// tokio-tungstenite's stream.
///
/// - `poll_ready` reserves room in the client's queue for up to 128 messages at a time, and
///   waits while there is none, whatever [`WhenFull`](super::WhenFull) says: a `Sink` applies
///   backpressure.
/// - `start_send` keeps the message in the sink, in a reserved slot, with no lock.
/// - The sink hands what it keeps to the client's queue, in order and under one lock, when its
///   reserved room runs out, when it is flushed, and when it is dropped. From then on the
///   messages are the client's, with the guarantees of [`WsClient::send`](super::WsClient::send):
///   written in order to a connection, in the background or by the next flush, or given back.
/// - `poll_flush` hands them over and resolves once every message given to the sink has been
///   written to a connection; while connected, it writes them from the caller's task. While
///   disconnected it waits for the next connection: bound it with `tokio::time::timeout` where
///   the connection may stay down.
/// - `poll_close` flushes. The client stays open; dropping the sink hands over what it keeps.
///
/// Messages in different sinks (or sent with `send` meanwhile) are ordered by when they are
/// handed over. Once the client has shut down, the sink fails with [`SendError::Closed`] and
/// what it kept goes to the queue, for [`WsClient::take_unsent`](super::WsClient::take_unsent).
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
///
/// [`WsClient`]: super::WsClient
/// [`WsClient::sink`]: super::WsClient::sink
pub struct WsSink {
    shared: Arc<Shared>,
    buffered: Buffered,
    /// The sequence number of the last message this sink handed over (0: none yet).
    last: u64,
    /// No room to reserve: waiting for some.
    room: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// A flush in progress: waiting for `last`, as it was when the flush began, to be written.
    flushing: Option<Written>,
}

// A sink moves between tasks and threads with the messages it keeps.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<WsSink>();
};

impl WsSink {
    pub(super) fn new(shared: Arc<Shared>) -> WsSink {
        WsSink {
            shared,
            buffered: Buffered::default(),
            last: 0,
            room: None,
            flushing: None,
        }
    }

    /// Hands what the sink keeps to the queue, and reserves up to `want` slots.
    fn hand_over(&mut self, want: usize) -> Result<(), SendError> {
        if let Some(last) = self.shared.hand_over(&mut self.buffered, want)? {
            self.last = last;
        }
        Ok(())
    }
}

impl Sink<Message> for WsSink {
    type Error = SendError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let this = self.get_mut();
        loop {
            if this.buffered.has_slot() {
                return Poll::Ready(Ok(()));
            }
            if let Some(room) = &mut this.room {
                ready!(room.as_mut().poll(cx));
                this.room = None;
            }
            this.hand_over(CHUNK)?;
            if !this.buffered.has_slot() {
                // Full: wait for room, then try again (another sender may take it first).
                let shared = Arc::clone(&this.shared);
                this.room = Some(Box::pin(async move { shared.room_or_closed().await }));
            }
        }
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), SendError> {
        self.get_mut().buffered.push(message)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let this = self.get_mut();
        if this.flushing.is_none() {
            this.hand_over(0)?;
            this.flushing = Some(Written::new(Arc::clone(&this.shared), this.last));
        }
        let flushing = this.flushing.as_mut().expect("set above");
        let written = ready!(Pin::new(flushing).poll(cx));
        this.flushing = None;
        Poll::Ready(written.map(drop))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        self.poll_flush(cx)
    }
}

impl Drop for WsSink {
    fn drop(&mut self) {
        // Nothing the sink took is lost: it goes to the queue, and out in the background.
        let _ = self.shared.hand_over(&mut self.buffered, 0);
    }
}

impl fmt::Debug for WsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsSink")
            .field("buffered", &self.buffered.len())
            .field("last", &self.last)
            .field("flushing", &self.flushing.is_some())
            .finish_non_exhaustive()
    }
}
