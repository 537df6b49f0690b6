//! AVX-512 VNNI kernel for IQ4_NL: 32-value blocks of 4-bit indices into the 16-entry codebook
//! ([`crate::superblock::IQ4_VALUES`]) with one f16 scale, against the activations quantised to 8-bit blocks.
//!
//! The arithmetic is the canonical one of [`super`] with the table value as the weight code. Two blocks share a
//! 512-bit register in the Pair16 order (`[e0..16, o0..16, e16..32, o16..32]`, [`super::act::ActLayout::Pair16`]),
//! as the other 4-bit formats do: the nibbles are brought into place by one word permutation, and `vpshufb` looks
//! each one up in the codebook shifted by 128 (`w + 128`, 1..=241, unsigned as `vpdpbusd` needs); the
//! activations' lane-sum table (`−128 · Σ a` per lane) starts each lane's sum, so `vpdpbusd` gives the exact
//! `Σ w · a` of its four values. Largest magnitude: `241 · 127 · 4 + 128 · 127 · 4`, far inside i32.
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::tag::IQ4_NL;
use super::{Ctx, Out, Weights, block_pairs, drive, prefetch_ahead, tile_set};
use crate::superblock::IQ4_VALUES;

/// Bytes of an IQ4_NL block: f16 scale and 16 bytes of index pairs.
const BS: usize = 18;

/// # Safety
/// See [`super::gemm`]; AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C are required; `w.dtype` is IQ4_NL and `a` is in the
/// Pair16 layout with the lane-sum table of factor −128.
pub(super) unsafe fn gemm(w: &Weights<'_>, a: &QuantAct, t_rows: usize, rows: Range<usize>, out: Out) {
    let ctx = Ctx { w, x: a, out };
    let set = tile_set!(nl_tile, IQ4_NL, 2 x 4, 4);
    // SAFETY: forwarded from the caller.
    unsafe { drive(&ctx, rows, t_rows, set) }
}

/// Word indices gathering the index bytes of a block pair (9 words per block: scale, 8 of indices) as
/// `[e, o, e, o]`.
static CODES: [u16; 32] =
    [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17];
/// Word indices spreading the two scales over the Pair16 lanes (`[e×4, o×4, e×4, o×4]`).
static SCALES: [u16; 32] =
    [0, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The codebook plus 128, as unsigned bytes, in each 128-bit lane (the table of `vpshufb`).
static TABLE: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        t[i] = (IQ4_VALUES[i % 16] as i16 + 128) as u8;
        i += 1;
    }
    t
};

/// Canonical fold of 8 lanes held in a 128-bit register pair sum (see [`super::fold8`]).
#[inline(always)]
unsafe fn fold4(u: __m128) -> f32 {
    // SAFETY: SSE is baseline on x86-64.
    unsafe {
        let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<1>(w, w)))
    }
}

/// `NR` weight rows from `n` times `TR` activation rows from `t0`, a block pair at a time.
///
/// # Safety
/// The CPU features of [`gemm`]; rows `n..n+NR` and `t0..t0+TR` in range; activations as [`gemm`] says.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn nl_tile<const KIND: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    debug_assert_eq!(KIND, IQ4_NL);
    // SAFETY: weight blocks `b < nb` of rows `n + r` and activation pairs of rows `t0 + t` are inside the buffers the
    // matmul checked; the missing odd block of a pair is never loaded (zeros stand in for it).
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let nibbles = _mm512_set1_epi8(0x0f);
        // Shift counts per 16-bit word: the low half keeps the low nibbles, the high half gets the high ones.
        let shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
        let codes_idx = _mm512_loadu_si512(CODES.as_ptr().cast());
        let scales_idx = _mm512_loadu_si512(SCALES.as_ptr().cast());
        let table = _mm512_loadu_si512(TABLE.as_ptr().cast());
        let mut acc = [[_mm512_setzero_ps(); TR]; NR];
        macro_rules! step {
            ($b:expr, $full:expr) => {{
                let b = $b;
                let mut wz = [_mm512_setzero_si512(); NR];
                let mut wd = [_mm512_setzero_ps(); NR];
                for r in 0..NR {
                    let be = rows[r].add(b * BS);
                    prefetch_ahead(be);
                    // One masked load takes both blocks (36 bytes; only the even block's when the odd one is
                    // missing: its indices then read as zeros, looked up as a value that meets zero activations).
                    let m: u32 = 0x3ffff;
                    let raw = _mm512_maskz_loadu_epi16(if $full { m } else { m >> (BS / 2) }, be.cast());
                    let idx =
                        _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi16(codes_idx, raw), shift), nibbles);
                    wz[r] = _mm512_shuffle_epi8(table, idx);
                    wd[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(scales_idx, raw)));
                }
                for t in 0..TR {
                    let av = _mm512_loadu_si512(a.qs_ptr(t0 + t, b).cast());
                    let init = _mm512_loadu_si512(a.bias_ptr(t0 + t, b).cast());
                    let da = _mm512_loadu_ps(a.dpat_ptr(t0 + t, b));
                    for r in 0..NR {
                        let p = _mm512_dpbusd_epi32(init, wz[r], av);
                        let sc = _mm512_mul_ps(wd[r], da);
                        acc[r][t] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc[r][t]);
                    }
                }
            }};
        }
        block_pairs!(a.nb, step);
        for r in 0..NR {
            for t in 0..TR {
                let v = acc[r][t];
                let c01 = _mm_add_ps(_mm512_extractf32x4_ps::<0>(v), _mm512_extractf32x4_ps::<1>(v));
                let c23 = _mm_add_ps(_mm512_extractf32x4_ps::<2>(v), _mm512_extractf32x4_ps::<3>(v));
                c.out.put(t0 + t, n + r, fold4(_mm_add_ps(c01, c23)));
            }
        }
    }
}
