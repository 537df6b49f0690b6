//! The real SmolLM2-135M-Instruct Q4_1 GGUF opens, and its configuration, tensor table and tokenizer metadata
//! match the model card and what the `gguf` Python package (llama.cpp's reader) reports for the same file.
//!
//! The file is found through `$SHARDLINE_MODEL` or the shardline model cache; when it is absent each test says
//! so and returns (CI fetches it with scripts/fetch-model.sh).

use std::path::PathBuf;

use shardline_kernels::{DType, RopeStyle};
use shardline_node::formats::MappedFile;
use shardline_node::formats::gguf::GgufFile;
use shardline_node::model::{ModelFiles, ModelId, open_model};

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> Option<PathBuf> {
    let path = match std::env::var_os("SHARDLINE_MODEL").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            cache.join("shardline").join("models").join(FILE)
        }
    };
    if path.is_file() {
        Some(path)
    } else {
        println!("skipped: model not found at {}, run scripts/fetch-model.sh", path.display());
        None
    }
}

#[test]
fn config_matches_the_model_card() {
    let Some(path) = model_path() else { return };
    let w = open_model(&path).unwrap();
    let c = w.config();
    assert_eq!(c.arch, "llama");
    assert_eq!(
        (c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab),
        (30, 576, 1536, 9, 3, 64, 49152)
    );
    assert_eq!(c.context_length, 8192);
    assert_eq!(c.rms_eps, 1e-5);
    assert_eq!(c.rope.theta, 100_000.0);
    assert_eq!((c.rope.head_dim, c.rope.rotary_dim), (64, 64));
    assert_eq!(c.rope.style, RopeStyle::Interleaved);
    assert_eq!((c.rope.llama3, c.rope.linear_factor), (None, 1.0));
    assert_eq!(c.rope_freq_factors, None);
    assert!(c.tied_embeddings);
}

#[test]
fn tensor_table_matches_llama_cpp_reader() {
    let Some(path) = model_path() else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!((f.alignment(), f.data_offset()), (32, 1_785_664));
    assert_eq!(f.tensor_infos().len(), 272);

    // Absolute offsets, sizes and types as `gguf.GGUFReader` reports them.
    for (name, abs_offset, bytes, ty) in [
        ("token_embd.weight", 1_785_664, 30_081_024, "Q8_0"),
        ("blk.0.attn_norm.weight", 31_866_688, 2_304, "F32"),
        ("blk.29.ffn_down.weight", 80_630_848, 552_960, "Q4_1"),
        ("output_norm.weight", 98_360_128, 2_304, "F32"),
    ] {
        let info = f.tensor_info(name).unwrap();
        assert_eq!(f.data_offset() + info.offset as usize, abs_offset, "{name}");
        assert_eq!(info.byte_len, bytes, "{name}");
        assert_eq!(info.ggml_type.name(), ty, "{name}");
    }

    let w = open_model(&path).unwrap();
    let table = w.tensor_table();
    assert_eq!(table.len(), 272);
    assert!(table.windows(2).all(|p| p[0].name < p[1].name), "sorted by name");
    let meta = |n: &str| table.iter().find(|t| t.name == n).unwrap_or_else(|| panic!("{n}")).clone();
    assert_eq!((meta("token_embd.weight").dtype, meta("token_embd.weight").shape), (DType::Q8_0, vec![49152, 576]));
    assert_eq!((meta("blk.0.attn_q.weight").dtype, meta("blk.0.attn_q.weight").shape), (DType::Q4_1, vec![576, 576]));
    assert_eq!(meta("blk.7.attn_k.weight").shape, vec![192, 576]);
    assert_eq!(meta("blk.7.ffn_gate.weight").shape, vec![1536, 576]);
    assert_eq!(meta("blk.7.ffn_down.weight").shape, vec![576, 1536]);
    assert_eq!((meta("blk.7.ffn_norm.weight").dtype, meta("blk.7.ffn_norm.weight").shape), (DType::F32, vec![576]));
    assert!(table.iter().all(|t| t.name != "output.weight"), "tied: no LM head");
    for layer in 0..30 {
        let n = table.iter().filter(|t| t.name.starts_with(&format!("blk.{layer}."))).count();
        assert_eq!(n, 9, "layer {layer}");
    }

    // Values of two norms, against numbers printed by the Python reader.
    let norm = w.tensor("blk.0.attn_norm.weight").unwrap();
    let first: Vec<f64> =
        norm.bytes.as_slice()[..16].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()).into()).collect();
    assert_eq!(first, vec![0.01397705078125, 0.0238037109375, -0.019775390625, -0.0302734375]);
    let out = w.tensor("output_norm.weight").unwrap();
    let sum: f64 = out.bytes.as_slice().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).sum();
    assert!((sum - 1038.33203125).abs() < 1e-3, "{sum}");
}

#[test]
fn tokenizer_metadata_is_reachable() {
    let Some(path) = model_path() else { return };
    let files = ModelFiles::open(&path).unwrap();
    assert!(files.hf_dir().is_none());
    assert_eq!(files.path(), path);
    let g = files.gguf().expect("a GGUF model exposes its file");
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert!(!g.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(&tokens[..3], &["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    assert_eq!(tokens[49151], "ectable");
    assert_eq!(g.get_i32_array("tokenizer.ggml.token_type").unwrap().len(), 49152);
    let merges = g.get_str_array("tokenizer.ggml.merges").unwrap();
    assert_eq!((merges.len(), merges[0]), (48900, "Ġ t"));
    assert_eq!(
        (g.get_u32("tokenizer.ggml.bos_token_id").unwrap(), g.get_u32("tokenizer.ggml.eos_token_id").unwrap()),
        (1, 2)
    );
    assert!(g.get_str("tokenizer.chat_template").unwrap().starts_with("{% for message in messages %}"));
}

#[test]
fn model_id_is_stable_across_opens() {
    let Some(path) = model_path() else { return };
    let a = ModelId::of(open_model(&path).unwrap().as_ref()).unwrap();
    let b = ModelId::of(open_model(&path).unwrap().as_ref()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.to_string().len(), 64);
}
