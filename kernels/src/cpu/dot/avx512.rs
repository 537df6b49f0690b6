//! AVX-512 kernels (F, BW, VL, VNNI): two 32-value blocks per 512-bit register, `vpdpbusd` for the integer dot
//! products. Lanes are arranged so that the arithmetic is exactly the canonical one of [`super`]:
//!
//! - 4-bit weights: the nibbles of blocks `e = 2j` and `o = 2j+1` unpack to `[e0..16, o0..16, e16..32, o16..32]`
//!   ([`super::act::ActLayout::Pair16`]); i32 lane `z` holds lane `l` of block parity `h` with
//!   `z = 4h + l % 4 + 8 (l / 4)`.
//! - Q8_0: blocks side by side, `z = 8h + l` ([`super::act::ActLayout::Pair32`]); `vpdpbusd` multiplies unsigned by
//!   signed bytes, so it computes `Σ (w + 128)·a − 128·Σ a` with the lane sums of `a` from the activation table.
//! - Float weights: two registers cover lanes `0..16` and `16..32` of the 32 accumulators.
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::tag::{BF16, F16, F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::{Ctx, Out, Rhs, Weights, block_pairs, drive, float_tile_set, prefetch_ahead, tile_set};
use crate::DType;

/// # Safety
/// See [`super::gemm`]; the CPU must support AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
pub(super) unsafe fn gemm(w: &Weights<'_>, x: Rhs<'_>, t_rows: usize, rows: Range<usize>, out: Out) {
    match x {
        Rhs::Float(x) => {
            let ctx = Ctx { w, x, out };
            let set = float_tile_set!(w.dtype, 2 x 4, 4);
            // SAFETY: forwarded from the caller.
            unsafe { drive(&ctx, rows, t_rows, set) }
        }
        Rhs::Quant(a) => {
            let ctx = Ctx { w, x: a, out };
            let set = match w.dtype {
                DType::Q8_0 => tile_set!(q8_tile, Q8_0, 2 x 4, 4),
                DType::Q4_0 => tile_set!(q4_tile, Q4_0, 2 x 4, 4),
                DType::Q5_0 => tile_set!(q4_tile, Q5_0, 2 x 4, 4),
                DType::Q5_1 => tile_set!(q4_tile, Q5_1, 2 x 4, 4),
                DType::Q4_K | DType::Q5_K | DType::Q6_K => {
                    // SAFETY: forwarded from the caller (the super-block formats have their own module).
                    return unsafe { super::avx512_super::gemm(w, a, t_rows, rows, out) };
                }
                _ => tile_set!(q4_tile, Q4_1, 2 x 4, 4),
            };
            // SAFETY: forwarded from the caller.
            unsafe { drive(&ctx, rows, t_rows, set) }
        }
    }
}

/// Canonical fold of 8 lanes (see [`super::fold8`]).
#[inline(always)]
unsafe fn fold4(u: __m128) -> f32 {
    // SAFETY: SSE is baseline on x86-64.
    unsafe {
        let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<1>(w, w)))
    }
}

/// Canonical fold of 8 lanes held in a 256-bit register.
#[inline(always)]
unsafe fn fold8(v: __m256) -> f32 {
    // SAFETY: AVX is available in the calling kernels.
    unsafe { fold4(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v))) }
}

/// The upper 256 bits of a 512-bit float register (AVX512F only; `vextractf32x8` would need DQ).
#[inline(always)]
unsafe fn high256(v: __m512) -> __m256 {
    // SAFETY: AVX512F is available in the calling kernels.
    unsafe { _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))) }
}

/// Word indices gathering the codes of a Q4_0 block pair (9 words per block) as `[e, o, e, o]`.
static Q4_0_CODES: [u16; 32] =
    [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17];
/// Word indices spreading the two Q4_0 scales over the Pair16 lanes (`[e×4, o×4, e×4, o×4]`).
static Q4_0_SCALES: [u16; 32] =
    [0, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// The same for Q5_0 (11 words per block: scale, 2 of fifth bits, 8 of codes).
static Q5_0_CODES: [u16; 32] =
    [3, 4, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 19, 20, 21, 3, 4, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 19, 20, 21];
static Q5_0_SCALES: [u16; 32] =
    [0, 0, 0, 0, 11, 11, 11, 11, 0, 0, 0, 0, 11, 11, 11, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Byte mask of the Pair16 bytes whose fifth bit is set, from the 32 fifth bits `he`, `ho` of blocks `e` and `o`
/// (bit `j` belongs to element `j`): bytes `[e0..16, o0..16, e16..32, o16..32]`.
#[inline(always)]
fn fifth_bits(he: u32, ho: u32) -> u64 {
    let (he, ho) = (he as u64, ho as u64);
    (he & 0xffff) | (ho & 0xffff) << 16 | (he >> 16) << 32 | (ho >> 16) << 48
}

/// 4- and 5-bit weights (Q4_0, Q4_1, Q5_0, Q5_1): `NR` weight rows from `n` times `TR` activation rows from `t0`, a
/// block pair at a time. The fifth bit of Q5_0/Q5_1 is added to the nibbles under a byte mask; Q5_0's offset of 16
/// (like Q4_0's 8) comes back through the activations' lane-sum table.
///
/// # Safety
/// The CPU features of [`gemm`]; rows `n..n+NR` and `t0..t0+TR` in range; activations in the Pair16 layout.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_tile<const KIND: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    let bs = match KIND {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 24,
    };
    let with_min = KIND == Q4_1 || KIND == Q5_1;
    let fifth = KIND == Q5_0 || KIND == Q5_1;
    // SAFETY: weight blocks `b < nb` of rows `n + r` and activation pairs of rows `t0 + t` are inside the buffers the
    // matmul checked; the missing odd block of a pair is never loaded (zeros stand in for it).
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let nibbles = _mm512_set1_epi8(0x0f);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
        // Shift counts per 16-bit word: the low half keeps the low nibbles, the high half gets the high ones.
        let shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
        // Q4_1 blocks are 5 dwords (header, 4 of codes): codes of e = dwords 1..5, of o = dwords 6..10; Q5_1 blocks
        // are 6 (header, fifth bits, 4 of codes).
        let (codes41, headers41) = if KIND == Q5_1 {
            (
                _mm512_setr_epi32(2, 3, 4, 5, 8, 9, 10, 11, 2, 3, 4, 5, 8, 9, 10, 11),
                _mm512_setr_epi32(0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6),
            )
        } else {
            (
                _mm512_setr_epi32(1, 2, 3, 4, 6, 7, 8, 9, 1, 2, 3, 4, 6, 7, 8, 9),
                _mm512_setr_epi32(0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5),
            )
        };
        // Q4_0 blocks are 9 words (scale, 8 of codes): codes of e = words 1..9, of o = words 10..18.
        let (codes40, scales40) = if KIND == Q5_0 {
            (_mm512_loadu_si512(Q5_0_CODES.as_ptr().cast()), _mm512_loadu_si512(Q5_0_SCALES.as_ptr().cast()))
        } else {
            (_mm512_loadu_si512(Q4_0_CODES.as_ptr().cast()), _mm512_loadu_si512(Q4_0_SCALES.as_ptr().cast()))
        };
        let sixteen = _mm512_set1_epi8(0x10);
        let mut acc = [[_mm512_setzero_ps(); TR]; NR];
        let mut macc = [[_mm_setzero_ps(); TR]; NR];
        macro_rules! step {
            ($b:expr, $full:expr) => {{
                let b = $b;
                let mut wz = [_mm512_setzero_si512(); NR];
                let mut wd = [_mm512_setzero_ps(); NR];
                let mut wh = [_mm_setzero_ps(); NR];
                for r in 0..NR {
                    let be = rows[r].add(b * bs);
                    prefetch_ahead(be);
                    // One masked load takes both blocks (40 or 36 bytes; only the even block's bytes when the odd
                    // one is missing, which then reads as zeros), permutes bring codes and scales into place.
                    if with_min {
                        let m = if KIND == Q5_1 { 0xfff } else { 0x3ff };
                        let raw = _mm512_maskz_loadu_epi32(if $full { m } else { m >> (bs / 4) }, be.cast());
                        let codes = _mm512_permutexvar_epi32(codes41, raw);
                        wz[r] = _mm512_and_si512(_mm512_srlv_epi16(codes, shift), nibbles);
                        // [d_e, m_e, d_o, m_o]
                        wh[r] = _mm_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi32(headers41, raw)));
                        wd[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(wh[r]));
                    } else {
                        let m = if KIND == Q5_0 { 0x3f_ffff } else { 0x3ffff };
                        let raw = _mm512_maskz_loadu_epi16(if $full { m } else { m >> (bs / 2) }, be.cast());
                        let codes = _mm512_permutexvar_epi16(codes40, raw);
                        wz[r] = _mm512_and_si512(_mm512_srlv_epi16(codes, shift), nibbles);
                        let d = _mm512_castsi512_si256(_mm512_permutexvar_epi16(scales40, raw));
                        wd[r] = _mm512_cvtph_ps(d);
                    }
                    if fifth {
                        let at = if KIND == Q5_0 { 2 } else { 4 };
                        let he = be.add(at).cast::<u32>().read_unaligned();
                        let ho = if $full { be.add(bs + at).cast::<u32>().read_unaligned() } else { 0 };
                        wz[r] = _mm512_or_si512(wz[r], _mm512_maskz_mov_epi8(fifth_bits(he, ho), sixteen));
                    }
                }
                for t in 0..TR {
                    let av = _mm512_loadu_si512(a.qs_ptr(t0 + t, b).cast());
                    let init = if KIND == Q4_0 || KIND == Q5_0 {
                        _mm512_loadu_si512(a.bias_ptr(t0 + t, b).cast())
                    } else {
                        _mm512_setzero_si512()
                    };
                    let da = _mm512_loadu_ps(a.dpat_ptr(t0 + t, b));
                    let sa = if with_min { _mm_loadu_ps(a.spat_ptr(t0 + t, b)) } else { _mm_setzero_ps() };
                    for r in 0..NR {
                        let p = _mm512_dpbusd_epi32(init, wz[r], av);
                        let sc = _mm512_mul_ps(wd[r], da);
                        acc[r][t] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc[r][t]);
                        if with_min {
                            macc[r][t] = _mm_fmadd_ps(wh[r], sa, macc[r][t]);
                        }
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
                let mut res = fold4(_mm_add_ps(c01, c23));
                if with_min {
                    let m = _mm_movehdup_ps(macc[r][t]);
                    res += _mm_cvtss_f32(_mm_add_ss(m, _mm_movehl_ps(m, m)));
                }
                c.out.put(t0 + t, n + r, res);
            }
        }
    }
}

/// Q8_0 weights: `NR` weight rows from `n` times `TR` activation rows from `t0`, a block pair at a time.
///
/// # Safety
/// As [`q4_tile`], with activations in the Pair32 layout and their `−128 · Σ a` lane table.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_tile<const KIND: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    const BS: usize = 34;
    // SAFETY: as in `q4_tile`.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [[_mm512_setzero_ps(); TR]; NR];
        macro_rules! step {
            ($b:expr, $full:expr) => {{
                let b = $b;
                let mut wz = [_mm512_setzero_si512(); NR];
                let mut wd = [_mm512_setzero_ps(); NR];
                for r in 0..NR {
                    let be = rows[r].add(b * BS);
                    // A pair is 68 bytes: one prefetch per pair would skip one line in 17.
                    prefetch_ahead(be);
                    prefetch_ahead(be.add(64));
                    let we = _mm256_loadu_si256(be.add(2).cast());
                    let (wo, ho) = if $full {
                        (_mm256_loadu_si256(be.add(BS + 2).cast()), be.add(BS).cast::<u16>().read_unaligned() as i32)
                    } else {
                        (_mm256_setzero_si256(), 0)
                    };
                    let he = be.cast::<u16>().read_unaligned() as i32;
                    // w + 128 as unsigned bytes (a missing odd block becomes 128s against zero activations)
                    wz[r] = _mm512_xor_si512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(we), wo), flip);
                    let h = _mm_cvtph_ps(_mm_cvtsi32_si128(he | (ho << 16)));
                    wd[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(h));
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
                c.out.put(t0 + t, n + r, fold8(_mm256_add_ps(_mm512_castps512_ps256(v), high256(v))));
            }
        }
    }
}

/// Loads 16 weights from element `i` of a row as f32, only the elements set in `mask`, zeros elsewhere.
#[inline(always)]
unsafe fn load16<const DT: u8>(row: *const u8, i: usize, mask: __mmask16) -> __m512 {
    // SAFETY: masked-off elements are not read; the caller keeps the selected ones inside the row.
    unsafe {
        match DT {
            F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, row.add(2 * i).cast())),
            BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                mask,
                row.add(2 * i).cast(),
            )))),
            _ => _mm512_maskz_loadu_ps(mask, row.add(4 * i).cast()),
        }
    }
}

/// Float weights: `NR` rows from `n` times `TR` f32 activation rows from `t0`, 32 values at a time.
///
/// # Safety
/// The CPU features of [`gemm`]; rows `n..n+NR` and `t0..t0+TR` in range.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn float_tile<const DT: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &[f32]>, n: usize, t0: usize) {
    let k = c.w.k;
    let elem = if DT == F32 { 4 } else { 2 };
    // SAFETY: full chunks are inside every row; the tail is read with masked loads that touch only the `k % 32`
    // remaining values.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let xs: [*const f32; TR] = std::array::from_fn(|t| c.x.as_ptr().add((t0 + t) * k));
        let mut acc = [[[_mm512_setzero_ps(); 2]; TR]; NR];
        macro_rules! step {
            ($i:expr, $m0:expr, $m1:expr) => {{
                let i = $i;
                for r in 0..NR {
                    for line in (0..32 * elem).step_by(64) {
                        prefetch_ahead(rows[r].add(i * elem + line));
                    }
                }
                let wv: [[__m512; 2]; NR] =
                    std::array::from_fn(|r| [load16::<DT>(rows[r], i, $m0), load16::<DT>(rows[r], i + 16, $m1)]);
                for t in 0..TR {
                    let x0 = _mm512_maskz_loadu_ps($m0, xs[t].add(i));
                    let x1 = _mm512_maskz_loadu_ps($m1, xs[t].add(i + 16));
                    for r in 0..NR {
                        acc[r][t][0] = _mm512_fmadd_ps(wv[r][0], x0, acc[r][t][0]);
                        acc[r][t][1] = _mm512_fmadd_ps(wv[r][1], x1, acc[r][t][1]);
                    }
                }
            }};
        }
        let full = k / 32;
        for blk in 0..full {
            step!(blk * 32, 0xffff, 0xffff);
        }
        let rem = k - full * 32;
        if rem > 0 {
            let m0 = ((1u32 << rem.min(16)) - 1) as __mmask16;
            let m1 = ((1u32 << rem.saturating_sub(16)) - 1) as __mmask16;
            step!(full * 32, m0, m1);
        }
        for r in 0..NR {
            for t in 0..TR {
                let v16 = _mm512_add_ps(acc[r][t][0], acc[r][t][1]);
                c.out.put(t0 + t, n + r, fold8(_mm256_add_ps(_mm512_castps512_ps256(v16), high256(v16))));
            }
        }
    }
}
