//! The WebSocket client against independent peers that nobody here wrote: the node `ws` package
//! and Python's `websockets`, run as child processes on 127.0.0.1 with an ephemeral port
//! (`tests/peers/`). Each peer plays a persona: `echo`, `slow-handshake`, `reject-503`, `drop`,
//! `stop-reading` (see the scripts).
//!
//! Install the peers with `bash .ci/install-peers` (into the ignored folder `.peers`). Without
//! them each test says so and passes, except under `CI=true`, where a missing peer fails.
//!
//! These tests talk to real processes, so they use real time. Every wait is bounded. States are
//! awaited through the handle's subscription; what has no notification of its own (the client's
//! counters, the descriptors) is polled every few milliseconds. The only sleeps are where
//! wall-clock time itself is the subject (heartbeats going by, a deliberate disconnect that must
//! not be followed by attempts). The tests run one at a time (a process-wide lock), each in a
//! runtime of its own, and each checks that the process's open file descriptors come back to
//! their count from before it; where a close is cut, that the socket to the peer is gone at once.
#![cfg(feature = "ws")]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite;
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{Incoming, Message, Received, SendError, WsClient, WsClientBuilder, WsError};
use tower_epoch::{Epoch, Error, Handle, State};

const fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Scheduling and process noise allowed on top of a configured bound (a loaded 2-core machine).
const SLACK: Duration = ms(1000);
/// The connect timeout where the peer is healthy.
const CONNECT_TIMEOUT: Duration = ms(2000);
/// Bound on waits for things that should happen promptly (an echo, a flush).
const WAIT: Duration = ms(5000);
/// Bound on a peer's start, up to its `PORT` line.
const PEER_START: Duration = ms(15_000);
/// Bound on the file descriptors coming back after a test or a close.
const FD_SETTLE: Duration = ms(5000);
/// Bound on one whole test.
const TEST_BOUND: Duration = ms(60_000);
/// The backoff of most tests; its largest delay is [`MAX_DELAY`]. Each delay is long enough for
/// a test to see the `WaitingToRetry` state it publishes on a loaded machine.
const DELAYS: [u64; 3] = [100, 200, 300];
const MAX_DELAY: Duration = ms(300);
/// The delays of the peers' personas (passed to them; these are also their defaults).
const HANDSHAKE_DELAY: Duration = ms(2000);
const DROP_AFTER: Duration = ms(300);

// ---------------------------------------------------------------------------------------------
// The tests: each scenario below, against each kind of peer.

macro_rules! peer_tests {
    ($($scenario:ident),* $(,)?) => {
        mod node {
            $(
                #[test]
                fn $scenario() {
                    super::run(super::Kind::Node, stringify!($scenario), super::$scenario);
                }
            )*
        }
        mod python {
            $(
                #[test]
                fn $scenario() {
                    super::run(super::Kind::Python, stringify!($scenario), super::$scenario);
                }
            )*
        }
    };
}

peer_tests!(
    echo,
    reject_503,
    slow_handshake,
    drop_without_close,
    stop_reading,
    sigkill_mid_stream_20_times,
    sigstop_during_handshake,
    sigstop_during_close,
);

/// `echo`: text and binary messages come back tagged with the connection's epoch, heartbeats
/// are answered, at-least-once messages are all acknowledged, and a disconnect is graceful (the
/// peer answers the Close well within the step timeout).
async fn echo(kind: Kind) {
    let peer = Peer::start(kind, "echo").await;
    let heartbeat = ms(100);
    let (client, mut incoming) = WsClient::builder(peer.url())
        .unwrap()
        .heartbeat(heartbeat, ms(500))
        .backoff(schedule())
        .close_step_timeout(ms(2000))
        .layer(|layer| {
            layer
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_close_timeout(ms(3000))
        })
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let epoch = connected(&handle, CONNECT_TIMEOUT + SLACK).await;

    let text = Message::text("hello from tower-epoch");
    let binary = Message::binary(vec![0u8, 1, 2, 0x7f, 0x80, 0xfe, 0xff]);
    for message in [text.clone(), binary.clone()] {
        bounded(WAIT, "a send", client.send(message))
            .await
            .expect("written");
    }
    for expected in [text, binary] {
        let received = next(&mut incoming).await;
        assert_eq!(received.epoch, epoch, "tagged with its connection's epoch");
        assert_eq!(received.message, expected, "echoed unchanged");
    }

    // Wall-clock time is the subject here: several heartbeats go by and each ping is answered.
    sleep(heartbeat * 5).await;
    assert!(
        handle.state().is_connected() && handle.state().epoch() == Some(epoch),
        "still the same connection after heartbeats: {}",
        handle.state()
    );
    assert_eq!(handle.ledger().failures, 0, "{:?}", handle.ledger());

    let took = disconnect(&handle, ms(3000) + SLACK).await;
    assert!(
        took < ms(1000),
        "the peer answered the Close: no step timeout ran out ({took:?})"
    );
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    let ledger = handle.ledger();
    assert_eq!((ledger.closed, ledger.close_timeouts), (1, 0), "{ledger:?}");
    drop(handle);
    drop(client);
    assert!(
        bounded(WAIT, "the incoming stream's end", incoming.next())
            .await
            .is_none(),
        "the incoming stream ends when the client shuts down"
    );

    // At-least-once: every `<seq>:<payload>` is answered with `ack:<seq>`.
    let (client, incoming) = builder(&peer).at_least_once(ack_of).build().unwrap();
    let acks = Acks::collect(incoming);
    let handle = client.handle().clone();
    handle.connect().unwrap();
    connected(&handle, CONNECT_TIMEOUT + SLACK).await;
    const N: u64 = 200;
    for _ in 0..N {
        client
            .feed_with(|seq| Message::text(format!("{seq}:payload")))
            .expect("room in the queue");
    }
    bounded(WAIT, "a flush", client.flush())
        .await
        .expect("flushed");
    // At-least-once: the flush resolved once everything was acknowledged.
    let stats = client.stats();
    assert_eq!(
        (stats.accepted, stats.acknowledged, stats.resent, stats.held),
        (N, N, 0, 0),
        "{stats:?}"
    );
    wait_until(WAIT, "every acknowledgement read from `Incoming`", || {
        acks.len() == N as usize
    })
    .await;
    assert_eq!(acks.seen(), (1..=N).collect::<BTreeSet<_>>());
    disconnect(&handle, ms(5000) + SLACK).await;
    assert_eq!(handle.ledger().close_timeouts, 0);
    drop(handle);
    drop(client);
    acks.finish().await;
}

/// `reject-503`: the upgrade's 503 is `WsError::Rejected { status: 503 }` in the published
/// state, and the client keeps retrying on its backoff schedule until a deliberate disconnect,
/// after which no attempt follows.
async fn reject_503(kind: Kind) {
    let peer = Peer::start(kind, "reject-503").await;
    let (client, _incoming) = builder(&peer).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();

    let mut first_failure = None;
    for (retry, delay) in DELAYS.into_iter().enumerate() {
        let attempt = retry as u32 + 2;
        let state = wait_state(
            &handle,
            CONNECT_TIMEOUT + MAX_DELAY + SLACK,
            &format!("the failure before attempt {attempt}"),
            // Armed: the driver has published the timer's delay.
            |s| matches!(s, State::WaitingToRetry { attempt: a, delay: Some(_), .. } if *a == attempt),
        )
        .await;
        first_failure.get_or_insert_with(Instant::now);
        let State::WaitingToRetry {
            delay: published, ..
        } = &state
        else {
            unreachable!("waited for it");
        };
        assert!(
            matches!(layer_error(&state), Some(Error::Connect(_))),
            "a failed connect attempt: {state}"
        );
        assert!(
            matches!(ws_error(&state), Some(WsError::Rejected { status: 503 })),
            "typed as a rejection with the status: {state} ({:?})",
            ws_error(&state)
        );
        assert_eq!(*published, Some(ms(delay)), "the backoff schedule: {state}");
    }
    // Attempts 2 and 3 waited out their delays before failing in turn.
    let waited = first_failure.expect("seen").elapsed();
    assert!(
        waited >= ms(DELAYS[0] + DELAYS[1]) - ms(50),
        "backoff honoured: {waited:?}"
    );
    let ledger = handle.ledger();
    assert!(ledger.attempts >= 3 && ledger.failures >= 3, "{ledger:?}");
    assert_eq!(
        ledger.opened, 0,
        "no connection was ever opened: {ledger:?}"
    );

    let took = disconnect(&handle, SLACK).await;
    assert!(took < ms(100), "nothing to close: {took:?}");
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    let attempts = handle.ledger().attempts;
    // Wall-clock time is the subject: longer than any backoff delay, and no attempt follows.
    sleep(MAX_DELAY * 2).await;
    assert_eq!(
        handle.ledger().attempts,
        attempts,
        "a deliberate disconnect stops the retries"
    );
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
}

/// `slow-handshake` (the upgrade answered after 2 s): a connect timeout of 500 ms cuts the
/// attempt with `Error::ConnectTimeout`; meanwhile a client with a 4 s connect timeout connects
/// after the peer's delay, at its first attempt.
async fn slow_handshake(kind: Kind) {
    let peer = Peer::start(kind, "slow-handshake").await;
    let short = ms(500);
    let long = ms(4000);
    let impatient = async {
        let (client, _incoming) = WsClient::builder(peer.url())
            .unwrap()
            .backoff(Schedule::new([ms(10_000)]).unwrap())
            .layer(move |layer| layer.with_connect_timeout(short))
            .build()
            .unwrap();
        let handle = client.handle();
        let started = Instant::now();
        handle.connect().unwrap();
        let state = wait_state(handle, short + SLACK, "the connect timeout", |s| {
            matches!(s, State::WaitingToRetry { .. })
        })
        .await;
        let took = started.elapsed();
        assert!(
            matches!(layer_error(&state), Some(Error::ConnectTimeout(d)) if *d == short),
            "typed as a connect timeout: {state}"
        );
        assert!(took >= short - ms(5), "not before the timeout: {took:?}");
        assert_eq!(handle.ledger().opened, 0, "{:?}", handle.ledger());
        disconnect(handle, SLACK).await;
        took
    };
    let patient = async {
        let (client, mut incoming) = WsClient::builder(peer.url())
            .unwrap()
            .backoff(schedule())
            .layer(move |layer| layer.with_connect_timeout(long))
            .build()
            .unwrap();
        let handle = client.handle();
        let started = Instant::now();
        handle.connect().unwrap();
        let epoch = connected(handle, long + SLACK).await;
        let took = started.elapsed();
        assert!(
            took >= HANDSHAKE_DELAY - ms(50),
            "the peer's delay: {took:?}"
        );
        let ledger = handle.ledger();
        assert_eq!((ledger.attempts, ledger.failures), (1, 0), "{ledger:?}");
        bounded(WAIT, "a send", client.send(Message::text("late but fine")))
            .await
            .expect("written");
        let received = next(&mut incoming).await;
        assert_eq!(received.epoch, epoch);
        assert_eq!(received.message, Message::text("late but fine"));
        disconnect(handle, ms(5000) + SLACK).await;
        assert_eq!(handle.ledger().close_timeouts, 0);
        took
    };
    let (cut, connected_after) = tokio::join!(impatient, patient);
    println!(
        "{}: connect timeout cut after {cut:?}; connected after {connected_after:?}",
        kind.name()
    );
}

/// `drop` (the socket destroyed without a Close, after the first message or after 300 ms): each
/// drop is a typed failure of that connection's epoch, and the client reconnects after the
/// published backoff delay, which grows (100, 200, 300 ms) because no connection stays up for
/// the stable period: a peer that accepts and drops causes no reconnect storm.
async fn drop_without_close(kind: Kind) {
    let peer = Peer::start(kind, "drop").await;
    let (client, _incoming) = builder(&peer).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let mut epoch = connected(&handle, CONNECT_TIMEOUT + SLACK).await;
    let mut seen = Vec::new();
    for (round, delay) in DELAYS.into_iter().enumerate() {
        // Rounds 0 and 2: a message makes the peer drop; round 1: its timer does.
        if round != 1 {
            client
                .feed(Message::text("the peer drops after this"))
                .unwrap();
        }
        let failed = wait_state(
            &handle,
            DROP_AFTER + SLACK,
            "the drop noticed",
            |s| matches!(s, State::WaitingToRetry { epoch: e, delay: Some(_), .. } if *e == epoch),
        )
        .await;
        let noticed = Instant::now();
        assert!(
            matches!(layer_error(&failed), Some(Error::ConnectionFailed(_))),
            "a failure of the installed connection: {failed}"
        );
        assert!(is_drop(ws_error(&failed)), "typed as a drop: {failed}");
        seen.push(describe(&failed));
        let State::WaitingToRetry {
            delay: published, ..
        } = failed
        else {
            unreachable!("waited for it");
        };
        assert_eq!(published, Some(ms(delay)), "the backoff grows");
        let next = reconnected(&handle, epoch, ms(delay) + CONNECT_TIMEOUT + SLACK).await;
        let took = noticed.elapsed();
        assert!(
            took <= ms(delay) + SLACK,
            "reconnected within the backoff bound: {took:?} for {delay} ms"
        );
        epoch = next;
    }
    let ledger = handle.ledger();
    assert_eq!((ledger.installed, ledger.failures), (4, 3), "{ledger:?}");
    disconnect(&handle, ms(5000) + SLACK).await;
    idle(&handle).await;
    println!("{}: drops seen as {seen:?}", kind.name());
}

/// `stop-reading` (the peer never reads after the upgrade): a disconnect's wait for the peer's
/// Close is cut by the client's step timeout and the socket is dropped (the descriptors come
/// back at once); with a heartbeat, the unanswered pings are `WsError::HeartbeatTimeout` and
/// the client reconnects.
async fn stop_reading(kind: Kind) {
    let peer = Peer::start(kind, "stop-reading").await;
    let step = ms(300);
    let (client, _incoming) = WsClient::builder(peer.url())
        .unwrap()
        .no_heartbeat()
        .backoff(schedule())
        .close_step_timeout(step)
        .layer(|layer| {
            layer
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_close_timeout(ms(2000))
        })
        .build()
        .unwrap();
    let handle = client.handle().clone();
    let before = fd_count();
    handle.connect().unwrap();
    connected(&handle, CONNECT_TIMEOUT + SLACK).await;
    assert_eq!(sockets_to(peer.port), 1, "one socket open to the peer");
    let took = disconnect(&handle, ms(2000) + SLACK).await;
    assert!(
        took >= step - ms(5) && took <= step + SLACK,
        "cut by the step timeout: {took:?}"
    );
    let ledger = handle.ledger();
    assert_eq!(
        (ledger.closed, ledger.close_timeouts),
        (1, 0),
        "the teardown ended on its own step bound, before the layer's: {ledger:?}"
    );
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
    no_sockets_to(peer.port, ms(500)).await;
    let fds = settle_fds(before, ms(500), "after the close was cut").await;
    println!(
        "{}: close cut after {took:?}; socket dropped; fds {before} before connecting, {fds} after",
        kind.name()
    );
    drop(handle);
    drop(client);

    // A heartbeat finds the peer unresponsive.
    let (interval, pong) = (ms(100), ms(300));
    let (client, _incoming) = WsClient::builder(peer.url())
        .unwrap()
        .heartbeat(interval, pong)
        .backoff(schedule())
        .close_step_timeout(ms(200))
        .layer(|layer| layer.with_connect_timeout(CONNECT_TIMEOUT))
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let epoch = connected(&handle, CONNECT_TIMEOUT + SLACK).await;
    let since = Instant::now();
    let failed = wait_state(
        &handle,
        interval + pong + SLACK,
        "the heartbeat timeout",
        |s| matches!(s, State::WaitingToRetry { epoch: e, .. } if *e == epoch),
    )
    .await;
    let took = since.elapsed();
    assert!(
        matches!(ws_error(&failed), Some(WsError::HeartbeatTimeout(d)) if *d == pong),
        "typed as a heartbeat timeout: {failed}"
    );
    // Measured from when this task saw the connection, a little after the monitor started.
    assert!(took >= interval + pong - ms(50), "not early: {took:?}");
    reconnected(&handle, epoch, MAX_DELAY + CONNECT_TIMEOUT + SLACK).await;
    disconnect(&handle, ms(5000) + SLACK).await;
    assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
}

/// The peer SIGKILLed mid-stream 20 times, restarted on the same port each time, while a
/// producer sends numbered messages in at-least-once mode: each time the client notices,
/// reconnects within the backoff bound once the peer is back, and at the end every sequence
/// number sent has been acknowledged (nothing lost).
async fn sigkill_mid_stream_20_times(kind: Kind) {
    const KILLS: usize = 20;
    let delays = [10, 20, 50, 100].map(ms);
    let max_delay = ms(100);
    let mut peer = Peer::start(kind, "echo").await;
    let port = peer.port;
    let (client, incoming) = WsClient::builder(peer.url())
        .unwrap()
        .at_least_once(ack_of)
        .heartbeat(ms(200), ms(1000))
        .backoff(Schedule::new(delays).unwrap())
        .close_step_timeout(ms(500))
        .layer(|layer| {
            layer
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_stable_after(ms(50))
        })
        .build()
        .unwrap();
    let acks = Acks::collect(incoming);
    let handle = client.handle().clone();
    handle.connect().unwrap();
    let mut epoch = connected(&handle, CONNECT_TIMEOUT + SLACK).await;
    let producer = Producer::start(client.clone());

    let mut reconnects = Vec::new();
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    for kill in 1..=KILLS {
        // Mid-stream: messages flow and are acknowledged on this connection.
        let acked = acks.len();
        wait_until(WAIT, "acknowledgements on the connection", || {
            acks.len() >= acked + 10
        })
        .await;
        peer.kill();
        let failed = wait_state(&handle, WAIT, "the kill noticed", |s| {
            !(s.is_connected() && s.epoch() == Some(epoch))
        })
        .await;
        if let State::WaitingToRetry { .. } = failed {
            // `Dropped`, whether the reader or a writer noticed; or a later refused attempt if
            // the client moved on before this task looked.
            let error = ws_error(&failed);
            assert!(
                is_drop(error) || is_refused(error),
                "typed as a drop: {failed}"
            );
            *failures.entry(describe(&failed)).or_default() += 1;
        }
        peer = Peer::restart(kind, "echo", port).await;
        let ready = Instant::now();
        let next = reconnected(&handle, epoch, max_delay + CONNECT_TIMEOUT + SLACK).await;
        let took = ready.elapsed();
        assert!(
            took <= max_delay + SLACK,
            "kill {kill}: reconnected {took:?} after the peer was back (backoff bound {max_delay:?})"
        );
        reconnects.push(took);
        epoch = next;
    }

    let sent = producer.stop().await;
    wait_until(ms(10_000), "every message acknowledged", || {
        client.stats().held == 0
    })
    .await;
    let stats = client.stats();
    assert_eq!(stats.accepted, sent, "{stats:?}");
    assert_eq!(stats.acknowledged, sent, "{stats:?}");
    let seen = acks.seen();
    let lost: Vec<u64> = (1..=sent).filter(|seq| !seen.contains(seq)).collect();
    assert!(lost.is_empty(), "lost {} messages: {lost:?}", lost.len());
    assert!(
        seen.iter().all(|seq| (1..=sent).contains(seq)),
        "acknowledged only what was sent"
    );
    let ledger = handle.ledger();
    assert_eq!(ledger.installed, KILLS as u64 + 1, "{ledger:?}");
    disconnect(&handle, ms(5000) + SLACK).await;
    drop(handle);
    drop(client);
    acks.finish().await;
    let slowest = reconnects.iter().max().copied().unwrap_or_default();
    let mean = reconnects.iter().sum::<Duration>() / reconnects.len() as u32;
    println!(
        "{}: {KILLS} kills, {sent} messages, {} re-sent, 0 lost; reconnect after the peer was \
         back: mean {mean:?}, max {slowest:?}; failures seen as {failures:?}; ledger {ledger:?}",
        kind.name(),
        stats.resent
    );
}

/// The peer SIGSTOPped before the client connects: the TCP connection is accepted by the
/// kernel, the upgrade is never answered, and the connect timeout cuts the attempt with
/// `Error::ConnectTimeout`. After SIGCONT the client connects on its own; after a kill it
/// notices.
async fn sigstop_during_handshake(kind: Kind) {
    let mut peer = Peer::start(kind, "echo").await;
    let connect_timeout = ms(500);
    let delay = ms(100);
    let (client, mut incoming) = WsClient::builder(peer.url())
        .unwrap()
        .backoff(Schedule::new([delay]).unwrap())
        .layer(move |layer| layer.with_connect_timeout(connect_timeout))
        .build()
        .unwrap();
    let handle = client.handle().clone();
    peer.signal("STOP");
    let started = Instant::now();
    handle.connect().unwrap();
    let state = wait_state(
        &handle,
        connect_timeout + SLACK,
        "the connect timeout",
        |s| matches!(s, State::WaitingToRetry { .. }),
    )
    .await;
    let took = started.elapsed();
    assert!(
        matches!(layer_error(&state), Some(Error::ConnectTimeout(d)) if *d == connect_timeout),
        "typed as a connect timeout: {state}"
    );
    assert!(
        took >= connect_timeout - ms(5),
        "not before the timeout: {took:?}"
    );
    assert_eq!(handle.ledger().opened, 0);

    peer.signal("CONT");
    let epoch = connected(&handle, delay + connect_timeout + SLACK).await;
    bounded(WAIT, "a send", client.send(Message::text("awake")))
        .await
        .expect("written");
    assert_eq!(next(&mut incoming).await.message, Message::text("awake"));
    println!(
        "{}: connect timeout cut after {took:?}; connected {:?} after SIGCONT",
        kind.name(),
        started.elapsed() - took
    );

    peer.kill();
    wait_state(&handle, WAIT, "the kill noticed", |s| {
        !(s.is_connected() && s.epoch() == Some(epoch))
    })
    .await;
    disconnect(&handle, SLACK).await;
    idle(&handle).await;
}

/// The peer SIGSTOPped while connected, then a disconnect: the Close is written but never
/// answered. The layer's close timeout cuts the teardown (counted in the ledger), or the
/// client's step timeout ends the wait; either way the socket is dropped at once.
async fn sigstop_during_close(kind: Kind) {
    let mut peer = Peer::start(kind, "echo").await;
    // (step timeout, layer close timeout, cut by the layer)
    for (step, close, cut_by_layer) in [(ms(5000), ms(500), true), (ms(300), ms(5000), false)] {
        let (client, mut incoming) = WsClient::builder(peer.url())
            .unwrap()
            .no_heartbeat()
            .backoff(schedule())
            .close_step_timeout(step)
            .layer(move |layer| {
                layer
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_close_timeout(close)
            })
            .build()
            .unwrap();
        let handle = client.handle().clone();
        let before = fd_count();
        handle.connect().unwrap();
        connected(&handle, CONNECT_TIMEOUT + SLACK).await;
        bounded(WAIT, "a send", client.send(Message::text("ping")))
            .await
            .expect("written");
        assert_eq!(next(&mut incoming).await.message, Message::text("ping"));
        assert_eq!(sockets_to(peer.port), 1, "one socket open to the peer");

        peer.signal("STOP");
        let bound = step.min(close);
        let took = disconnect(&handle, bound + SLACK).await;
        peer.signal("CONT");
        assert!(
            took >= bound - ms(5) && took <= bound + SLACK,
            "cut after {bound:?}: {took:?}"
        );
        let ledger = handle.ledger();
        assert_eq!(ledger.closed, 1, "{ledger:?}");
        assert_eq!(
            ledger.close_timeouts,
            u64::from(cut_by_layer),
            "cut by the {}: {ledger:?}",
            if cut_by_layer {
                "layer's close timeout"
            } else {
                "client's step timeout"
            }
        );
        assert!(matches!(handle.state(), State::Idle), "{}", handle.state());
        no_sockets_to(peer.port, ms(500)).await;
        let fds = settle_fds(before, ms(500), "after the close was cut").await;
        println!(
            "{}: close cut after {took:?} (step {step:?}, close {close:?}); socket dropped; fds \
             {before} before connecting, {fds} after",
            kind.name()
        );
    }
    peer.kill();
}

// ---------------------------------------------------------------------------------------------
// The peers.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Node,
    Python,
}

/// The repository: where `cargo test` runs this binary (a binary built in another checkout
/// sharing the target folder must not look there), else where it was built.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
    })
}

impl Kind {
    /// The module of its tests.
    fn module(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Python => "python",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Node => "node ws",
            Kind::Python => "python websockets",
        }
    }

    fn script(self) -> PathBuf {
        root().join(match self {
            Kind::Node => "tests/peers/node_peer.js",
            Kind::Python => "tests/peers/python_peer.py",
        })
    }

    /// What the install script leaves in `.peers`.
    fn package(self) -> PathBuf {
        root().join(match self {
            Kind::Node => ".peers/node_modules/ws/package.json",
            Kind::Python => ".peers/python/websockets/__init__.py",
        })
    }

    /// The interpreter, resolved once (for python, past any version-manager shim, so that a
    /// restart is quick and the child's pid is the interpreter's).
    fn program(self) -> Result<&'static Path, String> {
        static NODE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let (cell, program, probe): (_, _, &[&str]) = match self {
            Kind::Node => (&NODE, "node", &["-e", "console.log(process.execPath)"]),
            Kind::Python => (
                &PYTHON,
                "python3",
                &["-c", "import sys; print(sys.executable)"],
            ),
        };
        cell.get_or_init(|| {
            let output = Command::new(program)
                .args(probe)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("`{program}` cannot be run: {e}"))?;
            let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
            if !output.status.success() || path.is_empty() {
                return Err(format!("`{program}` did not say where it is"));
            }
            Ok(PathBuf::from(path))
        })
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
    }

    /// Why this peer cannot run, if it cannot.
    fn missing(self) -> Option<String> {
        let package = self.package();
        if !package.is_file() {
            return Some(format!("{} not found", package.display()));
        }
        self.program().err()
    }

    fn command(self, persona: &str, port: Option<u16>) -> Command {
        let mut command = Command::new(self.program().expect("checked before the test"));
        command.arg(self.script()).arg(persona);
        if let Some(port) = port {
            command.arg(port.to_string());
        }
        match self {
            Kind::Node => command.env("NODE_PATH", root().join(".peers/node_modules")),
            Kind::Python => command.env("PYTHONPATH", root().join(".peers/python")),
        };
        command
            .env(
                "PEER_HANDSHAKE_DELAY_MS",
                HANDSHAKE_DELAY.as_millis().to_string(),
            )
            .env("PEER_DROP_AFTER_MS", DROP_AFTER.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        command
    }
}

/// A running peer. Dropping it kills it (SIGKILL, which also ends a stopped process) and reaps
/// it, whatever way the test ends.
struct Peer {
    kind: Kind,
    persona: &'static str,
    port: u16,
    child: Child,
}

impl Peer {
    async fn start(kind: Kind, persona: &'static str) -> Peer {
        Self::spawn(kind, persona, None)
            .await
            .unwrap_or_else(|e| panic!("starting the {} peer: {e}", kind.name()))
    }

    /// Starts the peer again on `port`, just freed by a kill. A bind can still lose a race for
    /// it (an outgoing connection may take it as its ephemeral port): a few more tries.
    async fn restart(kind: Kind, persona: &'static str, port: u16) -> Peer {
        let deadline = Instant::now() + PEER_START;
        loop {
            match Self::spawn(kind, persona, Some(port)).await {
                Ok(peer) if peer.port == port => return peer,
                Ok(peer) => panic!("asked for port {port}, the peer took {}", peer.port),
                Err(error) if Instant::now() < deadline => {
                    eprintln!(
                        "restarting the {} peer on {port}: {error}; again",
                        kind.name()
                    );
                    sleep(ms(50)).await;
                }
                Err(error) => panic!("restarting the {} peer on {port}: {error}", kind.name()),
            }
        }
    }

    async fn spawn(kind: Kind, persona: &'static str, port: Option<u16>) -> Result<Peer, String> {
        let mut child = kind
            .command(persona, port)
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A blocking read of the first line, off the runtime. The pipe is closed before the
        // line is handed over, so it does not count among the test's descriptors.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line).map(|_| line);
            drop(reader);
            let _ = tx.send(read);
        });
        let line = match timeout(PEER_START, rx).await {
            Ok(Ok(Ok(line))) => line,
            other => {
                let _ = child.kill();
                let status = child.wait();
                return Err(format!(
                    "no PORT line within {PEER_START:?}: {other:?}, exit {status:?}"
                ));
            }
        };
        match line.trim().strip_prefix("PORT ").map(str::parse::<u16>) {
            Some(Ok(port)) => Ok(Peer {
                kind,
                persona,
                port,
                child,
            }),
            _ => {
                let _ = child.kill();
                let status = child.wait();
                Err(format!(
                    "expected `PORT <n>`, got {line:?} (exit {status:?})"
                ))
            }
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/socket", self.port)
    }

    /// Sends a signal (`STOP`, `CONT`) with the shell's `kill`.
    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("sh")
            .args(["-c", "kill -s \"$0\" \"$1\"", signal, &pid])
            .stdin(Stdio::null())
            .status()
            .expect("sh runs");
        assert!(
            status.success(),
            "kill -s {signal} {pid} ({} {}): {status}",
            self.kind.name(),
            self.persona
        );
    }

    /// SIGKILL, and reap: once this returns, the peer's sockets are closed.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: skip or fail without peers, one test at a time, a runtime each, descriptors
// counted.

static SERIAL: Mutex<()> = Mutex::new(());

fn run<F, Fut>(kind: Kind, test: &str, scenario: F)
where
    F: FnOnce(Kind) -> Fut,
    Fut: Future<Output = ()>,
{
    // The descriptor count is the process's: no other test may open or close any meanwhile,
    // not even the probe of an interpreter below.
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(why) = kind.missing() {
        let how = "install them with `bash .ci/install-peers`";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "ws_peers {}::{test}: the {} peer is missing ({why}); {how}",
                kind.module(),
                kind.name()
            );
        }
        // Straight to stderr, past the test harness's capture of `eprintln!`: seen in every run.
        let _ = writeln!(
            std::io::stderr(),
            "ws_peers {}::{test}: SKIPPED, the {} peer is not installed ({why}); {how}",
            kind.module(),
            kind.name()
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let baseline = fd_count();
        let started = Instant::now();
        if timeout(TEST_BOUND, scenario(kind)).await.is_err() {
            panic!("{test} ({}) took longer than {TEST_BOUND:?}", kind.name());
        }
        let end = settle_fds(baseline, FD_SETTLE, "at the end of the test").await;
        println!(
            "{} {test}: {:?}; fds: {baseline} at the start, {end} at the end",
            kind.name(),
            started.elapsed()
        );
    });
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn fd_list() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| {
            let target = std::fs::read_link(entry.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            format!("{} -> {target}", entry.file_name().to_string_lossy())
        })
        .collect()
}

/// Waits, bounded, until at most `target` descriptors are open; returns the count.
async fn settle_fds(target: usize, within: Duration, when: &str) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let now = fd_count();
        if now <= target {
            return now;
        }
        if Instant::now() >= deadline {
            panic!(
                "{now} descriptors open {when}, expected at most {target} within {within:?}: {:#?}",
                fd_list()
            );
        }
        sleep(ms(10)).await;
    }
}

/// This process's TCP sockets connected to 127.0.0.1:`port`, the client's connections to a peer
/// (its descriptors' socket inodes, looked up in /proc/net/tcp).
fn sockets_to(port: u16) -> usize {
    let inodes: BTreeSet<u64> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let remote = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .filter(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns.len() > 9
                && columns[2] == remote
                && columns[9]
                    .parse::<u64>()
                    .is_ok_and(|inode| inodes.contains(&inode))
        })
        .count()
}

/// Waits, bounded, until this process has no socket to the peer on `port` any more.
async fn no_sockets_to(port: u16, within: Duration) {
    wait_until(within, "socket to the peer dropped", || {
        sockets_to(port) == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn schedule() -> Schedule {
    Schedule::new(DELAYS.map(ms)).expect("non-empty")
}

/// A client of `peer` with the test's backoff schedule and connect timeout.
fn builder(peer: &Peer) -> WsClientBuilder<Schedule> {
    WsClient::builder(peer.url())
        .unwrap()
        .backoff(schedule())
        .layer(|layer| layer.with_connect_timeout(CONNECT_TIMEOUT))
}

/// An `ack:<seq>` from the peer.
fn ack_of(message: &Message) -> Option<u64> {
    message.to_text().ok()?.strip_prefix("ack:")?.parse().ok()
}

async fn bounded<F: Future>(within: Duration, what: &str, future: F) -> F::Output {
    timeout(within, future)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
}

async fn next(incoming: &mut Incoming) -> Received {
    bounded(WAIT, "incoming message", incoming.next())
        .await
        .expect("the client is alive")
}

/// Waits, bounded, for a state; returns it.
async fn wait_state(
    handle: &Handle,
    within: Duration,
    what: &str,
    mut predicate: impl FnMut(&State) -> bool,
) -> State {
    let mut states = handle.subscribe();
    match timeout(within, states.wait_for(|s| predicate(s))).await {
        Ok(Ok(state)) => state.clone(),
        Ok(Err(_)) => panic!("the client shut down while waiting for {what}"),
        Err(_) => panic!(
            "no {what} within {within:?}: {} ({:?})",
            handle.state(),
            handle.ledger()
        ),
    }
}

async fn connected(handle: &Handle, within: Duration) -> Epoch {
    wait_state(handle, within, "connection", State::is_connected)
        .await
        .epoch()
        .expect("a connected state has an epoch")
}

/// Waits for a connection newer than `after`.
async fn reconnected(handle: &Handle, after: Epoch, within: Duration) -> Epoch {
    wait_state(handle, within, "reconnection", |s| {
        s.is_connected() && s.epoch() > Some(after)
    })
    .await
    .epoch()
    .expect("a connected state has an epoch")
}

/// Polls a condition with no notification of its own (the client's counters), bounded.
async fn wait_until(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "no {what} within {within:?}");
        sleep(ms(5)).await;
    }
}

/// Waits, bounded, for `Idle`: after a disconnect while an earlier teardown is still in flight
/// (a failed connection's), the state is `Disconnecting` until it completes.
async fn idle(handle: &Handle) {
    wait_state(handle, SLACK, "idle", |s| matches!(s, State::Idle)).await;
}

/// `disconnect().await`, bounded; returns how long it took.
async fn disconnect(handle: &Handle, within: Duration) -> Duration {
    let started = Instant::now();
    bounded(within, "end of the disconnect", handle.disconnect()).await;
    started.elapsed()
}

/// The published last error, as the layer's error.
fn layer_error(state: &State) -> Option<&Error> {
    match state {
        State::WaitingToRetry { last_error, .. } | State::GaveUp { last_error, .. } => {
            last_error.downcast_ref::<Error>()
        }
        _ => None,
    }
}

/// The published last error, as the transport's error.
fn ws_error(state: &State) -> Option<&WsError> {
    match layer_error(state)? {
        Error::Connect(source) | Error::ConnectionFailed(source) => source.downcast_ref(),
        _ => None,
    }
}

/// A connection that ended without a Close frame, noticed by a read or a write: `WsError::Dropped`.
fn is_drop(error: Option<&WsError>) -> bool {
    matches!(error, Some(WsError::Dropped))
}

fn is_refused(error: Option<&WsError>) -> bool {
    matches!(error, Some(WsError::Io(io)) if io.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// A short name of the published failure, for the summaries.
fn describe(state: &State) -> String {
    let layer = match layer_error(state) {
        Some(Error::Connect(_)) => "Connect",
        Some(Error::ConnectionFailed(_)) => "ConnectionFailed",
        Some(Error::ConnectTimeout(_)) => "ConnectTimeout",
        Some(_) => "other",
        None => return format!("no error ({state})"),
    };
    let transport = match ws_error(state) {
        Some(WsError::Transport(tungstenite::Error::Io(io))) => {
            format!("Transport(Io({:?}))", io.kind())
        }
        Some(WsError::Transport(tungstenite::Error::Protocol(p))) => {
            format!("Transport(Protocol({p:?}))")
        }
        Some(WsError::Io(io)) => format!("Io({:?})", io.kind()),
        Some(other) => format!("{other:?}"),
        None => "-".to_string(),
    };
    format!("{layer}({transport})")
}

/// The acknowledgements seen on the incoming stream.
struct Acks {
    seen: Arc<Mutex<BTreeSet<u64>>>,
    task: JoinHandle<()>,
}

impl Acks {
    fn collect(mut incoming: Incoming) -> Acks {
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let task = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                while let Some(received) = incoming.next().await {
                    if let Some(seq) = ack_of(&received.message) {
                        seen.lock().unwrap().insert(seq);
                    }
                }
            }
        });
        Acks { seen, task }
    }

    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn seen(&self) -> BTreeSet<u64> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits for the stream's end (the client shut down).
    async fn finish(self) {
        bounded(WAIT, "end of the incoming stream", self.task)
            .await
            .expect("the collector did not panic");
    }
}

/// Sends `<seq>:<payload>` every 2 ms, mostly with `feed_with` (never waits) and every eighth
/// with an awaited `send_with`.
struct Producer {
    stop: Arc<AtomicBool>,
    task: JoinHandle<u64>,
}

impl Producer {
    fn start(client: WsClient) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let mut last = 0;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let make = |seq: u64| Message::text(format!("{seq}:payload {seq}"));
                    if n % 8 == 0 {
                        last =
                            bounded(PEER_START + WAIT, "an awaited send", client.send_with(make))
                                .await
                                .expect("written");
                    } else {
                        match client.feed_with(make) {
                            Ok(seq) => last = seq,
                            Err(SendError::Full { .. }) => {}
                            Err(error) => panic!("feed: {error}"),
                        }
                    }
                    sleep(ms(2)).await;
                }
                last
            }
        });
        Producer { stop, task }
    }

    /// Stops producing; returns the last sequence number accepted.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        bounded(PEER_START + WAIT, "the producer's end", self.task)
            .await
            .expect("the producer did not panic")
    }
}
