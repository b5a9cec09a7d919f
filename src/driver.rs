//! The [`Driver`]: the background task that performs the lifecycle's I/O.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tokio::time::{Sleep, sleep, timeout};
use tower_service::Service;

use crate::backoff::Timer;
use crate::core::{AnyConn, Core, Effect, downcast};
use crate::epoch::Epoch;
use crate::error::{BoxError, Error, SharedError};
use crate::teardown::{Monitor, Teardown};

/// The lifecycle work of one managed connection, as a future.
///
/// It calls the connector, installs or discards what it returns, runs teardowns (bounded by the
/// close timeout), and waits out backoff and stable-period timers. It runs until every
/// [`Handle`](crate::Handle) and [`Reconnect`](crate::Reconnect) clone is dropped; then it
/// closes what is open and completes.
///
/// [`ReconnectLayer`](crate::ReconnectLayer) spawns it on tokio. To run it on another executor,
/// build with [`ReconnectLayer::build`](crate::ReconnectLayer::build) and spawn it yourself; its
/// timers are tokio's, so it must be polled where a tokio time driver is reachable (inside a
/// runtime, or with [`tokio::runtime::Handle::enter`]).
///
/// If the driver is dropped before it completes, the connection becomes
/// [`State::Shutdown`](crate::State::Shutdown): services fail with
/// [`Error::Shutdown`](crate::Error::Shutdown) and whatever was open is dropped.
#[must_use = "the driver does nothing unless polled or spawned"]
pub struct Driver {
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
    // Dropped after `inner`: marks the connection shut down however the driver ends
    // (completion, drop before or while running, panic).
    _stop: StopGuard,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

/// Time bounds the driver applies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) close: Duration,
    pub(crate) stable: Duration,
}

pub(crate) struct Parts<M, T, D, W> {
    pub(crate) core: Arc<Core>,
    pub(crate) make: M,
    pub(crate) target: Arc<dyn Fn() -> T + Send + Sync>,
    pub(crate) teardown: D,
    pub(crate) monitor: W,
    pub(crate) timeouts: Timeouts,
}

impl Driver {
    pub(crate) fn new<M, T, D, W>(parts: Parts<M, T, D, W>) -> Driver
    where
        M: Service<T> + Send + 'static,
        M::Response: Send + 'static,
        M::Error: Into<BoxError>,
        M::Future: Send + 'static,
        T: 'static,
        D: Teardown<M::Response> + Send + 'static,
        D::Future: Send + 'static,
        W: Monitor<M::Response> + Send + 'static,
        W::Future: Send + 'static,
    {
        Driver {
            _stop: StopGuard(Arc::clone(&parts.core)),
            inner: Box::pin(run(parts)),
        }
    }
}

/// Marks the connection shut down when dropped.
struct StopGuard(Arc<Core>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.stopped();
    }
}

type Boxed<O> = Pin<Box<dyn Future<Output = O> + Send>>;
/// An attempt's epoch and what it produced.
type AttemptOutcome<C> = (Epoch, Result<C, Error>);
/// A teardown's connection epoch, whether it was cut at the close timeout, and its waiter.
type CloseOutcome = (Epoch, bool, Option<oneshot::Sender<()>>);

async fn run<M, T, D, W>(parts: Parts<M, T, D, W>)
where
    M: Service<T> + Send + 'static,
    M::Response: Send + 'static,
    M::Error: Into<BoxError>,
    M::Future: Send + 'static,
    T: 'static,
    D: Teardown<M::Response> + Send + 'static,
    D::Future: Send + 'static,
    W: Monitor<M::Response> + Send + 'static,
    W::Future: Send + 'static,
{
    let Parts {
        core,
        mut make,
        target,
        mut teardown,
        mut monitor,
        timeouts,
    } = parts;
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        core.set_runtime(runtime);
    }

    let mut attempts: FuturesUnordered<Boxed<AttemptOutcome<M::Response>>> =
        FuturesUnordered::new();
    let mut closes: FuturesUnordered<Boxed<CloseOutcome>> = FuturesUnordered::new();
    // The watch over the installed connection (there is at most one).
    let mut watching: Option<(Epoch, Boxed<Result<(), BoxError>>)> = None;
    // The attempt waiting for the connector to be ready; a newer one replaces it.
    let mut queued: Option<Epoch> = None;
    // A newer timer always belongs to a newer epoch, so one slot each is enough.
    let mut retry: Option<(Epoch, Timer)> = None;
    let mut stable: Option<(Epoch, Pin<Box<Sleep>>)> = None;
    let mut shutting_down = false;

    loop {
        for effect in core.take_effects() {
            match effect {
                Effect::Close {
                    epoch,
                    conn,
                    cause,
                    done,
                } => {
                    if watching.as_ref().is_some_and(|(e, _)| *e == epoch) {
                        watching = None;
                    }
                    let close = teardown.teardown(downcast::<M::Response>(conn), cause);
                    let bound = timeouts.close;
                    closes.push(Box::pin(async move {
                        let timed_out = timeout(bound, close).await.is_err();
                        (epoch, timed_out, done)
                    }));
                }
                _ if shutting_down => {}
                Effect::Attempt { epoch } => queued = Some(epoch),
                Effect::Retry { epoch, timer } => retry = Some((epoch, timer)),
                Effect::Stable { epoch } => {
                    stable = Some((epoch, Box::pin(sleep(timeouts.stable))));
                }
            }
        }

        if !shutting_down && core.users() == 0 {
            tracing::debug!(epoch = %core.clock.now(), "every handle and service dropped; shutting down");
            shutting_down = true;
            queued = None;
            retry = None;
            stable = None;
            watching = None;
            // Dropping an attempt cancels it before it produced a connection.
            attempts = FuturesUnordered::new();
            core.begin_shutdown();
            continue;
        }
        if shutting_down && closes.is_empty() {
            return;
        }

        tokio::select! {
            biased;
            Some((epoch, outcome)) = attempts.next(), if !attempts.is_empty() => {
                // Only for a connection about to be installed (its epoch still current).
                let watch = match &outcome {
                    Ok(conn) if core.clock.is_current(epoch) => Some(monitor.monitor(conn, epoch)),
                    _ => None,
                };
                let outcome = outcome.map(|conn| Box::new(conn) as AnyConn);
                if core.attempt_done(epoch, outcome) {
                    watching = watch.map(|w| (epoch, Box::pin(w) as Boxed<_>));
                }
            }
            Some((epoch, timed_out, done)) = closes.next(), if !closes.is_empty() => {
                core.teardown_done(epoch, timed_out);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            ready = poll_fn(|cx| make.poll_ready(cx)), if queued.is_some() => {
                let epoch = queued.take().expect("guarded by the branch condition");
                if core.attempt_started(epoch) {
                    match ready {
                        Ok(()) => {
                            let connecting = make.call(target());
                            let bound = timeouts.connect;
                            attempts.push(Box::pin(async move {
                                let outcome = match timeout(bound, connecting).await {
                                    Ok(Ok(conn)) => Ok(conn),
                                    Ok(Err(error)) => Err(Error::Connect(shared(error))),
                                    Err(_) => Err(Error::ConnectTimeout(bound)),
                                };
                                (epoch, outcome)
                            }));
                        }
                        Err(error) => {
                            core.attempt_done(epoch, Err(Error::Connect(shared(error))));
                        }
                    }
                }
            }
            () = async { retry.as_mut().expect("guarded").1.as_mut().await }, if retry.is_some() => {
                let (epoch, _) = retry.take().expect("guarded by the branch condition");
                core.timer_fired(epoch);
            }
            () = async { stable.as_mut().expect("guarded").1.as_mut().await }, if stable.is_some() => {
                let (epoch, _) = stable.take().expect("guarded by the branch condition");
                core.stable(epoch);
            }
            ended = async { watching.as_mut().expect("guarded").1.as_mut().await }, if watching.is_some() => {
                let (epoch, _) = watching.take().expect("guarded by the branch condition");
                match ended {
                    Ok(()) => core.report_closed(epoch),
                    Err(error) => core.report_failure(epoch, Error::connection_failed(error)),
                };
            }
            () = core.driver_notified() => {}
        }
    }
}

fn shared(error: impl Into<BoxError>) -> SharedError {
    SharedError::from(error.into())
}
