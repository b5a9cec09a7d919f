//! Regression tests of the defects a review found in the WebSocket write path (issue 9), each
//! named after what it proves, against a peer on 127.0.0.1 that misbehaves on cue
//! (`tests/adversary`). Each of them failed on the client before the single-writer rewrite.
//!
//! These talk over real sockets, so they run in real time; every wait is bounded.
#![cfg(feature = "ws")]

mod adversary;

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use adversary::{Peer, Script, sockets_to, tagged};
use futures_util::{SinkExt, StreamExt};
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{
    Message, SendError, SettingError, WhenFull, WsClient, WsClientBuilder, WsError,
};
use tower_epoch::{Handle, State};

const MS: Duration = Duration::from_millis(1);
/// More than loopback's socket buffers hold, so a write to a peer that reads nothing blocks.
const BLOCKING: usize = 32 << 20;

fn builder(url: String) -> WsClientBuilder<Schedule> {
    WsClient::builder(url)
        .unwrap()
        .backoff(Schedule::new([20 * MS]).unwrap())
        .no_heartbeat()
        .close_step_timeout(300 * MS)
        .layer(|l| {
            l.with_connect_timeout(Duration::from_secs(1))
                .with_close_timeout(Duration::from_secs(1))
        })
}

async fn bounded<F: Future>(within: Duration, what: &str, future: F) -> F::Output {
    tokio::time::timeout(within, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {within:?}"))
}

async fn connected(handle: &Handle) -> tower_epoch::Epoch {
    let mut states = handle.subscribe();
    let state = bounded(Duration::from_secs(3), "connected", async {
        states.wait_for(State::is_connected).await.unwrap().clone()
    })
    .await;
    state.epoch().expect("connected has an epoch")
}

/// Lets the other tasks of a current-thread runtime run until they wait.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn ack_of(message: &Message) -> Option<u64> {
    message.to_text().ok()?.strip_prefix("ack:")?.parse().ok()
}

/// Defect 1: a write in flight when its connection is released held the connection (the
/// writer's turn and a copy of it) across polls, so the socket outlived `disconnect()`, and
/// after a reconnect later sends never resolved.
#[tokio::test]
async fn a_release_cancels_the_write_in_flight_and_no_socket_outlives_the_teardown() {
    let peer = Peer::start(Script::default()).await;
    peer.stop_reading();
    let (client, _incoming) = builder(peer.url()).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;

    let big = tokio::spawn({
        let client = client.clone();
        async move { client.send(tagged("big", BLOCKING)).await }
    });
    settle().await;
    assert_eq!(client.stats().written, 0, "the peer reads nothing");

    bounded(Duration::from_secs(3), "disconnect", handle.disconnect()).await;
    assert_eq!(handle.ledger().closed, 1);
    assert_eq!(
        sockets_to(peer.addr.port()),
        0,
        "the released connection's socket is closed once its teardown is done"
    );

    // The message cut short goes to the next connection, whole; later sends resolve.
    peer.read();
    handle.connect().unwrap();
    connected(&handle).await;
    let seq = bounded(Duration::from_secs(5), "the big send", big)
        .await
        .unwrap()
        .expect("written on the next connection");
    assert_eq!(seq, 1);
    bounded(
        Duration::from_secs(3),
        "a later send",
        client.send(tagged("after", 8)),
    )
    .await
    .expect("written");
    peer.wait_for(Duration::from_secs(3), "big then after", |c| {
        c.len() == 2 && c[1].tags == ["big", "after"]
    })
    .await;
    assert!(
        peer.conns()[0].tags.is_empty(),
        "the released connection got no complete message"
    );
}

/// Defect 2: a batch cut by the close-step timeout of a graceful close went back to the front
/// of the queue without waking a writer. The next connection, up meanwhile (rule 6), had
/// already written newer messages, and wrote the older ones only when something newer came:
/// B1, A1, A2, A3, B2.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_cut_at_close_goes_back_first_and_is_written_without_a_flush() {
    let peer = Peer::start(Script::default()).await;
    peer.stop_reading_on(0);
    let (client, _incoming) = builder(peer.url()).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;
    client.feed(tagged("A1", BLOCKING)).unwrap();
    client.feed(tagged("A2", 8)).unwrap();
    client.feed(tagged("A3", 8)).unwrap();
    settle().await;

    // Connect while the first connection still writes its queue in its close.
    let closing = tokio::spawn(handle.disconnect());
    handle.connect().unwrap();
    connected(&handle).await;
    client.feed(tagged("B1", 8)).unwrap();
    // The close-step timeout cuts the first connection's write; what it held comes back
    // first and goes out on the second connection with nothing more sent.
    bounded(Duration::from_secs(3), "disconnect", closing)
        .await
        .unwrap();
    peer.wait_for(
        Duration::from_secs(5),
        "A1 A2 A3 B1 on the second connection",
        |c| c.len() == 2 && c[1].tags.len() == 4,
    )
    .await;
    client.feed(tagged("B2", 8)).unwrap();
    peer.wait_for(Duration::from_secs(5), "B2", |c| c[1].tags.len() == 5)
        .await;
    assert_eq!(peer.conns()[1].tags, ["A1", "A2", "A3", "B1", "B2"]);
    assert!(peer.conns()[0].tags.is_empty());
}

/// Defect 3: an awaited `send` that found the connection idle became the writer for
/// everybody: it went on writing what others queued for as long as the queue did not empty,
/// and stayed pending long after its own message was written.
#[tokio::test(flavor = "current_thread")]
async fn an_awaited_send_resolves_once_written_while_a_producer_keeps_feeding() {
    const TOTAL: u64 = 100_000;
    // A slow reader: a millisecond per frame.
    let peer = Peer::start(Script {
        read_delay: MS,
        ..Script::default()
    })
    .await;
    let (client, _incoming) = builder(peer.url()).queue_capacity(64).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;

    // The awaited send's write blocks until the peer reads.
    peer.stop_reading();
    let send = tokio::spawn({
        let client = client.clone();
        async move { client.send(tagged("m", BLOCKING)).await }
    });
    settle().await;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn({
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        async move {
            // Large enough that the socket, not the producer, sets the pace.
            let payload = tagged("p", 16 << 10);
            let mut fed = 0;
            while fed < TOTAL && !stop.load(Ordering::Relaxed) {
                match client.feed(payload.clone()) {
                    Ok(_) => fed += 1,
                    Err(SendError::Full { .. }) => tokio::task::yield_now().await,
                    Err(error) => panic!("feed: {error}"),
                }
            }
        }
    });
    settle().await;
    peer.read();
    let seq = bounded(Duration::from_secs(20), "the awaited send", send)
        .await
        .unwrap()
        .expect("written");
    let accepted_since = client.stats().accepted - seq;
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    assert!(
        accepted_since < 5_000,
        "the send resolved {accepted_since} messages after its own: it waited for the queue \
         to empty rather than for its own write"
    );
}

/// Defect 4: a full `Incoming` (a consumer that reads slowly) blocked the connection's loop:
/// background writes and the heartbeat stalled.
#[tokio::test]
async fn a_consumer_that_reads_slowly_stalls_neither_writes_nor_the_heartbeat() {
    let peer = Peer::start(Script {
        echo: true,
        ..Script::default()
    })
    .await;
    let (client, mut incoming) = builder(peer.url())
        .incoming_capacity(1)
        .heartbeat(20 * MS, 60 * MS)
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let epoch = connected(&handle).await;
    for n in 0..20 {
        client.feed(tagged(&format!("t{n}"), 8)).unwrap();
    }
    peer.wait_for(Duration::from_secs(3), "all twenty", |c| {
        c[0].tags.len() == 20
    })
    .await;
    // Pings go on while nobody reads, and the unread pongs are no heartbeat failure.
    peer.wait_for(Duration::from_secs(3), "ten pings", |c| c[0].pings >= 10)
        .await;
    assert!(matches!(handle.state(), State::Connected { epoch: e } if e == epoch));
    assert_eq!(handle.ledger().failures, 0);

    for n in 0..20 {
        let received = bounded(Duration::from_secs(3), "an echo", incoming.next())
            .await
            .expect("open");
        assert_eq!(received.epoch, epoch);
        assert_eq!(
            adversary::tag_of(&received.message).unwrap(),
            format!("t{n}")
        );
    }
}

/// Defect 5: in at-least-once mode an acknowledgement ahead of the writes retired messages
/// that were never written; they vanished from the queue and from `take_unsent`.
#[tokio::test(flavor = "current_thread")]
async fn an_acknowledgement_ahead_of_the_writes_retires_nothing() {
    let peer = Peer::start(Script::default()).await;
    let (client, _incoming) = builder(peer.url()).at_least_once(ack_of).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;

    // The first message's write blocks; the next four wait in the queue behind it.
    peer.stop_reading();
    client
        .feed_with(|seq| tagged(&format!("{seq}"), BLOCKING))
        .unwrap();
    settle().await;
    for _ in 2..=5 {
        client
            .feed_with(|seq| tagged(&format!("{seq}"), 8))
            .unwrap();
    }
    settle().await;
    peer.say(Message::text("ack:1000"));
    bounded(Duration::from_secs(3), "the ack ahead to be read", async {
        while client.stats().acks_ignored == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(client.stats().held, 5, "the early ack retired nothing");
    assert_eq!(client.stats().acknowledged, 0);

    peer.read();
    peer.wait_for(Duration::from_secs(5), "the five", |c| {
        c[0].tags == ["1", "2", "3", "4", "5"]
    })
    .await;
}

/// Defect 8: a `WsSink` that outlived its `WsClient` failed with `Closed` and lost the message.
#[tokio::test]
async fn a_sink_keeps_its_client_alive() {
    let peer = Peer::start(Script::default()).await;
    let (client, _incoming) = builder(peer.url()).build().unwrap();
    client.handle().connect().unwrap();
    connected(client.handle()).await;
    let mut sink = client.sink();
    drop(client);
    // Were the sink not keeping it alive, the client would now shut down and say goodbye.
    let goodbye = peer.saw(Duration::from_secs(1), |c| {
        c[0].close.is_some() || c[0].ended
    });
    assert!(!goodbye.await, "the client shut down under its sink");
    bounded(
        Duration::from_secs(3),
        "the sink's send",
        sink.send(tagged("s", 8)),
    )
    .await
    .expect("the client lives while its sink does");
    peer.wait_for(Duration::from_secs(3), "the sink's message", |c| {
        c[0].tags == ["s"]
    })
    .await;
}

/// Defect 9: while a close waited for the peer's Close, incoming messages went through
/// `try_send` and were dropped when `Incoming` was full.
#[tokio::test(flavor = "current_thread")]
async fn messages_that_arrive_while_closing_wait_for_room_in_incoming() {
    let peer = Peer::start(Script::default()).await;
    let (client, mut incoming) = builder(peer.url()).incoming_capacity(1).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let epoch = connected(&handle).await;
    // The close waits for the peer's Close; the peer sends five messages first.
    peer.stop_reading();
    let closing = tokio::spawn(handle.disconnect());
    settle().await;
    for n in 1..=5 {
        peer.say(tagged(&format!("c{n}"), 4));
    }
    settle().await;
    peer.read();
    for n in 1..=5 {
        let received = bounded(
            Duration::from_secs(3),
            "a message sent during the close",
            incoming.next(),
        )
        .await
        .expect("open");
        assert_eq!(received.epoch, epoch);
        assert_eq!(
            adversary::tag_of(&received.message).unwrap(),
            format!("c{n}")
        );
    }
    bounded(Duration::from_secs(3), "disconnect", closing)
        .await
        .unwrap();
}

/// Defect 9: each idle `WsSink` reserved up to 128 slots of the queue, so that `send` found no
/// room though nothing was queued.
#[tokio::test]
async fn idle_sinks_hold_no_room_that_send_needs() {
    let peer = Peer::start(Script::default()).await;
    let (client, _incoming) = builder(peer.url())
        .queue_capacity(4)
        .when_full(WhenFull::Fail)
        .build()
        .unwrap();
    let mut sinks = [client.sink(), client.sink()];
    for sink in &mut sinks {
        bounded(
            Duration::from_secs(1),
            "an idle sink's readiness",
            poll_fn(|cx| sink.poll_ready_unpin(cx)),
        )
        .await
        .unwrap();
    }
    client
        .feed(tagged("f1", 1))
        .expect("room with two idle sinks");
    client
        .feed(tagged("f2", 1))
        .expect("room with two idle sinks");
}

/// Defect 7: `heartbeat(Duration::MAX, ..)` overflowed `Instant + Duration` in the driver,
/// which panicked, and `Incoming` never ended. Settings out of range are typed errors at
/// `build()`, before anything runs.
#[tokio::test(start_paused = true)]
async fn settings_out_of_range_are_typed_errors_at_build() {
    let builder = || WsClient::builder("ws://127.0.0.1:9/").unwrap();
    let second = Duration::from_secs(1);
    let cases = [
        // The client sends through its own queue, not the `Reconnect` service: no request
        // would hold the connection or start it (a busy client was closed as idle).
        (
            builder().layer(move |l| l.with_idle_timeout(second)),
            SettingError::Unsupported {
                setting: "with_idle_timeout",
            },
        ),
        (
            builder().layer(|l| l.connect_on_demand()),
            SettingError::Unsupported {
                setting: "connect_on_demand",
            },
        ),
        (
            builder().heartbeat(Duration::MAX, second),
            SettingError::DurationTooLong {
                setting: "heartbeat",
                value: Duration::MAX,
            },
        ),
        (
            builder().heartbeat(second, Duration::MAX),
            SettingError::DurationTooLong {
                setting: "heartbeat",
                value: Duration::MAX,
            },
        ),
        (
            builder().heartbeat(Duration::ZERO, second),
            SettingError::ZeroDuration {
                setting: "heartbeat",
            },
        ),
        (
            builder().heartbeat(second, Duration::ZERO),
            SettingError::ZeroDuration {
                setting: "heartbeat",
            },
        ),
        (
            builder().queue_capacity(0),
            SettingError::ZeroCapacity {
                setting: "queue_capacity",
            },
        ),
        (
            builder().incoming_capacity(0),
            SettingError::ZeroCapacity {
                setting: "incoming_capacity",
            },
        ),
        (
            builder().queue_capacity(usize::MAX),
            SettingError::CapacityTooLarge {
                setting: "queue_capacity",
                value: usize::MAX,
                max: tokio::sync::Semaphore::MAX_PERMITS,
            },
        ),
        (
            builder().incoming_capacity(usize::MAX),
            SettingError::CapacityTooLarge {
                setting: "incoming_capacity",
                value: usize::MAX,
                max: tokio::sync::Semaphore::MAX_PERMITS,
            },
        ),
        // tungstenite asserts this when a connection opens; the client refuses it at build.
        (
            builder().connector(
                tower_epoch::ws::WsConnector::new().with_config(
                    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                        .max_write_buffer_size(1_000),
                ),
            ),
            SettingError::WriteBuffer {
                write_buffer_size: 128 * 1024,
                max_write_buffer_size: 1_000,
            },
        ),
    ];
    for (builder, expected) in cases {
        match builder.build() {
            Err(WsError::Setting(error)) => assert_eq!(error, expected),
            Err(other) => panic!("expected {expected:?}, got {other:?}"),
            Ok(_) => panic!("expected {expected:?}, the client was built"),
        }
    }
    let (client, _incoming) = builder()
        .queue_capacity(tokio::sync::Semaphore::MAX_PERMITS)
        .build()
        .expect("the largest capacity allowed");
    client.feed(tagged("in range", 1)).unwrap();
}

/// Defect 7, on a connection: a heartbeat far in the future (a century) arms its deadlines
/// without overflow, and the connection works.
#[tokio::test]
async fn a_century_long_heartbeat_runs_without_a_panic() {
    let century = Duration::from_secs(100 * 365 * 86_400);
    let peer = Peer::start(Script::default()).await;
    let (client, _incoming) = builder(peer.url())
        .heartbeat(century, century)
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let epoch = connected(&handle).await;
    bounded(
        Duration::from_secs(3),
        "a send",
        client.send(tagged("m", 1)),
    )
    .await
    .expect("written");
    assert!(matches!(handle.state(), State::Connected { epoch: e } if e == epoch));
}

/// Defect 9: a `SendFuture` cut while it waited for room dropped its message, with no way to
/// wait for room safely. `reserve` holds room and no message; a send cut after its message was
/// accepted withdraws nothing.
#[tokio::test(start_paused = true)]
async fn a_wait_for_room_cut_short_loses_nothing_with_reserve() {
    // Never connected: nothing is written, nothing leaves but what is taken back.
    let (client, _incoming) = WsClient::builder("ws://127.0.0.1:9/")
        .unwrap()
        .queue_capacity(2)
        .no_heartbeat()
        .build()
        .unwrap();
    // Accepted, then cut while it waits for delivery: the message stays the client's.
    let cut = tokio::time::timeout(10 * MS, client.send(tagged("accepted", 1))).await;
    assert!(cut.is_err(), "nothing delivers it");
    client.feed(tagged("fed", 1)).unwrap();
    assert_eq!(client.stats().held, 2);

    // Full: a wait for room cut short takes nothing and holds nothing.
    assert!(
        tokio::time::timeout(10 * MS, client.reserve())
            .await
            .is_err()
    );
    assert_eq!(client.stats().held, 2);

    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            let permit = client.reserve().await.expect("room comes");
            let mut sending = std::pin::pin!(permit.send(tagged("reserved", 1)));
            let accepted = poll_fn(|cx| match sending.as_mut().poll(cx) {
                std::task::Poll::Pending => std::task::Poll::Ready(sending.seq()),
                std::task::Poll::Ready(outcome) => panic!("resolved early: {outcome:?}"),
            });
            accepted.await
        }
    });
    settle().await;
    let unsent: Vec<_> = client
        .take_unsent()
        .into_iter()
        .map(|(seq, m)| (seq, adversary::tag_of(&m).unwrap()))
        .collect();
    assert_eq!(unsent, [(1, "accepted".into()), (2, "fed".into())]);
    let seq = bounded(Duration::from_secs(1), "the reserved send", waiting)
        .await
        .unwrap();
    assert_eq!(seq, Some(3));
    assert_eq!(client.stats().held, 1);
}

/// Messages received while nobody holds `Incoming` are counted, not silently gone: on the
/// installed connection and during its close.
#[tokio::test(flavor = "current_thread")]
async fn messages_nobody_reads_are_counted_as_undelivered() {
    let peer = Peer::start(Script::default()).await;
    let (client, incoming) = builder(peer.url()).build().unwrap();
    drop(incoming);
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;
    for n in 0..3 {
        peer.say(tagged(&format!("open{n}"), 1));
    }
    bounded(Duration::from_secs(3), "three read", async {
        while client.stats().received < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    peer.stop_reading();
    let closing = tokio::spawn(handle.disconnect());
    settle().await;
    peer.say(tagged("closing", 1));
    settle().await;
    peer.read();
    bounded(Duration::from_secs(3), "disconnect", closing)
        .await
        .unwrap();
    let stats = client.stats();
    assert_eq!((stats.received, stats.undelivered), (4, 4), "{stats:?}");
}

/// The connector's protocol settings reach the connection: a message above its limit fails it.
#[tokio::test]
async fn the_connectors_protocol_limits_apply() {
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    use tower_epoch::ws::WsConnector;

    let peer = Peer::start(Script::default()).await;
    let limited = WebSocketConfig::default().max_message_size(Some(64));
    let (client, _incoming) = builder(peer.url())
        .connector(WsConnector::new().with_config(limited))
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let epoch = connected(&handle).await;
    peer.say(tagged("too long", 100));
    let mut states = handle.subscribe();
    bounded(Duration::from_secs(3), "the failure", async {
        states
            .wait_for(|s| s.epoch() != Some(epoch))
            .await
            .unwrap()
            .clone()
    })
    .await;
    assert_eq!(handle.ledger().failures, 1);
}

// ---- found by review, after the rewrite -------------------------------------------------

/// A closing connection that waits for the peer's (slow) Close holds no room in `Incoming`:
/// the installed connection delivers meanwhile, with `incoming_capacity(1)`.
#[tokio::test(flavor = "current_thread")]
async fn a_closing_connection_does_not_hold_back_the_installed_ones_deliveries() {
    let peer = Peer::start(Script {
        echo: true,
        close_reply_delay: Duration::from_secs(2),
        ..Script::default()
    })
    .await;
    let (client, mut incoming) = builder(peer.url())
        .incoming_capacity(1)
        .close_step_timeout(Duration::from_secs(3))
        .layer(|l| l.with_close_timeout(Duration::from_secs(5)))
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;
    let closing = tokio::spawn(handle.disconnect());
    peer.wait_for(Duration::from_secs(3), "the first Close", |c| {
        c[0].close.is_some()
    })
    .await;
    handle.connect().unwrap();
    let epoch = connected(&handle).await;
    client.send(tagged("hello", 4)).await.unwrap();
    let echo = bounded(Duration::from_secs(5), "the echo", incoming.next())
        .await
        .unwrap();
    assert_eq!(echo.epoch, epoch);
    assert!(
        !closing.is_finished(),
        "delivered while the first connection still waits for the peer's Close"
    );
    bounded(Duration::from_secs(5), "disconnect", closing)
        .await
        .unwrap();
}

/// A message larger than any connection can take (the connector's `max_write_buffer_size`)
/// is refused when offered, instead of failing every connection it is written to.
#[tokio::test(flavor = "current_thread")]
async fn a_message_over_the_write_buffer_limit_is_refused_when_offered() {
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    use tower_epoch::ws::WsConnector;

    let peer = Peer::start(Script::default()).await;
    let limited = WebSocketConfig::default().max_write_buffer_size(256 << 10);
    let (client, _incoming) = builder(peer.url())
        .connector(WsConnector::new().with_config(limited))
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;
    let max = (256 << 10) - (128 << 10) - 14;
    match client.send(tagged("big", 300 << 10)).await {
        Err(SendError::TooLarge { message, max: m }) => {
            assert_eq!(m, max);
            assert_eq!(adversary::tag_of(&message).unwrap(), "big");
        }
        other => panic!("expected too large, got {other:?}"),
    }
    let fits = tagged("fits", max - "fits|".len());
    bounded(
        Duration::from_secs(3),
        "the largest that fits",
        client.send(fits),
    )
    .await
    .expect("written");
    peer.wait_for(Duration::from_secs(3), "it", |c| c[0].tags == ["fits"])
        .await;
    assert_eq!(handle.ledger().failures, 0);
}

/// A `make` closure that panics under the client's lock gives back the room it was given.
#[tokio::test(start_paused = true)]
async fn a_panicking_make_gives_its_room_back() {
    let (client, _incoming) = WsClient::builder("ws://127.0.0.1:9/")
        .unwrap()
        .queue_capacity(1)
        .no_heartbeat()
        .build()
        .unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        client.feed_with(|_| panic!("user code panics"))
    }));
    assert!(caught.is_err());
    assert_eq!(client.stats().held, 0);
    client.feed(tagged("next", 1)).expect("the room came back");
}

/// A panic in the at-least-once acknowledgement function is a failure of the connection that
/// read the message, not the end of the client: it reconnects and delivers.
#[tokio::test(flavor = "current_thread")]
async fn a_panicking_ack_function_fails_its_connection_not_the_client() {
    let peer = Peer::start(Script {
        echo: true,
        ..Script::default()
    })
    .await;
    let panicked = Arc::new(AtomicBool::new(false));
    let once = Arc::clone(&panicked);
    let (client, _incoming) = builder(peer.url())
        .at_least_once(move |m: &Message| -> Option<u64> {
            if m.to_text().ok()?.starts_with("boom|") && !once.swap(true, Ordering::SeqCst) {
                panic!("the acknowledgement function panics");
            }
            None
        })
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let first = connected(&handle).await;
    client.feed(tagged("boom", 1)).unwrap();
    let mut states = handle.subscribe();
    bounded(Duration::from_secs(3), "a new connection", async {
        states
            .wait_for(|s| s.is_connected() && s.epoch() != Some(first))
            .await
            .unwrap()
            .clone()
    })
    .await;
    assert!(panicked.load(Ordering::SeqCst));
    // Not acknowledged: written again on the new connection.
    peer.wait_for(Duration::from_secs(3), "boom on both", |c| {
        c.len() == 2 && c[1].tags == ["boom"]
    })
    .await;
    assert_eq!(handle.ledger().failures, 1);
    assert!(handle.state().is_connected());
}

// ---- found by mutation testing ----------------------------------------------------------

/// A peer that closes gets the client's reply to its Close, and a peer's ping gets a pong,
/// with nothing else written.
#[tokio::test(flavor = "current_thread")]
async fn the_peers_close_and_pings_are_answered() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let peer = Peer::start(Script {
        greet: vec![Message::Ping(Default::default())],
        ..Script::default()
    })
    .await;
    let (client, _incoming) = builder(peer.url()).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;
    peer.wait_for(Duration::from_secs(3), "a pong", |c| c[0].pongs == 1)
        .await;

    peer.say(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })));
    peer.wait_for(Duration::from_secs(3), "the reply to its Close", |c| {
        c[0].close == Some(1000)
    })
    .await;
    let mut states = handle.subscribe();
    bounded(Duration::from_secs(3), "idle after a normal close", async {
        states
            .wait_for(|s| matches!(s, State::Idle))
            .await
            .unwrap()
            .clone()
    })
    .await;
}

/// A close cut by the layer's close timeout in the middle of writing what it owed (its
/// teardown dropped) gives the batch back and lets the next connection write: nothing waits
/// for it forever.
#[tokio::test(flavor = "current_thread")]
async fn a_close_cut_by_the_close_timeout_gives_its_batch_back() {
    let peer = Peer::start(Script::default()).await;
    peer.stop_reading_on(0);
    let (client, _incoming) = builder(peer.url())
        .close_step_timeout(Duration::from_secs(10))
        .layer(|l| {
            l.with_connect_timeout(Duration::from_secs(1))
                .with_close_timeout(300 * MS)
        })
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle).await;
    client.feed(tagged("cut", BLOCKING)).unwrap();
    settle().await;
    bounded(Duration::from_secs(3), "disconnect", handle.disconnect()).await;
    assert_eq!(handle.ledger().close_timeouts, 1);
    handle.connect().unwrap();
    connected(&handle).await;
    bounded(
        Duration::from_secs(10),
        "a flush on the next connection",
        client.flush(),
    )
    .await
    .unwrap();
    peer.wait_for(Duration::from_secs(5), "the cut message, whole", |c| {
        c.len() == 2 && c[1].tags == ["cut"]
    })
    .await;
}
