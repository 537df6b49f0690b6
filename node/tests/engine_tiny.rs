//! The whole forward pass on tiny random models, checked against an independent f64 implementation written here
//! from the Llama equations (with Qwen2's Q/K/V biases and Qwen3's per-head Q/K norms where the model has those
//! tensors), across every tensor type, both file formats, the three architectures, GQA/MHA/MQA, tied embeddings,
//! a head size that is not `hidden / heads`, and Llama 3 RoPE scaling; and the determinism rules: shards run one
//! after another are bit-identical to the whole model, and prefill equals token-by-token decode.

use std::sync::Arc;

use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DType, Llama3Scaling};
use shardline_node::model::open::ModelFiles;
use shardline_node::model::{Architecture, LayerRange, Shard, ShardInput, ShardOptions, ShardOutput};
use shardline_node::test_models::{
    TinyDTypes, TinySpec, TinyTensor, llama3_freq_factors, tiny_tensors, write_tiny_gguf, write_tiny_hf,
};

fn backend(threads: usize) -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(threads))
}

/// Llama forward in f64 over the Hugging Face layout (NeoX RoPE); logits for every position. Q/K/V biases (Qwen2)
/// and per-head Q/K RMSNorm before RoPE (Qwen3) are applied when the model has those tensors.
fn reference_logits(spec: &TinySpec, tensors: &[TinyTensor], tokens: &[u32]) -> Vec<Vec<f64>> {
    let find = |name: &str| tensors.iter().find(|t| t.name == name);
    let get = |name: &str| -> &TinyTensor { find(name).unwrap_or_else(|| panic!("tensor {name}")) };
    let w = |name: &str| -> Vec<f64> { get(name).values.iter().map(|&v| v as f64).collect() };
    let opt = |name: &str| find(name).map(|_| w(name));
    let (h, hd, nh, nkv) = (spec.hidden, spec.head_dim(), spec.n_heads, spec.n_kv_heads);
    let eps = spec.rms_eps as f64;
    let matvec = |m: &[f64], x: &[f64], out_dim: usize| -> Vec<f64> {
        let k = x.len();
        (0..out_dim).map(|n| (0..k).map(|i| m[n * k + i] * x[i]).sum()).collect()
    };
    let rms = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter().zip(g).map(|(v, g)| v * r * g).collect()
    };
    let add_bias = |x: &mut Vec<f64>, b: &Option<Vec<f64>>| {
        if let Some(b) = b {
            x.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    };
    let head_norm = |x: &mut Vec<f64>, g: &Option<Vec<f64>>| {
        if let Some(g) = g {
            *x = x.chunks(hd).flat_map(|head| rms(head, g)).collect();
        }
    };
    let half = hd / 2;
    let mut inv_freq: Vec<f64> =
        (0..half).map(|i| 1.0 / (spec.rope_theta as f64).powf(2.0 * i as f64 / hd as f64)).collect();
    if let Some(s) = spec.llama3 {
        let f = llama3_freq_factors(spec.rope_theta, hd, &s);
        inv_freq.iter_mut().zip(f).for_each(|(v, f)| *v /= f as f64);
    }
    let rope = |x: &mut [f64], heads: usize, pos: usize| {
        for head in 0..heads {
            let v = &mut x[head * hd..(head + 1) * hd];
            for i in 0..half {
                let (s, c) = (pos as f64 * inv_freq[i]).sin_cos();
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * c - b * s;
                v[i + half] = a * s + b * c;
            }
        }
    };
    let emb = w("token_embd.weight");
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
    for l in 0..spec.n_layers {
        let p = |s: &str| format!("blk.{l}.{s}.weight");
        let (wq, wk, wv, wo) = (w(&p("attn_q")), w(&p("attn_k")), w(&p("attn_v")), w(&p("attn_output")));
        let (wg, wu, wd) = (w(&p("ffn_gate")), w(&p("ffn_up")), w(&p("ffn_down")));
        let (an, fnorm) = (w(&p("attn_norm")), w(&p("ffn_norm")));
        let b = |s: &str| opt(&format!("blk.{l}.{s}.bias"));
        let (bq, bk, bv) = (b("attn_q"), b("attn_k"), b("attn_v"));
        let (qn, kn) = (opt(&p("attn_q_norm")), opt(&p("attn_k_norm")));
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let mut qs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let hn = rms(x, &an);
            let mut q = matvec(&wq, &hn, nh * hd);
            let mut k = matvec(&wk, &hn, nkv * hd);
            let mut v = matvec(&wv, &hn, nkv * hd);
            add_bias(&mut q, &bq);
            add_bias(&mut k, &bk);
            add_bias(&mut v, &bv);
            head_norm(&mut q, &qn);
            head_norm(&mut k, &kn);
            rope(&mut q, nh, pos);
            rope(&mut k, nkv, pos);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for pos in 0..xs.len() {
            let mut att = vec![0.0; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        att[head * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&wo, &att, h);
            let x = &mut xs[pos];
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = rms(x, &fnorm);
            let g = matvec(&wg, &hn, spec.ffn);
            let u = matvec(&wu, &hn, spec.ffn);
            let a: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let d = matvec(&wd, &a, h);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
    }
    let norm = w("output_norm.weight");
    let head = if spec.tied { emb.clone() } else { w("output.weight") };
    xs.iter().map(|x| matvec(&head, &rms(x, &norm), spec.vocab)).collect()
}

/// Logits of every position from one prefill over `shards`, run one after the other.
fn run_shards(files: &ModelFiles, splits: &[LayerRange], tokens: &[u32], backend: Arc<dyn Backend>) -> Vec<f32> {
    let weights = files.weights();
    let shards: Vec<Shard> = splits
        .iter()
        .map(|r| Shard::load(weights.as_ref(), *r, backend.clone(), ShardOptions::default()).unwrap())
        .collect();
    let mut sessions: Vec<_> = shards.iter().map(|s| s.open_session(tokens.len()).unwrap()).collect();
    let mut hidden = None;
    for (shard, sess) in shards.iter().zip(sessions.iter_mut()) {
        let input = match &hidden {
            None => ShardInput::Tokens(tokens),
            Some(h) => ShardInput::Hidden(h),
        };
        match shard.forward_all_logits(sess, input).unwrap() {
            ShardOutput::Hidden(h) => hidden = Some(h),
            ShardOutput::Logits(l) => return backend.download_f32(&l).unwrap(),
        }
    }
    panic!("no logits")
}

/// ‖ours − reference‖ / ‖reference‖ over all positions.
fn relative_error(ours: &[f32], reference: &[Vec<f64>]) -> f64 {
    let flat: Vec<f64> = reference.iter().flatten().copied().collect();
    assert_eq!(ours.len(), flat.len());
    assert!(ours.iter().all(|v| v.is_finite()), "non-finite logits");
    let num: f64 = ours.iter().zip(&flat).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let den: f64 = flat.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

const TOKENS: [u32; 11] = [5, 77, 140, 3, 255, 31, 200, 9, 64, 128, 17];

fn variants() -> Vec<(&'static str, TinySpec, f64)> {
    let base = TinySpec::default();
    let mut v = vec![];
    for (name, dt, tol) in [
        ("f32", DType::F32, 1e-5),
        ("f16", DType::F16, 1e-4),
        ("bf16", DType::BF16, 1e-4),
        // Quantised weights meet activations quantised to 8 bits (as llama.cpp does): ~1% error.
        ("q8_0", DType::Q8_0, 3e-2),
        ("q4_0", DType::Q4_0, 3e-2),
        ("q4_1", DType::Q4_1, 3e-2),
    ] {
        v.push((name, TinySpec { dtypes: TinyDTypes::all(dt), ..base.clone() }, tol));
    }
    let f32s = TinyDTypes::all(DType::F32);
    v.push(("mha tied", TinySpec { n_kv_heads: 4, tied: true, dtypes: f32s, ..base.clone() }, 1e-5));
    v.push(("mqa", TinySpec { n_kv_heads: 1, dtypes: f32s, ..base.clone() }, 1e-5));
    let llama3 = Llama3Scaling { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8.0 };
    v.push((
        "llama3 rope",
        TinySpec { llama3: Some(llama3), rope_theta: 500_000.0, dtypes: f32s, ..base.clone() },
        1e-5,
    ));
    v.push((
        "like smollm2",
        TinySpec { tied: true, n_layers: 3, dtypes: TinyDTypes::like_llama_cpp(DType::Q4_1), ..base.clone() },
        3e-2,
    ));
    for (name, arch, dtypes, tol) in [
        ("qwen2 f32", Architecture::Qwen2, f32s, 1e-5),
        ("qwen2 bf16", Architecture::Qwen2, TinyDTypes::all(DType::BF16), 1e-4),
        ("qwen2 q8_0", Architecture::Qwen2, TinyDTypes::like_llama_cpp(DType::Q8_0), 3e-2),
        ("qwen3 f32", Architecture::Qwen3, f32s, 1e-5),
        ("qwen3 f16", Architecture::Qwen3, TinyDTypes::all(DType::F16), 1e-4),
        ("qwen3 q4_1", Architecture::Qwen3, TinyDTypes::like_llama_cpp(DType::Q4_1), 3e-2),
    ] {
        v.push((name, qwen(arch, dtypes), tol));
    }
    v
}

/// A tiny model of a Qwen architecture shaped like the real ones: tied embeddings and RoPE base 10⁶ (Qwen2.5's
/// small models), and for Qwen3 a head size that makes `n_heads · head_dim` twice `hidden`.
fn qwen(arch: Architecture, dtypes: TinyDTypes) -> TinySpec {
    let explicit_head_dim = (arch == Architecture::Qwen3).then_some(32);
    TinySpec { arch, tied: true, rope_theta: 1e6, rms_eps: 1e-6, explicit_head_dim, dtypes, ..TinySpec::default() }
}

#[test]
fn gguf_and_safetensors_match_an_independent_f64_forward() {
    let dir = tempfile::tempdir().unwrap();
    for (name, spec, tol) in variants() {
        let tensors = tiny_tensors(&spec).unwrap();
        let reference = reference_logits(&spec, &tensors, &TOKENS);
        let gguf = dir.path().join(format!("{}.gguf", name.replace(' ', "_")));
        let hf = dir.path().join(name.replace(' ', "_"));
        write_tiny_gguf(&spec, &gguf).unwrap();
        write_tiny_hf(&spec, &hf).unwrap();
        let full = [LayerRange::full(spec.n_layers)];
        for (format, path, tol) in [("gguf", &gguf, tol), ("safetensors", &hf, 1e-5)] {
            let files = ModelFiles::open(path).unwrap();
            let ours = run_shards(&files, &full, &TOKENS, backend(2));
            let err = relative_error(&ours, &reference);
            println!("{name:>14} {format:>11}: relative error {err:.2e} (bound {tol:.0e})");
            assert!(err < tol, "{name} via {format}: relative error {err} over {tol}");
        }
    }
}

#[test]
fn shards_run_one_after_another_are_bit_identical_to_the_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Llama, Architecture::Qwen2, Architecture::Qwen3] {
        let spec = TinySpec {
            n_layers: 4,
            dtypes: TinyDTypes::like_llama_cpp(DType::Q4_1),
            ..qwen(arch, TinyDTypes::all(DType::F32))
        };
        let path = dir.path().join(format!("{arch}.gguf"));
        write_tiny_gguf(&spec, &path).unwrap();
        let files = ModelFiles::open(&path).unwrap();
        assert_eq!(files.config().architecture, arch);
        let whole = run_shards(&files, &[LayerRange::new(0, 4)], &TOKENS, backend(2));
        for splits in [
            vec![LayerRange::new(0, 1), LayerRange::new(1, 4)],
            vec![LayerRange::new(0, 2), LayerRange::new(2, 4)],
            vec![LayerRange::new(0, 1), LayerRange::new(1, 2), LayerRange::new(2, 3), LayerRange::new(3, 4)],
        ] {
            let split = run_shards(&files, &splits, &TOKENS, backend(2));
            assert!(whole == split, "{arch}: split {splits:?} differs from the whole model");
        }
        // Thread count does not change a bit either.
        assert!(whole == run_shards(&files, &[LayerRange::new(0, 4)], &TOKENS, backend(1)), "{arch}: threads");
    }
}

#[test]
fn prefill_equals_token_by_token_decode() {
    let dir = tempfile::tempdir().unwrap();
    let archs = [Architecture::Llama, Architecture::Qwen2, Architecture::Qwen3];
    for (arch, dt) in archs.into_iter().flat_map(|a| [(a, DType::F32), (a, DType::Q4_1)]) {
        let spec = qwen(arch, TinyDTypes::all(dt));
        let path = dir.path().join(format!("{arch}-{dt}.gguf"));
        write_tiny_gguf(&spec, &path).unwrap();
        let files = ModelFiles::open(&path).unwrap();
        let b = backend(2);
        let shard =
            Shard::load(files.weights().as_ref(), LayerRange::full(spec.n_layers), b.clone(), ShardOptions::default())
                .unwrap();
        let mut s = shard.open_session(TOKENS.len()).unwrap();
        let ShardOutput::Logits(all) = shard.forward_all_logits(&mut s, ShardInput::Tokens(&TOKENS)).unwrap() else {
            panic!()
        };
        let all = b.download_f32(&all).unwrap();
        let mut s = shard.open_session(TOKENS.len()).unwrap();
        for (i, t) in TOKENS.iter().enumerate() {
            let ShardOutput::Logits(l) = shard.forward(&mut s, ShardInput::Tokens(&[*t])).unwrap() else { panic!() };
            let l = b.download_f32(&l).unwrap();
            let row = &all[i * spec.vocab..(i + 1) * spec.vocab];
            let diff = l.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff <= 1e-5, "{arch} {dt}: position {i} decode differs from prefill by {diff}");
        }
        assert_eq!(s.len(), TOKENS.len());
    }
}

#[test]
fn kv_cache_is_shared_and_returned() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(&spec, &path).unwrap();
    let files = ModelFiles::open(&path).unwrap();
    // Room for exactly 4 blocks of 16 tokens.
    let kv_w = spec.n_kv_heads * spec.head_dim();
    let opts = ShardOptions { kv_budget_bytes: 4 * 2 * spec.n_layers * 16 * kv_w * 4, block_tokens: 16 };
    let shard = Shard::load(files.weights().as_ref(), LayerRange::full(spec.n_layers), backend(1), opts).unwrap();
    assert_eq!(shard.kv_capacity_tokens(), 64);
    let a = shard.open_session(40).unwrap();
    assert_eq!(shard.free_kv_tokens(), 16);
    assert!(shard.open_session(17).is_err(), "over-commit must be refused");
    let b = shard.open_session(16).unwrap();
    drop(a);
    assert_eq!(shard.free_kv_tokens(), 48);
    drop(b);
    assert_eq!(shard.free_kv_tokens(), 64);
    // A session cannot run past what it reserved.
    let mut s = shard.open_session(4).unwrap();
    assert!(shard.forward(&mut s, ShardInput::Tokens(&[1; 17])).is_err());
}

#[test]
fn shard_loads_only_its_range_and_rejects_ranges_outside_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec { n_layers: 4, ..Default::default() };
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(&spec, &path).unwrap();
    let files = ModelFiles::open(&path).unwrap();
    let w = files.weights();
    let mid = Shard::load(w.as_ref(), LayerRange::new(1, 3), backend(1), ShardOptions::default()).unwrap();
    assert!(!mid.has_embeddings() && !mid.has_head());
    let first = Shard::load(w.as_ref(), LayerRange::new(0, 1), backend(1), ShardOptions::default()).unwrap();
    assert!(first.has_embeddings() && !first.has_head());
    let last = Shard::load(w.as_ref(), LayerRange::new(3, 4), backend(1), ShardOptions::default()).unwrap();
    assert!(!last.has_embeddings() && last.has_head());
    for bad in [LayerRange::new(2, 5), LayerRange::new(3, 3), LayerRange::new(5, 9)] {
        let err = Shard::load(w.as_ref(), bad, backend(1), ShardOptions::default()).unwrap_err();
        assert!(err.to_string().contains("layer range"), "{err}");
    }
    // Hidden states of the wrong width are an error, not a panic.
    let mut s = mid.open_session(4).unwrap();
    let bad = backend(1).upload_f32(&[1, spec.hidden + 1], &vec![0.5; spec.hidden + 1]).unwrap();
    assert!(mid.forward(&mut s, ShardInput::Hidden(&bad)).is_err());
    let mut s = first.open_session(4).unwrap();
    assert!(first.forward(&mut s, ShardInput::Tokens(&[spec.vocab as u32])).is_err(), "token outside the vocabulary");
}
