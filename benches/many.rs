//! 10,000 idle managed connections in one process: what they hold, whether they wake up, and
//! how long they take to come back after a server drops them all at once.
//!
//! Every connection is one application of `ReconnectLayer::new(())` to an in-memory connector
//! (its connections are `service_fn(|n: u64| async move { Ok(n) })`), on the bench thread's
//! current-thread runtime under paused tokio time, connected with `handle.connect()` and waited
//! for with `handle.wait_for`. The application keeps each `Reconnect` service and a `Handle`.
//!
//! - `many/heap/*` (bytes per connection, a custom measurement read from the counting
//!   allocator of `support/alloc.rs`): `stable` is figure (a), 10,000 connections connected
//!   for longer than the stable period (5 s), every driver waiting; target: at most 2 KiB.
//!   `connected` is the same before the stable period ends (each driver holds its stable-period
//!   timer). The other sides take a managed connection apart: `layer` (a `ReconnectLayer` never
//!   applied), `handle` (the handle of one, the layer dropped: the core alone), `built` (the
//!   service and the driver of `ReconnectLayer::build`, the driver never polled), `spawned`
//!   (applied with `Layer::layer`, the driver spawned and waiting, never connected) and
//!   `stable_subscribed` (`stable`, with a `handle.subscribe()` receiver kept for each).
//! - `many/idle_wakeups/60s` (figure b, driver polls per connection per minute, a custom
//!   measurement): each driver, from `ReconnectLayer::build`, is spawned inside a wrapper that
//!   counts its polls; once all are connected and their stable-period timers fired, 60 s of
//!   paused time pass in 10 ms steps, and the polls in them are counted. Target: 0.
//!   (Criterion refuses samples of zero: it is given the figure plus one, and shows it minus
//!   one; see [`Figure`].)
//! - `many/herd/back_after_50ms`, `many/herd/back_after_2s` (figure c, paused time until all
//!   10,000 are back, reported as criterion's time): the herd of `support/herd.rs` with 10,000
//!   clients and the default backoff (full jitter, 1 s doubling to 30 s), for a short outage and
//!   a longer one. The time 99 % were back, the attempts and the busiest 50 ms window (count and
//!   share of the attempts) are printed. The last client back is the one whose early retries
//!   all fell in the outage, so that its ceiling grew: the time until all are back varies from
//!   run to run much more than the others.
//!
//! The figures end up on one line of stderr, `many: ...`, after criterion's report.
//!
//! Run with `cargo bench --bench many`.

// criterion 0.7's `criterion_group!` makes public functions without docs (0.8 needs Rust 1.86).
#![allow(missing_docs)]

#[path = "support/alloc.rs"]
mod alloc;
#[path = "support/figure.rs"]
mod figure;
#[path = "support/herd.rs"]
mod herd;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::measurement::Measurement;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use tokio::runtime::{Builder, Runtime};
use tower::{Layer, Service, service_fn};
use tower_epoch::{Driver, Handle, ReconnectLayer, State};

use alloc::live;
use figure::{Figure, HEAP, Scale};

/// Managed connections in each sample.
const CONNECTIONS: usize = 10_000;
/// Bound on every wait for a state.
const WAIT: Duration = Duration::from_secs(30);
/// Past the layer's default stable period (5 s): by then every stable-period timer fired.
const PAST_STABLE: Duration = Duration::from_secs(6);
/// The idle period of figure (b).
const IDLE: Duration = Duration::from_secs(60);
/// The steps it passes in.
const IDLE_STEP: Duration = Duration::from_millis(10);

fn paused() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("build a current-thread runtime")
}

/// The in-memory connector: every call is a connection at once.
fn connector() -> impl Service<
    (),
    Response = impl Service<u64, Response = u64, Error = Infallible, Future: Send>
               + Clone
               + Send
               + 'static,
    Error = Infallible,
    Future: Send + 'static,
> + Send
+ 'static {
    service_fn(|()| async {
        let conn = service_fn(|n: u64| async move { Ok::<_, Infallible>(n) });
        Ok::<_, Infallible>(conn)
    })
}

/// Yields often enough for every task of the runtime to run: each yield of the `block_on`
/// future lets the scheduler run up to 61 tasks (tokio's event interval).
async fn settle() {
    for _ in 0..2 * CONNECTIONS / 61 + 100 {
        tokio::task::yield_now().await;
    }
}

/// Runs until no task is left: the drivers of the connections dropped have ended and are freed.
async fn quiesce() {
    let metrics = tokio::runtime::Handle::current().metrics();
    for _ in 0..1_000_000 {
        if metrics.num_alive_tasks() == 0 {
            settle().await;
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{} tasks still alive", metrics.num_alive_tasks());
}

/// Waits until every handle is connected.
async fn all_connected<'a>(handles: impl IntoIterator<Item = &'a Handle>) {
    for handle in handles {
        handle
            .wait_for(WAIT, State::is_connected)
            .await
            .expect("connected within the bound");
    }
}

// ----- figure (a): heap per connection -----

/// Opens `CONNECTIONS` with `open`, lets `ready` bring them to the state to measure, and
/// returns the heap they hold per connection; then drops them and waits for their drivers.
fn held<T>(rt: &Runtime, mut open: impl FnMut() -> T, ready: impl AsyncFnOnce(&[T])) -> f64 {
    let bytes = rt.block_on(async {
        quiesce().await;
        let mut all = Vec::with_capacity(CONNECTIONS);
        let start = live();
        for _ in 0..CONNECTIONS {
            all.push(open());
        }
        ready(&all).await;
        let held = live() - start;
        drop(all);
        quiesce().await;
        held
    });
    bytes as f64 / CONNECTIONS as f64
}

/// One managed connection as an application holds it: the service and a handle.
fn applied() -> (impl Sized, Handle) {
    let layer = ReconnectLayer::new(());
    let service = layer.layer(connector());
    let handle = service.handle();
    (service, handle)
}

/// [`applied`], its connection asked for.
fn connected_app() -> (impl Sized, Handle) {
    let (service, handle) = applied();
    handle.connect().expect("the driver runs");
    (service, handle)
}

fn heap_layer(rt: &Runtime) -> f64 {
    held(rt, || ReconnectLayer::new(()), async |_| {})
}

fn heap_handle(rt: &Runtime) -> f64 {
    held(rt, || ReconnectLayer::new(()).handle(), async |_| {})
}

fn heap_built(rt: &Runtime) -> f64 {
    held(
        rt,
        || ReconnectLayer::new(()).build(connector()),
        async |_| {},
    )
}

fn heap_spawned(rt: &Runtime) -> f64 {
    held(rt, applied, async |_| settle().await)
}

fn heap_connected(rt: &Runtime) -> f64 {
    held(rt, connected_app, async |all| {
        all_connected(all.iter().map(|(_, handle)| handle)).await;
        settle().await;
    })
}

fn heap_stable(rt: &Runtime) -> f64 {
    held(rt, connected_app, async |all| {
        all_connected(all.iter().map(|(_, handle)| handle)).await;
        settle().await;
        tokio::time::advance(PAST_STABLE).await;
        settle().await;
        all_connected(all.iter().map(|(_, handle)| handle)).await;
    })
}

fn heap_stable_subscribed(rt: &Runtime) -> f64 {
    held(
        rt,
        || {
            let conn = connected_app();
            let states = conn.1.subscribe();
            (conn, states)
        },
        async |all| {
            all_connected(all.iter().map(|((_, handle), _)| handle)).await;
            settle().await;
            tokio::time::advance(PAST_STABLE).await;
            settle().await;
        },
    )
}

/// Driver polls per connection per minute.
const POLLS: Figure = Figure {
    unit: "polls/conn/min",
    machine_unit: "polls/conn/min",
    scale: Scale::Linear {
        per_unit: 1.0,
        offset: 1.0,
    },
};

/// Each sample is one run of 10,000 connections (or of a herd): ten of them, after one to warm
/// up (which also grows what the runtime keeps, its run queue, once).
fn few<M: Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
}

fn heap(c: &mut Criterion<Figure>) {
    let rt = paused();
    let mut group = c.benchmark_group("many/heap");
    few(&mut group);
    let sides: [(&str, Side); 7] = [
        ("layer", heap_layer),
        ("handle", heap_handle),
        ("built", heap_built),
        ("spawned", heap_spawned),
        ("connected", heap_connected),
        ("stable", heap_stable),
        ("stable_subscribed", heap_stable_subscribed),
    ];
    for (name, side) in sides {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let bytes = side(&rt);
                record(|f| f.heap.push((name, bytes)));
                HEAP.value(bytes, iters)
            })
        });
    }
    group.finish();
}

/// A side of the heap bench: what it opens, measured.
type Side = fn(&Runtime) -> f64;

// ----- figure (b): wake-ups while idle -----

/// A driver whose polls are counted.
struct Counted {
    driver: Driver,
    polls: Arc<AtomicU64>,
}

impl Future for Counted {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.driver).poll(cx)
    }
}

/// Driver polls of one run, per connection.
#[derive(Clone, Copy, Debug)]
struct Polls {
    /// From the spawn until all are connected and settled.
    connecting: f64,
    /// While the stable-period timers fire.
    stable: f64,
    /// In the idle minute that follows, per minute.
    idle_per_minute: f64,
}

fn idle_polls(rt: &Runtime) -> Polls {
    rt.block_on(async {
        quiesce().await;
        let polls = Arc::new(AtomicU64::new(0));
        let all: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let (service, driver) = ReconnectLayer::new(()).build(connector());
                let handle = service.handle();
                tokio::spawn(Counted {
                    driver,
                    polls: Arc::clone(&polls),
                });
                handle.connect().expect("the driver runs");
                (service, handle)
            })
            .collect();
        all_connected(all.iter().map(|(_, handle)| handle)).await;
        settle().await;
        let connected = polls.load(Ordering::Relaxed);
        tokio::time::advance(PAST_STABLE).await;
        settle().await;
        let stable = polls.load(Ordering::Relaxed);
        let mut idle = Duration::ZERO;
        while idle < IDLE {
            tokio::time::advance(IDLE_STEP).await;
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            idle += IDLE_STEP;
        }
        // Whatever woke in the last steps runs now.
        settle().await;
        let idled = polls.load(Ordering::Relaxed);
        assert!(
            all.iter().all(|(_, handle)| handle.state().is_connected()),
            "still connected after the idle minute"
        );
        drop(all);
        quiesce().await;
        let per = |polls: u64| polls as f64 / CONNECTIONS as f64;
        Polls {
            connecting: per(connected),
            stable: per(stable - connected),
            idle_per_minute: per(idled - stable) * 60.0 / IDLE.as_secs_f64(),
        }
    })
}

fn wakeups(c: &mut Criterion<Figure>) {
    let rt = paused();
    let mut group = c.benchmark_group("many/idle_wakeups");
    few(&mut group);
    group.bench_function("60s", |b| {
        b.iter_custom(|iters| {
            let polls = idle_polls(&rt);
            record(|f| f.polls.push(polls));
            POLLS.value(polls.idle_per_minute, iters)
        })
    });
    group.finish();
}

// ----- figure (c): the herd -----

/// What one herd run gave.
#[derive(Clone, Copy, Debug)]
struct Storm {
    all_back: Duration,
    /// When 99 % of the clients were back.
    p99_back: Duration,
    connected: usize,
    attempts: usize,
    busiest: usize,
}

/// When the share `q` of the clients were back: the server refuses nothing once back, so each
/// client's first attempt from then on connects it, and it attempts no more.
fn back_by(herd: &herd::Herd, down: Duration, q: f64) -> Duration {
    let back: Vec<Duration> = herd
        .attempts
        .iter()
        .copied()
        .filter(|t| *t >= down)
        .collect();
    let i = ((back.len() as f64 * q).ceil() as usize).clamp(1, back.len().max(1)) - 1;
    back.get(i).copied().unwrap_or_default()
}

const OUTAGES: [(&str, Duration); 2] = [
    ("back_after_50ms", Duration::from_millis(50)),
    ("back_after_2s", Duration::from_secs(2)),
];

const WINDOW: Duration = Duration::from_millis(50);

fn storms(c: &mut Criterion) {
    let mut group = c.benchmark_group("many/herd");
    few(&mut group);
    for (name, down) in OUTAGES {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let herd = paused().block_on(herd::simulate_n(CONNECTIONS, down));
                let storm = Storm {
                    all_back: herd.all_back,
                    p99_back: back_by(&herd, down, 0.99),
                    connected: herd.connected,
                    attempts: herd.attempts.len(),
                    busiest: herd.busiest(WINDOW),
                };
                assert_eq!(storm.connected, CONNECTIONS, "every client came back");
                record(|f| f.storms.push((name, storm)));
                // Criterion's time here is paused time: until the last client was back.
                storm.all_back * iters as u32
            })
        });
    }
    group.finish();
}

// ----- the summary -----

/// Every figure measured, for the summary.
struct Figures {
    heap: Vec<(&'static str, f64)>,
    polls: Vec<Polls>,
    storms: Vec<(&'static str, Storm)>,
}

static FIGURES: Mutex<Figures> = Mutex::new(Figures {
    heap: Vec::new(),
    polls: Vec::new(),
    storms: Vec::new(),
});

fn record(f: impl FnOnce(&mut Figures)) {
    f(&mut FIGURES.lock().unwrap());
}

fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (n, sum) = values
        .into_iter()
        .fold((0usize, 0.0), |(n, sum), v| (n + 1, sum + v));
    (n > 0).then(|| sum / n as f64)
}

/// One line with every figure measured (the mean of the runs, the warm-up one included).
fn summary() -> String {
    let figures = FIGURES.lock().unwrap();
    let mut parts = Vec::new();
    let heap = |side: &str| mean(figures.heap.iter().filter(|(s, _)| *s == side).map(|h| h.1));
    if let Some(stable) = heap("stable") {
        let mut part = format!(
            "heap {stable:.0} B/conn ({:.2} KiB, target <= 2 KiB)",
            stable / 1024.0
        );
        if let Some(connected) = heap("connected") {
            write!(part, ", {connected:.0} B/conn within the stable period").unwrap();
        }
        parts.push(part);
    }
    if let Some(idle) = mean(figures.polls.iter().map(|p| p.idle_per_minute)) {
        let connecting = mean(figures.polls.iter().map(|p| p.connecting)).unwrap_or(0.0);
        let stable = mean(figures.polls.iter().map(|p| p.stable)).unwrap_or(0.0);
        parts.push(format!(
            "idle wake-ups {idle:.3} driver polls/conn/min (target 0; {connecting:.1} polls/conn to connect, {stable:.1} for the stable timer)"
        ));
    }
    for (name, down) in OUTAGES {
        let runs: Vec<Storm> = figures
            .storms
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|s| s.1)
            .collect();
        let Some(back) = mean(runs.iter().map(|s| s.all_back.as_secs_f64())) else {
            continue;
        };
        let min = runs.iter().map(|s| s.all_back).min().unwrap_or_default();
        let max = runs.iter().map(|s| s.all_back).max().unwrap_or_default();
        let p99 = mean(runs.iter().map(|s| s.p99_back.as_secs_f64())).unwrap_or(0.0);
        let attempts = mean(runs.iter().map(|s| s.attempts as f64)).unwrap_or(0.0);
        let busiest = mean(runs.iter().map(|s| s.busiest as f64)).unwrap_or(0.0);
        parts.push(format!(
            "herd down {down:?}: all back after {back:.2} s ({:.2}..{:.2} s; 99 % after {p99:.2} s), {attempts:.0} attempts, busiest 50 ms {busiest:.0} ({:.1} %)",
            min.as_secs_f64(),
            max.as_secs_f64(),
            busiest / attempts.max(1.0) * 100.0,
        ));
    }
    format!(
        "many: {CONNECTIONS} idle managed connections, in-memory connector, paused time: {}",
        parts.join("; ")
    )
}

criterion::criterion_group! {
    name = memory;
    config = Criterion::default().with_measurement(HEAP);
    targets = heap
}

criterion::criterion_group! {
    name = idle;
    config = Criterion::default().with_measurement(POLLS);
    targets = wakeups
}

criterion::criterion_group!(herds, storms);

fn main() {
    memory();
    idle();
    herds();
    Criterion::default().configure_from_args().final_summary();
    eprintln!("{}", summary());
}
