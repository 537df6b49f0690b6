//! AVX2 kernels for the super-block formats Q4_K and Q6_K against Q8_K activations: 32 values per 256-bit register,
//! `vpmaddubsw` for code · activation pairs and `vpmaddwd` with the group scale, so i32 lane `l` of each 32-value
//! chunk gets `scale · Σ code · a` over its values `4l..4l+4` — the exact integer lane sums of the scalar definition
//! (`scalar::dot_super`), followed by the same one fused multiply-add per lane and super-block. Pair sums stay inside
//! i16: Q4_K codes are at most 15, Q6_K's at most 63 (`63 · 127 · 2 < 2^15`), and Q6_K's offset −32 is subtracted
//! as a second `vpmaddubsw` of 32s.
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::avx2::fold8;
use super::{Ctx, Out, Weights, drive, prefetch_ahead, tile_set};
use crate::DType;
use crate::superblock::scale_min_k4;

const Q4_K: u8 = 0;
const Q6_K: u8 = 1;

/// # Safety
/// See [`super::gemm`]; AVX2, FMA and F16C are required; `a` is in the [`super::act::ActLayout::Super`] layout.
pub(super) unsafe fn gemm(w: &Weights<'_>, a: &QuantAct, t_rows: usize, rows: Range<usize>, out: Out) {
    let ctx = Ctx { w, x: a, out };
    let set = match w.dtype {
        DType::Q4_K => tile_set!(super_tile, Q4_K, 2 x 2, 2),
        _ => tile_set!(super_tile, Q6_K, 2 x 2, 2),
    };
    // SAFETY: forwarded from the caller.
    unsafe { drive(&ctx, rows, t_rows, set) }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller points inside a block; F16C is available in the calling kernel.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32))) }
}

/// Two 16-bit scales spread over the halves of a register: `lo` for i16 lanes 0..8 (values 0..16 of a 32-value chunk),
/// `hi` for lanes 8..16.
#[inline(always)]
unsafe fn scale_pair(lo: i16, hi: i16) -> __m256i {
    // SAFETY: AVX2 is available in the calling kernel.
    unsafe { _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo)) }
}

/// `NR` weight rows from `n` times `TR` activation rows from `t0`, super-block by super-block.
///
/// # Safety
/// AVX2/FMA/F16C must be available; rows `n..n+NR` and `t0..t0+TR` must be in range.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn super_tile<const KIND: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    let bs = if KIND == Q4_K { 144 } else { 210 };
    // SAFETY: every pointer below stays inside the weight rows and activation tables whose sizes the matmul checked:
    // super-block `b < nb` of row `n + r < rows` and of activation row `t0 + t < t_rows`.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let mut acc = [[_mm256_setzero_ps(); TR]; NR];
        let mut macc = [[0.0f32; TR]; NR];
        let low4 = _mm256_set1_epi8(0x0f);
        for b in 0..a.nb {
            for r in 0..NR {
                let blk = rows[r].add(b * bs);
                for line in (0..bs).step_by(64) {
                    prefetch_ahead(blk.add(line));
                }
                if KIND == Q4_K {
                    let d = f16_at(blk);
                    let dmin = f16_at(blk.add(2));
                    let (sc, m) = scale_min_k4(std::slice::from_raw_parts(blk.add(4), 12));
                    let q: [__m256i; 4] = std::array::from_fn(|ch| _mm256_loadu_si256(blk.add(16 + 32 * ch).cast()));
                    for t in 0..TR {
                        let aq = a.super_ptr(t0 + t, b);
                        let mut sumi = _mm256_setzero_si256();
                        for ch in 0..4 {
                            let lo = _mm256_and_si256(q[ch], low4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q[ch]), low4);
                            let a_lo = _mm256_loadu_si256(aq.add(64 * ch).cast());
                            let a_hi = _mm256_loadu_si256(aq.add(64 * ch + 32).cast());
                            let p_lo =
                                _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_set1_epi16(sc[2 * ch] as i16));
                            let p_hi = _mm256_madd_epi16(
                                _mm256_maddubs_epi16(hi, a_hi),
                                _mm256_set1_epi16(sc[2 * ch + 1] as i16),
                            );
                            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
                        }
                        let da = *a.d_ptr(t0 + t, b);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc[r][t]);
                        let bsums = a.super_bsums(t0 + t, b);
                        let mut mi = 0i32;
                        for j in 0..8 {
                            mi += m[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
                        }
                        macc[r][t] = (dmin * da).mul_add(mi as f32, macc[r][t]);
                    }
                } else {
                    let d = f16_at(blk.add(208));
                    let sc = blk.add(192).cast::<i8>();
                    let mut codes = [[_mm256_setzero_si256(); 4]; 2];
                    let low2 = _mm256_set1_epi8(3);
                    for h in 0..2 {
                        let ql0 = _mm256_loadu_si256(blk.add(64 * h).cast());
                        let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32).cast());
                        let qh = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
                        let high = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, low2));
                        codes[h][0] = _mm256_or_si256(_mm256_and_si256(ql0, low4), high(qh));
                        codes[h][1] = _mm256_or_si256(_mm256_and_si256(ql1, low4), high(_mm256_srli_epi16::<2>(qh)));
                        codes[h][2] = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                            high(_mm256_srli_epi16::<4>(qh)),
                        );
                        codes[h][3] = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                            high(_mm256_srli_epi16::<6>(qh)),
                        );
                    }
                    let scales: [__m256i; 8] =
                        std::array::from_fn(|ch| scale_pair(*sc.add(2 * ch) as i16, *sc.add(2 * ch + 1) as i16));
                    let m32 = _mm256_set1_epi8(32);
                    for t in 0..TR {
                        let aq = a.super_ptr(t0 + t, b);
                        let mut sumi = _mm256_setzero_si256();
                        for ch in 0..8 {
                            let av = _mm256_loadu_si256(aq.add(32 * ch).cast());
                            let p = _mm256_sub_epi16(
                                _mm256_maddubs_epi16(codes[ch / 4][ch % 4], av),
                                _mm256_maddubs_epi16(m32, av),
                            );
                            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales[ch]));
                        }
                        let da = *a.d_ptr(t0 + t, b);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(sumi), acc[r][t]);
                    }
                }
            }
        }
        for r in 0..NR {
            for t in 0..TR {
                let v = fold8(acc[r][t]);
                c.out.put(t0 + t, n + r, if KIND == Q4_K { v - macc[r][t] } else { v });
            }
        }
    }
}
