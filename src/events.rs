//! Transition events: every change of the published [`State`], in order, with its cause.
//!
//! [`Handle::subscribe`](crate::Handle::subscribe) is level-triggered: a slow reader sees the
//! latest state and misses the steps between. [`Handle::events`](crate::Handle::events) gives
//! every step instead, as a [`Transition`]: the state before and after, the [`Cause`], the
//! epoch, the attempt and the time. The buffer is bounded ([`CAPACITY`] transitions per
//! connection, shared by its readers); a reader that falls further behind is told how many it
//! missed ([`Lagged`]) and goes on from the oldest one kept, as with
//! `tokio::sync::broadcast`, on which it is built.
//!
//! ```
//! use futures_util::StreamExt;
//! use tower::service_fn;
//! use tower_epoch::ReconnectLayer;
//! use tower_epoch::events::Cause;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let connector = service_fn(|()| async {
//!     Ok::<_, std::io::Error>(service_fn(|x: u8| async move { Ok::<_, std::io::Error>(x) }))
//! });
//! let layer = ReconnectLayer::new(());
//! let handle = layer.handle();
//! let _service = tower::Layer::layer(&layer, connector);
//!
//! let mut events = handle.events(); // before acting: it sees what follows
//! handle.connect().unwrap();
//! let first = events.next().await.unwrap().unwrap();
//! assert_eq!(first.cause, Cause::Connect);
//! let second = events.next().await.unwrap().unwrap();
//! assert_eq!(second.cause, Cause::Opened);
//! assert!(second.to.is_connected());
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, TryLockError};
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::epoch::Epoch;
use crate::machine::Event;
use crate::state::State;

/// Transitions kept for the readers of one connection's events.
pub const CAPACITY: usize = 64;

/// One change of the published state.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Transition {
    /// The number of the step, counting from 1: consecutive for a reader that did not lag.
    pub seq: u64,
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// What caused it.
    pub cause: Cause,
    /// The clock after the step.
    pub epoch: Epoch,
    /// Attempts started in the current backoff session, after the step (0 once a connection
    /// stayed up for the stable period). Not the `attempt` of
    /// [`State::WaitingToRetry`], which numbers the attempt to come.
    pub attempt: u32,
    /// When it happened (tokio's clock, so paused time in tests).
    pub at: Instant,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {}: {} -> {} ({}, attempt {})",
            self.seq, self.cause, self.from, self.to, self.epoch, self.attempt
        )
    }
}

/// What caused a [`Transition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// [`Handle::connect`](crate::Handle::connect).
    Connect,
    /// [`Handle::disconnect`](crate::Handle::disconnect).
    Disconnect,
    /// [`Handle::suspend`](crate::Handle::suspend).
    Suspend,
    /// [`Handle::resume`](crate::Handle::resume).
    Resume,
    /// [`Handle::reconnect_now`](crate::Handle::reconnect_now).
    ReconnectNow,
    /// A request on a dormant connection (lazy, or closed as idle) started an attempt.
    Demand,
    /// An attempt produced a connection, which was installed.
    Opened,
    /// An attempt failed.
    AttemptFailed,
    /// The installed connection failed.
    Failed,
    /// The peer ended the installed connection normally.
    Ended,
    /// The backoff timer was armed; the delay is now known.
    BackoffArmed,
    /// The backoff timer fired: the next attempt starts.
    BackoffElapsed,
    /// No request held the installed connection for the idle timeout.
    IdleTimeout,
    /// The last teardown in flight completed.
    Closed,
    /// Every handle and service was dropped.
    Shutdown,
    /// The driver stopped.
    DriverStopped,
}

impl Cause {
    /// The cause of a step of `event`; `None` for events that never change the state.
    pub(crate) fn of(event: &Event) -> Option<Cause> {
        Some(match event {
            Event::Connect => Cause::Connect,
            Event::Disconnect => Cause::Disconnect,
            Event::Suspend => Cause::Suspend,
            Event::Resume { .. } => Cause::Resume,
            Event::ReconnectNow => Cause::ReconnectNow,
            Event::Demand => Cause::Demand,
            Event::IdleTimeout { .. } => Cause::IdleTimeout,
            Event::Opened { .. } => Cause::Opened,
            Event::AttemptFailed { .. } => Cause::AttemptFailed,
            Event::Failed { .. } => Cause::Failed,
            Event::Ended { .. } => Cause::Ended,
            Event::RetryArmed { .. } => Cause::BackoffArmed,
            Event::TimerFired { .. } => Cause::BackoffElapsed,
            Event::Closed { .. } => Cause::Closed,
            Event::Shutdown => Cause::Shutdown,
            Event::Stopped => Cause::DriverStopped,
            Event::AttemptStarting { .. } | Event::AttemptCancelled | Event::Stable { .. } => {
                return None;
            }
        })
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A reader fell behind by more than [`CAPACITY`] transitions: this many were dropped for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("missed {0} transitions")]
pub struct Lagged(pub u64);

/// The transitions of one connection, from [`Handle::events`](crate::Handle::events).
///
/// A [`Stream`] of `Result<Transition, Lagged>`, also read with [`recv`](Self::recv). It ends
/// after the transition to [`State::Shutdown`], or when the connection is gone. It does not keep
/// the connection alive.
pub struct Events {
    rx: Option<broadcast::Receiver<Transition>>,
    /// The `recv` in flight, when polled as a stream.
    next: Option<Pin<Box<dyn Future<Output = Received> + Send>>>,
}

type Received = (
    Option<Result<Transition, Lagged>>,
    broadcast::Receiver<Transition>,
);

impl Events {
    pub(crate) fn new(rx: broadcast::Receiver<Transition>) -> Events {
        Events {
            rx: Some(rx),
            next: None,
        }
    }

    /// The next transition; `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<Result<Transition, Lagged>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

async fn receive(mut rx: broadcast::Receiver<Transition>) -> Received {
    let next = match rx.recv().await {
        Ok(transition) => Some(Ok(transition)),
        Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(Lagged(n))),
        Err(broadcast::error::RecvError::Closed) => None,
    };
    (next, rx)
}

impl Stream for Events {
    type Item = Result<Transition, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.next.is_none() {
            let Some(rx) = this.rx.take() else {
                return Poll::Ready(None);
            };
            this.next = Some(Box::pin(receive(rx)));
        }
        let next = this.next.as_mut().expect("set above");
        let (item, rx) = std::task::ready!(next.as_mut().poll(cx));
        this.next = None;
        let last = matches!(
            &item,
            None | Some(Ok(Transition {
                to: State::Shutdown,
                ..
            }))
        );
        if !last {
            this.rx = Some(rx);
        }
        Poll::Ready(item)
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("ended", &(self.rx.is_none() && self.next.is_none()))
            .finish_non_exhaustive()
    }
}

/// The sending side, made at the first [`Handle::events`](crate::Handle::events): a connection
/// nobody follows pays nothing for it.
pub(crate) struct Hub {
    tx: broadcast::Sender<Transition>,
    /// Transitions queued under the machine's lock, in step order, not yet sent.
    pending: Mutex<Vec<Transition>>,
    /// Held while sending, so that transitions go out in the order they were queued.
    sending: Mutex<()>,
}

impl Hub {
    pub(crate) fn new() -> Hub {
        Hub {
            tx: broadcast::Sender::new(CAPACITY),
            pending: Mutex::new(Vec::new()),
            sending: Mutex::new(()),
        }
    }

    pub(crate) fn subscribe(&self) -> Events {
        Events::new(self.tx.subscribe())
    }

    /// Queues a transition; called under the machine's lock, so in step order.
    pub(crate) fn queue(&self, transition: Transition) {
        crate::core::lock(&self.pending).push(transition);
    }

    /// Sends what is queued, with no machine lock held (sending wakes readers).
    ///
    /// One thread sends at a time. A thread that finds another sending leaves its
    /// transitions to it: the sender looks at the queue again after it stops sending, and a
    /// transition queued before the other thread's try is seen by that look.
    pub(crate) fn flush(&self) {
        loop {
            let sending = match self.sending.try_lock() {
                Ok(sending) => sending,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            let batch = std::mem::take(&mut *crate::core::lock(&self.pending));
            for transition in batch {
                // No reader left is not an error: the transition is for nobody.
                let _ = self.tx.send(transition);
            }
            drop(sending);
            if crate::core::lock(&self.pending).is_empty() {
                return;
            }
        }
    }
}
