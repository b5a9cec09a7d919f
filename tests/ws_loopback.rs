//! The WebSocket client against an in-process tokio-tungstenite server on 127.0.0.1: the
//! buffering and close scenarios (P8, P11, P17, P18), the close handshake, epoch tags, the
//! queue bound, faults of a misbehaving server, and bad input.
//!
//! These talk over real sockets, so they run in real time; every wait is bounded.
#![cfg(feature = "ws")]

mod ws_support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tower::ServiceExt;
use tower_epoch::State;
use tower_epoch::backoff::Schedule;
use tower_epoch::ws::{
    CloseCode, Incoming, Message, SendError, WhenFull, WsClient, WsClientBuilder, WsConnector,
    WsError,
};
use ws_support::*;

const MS: Duration = Duration::from_millis(1);

fn builder(url: String) -> WsClientBuilder<Schedule> {
    WsClient::builder(url)
        .unwrap()
        .backoff(Schedule::new([20 * MS]).unwrap())
        .no_heartbeat()
        .close_step_timeout(300 * MS)
        .layer(|l| {
            l.with_connect_timeout(300 * MS)
                .with_close_timeout(Duration::from_secs(1))
        })
}

fn text(s: &str) -> Message {
    Message::text(s.to_string())
}

/// A client of `server` whose queue holds two messages and refuses more.
fn two_slots_that_fail_when_full(server: &TestServer) -> (WsClient, Incoming) {
    builder(server.url())
        .queue_capacity(2)
        .when_full(WhenFull::Fail)
        .build()
        .unwrap()
}

/// `result` is a full queue of capacity 2 giving `expected` back.
#[track_caller]
fn assert_full(result: Result<u64, SendError>, expected: Message) {
    match result {
        Err(SendError::Full {
            message,
            capacity: 2,
        }) => assert_eq!(message, expected),
        other => panic!("expected a full queue of 2, got {other:?}"),
    }
}

#[tokio::test]
async fn p17_a_send_while_connected_writes_at_once_and_queued_sends_flush_in_order() {
    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    let (client, _incoming) = builder(server.url()).build().unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;

    timeout(Duration::from_secs(1), client.send(text("now")))
        .await
        .expect("written at once")
        .unwrap();
    server
        .wait_for("the message", |e| e.contains(&Event::Text(1, "now".into())))
        .await;

    client.handle().disconnect().await;
    for m in ["q1", "q2", "q3"] {
        client.feed(text(m)).unwrap();
    }
    // `send` accepts the message when called; the future only reports the write.
    let waiting = tokio::spawn(client.send(text("q4")));
    assert_eq!(client.stats().held, 4, "queued while disconnected");
    assert_eq!(
        server.texts(),
        vec!["now"],
        "nothing written while disconnected"
    );
    client.handle().connect().unwrap();
    let seq = timeout(Duration::from_secs(2), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seq, 5);
    server
        .wait_for("the queue", |e| {
            e.len() > 5 && e.iter().any(|e| *e == Event::Text(2, "q4".into()))
        })
        .await;
    assert_eq!(
        server.texts(),
        vec!["now", "q1", "q2", "q3", "q4"],
        "flushed in order"
    );
    assert_eq!(client.stats().held, 0);
}

#[tokio::test]
async fn p18_a_graceful_disconnect_writes_the_queue_before_the_close_frame() {
    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    let (client, _incoming) = builder(server.url())
        .close_with(CloseCode::Away, "navigating away")
        .build()
        .unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    for i in 0..50 {
        client.feed(text(&format!("m{i}"))).unwrap();
    }
    timeout(Duration::from_secs(2), client.handle().disconnect())
        .await
        .expect("the close handshake completes");
    let events = server.events();
    let close = events
        .iter()
        .position(|e| matches!(e, Event::Close(..)))
        .expect("a Close frame");
    let texts: Vec<_> = events[..close]
        .iter()
        .filter_map(|e| match e {
            Event::Text(_, t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, (0..50).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(
        events[close],
        Event::Close(1, Some((1001, "navigating away".into()))),
        "with the configured code and reason"
    );
    server.wait_all_ended().await;
    assert!(matches!(client.handle().state(), State::Idle));
}

#[tokio::test]
async fn p8_peer_close_codes_normal_does_not_reconnect_abnormal_does() {
    for (behaviour, reconnects) in [
        (Behaviour::CloseAfterFirst(1000), false),
        (Behaviour::CloseAfterFirst(1001), true),
        (Behaviour::DropAfterFirst, true),
    ] {
        let server = TestServer::start(behaviour.clone()).await;
        let (client, _incoming) = builder(server.url()).build().unwrap();
        client.handle().connect().unwrap();
        wait_state(&client, "connected", State::is_connected).await;
        client.send(text("hi")).await.unwrap();
        if reconnects {
            let state = wait_state(&client, "retrying", |s| {
                matches!(s, State::WaitingToRetry { .. })
            })
            .await;
            let error = ws_error(&state).unwrap();
            assert!(
                error.contains("PeerClosed") || error.contains("Dropped"),
                "{behaviour:?}: {error}"
            );
            server
                .wait_for("a reconnect", |e| e.contains(&Event::Accepted(2)))
                .await;
        } else {
            wait_state(&client, "idle", |s| matches!(s, State::Idle)).await;
            tokio::time::sleep(100 * MS).await; // room for a wrong reconnect to show
            assert_eq!(
                server.accepts.load(std::sync::atomic::Ordering::SeqCst),
                1,
                "{behaviour:?}"
            );
            assert_eq!(client.handle().ledger().attempts, 1);
        }
    }
}

#[tokio::test]
async fn p11_no_heartbeat_after_a_deliberate_disconnect() {
    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    let (client, _incoming) = builder(server.url())
        .heartbeat(30 * MS, 200 * MS)
        .build()
        .unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    server
        .wait_for("three pings", |e| {
            e.iter().filter(|e| matches!(e, Event::Ping(_))).count() >= 3
        })
        .await;
    client.handle().disconnect().await;
    let pings = |events: Vec<Event>| {
        events
            .iter()
            .filter(|e| matches!(e, Event::Ping(_)))
            .count()
    };
    let after = pings(server.events());
    tokio::time::sleep(300 * MS).await; // ten heartbeat intervals and a pong deadline
    assert_eq!(
        pings(server.events()),
        after,
        "no ping after the disconnect"
    );
    assert!(matches!(client.handle().state(), State::Idle));
    assert_eq!(
        client.handle().ledger().failures,
        0,
        "no heartbeat timeout fired"
    );
}

#[tokio::test]
async fn the_disconnect_waits_for_the_peers_close_within_its_bound() {
    let server = TestServer::start(Behaviour::SlowClose(150 * MS)).await;
    let (client, _incoming) = builder(server.url()).build().unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    let started = std::time::Instant::now();
    client.handle().disconnect().await;
    let took = started.elapsed();
    assert!(took >= 140 * MS, "waited for the peer's Close: {took:?}");
    assert!(took < 300 * MS, "and no longer: {took:?}");
    server.wait_all_ended().await;
}

#[tokio::test]
async fn incoming_messages_carry_the_epoch_of_their_connection() {
    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    let (client, mut incoming) = builder(server.url()).build().unwrap();
    let first = client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    client.send(text("one")).await.unwrap();
    let received = timeout(Duration::from_secs(1), incoming.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((received.epoch, received.message), (first, text("one")));

    client.handle().disconnect().await;
    let second = client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    client.send(text("two")).await.unwrap();
    let received = timeout(Duration::from_secs(1), incoming.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((received.epoch, received.message), (second, text("two")));
    assert!(second > first);
}

#[tokio::test]
async fn the_queue_is_bounded_and_fails_or_waits_as_chosen() {
    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    // Fail: the message comes back in the error.
    let (client, _incoming) = two_slots_that_fail_when_full(&server);
    client.feed(text("a")).unwrap();
    client.feed(text("b")).unwrap();
    assert_full(client.feed(text("c")), text("c"));
    assert_full(client.send(text("d")).await, text("d"));
    // Made for the number it would have had.
    assert_full(client.feed_with(|seq| text(&format!("e{seq}"))), text("e3"));
    assert!(matches!(
        client.feed(Message::Ping(Default::default())),
        Err(SendError::NotData(_))
    ));

    // Wait: the send is accepted when room frees up, i.e. once connected and written.
    let (client, _incoming) = builder(server.url()).queue_capacity(2).build().unwrap();
    client.feed(text("a")).unwrap();
    client.feed(text("b")).unwrap();
    let waiting = tokio::spawn(client.send(text("c")));
    tokio::time::sleep(50 * MS).await;
    assert!(!waiting.is_finished(), "waits for room");
    assert_eq!(client.stats().accepted, 2);
    client.handle().connect().unwrap();
    assert_eq!(
        timeout(Duration::from_secs(2), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        3
    );
    server
        .wait_for("all three", |e| e.contains(&Event::Text(1, "c".into())))
        .await;
    assert_eq!(server.texts(), vec!["a", "b", "c"]);
}

/// The client's `Sink` accepts each message into the queue at once, in order, and its flush
/// waits until everything it was given is written, whatever the size of the run.
#[tokio::test]
async fn the_sink_accepts_in_order_and_its_flush_waits_for_the_writes() {
    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    let (client, _incoming) = builder(server.url()).build().unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;

    let mut sink = client.sink();
    sink.feed(text("a")).await.unwrap();
    sink.feed(text("b")).await.unwrap();
    assert_eq!(client.stats().accepted, 2, "accepted by `start_send`");
    timeout(Duration::from_secs(2), sink.flush())
        .await
        .expect("flushed while connected")
        .unwrap();
    assert_eq!(client.stats().written, 2);

    // A long run: more than a batch, all in order.
    let mut many: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let mut messages = futures_util::stream::iter(many.clone().into_iter().map(|m| Ok(text(&m))));
    timeout(Duration::from_secs(5), sink.send_all(&mut messages))
        .await
        .expect("sent within the bound")
        .unwrap();
    assert_eq!(client.stats().accepted, 302);
    assert_eq!(
        client.stats().written,
        302,
        "written when the flush resolves"
    );

    // `close` flushes too.
    sink.feed(text("closing")).await.unwrap();
    timeout(Duration::from_secs(2), sink.close())
        .await
        .expect("closed within the bound")
        .unwrap();
    assert_eq!(
        client.stats().written,
        303,
        "written when the close resolves"
    );
    many.push("closing".into());

    // Dropped unflushed: written in the background all the same.
    sink.feed(text("last")).await.unwrap();
    drop(sink);
    server
        .wait_for("the last one", |e| {
            e.contains(&Event::Text(1, "last".into()))
        })
        .await;
    let mut expected = vec!["a".to_string(), "b".to_string()];
    expected.extend(many);
    expected.push("last".into());
    assert_eq!(server.texts(), expected);
    assert_eq!(client.stats().held, 0);
}

/// The sink waits for room whatever `WhenFull` says, takes one slot at a time, gives back a
/// message it has no room for or cannot send, and loses nothing.
#[tokio::test]
async fn the_sink_waits_for_room_and_gives_back_what_it_cannot_take() {
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use futures_util::Sink;

    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    let (client, _incoming) = two_slots_that_fail_when_full(&server);
    let mut sink = client.sink();
    let mut cx = Context::from_waker(Waker::noop());
    let mut ready = |sink: &mut tower_epoch::ws::WsSink| Pin::new(sink).poll_ready(&mut cx);

    // Without `poll_ready` first there is no room for it: the message comes back.
    match Pin::new(&mut sink).start_send(text("early")) {
        Err(SendError::NotReady(message)) => assert_eq!(message, text("early")),
        other => panic!("expected not ready, got {other:?}"),
    }
    // A control frame comes back, and its room with it.
    assert!(matches!(ready(&mut sink), Poll::Ready(Ok(()))));
    match Pin::new(&mut sink).start_send(Message::Ping(Default::default())) {
        Err(SendError::NotData(Message::Ping(_))) => {}
        other => panic!("expected not data, got {other:?}"),
    }
    // Disconnected, capacity 2: a, then the sink holds the last slot.
    assert!(matches!(ready(&mut sink), Poll::Ready(Ok(()))));
    Pin::new(&mut sink).start_send(text("a")).unwrap();
    assert!(matches!(ready(&mut sink), Poll::Ready(Ok(()))));
    assert_full(client.feed(text("x")), text("x"));
    Pin::new(&mut sink).start_send(text("b")).unwrap();
    // Out of room: the sink waits (it does not fail).
    assert!(ready(&mut sink).is_pending());
    assert_eq!(client.stats().held, 2);

    client.handle().connect().unwrap();
    timeout(Duration::from_secs(2), async {
        sink.feed(text("c")).await.unwrap();
        sink.flush().await.unwrap();
    })
    .await
    .expect("room once connected and written");
    server
        .wait_for("all three", |e| e.contains(&Event::Text(1, "c".into())))
        .await;
    assert_eq!(server.texts(), vec!["a", "b", "c"]);
    assert_eq!(client.stats().accepted, 3);
}

/// A client whose driver stopped (its runtime shut down) ends `Incoming` and gives every
/// message back: to the send that waits for it, in the error of whatever offers one, and the
/// rest through `take_unsent`.
#[test]
fn a_client_whose_driver_stopped_ends_incoming_and_gives_every_message_back() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};

    use futures_util::Sink;

    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (client, mut incoming, awaited, mut sink, mut waiting) = first.block_on(async {
        let (client, incoming) = builder("ws://127.0.0.1:9/socket".into())
            .queue_capacity(3)
            .build()
            .unwrap();
        client.feed(text("fed")).unwrap();
        let awaited = client.send(text("awaited"));
        let mut sink = client.sink();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut sink).poll_ready(&mut cx).is_ready());
        // The queue is full (the sink holds the last slot): this one waits for room.
        let mut waiting = client.send_with(|seq| text(&format!("made for {seq}")));
        assert!(Pin::new(&mut waiting).poll(&mut cx).is_pending());
        (client, incoming, awaited, sink, waiting)
    });
    // The driver's task goes with its runtime.
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        match timeout(Duration::from_secs(2), awaited).await.unwrap() {
            Err(SendError::Closed {
                message: Some(message),
            }) => assert_eq!(message, text("awaited")),
            other => panic!("expected the awaited message back, got {other:?}"),
        }
        match timeout(Duration::from_secs(2), &mut waiting).await.unwrap() {
            Err(SendError::Closed {
                message: Some(message),
            }) => assert_eq!(message, text("made for 3"), "the number it would have had"),
            other => panic!("expected the waiting message back, got {other:?}"),
        }
        match Pin::new(&mut sink).start_send(text("sunk")) {
            Err(SendError::Closed {
                message: Some(message),
            }) => assert_eq!(message, text("sunk")),
            other => panic!("expected the sink's message back, got {other:?}"),
        }
        match client.feed(text("late")) {
            Err(SendError::Closed {
                message: Some(message),
            }) => assert_eq!(message, text("late")),
            other => panic!("expected the late message back, got {other:?}"),
        }
        assert!(matches!(
            timeout(Duration::from_secs(2), client.flush())
                .await
                .unwrap(),
            Err(SendError::Closed { message: None })
        ));
        assert!(matches!(
            timeout(Duration::from_secs(2), client.reserve())
                .await
                .unwrap(),
            Err(SendError::Closed { message: None })
        ));
        assert!(
            timeout(Duration::from_secs(2), incoming.next())
                .await
                .unwrap()
                .is_none()
        );
        let unsent: Vec<Message> = client.take_unsent().into_iter().map(|(_, m)| m).collect();
        assert_eq!(unsent, [text("fed")]);
        assert_eq!(client.stats().held, 0);
    });
}

// ---- faults of a misbehaving server ------------------------------------------------------

async fn fault(behaviour: Behaviour, expect: &str) {
    let server = TestServer::start(behaviour.clone()).await;
    let (client, _incoming) = builder(server.url()).build().unwrap();
    client.handle().connect().unwrap();
    let state = wait_state(&client, "a failure", |s| {
        matches!(s, State::WaitingToRetry { .. })
    })
    .await;
    let error = ws_error(&state).unwrap_or_default();
    assert!(
        error.contains(expect),
        "{behaviour:?}: expected {expect}, got {error} ({state})"
    );
    // It keeps trying, with backoff.
    server
        .wait_for("a retry", |e| e.contains(&Event::Accepted(2)))
        .await;
    client.handle().disconnect().await;
    drop(client);
    // Every socket the client opened was closed, exactly once (the server saw each end), and
    // nothing stale was installed.
    server.wait_all_ended().await;
}

#[tokio::test]
async fn fault_handshake_never_answered_is_cut_at_the_connect_timeout() {
    fault(Behaviour::SilentHandshake, "ConnectTimeout").await;
}

#[tokio::test]
async fn fault_503_is_a_typed_rejection() {
    fault(Behaviour::Reject503, "Rejected { status: 503 }").await;
}

#[tokio::test]
async fn fault_malformed_handshake_is_a_typed_failure() {
    fault(Behaviour::Malformed, "Handshake").await;
}

#[tokio::test]
async fn fault_drop_without_close_reconnects() {
    let server = TestServer::start(Behaviour::DropAfterFirst).await;
    let (client, _incoming) = builder(server.url()).build().unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    client.send(text("x")).await.unwrap();
    let state = wait_state(&client, "a failure", |s| {
        matches!(s, State::WaitingToRetry { .. })
    })
    .await;
    assert!(ws_error(&state).unwrap().contains("Dropped"));
    server.set(Behaviour::Echo { ack: false });
    wait_state(&client, "reconnected", State::is_connected).await;
    let l = client.handle().ledger();
    assert_eq!((l.installed, l.discarded, l.failures), (2, 0, 1));
    client.handle().disconnect().await;
    server.wait_all_ended().await;
    let l = client.handle().ledger();
    assert_eq!(
        (l.opened, l.closed),
        (2, 2),
        "every socket closed once: {l:?}"
    );
}

#[tokio::test]
async fn fault_close_never_answered_is_cut_and_the_socket_dropped() {
    let server = TestServer::start(Behaviour::IgnoreClose).await;
    let (client, _incoming) = builder(server.url()).build().unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    let started = std::time::Instant::now();
    timeout(Duration::from_secs(2), client.handle().disconnect())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= 290 * MS && took < Duration::from_secs(1),
        "cut at the close step bound: {took:?}"
    );
    server
        .wait_for("the Close", |e| {
            matches!(e.get(1), Some(Event::Close(1, _)))
        })
        .await;
    server.wait_all_ended().await;
    let l = client.handle().ledger();
    assert_eq!((l.opened, l.closed, l.close_timeouts), (1, 1, 0), "{l:?}");
}

#[tokio::test]
async fn fault_silent_half_open_peer_is_found_by_the_heartbeat() {
    let server = TestServer::start(Behaviour::StopReading).await;
    let (client, _incoming) = builder(server.url())
        .heartbeat(50 * MS, 100 * MS)
        .build()
        .unwrap();
    let epoch = client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    let state = wait_state(&client, "a failure", |s| {
        matches!(s, State::WaitingToRetry { .. })
    })
    .await;
    assert!(matches!(state, State::WaitingToRetry { epoch: e, .. } if e == epoch));
    assert!(
        ws_error(&state).unwrap().contains("HeartbeatTimeout"),
        "{state}"
    );
}

// ---- bad input --------------------------------------------------------------------------

#[tokio::test]
async fn every_invalid_url_gives_its_typed_error_and_opens_no_socket() {
    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    let port = server.addr.port();
    type Case = (String, fn(&WsError) -> bool);
    let cases: Vec<Case> = vec![
        (
            format!("http://127.0.0.1:{port}/"),
            |e| matches!(e, WsError::UnsupportedScheme(s) if s == "http"),
        ),
        (format!("ws://:{port}/"), |e| {
            matches!(e, WsError::EmptyHost)
        }),
        (
            "ws://127.0.0.1:99999/".to_string(),
            |e| matches!(e, WsError::PortOutOfRange(p) if p == "99999"),
        ),
        (
            "ws://127.0.0.1:0/".to_string(),
            |e| matches!(e, WsError::PortOutOfRange(p) if p == "0"),
        ),
        ("not a url".to_string(), |e| {
            matches!(e, WsError::InvalidUrl(_))
        }),
        #[cfg(not(feature = "tls"))]
        (format!("wss://127.0.0.1:{port}/"), |e| {
            matches!(e, WsError::TlsUnavailable)
        }),
    ];
    for (url, expected) in cases {
        // The builder refuses it...
        match WsClient::builder(url.clone()) {
            Err(error) => assert!(expected(&error), "{url}: {error:?}"),
            Ok(_) => panic!("{url}: accepted"),
        }
        // ...and so does the connector, per call.
        if let Ok(request) =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
        {
            let Err(error) = WsConnector::new().oneshot(request).await else {
                panic!("{url}: connected");
            };
            assert!(expected(&error), "{url}: {error:?}");
        }
    }
    tokio::time::sleep(20 * MS).await;
    assert_eq!(
        server.accepts.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no socket opened"
    );
}

#[tokio::test]
async fn a_refreshed_header_is_used_by_the_next_attempt() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    // A server that records the `authorization` header of each upgrade.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                // tungstenite's callback type fixes the (large) error type.
                #[allow(clippy::result_large_err)]
                let callback =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                        let token = req
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_string());
                        record.lock().unwrap().push(token);
                        Ok(resp)
                    };
                if let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(socket, callback).await {
                    // Drop the first connection at once to force a reconnect.
                    let _ = ws.next().await;
                }
            });
        }
    });
    let token = Arc::new(AtomicU32::new(1));
    let current = Arc::clone(&token);
    let (client, _incoming) = WsClient::builder_with(move || {
        let mut request = format!("ws://{addr}/").into_client_request().unwrap();
        let value = format!("Bearer t{}", current.load(Ordering::SeqCst));
        request
            .headers_mut()
            .insert("authorization", value.parse().unwrap());
        request
    })
    .backoff(Schedule::new([20 * MS]).unwrap())
    .no_heartbeat()
    .build()
    .unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    token.store(2, Ordering::SeqCst);
    client.send(text("go away")).await.unwrap();
    timeout(Duration::from_secs(2), async {
        while seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(5 * MS).await;
        }
    })
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[..2],
        [Some("Bearer t1".to_string()), Some("Bearer t2".to_string())]
    );
}

#[tokio::test]
async fn at_least_once_resends_unacknowledged_messages_in_order_after_a_reconnect() {
    let server = TestServer::start(Behaviour::AckEvery(4, Duration::ZERO)).await;
    let (client, _incoming) = builder(server.url())
        .at_least_once(|m| m.to_text().ok()?.strip_prefix("ack:")?.parse().ok())
        .build()
        .unwrap();
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    for _ in 0..10 {
        client
            .feed_with(|seq| Message::text(format!("{seq}:x")))
            .unwrap();
    }
    // At-least-once: a flush waits for acknowledgements, and 9 and 10 get none here.
    server
        .wait_for("ten messages", |e| {
            e.iter().filter(|e| matches!(e, Event::Text(..))).count() == 10
        })
        .await;
    // 1..=8 acknowledged; 9 and 10 written and not acknowledged.
    wait_held(&client, 2).await;
    server.crash().await;
    server.set(Behaviour::Echo { ack: true });
    server.restart().await;
    wait_state(
        &client,
        "reconnected",
        |s| matches!(s, State::Connected { epoch } if epoch.get() > 1),
    )
    .await;
    wait_held(&client, 0).await;
    let stats = client.stats();
    assert_eq!(
        (stats.accepted, stats.acknowledged, stats.resent),
        (10, 10, 2),
        "{stats:?}"
    );
    let seqs: Vec<u64> = server
        .texts()
        .iter()
        .map(|t| t.split_once(':').unwrap().0.parse().unwrap())
        .collect();
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 9, 10],
        "re-sent in order, nothing lost"
    );
}

#[tokio::test]
async fn at_least_once_across_suspend_and_resume_inside_the_close_loses_nothing() {
    let server = TestServer::start(Behaviour::AckEvery(4, 100 * MS)).await;
    let (client, _incoming) = builder(server.url())
        .at_least_once(|m| m.to_text().ok()?.strip_prefix("ack:")?.parse().ok())
        .build()
        .unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    let mut sent = 0;
    for round in 0..5u32 {
        for _ in 0..7 {
            sent = client
                .feed_with(|seq| Message::text(format!("{seq}:x")))
                .unwrap();
        }
        wait_written(&client, sent).await;
        let token = handle.suspend().unwrap();
        tokio::time::sleep((10 + 20 * round) * MS).await;
        handle.resume(token).unwrap();
        wait_state(&client, "connected", State::is_connected).await;
    }
    server.set(Behaviour::Echo { ack: true });
    handle.disconnect().await;
    handle.connect().unwrap();
    wait_held(&client, 0).await;
    let mut seen = std::collections::BTreeMap::new();
    for text in server.texts() {
        *seen
            .entry(text.split_once(':').unwrap().0.parse::<u64>().unwrap())
            .or_insert(0u64) += 1;
    }
    let stats = client.stats();
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=sent).collect::<Vec<_>>(),
        "nothing lost"
    );
    let duplicates: u64 = seen.values().map(|n| n - 1).sum();
    assert_eq!(
        duplicates, stats.resent,
        "every re-send reached the server: {stats:?}"
    );
}

#[tokio::test]
async fn nothing_accepted_after_a_release_goes_to_the_released_connection() {
    let server = TestServer::start(Behaviour::SlowClose(200 * MS)).await;
    let (client, mut incoming) = builder(server.url()).build().unwrap();
    let handle = client.handle().clone();
    handle.connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;
    client.feed(text("before")).unwrap();
    // pagehide, pageshow and a send, all before the old connection's close has even started.
    let token = handle.suspend().unwrap();
    let resumed = handle.resume(token).unwrap();
    client.send(text("after")).await.unwrap();
    server
        .wait_for("both", |e| {
            e.iter().filter(|e| matches!(e, Event::Text(..))).count() == 2
        })
        .await;
    let events = server.events();
    assert!(
        events.contains(&Event::Text(1, "before".into())),
        "{events:?}"
    );
    assert!(
        events.contains(&Event::Text(2, "after".into())),
        "{events:?}"
    );
    let mut echoes = Vec::new();
    while echoes.len() < 2 {
        let r = timeout(Duration::from_secs(2), incoming.next())
            .await
            .unwrap()
            .unwrap();
        echoes.push((r.epoch, r.message));
    }
    assert!(echoes.contains(&(resumed, text("after"))), "{echoes:?}");
}

/// Senders on several threads at once, some awaiting each send, some feeding and flushing, one
/// through the client's `Sink`, while a heartbeat every 2 ms goes out between their messages:
/// every message arrives once and each sender's in order, all on the first connection, and the
/// pings are not starved (no heartbeat failure). The messages are 256 KiB and tungstenite
/// writes each out at once (no write buffer), so that writes fill the socket and stop halfway
/// through a batch: the connection's one writer must pick up where it stopped, or the senders
/// would not finish in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_heartbeats_share_the_connection_in_order() {
    const WRITERS: usize = 5;
    const EACH: usize = 60;
    let server = TestServer::start(Behaviour::Echo { ack: false }).await;
    let unbuffered = WebSocketConfig::default().write_buffer_size(0);
    let (client, mut incoming) = builder(server.url())
        .connector(WsConnector::new().with_config(unbuffered))
        .heartbeat(2 * MS, Duration::from_secs(2))
        .build()
        .unwrap();
    // Echoes are read and dropped, so the reader never stops for a full channel.
    tokio::spawn(async move { while incoming.next().await.is_some() {} });
    client.handle().connect().unwrap();
    wait_state(&client, "connected", State::is_connected).await;

    let writers = (0..WRITERS).map(|w| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut sink = client.sink();
            for n in 0..EACH {
                let message = text(&format!("{w}-{n}-{}", "x".repeat(256 * 1024)));
                if w == WRITERS - 1 {
                    // Through the client's `Sink`, handed over at each flush.
                    sink.feed(message).await.expect("room in the queue");
                    if n % 5 == 4 {
                        sink.flush().await.expect("flushed");
                    }
                } else if w % 2 == 0 {
                    client.send(message).await.expect("written");
                } else {
                    client.feed(message).expect("room in the queue");
                    if n % 5 == 4 {
                        client.flush().await.expect("flushed");
                    }
                }
                if n % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            sink.flush().await.expect("flushed");
            client.flush().await.expect("flushed");
        })
    });
    let all = futures_util::future::join_all(writers);
    for writer in timeout(Duration::from_secs(10), all)
        .await
        .expect("every writer finished in time")
    {
        writer.expect("a writer panicked");
    }

    server
        .wait_for("every message", |e| {
            e.iter().filter(|e| matches!(e, Event::Text(..))).count() == WRITERS * EACH
        })
        .await;
    let mut next = [0usize; WRITERS];
    for event in server.events() {
        if let Event::Text(connection, t) = event {
            assert_eq!(connection, 1, "all on the first connection");
            let mut parts = t.splitn(3, '-');
            let mut number = || parts.next().expect("<writer>-<n>-<padding>").parse().ok();
            let (w, n): (usize, usize) = (number().unwrap(), number().unwrap());
            assert_eq!(n, next[w], "writer {w}'s messages in order, once each");
            next[w] += 1;
        }
    }
    assert_eq!(next, [EACH; WRITERS]);
    assert!(
        server.events().iter().any(|e| matches!(e, Event::Ping(1))),
        "the heartbeat pinged while the writers wrote"
    );
    let stats = client.stats();
    assert_eq!(
        (stats.accepted, stats.written, stats.held),
        ((WRITERS * EACH) as u64, (WRITERS * EACH) as u64, 0),
        "{stats:?}"
    );
    let ledger = client.handle().ledger();
    assert_eq!((ledger.opened, ledger.installed), (1, 1), "{ledger:?}");
    assert!(client.handle().state().is_connected());
}

/// The `Debug` output of the client's types shows what a reader of a log needs: the settings,
/// the read buffer the connector starts with, a future's sequence number.
#[tokio::test]
async fn debug_output_shows_the_settings_and_the_state() {
    let builder = builder("ws://127.0.0.1:9/".into()).queue_capacity(7);
    let shown = format!("{builder:?}");
    assert!(
        shown.contains("capacity: 7") && shown.contains("at_least_once: false"),
        "{shown}"
    );
    let shown = format!("{:?}", WsConnector::new());
    assert!(shown.contains("read_buffer_size: 4096"), "{shown}");
    let (client, _incoming) = builder.build().unwrap();
    let shown = format!("{client:?}");
    assert!(
        shown.contains("accepted: 0") && shown.contains("Idle"),
        "{shown}"
    );
    let sending = client.send(text("m"));
    assert!(format!("{sending:?}").contains("seq: Some(1)"));
    let permit = client.reserve().await.unwrap();
    assert!(format!("{permit:?}").starts_with("Permit"));
    let sink = client.sink();
    assert!(format!("{sink:?}").contains("ready: false"));
}
