//! Every op of the device backends against the CPU reference backend, on fresh random inputs (never zeros), with
//! odd shapes and lengths that are not multiples of the kernels' blocks, outputs poisoned with NaN first. Each body
//! runs on the CPU (where it checks the harness itself: identical results) and, when a GPU is usable, on CUDA with
//! f16 and bf16 activations; tolerances are in `common::Device::tol`.

mod common;

use common::{Device, Rng, act, assert_close, download, poisoned, weight, weight_bytes};
use shardline_kernels::{AttnSeq, AttnShape, Backend, DType, KernelError, RopeConfig, RopeStyle, SamplingParams};

/// Every weight dtype: the CUDA backend has kernels for each format the CPU backend computes with. F32/F16/BF16 run
/// the GEMV on 16-bit activations; the quantised formats quantise the activation rows to int8 blocks of 32 first
/// (kernels/cuda/gemv_q8.cu; one row of Q8_0/Q4_0/Q4_1 inside the GEMV block, in shared memory), as the CPU backend
/// quantises them (Q8_0/Q8_1/Q8_K, kernels/src/cpu/dot/act.rs).
const CUDA_WEIGHT_DTYPES: [DType; 15] = DType::ALL;

/// Runs `f` on the device under test and on the reference.
fn both<T>(d: &Device, f: impl Fn(&dyn Backend) -> T) -> (T, T) {
    (f(d.backend.as_ref()), f(&d.reference))
}

fn embedding(d: &Device) {
    let mut rng = Rng::new(1);
    let vocab = 37;
    for dtype in CUDA_WEIGHT_DTYPES {
        let widths: &[usize] = match dtype.block_elems() {
            1 => &[40, 37],
            32 => &[96],
            _ => &[256, 512],
        };
        for &width in widths {
            let bytes = weight_bytes(&mut rng, dtype, vocab, width, 1.0);
            let mut ids: Vec<u32> = (0..11).map(|_| rng.below(vocab) as u32).collect();
            ids.push(vocab as u32 - 1);
            let (got, want) = both(d, |b| {
                let table = weight(b, dtype, &[vocab, width], &bytes);
                let mut out = poisoned(b, &[ids.len(), width]);
                b.embedding(&table, &ids, &mut out).expect("embedding");
                download(b, &out)
            });
            assert_close(&format!("{}: embedding {dtype} width {width}", d.label), &got, &want, d.tol());
        }
    }
}

fn rms_norm(d: &Device) {
    let mut rng = Rng::new(2);
    for width in [37, 576] {
        for wdt in [DType::F32, DType::F16, DType::BF16] {
            let rows = 3;
            let x = d.exact(&rng.vec(rows * width, 2.0));
            let g: Vec<f32> = (0..width).map(|_| 1.0 + rng.f32(0.5)).collect();
            let wb = weight_bytes_from(wdt, &common::round_to(wdt, &g));
            let (got, want) = both(d, |b| {
                let xt = act(b, &[rows, width], &x);
                let w = weight(b, wdt, &[width], &wb);
                let mut out = poisoned(b, &[rows, width]);
                b.rms_norm(&xt, &w, 1e-5, &mut out).expect("rms_norm");
                download(b, &out)
            });
            assert_close(&format!("{}: rms_norm width {width} weight {wdt}", d.label), &got, &want, d.tol());
        }
    }
}

fn add_rms_norm(d: &Device) {
    let mut rng = Rng::new(3);
    for width in [37, 576] {
        let rows = 5;
        let resid = d.exact(&rng.vec(rows * width, 2.0));
        let x = d.exact(&rng.vec(rows * width, 2.0));
        let g: Vec<f32> = (0..width).map(|_| 1.0 + rng.f32(0.5)).collect();
        let wb = weight_bytes_from(DType::F32, &g);
        let (got, want) = both(d, |b| {
            let mut r = act(b, &[rows, width], &resid);
            let xt = act(b, &[rows, width], &x);
            let w = weight(b, DType::F32, &[width], &wb);
            let mut out = poisoned(b, &[rows, width]);
            b.add_rms_norm(&mut r, &xt, &w, 1e-6, &mut out).expect("add_rms_norm");
            (download(b, &out), download(b, &r))
        });
        assert_close(&format!("{}: add_rms_norm out, width {width}", d.label), &got.0, &want.0, d.tol());
        assert_close(&format!("{}: add_rms_norm residual, width {width}", d.label), &got.1, &want.1, d.tol());
    }
}

/// Little-endian bytes of `v` in the plain dtype `dtype`.
fn weight_bytes_from(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        DType::BF16 => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        other => panic!("{other} is not a plain dtype"),
    }
}

fn matmul(d: &Device) {
    let mut rng = Rng::new(4);
    for dtype in CUDA_WEIGHT_DTYPES {
        // (T, N, K): decode GEMV tiles 1..8, GEMV with more rows than a tile, and tensor-core GEMM with row, column
        // and K tails; plain weights also with a K that fits no vector width (scalar path).
        // Super-block formats: K a multiple of 256, and one-row shapes long enough for split-K (T = 1, few rows).
        // Tolerance (`d.tol()`, 1e-2 of the largest output): for the formats on Q8 activations both backends round
        // every activation to 8 bits of its block's maximum (relative error <= 1/254 per value, independent signs),
        // which moves an output by ~0.3% of its scale — within the 16-bit output rounding budget.
        // The GEMM (T > 8, kernels/cuda/gemm.cu): T = 9, 64 (the 64-row variant, `gemm_small_*`), 65, 256, 300 (the
        // 128-row one), N past a 256-column tile, K past a 32-wide k-tile (plain weights), and split-K: few output
        // tiles over a long K (`gemm_plan::plan`: (9, 300, 4096) runs 16 splits, (65, 129, 4096) 8).
        let shapes: &[(usize, usize, usize)] = match dtype.block_elems() {
            1 => &[
                (1, 45, 40),
                (3, 33, 37),
                (8, 64, 64),
                (13, 45, 40),
                (130, 129, 72),
                (20, 17, 36),
                (9, 37, 264),
                (64, 300, 1000),
                (65, 129, 4096),
                (256, 257, 136),
                (300, 45, 520),
                (9, 300, 4096),
            ],
            32 => &[
                (1, 45, 96),
                (3, 33, 160),
                (8, 64, 64),
                (5, 9, 96),
                (13, 45, 96),
                (130, 129, 96),
                (1, 24, 8192),
                // One row of Q8_0/Q4_0/Q4_1 (CUDA: the in-block quantising kernels of gemv_q8.cu): split in two
                // (512 32-blocks, 3 output blocks), and a K range over their 48 KiB of shared memory (1025 blocks
                // unsplit), which falls back to gemv.cu's kernel on 16-bit activations.
                (1, 24, 16384),
                (1, 600, 32800),
                (9, 37, 288),
                (64, 300, 1024),
                (65, 129, 4096),
                (256, 257, 160),
                (300, 45, 96),
                (9, 300, 4096),
            ],
            _ => &[
                (1, 45, 256),
                (2, 17, 512),
                (3, 33, 768),
                (8, 64, 256),
                (13, 45, 256),
                (130, 129, 512),
                (1, 24, 16384),
                (9, 37, 512),
                (64, 300, 1024),
                (65, 129, 4096),
                (256, 257, 256),
                (300, 45, 512),
            ],
        };
        for &(t, n, k) in shapes {
            let x = d.exact(&rng.vec(t * k, 1.0));
            let wb = weight_bytes(&mut rng, dtype, n, k, 1.0 / (k as f32).sqrt());
            let (got, want) = both(d, |b| {
                let xt = act(b, &[t, k], &x);
                let w = weight(b, dtype, &[n, k], &wb);
                let mut out = poisoned(b, &[t, n]);
                b.matmul(&xt, &w, &mut out).expect("matmul");
                download(b, &out)
            });
            assert_close(&format!("{}: matmul {dtype} T={t} N={n} K={k}", d.label), &got, &want, d.tol());
        }
    }
}

/// The Hopper GEMM (kernels/cuda/gemm_sm90.cu; wgmma + TMA, compute capability 9.0 only) against the CPU, with
/// weights of the activation type. On CUDA the backend's self-check runs first and must pass (it compares the
/// kernel with the mma.sync GEMM on a 200 × 520 × 328 GEMM); then `WgmmaMode::Always` sends every GEMM here (tails
/// in T, N and K: a 9-row tile, N under and past a 256-column tile, K = 72 / 136 / 200 / 520 past 64-wide k-tiles,
/// K = 4096), each of which must have launched the kernel, and one shape that `Auto` itself gives to the kernel on an
/// H100/H200 (T = 768, N = 4096: one wave of 96 tiles; it prints which path ran). Other GPUs print that they skipped; the CPU checks the harness.
fn matmul_wgmma(d: &Device) {
    let wd = if d.act() == DType::BF16 { DType::BF16 } else { DType::F16 };
    #[cfg(feature = "cuda")]
    if let Some(c) = &d.cuda {
        use shardline_kernels::cuda::WgmmaStatus;
        match c.wgmma_self_check().expect("wgmma self-check") {
            WgmmaStatus::Unavailable => {
                println!("skipped: {}: the wgmma GEMM needs compute capability 9.0", d.label);
                return;
            }
            WgmmaStatus::Verified { rel_err } => println!("{}: wgmma self-check passed ({rel_err:e})", d.label),
            other => panic!("{}: the wgmma self-check did not pass: {other:?}", d.label),
        }
    }
    let mut rng = Rng::new(17);
    let shapes: [(usize, usize, usize, bool); 6] = [
        (9, 37, 72, true),
        (130, 257, 200, true),
        (160, 300, 4096, true),
        (300, 45, 520, true),
        (200, 1000, 136, true),
        (768, 4096, 128, false),
    ];
    for (t, n, k, always) in shapes {
        if !always && d.cuda.is_none() {
            continue; // the backend's own choice exists only on CUDA; the CPU harness check needs no second large case
        }
        #[cfg(feature = "cuda")]
        let before = d.cuda.as_ref().map(|c| {
            let mode = if always {
                shardline_kernels::cuda::WgmmaMode::Always
            } else {
                shardline_kernels::cuda::WgmmaMode::Auto
            };
            c.set_wgmma_mode(mode);
            c.wgmma_launches()
        });
        let x = d.exact(&rng.vec(t * k, 1.0));
        let wb = weight_bytes(&mut rng, wd, n, k, 1.0 / (k as f32).sqrt());
        let (got, want) = both(d, |b| {
            let xt = act(b, &[t, k], &x);
            let w = weight(b, wd, &[n, k], &wb);
            let mut out = poisoned(b, &[t, n]);
            b.matmul(&xt, &w, &mut out).expect("matmul");
            download(b, &out)
        });
        assert_close(&format!("{}: wgmma matmul {wd} T={t} N={n} K={k}", d.label), &got, &want, d.tol());
        #[cfg(feature = "cuda")]
        if let (Some(c), Some(before)) = (&d.cuda, before) {
            let ran = c.wgmma_launches() > before;
            // `Auto` decides by the device's SM count (one wave of 96 tiles fills an H100/H200 well enough; a
            // smaller Hopper part may keep mma.sync): only `Always` must have taken the kernel.
            assert!(ran || !always, "{}: T={t} N={n} K={k} did not run the wgmma kernel", d.label);
            println!("{}: T={t} N={n} K={k}: {}", d.label, if ran { "wgmma" } else { "mma.sync (Auto)" });
        }
        let _ = always;
    }
}

/// `a` and `b` hold the same bits (no NaN).
fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(!x.is_nan() && x.to_bits() == y.to_bits(), "{what}: element {i}: {x} vs {y}");
    }
}

/// `matmul_swiglu` (CUDA: one gate|up GEMV storing silu(gate) * up, `gemv_swiglu_*`, for T <= 8 and unsplit
/// shapes; the three ops otherwise): against the CPU within the tolerance, and on the same backend bit for bit
/// against `matmul`, `matmul`, `swiglu`. Shapes cover every route: GEMV tiles 1..8, K that fits no vector width
/// (scalar path), a one-row shape long enough for split-K, and T > 8 (GEMM).
fn matmul_swiglu(d: &Device) {
    let mut rng = Rng::new(21);
    for dtype in CUDA_WEIGHT_DTYPES {
        let shapes: &[(usize, usize, usize)] = match dtype.block_elems() {
            1 => &[(1, 45, 40), (2, 33, 64), (3, 9, 64), (8, 64, 64), (5, 9, 37), (13, 20, 40), (1, 24, 8192)],
            32 => &[(1, 45, 96), (2, 33, 160), (5, 9, 96), (8, 64, 64), (13, 20, 96), (1, 24, 8192)],
            _ => &[(1, 45, 256), (2, 17, 512), (4, 9, 256), (8, 64, 256), (13, 20, 256), (1, 24, 16384)],
        };
        for &(t, n, k) in shapes {
            let x = d.exact(&rng.vec(t * k, 1.0));
            let scale = 1.0 / (k as f32).sqrt();
            let (gb, ub) = (weight_bytes(&mut rng, dtype, n, k, scale), weight_bytes(&mut rng, dtype, n, k, scale));
            let (got, want) = both(d, |b| {
                let xt = act(b, &[t, k], &x);
                let (wg, wu) = (weight(b, dtype, &[n, k], &gb), weight(b, dtype, &[n, k], &ub));
                let (mut g, mut u, mut fused) = (poisoned(b, &[t, n]), poisoned(b, &[t, n]), poisoned(b, &[t, n]));
                b.matmul_swiglu(&xt, (&wg, &wu), (&mut g, &mut u), &mut fused).expect("matmul_swiglu");
                let mut sep = poisoned(b, &[t, n]);
                b.matmul(&xt, &wg, &mut g).expect("gate");
                b.matmul(&xt, &wu, &mut u).expect("up");
                b.swiglu(&g, &u, &mut sep).expect("swiglu");
                (download(b, &fused), download(b, &sep))
            });
            let what = format!("{}: matmul_swiglu {dtype} T={t} N={n} K={k}", d.label);
            assert_same_bits(&format!("{what} (fused vs separate ops)"), &got.0, &got.1);
            assert_close(&what, &got.0, &want.0, d.tol());
        }
    }
}

/// `matmul_many` (CUDA: one activation quantisation shared by the GEMVs on Q8 activations): against the CPU within
/// the tolerance, and bit for bit against one `matmul` per pair on the same backend; q/k/v-like output widths, a
/// third weight of another format (Q8_0, whose one-row GEMV quantises in its own blocks), split-K at T = 1, T > 8.
fn matmul_many(d: &Device) {
    let mut rng = Rng::new(22);
    for dtype in CUDA_WEIGHT_DTYPES {
        // K a multiple of every format's block; 16384 at T = 1 with 24 rows splits K for every format.
        let shapes: &[(usize, [usize; 3], usize)] = &[
            (1, [45, 17, 17], 256),
            (3, [33, 8, 8], 512),
            (8, [64, 16, 16], 256),
            (13, [20, 9, 9], 256),
            (1, [24, 24, 24], 16384),
        ];
        for &(t, ns, k) in shapes {
            let dtypes = [dtype, dtype, DType::Q8_0];
            let x = d.exact(&rng.vec(t * k, 1.0));
            let wbs: Vec<Vec<u8>> =
                (0..3).map(|i| weight_bytes(&mut rng, dtypes[i], ns[i], k, 1.0 / (k as f32).sqrt())).collect();
            let (got, want) = both(d, |b| {
                let xt = act(b, &[t, k], &x);
                let ws: Vec<_> = (0..3).map(|i| weight(b, dtypes[i], &[ns[i], k], &wbs[i])).collect();
                let mut outs: Vec<_> = ns.iter().map(|&n| poisoned(b, &[t, n])).collect();
                {
                    let [o0, o1, o2] = &mut outs[..] else { unreachable!() };
                    b.matmul_many(&xt, &mut [(&ws[0], o0), (&ws[1], o1), (&ws[2], o2)]).expect("matmul_many");
                }
                let many: Vec<Vec<f32>> = outs.iter().map(|o| download(b, o)).collect();
                let one: Vec<Vec<f32>> = (0..3)
                    .map(|i| {
                        let mut o = poisoned(b, &[t, ns[i]]);
                        b.matmul(&xt, &ws[i], &mut o).expect("matmul");
                        download(b, &o)
                    })
                    .collect();
                (many, one)
            });
            for i in 0..3 {
                let what = format!("{}: matmul_many {} (of {dtype}) T={t} N={} K={k}", d.label, dtypes[i], ns[i]);
                assert_same_bits(&format!("{what} (vs matmul)"), &got.0[i], &got.1[i]);
                assert_close(&what, &got.0[i], &want.0[i], d.tol());
            }
        }
    }
}

/// Prefill and decode of one row agree (issue 16, "Parity details"): a row computed inside a T-row GEMM equals the
/// same row computed alone by the GEMV. For Q8_0 / Q4_0 / Q4_1 both run on 16-bit activations and keep the weights
/// exact (the GEMM multiplies integer codes and applies the block scale in f32 after the `mma`, the GEMV
/// dequantises in f32), so they differ only in f32 summation order: an output may differ by one unit in the last
/// place of the activation type when its f32 values straddle a rounding boundary, which happens for a small part
/// of the outputs. (When the GEMM rounded every dequantised weight to bf16, most outputs differed.) On the CPU,
/// both are the same kernel: bit for bit. On CUDA the one-row GEMV of Q8_0 / Q4_0 / Q4_1 now runs on Q8 activations
/// (dp4a, as the CPU does; kernels/cuda/gemv_q8.cu) while the GEMM keeps 16-bit activations, so for those formats
/// decode and prefill agree within the activation rounding of the Q8 formats (`d.tol()`, as the other quantised
/// formats; docs/CUDA.md "Open"), and the decode row must also match the CPU's decode row within it.
fn matmul_prefill_matches_decode(d: &Device) {
    let mut rng = Rng::new(41);
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1, d.act()] {
        for &(t, n, k) in &[(9, 300, 4096), (65, 257, 1024), (300, 129, 512)] {
            let x = d.exact(&rng.vec(t * k, 1.0));
            let wb = weight_bytes(&mut rng, dtype, n, k, 1.0 / (k as f32).sqrt());
            let b = d.backend.as_ref();
            let w = weight(b, dtype, &[n, k], &wb);
            let mut all = poisoned(b, &[t, n]);
            b.matmul(&act(b, &[t, k], &x), &w, &mut all).expect("matmul (prefill)");
            let all = download(b, &all);
            let mut differ = 0;
            let q8_decode = d.label != "cpu" && dtype != d.act();
            for row in [0, t / 2, t - 1] {
                let mut one = poisoned(b, &[1, n]);
                b.matmul(&act(b, &[1, k], &x[row * k..(row + 1) * k]), &w, &mut one).expect("matmul (decode)");
                let one = download(b, &one);
                if q8_decode {
                    let what = format!("{}: {dtype} T={t} N={n} K={k} row {row}", d.label);
                    assert_close(&format!("{what}: prefill vs decode"), &all[row * n..(row + 1) * n], &one, d.tol());
                    let r = &d.reference;
                    let mut cpu = poisoned(r, &[1, n]);
                    let xr = act(r, &[1, k], &x[row * k..(row + 1) * k]);
                    r.matmul(&xr, &weight(r, dtype, &[n, k], &wb), &mut cpu).expect("matmul (CPU decode)");
                    assert_close(&format!("{what}: decode vs CPU"), &one, &download(r, &cpu), d.tol());
                    continue;
                }
                // One unit in the last place at |q| (and f32 summation noise where an output cancels to near 0).
                let floor = 1e-4 * one.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (j, (&p, &q)) in all[row * n..(row + 1) * n].iter().zip(&one).enumerate() {
                    let ulp = match d.act() {
                        DType::BF16 => q.abs() * 2f32.powi(-7),
                        _ => q.abs() * 2f32.powi(-10),
                    }
                    .max(floor);
                    assert!(
                        p.is_finite() && (p - q).abs() <= ulp,
                        "{}: {dtype} T={t} N={n} K={k} row {row} col {j}: \
                        prefill {p} vs decode {q}",
                        d.label
                    );
                    differ += (p != q) as usize;
                }
            }
            let total = 3 * n;
            let allowed = if d.label == "cpu" || q8_decode { 0 } else { total / 20 };
            assert!(
                differ <= allowed,
                "{}: {dtype} T={t} N={n} K={k}: {differ} of {total} outputs differ between \
                prefill and decode (at most {allowed})",
                d.label
            );
        }
    }
}

fn rope(d: &Device) {
    let mut rng = Rng::new(5);
    let (t, heads, head_dim) = (5, 3, 64);
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        for rotary_dim in [64, 32] {
            let cfg = RopeConfig { head_dim, rotary_dim, theta: 10_000.0, style, llama3: None, linear_factor: 1.0 };
            let x = d.exact(&rng.vec(t * heads * head_dim, 1.0));
            let mut positions: Vec<u32> = (0..t).map(|_| rng.below(5000) as u32).collect();
            positions[0] = 0;
            let (got, want) = both(d, |b| {
                let table = b.rope_table(&cfg.inv_freq()).expect("rope table");
                let mut xt = act(b, &[t, heads * head_dim], &x);
                b.rope(&mut xt, &positions, heads, &table, &cfg).expect("rope");
                download(b, &xt)
            });
            assert_close(&format!("{}: rope {style:?} rotary {rotary_dim}", d.label), &got, &want, d.tol());
        }
    }
}

/// The fused rope(q) + rope(k) + kv_store (one kernel on CUDA) against the three ops on the CPU: q and k rotated in
/// place, the rotated k and the v rows in their slots, every other slot untouched; GQA (3 query heads, 1 KV head),
/// both pair styles, a partial rotary dimension (the rest of each key head copied as it is).
fn rope_kv_store(d: &Device) {
    let mut rng = Rng::new(13);
    let (t, heads, kv_heads, head_dim, n_slots) = (5, 3, 1, 64, 40);
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        for rotary_dim in [64, 32] {
            let cfg = RopeConfig { head_dim, rotary_dim, theta: 10_000.0, style, llama3: None, linear_factor: 1.0 };
            let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
            let q = d.exact(&rng.vec(t * qw, 1.0));
            let k = d.exact(&rng.vec(t * kw, 1.0));
            let v = d.exact(&rng.vec(t * kw, 1.0));
            let k_init = d.exact(&rng.vec(n_slots * kw, 1.0));
            let v_init = d.exact(&rng.vec(n_slots * kw, 1.0));
            let positions: Vec<u32> = (0..t).map(|_| rng.below(5000) as u32).collect();
            let slots = rng.distinct(t, n_slots);
            let (got, want) = both(d, |b| {
                let table = b.rope_table(&cfg.inv_freq()).expect("rope table");
                let (mut qt, mut kt, vt) = (act(b, &[t, qw], &q), act(b, &[t, kw], &k), act(b, &[t, kw], &v));
                let (mut kc, mut vc) = (act(b, &[n_slots, kw], &k_init), act(b, &[n_slots, kw], &v_init));
                let caches = (&mut kc, &mut vc);
                b.rope_kv_store(&mut qt, &mut kt, &vt, &positions, (heads, kv_heads), &table, &cfg, caches, &slots)
                    .expect("rope_kv_store");
                [download(b, &qt), download(b, &kt), download(b, &kc), download(b, &vc)]
            });
            for (name, (g, w)) in ["q", "k", "k_cache", "v_cache"].iter().zip(got.iter().zip(&want)) {
                assert_close(
                    &format!("{}: rope_kv_store {name} {style:?} rotary {rotary_dim}", d.label),
                    g,
                    w,
                    d.tol(),
                );
            }
        }
    }
}

fn swiglu_and_add(d: &Device) {
    let mut rng = Rng::new(6);
    for shape in [[3usize, 347], [8, 16], [1, 5]] {
        let n = shape[0] * shape[1];
        let g = d.exact(&rng.vec(n, 4.0));
        let u = d.exact(&rng.vec(n, 2.0));
        let (got, want) = both(d, |b| {
            let (gt, ut) = (act(b, &shape, &g), act(b, &shape, &u));
            let mut out = poisoned(b, &shape);
            b.swiglu(&gt, &ut, &mut out).expect("swiglu");
            let mut acc = act(b, &shape, &g);
            b.add(&mut acc, &ut).expect("add");
            (download(b, &out), download(b, &acc))
        });
        assert_close(&format!("{}: swiglu {shape:?}", d.label), &got.0, &want.0, d.tol());
        assert_close(&format!("{}: add {shape:?}", d.label), &got.1, &want.1, d.tol());
    }
}

fn add_bias(d: &Device) {
    let mut rng = Rng::new(16);
    for (rows, width) in [(3usize, 347usize), (1, 64), (9, 5)] {
        for wdt in [DType::F32, DType::F16, DType::BF16] {
            let x = d.exact(&rng.vec(rows * width, 2.0));
            let bias = common::round_to(wdt, &rng.vec(width, 1.0));
            let wb = weight_bytes_from(wdt, &bias);
            let (got, want) = both(d, |b| {
                let mut xt = act(b, &[rows, width], &x);
                let bt = weight(b, wdt, &[width], &wb);
                b.add_bias(&mut xt, &bt).expect("add_bias");
                download(b, &xt)
            });
            assert_close(&format!("{}: add_bias [{rows}, {width}] bias {wdt}", d.label), &got, &want, d.tol());
        }
    }
}

fn copy_rows(d: &Device) {
    let mut rng = Rng::new(7);
    let width = 40;
    let src = d.exact(&rng.vec(7 * width, 1.0));
    let (got, want) = both(d, |b| {
        let s = act(b, &[7, width], &src);
        let mut dst = poisoned(b, &[9, width]);
        b.copy_rows(&s, 2, &mut dst, 5, 3).expect("copy_rows");
        download(b, &dst)
    });
    assert_close(&format!("{}: copy_rows", d.label), &got[5 * width..8 * width], &want[5 * width..8 * width], d.tol());
    let untouched = got[..5 * width].iter().chain(&got[8 * width..]);
    assert!(untouched.into_iter().all(|v| v.is_nan()), "{}: copy_rows wrote outside its rows", d.label);
}

fn kv_store(d: &Device) {
    let mut rng = Rng::new(8);
    for width in [80, 84] {
        let (n_slots, t) = (48, 5);
        let k_init = d.exact(&rng.vec(n_slots * width, 1.0));
        let v_init = d.exact(&rng.vec(n_slots * width, 1.0));
        let k = d.exact(&rng.vec(t * width, 1.0));
        let v = d.exact(&rng.vec(t * width, 1.0));
        let slots = rng.distinct(t, n_slots);
        let (got, want) = both(d, |b| {
            let (mut kc, mut vc) = (act(b, &[n_slots, width], &k_init), act(b, &[n_slots, width], &v_init));
            let (kt, vt) = (act(b, &[t, width], &k), act(b, &[t, width], &v));
            b.kv_store(&mut kc, &mut vc, &kt, &vt, &slots).expect("kv_store");
            (download(b, &kc), download(b, &vc))
        });
        assert_close(&format!("{}: kv_store k, width {width}", d.label), &got.0, &want.0, d.tol());
        assert_close(&format!("{}: kv_store v, width {width}", d.label), &got.1, &want.1, d.tol());
    }
}

/// One attention scenario: sequences as (rows, position of the first row), geometry, and paged caches whose blocks
/// are handed out in a shuffled order; cache slots outside every context hold random values that must be ignored.
fn attention_case(
    d: &Device,
    rng: &mut Rng,
    seqs: &[(usize, usize)],
    heads: usize,
    kv_heads: usize,
    dim: usize,
    bt: usize,
) {
    let rows: usize = seqs.iter().map(|s| s.0).sum();
    let blocks_per_seq: Vec<usize> = seqs.iter().map(|&(r, p)| (p + r).div_ceil(bt) + 1).collect();
    let n_blocks: usize = blocks_per_seq.iter().sum::<usize>() + 2;
    let order = rng.distinct(n_blocks, n_blocks);
    let mut tables = Vec::new();
    let mut next = 0;
    for &nb in &blocks_per_seq {
        tables.push(order[next..next + nb].to_vec());
        next += nb;
    }
    let (qw, kvw, n_slots) = (heads * dim, kv_heads * dim, n_blocks * bt);
    let q = d.exact(&rng.vec(rows * qw, 1.0));
    let kc = d.exact(&rng.vec(n_slots * kvw, 1.0));
    let vc = d.exact(&rng.vec(n_slots * kvw, 1.0));
    let shape = AttnShape {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: dim,
        block_tokens: bt,
        scale: 1.0 / (dim as f32).sqrt(),
    };
    let mut start = 0;
    let attn_seqs: Vec<AttnSeq<'_>> = seqs
        .iter()
        .zip(&tables)
        .map(|(&(r, pos0), table)| {
            let s = AttnSeq { rows: start..start + r, pos0, block_table: table };
            start += r;
            s
        })
        .collect();
    let (got, want) = both(d, |b| {
        let qt = act(b, &[rows, qw], &q);
        let (kt, vt) = (act(b, &[n_slots, kvw], &kc), act(b, &[n_slots, kvw], &vc));
        let mut out = poisoned(b, &[rows, qw]);
        b.attention(&qt, &kt, &vt, &attn_seqs, &shape, &mut out).expect("attention");
        download(b, &out)
    });
    let what = format!("{}: attention {seqs:?} heads {heads}/{kv_heads} dim {dim} block {bt}", d.label);
    assert_close(&what, &got, &want, d.tol());
}

fn attention_decode(d: &Device) {
    let mut rng = Rng::new(9);
    // One row per sequence: contexts across the 64-key split boundaries.
    attention_case(d, &mut rng, &[(1, 0), (1, 69), (1, 200)], 6, 2, 64, 16);
    attention_case(d, &mut rng, &[(1, 130), (1, 5)], 8, 8, 128, 16);
    attention_case(d, &mut rng, &[(1, 77)], 9, 1, 64, 5);
    // Head sizes whose K/V passes take more than one batch of loads (256), or leave lanes idle (40).
    attention_case(d, &mut rng, &[(1, 150), (1, 63)], 4, 2, 256, 16);
    attention_case(d, &mut rng, &[(1, 100)], 4, 2, 40, 16);
    // Many splits: the combine walks 16 split rows per block (3000 keys: 47 splits), and more than one tile of
    // 1024 split weights (70,000 keys: 1094 splits).
    attention_case(d, &mut rng, &[(1, 3000), (1, 700)], 8, 2, 128, 16);
    attention_case(d, &mut rng, &[(1, 70_000)], 2, 1, 64, 16);
}

fn attention_prefill(d: &Device) {
    let mut rng = Rng::new(10);
    // Whole prompts and chunks after a cached prefix, several sequences per call, tile tails.
    attention_case(d, &mut rng, &[(37, 0), (93, 50)], 6, 2, 64, 16);
    attention_case(d, &mut rng, &[(70, 0), (1, 40)], 4, 2, 128, 16);
    attention_case(d, &mut rng, &[(65, 3)], 9, 3, 64, 7);
    // Many K/V tiles through the two cp.async stages (330 keys: 11 tiles of 32; 270 keys: 5 tiles of 64).
    attention_case(d, &mut rng, &[(130, 200)], 4, 1, 128, 16);
    attention_case(d, &mut rng, &[(70, 200)], 4, 2, 64, 16);
    // A head size without a tensor-core kernel (per-row fallback).
    attention_case(d, &mut rng, &[(21, 0), (9, 30)], 4, 2, 40, 5);
}

fn sample(d: &Device) {
    let mut rng = Rng::new(11);
    let params = [
        SamplingParams::GREEDY,
        SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3 },
        SamplingParams { temperature: 0.7, top_k: 40, top_p: 1.0, seed: 4 },
        SamplingParams { temperature: 0.9, top_k: 0, top_p: 0.9, seed: 5 },
        SamplingParams { temperature: 1.3, top_k: 7, top_p: 0.5, seed: 6 },
        SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.0, seed: 7 },
    ];
    // 1003: row 1 starts 2006 bytes in, so the kernels' unaligned (scalar) path; 128,256: Llama 3's vocabulary.
    for vocab in [1003usize, 128_256] {
        for (coarse, nan) in [(false, false), (true, false), (true, true)] {
            let mut logits = rng.vec(2 * vocab, 6.0);
            if coarse {
                // Many exact ties: ranks break them by the lower token id.
                logits.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0 + 0.25);
            }
            if nan {
                // A NaN (or an infinity) anywhere in the row: both backends refuse to draw, naming how many.
                logits.iter_mut().step_by(7).for_each(|v| *v = f32::NAN);
                logits[vocab + 3] = f32::INFINITY;
            }
            let logits = d.exact(&logits);
            if nan {
                let (got, want) = both(d, |b| {
                    let l = act(b, &[2, vocab], &logits);
                    match b.sample(&l, 1, &params[1], 0, 5) {
                        Err(KernelError::NonFiniteLogits { nan, infinite, vocab, first }) => {
                            (nan, infinite, vocab, first)
                        }
                        other => panic!("{}: a row with NaN logits gave {other:?}", d.label),
                    }
                });
                assert_eq!(got, want, "{}: vocab {vocab}, the refused row's counts", d.label);
                continue;
            }
            for p in &params {
                for (position, n_top) in [(0u64, 5usize), (9, 0), (1 << 33, 256)] {
                    let (got, want) = both(d, |b| {
                        let l = act(b, &[2, vocab], &logits);
                        b.sample(&l, 1, p, position, n_top).expect("sample")
                    });
                    let what = format!("{}: vocab {vocab}, sample {p:?} at {position}, coarse {coarse}", d.label);
                    assert_eq!(got.token, want.token, "{what}: token");
                    assert_eq!(
                        got.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                        want.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                        "{what}: top ids"
                    );
                    assert!(
                        (got.logprob - want.logprob).abs() <= 1e-3,
                        "{what}: logprob {} vs {}",
                        got.logprob,
                        want.logprob
                    );
                    for (g, w) in got.top.iter().zip(&want.top) {
                        let same = (g.1 - w.1).abs() <= 1e-3 || (g.1 == w.1);
                        assert!(same, "{what}: top logprob {} vs {}", g.1, w.1);
                    }
                }
            }
        }
    }
}

fn transfers(d: &Device) {
    let mut rng = Rng::new(12);
    let shape = [3, 13];
    let x = d.exact(&rng.vec(39, 3.0));
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let wire = common::round_to(dtype, &x);
        let bytes = weight_bytes_from(dtype, &wire);
        let (got, want) = both(d, |b| {
            let t = b.upload_raw(&shape, dtype, &bytes).expect("upload_raw");
            let raw = b.download_raw(&t, dtype).expect("download_raw");
            assert_eq!(raw.len(), bytes.len(), "download_raw length");
            download(b, &t)
        });
        assert_close(&format!("{}: upload_raw/download {dtype}", d.label), &got, &want, d.tol());
    }
}

device_tests!(
    embedding,
    rms_norm,
    add_rms_norm,
    matmul,
    matmul_swiglu,
    matmul_many,
    matmul_prefill_matches_decode,
    matmul_wgmma,
    rope,
    rope_kv_store,
    swiglu_and_add,
    add_bias,
    copy_rows,
    kv_store,
    attention_decode,
    attention_prefill,
    sample,
    transfers,
);
