//! The [`Reconnect`] service: the request path over the installed connection.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::activity::{Activity, Hold};
use crate::core::{Checkout, Core};
use crate::epoch::Epoch;
use crate::error::{BoxError, Error};
use crate::handle::Handle;

use super::future::{Classify, ClassifyCtx, Extra, ResponseFuture};

/// A predicate that classifies a response error as a failure of the connection.
pub(crate) type IsFailure =
    Arc<dyn Fn(&(dyn std::error::Error + Send + Sync + 'static)) -> bool + Send + Sync>;

/// What [`Reconnect::poll_ready`] does while no connection is installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenDisconnected {
    /// Stay `Pending` until a connection is installed (the default): requests wait across a
    /// reconnect or a suspend/resume. Bound the wait: tower's `Timeout` does not bound
    /// `poll_ready`, so put a `Buffer` between it and this layer, or wrap `ready()` in
    /// `tokio::time::timeout` (see [the crate docs](crate#where-the-layer-sits-in-a-stack)).
    #[default]
    Wait,
    /// Fail at once with [`Error::NotConnected`].
    FailFast,
}

/// The request path of a managed connection: a cheap-to-clone `Service<Req>` that forwards to
/// the installed connection.
///
/// # Readiness and errors
///
/// - While a connection is installed, `poll_ready` forwards to it. The check that it is still
///   the installed one is a single atomic load.
/// - While connecting, waiting to retry, disconnecting or idle, `poll_ready` is `Pending` (the
///   task is woken when a connection is installed; there is no busy loop), or fails with
///   [`Error::NotConnected`] under [`WhenDisconnected::FailFast`].
/// - A failed `poll_ready` of the connection is a failure report for its epoch: the connection
///   is released to teardown, a reconnect is scheduled, and `poll_ready` goes on waiting. The
///   error is not returned: `poll_ready` fails only for terminal conditions,
///   [`Error::GaveUp`], [`Error::Refused`] and [`Error::Shutdown`].
/// - `call` forwards to the connection whose readiness was reserved by `poll_ready`. Calling it
///   without a successful `poll_ready` first breaks tower's contract: it panics if no
///   connection was ever cached, and in debug builds always; in release builds it goes to the
///   cached connection, as tower's own `Reconnect` does. A clone starts un-ready.
/// - Response errors pass through boxed, unless a failure predicate
///   ([`ReconnectLayer::with_failure_predicate`](crate::ReconnectLayer::with_failure_predicate))
///   classifies them as connection failures.
///
/// A request admitted just before a `disconnect` completes on the connection it reserved, which
/// is then closing: teardown should drain (see [`crate::teardown`]).
pub struct Reconnect<C> {
    handle: Handle,
    conn: Option<Cached<C>>,
    reserved: Reservation,
    waiter: u64,
    registered: bool,
    when_disconnected: WhenDisconnected,
    classify: Option<Arc<ClassifyCtx>>,
}

/// The connection a service checked out, with its hold while the service reserved it (with
/// an idle timeout: dropping the cached connection releases the hold).
struct Cached<C> {
    epoch: Epoch,
    conn: C,
    activity: Option<Arc<Activity>>,
    hold: Option<Hold>,
}

impl<C> Cached<C> {
    /// Holds the connection for the request being reserved; false if the idle timeout
    /// claimed it (it is about to be released: do not use it).
    fn hold(&mut self) -> bool {
        match &self.activity {
            Some(activity) if self.hold.is_none() => {
                self.hold = activity.hold();
                self.hold.is_some()
            }
            _ => true,
        }
    }
}

impl<C: Clone> Clone for Cached<C> {
    /// A clone holds nothing: it starts un-ready.
    fn clone(&self) -> Self {
        Cached {
            epoch: self.epoch,
            conn: self.conn.clone(),
            activity: self.activity.clone(),
            hold: None,
        }
    }
}

impl<C> Reconnect<C> {
    /// The epoch and the connection this service last checked out, if it is still installed.
    pub(crate) fn installed(&self) -> Option<(Epoch, &C)> {
        let cached = self.conn.as_ref()?;
        self.core()
            .is_installed(cached.epoch)
            .then_some((cached.epoch, &cached.conn))
    }

    pub(crate) fn new(
        core: Arc<Core>,
        when_disconnected: WhenDisconnected,
        is_failure: Option<IsFailure>,
    ) -> Self {
        let classify = is_failure.map(|is_failure| {
            Arc::new(ClassifyCtx {
                core: Arc::clone(&core),
                is_failure,
            })
        });
        Reconnect {
            waiter: core.next_waiter_id(),
            handle: Handle::new(core),
            conn: None,
            reserved: Reservation::default(),
            registered: false,
            when_disconnected,
            classify,
        }
    }

    /// The handle that controls this connection.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    pub(crate) fn handle_ref(&self) -> &Handle {
        &self.handle
    }

    /// Drops the cached connection (and its hold): the next `poll_ready` checks one out.
    pub(crate) fn forget(&mut self) {
        self.conn = None;
        self.reserved = Reservation::default();
    }

    fn core(&self) -> &Arc<Core> {
        self.handle.core()
    }

    fn wait(&mut self, cx: &mut Context<'_>) {
        self.handle.core().register_waiter(self.waiter, cx);
        self.registered = true;
    }
}

impl<C, Req> Service<Req> for Reconnect<C>
where
    C: Service<Req> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = ResponseFuture<C::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The fast path, small enough to inline into the caller: the cached connection is still
        // the installed one (one atomic load), takes no hold (no idle timeout) and is ready.
        // Everything else is out of line.
        if let Some(cached) = &mut self.conn {
            if self.handle.core().is_installed(cached.epoch) && cached.activity.is_none() {
                let polled = cached.conn.poll_ready(cx);
                if let Poll::Ready(Ok(())) = polled {
                    self.reserved.reserve();
                    return Poll::Ready(Ok(()));
                }
                return poll_ready_slow::<C, Req>(self, cx, Some(polled));
            }
        }
        poll_ready_slow::<C, Req>(self, cx, None)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        // Readiness is only ever reserved on a cached connection.
        let cached = match (self.reserved.consume(), self.conn.as_mut()) {
            (true, Some(reserved)) => reserved,
            _ => not_ready(),
        };
        let extra = if self.classify.is_none() && cached.activity.is_none() {
            None
        } else {
            // The response future holds the connection from here.
            Some(extra(
                cached.epoch,
                self.classify.as_ref(),
                cached.hold.take(),
            ))
        };
        ResponseFuture::new(cached.conn.call(req), extra)
    }
}

/// Whether `poll_ready` reserved readiness for the next `call`.
///
/// Tracked in debug builds only. In release builds `call` checks only that a connection is
/// cached, as tower's own `Reconnect` does: a call without readiness goes to the cached
/// connection, whose own readiness contract then applies. A flag written by every `poll_ready`
/// and cleared by every `call` costs 0.3 ns of the 1.1 ns the middleware adds per request
/// (`cargo bench --bench request_path`), which is the difference between 1.43x and 1.62x of
/// the bare service.
#[derive(Clone, Copy, Debug, Default)]
struct Reservation {
    #[cfg(debug_assertions)]
    ready: bool,
}

impl Reservation {
    #[inline(always)]
    fn reserve(&mut self) {
        #[cfg(debug_assertions)]
        {
            self.ready = true;
        }
    }

    /// Whether the call may go ahead (always, in release builds).
    #[inline(always)]
    fn consume(&mut self) -> bool {
        #[cfg(debug_assertions)]
        {
            std::mem::take(&mut self.ready)
        }
        #[cfg(not(debug_assertions))]
        {
            true
        }
    }
}

/// What a response future carries with a failure predicate or an idle timeout.
#[cold]
#[inline(never)]
fn extra(epoch: Epoch, classify: Option<&Arc<ClassifyCtx>>, hold: Option<Hold>) -> Box<Extra> {
    let classify = classify.map(|ctx| Classify {
        epoch,
        ctx: Arc::clone(ctx),
    });
    Box::new(Extra {
        classify,
        _hold: hold,
    })
}

#[cold]
#[inline(never)]
fn not_ready() -> ! {
    panic!(
        "Reconnect::call without readiness: poll_ready must return Ready(Ok(())) before each call"
    )
}

/// Everything but the fast path of `poll_ready`: failures, waiting, checking out a connection.
/// `polled` is the cached connection's readiness when the fast path already polled it.
#[cold]
#[inline(never)]
fn poll_ready_slow<C, Req>(
    this: &mut Reconnect<C>,
    cx: &mut Context<'_>,
    mut polled: Option<Poll<Result<(), C::Error>>>,
) -> Poll<Result<(), BoxError>>
where
    C: Service<Req> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
{
    loop {
        if let Some(cached) = &mut this.conn {
            let epoch = cached.epoch;
            if this.handle.core().is_installed(epoch) && cached.hold() {
                match polled.take().unwrap_or_else(|| cached.conn.poll_ready(cx)) {
                    Poll::Ready(Ok(())) => {
                        this.reserved.reserve();
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Err(error)) => {
                        this.core()
                            .report_failure(epoch, Error::connection_failed(error));
                    }
                    Poll::Pending => {
                        // Also wake on a release, so the task is not left waiting on a
                        // connection that is no longer installed.
                        this.wait(cx);
                        // The release may have happened before we registered.
                        if this.handle.core().is_installed(epoch) {
                            return Poll::Pending;
                        }
                    }
                }
            }
            this.conn = None;
        }
        let fail_fast = this.when_disconnected == WhenDisconnected::FailFast;
        // Waiting services register before they look (so that the drop forgets them).
        this.registered |= !fail_fast;
        match this.core().checkout::<C>(this.waiter, cx, fail_fast)? {
            Checkout::Installed(epoch, conn, activity) => {
                this.conn = Some(Cached {
                    epoch,
                    conn,
                    activity,
                    hold: None,
                })
            }
            Checkout::Wait => return Poll::Pending,
        }
    }
}

impl<C: Clone> Clone for Reconnect<C> {
    /// A clone shares the managed connection but starts un-ready.
    fn clone(&self) -> Self {
        Reconnect {
            waiter: self.core().next_waiter_id(),
            handle: self.handle.clone(),
            conn: self.conn.clone(),
            reserved: Reservation::default(),
            registered: false,
            when_disconnected: self.when_disconnected,
            classify: self.classify.clone(),
        }
    }
}

impl<C> Drop for Reconnect<C> {
    fn drop(&mut self) {
        if self.registered {
            self.core().forget_waiter(self.waiter);
        }
    }
}

impl<C> fmt::Debug for Reconnect<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconnect")
            .field("epoch", &self.conn.as_ref().map(|cached| cached.epoch))
            .field("reserved", &self.reserved)
            .field("when_disconnected", &self.when_disconnected)
            .finish_non_exhaustive()
    }
}
