//! The per-request cost of the reconnect middlewares while connected.
//!
//! One group, `request_path`, times `svc.ready().await.unwrap().call(req).await` on a tokio
//! current-thread runtime for four services over the same trivial connection
//! (`service_fn(|x: u64| async move { Ok::<_, Infallible>(x + 1) })`) and the same in-memory
//! connector (a `service_fn` that returns a clone of that connection at once):
//!
//! - `bare`: the connection itself;
//! - `tower_epoch`: [`tower_epoch::Reconnect`], connected through its handle before measuring;
//! - `tower_epoch_idle_timeout`: the same with an idle timeout (each request holds the
//!   connection, so that the idle close never races it);
//! - `tower_epoch_failure_predicate`: the same with a failure predicate (each response future
//!   can report its connection's failure);
//! - `tower_reconnect`: [`tower::reconnect::Reconnect`];
//! - `tower_resilience_reconnect`: `tower_resilience_reconnect::ReconnectService` (0.14).
//!
//! Each sample is one `block_on` running a loop of `iters` requests, timed inside the block, so
//! entering the runtime is not measured (`Bencher::iter_custom`).
//!
//! Target: `tower_epoch` at most 1.5x `bare`.
//!
//! Run with `cargo bench --bench request_path`.

// criterion 0.7's `criterion_group!` makes public functions without docs (0.8 needs Rust 1.86).
#![allow(missing_docs)]

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::time::{Duration, Instant};

use tower_epoch::State;

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

    // (b) tower-epoch, connected before measuring; with an idle timeout, whose requests hold
    // the connection; and with a failure predicate. Both carry what they need in a box the
    // response future owns, so that the plain path's future stays as small as before.
    let mut epoch = connected(&rt, tower_epoch::ReconnectLayer::new(()));
    check(&rt, &mut epoch);
    group.bench_function("tower_epoch", |b| {
        b.iter_custom(|iters| run(&rt, &mut epoch, iters));
    });
    let idle = tower_epoch::ReconnectLayer::new(()).with_idle_timeout(Duration::from_secs(3600));
    let mut epoch_idle = connected(&rt, idle);
    check(&rt, &mut epoch_idle);
    group.bench_function("tower_epoch_idle_timeout", |b| {
        b.iter_custom(|iters| run(&rt, &mut epoch_idle, iters));
    });
    let classified = tower_epoch::ReconnectLayer::new(()).with_failure_predicate(|_| false);
    let mut epoch_classified = connected(&rt, classified);
    check(&rt, &mut epoch_classified);
    group.bench_function("tower_epoch_failure_predicate", |b| {
        b.iter_custom(|iters| run(&rt, &mut epoch_classified, iters));
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
    for handle in [
        epoch.handle(),
        epoch_idle.handle(),
        epoch_classified.handle(),
    ] {
        let ledger = handle.ledger();
        assert!(handle.state().is_connected(), "{:?}", handle.state());
        assert_eq!((ledger.opened, ledger.installed), (1, 1), "{ledger:?}");
    }
}

/// A tower-epoch service over the bench's connection, connected. `Layer::layer` spawns the
/// driver on `rt`; the driver only runs while a `block_on` is pending, which the connected
/// path never is.
fn connected(
    rt: &Runtime,
    layer: tower_epoch::ReconnectLayer<()>,
) -> tower_epoch::Reconnect<impl Service<u64, Response = u64, Error = Infallible> + Clone + use<>> {
    let _guard = rt.enter();
    let handle = layer.handle();
    let svc = layer.layer(connector::<_, ()>(connection()));
    handle.connect().expect("the driver is spawned");
    rt.block_on(handle.wait_for(Duration::from_secs(5), State::is_connected))
        .expect("connected within 5 s");
    assert!(handle.state().is_connected());
    svc
}

criterion_group!(benches, request_path);
criterion_main!(benches);
