//! Hugging Face directories: single and sharded safetensors load with canonical names; `config.json` parsing;
//! malformed directories give typed errors.

use std::path::Path;

use serde_json::json;
use shardline_kernels::{DType, Llama3Scaling, RopeStyle};
use shardline_node::ModelError;
use shardline_node::formats::hf::{HfWeights, INDEX_FILE};
use shardline_node::model::{Architecture, ModelConfig, ModelFiles, WeightSource, open_model};
use shardline_node::test_models::{TinyDTypes, TinySpec, tiny_tensors, write_tiny_hf, write_tiny_hf_sharded};

fn check_against_spec(w: &dyn WeightSource, spec: &TinySpec) {
    assert_eq!(*w.config(), spec.hf_config());
    let expected = tiny_tensors(spec).unwrap();
    let table = w.tensor_table();
    assert_eq!(table.len(), expected.len());
    assert!(table.windows(2).all(|p| p[0].name < p[1].name), "sorted by name");
    for t in &expected {
        let entry = w.tensor(&t.name).unwrap();
        assert_eq!((entry.dtype, &entry.shape), (t.hf_dtype, &t.shape), "{}", t.name);
        assert_eq!(entry.bytes.as_slice(), t.hf_bytes.as_slice(), "{}", t.name);
        let meta = table.iter().find(|m| m.name == t.name).unwrap();
        assert_eq!(meta.byte_len, t.hf_bytes.len());
    }
}

#[test]
fn single_file_directory_loads_with_canonical_names() {
    for dtypes in [TinyDTypes::all(DType::F32), TinyDTypes::all(DType::F16), TinyDTypes::all(DType::BF16)] {
        let spec = TinySpec { dtypes, ..TinySpec::default() };
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf(&spec, dir.path()).unwrap();
        let hf = HfWeights::open(dir.path()).unwrap();
        assert_eq!(hf.shard_count(), 1);
        assert_eq!(hf.hf_name("blk.1.attn_output.weight"), Some("model.layers.1.self_attn.o_proj.weight"));
        assert_eq!(hf.hf_name("output.weight"), Some("lm_head.weight"));
        check_against_spec(&hf, &spec);
    }
}

#[test]
fn sharded_directory_loads_every_tensor_from_its_shard() {
    let spec = TinySpec { n_layers: 3, tied: true, ..TinySpec::default() };
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf_sharded(&spec, dir.path(), 3).unwrap();
    assert!(dir.path().join(INDEX_FILE).exists());
    assert!(!dir.path().join("model.safetensors").exists());
    let files = ModelFiles::open(dir.path()).unwrap();
    assert_eq!(files.hf_dir(), Some(dir.path()));
    assert!(files.gguf().is_none());
    let ModelFiles::Hf(hf) = &files else { panic!("a directory opens as Hugging Face") };
    assert_eq!(hf.shard_count(), 3);
    assert!(files.config().tied_embeddings);
    assert!(files.weights().tensor("output.weight").is_err(), "tied: no head");
    check_against_spec(files.weights().as_ref(), &spec);
    assert!(dir.path().join("tokenizer.json").exists() && dir.path().join("tokenizer_config.json").exists());
}

#[test]
fn llama3_scaling_comes_from_config_json() {
    let llama3 =
        Llama3Scaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 64.0 };
    let spec = TinySpec { llama3: Some(llama3), ..TinySpec::default() };
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(&spec, dir.path()).unwrap();
    let w = open_model(dir.path()).unwrap();
    assert_eq!(w.config().rope.llama3, Some(llama3));
    assert_eq!(w.config().rope.style, RopeStyle::Neox);
}

fn base_config() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_hidden_layers": 30,
        "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rope_scaling": null, "hidden_act": "silu"
    })
}

#[test]
fn hf_config_json_parsing() {
    // SmolLM2-135M-Instruct's config.json gives the same numbers as its GGUF, with NeoX RoPE.
    let c = ModelConfig::from_hf_config(&base_config()).unwrap();
    assert_eq!((c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim), (30, 576, 1536, 9, 3, 64));
    assert_eq!((c.vocab, c.context_length, c.rms_eps, c.rope.theta), (49152, 8192, 1e-5, 100000.0));
    assert_eq!((c.rope.style, c.tied_embeddings, c.arch.as_str()), (RopeStyle::Neox, true, "llama"));

    let with = |patch: serde_json::Value| {
        let mut v = base_config();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_hf_config(&v)
    };
    let c = with(json!({"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    .unwrap();
    assert_eq!(
        c.rope.llama3,
        Some(Llama3Scaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0
        })
    );
    let c = with(json!({"rope_scaling": {"type": "linear", "factor": 4.0}})).unwrap();
    assert_eq!(c.rope.linear_factor, 0.25);
    let c = with(json!({"head_dim": 128})).unwrap();
    assert_eq!((c.head_dim, c.rope.rotary_dim), (128, 128));
    let c = with(json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096}))
        .unwrap();
    assert_eq!((c.arch.as_str(), c.context_length), ("mistral", 4096));

    match with(json!({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"})) {
        Err(ModelError::UnsupportedArchitecture(a)) => assert_eq!(a, "Qwen2MoeForCausalLM"),
        other => panic!("{other:?}"),
    }
    match with(json!({"model_type": "gemma"})) {
        Err(ModelError::UnsupportedArchitecture(a)) => assert_eq!(a, "gemma"),
        other => panic!("{other:?}"),
    }
    for (patch, key) in [
        (json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "rope_scaling"),
        (json!({"num_key_value_heads": 2}), "head_count_kv"),
        (json!({"hidden_size": "576"}), "hidden_size"),
        (json!({"attention_bias": true}), "attention_bias"),
        (json!({"hidden_act": "gelu"}), "hidden_act"),
    ] {
        match with(patch.clone()) {
            Err(ModelError::BadMetadata { key: k, .. }) => assert_eq!(k, key, "{patch}"),
            other => panic!("{patch}: {other:?}"),
        }
    }
    let mut v = base_config();
    v.as_object_mut().unwrap().remove("num_hidden_layers");
    assert!(matches!(ModelConfig::from_hf_config(&v), Err(ModelError::MissingMetadata(k)) if k == "num_hidden_layers"));
    // A nested field of the wrong type is named by its path.
    match with(json!({"rope_scaling": {"rope_type": "linear", "factor": "4"}})) {
        Err(ModelError::BadMetadata { key, .. }) => assert_eq!(key, "rope_scaling.factor"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(ModelConfig::from_hf_config(&json!([1, 2])), Err(ModelError::BadMetadata { .. })));
}

/// Qwen2.5-0.5B-Instruct's `config.json` (the numbers that matter here).
fn qwen2_config() -> serde_json::Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "max_position_embeddings": 32768, "max_window_layers": 21, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": 4096, "tie_word_embeddings": true, "use_sliding_window": false,
        "vocab_size": 151936, "rope_scaling": null
    })
}

#[test]
fn qwen_configs_give_their_architecture() {
    let c = ModelConfig::from_hf_config(&qwen2_config()).unwrap();
    assert_eq!((c.arch.as_str(), c.architecture), ("qwen2", Architecture::Qwen2));
    assert_eq!((c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn), (896, 14, 2, 64, 4864));
    assert_eq!((c.rope.theta, c.rope.style, c.rms_eps, c.tied_embeddings), (1e6, RopeStyle::Neox, 1e-6, true));
    assert_eq!(c.context_length, 32768, "use_sliding_window is false: the window does not cap the context");
    assert!(c.architecture.layout().qkv_bias);

    let mut v = qwen2_config();
    v["use_sliding_window"] = json!(true);
    assert_eq!(ModelConfig::from_hf_config(&v).unwrap().context_length, 4096);
    v.as_object_mut().unwrap().remove("use_sliding_window");
    assert_eq!(ModelConfig::from_hf_config(&v).unwrap().context_length, 32768, "Qwen's default is off");

    // Qwen3-0.6B: head_dim 128 with 16 heads over a hidden size of 1024.
    let qwen3 = json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": false, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
        "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
        "use_sliding_window": false, "vocab_size": 151936
    });
    let c = ModelConfig::from_hf_config(&qwen3).unwrap();
    assert_eq!((c.architecture, c.head_dim, c.n_heads * c.head_dim, c.hidden), (Architecture::Qwen3, 128, 2048, 1024));
    assert!(c.architecture.layout().qk_norm && !c.architecture.layout().qkv_bias);
    let mut biased = qwen3.clone();
    biased["attention_bias"] = json!(true);
    assert!(
        matches!(ModelConfig::from_hf_config(&biased), Err(ModelError::BadMetadata { key, .. }) if key == "attention_bias")
    );
    // Only `model_type` or only the class is enough.
    let mut no_class = qwen3.clone();
    no_class.as_object_mut().unwrap().remove("architectures");
    assert_eq!(ModelConfig::from_hf_config(&no_class).unwrap().architecture, Architecture::Qwen3);
    let mut no_type = qwen3;
    no_type.as_object_mut().unwrap().remove("model_type");
    assert_eq!(ModelConfig::from_hf_config(&no_type).unwrap().arch, "qwen3");
}

#[test]
fn qwen_directories_load_biases_and_head_norms() {
    for arch in [Architecture::Qwen2, Architecture::Qwen3] {
        let spec = TinySpec { arch, tied: true, explicit_head_dim: Some(32), ..TinySpec::default() };
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf(&spec, dir.path()).unwrap();
        let hf = HfWeights::open(dir.path()).unwrap();
        check_against_spec(&hf, &spec);
        let (bias, norm) = (hf.hf_name("blk.1.attn_k.bias"), hf.hf_name("blk.1.attn_k_norm.weight"));
        match arch {
            Architecture::Qwen2 => {
                assert_eq!((bias, norm), (Some("model.layers.1.self_attn.k_proj.bias"), None));
            }
            _ => assert_eq!((bias, norm), (None, Some("model.layers.1.self_attn.k_norm.weight"))),
        }
    }
}

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf_sharded(&TinySpec::default(), dir.path(), 2).unwrap();
    dir
}

fn edit_index(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(INDEX_FILE);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn malformed_directories_give_typed_errors() {
    // No config.json.
    let empty = tempfile::tempdir().unwrap();
    match HfWeights::open(empty.path()) {
        Err(ModelError::Io { path, .. }) => assert!(path.ends_with("config.json"), "{path}"),
        other => panic!("{other:?}"),
    }
    // Invalid JSON.
    let dir = tiny_dir();
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert!(matches!(HfWeights::open(dir.path()), Err(ModelError::Corrupt { .. })));

    // A shard path escaping the directory.
    let dir = tiny_dir();
    edit_index(dir.path(), |v| v["weight_map"]["model.norm.weight"] = json!("../model-00001-of-00002.safetensors"));
    assert!(matches!(HfWeights::open(dir.path()), Err(ModelError::Corrupt { detail, .. }) if detail.contains("..")));

    // The index names a tensor its shard does not hold.
    let dir = tiny_dir();
    edit_index(dir.path(), |v| {
        v["weight_map"]["model.layers.0.mlp.up_proj.weight"] = json!("model-00002-of-00002.safetensors")
    });
    let err = HfWeights::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::Corrupt { detail, .. } if detail.contains("model.layers.0.mlp.up_proj.weight")),
        "{err}"
    );

    // A missing shard file.
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert!(matches!(HfWeights::open(dir.path()), Err(ModelError::Io { .. })));

    // A truncated safetensors file.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(&TinySpec::default(), dir.path()).unwrap();
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for cut in [0, 7, 8, 100, bytes.len() - 1] {
        std::fs::write(&st, &bytes[..cut]).unwrap();
        assert!(matches!(HfWeights::open(dir.path()), Err(ModelError::Corrupt { .. })), "cut {cut}");
    }
}

#[test]
fn unsupported_safetensors_dtypes_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf(&TinySpec::default(), dir.path()).unwrap();
    // Rewrite the file with the final norm stored as I32 (same byte size as F32).
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let loaded = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = loaded
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let dtype = if name == "model.norm.weight" { safetensors::Dtype::I32 } else { v.dtype() };
            let view = safetensors::tensor::TensorView::new(dtype, v.shape().to_vec(), v.data()).unwrap();
            (name, view)
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&st, out).unwrap();
    match HfWeights::open(dir.path()) {
        Err(ModelError::UnsupportedTensorType { tensor, type_name }) => {
            assert_eq!((tensor.as_str(), type_name.as_str()), ("model.norm.weight", "I32"));
        }
        other => panic!("{other:?}"),
    }
}
