//! End-to-end greedy decode on SmolLM2, tokens/s: the single-process engine vs 2- and 3-stage pipelines of real
//! nodes (QUIC stage servers + DHT discovery) on loopback, all in this process, driven by a `SwarmClient` exactly as
//! `generate --swarm` drives them. One iteration is one decode step (token in, next token out at the owner); the
//! context stays between the 16-token prompt and 16 + [`WINDOW`] positions (a session that fills up is replaced,
//! its prefill untimed). Every stage and the single process use a 2-thread CPU backend.
//!
//! Needs the default model (`bash scripts/fetch-model.sh`); without it the SmolLM2 group says so and measures
//! nothing. A second group, `pipeline/tiny_decode`, runs the same comparison on a generated 3-layer model whose
//! compute is negligible, so its time per step is the pipeline's own cost (hops, token back to the owner, stage
//! bookkeeping); it needs no download.
//! `SHARDLINE_BENCH_QUICK=1` shortens the measurement for smoke runs.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use shardline_coordinator::{SwarmClient, SwarmSession};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, SamplingParams};
use shardline_node::generate::{LocalPipeline, LocalSession, Stepper};
use shardline_node::model::{LayerRange, ModelFiles, Shard, ShardOptions};
use shardline_node::stage::NodeHandle;
use shardline_node::test_models::model_for_tests;
use shardline_node::test_models::{TinySpec, write_tiny_gguf};

/// Decode positions a session runs before it is replaced.
const WINDOW: usize = 256;

fn config() -> Criterion {
    common::config(common::Timing { samples: 10, full_ms: (3000, 10_000), quick_ms: (500, 2000) })
}

fn backend(threads: usize) -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(threads))
}

/// A 16-token prompt of ids below `vocab`.
fn prompt(vocab: usize) -> Vec<u32> {
    (0..16u32).map(|i| (100 + i * 37) % vocab as u32).collect()
}

/// `k` nodes serving `model` in equal spans, found through the DHT by a fresh client. Returns the nodes (they stop
/// when dropped) and the client.
async fn swarm(model: &Path, n_layers: usize, k: usize, threads: usize) -> (Vec<NodeHandle>, SwarmClient) {
    let (nodes, client, route) = common::swarm::loopback_swarm(model, n_layers, k, threads, None).await;
    assert_eq!(route.stages.len(), k, "one stage per node");
    (nodes, client)
}

fn bench_pipeline(c: &mut Criterion) {
    // Skipped (with a message) without the model, unless SHARDLINE_REQUIRE_MODEL=1 (CI), where that fails.
    if let Some(model) = model_for_tests("pipeline bench (SmolLM2 group)") {
        compare(c, "pipeline/decode", &model, 2);
        // One compute thread per stage and in the single process: on this 2-core machine a core stays free for the
        // stages' QUIC and tokio threads, which isolates the pipeline's own cost from core contention (see
        // docs/PERFORMANCE.md, `pipeline`).
        compare(c, "pipeline/decode_1thread", &model, 1);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let tiny = dir.path().join("tiny.gguf");
    let spec = TinySpec { n_layers: 3, context: 4096, ..TinySpec::default() };
    write_tiny_gguf(&spec, &tiny).expect("write the tiny model");
    compare(c, "pipeline/tiny_decode", &tiny, 2);
}

/// Decode steps of `model` in one process, then through 2- and 3-stage loopback swarms, in one criterion group; every
/// backend (the single process's and each stage's) computes on `threads` threads.
fn compare(c: &mut Criterion, group: &str, model: &Path, threads: usize) {
    let files = ModelFiles::open(model).expect("open the model");
    let n_layers = files.config().n_layers;
    let shard =
        Shard::load(files.weights().as_ref(), LayerRange::full(n_layers), backend(threads), ShardOptions::default())
            .expect("load");
    let local = LocalPipeline::new(vec![Arc::new(shard)]).expect("pipeline");
    let prompt = prompt(files.config().vocab);
    drop(files);
    let total = prompt.len() + WINDOW + 1;
    let greedy = SamplingParams::GREEDY;

    let mut g = c.benchmark_group(group);
    g.sampling_mode(SamplingMode::Flat).throughput(Throughput::Elements(1));

    // The reference first token, which every pipeline must reproduce (greedy decoding is deterministic).
    let first = {
        let mut s = local.open_session(total).expect("session");
        s.step_sync(&prompt, &greedy, 0).expect("prefill").token
    };
    {
        let mut session: Option<LocalSession<'_>> = None;
        let mut token = first;
        g.bench_function(BenchmarkId::new("stages", "1_single_process"), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    if session.as_ref().is_none_or(|s| s.len() >= total - 1) {
                        let mut s = local.open_session(total).expect("session");
                        token = s.step_sync(&prompt, &greedy, 0).expect("prefill").token;
                        assert_eq!(token, first);
                        session = Some(s);
                    }
                    let s = session.as_mut().expect("session");
                    let start = Instant::now();
                    token = s.step_sync(&[token], &greedy, 0).expect("decode").token;
                    spent += start.elapsed();
                }
                spent
            })
        });
    }
    drop(local);

    for k in [2usize, 3] {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let (nodes, client) = rt.block_on(swarm(model, n_layers, k, threads));
        let mut session: Option<(SwarmSession, usize)> = None;
        let mut token = first;
        g.bench_function(BenchmarkId::new("stages", format!("{k}_loopback")), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        if session.as_ref().is_none_or(|(_, len)| *len >= total - 1) {
                            if let Some((old, _)) = session.take() {
                                old.close().await;
                            }
                            let mut s = client.session(total, greedy, 0);
                            token = s.step(&prompt, &greedy, 0).await.expect("prefill").token;
                            assert_eq!(token, first, "the {k}-stage pipeline agrees with the single process");
                            session = Some((s, prompt.len()));
                        }
                        let (s, len) = session.as_mut().expect("session");
                        let start = Instant::now();
                        token = s.step(&[token], &greedy, 0).await.expect("decode").token;
                        spent += start.elapsed();
                        *len += 1;
                    }
                    spent
                })
            })
        });
        if let Some((s, _)) = session.take() {
            rt.block_on(s.close());
        }
        drop(client);
        drop(nodes);
        rt.shutdown_timeout(Duration::from_secs(2));
    }
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = bench_pipeline }
criterion_main!(benches);
