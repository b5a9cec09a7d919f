//! A criterion measurement for figures a bench computes itself (bytes, counts), returned from
//! `iter_custom`: shared by `benches/idle.rs` and `benches/many.rs`.
#![allow(dead_code, unreachable_pub)]

use criterion::Throughput;
use criterion::measurement::{Measurement, ValueFormatter};

/// A figure of the bench, shown in `unit` (`scale` of its values make one) and given to
/// machines in `machine_unit`.
///
/// Criterion refuses a sample of zero, which a count of wake-ups should be; so what criterion sees is
/// the figure plus `offset` (see [`Figure::value`]), and what it shows has it taken off again.
/// Its statistics do not change with the offset, its relative changes do.
pub struct Figure {
    pub unit: &'static str,
    pub scale: f64,
    pub machine_unit: &'static str,
    pub offset: f64,
}

impl Figure {
    /// What `iter_custom` returns for `figure`, measured once, when criterion asked for `iters`.
    pub fn value(&self, figure: f64, iters: u64) -> f64 {
        (figure + self.offset) * iters as f64
    }
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
        values
            .iter_mut()
            .for_each(|v| *v = (*v - self.offset) / self.scale);
        self.unit
    }

    fn scale_throughputs(&self, _typical: f64, _: &Throughput, values: &mut [f64]) -> &'static str {
        self.scale_values(0.0, values)
    }

    fn scale_for_machines(&self, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| *v -= self.offset);
        self.machine_unit
    }
}

/// Bytes, shown as KiB.
pub const HEAP: Figure = Figure {
    unit: "KiB",
    scale: 1024.0,
    machine_unit: "B",
    offset: 0.0,
};
