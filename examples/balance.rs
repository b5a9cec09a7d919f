//! A p2c balancer over three TCP backends that keeps serving while one of them dies and
//! comes back: `cargo run --example balance`.
//!
//! Three in-process backends `a`, `b` and `c` on 127.0.0.1 answer each request line with
//! `"<name> <request>"`. Each is a managed connection (one [`ReconnectLayer`], applied three
//! times, with a short backoff) in an [`Endpoints`] set, whose changes feed tower's p2c
//! `Balance`: an endpoint is in the balancer while it is connected. Phases: **all up**;
//! **b down** (its listener and sockets dropped: it leaves the balancer at its next
//! `poll_ready`, `a` and `c` take everything, only a request in flight on `b` may fail, and
//! `b`'s reconnect attempts are refused); **b back** (listening on the same port again, `b`
//! reconnects at its next retry and serves again). It prints the requests per backend and the
//! failures of each phase, then `b`'s transitions with their epochs.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::timeout;
use tower::balance::p2c::Balance;
use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
use tower::{Layer, Service, ServiceExt};
use tower_epoch::backoff::Exponential;
use tower_epoch::endpoints::Endpoints;
use tower_epoch::teardown::CloseCause;
use tower_epoch::{BoxError, ReconnectLayer, State};

const WAIT: Duration = Duration::from_secs(2);
const REQUESTS: usize = 300;
const NAMES: [&str; 3] = ["a", "b", "c"];

/// A connection: a task owns the socket and serves one request at a time; ready while the
/// task runs. Cloneable: the teardown ends the task, for every clone.
#[derive(Clone)]
struct Conn {
    requests: mpsc::UnboundedSender<(String, oneshot::Sender<String>)>,
    task: AbortHandle,
}

async fn connect(addr: SocketAddr) -> io::Result<Conn> {
    let stream = TcpStream::connect(addr).await?;
    let (requests, mut rx) = mpsc::unbounded_channel::<(String, oneshot::Sender<String>)>();
    let task = tokio::spawn(async move {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut in_flight: Option<oneshot::Sender<String>> = None;
        loop {
            tokio::select! {
                line = lines.next_line() => match (line, in_flight.take()) {
                    (Ok(Some(line)), Some(reply)) => drop(reply.send(line)),
                    _ => break, // EOF or an error
                },
                request = rx.recv(), if in_flight.is_none() => {
                    let Some((line, reply)) = request else { break };
                    in_flight = Some(reply);
                    if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        }
        drop((lines, write));
        rx.close(); // `poll_ready` fails from now on, before the request in flight fails
        drop(in_flight);
    });
    let task = task.abort_handle();
    Ok(Conn { requests, task })
}

impl Service<String> for Conn {
    type Response = String;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<String>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.requests.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, line: String) -> Self::Future {
        let (reply, replied) = oneshot::channel();
        // Refused once the task has ended: the reply is dropped with the request.
        let _ = self.requests.send((line, reply));
        let lost = |_| io::ErrorKind::ConnectionAborted.into();
        Box::pin(async move { replied.await.map_err(lost) })
    }
}

/// A backend: its accept task owns every session, so aborting it drops every socket.
fn serve(name: &'static str, addr: SocketAddr) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?; // to take the same port again after a kill
    socket.bind(addr)?;
    let listener: TcpListener = socket.listen(128)?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut sessions = JoinSet::new();
        while let Ok((socket, _)) = listener.accept().await {
            sessions.spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = format!("{name} {line}\n");
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, task))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut backends = Vec::new();
    for name in NAMES {
        backends.push(serve(name, "127.0.0.1:0".parse()?)?);
    }
    let backoff = Exponential::new(Duration::from_millis(20), Duration::from_millis(80))?;
    let layer = ReconnectLayer::new(())
        .with_backoff(backoff)
        .with_connect_timeout(Duration::from_millis(500))
        .with_teardown(|conn: Conn, _: CloseCause| async move {
            conn.task.abort(); // for every clone
            conn.requests.closed().await;
        });
    let (endpoints, changes) = Endpoints::new();
    // The layer's target is `()`: each connector is given its backend's address.
    let connector = |addr| tower::service_fn(connect).map_request(move |()| addr);
    let services: Vec<_> = backends
        .iter()
        .map(|b| layer.layer(connector(b.0)))
        .collect();
    let mut b_events = services[1].handle().events(); // before `insert`, which connects
    for (name, service) in NAMES.into_iter().zip(services) {
        endpoints.insert(name, service);
    }
    let discover = PendingRequestsDiscover::new(changes, CompleteOnResponse::default());
    let mut balance = Balance::new(discover);
    for name in NAMES {
        let handle = endpoints.handle(&name).expect("in the set");
        handle.wait_for(WAIT, State::is_connected).await?;
    }

    let mut sent = 0;
    let mut send = async |n: usize| -> Result<[usize; 4], BoxError> {
        let mut tally = [0; 4]; // a, b, c, failed
        for _ in 0..n {
            sent += 1;
            let request = format!("req-{sent}");
            let reply = timeout(WAIT, async { balance.ready().await?.call(request).await }).await?;
            let name = |r: String| NAMES.iter().position(|n| r.split(' ').next() == Some(n));
            tally[reply.ok().and_then(name).unwrap_or(3)] += 1;
        }
        Ok(tally)
    };

    let all_up = send(REQUESTS).await?;
    let b = endpoints.handle(&"b").expect("in the set");
    let (b_addr, b_task) = &mut backends[1];
    let b_addr = *b_addr;
    b_task.abort(); // the listener and every socket of b are dropped
    let _ = timeout(WAIT, b_task).await?;
    let b_down = send(REQUESTS).await?;
    // Keep b down until two of its reconnect attempts have been refused.
    let refused = |s: &State| matches!(s, State::WaitingToRetry { attempt: 4.., .. });
    b.wait_for(WAIT, refused).await?;
    backends[1] = serve("b", b_addr)?;
    let restarted = Instant::now();
    b.wait_for(WAIT, State::is_connected).await?;
    let connected_after = restarted.elapsed();
    let b_back = send(REQUESTS).await?;

    println!("phase        a     b     c  failed");
    for (phase, [a, b, c, failed]) in [("all up", all_up), ("b down", b_down), ("b back", b_back)] {
        println!("{phase:<8} {a:>5} {b:>5} {c:>5} {failed:>7}");
    }
    let ledger = b.ledger();
    println!(
        "b: connected {connected_after:?} after its restart; {} attempts, {} failures, {} installs",
        ledger.attempts, ledger.failures, ledger.installed
    );
    println!("b's transitions:");
    while let Some(Some(transition)) = b_events.recv().now_or_never() {
        println!("  {}", transition?);
    }

    assert!(
        all_up[3] == 0 && all_up[..3].iter().all(|&n| n > 0),
        "all up"
    );
    assert!(
        b_down[3] <= 1 && b_down[1] == 0,
        "b down: at most the request in flight fails"
    );
    assert!(b_back[3] == 0 && b_back[1] > 0, "b back: b serves again");
    Ok(())
}
