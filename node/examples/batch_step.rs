//! The engine's batched decode step alone, for profiling on a busy machine: `C` sessions of SmolLM2 prefill distinct
//! prompts, then run `STEPS` decode steps together, each one `Shard::forward_batch` over the `C` rows followed by a
//! greedy draw per session (what the single-process engine does at concurrency `C`, without the stage scheduler).
//!
//! Prints the median wall time of a step and the CPU time per step of the whole process and of the calling thread
//! (`CLOCK_PROCESS_CPUTIME_ID`, `CLOCK_THREAD_CPUTIME_ID`): CPU time does not grow while a thread waits for a core,
//! so it stays readable when the machine is loaded (spinning helpers count as busy).
//!
//! `cargo run --release -p shardline-node --example batch_step -- [C] [STEPS] [THREADS] [SIMD]`
//! (defaults 16, 64, 2, the CPU's best level; SIMD one of `scalar`, `avx2`, `avx-vnni`, `avx512-vnni`); the model
//! is `$SHARDLINE_MODEL` or the default SmolLM2-135M Q4_1 file. `SHARDLINE_KV=f16` keeps the KV cache in f16
//! (`CpuBackend::with_kv_dtype`; the default is f32).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardline_kernels::cpu::{CpuBackend, SimdLevel};
use shardline_kernels::{Backend, DType, SamplingParams};
use shardline_node::model::{
    BatchItem, HeadRows, LayerRange, ModelFiles, Shard, ShardInput, ShardOptions, ShardOutput,
};

fn process_cpu() -> Duration {
    shardline_kernels::cpu_time::process().expect("process CPU clock")
}

fn thread_cpu() -> Duration {
    shardline_kernels::cpu_time::thread().expect("thread CPU clock")
}

fn arg(i: usize, default: usize) -> usize {
    std::env::args().nth(i).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let c = arg(1, 16);
    let steps = arg(2, 64);
    let threads = arg(3, 2);
    let level = match std::env::args().nth(4).as_deref() {
        Some("scalar") => SimdLevel::Scalar,
        Some("avx2") => SimdLevel::Avx2,
        Some("avx-vnni") => SimdLevel::AvxVnni,
        Some("avx512-vnni") => SimdLevel::Avx512Vnni,
        _ => SimdLevel::detect(),
    };
    let model = std::env::var("SHARDLINE_MODEL").map(std::path::PathBuf::from).unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        std::path::Path::new(&home).join(".cache/shardline/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    let files = ModelFiles::open(&model).expect("open the model");
    let cfg = files.config().clone();
    let mut cpu = CpuBackend::with_simd(threads, level).expect("SIMD level");
    if std::env::var("SHARDLINE_KV").as_deref() == Ok("f16") {
        cpu = cpu.with_kv_dtype(DType::F16).expect("f16 KV cache");
    }
    let backend: Arc<dyn Backend> = Arc::new(cpu);
    let opts = ShardOptions { kv_budget_bytes: 512 << 20, ..ShardOptions::default() };
    let shard = Shard::load(files.weights().as_ref(), LayerRange::full(cfg.n_layers), backend, opts).expect("load");
    let vocab = cfg.vocab;
    let prompt =
        |i: usize| -> Vec<u32> { (0..16 + i % 16).map(|j| ((1000 + i * 7919 + j * 104_729) % vocab) as u32).collect() };
    let greedy = SamplingParams::GREEDY;
    let mut sessions: Vec<_> =
        (0..c).map(|i| shard.open_session(prompt(i).len() + steps + 8).expect("session")).collect();
    let mut next = Vec::with_capacity(c);
    for (i, s) in sessions.iter_mut().enumerate() {
        let out = shard.forward(s, ShardInput::Tokens(&prompt(i))).expect("prefill");
        let ShardOutput::Logits(l) = out else { panic!("no logits") };
        next.push(shard.sample(&l, &greedy, s.len() as u64, 0).expect("sample").token);
    }
    let mut walls = Vec::with_capacity(steps);
    let (mut cpu_all, mut cpu_main) = (Duration::ZERO, Duration::ZERO);
    let warm = 4.min(steps / 4);
    let mut checksum = 0u64;
    for step in 0..steps {
        let (w0, p0, t0) = (Instant::now(), process_cpu(), thread_cpu());
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut items: Vec<BatchItem<'_>> = sessions
            .iter_mut()
            .zip(&toks)
            .map(|(kv, t)| BatchItem { kv, input: ShardInput::Tokens(t), head: HeadRows::Last })
            .collect();
        let outs = shard.forward_batch(&mut items, LayerRange::full(cfg.n_layers)).expect("forward");
        drop(items);
        let logits: Vec<_> = outs
            .into_iter()
            .map(|o| match o {
                ShardOutput::Logits(l) => l,
                ShardOutput::Hidden(_) => panic!("no logits"),
            })
            .collect();
        // All the step's draws at once, as the stage makes them.
        let draws: Vec<_> = logits.iter().zip(&sessions).map(|(l, s)| (l, greedy, s.len() as u64, 0)).collect();
        for (s, t) in shard.sample_many(&draws).into_iter().zip(next.iter_mut()) {
            *t = s.expect("sample").token;
        }
        logits.into_iter().for_each(|l| shard.recycle_logits(l)); // as the stage does after its draws
        if step >= warm {
            walls.push(w0.elapsed());
            cpu_all += process_cpu() - p0;
            cpu_main += thread_cpu() - t0;
        }
        checksum = next.iter().fold(checksum, |a, &t| a.wrapping_mul(31).wrapping_add(t as u64));
    }
    walls.sort();
    let n = walls.len().max(1) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "C={c} threads={threads} level={level} steps={} | wall median {:.2} ms min {:.2} ms | CPU per step: process \
         {:.2} ms, main thread {:.2} ms | tokens checksum {checksum:016x}",
        walls.len(),
        ms(walls[walls.len() / 2]),
        ms(walls[0]),
        ms(cpu_all) / n,
        ms(cpu_main) / n,
    );
}
