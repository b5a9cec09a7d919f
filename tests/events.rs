//! Transition events and `Handle::wait_for`: every step, in order, with its cause; a slow
//! reader is told what it missed; waiting for a state is bounded and fails fast when the
//! state became terminal.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tower_epoch::events::{CAPACITY, Cause, Events, Lagged, Transition};
use tower_epoch::{Error, State};

/// Reads what is there without waiting.
fn drain(events: &mut Events) -> Vec<Result<Transition, Lagged>> {
    let mut out = Vec::new();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    while let std::task::Poll::Ready(Some(item)) = events.poll_next_unpin(&mut cx) {
        out.push(item);
    }
    out
}

fn causes(items: &[Result<Transition, Lagged>]) -> Vec<Cause> {
    items.iter().map(|t| t.as_ref().unwrap().cause).collect()
}

#[tokio::test(start_paused = true)]
async fn every_transition_comes_in_order_with_its_cause_epoch_and_attempt() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Fail(Duration::ZERO)]);
    let (_svc, handle) = start(&ledger, layer(&ledger));
    let mut events = handle.events();
    let start = tokio::time::Instant::now();

    handle.connect().unwrap();
    settle().await;
    advance(BACKOFF).await;
    handle.disconnect().await;
    settle().await;

    let items = drain(&mut events);
    assert_eq!(
        causes(&items),
        vec![
            Cause::Connect,
            Cause::AttemptFailed,
            Cause::BackoffArmed,
            Cause::BackoffElapsed,
            Cause::Opened,
            Cause::Disconnect,
            Cause::Closed,
        ]
    );
    let items: Vec<Transition> = items.into_iter().map(Result::unwrap).collect();
    for (i, pair) in items.windows(2).enumerate() {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "consecutive at {i}");
        assert_eq!(
            format!("{}", pair[1].from),
            format!("{}", pair[0].to),
            "each starts where the last ended"
        );
    }
    assert!(matches!(items[0].from, State::Idle));
    assert!(matches!(items[0].to, State::Connecting { attempt: 1, .. }));
    assert_eq!((items[0].epoch.get(), items[0].attempt), (1, 1));
    assert!(matches!(
        items[2].to,
        State::WaitingToRetry {
            delay: Some(BACKOFF),
            ..
        }
    ));
    assert_eq!(items[3].attempt, 2, "the retry is the second attempt");
    assert_eq!(
        items[4].to.epoch(),
        Some(items[3].epoch),
        "installed at its epoch"
    );
    assert_eq!(items[3].at - start, BACKOFF, "the time is tokio's");
    assert!(matches!(items[6].to, State::Idle));
    let shown = items[0].to_string();
    assert!(
        shown.starts_with("#1 Connect: idle -> connecting"),
        "{shown}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_is_told_how_many_it_missed_and_goes_on() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));
    let mut events = handle.events();
    // Each round: connect, opened, disconnect, closed (4 transitions).
    let rounds = CAPACITY;
    for _ in 0..rounds {
        handle.connect().unwrap();
        settle().await;
        handle.disconnect().await;
        settle().await;
    }
    let total = (rounds * 4) as u64;
    let items = drain(&mut events);
    let missed: u64 = items
        .iter()
        .filter_map(|i| i.as_ref().err())
        .map(|l| l.0)
        .sum();
    let received = items.iter().filter(|i| i.is_ok()).count() as u64;
    assert_eq!(missed + received, total, "nothing lost without being told");
    assert_eq!(received, CAPACITY as u64, "the buffer's worth is kept");
    assert!(matches!(items[0], Err(Lagged(n)) if n == total - CAPACITY as u64));
    let last = items.last().unwrap().as_ref().unwrap();
    assert_eq!((last.seq, last.cause), (total, Cause::Closed));

    // Caught up: the next one arrives as usual.
    handle.connect().unwrap();
    let next = events.recv().await.unwrap().unwrap();
    assert_eq!((next.seq, next.cause), (total + 1, Cause::Connect));
}

#[tokio::test(start_paused = true)]
async fn the_stream_ends_after_the_shutdown_and_does_not_keep_the_connection() {
    let ledger = Ledger::new();
    let (svc, handle) = start(&ledger, layer(&ledger));
    let mut events = handle.events();
    handle.connect().unwrap();
    settle().await;
    drop((svc, handle));
    let mut last = None;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(item) = events.next().await {
            last = Some(item.unwrap());
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ended");
    let last = last.unwrap();
    assert!(matches!(last.to, State::Shutdown), "{last}");
    assert_eq!(last.cause, Cause::DriverStopped);
    assert!(events.next().await.is_none(), "stays ended");
    assert_eq!(format!("{events:?}"), "Events { ended: true, .. }");
    assert_eq!(ledger.closes(1), 1, "the connection was closed");
}

#[tokio::test(start_paused = true)]
async fn readers_that_subscribe_later_see_only_what_follows() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));
    handle.connect().unwrap();
    settle().await;
    let mut events = handle.events();
    assert!(drain(&mut events).is_empty());
    assert_eq!(format!("{events:?}"), "Events { ended: false, .. }");
    handle.disconnect().await;
    settle().await;
    assert_eq!(
        causes(&drain(&mut events)),
        vec![Cause::Disconnect, Cause::Closed]
    );
}

/// Four threads change the intent at once; the reader sees steps in order (numbers only grow,
/// and every gap is a `Lagged` of its size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_arrive_in_step_order() {
    let ledger = Ledger::new();
    let (_svc, handle) = start(&ledger, layer(&ledger));
    let mut events = handle.events();
    let togglers: Vec<_> = (0..4)
        .map(|_| {
            let handle = handle.clone();
            std::thread::spawn(move || {
                for _ in 0..500 {
                    let _ = handle.connect();
                    drop(handle.disconnect());
                }
            })
        })
        .collect();
    let reader = tokio::spawn(async move {
        let mut next = 1;
        let mut seen = 0;
        while let Ok(Some(item)) =
            tokio::time::timeout(Duration::from_millis(500), events.next()).await
        {
            match item {
                Ok(t) => {
                    assert_eq!(t.seq, next, "in step order");
                    next = t.seq + 1;
                    seen += 1;
                }
                Err(Lagged(n)) => next += n,
            }
        }
        (next, seen)
    });
    for toggler in togglers {
        toggler.join().unwrap();
    }
    let (next, seen) = reader.await.unwrap();
    assert!(seen > 0);
    assert!(next > 1000, "read up to step {next}");
}

#[tokio::test(start_paused = true)]
async fn wait_for_returns_a_state_that_holds_now_or_later() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Ok(Duration::from_millis(500))]);
    let (_svc, handle) = start(&ledger, layer(&ledger));
    let started = tokio::time::Instant::now();
    let idle = handle
        .wait_for(Duration::from_secs(1), |s| matches!(s, State::Idle))
        .await
        .unwrap();
    assert!(matches!(idle, State::Idle), "holds now");

    let epoch = handle.connect().unwrap();
    let connected = handle
        .wait_for(Duration::from_secs(5), State::is_connected)
        .await
        .unwrap();
    assert_eq!(connected.epoch(), Some(epoch));
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(500),
        "when it connected"
    );
}

#[tokio::test(start_paused = true)]
async fn wait_for_times_out_with_a_typed_error() {
    let ledger = Ledger::new();
    ledger.script([Attempt::Hang]);
    let (_svc, handle) = start(
        &ledger,
        layer(&ledger).with_connect_timeout(Duration::from_secs(3600)),
    );
    handle.connect().unwrap();
    let started = tokio::time::Instant::now();
    let error = handle
        .wait_for(Duration::from_secs(2), State::is_connected)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::WaitTimeout(d) if d == Duration::from_secs(2)));
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn wait_for_fails_fast_when_the_state_becomes_terminal() {
    let ledger = Ledger::new();
    ledger.default_attempt(Attempt::Fail(Duration::ZERO));
    let (_svc, handle) = start(
        &ledger,
        layer(&ledger).with_max_attempts(3.try_into().unwrap()),
    );
    handle.connect().unwrap();
    let started = tokio::time::Instant::now();
    let error = handle
        .wait_for(Duration::from_secs(3600), State::is_connected)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::GaveUp { attempts: 3, .. }),
        "{error}"
    );
    assert_eq!(started.elapsed(), BACKOFF * 2, "at the third failure");

    // A predicate that accepts the terminal state gets it.
    let gave_up = handle
        .wait_for(Duration::from_secs(1), State::is_terminal)
        .await
        .unwrap();
    assert!(matches!(gave_up, State::GaveUp { .. }));
}
