//! What the benches share: the quick knob.

/// `SHARDLINE_BENCH_QUICK=1`: short measurements, for smoke runs (CI runs every bench once with it).
pub fn quick() -> bool {
    std::env::var("SHARDLINE_BENCH_QUICK").is_ok_and(|v| v == "1")
}
