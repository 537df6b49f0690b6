//! AVX2 + FMA + F16C kernels, one 32-value block per 256-bit register. Integer block dot products use
//! `vpmaddubsw`/`vpmaddwd`, or the VEX `vpdpbusd` of AVX-VNNI where the CPU has it; the results are identical.
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::act::QuantAct;
use super::tag::{BF16, F16, F32, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::{Ctx, L2_WEIGHT_BYTES, Out, Rhs, TileFn, Weights, drive, float_tile_set, prefetch_ahead, tile_set};
use crate::DType;
use crate::quant::QK;
use crate::superblock::IQ4_VALUES;

/// The kernels of [`drive_multi`] for one format: one weight row against 16, 8 and 7 down to 2 activation rows
/// ([`multi_tile`]), and the 2-weight-row and 1-weight-row tiles of [`quant_tile`] for a single activation row.
macro_rules! multi_set {
    ($multi:ident, $tile:ident, $k:expr) => {
        MultiKernels {
            multi: [
                $multi::<{ $k }, 16> as TileFn<_>,
                $multi::<{ $k }, 8> as TileFn<_>,
                $multi::<{ $k }, 7> as TileFn<_>,
                $multi::<{ $k }, 6> as TileFn<_>,
                $multi::<{ $k }, 5> as TileFn<_>,
                $multi::<{ $k }, 4> as TileFn<_>,
                $multi::<{ $k }, 3> as TileFn<_>,
                $multi::<{ $k }, 2> as TileFn<_>,
            ],
            one: [$tile::<{ $k }, 2, 1> as TileFn<_>, $tile::<{ $k }, 1, 1> as TileFn<_>],
        }
    };
}

/// `acc + Σ u·s` over each group of four bytes (u unsigned, s signed), per i32 lane.
trait IntDot {
    /// # Safety
    /// The CPU must support the instructions of the implementation.
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
}

/// `vpmaddubsw` + `vpmaddwd`. Exact here: the pair sums stay below `i16::MAX` because one factor is at most 31
/// (4- and 5-bit weights) or the pair is `|w| ≤ 128` times `|a| ≤ 127` (Q8_0 and IQ4_NL sign trick).
struct Maddubs;
struct Vnni;

impl IntDot for Maddubs {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX2 is guaranteed by the caller.
        unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))) }
    }
}

impl IntDot for Vnni {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: AVX-VNNI is guaranteed by the caller.
        unsafe { _mm256_dpbusd_avx_epi32(acc, u, s) }
    }
}

/// # Safety
/// See [`super::gemm`]; `vnni` only if the CPU has AVX-VNNI. AVX2, FMA and F16C are required.
pub(super) unsafe fn gemm(vnni: bool, w: &Weights<'_>, x: Rhs<'_>, t_rows: usize, rows: Range<usize>, out: Out) {
    match x {
        Rhs::Float(x) => {
            let ctx = Ctx { w, x, out };
            let set = float_tile_set!(w.dtype, 1 x 2, 2);
            // SAFETY: forwarded from the caller.
            unsafe { drive(&ctx, rows, t_rows, set) }
        }
        Rhs::Quant(a) if w.dtype.is_super_block() => {
            // SAFETY: forwarded from the caller.
            unsafe { super::avx2_super::gemm(w, a, t_rows, rows, out) }
        }
        Rhs::Quant(a) if t_rows > 1 && a.rows > 1 => {
            let ctx = Ctx { w, x: a, out };
            let set = match (vnni, w.dtype) {
                (false, DType::Q8_0) => multi_set!(multi_maddubs, quant_tile_maddubs, Q8_0),
                (false, DType::Q4_0) => multi_set!(multi_maddubs, quant_tile_maddubs, Q4_0),
                (false, DType::Q5_0) => multi_set!(multi_maddubs, quant_tile_maddubs, Q5_0),
                (false, DType::Q5_1) => multi_set!(multi_maddubs, quant_tile_maddubs, Q5_1),
                (false, DType::IQ4_NL) => multi_set!(multi_maddubs, quant_tile_maddubs, IQ4_NL),
                (false, _) => multi_set!(multi_maddubs, quant_tile_maddubs, Q4_1),
                (true, DType::Q8_0) => multi_set!(multi_vnni, quant_tile_vnni, Q8_0),
                (true, DType::Q4_0) => multi_set!(multi_vnni, quant_tile_vnni, Q4_0),
                (true, DType::Q5_0) => multi_set!(multi_vnni, quant_tile_vnni, Q5_0),
                (true, DType::Q5_1) => multi_set!(multi_vnni, quant_tile_vnni, Q5_1),
                (true, DType::IQ4_NL) => multi_set!(multi_vnni, quant_tile_vnni, IQ4_NL),
                (true, _) => multi_set!(multi_vnni, quant_tile_vnni, Q4_1),
            };
            // SAFETY: forwarded from the caller.
            unsafe { drive_multi(&ctx, rows, t_rows, &set) }
        }
        Rhs::Quant(a) => {
            let ctx = Ctx { w, x: a, out };
            // One activation row (decode) takes one weight row per tile: a single sequential weight stream, which
            // the Zen 3 streams faster than the four interleaved rows of a 4 × 1 tile (docs/PERFORMANCE.md,
            // "Session 9"). The 2 × 2 tiles only serve a caller with several rows and a one-row activation table.
            let set = match (vnni, w.dtype) {
                (false, DType::Q8_0) => tile_set!(quant_tile_maddubs, Q8_0, 2 x 2, 1),
                (false, DType::Q4_0) => tile_set!(quant_tile_maddubs, Q4_0, 2 x 2, 1),
                (false, DType::Q5_0) => tile_set!(quant_tile_maddubs, Q5_0, 2 x 2, 1),
                (false, DType::Q5_1) => tile_set!(quant_tile_maddubs, Q5_1, 2 x 2, 1),
                (false, DType::IQ4_NL) => tile_set!(quant_tile_maddubs, IQ4_NL, 2 x 2, 1),
                (false, _) => tile_set!(quant_tile_maddubs, Q4_1, 2 x 2, 1),
                (true, DType::Q8_0) => tile_set!(quant_tile_vnni, Q8_0, 2 x 2, 1),
                (true, DType::Q4_0) => tile_set!(quant_tile_vnni, Q4_0, 2 x 2, 1),
                (true, DType::Q5_0) => tile_set!(quant_tile_vnni, Q5_0, 2 x 2, 1),
                (true, DType::Q5_1) => tile_set!(quant_tile_vnni, Q5_1, 2 x 2, 1),
                (true, DType::IQ4_NL) => tile_set!(quant_tile_vnni, IQ4_NL, 2 x 2, 1),
                (true, _) => tile_set!(quant_tile_vnni, Q4_1, 2 x 2, 1),
            };
            // SAFETY: forwarded from the caller.
            unsafe { drive(&ctx, rows, t_rows, set) }
        }
    }
}

/// Canonical fold of 8 lanes (see [`super::fold8`]).
#[inline(always)]
pub(super) unsafe fn fold8(v: __m256) -> f32 {
    // SAFETY: AVX is implied by the callers' AVX2.
    unsafe {
        let u = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<1>(w, w)))
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant_tile_maddubs<const KIND: u8, const NR: usize, const TR: usize>(
    c: &Ctx<'_, &QuantAct>,
    n: usize,
    t: usize,
) {
    // SAFETY: same contract as this function.
    unsafe { quant_tile::<Maddubs, KIND, NR, TR>(c, n, t) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn quant_tile_vnni<const KIND: u8, const NR: usize, const TR: usize>(
    c: &Ctx<'_, &QuantAct>,
    n: usize,
    t: usize,
) {
    // SAFETY: same contract as this function.
    unsafe { quant_tile::<Vnni, KIND, NR, TR>(c, n, t) }
}

/// See [`multi_set`].
struct MultiKernels<'a> {
    multi: [TileFn<&'a QuantAct>; 8],
    one: [TileFn<&'a QuantAct>; 2],
}

/// Walks the outputs `rows × 0..t_rows` (more than one activation row): a group of weight rows that stays in L2, and
/// over it the activation rows 16 at a time with [`multi_tile`], then 8, then the last 2 to 7 together in one tile of
/// their size (a 5- to 7-row batch, what a pipeline stage often gets, was 4 rows plus a 1- to 3-row tile: 20-35% more
/// per row; docs/PERFORMANCE.md, "Session 9"), a last single row with the one-row tiles. Every output is the same
/// operations in the same order whichever tile computes it.
///
/// # Safety
/// As [`drive`]: the CPU supports the kernels and `ctx` satisfies [`super::gemm`]'s size contract; `t_rows > 1`
/// (the activations carry the transposed scale tables).
unsafe fn drive_multi<'a>(ctx: &Ctx<'_, &'a QuantAct>, rows: Range<usize>, t_rows: usize, k: &MultiKernels<'a>) {
    let group = (L2_WEIGHT_BYTES / ctx.w.row_bytes.max(1)).max(2);
    let mut g0 = rows.start;
    while g0 < rows.end {
        let g1 = (g0 + group).min(rows.end);
        let mut t = 0;
        while t < t_rows {
            let left = t_rows - t;
            if left == 1 {
                let mut n = g0;
                while n + 2 <= g1 {
                    // SAFETY: rows n..n+2 and activation row t are inside the output (caller).
                    unsafe { (k.one[0])(ctx, n, t) };
                    n += 2;
                }
                if n < g1 {
                    // SAFETY: as above.
                    unsafe { (k.one[1])(ctx, n, t) };
                }
                break;
            }
            let (f, tr) = match left {
                2 => (k.multi[7], 2),
                3 => (k.multi[6], 3),
                4 => (k.multi[5], 4),
                5 => (k.multi[4], 5),
                6 => (k.multi[3], 6),
                7 => (k.multi[2], 7),
                8..=15 => (k.multi[1], 8),
                _ => (k.multi[0], 16),
            };
            for n in g0..g1 {
                // SAFETY: row n and activation rows t..t+tr are inside the output (caller).
                unsafe { f(ctx, n, t) };
            }
            t += tr;
        }
        g0 = g1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn multi_maddubs<const KIND: u8, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t: usize) {
    // SAFETY: same contract as this function.
    unsafe { multi_tile::<Maddubs, KIND, TR>(c, n, t) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn multi_vnni<const KIND: u8, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t: usize) {
    // SAFETY: same contract as this function.
    unsafe { multi_tile::<Vnni, KIND, TR>(c, n, t) }
}

/// Block bytes and offset of the quants of a 32-value format.
#[inline(always)]
const fn geometry(kind: u8) -> (usize, usize) {
    match kind {
        Q8_0 => (34, 2),
        Q4_0 | IQ4_NL => (18, 2),
        Q5_0 => (22, 6),
        Q5_1 => (24, 8),
        _ => (20, 4),
    }
}

/// The weight block at `blk` as 32 bytes for the integer dot product, `(v, u)`: `u` goes on the unsigned side and
/// `v` is the sign source. Q4_0/Q4_1/Q5_0/Q5_1: the codes `q` (unsigned, offsets corrected elsewhere), `v = u`;
/// Q8_0 and IQ4_NL: the signed values `v` and `u = |v|` (the activations take `v`'s signs).
///
/// # Safety
/// AVX2 must be available; the block (its quants at `qoff`, and for Q5_x the high bits before them) must be readable.
#[inline(always)]
unsafe fn unpack<const KIND: u8>(blk: *const u8, qoff: usize, nibbles: __m256i, iq4: __m256i) -> (__m256i, __m256i) {
    // SAFETY: the reads stay inside the block (caller); AVX2 is available (caller).
    unsafe {
        if KIND == Q8_0 {
            let wv = _mm256_loadu_si256(blk.add(qoff).cast());
            return (wv, _mm256_abs_epi8(wv));
        }
        // The 16 bytes in both halves, the upper half shifted right by 4 (per 32-bit lane: each byte's high nibble
        // lands in its low bits, the next byte's low nibble above it, which the mask clears): one load-broadcast and
        // one shift instead of a load, a shift and a lane insert.
        let q = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(qoff).cast()));
        let y = _mm256_and_si256(_mm256_srlv_epi32(q, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0)), nibbles);
        match KIND {
            IQ4_NL => {
                let v = _mm256_shuffle_epi8(iq4, y);
                (v, _mm256_abs_epi8(v))
            }
            Q5_0 | Q5_1 => {
                let high = bytes_from_bits(blk.add(qoff - 4).cast::<u32>().read_unaligned());
                let y = _mm256_or_si256(y, _mm256_and_si256(high, _mm256_set1_epi8(0x10)));
                (y, y)
            }
            _ => (y, y),
        }
    }
}

/// The block's first 8 bytes converted as four f16 values: lane 0 is the scale `d`, lane 1 the minimum `m` of Q4_1/Q5_1;
/// the other lanes are whatever the following bytes make (quants, possibly NaN or infinite) and must not be used. One
/// `vcvtph2ps` with a memory operand, where [`head`] needs a load, a move to a vector register and the conversion.
///
/// # Safety
/// F16C must be available and the block's first 8 bytes readable (every 32-value block is at least 18 bytes).
#[inline(always)]
unsafe fn head8(blk: *const u8) -> __m128 {
    // SAFETY: as the caller guarantees.
    unsafe { _mm_cvtph_ps(_mm_loadl_epi64(blk.cast())) }
}

/// The block's f16 scale (and minimum, for Q4_1/Q5_1) as f32: `[d, m, 0, 0]` or `[d, 0, 0, 0]`.
///
/// # Safety
/// F16C must be available and the block's first 4 (or 2) bytes readable.
#[inline(always)]
unsafe fn head<const KIND: u8>(blk: *const u8) -> __m128 {
    // SAFETY: as the caller guarantees.
    unsafe {
        if KIND == Q4_1 || KIND == Q5_1 {
            _mm_cvtph_ps(_mm_cvtsi32_si128(blk.cast::<u32>().read_unaligned() as i32))
        } else {
            _mm_cvtph_ps(_mm_cvtsi32_si128(blk.cast::<u16>().read_unaligned() as i32))
        }
    }
}

/// The exact lane sums `P[l]` of block `b` for activation row `t` (see [`super`]): the integer dot product of
/// [`unpack`]'s `(v, u)` with the row's quantised block, the offset of Q4_0/Q5_0 corrected by the lane-sum table.
///
/// # Safety
/// As [`unpack`], with `t` and `b` inside the activations.
#[inline(always)]
unsafe fn block_dot<D: IntDot, const KIND: u8>(a: &QuantAct, t: usize, b: usize, v: __m256i, u: __m256i) -> __m256i {
    // SAFETY: as the caller guarantees.
    unsafe { block_dot_at::<D, KIND>(a, a.qs_ptr(t, b), t, b, v, u) }
}

/// [`block_dot`] with the activation block read at `q` (block `b` of row `t`, in `qs` or `qt`).
///
/// # Safety
/// As [`block_dot`], and `q` holds that block.
#[inline(always)]
unsafe fn block_dot_at<D: IntDot, const KIND: u8>(
    a: &QuantAct,
    q: *const u8,
    t: usize,
    b: usize,
    v: __m256i,
    u: __m256i,
) -> __m256i {
    // SAFETY: as the caller guarantees.
    unsafe {
        let av = _mm256_loadu_si256(q.cast());
        match KIND {
            Q8_0 | IQ4_NL => D::dot(_mm256_setzero_si256(), u, _mm256_sign_epi8(av, v)),
            Q4_0 | Q5_0 => D::dot(_mm256_loadu_si256(a.bias_ptr(t, b).cast()), u, av),
            _ => D::dot(_mm256_setzero_si256(), u, av),
        }
    }
}

/// Blocks that [`multi_tile`] prepares ahead of its integer passes (tables of 6 KB on the stack).
const CHUNK: usize = 64;

/// One weight row `n` against `TR` (at most 16) activation rows from `t0`. The row is walked in chunks of [`CHUNK`]
/// blocks; for each chunk:
/// 1. every block is unpacked once (kept in a table on the stack), its `d_w · d_a` for the `TR` rows computed in
///    one multiply per 8 rows (from the transposed table [`QuantAct::dt`]) into a second table, and the `m` term of
///    Q4_1/Q5_1 added as one fused multiply-add per 8 rows (lane `t`, from [`QuantAct::st`], into the accumulator
///    of the block's parity);
/// 2. then one pass per block parity and group of 8 rows: per block and row the integer dot product (activations
///    from the block-major copy [`QuantAct::qt`], the rows of a block at fixed offsets), its conversion and one
///    fused multiply-add with the scale product broadcast from the table (a load, no shuffle).
///
/// A pass keeps only its 8 accumulators in registers, so 16 rows share each weight block's unpacking and scale
/// conversion. Each accumulator still sees its blocks in order (the even and odd chains are independent), so each
/// output is the same operations in the same order as in [`quant_tile`] (the products `d_w · d_a` and the `m` terms
/// are the same IEEE operations, only several in one register).
///
/// # Safety
/// AVX2/FMA/F16C (and what `D` needs) must be available; row `n` and activation rows `t0..t0+TR` must be in range,
/// and the activations hold more than one row (so the transposed tables and the block-major copy exist).
#[inline(always)]
unsafe fn multi_tile<D: IntDot, const KIND: u8, const TR: usize>(c: &Ctx<'_, &QuantAct>, n: usize, t0: usize) {
    let a = c.x;
    let (bs, qoff) = geometry(KIND);
    let with_min = KIND == Q4_1 || KIND == Q5_1;
    // Formats whose integer dot product needs the signed values besides the unsigned ones (see `unpack`).
    let signed = KIND == Q8_0 || KIND == IQ4_NL;
    let groups = TR.div_ceil(8);
    // SAFETY: block `b < nb` of weight row `n` and of activation rows `t0 + t` are inside the buffers the matmul
    // checked; the 8-row loads from the transposed tables stay inside them (rows `t0 + 8g < t_rows`, then
    // `NATURAL_T_PAD` zeros after each block's rows); the stack tables are read at the chunk's blocks, which step 1
    // wrote.
    unsafe {
        let row = c.w.row_ptr(n);
        // Up to 8 rows zeroed here; 16 rows written by the first chunk's passes (which then start from zeros)
        // before anything reads them, not zeroed up front (a 1 KB `memset` per call; zeroing in the passes measured
        // slower at 8 rows).
        let early = TR > 8;
        let mut acc_mem = std::mem::MaybeUninit::<[[__m256; TR]; 2]>::uninit();
        if !early {
            acc_mem.write([[_mm256_setzero_ps(); TR]; 2]);
        }
        let acc = acc_mem.as_mut_ptr().cast::<[__m256; TR]>();
        // [parity][group of 8 rows]
        let mut macc = [[_mm256_setzero_ps(); 2]; 2];
        let mut scales = std::mem::MaybeUninit::<[[__m256; 2]; CHUNK]>::uninit();
        let mut quants = std::mem::MaybeUninit::<[[__m256i; 2]; CHUNK]>::uninit();
        let sc = scales.as_mut_ptr().cast::<[__m256; 2]>();
        let wq = quants.as_mut_ptr().cast::<[__m256i; 2]>();
        let nibbles = _mm256_set1_epi8(0x0f);
        let iq4 = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr().cast()));
        let nb = a.nb;
        // Bytes from block `b` to block `b + 2` in the block-major copy.
        let step = 2 * a.rows * QK;
        let mut c0 = 0;
        // At least one round, so that the accumulators are written even when `nb` is 0.
        loop {
            let c1 = (c0 + CHUNK).min(nb);
            macro_rules! prepare {
                ($b:expr, $p:literal) => {{
                    let b = $b;
                    let i = b - c0;
                    let blk = row.add(b * bs);
                    prefetch_ahead(blk);
                    let h = head::<KIND>(blk);
                    let dw = _mm256_broadcastss_ps(h);
                    for g in 0..groups {
                        (*sc.add(i))[g] = _mm256_mul_ps(dw, _mm256_loadu_ps(a.dn_ptr(t0 + 8 * g, b)));
                    }
                    if with_min {
                        let mw = _mm256_broadcastss_ps(_mm_movehdup_ps(h));
                        for g in 0..groups {
                            macc[$p][g] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(a.sn_ptr(t0 + 8 * g, b)), macc[$p][g]);
                        }
                    }
                    if KIND != Q8_0 {
                        let (v, u) = unpack::<KIND>(blk, qoff, nibbles, iq4);
                        (*wq.add(i))[0] = u;
                        if signed {
                            (*wq.add(i))[1] = v;
                        }
                    }
                }};
            }
            // `c0` is even, so block `c0 + 2i + p` has parity `p`.
            let mut b = c0;
            while b + 2 <= c1 {
                prepare!(b, 0);
                prepare!(b + 1, 1);
                b += 2;
            }
            if b < c1 {
                prepare!(b, 0);
            }
            for p in 0..2 {
                for g in 0..groups {
                    let mut accp = [_mm256_setzero_ps(); 8];
                    if !early || c0 > 0 {
                        for j in 0..8 {
                            if 8 * g + j < TR {
                                accp[j] = (*acc.add(p))[8 * g + j];
                            }
                        }
                    }
                    let mut b = c0 + p;
                    if b < c1 {
                        let mut q = a.qt_ptr(t0 + 8 * g, b);
                        while b < c1 {
                            let i = b - c0;
                            let (v, u) = if KIND == Q8_0 {
                                // A load and an absolute value: cheaper than a copy on the stack.
                                unpack::<KIND>(row.add(b * bs), qoff, nibbles, iq4)
                            } else {
                                let u = (*wq.add(i))[0];
                                (if signed { (*wq.add(i))[1] } else { u }, u)
                            };
                            let s = sc.add(i).cast::<f32>().add(8 * g);
                            for j in 0..8 {
                                if 8 * g + j < TR {
                                    let dot = block_dot_at::<D, KIND>(a, q.add(j * QK), t0 + 8 * g + j, b, v, u);
                                    let sj = _mm256_broadcast_ss(&*s.add(j));
                                    accp[j] = _mm256_fmadd_ps(sj, _mm256_cvtepi32_ps(dot), accp[j]);
                                }
                            }
                            b += 2;
                            q = q.wrapping_add(step);
                        }
                    }
                    for j in 0..8 {
                        if 8 * g + j < TR {
                            (*acc.add(p))[8 * g + j] = accp[j];
                        }
                    }
                }
            }
            c0 = c1;
            if c0 >= nb {
                break;
            }
        }
        let mut mins = [0.0f32; 16];
        for g in 0..groups {
            _mm256_storeu_ps(mins.as_mut_ptr().add(8 * g), _mm256_add_ps(macc[0][g], macc[1][g]));
        }
        for t in 0..TR {
            let mut v = fold8(_mm256_add_ps((*acc)[t], (*acc.add(1))[t]));
            if with_min {
                v += mins[t];
            }
            c.out.put(t0 + t, n, v);
        }
    }
}

/// Blocks of a weight row per software prefetch in [`quant_tile`]: one prefetch every 72–136 bytes of the row (the
/// block is 18–34 bytes), which with the hardware prefetcher keeps the one-row stream ahead; one per block issued
/// about two per cache line (docs/PERFORMANCE.md, "Session 9").
const PREFETCH_EVERY: usize = 4;

/// `NR` weight rows from `n` times `TR` activation rows from `t0`, block by block.
///
/// # Safety
/// AVX2/FMA/F16C (and what `D` needs) must be available; rows `n..n+NR` and `t0..t0+TR` must be in range.
#[inline(always)]
unsafe fn quant_tile<D: IntDot, const KIND: u8, const NR: usize, const TR: usize>(
    c: &Ctx<'_, &QuantAct>,
    n: usize,
    t0: usize,
) {
    let a = c.x;
    let (bs, qoff) = geometry(KIND);
    let with_min = KIND == Q4_1 || KIND == Q5_1;
    // SAFETY: every pointer below stays inside the weight rows and activation tables whose sizes the matmul checked:
    // block `b < nb` of row `n + r < rows` and of activation row `t0 + t < t_rows`.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let mut acc = [[[_mm256_setzero_ps(); 2]; TR]; NR];
        let mut macc = [[[_mm_setzero_ps(); 2]; TR]; NR];
        let nibbles = _mm256_set1_epi8(0x0f);
        let iq4 = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr().cast()));
        macro_rules! step {
            ($b:expr, $h:literal) => {{
                let b = $b;
                for r in 0..NR {
                    let blk = rows[r].add(b * bs);
                    if b.is_multiple_of(PREFETCH_EVERY) {
                        prefetch_ahead(blk);
                    }
                    let h = head8(blk);
                    let (v, u) = unpack::<KIND>(blk, qoff, nibbles, iq4);
                    for t in 0..TR {
                        let p = block_dot::<D, KIND>(a, t0 + t, b, v, u);
                        // Lane 0 of `sc` is `d_w · d_a`; with a minimum, `[d_w, m_w] · [d_a, s_a]` in one multiply,
                        // and lane 1 of `macc` takes `fma(m_w, s_a, ·)` (lanes 2-3 hold garbage, never read).
                        let sc = if with_min {
                            let ds = _mm_castpd_ps(_mm_load_sd(a.ds_ptr(t0 + t, b).cast()));
                            macc[r][t][$h] = _mm_fmadd_ps(h, ds, macc[r][t][$h]);
                            _mm_mul_ps(h, ds)
                        } else {
                            _mm_mul_ss(h, _mm_load_ss(a.d_ptr(t0 + t, b)))
                        };
                        let sc = _mm256_broadcastss_ps(sc);
                        acc[r][t][$h] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[r][t][$h]);
                    }
                }
            }};
        }
        let nb = a.nb;
        let mut b = 0;
        while b + 2 <= nb {
            step!(b, 0);
            step!(b + 1, 1);
            b += 2;
        }
        if b < nb {
            step!(b, 0);
        }
        for r in 0..NR {
            for t in 0..TR {
                let mut v = fold8(_mm256_add_ps(acc[r][t][0], acc[r][t][1]));
                if with_min {
                    v += _mm_cvtss_f32(_mm_movehdup_ps(_mm_add_ps(macc[r][t][0], macc[r][t][1])));
                }
                c.out.put(t0 + t, n + r, v);
            }
        }
    }
}

/// Byte `j` of the result is 0xff where bit `j` of `x` is set, else 0 (the fifth bits of Q5_0/Q5_1).
#[inline(always)]
unsafe fn bytes_from_bits(x: u32) -> __m256i {
    // SAFETY: AVX2 is available in the calling kernels.
    unsafe {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(x as i32),
            _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
        );
        let others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
        _mm256_cmpeq_epi8(others, _mm256_set1_epi64x(-1))
    }
}

/// Loads 8 weights starting at element `i` of a row, converted to f32.
#[inline(always)]
unsafe fn load8<const DT: u8>(row: *const u8, i: usize) -> __m256 {
    // SAFETY: the caller keeps `i + 8` inside the row; F16C/AVX2 are available in the calling kernels.
    unsafe {
        match DT {
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(row.add(2 * i).cast())),
            BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                row.add(2 * i).cast(),
            )))),
            _ => _mm256_loadu_ps(row.add(4 * i).cast()),
        }
    }
}

/// `NR` float weight rows times `TR` f32 activation rows.
///
/// # Safety
/// AVX2/FMA/F16C must be available; rows `n..n+NR` and `t0..t0+TR` must be in range.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_tile<const DT: u8, const NR: usize, const TR: usize>(c: &Ctx<'_, &[f32]>, n: usize, t0: usize) {
    let k = c.w.k;
    let elem = if DT == F32 { 4 } else { 2 };
    // SAFETY: loads stay inside weight rows `n + r` (k elements) and activation rows `t0 + t` (k values); the tail is
    // copied into zero-padded buffers first.
    unsafe {
        let rows: [*const u8; NR] = std::array::from_fn(|r| c.w.row_ptr(n + r));
        let xs: [*const f32; TR] = std::array::from_fn(|t| c.x.as_ptr().add((t0 + t) * k));
        let mut acc = [[[_mm256_setzero_ps(); 4]; TR]; NR];
        let full = k / 32;
        for blk in 0..full {
            let i = blk * 32;
            for r in 0..NR {
                for line in (0..32 * elem).step_by(64) {
                    prefetch_ahead(rows[r].add(i * elem + line));
                }
            }
            let wv: [[__m256; 4]; NR] =
                std::array::from_fn(|r| std::array::from_fn(|j| load8::<DT>(rows[r], i + 8 * j)));
            for t in 0..TR {
                let xv: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xs[t].add(i + 8 * j)));
                for r in 0..NR {
                    for j in 0..4 {
                        acc[r][t][j] = _mm256_fmadd_ps(wv[r][j], xv[j], acc[r][t][j]);
                    }
                }
            }
        }
        let rem = k - full * 32;
        if rem > 0 {
            let i = full * 32;
            let mut wbuf = [[0u8; 128]; NR];
            for r in 0..NR {
                std::ptr::copy_nonoverlapping(rows[r].add(i * elem), wbuf[r].as_mut_ptr(), rem * elem);
            }
            for t in 0..TR {
                let mut xbuf = [0.0f32; 32];
                std::ptr::copy_nonoverlapping(xs[t].add(i), xbuf.as_mut_ptr(), rem);
                for r in 0..NR {
                    for j in 0..4 {
                        let wv = load8::<DT>(wbuf[r].as_ptr(), 8 * j);
                        acc[r][t][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xbuf.as_ptr().add(8 * j)), acc[r][t][j]);
                    }
                }
            }
        }
        for r in 0..NR {
            for t in 0..TR {
                let [a0, a1, a2, a3] = acc[r][t];
                let v = fold8(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
                c.out.put(t0 + t, n + r, v);
            }
        }
    }
}
