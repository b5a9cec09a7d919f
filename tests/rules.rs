//! One test per rule of the epoch protocol (DESIGN.md section 2), under paused time, with the
//! ledger connector as the oracle.

mod common;

use std::time::Duration;

use common::*;
use tower_epoch::teardown::CloseCause;
use tower_epoch::{Error, State};

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn rule_1_stale_connect_is_closed_never_installed() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Ok(2 * SLOW_CLOSE), Attempt::Ok(Duration::ZERO)]);
    let (_svc, handle) = start(
        &ledger,
        layer(&ledger).with_connect_timeout(Duration::from_secs(60)),
    );

    let slow = handle.connect().unwrap();
    advance(500 * MS).await;
    drop(handle.disconnect());
    let fresh = handle.connect().unwrap();
    assert!(fresh > slow);
    settle().await;
    // The fresh attempt (connection 1) is installed while the slow one is still running.
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == fresh));

    // The slow attempt completes in a stale epoch: connection 2 is handed to teardown.
    advance(2 * SLOW_CLOSE).await;
    let l = handle.ledger();
    assert_eq!((l.opened, l.installed, l.discarded, l.closed), (2, 1, 1, 1));
    assert_eq!(ledger.closes(2), 1, "the stale connection is closed");
    assert_eq!(ledger.closes(1), 0, "the installed connection is untouched");
    assert!(ledger.book().teardowns.contains(&(2, CloseCause::Stale)));
    assert_eq!(handle.connection::<Conn>().unwrap().1.id, 1);
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == fresh));
}

#[tokio::test(start_paused = true)]
async fn rule_2_teardown_always_releases_and_only_touches_its_own() {
    let ledger = Ledger::new();
    ledger.default_close(Close::After(SLOW_CLOSE));
    let (_svc, handle) = start(&ledger, layer(&ledger));

    handle.connect().unwrap();
    settle().await;
    let first_close = handle.disconnect();
    advance(1000 * MS).await;
    let second = handle.connect().unwrap();
    settle().await;
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == second));
    // Overlapping teardowns (Phoenix #6600): release connection 2 while 1 still closes.
    advance(500 * MS).await;
    let second_close = handle.disconnect();
    let third = handle.connect().unwrap();
    settle().await;

    // Connection 1's teardown completes although the clock moved three times since: it closes
    // its own connection, and leaves the newer one and the published state alone.
    advance(1500 * MS).await;
    first_close.await;
    assert_eq!(ledger.closes(1), 1);
    assert_eq!(ledger.closes(3), 0);
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == third));
    advance(SLOW_CLOSE).await;
    second_close.await;
    assert_eq!(ledger.closes(2), 1);
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == third));
    assert_eq!(handle.connection::<Conn>().unwrap().1.id, 3);
    ledger.assert_closed_at_most_once();
}

#[tokio::test(start_paused = true)]
async fn rule_2_a_hung_close_is_cut_and_the_transport_dropped() {
    let ledger = Ledger::new();
    ledger.close_script([Close::Hang]);
    let (_svc, handle) = start(
        &ledger,
        layer(&ledger).with_close_timeout(Duration::from_secs(2)),
    );
    handle.connect().unwrap();
    settle().await;
    let closed = handle.disconnect();
    advance(1999 * MS).await;
    assert!(matches!(handle.state(), State::Disconnecting { .. }));
    assert_eq!(
        ledger.book().dropped.get(&1),
        None,
        "still held by the teardown"
    );
    advance(MS).await;
    tokio::time::timeout(MS, closed)
        .await
        .expect("resolved at the close timeout");
    let l = handle.ledger();
    assert_eq!((l.closed, l.close_timeouts), (1, 1));
    assert_eq!(
        ledger.book().dropped.get(&1),
        Some(&1),
        "the transport was dropped"
    );
    assert!(matches!(handle.state(), State::Idle));
}

#[tokio::test(start_paused = true)]
async fn rule_3_stale_events_are_ignored() {
    let ledger = Ledger::new();
    // Attempt 2 fails late, after the intent already changed twice.
    ledger.script([
        Attempt::Ok(Duration::ZERO),
        Attempt::Fail(Duration::from_millis(800)),
        Attempt::Ok(Duration::ZERO),
    ]);
    let (_svc, handle) = start(&ledger, layer(&ledger));

    let old = handle.connect().unwrap();
    settle().await;
    drop(handle.disconnect());
    handle.connect().unwrap(); // attempt 2: fails at 800 ms
    advance(100 * MS).await;
    drop(handle.disconnect());
    let new = handle.connect().unwrap(); // attempt 3: connection 2
    settle().await;
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == new));

    // A late failure report of the replaced connection.
    assert!(!handle.report_failure(old, "late close event of connection 1"));
    // A late attempt failure.
    advance(Duration::from_secs(1)).await;
    // Nothing reacted: no teardown of the new connection, no retry scheduled.
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == new));
    assert_eq!(ledger.closes(2), 0);
    advance(Duration::from_secs(5)).await;
    let l = handle.ledger();
    assert_eq!(l.attempts, 3, "no reconnect was scheduled");
    assert_eq!(l.ignored, 2, "the late report and the late attempt failure");
    assert_eq!(l.failures, 0);
}

#[tokio::test(start_paused = true)]
async fn rule_4_stale_timers_do_nothing() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Fail(Duration::ZERO)]);
    let (_svc, handle) = start(&ledger, layer(&ledger));

    handle.connect().unwrap();
    settle().await;
    assert!(matches!(
        handle.state(),
        State::WaitingToRetry {
            attempt: 2,
            delay: Some(BACKOFF),
            ..
        }
    ));
    // Disconnect while the backoff timer still runs: its epoch goes stale.
    advance(50 * MS).await;
    drop(handle.disconnect());
    advance(Duration::from_secs(5)).await;
    assert_eq!(
        handle.ledger().attempts,
        1,
        "the stale timer started nothing"
    );
    assert!(matches!(handle.state(), State::Idle));

    // Same with a new connect during the backoff: one new attempt, not two.
    ledger.script([Attempt::Fail(Duration::ZERO)]);
    handle.connect().unwrap();
    settle().await;
    advance(50 * MS).await;
    drop(handle.disconnect());
    handle.connect().unwrap();
    advance(Duration::from_secs(5)).await;
    assert_eq!(handle.ledger().attempts, 3);
    assert!(handle.ledger().ignored >= 2);
    assert!(handle.state().is_connected());
}

#[tokio::test(start_paused = true)]
async fn rule_5_suspend_resume() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));

    // Not connected: no token, and nothing ticks.
    let before = handle.epoch();
    assert!(handle.suspend().is_none());
    assert_eq!(handle.epoch(), before);

    handle.connect().unwrap();
    settle().await;
    let token = handle.suspend().expect("intent was connected");
    assert_eq!(token.epoch(), handle.epoch());
    settle().await;
    assert!(matches!(handle.state(), State::Idle));
    let resumed = handle.resume(token).unwrap();
    settle().await;
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == resumed));

    // Anything in between makes the token stale.
    let token = handle.suspend().unwrap();
    let stale = token.epoch();
    drop(handle.disconnect());
    match handle.resume(token) {
        Err(Error::StaleResume { token, now }) => assert!(token == stale && now > stale),
        other => panic!("expected a stale token, got {other:?}"),
    }
    settle().await;
    assert!(matches!(handle.state(), State::Idle));

    // A token of another connection is rejected.
    let other = Ledger::new();
    let (_svc2, handle2) = start(&other, layer(&other));
    handle2.connect().unwrap();
    settle().await;
    let foreign = handle2.suspend().unwrap();
    assert!(matches!(handle.resume(foreign), Err(Error::ForeignToken)));
    assert_eq!(handle.ledger().attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn rule_6_connect_while_closing_is_allowed() {
    let ledger = Ledger::new();
    ledger.default_close(Close::After(SLOW_CLOSE));
    let (_svc, handle) = start(&ledger, layer(&ledger));

    handle.connect().unwrap();
    settle().await;
    let closing = handle.disconnect();
    advance(10 * MS).await;
    assert!(matches!(handle.state(), State::Disconnecting { .. }));
    let epoch = handle.connect().unwrap();
    settle().await;
    // The new attempt did not wait for the old close.
    assert_eq!(handle.ledger().attempts, 2);
    assert!(matches!(handle.state(), State::Connected { epoch: e } if e == epoch));
    assert_eq!(ledger.closes(1), 0, "the old connection is still closing");
    assert_eq!(ledger.open_ids(), vec![1, 2]);
    advance(SLOW_CLOSE).await;
    closing.await;
    assert_eq!(ledger.open_ids(), vec![2]);
    assert_eq!(handle.connection::<Conn>().unwrap().1.id, 2);
}

#[tokio::test(start_paused = true)]
async fn rule_7_last_intent_wins() {
    for last_connect in [true, false] {
        let ledger = Ledger::new();
        ledger
            .default_attempt(Attempt::Ok(Duration::from_millis(700)))
            .default_close(Close::After(SLOW_CLOSE));
        let (_svc, handle) = start(
            &ledger,
            layer(&ledger).with_connect_timeout(Duration::from_secs(10)),
        );
        // Intent flips faster than attempts complete and teardowns finish.
        for i in 0..9 {
            if i % 2 == 0 {
                handle.connect().unwrap();
            } else {
                drop(handle.disconnect());
            }
            advance(Duration::from_millis(300 + 250 * (i % 3))).await;
        }
        if last_connect {
            handle.connect().unwrap();
        } else {
            drop(handle.disconnect());
        }
        let last = handle.epoch();
        quiesce(&handle, &ledger).await;

        ledger.assert_closed_at_most_once();
        let open = ledger.open_ids();
        if last_connect {
            assert_eq!(open.len(), 1, "exactly one installed: {open:?}");
            let (epoch, conn) = handle.connection::<Conn>().unwrap();
            assert_eq!(epoch, last, "it belongs to the newest epoch");
            assert_eq!(open, vec![conn.id]);
        } else {
            assert!(open.is_empty(), "nothing installed: {open:?}");
            assert!(matches!(handle.state(), State::Idle));
        }
        let l = handle.ledger();
        assert_eq!(l.opened, l.installed + l.discarded);
        assert!(l.discarded > 0, "the run exercised stale attempts");
    }
}

#[tokio::test(start_paused = true)]
async fn rule_8_deliberate_disconnect_never_triggers_a_reconnect() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));

    let epoch = handle.connect().unwrap();
    settle().await;
    handle.disconnect().await;
    // The old connection's failure arrives after the disconnect, as a close event would.
    assert!(!handle.report_failure(epoch, "closed by us"));
    advance(Duration::from_secs(60)).await;
    assert_eq!(handle.ledger().attempts, 1);
    assert!(matches!(handle.state(), State::Idle));

    // Whereas the same failure while the intent is connected reconnects.
    let epoch = handle.connect().unwrap();
    settle().await;
    assert!(handle.report_failure(epoch, "peer went away"));
    advance(BACKOFF).await;
    assert_eq!(handle.ledger().attempts, 3);
    assert!(handle.state().is_connected());
}

/// Rules 2 and 7: a connection discarded as stale (rule 1) is closing too, so a disconnect's
/// `Disconnecting` lasts until its teardown is done as well.
#[tokio::test(start_paused = true)]
async fn disconnecting_lasts_until_a_discarded_connection_is_closed_too() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Ok(2000 * MS), Attempt::Ok(Duration::ZERO)]);
    ledger.default_close(Close::After(SLOW_CLOSE));
    let (_svc, handle) = start(
        &ledger,
        layer(&ledger).with_connect_timeout(Duration::from_secs(10)),
    );
    handle.connect().unwrap(); // slow: it will come in stale
    settle().await;
    drop(handle.disconnect());
    handle.connect().unwrap();
    settle().await;
    assert!(handle.state().is_connected());
    advance(500 * MS).await;
    drop(handle.disconnect()); // its close ends at 3.5 s
    advance(1500 * MS).await; // 2 s: the slow attempt is discarded; its close ends at 5 s
    assert_eq!(handle.ledger().discarded, 1);
    advance(1500 * MS).await;
    assert_eq!(handle.ledger().closed, 1);
    assert!(
        matches!(handle.state(), State::Disconnecting { .. }),
        "{}",
        handle.state()
    );
    advance(1500 * MS).await;
    assert_eq!(handle.ledger().closed, 2);
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
}

/// Rule 2: a connection released by a failure is closing too: a disconnect during its teardown
/// is `Disconnecting` until it is closed.
#[tokio::test(start_paused = true)]
async fn a_disconnect_waits_for_the_teardown_of_a_failed_connection() {
    let ledger = Ledger::new();
    ledger.default_close(Close::After(SLOW_CLOSE));
    let (_svc, handle) = start(&ledger, layer(&ledger));
    let epoch = handle.connect().unwrap();
    settle().await;
    assert!(handle.report_failure(epoch, "dropped"));
    drop(handle.disconnect());
    settle().await;
    assert!(
        matches!(handle.state(), State::Disconnecting { .. }),
        "{}",
        handle.state()
    );
    advance(SLOW_CLOSE).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    assert_eq!(ledger.closes(1), 1);
}
