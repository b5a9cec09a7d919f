//! Incoming messages: the [`Incoming`] stream, and the reading side's room in it.
//!
//! # Backpressure
//!
//! A connection reads the next frame only once it holds room for it in `Incoming` (a permit
//! of the bounded channel, [`WsClientBuilder::incoming_capacity`](super::WsClientBuilder::incoming_capacity)).
//! While the consumer is behind, the connection stops reading: the peer's frames wait in the
//! socket, and TCP slows the peer down. Nothing received is dropped, and memory stays
//! bounded. Writes go on meanwhile, and so do pings; the pong deadline is paused, since the
//! pong cannot be read, and resumes with the time it had left once there is room.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

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

/// One connection's room in `Incoming`: it reads a frame only while it holds a permit.
pub(crate) struct Room {
    /// `None` once the `Incoming` stream is gone: frames are read and delivered to nobody.
    sender: Option<mpsc::Sender<Received>>,
    permit: Option<mpsc::OwnedPermit<Received>>,
    reserving: Option<Reserving>,
}

impl Room {
    pub(crate) fn new(sender: mpsc::Sender<Received>) -> Room {
        Room {
            sender: Some(sender),
            permit: None,
            reserving: None,
        }
    }

    /// Ready once there is room for one more message (or nobody reads any more).
    pub(crate) fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.permit.is_some() {
                return Poll::Ready(());
            }
            if let Some(reserving) = &mut self.reserving {
                let reserved = ready!(reserving.as_mut().poll(cx));
                self.reserving = None;
                self.permit = reserved.ok();
                if self.permit.is_none() {
                    return Poll::Ready(());
                }
                continue;
            }
            let Some(sender) = self.sender.take() else {
                return Poll::Ready(());
            };
            match sender.try_reserve_owned() {
                Ok(permit) => self.permit = Some(permit),
                Err(mpsc::error::TrySendError::Full(sender)) => {
                    self.reserving = Some(Box::pin(sender.reserve_owned()));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Poll::Ready(()),
            }
        }
    }

    /// Delivers a message into the room [`poll_room`](Self::poll_room) found. Returns false
    /// if nobody reads any more.
    pub(crate) fn deliver(&mut self, received: Received) -> bool {
        match self.permit.take() {
            Some(permit) => {
                self.sender = Some(permit.send(received));
                true
            }
            None => false,
        }
    }
}
