//! The policies a transport chooses on the generic layer (what a normal end means, permanent
//! errors, skipping a backoff wait), the waiters of the request path, the driver's lifetime and
//! what `disconnect()` promises about the connection.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::*;
use tower::Service;
use tower_epoch::teardown::{CloseCause, DropTeardown};
use tower_epoch::{Error, NormalEnd, ReconnectLayer, State, backoff::Schedule};
use tower_test::mock::Spawn;

fn monitored(
    ledger: &Ledger,
    normal_end: NormalEnd,
) -> (tower_epoch::Reconnect<Conn>, tower_epoch::Handle) {
    start(
        ledger,
        layer(ledger)
            .on_normal_end(normal_end)
            .with_monitor(|conn: &Conn, _| conn.ended()),
    )
}

#[tokio::test(start_paused = true)]
async fn a_normal_end_goes_idle_by_default() {
    let ledger = Ledger::new();
    let (_svc, handle) = monitored(&ledger, NormalEnd::default());
    handle.connect().unwrap();
    settle().await;
    handle.connection::<Conn>().unwrap().1.end(false);
    settle().await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    assert!(ledger.book().teardowns.contains(&(1, CloseCause::Ended)));
    advance(Duration::from_secs(60)).await;
    let l = handle.ledger();
    assert_eq!((l.attempts, l.ended, l.failures), (1, 1, 0), "no reconnect");
}

#[tokio::test(start_paused = true)]
async fn a_normal_end_reconnects_at_once_under_normal_end_reconnect() {
    let ledger = Ledger::new();
    let (_svc, handle) = monitored(&ledger, NormalEnd::Reconnect);
    let first = handle.connect().unwrap();
    settle().await;
    handle.connection::<Conn>().unwrap().1.end(false);
    settle().await;
    let State::Connected { epoch } = handle.state() else {
        panic!(
            "expected a reconnect without backoff, got {}",
            handle.state()
        );
    };
    assert!(epoch > first);
    assert_eq!(handle.connection::<Conn>().unwrap().1.id, 2);
    assert!(ledger.book().teardowns.contains(&(1, CloseCause::Ended)));
    let l = handle.ledger();
    assert_eq!((l.attempts, l.ended, l.failures, l.closed), (2, 1, 0, 1));
    // A report of the ended connection is stale now (rule 3).
    assert!(!handle.report_closed(first));
}

#[tokio::test(start_paused = true)]
async fn report_closed_follows_the_normal_end_policy() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger).on_normal_end(NormalEnd::Reconnect));
    let epoch = handle.connect().unwrap();
    settle().await;
    assert!(handle.report_closed(epoch));
    settle().await;
    assert_eq!(handle.connection::<Conn>().unwrap().1.id, 2);
}

fn refuse_connect_errors(
    ledger: &Ledger,
) -> tower_epoch::ReconnectLayer<String, Schedule, LedgerTeardown> {
    layer(ledger).with_permanent_error(|e| e.downcast_ref::<ConnectError>().is_some())
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_not_retried_until_the_next_connect() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Fail(Duration::ZERO)]);
    let (svc, handle) = start(&ledger, refuse_connect_errors(&ledger));
    let mut svc = Spawn::new(svc);
    handle.connect().unwrap();
    assert!(svc.poll_ready::<u32>().is_pending());
    settle().await;
    let State::Refused { last_error } = handle.state() else {
        panic!("expected refused, got {}", handle.state());
    };
    let cause = match last_error.downcast_ref::<Error>() {
        Some(Error::Connect(cause)) => cause.downcast_ref::<ConnectError>(),
        _ => None,
    };
    assert!(cause.is_some(), "the connector's own error: {last_error:?}");
    assert!(handle.state().is_terminal());
    assert!(svc.is_woken(), "a waiting service is told");
    let Poll::Ready(Err(error)) = svc.poll_ready::<u32>() else {
        panic!("the service fails");
    };
    assert!(
        matches!(error.downcast_ref::<Error>(), Some(Error::Refused(_))),
        "{error}"
    );
    advance(Duration::from_secs(60)).await;
    assert_eq!(handle.ledger().attempts, 1, "no retry");
    // connect() starts afresh.
    handle.connect().unwrap();
    settle().await;
    assert!(handle.state().is_connected());
}

#[tokio::test(start_paused = true)]
async fn transient_errors_still_retry_beside_the_permanent_predicate() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Hang]);
    let (_svc, handle) = start(&ledger, refuse_connect_errors(&ledger));
    handle.connect().unwrap();
    advance(Duration::from_secs(1)).await;
    assert!(
        matches!(handle.state(), State::WaitingToRetry { .. }),
        "{}",
        handle.state()
    );
    advance(BACKOFF).await;
    assert!(handle.state().is_connected());
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_of_the_installed_connection_refuses() {
    let ledger = Ledger::new();
    let layer = layer(&ledger).with_permanent_error(|e| e.to_string() == "401");
    let (_svc, handle) = start(&ledger, layer);
    let epoch = handle.connect().unwrap();
    settle().await;
    assert!(handle.report_failure(epoch, "401"));
    assert!(
        matches!(handle.state(), State::Refused { .. }),
        "{}",
        handle.state()
    );
    settle().await;
    assert_eq!(ledger.closes(1), 1, "released to teardown");
    advance(Duration::from_secs(60)).await;
    assert_eq!(handle.ledger().attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_permanent_predicate_classifies_nothing() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Fail(Duration::ZERO)]);
    let layer = layer(&ledger).with_permanent_error(|_| panic!("a predicate that panics"));
    let (_svc, handle) = start(&ledger, layer);
    handle.connect().unwrap();
    settle().await;
    assert!(
        matches!(handle.state(), State::WaitingToRetry { .. }),
        "{}",
        handle.state()
    );
    advance(BACKOFF).await;
    assert!(handle.state().is_connected());
}

#[tokio::test(start_paused = true)]
async fn reconnect_now_skips_the_rest_of_a_backoff_wait() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Fail(Duration::ZERO)]);
    let long = Schedule::new([Duration::from_secs(30)]).unwrap();
    let (_svc, handle) = start(&ledger, layer(&ledger).with_backoff(long));
    assert!(!handle.reconnect_now(), "idle: nothing to skip");
    handle.connect().unwrap();
    settle().await;
    let State::WaitingToRetry { epoch: waiting, .. } = handle.state() else {
        panic!("expected a retry, got {}", handle.state());
    };
    advance(Duration::from_secs(1)).await;
    assert!(handle.reconnect_now());
    settle().await;
    let State::Connected { epoch } = handle.state() else {
        panic!("expected connected, got {}", handle.state());
    };
    assert!(epoch > waiting);
    assert!(!handle.reconnect_now(), "connected: nothing to skip");
    // The old timer fires in a stale epoch and does nothing (rule 4).
    advance(Duration::from_secs(30)).await;
    assert_eq!(handle.ledger().attempts, 2);
    assert!(matches!(handle.state(), State::Connected { epoch: e } if e == epoch));
}

/// A waker that counts its wake-ups; its strong count shows who holds it.
#[derive(Default)]
struct Counting(AtomicUsize);

impl Wake for Counting {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn poll_ready_with(svc: &mut tower_epoch::Reconnect<Conn>, waker: &Arc<Counting>) -> bool {
    let waker = Waker::from(Arc::clone(waker));
    let mut cx = Context::from_waker(&waker);
    Service::<u32>::poll_ready(svc, &mut cx).is_ready()
}

#[tokio::test(start_paused = true)]
async fn every_waiting_service_is_woken_by_an_install() {
    let ledger = Ledger::new();
    let (svc, handle) = start(&ledger, layer(&ledger));
    let mut services: Vec<_> = (0..3).map(|_| svc.clone()).collect();
    services.push(svc);
    let wakers: Vec<_> = (0..4).map(|_| Arc::new(Counting::default())).collect();
    for (svc, waker) in services.iter_mut().zip(&wakers) {
        assert!(!poll_ready_with(svc, waker));
    }
    handle.connect().unwrap();
    settle().await;
    for (i, waker) in wakers.iter().enumerate() {
        assert_eq!(waker.0.load(Ordering::SeqCst), 1, "service {i} woken once");
    }
    for (svc, waker) in services.iter_mut().zip(&wakers) {
        assert!(poll_ready_with(svc, waker));
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiting_service_leaves_no_waker_behind() {
    let ledger = Ledger::new();
    let (svc, _handle) = start(&ledger, layer(&ledger));
    let waker = Arc::new(Counting::default());
    for _ in 0..3 {
        let mut clone = svc.clone();
        assert!(!poll_ready_with(&mut clone, &waker));
        assert!(Arc::strong_count(&waker) > 1, "registered");
        drop(clone);
        assert_eq!(Arc::strong_count(&waker), 1, "forgotten with the service");
    }
}

#[tokio::test(start_paused = true)]
async fn the_driver_runs_while_any_handle_or_service_lives_and_stops_after_the_last() {
    let ledger = Ledger::new();
    let layer = layer(&ledger);
    let handle = layer.handle();
    let (svc, driver) = layer.build(ledger.connector());
    drop(layer);
    let driver = tokio::spawn(driver);
    let clone = svc.clone();
    handle.connect().unwrap();
    settle().await;
    drop(svc);
    drop(handle);
    settle().await;
    assert!(!driver.is_finished(), "a service clone keeps it");
    let handle = clone.handle();
    drop(clone);
    settle().await;
    assert!(!driver.is_finished(), "a handle keeps it");
    assert!(handle.state().is_connected());
    let watcher = handle.subscribe();
    drop(handle);
    tokio::time::timeout(Duration::from_secs(1), driver)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(*watcher.borrow(), State::Shutdown));
    assert_eq!(ledger.closes(1), 1, "closed what was open");
}

/// `disconnect().await` resolves once the teardown closed the connection, however many idle
/// service clones still cache a copy of it: a teardown that closes (as every transport of this
/// crate does) closes it for all of them.
#[tokio::test(start_paused = true)]
async fn disconnect_closes_the_connection_whatever_idle_clones_cached() {
    let ledger = Ledger::new();
    let (svc, handle) = start(&ledger, layer(&ledger));
    handle.connect().unwrap();
    settle().await;
    let mut clones: Vec<_> = (0..3).map(|_| Spawn::new(svc.clone())).collect();
    for clone in &mut clones {
        assert!(
            clone.poll_ready::<u32>().is_ready(),
            "each caches the connection"
        );
    }
    handle.disconnect().await;
    assert_eq!(ledger.closes(1), 1, "closed by the teardown");
    for clone in &mut clones {
        assert!(
            clone.poll_ready::<u32>().is_pending(),
            "the old one is never used again"
        );
    }
}

/// With [`DropTeardown`] a connection is closed when its last copy is dropped: the slot's copy
/// goes at the disconnect, a copy cached by an idle service at that service's next
/// `poll_ready` or drop. This is the behaviour the teardown docs warn about.
#[tokio::test(start_paused = true)]
async fn drop_teardown_closes_when_the_last_cached_clone_goes() {
    let ledger = Ledger::new();
    let layer = ReconnectLayer::new("target".to_string())
        .with_backoff(Schedule::new([BACKOFF]).unwrap())
        .with_teardown(DropTeardown);
    let handle = layer.handle();
    let svc = tower::Layer::layer(&layer, ledger.connector());
    handle.connect().unwrap();
    settle().await;
    let mut clones: Vec<_> = (0..3).map(|_| Spawn::new(svc.clone())).collect();
    for clone in &mut clones {
        assert!(clone.poll_ready::<u32>().is_ready());
    }
    handle.disconnect().await;
    let dropped = || ledger.book().dropped.get(&1).copied().unwrap_or(0);
    assert_eq!(dropped(), 0, "three idle clones still hold it");
    assert!(clones[0].poll_ready::<u32>().is_pending());
    drop(clones.remove(1));
    assert_eq!(dropped(), 0, "one clone still holds it");
    drop(clones);
    assert_eq!(dropped(), 1, "closed with its last copy");
}
