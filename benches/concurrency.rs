//! Many users at once: aggregate greedy decode tokens/s of C = 1, 4, 16, 64 concurrent streams (distinct prompts,
//! [`NEW_TOKENS`] new tokens each) on SmolLM2, for
//! - `engine`: the single-process engine with continuous batching — one stage core over the whole model, driven in
//!   memory (`LocalSwarm`), so every step is one batched forward over every stream's next position;
//! - `swarm3`: three real nodes on loopback (QUIC stage servers, DHT discovery), driven by one `SwarmClient` with C
//!   concurrent sessions over its shared connections; each stage batches whatever sessions are waiting.
//!
//! One measurement is one whole run: C sessions prefill their prompts (untimed), then decode together; the time is
//! from the moment every stream has its first token to the moment the last stream has its last, and the throughput
//! is `C · (NEW_TOKENS − 1)` decoded tokens over that time.
//!
//! `SHARDLINE_CONCURRENCY_REPORT=1` skips criterion and prints one JSON line per (side, C) instead, with the
//! inter-token gaps (median, p99, max) — what `scripts/concurrency` reads to put the figures beside llama.cpp's.
//! `SHARDLINE_CONCURRENCY_LEVELS=1,4` picks the levels, `SHARDLINE_CONCURRENCY_THREADS` the compute threads of the
//! single process (default 2) and `SHARDLINE_CONCURRENCY_STAGE_THREADS` those of each stage (default 1: three
//! stages share the two cores). `SHARDLINE_BENCH_QUICK=1` runs C = 1 and 4 only. Needs the default model; without it
//! the bench says so and measures nothing.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use shardline_coordinator::SwarmClient;
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, SamplingParams};
use shardline_node::generate::Stepper;
use shardline_node::model::{LayerRange, ModelFiles, Shard, ShardOptions};
use shardline_node::stage::{LocalSwarm, NodeHandle, ShardStage, StageConfig};
use shardline_node::test_models::model_for_tests;
use shardline_proto::wire::{Frame, SessionKey, SessionOpen, StageData, WireDType, WireSampling};

/// New tokens per stream: the first comes from the prefill, the rest are decode steps.
const NEW_TOKENS: usize = 64;
const LEVELS: [usize; 4] = [1, 4, 16, 64];
const ENGINE_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 1);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn levels() -> Vec<usize> {
    match std::env::var("SHARDLINE_CONCURRENCY_LEVELS") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        // Smoke runs (CI: every benchmark once) keep to the small levels.
        Err(_) if common::quick() => vec![1, 4],
        Err(_) => LEVELS.to_vec(),
    }
}

fn backend(threads: usize) -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(threads))
}

/// Stream `i`'s prompt: 16 to 31 tokens, different for every stream.
fn prompt(i: usize, vocab: usize) -> Vec<u32> {
    (0..16 + i % 16).map(|j| ((1000 + i * 7919 + j * 104_729) % vocab) as u32).collect()
}

/// One run's figures: decode tokens over decode time, and every gap between two consecutive tokens of a stream.
struct Run {
    tokens: usize,
    elapsed: Duration,
    gaps: Vec<Duration>,
}

impl Run {
    fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.elapsed.as_secs_f64()
    }

    /// `(median, p99, max)` of the gaps, in milliseconds.
    fn gap_ms(&self) -> (f64, f64, f64) {
        let mut g: Vec<f64> = self.gaps.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        g.sort_by(f64::total_cmp);
        let at = |q: f64| g.get(((g.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
        (at(0.5), at(0.99), g.last().copied().unwrap_or(0.0))
    }
}

/// The single-process engine: C streams through one stage core over the whole model, in memory.
fn engine_run(stage: &Arc<ShardStage>, c: usize, hidden: u32, n_layers: u32, vocab: usize) -> Run {
    let addr = SocketAddr::from(ENGINE_ADDR);
    let mut swarm = LocalSwarm::new();
    let config = StageConfig { max_sessions: c, ..StageConfig::default() };
    swarm.add_stage(addr, stage.clone(), config);
    let prompts: Vec<Vec<u32>> = (0..c).map(|i| prompt(i, vocab)).collect();
    let clients: Vec<_> = (0..c).map(|_| swarm.connect(addr).expect("the engine's stage")).collect();
    for (i, (cl, p)) in clients.iter().zip(&prompts).enumerate() {
        let open = SessionOpen {
            model_id: "bench".into(),
            n_layers,
            span: LayerRange::new(0, n_layers as usize),
            max_tokens: (p.len() + NEW_TOKENS + 1) as u32,
            sampling: WireSampling::GREEDY,
            n_top: 0,
            wire_dtype: WireDType::F32,
            hidden,
            rest: vec![],
            attach_key: SessionKey::default(),
            next_key: SessionKey::default(),
            next_record: Vec::new(),
        };
        swarm.send(*cl, Frame::Open { session: i as u64 + 1, open });
    }
    swarm.run();
    for (i, (cl, p)) in clients.iter().zip(&prompts).enumerate() {
        assert_eq!(swarm.recv(*cl), Some(Frame::Opened { session: i as u64 + 1 }));
        let data = StageData::Tokens(p.clone());
        swarm.send(*cl, Frame::Prefill { session: i as u64 + 1, position: 0, last: true, data });
    }
    swarm.run();
    let mut next: Vec<(u64, u32)> = clients.iter().map(|cl| token(&mut swarm, *cl)).collect();
    let start = Instant::now();
    let mut gaps = Vec::with_capacity(c * NEW_TOKENS);
    let mut last = start;
    for _ in 1..NEW_TOKENS {
        for (i, (cl, (pos, t))) in clients.iter().zip(&next).enumerate() {
            let data = StageData::Tokens(vec![*t]);
            swarm.send(*cl, Frame::Decode { session: i as u64 + 1, position: *pos, data });
        }
        swarm.run();
        next = clients.iter().map(|cl| token(&mut swarm, *cl)).collect();
        let now = Instant::now();
        gaps.extend(std::iter::repeat_n(now - last, c));
        last = now;
    }
    let elapsed = start.elapsed();
    for (i, cl) in clients.iter().enumerate() {
        swarm.send(*cl, Frame::Close { session: i as u64 + 1 });
    }
    swarm.run();
    Run { tokens: c * (NEW_TOKENS - 1), elapsed, gaps }
}

/// The position and token of the `Token` frame waiting for a client.
fn token(swarm: &mut LocalSwarm<Arc<ShardStage>>, c: shardline_node::stage::local::ClientStream) -> (u64, u32) {
    match swarm.recv(c) {
        Some(Frame::Token { position, result, .. }) => (position, result.token),
        other => panic!("expected a token, got {other:?}"),
    }
}

/// Three nodes on loopback serving `model` in equal spans, and a client that found them.
async fn swarm(model: &Path, n_layers: usize, threads: usize, sessions: usize) -> (Vec<NodeHandle>, SwarmClient) {
    let (nodes, client, _) = common::swarm::loopback_swarm(model, n_layers, 3, threads, Some(sessions)).await;
    (nodes, client)
}

/// C concurrent sessions through the swarm: each prefills, all start decoding together, each decodes on its own.
async fn swarm_run(client: &SwarmClient, c: usize, vocab: usize) -> Run {
    let g = SamplingParams::GREEDY;
    let barrier = Arc::new(tokio::sync::Barrier::new(c + 1));
    let tasks: Vec<_> = (0..c)
        .map(|i| {
            let client = client.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let p = prompt(i, vocab);
                let mut s = client.session(p.len() + NEW_TOKENS + 1, g, 0);
                let mut t = s.step(&p, &g, 0).await.expect("prefill").token;
                barrier.wait().await;
                let mut stamps = Vec::with_capacity(NEW_TOKENS);
                stamps.push(Instant::now());
                for _ in 1..NEW_TOKENS {
                    t = s.step(&[t], &g, 0).await.expect("decode").token;
                    stamps.push(Instant::now());
                }
                s.close().await;
                stamps
            })
        })
        .collect();
    barrier.wait().await;
    let start = Instant::now();
    let mut end = start;
    let mut gaps = Vec::new();
    for t in tasks {
        let stamps = t.await.expect("stream task");
        end = end.max(*stamps.last().expect("stamps"));
        gaps.extend(stamps.windows(2).map(|w| w[1] - w[0]));
    }
    Run { tokens: c * (NEW_TOKENS - 1), elapsed: end - start, gaps }
}

struct Setup {
    stage: Arc<ShardStage>,
    model: std::path::PathBuf,
    n_layers: usize,
    hidden: u32,
    vocab: usize,
    threads: usize,
    stage_threads: usize,
}

fn setup() -> Option<Setup> {
    let model = model_for_tests("concurrency bench")?;
    let files = ModelFiles::open(&model).expect("open the model");
    let cfg = files.config().clone();
    let threads = env_usize("SHARDLINE_CONCURRENCY_THREADS", 2);
    let opts = ShardOptions { kv_budget_bytes: 512 << 20, ..ShardOptions::default() };
    let shard = Shard::load(files.weights().as_ref(), LayerRange::full(cfg.n_layers), backend(threads), opts)
        .expect("load the model");
    let stage = Arc::new(ShardStage::new(Arc::new(shard), "bench".into()));
    Some(Setup {
        stage,
        model,
        n_layers: cfg.n_layers,
        hidden: cfg.hidden as u32,
        vocab: cfg.vocab,
        threads,
        stage_threads: env_usize("SHARDLINE_CONCURRENCY_STAGE_THREADS", 1),
    })
}

fn print_run(side: &str, c: usize, threads: usize, run: &Run) {
    let (p50, p99, max) = run.gap_ms();
    println!(
        "{{\"side\":\"{side}\",\"c\":{c},\"threads\":{threads},\"decode_tok_s\":{:.2},\"tokens\":{},\"secs\":{:.3},\
         \"gap_p50_ms\":{p50:.2},\"gap_p99_ms\":{p99:.2},\"gap_max_ms\":{max:.2}}}",
        run.tok_s(),
        run.tokens,
        run.elapsed.as_secs_f64()
    );
}

/// One run per (side, level), printed as JSON lines.
fn report(s: &Setup) {
    let levels = levels();
    for &c in &levels {
        // A first run warms the caches and the allocator; the second is reported.
        engine_run(&s.stage, c.min(4), s.hidden, s.n_layers as u32, s.vocab);
        let run = engine_run(&s.stage, c, s.hidden, s.n_layers as u32, s.vocab);
        print_run("engine", c, s.threads, &run);
    }
    let max = levels.iter().copied().max().unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (nodes, client) = rt.block_on(swarm(&s.model, s.n_layers, s.stage_threads, max));
    for &c in &levels {
        rt.block_on(swarm_run(&client, c.min(4), s.vocab));
        let run = rt.block_on(swarm_run(&client, c, s.vocab));
        print_run("swarm3", c, s.stage_threads, &run);
    }
    drop(client);
    drop(nodes);
    rt.shutdown_timeout(Duration::from_secs(2));
}

fn bench(c: &mut Criterion, s: &Setup) {
    let mut g = c.benchmark_group("concurrency/engine");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for &n in &levels() {
        g.throughput(Throughput::Elements((n * (NEW_TOKENS - 1)) as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                (0..iters).map(|_| engine_run(&s.stage, n, s.hidden, s.n_layers as u32, s.vocab).elapsed).sum()
            })
        });
    }
    g.finish();
    let max = levels().into_iter().max().unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (nodes, client) = rt.block_on(swarm(&s.model, s.n_layers, s.stage_threads, max));
    let mut g = c.benchmark_group("concurrency/swarm3");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for &n in &levels() {
        g.throughput(Throughput::Elements((n * (NEW_TOKENS - 1)) as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| rt.block_on(swarm_run(&client, n, s.vocab)).elapsed).sum())
        });
    }
    g.finish();
    drop(client);
    drop(nodes);
    rt.shutdown_timeout(Duration::from_secs(2));
}

fn main() {
    let Some(s) = setup() else { return };
    if std::env::var("SHARDLINE_CONCURRENCY_REPORT").is_ok_and(|v| v == "1") {
        report(&s);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    if common::quick() {
        c = c.warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1));
    }
    bench(&mut c, &s);
    c.final_summary();
}
