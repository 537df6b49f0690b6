//! Scalar math written so the compiler vectorises it, with results that do not depend on the vector width.

/// `e^x` in f32 (Cephes `expf` polynomial after Cody–Waite range reduction), within 2 ulp of the exact value; 0 below
/// `ln(f32::MIN_POSITIVE)`, infinity above `ln(f32::MAX)`, NaN for NaN. Plain operations only (no FMA, no table), so
/// every target and vector width computes the same bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.722_83;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer (ties to even) and leaves that integer in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let f = (xc * LOG2E).min(127.0) + MAGIC;
    let n = f - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = ((((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r))
        + r
        + 1.0;
    let scale = f32::from_bits(f.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    let y = p * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `x / (1 + e^−x)`, the SiLU activation.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Largest value (NaN ignored; −inf for an empty slice), over 8 interleaved lanes.
#[inline(always)]
pub(crate) fn max8(v: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    for (i, &x) in chunks.remainder().iter().enumerate() {
        m[i] = if x > m[i] { x } else { m[i] };
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a })
}

/// Sum with 8 interleaved f32 lanes (element `i` into lane `i % 8`), folded as [`super::dot::fold8`].
#[inline(always)]
pub(crate) fn sum8(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    for (i, &x) in chunks.remainder().iter().enumerate() {
        acc[i] += x;
    }
    super::dot::fold8(acc)
}

/// Dot product with 8 interleaved f32 accumulators (element `i` into lane `i % 8`), folded as in
/// [`super::dot::fold8`]. Unfused multiply and add, so it vectorises identically at every width.
#[inline(always)]
pub(crate) fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[i] += x * y;
    }
    super::dot::fold8(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_whole_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn silu_matches_definition() {
        for x in [-20.0f32, -3.0, -0.5, 0.0, 0.25, 4.0, 30.0] {
            let want = x as f64 / (1.0 + (-x as f64).exp());
            assert!((silu(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1e-6), "{x}");
        }
    }
}
