//! [`SendFuture`], and the [`Permit`] that [`WsClient::reserve`](super::WsClient::reserve)
//! returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::error::SendError;
use super::shared::Shared;

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;
type Make = Box<dyn FnOnce(u64) -> Message + Send>;

/// Future of [`WsClient::send`](super::WsClient::send) and [`Permit::send`]: resolves with the
/// message's sequence number once it is delivered (written to a connection, or, with
/// [`at_least_once`](super::WsClientBuilder::at_least_once), acknowledged by the peer).
///
/// # Dropping it
///
/// - **Once the message is accepted** ([`seq`](Self::seq) is `Some`), dropping the future
///   only stops the wait: the message stays the client's, and is delivered, or given back by
///   [`take_unsent`](super::WsClient::take_unsent), as if it had been fed.
/// - **While it waits for room** (a full queue under [`WhenFull::Wait`](super::WhenFull)),
///   the message is still in the future, and dropping the future drops it. Where a wait may
///   be cut (a timeout, a `select!`), take room first with
///   [`reserve`](super::WsClient::reserve), which holds no message, then send with the permit.
#[must_use = "the message may be waiting for room in this future; await it, or use `feed`"]
pub struct SendFuture {
    state: State,
}

enum State {
    /// Accepted: waiting for its outcome.
    Accepted {
        seq: u64,
        outcome: oneshot::Receiver<Result<u64, SendError>>,
    },
    /// The queue was full: waiting for room, then accepted.
    Room {
        shared: Arc<Shared>,
        make: Option<Make>,
        acquire: Acquire,
    },
    /// Refused when it was offered.
    Refused(Option<SendError>),
}

impl SendFuture {
    pub(super) fn accept(shared: &Shared, make: impl FnOnce(u64) -> Message) -> SendFuture {
        let state = match shared.accept(make, true) {
            Ok((seq, Some(outcome))) => State::Accepted { seq, outcome },
            Ok((_, None)) => unreachable!("an awaited message has an outcome"),
            Err(error) => State::Refused(Some(error)),
        };
        SendFuture { state }
    }

    pub(super) fn wait_for_room(
        shared: Arc<Shared>,
        make: impl FnOnce(u64) -> Message + Send + 'static,
    ) -> SendFuture {
        let acquire = Box::pin(Arc::clone(&shared.room).acquire_owned());
        SendFuture {
            state: State::Room {
                shared,
                make: Some(Box::new(make)),
                acquire,
            },
        }
    }

    pub(super) fn refused(error: SendError) -> SendFuture {
        SendFuture {
            state: State::Refused(Some(error)),
        }
    }

    /// The message's sequence number, once it is accepted.
    pub fn seq(&self) -> Option<u64> {
        match &self.state {
            State::Accepted { seq, .. } => Some(*seq),
            State::Room { .. } | State::Refused(_) => None,
        }
    }
}

impl Future for SendFuture {
    type Output = Result<u64, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Accepted { outcome, .. } => {
                    // The sender is dropped unresolved only with the client's last state,
                    // after the shutdown gave back every message still awaited.
                    return Poll::Ready(
                        ready!(Pin::new(outcome).poll(cx))
                            .unwrap_or(Err(SendError::Closed { message: None })),
                    );
                }
                State::Room {
                    shared,
                    make,
                    acquire,
                } => {
                    let acquired = ready!(acquire.as_mut().poll(cx));
                    let make = make.take().expect("polled after completion");
                    this.state = match acquired {
                        Ok(permit) => {
                            permit.forget();
                            SendFuture::accept(shared, make).state
                        }
                        Err(_) => State::Refused(Some(SendError::Closed {
                            message: Some(make(shared.next_seq() + 1)),
                        })),
                    };
                }
                State::Refused(error) => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
            }
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

/// Room for one message in a [`WsClient`](super::WsClient)'s queue, taken by
/// [`reserve`](super::WsClient::reserve). Sending with it cannot find the queue full; dropping
/// it gives the room back.
pub struct Permit {
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
}

impl Permit {
    pub(super) fn new(shared: Arc<Shared>, permit: OwnedSemaphorePermit) -> Permit {
        Permit { shared, permit }
    }

    /// Sends `message` in the room reserved: accepted now (it fails only for a control frame
    /// or a client that shut down meanwhile), delivered when the future resolves.
    pub fn send(self, message: Message) -> SendFuture {
        self.send_with(move |_| message)
    }

    /// Like [`send`](Self::send), with the message made from its sequence number.
    pub fn send_with(self, make: impl FnOnce(u64) -> Message) -> SendFuture {
        self.permit.forget();
        SendFuture::accept(&self.shared, make)
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}
