//! Incoming messages: the [`Incoming`] stream, and a connection's room in it.
//!
//! # Backpressure
//!
//! A connection hands each message it reads to `Incoming` (a bounded channel,
//! [`WsClientBuilder::incoming_capacity`](super::WsClientBuilder::incoming_capacity)). When the
//! channel is full, the connection keeps that one message and reads nothing more until the
//! consumer makes room for it: the peer's frames wait in the socket, and TCP slows the peer
//! down. So nothing received is dropped, memory stays bounded (one message per connection
//! beyond the channel), and a connection that has nothing to deliver holds no room: a closing
//! connection waiting for the peer's Close does not stop the installed one from delivering.
//! Writes go on meanwhile, and so do pings; the pong deadline is paused, since the pong cannot
//! be read, and resumes with the time it had left once the message is delivered.
//!
//! A message a connection still keeps when its socket is dropped (the consumer made no room
//! before the close-step timeout ran out) is counted in
//! [`Stats::undelivered`](super::Stats::undelivered), as are messages received once nobody holds
//! `Incoming` any more.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::shared::Shared;
use crate::epoch::Epoch;

/// A message received, tagged with the epoch of the connection it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// The epoch of the connection that delivered it.
    pub epoch: Epoch,
    /// The message (text or binary).
    pub message: Message,
}

/// The stream of incoming messages, each tagged with its connection's epoch. It ends once
/// the client has shut down and every message received before has been read.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Received>,
}

impl Incoming {
    pub(crate) fn new(rx: mpsc::Receiver<Received>) -> Incoming {
        Incoming { rx }
    }
}

impl futures_core::Stream for Incoming {
    type Item = Received;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Received>> {
        self.rx.poll_recv(cx)
    }
}

type Reserving = Pin<
    Box<
        dyn Future<Output = Result<mpsc::OwnedPermit<Received>, mpsc::error::SendError<()>>> + Send,
    >,
>;

/// A connection's way into `Incoming`: the message it read and could not deliver yet, if any.
pub(crate) struct Room {
    /// `None` once the `Incoming` stream is gone: messages are counted and go nowhere.
    sender: Option<mpsc::Sender<Received>>,
    /// Read, waiting for room.
    kept: Option<Received>,
    /// Waiting for room for `kept`.
    reserving: Option<Reserving>,
    shared: Arc<Shared>,
}

impl Room {
    pub(crate) fn new(sender: mpsc::Sender<Received>, shared: Arc<Shared>) -> Room {
        Room {
            sender: Some(sender),
            kept: None,
            reserving: None,
            shared,
        }
    }

    /// Ready once no message waits for room (it was delivered, or nobody reads any more): the
    /// connection may read the next frame.
    pub(crate) fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.kept.is_none() {
            return Poll::Ready(());
        }
        let reserving = self.reserving.get_or_insert_with(|| {
            let sender = self
                .sender
                .clone()
                .expect("a message is kept only for a reader");
            Box::pin(sender.reserve_owned())
        });
        let reserved = ready!(reserving.as_mut().poll(cx));
        self.reserving = None;
        let received = self.kept.take().expect("checked above");
        match reserved {
            Ok(permit) => drop(permit.send(received)),
            Err(_) => {
                self.sender = None;
                self.shared.undelivered();
            }
        }
        Poll::Ready(())
    }

    /// Delivers a message read (after [`poll_room`](Self::poll_room) was ready): at once if
    /// there is room, or kept until there is.
    pub(crate) fn deliver(&mut self, received: Received) {
        debug_assert!(self.kept.is_none(), "read only with room");
        let Some(sender) = &self.sender else {
            self.shared.undelivered();
            return;
        };
        match sender.try_send(received) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(received)) => self.kept = Some(received),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.sender = None;
                self.shared.undelivered();
            }
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if self.kept.is_some() {
            tracing::debug!(
                "a message received was dropped with its socket: no room in `Incoming`"
            );
            self.shared.undelivered();
        }
    }
}
