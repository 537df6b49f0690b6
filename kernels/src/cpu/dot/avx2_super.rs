//! AVX2 kernels for the super-block formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) against Q8_K activations.
//!
//! A tile of `NR` weight rows × `TR` activation rows walks the super-blocks; in each it reads the block headers
//! (super-scales, the 16 group scales as i16 and, for the formats with minimums, the 16 group minimums) and then
//! streams the eight 32-value chunks: a chunk's codes are unpacked into one register and used at once by every
//! activation row of the tile (`vpmaddubsw` of code · activation pairs, then `vpmaddwd` with the chunk's group scales
//! gives i32 lane `l` = `scale · Σ code · a` over the chunk's values `4l..4l+4`), so nothing of a super-block is
//! kept beyond the chunk in hand. These are the exact integer lane sums of the scalar definition
//! (`scalar::dot_super`); each (row, activation row, super-block) then takes the same single fused multiply-add per
//! lane, and the minimum term the same `fma(dmin · d_a, Σ min · bsum, macc)` (the integer sum from one `vpmaddwd`
//! of the minimums and the activation group sums, reduced four outputs at a time), so every output has the scalar
//! bits whatever tile computes it. The pair sums stay inside i16: unsigned codes are at most 63
//! (`63 · 127 · 2 < 2^15`); the offsets of Q3_K (−4) and Q6_K (−32) are a second `vpmaddubsw` of the constant,
//! computed once per chunk and activation row for all weight rows of the tile and subtracted; IQ4_XS's signed table
//! values use the sign trick (`|w| · ±a`, at most `127 · 127 · 2`).
//!
//! Decode (one activation row) takes four weight rows per tile; more activation rows take two weight rows × up to
//! four activation rows, the unpacking of each chunk shared by the 4 rows (docs/PERFORMANCE.md, "Session 8, AMD EPYC
//! Zen 3 (AVX2): streaming K-quant kernels").
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::avx2::fold8;
use super::tag::{IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K};
use super::{Ctx, L2_WEIGHT_BYTES, Out, TileFn, Weights, prefetch_ahead};
use crate::DType;
use crate::superblock::{IQ4_VALUES, scale_min_k4_words, scales_iq4_xs};

/// Weight rows of the tiles of several activation rows.
const NP: usize = 2;

/// The tiles of [`drive_super`] for one format: `NP` weight rows × 4, 3, 2 activation rows, the same with one weight
/// row, and 1 × 1 (decode: one sequential weight stream, see `avx2::gemm`).
struct SuperKernels<'a> {
    multi: [TileFn<&'a QuantAct>; 3],
    multi1: [TileFn<&'a QuantAct>; 3],
    one: TileFn<&'a QuantAct>,
}

macro_rules! super_set {
    ($k:expr) => {
        SuperKernels {
            multi: [
                super_tile::<{ $k }, NP, 4> as TileFn<_>,
                super_tile::<{ $k }, NP, 3> as TileFn<_>,
                super_tile::<{ $k }, NP, 2> as TileFn<_>,
            ],
            multi1: [
                super_tile::<{ $k }, 1, 4> as TileFn<_>,
                super_tile::<{ $k }, 1, 3> as TileFn<_>,
                super_tile::<{ $k }, 1, 2> as TileFn<_>,
            ],
            one: super_tile::<{ $k }, 1, 1> as TileFn<_>,
        }
    };
}

/// # Safety
/// See [`super::gemm`]; AVX2, FMA and F16C are required; `a` is in the [`super::act::ActLayout::Super`] layout.
pub(super) unsafe fn gemm(w: &Weights<'_>, a: &QuantAct, t_rows: usize, rows: Range<usize>, out: Out) {
    let ctx = Ctx { w, x: a, out };
    let set = match w.dtype {
        DType::Q2_K => super_set!(Q2_K),
        DType::Q3_K => super_set!(Q3_K),
        DType::Q4_K => super_set!(Q4_K),
        DType::Q5_K => super_set!(Q5_K),
        DType::Q6_K => super_set!(Q6_K),
        _ => super_set!(IQ4_XS),
    };
    // SAFETY: forwarded from the caller.
    unsafe { drive_super(&ctx, rows, t_rows, &set) }
}

/// Walks the outputs `rows × 0..t_rows`: a group of weight rows that stays in L2, and over it the activation rows 4
/// at a time (the last 2 or 3 together, a last single row on the one-row decode tile), weight rows `NP` at a time
/// (one at a time on the decode tile) and the rest one by one. Every output is the same operations in the same order
/// whichever tile computes it.
///
/// # Safety
/// The CPU supports the kernels and `ctx` satisfies [`super::gemm`]'s size contract.
unsafe fn drive_super<'a>(ctx: &Ctx<'_, &'a QuantAct>, rows: Range<usize>, t_rows: usize, k: &SuperKernels<'a>) {
    let group = (L2_WEIGHT_BYTES / ctx.w.row_bytes.max(1)).max(NP);
    let mut g0 = rows.start;
    while g0 < rows.end {
        let g1 = (g0 + group).min(rows.end);
        let mut t = 0;
        while t < t_rows {
            let (tr, wide, single, nr) = match t_rows - t {
                1 => (1, k.one, k.one, 1),
                2 => (2, k.multi[2], k.multi1[2], NP),
                3 => (3, k.multi[1], k.multi1[1], NP),
                _ => (4, k.multi[0], k.multi1[0], NP),
            };
            let mut n = g0;
            while n + nr <= g1 {
                // SAFETY: rows n..n+nr and activation rows t..t+tr are inside the output (caller).
                unsafe { wide(ctx, n, t) };
                n += nr;
            }
            while n < g1 {
                // SAFETY: as above.
                unsafe { single(ctx, n, t) };
                n += 1;
            }
            t += tr;
        }
        g0 = g1;
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller points inside a block; F16C is available in the calling kernel.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32))) }
}

#[inline(always)]
unsafe fn u32_at(p: *const u8) -> u32 {
    // SAFETY: the caller points at 4 bytes inside a block.
    unsafe { p.cast::<u32>().read_unaligned() }
}

/// Header values of one weight super-block.
#[derive(Clone, Copy)]
struct Head {
    d: f32,
    dmin: f32,
    /// The 16 group scales as i16: `[0]` holds groups 0..8 in both 128-bit halves, `[1]` groups 8..16 (for
    /// [`chunk_scale`]).
    sc: [__m256i; 2],
    /// The 16 group minimums as i16 (formats with minimums).
    mins: __m256i,
}

/// Bytes `[0, 0, 1, 1, …, 7, 7]`: 8 per-chunk values spread over the chunk's two 16-value groups.
#[inline(always)]
unsafe fn dup_pairs(v: __m128i) -> __m128i {
    // SAFETY: SSSE3 is implied by the calling kernel's AVX2.
    unsafe { _mm_shuffle_epi8(v, _mm_set_epi8(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0)) }
}

/// Reads the header of the super-block at `blk`: `gsc` are the 16 signed group scales as bytes.
///
/// # Safety
/// AVX2/F16C must be available and `blk` must point at a whole block of the format.
#[inline(always)]
unsafe fn head<const KIND: u8>(blk: *const u8) -> Head {
    // SAFETY: every load stays inside the block (sizes in `DType::block_bytes`).
    unsafe {
        let low4 = _mm_set1_epi8(0x0f);
        let (d, dmin, gsc, mins) = match KIND {
            Q2_K => {
                let raw = _mm_loadu_si128(blk.cast());
                let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(raw), low4));
                (f16_at(blk.add(80)), f16_at(blk.add(82)), _mm_and_si128(raw, low4), mins)
            }
            Q3_K => {
                // The 6-bit scales of `superblock::scales_q3_k`, four at a time: low 4 bits from bytes 0..8, high
                // 2 bits from bytes 8..12.
                let s = blk.add(96);
                let (a0, a1, a2) = (u32_at(s), u32_at(s.add(4)), u32_at(s.add(8)));
                let (m2, m4) = (0x0303_0303u32, 0x0f0f_0f0fu32);
                let u0 = (a0 & m4) | ((a2 & m2) << 4);
                let u1 = (a1 & m4) | (((a2 >> 2) & m2) << 4);
                let u2 = ((a0 >> 4) & m4) | (((a2 >> 4) & m2) << 4);
                let u3 = ((a1 >> 4) & m4) | (((a2 >> 6) & m2) << 4);
                let v = _mm_set_epi32(u3 as i32, u2 as i32, u1 as i32, u0 as i32);
                (f16_at(blk.add(108)), 0.0, _mm_sub_epi8(v, _mm_set1_epi8(32)), _mm256_setzero_si256())
            }
            Q4_K | Q5_K => {
                let (sc, m) = scale_min_k4_words(std::slice::from_raw_parts(blk.add(4), 12));
                let (sc, m) = (_mm_cvtsi64_si128(sc as i64), _mm_cvtsi64_si128(m as i64));
                (f16_at(blk), f16_at(blk.add(2)), dup_pairs(sc), _mm256_cvtepu8_epi16(dup_pairs(m)))
            }
            Q6_K => (f16_at(blk.add(208)), 0.0, _mm_loadu_si128(blk.add(192).cast()), _mm256_setzero_si256()),
            _ => {
                let sc = scales_iq4_xs(std::slice::from_raw_parts(blk, 8));
                let v = _mm_loadl_epi64(sc.as_ptr().cast());
                (f16_at(blk), 0.0, dup_pairs(v), _mm256_setzero_si256())
            }
        };
        let s16 = _mm256_cvtepi8_epi16(gsc);
        Head {
            d,
            dmin,
            sc: [_mm256_permute2x128_si256::<0x00>(s16, s16), _mm256_permute2x128_si256::<0x11>(s16, s16)],
            mins,
        }
    }
}

/// The group scales of chunk `ch` (0..8) as i16: lanes 0..8 (values 0..16 of the chunk) group `2ch`, lanes 8..16
/// group `2ch + 1`.
#[inline(always)]
unsafe fn chunk_scale(h: &Head, ch: usize) -> __m256i {
    // SAFETY: AVX2 is available in the calling kernel.
    unsafe {
        // Byte indices of the two groups' i16 scales in the header register: each i16 lane of the mask picks bytes
        // (i, i + 1), the low 128 bits for group `2ch`, the high ones for group `2ch + 1`.
        let j = 4 * (ch % 4) as i16;
        let pick = |i: i16| i | ((i + 1) << 8);
        let mask = _mm256_set_m128i(_mm_set1_epi16(pick(j + 2)), _mm_set1_epi16(pick(j)));
        _mm256_shuffle_epi8(h.sc[ch / 4], mask)
    }
}

/// `v` shifted right by `n` bits in each 16-bit lane (`n` a constant after inlining).
#[inline(always)]
unsafe fn srl16(v: __m256i, n: usize) -> __m256i {
    // SAFETY: AVX2 is available in the calling kernel.
    unsafe {
        match n {
            0 => v,
            1 => _mm256_srli_epi16::<1>(v),
            2 => _mm256_srli_epi16::<2>(v),
            3 => _mm256_srli_epi16::<3>(v),
            4 => _mm256_srli_epi16::<4>(v),
            5 => _mm256_srli_epi16::<5>(v),
            6 => _mm256_srli_epi16::<6>(v),
            _ => _mm256_srli_epi16::<7>(v),
        }
    }
}

/// `v` shifted left by `n` bits in each 16-bit lane (`n` a constant after inlining).
#[inline(always)]
unsafe fn sll16(v: __m256i, n: usize) -> __m256i {
    // SAFETY: AVX2 is available in the calling kernel.
    unsafe {
        match n {
            0 => v,
            1 => _mm256_slli_epi16::<1>(v),
            2 => _mm256_slli_epi16::<2>(v),
            3 => _mm256_slli_epi16::<3>(v),
            _ => _mm256_slli_epi16::<4>(v),
        }
    }
}

/// Bit `bit` of each byte of `v` moved to bit `to` (other bits cleared).
#[inline(always)]
unsafe fn move_bit(v: __m256i, bit: usize, to: usize) -> __m256i {
    // SAFETY: AVX2 is available in the calling kernel. The masked bit stays inside its byte when shifted.
    unsafe {
        let m = _mm256_and_si256(v, _mm256_set1_epi8((1u8 << bit) as i8));
        if bit >= to { srl16(m, bit - to) } else { sll16(m, to - bit) }
    }
}

/// The 32 codes of chunk `ch` (0..8, a constant after inlining) of the super-block at `blk`, in element order:
/// unsigned (before the offset) or, for IQ4_XS, signed table values.
///
/// # Safety
/// AVX2 must be available and `blk` must point at a whole block of the format.
#[inline(always)]
unsafe fn chunk_codes<const KIND: u8>(blk: *const u8, ch: usize) -> __m256i {
    // SAFETY: every load stays inside the block (sizes in `DType::block_bytes`).
    unsafe {
        let low4 = _mm256_set1_epi8(0x0f);
        let low2 = _mm256_set1_epi8(3);
        let (h, g) = (ch / 4, ch % 4);
        match KIND {
            Q2_K => _mm256_and_si256(srl16(_mm256_loadu_si256(blk.add(16 + 32 * h).cast()), 2 * g), low2),
            Q3_K => {
                let low = _mm256_and_si256(srl16(_mm256_loadu_si256(blk.add(32 + 32 * h).cast()), 2 * g), low2);
                // Bit `ch` of each hmask byte is bit 2 of the code.
                _mm256_or_si256(low, move_bit(_mm256_loadu_si256(blk.cast()), ch, 2))
            }
            Q4_K | Q5_K => {
                let qs = blk.add(if KIND == Q5_K { 48 } else { 16 } + 32 * (ch / 2));
                let low = _mm256_and_si256(srl16(_mm256_loadu_si256(qs.cast()), 4 * (ch % 2)), low4);
                if KIND == Q5_K {
                    // Bit `ch` of each qh byte is bit 4 of the code.
                    _mm256_or_si256(low, move_bit(_mm256_loadu_si256(blk.add(16).cast()), ch, 4))
                } else {
                    low
                }
            }
            Q6_K => {
                let ql = _mm256_loadu_si256(blk.add(64 * h + 32 * (g % 2)).cast());
                let low = _mm256_and_si256(srl16(ql, 4 * (g / 2)), low4);
                // Bits 2g, 2g + 1 of each qh byte are bits 4, 5 of the code.
                let qh = _mm256_and_si256(
                    _mm256_loadu_si256(blk.add(128 + 32 * h).cast()),
                    _mm256_set1_epi8((3u8 << (2 * g)) as i8),
                );
                let high = if g < 2 { sll16(qh, 4 - 2 * g) } else { srl16(qh, 2 * g - 4) };
                _mm256_or_si256(low, high)
            }
            _ => {
                let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr().cast()));
                let q = _mm_loadu_si128(blk.add(8 + 16 * ch).cast());
                let idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), low4);
                _mm256_shuffle_epi8(table, idx)
            }
        }
    }
}

/// The i32 sums of four registers' lanes, in lanes 0..4.
#[inline(always)]
unsafe fn hsum4(v: [__m256i; 4]) -> __m128i {
    // SAFETY: AVX2 is available in the calling kernel.
    unsafe {
        let c = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c))
    }
}

/// `NR` weight rows from `n` times `TR` activation rows from `t0` (`NR · TR ≤ 8`), super-block by super-block.
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
            let blks: [*const u8; NR] = std::array::from_fn(|r| rows[r].add(b * bs));
            for r in 0..NR {
                for line in (0..bs).step_by(64) {
                    prefetch_ahead(blks[r].add(line));
                }
            }
            let heads: [Head; NR] = std::array::from_fn(|r| head::<KIND>(blks[r]));
            let aq: [*const i8; TR] = std::array::from_fn(|t| a.super_ptr(t0 + t, b));
            let mut sumi = [[_mm256_setzero_si256(); TR]; NR];
            macro_rules! chunk {
                ($ch:literal) => {{
                    let codes: [__m256i; NR] = std::array::from_fn(|r| chunk_codes::<KIND>(blks[r], $ch));
                    let scales: [__m256i; NR] = std::array::from_fn(|r| chunk_scale(&heads[r], $ch));
                    let wabs: [__m256i; NR] =
                        std::array::from_fn(|r| if KIND == IQ4_XS { _mm256_abs_epi8(codes[r]) } else { codes[r] });
                    for t in 0..TR {
                        let av = _mm256_loadu_si256(aq[t].add(32 * $ch).cast());
                        let offp = _mm256_maddubs_epi16(off, av);
                        for r in 0..NR {
                            let p = if KIND == IQ4_XS {
                                _mm256_maddubs_epi16(wabs[r], _mm256_sign_epi8(av, codes[r]))
                            } else if offset != 0 {
                                _mm256_sub_epi16(_mm256_maddubs_epi16(codes[r], av), offp)
                            } else {
                                _mm256_maddubs_epi16(codes[r], av)
                            };
                            sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_madd_epi16(p, scales[r]));
                        }
                    }
                }};
            }
            chunk!(0);
            chunk!(1);
            chunk!(2);
            chunk!(3);
            chunk!(4);
            chunk!(5);
            chunk!(6);
            chunk!(7);
            let da: [f32; TR] = std::array::from_fn(|t| *a.d_ptr(t0 + t, b));
            for r in 0..NR {
                for t in 0..TR {
                    let s = _mm256_set1_ps(heads[r].d * da[t]);
                    acc[r][t] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sumi[r][t]), acc[r][t]);
                }
            }
            if with_mins {
                // Σ min · bsum of each (row, activation row), four at a time.
                let bsums: [__m256i; TR] =
                    std::array::from_fn(|t| _mm256_loadu_si256(a.super_bsums(t0 + t, b).as_ptr().cast()));
                let mut prods = [_mm256_setzero_si256(); 8];
                for r in 0..NR {
                    for t in 0..TR {
                        prods[r * TR + t] = _mm256_madd_epi16(heads[r].mins, bsums[t]);
                    }
                }
                let mut mi = [0i32; 8];
                for q in 0..(NR * TR).div_ceil(4) {
                    let v = hsum4([prods[4 * q], prods[4 * q + 1], prods[4 * q + 2], prods[4 * q + 3]]);
                    _mm_storeu_si128(mi.as_mut_ptr().add(4 * q).cast(), v);
                }
                for r in 0..NR {
                    for t in 0..TR {
                        macc[r][t] = (heads[r].dmin * da[t]).mul_add(mi[r * TR + t] as f32, macc[r][t]);
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
