//! The tower `Service` contract of `Reconnect`, with tower-test mocks as the connection.

mod common;

use std::task::Poll;
use std::time::Duration;

use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_epoch::{
    BoxError, Error, Handle, Reconnect, ReconnectLayer, State, WhenDisconnected, backoff::Schedule,
};
use tower_test::mock::{self, Spawn};

type Conn = mock::Mock<u32, u32>;

/// A connector that hands out clones of one mock connection; attempts follow `delays`
/// (then succeed at once).
fn connector(
    conn: Conn,
    delays: Vec<Duration>,
) -> impl Service<
    &'static str,
    Response = Conn,
    Error = BoxError,
    Future = impl Future<Output = Result<Conn, BoxError>> + Send + 'static,
> + Send
+ 'static {
    let delays = std::sync::Arc::new(std::sync::Mutex::new(delays.into_iter()));
    tower::service_fn(move |_: &'static str| {
        let conn = conn.clone();
        let delay = delays.lock().unwrap().next().unwrap_or(Duration::ZERO);
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, BoxError>(conn)
        }
    })
}

fn layer() -> ReconnectLayer<&'static str, Schedule> {
    ReconnectLayer::new("mock").with_backoff(Schedule::new([Duration::from_millis(100)]).unwrap())
}

async fn connected() -> (Spawn<Reconnect<Conn>>, Handle, mock::Handle<u32, u32>) {
    let (conn, mock_handle) = mock::pair::<u32, u32>();
    let layer = layer();
    let handle = layer.handle();
    let svc = layer.layer(connector(conn, vec![]));
    handle.connect().unwrap();
    common::settle().await;
    assert!(handle.state().is_connected());
    (Spawn::new(svc), handle, mock_handle)
}

#[tokio::test(start_paused = true)]
async fn readiness_is_reserved_by_poll_ready_and_consumed_by_call() {
    let (mut svc, _handle, mut inner) = connected().await;
    inner.allow(1);
    assert!(svc.poll_ready::<u32>().is_ready());
    let response = svc.call(1);
    let (request, send) = inner.next_request().await.unwrap();
    assert_eq!(request, 1);
    send.send_response(2);
    assert_eq!(response.await.unwrap(), 2);
    // The inner connection's one permit is used: readiness is forwarded, not invented.
    assert!(svc.poll_ready::<u32>().is_pending());
    inner.allow(1);
    assert!(svc.is_woken(), "woken when the connection becomes ready");
    assert!(svc.poll_ready::<u32>().is_ready());
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "Reconnect::call without readiness")]
async fn call_without_readiness_panics() {
    let (mut svc, _handle, _inner) = connected().await;
    drop(svc.call(1));
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "Reconnect::call without readiness")]
async fn readiness_is_consumed_by_call() {
    let (mut svc, _handle, mut inner) = connected().await;
    inner.allow(2);
    assert!(svc.poll_ready::<u32>().is_ready());
    drop(svc.call(1));
    drop(svc.call(2));
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "Reconnect::call without readiness")]
async fn clones_start_unready() {
    let (mut svc, _handle, mut inner) = connected().await;
    inner.allow(1);
    assert!(svc.poll_ready::<u32>().is_ready());
    let mut clone = svc.get_ref().clone();
    drop(Service::<u32>::call(&mut clone, 1));
}

#[tokio::test(start_paused = true)]
async fn pending_while_connecting_and_woken_once_installed() {
    let (conn, mut inner) = mock::pair::<u32, u32>();
    inner.allow(1);
    let layer = layer();
    let handle = layer.handle();
    let mut svc = Spawn::new(layer.layer(connector(conn, vec![Duration::from_secs(2)])));
    assert!(
        svc.poll_ready::<u32>().is_pending(),
        "idle: waits for a connect"
    );
    handle.connect().unwrap();
    common::advance(Duration::from_millis(1999)).await;
    assert!(!svc.is_woken(), "no busy loop while connecting");
    assert!(svc.poll_ready::<u32>().is_pending());
    common::advance(Duration::from_millis(1)).await;
    assert!(svc.is_woken(), "woken when the connection is installed");
    assert!(svc.poll_ready::<u32>().is_ready());
}

#[tokio::test(start_paused = true)]
async fn a_failed_poll_ready_of_the_connection_is_a_failure_report_not_an_error() {
    let (mut svc, handle, mut inner) = connected().await;
    let epoch = handle.epoch();
    inner.send_error("connection reset");
    assert!(
        svc.poll_ready::<u32>().is_pending(),
        "not an error: a reconnect follows"
    );
    assert!(matches!(
        handle.state(),
        State::WaitingToRetry { epoch: e, .. } if e == epoch
    ));
    inner.allow(1);
    common::advance(Duration::from_millis(100)).await;
    assert!(svc.is_woken());
    assert!(svc.poll_ready::<u32>().is_ready());
    assert!(handle.epoch() > epoch);
    assert_eq!(handle.ledger().failures, 1);
}

#[tokio::test(start_paused = true)]
async fn fail_fast_while_disconnected() {
    let (conn, _inner) = mock::pair::<u32, u32>();
    let layer = layer().when_disconnected(WhenDisconnected::FailFast);
    let svc = layer.layer(connector(conn, vec![]));
    let mut svc = Spawn::new(svc);
    let error = match svc.poll_ready::<u32>() {
        std::task::Poll::Ready(Err(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(matches!(
        error.downcast_ref::<Error>(),
        Some(Error::NotConnected)
    ));
}

#[tokio::test(start_paused = true)]
async fn terminal_errors_gave_up_and_shutdown() {
    let failing = tower::service_fn(|_: &'static str| async { Err::<Conn, _>("refused") });
    let limited = layer().with_max_attempts(std::num::NonZeroU32::new(3).unwrap());
    let handle = limited.handle();
    let mut svc = Spawn::new(limited.layer(failing));
    handle.connect().unwrap();
    for _ in 0..10 {
        common::advance(Duration::from_millis(100)).await;
    }
    assert_eq!(handle.ledger().attempts, 3);
    let error = match svc.poll_ready::<u32>() {
        std::task::Poll::Ready(Err(e)) => e,
        other => panic!("expected gave up, got {other:?}"),
    };
    match error.downcast_ref::<Error>() {
        Some(Error::GaveUp {
            attempts: 3,
            last_error,
        }) => {
            assert_eq!(last_error.to_string(), "connect attempt failed");
        }
        other => panic!("expected gave up, got {other:?}"),
    }
    // connect() starts afresh from GaveUp.
    handle.connect().unwrap();
    assert!(matches!(
        handle.state(),
        State::Connecting { attempt: 1, .. }
    ));

    // A driver that is dropped shuts the connection down.
    let (conn, _inner) = mock::pair::<u32, u32>();
    let (svc, driver) = layer().build(connector(conn, vec![]));
    let handle = svc.handle();
    drop(driver);
    let mut svc = Spawn::new(svc);
    let error = match svc.poll_ready::<u32>() {
        std::task::Poll::Ready(Err(e)) => e,
        other => panic!("expected shutdown, got {other:?}"),
    };
    assert!(matches!(
        error.downcast_ref::<Error>(),
        Some(Error::Shutdown)
    ));
    assert!(matches!(handle.connect(), Err(Error::Shutdown)));
}

#[tokio::test(start_paused = true)]
async fn response_errors_are_classified_by_the_predicate() {
    for classify in [false, true] {
        let (conn, mut inner) = mock::pair::<u32, u32>();
        let mut layer = layer();
        if classify {
            layer = layer.with_failure_predicate(|e| e.to_string().contains("broken pipe"));
        }
        let handle = layer.handle();
        let mut svc = Spawn::new(layer.layer(connector(conn, vec![])));
        handle.connect().unwrap();
        common::settle().await;
        inner.allow(2);

        assert!(svc.poll_ready::<u32>().is_ready());
        let response = svc.call(1);
        inner
            .next_request()
            .await
            .unwrap()
            .1
            .send_error("bad request");
        let error = response.await.unwrap_err();
        assert_eq!(error.to_string(), "bad request", "not a connection failure");
        assert!(handle.state().is_connected());

        assert!(svc.poll_ready::<u32>().is_ready());
        let response = svc.call(2);
        inner
            .next_request()
            .await
            .unwrap()
            .1
            .send_error("broken pipe");
        let error = response.await.unwrap_err();
        if classify {
            match error.downcast_ref::<Error>() {
                Some(e @ Error::ConnectionFailed(_)) => {
                    let source = std::error::Error::source(e).unwrap();
                    assert_eq!(source.to_string(), "broken pipe");
                }
                other => panic!("expected a connection failure, got {other:?}"),
            }
            assert!(matches!(handle.state(), State::WaitingToRetry { .. }));
        } else {
            assert_eq!(error.to_string(), "broken pipe");
            assert!(handle.state().is_connected());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_handle_is_reachable_inside_a_service_builder_stack() {
    let (conn, mut inner) = mock::pair::<u32, u32>();
    let reconnect = layer();
    let handle = reconnect.handle();
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .concurrency_limit(4)
        .layer(reconnect)
        .service(connector(conn, vec![]));
    handle.connect().unwrap();
    inner.allow(1);
    let call = tokio::spawn(async move { svc.ready().await?.call(5).await });
    let (request, send) = inner.next_request().await.unwrap();
    assert_eq!(request, 5);
    send.send_response(6);
    assert_eq!(call.await.unwrap().unwrap(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_reused_layer_manages_one_connection_per_application() {
    let (conn, _inner) = mock::pair::<u32, u32>();
    let layer = layer();
    let first = layer.layer(connector(conn.clone(), vec![]));
    let second = layer.clone().layer(connector(conn.clone(), vec![]));
    let third = layer.layer(connector(conn, vec![]));
    let (first, second, third) = (first.handle(), second.handle(), third.handle());
    // The layer's own handle controls the first application's connection.
    layer.handle().connect().unwrap();
    second.connect().unwrap();
    common::settle().await;
    assert!(first.state().is_connected());
    assert!(second.state().is_connected());
    assert!(matches!(third.state(), State::Idle), "{}", third.state());
    first.disconnect().await;
    assert!(!layer.handle().state().is_active());
    assert!(second.state().is_connected(), "each has its own clock");
    assert_eq!(third.ledger().attempts, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failure_can_be_reported_from_a_thread_outside_the_runtime() {
    let (_svc, handle, _inner) = connected().await;
    let epoch = handle.epoch();
    let reporter = handle.clone();
    let took_effect = std::thread::spawn(move || reporter.report_failure(epoch, "reset"))
        .join()
        .expect("no runtime needed to report");
    assert!(took_effect);
    assert!(matches!(handle.state(), State::WaitingToRetry { .. }));
    // The driver arms the timer and publishes its delay.
    let mut states = handle.subscribe();
    let armed = tokio::time::timeout(
        Duration::from_millis(1),
        states.wait_for(|s| matches!(s, State::WaitingToRetry { delay: Some(_), .. })),
    );
    let armed = armed.await.unwrap().unwrap().clone();
    assert!(matches!(
        armed,
        State::WaitingToRetry { delay: Some(d), .. } if d == Duration::from_millis(100)
    ));
    common::advance(Duration::from_millis(100)).await;
    assert!(handle.state().is_connected());
}

#[tokio::test(start_paused = true)]
async fn a_service_waiting_on_a_connection_that_fails_is_woken_and_fails_fast() {
    let (conn, mut inner) = mock::pair::<u32, u32>();
    let layer = layer().when_disconnected(WhenDisconnected::FailFast);
    let handle = layer.handle();
    let mut svc = Spawn::new(layer.layer(connector(conn, vec![])));
    let epoch = handle.connect().unwrap();
    common::settle().await;
    inner.allow(0);
    assert!(
        svc.poll_ready::<u32>().is_pending(),
        "the connection is not ready"
    );
    assert!(handle.report_failure(epoch, "reset"));
    assert!(svc.is_woken(), "the release wakes it");
    let Poll::Ready(Err(error)) = svc.poll_ready::<u32>() else {
        panic!("fails fast once the connection is gone");
    };
    assert!(matches!(
        error.downcast_ref::<Error>(),
        Some(Error::NotConnected)
    ));
}

#[tokio::test(start_paused = true)]
async fn the_layer_and_the_response_future_show_their_settings() {
    let layer = layer().with_max_attempts(std::num::NonZeroU32::new(3).unwrap());
    let shown = format!("{layer:?}");
    for part in [
        "ReconnectLayer",
        "max_attempts: Some(3)",
        "normal_end: Idle",
        "permanent_error: false",
    ] {
        assert!(shown.contains(part), "{part} in {shown}");
    }
    let (mut svc, handle, mut inner) = connected().await;
    inner.allow(1);
    assert!(svc.poll_ready::<u32>().is_ready());
    let shown = format!("{:?}", svc.get_ref());
    assert!(
        shown.starts_with("Reconnect { epoch: Some(Epoch(1)), "),
        "{shown}"
    );
    assert!(shown.contains("when_disconnected: Wait"), "{shown}");
    let response = svc.call(1);
    assert_eq!(
        format!("{response:?}"),
        "ResponseFuture { classify: None, .. }"
    );
    drop(handle);
}
