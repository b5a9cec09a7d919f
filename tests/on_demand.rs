//! Connecting on the first request and closing idle connections, under the epoch rules: a
//! request that races an idle close is never sent on the closed connection, and a deliberate
//! disconnect is never undone by a request (rule 8).

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use tower::{Service, ServiceExt, service_fn};
use tower_epoch::teardown::CloseCause;
use tower_epoch::{Error, ReconnectLayer, State, WhenDisconnected};

const IDLE: Duration = Duration::from_secs(10);

/// Lets `d` of paused time pass in steps of 100 ms, so that each timer fires at its deadline
/// (one `advance` by `d` would fire them all at its end, late).
async fn pass(d: Duration) {
    let step = Duration::from_millis(100);
    let mut left = d;
    while left > Duration::ZERO {
        let now = left.min(step);
        advance(now).await;
        left -= now;
    }
}

fn teardowns(ledger: &Ledger) -> Vec<(u64, CloseCause)> {
    ledger.book().teardowns.clone()
}

#[tokio::test(start_paused = true)]
async fn a_lazy_layer_connects_on_the_first_request() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger).connect_on_demand());
    advance(Duration::from_secs(60)).await;
    assert!(
        matches!(handle.state(), State::Idle),
        "nothing before a request"
    );
    assert_eq!(handle.ledger().attempts, 0);

    let reply = svc.ready().await.unwrap().call(7).await.unwrap();
    assert_eq!(reply, (1, 7));
    let l = handle.ledger();
    assert_eq!((l.attempts, l.demanded), (1, 1));

    // Connected now: further requests do not demand.
    svc.ready().await.unwrap().call(8).await.unwrap();
    assert_eq!(handle.ledger().demanded, 1);
}

#[tokio::test(start_paused = true)]
async fn a_lazy_layer_connected_explicitly_demands_nothing() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger).connect_on_demand());
    handle.connect().unwrap();
    svc.ready().await.unwrap().call(1).await.unwrap();
    let l = handle.ledger();
    assert_eq!((l.attempts, l.demanded), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_request_after_a_deliberate_disconnect_waits_for_connect() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger).connect_on_demand());
    svc.ready().await.unwrap().call(1).await.unwrap();
    handle.disconnect().await;

    // Rule 8: the request does not reconnect.
    assert!(poll_ready_now(&mut svc).is_pending());
    advance(Duration::from_secs(60)).await;
    assert!(poll_ready_now(&mut svc).is_pending());
    assert!(matches!(handle.state(), State::Idle));
    assert_eq!(handle.ledger().attempts, 1);

    handle.connect().unwrap();
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_lazy_layer_that_fails_fast_starts_connecting_and_fails_the_first_request() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(
        &ledger,
        layer(&ledger)
            .connect_on_demand()
            .when_disconnected(WhenDisconnected::FailFast),
    );
    let error = poll_ready_now(&mut svc).map_err(|e| e.downcast::<Error>().unwrap());
    assert!(matches!(
        error,
        std::task::Poll::Ready(Err(e)) if matches!(*e, Error::NotConnected)
    ));
    settle().await;
    assert!(handle.state().is_connected(), "{}", handle.state());
    assert!(poll_ready_now(&mut svc).is_ready());
}

#[tokio::test(start_paused = true)]
async fn a_lazy_layer_that_gave_up_fails_requests_instead_of_demanding_again() {
    let ledger = Ledger::new();
    ledger.default_attempt(Attempt::Fail(Duration::ZERO));
    let (mut svc, handle) = start(
        &ledger,
        layer(&ledger)
            .connect_on_demand()
            .with_max_attempts(2.try_into().unwrap()),
    );
    let ready = tokio::time::timeout(Duration::from_secs(60), svc.ready()).await;
    let error = ready.expect("fails, not hangs").unwrap_err();
    assert!(matches!(
        error.downcast_ref::<Error>(),
        Some(Error::GaveUp { attempts: 2, .. })
    ));
    assert!(poll_ready_now(&mut svc).is_ready(), "fails again at once");
    assert_eq!(
        handle.ledger().attempts,
        2,
        "no demand from a terminal state"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_and_the_next_request_reconnects() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger).with_idle_timeout(IDLE));
    handle.connect().unwrap();
    svc.ready().await.unwrap().call(1).await.unwrap();

    // The first look finds the request's touch; the second one closes.
    pass(IDLE).await;
    assert!(handle.state().is_connected(), "touched since the last look");
    pass(IDLE).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    assert_eq!(teardowns(&ledger), vec![(1, CloseCause::Idle)]);
    assert_eq!(ledger.closes(1), 1);
    assert_eq!(handle.ledger().idled, 1);

    // Dormant: the next request connects, on a new connection.
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), (2, 2));
    let l = handle.ledger();
    assert_eq!((l.attempts, l.demanded), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_connection_never_used_is_closed_after_one_timeout() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger).with_idle_timeout(IDLE));
    handle.connect().unwrap();
    settle().await;
    pass(IDLE - Duration::from_millis(1)).await;
    assert!(handle.state().is_connected());
    pass(Duration::from_millis(1)).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
}

#[tokio::test(start_paused = true)]
async fn a_reserved_service_holds_the_connection_until_it_calls() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger).with_idle_timeout(IDLE));
    handle.connect().unwrap();
    svc.ready().await.unwrap();
    pass(IDLE * 10).await;
    assert!(handle.state().is_connected(), "held by the reservation");

    // The reservation passes to the response future, which completes at once.
    svc.call(1).await.unwrap();
    pass(IDLE).await;
    pass(IDLE).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    assert_eq!(ledger.book().served, vec![(1, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_reserved_service_and_a_dropped_response_release_their_holds() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger).with_idle_timeout(IDLE));
    handle.connect().unwrap();
    let mut clone = svc.clone();
    clone.ready().await.unwrap();
    drop(clone);
    svc.ready().await.unwrap();
    drop(svc.call(1)); // never polled
    pass(IDLE).await;
    pass(IDLE).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
}

#[tokio::test(start_paused = true)]
async fn a_slow_request_keeps_its_connection_open_until_it_completes() {
    let opened = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&opened);
    let connector = service_fn(move |()| {
        count.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, Infallible>(service_fn(|d: Duration| async move {
                tokio::time::sleep(d).await;
                Ok::<_, Infallible>(d)
            }))
        }
    });
    let layer = ReconnectLayer::new(()).with_idle_timeout(IDLE);
    let handle = layer.handle();
    let mut svc = tower::Layer::layer(&layer, connector);
    handle.connect().unwrap();
    let slow = svc.ready().await.unwrap().call(IDLE * 5);
    let request = tokio::spawn(slow);
    pass(IDLE * 5).await;
    assert!(handle.state().is_connected(), "{}", handle.state());
    request.await.unwrap().unwrap();
    // Up to two timeouts after it ended, no sooner than one.
    pass(IDLE - Duration::from_millis(1)).await;
    assert!(handle.state().is_connected());
    pass(IDLE + Duration::from_millis(1)).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    assert_eq!(opened.load(Ordering::SeqCst), 1);
}

/// Requests that race the idle close: 3 tasks, each sleeping a pseudo-random whole number of
/// timeouts (2 to 4), give or take a millisecond or nothing, so that requests arrive right at
/// the idle timer's looks (auto-advanced paused time fires each timer at its deadline); each
/// reserves, yields (the window in which the driver may look and close), then calls. The
/// ledger connection records any request that reaches a connection whose teardown has begun:
/// there must be none, every request is served, and the idle close did happen.
#[tokio::test(start_paused = true)]
async fn a_request_racing_the_idle_close_is_never_sent_on_the_closed_connection() {
    let ledger = Ledger::new();
    let (svc, handle) = start(&ledger, layer(&ledger).with_idle_timeout(IDLE));
    handle.connect().unwrap();
    const TASKS: u32 = 3;
    const ROUNDS: u32 = 40;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let mut seed = u64::from(task) * 7919 + 1;
                for i in 0..ROUNDS {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let whole = IDLE * (2 + (seed >> 40) as u32 % 3);
                    let gap = match (seed >> 20) % 3 {
                        0 => whole - Duration::from_millis(1),
                        1 => whole,
                        _ => whole + Duration::from_millis(1),
                    };
                    tokio::time::sleep(gap).await;
                    svc.ready().await.unwrap();
                    tokio::task::yield_now().await;
                    svc.call(task * 1000 + i).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(36_000), task)
            .await
            .expect("every request is served")
            .unwrap();
    }
    let book = ledger.book();
    assert_eq!(
        book.served.len(),
        (TASKS * ROUNDS) as usize,
        "no request lost"
    );
    assert_eq!(
        book.late,
        vec![],
        "requests sent on a connection being closed"
    );
    drop(book);
    let l = handle.ledger();
    assert!(l.idled >= 5, "the race was run: {l:?}");
    assert_eq!(
        l.demanded, l.idled,
        "each idle close was undone by a request"
    );
}

/// The same race on two worker threads, in real time: a 1 ms idle timeout and 4 tasks sending
/// 2,000 requests each with a yield between reservation and call, so that the driver's looks
/// land among them on another thread. No request may reach a connection being closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_racing_the_idle_close_on_another_thread_is_never_sent_on_the_closed_connection()
{
    let ledger = Ledger::new();
    let (svc, handle) = start(
        &ledger,
        layer(&ledger).with_idle_timeout(Duration::from_millis(1)),
    );
    handle.connect().unwrap();
    let tasks: Vec<_> = (0..4u32)
        .map(|task| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for i in 0..2_000u32 {
                    svc.ready().await.unwrap();
                    tokio::task::yield_now().await;
                    svc.call(task * 10_000 + i).await.unwrap();
                    if i % 64 == 0 {
                        // Now and then all four pause on a timer longer than the idle timeout,
                        // so that the connection goes idle and the next requests race a look.
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every request is served")
            .unwrap();
    }
    let book = ledger.book();
    assert_eq!(book.served.len(), 4 * 2_000, "no request lost");
    assert_eq!(
        book.late,
        vec![],
        "requests sent on a connection being closed"
    );
    drop(book);
    eprintln!("idle closes raced: {}", handle.ledger().idled);
}

#[tokio::test(start_paused = true)]
async fn a_normal_end_by_the_peer_leaves_a_lazy_connection_dormant() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(
        &ledger,
        layer(&ledger)
            .connect_on_demand()
            .with_monitor(|conn: &Conn, _| conn.ended()),
    );
    assert!(handle.connects_on_demand(), "lazy before the first request");
    svc.ready().await.unwrap().call(1).await.unwrap();
    assert!(!handle.connects_on_demand(), "connected");
    handle.connection::<Conn>().unwrap().1.end(false);
    settle().await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    assert!(handle.connects_on_demand(), "a gRPC channel's idle");
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), (2, 2));

    handle.disconnect().await;
    assert!(!handle.connects_on_demand(), "rule 8");
}

/// A lazy connection never used: `suspend()` is the app going to the background. It returns
/// `None` (nothing was connected) and leaves the connection dormant, so the next background
/// request connects: the suspend is undone by a request.
#[tokio::test(start_paused = true)]
async fn a_suspend_of_a_dormant_lazy_connection_is_not_undone_by_a_request() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger).connect_on_demand());
    assert!(handle.suspend().is_none());
    assert!(
        !handle.connects_on_demand(),
        "documented: false after a suspend()"
    );
    let ready = tokio::time::timeout(Duration::from_secs(5), svc.ready()).await;
    assert!(ready.is_err(), "a request after suspend() connected");
}

/// The same after an idle close: `suspend()` while dormant returns `None` and the next request
/// reconnects.
#[tokio::test(start_paused = true)]
async fn a_suspend_after_an_idle_close_is_not_undone_by_a_request() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(
        &ledger,
        layer(&ledger).with_idle_timeout(Duration::from_secs(10)),
    );
    handle.connect().unwrap();
    settle().await;
    for _ in 0..30 {
        advance(Duration::from_secs(1)).await;
    }
    assert_eq!(handle.ledger().idled, 1);
    assert!(handle.suspend().is_none());
    let ready = tokio::time::timeout(Duration::from_secs(5), svc.ready()).await;
    assert!(ready.is_err(), "a request after suspend() reconnected");
}

/// `disconnect()` through `layer.handle()` before the layer is applied: `set_policy` sees
/// `Idle` with an untouched ledger (a release of nothing counts nothing) and makes the
/// connection dormant again, so the first request connects although the last intent was a
/// deliberate disconnect.
#[tokio::test(start_paused = true)]
async fn a_disconnect_before_the_layer_is_applied_is_not_undone_by_a_request() {
    let ledger = Ledger::new();
    let layer = layer(&ledger).connect_on_demand();
    let handle = layer.handle();
    handle.connect().unwrap();
    drop(handle.disconnect());
    assert!(matches!(handle.state(), State::Idle));
    let mut svc = tower::Layer::layer(&layer, ledger.connector());
    assert!(
        !handle.connects_on_demand(),
        "rule 8: disconnected by intent"
    );
    let ready = tokio::time::timeout(Duration::from_secs(5), svc.ready()).await;
    assert!(ready.is_err(), "a request undid the disconnect");
}

/// A request holds its connection until its response future is dropped: a completed future
/// kept alive (as in a `select!` over `&mut future`) holds it, as documented, and its drop
/// releases it.
#[tokio::test(start_paused = true)]
async fn a_completed_response_future_holds_its_connection_until_it_is_dropped() {
    let ledger = Ledger::new();
    let (mut svc, handle) = start(&ledger, layer(&ledger).with_idle_timeout(IDLE));
    handle.connect().unwrap();
    svc.ready().await.unwrap();
    let mut response = Box::pin(svc.call(1));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(matches!(
        std::future::Future::poll(response.as_mut(), &mut cx),
        std::task::Poll::Ready(Ok((1, 1)))
    ));
    pass(IDLE * 3).await;
    assert!(handle.state().is_connected(), "held by the kept future");
    drop(response);
    pass(IDLE * 2).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
}

/// A stale attempt's connection, discarded while a newer one is installed, closes only its own
/// connection: the installed one keeps its idle timer and goes idle in time.
#[tokio::test(start_paused = true)]
async fn the_discard_of_a_stale_connection_keeps_the_idle_timer_of_the_installed_one() {
    let ledger = Ledger::new();
    ledger.script([
        Attempt::Ok(Duration::from_millis(500)),
        Attempt::Ok(Duration::ZERO),
    ]);
    let (_svc, handle) = start(&ledger, layer(&ledger).with_idle_timeout(IDLE));
    handle.connect().unwrap();
    settle().await;
    drop(handle.disconnect());
    handle.connect().unwrap(); // the second attempt, at once
    settle().await;
    assert!(handle.state().is_connected());
    pass(Duration::from_millis(600)).await; // the first one completes, stale: discarded
    assert_eq!(handle.ledger().discarded, 1);
    pass(IDLE).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    assert_eq!(handle.ledger().idled, 1);
}
