//! Memory per idle connection: 1,000 connections opened and left idle, and the heap they hold
//! divided among them.
//!
//! A counting global allocator keeps, per thread, the bytes allocated and not yet freed. Each
//! sample opens [`CONNECTIONS`] connections on the bench thread's current-thread runtime, lets
//! them settle (every driver and monitor has run and waits), reads the growth of the bench
//! thread's live heap, and closes them again. The server side of the loopback connections runs
//! on a thread of its own, so its memory is not counted; what the kernel holds for a socket is
//! not on the heap and not counted either.
//!
//! The sides, in group `idle/per_connection`:
//!
//! - `ws_client`: a [`WsClient`] with default settings (heartbeat, queue, 4 KiB read buffer),
//!   connected to a tokio-tungstenite server on 127.0.0.1;
//! - `raw`: a tokio-tungstenite `WebSocketStream` over a `TcpStream` with tungstenite's
//!   default configuration (its 128 KiB read buffer), to the same server;
//! - `core`: the reconnect layer alone, over a connector of in-memory connections (a
//!   `Reconnect` service and its driver, connected): what managing a connection costs
//!   besides the connection itself.
//!
//! Criterion reports bytes per connection (a custom measurement, `support/figure.rs`). Target for
//! `ws_client`: at most 16 KiB.
//!
//! Run with `cargo bench --bench idle`.

// criterion 0.7's `criterion_group!` makes public functions without docs (0.8 needs Rust 1.86).
#![allow(missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Builder, Runtime};
use tower::service_fn;
use tower_epoch::ReconnectLayer;
use tower_epoch::ws::WsClient;

#[path = "support/alloc.rs"]
mod alloc;
#[path = "support/figure.rs"]
mod figure;

use alloc::live;
use figure::{Figure, HEAP};

/// Connections open at once in each sample.
const CONNECTIONS: usize = 1_000;
/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(30);

fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread runtime")
}

/// A tokio-tungstenite server on its own thread that accepts and reads until the end.
fn server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("idle-server".into())
        .spawn(move || {
            runtime().block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                tx.send(listener.local_addr().expect("address")).unwrap();
                while let Ok((socket, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await else {
                            return;
                        };
                        while let Some(Ok(_)) = ws.next().await {}
                    });
                }
            });
        })
        .expect("spawn the server thread");
    rx.recv_timeout(WAIT).expect("the server listens")
}

/// Lets every task of the runtime run until it waits.
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

/// Opens `CONNECTIONS` with `open`, and returns the heap they hold per connection; `close`
/// gets them back to release them.
fn per_connection<T, Open, Close>(rt: &Runtime, open: Open, close: Close) -> f64
where
    Open: AsyncFnMut() -> T,
    Close: AsyncFnOnce(Vec<T>),
{
    rt.block_on(async move {
        let mut open = open;
        settle().await;
        let mut all = Vec::with_capacity(CONNECTIONS);
        let before = live();
        for _ in 0..CONNECTIONS {
            all.push(open().await);
        }
        settle().await;
        let held = live() - before;
        close(all).await;
        held as f64 / CONNECTIONS as f64
    })
}

fn ws_client(rt: &Runtime, addr: SocketAddr) -> f64 {
    per_connection(
        rt,
        async || {
            let (client, incoming) = WsClient::builder(format!("ws://{addr}/idle"))
                .expect("a good URL")
                .build()
                .expect("default settings");
            let mut states = client.handle().subscribe();
            client.handle().connect().expect("the driver runs");
            tokio::time::timeout(WAIT, states.wait_for(|s| s.is_connected()))
                .await
                .expect("connected within the bound")
                .expect("state channel open");
            (client, incoming)
        },
        async |all: Vec<_>| {
            for (client, _) in &all {
                client.handle().disconnect().await;
            }
        },
    )
}

fn raw(rt: &Runtime, addr: SocketAddr) -> f64 {
    per_connection(
        rt,
        async || {
            let socket = TcpStream::connect(addr).await.expect("connect");
            socket.set_nodelay(true).expect("nodelay");
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/idle"), socket)
                .await
                .expect("upgrade");
            ws
        },
        async |all: Vec<_>| drop(all),
    )
}

fn core(rt: &Runtime) -> f64 {
    per_connection(
        rt,
        async || {
            let connector = service_fn(|()| async {
                let conn = service_fn(|n: u64| async move { Ok::<_, Infallible>(n) });
                Ok::<_, Infallible>(conn)
            });
            let layer = ReconnectLayer::new(());
            let handle = layer.handle();
            let service = tower::Layer::layer(&layer, connector);
            let mut states = handle.subscribe();
            handle.connect().expect("the driver runs");
            tokio::time::timeout(WAIT, states.wait_for(|s| s.is_connected()))
                .await
                .expect("connected within the bound")
                .expect("state channel open");
            (handle, service)
        },
        async |all: Vec<_>| {
            for (handle, _) in &all {
                handle.disconnect().await;
            }
        },
    )
}

fn idle(c: &mut Criterion<Figure>) {
    let rt = runtime();
    let addr = server();
    let mut group = c.benchmark_group("idle/per_connection");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
    group.bench_function("ws_client", |b| {
        b.iter_custom(|iters| HEAP.value(ws_client(&rt, addr), iters))
    });
    group.bench_function("raw", |b| {
        b.iter_custom(|iters| HEAP.value(raw(&rt, addr), iters))
    });
    group.bench_function("core", |b| {
        b.iter_custom(|iters| HEAP.value(core(&rt), iters))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(HEAP);
    targets = idle
}
criterion_main!(benches);
