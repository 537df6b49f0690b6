//! Activation rows quantised to 8-bit blocks once per matmul, so quantised weights are multiplied with integer dot
//! products (llama.cpp's `vec_dot_type`). The block values are the same for every instruction set; only their byte
//! arrangement ([`ActLayout`]) follows what the chosen kernel loads.

use super::super::parallel::{Pool, split_mut};
use crate::quant::QK;
use crate::superblock::QK_K;

/// Byte arrangement of the quantised activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ActLayout {
    /// Block after block, 32 signed values in element order (scalar and AVX2 kernels).
    #[default]
    Natural,
    /// Blocks in pairs `(2j, 2j+1)` with the 4-value lanes of the two blocks interleaved: i32 lane `z = 2l + h` of
    /// the pair's 64 bytes holds lane `l` (values `4l..4l+4`) of block `h` (0 even, 1 odd). It is the order in which
    /// the AVX-512 kernels unpack the nibbles of two 4-bit weight blocks (the low nibbles of both blocks' code dwords
    /// interleaved, then the high ones) and interleave the dwords of two Q8_0 blocks; the block parity alternates
    /// from lane to lane, so one 64-bit broadcast `[x_e, x_o]` carries a per-block value to every lane.
    Pair,
    /// 256-value super-blocks quantised as llama.cpp's Q8_K (for the K-quants and IQ4_XS): one f32 scale per
    /// super-block, values in element order, and the sum of each 16-value group in [`QuantAct::bsums`].
    Super,
}

impl ActLayout {
    fn paired(self) -> bool {
        self == ActLayout::Pair
    }
}

/// How a kernel wants its activations: layout, lane-sum table, and whether the AVX2 quantiser may be used (the same
/// values either way; the scalar level keeps to portable code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ActPlan {
    pub layout: ActLayout,
    /// Lane-sum factor `c` of [`QuantAct::bias`], if the kernel needs the table.
    pub bias: Option<i32>,
    pub avx2: bool,
    /// [`ActLayout::Super`] only: also fill the wide tables ([`QuantAct::q16`], [`QuantAct::d_t`],
    /// [`QuantAct::bs_t`]) of the AVX-512 multi-row kernels.
    pub wide: bool,
    /// [`ActLayout::Pair`] only (AVX-512 Q8_0, Q4_0, Q5_0, IQ4_NL): for more than [`UNSIGNED_MIN_ROWS`] rows, store
    /// the values offset to unsigned bytes instead of filling the lane-sum table (see [`QuantAct::unsigned`]).
    pub unsigned_rows: bool,
    /// [`ActLayout::Natural`] with more than one row: also write the tables that only the AVX2 / AVX-VNNI multi-row
    /// kernel reads, the block-major copy [`QuantAct::qt`] and the transposed scales [`QuantAct::dt`] /
    /// [`QuantAct::st`].
    pub multi_row_tables: bool,
}

/// Row count above which an [`ActPlan::unsigned_rows`] plan stores unsigned values: the multi-row kernels then
/// serve most rows; one to four rows (decode) keep the signed values and the lane-sum table of the 4-row tiles.
pub(crate) const UNSIGNED_MIN_ROWS: usize = 4;

/// Activation rows of the [`ActLayout::Pair`] tables are stored rounded up to a multiple of this, so a multi-row
/// kernel tile may read up to this many rows from any multiple of it (the extra rows are all zeros).
pub(crate) const ROW_PAD: usize = 16;

/// Quantised activation rows. `d`, `s` and the per-block tables have `blocks` entries per row, where `blocks` is the
/// block count rounded up to even for the paired layouts (the extra block is all zeros).
#[derive(Debug, Default)]
pub(crate) struct QuantAct {
    pub layout: ActLayout,
    pub rows: usize,
    /// Rows in storage: `rows`, or for the paired layout with more than one row `rows` rounded up to [`ROW_PAD`]
    /// (zero rows: every value, scale and sum 0).
    pub rows_pad: usize,
    /// Blocks per row holding data (`K / 32`).
    pub nb: usize,
    /// Blocks per row in storage (`nb`, or `nb` rounded up to even when paired).
    pub blocks: usize,
    /// `rows × blocks × 32` quantised values, starting on a 64-byte boundary (so a pair or a super-block row never
    /// straddles cache lines: a 512-bit load across two lines costs two).
    pub qs: AlignedBytes,
    /// Natural layout with more than one row, for the AVX2 kernels: the values of `qs` again, block-major (block `b`
    /// of row `t` at `(b · rows + t) · 32`), so the multi-row kernel reads the rows of a block at fixed offsets.
    pub qt: AlignedBytes,
    /// Scale of each block: `x ≈ d · q`.
    pub d: Vec<f32>,
    /// `d · Σ q` of each block: the activation side of the `m` term of Q4_1.
    pub s: Vec<f32>,
    /// Natural layout: `[d, s]` of each block side by side, so that the AVX2 one-row tile multiplies a Q4_1/Q5_1
    /// block's `[d_w, m_w]` by one 8-byte load (see `avx2::quant_tile`).
    pub ds: Vec<f32>,
    /// `c · Σ q` over each 4-value lane (8 per block, 16 per pair in the paired lane order), when the kernel computes
    /// with offset weights: `Σ (w + o)·a + bias = Σ w·a` for `c = −o` (Q4_0 stores `w + 8`; AVX-512 Q8_0 computes
    /// with `w + 128`, which `vpdpbusd` needs unsigned).
    pub bias: Vec<i32>,
    /// Paired layout only: each pair's scales over the 16 i32 lanes of a 512-bit dot product, `[d_e, d_o] × 8`.
    pub dpat: Vec<f32>,
    /// Paired layout only: `[0, s_e, 0, s_o]` of each pair, lined up with the `[d, m, d, m]` of Q4_1/Q5_1 weights.
    pub spat: Vec<f32>,
    /// Paired layout: `[d_e, d_o]` of pair `p` of row `t` at `(p · rows_pad + t) · 2`: the scales of
    /// consecutive rows side by side, for the multi-row kernels. Natural layout with more than one row: `d` of block
    /// `b` of row `t` at `b · natural_t_stride() + t` (zeros after the last row, so 8 rows load from any row).
    pub dt: Vec<f32>,
    /// Paired layout: `[s_e, s_o]` (the `s` of the two blocks) in the order of `dt`; natural layout: `s` in the order
    /// of `dt`.
    pub st: Vec<f32>,
    /// [`ActLayout::Super`] only: the sum of each 16-value group, 16 per super-block (ggml `block_q8_K::bsums`).
    pub bsums: Vec<i16>,
    /// `qs` holds `q + 128` as unsigned bytes (zero in the missing odd block of a pair and in padding rows) and
    /// `bias` is empty: the AVX-512 Q8_0, Q4_0, Q5_0 and IQ4_NL kernels then put the activations on `vpdpbusd`'s
    /// unsigned side and start each dot product from the weights' own lane sums, `Σ w·(a + 128) − 128·Σ w = Σ w·a`,
    /// instead of loading a lane-sum table row per activation row.
    pub unsigned: bool,
    /// [`ActLayout::Super`] with the wide tables: the values of `qs` widened to i16 (same order), for `vpdpwssd`
    /// against weights widened and pre-scaled to i16.
    pub q16: Vec<i16>,
    /// Wide tables: the scale of super-block `b` of row `t` at `b · rows + t` (activation rows side by side), plus
    /// [`WIDE_PAD`] zeros so that a kernel may load 8 rows from any `t`.
    pub d_t: Vec<f32>,
    /// Wide tables: the group sums of super-block `b` of row `t` in pairs, `bsums[2p] | bsums[2p + 1] << 16` as one
    /// i32 at `(8b + p) · rows + t`, plus [`WIDE_PAD`] zeros.
    pub bs_t: Vec<i32>,
}

/// Zeros after each block's rows in the natural layout's transposed tables ([`QuantAct::dt`]), so that 8 rows can be
/// loaded from any row.
pub(crate) const NATURAL_T_PAD: usize = 8;

/// Zeros after the transposed wide tables, so that 8 activation rows can be loaded from any row.
pub(crate) const WIDE_PAD: usize = 8;

/// One cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A byte buffer that starts on a 64-byte boundary; it derefs to its bytes.
#[derive(Debug, Default)]
pub(crate) struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    /// Makes the buffer `n` zero bytes long, keeping its allocation.
    fn zeroed(&mut self, n: usize) {
        self.lines.clear();
        self.lines.resize(n.div_ceil(64), Line([0; 64]));
        self.len = n;
    }
}

impl std::ops::Deref for AlignedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `lines` holds at least `len` initialised bytes (`Line` is 64 bytes without padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and the borrow is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// 1.5 · 2^23: adding it rounds any |v| < 2^22 to an integer (ties to even); subtracting it again leaves that integer.
const MAGIC: f32 = 12_582_912.0;

/// Quantises one block the way every kernel expects: `d = amax / 127`, `q = round_half_even(x · 127 / amax)` clamped
/// to ±127 (NaN becomes 0), returning `(d, Σ q)`. [`quantize_block_avx2`] computes the same values.
#[inline(always)]
fn quantize_block(x: &[f32], q: &mut [i8; QK]) -> (f32, i32) {
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        amax = if a > amax { a } else { amax };
    }
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0;
    for (qi, &xi) in q.iter_mut().zip(x) {
        // An integer in [-127, 127] (or NaN, which converts to 0), so the conversion is exact.
        let v = ((xi * id + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i32;
        *qi = v as i8;
        sum += v;
    }
    (d, sum)
}

/// [`quantize_block`] with AVX2 (about ten times faster; the same values: max is exact, and multiply, add, subtract and
/// the conversion of an integral value are the same IEEE operations).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8; QK]) -> (f32, i32) {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len(), QK);
    // SAFETY: `x` holds 32 values and `q` 32 bytes; the loads and the store stay inside them.
    unsafe {
        let v: [__m256; 4] = std::array::from_fn(|c| _mm256_loadu_ps(x.as_ptr().add(8 * c)));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut m = _mm256_setzero_ps();
        for c in v {
            // max_ps returns its second operand when the first is NaN, so NaN never enters, as in the scalar loop.
            m = _mm256_max_ps(_mm256_and_ps(c, abs), m);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0.0f32, |a, &l| if l > a { l } else { a });
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let magic = _mm256_set1_ps(MAGIC);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let qi: [__m256i; 4] = std::array::from_fn(|c| {
            let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v[c], id), magic), magic);
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r)); // NaN → 0
            _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
        });
        let total = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
        let t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256::<1>(total));
        let t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32::<1>(t2)));
        // Packing interleaves 128-bit lanes; the final permutation restores element order.
        let p16a = _mm256_packs_epi32(qi[0], qi[1]);
        let p16b = _mm256_packs_epi32(qi[2], qi[3]);
        let p8 = _mm256_packs_epi16(p16a, p16b);
        let ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr().cast(), ordered);
        (d, sum)
    }
}

/// Quantises a block with the fastest available code.
#[inline(always)]
fn quantize_block_fast(avx2: bool, x: &[f32], q: &mut [i8; QK]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller detected AVX2.
        return unsafe { quantize_block_avx2(x, q) };
    }
    let _ = avx2;
    quantize_block(x, q)
}

/// Position of lane `lane` of the even (`odd = 0`) or odd block inside a pair's 16 i32 lanes ([`ActLayout::Pair`]).
#[inline]
pub(crate) const fn pair_lane(odd: usize, lane: usize) -> usize {
    2 * lane + odd
}

/// Quantises `rows` rows of `k` values (`k % 32 == 0`) from `x` (row-major); `bias` is the lane-sum factor `c` of
/// [`QuantAct::bias`], if the kernel needs one.
#[cfg(test)]
pub(crate) fn quantize_rows(x: &[f32], rows: usize, k: usize, layout: ActLayout, bias: Option<i32>) -> QuantAct {
    let mut act = QuantAct::default();
    act.fill(
        x,
        rows,
        k,
        ActPlan {
            layout,
            bias,
            avx2: false,
            wide: layout == ActLayout::Super,
            unsigned_rows: false,
            multi_row_tables: false,
        },
        &Pool::single(),
    );
    act
}

/// Clears `v` and fills it with `n` zeros, keeping its allocation.
fn zeroed<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::default());
}

impl QuantAct {
    /// Quantises `rows` rows of `k` values (`k % 32 == 0`) from `x` (row-major) into this table as `plan` says,
    /// reusing its buffers.
    /// Rows are quantised in parallel on `pool` when there are enough of them; each value is computed the same way
    /// whichever thread does it.
    pub(crate) fn fill(&mut self, x: &[f32], rows: usize, k: usize, plan: ActPlan, pool: &Pool) {
        if plan.layout == ActLayout::Super {
            self.fill_super(pool, plan.avx2, x, rows, k, plan.wide);
            return;
        }
        let unsigned = plan.unsigned_rows && plan.layout.paired() && rows > UNSIGNED_MIN_ROWS;
        let bias = if unsigned { None } else { plan.bias };
        self.fill_impl(pool, plan.avx2, x, rows, k, plan.layout, bias, unsigned, plan.multi_row_tables);
    }

    #[allow(clippy::too_many_arguments)]
    fn fill_impl(
        &mut self,
        pool: &Pool,
        avx2: bool,
        x: &[f32],
        rows: usize,
        k: usize,
        layout: ActLayout,
        bias: Option<i32>,
        unsigned: bool,
        multi_row_tables: bool,
    ) {
        let nb = k / QK;
        let blocks = if layout.paired() { nb.next_multiple_of(2) } else { nb };
        let pairs = blocks / 2;
        let rows_pad = if layout.paired() && rows > 1 { rows.next_multiple_of(ROW_PAD) } else { rows };
        self.layout = layout;
        self.unsigned = unsigned;
        self.rows = rows;
        self.rows_pad = rows_pad;
        self.nb = nb;
        self.blocks = blocks;
        self.qs.zeroed(rows_pad * blocks * QK);
        let multi_row = multi_row_tables && layout == ActLayout::Natural && rows > 1;
        self.qt.zeroed(if multi_row { rows * nb * QK } else { 0 });
        zeroed(&mut self.d, rows_pad * blocks);
        zeroed(&mut self.s, rows_pad * blocks);
        zeroed(&mut self.ds, if layout == ActLayout::Natural { 2 * rows_pad * blocks } else { 0 });
        zeroed(&mut self.bias, if bias.is_some() { rows_pad * blocks * 8 } else { 0 });
        let paired = if layout.paired() { rows_pad * pairs } else { 0 };
        zeroed(&mut self.dpat, paired * 16);
        zeroed(&mut self.spat, paired * 4);
        // The natural layout's transposed tables, for the AVX2 multi-row kernel (see `dt`).
        let natural_t = if multi_row { nb * self.natural_t_stride() } else { 0 };
        zeroed(&mut self.dt, paired * 2 + natural_t);
        zeroed(&mut self.st, paired * 2 + natural_t);
        let shape = RowShape { nb, blocks, layout, bias, unsigned };
        let strides = shape.strides();
        let chunks = pool.row_chunks(rows, nb, PARALLEL_BLOCKS);
        let x = &x[..rows * k];
        let mut parts: Vec<RowChunk<'_>> =
            chunks.iter().map(|r| RowChunk { rows: r.clone(), ..RowChunk::default() }).collect();
        split_rows(&mut self.qs, &chunks, strides.qs, &mut parts, |c, v| c.qs = v);
        split_rows(&mut self.d, &chunks, strides.d, &mut parts, |c, v| c.d = v);
        split_rows(&mut self.s, &chunks, strides.d, &mut parts, |c, v| c.s = v);
        split_rows(&mut self.ds, &chunks, strides.ds, &mut parts, |c, v| c.ds = v);
        split_rows(&mut self.bias, &chunks, strides.bias, &mut parts, |c, v| c.bias = v);
        split_rows(&mut self.dpat, &chunks, strides.dpat, &mut parts, |c, v| c.dpat = v);
        split_rows(&mut self.spat, &chunks, strides.spat, &mut parts, |c, v| c.spat = v);
        pool.run_each(parts, |mut c| {
            let r0 = c.rows.start;
            for r in c.rows.clone() {
                c.quantize_row(&shape, avx2, &x[r * k..(r + 1) * k], r - r0);
            }
        });
        // The tables that interleave rows, from the per-row ones just written.
        if multi_row {
            for r in 0..rows {
                for b in 0..nb {
                    let (at, blk) = ((b * rows + r) * QK, r * blocks + b);
                    self.qt[at..at + QK].copy_from_slice(&self.qs[blk * QK..(blk + 1) * QK]);
                }
            }
        }
        if natural_t > 0 {
            let stride = self.natural_t_stride();
            for r in 0..rows {
                for b in 0..nb {
                    self.dt[b * stride + r] = self.d[r * blocks + b];
                    self.st[b * stride + r] = self.s[r * blocks + b];
                }
            }
        }
        if layout.paired() {
            for r in 0..rows {
                for p in 0..pairs {
                    let (e, o) = (r * blocks + 2 * p, r * blocks + 2 * p + 1);
                    let at = (p * rows_pad + r) * 2;
                    self.dt[at..at + 2].copy_from_slice(&[self.d[e], self.d[o]]);
                    self.st[at..at + 2].copy_from_slice(&[self.s[e], self.s[o]]);
                }
            }
        }
    }
}

/// Blocks (of 32 values) in a quantisation call below which it stays on the calling thread: about 5 µs of work,
/// several times the cost of a fork.
const PARALLEL_BLOCKS: usize = 128;

/// What every row of one [`QuantAct::fill_impl`] call shares.
struct RowShape {
    nb: usize,
    blocks: usize,
    layout: ActLayout,
    bias: Option<i32>,
    unsigned: bool,
}

/// Entries per row of each per-row table (0 for a table the call leaves empty).
struct RowStrides {
    qs: usize,
    d: usize,
    ds: usize,
    bias: usize,
    dpat: usize,
    spat: usize,
}

impl RowShape {
    fn strides(&self) -> RowStrides {
        let pairs = if self.layout.paired() { self.blocks / 2 } else { 0 };
        RowStrides {
            qs: self.blocks * QK,
            d: self.blocks,
            ds: if self.layout == ActLayout::Natural { 2 * self.blocks } else { 0 },
            bias: if self.bias.is_some() { 8 * self.blocks } else { 0 },
            dpat: pairs * 16,
            spat: pairs * 4,
        }
    }
}

/// The per-row tables of rows `rows` (every table is row-major, so a run of rows is one slice of each): what one
/// task of a parallel [`QuantAct::fill_impl`] writes, and nothing else.
#[derive(Default)]
struct RowChunk<'a> {
    rows: std::ops::Range<usize>,
    qs: &'a mut [u8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    ds: &'a mut [f32],
    bias: &'a mut [i32],
    dpat: &'a mut [f32],
    spat: &'a mut [f32],
}

/// Hands each chunk its rows of `data` (`stride` entries a row; rows past the last chunk, the padding, stay out).
fn split_rows<'a, T>(
    data: &'a mut [T],
    chunks: &[std::ops::Range<usize>],
    stride: usize,
    parts: &mut [RowChunk<'a>],
    set: impl Fn(&mut RowChunk<'a>, &'a mut [T]),
) {
    for ((_, rows), part) in split_mut(data, chunks, stride).into_iter().zip(parts) {
        set(part, rows);
    }
}

impl RowChunk<'_> {
    /// Quantises one row (`x`, `k` values) into local row `lr` of the chunk's tables.
    fn quantize_row(&mut self, shape: &RowShape, avx2: bool, x: &[f32], lr: usize) {
        let RowShape { nb, blocks, layout, bias, unsigned, .. } = *shape;
        let mut q = [0i8; QK];
        for b in 0..nb {
            let (d, sum) = quantize_block_fast(avx2, &x[b * QK..(b + 1) * QK], &mut q);
            let blk = lr * blocks + b;
            self.d[blk] = d;
            self.s[blk] = d * sum as f32;
            if layout == ActLayout::Natural {
                self.ds[2 * blk..2 * blk + 2].copy_from_slice(&[d, self.s[blk]]);
            }
            let odd = b % 2;
            let pair_base = (blk - odd) * QK;
            match layout {
                ActLayout::Natural | ActLayout::Super => {
                    for (o, &v) in self.qs[blk * QK..(blk + 1) * QK].iter_mut().zip(&q) {
                        *o = v as u8;
                    }
                }
                ActLayout::Pair => {
                    let pair = &mut self.qs[pair_base..pair_base + 2 * QK];
                    let mut bytes: [u8; QK] = bytemuck::cast(q);
                    if unsigned {
                        for v in &mut bytes {
                            *v ^= 0x80; // two's complement q + 128
                        }
                    }
                    for lane in 0..8 {
                        let z = pair_lane(odd, lane);
                        pair[4 * z..4 * z + 4].copy_from_slice(&bytes[4 * lane..4 * lane + 4]);
                    }
                }
            }
            if let Some(c) = bias {
                for lane in 0..8 {
                    let lane_sum: i32 = q[lane * 4..lane * 4 + 4].iter().map(|&v| v as i32).sum();
                    let idx = match layout {
                        ActLayout::Natural => blk * 8 + lane,
                        _ => (blk - odd) * 8 + pair_lane(odd, lane),
                    };
                    self.bias[idx] = c * lane_sum;
                }
            }
        }
        if layout.paired() {
            for p in 0..blocks / 2 {
                let (e, o) = (lr * blocks + 2 * p, lr * blocks + 2 * p + 1);
                let at = lr * (blocks / 2) + p;
                let (de, dd) = (self.d[e], self.d[o]);
                for (i, v) in self.dpat[at * 16..(at + 1) * 16].iter_mut().enumerate() {
                    *v = if i % 2 == 0 { de } else { dd };
                }
                let sp = &mut self.spat[at * 4..(at + 1) * 4];
                sp[1] = self.s[e];
                sp[3] = self.s[o];
            }
        }
    }
}

/// ggml `quantize_row_q8_K_ref` for one super-block: the value of largest magnitude (the first one, on ties) maps to
/// −127, `q = min(127, round_half_even(x · iscale))` with `iscale = −127 / max` and `d = 1 / iscale` (NaN becomes
/// 0). Returns `d`.
fn quantize_super(x: &[f32], q: &mut [i8], bsums: &mut [i16]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        bsums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = ((xi * iscale + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
    }
    for (s, g) in bsums.iter_mut().zip(q.chunks_exact(16)) {
        *s = g.iter().map(|&v| v as i16).sum();
    }
    1.0 / iscale
}

/// [`quantize_super`] with AVX2 (the same values: the largest magnitude and its first position are exact, and
/// multiply, add, subtract and the conversion of an integral value are the same IEEE operations; NaN becomes 0).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_super_avx2(x: &[f32], q: &mut [i8], bsums: &mut [i16]) -> f32 {
    use std::arch::x86_64::*;
    assert!(x.len() == QK_K && q.len() == QK_K && bsums.len() == 16);
    // SAFETY: `x` holds 256 values and `q` 256 bytes (asserted); the loads and stores stay inside them.
    unsafe {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut m = _mm256_setzero_ps();
        for c in 0..QK_K / 8 {
            // max_ps returns its second operand when the first is NaN, so NaN never enters, as in the scalar loop.
            m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x.as_ptr().add(8 * c)), abs), m);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0.0f32, |a, &l| if l > a { l } else { a });
        if amax == 0.0 {
            q.fill(0);
            bsums.fill(0);
            return 0.0;
        }
        // The first value of that magnitude (the scalar loop keeps the first on ties).
        let target = _mm256_set1_ps(amax);
        let mut max = 0.0f32;
        for c in 0..QK_K / 8 {
            let v = _mm256_loadu_ps(x.as_ptr().add(8 * c));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_and_ps(v, abs), target));
            if hit != 0 {
                max = x[8 * c + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let is = _mm256_set1_ps(iscale);
        let magic = _mm256_set1_ps(MAGIC);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        for b in 0..QK_K / 32 {
            let qi: [__m256i; 4] = std::array::from_fn(|c| {
                let v = _mm256_loadu_ps(x.as_ptr().add(32 * b + 8 * c));
                let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v, is), magic), magic);
                let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r)); // NaN → 0
                _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
            });
            for g in 0..2 {
                let s = _mm256_add_epi32(qi[2 * g], qi[2 * g + 1]);
                let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                bsums[2 * b + g] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2))) as i16;
            }
            // Packing interleaves 128-bit lanes; the final permutation restores element order.
            let p8 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
            let ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().add(32 * b).cast(), ordered);
        }
        1.0 / iscale
    }
}

/// Quantises a super-block with the fastest available code.
#[inline(always)]
fn quantize_super_fast(avx2: bool, x: &[f32], q: &mut [i8], bsums: &mut [i16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller detected AVX2.
        return unsafe { quantize_super_avx2(x, q, bsums) };
    }
    let _ = avx2;
    quantize_super(x, q, bsums)
}

impl QuantAct {
    /// [`ActLayout::Super`]: `k % 256 == 0`.
    fn fill_super(&mut self, pool: &Pool, avx2: bool, x: &[f32], rows: usize, k: usize, wide: bool) {
        let nb = k / QK_K;
        self.layout = ActLayout::Super;
        self.unsigned = false;
        self.rows = rows;
        self.rows_pad = rows;
        self.nb = nb;
        self.blocks = nb;
        self.qs.zeroed(rows * nb * QK_K);
        zeroed(&mut self.d, rows * nb);
        zeroed(&mut self.bsums, rows * nb * 16);
        for v in [&mut self.s, &mut self.ds, &mut self.dpat, &mut self.spat, &mut self.dt, &mut self.st] {
            v.clear();
        }
        self.bias.clear();
        self.q16.clear();
        self.d_t.clear();
        self.bs_t.clear();
        // Every table is row-major: a run of rows is one slice of each, quantised by one task.
        let chunks = pool.row_chunks(rows, nb * QK_K / QK, PARALLEL_BLOCKS);
        let qs = split_mut(&mut self.qs, &chunks, nb * QK_K);
        let d = split_mut(&mut self.d, &chunks, nb);
        let bsums = split_mut(&mut self.bsums, &chunks, nb * 16);
        let parts: Vec<_> = qs.into_iter().zip(d).zip(bsums).map(|(((r, qs), (_, d)), (_, s))| (r, qs, d, s)).collect();
        pool.run_each(parts, |(r, qs, d, bsums)| {
            for (i, row) in r.enumerate() {
                for b in 0..nb {
                    let blk = i * nb + b;
                    let q: &mut [i8] = bytemuck::cast_slice_mut(&mut qs[blk * QK_K..(blk + 1) * QK_K]);
                    d[blk] = quantize_super_fast(
                        avx2,
                        &x[row * k + b * QK_K..row * k + (b + 1) * QK_K],
                        q,
                        &mut bsums[blk * 16..blk * 16 + 16],
                    );
                }
            }
        });
        // A single row never takes a wide tile.
        if wide && rows >= 2 {
            self.q16.extend(self.qs.iter().map(|&v| v as i8 as i16));
            zeroed(&mut self.d_t, nb * rows + WIDE_PAD);
            zeroed(&mut self.bs_t, nb * 8 * rows + WIDE_PAD);
            for r in 0..rows {
                for b in 0..nb {
                    let blk = r * nb + b;
                    self.d_t[b * rows + r] = self.d[blk];
                    for p in 0..8 {
                        let (lo, hi) = (self.bsums[blk * 16 + 2 * p], self.bsums[blk * 16 + 2 * p + 1]);
                        self.bs_t[(8 * b + p) * rows + r] = (lo as u16 as u32 | (hi as u16 as u32) << 16) as i32;
                    }
                }
            }
        }
    }

    /// Start of the 256 values of super-block `b` of row `r` ([`ActLayout::Super`]).
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
    pub(crate) fn super_ptr(&self, r: usize, b: usize) -> *const i8 {
        self.qs.as_ptr().wrapping_add((r * self.blocks + b) * QK_K).cast()
    }

    /// The 256 values of super-block `b` of row `r` ([`ActLayout::Super`]).
    #[inline(always)]
    pub(crate) fn super_values(&self, r: usize, b: usize) -> &[i8] {
        let blk = r * self.blocks + b;
        bytemuck::cast_slice(&self.qs[blk * QK_K..(blk + 1) * QK_K])
    }

    /// Whether the wide tables are filled for at least `t_rows` rows.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
    pub(crate) fn wide_ready(&self, t_rows: usize) -> bool {
        self.layout == ActLayout::Super
            && self.rows >= t_rows
            && self.q16.len() == self.qs.len()
            && self.d_t.len() == self.nb * self.rows + WIDE_PAD
            && self.bs_t.len() == 8 * self.nb * self.rows + WIDE_PAD
    }

    /// The 16 group sums of super-block `b` of row `r` ([`ActLayout::Super`]).
    #[inline(always)]
    pub(crate) fn super_bsums(&self, r: usize, b: usize) -> &[i16] {
        let blk = r * self.blocks + b;
        &self.bsums[blk * 16..blk * 16 + 16]
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the pointer accessors serve the x86-64 kernels
impl QuantAct {
    /// Start of block `b` of row `r` (for paired layouts, `b` even is the start of the pair).
    #[inline(always)]
    pub(crate) fn qs_ptr(&self, r: usize, b: usize) -> *const u8 {
        debug_assert!(r < self.rows_pad && b < self.blocks);
        self.qs.as_ptr().wrapping_add((r * self.blocks + b) * QK)
    }

    /// Block `b` of row `r` in the block-major copy [`QuantAct::qt`].
    #[inline(always)]
    pub(crate) fn qt_ptr(&self, r: usize, b: usize) -> *const u8 {
        debug_assert!(r < self.rows && b < self.nb);
        self.qt.as_ptr().wrapping_add((b * self.rows + r) * QK)
    }

    #[inline(always)]
    pub(crate) fn d_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.d.as_ptr().wrapping_add(r * self.blocks + b)
    }

    /// Natural layout: `[d, s]` of block `b` of row `r` (see [`QuantAct::ds`]).
    #[inline(always)]
    pub(crate) fn ds_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.ds.as_ptr().wrapping_add(2 * (r * self.blocks + b))
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

    /// `[d_e, d_o]` of row `r`, then of rows `r + 1, …`, for the pair starting at even block `b`.
    #[inline(always)]
    pub(crate) fn dt_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.dt.as_ptr().wrapping_add((b / 2 * self.rows_pad + r) * 2)
    }

    /// Natural layout, more than one row: entries of block `b` in [`QuantAct::dt`] / [`QuantAct::st`] are this far
    /// apart (the rows, plus [`NATURAL_T_PAD`] zeros).
    #[inline(always)]
    pub(crate) fn natural_t_stride(&self) -> usize {
        self.rows + NATURAL_T_PAD
    }

    /// Natural layout: `d` of block `b` of row `r`, then of rows `r + 1, …` (see [`QuantAct::dt`]).
    #[inline(always)]
    pub(crate) fn dn_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.dt.as_ptr().wrapping_add(b * self.natural_t_stride() + r)
    }

    /// Natural layout: `s` of block `b` of row `r`, then of rows `r + 1, …` (see [`QuantAct::st`]).
    #[inline(always)]
    pub(crate) fn sn_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.st.as_ptr().wrapping_add(b * self.natural_t_stride() + r)
    }

    /// `[s_e, s_o]` of row `r`, then of rows `r + 1, …`, for the pair starting at even block `b`.
    #[inline(always)]
    pub(crate) fn st_ptr(&self, r: usize, b: usize) -> *const f32 {
        self.st.as_ptr().wrapping_add((b / 2 * self.rows_pad + r) * 2)
    }

    /// The 32 signed values of block `b` of row `r` in element order, whatever the layout.
    pub(crate) fn block_values(&self, r: usize, b: usize) -> [i8; QK] {
        let mut q = [0i8; QK];
        let blk = r * self.blocks + b;
        match self.layout {
            ActLayout::Natural | ActLayout::Super => {
                for (o, &v) in q.iter_mut().zip(&self.qs[blk * QK..(blk + 1) * QK]) {
                    *o = v as i8;
                }
            }
            ActLayout::Pair => {
                let odd = b % 2;
                let pair = &self.qs[(blk - odd) * QK..(blk - odd + 2) * QK];
                let flip = if self.unsigned { 0x80 } else { 0 };
                for lane in 0..8 {
                    let z = pair_lane(odd, lane);
                    for j in 0..4 {
                        q[4 * lane + j] = (pair[4 * z + j] ^ flip) as i8;
                    }
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
        let nat = quantize_rows(&x, 2, k, ActLayout::Natural, Some(-8));
        for layout in [ActLayout::Pair] {
            let other = quantize_rows(&x, 2, k, layout, Some(-8));
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

    /// Every table of `a` and `b`, for comparing two fills.
    fn tables(a: &QuantAct) -> impl PartialEq + std::fmt::Debug + '_ {
        let f = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        (
            (a.layout, a.rows, a.rows_pad, a.nb, a.blocks, a.unsigned),
            (&a.qs[..], &a.qt[..], &a.bias, &a.bsums, &a.q16, &a.bs_t),
            [f(&a.d), f(&a.s), f(&a.ds), f(&a.dpat), f(&a.spat), f(&a.dt), f(&a.st), f(&a.d_t)],
        )
    }

    #[test]
    fn rows_quantised_on_several_threads_fill_the_same_tables() {
        let pool = Pool::new(3).unwrap();
        let single = Pool::single();
        let plans = [
            (ActLayout::Natural, Some(-8), false, true),
            (ActLayout::Natural, None, false, false),
            (ActLayout::Pair, Some(-128), true, false),
            (ActLayout::Pair, Some(-16), false, false),
            (ActLayout::Super, None, false, false),
        ];
        for (layout, bias, unsigned_rows, multi_row_tables) in plans {
            for avx2 in [false, cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx2")] {
                let plan =
                    ActPlan { layout, bias, avx2, wide: layout == ActLayout::Super, unsigned_rows, multi_row_tables };
                for (rows, k) in [(1, 576), (5, 576), (16, 544), (17, 1536), (40, 512)] {
                    let x: Vec<f32> = (0..rows * k).map(|i| crate::rng::uniform(7, i as u64) - 0.5).collect();
                    let (mut a, mut b) = (QuantAct::default(), QuantAct::default());
                    a.fill(&x, rows, k, plan, &single);
                    b.fill(&x, rows, k, plan, &pool);
                    assert_eq!(tables(&a), tables(&b), "{plan:?}, {rows} rows of {k}");
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_quantiser_matches_the_scalar_one() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let mut blocks: Vec<[f32; QK]> = Vec::new();
        for seed in 0..200u64 {
            blocks.push(std::array::from_fn(|i| (crate::rng::uniform(seed, i as u64) - 0.5) * (seed as f32 + 0.01)));
        }
        let mut special = [0.5f32; QK];
        special[..8].copy_from_slice(&[f32::NAN, -2.5, 127.0, -127.0, 0.0, -0.0, 1.5, f32::NAN]);
        blocks.push(special);
        let mut with_inf = special;
        with_inf[9] = f32::INFINITY;
        blocks.push(with_inf);
        blocks.push([0.0; QK]);
        blocks.push(std::array::from_fn(|i| i as f32 - 16.0));
        for x in &blocks {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let ra = quantize_block(x, &mut a);
            // SAFETY: AVX2 was detected above.
            let rb = unsafe { quantize_block_avx2(x, &mut b) };
            assert_eq!(a, b, "{x:?}");
            assert_eq!((ra.0.to_bits(), ra.1), (rb.0.to_bits(), rb.1), "{x:?}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_super_block_quantiser_matches_the_scalar_one() {
        if !is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut blocks: Vec<Vec<f32>> = Vec::new();
        for seed in 0..100u64 {
            blocks
                .push((0..QK_K).map(|i| (crate::rng::uniform(seed, i as u64) - 0.5) * (seed as f32 + 0.01)).collect());
        }
        let mut special = vec![0.25f32; QK_K];
        special[..8].copy_from_slice(&[f32::NAN, -2.5, 127.0, -127.0, 0.0, -0.0, 1.5, f32::NAN]);
        special[200] = 127.0; // a tie with an earlier value of the largest magnitude
        blocks.push(special.clone());
        special[100] = f32::NEG_INFINITY;
        blocks.push(special);
        blocks.push(vec![0.0; QK_K]);
        blocks.push(vec![f32::NAN; QK_K]);
        let mut late = vec![0.0f32; QK_K];
        late[255] = -3.0;
        late[17] = 3.0;
        blocks.push(late);
        blocks.push((0..QK_K).map(|i| i as f32 - 128.0).collect());
        for x in &blocks {
            let (mut qa, mut qb) = ([0i8; QK_K], [0i8; QK_K]);
            let (mut sa, mut sb) = ([0i16; 16], [0i16; 16]);
            let da = quantize_super(x, &mut qa, &mut sa);
            // SAFETY: AVX2 was detected above.
            let db = unsafe { quantize_super_avx2(x, &mut qb, &mut sb) };
            assert_eq!((qa, sa, da.to_bits()), (qb, sb, db.to_bits()), "{x:?}");
        }
    }

    #[test]
    fn q8_k_maps_the_first_largest_magnitude_to_minus_127() {
        let mut x = [0.0f32; QK_K];
        x[0] = 2.0;
        x[1] = -2.0; // same magnitude, later: not the reference value
        x[2] = 0.5;
        x[17] = -1.0;
        let (mut q, mut bsums) = ([0i8; QK_K], [0i16; 16]);
        let d = quantize_super(&x, &mut q, &mut bsums);
        // iscale = −127 / 2 = −63.5, d = 1 / iscale.
        assert_eq!(d, 1.0 / -63.5);
        assert_eq!(&q[..3], &[-127, 127, -32]); // −31.75 rounds to −32
        assert_eq!(q[17], 64); // 63.5 rounds half to even
        assert_eq!(bsums[0], -127 + 127 - 32);
        assert_eq!(bsums[1], 64);
        assert!(q[3..17].iter().chain(&q[18..]).all(|&v| v == 0));
        let d0 = quantize_super(&[0.0; QK_K], &mut q, &mut bsums);
        assert_eq!((d0, q.iter().any(|&v| v != 0), bsums.iter().any(|&v| v != 0)), (0.0, false, false));
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
