//! What the benches share: the quick knob and the criterion settings built from it.
#![allow(dead_code)] // the concurrency bench reports its own figures and uses only the quick knob

pub mod swarm;

use std::time::Duration;

use criterion::Criterion;

/// `SHARDLINE_BENCH_QUICK=1`: short measurements, for smoke runs (CI runs every bench once with it).
pub fn quick() -> bool {
    std::env::var("SHARDLINE_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// How long one bench warms up and measures, in a real run and in a quick smoke run.
pub struct Timing {
    pub samples: usize,
    /// Warm-up and measurement time of a real run, in milliseconds.
    pub full_ms: (u64, u64),
    /// Warm-up and measurement time under [`quick`], in milliseconds.
    pub quick_ms: (u64, u64),
}

/// The criterion configuration of a bench with `timing`.
pub fn config(timing: Timing) -> Criterion {
    let (warm_up, measure) = if quick() { timing.quick_ms } else { timing.full_ms };
    Criterion::default()
        .sample_size(timing.samples)
        .warm_up_time(Duration::from_millis(warm_up))
        .measurement_time(Duration::from_millis(measure))
}
