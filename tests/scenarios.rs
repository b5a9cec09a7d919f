//! The Phoenix client scenarios P1-P16 (SCENARIOS.md) restated for the generic layer.
//!
//! A slow close is a teardown of 3 s of paused time. Phoenix's own concurrency tests fired the
//! second operation exactly when the first teardown finished and so passed on broken code: the
//! tests here fire it at several points strictly inside the teardown (early, middle, late).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tower_epoch::teardown::CloseCause;
use tower_epoch::{ReconnectLayer, State, backoff::Schedule};

const MS: Duration = Duration::from_millis(1);

/// Points strictly inside a slow teardown: early, middle, late.
const INSIDE: [Duration; 3] = [
    Duration::from_millis(1),
    Duration::from_millis(1500),
    Duration::from_millis(2999),
];

fn slow_closing() -> Ledger {
    let ledger = Ledger::new();
    ledger.default_close(Close::After(SLOW_CLOSE));
    ledger
}

async fn connected(ledger: &Ledger) -> (tower_epoch::Reconnect<Conn>, tower_epoch::Handle) {
    let (svc, handle) = start(ledger, layer(ledger));
    handle.connect().unwrap();
    settle().await;
    assert!(handle.state().is_connected());
    (svc, handle)
}

#[tokio::test(start_paused = true)]
async fn p1_connect_twice_is_idempotent() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));
    let first = handle.connect().unwrap();
    let second = handle.connect().unwrap();
    assert_eq!(first, second, "the second connect does not tick");
    settle().await;
    assert_eq!(
        handle.connect().unwrap(),
        first,
        "nor does a connect while connected"
    );
    assert_eq!(handle.epoch().get(), 1);
    assert_eq!(handle.ledger().attempts, 1);
    assert_eq!(ledger.opened(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn p2_disconnect_with_nothing_connected_completes_at_once() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));
    tokio::time::timeout(Duration::ZERO, handle.disconnect())
        .await
        .expect("resolves without waiting");
    assert!(matches!(handle.state(), State::Idle));
    assert_eq!(handle.ledger().attempts, 0);
}

#[tokio::test(start_paused = true)]
async fn p3_disconnect_closes_with_the_configured_reason_and_resolves_once_after_the_close() {
    let ledger = Ledger::new();
    type Closes = Vec<(u64, &'static str, CloseCause)>;
    let reasons: Arc<Mutex<Closes>> = Arc::default();
    let record = Arc::clone(&reasons);
    let reason = "bye";
    let layer = ReconnectLayer::new("target".to_string())
        .with_backoff(Schedule::new([BACKOFF]).unwrap())
        .with_teardown(move |conn: Conn, cause| {
            let record = Arc::clone(&record);
            async move {
                tokio::time::sleep(SLOW_CLOSE).await;
                record.lock().unwrap().push((conn.id, reason, cause));
            }
        });
    let handle = layer.handle();
    let _svc = tower::Layer::layer(&layer, ledger.connector());
    handle.connect().unwrap();
    settle().await;

    let mut closed = tokio_test_task(handle.disconnect());
    advance(SLOW_CLOSE - MS).await;
    assert!(closed.is_pending(), "not before the close completed");
    assert!(matches!(handle.state(), State::Disconnecting { .. }));
    advance(MS).await;
    assert!(closed.is_ready(), "resolved once the close completed");
    assert_eq!(
        *reasons.lock().unwrap(),
        vec![(1, "bye", CloseCause::Disconnect)]
    );
    assert!(matches!(handle.state(), State::Idle));
    assert_eq!(handle.ledger().closed, 1);
}

#[tokio::test(start_paused = true)]
async fn p4_connect_during_a_slow_close() {
    for at in INSIDE {
        let ledger = slow_closing();
        let (_svc, handle) = connected(&ledger).await;
        let mut closed = tokio_test_task(handle.disconnect());
        advance(at).await;
        let epoch = handle.connect().unwrap();
        settle().await;
        assert!(closed.is_pending(), "at {at:?}");
        advance(SLOW_CLOSE).await;
        assert!(
            closed.is_ready(),
            "the disconnect future resolved (at {at:?})"
        );
        assert_eq!(
            ledger.open_ids(),
            vec![2],
            "only the new one is open (at {at:?})"
        );
        assert_eq!(ledger.closes(1), 1, "the old one ended closed (at {at:?})");
        assert_eq!(
            handle.connection::<Conn>().map(|(e, c)| (e, c.id)),
            Some((epoch, 2))
        );
        assert!(handle.state().is_connected());
    }
}

#[tokio::test(start_paused = true)]
async fn p5_second_disconnect_during_a_slow_close() {
    for at in INSIDE {
        let ledger = slow_closing();
        let (_svc, handle) = connected(&ledger).await;
        let mut first = tokio_test_task(handle.disconnect());
        advance(at).await;
        let mut second = tokio_test_task(handle.disconnect());
        advance(SLOW_CLOSE).await;
        assert!(
            first.is_ready() && second.is_ready(),
            "both resolved (at {at:?})"
        );
        assert!(
            ledger.open_ids().is_empty(),
            "nothing left open (at {at:?})"
        );
        assert!(handle.connection::<Conn>().is_none());
        assert!(matches!(handle.state(), State::Idle), "at {at:?}");
        ledger.assert_closed_at_most_once();
    }
}

#[tokio::test(start_paused = true)]
async fn p6_disconnect_then_connect_twice_in_a_row_during_a_slow_close() {
    for at in INSIDE {
        let ledger = slow_closing();
        let (_svc, handle) = connected(&ledger).await;
        drop(handle.disconnect());
        handle.connect().unwrap();
        advance(at).await;
        drop(handle.disconnect());
        let last = handle.connect().unwrap();
        quiesce(&handle, &ledger).await;
        let open = ledger.open_ids();
        assert_eq!(open.len(), 1, "exactly one installed (at {at:?}): {open:?}");
        let (epoch, conn) = handle.connection::<Conn>().unwrap();
        assert_eq!(
            (epoch, vec![conn.id]),
            (last, open),
            "and it is the reported one"
        );
        ledger.assert_closed_at_most_once();
    }
}

#[tokio::test(start_paused = true)]
async fn p7_failure_schedules_one_reconnect_with_a_fresh_target() {
    let ledger = Ledger::new();
    let token = Arc::new(Mutex::new("token-1".to_string()));
    let current = Arc::clone(&token);
    let layer = ReconnectLayer::with_target_fn(move || current.lock().unwrap().clone())
        .with_backoff(Schedule::new([BACKOFF, 10 * BACKOFF]).unwrap())
        .with_teardown(ledger.teardown());
    let handle = layer.handle();
    let _svc = tower::Layer::layer(&layer, ledger.connector());
    let epoch = handle.connect().unwrap();
    settle().await;

    *token.lock().unwrap() = "token-2".to_string();
    assert!(handle.report_failure(epoch, "connection reset"));
    settle().await;
    assert!(matches!(
        handle.state(),
        State::WaitingToRetry { delay: Some(d), attempt: 2, .. } if d == BACKOFF
    ));
    advance(BACKOFF - MS).await;
    assert_eq!(handle.ledger().attempts, 1, "not before the first delay");
    advance(MS).await;
    assert_eq!(handle.ledger().attempts, 2, "one reconnect after it");
    assert!(handle.state().is_connected());
    advance(Duration::from_secs(10)).await;
    assert_eq!(handle.ledger().attempts, 2, "and only one");
    assert_eq!(ledger.book().targets, vec!["token-1", "token-2"]);
}

#[tokio::test(start_paused = true)]
async fn p8_deliberate_disconnect_schedules_no_reconnect_a_failure_does() {
    // The WebSocket close codes (1000 vs 1001/1006) are the transport's: its tests cover them.
    let ledger = Ledger::new();
    let (_svc, handle) = connected(&ledger).await;
    handle.disconnect().await;
    advance(Duration::from_secs(30)).await;
    assert_eq!(handle.ledger().attempts, 1);

    let epoch = handle.connect().unwrap();
    settle().await;
    handle.report_failure(epoch, "abnormal closure");
    advance(BACKOFF).await;
    assert_eq!(handle.ledger().attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn p9_connect_after_a_deliberate_disconnect_then_a_failure_reconnects() {
    let ledger = Ledger::new();
    let (_svc, handle) = connected(&ledger).await;
    handle.disconnect().await;
    let epoch = handle.connect().unwrap();
    settle().await;
    assert!(handle.report_failure(epoch, "dropped"));
    assert!(matches!(handle.state(), State::WaitingToRetry { .. }));
    advance(BACKOFF).await;
    assert_eq!(handle.ledger().attempts, 3);
    assert!(handle.state().is_connected());
}

#[tokio::test(start_paused = true)]
async fn p10_retry_count_resets_only_after_the_stable_period() {
    let ledger = Ledger::new();
    let delays = [100, 200, 400, 800].map(Duration::from_millis);
    let (_svc, handle) = start(
        &ledger,
        layer(&ledger).with_backoff(Schedule::new(delays).unwrap()),
    );
    handle.connect().unwrap();
    settle().await;

    let mut seen = Vec::new();
    // Accept-then-drop: each connection fails before the 1 s stable period.
    for _ in 0..3 {
        let (epoch, _) = handle.connection::<Conn>().unwrap();
        advance(500 * MS).await;
        handle.report_failure(epoch, "dropped after accept");
        settle().await; // the driver arms the timer
        let State::WaitingToRetry { delay, attempt, .. } = handle.state() else {
            panic!("expected a retry, got {}", handle.state());
        };
        seen.push((attempt, delay.unwrap()));
        advance(delay.unwrap()).await;
    }
    assert_eq!(
        seen,
        vec![(2, delays[0]), (3, delays[1]), (4, delays[2])],
        "the delay keeps growing"
    );
    // Now the connection stays up past the stable period: the backoff resets.
    let (epoch, _) = handle.connection::<Conn>().unwrap();
    advance(Duration::from_millis(1001)).await;
    handle.report_failure(epoch, "dropped much later");
    settle().await;
    assert!(matches!(
        handle.state(),
        State::WaitingToRetry { attempt: 1, delay: Some(d), .. } if d == delays[0]
    ));
}

#[tokio::test(start_paused = true)]
async fn p11_no_heartbeat_after_a_deliberate_disconnect() {
    // A transport's periodic effect (a heartbeat) captures the epoch and stops when it goes
    // stale; the WebSocket transport's own heartbeat is tested with it.
    let ledger = Ledger::new();
    let (_svc, handle) = connected(&ledger).await;
    let beats = Arc::new(Mutex::new(0u32));
    let stamp = handle.stamp();
    let count = Arc::clone(&beats);
    let heartbeat = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.tick().await;
        loop {
            interval.tick().await;
            if !stamp.is_current() {
                return;
            }
            *count.lock().unwrap() += 1;
        }
    });
    advance(Duration::from_millis(3500)).await;
    assert_eq!(*beats.lock().unwrap(), 3);
    handle.disconnect().await;
    advance(Duration::from_secs(10)).await;
    assert_eq!(*beats.lock().unwrap(), 3, "no beat after the disconnect");
    assert!(heartbeat.is_finished());
}

#[tokio::test(start_paused = true)]
async fn p12_suspend_then_resume_during_the_teardown() {
    for at in INSIDE {
        let ledger = slow_closing();
        let (_svc, handle) = connected(&ledger).await;
        let token = handle.suspend().unwrap();
        advance(at).await;
        let epoch = handle.resume(token).unwrap();
        settle().await;
        assert_eq!(
            ledger.closes(1),
            0,
            "the old teardown is still in flight (at {at:?})"
        );
        quiesce(&handle, &ledger).await;
        assert_eq!(ledger.open_ids(), vec![2], "exactly one open (at {at:?})");
        assert!(matches!(handle.state(), State::Connected { epoch: e } if e == epoch));
    }
}

#[tokio::test(start_paused = true)]
async fn p13_suspend_disconnect_resume_does_not_reconnect() {
    for at in INSIDE {
        let ledger = slow_closing();
        let (_svc, handle) = connected(&ledger).await;
        let token = handle.suspend().unwrap();
        advance(at).await;
        drop(handle.disconnect());
        assert!(handle.resume(token).is_err(), "at {at:?}");
        quiesce(&handle, &ledger).await;
        assert!(
            ledger.open_ids().is_empty(),
            "nothing installed (at {at:?})"
        );
        assert_eq!(handle.ledger().attempts, 1);
        assert!(matches!(handle.state(), State::Idle));
    }
}

#[tokio::test(start_paused = true)]
async fn p14_suspend_connect_resume_makes_two_connections_not_three() {
    for at in INSIDE {
        let ledger = slow_closing();
        let (_svc, handle) = connected(&ledger).await;
        let token = handle.suspend().unwrap();
        advance(at).await;
        handle.connect().unwrap();
        settle().await;
        assert!(handle.resume(token).is_err(), "at {at:?}");
        quiesce(&handle, &ledger).await;
        assert_eq!(ledger.opened(), vec![1, 2], "two in total (at {at:?})");
        assert_eq!(ledger.open_ids(), vec![2]);
    }
}

#[tokio::test(start_paused = true)]
async fn p15_suspend_when_never_connected_gives_no_token() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));
    assert!(handle.suspend().is_none());
    advance(Duration::from_secs(10)).await;
    assert_eq!(handle.ledger().attempts, 0);
    assert!(ledger.opened().is_empty());
}

#[tokio::test(start_paused = true)]
async fn p16_a_token_is_single_use_and_a_later_disconnect_stays_disconnected() {
    let ledger = Ledger::new();
    let (_svc, handle) = connected(&ledger).await;
    let token = handle.suspend().unwrap();
    handle.resume(token).unwrap(); // `token` is moved: it cannot be used again
    settle().await;
    handle.disconnect().await;
    advance(Duration::from_secs(30)).await;
    assert!(matches!(handle.state(), State::Idle));
    assert_eq!(handle.ledger().attempts, 2);
    assert!(ledger.open_ids().is_empty());
}

/// A spawned-future probe: is the future done yet?
struct Probe(tokio::task::JoinHandle<()>);

impl Probe {
    fn is_pending(&mut self) -> bool {
        !self.0.is_finished()
    }
    fn is_ready(&mut self) -> bool {
        self.0.is_finished()
    }
}

fn tokio_test_task(f: tower_epoch::DisconnectFuture) -> Probe {
    Probe(tokio::spawn(f))
}
