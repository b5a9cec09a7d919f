//! The [`Handle`]: the controller of one managed connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::core::{Core, ResumeToken, terminal_error};
use crate::epoch::{Epoch, Stamp};
use crate::error::{BoxError, Error};
use crate::events::Events;
use crate::state::{Ledger, State};

/// A cloneable controller of one managed connection.
///
/// Every operation takes effect when it is called, not when a returned future is polled: the
/// clock ticks, the intent changes and the installed connection is released before the method
/// returns. The futures it hands back only report completion, and dropping them cancels nothing.
///
/// The handle is not generic: store it anywhere. Take it from the layer
/// ([`ReconnectLayer::handle`](crate::ReconnectLayer::handle)) before the layer disappears into a
/// `ServiceBuilder` stack, or from the service ([`Reconnect::handle`](crate::Reconnect::handle)).
///
/// Handles and services together keep the connection managed: when the last of them is dropped,
/// the driver closes what is open and ends.
///
/// The connection's clock is the machine's alone: a handle reads it ([`epoch`](Self::epoch),
/// [`stamp`](Self::stamp)) and changes it only through the operations above. Nothing public
/// ticks it:
///
/// ```compile_fail
/// # fn f(handle: tower_epoch::Handle) {
/// handle.clock().tick(); // no such method
/// # }
/// ```
pub struct Handle {
    core: Arc<Core>,
}

impl Handle {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        core.add_user();
        Handle { core }
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Expresses the intent to be connected and starts an attempt at once.
    ///
    /// If the connection is already connected, connecting or waiting to retry, this is a no-op
    /// and the clock does not tick. From any other state (idle, disconnecting, gave up) the clock
    /// ticks and a new attempt starts, without waiting for a teardown still in flight (rule 6).
    /// The backoff session and attempt count restart.
    ///
    /// Returns the current epoch: the new attempt's, or the active one's for a no-op.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] if the driver has stopped.
    pub fn connect(&self) -> Result<Epoch, Error> {
        self.core.connect()
    }

    /// Expresses the intent to be disconnected: ticks the clock and releases the installed
    /// connection to teardown (pending reconnect timers and in-flight attempts go stale).
    ///
    /// The returned future resolves once the teardown of the connection that was installed at
    /// the call has completed (closed gracefully or cut at the close timeout), even if a newer
    /// `connect` superseded it. If nothing was installed it resolves at once. Dropping it does
    /// not cancel the disconnect.
    pub fn disconnect(&self) -> DisconnectFuture {
        DisconnectFuture {
            done: self.core.disconnect(),
        }
    }

    /// The browser's `pagehide`: disconnects and returns a single-use token to
    /// [`resume`](Self::resume) with, but only if the intent was to be connected (connecting,
    /// connected or waiting to retry). Otherwise it changes nothing and returns `None`.
    pub fn suspend(&self) -> Option<ResumeToken> {
        self.core.suspend()
    }

    /// The browser's `pageshow`: reconnects only if the clock still reads the token's epoch,
    /// that is if nothing else changed the intent since the matching `suspend`.
    ///
    /// # Errors
    ///
    /// [`Error::StaleResume`] when something intervened (then nothing happens),
    /// [`Error::ForeignToken`] for a token of another connection, [`Error::Shutdown`] if the
    /// driver has stopped.
    pub fn resume(&self, token: ResumeToken) -> Result<Epoch, Error> {
        self.core.resume(token)
    }

    /// The clock's current epoch.
    pub fn epoch(&self) -> Epoch {
        self.core.clock.now()
    }

    /// Captures the current epoch, to guard an effect of your own (see [`Stamp`]): the
    /// stamp stays current until the next tick of this connection's clock, which only the
    /// connection's own operations advance.
    pub fn stamp(&self) -> Stamp {
        self.core.clock.stamp()
    }

    /// Skips the rest of a backoff wait: while the state is
    /// [`WaitingToRetry`](State::WaitingToRetry), the clock ticks and the next attempt starts
    /// at once (the pending timer goes stale). Use it on a network change or for a "retry now"
    /// button. The attempt count goes on (the backoff session is not reset).
    ///
    /// Returns whether an attempt started; in any other state it changes nothing.
    pub fn reconnect_now(&self) -> bool {
        self.core.reconnect_now()
    }

    /// Whether the next request starts an attempt: the connection is disconnected but
    /// *dormant*, in a layer that [connects on demand](crate::ReconnectLayer::connect_on_demand)
    /// before its first request or after a normal end by the peer, or after an
    /// [idle timeout](crate::ReconnectLayer::with_idle_timeout). False after a `disconnect()`
    /// or a `suspend()`, and in every other state.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower::{Layer, service_fn};
    /// use tower_epoch::ReconnectLayer;
    ///
    /// let connector = service_fn(|()| async {
    ///     Ok::<_, std::io::Error>(service_fn(|x: u8| async move { Ok::<_, std::io::Error>(x) }))
    /// });
    /// let service = ReconnectLayer::new(()).connect_on_demand().layer(connector);
    /// let handle = service.handle();
    /// assert!(handle.connects_on_demand()); // never used: the first request connects
    /// handle.disconnect().await;
    /// assert!(!handle.connects_on_demand()); // disconnected by intent (rule 8)
    /// # }
    /// ```
    pub fn connects_on_demand(&self) -> bool {
        self.core.is_dormant()
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.core.state()
    }

    /// A level-triggered subscription to state changes.
    ///
    /// Wait for a state with [`watch::Receiver::wait_for`], bounded by a timeout of yours:
    ///
    /// ```
    /// # #[allow(dead_code)]
    /// # async fn f(handle: tower_epoch::Handle) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut states = handle.subscribe();
    /// tokio::time::timeout(
    ///     std::time::Duration::from_secs(5),
    ///     states.wait_for(|s| s.is_connected()),
    /// )
    /// .await??;
    /// # Ok(()) }
    /// ```
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.core.subscribe()
    }

    /// Waits until `until` holds for the state, for at most `timeout`, and returns that state.
    ///
    /// The predicate sees the current state first, then every published state (level-
    /// triggered: a state that lasts less than a wake-up may be skipped; follow
    /// [`events`](Self::events) to see every one). It waits *for* a state, not for a change
    /// away from one, so "wait until connected" is simply:
    ///
    /// ```
    /// # #[allow(dead_code)]
    /// # async fn f(handle: tower_epoch::Handle) -> Result<(), tower_epoch::Error> {
    /// use std::time::Duration;
    ///
    /// let connected = handle.wait_for(Duration::from_secs(5), |s| s.is_connected()).await?;
    /// println!("up in {:?}", connected.epoch());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// - [`Error::WaitTimeout`] when `timeout` elapsed first;
    /// - [`Error::GaveUp`], [`Error::Refused`] or [`Error::Shutdown`] when the state became
    ///   terminal without satisfying `until`: nothing would change it but a `connect()`, so
    ///   it fails as a waiting request does, at once.
    pub async fn wait_for<F>(&self, timeout: Duration, mut until: F) -> Result<State, Error>
    where
        F: FnMut(&State) -> bool,
    {
        let mut states = self.core.subscribe();
        let wait = async {
            loop {
                // Cloned so that the predicate runs with no lock of the channel held.
                let state = states.borrow_and_update().clone();
                if until(&state) {
                    return Ok(state);
                }
                if let Some(error) = terminal_error(&state) {
                    return Err(error);
                }
                // The sender lives as long as the core, which this handle keeps.
                if states.changed().await.is_err() {
                    return Err(Error::Shutdown);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(Error::WaitTimeout(timeout)))
    }

    /// Every transition of the state from now on, in order (see [`crate::events`]).
    ///
    /// Unlike [`subscribe`](Self::subscribe), a slow reader misses nothing without being told:
    /// past [`CAPACITY`](crate::events::CAPACITY) unread transitions it gets
    /// [`Lagged`](crate::events::Lagged) with the number it missed.
    pub fn events(&self) -> Events {
        self.core.events()
    }

    /// The counters of everything done so far.
    pub fn ledger(&self) -> Ledger {
        self.core.ledger()
    }

    /// Reports a failure of the connection installed at `epoch`, as a transport does when its
    /// connection drops.
    ///
    /// It takes effect only if that connection is still installed (rule 3): then it is released
    /// to teardown and, the intent being connected, a reconnect is scheduled after the backoff,
    /// unless the layer's permanent-error predicate classifies `error` as permanent
    /// ([`State::Refused`]). Returns whether it took effect.
    pub fn report_failure(&self, epoch: Epoch, error: impl Into<BoxError>) -> bool {
        self.core
            .report_failure(epoch, Error::connection_failed(error))
    }

    /// Reports that the peer ended the connection installed at `epoch` normally (a WebSocket
    /// close with code 1000, an HTTP/2 GOAWAY).
    ///
    /// It takes effect only if that connection is still installed (rule 3): then it is released
    /// to teardown and the layer's [`NormalEnd`](crate::NormalEnd) policy decides what follows:
    /// by default the intent becomes disconnected, as after a
    /// [`disconnect`](Self::disconnect); with `NormalEnd::Reconnect` a new attempt starts at
    /// once. Returns whether it took effect.
    pub fn report_closed(&self, epoch: Epoch) -> bool {
        self.core.report_ended(epoch)
    }

    /// The installed connection and its epoch, if any.
    ///
    /// `None` also when `C` is not the type the layer's connector produces.
    pub fn connection<C: Clone + Send + 'static>(&self) -> Option<(Epoch, C)> {
        self.core.installed_conn()
    }
}

impl Clone for Handle {
    fn clone(&self) -> Self {
        Handle::new(Arc::clone(&self.core))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.core.remove_user();
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("core", &self.core).finish()
    }
}

/// Future returned by [`Handle::disconnect`]: resolves once the released connection is closed.
#[derive(Debug)]
pub struct DisconnectFuture {
    done: Option<oneshot::Receiver<()>>,
}

impl Future for DisconnectFuture {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(done) = self.done.as_mut() {
            // `Err` means the driver stopped and dropped the connection: closed all the same.
            let _ = std::task::ready!(Pin::new(done).poll(cx));
            self.done = None;
        }
        Poll::Ready(())
    }
}
