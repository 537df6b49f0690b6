//! CPU ops of a Llama block against naive f64 implementations, plus shape errors and transfer round trips.

mod cpu_common;

use cpu_common::*;
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{AttnSeq, AttnShape, Backend, DType, KernelError, RopeConfig, RopeStyle, Tensor, quant};

fn rms_reference(x: &[f32], w: &[f32], eps: f32, width: usize) -> Vec<f64> {
    x.chunks(width)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
            let s = 1.0 / (ms + eps as f64).sqrt();
            row.iter().zip(w).map(move |(&v, &g)| v as f64 * s * g as f64)
        })
        .collect()
}

#[test]
fn rms_norm_matches_f64() {
    let mut rng = Rng::new(21);
    for threads in [1, 2] {
        let be = CpuBackend::new(threads);
        for (rows, width) in [(5, 96), (1, 576), (300, 577)] {
            let x = rng.vec(rows * width, 3.0);
            let w = rng.vec(width, 1.5);
            for wdtype in [DType::F32, DType::F16] {
                let wt = weight_unaligned(&be, wdtype, &[width], &w);
                let stored = dequantised(wdtype, &w);
                let mut out = be.alloc(&[rows, width]).unwrap();
                be.rms_norm(&act(&be, &[rows, width], &x), &wt, 1e-5, &mut out).unwrap();
                let want = rms_reference(&x, &stored, 1e-5, width);
                assert_close("rms_norm", &be.download_f32(&out).unwrap(), &want, Tol::Elem { abs: 1e-7, rel: 1e-6 });
            }
        }
    }
}

#[test]
fn add_rms_norm_adds_then_normalises() {
    let mut rng = Rng::new(22);
    let be = CpuBackend::new(2);
    let (rows, width) = (7, 160);
    let r0 = rng.vec(rows * width, 2.0);
    let x = rng.vec(rows * width, 2.0);
    let w = rng.vec(width, 1.0);
    let mut residual = act(&be, &[rows, width], &r0);
    let mut out = be.alloc(&[rows, width]).unwrap();
    be.add_rms_norm(
        &mut residual,
        &act(&be, &[rows, width], &x),
        &weight(&be, DType::F32, &[width], &w),
        1e-6,
        &mut out,
    )
    .unwrap();
    let sum: Vec<f32> = r0.iter().zip(&x).map(|(a, b)| a + b).collect();
    assert_eq!(bits(&be.download_f32(&residual).unwrap()), bits(&sum));
    assert_close(
        "add_rms_norm",
        &be.download_f32(&out).unwrap(),
        &rms_reference(&sum, &w, 1e-6, width),
        Tol::Elem { abs: 1e-7, rel: 1e-6 },
    );
}

fn rope_reference(x: &[f32], positions: &[u32], n_heads: usize, cfg: &RopeConfig, inv: &[f32]) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let (hd, rd) = (cfg.head_dim, cfg.rotary_dim);
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let base = t * n_heads * hd + h * hd;
            for (i, &f) in inv.iter().enumerate() {
                let theta = (pos as f32 * f) as f64; // the angle is defined in f32
                let (a, b) = match cfg.style {
                    RopeStyle::Interleaved => (base + 2 * i, base + 2 * i + 1),
                    RopeStyle::Neox => (base + i, base + i + rd / 2),
                };
                let (x0, x1) = (x[a] as f64, x[b] as f64);
                out[a] = x0 * theta.cos() - x1 * theta.sin();
                out[b] = x0 * theta.sin() + x1 * theta.cos();
            }
        }
    }
    out
}

#[test]
fn rope_matches_f64_for_both_styles_and_partial_rotation() {
    let mut rng = Rng::new(23);
    for threads in [1, 2] {
        let be = CpuBackend::new(threads);
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            for (head_dim, rotary_dim, n_heads, rows) in [(64, 64, 9, 5), (16, 8, 3, 4), (32, 20, 2, 600)] {
                let cfg = RopeConfig { head_dim, rotary_dim, theta: 10_000.0, style, llama3: None, linear_factor: 1.0 };
                let inv = cfg.inv_freq();
                let table = be.rope_table(&inv).unwrap();
                let positions: Vec<u32> = (0..rows).map(|_| rng.below(5000) as u32).collect();
                let x = rng.vec(rows * n_heads * head_dim, 2.0);
                let mut xt = act(&be, &[rows, n_heads * head_dim], &x);
                be.rope(&mut xt, &positions, n_heads, &table, &cfg).unwrap();
                let got = be.download_f32(&xt).unwrap();
                let want = rope_reference(&x, &positions, n_heads, &cfg, &inv);
                assert_close(
                    &format!("rope {style:?} {head_dim}/{rotary_dim}"),
                    &got,
                    &want,
                    Tol::Elem { abs: 1e-6, rel: 1e-6 },
                );
                // Dimensions past rotary_dim are untouched.
                for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
                    let d = i % head_dim;
                    let rotated = d < rotary_dim;
                    if !rotated {
                        assert_eq!(g.to_bits(), v.to_bits());
                    }
                }
            }
        }
    }
}

/// The backend keeps the last call's angles (every layer of a step rotates the same positions): a call with other
/// positions, or the same positions and other frequencies, must not be served the old angles.
#[test]
fn rope_angles_follow_positions_and_frequencies_from_call_to_call() {
    let mut rng = Rng::new(25);
    let be = CpuBackend::new(2);
    let (head_dim, n_heads, rows) = (64, 3, 7);
    let cfg = |theta: f32| RopeConfig {
        head_dim,
        rotary_dim: head_dim,
        theta,
        style: RopeStyle::Neox,
        llama3: None,
        linear_factor: 1.0,
    };
    let positions: Vec<u32> = (0..rows).map(|_| rng.below(5000) as u32).collect();
    let mut moved = positions.clone();
    moved[3] += 1;
    let x = rng.vec(rows * n_heads * head_dim, 2.0);
    for (theta, pos) in [(10_000.0, &positions), (10_000.0, &positions), (500_000.0, &positions), (10_000.0, &moved)] {
        let c = cfg(theta);
        let inv = c.inv_freq();
        let table = be.rope_table(&inv).unwrap();
        let mut xt = act(&be, &[rows, n_heads * head_dim], &x);
        be.rope(&mut xt, pos, n_heads, &table, &c).unwrap();
        let want = rope_reference(&x, pos, n_heads, &c, &inv);
        assert_close(
            &format!("rope theta {theta}"),
            &be.download_f32(&xt).unwrap(),
            &want,
            Tol::Elem { abs: 1e-6, rel: 1e-6 },
        );
    }
}

#[test]
fn swiglu_add_and_copy_rows_match_definitions() {
    let mut rng = Rng::new(24);
    let be = CpuBackend::new(2);
    for n in [37, 1536, 300_001] {
        let g = rng.vec(n, 8.0);
        let u = rng.vec(n, 2.0);
        let mut out = be.alloc(&[n]).unwrap();
        be.swiglu(&act(&be, &[n], &g), &act(&be, &[n], &u), &mut out).unwrap();
        let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64).collect();
        assert_close("swiglu", &be.download_f32(&out).unwrap(), &want, Tol::Elem { abs: 1e-7, rel: 2e-6 });

        let mut acc = act(&be, &[n], &g);
        be.add(&mut acc, &act(&be, &[n], &u)).unwrap();
        let sum: Vec<f32> = g.iter().zip(&u).map(|(a, b)| a + b).collect();
        assert_eq!(bits(&be.download_f32(&acc).unwrap()), bits(&sum));
    }
    let src_v = rng.vec(6 * 5, 1.0);
    let src = act(&be, &[6, 5], &src_v);
    let mut dst = act(&be, &[4, 5], &[9.0; 20]);
    be.copy_rows(&src, 3, &mut dst, 1, 2).unwrap();
    let d = be.download_f32(&dst).unwrap();
    assert_eq!(&d[5..15], &src_v[15..25]);
    assert_eq!(&d[..5], &[9.0; 5]);
    assert_eq!(&d[15..], &[9.0; 5]);
    assert!(be.copy_rows(&src, 5, &mut dst, 0, 2).is_err());
    assert!(be.copy_rows(&src, 0, &mut dst, 3, 2).is_err());
    assert!(be.copy_rows(&src, usize::MAX, &mut dst, 0, 2).is_err());
    let mut narrow = be.alloc(&[4, 4]).unwrap();
    assert!(be.copy_rows(&src, 0, &mut narrow, 0, 1).is_err());
}

/// `split_rows` hands consecutive rows out to several tensors, on one thread or the pool's (16 rows of a 49,152-wide
/// vocabulary, as a batched step's logits), exactly as `copy_rows` would; a part that does not fit is refused before
/// anything is written.
#[test]
fn split_rows_copies_each_part_and_refuses_one_that_does_not_fit() {
    let mut rng = Rng::new(28);
    for (rows, width, sizes) in [(6, 5, vec![1usize, 3, 2]), (16, 49_152, vec![1; 16]), (5, 7, vec![2, 1])] {
        for threads in [1, 2] {
            let be = CpuBackend::new(threads);
            let src_v = rng.vec(rows * width, 1.0);
            let src = act(&be, &[rows, width], &src_v);
            let mut outs: Vec<_> = sizes.iter().map(|&n| act(&be, &[n, width], &vec![7.0; n * width])).collect();
            let mut starts = Vec::new();
            let mut at = 0;
            for &n in &sizes {
                starts.push(at);
                at += n;
            }
            let mut parts: Vec<(usize, &mut Tensor)> = starts.iter().copied().zip(outs.iter_mut()).collect();
            be.split_rows(&src, &mut parts).unwrap();
            for (&s, out) in starts.iter().zip(&outs) {
                let n = out.rows();
                assert_eq!(bits(&be.download_f32(out).unwrap()), bits(&src_v[s * width..(s + n) * width]));
            }
            // One part past the end: an error, and the parts before it untouched.
            let mut a = act(&be, &[1, width], &vec![7.0; width]);
            let mut b = act(&be, &[2, width], &vec![7.0; 2 * width]);
            let mut bad: Vec<(usize, &mut Tensor)> = vec![(0, &mut a), (rows - 1, &mut b)];
            assert!(be.split_rows(&src, &mut bad).is_err());
            assert_eq!(be.download_f32(&a).unwrap(), vec![7.0; width]);
            let mut narrow = be.alloc(&[1, width + 1]).unwrap();
            assert!(be.split_rows(&src, &mut [(0, &mut narrow)]).is_err());
        }
    }
}

#[test]
fn add_bias_adds_the_bias_to_every_row() {
    let mut rng = Rng::new(26);
    let be = CpuBackend::new(2);
    for (rows, width) in [(1usize, 7usize), (5, 896), (700, 1024)] {
        let x = rng.vec(rows * width, 4.0);
        let bias = rng.vec(width, 1.0);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let stored = dequantised(dtype, &bias);
            let mut xt = act(&be, &[rows, width], &x);
            be.add_bias(&mut xt, &weight(&be, dtype, &[width], &bias)).unwrap();
            let want: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v + stored[i % width]).collect();
            assert_eq!(bits(&be.download_f32(&xt).unwrap()), bits(&want), "{dtype} [{rows}, {width}]");
        }
    }
    let mut xt = act(&be, &[2, 8], &[1.0; 16]);
    assert!(matches!(be.add_bias(&mut xt, &weight(&be, DType::F32, &[7], &[1.0; 7])), Err(KernelError::Shape { .. })));
}

#[test]
fn embedding_gathers_rows_of_any_dtype() {
    let mut rng = Rng::new(25);
    let be = CpuBackend::new(1);
    let (vocab, width) = (50, 64);
    let table_v = rng.vec(vocab * width, 1.0);
    let ids = [3u32, 49, 0, 3, 17];
    for dtype in DType::ENCODABLE {
        let table = weight_unaligned(&be, dtype, &[vocab, width], &table_v);
        let stored = dequantised(dtype, &table_v);
        let mut out = be.alloc(&[ids.len(), width]).unwrap();
        be.embedding(&table, &ids, &mut out).unwrap();
        let got = be.download_f32(&out).unwrap();
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert_eq!(bits(&got[t * width..(t + 1) * width]), bits(&stored[id * width..(id + 1) * width]), "{dtype}");
        }
        assert!(be.embedding(&table, &[50], &mut be.alloc(&[1, width]).unwrap()).is_err(), "{dtype} id past vocab");
        assert!(be.embedding(&table, &[1, 2], &mut be.alloc(&[1, width]).unwrap()).is_err(), "{dtype} out rows");
    }
}

#[test]
fn kv_store_writes_slots_and_refuses_bad_ones_without_writing() {
    let mut rng = Rng::new(26);
    let be = CpuBackend::new(1);
    let (slots_n, width) = (16, 12);
    let mut kc = be.upload_f32(&[slots_n, width], &vec![0.0; slots_n * width]).unwrap();
    let mut vc = be.upload_f32(&[slots_n, width], &vec![0.0; slots_n * width]).unwrap();
    let k = rng.vec(3 * width, 1.0);
    let v = rng.vec(3 * width, 1.0);
    let (kt, vt) = (act(&be, &[3, width], &k), act(&be, &[3, width], &v));
    be.kv_store(&mut kc, &mut vc, &kt, &vt, &[7, 0, 15]).unwrap();
    let (kd, vd) = (be.download_f32(&kc).unwrap(), be.download_f32(&vc).unwrap());
    for (t, slot) in [7usize, 0, 15].into_iter().enumerate() {
        assert_eq!(&kd[slot * width..(slot + 1) * width], &k[t * width..(t + 1) * width]);
        assert_eq!(&vd[slot * width..(slot + 1) * width], &v[t * width..(t + 1) * width]);
    }
    let before = be.download_f32(&kc).unwrap();
    let err = be.kv_store(&mut kc, &mut vc, &kt, &vt, &[1, 2, 16]).unwrap_err();
    assert!(matches!(err, KernelError::KvSlot { slot: 16, capacity: 16 }));
    assert_eq!(be.download_f32(&kc).unwrap(), before);
    assert!(be.kv_store(&mut kc, &mut vc, &kt, &vt, &[1, 2]).is_err());
}

/// A paged cache filled for several sequences, with each sequence's blocks scattered over the pool.
#[derive(Clone)]
struct PagedCase {
    shape: AttnShape,
    k: Vec<f32>,
    v: Vec<f32>,
    n_slots: usize,
    tables: Vec<Vec<u32>>,
}

impl PagedCase {
    fn new(rng: &mut Rng, shape: AttnShape, lens: &[usize], pool_blocks: usize) -> Self {
        let kv_width = shape.n_kv_heads * shape.head_dim;
        let n_slots = pool_blocks * shape.block_tokens;
        let mut free: Vec<u32> = (0..pool_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.below(i + 1));
        }
        let tables = lens
            .iter()
            .map(|&len| (0..len.div_ceil(shape.block_tokens)).map(|_| free.pop().expect("pool large enough")).collect())
            .collect();
        Self { shape, k: rng.vec(n_slots * kv_width, 1.0), v: rng.vec(n_slots * kv_width, 1.0), n_slots, tables }
    }

    /// f64 attention of one query row at `pos` of sequence `s`.
    fn reference(&self, q: &[f32], s: usize, pos: usize) -> Vec<f64> {
        let sh = &self.shape;
        let (hd, kvw) = (sh.head_dim, sh.n_kv_heads * sh.head_dim);
        let group = sh.n_heads / sh.n_kv_heads;
        let slot = |p: usize| self.tables[s][p / sh.block_tokens] as usize * sh.block_tokens + p % sh.block_tokens;
        let mut out = vec![0.0; sh.n_heads * hd];
        for h in 0..sh.n_heads {
            let kvh = h / group;
            let scores: Vec<f64> = (0..=pos)
                .map(|p| {
                    let k = &self.k[slot(p) * kvw + kvh * hd..][..hd];
                    q[h * hd..(h + 1) * hd].iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                        * sh.scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (p, s) in scores.iter().enumerate() {
                let w = (s - max).exp() / z;
                let v = &self.v[slot(p) * kvw + kvh * hd..][..hd];
                for d in 0..hd {
                    out[h * hd + d] += w * v[d] as f64;
                }
            }
        }
        out
    }

    fn caches(&self, be: &CpuBackend) -> (Tensor, Tensor) {
        let kvw = self.shape.n_kv_heads * self.shape.head_dim;
        (act(be, &[self.n_slots, kvw], &self.k), act(be, &[self.n_slots, kvw], &self.v))
    }
}

fn gqa_shape(n_heads: usize, n_kv_heads: usize, head_dim: usize, block_tokens: usize) -> AttnShape {
    AttnShape { n_heads, n_kv_heads, head_dim, block_tokens, scale: 1.0 / (head_dim as f32).sqrt() }
}

#[test]
fn attention_matches_f64_over_a_paged_cache_with_several_sequences() {
    let mut rng = Rng::new(27);
    for (shape, lens, q_rows) in [
        (gqa_shape(9, 3, 64, 16), vec![40usize, 7, 100], [3usize, 7, 1]),
        (gqa_shape(4, 4, 8, 4), vec![5, 9, 2], [5, 1, 2]),
        (gqa_shape(6, 1, 16, 32), vec![300, 33, 64], [64, 2, 1]),
        // Long contexts: several position chunks per row, one decoded row each.
        (gqa_shape(9, 3, 64, 16), vec![1000, 513, 257], [1, 1, 2]),
    ] {
        let case = PagedCase::new(&mut rng, shape, &lens, 120);
        let width = shape.n_heads * shape.head_dim;
        let total: usize = q_rows.iter().sum();
        let q = rng.vec(total * width, 1.0);
        // Sequence s owns q rows [start, start + q_rows[s]) at the last positions of its length.
        let mut seqs = Vec::new();
        let mut start = 0;
        for (s, (&len, &n)) in lens.iter().zip(&q_rows).enumerate() {
            seqs.push(AttnSeq { rows: start..start + n, pos0: len - n, block_table: &case.tables[s] });
            start += n;
        }
        let mut first: Option<Vec<u32>> = None;
        // Every SIMD level (the scalar code first) and thread count gives the same bits.
        let backends = shardline_kernels::cpu::SimdLevel::ALL
            .into_iter()
            .flat_map(|level| [1, 2, 3].map(|threads| (level, threads)))
            .filter_map(|(level, threads)| Some((threads, CpuBackend::with_simd(threads, level)?)));
        for (threads, be) in backends {
            let (kc, vc) = case.caches(&be);
            let mut out = be.alloc(&[total, width]).unwrap();
            be.attention(&act(&be, &[total, width], &q), &kc, &vc, &seqs, &shape, &mut out).unwrap();
            let got = be.download_f32(&out).unwrap();
            match &first {
                None => first = Some(bits(&got)),
                Some(f) => assert_eq!(f, &bits(&got), "{}, {threads} threads", be.simd_level()),
            }
            for (s, seq) in seqs.iter().enumerate() {
                for (i, row) in seq.rows.clone().enumerate() {
                    let want = case.reference(&q[row * width..(row + 1) * width], s, seq.pos0 + i);
                    assert_close(
                        "attention",
                        &got[row * width..(row + 1) * width],
                        &want,
                        Tol::Elem { abs: 2e-6, rel: 1e-5 },
                    );
                }
            }
            // Each sequence alone, in its own call with only its rows, gives the same bits.
            for (s, seq) in seqs.iter().enumerate() {
                let n = seq.rows.len();
                let q_alone = &q[seq.rows.start * width..seq.rows.end * width];
                let alone = [AttnSeq { rows: 0..n, pos0: seq.pos0, block_table: &case.tables[s] }];
                let mut out1 = be.alloc(&[n, width]).unwrap();
                be.attention(&act(&be, &[n, width], q_alone), &kc, &vc, &alone, &shape, &mut out1).unwrap();
                assert_eq!(
                    bits(&be.download_f32(&out1).unwrap()),
                    bits(&got[seq.rows.start * width..seq.rows.end * width]),
                    "sequence {s} alone"
                );
            }
        }
    }
}

/// An f16 KV cache (`CpuBackend::with_kv_dtype`): keys and values stored rounded to f16, the query and the softmax
/// weights rounded to f16 as llama.cpp does; against f64 attention over the rounded keys, values and query, and
/// bit-identical over thread counts, SIMD levels and whatever else is in the call.
#[test]
fn attention_over_an_f16_cache_rounds_like_llama_cpp_and_is_deterministic() {
    use shardline_kernels::cpu::SimdLevel;
    let r16 = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect::<Vec<f32>>();
    let mut rng = Rng::new(29);
    for (shape, lens, q_rows) in [
        (gqa_shape(9, 3, 64, 16), vec![40usize, 7, 100], [3usize, 7, 1]),
        (gqa_shape(6, 1, 16, 32), vec![300, 33, 64], [64, 2, 1]),
        (gqa_shape(9, 3, 64, 16), vec![1000, 513, 257], [1, 1, 2]),
    ] {
        let case = PagedCase::new(&mut rng, shape, &lens, 120);
        let kvw = shape.n_kv_heads * shape.head_dim;
        let width = shape.n_heads * shape.head_dim;
        let total: usize = q_rows.iter().sum();
        let q = rng.vec(total * width, 1.0);
        let mut seqs = Vec::new();
        let mut start = 0;
        for (s, (&len, &n)) in lens.iter().zip(&q_rows).enumerate() {
            seqs.push(AttnSeq { rows: start..start + n, pos0: len - n, block_table: &case.tables[s] });
            start += n;
        }
        // The f64 reference sees what the f16 cache holds and the rounded query.
        let rounded = PagedCase { k: r16(&case.k), v: r16(&case.v), ..case.clone() };
        let q16 = r16(&q);
        let mut first: Option<Vec<u32>> = None;
        for level in SimdLevel::ALL {
            for threads in [1, 2, 3] {
                let Some(be) = CpuBackend::with_simd(threads, level) else { continue };
                let be = be.with_kv_dtype(DType::F16).unwrap();
                assert_eq!(be.kv_dtype(), DType::F16);
                let mut kc = be.alloc_kv(&[case.n_slots, kvw]).unwrap();
                let mut vc = be.alloc_kv(&[case.n_slots, kvw]).unwrap();
                assert_eq!((kc.dtype(), kc.byte_len()), (DType::F16, case.n_slots * kvw * 2));
                let slots: Vec<u32> = (0..case.n_slots as u32).collect();
                let (k, v) = case.caches(&be);
                be.kv_store(&mut kc, &mut vc, &k, &v, &slots).unwrap();
                assert_eq!(bits(&be.download_f32(&kc).unwrap()), bits(&rounded.k), "stored keys are the f16 values");
                let mut out = be.alloc(&[total, width]).unwrap();
                be.attention(&act(&be, &[total, width], &q), &kc, &vc, &seqs, &shape, &mut out).unwrap();
                let got = be.download_f32(&out).unwrap();
                match &first {
                    None => {
                        for (s, seq) in seqs.iter().enumerate() {
                            for (i, row) in seq.rows.clone().enumerate() {
                                let want = rounded.reference(&q16[row * width..(row + 1) * width], s, seq.pos0 + i);
                                // Each weight is rounded to f16 (relative error at most 2^-11) before the value
                                // sum: the output moves by at most 2^-11 · max |v| = 4.9e-4 (values within ±1).
                                assert_close(
                                    "attention f16",
                                    &got[row * width..(row + 1) * width],
                                    &want,
                                    Tol::Elem { abs: 5e-4, rel: 1e-5 },
                                );
                            }
                        }
                        first = Some(bits(&got));
                    }
                    Some(f) => assert_eq!(f, &bits(&got), "{level:?}, {threads} threads"),
                }
                for (s, seq) in seqs.iter().enumerate() {
                    let n = seq.rows.len();
                    let q_alone = &q[seq.rows.start * width..seq.rows.end * width];
                    let alone = [AttnSeq { rows: 0..n, pos0: seq.pos0, block_table: &case.tables[s] }];
                    let mut out1 = be.alloc(&[n, width]).unwrap();
                    be.attention(&act(&be, &[n, width], q_alone), &kc, &vc, &alone, &shape, &mut out1).unwrap();
                    assert_eq!(
                        bits(&be.download_f32(&out1).unwrap()),
                        bits(&got[seq.rows.start * width..seq.rows.end * width]),
                        "sequence {s} alone"
                    );
                }
                // An f32 cache is not an f16 one: mixing them is refused, not misread.
                let (k32, _) = case.caches(&be);
                assert!(be.attention(&act(&be, &[total, width], &q), &k32, &vc, &seqs, &shape, &mut out).is_err());
            }
        }
    }
    assert!(CpuBackend::new(1).with_kv_dtype(DType::Q8_0).is_err(), "only f32 and f16 caches");
}

#[test]
fn attention_refuses_bad_calls() {
    let mut rng = Rng::new(28);
    let shape = gqa_shape(4, 2, 8, 4);
    let case = PagedCase::new(&mut rng, shape, &[8, 8], 4);
    let be = CpuBackend::new(1);
    let (kc, vc) = case.caches(&be);
    let q = act(&be, &[4, 32], &rng.vec(128, 1.0));
    let mut out = be.alloc(&[4, 32]).unwrap();
    let ok = [AttnSeq { rows: 0..2, pos0: 6, block_table: &case.tables[0] }];
    be.attention(&q, &kc, &vc, &ok, &shape, &mut out).unwrap();

    let short = [AttnSeq { rows: 0..2, pos0: 7, block_table: &case.tables[0] }];
    assert!(be.attention(&q, &kc, &vc, &short, &shape, &mut out).is_err(), "position past the block table");
    let overlap = [
        AttnSeq { rows: 0..3, pos0: 0, block_table: &case.tables[0] },
        AttnSeq { rows: 2..4, pos0: 0, block_table: &case.tables[1] },
    ];
    assert!(be.attention(&q, &kc, &vc, &overlap, &shape, &mut out).is_err(), "overlapping rows");
    let outside = [AttnSeq { rows: 3..5, pos0: 0, block_table: &case.tables[0] }];
    assert!(be.attention(&q, &kc, &vc, &outside, &shape, &mut out).is_err(), "rows past q");
    let far = [9u32];
    let bad_block = [AttnSeq { rows: 0..1, pos0: 0, block_table: &far }];
    assert!(matches!(be.attention(&q, &kc, &vc, &bad_block, &shape, &mut out), Err(KernelError::KvSlot { .. })));
    let uneven = gqa_shape(3, 2, 8, 4);
    let q3 = act(&be, &[4, 24], &rng.vec(96, 1.0));
    let mut out3 = be.alloc(&[4, 24]).unwrap();
    assert!(be.attention(&q3, &kc, &vc, &ok, &uneven, &mut out3).is_err(), "heads not a multiple of kv heads");
    let mut wrong_out = be.alloc(&[3, 32]).unwrap();
    assert!(be.attention(&q, &kc, &vc, &ok, &shape, &mut wrong_out).is_err(), "out shape");
}

#[test]
fn shape_and_dtype_errors_are_typed() {
    let be = CpuBackend::new(1);
    let x = act(&be, &[2, 8], &[1.0; 16]);
    let mut out = be.alloc(&[2, 8]).unwrap();
    let w7 = weight(&be, DType::F32, &[7], &[1.0; 7]);
    assert!(matches!(be.rms_norm(&x, &w7, 1e-5, &mut out), Err(KernelError::Shape { .. })));
    let mut out_bad = be.alloc(&[2, 7]).unwrap();
    assert!(be.swiglu(&x, &x, &mut out_bad).is_err());
    let mut acc = be.alloc(&[16]).unwrap();
    assert!(be.add(&mut acc, &x).is_err());

    let cfg =
        RopeConfig { head_dim: 4, rotary_dim: 4, theta: 1e4, style: RopeStyle::Neox, llama3: None, linear_factor: 1.0 };
    let table = be.rope_table(&cfg.inv_freq()).unwrap();
    let mut xr = act(&be, &[2, 8], &[1.0; 16]);
    assert!(be.rope(&mut xr, &[0], 2, &table, &cfg).is_err(), "one position for two rows");
    assert!(be.rope(&mut xr, &[0, 1], 3, &table, &cfg).is_err(), "width is not n_heads · head_dim");
    let odd = RopeConfig { rotary_dim: 3, ..cfg };
    assert!(be.rope(&mut xr, &[0, 1], 2, &table, &odd).is_err(), "odd rotary_dim");
    let wide = RopeConfig { rotary_dim: 6, ..cfg };
    assert!(be.rope(&mut xr, &[0, 1], 2, &table, &wide).is_err(), "rotary_dim > head_dim");

    assert!(matches!(be.upload_raw(&[32], DType::Q8_0, &[0; 34]), Err(KernelError::UnsupportedDType { .. })));
    assert!(matches!(be.upload_raw(&[4], DType::F16, &[0; 6]), Err(KernelError::ByteLength { .. })));
    assert!(be.upload_f32(&[3], &[1.0; 4]).is_err());
    assert!(be.download_raw(&x, DType::Q4_0).is_err());
    assert!(be.sample(&x, 2, &shardline_kernels::SamplingParams::GREEDY, 0, 0).is_err());
}

#[test]
fn wire_transfers_round_trip() {
    let mut rng = Rng::new(29);
    let be = CpuBackend::new(1);
    let v = rng.vec(48, 3.0);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = be.upload_f32(&[4, 12], &v).unwrap();
        let raw = be.download_raw(&t, dtype).unwrap();
        assert_eq!(raw, quant::quantize(dtype, &v).unwrap());
        // Unaligned wire bytes decode too.
        let mut shifted = vec![0u8; raw.len() + 1];
        shifted[1..].copy_from_slice(&raw);
        let back = be.upload_raw(&[4, 12], dtype, &shifted[1..]).unwrap();
        assert_eq!(be.download_f32(&back).unwrap(), dequantised(dtype, &v));
    }
    // Weights download as their decoded values.
    let w = weight(&be, DType::Q4_1, &[2, 32], &v[..32].repeat(2));
    assert_eq!(be.download_f32(&w).unwrap(), dequantised(DType::Q4_1, &v[..32].repeat(2)));
    assert_eq!(be.act_dtype(), DType::F32);
    assert!(be.describe().contains("threads"));
}
