//! User code that panics or never becomes ready: each is a failure of its attempt or
//! connection, the driver goes on, every wait is bounded and the books balance.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{Future, pending};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tower::retry::backoff::{Backoff, MakeBackoff};
use tower::{Layer, Service};
use tower_epoch::backoff::Schedule;
use tower_epoch::teardown::CloseCause;
use tower_epoch::{BoxError, Error, Handle, Reconnect, ReconnectLayer, State};
use tower_test::mock::Spawn;

const MS: Duration = Duration::from_millis(1);
const BACKOFF: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

async fn advance(d: Duration) {
    settle().await;
    tokio::time::advance(d).await;
    settle().await;
}

/// A connection; its `Clone` panics while `panic_on_clone` is set.
#[derive(Debug)]
struct Echo {
    id: u32,
    panic_on_clone: Arc<AtomicBool>,
}

impl Clone for Echo {
    fn clone(&self) -> Self {
        assert!(
            !self.panic_on_clone.load(Ordering::SeqCst),
            "a connection whose clone panics"
        );
        Echo {
            id: self.id,
            panic_on_clone: Arc::clone(&self.panic_on_clone),
        }
    }
}

impl Service<u32> for Echo {
    type Response = (u32, u32);
    type Error = Infallible;
    type Future = std::future::Ready<Result<(u32, u32), Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: u32) -> Self::Future {
        std::future::ready(Ok((self.id, req)))
    }
}

/// What the connector does for one attempt.
#[derive(Clone, Copy, Debug)]
enum Step {
    Ok,
    /// Succeeds after this long.
    Slow(Duration),
    /// `poll_ready` panics.
    PanicReady,
    /// `poll_ready` stays pending (and never wakes).
    NeverReady,
    /// `call` panics.
    PanicCall,
    /// The future panics when polled.
    PanicFuture,
}

/// A connector following a script (then `Ok`), counting the futures it made that are alive.
#[derive(Clone, Debug, Default)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Step>>>,
    next: Arc<AtomicU32>,
    live: Arc<AtomicU32>,
    panic_on_clone: Arc<AtomicBool>,
}

impl Scripted {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        let scripted = Scripted::default();
        scripted.script.lock().unwrap().extend(steps);
        scripted
    }

    fn front(&self) -> Step {
        *self.script.lock().unwrap().front().unwrap_or(&Step::Ok)
    }

    fn pop(&self) -> Step {
        self.script.lock().unwrap().pop_front().unwrap_or(Step::Ok)
    }
}

/// Counts the connect futures alive.
struct Live(Arc<AtomicU32>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<()> for Scripted {
    type Response = Echo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Echo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.front() {
            Step::PanicReady => {
                self.pop();
                panic!("a connector whose readiness panics")
            }
            Step::NeverReady => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, (): ()) -> Self::Future {
        let step = self.pop();
        if let Step::PanicCall = step {
            panic!("a connector whose call panics");
        }
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        self.live.fetch_add(1, Ordering::SeqCst);
        let live = Live(Arc::clone(&self.live));
        let panic_on_clone = Arc::clone(&self.panic_on_clone);
        Box::pin(async move {
            let _live = live;
            match step {
                Step::Slow(delay) => tokio::time::sleep(delay).await,
                Step::PanicFuture => panic!("a connector whose future panics"),
                _ => {}
            }
            Ok(Echo { id, panic_on_clone })
        })
    }
}

fn layer() -> ReconnectLayer<(), Schedule> {
    ReconnectLayer::new(())
        .with_backoff(Schedule::new([BACKOFF]).unwrap())
        .with_connect_timeout(CONNECT_TIMEOUT)
}

fn start(connector: &Scripted) -> (Reconnect<Echo>, Handle) {
    let layer = layer();
    (layer.layer(connector.clone()), layer.handle())
}

fn panicked(state: &State) -> Option<&'static str> {
    let State::WaitingToRetry { last_error, .. } = state else {
        return None;
    };
    match last_error.downcast_ref::<Error>()? {
        Error::Panicked { what, .. } => Some(what),
        _ => None,
    }
}

/// A panic in each part of the connector fails that attempt; the next attempt connects.
#[tokio::test(start_paused = true)]
async fn a_panicking_connector_fails_its_attempt_and_the_driver_goes_on() {
    for step in [Step::PanicReady, Step::PanicCall, Step::PanicFuture] {
        let connector = Scripted::new([step]);
        let (_svc, handle) = start(&connector);
        handle.connect().unwrap();
        settle().await;
        let state = handle.state();
        assert_eq!(panicked(&state), Some("connector"), "{step:?}: {state}");
        assert!(
            state.to_string().contains("a connector whose"),
            "the panic's message is kept: {state}"
        );
        assert_eq!(handle.ledger().failures, 1, "{step:?}");
        advance(BACKOFF).await;
        assert!(
            handle.state().is_connected(),
            "{step:?}: {}",
            handle.state()
        );
        let epoch = handle.epoch();
        assert!(
            matches!(handle.connect(), Ok(e) if e == epoch),
            "a no-op: still managed"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_connector_never_ready_times_out_within_the_connect_timeout() {
    let connector = Scripted::new([Step::NeverReady]);
    let (_svc, handle) = start(&connector);
    handle.connect().unwrap();
    advance(CONNECT_TIMEOUT - MS).await;
    assert!(matches!(handle.state(), State::Connecting { .. }));
    advance(MS).await;
    let State::WaitingToRetry { last_error, .. } = handle.state() else {
        panic!("expected a retry, got {}", handle.state());
    };
    assert!(
        matches!(last_error.downcast_ref::<Error>(), Some(Error::ConnectTimeout(t)) if *t == CONNECT_TIMEOUT),
        "{last_error}"
    );
    let ledger = handle.ledger();
    assert_eq!((ledger.attempts, ledger.failures), (1, 1));
    connector.pop();
    advance(BACKOFF).await;
    assert!(handle.state().is_connected());
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_clone_panics_leaves_the_machine_consistent() {
    let connector = Scripted::new([]);
    let (svc, handle) = start(&connector);
    let mut svc = Spawn::new(svc);
    handle.connect().unwrap();
    settle().await;
    connector.panic_on_clone.store(true, Ordering::SeqCst);
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        svc.poll_ready::<u32>().is_ready()
    }));
    assert!(
        polled.is_err(),
        "the panic is the caller's, in the caller's task"
    );
    connector.panic_on_clone.store(false, Ordering::SeqCst);
    // Every operation still works: nothing ran under the machine's lock.
    assert!(handle.state().is_connected());
    handle.disconnect().await;
    assert!(matches!(handle.state(), State::Idle));
    handle.connect().unwrap();
    settle().await;
    assert!(handle.state().is_connected());
    let mut svc = Spawn::new(svc.into_inner());
    assert!(svc.poll_ready::<u32>().is_ready());
}

#[tokio::test(start_paused = true)]
async fn a_panicking_teardown_counts_as_closed() {
    let connector = Scripted::new([]);
    let layer = layer().with_teardown(|_conn: Echo, _cause: CloseCause| async {
        panic!("a teardown that panics")
    });
    let handle = layer.handle();
    let _svc = layer.layer(connector.clone());
    handle.connect().unwrap();
    settle().await;
    handle.disconnect().await;
    let ledger = handle.ledger();
    assert_eq!((ledger.opened, ledger.closed), (1, 1));
    assert!(matches!(handle.state(), State::Idle));
    handle.connect().unwrap();
    settle().await;
    assert!(handle.state().is_connected(), "the driver goes on");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_monitor_is_a_failure_of_its_connection() {
    let connector = Scripted::new([]);
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let layer = layer().with_monitor(move |_: &Echo, _| {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                panic!("a monitor that panics");
            }
            pending::<Result<(), BoxError>>().await
        }
    });
    let handle = layer.handle();
    let _svc = layer.layer(connector.clone());
    let epoch = handle.connect().unwrap();
    settle().await;
    let state = handle.state();
    assert!(
        matches!(state, State::WaitingToRetry { epoch: e, .. } if e == epoch),
        "{state}"
    );
    let State::WaitingToRetry { last_error, .. } = &state else {
        unreachable!()
    };
    let error = last_error.downcast_ref::<Error>();
    assert!(
        matches!(
            error,
            Some(Error::Panicked {
                what: "monitor",
                ..
            })
        ),
        "{error:?}"
    );
    advance(BACKOFF).await;
    assert!(handle.state().is_connected());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A backoff whose `next_backoff` panics at its first call.
#[derive(Clone, Default)]
struct PanickyBackoff(Arc<AtomicU32>);

impl MakeBackoff for PanickyBackoff {
    type Backoff = PanickyBackoff;
    fn make_backoff(&mut self) -> PanickyBackoff {
        self.clone()
    }
}

impl Backoff for PanickyBackoff {
    type Future = tokio::time::Sleep;
    fn next_backoff(&mut self) -> tokio::time::Sleep {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("a backoff that panics");
        }
        tokio::time::sleep(BACKOFF)
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_backoff_falls_back_to_a_one_second_wait() {
    let connector = Scripted::new([Step::PanicFuture, Step::PanicFuture]);
    let backoff = PanickyBackoff::default();
    let layer = layer().with_backoff(backoff.clone());
    let handle = layer.handle();
    let _svc = layer.layer(connector.clone());
    handle.connect().unwrap();
    settle().await;
    assert!(matches!(
        handle.state(),
        State::WaitingToRetry { delay: Some(d), .. } if d == Duration::from_secs(1)
    ));
    advance(Duration::from_secs(1)).await;
    // The second failure waits the backoff's own delay.
    assert!(matches!(
        handle.state(),
        State::WaitingToRetry { delay: Some(d), .. } if d == BACKOFF
    ));
    advance(BACKOFF).await;
    assert!(handle.state().is_connected());
    assert_eq!(backoff.0.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_books_balance_when_the_driver_is_dropped_mid_teardown() {
    let connector = Scripted::new([Step::Ok, Step::Slow(Duration::from_secs(30)), Step::Ok]);
    let layer = layer()
        .with_teardown(|_conn: Echo, _cause: CloseCause| pending::<()>())
        .with_close_timeout(Duration::from_secs(60));
    let handle = layer.handle();
    let (_svc, driver) = layer.build(connector.clone());
    assert_eq!(format!("{driver:?}"), "Driver { .. }");
    let driver = tokio::spawn(driver);
    handle.connect().unwrap();
    settle().await;
    // One teardown hangs, one stale attempt is in flight, one connection is installed.
    drop(handle.disconnect());
    handle.connect().unwrap();
    settle().await;
    drop(handle.disconnect());
    handle.connect().unwrap();
    settle().await;
    assert!(handle.state().is_connected());
    assert_eq!(connector.live.load(Ordering::SeqCst), 1);
    driver.abort();
    settle().await;
    assert!(matches!(handle.state(), State::Shutdown));
    let ledger = handle.ledger();
    assert_eq!(ledger.opened, 2);
    assert_eq!(
        ledger.closed, 2,
        "the hanging teardown and the installed one: closed"
    );
    assert_eq!(
        connector.live.load(Ordering::SeqCst),
        0,
        "the attempt went too"
    );
    handle.disconnect().await;
    assert!(
        matches!(handle.state(), State::Shutdown),
        "a disconnect changes nothing"
    );
    assert!(matches!(handle.connect(), Err(Error::Shutdown)));
}

#[tokio::test(start_paused = true)]
async fn the_monitor_starts_only_for_installed_connections() {
    let connector = Scripted::new([Step::Slow(Duration::from_secs(2)), Step::Ok]);
    let started = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&started);
    let layer = layer()
        .with_connect_timeout(Duration::from_secs(10))
        .with_monitor(move |conn: &Echo, _| {
            seen.lock().unwrap().push(conn.id);
            pending::<Result<(), BoxError>>()
        });
    let handle = layer.handle();
    let _svc = layer.layer(connector.clone());
    handle.connect().unwrap();
    settle().await;
    drop(handle.disconnect());
    handle.connect().unwrap();
    settle().await;
    advance(Duration::from_secs(2)).await;
    let ledger = handle.ledger();
    assert_eq!(
        (ledger.opened, ledger.installed, ledger.discarded),
        (2, 1, 1)
    );
    assert_eq!(
        *started.lock().unwrap(),
        [2],
        "only the installed connection is watched"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_attempts_are_capped_so_toggles_hold_bounded_memory() {
    // Every attempt takes longer than the connect timeout allows.
    let connector = Scripted::new(std::iter::repeat_n(
        Step::Slow(Duration::from_secs(60)),
        1000,
    ));
    let layer = layer().with_connect_timeout(Duration::from_secs(30));
    let handle = layer.handle();
    let _svc = layer.layer(connector.clone());
    for _ in 0..1000 {
        handle.connect().unwrap();
        settle().await; // the driver calls the connector
        drop(handle.disconnect());
    }
    settle().await;
    let ledger = handle.ledger();
    assert!(
        connector.live.load(Ordering::SeqCst) <= 4,
        "{} attempts alive",
        connector.live.load(Ordering::SeqCst)
    );
    assert_eq!(ledger.attempts, 1000);
    assert!(ledger.cancelled >= 996, "{ledger:?}");
    assert_eq!(ledger.opened, 0);
}

/// A monitor that reports on its connection from inside `monitor()` (it finds it dead at once)
/// runs with no lock held: no deadlock. Run on a thread of its own, bounded.
#[test]
fn a_monitor_that_reports_at_once_does_not_deadlock() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let connector = Scripted::new([]);
            let layer = layer();
            let handle = layer.handle();
            let reporter = handle.clone();
            let layer = layer.with_monitor(move |_: &Echo, epoch| {
                // Not installed yet when the monitor is made: ignored (rule 3), but it must
                // not block; the same goes for every other handle call.
                reporter.report_failure(epoch, "dead on arrival");
                let _ = reporter.ledger();
                pending::<Result<(), BoxError>>()
            });
            let _svc = layer.layer(connector.clone());
            handle.connect().unwrap();
            settle().await;
            assert!(handle.state().is_connected(), "{}", handle.state());
            assert_eq!(handle.ledger().ignored, 1);
        });
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(Duration::from_secs(30))
        .expect("no deadlock: the scenario finished");
}

/// A backoff whose timer panics when polled.
#[derive(Clone, Default)]
struct PanickyTimer;

impl MakeBackoff for PanickyTimer {
    type Backoff = PanickyTimer;
    fn make_backoff(&mut self) -> PanickyTimer {
        PanickyTimer
    }
}

impl Backoff for PanickyTimer {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;
    fn next_backoff(&mut self) -> Self::Future {
        Box::pin(async {
            tokio::time::sleep(BACKOFF).await;
            panic!("a backoff timer that panics");
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_backoff_timer_that_panics_fires() {
    let connector = Scripted::new([Step::PanicFuture]);
    let layer = layer().with_backoff(PanickyTimer);
    let handle = layer.handle();
    let _svc = layer.layer(connector.clone());
    handle.connect().unwrap();
    settle().await;
    assert!(matches!(handle.state(), State::WaitingToRetry { .. }));
    advance(BACKOFF).await;
    assert!(handle.state().is_connected(), "{}", handle.state());
}

/// Many threads change the intent at once while the driver works on a multi-thread runtime:
/// the work of each step reaches the driver in the order of the steps, so the last intent
/// always holds in the end (no attempt lost, no timer overwritten).
#[test]
fn concurrent_intents_from_many_threads_end_in_the_last_one() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..20 {
        let connector = Scripted::new((0..400).map(|i| match i % 4 {
            0 => Step::Slow(Duration::from_micros(200)),
            1 => Step::PanicFuture,
            _ => Step::Ok,
        }));
        let layer = ReconnectLayer::new(())
            .with_backoff(Schedule::new([Duration::from_micros(100)]).unwrap())
            .with_connect_timeout(Duration::from_secs(5));
        let handle = {
            let _guard = rt.enter();
            let handle = layer.handle();
            drop(layer.layer(connector.clone()));
            handle
        };
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let handle = handle.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        match (t + i) % 4 {
                            0 => drop(handle.connect()),
                            1 => drop(handle.disconnect()),
                            2 => {
                                if let Some(token) = handle.suspend() {
                                    let _ = handle.resume(token);
                                }
                            }
                            _ => drop(handle.reconnect_now()),
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        handle.connect().unwrap();
        let mut states = handle.subscribe();
        let reached = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                states.wait_for(State::is_connected),
            )
            .await
        });
        assert!(
            matches!(reached, Ok(Ok(_))),
            "round {round}: the last intent (connect) did not hold: {} {:?}",
            handle.state(),
            handle.ledger()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_went_stale_while_the_connector_got_ready_is_not_made() {
    let (connector, mut control) = tower_test::mock::pair::<(), Echo>();
    control.allow(0);
    let layer = layer();
    let handle = layer.handle();
    let _svc = layer.layer(connector);
    handle.connect().unwrap();
    settle().await; // the driver waits for the connector's readiness
    drop(handle.disconnect());
    control.allow(1);
    settle().await;
    assert_eq!(handle.ledger().attempts, 0, "the connector was not called");
    let called = tokio::time::timeout(Duration::from_secs(1), control.next_request()).await;
    assert!(called.is_err(), "no request reached the connector");
}
