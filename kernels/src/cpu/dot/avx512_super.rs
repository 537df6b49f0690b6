//! AVX-512 VNNI kernels for the super-block formats Q4_K, Q5_K and Q6_K against Q8_K activations.
//!
//! A weight super-block is unpacked once per tile into four 512-bit registers of codes (64 values each, in element
//! order: register `c` holds the 32-value chunks `2c` and `2c + 1`) and four registers of i32 group scales, one per
//! i32 lane; then, for every activation row of the tile, `vpdpbusd` gives each i32 lane the exact sum of its four
//! code · activation products, `vpmulld` scales it, and the two chunks' lanes `l` and `l + 8` are added — the exact
//! integer lane sums of the scalar definition (`scalar::dot_super`), followed by the same single fused multiply-add
//! per lane and super-block and the same minimum term. Q6_K's offset of −32 enters through the accumulator:
//! `vpdpbusd(−32 · Σ a, code, a)` over each lane's four values (the `Σ a` computed once per activation row and
//! super-block, shared by the tile's weight rows). The largest lane value, `|127 · 32 · 127| · 4 · 8` before the two
//! halves meet, is far inside i32.
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::tag::{Q4_K, Q5_K, Q6_K};
use super::{Ctx, Out, Weights, drive, prefetch_ahead, tile_set};
use crate::DType;

/// # Safety
/// See [`super::gemm`]; AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C are required; `w.dtype` is Q4_K, Q5_K or Q6_K and
/// `a` is in the [`super::act::ActLayout::Super`] layout.
pub(super) unsafe fn gemm(w: &Weights<'_>, a: &QuantAct, t_rows: usize, rows: Range<usize>, out: Out) {
    let ctx = Ctx { w, x: a, out };
    let set = match w.dtype {
        DType::Q4_K => tile_set!(super_tile, Q4_K, 2 x 4, 2),
        DType::Q5_K => tile_set!(super_tile, Q5_K, 2 x 4, 2),
        _ => tile_set!(super_tile, Q6_K, 2 x 4, 2),
    };
    // SAFETY: forwarded from the caller.
    unsafe { drive(&ctx, rows, t_rows, set) }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller points inside a block; F16C is available in the calling kernel.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32))) }
}

/// The 6-bit scales (bytes of the first `u64`) and minimums (of the second) of the 8 sub-blocks of Q4_K and Q5_K,
/// the same values as `superblock::scale_min_k4`, computed on whole words as ggml's kernels do.
#[inline(always)]
unsafe fn scale_min_words(p: *const u8) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    // SAFETY: the caller points at the 12 scale bytes of a block.
    let [u0, u1, u2] = unsafe { [0, 1, 2].map(|i| p.add(4 * i).cast::<u32>().read_unaligned()) };
    let sc_lo = u0 & LOW6;
    let m_lo = u1 & LOW6;
    let sc_hi = (u2 & LOW4) | (((u0 >> 6) & LOW2) << 4);
    let m_hi = ((u2 >> 4) & LOW4) | (((u1 >> 6) & LOW2) << 4);
    (sc_lo as u64 | (sc_hi as u64) << 32, m_lo as u64 | (m_hi as u64) << 32)
}

/// One weight super-block unpacked for the integer loop.
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
                let (sc, m) = scale_min_words(blk.add(4));
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
            let u: [Unpacked; NR] = std::array::from_fn(|r| {
                let blk = rows[r].add(b * bs);
                for line in (0..bs).step_by(64) {
                    prefetch_ahead(blk.add(line));
                }
                unpack::<KIND>(blk)
            });
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
