//! The per-request cost of the reconnect middlewares while connected.
//!
//! One group, `request_path`, times `svc.ready().await.unwrap().call(req).await` on a tokio
//! current-thread runtime for four services over the same trivial connection
//! (`service_fn(|x: u64| async move { Ok::<_, Infallible>(x + 1) })`) and the same in-memory
//! connector (a `service_fn` that returns a clone of that connection at once):
//!
//! - `bare`: the connection itself;
//! - `tower_epoch`: [`tower_epoch::Reconnect`], connected through its handle before measuring;
//! - `tower_reconnect`: [`tower::reconnect::Reconnect`];
//! - `tower_resilience_reconnect`: `tower_resilience_reconnect::ReconnectService` (0.14).
//!
//! Each sample is one `block_on` running a loop of `iters` requests, timed inside the block, so
//! entering the runtime is not measured (`Bencher::iter_custom`).
//!
//! Target: `tower_epoch` at most 1.5x `bare`.
//!
//! Run with `cargo bench --bench request_path`.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokio::runtime::{Builder, Runtime};
use tower::{Layer, Service, ServiceExt, service_fn};

/// The connector's future: ready at once, and `Unpin` as `tower::reconnect` requires.
type Connecting<C> = Ready<Result<C, Infallible>>;

/// The trivial connection, built by one function so that every service shares its type.
fn connection() -> impl Service<u64, Response = u64, Error = Infallible> + Clone {
    service_fn(|x: u64| async move { Ok::<_, Infallible>(x + 1) })
}

/// The connector: hands out a clone of `conn` at once, for any target.
fn connector<C: Clone, T>(
    conn: C,
) -> impl Service<T, Response = C, Error = Infallible, Future = Connecting<C>> {
    service_fn(move |_target: T| ready(Ok::<_, Infallible>(conn.clone())))
}

fn runtime() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread runtime")
}

/// Times `iters` requests through `svc` inside one `block_on`.
fn run<S>(rt: &Runtime, svc: &mut S, iters: u64) -> Duration
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            let response = svc.ready().await.unwrap().call(black_box(i)).await.unwrap();
            black_box(response);
        }
        start.elapsed()
    })
}

/// One request, checked, so that a misconfigured service fails loudly instead of being timed.
fn check<S>(rt: &Runtime, svc: &mut S)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let response = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            svc.ready().await.unwrap().call(41).await.unwrap()
        })
        .await
        .expect("the service answered within 5 s")
    });
    assert_eq!(response, 42);
}

fn request_path(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("request_path");

    // (a) The bare connection.
    let mut bare = connection();
    check(&rt, &mut bare);
    group.bench_function("bare", |b| {
        b.iter_custom(|iters| run(&rt, &mut bare, iters))
    });

    // (b) tower-epoch, connected before measuring. `Layer::layer` spawns the driver on `rt`;
    // the driver only runs while a `block_on` is pending, which the connected path never is.
    let mut epoch = {
        let _guard = rt.enter();
        let layer = tower_epoch::ReconnectLayer::new(());
        let handle = layer.handle();
        let svc = layer.layer(connector::<_, ()>(connection()));
        rt.block_on(async {
            let mut states = handle.subscribe();
            handle.connect().expect("the driver is running");
            tokio::time::timeout(
                Duration::from_secs(5),
                states.wait_for(|s| s.is_connected()),
            )
            .await
            .expect("connected within 5 s")
            .expect("state channel open");
        });
        assert!(handle.state().is_connected());
        svc
    };
    check(&rt, &mut epoch);
    group.bench_function("tower_epoch", |b| {
        b.iter_custom(|iters| run(&rt, &mut epoch, iters));
    });

    // (c) tower's own Reconnect (connects lazily on the first poll_ready; `check` does it).
    let mut tower_rc: tower::reconnect::Reconnect<_, ()> =
        tower::reconnect::Reconnect::new(connector::<_, ()>(connection()), ());
    check(&rt, &mut tower_rc);
    group.bench_function("tower_reconnect", |b| {
        b.iter_custom(|iters| run(&rt, &mut tower_rc, iters));
    });

    // (d) tower-resilience-reconnect 0.14 (also lazy; default config: reconnect on any error).
    let mut resilience = tower_resilience_reconnect::ReconnectLayer::new(
        tower_resilience_reconnect::ReconnectConfig::default(),
    )
    .layer(connector::<_, ()>(connection()));
    check(&rt, &mut resilience);
    group.bench_function("tower_resilience_reconnect", |b| {
        b.iter_custom(|iters| run(&rt, &mut resilience, iters));
    });

    group.finish();

    // Every middleware must still be on its first connection: nothing reconnected mid-run.
    let handle = epoch.handle();
    let ledger = handle.ledger();
    assert!(handle.state().is_connected(), "{:?}", handle.state());
    assert_eq!((ledger.opened, ledger.installed), (1, 1), "{ledger:?}");
}

criterion_group!(benches, request_path);
criterion_main!(benches);
