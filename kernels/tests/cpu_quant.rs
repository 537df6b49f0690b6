//! ggml block formats: byte layout against hand-computed blocks and against gguf-py, round-trip error bounds,
//! unaligned input.

mod cpu_common;

use cpu_common::*;
use half::f16;
use shardline_kernels::DType;
use shardline_kernels::quant::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0};

#[test]
fn q8_0_block_matches_a_hand_computed_one() {
    // amax 127 → d = 1, id = 1: values round half away from zero.
    let mut x = [0.0f32; 32];
    x[..8].copy_from_slice(&[127.0, -127.0, 2.5, -2.5, 0.5, 1.4, -0.49, 63.5]);
    let bytes = quant::quantize(DType::Q8_0, &x).unwrap();
    let mut want = vec![0x00, 0x3c]; // f16 1.0
    want.extend([127i8, -127, 3, -3, 1, 1, 0, 64].map(|v| v as u8));
    want.extend([0u8; 24]);
    assert_eq!(bytes, want);
    let block: BlockQ8_0 = bytemuck::pod_read_unaligned(&bytes);
    assert_eq!(block.d, f16::ONE);
}

#[test]
fn q4_0_block_matches_a_hand_computed_one() {
    // Element 0 is −8, the value of largest magnitude: d = −8 / −8 = 1, q = trunc(x + 8.5).
    let mut x = [0.0f32; 32];
    for j in 0..16 {
        x[j] = j as f32 - 8.0; // q = j
        x[16 + j] = 7.0 - j as f32; // q = 15 − j
    }
    let bytes = quant::quantize(DType::Q4_0, &x).unwrap();
    let mut want = vec![0x00, 0x3c];
    want.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    assert_eq!(bytes, want);
    let mut back = [0.0f32; 32];
    quant::dequantize(DType::Q4_0, &bytes, &mut back).unwrap();
    assert_eq!(back, x);
}

#[test]
fn q4_1_block_matches_a_hand_computed_one() {
    // min 1, max 8.5: d = 0.5, m = 1, q = trunc((x − 1)·2 + 0.5).
    let mut x = [0.0f32; 32];
    for j in 0..16 {
        x[j] = 1.0 + 0.5 * j as f32; // q = j
        x[16 + j] = 8.5 - 0.5 * j as f32; // q = 15 − j
    }
    let bytes = quant::quantize(DType::Q4_1, &x).unwrap();
    let mut want = vec![0x00, 0x38, 0x00, 0x3c]; // d = 0.5, m = 1.0
    want.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    assert_eq!(bytes, want);
    let block: BlockQ4_1 = bytemuck::pod_read_unaligned(&bytes);
    assert_eq!((block.d.to_f32(), block.m.to_f32()), (0.5, 1.0));
    let mut back = [0.0f32; 32];
    quant::dequantize(DType::Q4_1, &bytes, &mut back).unwrap();
    assert_eq!(back, x);
}

#[test]
fn block_structs_have_the_gguf_sizes() {
    assert_eq!(size_of::<BlockQ8_0>(), 34);
    assert_eq!(size_of::<BlockQ4_0>(), 18);
    assert_eq!(size_of::<BlockQ4_1>(), 20);
    for dtype in DType::ENCODABLE {
        assert_eq!(quant::quantize(dtype, &[0.5; 64]).unwrap().len(), dtype.bytes_for(64).unwrap());
    }
}

/// Fixture written by `cpu_fixtures/make_ggml_blocks.py` with gguf-py (an independent port of ggml's quantisers).
#[test]
fn encodings_match_gguf_py_byte_for_byte() {
    let data = include_bytes!("cpu_fixtures/ggml_blocks.bin");
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let n = u32_at(0);
    let x: Vec<f32> = data[4..4 + 4 * n].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let mut offset = 4 + 4 * n;
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::F16, DType::BF16] {
        let len = u32_at(offset);
        let want = &data[offset + 4..offset + 4 + len];
        offset += 4 + len;
        let got = quant::quantize(dtype, &x).unwrap();
        for (b, (g, w)) in
            got.chunks(dtype.bytes_for(32).unwrap()).zip(want.chunks(dtype.bytes_for(32).unwrap())).enumerate()
        {
            assert_eq!(g, w, "{dtype} block {b}");
        }
        assert_eq!(got.len(), want.len());
    }
    assert_eq!(offset, data.len());
}

#[test]
fn round_trip_errors_stay_within_the_format_bounds() {
    let mut rng = Rng::new(11);
    // f16 keeps 11 significant bits down to 2^-14, then a fixed step of 2^-24 (half of it in error).
    let f16_err = |v: f64| (v.abs() * 2f64.powi(-11)).max(2f64.powi(-25));
    for trial in 0..50 {
        let scale = [1e-3f32, 1.0, 40.0][trial % 3];
        let x = rng.vec(32 * 7, scale);
        for dtype in DType::ENCODABLE {
            let back = dequantised(dtype, &x);
            for (b, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                let amax = xs.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
                let (min, max) =
                    xs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v as f64), hi.max(v as f64)));
                for (&xv, &yv) in xs.iter().zip(ys) {
                    let err = (xv as f64 - yv as f64).abs();
                    let bound = match dtype {
                        DType::F32 => 0.0,
                        DType::F16 => f16_err(xv as f64),
                        DType::BF16 => (xv as f64).abs() * 2f64.powi(-8),
                        // Half a step of d = amax/127, plus the f16 rounding of d times |q| ≤ 127.
                        DType::Q8_0 => amax / 127.0 / 2.0 + 127.0 * f16_err(amax / 127.0),
                        // The value opposite the extreme clips to 7·d: up to one step d = amax/8.
                        DType::Q4_0 => amax / 8.0 + 8.0 * f16_err(amax / 8.0),
                        // Half a step of d = (max − min)/15, plus f16 rounding of d (times q ≤ 15) and of m.
                        DType::Q4_1 => {
                            let d = (max - min) / 15.0;
                            d / 2.0 + 15.0 * f16_err(d) + f16_err(min)
                        }
                        // As Q4_0 with twice the codes: d = amax/16, the opposite extreme clips to 15·d.
                        DType::Q5_0 => amax / 16.0 + 16.0 * f16_err(amax / 16.0),
                        DType::Q5_1 => {
                            let d = (max - min) / 31.0;
                            d / 2.0 + 31.0 * f16_err(d) + f16_err(min)
                        }
                        other => unreachable!("{other} is not encodable"),
                    };
                    assert!(err <= bound * 1.0001 + 1e-12, "{dtype} block {b}: {xv} → {yv}, error {err} > {bound}");
                }
            }
        }
    }
}

#[test]
fn unaligned_bytes_decode_like_aligned_ones() {
    let mut rng = Rng::new(12);
    let x = rng.vec(96, 2.0);
    for dtype in DType::ENCODABLE {
        let bytes = quant::quantize(dtype, &x).unwrap();
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let (mut a, mut b) = (vec![0.0; 96], vec![0.0; 96]);
        quant::dequantize(dtype, &bytes, &mut a).unwrap();
        quant::dequantize(dtype, &shifted[1..], &mut b).unwrap();
        assert_eq!(bits(&a), bits(&b), "{dtype}");
        let mut row = vec![0.0; 32];
        quant::dequantize_row(dtype, &shifted[1..], 32, 2, &mut row).unwrap();
        assert_eq!(bits(&row), bits(&a[64..]), "{dtype} row 2");
    }
}

#[test]
fn bad_lengths_are_errors() {
    assert!(quant::quantize(DType::Q8_0, &[1.0; 31]).is_err());
    assert!(quant::quantize(DType::F16, &[1.0; 31]).is_ok());
    let mut out = vec![0.0; 32];
    assert!(quant::dequantize(DType::Q4_0, &[0; 17], &mut out).is_err());
    assert!(quant::dequantize(DType::F32, &[0; 127], &mut out).is_err());
    let mut odd = vec![0.0; 31];
    assert!(quant::dequantize(DType::Q4_1, &[0; 20], &mut odd).is_err());
    assert!(quant::dequantize_row(DType::Q8_0, &[0; 68], 32, 2, &mut out).is_err());
}
