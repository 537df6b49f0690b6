//! Activation rows quantised to 8-bit blocks once per matmul, so quantised weights are multiplied with integer dot
//! products (llama.cpp's `vec_dot_type`). The block values are the same for every instruction set; only their byte
//! arrangement ([`ActLayout`]) follows what the chosen kernel loads.

use crate::quant::QK;

/// Byte arrangement of the quantised activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActLayout {
    /// Block after block, 32 signed values in element order (scalar and AVX2 kernels).
    Natural,
    /// Blocks in pairs `(2j, 2j+1)`, 64 signed values ordered as `[e0..16, o0..16, e16..32, o16..32]`: the order in
    /// which an AVX-512 kernel unpacks the nibbles of two 4-bit weight blocks.
    Pair16,
    /// Blocks in pairs, natural order, values stored as `q + 128` (unsigned) for `vpdpbusd` against signed Q8_0 weights.
    PairBiased,
}

impl ActLayout {
    fn paired(self) -> bool {
        self != ActLayout::Natural
    }
}

/// Quantised activation rows. `d`, `s` and the per-block tables have `blocks` entries per row, where `blocks` is the
/// block count rounded up to even for the paired layouts (the extra block is all zeros).
#[derive(Debug)]
pub(crate) struct QuantAct {
    pub layout: ActLayout,
    pub rows: usize,
    /// Blocks per row holding data (`K / 32`).
    pub nb: usize,
    /// Blocks per row in storage (`nb`, or `nb` rounded up to even when paired).
    pub blocks: usize,
    /// `rows × blocks × 32` quantised values.
    pub qs: Vec<u8>,
    /// Scale of each block: `x ≈ d · q`.
    pub d: Vec<f32>,
    /// `d · Σ q` of each block: the activation side of the `m` term of Q4_1.
    pub s: Vec<f32>,
    /// Q4_0 only: `−8 · Σ q` over each 4-value lane, 8 per block (16 per pair in the paired lane order), so that
    /// `Σ (w − 8)·a = Σ w·a + bias`.
    pub bias: Vec<i32>,
    /// Paired layouts only: each pair's scales spread over the 16 i32 lanes of a 512-bit dot product.
    pub dpat: Vec<f32>,
    /// [`ActLayout::Pair16`] only: `[0, s_e, 0, s_o]` of each pair, lined up with the `[d, m, d, m]` of weights.
    pub spat: Vec<f32>,
}

/// Quantises one block the way every kernel expects: `d = amax / 127`, `q = round_half_even(x · 127 / amax)`.
/// Rounding uses the add-and-subtract-2^23 trick so the loop vectorises on any target and rounds identically.
#[inline]
fn quantize_block(x: &[f32], q: &mut [i8; QK]) -> (f32, i32) {
    let mut amax = [0.0f32; 8];
    for c in x.chunks_exact(8) {
        for i in 0..8 {
            let a = c[i].abs();
            amax[i] = if a > amax[i] { a } else { amax[i] };
        }
    }
    let amax = amax.iter().fold(0.0f32, |m, &a| if a > m { a } else { m });
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds |v| < 2^22 to an integer, ties to even
    let mut sum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        let r = (xi * id + MAGIC) - MAGIC;
        let v = r.clamp(-127.0, 127.0) as i8;
        *qi = v;
        sum += v as i32;
    }
    (d, sum)
}

/// Lane order of a block's 8 four-value lanes inside a pair's 16 lanes for [`ActLayout::Pair16`].
#[inline]
pub(crate) const fn pair16_lane(odd: usize, lane: usize) -> usize {
    odd * 4 + (lane % 4) + 8 * (lane / 4)
}

/// Quantises `rows` rows of `k` values (`k % 32 == 0`) from `x` (row-major).
pub(crate) fn quantize_rows(x: &[f32], rows: usize, k: usize, layout: ActLayout, q4_0_bias: bool) -> QuantAct {
    let nb = k / QK;
    let blocks = if layout.paired() { nb.next_multiple_of(2) } else { nb };
    let pairs = blocks / 2;
    let mut act = QuantAct {
        layout,
        rows,
        nb,
        blocks,
        // Padding blocks hold the value 0 (stored as 0x80 in the biased layout).
        qs: vec![if layout == ActLayout::PairBiased { 0x80 } else { 0 }; rows * blocks * QK],
        d: vec![0.0; rows * blocks],
        s: vec![0.0; rows * blocks],
        bias: if q4_0_bias { vec![0; rows * blocks * 8] } else { Vec::new() },
        dpat: if layout.paired() { vec![0.0; rows * pairs * 16] } else { Vec::new() },
        spat: if layout == ActLayout::Pair16 { vec![0.0; rows * pairs * 4] } else { Vec::new() },
    };
    let mut q = [0i8; QK];
    for r in 0..rows {
        for b in 0..nb {
            let (d, sum) = quantize_block(&x[r * k + b * QK..r * k + (b + 1) * QK], &mut q);
            let blk = r * blocks + b;
            act.d[blk] = d;
            act.s[blk] = d * sum as f32;
            let (odd, pair_base) = (b % 2, (r * blocks + b - b % 2) * QK);
            match layout {
                ActLayout::Natural => {
                    for (o, &v) in act.qs[blk * QK..(blk + 1) * QK].iter_mut().zip(&q) {
                        *o = v as u8;
                    }
                }
                ActLayout::Pair16 => {
                    let pair = &mut act.qs[pair_base..pair_base + 2 * QK];
                    for j in 0..16 {
                        pair[odd * 16 + j] = q[j] as u8;
                        pair[32 + odd * 16 + j] = q[16 + j] as u8;
                    }
                }
                ActLayout::PairBiased => {
                    for (o, &v) in act.qs[blk * QK..(blk + 1) * QK].iter_mut().zip(&q) {
                        *o = (v as u8) ^ 0x80;
                    }
                }
            }
            if q4_0_bias {
                for lane in 0..8 {
                    let lane_sum: i32 = q[lane * 4..lane * 4 + 4].iter().map(|&v| v as i32).sum();
                    let idx = match layout {
                        ActLayout::Natural => blk * 8 + lane,
                        _ => (r * blocks + b - odd) * 8 + pair16_lane(odd, lane),
                    };
                    act.bias[idx] = -8 * lane_sum;
                }
            }
        }
        if layout.paired() {
            for p in 0..pairs {
                let (de, dd) = (act.d[r * blocks + 2 * p], act.d[r * blocks + 2 * p + 1]);
                let pat = &mut act.dpat[(r * pairs + p) * 16..(r * pairs + p + 1) * 16];
                for (z, v) in pat.iter_mut().enumerate() {
                    let odd = match layout {
                        ActLayout::Pair16 => (z / 4) % 2,
                        _ => z / 8,
                    };
                    *v = if odd == 0 { de } else { dd };
                }
                if layout == ActLayout::Pair16 {
                    let sp = &mut act.spat[(r * pairs + p) * 4..(r * pairs + p + 1) * 4];
                    sp[1] = act.s[r * blocks + 2 * p];
                    sp[3] = act.s[r * blocks + 2 * p + 1];
                }
            }
        }
    }
    act
}

impl QuantAct {
    /// Start of block `b` of row `r` (for paired layouts, `b` even is the start of the pair).
    #[inline(always)]
    pub(crate) fn qs_ptr(&self, r: usize, b: usize) -> *const u8 {
        debug_assert!(r < self.rows && b < self.blocks);
        self.qs.as_ptr().wrapping_add((r * self.blocks + b) * QK)
    }

    #[inline(always)]
    pub(crate) fn d_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.d.as_ptr().wrapping_add(r * self.blocks + b)
    }

    #[inline(always)]
    pub(crate) fn s_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.s.as_ptr().wrapping_add(r * self.blocks + b)
    }

    /// Q4_0 lane biases of block `b` (natural) or of the pair starting at even `b` (paired).
    #[inline(always)]
    pub(crate) fn bias_ptr(&self, r: usize, b: usize) -> *const i32 {
        self.bias.as_ptr().wrapping_add((r * self.blocks + b) * 8)
    }

    /// Scale pattern of the pair starting at even block `b`.
    #[inline(always)]
    pub(crate) fn dpat_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.dpat.as_ptr().wrapping_add((r * self.blocks + b) * 8)
    }

    /// `[0, s_e, 0, s_o]` of the pair starting at even block `b`.
    #[inline(always)]
    pub(crate) fn spat_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.spat.as_ptr().wrapping_add((r * self.blocks + b) * 2)
    }

    /// The 32 signed values of block `b` of row `r` in element order, whatever the layout.
    pub(crate) fn block_values(&self, r: usize, b: usize) -> [i8; QK] {
        let mut q = [0i8; QK];
        let blk = r * self.blocks + b;
        match self.layout {
            ActLayout::Natural => {
                for (o, &v) in q.iter_mut().zip(&self.qs[blk * QK..(blk + 1) * QK]) {
                    *o = v as i8;
                }
            }
            ActLayout::PairBiased => {
                for (o, &v) in q.iter_mut().zip(&self.qs[blk * QK..(blk + 1) * QK]) {
                    *o = (v ^ 0x80) as i8;
                }
            }
            ActLayout::Pair16 => {
                let odd = b % 2;
                let pair = &self.qs[(blk - odd) * QK..(blk - odd + 2) * QK];
                for j in 0..16 {
                    q[j] = pair[odd * 16 + j] as i8;
                    q[16 + j] = pair[32 + odd * 16 + j] as i8;
                }
            }
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_hold_the_same_values() {
        let k = 96;
        let x: Vec<f32> = (0..2 * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let nat = quantize_rows(&x, 2, k, ActLayout::Natural, true);
        for layout in [ActLayout::Pair16, ActLayout::PairBiased] {
            let other = quantize_rows(&x, 2, k, layout, true);
            assert_eq!(other.blocks, 4);
            for r in 0..2 {
                for b in 0..3 {
                    assert_eq!(nat.block_values(r, b), other.block_values(r, b));
                    assert_eq!(nat.d[r * 3 + b], other.d[r * 4 + b]);
                }
                assert_eq!(other.block_values(r, 3), [0; QK]);
            }
        }
    }

    #[test]
    fn rounding_is_half_even_and_bounded() {
        let mut x = [0.0f32; QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        x[3] = 0.5;
        let mut q = [0i8; QK];
        let (d, sum) = quantize_block(&x, &mut q);
        assert_eq!(d, 1.0);
        assert_eq!(&q[..4], &[127, 2, -4, 0]);
        assert_eq!(sum, 125);
    }
}
