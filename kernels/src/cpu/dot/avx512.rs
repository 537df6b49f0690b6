//! AVX-512 kernels (F, BW, VL, VNNI): two 32-value blocks per 512-bit register, `vpdpbusd` for the integer dot
//! products. Lanes are arranged so that the arithmetic is exactly the canonical one of [`super`]:
//!
//! - Quantised weights: i32 lane `z = 2l + h` of a block pair holds lane `l` of block parity `h`
//!   ([`super::act::ActLayout::Pair`]): for 4-bit weights the low nibbles of the two blocks' code dwords
//!   interleaved, then the high ones; for Q8_0 the two blocks' dwords interleaved. `vpdpbusd` multiplies unsigned by
//!   signed bytes, so Q8_0 computes `Σ (w + 128)·a − 128·Σ a` with the lane sums of `a` from the activation table;
//!   with more than four activation rows the activations are stored as unsigned `a + 128` instead
//!   ([`QuantAct::unsigned`]) and Q8_0 computes `Σ w·(a + 128) − 128·Σ w`, the weights' lane sums computed once per
//!   block pair and weight row, so a row of the multi-row kernel loads nothing but its activations ([`Q8_0U`]).
//!   IQ4_NL blocks are laid out as Q4_0's; their codes index the non-linear table, stored here plus 128 (unsigned
//!   bytes), and the dot product subtracts `128·Σ a` with the lane sums of `a`, as for Q8_0.
//!   Since the parity alternates from lane to lane, `[x_e, x_o]` broadcast as one 64-bit value gives every lane its
//!   block's scale: the multi-row kernel ([`multi_row`]) takes each activation row's scale products that way.
//! - Float weights: two registers cover lanes `0..16` and `16..32` of the 32 accumulators.
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::tag::{BF16, F16, F32, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::{
    Ctx, L2_WEIGHT_BYTES, Out, Rhs, TileFn, Weights, block_pairs, drive, float_tile_set, prefetch_ahead, tile_set,
};
use crate::DType;
use crate::quant::QK;
use crate::superblock::IQ4_VALUES;

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
            let kernels = match w.dtype {
                DType::Q8_0 if a.unsigned => QuantKernels::of::<Q8_0U>(),
                DType::Q8_0 => QuantKernels::of::<Q8_0>(),
                DType::Q4_0 if a.unsigned => QuantKernels::of::<Q4_0U>(),
                DType::Q4_0 => QuantKernels::of::<Q4_0>(),
                DType::IQ4_NL if a.unsigned => QuantKernels::of::<IQ4_NLU>(),
                DType::IQ4_NL => QuantKernels::of::<IQ4_NL>(),
                DType::Q5_0 if a.unsigned => QuantKernels::of::<Q5_0U>(),
                DType::Q5_0 => QuantKernels::of::<Q5_0>(),
                DType::Q5_1 => QuantKernels::of::<Q5_1>(),
                DType::Q4_K | DType::Q5_K | DType::Q6_K => {
                    // SAFETY: forwarded from the caller (the super-block formats have their own module).
                    return unsafe { super::avx512_super::gemm(w, a, t_rows, rows, out) };
                }
                _ => QuantKernels::of::<Q4_1>(),
            };
            // SAFETY: forwarded from the caller.
            unsafe { drive_quant(&ctx, rows, t_rows, &kernels) }
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

/// Word indices gathering the code dwords of a Q4_0 block pair (9 words per block: scale, 8 of codes) interleaved,
/// `[e0, o0, e1, o1, …]` (a dword is two words), twice: the low nibbles come from the first half, the high ones
/// from the second.
static Q4_0_CODES: [u16; 32] =
    [1, 2, 10, 11, 3, 4, 12, 13, 5, 6, 14, 15, 7, 8, 16, 17, 1, 2, 10, 11, 3, 4, 12, 13, 5, 6, 14, 15, 7, 8, 16, 17];
/// Word indices of the two Q4_0 scales as `[e, o] × 8` (the first 16 words are used).
static Q4_0_SCALES: [u16; 32] =
    [0, 9, 0, 9, 0, 9, 0, 9, 0, 9, 0, 9, 0, 9, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// The same for Q5_0 (11 words per block: scale, 2 of fifth bits, 8 of codes).
static Q5_0_CODES: [u16; 32] =
    [3, 4, 14, 15, 5, 6, 16, 17, 7, 8, 18, 19, 9, 10, 20, 21, 3, 4, 14, 15, 5, 6, 16, 17, 7, 8, 18, 19, 9, 10, 20, 21];
static Q5_0_SCALES: [u16; 32] =
    [0, 11, 0, 11, 0, 11, 0, 11, 0, 11, 0, 11, 0, 11, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The IQ4_NL values plus 128, as unsigned bytes for `vpdpbusd` (the kernels subtract `128·Σ a`).
static IQ4_PLUS_128: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (IQ4_VALUES[i] as i16 + 128) as u8;
        i += 1;
    }
    t
};

/// Byte mask of the [`ActLayout::Pair`](super::act::ActLayout::Pair) bytes whose fifth bit is set, from the 32
/// fifth bits `he`, `ho` of blocks `e` and `o` (bit `j` belongs to element `j`): byte `4(2l + h) + j` holds element
/// `4l + j` of block `h`, so the bits of the two blocks alternate in groups of four.
#[inline(always)]
unsafe fn fifth_bits(he: u32, ho: u32) -> u64 {
    // SAFETY: BMI2 is available in the calling kernels.
    unsafe { _pdep_u64(he as u64, 0x0f0f_0f0f_0f0f_0f0f) | _pdep_u64(ho as u64, 0xf0f0_f0f0_f0f0_f0f0) }
}

/// Kernel kind (beside the format tags) of Q8_0 weights against unsigned activations ([`QuantAct::unsigned`]): the
/// weight codes stay signed on `vpdpbusd`'s signed side and each dot product starts from the weights' lane sums
/// `−128·Σ w` (computed once per block pair and weight row) instead of the activations' lane-sum table.
const Q8_0U: u8 = 0xf0;
/// The same scheme for the offset 4- and 5-bit formats and IQ4_NL against unsigned activations: their codes made
/// signed (`q − 8`, `q − 16`, the codebook's own values) on the signed side, each dot product started from
/// `−128·Σ w`, so the multi-row tile loads no lane-sum table row per activation row.
const Q4_0U: u8 = 0xf1;
const Q5_0U: u8 = 0xf2;
const IQ4_NLU: u8 = 0xf3;

/// Whether the kernel kind takes unsigned activations ([`QuantAct::unsigned`]).
const fn unsigned_act(kind: u8) -> bool {
    matches!(kind, Q8_0U | Q4_0U | Q5_0U | IQ4_NLU)
}

/// The weight format of a kernel kind.
const fn format(kind: u8) -> u8 {
    match kind {
        Q8_0U => Q8_0,
        Q4_0U => Q4_0,
        Q5_0U => Q5_0,
        IQ4_NLU => IQ4_NL,
        k => k,
    }
}

/// Bytes of one block of the 32-value formats with AVX-512 kernels.
const fn block_bytes(kind: u8) -> usize {
    match format(kind) {
        Q8_0 => 34,
        Q4_0 | IQ4_NL => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 24,
    }
}

/// Whether the format carries a minimum per block (the `m` term).
const fn with_min(kind: u8) -> bool {
    kind == Q4_1 || kind == Q5_1
}

/// Whether the kernel starts each dot product from the activations' lane-sum table (the weight codes carry an
/// offset: Q4_0's 8, Q5_0's 16, Q8_0's and IQ4_NL's 128 added for `vpdpbusd`).
const fn with_bias(kind: u8) -> bool {
    !with_min(kind) && !unsigned_act(kind)
}

/// One weight block pair unpacked: codes as unsigned bytes in the [`ActLayout::Pair`](super::act::ActLayout::Pair)
/// order, the two block scales as `[d_e, d_o] × 8`, and (Q4_1, Q5_1) `[d_e, m_e, d_o, m_o]`.
#[derive(Clone, Copy)]
struct Pair {
    codes: __m512i,
    d: __m512,
    dm: __m128,
    /// [`Q8_0U`] only: the lane sums `−128·Σ w` the dot products start from.
    bw: __m512i,
}

/// Unpacks the block pair starting at block `b` of `row` (`full`: the odd block exists; otherwise it reads as zero
/// codes and scales — for Q8_0, codes 128, which the zero activations of the missing block cancel; for
/// [`Q8_0U`], codes 0).
///
/// # Safety
/// The CPU features of [`gemm`]; blocks `b` (and `b + 1` when `full`) inside the row.
#[inline(always)]
unsafe fn unpack<const KIND: u8>(row: *const u8, b: usize, full: bool) -> Pair {
    let bs = block_bytes(KIND);
    // SAFETY: the loads touch only the bytes of the pair's existing blocks (masked or sized to them).
    unsafe {
        let be = row.add(b * bs);
        if KIND == Q8_0 || KIND == Q8_0U {
            // A pair is 68 bytes: one prefetch per pair would skip one line in 17.
            prefetch_ahead(be);
            prefetch_ahead(be.add(64));
            let we = _mm512_castsi256_si512(_mm256_loadu_si256(be.add(2).cast()));
            let (wo, ho) = if full {
                (
                    _mm512_castsi256_si512(_mm256_loadu_si256(be.add(bs + 2).cast())),
                    be.add(bs).cast::<u16>().read_unaligned() as i32,
                )
            } else {
                (_mm512_setzero_si512(), 0)
            };
            let he = be.cast::<u16>().read_unaligned() as i32;
            let inter = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let raw = _mm512_permutex2var_epi32(we, inter, wo);
            let h = _mm_cvtph_ps(_mm_cvtsi32_si128(he | (ho << 16)));
            let d = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(h)));
            let (codes, bw) = if KIND == Q8_0U {
                (raw, minus_128_lane_sums(raw))
            } else {
                // w + 128 as unsigned bytes
                (_mm512_xor_si512(raw, _mm512_set1_epi8(-128)), _mm512_setzero_si512())
            };
            return Pair { codes, d, dm: _mm_setzero_ps(), bw };
        }
        prefetch_ahead(be);
        let nibbles = _mm512_set1_epi8(0x0f);
        // Shift counts per 16-bit word: the low half keeps the low nibbles, the high half gets the high ones.
        let shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
        let (mut codes, d, dm) = if with_min(KIND) {
            // Q4_1 blocks are 5 dwords (header, 4 of codes), Q5_1 blocks 6 (header, fifth bits, 4 of codes). One
            // masked load takes both blocks (only the even block's bytes when the odd one is missing).
            let (idx, hdr) = if KIND == Q5_1 {
                (
                    _mm512_setr_epi32(2, 8, 3, 9, 4, 10, 5, 11, 2, 8, 3, 9, 4, 10, 5, 11),
                    _mm512_setr_epi32(0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6),
                )
            } else {
                (
                    _mm512_setr_epi32(1, 6, 2, 7, 3, 8, 4, 9, 1, 6, 2, 7, 3, 8, 4, 9),
                    _mm512_setr_epi32(0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5),
                )
            };
            let m: u16 = if KIND == Q5_1 { 0xfff } else { 0x3ff };
            let raw = _mm512_maskz_loadu_epi32(if full { m } else { m >> (bs / 4) }, be.cast());
            let codes = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi32(idx, raw), shift), nibbles);
            // [d_e, m_e, d_o, m_o]
            let dm = _mm_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi32(hdr, raw)));
            let d = permute_ps(
                _mm512_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2),
                _mm512_castps128_ps512(dm),
            );
            (codes, d, dm)
        } else {
            let (idx, sc) = if format(KIND) == Q5_0 {
                (_mm512_loadu_si512(Q5_0_CODES.as_ptr().cast()), _mm512_loadu_si512(Q5_0_SCALES.as_ptr().cast()))
            } else {
                (_mm512_loadu_si512(Q4_0_CODES.as_ptr().cast()), _mm512_loadu_si512(Q4_0_SCALES.as_ptr().cast()))
            };
            let m: u32 = if format(KIND) == Q5_0 { 0x3f_ffff } else { 0x3ffff };
            let raw = _mm512_maskz_loadu_epi16(if full { m } else { m >> (bs / 2) }, be.cast());
            let codes = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi16(idx, raw), shift), nibbles);
            let d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(sc, raw)));
            (codes, d, _mm_setzero_ps())
        };
        if format(KIND) == IQ4_NL {
            // Each 4-bit code picks its value from the codebook (one byte shuffle per pair): as `value + 128` against
            // signed activations, the values themselves against unsigned ones.
            let values: *const u8 = if KIND == IQ4_NLU { IQ4_VALUES.as_ptr().cast() } else { IQ4_PLUS_128.as_ptr() };
            codes = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128(values.cast())), codes);
        }
        if matches!(format(KIND), Q5_0 | Q5_1) {
            let at = if format(KIND) == Q5_0 { 2 } else { 4 };
            let he = be.add(at).cast::<u32>().read_unaligned();
            let ho = if full { be.add(bs + at).cast::<u32>().read_unaligned() } else { 0 };
            codes = _mm512_or_si512(codes, _mm512_maskz_mov_epi8(fifth_bits(he, ho), _mm512_set1_epi8(0x10)));
        }
        if KIND == Q4_0U || KIND == Q5_0U {
            // The codes without their offset, as signed bytes.
            codes = _mm512_sub_epi8(codes, _mm512_set1_epi8(if KIND == Q4_0U { 8 } else { 16 }));
        }
        let bw = if unsigned_act(KIND) { minus_128_lane_sums(codes) } else { _mm512_setzero_si512() };
        Pair { codes, d, dm, bw }
    }
}

/// `−128·Σ w` over each 4-byte lane of the signed codes `w`: `0 − Σ 128·w` (a code of −128 cannot be negated in a
/// byte).
#[inline(always)]
unsafe fn minus_128_lane_sums(w: __m512i) -> __m512i {
    // SAFETY: AVX-512 F/VNNI are available in the calling kernels.
    unsafe {
        let zero = _mm512_setzero_si512();
        _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(-128), w))
    }
}

/// `vpermps`: lane `i` of the result is lane `idx[i]` of `v`. As assembly, because the compiler otherwise lowers the
/// `[x_0, x_2] × 8` patterns of [`unpack`] to two shuffles, a second uop on the shuffle port per weight row and pair
/// (measured: the single-row Q4_1 kernel 7% slower).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn permute_ps(idx: __m512i, v: __m512) -> __m512 {
    let out: __m512;
    // SAFETY: register-only; AVX-512 F is available in the calling kernels.
    unsafe {
        std::arch::asm!(
            "vpermps {o:z}, {i:z}, {v:z}",
            o = lateout(zmm_reg) out,
            i = in(zmm_reg) idx,
            v = in(zmm_reg) v,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

/// The canonical fold of an accumulator in the pair lane order (lane `2l + h` holds `acc[h][l]`):
/// `fold8(acc[0] + acc[1])`.
#[inline(always)]
unsafe fn fold_pair(v: __m512) -> f32 {
    // SAFETY: AVX-512 F is available in the calling kernels.
    unsafe {
        let eo = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15), v);
        fold8(_mm256_add_ps(_mm512_castps512_ps256(eo), high256(eo)))
    }
}

/// `[x0 + x1, x2 + x3, y0 + y1, y2 + y3]` in each 128-bit block (`x`, `y` that block of the two inputs).
#[inline(always)]
unsafe fn pair_sums(x: __m512, y: __m512) -> __m512 {
    // SAFETY: AVX-512 F is available in the calling kernels.
    unsafe { _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(x, y), _mm512_shuffle_ps::<0b11_01_11_01>(x, y)) }
}

/// Where [`fold16`] leaves the result of accumulator `t`: lane `4k + 2h + j` holds `t = 8h + 2k + j`.
const FOLD16_LANE: [usize; 16] = [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15];

/// [`fold_pair`] of 16 accumulators at once, each result the same operations on the same values (lane `z = 2l + h`
/// holds `acc[h][l]`): `v8[l] = v[2l] + v[2l+1]`, `u[i] = v8[i] + v8[i+4]`, `w[j] = u[j] + u[j+2]`, `w[0] + w[1]`,
/// the additions of 16 outputs side by side in 15 shuffle-add pairs instead of a shuffle chain per output. Result
/// `t` is in lane [`FOLD16_LANE`]`[t]`.
#[inline(always)]
unsafe fn fold16(a: [__m512; 16]) -> __m512 {
    // SAFETY: AVX-512 F is available in the calling kernels.
    unsafe {
        // Block k of s[j]: [v8[2k], v8[2k+1]] of a[2j], then of a[2j+1].
        // Loops, not `array::from_fn`: an intrinsic inside a closure (which lacks the caller's target features)
        // is not inlined, and the engine's build then called `_mm512_shuffle_ps` out of line.
        let mut s = [_mm512_setzero_ps(); 8];
        for j in 0..8 {
            s[j] = pair_sums(a[2 * j], a[2 * j + 1]);
        }
        // Blocks of u[m]: [u0, u1] of a[4m], a[4m+1]; [u2, u3] of them; the same for a[4m+2], a[4m+3].
        let mut u = [_mm512_setzero_ps(); 4];
        for m in 0..4 {
            let (x, y) = (s[2 * m], s[2 * m + 1]);
            u[m] =
                _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(x, y), _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y));
        }
        // Block k of w[q]: [w0, w1] of a[8q + 2k], then of a[8q + 2k + 1].
        let mut w = [_mm512_setzero_ps(); 2];
        for q in 0..2 {
            let (x, y) = (u[2 * q], u[2 * q + 1]);
            w[q] =
                _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y));
        }
        pair_sums(w[0], w[1])
    }
}

/// `m[0] + m[1]` from `[_, m_0, _, m_1]`.
#[inline(always)]
unsafe fn min_sum(m: __m128) -> f32 {
    // SAFETY: SSE3 is available in the calling kernels.
    unsafe {
        let m = _mm_movehdup_ps(m);
        _mm_cvtss_f32(_mm_add_ss(m, _mm_movehl_ps(m, m)))
    }
}

/// The single-row and multi-row kernels of one 32-value format.
struct QuantKernels<'a> {
    /// One activation row: 4 weight rows, 1 weight row.
    one: [TileFn<&'a QuantAct>; 2],
    /// Four activation rows: 2 weight rows, 1 weight row.
    four: [TileFn<&'a QuantAct>; 2],
    /// One weight row against 16, 8, 7, 6 and 5 activation rows.
    multi: [TileFn<&'a QuantAct>; 5],
}

impl<'a> QuantKernels<'a> {
    fn of<const KIND: u8>() -> Self {
        QuantKernels {
            one: [
                if with_min(KIND) { one_row4_min::<KIND> as TileFn<_> } else { small_tile::<KIND, 4, 1> as TileFn<_> },
                small_tile::<KIND, 1, 1> as TileFn<_>,
            ],
            four: [small_tile::<KIND, 2, 4> as TileFn<_>, small_tile::<KIND, 1, 4> as TileFn<_>],
            multi: [
                multi_row::<KIND, 16> as TileFn<_>,
                multi_row::<KIND, 8> as TileFn<_>,
                multi_row::<KIND, 7> as TileFn<_>,
                multi_row::<KIND, 6> as TileFn<_>,
                multi_row::<KIND, 5> as TileFn<_>,
            ],
        }
    }
}

/// Walks the outputs `rows × 0..t_rows`: a group of weight rows that stays in L2, and over it the activation rows
/// in tiles of 16 (when at least 12 are left), 8 (at least 8) or exactly the 5–7 left with [`multi_row`], 4 (at
/// least 2) or 1 with [`small_tile`]. (A swarm stage's batch is often a decode group of 8 less a session or two that
/// is not back yet: an 8-row tile would compute the missing rows for nothing.) A tile may reach past the last
/// activation row into the zero rows of [`QuantAct::rows_pad`] (its starting row is a multiple of 4 and it never
/// crosses a multiple of 16); it writes only the real rows.
///
/// # Safety
/// As [`drive`]: the CPU supports the kernels and `ctx` satisfies [`super::gemm`]'s size contract.
unsafe fn drive_quant<'a>(ctx: &Ctx<'_, &'a QuantAct>, rows: Range<usize>, t_rows: usize, k: &QuantKernels<'a>) {
    let group = (L2_WEIGHT_BYTES / ctx.w.row_bytes.max(1)).max(4);
    let mut g0 = rows.start;
    while g0 < rows.end {
        let g1 = (g0 + group).min(rows.end);
        let mut t = 0;
        while t < t_rows {
            let left = t_rows - t;
            if left <= 4 {
                // One row: 4 weight rows a tile; two to four rows: a tile of 2 weight rows times 4 activation rows.
                let (set, nr, tr) = if left == 1 { (&k.one, 4, 1) } else { (&k.four, 2, 4) };
                let mut n = g0;
                while n + nr <= g1 {
                    // SAFETY: rows n..n+nr are inside the output, activation rows t..t+tr inside `rows_pad` (caller,
                    // and see above).
                    unsafe { (set[0])(ctx, n, t) };
                    n += nr;
                }
                while n < g1 {
                    // SAFETY: as above.
                    unsafe { (set[1])(ctx, n, t) };
                    n += 1;
                }
                t += tr.min(left);
                continue;
            }
            let (f, tr) = match left {
                12.. => (k.multi[0], 16),
                8.. => (k.multi[1], 8),
                7 => (k.multi[2], 7),
                6 => (k.multi[3], 6),
                _ => (k.multi[4], 5),
            };
            for n in g0..g1 {
                // SAFETY: row n is inside the output; the tile reads activation rows t..t+tr, inside `rows_pad`
                // since t is a multiple of 4 and the tile does not cross a multiple of 16 (see above).
                unsafe { f(ctx, n, t) };
            }
            t += tr.min(left);
        }
        g0 = g1;
    }
}

/// 32-value quantised weights: `NR` weight rows from `n` times `TR` activation rows from `t0`, a block pair at a
/// time; per (weight row, activation row, pair), one `vpdpbusd` gives the exact lane sums of both blocks, then one
/// multiply of the scales and one fused multiply-add (and for Q4_1/Q5_1 one 128-bit fused multiply-add of the `m`
/// term). The tile for one activation row, and for a few (`TR = 4`, reaching into the zero padding rows when fewer
/// are left; only real rows are written).
///
/// # Safety
/// The CPU features of [`gemm`]; rows `n..n+NR` in range; activation rows `t0..t0+TR` inside `rows_pad`;
/// activations in the Pair layout.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn small_tile<const KIND: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    // SAFETY: weight blocks `b < nb` of rows `n + r` and the activation pairs of rows `t0 + t` are inside the buffers
    // the matmul checked; the missing odd block of a pair is never loaded.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let mut acc = [[_mm512_setzero_ps(); TR]; NR];
        let mut macc = [[_mm_setzero_ps(); TR]; NR];
        macro_rules! step {
            ($b:expr, $full:expr) => {{
                let b = $b;
                let zero = Pair {
                    codes: _mm512_setzero_si512(),
                    d: _mm512_setzero_ps(),
                    dm: _mm_setzero_ps(),
                    bw: _mm512_setzero_si512(),
                };
                let mut w = [zero; NR];
                for r in 0..NR {
                    w[r] = unpack::<KIND>(rows[r], b, $full);
                }
                for t in 0..TR {
                    let av = _mm512_loadu_si512(a.qs_ptr(t0 + t, b).cast());
                    let init = if with_bias(KIND) {
                        _mm512_loadu_si512(a.bias_ptr(t0 + t, b).cast())
                    } else {
                        _mm512_setzero_si512()
                    };
                    let da = _mm512_loadu_ps(a.dpat_ptr(t0 + t, b));
                    let sa = if with_min(KIND) { _mm_loadu_ps(a.spat_ptr(t0 + t, b)) } else { _mm_setzero_ps() };
                    for r in 0..NR {
                        let p = if unsigned_act(KIND) {
                            _mm512_dpbusd_epi32(w[r].bw, av, w[r].codes)
                        } else {
                            _mm512_dpbusd_epi32(init, w[r].codes, av)
                        };
                        let sc = _mm512_mul_ps(w[r].d, da);
                        acc[r][t] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc[r][t]);
                        if with_min(KIND) {
                            macc[r][t] = _mm_fmadd_ps(w[r].dm, sa, macc[r][t]);
                        }
                    }
                }
            }};
        }
        block_pairs!(a.nb, step);
        let real = (a.rows - t0).min(TR);
        for r in 0..NR {
            for t in 0..real {
                let mut res = fold_pair(acc[r][t]);
                if with_min(KIND) {
                    res += min_sum(macc[r][t]);
                }
                c.out.put(t0 + t, n + r, res);
            }
        }
    }
}

/// [`small_tile`] for 4 weight rows of Q4_1/Q5_1 against one activation row (the decode GEMV), with the block
/// headers of the 4 rows handled together: their `[d, m]` words are gathered into one register by two two-source
/// permutes and a blend, converted by one `vcvtph2ps` (lanes `4r..4r + 4` = `[d_e, m_e, d_o, m_o]` of row `r`), and
/// the `m` terms of the 4 rows are one fused multiply-add (against `[0, s_e, 0, s_o] × 4`), where the generic tile
/// spends a permute and a conversion per row on the header and a multiply-add per row on the `m` term. Each output
/// is the same operations in the same order as in [`small_tile`].
///
/// # Safety
/// As [`small_tile`] with `NR = 4`, `TR = 1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn one_row4_min<const KIND: u8>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    debug_assert!(with_min(KIND));
    let a = c.x;
    let bs = block_bytes(KIND);
    // Header dword of the odd block: Q4_1 blocks are 5 dwords, Q5_1 blocks 6.
    let ho = (bs / 4) as i32;
    // SAFETY: weight blocks `b < nb` of rows `n..n+4` and the activation pairs of row `t0` are inside the buffers the
    // matmul checked; the masked loads touch only the pair's existing blocks.
    unsafe {
        let rows: [*const u8; 4] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut macc = _mm512_setzero_ps();
        // Dwords [e, o] of the first source's header, then of the second's (16 + ...), at positions 0..4 (rows 0, 1)
        // and 4..8 (rows 2, 3).
        let lo = _mm512_setr_epi32(0, ho, 16, 16 + ho, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        let hi = _mm512_setr_epi32(0, 0, 0, 0, 0, ho, 16, 16 + ho, 0, 0, 0, 0, 0, 0, 0, 0);
        let full_mask: u16 = if KIND == Q5_1 { 0xfff } else { 0x3ff };
        let pick: [__m512i; 4] = std::array::from_fn(|r| {
            _mm512_setr_epi32(
                4 * r as i32,
                4 * r as i32 + 2,
                4 * r as i32,
                4 * r as i32 + 2,
                4 * r as i32,
                4 * r as i32 + 2,
                4 * r as i32,
                4 * r as i32 + 2,
                4 * r as i32,
                4 * r as i32 + 2,
                4 * r as i32,
                4 * r as i32 + 2,
                4 * r as i32,
                4 * r as i32 + 2,
                4 * r as i32,
                4 * r as i32 + 2,
            )
        });
        macro_rules! step {
            ($b:expr, $full:expr) => {{
                let b = $b;
                let m = if $full { full_mask } else { full_mask >> (bs / 4) };
                let mut raw = [_mm512_setzero_si512(); 4];
                let mut codes = [_mm512_setzero_si512(); 4];
                for r in 0..4 {
                    raw[r] = _mm512_maskz_loadu_epi32(m, rows[r].add(b * bs).cast());
                    codes[r] = unpack::<KIND>(rows[r], b, $full).codes;
                }
                let h = _mm512_mask_blend_epi32(
                    0xf0,
                    _mm512_permutex2var_epi32(raw[0], lo, raw[1]),
                    _mm512_permutex2var_epi32(raw[2], hi, raw[3]),
                );
                // [d_e, m_e, d_o, m_o] of rows 0..4
                let f = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
                let av = _mm512_loadu_si512(a.qs_ptr(t0, b).cast());
                let da = _mm512_loadu_ps(a.dpat_ptr(t0, b));
                let sa = _mm512_broadcast_f32x4(_mm_loadu_ps(a.spat_ptr(t0, b)));
                for r in 0..4 {
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[r], av);
                    let sc = _mm512_mul_ps(permute_ps(pick[r], f), da);
                    acc[r] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc[r]);
                }
                macc = _mm512_fmadd_ps(f, sa, macc);
            }};
        }
        block_pairs!(a.nb, step);
        let mut mins = Lines([0.0; 32]);
        _mm512_store_ps(mins.0.as_mut_ptr(), macc);
        for r in 0..4 {
            let mut res = fold_pair(acc[r]);
            res += mins.0[4 * r + 1] + mins.0[4 * r + 3];
            c.out.put(t0, n + r, res);
        }
    }
}

/// 64 bytes aligned, for the per-tile scale products.
#[repr(C, align(64))]
struct Lines([f32; 32]);

/// 32-value quantised weights: weight row `n` against the `TR` activation rows from `t0` (a multiple of 4), a block
/// pair at a time. The pair is unpacked once for all `TR` rows; its two weight scales are multiplied by the
/// activation scales of 8 rows at once (`[d_e, d_o]` of consecutive rows lie side by side in [`QuantAct::dt`]) into
/// a small table, from which each row's dot product takes its `[d_e·d_a, d_o·d_a]` with one 64-bit broadcast load
/// (the block parity alternates from lane to lane); the `m` term of Q4_1/Q5_1 is likewise one fused multiply-add
/// per 8 rows, lanes `(row, parity)`. So each (row, pair) costs one `vpdpbusd`, one conversion and one fused
/// multiply-add, each output the same operations in the same order as every other kernel.
///
/// # Safety
/// The CPU features of [`gemm`]; row `n` in range; activation rows `t0..t0+TR` inside `rows_pad` (rows past
/// `a.rows` are read, not written); activations in the Pair layout.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn multi_row<const KIND: u8, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    let vecs = TR.div_ceil(8);
    // SAFETY: weight blocks `b < nb` of row `n` and the activation pairs of rows `t0..t0+TR` (and the scale tables
    // of rows `t0..t0 + 8·vecs`, inside `rows_pad` as `t0 + 16` is) are inside the buffers the matmul checked.
    unsafe {
        let row = c.w.row_ptr(n);
        let mut acc = [_mm512_setzero_ps(); TR];
        let mut macc = [_mm512_setzero_ps(); 2];
        // Scale products of a pair: two halves, so the 16-row tile can prepare the next pair in one (see below).
        let mut sc = [Lines([0.0; 32]), Lines([0.0; 32])];
        // Activation rows are `stride` bytes (and bias rows `stride / 4` i32) apart; pointers advance row by row,
        // which keeps the address arithmetic out of vector registers.
        let stride = a.blocks * QK;
        let (qs0, bias0) = (a.qs_ptr(t0, 0), a.bias_ptr(t0, 0));
        // Unpacks the pair at block `b`, stores its scale products in `sc[$half]` and adds its `m` terms (always
        // in pair order).
        macro_rules! prepare {
            ($b:expr, $full:expr, $half:expr) => {{
                let b = $b;
                let w = unpack::<KIND>(row, b, $full);
                let (dt, st) = (a.dt_ptr(t0, b), a.st_ptr(t0, b));
                let out = sc[$half].0.as_mut_ptr();
                for j in 0..vecs {
                    let prod = _mm512_mul_ps(w.d, _mm512_loadu_ps(dt.add(16 * j)));
                    _mm512_store_ps(out.add(16 * j), prod);
                    if with_min(KIND) {
                        let mw = permute_ps(
                            _mm512_setr_epi32(1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 1, 3),
                            _mm512_castps128_ps512(w.dm),
                        );
                        macc[j] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(st.add(16 * j)), macc[j]);
                    }
                }
                w
            }};
        }
        // The rows' dot products of the pair `w` at block `b`, scales from `sc[$half]`.
        macro_rules! rows {
            ($w:expr, $b:expr, $half:expr) => {{
                let (w, b) = ($w, $b);
                let scales = sc[$half].0.as_ptr();
                if TR == 16 {
                    let acc16: &mut [__m512; 16] = (&mut acc[..]).try_into().unwrap_unchecked();
                    let r = Rows16 { q: qs0.add(b * QK), bias: bias0.wrapping_add(b * 8).cast(), stride, scales };
                    if unsigned_act(KIND) {
                        rows16_unsigned(acc16, w.codes, w.bw, r);
                    } else if with_bias(KIND) {
                        rows16_bias(acc16, w.codes, r);
                    } else {
                        rows16(acc16, w.codes, r);
                    }
                } else {
                    let mut q = qs0.add(b * QK);
                    let mut bias = bias0.add(b * 8);
                    for t in 0..TR {
                        let s = scales.add(2 * t);
                        if unsigned_act(KIND) {
                            row_step_unsigned(&mut acc[t], w.codes, w.bw, q, s);
                        } else if with_bias(KIND) {
                            row_step_bias(&mut acc[t], w.codes, q, bias, s);
                        } else {
                            row_step(&mut acc[t], w.codes, q, s);
                        }
                        q = q.add(stride);
                        bias = bias.add(stride / 4);
                    }
                }
            }};
        }
        if TR == 16 {
            // The 16-row tile prepares the next pair (in the other half of `sc`) before this pair's rows, whose
            // broadcast loads then find their scales long stored instead of waiting on stores made just before:
            // measured on an Intel Xeon (576 × 1536, one thread), 6–8% less time a call. With 8 rows it was no
            // faster and sometimes slower, so the smaller tiles prepare each pair just before its rows.
            let nb = a.nb;
            let pairs = nb.div_ceil(2);
            let mut next = prepare!(0, nb >= 2, 0);
            for p in 0..pairs {
                let w = next;
                let b = 2 * p;
                if b + 4 <= nb {
                    next = prepare!(b + 2, true, (p + 1) % 2);
                } else if b + 2 < nb {
                    next = prepare!(b + 2, false, (p + 1) % 2);
                }
                rows!(w, b, p % 2);
            }
        } else {
            macro_rules! step {
                ($b:expr, $full:expr) => {{
                    let w = prepare!($b, $full, 0);
                    rows!(w, $b, 0);
                }};
            }
            block_pairs!(a.nb, step);
        }
        let real = (a.rows - t0).min(TR);
        let mut all = [_mm512_setzero_ps(); 16];
        all[..TR].copy_from_slice(&acc);
        let res = fold16(all);
        let res = if with_min(KIND) { _mm512_add_ps(res, pair_sums(macc[0], macc[1])) } else { res };
        let mut o = Lines([0.0; 32]);
        _mm512_store_ps(o.0.as_mut_ptr(), res);
        for t in 0..real {
            c.out.put(t0 + t, n, o.0[FOLD16_LANE[t]]);
        }
    }
}

/// One activation row of [`multi_row`]: `acc = fma([s[0], s[1]] × 8, cvt(vpdpbusd(0, codes, q[0..64])), acc)`.
///
/// Written as assembly so that the compiler keeps the 64-bit broadcast a load and the row's steps together: left to
/// itself it forwards the scale table's store into register shuffles (which compete with the arithmetic for the
/// vector ports while the load ports are idle) and hoists all rows' dot products ahead of the multiply-adds, running
/// out of registers.
///
/// # Safety
/// `q` points at 64 readable bytes and `s` at two floats; the CPU supports AVX-512 F and VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn row_step(acc: &mut __m512, codes: __m512i, q: *const u8, s: *const f32) {
    let (_p, _s): (__m512i, __m512);
    // SAFETY: the caller's contract; the block only reads those bytes and writes its register operands.
    unsafe {
        std::arch::asm!(
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp}]",
            "vfmadd231ps {acc:z}, {s:z}, {p:z}",
            p = out(zmm_reg) _p,
            s = out(zmm_reg) _s,
            w = in(zmm_reg) codes,
            q = in(reg) q,
            sp = in(reg) s,
            acc = inout(zmm_reg) *acc,
            options(pure, readonly, nostack, preserves_flags)
        );
    }
}

/// [`row_step`] with the dot product started from the 16 lane sums at `bias` instead of 0.
///
/// # Safety
/// As [`row_step`], and `bias` points at 64 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn row_step_bias(acc: &mut __m512, codes: __m512i, q: *const u8, bias: *const i32, s: *const f32) {
    let (_p, _s): (__m512i, __m512);
    // SAFETY: as in `row_step`.
    unsafe {
        std::arch::asm!(
            "vmovdqu64 {p:z}, zmmword ptr [{b}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp}]",
            "vfmadd231ps {acc:z}, {s:z}, {p:z}",
            p = out(zmm_reg) _p,
            s = out(zmm_reg) _s,
            w = in(zmm_reg) codes,
            q = in(reg) q,
            b = in(reg) bias,
            sp = in(reg) s,
            acc = inout(zmm_reg) *acc,
            options(pure, readonly, nostack, preserves_flags)
        );
    }
}

/// Where [`rows16`] and its variants find 16 activation rows: row `t` at `q + t·stride` (and its lane sums at
/// `bias + t·stride`), its scale pair at `scales[2t..2t + 2]`.
#[derive(Clone, Copy)]
struct Rows16 {
    q: *const u8,
    bias: *const u8,
    stride: usize,
    scales: *const f32,
}

/// [`row_step`] for 16 activation rows ([`Rows16`]), as one block of assembly: the compiler, left to a loop of
/// [`row_step`], keeps the rows' pointers on the stack and reloads them (five loads a row where three do), or
/// advances them with a chain of additions that compete with the arithmetic. Rows are addressed as a base (rows 0
/// and 8) plus 1, 2, 3, 4, 5, 6 or 7 strides, from registers.
///
/// # Safety
/// The 16 rows' 64 bytes and the 32 scales are readable; the CPU supports AVX-512 F and VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn rows16(acc: &mut [__m512; 16], codes: __m512i, r: Rows16) {
    let (_p, _s): (__m512i, __m512);
    // SAFETY: the caller's contract; the block only reads those bytes and writes its register operands.
    unsafe {
        std::arch::asm!(
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 0]",
            "vfmadd231ps {a0:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s1}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 8]",
            "vfmadd231ps {a1:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s1}*2]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 16]",
            "vfmadd231ps {a2:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s3}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 24]",
            "vfmadd231ps {a3:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s1}*4]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 32]",
            "vfmadd231ps {a4:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s5}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 40]",
            "vfmadd231ps {a5:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s3}*2]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 48]",
            "vfmadd231ps {a6:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s7}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 56]",
            "vfmadd231ps {a7:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 64]",
            "vfmadd231ps {a8:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s1}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 72]",
            "vfmadd231ps {a9:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s1}*2]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 80]",
            "vfmadd231ps {a10:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s3}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 88]",
            "vfmadd231ps {a11:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s1}*4]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 96]",
            "vfmadd231ps {a12:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s5}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 104]",
            "vfmadd231ps {a13:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s3}*2]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 112]",
            "vfmadd231ps {a14:z}, {s:z}, {p:z}",
            "vpxord {p:z}, {p:z}, {p:z}",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s7}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 120]",
            "vfmadd231ps {a15:z}, {s:z}, {p:z}",
            p = out(zmm_reg) _p,
            s = out(zmm_reg) _s,
            w = in(zmm_reg) codes,
            q = in(reg) r.q,
            q8 = in(reg) r.q.wrapping_add(8 * r.stride),
            s1 = in(reg) r.stride,
            s3 = in(reg) 3 * r.stride,
            s5 = in(reg) 5 * r.stride,
            s7 = in(reg) 7 * r.stride,
            sp = in(reg) r.scales,
            a0 = inout(zmm_reg) acc[0], a1 = inout(zmm_reg) acc[1], a2 = inout(zmm_reg) acc[2],
            a3 = inout(zmm_reg) acc[3], a4 = inout(zmm_reg) acc[4], a5 = inout(zmm_reg) acc[5],
            a6 = inout(zmm_reg) acc[6], a7 = inout(zmm_reg) acc[7], a8 = inout(zmm_reg) acc[8],
            a9 = inout(zmm_reg) acc[9], a10 = inout(zmm_reg) acc[10], a11 = inout(zmm_reg) acc[11],
            a12 = inout(zmm_reg) acc[12], a13 = inout(zmm_reg) acc[13], a14 = inout(zmm_reg) acc[14],
            a15 = inout(zmm_reg) acc[15],
            options(pure, readonly, nostack, preserves_flags)
        );
    }
}

/// [`rows16`] with each dot product started from its row's 16 lane sums at `bias + t·stride` instead of 0.
///
/// # Safety
/// As [`rows16`], and the 16 rows' lane sums (64 bytes each) are readable.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn rows16_bias(acc: &mut [__m512; 16], codes: __m512i, r: Rows16) {
    let (_p, _s): (__m512i, __m512);
    // SAFETY: the caller's contract; the block only reads those bytes and writes its register operands.
    unsafe {
        std::arch::asm!(
            "vmovdqu64 {p:z}, zmmword ptr [{b}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 0]",
            "vfmadd231ps {a0:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b} + {s1}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s1}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 8]",
            "vfmadd231ps {a1:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b} + {s1}*2]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s1}*2]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 16]",
            "vfmadd231ps {a2:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b} + {s3}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s3}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 24]",
            "vfmadd231ps {a3:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b} + {s1}*4]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s1}*4]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 32]",
            "vfmadd231ps {a4:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b} + {s5}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s5}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 40]",
            "vfmadd231ps {a5:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b} + {s3}*2]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s3}*2]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 48]",
            "vfmadd231ps {a6:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b} + {s7}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q} + {s7}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 56]",
            "vfmadd231ps {a7:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b8}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 64]",
            "vfmadd231ps {a8:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b8} + {s1}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s1}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 72]",
            "vfmadd231ps {a9:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b8} + {s1}*2]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s1}*2]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 80]",
            "vfmadd231ps {a10:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b8} + {s3}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s3}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 88]",
            "vfmadd231ps {a11:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b8} + {s1}*4]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s1}*4]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 96]",
            "vfmadd231ps {a12:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b8} + {s5}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s5}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 104]",
            "vfmadd231ps {a13:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b8} + {s3}*2]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s3}*2]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 112]",
            "vfmadd231ps {a14:z}, {s:z}, {p:z}",
            "vmovdqu64 {p:z}, zmmword ptr [{b8} + {s7}]",
            "vpdpbusd {p:z}, {w:z}, zmmword ptr [{q8} + {s7}]",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 120]",
            "vfmadd231ps {a15:z}, {s:z}, {p:z}",
            p = out(zmm_reg) _p,
            s = out(zmm_reg) _s,
            w = in(zmm_reg) codes,
            q = in(reg) r.q,
            q8 = in(reg) r.q.wrapping_add(8 * r.stride),
            b = in(reg) r.bias,
            b8 = in(reg) r.bias.wrapping_add(8 * r.stride),
            s1 = in(reg) r.stride,
            s3 = in(reg) 3 * r.stride,
            s5 = in(reg) 5 * r.stride,
            s7 = in(reg) 7 * r.stride,
            sp = in(reg) r.scales,
            a0 = inout(zmm_reg) acc[0], a1 = inout(zmm_reg) acc[1], a2 = inout(zmm_reg) acc[2],
            a3 = inout(zmm_reg) acc[3], a4 = inout(zmm_reg) acc[4], a5 = inout(zmm_reg) acc[5],
            a6 = inout(zmm_reg) acc[6], a7 = inout(zmm_reg) acc[7], a8 = inout(zmm_reg) acc[8],
            a9 = inout(zmm_reg) acc[9], a10 = inout(zmm_reg) acc[10], a11 = inout(zmm_reg) acc[11],
            a12 = inout(zmm_reg) acc[12], a13 = inout(zmm_reg) acc[13], a14 = inout(zmm_reg) acc[14],
            a15 = inout(zmm_reg) acc[15],
            options(pure, readonly, nostack, preserves_flags)
        );
    }
}

/// [`rows16`] for unsigned activations ([`QuantAct::unsigned`], Q8_0): `vpdpbusd(bw, a + 128, w)` with the signed
/// weight codes and their lane sums `bw = −128·Σ w`, so nothing but the activations is loaded per row.
///
/// # Safety
/// As [`rows16`].
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn rows16_unsigned(acc: &mut [__m512; 16], codes: __m512i, bw: __m512i, r: Rows16) {
    let (_p, _s, _x): (__m512i, __m512, __m512i);
    // SAFETY: the caller's contract; the block only reads those bytes and writes its register operands.
    unsafe {
        std::arch::asm!(
            "vmovdqu64 {x:z}, zmmword ptr [{q}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 0]",
            "vfmadd231ps {a0:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q} + {s1}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 8]",
            "vfmadd231ps {a1:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q} + {s1}*2]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 16]",
            "vfmadd231ps {a2:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q} + {s3}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 24]",
            "vfmadd231ps {a3:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q} + {s1}*4]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 32]",
            "vfmadd231ps {a4:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q} + {s5}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 40]",
            "vfmadd231ps {a5:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q} + {s3}*2]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 48]",
            "vfmadd231ps {a6:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q} + {s7}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 56]",
            "vfmadd231ps {a7:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q8}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 64]",
            "vfmadd231ps {a8:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q8} + {s1}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 72]",
            "vfmadd231ps {a9:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q8} + {s1}*2]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 80]",
            "vfmadd231ps {a10:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q8} + {s3}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 88]",
            "vfmadd231ps {a11:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q8} + {s1}*4]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 96]",
            "vfmadd231ps {a12:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q8} + {s5}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 104]",
            "vfmadd231ps {a13:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q8} + {s3}*2]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 112]",
            "vfmadd231ps {a14:z}, {s:z}, {p:z}",
            "vmovdqu64 {x:z}, zmmword ptr [{q8} + {s7}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp} + 120]",
            "vfmadd231ps {a15:z}, {s:z}, {p:z}",
            p = out(zmm_reg) _p,
            s = out(zmm_reg) _s,
            x = out(zmm_reg) _x,
            w = in(zmm_reg) codes,
            bw = in(zmm_reg) bw,
            q = in(reg) r.q,
            q8 = in(reg) r.q.wrapping_add(8 * r.stride),
            s1 = in(reg) r.stride,
            s3 = in(reg) 3 * r.stride,
            s5 = in(reg) 5 * r.stride,
            s7 = in(reg) 7 * r.stride,
            sp = in(reg) r.scales,
            a0 = inout(zmm_reg) acc[0], a1 = inout(zmm_reg) acc[1], a2 = inout(zmm_reg) acc[2],
            a3 = inout(zmm_reg) acc[3], a4 = inout(zmm_reg) acc[4], a5 = inout(zmm_reg) acc[5],
            a6 = inout(zmm_reg) acc[6], a7 = inout(zmm_reg) acc[7], a8 = inout(zmm_reg) acc[8],
            a9 = inout(zmm_reg) acc[9], a10 = inout(zmm_reg) acc[10], a11 = inout(zmm_reg) acc[11],
            a12 = inout(zmm_reg) acc[12], a13 = inout(zmm_reg) acc[13], a14 = inout(zmm_reg) acc[14],
            a15 = inout(zmm_reg) acc[15],
            options(pure, readonly, nostack, preserves_flags)
        );
    }
}

/// [`row_step`] for unsigned activations: `acc = fma([s[0], s[1]] × 8, cvt(vpdpbusd(bw, q[0..64], codes)), acc)`.
///
/// # Safety
/// As [`row_step`].
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn row_step_unsigned(acc: &mut __m512, codes: __m512i, bw: __m512i, q: *const u8, s: *const f32) {
    let (_p, _s, _x): (__m512i, __m512, __m512i);
    // SAFETY: as in `row_step`.
    unsafe {
        std::arch::asm!(
            "vmovdqu64 {x:z}, zmmword ptr [{q}]",
            "vmovdqa64 {p:z}, {bw:z}",
            "vpdpbusd {p:z}, {x:z}, {w:z}",
            "vcvtdq2ps {p:z}, {p:z}",
            "vbroadcastsd {s:z}, qword ptr [{sp}]",
            "vfmadd231ps {acc:z}, {s:z}, {p:z}",
            p = out(zmm_reg) _p,
            s = out(zmm_reg) _s,
            x = out(zmm_reg) _x,
            w = in(zmm_reg) codes,
            bw = in(zmm_reg) bw,
            q = in(reg) q,
            sp = in(reg) s,
            acc = inout(zmm_reg) *acc,
            options(pure, readonly, nostack, preserves_flags)
        );
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
