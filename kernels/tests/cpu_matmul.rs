//! CPU matmul: every weight dtype against an f64 reference, and bit-identical results across instruction sets,
//! thread counts, row batching and weight alignment.

mod cpu_common;

use cpu_common::{matmul as run, *};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DType, KernelError, Tensor};

/// `Σ_k x[t,k]·w[n,k]` in f64 with the weights as stored, plus `Σ |x·w|` for tolerances.
fn reference(w: &[f32], x: &[f32], t: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; t * n];
    let mut mag = vec![0.0; t * n];
    for ti in 0..t {
        for ni in 0..n {
            for ki in 0..k {
                let p = x[ti * k + ki] as f64 * w[ni * k + ki] as f64;
                out[ti * n + ni] += p;
                mag[ti * n + ni] += p.abs();
            }
        }
    }
    (out, mag)
}

#[test]
fn float_weights_match_an_f64_reference() {
    let mut rng = Rng::new(1);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (k, n, t) in [(96, 37, 5), (37, 11, 3), (576, 64, 1), (1, 3, 2), (200, 9, 9)] {
            let wv = rng.vec(n * k, 1.0);
            let x = rng.vec(t * k, 2.0);
            let stored = dequantised(dtype, &wv);
            let (want, mag) = reference(&stored, &x, t, k, n);
            for level in levels() {
                let be = CpuBackend::with_simd(2, level).unwrap();
                let w = weight(&be, dtype, &[n, k], &wv);
                let got = run(&be, &w, &x, t, k, n);
                // f32 accumulation: at most about k roundings of 2^-24 relative to Σ|x·w|.
                for i in 0..got.len() {
                    let tol = 1e-30 + mag[i] * (k as f64 + 8.0) * 6e-8;
                    assert!(
                        (got[i] as f64 - want[i]).abs() <= tol,
                        "{dtype} {level} k={k} n={n} t={t} [{i}]: {} vs {} (tol {tol})",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

#[test]
fn quantised_weights_match_an_f64_reference_within_the_activation_rounding() {
    let mut rng = Rng::new(2);
    for dtype in QUANTISED {
        for (k, n, t) in [(96, 37, 5), (32, 5, 1), (576, 40, 2), (64, 9, 4)] {
            let wv = rng.vec(n * k, 1.0);
            let x = rng.vec(t * k, 3.0);
            let stored = dequantised(dtype, &wv);
            let (want, mag) = reference(&stored, &x, t, k, n);
            for level in levels() {
                let be = CpuBackend::with_simd(1, level).unwrap();
                let w = weight(&be, dtype, &[n, k], &wv);
                let got = run(&be, &w, &x, t, k, n);
                for ti in 0..t {
                    for ni in 0..n {
                        // Each activation is rounded to its block's grid d = amax/127: error ≤ d/2 per value.
                        let mut bound = 0.0f64;
                        for b in 0..k / 32 {
                            let xs = &x[ti * k + b * 32..ti * k + b * 32 + 32];
                            let d = xs.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
                            let wsum: f64 =
                                stored[ni * k + b * 32..ni * k + b * 32 + 32].iter().map(|v| v.abs() as f64).sum();
                            bound += d / 2.0 * wsum;
                        }
                        let i = ti * n + ni;
                        let tol = bound * 1.001 + mag[i] * 1e-5 + 1e-6;
                        assert!(
                            (got[i] as f64 - want[i]).abs() <= tol,
                            "{dtype} {level} k={k} t={ti} n={ni}: {} vs {} (tol {tol})",
                            got[i],
                            want[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_simd_level_gives_identical_bits() {
    let mut rng = Rng::new(3);
    for dtype in DType::ENCODABLE {
        for (k, n, t) in [(96, 37, 9), (32, 6, 1), (576, 45, 5), (160, 13, 4)] {
            let wv = rng.vec(n * k, 1.0);
            let x = rng.vec(t * k, 4.0);
            assert_same_bits_on_every_level(&format!("{dtype} k={k} n={n} t={t}"), |be| {
                run(be, &weight(be, dtype, &[n, k], &wv), &x, t, k, n)
            });
        }
    }
}

#[test]
fn thread_count_and_row_batching_do_not_change_bits() {
    let mut rng = Rng::new(4);
    for dtype in DType::ENCODABLE {
        let (k, n, t) = (256, 301, 7);
        let wv = rng.vec(n * k, 1.0);
        let x = rng.vec(t * k, 1.5);
        let reference = {
            let be = CpuBackend::new(1);
            run(&be, &weight(&be, dtype, &[n, k], &wv), &x, t, k, n)
        };
        for threads in [2, 3] {
            let be = CpuBackend::new(threads);
            let w = weight(&be, dtype, &[n, k], &wv);
            assert_eq!(bits(&run(&be, &w, &x, t, k, n)), bits(&reference), "{dtype} with {threads} threads");
            for ti in 0..t {
                let one = run(&be, &w, &x[ti * k..(ti + 1) * k], 1, k, n);
                assert_eq!(bits(&one), bits(&reference[ti * n..(ti + 1) * n]), "{dtype} row {ti} alone");
            }
            let two = run(&be, &w, &x[2 * k..4 * k], 2, k, n);
            assert_eq!(bits(&two), bits(&reference[2 * n..4 * n]), "{dtype} rows 2..4");
        }
    }
}

/// Every batch size from 1 to 23 rows, on shapes with an odd block count (a missing odd block in the last pair)
/// and odd row counts, taken from different offsets of the activations: each row of a batch is bit-identical to
/// that row computed alone, on every SIMD level, and the levels agree with each other (the scalar reference among
/// them). The AVX-512 kernels cover a batch with tiles of 16, 8, 7, 6, 5 and 4 activation rows that may reach into
/// zero padding rows, and a single-row kernel for a last lone row; this walks every combination of them (16 + 7
/// included).
#[test]
fn every_batch_size_gives_each_row_its_alone_bits() {
    const T_MAX: usize = 23;
    let mut rng = Rng::new(8);
    for dtype in DType::ENCODABLE {
        // 2080 = 65 blocks: more than one chunk of the AVX2 multi-row kernel's scale table, an odd block last.
        for (k, n, threads) in [(96, 13, 1), (160, 6, 2), (576, 7, 3), (2080, 3, 2)] {
            let wv = rng.vec(n * k, 1.0);
            let mut x = rng.vec(T_MAX * k, 2.0);
            // A row of zeros (scale 0) and a row of one large value among zeros.
            x[3 * k..4 * k].fill(0.0);
            x[11 * k..12 * k].fill(0.0);
            x[11 * k + 5] = 1e3;
            let mut per_level: Vec<Vec<Vec<u32>>> = Vec::new();
            for level in levels() {
                let be = CpuBackend::with_simd(threads, level).unwrap();
                let w = weight(&be, dtype, &[n, k], &wv);
                let alone: Vec<Vec<u32>> =
                    (0..T_MAX).map(|ti| bits(&run(&be, &w, &x[ti * k..(ti + 1) * k], 1, k, n))).collect();
                for t in 2..=T_MAX {
                    for start in [0, T_MAX - t, (T_MAX - t) / 2] {
                        let got = run(&be, &w, &x[start * k..(start + t) * k], t, k, n);
                        for ti in 0..t {
                            assert_eq!(
                                bits(&got[ti * n..(ti + 1) * n]),
                                alone[start + ti],
                                "{dtype} {level} k={k} n={n}: row {} of a batch of {t} from {start} differs from alone",
                                ti
                            );
                        }
                    }
                }
                per_level.push(alone);
            }
            for (level, alone) in levels().iter().zip(&per_level) {
                assert_eq!(alone, &per_level[0], "{dtype} k={k} n={n}: {level} differs from {}", levels()[0]);
            }
        }
    }
}

/// A matmul reuses the quantised activations of the previous one on the same thread when the input bits and the
/// plan are the same (Q, K and V of a block): results are those of a fresh backend, whether the input repeats,
/// changes in one value, or goes to a weight of another format or width.
#[test]
fn consecutive_matmuls_reuse_only_identical_inputs() {
    let mut rng = Rng::new(9);
    let (k, t) = (160, 5);
    let x = rng.vec(t * k, 1.0);
    let mut x2 = x.clone();
    x2[3 * k + 7] = 40.0;
    let be = CpuBackend::new(1);
    let weights: Vec<(DType, usize, Vec<f32>)> =
        [(DType::Q4_1, 9), (DType::Q4_1, 4), (DType::Q8_0, 9), (DType::Q4_0, 3)]
            .into_iter()
            .map(|(d, n)| (d, n, rng.vec(n * k, 1.0)))
            .collect();
    for (dtype, n, wv) in &weights {
        for input in [&x, &x, &x2, &x, &x2, &x2] {
            let got = run(&be, &weight(&be, *dtype, &[*n, k], wv), input, t, k, *n);
            let fresh = CpuBackend::new(1);
            let want = std::thread::scope(|s| {
                s.spawn(|| run(&fresh, &weight(&fresh, *dtype, &[*n, k], wv), input, t, k, *n)).join().unwrap()
            });
            assert_eq!(bits(&got), bits(&want), "{dtype} n={n}");
        }
    }
}

#[test]
fn unaligned_weight_bytes_give_the_same_bits() {
    let mut rng = Rng::new(5);
    let be = CpuBackend::new(2);
    for dtype in DType::ENCODABLE {
        let (k, n, t) = (96, 21, 3);
        let wv = rng.vec(n * k, 1.0);
        let x = rng.vec(t * k, 1.0);
        let aligned = run(&be, &weight(&be, dtype, &[n, k], &wv), &x, t, k, n);
        let odd = run(&be, &weight_unaligned(&be, dtype, &[n, k], &wv), &x, t, k, n);
        assert_eq!(bits(&aligned), bits(&odd), "{dtype}");
    }
}

#[test]
fn weights_as_activation_tensors_are_accepted_as_f32() {
    let mut rng = Rng::new(6);
    let be = CpuBackend::new(1);
    let (k, n, t) = (40, 7, 2);
    let wv = rng.vec(n * k, 1.0);
    let x = rng.vec(t * k, 1.0);
    let as_weight = run(&be, &weight(&be, DType::F32, &[n, k], &wv), &x, t, k, n);
    let as_act = run(&be, &act(&be, &[n, k], &wv), &x, t, k, n);
    assert_eq!(bits(&as_weight), bits(&as_act));
}

#[test]
fn bad_shapes_are_errors() {
    let be = CpuBackend::new(2);
    let mut rng = Rng::new(7);
    let w = weight(&be, DType::Q4_1, &[8, 64], &rng.vec(8 * 64, 1.0));
    let x = act(&be, &[3, 64], &rng.vec(3 * 64, 1.0));
    let mut out = be.alloc(&[3, 8]).unwrap();
    be.matmul(&x, &w, &mut out).unwrap();

    let x_bad = act(&be, &[3, 32], &rng.vec(3 * 32, 1.0));
    assert!(matches!(be.matmul(&x_bad, &w, &mut out), Err(KernelError::Shape { .. })));
    let mut out_rows = be.alloc(&[2, 8]).unwrap();
    assert!(matches!(be.matmul(&x, &w, &mut out_rows), Err(KernelError::Shape { .. })));
    let mut out_cols = be.alloc(&[3, 9]).unwrap();
    assert!(matches!(be.matmul(&x, &w, &mut out_cols), Err(KernelError::Shape { .. })));
    let w1d = weight(&be, DType::F32, &[64], &rng.vec(64, 1.0));
    assert!(be.matmul(&x, &w1d, &mut out).is_err());
    // A weight where an activation belongs, and a write into a weight.
    let w_as_x = weight(&be, DType::F32, &[3, 64], &rng.vec(3 * 64, 1.0));
    assert!(be.matmul(&w_as_x, &w, &mut out).is_err());
    let mut w_as_out = weight(&be, DType::F32, &[3, 8], &rng.vec(24, 1.0));
    assert!(be.matmul(&x, &w, &mut w_as_out).is_err());
    // Quantised rows must be whole blocks.
    let bytes = shardline_kernels::HostBytes::from_vec(vec![0; 8 * 20]);
    assert!(matches!(be.upload_weight(DType::Q4_1, &[5, 32], bytes), Err(KernelError::ByteLength { .. })));
    let bytes = shardline_kernels::HostBytes::from_vec(vec![0; 40]);
    assert!(matches!(be.upload_weight(DType::Q4_1, &[2, 16], bytes), Err(KernelError::PartialBlock { .. })));
}

#[test]
fn empty_matmuls_are_fine() {
    let be = CpuBackend::new(2);
    let w = weight(&be, DType::Q8_0, &[0, 64], &[]);
    let x = act(&be, &[2, 64], &[0.5; 128]);
    let mut out = be.alloc(&[2, 0]).unwrap();
    be.matmul(&x, &w, &mut out).unwrap();
    let w = weight(&be, DType::Q8_0, &[3, 64], &[0.25; 192]);
    let x = act(&be, &[0, 64], &[]);
    let mut out = be.alloc(&[0, 3]).unwrap();
    be.matmul(&x, &w, &mut out).unwrap();
}

#[test]
fn concurrent_callers_share_one_backend() {
    let mut rng = Rng::new(8);
    let be = std::sync::Arc::new(CpuBackend::new(3));
    let (k, n, t) = (512, 400, 3);
    let wv = rng.vec(n * k, 1.0);
    let w = std::sync::Arc::new(weight(&*be, DType::Q4_1, &[n, k], &wv));
    let inputs: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(t * k, 1.0)).collect();
    let want: Vec<Vec<u32>> = inputs.iter().map(|x| bits(&run(&CpuBackend::new(1), &w, x, t, k, n))).collect();
    std::thread::scope(|s| {
        for (x, want) in inputs.iter().zip(&want) {
            let (be, w) = (std::sync::Arc::clone(&be), std::sync::Arc::clone(&w));
            s.spawn(move || {
                for _ in 0..20 {
                    assert_eq!(&bits(&run(&be, &w, x, t, k, n)), want);
                }
            });
        }
    });
}

/// The fused CPU calls give the bits of the separate ones: `matmul_many` (Q, K, V in one fork) those of one `matmul`
/// per weight, `matmul_swiglu` (gate, up and SwiGLU in one fork) those of `matmul`, `matmul`, `swiglu`, at every
/// SIMD level, thread count and row count; weights of mixed formats take the separate path and agree as well.
#[test]
fn fused_matmuls_give_the_bits_of_the_separate_calls() {
    let mut rng = Rng::new(9);
    let k = 192;
    for (dtype, other) in
        [(DType::Q4_1, DType::Q4_1), (DType::Q8_0, DType::Q8_0), (DType::F16, DType::F16), (DType::Q4_0, DType::Q8_0)]
    {
        for level in levels() {
            for threads in [1, 2, 3] {
                let be = CpuBackend::with_simd(threads, level).unwrap();
                let shapes = [(200, dtype), (64, dtype), (68, other)];
                let ws: Vec<Tensor> =
                    shapes.iter().map(|&(n, dt)| weight(&be, dt, &[n, k], &rng.vec(n * k, 1.0))).collect();
                for t in [1, 3, 16, 17] {
                    let x = act(&be, &[t, k], &rng.vec(t * k, 2.0));
                    let mut outs: Vec<Tensor> = shapes.iter().map(|&(n, _)| be.alloc(&[t, n]).unwrap()).collect();
                    {
                        let mut pairs: Vec<(&Tensor, &mut Tensor)> = ws.iter().zip(outs.iter_mut()).collect();
                        be.matmul_many(&x, &mut pairs).unwrap();
                    }
                    for (w, o) in ws.iter().zip(&outs) {
                        let mut alone = be.alloc(o.shape()).unwrap();
                        be.matmul(&x, w, &mut alone).unwrap();
                        let what = format!("matmul_many {dtype}/{other} {level} {threads} threads, {t} rows");
                        assert_eq!(
                            bits(&be.download_f32(o).unwrap()),
                            bits(&be.download_f32(&alone).unwrap()),
                            "{what}"
                        );
                    }
                    // gate and up: the first weight and one of the same shape (and, in the mixed case, format).
                    let up = weight(&be, other, &[200, k], &rng.vec(200 * k, 1.0));
                    let (mut g, mut u, mut out) =
                        (be.alloc(&[t, 200]).unwrap(), be.alloc(&[t, 200]).unwrap(), be.alloc(&[t, 200]).unwrap());
                    be.matmul_swiglu(&x, (&ws[0], &up), (&mut g, &mut u), &mut out).unwrap();
                    let (mut g1, mut u1, mut out1) =
                        (be.alloc(&[t, 200]).unwrap(), be.alloc(&[t, 200]).unwrap(), be.alloc(&[t, 200]).unwrap());
                    be.matmul(&x, &ws[0], &mut g1).unwrap();
                    be.matmul(&x, &up, &mut u1).unwrap();
                    be.swiglu(&g1, &u1, &mut out1).unwrap();
                    let what = format!("matmul_swiglu {dtype}/{other} {level} {threads} threads, {t} rows");
                    assert_eq!(bits(&be.download_f32(&out).unwrap()), bits(&be.download_f32(&out1).unwrap()), "{what}");
                }
            }
        }
    }
}
