//! Graceful teardown of connections, and monitoring of the installed one.
//!
//! Every connection that leaves the slot (disconnect, suspend, failure, shutdown) or is never
//! installed (a stale attempt, rule 1) goes through the configured [`Teardown`] exactly once.
//! The driver bounds each teardown with the close timeout: a teardown still running then is
//! dropped, and with it the connection it owns.
//!
//! The default, [`DropTeardown`], drops the connection: right for connections whose `Drop`
//! releases everything and that no one else holds. Anything that must drain or say goodbye (a
//! WebSocket Close frame, an HTTP/2 GOAWAY) implements `Teardown` or passes a closure.
//!
//! # What `disconnect().await` promises
//!
//! [`Handle::disconnect`](crate::Handle::disconnect) resolves once the teardown of the released
//! connection has completed (or was cut at the close timeout). Whether the connection is then
//! *closed* is the teardown's doing:
//!
//! - A teardown that closes the connection for every copy of it (sends Close, shuts the socket,
//!   tells the task that owns it to end) makes it closed, however many copies exist. The
//!   WebSocket client of this crate does this.
//! - [`DropTeardown`] drops the middleware's own copy only. A connection that is a cloneable
//!   handle to a task (hyper's `SendRequest`, a channel to a socket owner, anything whose task
//!   lives while a clone lives) stays open while other copies live: each [`Reconnect`] clone
//!   that served a request caches one until its next `poll_ready` or its drop, so idle clones
//!   keep it open. For such connections, close them explicitly in a teardown of your own.
//!
//! [`Reconnect`]: crate::Reconnect
//!
//! A teardown that says goodbye:
//!
//! ```
//! use tower_epoch::{ReconnectLayer, teardown::CloseCause};
//!
//! # #[derive(Clone)] struct Conn;
//! # impl Conn { async fn goodbye(self, _why: &str) {} }
//! let layer = ReconnectLayer::new("127.0.0.1:7000").with_teardown(
//!     |conn: Conn, cause: CloseCause| async move {
//!         let why = if cause == CloseCause::Disconnect { "bye" } else { "going away" };
//!         conn.goodbye(why).await
//!     },
//! );
//! # drop(layer);
//! ```

use std::fmt;
use std::future::{Future, Ready, ready};

use crate::epoch::Epoch;

/// Why a connection is being torn down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCause {
    /// [`Handle::disconnect`](crate::Handle::disconnect) released it.
    Disconnect,
    /// [`Handle::suspend`](crate::Handle::suspend) released it.
    Suspend,
    /// It failed while installed; a reconnect follows.
    Failed,
    /// The peer ended it normally ([`Handle::report_closed`](crate::Handle::report_closed) or a
    /// [`Monitor`] that completed with `Ok`); what follows is the layer's
    /// [`NormalEnd`](crate::NormalEnd) policy.
    Ended,
    /// Its attempt's epoch went stale before it completed: it was never installed (rule 1).
    Stale,
    /// No request held it for the idle timeout; the next request reconnects.
    Idle,
    /// Every handle and service is gone; the driver is closing what is open.
    Shutdown,
}

impl fmt::Display for CloseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseCause::Disconnect => "disconnect",
            CloseCause::Suspend => "suspend",
            CloseCause::Failed => "failed",
            CloseCause::Ended => "ended by the peer",
            CloseCause::Stale => "stale",
            CloseCause::Idle => "idle",
            CloseCause::Shutdown => "shutdown",
        })
    }
}

/// Closes a connection of type `C`.
///
/// Implemented for `FnMut(C, CloseCause) -> impl Future<Output = ()>` closures.
pub trait Teardown<C> {
    /// The close in progress.
    type Future: Future<Output = ()>;

    /// Starts closing `conn`. The returned future owns the connection; dropping it (as the
    /// close timeout does) must release the connection.
    fn teardown(&mut self, conn: C, cause: CloseCause) -> Self::Future;
}

impl<C, F, Fut> Teardown<C> for F
where
    F: FnMut(C, CloseCause) -> Fut,
    Fut: Future<Output = ()>,
{
    type Future = Fut;

    fn teardown(&mut self, conn: C, cause: CloseCause) -> Fut {
        self(conn, cause)
    }
}

/// The default teardown: drops the connection.
///
/// Only the middleware's copy is dropped: [`Reconnect`](crate::Reconnect) clones keep theirs
/// until their next `poll_ready` or their drop. For a connection that is a cloneable handle to
/// a task (hyper's `SendRequest`, a channel to a socket owner), close it explicitly in a
/// teardown of your own (see [the module docs](self#what-disconnectawait-promises)).
#[derive(Clone, Copy, Debug, Default)]
pub struct DropTeardown;

impl<C> Teardown<C> for DropTeardown {
    type Future = Ready<()>;

    fn teardown(&mut self, conn: C, _cause: CloseCause) -> Ready<()> {
        drop(conn);
        ready(())
    }
}

/// Watches an installed connection and completes when it ends, so that a dead connection is
/// noticed without waiting for the next request.
///
/// The driver starts `monitor` for each connection it installs, with that connection's epoch,
/// and drops the future when the connection is released: a transport can run its per-connection
/// work (reading, heartbeats) in it and tag what it produces with the epoch. If the future
/// completes while its connection is still installed:
/// `Err` is a failure of that connection (rule 3 applies: a reconnect follows), `Ok(())` means
/// the peer ended it normally: the connection is released, and the layer's
/// [`NormalEnd`](crate::NormalEnd) policy decides what follows (by default nothing, as after a
/// WebSocket close with code 1000; [`NormalEnd::Reconnect`](crate::NormalEnd::Reconnect) for
/// an HTTP/2 GOAWAY). A monitor that panics is a failure of its connection. Implemented for
/// `FnMut(&C, Epoch) -> impl Future` closures:
///
/// ```
/// use tower_epoch::{BoxError, Epoch, ReconnectLayer};
///
/// # #[derive(Clone)] struct Conn;
/// # impl Conn { async fn closed(&self) -> Result<(), BoxError> { Ok(()) } }
/// let layer = ReconnectLayer::new("127.0.0.1:7000").with_monitor(|conn: &Conn, _: Epoch| {
///     let conn = conn.clone();
///     async move { conn.closed().await }
/// });
/// # drop(layer);
/// ```
pub trait Monitor<C> {
    /// The watch in progress.
    type Future: Future<Output = Result<(), crate::BoxError>>;

    /// Starts watching `conn`, installed at `epoch`.
    ///
    /// The driver calls it with no lock held, just before it installs the connection, for an
    /// attempt still current. If a disconnect makes the attempt stale in between, the
    /// connection is discarded and the future dropped without being polled: do the
    /// connection's work in the future, not here. A panic here is a failure of the
    /// connection.
    fn monitor(&mut self, conn: &C, epoch: Epoch) -> Self::Future;
}

impl<C, F, Fut> Monitor<C> for F
where
    F: FnMut(&C, Epoch) -> Fut,
    Fut: Future<Output = Result<(), crate::BoxError>>,
{
    type Future = Fut;

    fn monitor(&mut self, conn: &C, epoch: Epoch) -> Fut {
        self(conn, epoch)
    }
}

/// The default monitor: watches nothing (failures are found by the request path or reported
/// with [`Handle::report_failure`](crate::Handle::report_failure)).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMonitor;

impl<C> Monitor<C> for NoMonitor {
    type Future = std::future::Pending<Result<(), crate::BoxError>>;

    fn monitor(&mut self, _: &C, _: Epoch) -> Self::Future {
        std::future::pending()
    }
}

#[cfg(test)]
mod tests {
    use super::CloseCause::*;

    #[test]
    fn each_cause_says_what_it_is() {
        let said: Vec<String> = [Disconnect, Suspend, Failed, Ended, Stale, Shutdown]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            said,
            [
                "disconnect",
                "suspend",
                "failed",
                "ended by the peer",
                "stale",
                "shutdown"
            ]
        );
    }
}
