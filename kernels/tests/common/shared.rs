//! What every kernels test shares (included by `common` and `cpu_common`): the one closeness check, and random
//! quantised blocks as a model file holds them.

use shardline_kernels::DType;

/// How far a result may be from its reference.
#[derive(Clone, Copy, Debug)]
pub enum Tol {
    /// Every element: `|got − want| <= abs + rel · |want|` (references computed in f64 by the test).
    Elem { abs: f64, rel: f64 },
    /// The whole slice: `max |got − want| <= rel · max(max |want|, 1e-3)` (one device against another).
    OfMax(f64),
}

/// Asserts `got` matches `want` within `tol`: same length, no NaN in `got`, a finite reference.
pub fn assert_close<W: Copy + Into<f64>>(what: &str, got: &[f32], want: &[W], tol: Tol) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| v.is_nan()) {
        panic!("{what}: NaN at {i} (an element was not written or the math failed)");
    }
    let want: Vec<f64> = want.iter().map(|&w| w.into()).collect();
    assert!(want.iter().all(|v| v.is_finite()), "{what}: the reference is not finite");
    match tol {
        Tol::Elem { abs, rel } => {
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let bound = abs + rel * w.abs();
                assert!((g as f64 - w).abs() <= bound, "{what}[{i}]: got {g}, want {w} (tolerance {bound})");
            }
        }
        Tol::OfMax(rel) => {
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
            let (mut worst, mut at) = (0.0f64, 0);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let e = (g as f64 - w).abs();
                if e > worst {
                    worst = e;
                    at = i;
                }
            }
            let r = worst / scale;
            assert!(
                r <= rel,
                "{what}: relative error {r:.3e} > {rel:.0e} at {at} (got {}, want {}, scale {scale})",
                got[at],
                want[at]
            );
        }
    }
}

/// Random blocks of a quantised `dtype` as a model file holds them: random bytes from `next` (valid codes and
/// sub-scales in every format), with the f16 super-scales set so that |x| stays around `scale`. Serves the formats
/// `quant::quantize` cannot write, and every format in the device tests.
pub fn file_blocks(mut next: impl FnMut() -> u64, dtype: DType, elems: usize, scale: f32) -> Vec<u8> {
    let mut out: Vec<u8> = (0..dtype.bytes_for(elems).expect("whole blocks")).map(|_| next() as u8).collect();
    let (d_at, dmin_at, span) = match dtype {
        DType::Q8_0 => (0, None, 127.0),
        DType::Q4_0 => (0, None, 8.0),
        DType::Q4_1 => (0, Some(2), 15.0),
        DType::Q5_0 => (0, None, 16.0),
        DType::Q5_1 => (0, Some(2), 31.0),
        DType::IQ4_NL => (0, None, 127.0),
        DType::Q2_K => (80, Some(82), 45.0),
        DType::Q3_K => (108, None, 128.0),
        DType::Q4_K => (0, Some(2), 945.0),
        DType::Q5_K => (0, Some(2), 1953.0),
        DType::Q6_K => (208, None, 4064.0),
        DType::IQ4_XS => (0, None, 4064.0),
        other => panic!("{other} is not a quantised dtype"),
    };
    for blk in out.chunks_exact_mut(dtype.block_bytes()) {
        let unit = (next() >> 11) as f32 / (1u64 << 53) as f32;
        let d = half::f16::from_f32(scale * (0.5 + unit) / span);
        blk[d_at..d_at + 2].copy_from_slice(&d.to_le_bytes());
        if let Some(at) = dmin_at {
            // Q4_1/Q5_1 store the minimum itself; the K-quants a scale of 6-bit (or 4-bit) minimums.
            let m = if dtype.is_super_block() { scale * 2.0 / span } else { -scale * 0.5 };
            blk[at..at + 2].copy_from_slice(&half::f16::from_f32(m).to_le_bytes());
        }
    }
    out
}
