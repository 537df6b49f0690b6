//! Tiny random-weight Qwen2 and Qwen3 GGUF files against llama.cpp, an independent implementation of each
//! architecture. The files are written here (deterministically: the fixture records each file's SHA-256, so a change
//! of the writer or the weights is caught rather than compared against stale numbers); llama.cpp's logits for every
//! position of a fixed token sequence, and its tokenization of a text with the `qwen2`/`gpt-2` pre-tokenizers, are in
//! `tests/fixtures/llamacpp_tiny.json`, made by `scripts/make-reference-tiny.py`, which asks the ignored test below
//! to write the same files. Neither llama.cpp nor Python is needed to run the comparison.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DType};
use shardline_node::model::open::ModelFiles;
use shardline_node::model::{Architecture, LayerRange, Shard, ShardInput, ShardOptions, ShardOutput};
use shardline_node::test_models::{TinyDTypes, TinySpec, write_tiny_gguf};
use shardline_node::tokenizer::Tokenizer;

/// The models of the fixture, by name: both Qwen layouts with exact (f32) and llama.cpp-style quantised weights (Llama
/// is compared on the real SmolLM2 in `engine_llamacpp.rs`).
fn models() -> Vec<(&'static str, TinySpec)> {
    let qwen = |arch: Architecture, dtypes: TinyDTypes| TinySpec {
        arch,
        tied: true,
        rope_theta: 1e6,
        rms_eps: 1e-6,
        explicit_head_dim: (arch == Architecture::Qwen3).then_some(32),
        dtypes,
        seed: 0x9e3779b9,
        ..TinySpec::default()
    };
    vec![
        ("qwen2-f32", qwen(Architecture::Qwen2, TinyDTypes::all(DType::F32))),
        ("qwen2-q8_0", qwen(Architecture::Qwen2, TinyDTypes::like_llama_cpp(DType::Q8_0))),
        ("qwen3-f32", qwen(Architecture::Qwen3, TinyDTypes::all(DType::F32))),
        ("qwen3-q4_1", qwen(Architecture::Qwen3, TinyDTypes::like_llama_cpp(DType::Q4_1))),
    ]
}

#[derive(Deserialize)]
struct Fixture {
    tokens: Vec<u32>,
    models: Vec<FixtureModel>,
}

#[derive(Deserialize)]
struct FixtureModel {
    name: String,
    sha256: String,
    /// Row `i`: the logits after `tokens[..=i]`.
    logits: Vec<Vec<f32>>,
    text: String,
    text_tokens: Vec<u32>,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llamacpp_tiny.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture parses")
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn all_logits(files: &ModelFiles, tokens: &[u32]) -> Vec<f32> {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(2));
    let n = files.config().n_layers;
    let shard = Shard::load(files.weights().as_ref(), LayerRange::full(n), backend.clone(), ShardOptions::default())
        .expect("load");
    let mut session = shard.open_session(tokens.len()).unwrap();
    match shard.forward_all_logits(&mut session, ShardInput::Tokens(tokens)).unwrap() {
        ShardOutput::Logits(l) => backend.download_f32(&l).unwrap(),
        ShardOutput::Hidden(_) => panic!("a whole model gives logits"),
    }
}

#[test]
fn tiny_models_match_llama_cpp() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let specs = models();
    assert_eq!(fx.models.len(), specs.len(), "the fixture covers every model");
    for (name, spec) in specs {
        let m = fx.models.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} not in the fixture"));
        let path = dir.path().join(format!("{name}.gguf"));
        write_tiny_gguf(&spec, &path).unwrap();
        assert_eq!(
            sha256_file(&path),
            m.sha256,
            "{name}: the file differs from the one llama.cpp read; rerun the script"
        );
        let files = ModelFiles::open(&path).unwrap();
        assert_eq!(files.config().architecture, spec.arch);

        let tokenizer = Tokenizer::from_gguf(files.gguf().unwrap()).unwrap();
        assert_eq!(tokenizer.encode(&m.text, true).unwrap(), m.text_tokens, "{name}: tokens of {:?}", m.text);

        let ours = all_logits(&files, &fx.tokens);
        let vocab = spec.vocab;
        assert_eq!(m.logits.len(), fx.tokens.len());
        // f32 weights: both sides compute in f32 (llama.cpp with an f32 KV cache) and differ only in the order of
        // additions (measured max 6e-6). Quantised weights: both quantise activations to 8 bits per block of 32, but a
        // value whose rounding falls on the other side of a step now and then moves a logit (measured max 0.043).
        // A top-1/top-2 gap below `near_tie` (about twice the largest difference) may be resolved either way.
        let (max_bound, mean_bound, near_tie) =
            if spec.dtypes.attention == DType::F32 { (1e-4, 2e-5, 2e-4) } else { (0.1, 0.02, 0.1) };
        let (mut max_diff, mut sum_diff, mut scale) = (0.0f32, 0.0f64, 0.0f64);
        let (mut agree, mut decided, mut near_ties) = (0, 0, 0);
        for (i, theirs) in m.logits.iter().enumerate() {
            let row = &ours[i * vocab..(i + 1) * vocab];
            assert_eq!(theirs.len(), vocab);
            for (a, b) in row.iter().zip(theirs) {
                max_diff = max_diff.max((a - b).abs());
                sum_diff += f64::from((a - b).abs());
                scale += f64::from(b * b);
            }
            let (top, margin) = top1_and_margin(theirs);
            let same = argmax(row) == top;
            agree += usize::from(same);
            if margin > near_tie {
                decided += 1;
                assert!(
                    same,
                    "{name}: position {i}: top-1 {} differs from llama.cpp's {top} (margin {margin})",
                    argmax(row)
                );
            } else {
                near_ties += 1;
            }
        }
        let n = (vocab * fx.tokens.len()) as f64;
        let (mean_diff, rms) = (sum_diff / n, (scale / n).sqrt());
        println!(
            "{name:>11}: max |diff| {max_diff:.2e}, mean |diff| {mean_diff:.2e} (logit rms {rms:.3}), top-1 {agree}/{} \
             ({decided} positions with a margin over {near_tie}, all identical; {near_ties} near-ties)",
            fx.tokens.len()
        );
        assert!(max_diff <= max_bound, "{name}: max |logit diff| {max_diff} over {max_bound}");
        assert!(mean_diff <= mean_bound, "{name}: mean |logit diff| {mean_diff} over {mean_bound}");
    }
}

fn argmax(r: &[f32]) -> usize {
    r.iter().enumerate().fold(0, |best, (j, &v)| if v > r[best] { j } else { best })
}

fn top1_and_margin(r: &[f32]) -> (usize, f32) {
    let top = argmax(r);
    let second = r.iter().enumerate().filter(|&(j, _)| j != top).map(|(_, &v)| v).fold(f32::NEG_INFINITY, f32::max);
    (top, r[top] - second)
}

/// Writes the fixture's models into `$SHARDLINE_TINY_DIR` for `scripts/make-reference-tiny.py`.
#[test]
#[ignore = "run by scripts/make-reference-tiny.py"]
fn write_tiny_models_for_llama_cpp() {
    let dir = std::env::var_os("SHARDLINE_TINY_DIR").expect("SHARDLINE_TINY_DIR names the output folder");
    for (name, spec) in models() {
        write_tiny_gguf(&spec, Path::new(&dir).join(format!("{name}.gguf"))).unwrap();
    }
}
