//! Regression tests of the defects a review found in the WebSocket write path (issue 9), each
//! named after what it proves, against a peer on 127.0.0.1 that misbehaves on cue
//! (`tests/adversary`). Each of them failed on the client before the single-writer rewrite.
//!
//! These talk over real sockets, so they run in real time; every wait is bounded.

mod adversary;

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use adversary::{Peer, Script, sockets_to, tagged};
use futures_util::{SinkExt, StreamExt};
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{Message, SendError, WhenFull, WsClient, WsClientBuilder};
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
