//! Unary HTTP/2 requests over loopback: the reconnecting channel against hyper's raw
//! `SendRequest` on the same connection setup, and tonic's `Channel` against the same raw.
//!
//! The server is hyper's HTTP/2 server on its own thread, answering each request with its
//! 32-byte body. Each side is one connection to it from the bench's thread (a current-thread
//! runtime, which also runs the sides' connection tasks):
//!
//! - `raw`: `hyper::client::conn::http2::handshake` with tokio's executor, its connection
//!   spawned, requests sent through `SendRequest`;
//! - `tower_epoch`: [`tower_epoch::http2::layer`] over an
//!   [`H2Connector`](tower_epoch::http2::H2Connector), requests through the `Reconnect`
//!   service (`ready`, then `call`), hyper's tasks driven by the connection's monitor;
//! - `tonic_channel`: tonic's `Channel` (`Endpoint::connect`), the same requests with tonic's
//!   body.
//!
//! Each iteration is a pair (see `support/figure.rs`): raw and the other side each make the same
//! unit of requests back to back, in alternating order, and criterion reports the geometric
//! mean of the other side's time over raw's ("x raw"; the throughput ratio is its inverse). A
//! unit is [`AWAITED`] requests one after the other (`awaited/*`), or [`CONCURRENT`] requests
//! in flight at once, [`ROUNDS`] times (`concurrent/*`). `*/raw_again` is a second raw
//! connection against the first: the noise floor of the pairing.
//!
//! Target: `tower_epoch` at least 0.95x raw, that is at most 1.053 x raw.
//!
//! Run with `cargo bench --bench http2 --features http2`.

// criterion 0.7's `criterion_group!` makes public functions without docs (0.8 needs Rust 1.86).
#![allow(missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, criterion_group, criterion_main};
use futures_util::future::join_all;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Builder, Runtime};
use tower::{Service, ServiceExt};
use tower_epoch::http2::{self, H2Connection, H2Connector};
use tower_epoch::{Reconnect, State};

#[path = "support/figure.rs"]
mod figure;

use figure::{Figure, RATIO, pairs};

/// The body of every request and answer.
const PAYLOAD: &[u8] = b"0123456789abcdef0123456789abcdef";
/// Requests one after the other per side per pair.
const AWAITED: usize = 100;
/// Requests in flight at once, per round.
const CONCURRENT: usize = 32;
/// Rounds of concurrent requests per side per pair.
const ROUNDS: usize = 5;
/// Every wait of the bench's setup.
const WAIT: Duration = Duration::from_secs(10);

fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread runtime")
}

/// The server, on its own thread and runtime: answers each request with its body.
fn server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().unwrap()).unwrap();
            while let Ok((socket, _)) = listener.accept().await {
                socket.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let echo = hyper::service::service_fn(
                        |request: http::Request<hyper::body::Incoming>| async move {
                            let body = request.into_body().collect().await?.to_bytes();
                            Ok::<_, hyper::Error>(http::Response::new(Full::new(body)))
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), echo)
                        .await;
                });
            }
        });
    });
    rx.recv_timeout(WAIT).expect("the server listens")
}

/// One side of a pair: something that sends a request and reads its answer.
trait Side {
    fn unary(&mut self) -> impl Future<Output = ()>;
}

/// hyper's raw `SendRequest`, its connection spawned on tokio.
#[derive(Clone)]
struct Raw(SendRequest<Full<Bytes>>);

impl Raw {
    fn connect(rt: &Runtime, addr: SocketAddr) -> Raw {
        rt.block_on(async {
            let socket = TcpStream::connect(addr).await.unwrap();
            socket.set_nodelay(true).unwrap();
            let (send, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(socket))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            Raw(send)
        })
    }
}

fn request<B>(body: B) -> http::Request<B> {
    http::Request::post("http://bench.invalid/echo")
        .body(body)
        .unwrap()
}

/// Reads an answer to its end and checks it.
async fn answer<B>(response: http::Response<B>)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], PAYLOAD);
}

impl Side for Raw {
    async fn unary(&mut self) {
        self.0.ready().await.unwrap();
        let response = self
            .0
            .send_request(request(Full::new(Bytes::from_static(PAYLOAD))))
            .await
            .unwrap();
        answer(response).await;
    }
}

/// The reconnecting channel.
#[derive(Clone)]
struct Ours(Reconnect<H2Connection<Full<Bytes>>>);

impl Ours {
    fn connect(rt: &Runtime, addr: SocketAddr) -> Ours {
        rt.block_on(async {
            let layer = http2::layer(&format!("http://{addr}")).unwrap();
            let handle = layer.handle();
            let service = tower::Layer::layer(&layer, H2Connector::<Full<Bytes>>::new());
            handle.connect().unwrap();
            handle.wait_for(WAIT, State::is_connected).await.unwrap();
            Ours(service)
        })
    }
}

impl Side for Ours {
    async fn unary(&mut self) {
        let ready = self.0.ready().await.unwrap();
        let response = ready
            .call(request(Full::new(Bytes::from_static(PAYLOAD))))
            .await
            .unwrap();
        answer(response).await;
    }
}

/// tonic's `Channel`.
#[derive(Clone)]
struct Tonic(tonic::transport::Channel);

impl Tonic {
    fn connect(rt: &Runtime, addr: SocketAddr) -> Tonic {
        rt.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .unwrap();
            Tonic(channel)
        })
    }
}

impl Side for Tonic {
    async fn unary(&mut self) {
        let ready = self.0.ready().await.unwrap();
        let body = tonic::body::Body::new(Full::new(Bytes::from_static(PAYLOAD)));
        let response = ready.call(request(body)).await.unwrap();
        answer(response).await;
    }
}

fn timed(rt: &Runtime, run: impl Future<Output = ()>) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        run.await;
        start.elapsed()
    })
}

async fn awaited(side: &mut impl Side) {
    for _ in 0..AWAITED {
        side.unary().await;
    }
}

async fn concurrent(side: &(impl Side + Clone)) {
    for _ in 0..ROUNDS {
        join_all((0..CONCURRENT).map(|_| {
            let mut side = side.clone();
            async move { side.unary().await }
        }))
        .await;
    }
}

/// Which of a pair runs.
#[derive(Clone, Copy)]
enum Who {
    Raw,
    Other,
}

/// `awaited/{name}` and `concurrent/{name}`: `other` paired with `raw`.
fn paired(
    group: &mut BenchmarkGroup<'_, Figure>,
    rt: &Runtime,
    name: &str,
    raw: &mut Raw,
    other: &mut (impl Side + Clone),
) {
    group.bench_function(format!("awaited/{name}"), |b| {
        b.iter_custom(|iters| {
            pairs(iters, Who::Raw, Who::Other, |who| match who {
                Who::Raw => timed(rt, awaited(raw)),
                Who::Other => timed(rt, awaited(other)),
            })
        })
    });
    group.bench_function(format!("concurrent/{name}"), |b| {
        b.iter_custom(|iters| {
            pairs(iters, Who::Raw, Who::Other, |who| match who {
                Who::Raw => timed(rt, concurrent(raw)),
                Who::Other => timed(rt, concurrent(other)),
            })
        })
    });
}

fn relative(c: &mut Criterion<Figure>) {
    let rt = runtime();
    let addr = server();
    let mut raw = Raw::connect(&rt, addr);
    let mut raw_again = Raw::connect(&rt, addr);
    let mut ours = Ours::connect(&rt, addr);
    let mut tonic = Tonic::connect(&rt, addr);
    let mut group = c.benchmark_group("http2");
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    paired(&mut group, &rt, "tower_epoch", &mut raw, &mut ours);
    paired(&mut group, &rt, "tonic_channel", &mut raw, &mut tonic);
    paired(&mut group, &rt, "raw_again", &mut raw, &mut raw_again);
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(RATIO);
    targets = relative
}
criterion_main!(benches);
