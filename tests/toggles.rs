//! 10,000 connect/disconnect toggles: the ledger balances and no task outlives its users.

mod common;

use std::time::Duration;

use common::*;
use tower_epoch::State;

#[tokio::test(start_paused = true)]
async fn ten_thousand_toggles_balance_the_ledger_and_leave_no_task_behind() {
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let baseline = tasks();
    let ledger = Ledger::new();
    // Some attempts and closes take time, so toggles overlap with both.
    ledger.script((0..10_000).map(|i| match i % 7 {
        0 => Attempt::Ok(Duration::from_millis(3)),
        3 => Attempt::Fail(Duration::ZERO),
        _ => Attempt::Ok(Duration::ZERO),
    }));
    ledger.close_script((0..10_000).map(|i| Close::After(Duration::from_millis(i % 5))));
    let (svc, handle) = start(&ledger, layer(&ledger));
    assert_eq!(tasks(), baseline + 1, "the driver");

    let mut closing = Vec::new();
    for i in 0..10_000u32 {
        if i % 2 == 0 {
            handle.connect().unwrap();
        } else {
            closing.push(handle.disconnect());
        }
        match i % 10 {
            0 => settle().await,
            5 => advance(Duration::from_millis(2)).await,
            _ => {}
        }
    }
    quiesce(&handle, &ledger).await;
    for done in closing {
        tokio::time::timeout(Duration::from_secs(1), done)
            .await
            .unwrap();
    }

    let l = handle.ledger();
    assert!(
        matches!(handle.state(), State::Idle),
        "last intent: disconnect"
    );
    // Connects between two runs of the driver coalesce: an attempt that went stale before the
    // connector was called is never started. One attempt per settle point after a connect.
    assert!(l.attempts >= 1_000 && l.opened > 500, "{l:?}");
    assert_eq!(l.opened, l.installed + l.discarded, "{l:?}");
    assert_eq!(l.closed, l.opened, "{l:?}");
    assert!(ledger.open_ids().is_empty());
    ledger.assert_closed_at_most_once();
    assert_eq!(ledger.book().opened.len() as u64, l.opened);

    // Last user gone: the driver closes what is open and ends.
    handle.connect().unwrap();
    settle().await;
    assert!(handle.state().is_connected());
    drop(svc);
    drop(handle);
    advance(Duration::from_millis(10)).await;
    assert_eq!(tasks(), baseline, "no task outlives its users");
    assert!(
        ledger.open_ids().is_empty(),
        "the installed connection was closed"
    );
    ledger.assert_closed_at_most_once();
}
