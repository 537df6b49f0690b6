//! AVX-512 VNNI kernels for the super-block formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) against Q8_K activations.
//!
//! Two kernels compute the same exact integer lane sums of the scalar definition (`scalar::dot_super`), followed by
//! the same single fused multiply-add per lane and super-block and the same minimum term:
//!
//! - **Wide** (tiles of 2, 4 or 8 activation rows: prefill): a weight super-block is decoded once per tile into eight
//!   512-bit registers of i16 `scale · code` (offsets applied; at most 4096 in magnitude: 32 · 128 for Q6_K, 127 · 32
//!   for IQ4_XS), in element order; each activation row has its values widened to i16 once per matmul
//!   ([`QuantAct::q16`]), and `vpdpwssd` adds each value pair into i32 lane `j` of its 32-value chunk, all eight
//!   chunks into one register. Lane `l` of the definition is lanes `2l` and `2l + 1`; two activation rows' registers
//!   are folded into one with two `vpermt2d` and an add, converted, and multiplied by `d_w · d_a` of each row in one
//!   fused multiply-add. The minimum term (Q2_K, Q4_K, Q5_K), `Σ min · bsum` over the 16 groups, is eight `vpdpwssd`
//!   over the group-sum pairs of 8 activation rows side by side ([`QuantAct::bs_t`]), so its
//!   `fma(dmin · d_a, m, macc)` runs for 8 rows at once. Largest lane value: `4096 · 127 · 2 · 8` ≪ 2^31.
//! - **Narrow** (one activation row of Q4_K, Q5_K, Q6_K: the decode step; Q2_K, Q3_K and IQ4_XS take the AVX2
//!   kernel there): a weight super-block is unpacked into four registers of u8 codes (register `c` holds the
//!   32-value chunks `2c` and `2c + 1`) and four of i32 group scales; `vpdpbusd` gives each i32 lane the exact sum of
//!   its four code · activation products, `vpmulld` scales it, and the two chunks' lanes `l` and `l + 8` are added.
//!   Q6_K's offset of −32 enters through the accumulator: `vpdpbusd(−32 · Σ a, code, a)` over each lane's four
//!   values. The largest lane value, `|127 · 32 · 127| · 4 · 8` before the two halves meet, is far inside i32.
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::tag::{IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K};
use super::{Ctx, Out, TileFn, Weights, fold8, prefetch_ahead};
use crate::DType;
use crate::superblock::{IQ4_VALUES, scale_min_k4_words, scales_iq4_xs, scales_q3_k};

/// Bytes of weight rows worked on together so they stay in L2 while every activation row passes over them.
const L2_WEIGHT_BYTES: usize = 256 * 1024;

/// One tile shape: `tr` activation rows, `nr` weight rows, the tile function for `nr` rows and the one for a single
/// leftover row.
type Shape<'a> = (usize, usize, TileFn<&'a QuantAct>, TileFn<&'a QuantAct>);

/// The tile shapes of a format, widest activation tile first; the last, one activation row (the decode step), is
/// the narrow kernel's (Q4_K, Q5_K, Q6_K) or the AVX2 kernel's (`vpmaddubsw`; Q2_K, Q3_K, IQ4_XS), which stream a
/// single row faster than the widening does.
macro_rules! shapes {
    ($k:expr, $($one:ident)::+) => {
        [
            (8, 1, wide_tile::<{ $k }, 1, 8> as TileFn<_>, wide_tile::<{ $k }, 1, 8> as TileFn<_>),
            (4, 1, wide_tile::<{ $k }, 1, 4> as TileFn<_>, wide_tile::<{ $k }, 1, 4> as TileFn<_>),
            (2, 2, wide_tile::<{ $k }, 2, 2> as TileFn<_>, wide_tile::<{ $k }, 1, 2> as TileFn<_>),
            (1, 2, $($one)::+::<{ $k }, 2, 1> as TileFn<_>, $($one)::+::<{ $k }, 1, 1> as TileFn<_>),
        ]
    };
}

/// # Safety
/// See [`super::gemm`]; AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C are required; `w.dtype` is a super-block format
/// and `a` is in the [`super::act::ActLayout::Super`] layout with the wide tables.
pub(super) unsafe fn gemm(w: &Weights<'_>, a: &QuantAct, t_rows: usize, rows: Range<usize>, out: Out) {
    let shapes: [Shape<'_>; 4] = match w.dtype {
        DType::Q2_K => shapes!(Q2_K, super::avx2_super::super_tile),
        DType::Q3_K => shapes!(Q3_K, super::avx2_super::super_tile),
        DType::Q4_K => shapes!(Q4_K, super_tile),
        DType::Q5_K => shapes!(Q5_K, super_tile),
        DType::Q6_K => shapes!(Q6_K, super_tile),
        _ => shapes!(IQ4_XS, super::avx2_super::super_tile),
    };
    debug_assert!(t_rows < 2 || a.wide_ready(t_rows));
    let ctx = Ctx { w, x: a, out };
    let group = (L2_WEIGHT_BYTES / w.row_bytes.max(1)).max(2);
    let mut g0 = rows.start;
    while g0 < rows.end {
        let g1 = (g0 + group).min(rows.end);
        let mut t = 0;
        for &(tr, nr, f, f1) in &shapes {
            while t + tr <= t_rows {
                let mut n = g0;
                while n < g1 {
                    let (nr, f) = if n + nr <= g1 { (nr, f) } else { (1, f1) };
                    // SAFETY: the tile lies inside the output and the CPU supports the kernels (caller).
                    unsafe { f(&ctx, n, t) };
                    n += nr;
                }
                t += tr;
            }
        }
        g0 = g1;
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller points inside a block; F16C is available in the calling kernel.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32))) }
}

/// One weight super-block unpacked for the integer loop.
#[derive(Clone, Copy)]
struct Unpacked {
    /// Unsigned codes (before Q6_K's offset) of the value pairs `64c..64c + 64`.
    codes: [__m512i; 4],
    /// The group scale of each i32 lane of `codes[c]`.
    scales: [__m512i; 4],
    d: f32,
    dmin: f32,
    /// Minimum of each 16-value group as i16 (Q4_K, Q5_K).
    mins: __m256i,
}

/// For each i32 lane `z` of register `c` (values `64c + 4z .. 64c + 4z + 4`), the index of its `group`-value group.
const fn group_of_lanes(group: usize) -> [[u32; 16]; 4] {
    let mut t = [[0u32; 16]; 4];
    let mut c = 0;
    while c < 4 {
        let mut z = 0;
        while z < 16 {
            t[c][z] = ((64 * c + 4 * z) / group) as u32;
            z += 1;
        }
        c += 1;
    }
    t
}

/// Lane `z` of register `c` lies in 16-value group `4c + z / 4`.
static GROUP_OF_LANE: [[u32; 16]; 4] = group_of_lanes(16);

/// Lane `z` of register `c` lies in 32-value sub-block `2c + z / 8`.
static SUB_OF_LANE: [[u32; 16]; 4] = group_of_lanes(32);

/// Unpacks the super-block at `blk`.
///
/// # Safety
/// The CPU features of [`gemm`] must be available and `blk` must point at a whole block of the format.
#[inline(always)]
unsafe fn unpack<const KIND: u8>(blk: *const u8) -> Unpacked {
    // SAFETY: every load stays inside the block (sizes in `DType::block_bytes`).
    unsafe {
        let zero = _mm512_setzero_si512();
        let mut u = Unpacked { codes: [zero; 4], scales: [zero; 4], d: 0.0, dmin: 0.0, mins: _mm256_setzero_si256() };
        let low4 = _mm512_set1_epi8(0x0f);
        let low2 = _mm512_set1_epi8(3);
        match KIND {
            Q4_K | Q5_K => {
                u.d = f16_at(blk);
                u.dmin = f16_at(blk.add(2));
                let (sc, m) = scale_min_k4_words(std::slice::from_raw_parts(blk.add(4), 12));
                let sc32 = _mm512_cvtepu8_epi32(_mm_cvtsi64_si128(sc as i64));
                for c in 0..4 {
                    u.scales[c] = _mm512_permutexvar_epi32(_mm512_loadu_si512(SUB_OF_LANE[c].as_ptr().cast()), sc32);
                }
                // Minimum of group g = that of sub-block g / 2.
                let mv = _mm_cvtsi64_si128(m as i64);
                u.mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mv, mv));
                let qs = blk.add(if KIND == Q5_K { 48 } else { 16 });
                let qh = if KIND == Q5_K {
                    let h = _mm256_loadu_si256(blk.add(16).cast());
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h), _mm256_srli_epi16::<1>(h))
                } else {
                    zero
                };
                for c in 0..4 {
                    // Values 64c..64c+32 are the low nibbles of bytes 32c..32c+32, the next 32 their high nibbles.
                    let q = _mm256_loadu_si256(qs.add(32 * c).cast());
                    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16::<4>(q));
                    u.codes[c] = _mm512_and_si512(both, low4);
                    if KIND == Q5_K {
                        // Fifth bit of value 64c + i: bit 2c of qh[i]; of value 64c + 32 + i: bit 2c + 1.
                        let bit = _mm512_and_si512(
                            _mm512_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32)),
                            _mm512_set1_epi8(1),
                        );
                        u.codes[c] = _mm512_or_si512(u.codes[c], _mm512_slli_epi16::<4>(bit));
                    }
                }
            }
            _ => {
                u.d = f16_at(blk.add(208));
                let sc32 = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(192).cast()));
                for c in 0..4 {
                    u.scales[c] = _mm512_permutexvar_epi32(_mm512_loadu_si512(GROUP_OF_LANE[c].as_ptr().cast()), sc32);
                }
                for h in 0..2 {
                    // Half h: values 128h + 32j + l take the low (j = 0, 1) or high (j = 2, 3) nibble of
                    // ql[64h + 32(j % 2) + l] and bits 2j, 2j+1 of qh[32h + l].
                    let ql = _mm512_loadu_si512(blk.add(64 * h).cast());
                    let qh = _mm256_loadu_si256(blk.add(128 + 32 * h).cast());
                    let qh01 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
                    let qh23 = _mm512_srli_epi16::<4>(qh01);
                    let high = |v: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(v, low2));
                    u.codes[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, low4), high(qh01));
                    u.codes[2 * h + 1] =
                        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4), high(qh23));
                }
            }
        }
        u
    }
}

/// Sum of the 8 i32 lanes (exact).
#[inline(always)]
unsafe fn hsum8(v: __m256i) -> i32 {
    // SAFETY: AVX2 is available in the calling kernel.
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<1>(s)))
    }
}

/// `NR` weight rows from `n` times `TR` activation rows from `t0`, super-block by super-block.
///
/// # Safety
/// The CPU features of [`gemm`]; rows `n..n+NR` and `t0..t0+TR` must be in range.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn super_tile<const KIND: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    let (bs, with_mins) = match KIND {
        Q4_K => (144, true),
        Q5_K => (176, true),
        _ => (210, false),
    };
    // SAFETY: every pointer below stays inside the weight rows and activation tables whose sizes the matmul checked:
    // super-block `b < nb` of row `n + r < rows` and of activation row `t0 + t < t_rows`.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let mut acc = [[_mm256_setzero_ps(); TR]; NR];
        let mut macc = [[0.0f32; TR]; NR];
        let zero = _mm512_setzero_si512();
        let thirty_two = _mm512_set1_epi8(32);
        for b in 0..a.nb {
            // A loop rather than `array::from_fn`: LLVM may leave the closure of the latter out of line, and
            // the decoded registers then pass through memory.
            let mut u = [unpack::<KIND>(rows[0].add(b * bs)); NR];
            for r in 0..NR {
                let blk = rows[r].add(b * bs);
                for line in (0..bs).step_by(64) {
                    prefetch_ahead(blk.add(line));
                }
                if r > 0 {
                    u[r] = unpack::<KIND>(blk);
                }
            }
            for t in 0..TR {
                let aq = a.super_ptr(t0 + t, b);
                let av: [__m512i; 4] = std::array::from_fn(|i| _mm512_loadu_si512(aq.add(64 * i).cast()));
                // Q6_K: −32 · Σ a over each lane's four values, the offset's share of every weight row.
                let init: [__m512i; 4] = if KIND == Q6_K {
                    std::array::from_fn(|i| _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, thirty_two, av[i])))
                } else {
                    [zero; 4]
                };
                let da = *a.d_ptr(t0 + t, b);
                let bsums = if with_mins {
                    _mm256_loadu_si256(a.super_bsums(t0 + t, b).as_ptr().cast())
                } else {
                    _mm256_setzero_si256()
                };
                for r in 0..NR {
                    let mut sumi = zero;
                    for i in 0..4 {
                        let p = _mm512_dpbusd_epi32(init[i], u[r].codes[i], av[i]);
                        sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(p, u[r].scales[i]));
                    }
                    let lanes = _mm256_add_epi32(_mm512_castsi512_si256(sumi), _mm512_extracti64x4_epi64::<1>(sumi));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(u[r].d * da), _mm256_cvtepi32_ps(lanes), acc[r][t]);
                    if with_mins {
                        let mi = hsum8(_mm256_madd_epi16(bsums, u[r].mins));
                        macc[r][t] = (u[r].dmin * da).mul_add(mi as f32, macc[r][t]);
                    }
                }
            }
        }
        for r in 0..NR {
            for t in 0..TR {
                let v = super::avx2::fold8(acc[r][t]);
                c.out.put(t0 + t, n + r, if with_mins { v - macc[r][t] } else { v });
            }
        }
    }
}

/// Lane `z` of the two-row fold takes i32 lane `2z` (even) or `2z + 1` (odd) of the first register (`z < 8`) or of
/// the second (`z ≥ 8`, indices 16..32 of `vpermt2d`).
static EVEN: [u32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
static ODD: [u32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

/// Activation-row pair `p` of a tile: lanes 0..8 take the scale of row `2p`, lanes 8..16 that of row `2p + 1`.
static PAIR_ROWS: [[u32; 16]; 4] = {
    let mut t = [[0u32; 16]; 4];
    let mut p = 0;
    while p < 4 {
        let mut z = 0;
        while z < 16 {
            t[p][z] = (2 * p + z / 8) as u32;
            z += 1;
        }
        p += 1;
    }
    t
};

/// For i16 lane `z` of 32-value chunk `j`: the index of its 16-value group's scale, `2j + z / 16`.
static GROUP_OF_I16: [[u16; 32]; 8] = {
    let mut t = [[0u16; 32]; 8];
    let mut j = 0;
    while j < 8 {
        let mut z = 0;
        while z < 32 {
            t[j][z] = (2 * j + z / 16) as u16;
            z += 1;
        }
        j += 1;
    }
    t
};

/// The IQ4 codebook as i16, twice (the table of `vpermw`).
static IQ4_I16: [i16; 32] = {
    let mut t = [0i16; 32];
    let mut i = 0;
    while i < 32 {
        t[i] = IQ4_VALUES[i % 16] as i16;
        i += 1;
    }
    t
};

/// One weight super-block widened for `vpdpwssd`.
#[derive(Clone, Copy)]
struct Wide {
    /// `scale · code` (offsets applied) of the values `32j..32j + 32`, as i16 in element order.
    w: [__m512i; 8],
    d: f32,
    dmin: f32,
    /// Minimums of groups `2p` and `2p + 1` as the low and high i16 of one i32 (formats with minimums).
    mpairs: [i32; 8],
}

/// Decodes the super-block at `blk` for the wide kernel.
///
/// # Safety
/// The CPU features of [`gemm`] must be available and `blk` must point at a whole block of the format.
#[inline(always)]
unsafe fn widen<const KIND: u8>(blk: *const u8) -> Wide {
    // SAFETY: every load stays inside the block (sizes in `DType::block_bytes`); the scale arrays are local.
    unsafe {
        let zero = _mm512_setzero_si512();
        let mut u = Wide { w: [zero; 8], d: 0.0, dmin: 0.0, mpairs: [0; 8] };
        let low4 = _mm512_set1_epi16(0x0f);
        let low2 = _mm512_set1_epi16(3);
        let one = _mm512_set1_epi16(1);
        // 32 bytes widened to 32 i16.
        let wide = |p: *const u8| _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.cast()));
        // The 16 group scales as i16, spread over each chunk's two halves.
        let two_scales = |sc16: __m256i, j: usize| {
            _mm512_permutexvar_epi16(_mm512_loadu_si512(GROUP_OF_I16[j].as_ptr().cast()), _mm512_castsi256_si512(sc16))
        };
        match KIND {
            Q4_K | Q5_K => {
                u.d = f16_at(blk);
                u.dmin = f16_at(blk.add(2));
                let (sc, m) = scale_min_k4_words(std::slice::from_raw_parts(blk.add(4), 12));
                for j in 0..8 {
                    let mj = ((m >> (8 * j)) & 0xff) as i32;
                    u.mpairs[j] = mj | (mj << 16);
                }
                let qs = blk.add(if KIND == Q5_K { 48 } else { 16 });
                let mut qh = if KIND == Q5_K { wide(blk.add(16)) } else { zero };
                for c in 0..4 {
                    let q = wide(qs.add(32 * c));
                    let mut codes = [_mm512_and_si512(q, low4), _mm512_srli_epi16::<4>(q)];
                    for (h, code) in codes.iter_mut().enumerate() {
                        if KIND == Q5_K {
                            // Fifth bit of value 32j + i: bit j of qh[i].
                            *code = _mm512_or_si512(*code, _mm512_slli_epi16::<4>(_mm512_and_si512(qh, one)));
                            qh = _mm512_srli_epi16::<1>(qh);
                        }
                        let j = 2 * c + h;
                        u.w[j] = _mm512_mullo_epi16(*code, _mm512_set1_epi16(((sc >> (8 * j)) & 0xff) as i16));
                    }
                }
            }
            Q6_K => {
                u.d = f16_at(blk.add(208));
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192).cast()));
                let thirty_two = _mm512_set1_epi16(32);
                for h in 0..2 {
                    // Values 128h + 32r + i: nibble r / 2 of ql[64h + 32(r % 2) + i], bits 2r, 2r+1 of qh[32h + i].
                    let ql = [wide(blk.add(64 * h)), wide(blk.add(64 * h + 32))];
                    let mut qh = wide(blk.add(128 + 32 * h));
                    for r in 0..4 {
                        let low = if r < 2 { _mm512_and_si512(ql[r], low4) } else { _mm512_srli_epi16::<4>(ql[r - 2]) };
                        let high = _mm512_slli_epi16::<4>(_mm512_and_si512(qh, low2));
                        qh = _mm512_srli_epi16::<2>(qh);
                        let code = _mm512_sub_epi16(_mm512_or_si512(low, high), thirty_two);
                        let j = 4 * h + r;
                        u.w[j] = _mm512_mullo_epi16(code, two_scales(sc16, j));
                    }
                }
            }
            Q3_K => {
                u.d = f16_at(blk.add(108));
                let sc = scales_q3_k(std::slice::from_raw_parts(blk.add(96), 12));
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr().cast()));
                let four = _mm512_set1_epi16(4);
                let mut hm = wide(blk);
                for h in 0..2 {
                    let mut q = wide(blk.add(32 + 32 * h));
                    for g in 0..4 {
                        // Value 128h + 32g + i: bits 2g, 2g+1 of qs[32h + i]; minus 4 unless bit 4h + g of hmask[i].
                        let high = _mm512_slli_epi16::<2>(_mm512_and_si512(hm, one));
                        hm = _mm512_srli_epi16::<1>(hm);
                        let code = _mm512_sub_epi16(_mm512_or_si512(_mm512_and_si512(q, low2), high), four);
                        q = _mm512_srli_epi16::<2>(q);
                        let j = 4 * h + g;
                        u.w[j] = _mm512_mullo_epi16(code, two_scales(sc16, j));
                    }
                }
            }
            Q2_K => {
                u.d = f16_at(blk.add(80));
                u.dmin = f16_at(blk.add(82));
                let sm = _mm256_cvtepu8_epi16(_mm_loadu_si128(blk.cast()));
                let sc16 = _mm256_and_si256(sm, _mm256_set1_epi16(0x0f));
                // Minimums (high nibbles) of groups 2p and 2p + 1 are i16 lanes 2p and 2p + 1: i32 lane p.
                _mm256_storeu_si256(u.mpairs.as_mut_ptr().cast(), _mm256_srli_epi16::<4>(sm));
                for h in 0..2 {
                    let mut q = wide(blk.add(16 + 32 * h));
                    for g in 0..4 {
                        let j = 4 * h + g;
                        u.w[j] = _mm512_mullo_epi16(_mm512_and_si512(q, low2), two_scales(sc16, j));
                        q = _mm512_srli_epi16::<2>(q);
                    }
                }
            }
            _ => {
                u.d = f16_at(blk);
                let sc = scales_iq4_xs(std::slice::from_raw_parts(blk, 8));
                let table = _mm512_loadu_si512(IQ4_I16.as_ptr().cast());
                let low4y = _mm256_set1_epi16(0x0f);
                for j in 0..8 {
                    // Value 32j + i: nibble i / 16 of qs[16j + i % 16].
                    let q = _mm256_cvtepu8_epi16(_mm_loadu_si128(blk.add(8 + 16 * j).cast()));
                    let idx = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_and_si256(q, low4y)),
                        _mm256_srli_epi16::<4>(q),
                    );
                    let code = _mm512_permutexvar_epi16(idx, table);
                    u.w[j] = _mm512_mullo_epi16(code, _mm512_set1_epi16(sc[j] as i16));
                }
            }
        }
        u
    }
}

/// `acc += Σ_j vpdpwssd(w[j], a[32j..32j + 32])`: the 256 i16 products of a widened super-block and an activation
/// row, summed in pairs into the i32 lanes. Written as instructions because LLVM, tuning for a generic x86-64,
/// splits `vpdpwssd` into `vpmaddwd` and `vpaddd` (two operations where one does); the activations come straight
/// from memory at fixed offsets.
///
/// # Safety
/// AVX-512 F/VNNI must be available and `a` must point at 512 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dot8(acc: &mut __m512i, w: &[__m512i; 8], a: *const i16) {
    let _tmp: __m512i;
    // SAFETY: the caller guarantees the CPU features and the 512 bytes at `a`; the instructions only read them.
    unsafe {
        std::arch::asm!(
            "vpxord {tmp}, {tmp}, {tmp}",
            "vpdpwssd {acc}, {w0}, zmmword ptr [{a}]",
            "vpdpwssd {tmp}, {w1}, zmmword ptr [{a} + 64]",
            "vpdpwssd {acc}, {w2}, zmmword ptr [{a} + 128]",
            "vpdpwssd {tmp}, {w3}, zmmword ptr [{a} + 192]",
            "vpdpwssd {acc}, {w4}, zmmword ptr [{a} + 256]",
            "vpdpwssd {tmp}, {w5}, zmmword ptr [{a} + 320]",
            "vpdpwssd {acc}, {w6}, zmmword ptr [{a} + 384]",
            "vpdpwssd {tmp}, {w7}, zmmword ptr [{a} + 448]",
            "vpaddd {acc}, {acc}, {tmp}",
            acc = inout(zmm_reg) *acc,
            tmp = out(zmm_reg) _tmp,
            w0 = in(zmm_reg) w[0],
            w1 = in(zmm_reg) w[1],
            w2 = in(zmm_reg) w[2],
            w3 = in(zmm_reg) w[3],
            w4 = in(zmm_reg) w[4],
            w5 = in(zmm_reg) w[5],
            w6 = in(zmm_reg) w[6],
            w7 = in(zmm_reg) w[7],
            a = in(reg) a,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
}

/// `m += Σ_p vpdpwssd(sums[p], broadcast(pairs[p]))` on 8 i32 lanes (the minimum term of 8 activation rows).
///
/// # Safety
/// AVX-512 F/VL/VNNI must be available.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni")]
unsafe fn min_dot8(m: &mut __m256i, sums: &[__m256i; 8], pairs: &[i32; 8]) {
    // SAFETY: the caller guarantees the CPU features; `pairs` is 32 readable bytes.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {m}, {s0}, dword ptr [{p}]{{1to8}}",
            "vpdpwssd {m}, {s1}, dword ptr [{p} + 4]{{1to8}}",
            "vpdpwssd {m}, {s2}, dword ptr [{p} + 8]{{1to8}}",
            "vpdpwssd {m}, {s3}, dword ptr [{p} + 12]{{1to8}}",
            "vpdpwssd {m}, {s4}, dword ptr [{p} + 16]{{1to8}}",
            "vpdpwssd {m}, {s5}, dword ptr [{p} + 20]{{1to8}}",
            "vpdpwssd {m}, {s6}, dword ptr [{p} + 24]{{1to8}}",
            "vpdpwssd {m}, {s7}, dword ptr [{p} + 28]{{1to8}}",
            m = inout(ymm_reg) *m,
            s0 = in(ymm_reg) sums[0],
            s1 = in(ymm_reg) sums[1],
            s2 = in(ymm_reg) sums[2],
            s3 = in(ymm_reg) sums[3],
            s4 = in(ymm_reg) sums[4],
            s5 = in(ymm_reg) sums[5],
            s6 = in(ymm_reg) sums[6],
            s7 = in(ymm_reg) sums[7],
            p = in(reg) pairs.as_ptr(),
            options(pure, readonly, nostack, preserves_flags),
        );
    }
}

/// `NR` weight rows from `n` times `TR` (1, 2, 4 or 8) activation rows from `t0` with the wide kernel.
///
/// # Safety
/// The CPU features of [`gemm`]; rows `n..n+NR` and `t0..t0+TR` must be in range; the activations have the wide
/// tables.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn wide_tile<const KIND: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    let (bs, with_mins) = match KIND {
        Q2_K => (84, true),
        Q3_K => (110, false),
        Q4_K => (144, true),
        Q5_K => (176, true),
        Q6_K => (210, false),
        _ => (136, false),
    };
    let pairs = TR.div_ceil(2);
    let (nb, t_all) = (a.nb, a.rows);
    // SAFETY: every pointer below stays inside the weight rows and activation tables whose sizes the matmul checked:
    // super-block `b < nb` of row `n + r < rows` and of activation row `t0 + t < t_rows`; the transposed tables
    // are padded so that 8 rows may be read from any `t0 < t_rows`.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let zero = _mm512_setzero_si512();
        let mut facc = [[_mm512_setzero_ps(); 4]; NR];
        let mut macc = [_mm256_setzero_ps(); NR];
        let (even, odd) = (_mm512_loadu_si512(EVEN.as_ptr().cast()), _mm512_loadu_si512(ODD.as_ptr().cast()));
        for b in 0..nb {
            let da8 = _mm256_loadu_ps(a.d_t.as_ptr().add(b * t_all + t0));
            // A loop rather than `array::from_fn`: LLVM may leave the closure of the latter out of line, and
            // the decoded registers then pass through memory.
            let mut u = [widen::<KIND>(rows[0].add(b * bs)); NR];
            for r in 0..NR {
                let blk = rows[r].add(b * bs);
                for line in (0..bs).step_by(64) {
                    prefetch_ahead(blk.add(line));
                }
                if r > 0 {
                    u[r] = widen::<KIND>(blk);
                }
            }
            let aq: [*const i16; TR] = std::array::from_fn(|t| a.q16.as_ptr().add(((t0 + t) * nb + b) * 256));
            let mut acc = [[zero; TR]; NR];
            for t in 0..TR {
                for r in 0..NR {
                    dot8(&mut acc[r][t], &u[r].w, aq[t]);
                }
            }
            for r in 0..NR {
                let d = _mm512_set1_ps(u[r].d);
                for p in 0..pairs {
                    let (x, y) = (acc[r][2 * p], acc[r][(2 * p + 1).min(TR - 1)]);
                    let lanes =
                        _mm512_add_epi32(_mm512_permutex2var_epi32(x, even, y), _mm512_permutex2var_epi32(x, odd, y));
                    let da = _mm512_permutexvar_ps(
                        _mm512_loadu_si512(PAIR_ROWS[p].as_ptr().cast()),
                        _mm512_castps256_ps512(da8),
                    );
                    facc[r][p] = _mm512_fmadd_ps(_mm512_mul_ps(d, da), _mm512_cvtepi32_ps(lanes), facc[r][p]);
                }
                if with_mins {
                    let mut m = _mm256_setzero_si256();
                    let sums: [__m256i; 8] = std::array::from_fn(|p| {
                        _mm256_loadu_si256(a.bs_t.as_ptr().add((8 * b + p) * t_all + t0).cast())
                    });
                    min_dot8(&mut m, &sums, &u[r].mpairs);
                    let scale = _mm256_mul_ps(_mm256_set1_ps(u[r].dmin), da8);
                    macc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(m), macc[r]);
                }
            }
        }
        for r in 0..NR {
            let mut mins = [0.0f32; 8];
            _mm256_storeu_ps(mins.as_mut_ptr(), macc[r]);
            for p in 0..pairs {
                let mut lanes = [0.0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), facc[r][p]);
                for h in 0..2 {
                    let t = 2 * p + h;
                    if t < TR {
                        let v = fold8(lanes[8 * h..8 * h + 8].try_into().unwrap());
                        c.out.put(t0 + t, n + r, if with_mins { v - mins[t] } else { v });
                    }
                }
            }
        }
    }
}
