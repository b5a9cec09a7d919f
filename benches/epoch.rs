//! The cost of the epoch check.
//!
//! One group, `epoch_check`, compares side by side:
//!
//! - `stamp_is_current`: [`Stamp::is_current`] on a stamp taken from a layer's handle
//!   (follow the stamp's `Arc` to the clock, one `Acquire` load, compare with the captured epoch);
//! - `bare_atomic_load`: a bare `AtomicU64::load(Ordering::Acquire)` compared with a constant.
//!
//! Both the receiver and the result go through [`std::hint::black_box`] on every iteration, so
//! the load can be neither hoisted out of the loop nor folded into a constant.
//!
//! Target: `stamp_is_current` within 1.5x of `bare_atomic_load`.
//!
//! Run with `cargo bench --bench epoch`.

// criterion 0.7's `criterion_group!` makes public functions without docs (0.8 needs Rust 1.86).
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use tower_epoch::{ReconnectLayer, Stamp};

/// The value the bare load is compared with (the clock of a stamp taken before any tick).
const EXPECTED: u64 = 0;

fn epoch_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("epoch_check");

    let layer = ReconnectLayer::new(());
    let handle = layer.handle();
    let stamp: Stamp = handle.stamp();
    assert!(stamp.is_current(), "a fresh stamp must be current");
    group.bench_function("stamp_is_current", |b| {
        b.iter(|| black_box(black_box(&stamp).is_current()));
    });

    let atomic = AtomicU64::new(EXPECTED);
    group.bench_function("bare_atomic_load", |b| {
        b.iter(|| black_box(black_box(&atomic).load(Ordering::Acquire) == EXPECTED));
    });

    group.finish();
    // Nothing ticked the clock during the group.
    assert_eq!(handle.epoch(), stamp.epoch());
}

criterion_group!(benches, epoch_check);
criterion_main!(benches);
