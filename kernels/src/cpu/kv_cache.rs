//! Writes of new keys and values into the paged KV cache, and the element types the cache may hold.
//!
//! The cache holds f32 (the default) or f16 (`CpuBackend::with_kv_dtype`). With f16 the attention computes as
//! llama.cpp's CPU path does with its default f16 KV cache (docs/REFERENCE.md): keys and values rounded to f16 when
//! stored, the query rounded to f16 for `K·q` and the softmax weights rounded to f16 for the product with `V`, all
//! other arithmetic in f32. Rounding is to nearest, ties to even, so every thread count and SIMD level stores and
//! reads the same bits.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{KernelError, Result};

/// An element type of the KV cache.
pub(crate) trait KvElem: Copy + Send + Sync + 'static {
    /// f32: nothing is rounded.
    const IS_F32: bool;
    /// Row `src` as f32: `src` itself for f32, converted (exactly) into `buf` for f16.
    fn row_f32<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
    /// `x` rounded to this type and back (the query and the softmax weights, as llama.cpp's f16 `mul_mat` rounds
    /// its f32 operand); the identity for f32.
    fn round(x: f32) -> f32;
    /// Stores `src` into `dst`, rounding to this type.
    fn store(dst: &mut [Self], src: &[f32]);
}

impl KvElem for f32 {
    const IS_F32: bool = true;

    #[inline(always)]
    fn row_f32<'a>(src: &'a [f32], _buf: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }

    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }

    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    const IS_F32: bool = false;

    #[inline(always)]
    fn row_f32<'a>(src: &'a [f16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(src.len(), 0.0);
        src.convert_to_f32_slice(buf);
        buf
    }

    #[inline(always)]
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }

    fn store(dst: &mut [f16], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
}

/// Copies row `t` of `k`/`v` (`width` values each) into slot `slots[t]` of the caches (`[n_slots, width]`), rounded
/// to the caches' element type. Every slot is checked before anything is written, so a bad slot leaves the caches
/// untouched.
pub(crate) fn store<E: KvElem>(
    k_cache: &mut [E],
    v_cache: &mut [E],
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    width: usize,
) -> Result<()> {
    let capacity = k_cache.len().checked_div(width).unwrap_or(0);
    if let Some(&slot) = slots.iter().find(|&&s| s as usize >= capacity) {
        return Err(KernelError::KvSlot { slot: slot as usize, capacity });
    }
    for (t, &slot) in slots.iter().enumerate() {
        let (dst, src) = (slot as usize * width, t * width);
        E::store(&mut k_cache[dst..dst + width], &k[src..src + width]);
        E::store(&mut v_cache[dst..dst + width], &v[src..src + width]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 stores round to nearest, ties to even, whichever conversion `half` picks (F16C or software), and reads
    /// convert back exactly.
    #[test]
    fn f16_rounding_is_to_nearest_even_and_reads_are_exact() {
        let src: Vec<f32> =
            (0..4099).map(|i| ((i as f32) * 0.731).sin() * 70_000.0f32.powf((i % 7) as f32 / 7.0)).collect();
        let mut dst = vec![f16::ZERO; src.len()];
        f16::store(&mut dst, &src);
        for (d, &s) in dst.iter().zip(&src) {
            assert_eq!(d.to_bits(), f16::from_f32(s).to_bits(), "{s}");
            assert_eq!(f16::round(s), d.to_f32());
        }
        let mut buf = Vec::new();
        let back = f16::row_f32(&dst, &mut buf);
        assert!(back.iter().zip(&dst).all(|(b, d)| b.to_bits() == d.to_f32().to_bits()));
        // 1 + 2^-11 is halfway between 1 and the next f16 (1 + 2^-10): ties go to the even one, 1.
        assert_eq!(f16::round(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(f16::round(1.0 + 3.0 * 2f32.powi(-11)), 1.0 + 2.0 * 2f32.powi(-10));
    }
}
