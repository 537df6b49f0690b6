//! SmolLM2 through the CUDA backend against the CPU reference, on the llama.cpp fixture prompts: teacher-forced
//! top-1 agreement of at least 99% over every position, and greedy continuations identical for the first 16 tokens.
//! The CUDA model runs as two shards (0..N/2, N/2..N) so the hidden-state hand-off is on the path too. Any
//! SmolLM2-derived GGUF works (`SHARDLINE_MODEL`); scripts/gpu-check.sh stages one cut to its first layers.
//!
//! Needs a GPU: prints "skipped: no CUDA device" without one (fails instead when `SHARDLINE_REQUIRE_GPU=1`), and
//! "skipped …: model not found" without the model (fails when `SHARDLINE_REQUIRE_MODEL=1`).

use std::sync::Arc;

use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::cuda::{self, CudaBackend};
use shardline_kernels::{Backend, DType};
use shardline_node::engine::Engine;
use shardline_node::generate::GenerateParams;
use shardline_node::model::{LayerRange, ShardOptions};
use shardline_node::test_models::model_for_tests;

const FIXTURES: &str = include_str!("fixtures/llamacpp_smollm2.json");

fn cuda_backend() -> Option<Arc<dyn Backend>> {
    if let Err(reason) = cuda::probe() {
        let required = std::env::var("SHARDLINE_REQUIRE_GPU").is_ok_and(|v| v == "1");
        assert!(!required, "SHARDLINE_REQUIRE_GPU=1 but no usable CUDA device: {reason}");
        println!("skipped: no CUDA device ({reason})");
        return None;
    }
    Some(CudaBackend::new(0, DType::F16).expect("a CUDA device is visible but the backend failed to open"))
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
}

#[test]
fn smollm2_on_cuda_matches_the_cpu_reference() {
    let Some(gpu) = cuda_backend() else { return };
    let Some(path) = model_for_tests("smollm2_on_cuda_matches_the_cpu_reference") else { return };
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::default());
    let cpu_engine = Engine::load(&path, cpu.clone(), &[], ShardOptions::default(), &mut |_, _| {}).expect("cpu load");
    let n = cpu_engine.files().config().n_layers;
    let mid = (n / 2).max(1);
    let split = if n > 1 { vec![LayerRange::new(0, mid), LayerRange::new(mid, n)] } else { vec![LayerRange::full(n)] };
    let gpu_engine = Engine::load(&path, gpu.clone(), &split, ShardOptions::default(), &mut |_, _| {}).expect("gpu");
    println!("{} vs {}", gpu.describe(), cpu.describe());

    let fixtures: serde_json::Value = serde_json::from_str(FIXTURES).expect("fixture JSON");
    let cases = fixtures["cases"].as_array().expect("cases");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().expect("token list").iter().map(|t| t.as_u64().expect("token id") as u32).collect()
    };

    let (mut agree, mut total) = (0usize, 0usize);
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let prompt = ids(&case["prompt_tokens"]);
        let mut tokens = prompt.clone();
        tokens.extend(ids(&case["continuation_tokens"]));

        // Teacher forcing: logits after every prefix, both devices.
        let top1 = |engine: &Engine, backend: &Arc<dyn Backend>| -> Vec<usize> {
            let mut s = engine.pipeline().open_session(tokens.len()).expect("session");
            let logits = s.forward(&tokens, true).expect("forward");
            let v = logits.cols();
            let host = backend.download_f32(&logits).expect("download logits");
            host.chunks_exact(v).map(argmax).collect()
        };
        let (g, c) = (top1(&gpu_engine, &gpu), top1(&cpu_engine, &cpu));
        let same = g.iter().zip(&c).filter(|(a, b)| a == b).count();
        println!("{name}: teacher-forced top-1 agreement {same}/{}", c.len());
        agree += same;
        total += c.len();

        // Greedy continuation.
        let params = GenerateParams { max_tokens: 16, ..GenerateParams::default() };
        let run = |engine: &Engine| engine.generate(&prompt, &params, &mut |_| true).expect("generate").tokens;
        let (gt, ct) = (run(&gpu_engine), run(&cpu_engine));
        assert_eq!(gt, ct, "{name}: greedy continuation on CUDA differs from the CPU");
    }
    let rate = agree as f64 / total as f64;
    println!("overall teacher-forced top-1 agreement {:.4} over {total} positions", rate);
    assert!(rate >= 0.99, "teacher-forced top-1 agreement {rate:.4} < 0.99");
}
