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
//! `SHARDLINE_CONCURRENCY_REPORT=fairness` runs the fairness case instead (8 streams decoding, a 1,500-token
//! prompt arriving among them; `SHARDLINE_FAIRNESS_PROMPT`, `SHARDLINE_FAIRNESS_BUDGETS=128,32` and
//! `SHARDLINE_FAIRNESS_STRETCH=3,0` change the prompt length, the token budgets and the step stretches tried, 0 being
//! the fixed budget alone) and prints the decoders' gaps with and without the prompt.
//! `SHARDLINE_CONCURRENCY_LEVELS=1,4` picks the levels, `SHARDLINE_CONCURRENCY_THREADS` the compute threads of the
//! single process (default 2) and `SHARDLINE_CONCURRENCY_STAGE_THREADS` those of each stage (default 1: three
//! stages share the two cores). `SHARDLINE_CONCURRENCY_SIDES=engine` leaves out the swarm in report mode; the engine
//! lines also give the process's CPU time over the decode (`cpu_s`, spinning compute threads included).
//! `SHARDLINE_BENCH_QUICK=1` runs C = 1 and 4 only. Needs the default model; without it
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
use shardline_node::stage::local::ClientStream;
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
    /// CPU time of the whole process over the decode (every compute thread, spinning included), when measured.
    cpu: Option<Duration>,
}

/// CPU time of this process so far: unlike wall time, it does not grow while the process waits for a core, so it
/// stays readable on a loaded machine.
fn process_cpu() -> Duration {
    shardline_kernels::cpu_time::process().expect("process CPU clock")
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
    swarm.time_compute(true);
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
    let cpu0 = process_cpu();
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
    let cpu = process_cpu() - cpu0;
    for (i, cl) in clients.iter().enumerate() {
        swarm.send(*cl, Frame::Close { session: i as u64 + 1 });
    }
    swarm.run();
    Run { tokens: c * (NEW_TOKENS - 1), elapsed, gaps, cpu: Some(cpu) }
}

/// Decoders in the fairness run, and the steps they decode before the long prompt arrives.
const FAIR_DECODERS: usize = 8;
const FAIR_ARRIVAL: usize = 8;

/// The fairness case on the single-process engine: [`FAIR_DECODERS`] greedy streams decode
/// [`NEW_TOKENS`] tokens each, driven one scheduler step at a time (`LocalSwarm::step`, every decoder answering its
/// token at once, as `shardline generate --prompts-file` runs); with `long`, a prompt of that many tokens arrives
/// after [`FAIR_ARRIVAL`] steps. `budget` is the stage's token budget per step (`StageConfig::batch_tokens`);
/// `stretch`, when given, bounds a step beside decoders to that many decode steps by the stage's learned step cost
/// (`StageConfig::max_step_stretch`, compute timed as the engine does); `None` leaves the compute untimed, so the
/// stage plans by the fixed budget alone (the scheduler before the cost model).
/// Returns the decoders' run (their gaps) and the long prompt's time to its first token.
fn fairness_run(s: &Setup, long: Option<usize>, budget: usize, stretch: Option<f64>) -> (Run, Option<Duration>) {
    let addr = SocketAddr::from(ENGINE_ADDR);
    let mut swarm = LocalSwarm::new();
    swarm.time_compute(stretch.is_some());
    let config = StageConfig {
        max_sessions: FAIR_DECODERS + 1,
        batch_tokens: budget,
        max_step_stretch: stretch.unwrap_or(StageConfig::default().max_step_stretch),
        ..StageConfig::default()
    };
    swarm.add_stage(addr, s.stage.clone(), config);
    let n = FAIR_DECODERS + usize::from(long.is_some());
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| match (i, long) {
            (i, Some(len)) if i == FAIR_DECODERS => (0..len).map(|j| ((7 + j * 31_337) % s.vocab) as u32).collect(),
            _ => prompt(i, s.vocab),
        })
        .collect();
    let clients: Vec<_> = (0..n).map(|_| swarm.connect(addr).expect("the engine's stage")).collect();
    for (i, (cl, p)) in clients.iter().zip(&prompts).enumerate() {
        let open = open_frame(s, p.len() + NEW_TOKENS + 1);
        swarm.send(*cl, Frame::Open { session: i as u64 + 1, open });
    }
    swarm.run();
    for (i, (cl, p)) in clients.iter().zip(&prompts).enumerate().take(FAIR_DECODERS) {
        assert_eq!(swarm.recv(*cl), Some(Frame::Opened { session: i as u64 + 1 }));
        let data = StageData::Tokens(p.clone());
        swarm.send(*cl, Frame::Prefill { session: i as u64 + 1, position: 0, last: true, data });
    }
    swarm.run();
    let mut next: Vec<(u64, u32)> = clients[..FAIR_DECODERS].iter().map(|cl| token(&mut swarm, *cl)).collect();
    let mut stamps: Vec<Vec<Instant>> = vec![vec![Instant::now()]; FAIR_DECODERS];
    let start = Instant::now();
    let mut long_sent = None;
    let mut ttft = None;
    let mut steps = 0;
    while stamps.iter().any(|st| st.len() < NEW_TOKENS) || (long_sent.is_some() && ttft.is_none()) {
        for (i, cl) in clients[..FAIR_DECODERS].iter().enumerate() {
            if stamps[i].len() < NEW_TOKENS {
                let (pos, t) = next[i];
                swarm.send(
                    *cl,
                    Frame::Decode { session: i as u64 + 1, position: pos, data: StageData::Tokens(vec![t]) },
                );
            }
        }
        if steps == FAIR_ARRIVAL && long.is_some() {
            let cl = clients[FAIR_DECODERS];
            assert_eq!(swarm.recv(cl), Some(Frame::Opened { session: FAIR_DECODERS as u64 + 1 }));
            let data = StageData::Tokens(prompts[FAIR_DECODERS].clone());
            swarm.send(cl, Frame::Prefill { session: FAIR_DECODERS as u64 + 1, position: 0, last: true, data });
            long_sent = Some(Instant::now());
        }
        assert!(swarm.step(), "a step with work computed nothing");
        steps += 1;
        let now = Instant::now();
        for (i, cl) in clients[..FAIR_DECODERS].iter().enumerate() {
            if stamps[i].len() < NEW_TOKENS {
                next[i] = token(&mut swarm, *cl);
                stamps[i].push(now);
            }
        }
        if let (Some(sent), Some(cl)) = (long_sent, clients.get(FAIR_DECODERS))
            && ttft.is_none()
            && let Some(Frame::Token { .. }) = swarm.recv(*cl)
        {
            ttft = Some(now - sent);
        }
    }
    let end = stamps.iter().filter_map(|st| st.last().copied()).max().unwrap_or(start);
    let gaps = stamps.iter().flat_map(|st| st.windows(2).map(|w| w[1] - w[0])).collect();
    for (i, cl) in clients.iter().enumerate() {
        swarm.send(*cl, Frame::Close { session: i as u64 + 1 });
    }
    swarm.run();
    (Run { tokens: FAIR_DECODERS * (NEW_TOKENS - 1), elapsed: end - start, gaps, cpu: None }, ttft)
}

/// An `Open` of the whole model for a stream of `max_tokens` positions.
fn open_frame(s: &Setup, max_tokens: usize) -> SessionOpen {
    SessionOpen {
        model_id: "bench".into(),
        n_layers: s.n_layers as u32,
        span: LayerRange::new(0, s.n_layers),
        max_tokens: max_tokens as u32,
        sampling: WireSampling::GREEDY,
        n_top: 0,
        wire_dtype: WireDType::F32,
        hidden: s.hidden,
        rest: vec![],
        attach_key: SessionKey::default(),
        next_key: SessionKey::default(),
        next_record: Vec::new(),
    }
}

/// The fairness case side by side: the decoders alone, then with the long prompt, at each token budget and step
/// stretch (`SHARDLINE_FAIRNESS_STRETCH=3,0`: 0 is the fixed budget alone, untimed).
fn report_fairness(s: &Setup) {
    let long = env_usize("SHARDLINE_FAIRNESS_PROMPT", 1500);
    let list = |name: &str, default: &str| -> Vec<f64> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect()
    };
    let budgets = list("SHARDLINE_FAIRNESS_BUDGETS", "128");
    let stretches = list("SHARDLINE_FAIRNESS_STRETCH", "3,0");
    for budget in budgets.into_iter().map(|b| b as usize) {
        for &stretch in &stretches {
            let stretch = (stretch > 0.0).then_some(stretch);
            for with in [None, Some(long)] {
                let (run, ttft) = fairness_run(s, with, budget, stretch);
                let (p50, p99, max) = run.gap_ms();
                println!(
                    "{{\"side\":\"fairness\",\"decoders\":{FAIR_DECODERS},\"long_prompt\":{},\"budget\":{budget},\
                     \"stretch\":{},\"threads\":{},\"decode_tok_s\":{:.2},\"gap_p50_ms\":{p50:.2},\
                     \"gap_p99_ms\":{p99:.2},\"gap_max_ms\":{max:.2},\"max_over_median\":{:.2},\"long_ttft_ms\":{}}}",
                    with.unwrap_or(0),
                    stretch.map_or("null".to_string(), |x| format!("{x}")),
                    s.threads,
                    run.tok_s(),
                    max / p50.max(1e-9),
                    ttft.map_or("null".to_string(), |d| format!("{:.1}", d.as_secs_f64() * 1e3)),
                );
            }
        }
    }
}

/// `(VmRSS, RssAnon, RssFile)` of this process in MiB, from /proc/self/status (Linux; zeros elsewhere).
fn rss_mib() -> (f64, f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

/// Resident MiB of the mappings of `path` (the model file), from /proc/self/smaps.
fn mapped_rss_mib(path: &Path) -> f64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let name = path.to_string_lossy();
    let mut inside = false;
    let mut kb = 0.0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with(name.as_ref());
            continue;
        }
        if inside && let Some(rest) = line.strip_prefix("Rss:") {
            kb += rest.trim().trim_end_matches("kB").trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    kb / 1024.0
}

/// Memory at many streams and over a long run, on the engine (one stage core over the whole model, in memory):
/// 1. `streams` sessions prefill and decode [`NEW_TOKENS`] tokens together; RSS is broken down into the model file's
///    resident mapping (the weights: the CPU backend computes straight from the mapped file), the KV cache (pool
///    reserved = virtual; used = positions held × bytes per position) and the rest of the anonymous memory
///    (activations, scratch, per-session buffers, the allocator's slack);
/// 2. `steps` scheduler steps with `streams` sessions that join and leave (each generates [`NEW_TOKENS`] tokens,
///    closes, and a new session with another prompt takes its place), printing RSS every `every` steps.
fn report_memory(s: &Setup, streams: usize, steps: usize, every: usize) {
    let addr = SocketAddr::from(ENGINE_ADDR);
    let (rss0, anon0, _) = rss_mib();
    let shard = s.stage.shard();
    let kv_per_pos =
        2.0 * shard.layers().len() as f64 * (shard.config().n_kv_heads * shard.config().head_dim) as f64 * 4.0;
    let pool_mib = shard.kv_capacity_tokens() as f64 * kv_per_pos / 1048576.0;
    println!(
        "{{\"phase\":\"loaded\",\"rss_mib\":{rss0:.1},\"anon_mib\":{anon0:.1},\"weights_mapped_mib\":{:.1},\
         \"kv_pool_reserved_mib\":{pool_mib:.1},\"kv_bytes_per_position\":{kv_per_pos}}}",
        mapped_rss_mib(&s.model)
    );
    let mut swarm = LocalSwarm::new();
    let config = StageConfig { max_sessions: streams * 2, ..StageConfig::default() };
    swarm.add_stage(addr, s.stage.clone(), config);
    let mut next_id = 0u64;
    // (client, session id, next position, next token, tokens drawn)
    let mut live: Vec<(ClientStream, u64, u64, u32, usize)> = Vec::new();
    let mut open = |swarm: &mut LocalSwarm<Arc<ShardStage>>, k: u64| {
        next_id += 1;
        let p = prompt(k as usize, s.vocab);
        let cl = swarm.connect(addr).expect("the engine's stage");
        swarm.send(cl, Frame::Open { session: next_id, open: open_frame(s, p.len() + NEW_TOKENS + 1) });
        let data = StageData::Tokens(p.clone());
        swarm.send(cl, Frame::Prefill { session: next_id, position: 0, last: true, data });
        (cl, next_id, p.len() as u64, 0u32, 0usize)
    };
    for k in 0..streams {
        live.push(open(&mut swarm, k as u64));
    }
    let mut step = 0;
    let mut opened = streams as u64;
    let start = Instant::now();
    while step < steps {
        swarm.run();
        step += 1;
        let mut positions = 0;
        for slot in live.iter_mut() {
            let (cl, id, _, _, drawn) = *slot;
            while let Some(f) = swarm.recv(cl) {
                if let Frame::Token { position, result, .. } = f {
                    *slot = (cl, id, position, result.token, drawn + 1);
                }
            }
            positions += slot.2 as usize;
        }
        if step == NEW_TOKENS / 2 || step % every == 0 {
            let (rss, anon, file) = rss_mib();
            let kv_used = positions as f64 * kv_per_pos / 1048576.0;
            println!(
                "{{\"phase\":\"run\",\"streams\":{streams},\"step\":{step},\"sessions_opened\":{opened},\
                 \"rss_mib\":{rss:.1},\"anon_mib\":{anon:.1},\"file_mib\":{file:.1},\"weights_mapped_mib\":{:.1},\
                 \"kv_used_mib\":{kv_used:.1},\"anon_minus_kv_used_mib\":{:.1},\"secs\":{:.1}}}",
                mapped_rss_mib(&s.model),
                anon - kv_used,
                start.elapsed().as_secs_f64()
            );
        }
        for slot in live.iter_mut() {
            let (cl, id, pos, t, drawn) = *slot;
            if drawn >= NEW_TOKENS {
                swarm.send(cl, Frame::Close { session: id });
                *slot = open(&mut swarm, opened);
                opened += 1;
            } else {
                swarm.send(cl, Frame::Decode { session: id, position: pos, data: StageData::Tokens(vec![t]) });
            }
        }
    }
}

/// The position and token of the `Token` frame waiting for a client.
fn token(swarm: &mut LocalSwarm<Arc<ShardStage>>, c: shardline_node::stage::local::ClientStream) -> (u64, u32) {
    match swarm.recv(c) {
        Some(Frame::Token { position, result, .. }) => (position, result.token),
        other => panic!("expected a token, got {other:?}"),
    }
}

/// The groups each stage splits its decoders into (`StageConfig::decode_groups`, `SHARDLINE_CONCURRENCY_GROUPS`):
/// by default 2, since the three 1-thread stages share two cores, so two groups in flight keep both busy.
fn decode_groups() -> usize {
    env_usize("SHARDLINE_CONCURRENCY_GROUPS", 2).max(1)
}

/// Three nodes on loopback serving `model`, and a client that found them. The spans are equal unless
/// `SHARDLINE_CONCURRENCY_SPLIT` gives the layers of each stage (`12,12,6`); `SHARDLINE_CONCURRENCY_GATHER_US` sets
/// the stages' gather window (`StageConfig::gather_wait`) in microseconds.
async fn swarm(model: &Path, n_layers: usize, threads: usize, sessions: usize) -> (Vec<NodeHandle>, SwarmClient) {
    let spans = match std::env::var("SHARDLINE_CONCURRENCY_SPLIT") {
        Ok(v) => {
            let mut start = 0;
            let spans: Vec<LayerRange> = v
                .split(',')
                .filter_map(|x| x.trim().parse::<usize>().ok())
                .map(|n| {
                    let r = LayerRange::new(start, start + n);
                    start += n;
                    r
                })
                .collect();
            assert_eq!(start, n_layers, "SHARDLINE_CONCURRENCY_SPLIT must cover the model's {n_layers} layers");
            spans
        }
        Err(_) => LayerRange::split_evenly(n_layers, 3),
    };
    let gather = std::env::var("SHARDLINE_CONCURRENCY_GATHER_US").ok().and_then(|v| v.parse::<u64>().ok());
    let groups = decode_groups();
    let tune = |c: &mut StageConfig| {
        if let Some(us) = gather {
            c.gather_wait = Duration::from_micros(us);
        }
        c.decode_groups = groups;
    };
    let (nodes, client, _) = common::swarm::loopback_swarm_with(model, spans, threads, Some(sessions), tune).await;
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
    Run { tokens: c * (NEW_TOKENS - 1), elapsed: end - start, gaps, cpu: None }
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
         \"gap_p50_ms\":{p50:.2},\"gap_p99_ms\":{p99:.2},\"gap_max_ms\":{max:.2}{cpu}}}",
        run.tok_s(),
        run.tokens,
        run.elapsed.as_secs_f64(),
        cpu = run.cpu.map(|d| format!(",\"cpu_s\":{:.3}", d.as_secs_f64())).unwrap_or_default(),
    );
}

/// `(user + system CPU time, voluntary + involuntary context switches)` of this whole process so far.
fn process_usage() -> (Duration, u64) {
    // SAFETY: `getrusage` fills the zeroed struct it is given; RUSAGE_SELF is always valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return (Duration::ZERO, 0);
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(u.ru_utime) + tv(u.ru_stime), (u.ru_nvcsw + u.ru_nivcsw) as u64)
}

/// CPU milliseconds the whole process spent per decoded token during a run, and context switches per token: what a
/// side costs the machine, far less sensitive to other load than its tokens/s (a busy machine stretches the wall
/// clock, not the work).
fn cpu_per_token(before: (Duration, u64), after: (Duration, u64), tokens: usize) -> (f64, f64) {
    let t = tokens.max(1) as f64;
    ((after.0 - before.0).as_secs_f64() * 1e3 / t, (after.1 - before.1) as f64 / t)
}

/// The 1-minute load average, printed beside every figure.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// One run per (side, level), printed as JSON lines.
fn report(s: &Setup) {
    let levels = levels();
    for &c in &levels {
        // A first run warms the caches and the allocator; the second is reported.
        engine_run(&s.stage, c.min(4), s.hidden, s.n_layers as u32, s.vocab);
        let before = process_usage();
        let run = engine_run(&s.stage, c, s.hidden, s.n_layers as u32, s.vocab);
        let (cpu, cs) = cpu_per_token(before, process_usage(), run.tokens);
        print_run("engine", c, s.threads, &run);
        println!(
            "{{\"side\":\"engine_cpu\",\"c\":{c},\"cpu_ms_per_token\":{cpu:.3},\"switches_per_token\":{cs:.2},\
             \"load1\":{:.2}}}",
            load1()
        );
    }
    if std::env::var("SHARDLINE_CONCURRENCY_SIDES").is_ok_and(|v| !v.split(',').any(|x| x.trim() == "swarm3")) {
        return;
    }
    let max = levels.iter().copied().max().unwrap_or(1);
    let workers = env_usize("SHARDLINE_CONCURRENCY_WORKERS", 2);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().expect("runtime");
    let (nodes, client) = rt.block_on(swarm(&s.model, s.n_layers, s.stage_threads, max));
    for &c in &levels {
        rt.block_on(swarm_run(&client, c.min(4), s.vocab));
        let before: Vec<_> = nodes.iter().map(|n| n.server().probe().batch_stats()).collect();
        let usage = process_usage();
        let run = rt.block_on(swarm_run(&client, c, s.vocab));
        let (cpu, cs) = cpu_per_token(usage, process_usage(), run.tokens);
        print_run("swarm3", c, s.stage_threads, &run);
        println!("{{\"side\":\"swarm3_config\",\"c\":{c},\"decode_groups\":{}}}", decode_groups());
        // How the sessions were batched on each stage during the run (prefill included): mean sessions per batch.
        let per_stage: Vec<String> = nodes
            .iter()
            .zip(&before)
            .map(|(n, b)| {
                let a = n.server().probe().batch_stats();
                let batches = a.batches - b.batches;
                let sessions = (a.total_sessions - b.total_sessions) as f64 / batches.max(1) as f64;
                // Busy: compute wall time over the run's (prefill included, so it can pass 1 at small C); CPU: the
                // compute thread's own CPU time per decoded token, the stage's share of the work.
                let busy = (a.compute_ns - b.compute_ns) as f64 / 1e9 / run.elapsed.as_secs_f64();
                let cpu = (a.compute_cpu_ns - b.compute_cpu_ns) as f64 / 1e6 / run.tokens.max(1) as f64;
                format!(
                    "{{\"batches\":{batches},\"mean_sessions\":{sessions:.2},\"busy\":{busy:.2},\
                     \"compute_cpu_ms_per_token\":{cpu:.3}}}"
                )
            })
            .collect();
        println!("{{\"side\":\"swarm3_batches\",\"c\":{c},\"stages\":[{}]}}", per_stage.join(","));
        println!(
            "{{\"side\":\"swarm3_cpu\",\"c\":{c},\"cpu_ms_per_token\":{cpu:.3},\"switches_per_token\":{cs:.2},\
             \"load1\":{:.2}}}",
            load1()
        );
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
    if std::env::var("SHARDLINE_CONCURRENCY_REPORT").is_ok_and(|v| v == "memory") {
        let streams = env_usize("SHARDLINE_SOAK_STREAMS", 64);
        report_memory(&s, streams, env_usize("SHARDLINE_SOAK_STEPS", 10_000), env_usize("SHARDLINE_SOAK_EVERY", 500));
        return;
    }
    if std::env::var("SHARDLINE_CONCURRENCY_REPORT").is_ok_and(|v| v == "fairness") {
        report_fairness(&s);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    if common::quick() {
        c = c.warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1));
    }
    bench(&mut c, &s);
    c.final_summary();
}
