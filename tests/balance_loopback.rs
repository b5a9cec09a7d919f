//! A p2c balancer over an [`Endpoints`] set of three real TCP backends on 127.0.0.1: a backend
//! that dies leaves the balancer, the others take its requests, and it serves again once it is
//! back on the same port; an endpoint removed from the set stops being used and its socket is
//! closed.
//!
//! The protocol is one line per request; the backend answers `"<name> <request>"`. These talk
//! over real sockets, so they run in real time; every wait is bounded. Run with `--nocapture`
//! to see the figures of a run.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tower::balance::p2c::Balance;
use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
use tower::{Layer, Service, ServiceExt};
use tower_epoch::backoff::Exponential;
use tower_epoch::endpoints::{EndpointChanges, Endpoints};
use tower_epoch::events::{Cause, Lagged, Transition};
use tower_epoch::teardown::CloseCause;
use tower_epoch::{Handle, ReconnectLayer, State};

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(2);
/// Requests per phase.
const N: usize = 200;
const NAMES: [&str; 3] = ["a", "b", "c"];

// ----- the client connection -----

type Request = (String, oneshot::Sender<String>);

/// A connection to a backend: cloneable; a task owns the socket and serves one request at a
/// time. Ready while that task runs; `poll_ready` fails once it has ended.
#[derive(Clone)]
struct Conn {
    requests: mpsc::UnboundedSender<Request>,
    closing: Arc<watch::Sender<bool>>,
}

async fn connect(addr: SocketAddr) -> io::Result<Conn> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (requests, rx) = mpsc::unbounded_channel();
    let (closing, closed) = watch::channel(false);
    tokio::spawn(own_socket(stream, rx, closed));
    let closing = Arc::new(closing);
    Ok(Conn { requests, closing })
}

/// The connection's task: ends at EOF, at an error, or when the connection is closed.
async fn own_socket(
    stream: TcpStream,
    mut requests: mpsc::UnboundedReceiver<Request>,
    mut closing: watch::Receiver<bool>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut in_flight: Option<oneshot::Sender<String>> = None;
    loop {
        tokio::select! {
            // `close()`, or every clone dropped.
            _ = closing.changed() => break,
            line = lines.next_line() => match (line, in_flight.take()) {
                (Ok(Some(line)), Some(reply)) => drop(reply.send(line)),
                _ => break, // EOF, an error, or a line nobody asked for
            },
            request = requests.recv(), if in_flight.is_none() => {
                let Some((line, reply)) = request else { break };
                in_flight = Some(reply);
                if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    }
    drop((lines, write)); // the socket closes
    // Refuse new requests before the one in flight learns it failed, so that the caller's next
    // `poll_ready` sees the end.
    requests.close();
    drop(in_flight);
}

impl Conn {
    /// Ends the task for every clone, and resolves once the socket is closed.
    async fn close(self) {
        self.closing.send_replace(true);
        self.requests.closed().await;
    }
}

impl Service<String> for Conn {
    type Response = String;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<String>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.requests.is_closed() {
            true => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            false => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, line: String) -> Self::Future {
        let (reply, replied) = oneshot::channel();
        // Refused once the task has ended: the reply is dropped with the request.
        let _ = self.requests.send((line, reply));
        let lost = |_| io::Error::new(io::ErrorKind::ConnectionAborted, "connection ended");
        Box::pin(async move { replied.await.map_err(lost) })
    }
}

// ----- the backends -----

/// A backend on 127.0.0.1 that can be killed (listener and every socket dropped) and restarted
/// on the same port.
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    /// Server-side sockets open now.
    open: Arc<watch::Sender<usize>>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

/// Binds with `SO_REUSEADDR`, so that a restart can take the port of the killed listener.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Counts one open server-side socket while it lives.
struct OpenSocket(Arc<watch::Sender<usize>>);

impl OpenSocket {
    fn new(open: &Arc<watch::Sender<usize>>) -> Self {
        open.send_modify(|n| *n += 1);
        OpenSocket(Arc::clone(open))
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Backend {
    fn start(name: &'static str) -> Backend {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut backend = Backend {
            name,
            addr: listener.local_addr().unwrap(),
            open: Arc::new(watch::channel(0).0),
            accepted: Arc::default(),
            task: None,
        };
        backend.serve(listener);
        backend
    }

    fn serve(&mut self, listener: TcpListener) {
        let (name, open, accepted) = (
            self.name,
            Arc::clone(&self.open),
            Arc::clone(&self.accepted),
        );
        self.task = Some(tokio::spawn(async move {
            // Dropped with the task: every session is aborted, and its socket dropped.
            let mut sessions = JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                sessions.spawn(session(name, socket, OpenSocket::new(&open)));
                while sessions.try_join_next().is_some() {}
            }
        }));
    }

    /// Drops the listener and every open socket; returns once they are all closed.
    async fn kill(&mut self) {
        let task = self.task.take().expect("running");
        task.abort();
        let _ = timeout(WAIT, task).await.expect("the accept task ends");
        self.wait_open(0).await;
    }

    /// Listens on the same port again.
    fn restart(&mut self) {
        let listener = listen(self.addr).expect("the same port again");
        self.serve(listener);
    }

    fn open(&self) -> usize {
        *self.open.borrow()
    }

    async fn wait_open(&self, n: usize) {
        let mut open = self.open.subscribe();
        timeout(WAIT, open.wait_for(|open| *open == n))
            .await
            .unwrap_or_else(|_| panic!("{}: {} sockets open, not {n}", self.name, self.open()))
            .unwrap();
    }
}

async fn session(name: &'static str, socket: TcpStream, _open: OpenSocket) {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if write
            .write_all(format!("{name} {line}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

// ----- the balancer -----

type Set = Endpoints<&'static str, Conn>;
type Balancer = Balance<PendingRequestsDiscover<EndpointChanges<&'static str, Conn>>, String>;

struct Rig {
    backends: Vec<Backend>,
    endpoints: Set,
    balance: Balancer,
    sent: usize,
}

/// Replies per backend and failed requests of one phase.
#[derive(Debug, Default)]
struct Tally {
    served: BTreeMap<String, usize>,
    failed: usize,
}

impl Tally {
    fn of(&self, name: &str) -> usize {
        self.served.get(name).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for name in NAMES {
            write!(f, "{name} {:>4}  ", self.of(name))?;
        }
        write!(f, "failed {}", self.failed)
    }
}

impl Rig {
    async fn start() -> Rig {
        let backends: Vec<Backend> = NAMES.into_iter().map(Backend::start).collect();
        // One layer for the three: each application manages a connection of its own.
        let layer = ReconnectLayer::new(())
            .with_backoff(
                Exponential::new(Duration::from_millis(20), Duration::from_millis(80)).unwrap(),
            )
            .with_connect_timeout(Duration::from_millis(500))
            .with_close_timeout(Duration::from_secs(1))
            // The connection is a handle to its task: close it for every clone.
            .with_teardown(|conn: Conn, _: CloseCause| conn.close())
            // A request lost with its connection reports the failure at once.
            .with_failure_predicate(|e| {
                e.downcast_ref::<io::Error>()
                    .is_some_and(|e| e.kind() == io::ErrorKind::ConnectionAborted)
            });
        let (endpoints, changes) = Endpoints::new();
        for backend in &backends {
            let addr = backend.addr;
            // The target is the layer's (one for all): the connector is given its address.
            let connector = tower::service_fn(connect).map_request(move |()| addr);
            endpoints.insert(backend.name, layer.layer(connector));
        }
        let balance = Balance::new(PendingRequestsDiscover::new(
            changes,
            CompleteOnResponse::default(),
        ));
        let rig = Rig {
            backends,
            endpoints,
            balance,
            sent: 0,
        };
        for name in NAMES {
            rig.handle(name)
                .wait_for(WAIT, State::is_connected)
                .await
                .unwrap_or_else(|e| panic!("{name} connects: {e}"));
        }
        rig
    }

    fn handle(&self, name: &'static str) -> Handle {
        self.endpoints.handle(&name).expect("in the set")
    }

    fn backend(&mut self, name: &str) -> &mut Backend {
        self.backends.iter_mut().find(|b| b.name == name).unwrap()
    }

    /// One request through the balancer: the name of the backend that answered, or the error.
    async fn request(&mut self) -> Result<String, tower_epoch::BoxError> {
        self.sent += 1;
        let line = format!("req-{}", self.sent);
        let reply = timeout(WAIT, async {
            self.balance.ready().await?.call(line.clone()).await
        })
        .await
        .unwrap_or_else(|_| panic!("request {line} took more than {WAIT:?}"))?;
        let (name, echoed) = reply.split_once(' ').expect("<name> <request>");
        assert_eq!(echoed, line);
        Ok(name.to_string())
    }

    /// `n` requests, one after the other.
    async fn phase(&mut self, n: usize) -> Tally {
        let mut tally = Tally::default();
        for _ in 0..n {
            match self.request().await {
                Ok(name) => *tally.served.entry(name).or_default() += 1,
                Err(_) => tally.failed += 1,
            }
        }
        tally
    }
}

/// Collects every transition of `handle` from now on.
fn record(handle: &Handle) -> watch::Receiver<Vec<Result<Transition, Lagged>>> {
    let mut events = handle.events();
    let (tx, rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            tx.send_modify(|seen| seen.push(event));
        }
    });
    rx
}

#[tokio::test]
async fn a_dead_backend_leaves_the_balancer_and_serves_again_after_a_restart_on_its_port() {
    let test_started = Instant::now();
    let mut rig = Rig::start().await;
    let b = rig.handle("b");
    let mut events = record(&b);

    let up = rig.phase(N).await;
    println!("all up : {up}");
    assert_eq!(up.failed, 0);
    for name in NAMES {
        assert!(up.of(name) > 0, "{name} serves: {up}");
    }

    // b dies: its listener and every socket it had open are dropped.
    let ledger_up = b.ledger();
    rig.backend("b").kill().await;
    let down = rig.phase(N).await;
    println!("b down : {down}");
    assert!(
        down.failed <= 1,
        "only the request in flight on b when it died may fail: {down}"
    );
    assert_eq!(down.of("b"), 0);
    assert_eq!(down.of("a") + down.of("c") + down.failed, N);
    let left = b
        .wait_for(WAIT, |s| !s.is_connected())
        .await
        .expect("b leaves Connected");
    println!("b state after the kill: {left}");
    // Down for a while: its reconnect attempts are refused (two of them, at least).
    let refused = b
        .wait_for(
            WAIT,
            |s| matches!(s, State::WaitingToRetry { attempt, .. } if *attempt >= 4),
        )
        .await
        .expect("b retries through its backoff");
    println!("b state while down: {refused}");
    let ledger_down = b.ledger();
    assert!(
        ledger_down.failures >= ledger_up.failures + 3,
        "{ledger_down:?}"
    );

    // b comes back on the same port.
    let accepted_before = rig.backend("b").accepted.load(Ordering::SeqCst);
    let installed_before = b.ledger().installed;
    rig.backend("b").restart();
    // Taken once the listener is up: every attempt that starts from now on must succeed.
    let restarted = tokio::time::Instant::now();
    let restarted_at = Instant::now();
    b.wait_for(WAIT, State::is_connected)
        .await
        .expect("b is connected again");
    let to_connected = restarted_at.elapsed();
    let mut before_b = 0;
    loop {
        assert!(before_b < N, "b serves again within {N} requests");
        if rig.request().await.expect("no failure once b is back") == "b" {
            break;
        }
        before_b += 1;
    }
    let to_first_served = restarted_at.elapsed();
    let back = rig.phase(N).await;
    println!("b back : {back}");
    assert_eq!(back.failed, 0);
    assert!(back.of("b") > 0, "b serves again: {back}");

    // Through its backoff, with no failed attempt after the restart: checked on the recorded
    // transitions, whose times are taken at each step.
    let transitions = timeout(
        WAIT,
        events.wait_for(|seen| {
            seen.iter()
                .any(|t| matches!(t, Ok(t) if t.cause == Cause::Opened && t.at >= restarted))
        }),
    )
    .await
    .expect("the reconnect is recorded")
    .unwrap()
    .clone();
    let transitions: Vec<Transition> = transitions
        .into_iter()
        .map(|t| t.expect("no transition missed"))
        .collect();
    let mut attempt_started = None;
    let mut reconnected_by = None;
    for t in &transitions {
        if matches!(t.to, State::Connecting { .. }) {
            attempt_started = Some((t.at, t.cause));
        }
        match t.cause {
            Cause::AttemptFailed => {
                let (started, _) = attempt_started.expect("a failed attempt started");
                assert!(
                    started < restarted,
                    "an attempt started after the restart failed: {t}"
                );
            }
            Cause::Opened if t.at >= restarted => {
                reconnected_by = attempt_started.map(|(_, cause)| cause);
            }
            _ => {}
        }
    }
    assert_eq!(
        reconnected_by,
        Some(Cause::BackoffElapsed),
        "b reconnected when its backoff elapsed"
    );
    let ledger_back = b.ledger();
    assert_eq!(
        ledger_back.installed,
        installed_before + 1,
        "{ledger_back:?}"
    );
    assert_eq!(
        rig.backend("b").accepted.load(Ordering::SeqCst),
        accepted_before + 1,
        "one connection accepted after the restart"
    );

    let refused = transitions
        .iter()
        .filter(|t| t.cause == Cause::AttemptFailed)
        .count();
    println!(
        "b since the kill: {} connect attempts ({refused} refused), {} failures counted; \
         restart -> connected {to_connected:?}, -> first request served by b \
         {to_first_served:?} ({before_b} requests to a and c in between); test {:?}",
        ledger_back.attempts - ledger_up.attempts,
        ledger_back.failures - ledger_up.failures,
        test_started.elapsed()
    );
    println!("b transitions since the kill:");
    for t in transitions {
        println!("  {t}");
    }
}

#[tokio::test]
async fn a_removed_endpoint_leaves_the_balancer_and_its_socket_is_closed() {
    let mut rig = Rig::start().await;
    let warm = rig.phase(60).await;
    println!("before the remove: {warm}");
    for backend in &rig.backends {
        assert_eq!(backend.open(), 1, "{} has one socket open", backend.name);
    }

    let closed = rig.endpoints.remove(&"b").expect("b was in the set");
    timeout(WAIT, closed).await.expect("the remove completes");
    // The teardown closed the client's socket: the server reads EOF and drops its own.
    rig.backend("b").wait_open(0).await;
    assert!(rig.endpoints.handle(&"b").is_none());
    assert_eq!(rig.endpoints.len(), 2);

    let after = rig.phase(N).await;
    println!("after the remove : {after}");
    assert_eq!(after.failed, 0);
    assert_eq!(after.of("b"), 0, "b is not used: {after}");
    assert!(after.of("a") > 0 && after.of("c") > 0, "{after}");
    let open: Vec<_> = rig.backends.iter().map(|b| (b.name, b.open())).collect();
    println!("server-side sockets open: {open:?}");
    assert_eq!(open, [("a", 1), ("b", 0), ("c", 1)]);
    assert_eq!(
        rig.backend("b").accepted.load(Ordering::SeqCst),
        1,
        "b was not reconnected"
    );
}
