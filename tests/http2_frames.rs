//! The HTTP/2 transport against a peer written here that speaks HTTP/2 frame by frame. It sends
//! exactly what a real server sends only under load or by chance: a refused stream, a GOAWAY
//! below a stream the client opened, a GOAWAY with an error code, a limit of one stream at a
//! time, a body in two frames with a pause between. So each outcome is tested every run.
#![cfg(feature = "http2")]

mod h2_peer;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2_peer::*;
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;
use tokio::time::timeout;
use tower::{Service, ServiceExt};
use tower_epoch::http2::{self, H2Connection, H2Connector, H2Error, H2Monitor};
use tower_epoch::teardown::Monitor;
use tower_epoch::{BoxError, Epoch, Handle, Reconnect, State};

/// Every wait of these tests.
const WAIT: Duration = Duration::from_secs(10);

type Body = Full<Bytes>;
type Channel = Reconnect<H2Connection<Body>>;

/// A reconnecting channel to `addr`, connected, that waits `retry` after a failure.
async fn channel(addr: SocketAddr, retry: Duration) -> (Channel, Handle) {
    let layer = http2::layer(&format!("http://{addr}"))
        .unwrap()
        .with_connect_timeout(Duration::from_secs(2))
        .with_close_timeout(Duration::from_secs(2))
        // Never stable within a test: a connection the server ends normally is an early end
        // ([`tower_epoch::Error::EndedEarly`]), counted as a failure, every time.
        .with_stable_after(WAIT)
        .with_backoff(tower_epoch::backoff::Schedule::new([retry]).unwrap());
    let handle = layer.handle();
    let channel = tower::Layer::layer(&layer, H2Connector::<Body>::new());
    handle.connect().unwrap();
    handle
        .wait_for(WAIT, State::is_connected)
        .await
        .expect("connected");
    (channel, handle)
}

async fn call(channel: &mut Channel) -> Result<Bytes, BoxError> {
    let request = http::Request::get("/").body(Body::default())?;
    let response = timeout(WAIT, channel.ready().await?.call(request)).await??;
    Ok(response.into_body().collect().await?.to_bytes())
}

fn h2_error<'e>(error: &'e (dyn std::error::Error + 'static)) -> &'e H2Error {
    error
        .downcast_ref::<H2Error>()
        .unwrap_or_else(|| panic!("an H2Error, not {error:?}"))
}

#[tokio::test]
async fn a_refused_stream_was_not_sent_and_the_connection_stays() {
    let (addr, script) = serve(&[], |mut peer| async move {
        let refused = peer.request().await?;
        peer.reset(refused, REFUSED_STREAM).await?;
        peer.answer_all().await
    })
    .await;
    let (mut channel, handle) = channel(addr, Duration::from_millis(20)).await;
    let epoch = handle.epoch();

    let error = call(&mut channel).await.unwrap_err();
    let h2 = h2_error(&*error);
    assert!(matches!(h2, H2Error::NotSent(_)), "{h2:?}");
    assert!(!h2.is_connection_failure(), "{h2:?}");
    call(&mut channel).await.expect("the next call is answered");
    assert_eq!(handle.epoch(), epoch, "the same connection");
    assert_eq!(handle.ledger().failures, 0);

    timeout(WAIT, handle.disconnect()).await.unwrap();
    script_done(script).await;
}

/// Waits for a connection newer than `epoch`.
async fn connected_after(handle: &Handle, epoch: Epoch) {
    handle
        .wait_for(WAIT, |s| s.is_connected() && s.epoch() > Some(epoch))
        .await
        .expect("connected again");
}

#[tokio::test]
async fn a_goaway_below_a_stream_leaves_it_unsent_and_the_stream_under_it_finishes() {
    let (addr, script) = serve(&[], |mut peer| async move {
        let (first, second) = (peer.request().await?, peer.request().await?);
        let (below, above) = (first.min(second), first.max(second));
        // The stream above the GOAWAY's last one is refused unprocessed (RFC 9113, 6.8).
        peer.goaway(below, NO_ERROR).await?;
        peer.respond(below).await?;
        assert_eq!(
            peer.next_stream().await?,
            None,
            "{above} is not sent again here"
        );
        Ok(())
    })
    .await;
    let (channel, handle) = channel(addr, Duration::from_millis(20)).await;
    let first = handle.epoch();

    let calls: Vec<_> = (0..2)
        .map(|_| {
            let mut channel = channel.clone();
            tokio::spawn(async move { call(&mut channel).await })
        })
        .collect();
    let (mut answered, mut unsent) = (0, 0);
    for outcome in calls {
        match outcome.await.unwrap() {
            Ok(_) => answered += 1,
            Err(error) => {
                let h2 = h2_error(&*error);
                assert!(matches!(h2, H2Error::NotSent(_)), "{h2:?}");
                assert!(!h2.is_connection_failure(), "{h2:?}");
                unsent += 1;
            }
        }
    }
    assert_eq!((answered, unsent), (1, 1));

    // A GOAWAY without an error is a normal end (ended), early (the failure of the ledger), and
    // the next connection comes after the backoff.
    connected_after(&handle, first).await;
    let ledger = handle.ledger();
    assert_eq!((ledger.ended, ledger.failures), (1, 1), "{ledger:?}");
    let mut channel = channel;
    call(&mut channel)
        .await
        .expect("answered on the new connection");
    timeout(WAIT, handle.disconnect()).await.unwrap();
    script_done(script).await;
}

/// The [`H2Error`] of `error`, a failure of the connection as the layer reports it.
fn failure_cause<'e>(error: &'e (dyn std::error::Error + 'static)) -> &'e H2Error {
    let Some(tower_epoch::Error::ConnectionFailed(cause)) = error.downcast_ref() else {
        panic!("a failure of the connection, not {error:?}");
    };
    h2_error(&**cause)
}

#[tokio::test]
async fn a_goaway_with_an_error_code_fails_the_call_and_the_connection() {
    let (addr, script) = serve(&[], |mut peer| async move {
        peer.request().await?;
        // An error code: the server is in trouble. The stream in flight is above the last
        // stream (0), but h2 gives it the same error as one below it would get, so the client
        // cannot say it was unprocessed: a failed request, not `NotSent`.
        peer.goaway(0, ENHANCE_YOUR_CALM).await?;
        peer.closed().await
    })
    .await;
    let (mut channel, handle) = channel(addr, Duration::from_secs(60)).await;

    let error = call(&mut channel).await.unwrap_err();
    let h2 = failure_cause(&*error);
    assert!(matches!(h2, H2Error::Request(_)), "{h2:?}");
    assert!(h2.is_connection_failure(), "{h2:?}");
    handle
        .wait_for(WAIT, |s| matches!(s, State::WaitingToRetry { .. }))
        .await
        .expect("a failure waits for the backoff");
    assert_eq!(handle.ledger().failures, 1);
    timeout(WAIT, handle.disconnect()).await.unwrap();
    script_done(script).await;
}

#[tokio::test]
async fn a_goaway_with_an_error_code_and_no_call_is_the_monitors_failure() {
    let (addr, script) = serve(&[], |mut peer| async move {
        let stream = peer.request().await?;
        peer.respond(stream).await?;
        peer.goaway(stream, ENHANCE_YOUR_CALM).await?;
        peer.closed().await
    })
    .await;
    let (mut channel, handle) = channel(addr, Duration::from_secs(60)).await;
    call(&mut channel).await.expect("answered");

    let state = handle
        .wait_for(WAIT, |s| matches!(s, State::WaitingToRetry { .. }))
        .await
        .expect("the monitor reports the failure");
    let State::WaitingToRetry { last_error, .. } = state else {
        unreachable!()
    };
    let h2 = failure_cause(&*last_error);
    assert!(matches!(h2, H2Error::Connection(_)), "{h2:?}");
    assert!(h2.is_connection_failure(), "{h2:?}");
    timeout(WAIT, handle.disconnect()).await.unwrap();
    script_done(script).await;
}

#[tokio::test]
async fn the_teardown_waits_for_the_calls_queued_behind_the_servers_stream_limit() {
    let (held, holding) = oneshot::channel();
    let (release, released) = oneshot::channel::<()>();
    let (addr, script) = serve(&[(MAX_CONCURRENT_STREAMS, 1)], |mut peer| async move {
        let warm_up = peer.request().await?;
        peer.respond(warm_up).await?;
        // One stream at a time: the others wait in the client until this one is answered.
        let first = peer.request().await?;
        let _ = held.send(());
        // Until the release, no other stream may open: the calls wait in the client, where
        // only a teardown that waits for them lets them through.
        let mut released = released;
        loop {
            tokio::select! {
                biased;
                frame = peer.next_frame() => {
                    let frame = frame?.ok_or_else(|| io::Error::other("closed while held"))?;
                    assert_ne!(frame.kind, HEADERS, "a stream past the server's limit");
                    peer.acknowledge(&frame).await?;
                }
                _ = &mut released => break,
            }
        }
        peer.respond(first).await?;
        peer.answer_all().await
    })
    .await;
    let (mut channel, handle) = channel(addr, Duration::from_millis(20)).await;
    // Answered after the SETTINGS frame, so the client knows the limit from now on.
    call(&mut channel).await.expect("the warm-up call");

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let mut channel = channel.clone();
        calls.spawn(async move { call(&mut channel).await });
    }
    let (_, conn) = handle.connection::<H2Connection<Body>>().unwrap();
    timeout(WAIT, async {
        while conn.in_flight() < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    timeout(WAIT, holding).await.unwrap().unwrap();

    let disconnecting = tokio::spawn({
        let handle = handle.clone();
        async move { handle.disconnect().await }
    });
    timeout(WAIT, async {
        while !conn.is_closing() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    // The teardown runs on this thread: these yields let it go as far as it would go without
    // the server, which must be to wait for the calls, not to end the connection under them.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    release.send(()).unwrap();

    while let Some(outcome) = timeout(WAIT, calls.join_next()).await.unwrap() {
        outcome
            .unwrap()
            .expect("a call made before the disconnect is answered");
    }
    timeout(WAIT, disconnecting).await.unwrap().unwrap();
    assert_eq!(
        handle.ledger().close_timeouts,
        0,
        "the teardown ended drained"
    );
    script_done(script).await;
}

#[tokio::test]
async fn a_response_body_is_in_flight_until_its_last_frame() {
    let (release, released) = oneshot::channel::<()>();
    let (addr, script) = serve(&[], |mut peer| async move {
        let stream = peer.request().await?;
        // 200, content-length: 10 (a literal with the static table's name 28).
        let headers = [STATUS_200, 0x0f, 0x0d, 0x02, b'1', b'0'];
        peer.send(HEADERS, END_HEADERS, stream, &headers).await?;
        peer.send(DATA, 0, stream, b"hello").await?;
        let _ = released.await;
        peer.send(DATA, END_STREAM, stream, b"world").await?;
        peer.answer_all().await
    })
    .await;
    let (mut channel, handle) = channel(addr, Duration::from_millis(20)).await;
    let (epoch, conn) = handle.connection::<H2Connection<Body>>().unwrap();
    // The installed monitor holds the connection's tasks: a second one finds none to drive.
    let mut second = H2Monitor.monitor(&conn, epoch);
    assert!(
        format!("{second:?}").starts_with("MonitorFuture { tasks: None"),
        "{second:?}"
    );
    let waker = futures_util::task::noop_waker();
    let polled = std::pin::Pin::new(&mut second).poll(&mut std::task::Context::from_waker(&waker));
    match polled {
        std::task::Poll::Ready(Err(error)) => {
            assert!(
                matches!(error.downcast_ref(), Some(H2Error::Closing)),
                "{error:?}"
            );
        }
        other => panic!("nothing to drive, not {other:?}"),
    }
    drop(second);

    let request = http::Request::get("/").body(Body::default()).unwrap();
    let response = timeout(WAIT, channel.ready().await.unwrap().call(request))
        .await
        .unwrap()
        .unwrap();
    let mut body = response.into_body();
    assert_eq!(body.size_hint().exact(), Some(10));
    assert!(!body.is_end_stream());
    assert_eq!(conn.in_flight(), 1);
    assert!(format!("{body:?}").contains("done: false"), "{body:?}");

    let frame = timeout(WAIT, body.frame()).await.unwrap().unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "hello");
    assert_eq!(conn.in_flight(), 1, "the body is not over");
    assert!(!body.is_end_stream());

    release.send(()).unwrap();
    let frame = timeout(WAIT, body.frame()).await.unwrap().unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "world");
    // The last frame ends the request, while the body is still held.
    assert!(body.is_end_stream());
    assert_eq!(body.size_hint().exact(), Some(0));
    assert_eq!(conn.in_flight(), 0);
    assert!(format!("{body:?}").contains("done: true"), "{body:?}");
    assert!(timeout(WAIT, body.frame()).await.unwrap().is_none());

    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert_eq!(handle.ledger().close_timeouts, 0);
    script_done(script).await;
}

#[tokio::test]
async fn a_body_that_ended_with_its_headers_holds_nothing_even_unread() {
    let (addr, script) = serve(&[], |peer| peer.answer_all()).await;
    let (mut channel, handle) = channel(addr, Duration::from_millis(20)).await;
    let (_, conn) = handle.connection::<H2Connection<Body>>().unwrap();
    let request = http::Request::get("/").body(Body::default()).unwrap();
    // END_STREAM on the HEADERS: a consumer that trusts `is_end_stream` never polls the body.
    let response = timeout(WAIT, channel.ready().await.unwrap().call(request))
        .await
        .unwrap()
        .unwrap();
    assert!(response.body().is_end_stream());
    assert_eq!(conn.in_flight(), 0);

    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert_eq!(
        handle.ledger().close_timeouts,
        0,
        "the held response kept nothing"
    );
    script_done(script).await;
    drop(response);
}
