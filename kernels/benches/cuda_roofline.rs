//! CUDA kernels against the card's ceilings, printed as one table: the device-to-device copy bandwidth first, then
//! decode GEMV (f16, Q8_0, Q4_1 weights at 4096x4096, 4096x14336 and 1024x4096) as a share of it, the prefill GEMM
//! in TFLOP/s, causal prefill attention at 2048 tokens in TFLOP/s, and one decode step of a 7B-shaped stack (32 layers,
//! hidden 4096, GQA 32/8, FFN 14336, f16 weights, context 512, batch 1) eagerly and as a CUDA graph, against its
//! bandwidth roofline (weight bytes / copy bandwidth). Without a GPU it prints "skipped: no CUDA device".
//!
//! `cargo bench -p shardline-kernels --bench cuda_roofline`. Times are wall-clock means over many launches on the
//! backend's one stream, synchronised at the end; the card's name is in the first line.

use std::sync::Arc;
use std::time::Instant;

use half::f16;
use shardline_kernels::cuda::CudaBackend;
use shardline_kernels::{AttnSeq, AttnShape, Backend, DType, HostBytes, RopeConfig, RopeStyle, Tensor};

struct Row {
    what: String,
    micros: f64,
    metric: String,
}

/// Mean seconds per call of `f` after warm-up, running for about `budget` seconds.
fn time(b: &dyn Backend, budget: f64, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    b.synchronize().expect("sync");
    let t0 = Instant::now();
    f();
    b.synchronize().expect("sync");
    let once = t0.elapsed().as_secs_f64().max(1e-6);
    let iters = ((budget / once) as usize).clamp(3, 10_000);
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    b.synchronize().expect("sync");
    t0.elapsed().as_secs_f64() / iters as f64
}

/// Cheap deterministic pseudo-random f32 in [-scale, scale), never zero.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
            if v == 0.0 { scale / 2.0 } else { v }
        })
        .collect()
}

/// Random weights `[n, k]` of `dtype` in the model-file layout.
fn weights(b: &dyn Backend, dtype: DType, n: usize, k: usize, seed: u64) -> Tensor {
    let scale = 1.0 / (k as f32).sqrt();
    let bytes: Vec<u8> = match dtype {
        DType::F16 => values(n * k, seed, scale).iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        DType::Q8_0 | DType::Q4_1 => {
            let raw = values(n * k / 2, seed, 1.0);
            let mut out = Vec::with_capacity(dtype.bytes_for(n * k).expect("blocks"));
            for (i, chunk) in raw.chunks(16).enumerate() {
                out.extend_from_slice(&f16::from_f32(scale / 64.0 * (1.0 + (i % 7) as f32 / 7.0)).to_le_bytes());
                if dtype == DType::Q4_1 {
                    out.extend_from_slice(&f16::from_f32(-scale / 8.0).to_le_bytes());
                }
                let per_block = if dtype == DType::Q8_0 { 32 } else { 16 };
                out.extend((0..per_block).map(|j| (chunk[j % chunk.len()].to_bits() >> (j % 3 * 8)) as u8));
            }
            out
        }
        other => panic!("no generator for {other}"),
    };
    b.upload_weight(dtype, &[n, k], HostBytes::from_vec(bytes)).expect("upload weights")
}

fn main() {
    let cuda = match CudaBackend::new(0, DType::F16) {
        Ok(b) => b,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    let b: &dyn Backend = cuda.as_ref();
    println!("{}", b.describe());
    cuda.preload().expect("load kernels");
    let mut rows = Vec::new();

    // Ceiling 1: device-to-device copy, 1 GiB each way, counting bytes read and written.
    let cols = 4096;
    let n_rows = (1usize << 30) / (cols * 2);
    let src = b.alloc(&[n_rows, cols]).expect("alloc");
    let mut dst = b.alloc(&[n_rows, cols]).expect("alloc");
    let secs = time(b, 1.0, || b.copy_rows(&src, 0, &mut dst, 0, n_rows).expect("copy"));
    let copy_bw = 2.0 * (n_rows * cols * 2) as f64 / secs;
    rows.push(Row { what: "d2d copy 1 GiB".into(), micros: secs * 1e6, metric: format!("{:.0} GB/s", copy_bw / 1e9) });
    drop((src, dst));

    // Decode GEMV, batch 1 and 8; N = 1024 (GQA K/V projections) is split across blocks at T = 1 (split-K).
    for (n, k) in [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)] {
        for dtype in [DType::F16, DType::Q8_0, DType::Q4_1] {
            let w = weights(b, dtype, n, k, 7);
            let bytes = dtype.bytes_for(n * k).expect("blocks") as f64;
            for t in [1, 8] {
                let x = b.upload_f32(&[t, k], &values(t * k, 3, 1.0)).expect("x");
                let mut out = b.alloc(&[t, n]).expect("out");
                let secs = time(b, 0.5, || b.matmul(&x, &w, &mut out).expect("gemv"));
                let share = bytes / secs / copy_bw;
                rows.push(Row {
                    what: format!("gemv {dtype} {n}x{k} T={t}"),
                    micros: secs * 1e6,
                    metric: format!("{:.0} GB/s, {:.0}% of copy", bytes / secs / 1e9, share * 100.0),
                });
            }
        }
    }

    // Prefill GEMM.
    for dtype in [DType::F16, DType::Q4_1] {
        let (t, n, k) = (4096, 4096, 4096);
        let w = weights(b, dtype, n, k, 11);
        let x = b.upload_f32(&[t, k], &values(t * k, 5, 1.0)).expect("x");
        let mut out = b.alloc(&[t, n]).expect("out");
        let secs = time(b, 1.0, || b.matmul(&x, &w, &mut out).expect("gemm"));
        let flops = 2.0 * (t * n * k) as f64;
        rows.push(Row {
            what: format!("gemm {dtype} {t}x{n}x{k}"),
            micros: secs * 1e6,
            metric: format!("{:.1} TFLOP/s", flops / secs / 1e12),
        });
    }

    // Causal prefill attention, 2048 tokens, 32 heads over 8 KV heads of 128.
    {
        let (t, heads, kv_heads, d, bt) = (2048, 32, 8, 128, 16);
        let q = b.upload_f32(&[t, heads * d], &values(t * heads * d, 9, 1.0)).expect("q");
        let kc = b.upload_f32(&[t, kv_heads * d], &values(t * kv_heads * d, 10, 1.0)).expect("k");
        let vc = b.upload_f32(&[t, kv_heads * d], &values(t * kv_heads * d, 12, 1.0)).expect("v");
        let mut out = b.alloc(&[t, heads * d]).expect("out");
        let table: Vec<u32> = (0..(t / bt) as u32).collect();
        let seqs = [AttnSeq { rows: 0..t, pos0: 0, block_table: &table }];
        let shape = AttnShape { n_heads: heads, n_kv_heads: kv_heads, head_dim: d, block_tokens: bt, scale: 0.088 };
        let secs = time(b, 1.0, || b.attention(&q, &kc, &vc, &seqs, &shape, &mut out).expect("attention"));
        let flops = 4.0 * (t * t / 2) as f64 * d as f64 * heads as f64;
        rows.push(Row {
            what: format!("attention prefill T={t} {heads}/{kv_heads}x{d}"),
            micros: secs * 1e6,
            metric: format!("{:.1} TFLOP/s", flops / secs / 1e12),
        });
    }

    decode_step(&cuda, copy_bw, &mut rows);

    println!("\n{:<40} {:>12}  rate", "kernel", "time (us)");
    for r in &rows {
        println!("{:<40} {:>12.1}  {}", r.what, r.micros, r.metric);
    }
}

/// One decode step of a 7B-shaped stack at context 512: the ops of one Llama block, in the shard's order, on 32
/// layers that share one layer's weights (each layer's 436 MiB still streams from memory: L2 holds 50-60 MB).
fn decode_step(cuda: &Arc<CudaBackend>, copy_bw: f64, rows: &mut Vec<Row>) {
    let b: &dyn Backend = cuda.as_ref();
    let (layers, h, heads, kv_heads, d, ffn, ctx, bt) = (32, 4096, 32, 8, 128, 14336, 512, 16);
    let (qw, kvw) = (heads * d, kv_heads * d);
    let ones = |n: usize| {
        let bytes: Vec<u8> = (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect();
        b.upload_weight(DType::F32, &[n], HostBytes::from_vec(bytes)).expect("norm")
    };
    let (attn_norm, ffn_norm) = (ones(h), ones(h));
    let (wq, wk, wv, wo) = (
        weights(b, DType::F16, qw, h, 1),
        weights(b, DType::F16, kvw, h, 2),
        weights(b, DType::F16, kvw, h, 3),
        weights(b, DType::F16, h, qw, 4),
    );
    let (wg, wu, wd) =
        (weights(b, DType::F16, ffn, h, 5), weights(b, DType::F16, ffn, h, 6), weights(b, DType::F16, h, ffn, 7));
    let layer_bytes = [&wq, &wk, &wv, &wo, &wg, &wu, &wd].iter().map(|t| t.byte_len()).sum::<usize>() as f64;
    let slots = ctx + bt;
    let mut caches: Vec<(Tensor, Tensor)> = (0..layers)
        .map(|l| {
            let k = b.upload_f32(&[slots, kvw], &values(slots * kvw, 100 + l as u64, 1.0)).expect("k cache");
            let v = b.upload_f32(&[slots, kvw], &values(slots * kvw, 200 + l as u64, 1.0)).expect("v cache");
            (k, v)
        })
        .collect();
    let cfg = RopeConfig {
        head_dim: d,
        rotary_dim: d,
        theta: 500_000.0,
        style: RopeStyle::Interleaved,
        llama3: None,
        linear_factor: 1.0,
    };
    let inv_freq = b.rope_table(&cfg.inv_freq()).expect("rope table");
    let table: Vec<u32> = (0..(slots / bt) as u32).collect();
    let mut x = b.upload_f32(&[1, h], &values(h, 42, 1.0)).expect("x");
    let mut hb = b.alloc(&[1, h]).expect("h");
    let (mut q, mut k, mut v) =
        (b.alloc(&[1, qw]).expect("q"), b.alloc(&[1, kvw]).expect("k"), b.alloc(&[1, kvw]).expect("v"));
    let (mut att, mut o) = (b.alloc(&[1, qw]).expect("att"), b.alloc(&[1, h]).expect("o"));
    let (mut gate, mut up, mut act) =
        (b.alloc(&[1, ffn]).expect("g"), b.alloc(&[1, ffn]).expect("u"), b.alloc(&[1, ffn]).expect("a"));
    let shape = AttnShape {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: d,
        block_tokens: bt,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let pos = ctx as u32;
    let mut step = || -> shardline_kernels::Result<()> {
        let seqs = [AttnSeq { rows: 0..1, pos0: ctx, block_table: &table }];
        for (kc, vc) in caches.iter_mut() {
            b.rms_norm(&x, &attn_norm, 1e-5, &mut hb)?;
            b.matmul_many(&hb, &mut [(&wq, &mut q), (&wk, &mut k), (&wv, &mut v)])?;
            b.rope(&mut q, &[pos], heads, &inv_freq, &cfg)?;
            b.rope(&mut k, &[pos], kv_heads, &inv_freq, &cfg)?;
            b.kv_store(kc, vc, &k, &v, &[pos])?;
            b.attention(&q, kc, vc, &seqs, &shape, &mut att)?;
            b.matmul(&att, &wo, &mut o)?;
            b.add_rms_norm(&mut x, &o, &ffn_norm, 1e-5, &mut hb)?;
            b.matmul_swiglu(&hb, (&wg, &wu), (&mut gate, &mut up), &mut act)?;
            b.matmul(&act, &wd, &mut o)?;
            b.add(&mut x, &o)?;
        }
        Ok(())
    };
    let roofline = layers as f64 * layer_bytes / copy_bw;
    let eager = time(b, 2.0, || step().expect("decode step"));
    rows.push(Row {
        what: "7B-shaped decode step, eager".into(),
        micros: eager * 1e6,
        metric: format!(
            "{:.1} tok/s, {:.0}% of roofline ({:.0} us)",
            1.0 / eager,
            roofline / eager * 100.0,
            roofline * 1e6
        ),
    });
    match cuda.capture_step(&mut step) {
        Ok(((), mut graph)) => {
            let replay = time(b, 2.0, || cuda.replay_step(&mut graph, &mut step).expect("replay"));
            rows.push(Row {
                what: "7B-shaped decode step, CUDA graph".into(),
                micros: replay * 1e6,
                metric: format!("{:.1} tok/s, {:.0}% of roofline", 1.0 / replay, roofline / replay * 100.0),
            });
        }
        Err(e) => rows.push(Row {
            what: "7B-shaped decode step, CUDA graph".into(),
            micros: 0.0,
            metric: format!("capture failed: {e}"),
        }),
    }
}
