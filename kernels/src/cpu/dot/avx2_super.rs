//! AVX2 kernels for the super-block formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) against Q8_K activations.
//!
//! Each weight super-block is first unpacked into eight registers of 32 codes (one per 32-value chunk, in element
//! order) and eight registers of 16-bit group scales; then, per activation row, `vpmaddubsw` multiplies code ·
//! activation pairs and `vpmaddwd` with the scales gives i32 lane `l` of each chunk `scale · Σ code · a` over its
//! values `4l..4l+4` — the exact integer lane sums of the scalar definition (`scalar::dot_super`), followed by the
//! same single fused multiply-add per lane and super-block, and the same minimum term. The pair sums stay inside i16:
//! unsigned codes are at most 63 (`63 · 127 · 2 < 2^15`); the offsets of Q3_K (−4) and Q6_K (−32) are a second
//! `vpmaddubsw` of the constant, subtracted; IQ4_XS's signed table values use the sign trick (`|w| · ±a`, at most
//! `127 · 127 · 2`).
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::avx2::fold8;
use super::tag::{IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K};
use super::{Ctx, Out, Weights, drive, prefetch_ahead, tile_set};
use crate::DType;
use crate::superblock::{IQ4_VALUES, scale_min_k4, scales_iq4_xs, scales_q3_k};

/// # Safety
/// See [`super::gemm`]; AVX2, FMA and F16C are required; `a` is in the [`super::act::ActLayout::Super`] layout.
pub(super) unsafe fn gemm(w: &Weights<'_>, a: &QuantAct, t_rows: usize, rows: Range<usize>, out: Out) {
    let ctx = Ctx { w, x: a, out };
    let set = match w.dtype {
        DType::Q2_K => tile_set!(super_tile, Q2_K, 2 x 2, 4),
        DType::Q3_K => tile_set!(super_tile, Q3_K, 2 x 2, 4),
        DType::Q4_K => tile_set!(super_tile, Q4_K, 2 x 2, 4),
        DType::Q5_K => tile_set!(super_tile, Q5_K, 2 x 2, 4),
        DType::Q6_K => tile_set!(super_tile, Q6_K, 2 x 2, 4),
        _ => tile_set!(super_tile, IQ4_XS, 2 x 2, 4),
    };
    // SAFETY: forwarded from the caller.
    unsafe { drive(&ctx, rows, t_rows, set) }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller points inside a block; F16C is available in the calling kernel.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32))) }
}

/// Two 16-bit scales spread over the halves of a register: `lo` for i16 lanes 0..8 (values 0..16 of a 32-value
/// chunk), `hi` for lanes 8..16.
#[inline(always)]
unsafe fn scale_pair(lo: i16, hi: i16) -> __m256i {
    // SAFETY: AVX2 is available in the calling kernel.
    unsafe { _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo)) }
}

/// One weight super-block unpacked for the integer loop.
struct Unpacked {
    /// Codes of the eight 32-value chunks: unsigned (before the offset) or, for IQ4_XS, signed table values.
    codes: [__m256i; 8],
    /// Group scales of each chunk ([`scale_pair`]).
    scales: [__m256i; 8],
    d: f32,
    dmin: f32,
    /// Minimum of each 16-value group (formats with minimums).
    mins: [i16; 16],
}

/// Unpacks the super-block at `blk`.
///
/// # Safety
/// AVX2/F16C must be available and `blk` must point at a whole block of the format.
#[inline(always)]
unsafe fn unpack<const KIND: u8>(blk: *const u8) -> Unpacked {
    // SAFETY: every load stays inside the block (sizes in `DType::block_bytes`).
    unsafe {
        let zero = _mm256_setzero_si256();
        let mut u = Unpacked { codes: [zero; 8], scales: [zero; 8], d: 0.0, dmin: 0.0, mins: [0; 16] };
        let low4 = _mm256_set1_epi8(0x0f);
        let low2 = _mm256_set1_epi8(3);
        let one = _mm256_set1_epi8(1);
        match KIND {
            Q2_K => {
                u.d = f16_at(blk.add(80));
                u.dmin = f16_at(blk.add(82));
                let sc = std::slice::from_raw_parts(blk, 16);
                for h in 0..2 {
                    let q = _mm256_loadu_si256(blk.add(16 + 32 * h).cast());
                    u.codes[4 * h] = _mm256_and_si256(q, low2);
                    u.codes[4 * h + 1] = _mm256_and_si256(_mm256_srli_epi16::<2>(q), low2);
                    u.codes[4 * h + 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low2);
                    u.codes[4 * h + 3] = _mm256_and_si256(_mm256_srli_epi16::<6>(q), low2);
                }
                for ch in 0..8 {
                    u.scales[ch] = scale_pair((sc[2 * ch] & 0x0f) as i16, (sc[2 * ch + 1] & 0x0f) as i16);
                }
                for g in 0..16 {
                    u.mins[g] = (sc[g] >> 4) as i16;
                }
            }
            Q3_K => {
                u.d = f16_at(blk.add(108));
                let sc = scales_q3_k(std::slice::from_raw_parts(blk.add(96), 12));
                let mut hm = _mm256_loadu_si256(blk.cast());
                for h in 0..2 {
                    let q = _mm256_loadu_si256(blk.add(32 + 32 * h).cast());
                    let low = [q, _mm256_srli_epi16::<2>(q), _mm256_srli_epi16::<4>(q), _mm256_srli_epi16::<6>(q)];
                    for g in 0..4 {
                        // Bit `ch` of each hmask byte; after `ch` one-bit shifts of the 16-bit lanes, bit 0 of
                        // each byte still comes from that byte.
                        let high = _mm256_slli_epi16::<2>(_mm256_and_si256(hm, one));
                        hm = _mm256_srli_epi16::<1>(hm);
                        u.codes[4 * h + g] = _mm256_or_si256(_mm256_and_si256(low[g], low2), high);
                    }
                }
                for ch in 0..8 {
                    u.scales[ch] = scale_pair(sc[2 * ch] as i16, sc[2 * ch + 1] as i16);
                }
            }
            Q4_K | Q5_K => {
                u.d = f16_at(blk);
                u.dmin = f16_at(blk.add(2));
                let (sc, m) = scale_min_k4(std::slice::from_raw_parts(blk.add(4), 12));
                let qs = blk.add(if KIND == Q5_K { 48 } else { 16 });
                let mut qh = _mm256_loadu_si256(blk.add(16).cast());
                for c in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(32 * c).cast());
                    u.codes[2 * c] = _mm256_and_si256(q, low4);
                    u.codes[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
                    if KIND == Q5_K {
                        for j in 2 * c..2 * c + 2 {
                            let high = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, one));
                            qh = _mm256_srli_epi16::<1>(qh);
                            u.codes[j] = _mm256_or_si256(u.codes[j], high);
                        }
                    }
                }
                for j in 0..8 {
                    u.scales[j] = _mm256_set1_epi16(sc[j] as i16);
                    u.mins[2 * j] = m[j] as i16;
                    u.mins[2 * j + 1] = m[j] as i16;
                }
            }
            Q6_K => {
                u.d = f16_at(blk.add(208));
                let sc = blk.add(192).cast::<i8>();
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(blk.add(64 * h).cast());
                    let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32).cast());
                    let qh = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
                    let high = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, low2));
                    u.codes[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, low4), high(qh));
                    u.codes[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, low4), high(_mm256_srli_epi16::<2>(qh)));
                    u.codes[4 * h + 2] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                        high(_mm256_srli_epi16::<4>(qh)),
                    );
                    u.codes[4 * h + 3] = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                        high(_mm256_srli_epi16::<6>(qh)),
                    );
                }
                for ch in 0..8 {
                    u.scales[ch] = scale_pair(*sc.add(2 * ch) as i16, *sc.add(2 * ch + 1) as i16);
                }
            }
            _ => {
                u.d = f16_at(blk);
                let sc = scales_iq4_xs(std::slice::from_raw_parts(blk, 8));
                let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr().cast()));
                for j in 0..8 {
                    let q = _mm_loadu_si128(blk.add(8 + 16 * j).cast());
                    let idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), low4);
                    u.codes[j] = _mm256_shuffle_epi8(table, idx);
                    u.scales[j] = _mm256_set1_epi16(sc[j] as i16);
                }
            }
        }
        u
    }
}

/// `NR` weight rows from `n` times `TR` activation rows from `t0`, super-block by super-block.
///
/// # Safety
/// AVX2/FMA/F16C must be available; rows `n..n+NR` and `t0..t0+TR` must be in range.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn super_tile<const KIND: u8, const NR: usize, const TR: usize>(
    c: &Ctx<'_, &QuantAct>,
    n: usize,
    t0: usize,
) {
    let a = c.x;
    let (bs, offset, with_mins) = match KIND {
        Q2_K => (84, 0, true),
        Q3_K => (110, 4, false),
        Q4_K => (144, 0, true),
        Q5_K => (176, 0, true),
        Q6_K => (210, 32, false),
        _ => (136, 0, false),
    };
    // SAFETY: every pointer below stays inside the weight rows and activation tables whose sizes the matmul checked:
    // super-block `b < nb` of row `n + r < rows` and of activation row `t0 + t < t_rows`.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let mut acc = [[_mm256_setzero_ps(); TR]; NR];
        let mut macc = [[0.0f32; TR]; NR];
        let off = _mm256_set1_epi8(offset as i8);
        for b in 0..a.nb {
            for r in 0..NR {
                let blk = rows[r].add(b * bs);
                for line in (0..bs).step_by(64) {
                    prefetch_ahead(blk.add(line));
                }
                let u = unpack::<KIND>(blk);
                for t in 0..TR {
                    let aq = a.super_ptr(t0 + t, b);
                    let mut sumi = _mm256_setzero_si256();
                    for ch in 0..8 {
                        let av = _mm256_loadu_si256(aq.add(32 * ch).cast());
                        let p = if KIND == IQ4_XS {
                            _mm256_maddubs_epi16(_mm256_abs_epi8(u.codes[ch]), _mm256_sign_epi8(av, u.codes[ch]))
                        } else if offset != 0 {
                            _mm256_sub_epi16(_mm256_maddubs_epi16(u.codes[ch], av), _mm256_maddubs_epi16(off, av))
                        } else {
                            _mm256_maddubs_epi16(u.codes[ch], av)
                        };
                        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, u.scales[ch]));
                    }
                    let da = *a.d_ptr(t0 + t, b);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(u.d * da), _mm256_cvtepi32_ps(sumi), acc[r][t]);
                    if with_mins {
                        let bsums = a.super_bsums(t0 + t, b);
                        let mut mi = 0i32;
                        for g in 0..16 {
                            mi += u.mins[g] as i32 * bsums[g] as i32;
                        }
                        macc[r][t] = (u.dmin * da).mul_add(mi as f32, macc[r][t]);
                    }
                }
            }
        }
        for r in 0..NR {
            for t in 0..TR {
                let v = fold8(acc[r][t]);
                c.out.put(t0 + t, n + r, if with_mins { v - macc[r][t] } else { v });
            }
        }
    }
}
