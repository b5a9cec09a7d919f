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
async fn a_normal_end_of_a_stable_connection_reconnects_at_once_under_normal_end_reconnect() {
    let ledger = Ledger::new();
    let (_svc, handle) = monitored(&ledger, NormalEnd::Reconnect);
    let first = handle.connect().unwrap();
    settle().await;
    advance(Duration::from_secs(1)).await; // the stable period
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
    advance(Duration::from_secs(1)).await;
    assert!(handle.report_closed(epoch));
    settle().await;
    assert_eq!(handle.connection::<Conn>().unwrap().1.id, 2);
}

/// A peer that accepts and ends at once (GOAWAY right after the handshake) gets the backoff
/// and the attempt limit, not a reconnect storm.
#[tokio::test(start_paused = true)]
async fn a_normal_end_before_the_stable_period_goes_through_backoff_and_the_limit() {
    let ledger = Ledger::new();
    let layer = layer(&ledger)
        .on_normal_end(NormalEnd::Reconnect)
        .with_max_attempts(std::num::NonZeroU32::new(3).unwrap())
        .with_monitor(|conn: &Conn, _| {
            conn.end(false);
            conn.ended()
        });
    let (_svc, handle) = start(&ledger, layer);
    handle.connect().unwrap();
    settle().await;
    let State::WaitingToRetry { last_error, .. } = handle.state() else {
        panic!("expected a retry after the backoff, got {}", handle.state());
    };
    assert!(matches!(
        last_error.downcast_ref::<Error>(),
        Some(Error::EndedEarly)
    ));
    assert_eq!(handle.ledger().attempts, 1);
    for _ in 0..10 {
        advance(BACKOFF).await;
    }
    assert!(
        matches!(handle.state(), State::GaveUp { attempts: 3, .. }),
        "{}",
        handle.state()
    );
    let l = handle.ledger();
    assert_eq!((l.attempts, l.ended, l.failures), (3, 3, 3));
}

/// The state is a retry, and the retry connects after the backoff.
async fn retries_and_connects(handle: &tower_epoch::Handle) {
    assert!(
        matches!(handle.state(), State::WaitingToRetry { .. }),
        "{}",
        handle.state()
    );
    advance(BACKOFF).await;
    assert!(handle.state().is_connected(), "{}", handle.state());
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
    retries_and_connects(&handle).await;
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
    retries_and_connects(&handle).await;
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

#[tokio::test(start_paused = true)]
async fn a_handle_shows_its_clock_and_state_when_debugged() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));
    let epoch = handle.connect().unwrap();
    settle().await;
    let shown = format!("{handle:?}");
    assert!(shown.contains(&format!("clock: {epoch:?}")), "{shown}");
    assert!(
        shown.contains(&format!("state: Connected {{ epoch: {epoch:?} }}")),
        "{shown}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_service_polled_from_another_task_wakes_that_task() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger));
    let (first, moved) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
    assert!(!poll_ready_with(&mut svc, &first));
    assert!(
        !poll_ready_with(&mut svc, &moved),
        "the service moved to another task"
    );
    handle.connect().unwrap();
    settle().await;
    assert_eq!(
        moved.0.load(Ordering::SeqCst),
        1,
        "the task that polled last is woken"
    );
    assert_eq!(first.0.load(Ordering::SeqCst), 0);
    assert_eq!(Arc::strong_count(&first), 1, "the old waker is not kept");
}

#[tokio::test(start_paused = true)]
async fn a_service_that_found_a_connection_leaves_no_waker_behind() {
    let ledger = Ledger::new();
    let (svc, handle) = start(&ledger, layer(&ledger));
    handle.connect().unwrap();
    settle().await;
    let waker = Arc::new(Counting::default());
    for _ in 0..3 {
        let mut clone = svc.clone();
        assert!(poll_ready_with(&mut clone, &waker));
        drop(clone);
        assert_eq!(Arc::strong_count(&waker), 1, "forgotten with the service");
    }
}

#[tokio::test(start_paused = true)]
async fn an_ignored_stale_event_wakes_no_subscriber() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Fail(Duration::ZERO)]);
    let (_svc, handle) = start(&ledger, layer(&ledger));
    let stale = handle.connect().unwrap();
    settle().await;
    let mut states = handle.subscribe();
    assert!(matches!(
        *states.borrow_and_update(),
        State::WaitingToRetry { delay: Some(_), .. }
    ));
    assert!(!handle.report_failure(stale, "late"));
    assert!(!handle.report_closed(stale));
    assert!(
        !states.has_changed().unwrap(),
        "nothing changed: {}",
        *states.borrow()
    );
}

/// In every state, an event that changes nothing (a stale report) publishes nothing.
#[tokio::test(start_paused = true)]
async fn no_state_is_republished_by_an_event_that_changes_nothing() {
    let ledger = Ledger::new();
    ledger.script([
        Attempt::Ok(Duration::ZERO),
        Attempt::Ok(Duration::from_secs(2)),
        Attempt::Fail(Duration::ZERO),
    ]);
    ledger.close_script([Close::After(Duration::from_secs(3))]);
    let layer = layer(&ledger)
        .with_max_attempts(std::num::NonZeroU32::new(1).unwrap())
        .with_connect_timeout(Duration::from_secs(10));
    let (_svc, handle) = start(&ledger, layer);
    let mut states = handle.subscribe();
    let mut quiet = |what: &str| {
        states.borrow_and_update();
        let ignored = handle.ledger().ignored;
        // Epoch 0 was never installed: every report of it is stale.
        assert!(!handle.report_failure(tower_epoch::Epoch::ZERO, "stale"));
        assert!(!handle.report_closed(tower_epoch::Epoch::ZERO));
        assert_eq!(handle.ledger().ignored, ignored + 2, "{what}: both counted");
        assert!(
            !states.has_changed().unwrap(),
            "{what}: republished {}",
            *states.borrow()
        );
    };
    quiet("idle");
    handle.connect().unwrap();
    settle().await;
    quiet("connected");
    drop(handle.disconnect()); // connection 1 closes for 3 s
    settle().await;
    quiet("disconnecting");
    handle.connect().unwrap(); // connection 2 takes 2 s
    settle().await;
    quiet("connecting");
    advance(Duration::from_secs(4)).await;
    drop(handle.disconnect());
    handle.connect().unwrap(); // fails: the limit of 1 is reached
    settle().await;
    assert!(
        matches!(handle.state(), State::GaveUp { .. }),
        "{}",
        handle.state()
    );
    quiet("gave up");

    let ledger = Ledger::new();
    ledger.script([Attempt::Fail(Duration::ZERO)]);
    let (_svc, handle) = start(&ledger, refuse_connect_errors(&ledger));
    handle.connect().unwrap();
    settle().await;
    assert!(
        matches!(handle.state(), State::Refused { .. }),
        "{}",
        handle.state()
    );
    let mut states = handle.subscribe();
    states.borrow_and_update();
    assert!(!handle.report_failure(tower_epoch::Epoch::ZERO, "stale"));
    assert!(!states.has_changed().unwrap(), "refused: republished");
}

/// The stable-period timer of a connection that failed first does not reset the backoff of the
/// retries that follow.
#[tokio::test(start_paused = true)]
async fn a_stable_timer_of_a_failed_connection_resets_nothing() {
    let ledger = Ledger::new();
    let delays = [800, 1600, 3200].map(Duration::from_millis);
    let (_svc, handle) = start(
        &ledger,
        layer(&ledger).with_backoff(Schedule::new(delays).unwrap()),
    );
    let first = handle.connect().unwrap();
    settle().await;
    advance(Duration::from_millis(500)).await;
    assert!(handle.report_failure(first, "dropped"));
    // Its stable timer fires at 1 s, during the 800 ms wait.
    advance(Duration::from_millis(600)).await;
    advance(Duration::from_millis(200)).await;
    let (second, _) = handle.connection::<Conn>().unwrap();
    advance(Duration::from_millis(500)).await;
    assert!(handle.report_failure(second, "dropped again"));
    settle().await;
    assert!(
        matches!(handle.state(), State::WaitingToRetry { attempt: 3, delay: Some(d), .. } if d == delays[1]),
        "the backoff grows: {}",
        handle.state()
    );
}
