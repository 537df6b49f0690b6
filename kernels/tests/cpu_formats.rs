//! The formats read from model files (Q5_0, Q5_1, IQ4_NL, the K-quants, IQ4_XS): decoding against gguf-py, matmul
//! against an f64 reference, and bit-identical results across instruction sets, thread counts and row batching.

mod cpu_common;

use cpu_common::{matmul as run, *};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::{Backend, DType, HostBytes, KernelError, Tensor, quant};

/// The blocks of `cpu_fixtures/format_blocks.bin` (written by `make_format_blocks.py` with gguf-py) and the values
/// gguf-py decodes them to, per format.
fn fixture() -> Vec<(DType, Vec<u8>, Vec<f32>)> {
    let data = include_bytes!("cpu_fixtures/format_blocks.bin");
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut o = 0;
    while o < data.len() {
        let dtype = match u32_at(o) {
            6 => DType::Q5_0,
            7 => DType::Q5_1,
            20 => DType::IQ4_NL,
            10 => DType::Q2_K,
            11 => DType::Q3_K,
            12 => DType::Q4_K,
            13 => DType::Q5_K,
            14 => DType::Q6_K,
            23 => DType::IQ4_XS,
            other => panic!("unexpected ggml type {other} in the fixture"),
        };
        let len = u32_at(o + 4);
        let bytes = data[o + 8..o + 8 + len].to_vec();
        o += 8 + len;
        let n = u32_at(o);
        let values =
            data[o + 4..o + 4 + 4 * n].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        o += 4 + 4 * n;
        out.push((dtype, bytes, values));
    }
    out
}

#[test]
fn decoding_matches_gguf_py_bit_for_bit() {
    let fx = fixture();
    assert_eq!(fx.len(), 9, "one entry per format");
    for (dtype, bytes, want) in &fx {
        let mut got = vec![f32::NAN; want.len()];
        quant::dequantize(*dtype, bytes, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{dtype} value {i}: {g} vs gguf-py {w}");
        }
    }
}

#[test]
fn rows_and_embeddings_decode_from_unaligned_bytes() {
    let be = CpuBackend::new(1);
    for (dtype, bytes, want) in fixture() {
        let width = 2 * dtype.block_elems();
        let vocab = want.len() / width;
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let mut row = vec![0.0; width];
        quant::dequantize_row(dtype, &shifted[1..], width, vocab - 1, &mut row).unwrap();
        assert_eq!(bits(&row), bits(&want[(vocab - 1) * width..]), "{dtype} last row");
        let owner: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = std::sync::Arc::new(shifted);
        let table = be.upload_weight(dtype, &[vocab, width], HostBytes::try_new(owner, 1..1 + bytes.len()).unwrap());
        let table = table.unwrap();
        let ids = [vocab as u32 - 1, 0, 1];
        let mut out = be.alloc(&[ids.len(), width]).unwrap();
        be.embedding(&table, &ids, &mut out).unwrap();
        let got = be.download_f32(&out).unwrap();
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert_eq!(bits(&got[t * width..(t + 1) * width]), bits(&want[id * width..(id + 1) * width]), "{dtype}");
        }
    }
}

fn upload(be: &CpuBackend, dtype: DType, shape: &[usize], bytes: &[u8]) -> Tensor {
    be.upload_weight(dtype, shape, HostBytes::from_vec(bytes.to_vec())).unwrap()
}

/// The matmul of the fixture weights (as gguf-py decodes them) against random activations, in f64. The activations
/// are quantised to 8 bits per block before the integer dot products (Q8_0/Q8_1 blocks of 32 for the 32-value
/// formats, Q8_K blocks of 256 for the super-blocks, as llama.cpp does), which moves each by at most half a step,
/// `amax / 254` of its block; the bound is `Σ |w| · amax / 254`, plus 1e-5 of `Σ |w·x|` for f32 rounding.
#[test]
fn matmul_matches_an_f64_reference_within_the_activation_quantisation() {
    let mut rng = Rng::new(41);
    for level in levels() {
        let be = CpuBackend::with_simd(2, level).unwrap();
        for (dtype, bytes, wv) in fixture() {
            let k = 2 * dtype.block_elems() * if dtype.is_super_block() { 1 } else { 4 };
            let n = wv.len() / k;
            let t = 3;
            let w = upload(&be, dtype, &[n, k], &bytes);
            let x = rng.vec(t * k, 2.0);
            let got = run(&be, &w, &x, t, k, n);
            let act_block = if dtype.is_super_block() { 256 } else { 32 };
            for ti in 0..t {
                for ni in 0..n {
                    let (mut want, mut bound, mut mag) = (0.0f64, 0.0f64, 0.0f64);
                    for (xb, wb) in
                        x[ti * k..(ti + 1) * k].chunks(act_block).zip(wv[ni * k..(ni + 1) * k].chunks(act_block))
                    {
                        let amax = xb.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
                        for (&xv, &wv) in xb.iter().zip(wb) {
                            want += xv as f64 * wv as f64;
                            mag += (xv as f64 * wv as f64).abs();
                            bound += (wv as f64).abs() * amax / 254.0;
                        }
                    }
                    let tol = bound * 1.0001 + 1e-5 * mag + 1e-30;
                    let g = got[ti * n + ni] as f64;
                    assert!((g - want).abs() <= tol, "{dtype} {level} [{ti},{ni}]: {g} vs {want} (tolerance {tol})");
                }
            }
        }
    }
}

#[test]
fn every_simd_level_gives_identical_bits() {
    let mut rng = Rng::new(42);
    for dtype in all_quantised() {
        let ks: &[usize] = if dtype.is_super_block() { &[256, 768, 1536] } else { &[96, 576] };
        for &k in ks {
            for (n, t) in [(37, 1), (6, 2), (45, 5), (13, 4), (29, 9), (10, 16)] {
                let wb = file_blocks(&mut rng, dtype, n * k, 0.5);
                let x = rng.vec(t * k, 3.0);
                assert_same_bits_on_every_level(&format!("{dtype} k={k} n={n} t={t}"), |be| {
                    run(be, &upload(be, dtype, &[n, k], &wb), &x, t, k, n)
                });
            }
        }
    }
}

/// The AVX-512 kernels of the file formats (the super-blocks: tiles of 8, 4, 2 and 1 activation rows, of 1 or 2
/// weight rows; IQ4_NL: 2 × 4, 1 × 4, 4 × 1 and block pairs with a missing odd block): every row count from 1 to 20
/// (each mix of tile shapes and tails), odd weight-row counts, random blocks and blocks of one repeated byte (the
/// largest codes and scales of either sign, the smallest) give the same bits on every level.
#[test]
fn file_format_tiles_give_identical_bits_for_every_row_count() {
    let mut rng = Rng::new(45);
    for dtype in all_quantised().filter(|d| d.is_super_block() || *d == DType::IQ4_NL) {
        let shapes = if dtype.is_super_block() { [(256, 7), (768, 37)] } else { [(96, 7), (576, 37)] };
        for (k, n) in shapes {
            let mut weights = vec![("random", file_blocks(&mut rng, dtype, n * k, 0.5))];
            for (name, byte) in [("0x00", 0x00u8), ("0xff", 0xff), ("0x80", 0x80), ("0x7f", 0x7f)] {
                weights.push((name, uniform_blocks(byte, dtype, n * k, 0.5)));
            }
            for t in 1..=20 {
                let x = rng.vec(t * k, 3.0);
                for (name, wb) in &weights {
                    assert_same_bits_on_every_level(&format!("{dtype} {name} k={k} n={n} t={t}"), |be| {
                        run(be, &upload(be, dtype, &[n, k], wb), &x, t, k, n)
                    });
                }
            }
        }
    }
}

#[test]
fn thread_count_and_row_batching_do_not_change_bits() {
    let mut rng = Rng::new(43);
    for dtype in all_quantised() {
        let (k, n, t) = (512, 301, 5);
        let wb = file_blocks(&mut rng, dtype, n * k, 1.0);
        let x = rng.vec(t * k, 1.5);
        let reference = {
            let be = CpuBackend::new(1);
            run(&be, &upload(&be, dtype, &[n, k], &wb), &x, t, k, n)
        };
        for threads in [2, 3] {
            let be = CpuBackend::new(threads);
            let w = upload(&be, dtype, &[n, k], &wb);
            assert_eq!(bits(&run(&be, &w, &x, t, k, n)), bits(&reference), "{dtype} with {threads} threads");
            for ti in 0..t {
                let one = run(&be, &w, &x[ti * k..(ti + 1) * k], 1, k, n);
                assert_eq!(bits(&one), bits(&reference[ti * n..(ti + 1) * n]), "{dtype} row {ti} alone");
            }
        }
    }
}

#[test]
fn partial_super_blocks_and_unwritable_formats_are_errors() {
    let be = CpuBackend::new(1);
    for dtype in FILE_ONLY {
        assert!(
            matches!(quant::quantize(dtype, &vec![0.5; 256]), Err(KernelError::UnsupportedDType { .. })),
            "{dtype}"
        );
    }
    for dtype in [DType::Q4_K, DType::Q6_K, DType::IQ4_XS] {
        // 288 columns: a whole number of 32-value blocks but not of 256-value super-blocks.
        let res = be.upload_weight(dtype, &[2, 288], HostBytes::from_vec(vec![0; 2 * 288 / 256 * dtype.block_bytes()]));
        assert!(matches!(res, Err(KernelError::PartialBlock { .. })), "{dtype}");
    }
}

#[test]
fn q5_encodings_round_trip_through_the_decoder() {
    let mut rng = Rng::new(44);
    for dtype in [DType::Q5_0, DType::Q5_1] {
        let x = rng.vec(32 * 9, 3.0);
        let bytes = quant::quantize(dtype, &x).unwrap();
        assert_eq!(bytes.len(), 9 * dtype.block_bytes());
        let mut back = vec![0.0; x.len()];
        quant::dequantize(dtype, &bytes, &mut back).unwrap();
        for (xb, yb) in x.chunks(32).zip(back.chunks(32)) {
            let (lo, hi) = xb.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let amax = lo.abs().max(hi.abs());
            // One step of the 5-bit grid (amax/16 or (max − min)/31) plus the f16 rounding of the scale.
            let step = if dtype == DType::Q5_0 { amax / 16.0 } else { (hi - lo) / 31.0 };
            for (&a, &b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= step * 1.01 + 1e-3 * amax, "{dtype}: {a} → {b}");
            }
        }
    }
}
