//! Bad input to `shardline generate` gives a clear error and a non-zero exit, never a panic.

use std::path::Path;
use std::process::Command;

use shardline_kernels::DType;
use shardline_node::formats::{GgmlType, GgufWriter};
use shardline_node::test_models::{TinySpec, write_tiny_gguf};

/// Runs `shardline generate` with `args`; returns (success, stderr).
fn generate(model: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run shardline");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "shardline panicked: {stderr}");
    (out.status.success(), stderr)
}

fn expect_error(model: &Path, args: &[&str], needle: &str) {
    let (ok, stderr) = generate(model, args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(stderr.contains(needle), "error for {args:?} should mention {needle:?}, got: {stderr}");
}

#[test]
fn a_tiny_model_generates_and_bad_requests_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&TinySpec::default(), &model).unwrap();
    let (ok, stderr) = generate(&model, &["--prompt", "hello", "--max-tokens", "4", "--json", "--device", "cpu"]);
    assert!(ok, "{stderr}");

    // Prompt plus new tokens beyond the context (256 tokens).
    let long = "word ".repeat(400);
    expect_error(&model, &["--prompt", &long, "--device", "cpu"], "exceeds the context");
    expect_error(&model, &["--prompt", "hi", "--max-tokens", "1000", "--device", "cpu"], "exceeds the context");
    // Layer range outside the model (2 layers).
    expect_error(&model, &["--prompt", "hi", "--shards", "0..1,1..5", "--device", "cpu"], "layer range 1..5");
    expect_error(&model, &["--prompt", "hi", "--temperature=-1"], "--temperature");
}

#[test]
fn broken_model_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--prompt", "hi", "--device", "cpu"];
    expect_error(&dir.path().join("missing.gguf"), &args, "missing.gguf");

    let bad_magic = dir.path().join("magic.gguf");
    std::fs::write(&bad_magic, b"NOPE and some more bytes to read").unwrap();
    expect_error(&bad_magic, &args, "not a GGUF file");

    let good = dir.path().join("good.gguf");
    write_tiny_gguf(&TinySpec::default(), &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&truncated, &args, "truncated");

    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama").unwrap();
    for (key, value) in [
        ("llama.block_count", 1u32),
        ("llama.context_length", 64),
        ("llama.embedding_length", 256),
        ("llama.feed_forward_length", 256),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 4),
        ("llama.vocab_size", 32),
    ] {
        w.add(key, value).unwrap();
    }
    w.add("llama.attention.layer_norm_rms_epsilon", 1e-5f32).unwrap();
    // A type no backend computes with (Q6_K and the other K-quants load since issue 15).
    w.add_raw_tensor("blk.0.attn_q.weight", GgmlType::IQ2_XXS, vec![256, 2], vec![0u8; 2 * 66]).unwrap();
    let iq2 = dir.path().join("iq2_xxs.gguf");
    w.write(&iq2).unwrap();
    expect_error(&iq2, &args, "IQ2_XXS");

    let mut w = GgufWriter::new();
    w.add("general.architecture", "mamba").unwrap();
    w.add_tensor("token_embd.weight", DType::F32, &[2, 32], vec![0u8; 2 * 32 * 4]).unwrap();
    let mamba = dir.path().join("mamba.gguf");
    w.write(&mamba).unwrap();
    expect_error(&mamba, &args, "mamba");
}
