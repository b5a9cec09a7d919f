//! Connect/disconnect toggles per second.
//!
//! The connector is in memory and instant (a `service_fn` returning a clone of a trivial
//! connection in a ready future); teardown is the default [`DropTeardown`]. A *toggle* is one
//! intent change: one `connect()` or one `disconnect()`. Criterion reports toggles per second
//! (`Throughput::Elements`).
//!
//! One group, `toggles`, with two workloads, each on a tokio current-thread and a multi-thread
//! runtime (the measured loop runs in a task spawned on that runtime, next to the driver):
//!
//! - `full_cycle`: `connect()`, wait until that epoch is connected (`subscribe` + `wait_for`,
//!   bounded by a timeout), then `disconnect().await` (the teardown has completed): 2 toggles.
//! - `burst`: `connect()` and `drop(disconnect())` alternately, [`BURST`] pairs without waiting,
//!   then wait for quiescence: 2 x [`BURST`] toggles. So that the driver's work is measured
//!   too, the last pair of a burst waits like a full cycle (the driver drains every queued
//!   effect before it installs that connection), and the burst ends only once the state is
//!   idle and every opened connection is closed.
//!
//! Then, once, the memory under a toggle storm with a slow connector: 10,000 toggles per second
//! for 20 s of paused tokio time, each attempt taking the whole 10 s connect timeout, with the
//! live heap of the bench thread printed every 5 s (a counting allocator). The driver keeps
//! only the newest few attempts in flight and drops the stale ones, so the heap stays flat; the
//! bench panics if it grows by more than 64 KiB between 5 s and 20 s.
//!
//! After the measured run the ledger of each runtime must balance (`opened == installed +
//! discarded`, `closed == opened`, nothing installed), or the bench panics.
//!
//! [`DropTeardown`]: tower_epoch::teardown::DropTeardown
//!
//! Target: at least 200,000 toggles per second.
//!
//! Run with `cargo bench --bench toggles`.

// criterion 0.7's `criterion_group!` makes public functions without docs (0.8 needs Rust 1.86).
#![allow(missing_docs)]

use std::convert::Infallible;
use std::future::{Future, ready};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::{Builder, Runtime};
use tower::{Layer, service_fn};
use tower_epoch::{Epoch, Handle, ReconnectLayer, State};

/// Bound on every wait; a correct driver needs microseconds.
const WAIT: Duration = Duration::from_secs(5);

/// connect/disconnect pairs per burst.
const BURST: u64 = 1_000;

#[path = "support/alloc.rs"]
mod alloc;

/// A runtime with a managed connection whose driver runs on it.
struct Rig {
    name: &'static str,
    rt: Runtime,
    handle: Handle,
}

impl Rig {
    fn new(name: &'static str, mut builder: Builder) -> Rig {
        let rt = builder.enable_all().build().expect("build the runtime");
        let handle = {
            let _guard = rt.enter();
            let layer = ReconnectLayer::new(());
            let handle = layer.handle();
            let conn = service_fn(|x: u64| async move { Ok::<_, Infallible>(x + 1) });
            // The connection is `Copy`: handing it out is handing out a clone.
            let connector = service_fn(move |(): ()| ready(Ok::<_, Infallible>(conn)));
            // Spawns the driver on `rt`. The handle alone keeps it running; the service is not
            // needed here.
            drop(layer.layer(connector));
            handle
        };
        let rig = Rig { name, rt, handle };
        // One unmeasured cycle: the rig works, and the ledger check below is meaningful even
        // when a filter skips this rig's benchmarks.
        rig.measure(|h| full_cycles(h, 1));
        rig
    }

    /// Runs `work` in a task on the runtime and returns the time it measured.
    fn measure<F, Fut>(&self, work: F) -> Duration
    where
        F: FnOnce(Handle) -> Fut,
        Fut: Future<Output = Duration> + Send + 'static,
    {
        let task = self.rt.spawn(work(self.handle.clone()));
        self.rt.block_on(task).expect("the measured task panicked")
    }

    /// Waits for quiescence, then panics unless the books balance.
    fn check_ledger(&self) {
        let handle = self.handle.clone();
        self.rt.block_on(async move { quiesce(&handle).await });
        let state = self.handle.state();
        let l = self.handle.ledger();
        eprintln!("{}: {state}, {l:?}", self.name);
        assert!(
            l.opened == l.installed + l.discarded,
            "{}: opened != installed + discarded: {l:?}",
            self.name
        );
        assert!(
            l.closed == l.opened,
            "{}: closed != opened: {l:?}",
            self.name
        );
        assert!(
            !state.is_connected(),
            "{}: still connected: {state}",
            self.name
        );
        assert!(
            l.installed > 0,
            "{}: nothing was ever installed: {l:?}",
            self.name
        );
    }
}

/// Waits until `epoch` is the installed connection.
async fn connected(states: &mut tokio::sync::watch::Receiver<State>, epoch: Epoch) {
    tokio::time::timeout(
        WAIT,
        states.wait_for(|s| s.is_connected() && s.epoch() == Some(epoch)),
    )
    .await
    .expect("connected within the timeout")
    .expect("state channel open");
}

/// Waits until the state is idle and every opened connection is closed.
async fn quiesce(handle: &Handle) {
    tokio::time::timeout(WAIT, async {
        loop {
            let l = handle.ledger();
            if matches!(handle.state(), State::Idle) && l.closed == l.opened {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no quiescence: {} {:?}", handle.state(), handle.ledger()));
}

/// `iters` full cycles: connect, wait until connected, disconnect and wait for the teardown.
async fn full_cycles(handle: Handle, iters: u64) -> Duration {
    let mut states = handle.subscribe();
    let start = Instant::now();
    for _ in 0..iters {
        let epoch = handle.connect().expect("the driver is running");
        connected(&mut states, epoch).await;
        handle.disconnect().await;
    }
    start.elapsed()
}

/// `iters` bursts of `BURST` connect/disconnect pairs, each followed by quiescence.
async fn bursts(handle: Handle, iters: u64) -> Duration {
    let mut states = handle.subscribe();
    let start = Instant::now();
    for _ in 0..iters {
        for _ in 1..BURST {
            handle.connect().expect("the driver is running");
            drop(handle.disconnect());
        }
        let epoch = handle.connect().expect("the driver is running");
        connected(&mut states, epoch).await;
        handle.disconnect().await;
        quiesce(&handle).await;
    }
    start.elapsed()
}

fn toggles(c: &mut Criterion) {
    let rigs = [
        Rig::new("current_thread", Builder::new_current_thread()),
        Rig::new("multi_thread", Builder::new_multi_thread()),
    ];
    let mut group = c.benchmark_group("toggles");

    group.throughput(Throughput::Elements(2));
    for rig in &rigs {
        group.bench_function(BenchmarkId::new("full_cycle", rig.name), |b| {
            b.iter_custom(|iters| rig.measure(|h| full_cycles(h, iters)));
        });
    }

    group.throughput(Throughput::Elements(2 * BURST));
    for rig in &rigs {
        group.bench_function(BenchmarkId::new("burst", rig.name), |b| {
            b.iter_custom(|iters| rig.measure(|h| bursts(h, iters)));
        });
    }

    group.finish();

    for rig in &rigs {
        rig.check_ledger();
    }
}

/// 10,000 toggles per second for 20 s with a connector that takes the whole connect timeout;
/// prints the live heap every 5 s and panics unless it stays flat.
fn memory_under_a_toggle_storm() {
    const PER_SECOND: u32 = 10_000;
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    let rt = Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("build the runtime");
    let samples = rt.block_on(async {
        let base = alloc::live();
        let layer = ReconnectLayer::new(()).with_connect_timeout(CONNECT_TIMEOUT);
        let handle = layer.handle();
        let conn = service_fn(|x: u64| async move { Ok::<_, Infallible>(x + 1) });
        let connector = service_fn(move |(): ()| async move {
            tokio::time::sleep(CONNECT_TIMEOUT).await;
            Ok::<_, Infallible>(conn)
        });
        drop(layer.layer(connector));
        let step = Duration::from_secs(1) / PER_SECOND;
        let mut samples = Vec::new();
        for second in 1..=20u32 {
            for i in 0..PER_SECOND {
                if i % 2 == 0 {
                    handle.connect().expect("the driver is running");
                } else {
                    drop(handle.disconnect());
                }
                tokio::task::yield_now().await;
                tokio::time::advance(step).await;
            }
            if second % 5 == 0 {
                samples.push((second, alloc::live() - base, handle.ledger()));
            }
        }
        samples
    });
    for (second, heap, ledger) in &samples {
        eprintln!(
            "toggles/memory: after {second:>2} s: live heap {:.1} KiB; attempts {}, cancelled {}, failures {}",
            *heap as f64 / 1024.0,
            ledger.attempts,
            ledger.cancelled,
            ledger.failures,
        );
    }
    let (_, at_5s, _) = samples[0];
    let (_, at_20s, _) = samples[samples.len() - 1];
    assert!(
        at_20s - at_5s <= 64 * 1024,
        "the heap grew under toggles: {at_5s} B at 5 s, {at_20s} B at 20 s"
    );
}

fn storm(_: &mut Criterion) {
    memory_under_a_toggle_storm();
}

criterion_group!(benches, toggles, storm);
criterion_main!(benches);
