//! The HTTP/2 transport over real sockets on 127.0.0.1, against an in-process hyper server that
//! the tests can kill, stop gracefully (GOAWAY) and restart on the same port.
#![cfg(feature = "http2")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tower::{Service, ServiceExt};
use tower_epoch::events::Cause;
use tower_epoch::http2::{self, H2Connection, H2Connector, H2Error};
use tower_epoch::{BoxError, Epoch, Handle, Reconnect, State};

/// Every wait of these tests.
const WAIT: Duration = Duration::from_secs(10);

type Body = Full<Bytes>;

/// The layer's stable period in these tests.
const STABLE: Duration = Duration::from_millis(100);

/// An HTTP/2 server: `/echo` answers the request's body; `/slow/<ms>` answers after that many
/// milliseconds. It counts the connections it has open.
struct Server {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    /// Raised to send GOAWAY on every connection accepted before (each finishes its streams);
    /// `u64::MAX` also stops the accepting.
    drain: watch::Sender<u64>,
    tasks: JoinSet<()>,
}

impl Server {
    async fn start(addr: SocketAddr) -> Server {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (drain, drained) = watch::channel(0u64);
        let mut tasks = JoinSet::new();
        let (o, a) = (Arc::clone(&open), Arc::clone(&accepted));
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let mut stopping = drained.clone();
                let socket = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(_) => break,
                    },
                    _ = stopping.wait_for(|g| *g == u64::MAX) => break,
                };
                let generation = *drained.borrow();
                a.fetch_add(1, Ordering::SeqCst);
                let open = Arc::clone(&o);
                let mut drained = drained.clone();
                connections.spawn(async move {
                    open.fetch_add(1, Ordering::SeqCst);
                    let _counted = Decrement(open);
                    let service = hyper::service::service_fn(answer);
                    let connection = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service);
                    let mut connection = std::pin::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => return,
                        _ = drained.wait_for(|g| *g > generation) => {}
                    }
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                });
            }
            // The accept loop is over; graceful connections finish, killed ones are aborted.
            while connections.join_next().await.is_some() {}
        });
        Server {
            addr,
            open,
            accepted,
            drain,
            tasks,
        }
    }

    /// Kills the server: every connection is dropped at once, no GOAWAY.
    async fn kill(mut self) -> SocketAddr {
        self.tasks.shutdown().await;
        self.addr
    }

    /// Sends GOAWAY on every connection open now, as a server does at its maximum connection
    /// age: each finishes its streams, and the server goes on accepting.
    fn goaway(&self) {
        self.drain.send_modify(|g| *g += 1);
    }

    /// Stops the server gracefully: GOAWAY on every connection, streams in flight finish, and
    /// the port closes.
    async fn stop(mut self) -> SocketAddr {
        self.drain.send_replace(u64::MAX);
        timeout(WAIT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .expect("the server stops");
        self.addr
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until the server has `n` connections open.
    async fn wait_open(&self, n: usize) {
        timeout(WAIT, async {
            while self.open() != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} connections open, not {n}", self.open()));
    }
}

struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(request: http::Request<Incoming>) -> Result<http::Response<Body>, std::io::Error> {
    let path = request.uri().path().to_string();
    let body = request
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    if path == "/reset" {
        // A handler's error: hyper resets the stream (RST_STREAM), the connection stays.
        return Err(std::io::Error::other("refused by the handler"));
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    Ok(http::Response::new(Full::new(body)))
}

type Channel = Reconnect<H2Connection<Body>>;

/// A reconnecting channel to `addr`, connected.
async fn channel(addr: SocketAddr) -> (Channel, Handle) {
    let layer = http2::layer(&format!("http://{addr}"))
        .unwrap()
        .with_connect_timeout(Duration::from_secs(2))
        .with_close_timeout(Duration::from_secs(2))
        // Up for this long, a connection that the server ends is not an early end (which
        // would go through the backoff, as a failure does).
        .with_stable_after(STABLE)
        .with_backoff(tower_epoch::backoff::Schedule::new([Duration::from_millis(20)]).unwrap());
    let handle = layer.handle();
    let channel = tower::Layer::layer(&layer, H2Connector::<Body>::new());
    handle.connect().unwrap();
    connected(&handle).await;
    (channel, handle)
}

async fn connected(handle: &Handle) -> Epoch {
    let state = handle
        .wait_for(WAIT, State::is_connected)
        .await
        .expect("connected");
    state.epoch().unwrap()
}

async fn call(channel: &mut Channel, path: &str, body: &'static str) -> Result<Bytes, BoxError> {
    let request = http::Request::post(path).body(Full::new(Bytes::from(body)))?;
    let response = timeout(WAIT, channel.ready().await?.call(request)).await??;
    Ok(response.into_body().collect().await?.to_bytes())
}

#[tokio::test]
async fn requests_flow_and_a_disconnect_leaves_no_socket() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut channel, handle) = channel(server.addr).await;
    for i in 0..20 {
        let text: &'static str = Box::leak(format!("hello {i}").into_boxed_str());
        assert_eq!(call(&mut channel, "/echo", text).await.unwrap(), text);
    }
    server.wait_open(1).await;
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "one connection for all"
    );

    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert!(matches!(handle.state(), State::Idle));
    server.wait_open(0).await;
    assert_eq!(handle.ledger().closed, 1);
}

#[tokio::test]
async fn a_copy_kept_past_the_teardown_holds_no_socket_and_says_closing() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut channel, handle) = channel(server.addr).await;
    call(&mut channel, "/echo", "x").await.unwrap();
    let (_, mut kept) = handle
        .connection::<H2Connection<Body>>()
        .expect("a connection is installed");

    timeout(WAIT, handle.disconnect()).await.unwrap();
    server.wait_open(0).await;
    assert!(kept.is_closing());
    let refused = std::future::poll_fn(|cx| kept.poll_ready(cx)).await;
    assert!(matches!(refused, Err(H2Error::Closing)));
    let request = http::Request::get("/echo")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(matches!(kept.call(request).await, Err(H2Error::Closing)));
}

#[tokio::test]
async fn a_request_in_flight_at_the_disconnect_finishes_then_the_socket_closes() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (channel, handle) = channel(server.addr).await;
    let slow = {
        let mut channel = channel.clone();
        tokio::spawn(async move { call(&mut channel, "/slow/300", "late").await })
    };
    // The slow request is on the wire before the disconnect.
    in_flight(&handle).await;

    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert_eq!(
        slow.await.unwrap().unwrap(),
        "late",
        "it finished on the old connection"
    );
    assert_eq!(handle.ledger().close_timeouts, 0);
    server.wait_open(0).await;
    drop(channel);
}

#[tokio::test]
async fn an_unread_body_is_cut_at_the_close_timeout() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut channel, handle) = channel(server.addr).await;
    let request = http::Request::post("/echo")
        .body(Full::new(Bytes::from("never read")))
        .unwrap();
    let response = channel.ready().await.unwrap().call(request).await.unwrap();
    // The body is held, unread: the request is in flight until the close timeout (2 s).
    let started = tokio::time::Instant::now();
    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(handle.ledger().close_timeouts, 1);
    server.wait_open(0).await;
    drop(response);
}

#[tokio::test]
async fn a_killed_server_restarted_on_its_port_is_reached_again_with_a_new_epoch() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut channel, handle) = channel(server.addr).await;
    let first = handle.epoch();
    call(&mut channel, "/echo", "before").await.unwrap();

    let addr = server.kill().await;
    // The monitor finds the dead connection without a request.
    timeout(WAIT, async {
        while handle.state().is_connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the dead connection is noticed");
    assert!(handle.ledger().failures >= 1);

    let server = Server::start(addr).await;
    let second = connected(&handle).await;
    assert!(second > first, "{second} after {first}");
    assert_eq!(call(&mut channel, "/echo", "after").await.unwrap(), "after");
    server.wait_open(1).await;
    timeout(WAIT, handle.disconnect()).await.unwrap();
    server.wait_open(0).await;
}

/// Waits until a request is in flight on the installed connection.
async fn in_flight(handle: &Handle) -> H2Connection<Body> {
    let (_, conn) = handle.connection::<H2Connection<Body>>().unwrap();
    timeout(WAIT, async {
        while conn.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    conn
}

#[tokio::test]
async fn a_goaway_reconnects_at_once_while_the_old_connection_finishes_its_calls() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut channel, handle) = channel(server.addr).await;
    let first = handle.epoch();
    let mut events = handle.events();
    let slow = {
        let mut channel = channel.clone();
        tokio::spawn(async move { call(&mut channel, "/slow/300", "in flight").await })
    };
    let old = in_flight(&handle).await;
    tokio::time::sleep(STABLE * 2).await; // up for longer than the stable period

    server.goaway();
    // A new connection is installed while the old one still has its call in flight.
    let second = connected_after(&handle, first).await;
    assert_eq!(old.in_flight(), 1, "the old call is still running");
    assert!(old.is_closing());
    assert_eq!(call(&mut channel, "/echo", "new").await.unwrap(), "new");
    assert_eq!(
        slow.await.unwrap().unwrap(),
        "in flight",
        "the old call finished"
    );
    server.wait_open(1).await;

    let ledger = handle.ledger();
    let mut causes = Vec::new();
    while let Ok(Some(Ok(t))) = timeout(Duration::from_millis(50), events.recv()).await {
        causes.push((t.cause, t.from.epoch(), t.to.epoch()));
    }
    assert_eq!(
        (ledger.ended, ledger.failures),
        (1, 0),
        "a normal end, no backoff: {ledger:?} {causes:?}"
    );
    assert_eq!(ledger.attempts, 2);
    // The old connection ended, and the new attempt started at once: no backoff between.
    assert_eq!(
        causes,
        [
            (Cause::Ended, Some(first), Some(second)),
            (Cause::Opened, Some(second), Some(second))
        ]
    );
    timeout(WAIT, handle.disconnect()).await.unwrap();
    server.wait_open(0).await;
}

#[tokio::test]
async fn a_graceful_stop_lets_the_calls_in_flight_finish_and_the_restart_is_reached() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut channel, handle) = channel(server.addr).await;
    let first = handle.epoch();
    let slow = {
        let mut channel = channel.clone();
        tokio::spawn(async move { call(&mut channel, "/slow/300", "in flight").await })
    };
    in_flight(&handle).await;

    let stopping = tokio::spawn(server.stop());
    assert_eq!(slow.await.unwrap().unwrap(), "in flight");
    let addr = stopping.await.unwrap();
    assert_eq!(handle.ledger().ended, 1);
    let server = Server::start(addr).await;
    connected_after(&handle, first).await;
    assert_eq!(call(&mut channel, "/echo", "back").await.unwrap(), "back");
    timeout(WAIT, handle.disconnect()).await.unwrap();
    server.wait_open(0).await;
}

/// Waits for a connection newer than `epoch`.
async fn connected_after(handle: &Handle, epoch: Epoch) -> Epoch {
    let state = handle
        .wait_for(WAIT, |s| s.is_connected() && s.epoch() > Some(epoch))
        .await
        .expect("connected again");
    state.epoch().unwrap()
}

#[tokio::test]
async fn a_reset_stream_fails_the_call_not_the_connection() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut channel, handle) = channel(server.addr).await;
    let epoch = handle.epoch();
    let error = call(&mut channel, "/reset", "x").await.unwrap_err();
    let h2 = error.downcast_ref::<H2Error>().expect("an H2Error");
    assert!(matches!(h2, H2Error::Request(_)), "{h2:?}");
    assert!(!h2.is_connection_failure(), "{h2:?}");
    assert_eq!(handle.ledger().failures, 0);
    assert_eq!(call(&mut channel, "/echo", "still").await.unwrap(), "still");
    assert_eq!(handle.epoch(), epoch, "the same connection");
    timeout(WAIT, handle.disconnect()).await.unwrap();
}

#[tokio::test]
async fn a_request_cut_by_the_servers_crash_fails_the_connection() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut channel, handle) = channel(server.addr).await;
    let slow = {
        let mut channel = channel.clone();
        tokio::spawn(async move { call(&mut channel, "/slow/2000", "cut").await })
    };
    in_flight(&handle).await;
    let addr = server.kill().await;
    let error = slow.await.unwrap().unwrap_err();
    // The failure predicate took it for the connection's: the layer says so, with the cause.
    let Some(tower_epoch::Error::ConnectionFailed(cause)) = error.downcast_ref() else {
        panic!("a failure of the connection, not {error:?}");
    };
    let h2 = cause
        .downcast_ref::<H2Error>()
        .unwrap_or_else(|| panic!("an H2Error, not {cause:?}"));
    assert!(h2.is_connection_failure(), "{h2:?}");
    assert!(handle.ledger().failures >= 1);
    let server = Server::start(addr).await;
    assert_eq!(call(&mut channel, "/echo", "back").await.unwrap(), "back");
    timeout(WAIT, handle.disconnect()).await.unwrap();
    server.wait_open(0).await;
}

/// A peer that takes the TCP connection and never says a word.
async fn silent_peer() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    (addr, held)
}

#[tokio::test]
async fn a_peer_that_never_answers_is_found_by_the_keep_alive() {
    let (addr, _peer) = silent_peer().await;
    let layer = http2::layer(&format!("http://{addr}"))
        .unwrap()
        .with_backoff(tower_epoch::backoff::Schedule::new([Duration::from_secs(60)]).unwrap());
    let handle = layer.handle();
    let connector = H2Connector::<Body>::new()
        .keep_alive(Duration::from_millis(100), Duration::from_millis(100))
        .unwrap();
    let _channel = tower::Layer::layer(&layer, connector);
    handle.connect().unwrap();
    // The handshake needs no answer, so the connection is installed...
    connected(&handle).await;
    // ...and the unanswered ping fails it.
    let state = handle
        .wait_for(WAIT, |s| matches!(s, State::WaitingToRetry { .. }))
        .await
        .expect("the keep-alive fails the silent connection");
    assert!(state.to_string().contains("waiting"), "{state}");
    assert_eq!(handle.ledger().failures, 1);
    timeout(WAIT, handle.disconnect()).await.unwrap();
}

#[tokio::test]
async fn a_call_to_a_peer_that_never_answers_is_bounded_by_the_callers_timeout() {
    let (addr, _peer) = silent_peer().await;
    let (mut channel, handle) = channel(addr).await;
    let request = http::Request::post("/echo")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let ready = channel.ready().await.unwrap();
    let cut = timeout(Duration::from_millis(200), ready.call(request)).await;
    assert!(cut.is_err(), "no answer, so the caller's timeout cuts it");
    // The cut call is no longer in flight: the teardown does not wait for it.
    let started = tokio::time::Instant::now();
    timeout(WAIT, handle.disconnect()).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(handle.ledger().close_timeouts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaways_under_load_are_normal_ends_and_no_call_fails_but_unsent_ones() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (channel, handle) = channel(server.addr).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = JoinSet::new();
    for _ in 0..8 {
        let (mut channel, stop) = (channel.clone(), Arc::clone(&stop));
        callers.spawn(async move {
            let (mut ok, mut unsent, mut other) = (0, 0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match call(&mut channel, "/echo", "load").await {
                    Ok(_) => ok += 1,
                    Err(e) if matches!(e.downcast_ref(), Some(H2Error::NotSent(_))) => unsent += 1,
                    Err(e) => other.push(e.to_string()),
                }
            }
            (ok, unsent, other)
        });
    }
    for _ in 0..5 {
        tokio::time::sleep(STABLE * 2).await; // each connection up for the stable period
        server.goaway();
    }
    tokio::time::sleep(STABLE).await;
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut unsent) = (0, 0);
    while let Some(outcome) = callers.join_next().await {
        let (o, u, other) = outcome.unwrap();
        assert!(
            other.is_empty(),
            "calls failed otherwise than unsent: {other:?}"
        );
        ok += o;
        unsent += u;
    }
    let ledger = handle.ledger();
    assert_eq!(
        ledger.failures, 0,
        "every GOAWAY is a normal end: {ledger:?}"
    );
    assert_eq!(ledger.ended, 5, "{ledger:?}");
    assert!(ok > 100, "{ok} calls, {unsent} unsent");
    timeout(WAIT, handle.disconnect()).await.unwrap();
    server.wait_open(0).await;
}

#[tokio::test]
async fn the_calls_queued_at_a_disconnect_all_finish() {
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let (channel, handle) = channel(server.addr).await;
    let mut calls = JoinSet::new();
    for i in 0..50 {
        let mut channel = channel.clone();
        calls.spawn(async move {
            call(&mut channel, "/slow/50", if i % 2 == 0 { "a" } else { "b" }).await
        });
    }
    // The calls are made (counted in flight), most not yet written, when the disconnect comes.
    let (_, conn) = handle.connection::<H2Connection<Body>>().unwrap();
    timeout(WAIT, async {
        while conn.in_flight() < 50 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert!(format!("{conn:?}").contains("in_flight: 50"), "{conn:?}");
    timeout(WAIT, handle.disconnect()).await.unwrap();
    while let Some(call) = calls.join_next().await {
        call.unwrap()
            .expect("a call made before the disconnect finishes");
    }
    server.wait_open(0).await;
}

/// A request body that is pending once, then panics when polled again.
struct PanickingBody(bool);

impl http_body::Body for PanickingBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if !self.0 {
            self.0 = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        panic!("the user's body panics");
    }
}

#[tokio::test]
async fn a_panicking_request_body_leaves_the_connection_and_its_other_calls() {
    type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let layer = http2::layer(&format!("http://{}", server.addr))
        .unwrap()
        .with_close_timeout(Duration::from_millis(500));
    let handle = layer.handle();
    let mut channel = tower::Layer::layer(&layer, H2Connector::<Boxed>::new());
    handle.connect().unwrap();
    let epoch = connected(&handle).await;
    let panics = http::Request::post("/echo")
        .body(PanickingBody(false).boxed_unsync())
        .unwrap();
    // Its stream waits for a body that will never come: the caller's timeout bounds it.
    let ready = channel.ready().await.unwrap();
    let cut = timeout(Duration::from_millis(300), ready.call(panics)).await;
    assert!(
        cut.is_err(),
        "the call with the panicking body is cut by the caller"
    );
    let fine = http::Request::post("/echo")
        .body(
            Full::new(Bytes::from("fine"))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap();
    let response = timeout(WAIT, channel.ready().await.unwrap().call(fine))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "fine"
    );
    assert_eq!(handle.epoch(), epoch, "the same connection");
    assert_eq!(handle.ledger().failures, 0);
    timeout(WAIT, handle.disconnect()).await.unwrap();
}
