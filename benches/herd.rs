//! A thundering herd: 1,000 managed connections with the default backoff, all dropped at once
//! by a server that is back after 50 ms, or after 2 s (see `support/herd.rs`).
//!
//! It prints, for each outage, the figures that matter to the server: how many connect attempts
//! the herd made, the share of them in the busiest 50 ms window (target: at most 10 %), and when
//! the last client was connected again, all in paused tokio time. Criterion then times one
//! simulation (the CPU cost of the reconnect storm in this process, 1,000 drivers on one
//! thread).
//!
//! Run with `cargo bench --bench herd`.

// criterion 0.7's `criterion_group!` makes public functions without docs (0.8 needs Rust 1.86).
#![allow(missing_docs)]

#[path = "support/herd.rs"]
mod herd;

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tokio::runtime::{Builder, Runtime};

fn paused() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("build the runtime")
}

fn herd(c: &mut Criterion) {
    let mut group = c.benchmark_group("herd");
    group.sample_size(10);
    for (name, down) in [
        ("back_after_50ms", Duration::from_millis(50)),
        ("back_after_2s", Duration::from_secs(2)),
    ] {
        let seen = paused().block_on(herd::simulate(down));
        println!(
            "herd/{name}: {} clients, {} attempts, busiest 50 ms window {:.1} %, all back after {:?} (paused time)",
            herd::CLIENTS,
            seen.attempts.len(),
            seen.busiest_share(Duration::from_millis(50)) * 100.0,
            seen.all_back,
        );
        group.bench_function(name, |b| {
            b.iter(|| paused().block_on(herd::simulate(down)));
        });
    }
    group.finish();
}

criterion_group!(benches, herd);
criterion_main!(benches);
