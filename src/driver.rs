//! The [`Driver`]: the background task that performs the lifecycle's I/O.
//!
//! It carries out the work the core queues (attempts, teardowns, monitors, timers) and reports
//! each outcome back to the core. Every piece of user code it runs (the connector's readiness,
//! its call and its future, the target function, the teardown, the monitor, the backoff, the
//! permanent-error predicate) runs outside any lock and under `catch_unwind`: a panic is a
//! failure of that attempt or connection ([`Error::Panicked`]), and the driver goes on.

use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep, sleep, sleep_until, timeout, timeout_at};
use tower_service::Service;

use crate::backoff::{Retry, Timer};
use crate::core::{AnyConn, Core, Work, downcast};
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
/// [`Error::Shutdown`](crate::Error::Shutdown), whatever was open is dropped, and the ledger
/// counts it closed.
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
    pub(crate) idle: Option<Duration>,
}

pub(crate) struct Parts<M, T, D, W> {
    pub(crate) core: Arc<Core>,
    pub(crate) make: M,
    pub(crate) target: Arc<dyn Fn() -> T + Send + Sync>,
    pub(crate) teardown: D,
    pub(crate) monitor: W,
    pub(crate) retry: Box<dyn Retry>,
    pub(crate) timeouts: Timeouts,
}

/// The bounds a driver needs of the connector, the teardown and the monitor.
pub(crate) trait Parted<T>:
    Service<T, Response: Send + 'static, Error: Into<BoxError>, Future: Send + 'static> + Send + 'static
{
}

impl<M, T> Parted<T> for M where
    M: Service<T, Response: Send + 'static, Error: Into<BoxError>, Future: Send + 'static>
        + Send
        + 'static
{
}

impl Driver {
    pub(crate) fn new<M, T, D, W>(parts: Parts<M, T, D, W>) -> Driver
    where
        M: Parted<T>,
        T: 'static,
        D: Teardown<M::Response, Future: Send + 'static> + Send + 'static,
        W: Monitor<M::Response, Future: Send + 'static> + Send + 'static,
    {
        // Taken apart before the loop's future is made, so that the future holds each part
        // once, not also the `Parts` it came in (104 bytes per managed connection).
        let Parts {
            core,
            make,
            target,
            teardown,
            monitor,
            retry,
            timeouts,
        } = parts;
        Driver {
            _stop: StopGuard(Arc::clone(&core)),
            inner: Box::pin(run_loop(
                core, make, target, teardown, monitor, retry, timeouts,
            )),
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

/// An attempt in flight: its epoch and the connector's future, bounded by the connect timeout.
type Attempting<C> = (Epoch, Boxed<Result<C, Error>>);

/// What a teardown reports: the epoch, whether it was cut at the close timeout, and the
/// `disconnect()` waiting for it.
type Closed = (Epoch, bool, Option<oneshot::Sender<()>>);

/// Attempts kept in flight at most: the current one and a few stale ones, which may still
/// produce a connection to close (rule 1). Older stale ones are dropped, so that a storm of
/// toggles with a slow connector holds bounded memory.
const IN_FLIGHT: usize = 4;

/// The timer a panicking backoff is replaced with.
const BACKOFF_FALLBACK: Duration = Duration::from_secs(1);

/// What a panic says, for the error that reports it.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}

fn panicked(what: &'static str, panic: &(dyn std::any::Any + Send)) -> Error {
    let message = panic_message(panic);
    tracing::warn!(what, %message, "user code panicked");
    Error::Panicked { what, message }
}

fn shared(error: impl Into<BoxError>) -> SharedError {
    SharedError::from(error.into())
}

/// The driver's loop.
#[allow(clippy::too_many_arguments)]
async fn run_loop<M, T, D, W>(
    core: Arc<Core>,
    mut make: M,
    target: Arc<dyn Fn() -> T + Send + Sync>,
    mut teardown: D,
    mut monitor: W,
    mut retry: Box<dyn Retry>,
    timeouts: Timeouts,
) where
    M: Parted<T>,
    T: 'static,
    D: Teardown<M::Response, Future: Send + 'static> + Send + 'static,
    W: Monitor<M::Response, Future: Send + 'static> + Send + 'static,
{
    let mut attempts: Vec<Attempting<M::Response>> = Vec::new();
    // Made at the first teardown and dropped when none is left, so that an idle connection
    // holds no queue (144 bytes).
    let mut closes: Option<FuturesUnordered<Boxed<Closed>>> = None;
    // The monitor of the installed connection (there is at most one).
    let mut watching: Option<(Epoch, Boxed<Result<(), Error>>)> = None;
    // The attempt waiting for the connector to be ready, with its deadline.
    let mut queued: Option<(Epoch, Pin<Box<Sleep>>)> = None;
    // A newer timer always belongs to a newer epoch, so one slot each is enough.
    let mut backoff: Option<(Epoch, Timer)> = None;
    let mut stable: Option<(Epoch, Pin<Box<Sleep>>)> = None;
    // The idle timer of the installed connection, with an idle timeout.
    let mut idle: Option<(Epoch, Pin<Box<Sleep>>)> = None;
    let mut stopping = false;

    loop {
        // A connector and a monitor that complete at once must not turn this loop into one
        // that never yields.
        tokio::task::consume_budget().await;
        for work in core.take_work() {
            match work {
                Work::Close {
                    epoch,
                    conn,
                    cause,
                    done,
                } => {
                    if watching.as_ref().is_some_and(|(e, _)| *e == epoch) {
                        watching = None;
                    }
                    if idle.as_ref().is_some_and(|(e, _)| *e == epoch) {
                        idle = None;
                    }
                    let conn = downcast::<M::Response>(conn);
                    let close = catch_unwind(AssertUnwindSafe(|| teardown.teardown(conn, cause)));
                    let bound = timeouts.close;
                    closes
                        .get_or_insert_with(FuturesUnordered::new)
                        .push(Box::pin(async move {
                            let timed_out = match close {
                                Ok(close) => {
                                    let closed = AssertUnwindSafe(close).catch_unwind();
                                    match timeout(bound, closed).await {
                                        Ok(Ok(())) => false,
                                        // The connection went with the unwinding: closed.
                                        Ok(Err(panic)) => {
                                            panicked("teardown", &*panic);
                                            false
                                        }
                                        Err(_) => true,
                                    }
                                }
                                Err(panic) => {
                                    panicked("teardown", &*panic);
                                    false
                                }
                            };
                            (epoch, timed_out, done)
                        }));
                }
                Work::Stop => {
                    stopping = true;
                    queued = None;
                    backoff = None;
                    stable = None;
                    watching = None;
                    idle = None;
                    // Dropping an attempt cancels it before it produced a connection.
                    for (epoch, _) in attempts.drain(..) {
                        core.attempt_cancelled(epoch);
                    }
                }
                Work::Attempt(epoch) => {
                    // The connect timeout runs from now: readiness and call alike.
                    let deadline = Instant::now() + timeouts.connect;
                    queued = Some((epoch, Box::pin(sleep_until(deadline))));
                }
                Work::Retry(epoch) => {
                    let (timer, delay) = match catch_unwind(AssertUnwindSafe(|| retry.next())) {
                        Ok(next) => next,
                        Err(panic) => {
                            panicked("backoff", &*panic);
                            retry.reset();
                            (
                                Box::pin(sleep(BACKOFF_FALLBACK)) as Timer,
                                Some(BACKOFF_FALLBACK),
                            )
                        }
                    };
                    // A timer that panics when polled fires at once.
                    let timer: Timer =
                        Box::pin(AssertUnwindSafe(timer).catch_unwind().map(|fired| {
                            if let Err(panic) = fired {
                                panicked("backoff", &*panic);
                            }
                        }));
                    backoff = Some((epoch, timer));
                    core.retry_armed(epoch, delay);
                }
                Work::ResetBackoff => retry.reset(),
                Work::Stable(epoch) => {
                    stable = Some((epoch, Box::pin(sleep(timeouts.stable))));
                }
            }
        }

        if !stopping && core.users() == 0 {
            tracing::debug!(epoch = %core.clock.now(), "every handle and service dropped; shutting down");
            core.begin_shutdown();
            continue;
        }
        if closes.as_ref().is_some_and(FuturesUnordered::is_empty) {
            closes = None;
        }
        if attempts.is_empty() {
            // An idle connection holds no attempt buffer (96 bytes).
            attempts = Vec::new();
        }
        if stopping && closes.is_none() {
            return;
        }

        tokio::select! {
            biased;
            (epoch, outcome) = poll_fn(|cx| poll_attempts(&mut attempts, cx)), if !attempts.is_empty() => {
                match outcome {
                    Ok(conn) => {
                        // The monitor is made while the driver still owns the connection, with
                        // no lock held, and only for an attempt still current: one that went
                        // stale is discarded (rule 1) unwatched.
                        let watch = core
                            .clock
                            .is_current(epoch)
                            .then(|| start_monitor(&mut monitor, &conn, epoch));
                        if core.opened(epoch, Box::new(conn) as AnyConn) {
                            watching = watch.map(|watch| (epoch, watch));
                            idle = timeouts.idle.map(|after| (epoch, Box::pin(sleep(after))));
                        }
                    }
                    Err(error) => core.attempt_failed(epoch, error),
                }
            }
            Some((epoch, timed_out, done)) = async { closes.as_mut().expect("guarded").next().await }, if closes.is_some() => {
                core.closed(epoch, timed_out);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            ready = poll_fn(|cx| poll_connector(&mut make, &mut queued, timeouts.connect, cx)), if queued.is_some() => {
                let (epoch, deadline) = queued.take().expect("guarded by the branch condition");
                match ready {
                    Ok(()) if core.attempt_starting(epoch) => {
                        let called = catch_unwind(AssertUnwindSafe(|| make.call(target())));
                        let connecting: Boxed<Result<M::Response, Error>> = match called {
                            Ok(connecting) => {
                                let deadline = deadline.deadline();
                                let bound = timeouts.connect;
                                Box::pin(async move {
                                    match timeout_at(deadline, AssertUnwindSafe(connecting).catch_unwind()).await {
                                        Ok(Ok(Ok(conn))) => Ok(conn),
                                        Ok(Ok(Err(error))) => Err(Error::Connect(shared(error))),
                                        Ok(Err(panic)) => Err(panicked("connector", &*panic)),
                                        Err(_) => Err(Error::ConnectTimeout(bound)),
                                    }
                                })
                            }
                            Err(panic) => {
                                let error = panicked("connector", &*panic);
                                Box::pin(std::future::ready(Err(error)))
                            }
                        };
                        if attempts.len() >= IN_FLIGHT {
                            // The oldest is stale: only the newest attempt can be current.
                            let (stale, _) = attempts.remove(0);
                            core.attempt_cancelled(stale);
                        }
                        attempts.push((epoch, connecting));
                    }
                    // Went stale while it waited for readiness: nothing was started.
                    Ok(()) => {}
                    Err(error) => {
                        // Readiness is the attempt's too: it fails (or times out) as one.
                        if core.attempt_starting(epoch) {
                            core.attempt_failed(epoch, error);
                        }
                    }
                }
            }
            () = async { backoff.as_mut().expect("guarded").1.as_mut().await }, if backoff.is_some() => {
                let (epoch, _) = backoff.take().expect("guarded by the branch condition");
                core.timer_fired(epoch);
            }
            () = async { stable.as_mut().expect("guarded").1.as_mut().await }, if stable.is_some() => {
                let (epoch, _) = stable.take().expect("guarded by the branch condition");
                core.stable(epoch);
            }
            () = async { idle.as_mut().expect("guarded").1.as_mut().await }, if idle.is_some() => {
                let (epoch, mut timer) = idle.take().expect("guarded by the branch condition");
                if core.idle_expired(epoch) {
                    let after = timeouts.idle.expect("armed only with an idle timeout");
                    timer.as_mut().reset(Instant::now() + after);
                    idle = Some((epoch, timer));
                }
            }
            ended = async { watching.as_mut().expect("guarded").1.as_mut().await }, if watching.is_some() => {
                let (epoch, _) = watching.take().expect("guarded by the branch condition");
                match ended {
                    Ok(()) => core.report_ended(epoch),
                    Err(error) => core.report_failure(epoch, error),
                };
            }
            () = core.driver_notified() => {}
        }
    }
}

/// Starts the monitor of `conn`, installed at `epoch`; a panic is a failure of the connection.
fn start_monitor<C, W>(monitor: &mut W, conn: &C, epoch: Epoch) -> Boxed<Result<(), Error>>
where
    W: Monitor<C, Future: Send + 'static>,
{
    match catch_unwind(AssertUnwindSafe(|| monitor.monitor(conn, epoch))) {
        Ok(watch) => Box::pin(
            AssertUnwindSafe(watch)
                .catch_unwind()
                .map(|ended| match ended {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(Error::connection_failed(error)),
                    Err(panic) => Err(panicked("monitor", &*panic)),
                }),
        ),
        Err(panic) => Box::pin(std::future::ready(Err(panicked("monitor", &*panic)))),
    }
}

/// The first attempt in flight to complete, with its epoch.
fn poll_attempts<C>(
    attempts: &mut Vec<Attempting<C>>,
    cx: &mut Context<'_>,
) -> Poll<(Epoch, Result<C, Error>)> {
    for i in 0..attempts.len() {
        if let Poll::Ready(outcome) = attempts[i].1.as_mut().poll(cx) {
            let (epoch, _) = attempts.remove(i);
            return Poll::Ready((epoch, outcome));
        }
    }
    Poll::Pending
}

/// The connector's readiness for the queued attempt, bounded by the attempt's deadline.
fn poll_connector<M: Service<T>, T>(
    make: &mut M,
    queued: &mut Option<(Epoch, Pin<Box<Sleep>>)>,
    bound: Duration,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Error>>
where
    M::Error: Into<BoxError>,
{
    let (_, deadline) = queued.as_mut().expect("polled only with an attempt queued");
    match catch_unwind(AssertUnwindSafe(|| make.poll_ready(cx))) {
        Ok(Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
        Ok(Poll::Ready(Err(error))) => Poll::Ready(Err(Error::Connect(shared(error)))),
        Err(panic) => Poll::Ready(Err(panicked("connector", &*panic))),
        Ok(Poll::Pending) => match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Error::ConnectTimeout(bound))),
            Poll::Pending => Poll::Pending,
        },
    }
}
