//! One shard's prefill (1, 64, 512 tokens) and decode (context 0, 512, 2048) on SmolLM2, CPU backend.
//! Needs the default model (`bash scripts/fetch-model.sh`); without it the bench says so and measures nothing.
//! `SHARDLINE_BENCH_QUICK=1` shortens the measurement for smoke runs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shardline_kernels::Backend;
use shardline_kernels::cpu::CpuBackend;
use shardline_node::model::open::ModelFiles;
use shardline_node::model::{LayerRange, Shard, ShardInput, ShardOptions};
use shardline_node::test_models::model_for_tests;

fn config() -> Criterion {
    common::config(common::Timing { samples: 10, full_ms: (3000, 5000), quick_ms: (200, 1000) })
}

fn bench_shard(c: &mut Criterion) {
    // Skipped (with a message) without the model, unless SHARDLINE_REQUIRE_MODEL=1 (CI), where that fails.
    let Some(path) = model_for_tests("shard bench") else {
        return;
    };
    let files = ModelFiles::open(&path).expect("open the default model");
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(2));
    let n = files.config().n_layers;
    let opts = ShardOptions { kv_budget_bytes: 1 << 30, ..ShardOptions::default() };
    let shard = Shard::load(files.weights().as_ref(), LayerRange::full(n), backend, opts).expect("load");
    let vocab = files.config().vocab as u32;
    let tokens = |len: usize| -> Vec<u32> { (0..len as u32).map(|i| (i * 7919 + 13) % vocab).collect() };

    let mut g = c.benchmark_group("shard/prefill");
    for len in [1usize, 64, 512] {
        let prompt = tokens(len);
        g.throughput(Throughput::Elements(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &prompt, |b, prompt| {
            b.iter(|| {
                let mut s = shard.open_session(prompt.len()).expect("session");
                shard.forward(&mut s, ShardInput::Tokens(prompt)).expect("forward")
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("shard/decode");
    g.throughput(Throughput::Elements(1));
    for ctx in [0usize, 512, 2048] {
        let mut s = shard.open_session(ctx + 4096).expect("session");
        if ctx > 0 {
            for chunk in tokens(ctx).chunks(512) {
                shard.forward(&mut s, ShardInput::Tokens(chunk)).expect("prefill");
            }
        }
        let mut session = Some(s);
        g.bench_function(BenchmarkId::new("context", ctx), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    // Keep the context near `ctx`: start over when the reserved room runs out.
                    let s = session.as_mut().expect("session");
                    if s.len() + 1 > s.capacity() {
                        let mut fresh = shard.open_session(ctx + 4096).expect("session");
                        for chunk in tokens(ctx).chunks(512) {
                            shard.forward(&mut fresh, ShardInput::Tokens(chunk)).expect("prefill");
                        }
                        session = Some(fresh);
                    }
                    let s = session.as_mut().expect("session");
                    let start = std::time::Instant::now();
                    shard.forward(s, ShardInput::Tokens(&[(i % 1000) as u32 + 100])).expect("decode");
                    total += start.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = bench_shard }
criterion_main!(benches);
