//! Sampling through the whole engine: a fixed seed repeats the text exactly (also when the model runs as several
//! shards), different seeds give different texts, and top-k = 1 is greedy.

use std::sync::Arc;

use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DType, SamplingParams};
use shardline_node::engine::Engine;
use shardline_node::generate::GenerateParams;
use shardline_node::model::{LayerRange, ShardOptions};
use shardline_node::test_models::{TinyDTypes, TinySpec, write_tiny_gguf};

fn engine(path: &std::path::Path, splits: &[LayerRange]) -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(2));
    Engine::load(path, backend, splits, ShardOptions::default(), &mut |_, _| {}).unwrap()
}

fn tokens(engine: &Engine, sampling: SamplingParams) -> Vec<u32> {
    let prompt = engine.prompt_tokens("hello world", false).unwrap();
    let params = GenerateParams { max_tokens: 24, sampling, ..GenerateParams::default() };
    engine.generate(&prompt, &params, &mut |_| true).unwrap().tokens
}

#[test]
fn seeds_repeat_and_differ() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let spec = TinySpec { n_layers: 3, dtypes: TinyDTypes::like_llama_cpp(DType::Q4_1), ..Default::default() };
    write_tiny_gguf(&spec, &path).unwrap();
    let whole = engine(&path, &[]);
    let split = engine(&path, &[LayerRange::new(0, 1), LayerRange::new(1, 3)]);
    let warm = |seed| SamplingParams { temperature: 1.0, top_k: 40, top_p: 0.95, seed };

    let a = tokens(&whole, warm(7));
    assert_eq!(a.len(), 24);
    assert_eq!(a, tokens(&whole, warm(7)), "same seed, same tokens");
    assert_eq!(a, tokens(&split, warm(7)), "a split model samples the same tokens");
    let distinct: std::collections::HashSet<Vec<u32>> = (0..6).map(|s| tokens(&whole, warm(s))).collect();
    assert!(distinct.len() >= 4, "6 seeds gave only {} different texts", distinct.len());

    let greedy = tokens(&whole, SamplingParams::GREEDY);
    let top1 = tokens(&whole, SamplingParams { temperature: 0.8, top_k: 1, top_p: 1.0, seed: 3 });
    assert_eq!(greedy, top1, "top-k 1 is greedy whatever the temperature");
    assert_eq!(greedy, tokens(&split, SamplingParams::GREEDY));
}
