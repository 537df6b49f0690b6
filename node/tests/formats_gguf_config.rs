//! `ModelConfig::from_gguf`: llama.cpp's metadata keys, defaults, fallbacks and refusals.

use shardline_kernels::{DType, RopeStyle};
use shardline_node::ModelError;
use shardline_node::formats::MappedFile;
use shardline_node::formats::gguf::{GgufFile, GgufValue};
use shardline_node::formats::gguf_writer::GgufWriter;
use shardline_node::model::{Architecture, ModelConfig};
use shardline_node::test_models::quantize;

/// Metadata of a small llama model; `patch` replaces (or with `None` removes) keys.
fn config_with(
    arch: &str,
    patch: &[(&str, Option<GgufValue>)],
    tensors: &[(&str, Vec<f32>)],
) -> Result<ModelConfig, ModelError> {
    let base: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), arch.into()),
        (format!("{arch}.block_count"), 4u32.into()),
        (format!("{arch}.embedding_length"), 256u32.into()),
        (format!("{arch}.feed_forward_length"), 512u64.into()),
        (format!("{arch}.attention.head_count"), 8u32.into()),
        (format!("{arch}.attention.head_count_kv"), 2i32.into()),
        (format!("{arch}.context_length"), 4096u32.into()),
        (format!("{arch}.rope.freq_base"), 500_000f32.into()),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-6f32.into()),
        (format!("{arch}.vocab_size"), 1000u32.into()),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &base {
        let short = k.split_once('.').map(|(_, s)| s).unwrap_or(k);
        if patch.iter().any(|(p, _)| *p == short || *p == k) {
            continue;
        }
        w.add(k, v.clone()).unwrap();
    }
    for (k, v) in patch {
        if let Some(v) = v {
            let key = if k.starts_with("general.") || k.starts_with("tokenizer.") {
                k.to_string()
            } else {
                format!("{arch}.{k}")
            };
            w.add(&key, v.clone()).unwrap();
        }
    }
    for (name, values) in tensors {
        w.add_tensor(name, DType::F32, &[values.len()], quantize(DType::F32, values).unwrap()).unwrap();
    }
    ModelConfig::from_gguf(&GgufFile::from_bytes("c.gguf", w.to_bytes()).unwrap())
}

#[test]
fn llama_keys_and_defaults() {
    let c = config_with("llama", &[], &[]).unwrap();
    assert_eq!((c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim), (4, 256, 512, 8, 2, 32));
    assert_eq!((c.vocab, c.context_length, c.rms_eps), (1000, 4096, 1e-6));
    assert_eq!((c.rope.theta, c.rope.rotary_dim, c.rope.style), (500_000.0, 32, RopeStyle::Interleaved));
    assert_eq!((c.rope.linear_factor, c.rope.llama3, c.rope_freq_factors.clone()), (1.0, None, None));
    assert!(c.tied_embeddings, "no output.weight");

    // Defaults: KV heads = heads, theta 10000, eps 1e-5.
    let c = config_with(
        "llama",
        &[("attention.head_count_kv", None), ("rope.freq_base", None), ("attention.layer_norm_rms_epsilon", None)],
        &[],
    )
    .unwrap();
    assert_eq!((c.n_kv_heads, c.rope.theta, c.rms_eps), (8, 10_000.0, 1e-5));

    // Explicit head size and partial rotary dimension.
    let c = config_with(
        "llama",
        &[("attention.key_length", Some(64u32.into())), ("rope.dimension_count", Some(48u32.into()))],
        &[],
    )
    .unwrap();
    assert_eq!((c.head_dim, c.rope.head_dim, c.rope.rotary_dim), (64, 64, 48));
}

#[test]
fn vocab_falls_back_to_the_token_list_and_head_presence_unties() {
    let tokens = GgufValue::from_strs((0..77).map(|i| format!("t{i}")));
    let c = config_with(
        "llama",
        &[("vocab_size", None), ("tokenizer.ggml.tokens", Some(tokens))],
        &[("output.weight", vec![1.0; 4])],
    )
    .unwrap();
    assert_eq!(c.vocab, 77);
    assert!(!c.tied_embeddings);
    assert!(
        matches!(config_with("llama", &[("vocab_size", None)], &[]), Err(ModelError::MissingMetadata(k)) if k == "llama.vocab_size")
    );
}

#[test]
fn rope_scaling() {
    let c = config_with(
        "llama",
        &[("rope.scaling.type", Some("linear".into())), ("rope.scaling.factor", Some(4f32.into()))],
        &[],
    )
    .unwrap();
    assert_eq!(c.rope.linear_factor, 0.25);
    let c = config_with("llama", &[("rope.scaling.type", Some("none".into()))], &[]).unwrap();
    assert_eq!(c.rope.linear_factor, 1.0);
    match config_with("llama", &[("rope.scaling.type", Some("yarn".into()))], &[]) {
        Err(ModelError::BadMetadata { key, detail }) => {
            assert_eq!(key, "llama.rope.scaling.type");
            assert!(detail.contains("yarn"));
        }
        other => panic!("{other:?}"),
    }
    let factors: Vec<f32> = (0..16).map(|i| 1.0 + i as f32 / 4.0).collect();
    let c = config_with("llama", &[], &[("rope_freqs.weight", factors.clone())]).unwrap();
    assert_eq!(c.rope_freq_factors, Some(factors));
    // One factor per rotated pair: 16 for head_dim 32.
    let err = config_with("llama", &[], &[("rope_freqs.weight", vec![1.0; 15])]).unwrap_err();
    assert!(matches!(err, ModelError::BadMetadata { ref key, .. } if key == "rope_freqs.weight"), "{err}");
}

#[test]
fn refusals_name_what_is_wrong() {
    match config_with("qwen2moe", &[], &[]) {
        Err(ModelError::UnsupportedArchitecture(a)) => assert_eq!(a, "qwen2moe"),
        other => panic!("{other:?}"),
    }
    let c = config_with("mistral", &[], &[]).unwrap();
    assert_eq!(c.arch, "mistral");
    for (patch, key) in [
        (("block_count", None), "llama.block_count"),
        (("embedding_length", None), "llama.embedding_length"),
        (("context_length", None), "llama.context_length"),
    ] {
        match config_with("llama", &[patch], &[]) {
            Err(ModelError::MissingMetadata(k)) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    }
    for (patch, key) in [
        (("attention.head_count_kv", Some(3u32.into())), "head_count_kv"),
        (("block_count", Some(0u32.into())), "block_count"),
        (("block_count", Some((-1i32).into())), "llama.block_count"),
        (("block_count", Some("four".into())), "llama.block_count"),
        (("rope.dimension_count", Some(31u32.into())), "rope.dimension_count"),
        (("rope.freq_base", Some((-1f32).into())), "rope.freq_base"),
        (("attention.value_length", Some(16u32.into())), "llama.attention.value_length"),
    ] {
        match config_with("llama", std::slice::from_ref(&patch), &[]) {
            Err(ModelError::BadMetadata { key: k, .. }) => assert_eq!(k, key, "{patch:?}"),
            other => panic!("{patch:?}: {other:?}"),
        }
    }
    let mut w = GgufWriter::new();
    w.add("llama.block_count", 1u32).unwrap();
    let f = GgufFile::from_bytes("noarch.gguf", w.to_bytes()).unwrap();
    assert!(matches!(ModelConfig::from_gguf(&f), Err(ModelError::MissingMetadata(k)) if k == "general.architecture"));
}

#[test]
fn qwen_files_keep_neox_rope_pairs() {
    for (name, arch) in [("qwen2", Architecture::Qwen2), ("qwen3", Architecture::Qwen3)] {
        let c = config_with(name, &[("attention.key_length", Some(128u32.into()))], &[]).unwrap();
        assert_eq!((c.arch.as_str(), c.architecture), (name, arch));
        assert_eq!((c.rope.style, c.head_dim, c.rope.rotary_dim), (RopeStyle::Neox, 128, 128));
    }
    let c = config_with("llama", &[], &[]).unwrap();
    assert_eq!((c.architecture, c.rope.style), (Architecture::Llama, RopeStyle::Interleaved));
    // NaN cannot pass for an absent key.
    let err = config_with("qwen2", &[("rope.freq_base", Some(f32::NAN.into()))], &[]).unwrap_err();
    assert!(matches!(err, ModelError::BadMetadata { ref key, .. } if key == "qwen2.rope.freq_base"), "{err}");
}
