//! A criterion measurement for figures a bench computes itself (bytes, counts, ratios of paired
//! times), returned from `iter_custom`: shared by `benches/idle.rs`, `benches/many.rs` and
//! `benches/ws.rs`.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use criterion::Throughput;
use criterion::measurement::{Measurement, ValueFormatter};

/// A figure of the bench, shown in `unit` and given to machines in `machine_unit`.
///
/// Only [`Bencher::iter_custom`](criterion::Bencher::iter_custom) can take it: `start` and `end`
/// have nothing to time.
pub struct Figure {
    pub unit: &'static str,
    pub machine_unit: &'static str,
    pub scale: Scale,
}

/// How criterion's values stand for the figure.
pub enum Scale {
    /// The figure plus `offset`, shown divided by `per_unit`.
    ///
    /// Criterion refuses a sample of zero, which a count of wake-ups should be; so what criterion
    /// sees is the figure plus `offset` (see [`Figure::value`]), and what it shows has it taken
    /// off again. Its statistics do not change with the offset, its relative changes do.
    Linear { per_unit: f64, offset: f64 },
    /// A mean logarithm of ratios (see [`pairs`]), shown as the ratio it stands for: their
    /// geometric mean.
    Log,
}

impl Figure {
    /// What `iter_custom` returns for `figure`, measured once, when criterion asked for `iters`.
    pub fn value(&self, figure: f64, iters: u64) -> f64 {
        match self.scale {
            Scale::Linear { offset, .. } => (figure + offset) * iters as f64,
            Scale::Log => figure.ln() * iters as f64,
        }
    }
}

/// Bytes, shown as KiB.
pub const HEAP: Figure = Figure {
    unit: "KiB",
    machine_unit: "B",
    scale: Scale::Linear {
        per_unit: 1024.0,
        offset: 0.0,
    },
};

/// The other side's time over raw's, from [`pairs`]. Above 1 the other side is slower.
pub const RATIO: Figure = Figure {
    unit: "x raw",
    machine_unit: "ratio",
    scale: Scale::Log,
};

/// `iters` pairs for [`RATIO`]: `run(raw)` and `run(other)`, raw first in even pairs and last in
/// odd ones, each returning the time of its unit of work; the sum over the pairs of the
/// logarithm of the other side's time over raw's.
///
/// Drift in the machine (the host's other tenants, the clock, a server's thread) moves both
/// halves of a pair alike. Criterion averages the logarithms, so [`RATIO`] shows the geometric
/// mean of the ratios: a pair slowed down on raw's side counts as much as one slowed down on
/// the other side, where a plain mean of ratios would lean towards the slow side.
pub fn pairs<W: Copy>(iters: u64, raw: W, other: W, mut run: impl FnMut(W) -> Duration) -> f64 {
    (0..iters)
        .map(|i| {
            let (raw, other) = if i % 2 == 0 {
                let raw = run(raw);
                (raw, run(other))
            } else {
                let other = run(other);
                (run(raw), other)
            };
            (other.as_secs_f64() / raw.as_secs_f64()).ln()
        })
        .sum()
}

impl Measurement for Figure {
    type Intermediate = ();
    type Value = f64;

    fn start(&self) {
        panic!("a `Figure` is measured only through `iter_custom`");
    }

    fn end(&self, (): ()) -> f64 {
        panic!("a `Figure` is measured only through `iter_custom`");
    }

    fn add(&self, a: &f64, b: &f64) -> f64 {
        a + b
    }

    fn zero(&self) -> f64 {
        0.0
    }

    fn to_f64(&self, value: &f64) -> f64 {
        *value
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        self
    }
}

impl ValueFormatter for Figure {
    fn scale_values(&self, _typical: f64, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| {
            *v = match self.scale {
                Scale::Linear { per_unit, offset } => (*v - offset) / per_unit,
                Scale::Log => v.exp(),
            }
        });
        self.unit
    }

    fn scale_throughputs(&self, _typical: f64, _: &Throughput, values: &mut [f64]) -> &'static str {
        // A figure has no throughput of its own: show the figure.
        self.scale_values(0.0, values)
    }

    fn scale_for_machines(&self, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| {
            *v = match self.scale {
                Scale::Linear { offset, .. } => *v - offset,
                Scale::Log => v.exp(),
            }
        });
        self.machine_unit
    }
}
