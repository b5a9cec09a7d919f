//! Messages per second of 32-byte text messages through [`WsClient`] against raw
//! tokio-tungstenite, on loopback, and over an in-memory stream.
//!
//! On loopback, both sides talk to the same in-process tokio-tungstenite server on 127.0.0.1,
//! which runs on its own thread with its own current-thread runtime, so the measured runtime
//! runs only the sending side. The server reads every message, checks that it is the 32-byte
//! text, counts it per connection, and discards it: it does not echo, so neither side has
//! anything to drain and the comparison is of the write path alone (an echo would add the same
//! read path to both sides and only blur the difference).
//!
//! Why a separate thread: on a shared runtime the server's work would be timed too, and unevenly.
//! The server reads when the sender yields, which tokio's cooperative budget decides, and the
//! two sides yield at different points (the client hands each message to its connection's task),
//! so the server would read at a different rate for each, and every read of tungstenite 0.30
//! zeroes up to 128 KiB of read buffer. With its own thread, the server's cost is not on the measured
//! thread. The price is scheduler noise: on a busy machine an awaited send may have to wake the
//! server's thread on the sender's CPU, which can move both sides from about 2.5 us to about 5.5
//! us per message between runs; compare the two sides within one run, and run it more than once.
//!
//! The sending side is a tokio current-thread runtime built here, and each sample is one
//! `block_on` running a loop, timed inside the block (`Bencher::iter_custom`), like
//! `request_path`. The sides:
//!
//! - `raw`: `tokio_tungstenite::client_async` over a `tokio::net::TcpStream` with `TCP_NODELAY`,
//!   used as a plain `Sink` (not split);
//! - `ws_client`: [`WsClient`] built with `no_heartbeat()`, connected through its handle
//!   before measuring (its driver and monitor, which write the socket, run on the same
//!   runtime).
//!
//! Two groups on loopback, one per mode, in `Throughput::Elements` (messages):
//!
//! - `awaited`: each send awaited before the next, one flush per message:
//!   `client.send(m).await` vs `ws.send(m).await`.
//! - `pipelined`: a batch of [`BATCH`] messages accepted without waiting, then one flush:
//!   `client.feed(m)` for each then `client.flush().await` (`ws_client`), and the same through
//!   the client's `Sink`, `sink.feed(m).await` for each then `sink.flush().await` (`ws_sink`),
//!   vs `ws.feed(m).await` for each then `ws.flush().await`.
//!
//! A third loopback group, `pipelined_floor`, measures two raw connections to the same server
//! the same way (`raw` and `raw_again`): the ratio that two identical sides get in the same
//! run, against which to read the others.
//!
//! After every sample the bench waits (bounded by [`WAIT`]) until the server has counted
//! exactly the messages that side sent so far, or panics; at the end the client must still be
//! on its first connection.
//!
//! Two more groups, `memory/awaited` and `memory/pipelined`, run the same loops over an
//! in-memory stream that answers the WebSocket handshake and then takes every write at once,
//! counting the bytes (the client reaches it through a custom transport). With no kernel and no
//! peer, they measure the CPU each side spends per message, which the loopback figures mix with
//! the scheduler's and the server's timing; after each sample the stream must have taken
//! exactly the bytes of the frames sent.
//!
//! Those groups time raw for seconds, then the client for seconds: whatever drifts in the
//! machine between the two windows lands in their ratio, and on loopback two identical raw
//! connections measured that way land up to about 10% apart. The `relative` groups measure the
//! ratio itself, with a criterion measurement of the bench's own ([`RATIO`], see [`pairs`]): each iteration
//! is a pair, raw then the other side (or the other side then raw, in turn) sending the same
//! unit of messages back to back, and criterion reports the geometric mean of the other side's
//! time over raw's ("x raw"; the throughput ratio is its inverse). The functions:
//! `relative/{loopback,memory}/awaited/ws_client` ([`PAIR_SENDS`] sends per side per pair),
//! `relative/{loopback,memory}/pipelined/{ws_client,ws_sink}` ([`PAIR_BATCHES`] batches), and
//! `relative/loopback/pipelined/raw_again`, a second raw connection against the first: the noise
//! floor of the pairing, which lands within 1% of 1.
//!
//! Target: `ws_client` at least 0.9x `raw` in both loopback modes, that is at most 1.11 x raw
//! in `relative/loopback/*/ws_client`.
//!
//! Run with `cargo bench --bench ws`. The bench profile builds each crate as one codegen unit
//! (`Cargo.toml`); `BENCHMARKS.md` says why, and how to measure the default profile.

// criterion 0.7's `criterion_group!` makes public functions without docs (0.8 needs Rust 1.86).
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Builder, Runtime};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::Uri;
use tower_epoch::ws::{Incoming, Message, WsClient, WsClientBuilder, WsConnector};

#[path = "support/figure.rs"]
mod figure;

use figure::{Figure, RATIO, pairs};

/// The payload: 32 bytes of text.
const PAYLOAD: &str = "0123456789abcdef0123456789abcdef";

/// Messages per pipelined batch (below the client's default queue capacity of 1024).
const BATCH: u64 = 1_000;

/// Bound on every wait: connecting, and the server catching up after a sample.
const WAIT: Duration = Duration::from_secs(10);

fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread runtime")
}

/// The server: listens on its own thread; hands out one counter per accepted connection, in
/// the order of acceptance.
struct Server {
    addr: SocketAddr,
    counters: mpsc::Receiver<Arc<AtomicU64>>,
}

impl Server {
    fn start() -> Server {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (counters_tx, counters) = mpsc::channel();
        std::thread::Builder::new()
            .name("ws-server".into())
            .spawn(move || {
                runtime().block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    addr_tx
                        .send(listener.local_addr().expect("address"))
                        .unwrap();
                    loop {
                        let (socket, _) = listener.accept().await.expect("accept");
                        socket.set_nodelay(true).expect("nodelay");
                        let count = Arc::new(AtomicU64::new(0));
                        if counters_tx.send(Arc::clone(&count)).is_err() {
                            return;
                        }
                        tokio::spawn(session(socket, count));
                    }
                });
            })
            .expect("spawn the server thread");
        let addr = addr_rx.recv_timeout(WAIT).expect("the server listens");
        Server { addr, counters }
    }

    /// The count of the next connection accepted, nothing sent yet.
    fn next_counted(&self) -> Counted {
        let count = self
            .counters
            .recv_timeout(WAIT)
            .expect("the server accepted the connection");
        Counted { count, sent: 0 }
    }
}

/// Reads every message of one connection and counts the 32-byte texts; anything else that is
/// data is a bug of the bench.
async fn session(socket: TcpStream, count: Arc<AtomicU64>) {
    let mut ws = tokio_tungstenite::accept_async(socket)
        .await
        .expect("upgrade");
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                assert_eq!(text.as_str(), PAYLOAD, "the server got a wrong message");
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Message::Binary(_)) => panic!("the server got a binary message"),
            Ok(Message::Close(_)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Waits until the server has counted exactly `expected` messages on `count`.
fn reached(count: &AtomicU64, expected: u64, side: &str) {
    let start = Instant::now();
    loop {
        let seen = count.load(Ordering::Relaxed);
        assert!(seen <= expected, "{side}: server saw {seen} > {expected}");
        if seen == expected {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{side}: the server saw {seen} of {expected} messages within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Where the server counts a side's messages, and how many it was sent.
struct Counted {
    count: Arc<AtomicU64>,
    sent: u64,
}

impl Counted {
    /// Records `n` more messages sent and checks that they reached the server.
    fn check(&mut self, n: u64, side: &str) {
        self.sent += n;
        reached(&self.count, self.sent, side);
    }
}

/// Raw tokio-tungstenite over TCP with `TCP_NODELAY`.
fn raw_tcp(rt: &Runtime, server: &Server) -> (WebSocketStream<TcpStream>, Counted) {
    let addr = server.addr;
    let ws = rt.block_on(async move {
        tokio::time::timeout(WAIT, async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/raw"), tcp)
                .await
                .expect("upgrade");
            ws
        })
        .await
        .expect("raw connection within the bound")
    });
    (ws, server.next_counted())
}

/// A [`WsClient`] without heartbeat, connected; its driver is spawned on `rt`. Nothing sends it
/// data, so nothing needs to drain the [`Incoming`] stream; the caller only keeps it open.
fn connected(rt: &Runtime, builder: WsClientBuilder) -> (WsClient, Incoming) {
    let (client, incoming) = {
        let _guard = rt.enter();
        builder.no_heartbeat().build().expect("build the client")
    };
    rt.block_on(async {
        let mut states = client.handle().subscribe();
        client.handle().connect().expect("the driver is running");
        tokio::time::timeout(WAIT, states.wait_for(|s| s.is_connected()))
            .await
            .expect("connected within the bound")
            .expect("state channel open");
    });
    (client, incoming)
}

/// A [`WsClient`] connected to the loopback server, with the count of its connection.
fn client_tcp(rt: &Runtime, server: &Server) -> (WsClient, Incoming, Counted) {
    let builder = WsClient::builder(format!("ws://{}/client", server.addr)).expect("a good URL");
    let (client, incoming) = connected(rt, builder);
    (client, incoming, server.next_counted())
}

/// Checks that the client never left its first connection.
fn on_first_connection(client: &WsClient) {
    let ledger = client.handle().ledger();
    assert_eq!((ledger.opened, ledger.installed), (1, 1), "{ledger:?}");
}

/// The time `run` takes on `rt`, measured inside the runtime (not its start-up).
fn timed(rt: &Runtime, run: impl Future<Output = ()>) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        run.await;
        start.elapsed()
    })
}

/// `n` messages sent on `sink` one by one, each awaited (one flush per message).
async fn send_each<S>(sink: &mut S, message: &Message, n: u64)
where
    S: Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        sink.send(message.clone()).await.expect("raw send");
    }
}

/// `n` messages sent through the client one by one, each awaited.
async fn client_send_each(client: &WsClient, message: &Message, n: u64) {
    for _ in 0..n {
        let seq = client.send(message.clone()).await.expect("send");
        black_box(seq);
    }
}

/// `iters` batches of [`BATCH`] messages fed into the client one by one, each batch flushed once.
async fn client_feed_batches(client: &WsClient, message: &Message, iters: u64) {
    for _ in 0..iters {
        for _ in 0..BATCH {
            let seq = client.feed(message.clone()).expect("feed");
            black_box(seq);
        }
        client.flush().await.expect("flush");
    }
}

/// `iters` batches of [`BATCH`] messages fed into `sink` one by one, each batch flushed once.
async fn feed_batches<S>(sink: &mut S, message: &Message, iters: u64)
where
    S: Sink<Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    for _ in 0..iters {
        for _ in 0..BATCH {
            sink.feed(message.clone()).await.expect("feed");
        }
        sink.flush().await.expect("flush");
    }
}

/// Which side a sample ran.
#[derive(Clone, Copy, Debug)]
enum Who {
    Raw,
    Client,
}

/// The two modes for one setting, named `{prefix}awaited` and `{prefix}pipelined`, each with
/// `raw` and `ws_client`; every sample is followed by `check(who, messages sent in it)`.
fn modes<R>(
    c: &mut Criterion,
    rt: &Runtime,
    prefix: &str,
    raw: &mut R,
    client: &WsClient,
    mut check: impl FnMut(Who, u64),
) where
    R: Sink<Message> + Unpin,
    R::Error: std::fmt::Debug,
{
    let message = Message::text(PAYLOAD);

    let mut group = c.benchmark_group(format!("{prefix}awaited"));
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw", |b| {
        b.iter_custom(|iters| {
            let elapsed = timed(rt, send_each(raw, &message, iters));
            check(Who::Raw, iters);
            elapsed
        })
    });
    group.bench_function("ws_client", |b| {
        b.iter_custom(|iters| {
            let elapsed = timed(rt, client_send_each(client, &message, iters));
            check(Who::Client, iters);
            elapsed
        })
    });
    group.finish();

    let mut group = c.benchmark_group(format!("{prefix}pipelined"));
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("raw", |b| {
        b.iter_custom(|iters| {
            let elapsed = timed(rt, feed_batches(raw, &message, iters));
            check(Who::Raw, iters * BATCH);
            elapsed
        })
    });
    group.bench_function("ws_client", |b| {
        b.iter_custom(|iters| {
            let elapsed = timed(rt, client_feed_batches(client, &message, iters));
            check(Who::Client, iters * BATCH);
            elapsed
        })
    });
    let mut sink = client.sink();
    group.bench_function("ws_sink", |b| {
        b.iter_custom(|iters| {
            let elapsed = timed(rt, feed_batches(&mut sink, &message, iters));
            check(Who::Client, iters * BATCH);
            elapsed
        })
    });
    group.finish();
}

/// The noise floor of the loopback setting: two raw connections to the same server, measured
/// one after the other exactly as `pipelined` measures raw and the client. Their ratio is what
/// two identical sides get in this run.
fn floor(c: &mut Criterion, rt: &Runtime, server: &Server) {
    let message = Message::text(PAYLOAD);
    let mut group = c.benchmark_group("pipelined_floor");
    group.throughput(Throughput::Elements(BATCH));
    for name in ["raw", "raw_again"] {
        let (mut raw, mut counted) = raw_tcp(rt, server);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let elapsed = timed(rt, feed_batches(&mut raw, &message, iters));
                counted.check(iters * BATCH, name);
                elapsed
            })
        });
    }
    group.finish();
}

fn ws(c: &mut Criterion) {
    let rt = runtime();
    let server = Server::start();
    floor(c, &rt, &server);
    let (mut raw, mut raw_count) = raw_tcp(&rt, &server);
    let (client, _incoming, mut client_count) = client_tcp(&rt, &server);

    modes(c, &rt, "", &mut raw, &client, |who, n| match who {
        Who::Raw => raw_count.check(n, "raw"),
        Who::Client => client_count.check(n, "ws_client"),
    });

    // Everything fed was written, and the client never left its first connection.
    let handle = client.handle();
    let stats = client.stats();
    assert!(handle.state().is_connected(), "{:?}", handle.state());
    on_first_connection(&client);
    assert_eq!(
        (stats.accepted, stats.written, stats.held),
        (client_count.sent, client_count.sent, 0),
        "{stats:?}"
    );
}

/// The frame of [`PAYLOAD`] from a client: 2 header bytes, a 4-byte mask, the payload.
const FRAME_LEN: u64 = 2 + 4 + PAYLOAD.len() as u64;

/// An in-memory stream: answers the WebSocket handshake, then takes every write at once and
/// counts its bytes; reads never complete after the handshake.
struct Memory {
    request: Vec<u8>,
    response: Option<Vec<u8>>,
    upgraded: bool,
    written: Arc<AtomicU64>,
}

impl Memory {
    fn new(written: Arc<AtomicU64>) -> Memory {
        Memory {
            request: Vec::new(),
            response: None,
            upgraded: false,
            written,
        }
    }

    /// The handshake request is complete: prepare the 101 answer.
    fn answer(&mut self) -> std::io::Result<()> {
        let request = String::from_utf8_lossy(&self.request);
        let key = request
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            })
            .ok_or_else(|| std::io::Error::other("no Sec-WebSocket-Key"))?;
        self.response = Some(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            )
            .into_bytes(),
        );
        self.upgraded = true;
        Ok(())
    }
}

impl AsyncRead for Memory {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.response.take() {
            Some(response) => {
                buf.put_slice(&response);
                std::task::Poll::Ready(Ok(()))
            }
            None => std::task::Poll::Pending,
        }
    }
}

impl AsyncWrite for Memory {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.upgraded {
            self.written
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        } else {
            self.request.extend_from_slice(bytes);
            if self.request.ends_with(b"\r\n\r\n") {
                self.answer()?;
            }
        }
        std::task::Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A byte stream behind one box and vtable, as the client's own stream is.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Checks that a memory side's stream took exactly the frames of the messages sent.
fn took(written: &AtomicU64, sent: u64, side: &str) {
    let bytes = written.load(Ordering::Relaxed);
    assert_eq!(
        bytes,
        sent * FRAME_LEN,
        "{side}: {bytes} bytes for {sent} messages"
    );
}

/// What the memory setting's two streams took, against what each side sent.
struct Taken {
    raw: Arc<AtomicU64>,
    client: Arc<AtomicU64>,
    raw_sent: u64,
    client_sent: u64,
}

impl Taken {
    /// Records `n` more messages sent by `who` and checks its stream took exactly their frames.
    fn check(&mut self, who: Who, n: u64) {
        match who {
            Who::Raw => {
                self.raw_sent += n;
                took(&self.raw, self.raw_sent, "memory raw");
            }
            Who::Client => {
                self.client_sent += n;
                took(&self.client, self.client_sent, "memory ws_client");
            }
        }
    }
}

/// The memory setting: raw over a [`Memory`] stream, and a client connected to another.
fn memory_sides(rt: &Runtime) -> (WebSocketStream<Box<dyn Io>>, WsClient, Incoming, Taken) {
    let taken = Taken {
        raw: Arc::new(AtomicU64::new(0)),
        client: Arc::new(AtomicU64::new(0)),
        raw_sent: 0,
        client_sent: 0,
    };
    let raw = rt.block_on(async {
        let io = Box::new(Memory::new(Arc::clone(&taken.raw))) as Box<dyn Io>;
        let (ws, _) = tokio_tungstenite::client_async("ws://memory/raw", io)
            .await
            .expect("upgrade");
        ws
    });
    // A fresh `Memory` stream for each connection, counting into the same counter.
    let written = Arc::clone(&taken.client);
    let transport = tower::service_fn(move |_: Uri| {
        std::future::ready(Ok::<_, std::io::Error>(Memory::new(Arc::clone(&written))))
    });
    let builder = WsClient::builder("ws://memory/client")
        .expect("a good URL")
        .connector(WsConnector::new().with_transport(transport));
    let (client, incoming) = connected(rt, builder);
    (raw, client, incoming, taken)
}

fn memory(c: &mut Criterion) {
    let rt = runtime();
    let (mut raw, client, _incoming, mut taken) = memory_sides(&rt);
    modes(c, &rt, "memory/", &mut raw, &client, |who, n| {
        taken.check(who, n)
    });
    on_first_connection(&client);
}

/// Batches of [`BATCH`] messages each side sends per pair in the `relative` pipelined
/// functions (about 0.4 ms on loopback).
const PAIR_BATCHES: u64 = 5;

/// Awaited sends each side makes per pair in the `relative` awaited functions (about 2.5 ms on
/// loopback).
const PAIR_SENDS: u64 = 500;

/// The paired functions of one setting, `{prefix}awaited/ws_client`,
/// `{prefix}pipelined/ws_client` and `{prefix}pipelined/ws_sink`, in `group`; every unit is
/// followed by `check(who, messages sent in it)`.
fn relative_modes<R>(
    group: &mut BenchmarkGroup<'_, Figure>,
    rt: &Runtime,
    prefix: &str,
    raw: &mut R,
    client: &WsClient,
    mut check: impl FnMut(Who, u64),
) where
    R: Sink<Message> + Unpin,
    R::Error: std::fmt::Debug,
{
    let message = Message::text(PAYLOAD);
    group.bench_function(format!("{prefix}awaited/ws_client"), |b| {
        b.iter_custom(|iters| {
            pairs(iters, Who::Raw, Who::Client, |who| {
                let elapsed = match who {
                    Who::Raw => timed(rt, send_each(raw, &message, PAIR_SENDS)),
                    Who::Client => timed(rt, client_send_each(client, &message, PAIR_SENDS)),
                };
                check(who, PAIR_SENDS);
                elapsed
            })
        })
    });
    group.bench_function(format!("{prefix}pipelined/ws_client"), |b| {
        b.iter_custom(|iters| {
            pairs(iters, Who::Raw, Who::Client, |who| {
                let elapsed = match who {
                    Who::Raw => timed(rt, feed_batches(raw, &message, PAIR_BATCHES)),
                    Who::Client => timed(rt, client_feed_batches(client, &message, PAIR_BATCHES)),
                };
                check(who, PAIR_BATCHES * BATCH);
                elapsed
            })
        })
    });
    let mut sink = client.sink();
    group.bench_function(format!("{prefix}pipelined/ws_sink"), |b| {
        b.iter_custom(|iters| {
            pairs(iters, Who::Raw, Who::Client, |who| {
                let elapsed = match who {
                    Who::Raw => timed(rt, feed_batches(raw, &message, PAIR_BATCHES)),
                    Who::Client => timed(rt, feed_batches(&mut sink, &message, PAIR_BATCHES)),
                };
                check(who, PAIR_BATCHES * BATCH);
                elapsed
            })
        })
    });
}

/// A `relative` group with few samples of equal size: a pair takes 1-5 ms.
fn relative_group<'c>(c: &'c mut Criterion<Figure>) -> BenchmarkGroup<'c, Figure> {
    let mut group = c.benchmark_group("relative");
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    group
}

/// The loopback setting, paired: the client against raw in both modes, and
/// `pipelined/raw_again`, a second raw connection against the first (the noise floor of the
/// pairing itself; its "client" is that second connection).
fn relative_loopback(c: &mut Criterion<Figure>) {
    let rt = runtime();
    let server = Server::start();
    let (mut raw, mut raw_count) = raw_tcp(&rt, &server);
    let (mut raw_again, mut again_count) = raw_tcp(&rt, &server);
    let (client, _incoming, mut client_count) = client_tcp(&rt, &server);
    let message = Message::text(PAYLOAD);

    let mut group = relative_group(c);
    group.bench_function("loopback/pipelined/raw_again", |b| {
        b.iter_custom(|iters| {
            pairs(iters, Who::Raw, Who::Client, |who| {
                let (sink, counted, side) = match who {
                    Who::Raw => (&mut raw, &mut raw_count, "raw"),
                    Who::Client => (&mut raw_again, &mut again_count, "raw_again"),
                };
                let elapsed = timed(&rt, feed_batches(sink, &message, PAIR_BATCHES));
                counted.check(PAIR_BATCHES * BATCH, side);
                elapsed
            })
        })
    });
    relative_modes(
        &mut group,
        &rt,
        "loopback/",
        &mut raw,
        &client,
        |who, n| match who {
            Who::Raw => raw_count.check(n, "raw"),
            Who::Client => client_count.check(n, "ws_client"),
        },
    );
    group.finish();
    on_first_connection(&client);
}

/// The memory setting, paired.
fn relative_memory(c: &mut Criterion<Figure>) {
    let rt = runtime();
    let (mut raw, client, _incoming, mut taken) = memory_sides(&rt);
    let mut group = relative_group(c);
    relative_modes(&mut group, &rt, "memory/", &mut raw, &client, |who, n| {
        taken.check(who, n)
    });
    group.finish();
    on_first_connection(&client);
}

criterion_group!(benches, ws, memory);
criterion_group! {
    name = relative;
    config = Criterion::default().with_measurement(RATIO);
    targets = relative_loopback, relative_memory
}
criterion_main!(benches, relative);
