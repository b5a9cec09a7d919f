//! Monitoring the installed connection: a dead connection is noticed without traffic.

mod common;

use std::time::Duration;

use common::*;
use tower_epoch::State;
use tower_epoch::teardown::CloseCause;

fn start_monitored(ledger: &Ledger) -> (tower_epoch::Reconnect<Conn>, tower_epoch::Handle) {
    let layer = layer(ledger).with_monitor(|conn: &Conn, _| conn.ended());
    let handle = layer.handle();
    let svc = tower::Layer::layer(&layer, ledger.connector());
    (svc, handle)
}

#[tokio::test(start_paused = true)]
async fn a_failed_transport_is_noticed_without_a_request_and_reconnects() {
    let ledger = Ledger::new();
    let (_svc, handle) = start_monitored(&ledger);
    let epoch = handle.connect().unwrap();
    settle().await;
    let (_, conn) = handle.connection::<Conn>().unwrap();
    conn.end(true);
    settle().await;
    assert!(matches!(handle.state(), State::WaitingToRetry { epoch: e, .. } if e == epoch));
    assert!(ledger.book().teardowns.contains(&(1, CloseCause::Failed)));
    advance(BACKOFF).await;
    assert_eq!(handle.connection::<Conn>().unwrap().1.id, 2);
    assert_eq!(handle.ledger().failures, 1);
}

#[tokio::test(start_paused = true)]
async fn a_normal_end_by_the_peer_releases_without_reconnect() {
    let ledger = Ledger::new();
    let (_svc, handle) = start_monitored(&ledger);
    handle.connect().unwrap();
    settle().await;
    handle.connection::<Conn>().unwrap().1.end(false);
    settle().await;
    assert!(matches!(handle.state(), State::Idle));
    assert!(ledger.book().teardowns.contains(&(1, CloseCause::Ended)));
    advance(Duration::from_secs(30)).await;
    assert_eq!(
        handle.ledger().attempts,
        1,
        "no reconnect after a normal end"
    );
    assert_eq!(ledger.open_ids(), Vec::<u64>::new());
}

#[tokio::test(start_paused = true)]
async fn a_late_end_of_a_replaced_connection_is_ignored() {
    let ledger = Ledger::new();
    ledger.default_close(Close::After(SLOW_CLOSE));
    let (_svc, handle) = start_monitored(&ledger);
    let old = handle.connect().unwrap();
    settle().await;
    let (_, first) = handle.connection::<Conn>().unwrap();
    drop(handle.disconnect());
    let new = handle.connect().unwrap();
    settle().await;
    // The old transport's close event arrives while the new one is installed (the latent
    // Phoenix bug: it must neither disable the new one nor schedule a reconnect).
    first.end(true);
    assert!(!handle.report_closed(old));
    assert!(!handle.report_failure(old, "late"));
    advance(Duration::from_secs(10)).await;
    assert!(matches!(handle.state(), State::Connected { epoch } if epoch == new));
    assert_eq!(handle.ledger().attempts, 2);
}
