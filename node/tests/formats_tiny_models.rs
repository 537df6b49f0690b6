//! The tiny GGUF and Hugging Face models hold the same numbers: after dequantising GGUF and undoing llama.cpp's
//! Q/K permutation, every tensor equals its Hugging Face twin bit for bit. The permutation is also checked by what
//! it is for: interleaved RoPE on the permuted rows equals NeoX RoPE on the original rows, permuted.

use std::collections::BTreeMap;

use shardline_kernels::{DType, Llama3Scaling};
use shardline_node::formats::MappedFile;
use shardline_node::formats::gguf::GgufFile;
use shardline_node::model::{ModelFiles, WeightSource};
use shardline_node::test_models::{
    CHATML_TEMPLATE, MIN_VOCAB, TinyDTypes, TinySpec, dequantize, permute_qk_rows, unpermute_qk_rows, write_tiny_gguf,
    write_tiny_hf,
};

fn decode(w: &dyn WeightSource, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = w.tensor(name).unwrap();
    (t.shape.clone(), dequantize(t.dtype, t.bytes.as_slice()).unwrap())
}

fn specs() -> Vec<(&'static str, TinySpec)> {
    let llama3 =
        Llama3Scaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 64.0 };
    vec![
        ("f32", TinySpec::default()),
        ("f16 tied", TinySpec { dtypes: TinyDTypes::all(DType::F16), tied: true, ..TinySpec::default() }),
        ("bf16", TinySpec { dtypes: TinyDTypes::all(DType::BF16), seed: 9, ..TinySpec::default() }),
        ("q4_1 like llama.cpp", TinySpec { dtypes: TinyDTypes::like_llama_cpp(DType::Q4_1), ..TinySpec::default() }),
        (
            "q4_0 mha",
            TinySpec { n_kv_heads: 4, dtypes: TinyDTypes::like_llama_cpp(DType::Q4_0), ..TinySpec::default() },
        ),
        (
            "q8_0 mqa llama3",
            TinySpec {
                n_kv_heads: 1,
                n_layers: 3,
                llama3: Some(llama3),
                dtypes: TinyDTypes::all(DType::Q8_0),
                ..TinySpec::default()
            },
        ),
    ]
}

#[test]
fn gguf_and_hf_hold_the_same_dequantised_values() {
    for (label, spec) in specs() {
        let dir = tempfile::tempdir().unwrap();
        let (gguf_path, hf_dir) = (dir.path().join("tiny.gguf"), dir.path().join("hf"));
        write_tiny_gguf(&spec, &gguf_path).unwrap();
        write_tiny_hf(&spec, &hf_dir).unwrap();
        let gguf = ModelFiles::open(&gguf_path).unwrap().weights();
        let hf = ModelFiles::open(&hf_dir).unwrap().weights();

        assert_eq!(*gguf.config(), spec.gguf_config(), "{label}");
        assert_eq!(*hf.config(), spec.hf_config(), "{label}");
        let names = |w: &dyn WeightSource| -> Vec<String> {
            w.tensor_table().into_iter().map(|t| t.name).filter(|n| n != "rope_freqs.weight").collect()
        };
        assert_eq!(names(gguf.as_ref()), names(hf.as_ref()), "{label}");
        assert_eq!(gguf.tensor("rope_freqs.weight").is_ok(), spec.llama3.is_some(), "{label}");

        let c = gguf.config().clone();
        for name in names(gguf.as_ref()) {
            let (shape, g) = decode(gguf.as_ref(), &name);
            let (hf_shape, h) = decode(hf.as_ref(), &name);
            assert_eq!(shape, hf_shape, "{label} {name}");
            let cols = shape[shape.len() - 1];
            let g = if name.ends_with("attn_q.weight") {
                unpermute_qk_rows(&g, c.n_heads, cols)
            } else if name.ends_with("attn_k.weight") {
                unpermute_qk_rows(&g, c.n_kv_heads, cols)
            } else {
                g
            };
            assert!(g.iter().zip(&h).all(|(a, b)| a.to_bits() == b.to_bits()), "{label} {name}");
            if name.ends_with("attn_q.weight") && c.n_heads > 1 {
                let (raw_shape, raw) = decode(gguf.as_ref(), &name);
                assert_eq!(raw_shape, shape);
                assert_ne!(raw, h, "{label} {name}: GGUF rows are permuted");
            }
        }
    }
}

/// RoPE on one vector of `n_heads * head_dim` values at position `pos`, angles `pos * theta^(-2i/d)`.
fn rope(x: &[f64], n_heads: usize, head_dim: usize, pos: f64, interleaved: bool) -> Vec<f64> {
    let mut out = x.to_vec();
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            let angle = pos * 10_000f64.powf(-2.0 * i as f64 / head_dim as f64);
            let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (a, b) = (h * head_dim + a, h * head_dim + b);
            out[a] = x[a] * angle.cos() - x[b] * angle.sin();
            out[b] = x[a] * angle.sin() + x[b] * angle.cos();
        }
    }
    out
}

#[test]
fn permutation_turns_neox_rope_into_interleaved_rope() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gguf(&spec, dir.path().join("t.gguf")).unwrap();
    write_tiny_hf(&spec, dir.path().join("hf")).unwrap();
    let gguf = ModelFiles::open(dir.path().join("t.gguf")).unwrap().weights();
    let hf = ModelFiles::open(dir.path().join("hf")).unwrap().weights();
    let x: Vec<f64> = (0..spec.hidden).map(|i| ((i * 7 % 13) as f64 - 6.0) / 6.0).collect();
    let matvec = |w: &[f32], rows: usize| -> Vec<f64> {
        (0..rows).map(|r| (0..spec.hidden).map(|k| w[r * spec.hidden + k] as f64 * x[k]).sum()).collect()
    };
    for (name, heads) in [("blk.1.attn_q.weight", spec.n_heads), ("blk.1.attn_k.weight", spec.n_kv_heads)] {
        let rows = heads * spec.head_dim();
        let q_gguf = matvec(&decode(gguf.as_ref(), name).1, rows);
        let q_hf = matvec(&decode(hf.as_ref(), name).1, rows);
        for pos in [0.0, 1.0, 17.0] {
            let interleaved = rope(&q_gguf, heads, spec.head_dim(), pos, true);
            let neox_then_permuted = permute_qk_rows(&rope(&q_hf, heads, spec.head_dim(), pos, false), heads, 1);
            for (a, b) in interleaved.iter().zip(&neox_then_permuted) {
                assert!((a - b).abs() < 1e-9, "{name} at {pos}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn weights_look_like_a_real_initialisation() {
    let spec = TinySpec { n_layers: 1, ..TinySpec::default() };
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gguf(&spec, dir.path().join("t.gguf")).unwrap();
    let w = ModelFiles::open(dir.path().join("t.gguf")).unwrap().weights();
    for meta in w.tensor_table() {
        let (_, v) = decode(w.as_ref(), &meta.name);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(v.iter().all(|x| x.is_finite() && *x != 0.0), "{}: no zeros", meta.name);
        if meta.name.contains("norm") {
            assert!((mean - 1.0).abs() < 0.05 && std < 0.1, "{}: mean {mean} std {std}", meta.name);
        } else {
            assert!(mean.abs() < 0.02 && (0.015..0.12).contains(&std), "{}: mean {mean} std {std}", meta.name);
        }
    }
}

#[test]
fn same_seed_same_files_other_seed_other_weights() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec { dtypes: TinyDTypes::like_llama_cpp(DType::Q4_1), ..TinySpec::default() };
    write_tiny_gguf(&spec, dir.path().join("a.gguf")).unwrap();
    write_tiny_gguf(&spec, dir.path().join("b.gguf")).unwrap();
    write_tiny_gguf(&TinySpec { seed: spec.seed + 1, ..spec.clone() }, dir.path().join("c.gguf")).unwrap();
    let read = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    assert_eq!(read("a.gguf"), read("b.gguf"));
    assert_ne!(read("a.gguf"), read("c.gguf"));
    assert_eq!(read("a.gguf").len(), read("c.gguf").len());
}

#[test]
fn tiny_gguf_and_hf_carry_the_same_tokenizer() {
    let spec = TinySpec { vocab: MIN_VOCAB + 5, ..TinySpec::default() };
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gguf(&spec, dir.path().join("t.gguf")).unwrap();
    write_tiny_hf(&spec, dir.path().join("hf")).unwrap();
    let g = GgufFile::open(dir.path().join("t.gguf")).unwrap();
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), spec.vocab);
    assert_eq!(g.get_i32_array("tokenizer.ggml.token_type").unwrap().len(), spec.vocab);
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.get_str("tokenizer.chat_template").unwrap(), CHATML_TEMPLATE);
    assert_eq!(tokens[3 + b'a' as usize], "a");
    assert_eq!(tokens[3 + b' ' as usize], "Ġ");
    assert_eq!(tokens[spec.vocab - 1], "<|reserved_4|>");

    // The Hugging Face tokenizer has the same vocabulary, applies the merges and knows the specials.
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("hf").join("tokenizer.json")).unwrap();
    let vocab: BTreeMap<String, u32> = tok.get_vocab(true).into_iter().collect();
    assert_eq!(vocab.len(), spec.vocab);
    for (id, t) in tokens.iter().enumerate() {
        assert_eq!(vocab.get(*t), Some(&(id as u32)), "{t}");
    }
    let enc = tok.encode("hello world", false).unwrap();
    let ids: Vec<usize> = enc.get_ids().iter().map(|&i| i as usize).collect();
    assert_eq!(ids.iter().map(|&i| tokens[i]).collect::<Vec<_>>(), vec!["hello", "Ġworld"]);
    let enc = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap(), 2);
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "<|im_start|>user\nhi<|im_end|>");

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("hf").join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["chat_template"], CHATML_TEMPLATE);
    assert_eq!(cfg["add_bos_token"], false);
    assert_eq!((cfg["bos_token"].as_str(), cfg["eos_token"].as_str()), (Some("<|im_start|>"), Some("<|im_end|>")));
}
