//! Row-times-row dot products of the matmul, one implementation per instruction set, all computing the same bits.
//!
//! # The arithmetic every level reproduces
//!
//! Float weights (f32, f16, bf16) against f32 activations, for one output `(t, n)`:
//! `acc[i % 32] = fma(w[i], x[i], acc[i % 32])` over `i` in order, then the 32 lanes are folded in halves
//! (`v16[i] = acc[i] + acc[i + 16]`, then 16 → 8, 8 → 4, 4 → 2, 2 → 1).
//!
//! Quantised weights against the activation row quantised to 8-bit blocks ([`act`]): for block `b`,
//! `P[l] = Σ w_q · a_q` over the four values of lane `l` (exact, in i32), `w_q` being the signed weight code
//! (`q` for Q8_0, `q − 8` for Q4_0, `q` for Q4_1), then `acc[b % 2][l] = fma(d_w · d_a, P[l], acc[b % 2][l])`, and for
//! Q4_1 `m[b % 2] = fma(m_w, s_a, m[b % 2])`. The result is `fold8(acc[0] + acc[1])`, plus `m[0] + m[1]` for Q4_1.
//!
//! Integer sums are exact whatever the instructions, and each float operation above is one IEEE operation, so a
//! SIMD kernel that keeps lanes in this order gives the scalar result bit for bit. Padding lanes (a tail shorter
//! than the vector, the missing odd block of a pair) add `fma(0, 0, acc)`, which never changes an accumulator:
//! accumulators start at +0 and a sum that rounds to zero is +0, so they are never −0.
//!
//! Each output is computed by the same sequence wherever it falls in a tile, a thread's share or a batch of rows,
//! so results do not depend on thread count or on how many activation rows a call holds.

pub(crate) mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_super;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_super;
mod scalar;

use std::ops::Range;

use self::act::{ActLayout, ActPlan, QuantAct};
use super::simd::SimdLevel;
use crate::DType;

/// Folds 8 lanes: `(v[i] + v[i+4])`, then `(u[i] + u[i+2])`, then the two halves.
#[inline(always)]
pub(crate) fn fold8(v: [f32; 8]) -> f32 {
    let u = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let w = [u[0] + u[2], u[1] + u[3]];
    w[0] + w[1]
}

/// Weight matrix `[n, k]` in its file dtype, rows of `row_bytes` bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Weights<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub k: usize,
    pub row_bytes: usize,
}

impl Weights<'_> {
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
    pub(crate) fn row_ptr(&self, n: usize) -> *const u8 {
        self.bytes.as_ptr().wrapping_add(n * self.row_bytes)
    }

    pub(crate) fn row(&self, n: usize) -> &[u8] {
        &self.bytes[n * self.row_bytes..(n + 1) * self.row_bytes]
    }
}

/// Activation side of a matmul.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rhs<'a> {
    /// `[t_rows, k]` f32 rows, for float weights.
    Float(&'a [f32]),
    /// Quantised rows, for quantised weights.
    Quant(&'a QuantAct),
}

/// Output `[t_rows, stride]`; tasks write disjoint columns of it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Out {
    ptr: *mut f32,
    stride: usize,
    len: usize,
}

// SAFETY: `Out` is a raw view of one output buffer; the matmul gives each task a disjoint set of columns, so no two
// threads write the same element, and the buffer outlives the parallel region that uses it.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    pub(crate) fn new(out: &mut [f32], stride: usize) -> Self {
        Self { ptr: out.as_mut_ptr(), stride, len: out.len() }
    }

    /// Columns `cols` of row `t`, to read.
    ///
    /// # Safety
    /// Row `t` and `cols` inside the output; no other thread writes those elements while the slice lives.
    pub(crate) unsafe fn row<'a>(self, t: usize, cols: Range<usize>) -> &'a [f32] {
        debug_assert!(t * self.stride + cols.end <= self.len && cols.start <= cols.end);
        // SAFETY: in bounds and not written concurrently by the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.add(t * self.stride + cols.start), cols.len()) }
    }

    /// Columns `cols` of row `t`, to write.
    ///
    /// # Safety
    /// As [`Out::row`], and no other thread reads or writes those elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row_mut<'a>(self, t: usize, cols: Range<usize>) -> &'a mut [f32] {
        debug_assert!(t * self.stride + cols.end <= self.len && cols.start <= cols.end);
        // SAFETY: in bounds and exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(t * self.stride + cols.start), cols.len()) }
    }

    /// Writes `out[t, n]`.
    ///
    /// # Safety
    /// `t * stride + n` must be inside the buffer and no other thread may write that element concurrently.
    #[inline(always)]
    pub(crate) unsafe fn put(self, t: usize, n: usize, v: f32) {
        let i = t * self.stride + n;
        debug_assert!(i < self.len);
        // SAFETY: in bounds and exclusive by the caller's contract.
        unsafe { *self.ptr.add(i) = v }
    }
}

/// How the kernels of `level` want the activations for weights of `dtype`: layout, and the lane-sum factor of the
/// activation table [`QuantAct::bias`] (the negated offset the kernel adds to the weight codes).
pub(crate) fn act_plan(level: SimdLevel, dtype: DType) -> ActPlan {
    let level = kernel_level(level, dtype);
    let layout = match (level, dtype) {
        _ if dtype.is_super_block() => ActLayout::Super,
        (
            SimdLevel::Avx512Vnni,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL,
        ) => ActLayout::Pair,
        _ => ActLayout::Natural,
    };
    let bias = match (level, dtype) {
        (_, DType::Q4_0) => Some(-8),
        (_, DType::Q5_0) => Some(-16),
        (SimdLevel::Avx512Vnni, DType::Q8_0 | DType::IQ4_NL) => Some(-128),
        _ => None,
    };
    let wide = level == SimdLevel::Avx512Vnni && dtype.is_super_block();
    let unsigned_rows =
        level == SimdLevel::Avx512Vnni && matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4_NL);
    let multi_row_tables = matches!(level, SimdLevel::Avx2 | SimdLevel::AvxVnni) && layout == ActLayout::Natural;
    ActPlan { layout, bias, avx2: level >= SimdLevel::Avx2, wide, unsigned_rows, multi_row_tables }
}

/// The level whose kernels serve `dtype` on a CPU of `level`. Every format has kernels at every x86-64 level today;
/// a format without kernels at some level would be sent to a lower one here (an AVX-512 CPU has AVX2). Every level
/// gives the same bits, so this only chooses speed.
pub(crate) fn kernel_level(level: SimdLevel, dtype: DType) -> SimdLevel {
    match dtype {
        DType::F32
        | DType::F16
        | DType::BF16
        | DType::Q8_0
        | DType::Q4_0
        | DType::Q4_1
        | DType::Q5_0
        | DType::Q5_1
        | DType::Q2_K
        | DType::Q3_K
        | DType::Q4_K
        | DType::Q5_K
        | DType::Q6_K
        | DType::IQ4_NL
        | DType::IQ4_XS => level,
    }
}

/// Tile shapes of a kernel: `nr_t × tr` outputs when `tr` activation rows are left, `nr_1 × 1` otherwise.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
pub(crate) struct Tiles {
    pub nr_t: usize,
    pub tr: usize,
    pub nr_1: usize,
}

/// How far ahead of the bytes being multiplied the kernels prefetch weights into L2, in bytes. A decode step streams
/// the whole model once; the hardware prefetchers alone left one core at about 7.5 GB/s on the project machine, and
/// 16 KB of software prefetch distance took it to about 17 GB/s (two cores: 17 → 26 GB/s), measured over the
/// SmolLM2 decode matmuls with distinct weights (96 MB). Prefetching past the end of a tensor is harmless: it touches
/// the next tensor of the file, typically the next one used, and prefetches never fault.
pub(crate) const PREFETCH_BYTES: usize = 16 * 1024;

/// Prefetches the weight line `PREFETCH_BYTES` ahead of `p` into L2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
    // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH_BYTES).cast()) }
}

/// Bytes of weight rows worked on together so they stay in L2 while every activation row passes over them.
pub(crate) const L2_WEIGHT_BYTES: usize = 256 * 1024;

/// Walks the outputs `rows × 0..t_rows` tile by tile, calling `tile(n, nr, t, tr)` with `(nr, tr)` one of
/// `(nr_t, tr)`, `(1, tr)`, `(nr_1, 1)`, `(1, 1)`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
pub(crate) fn for_each_tile(
    rows: Range<usize>,
    t_rows: usize,
    row_bytes: usize,
    tiles: Tiles,
    mut tile: impl FnMut(usize, usize, usize, usize),
) {
    debug_assert!(tiles.tr >= 2, "a 1-row activation tile is the nr_1 shape");
    let group = (L2_WEIGHT_BYTES / row_bytes.max(1)).max(tiles.nr_t.max(tiles.nr_1));
    let mut g0 = rows.start;
    while g0 < rows.end {
        let g1 = (g0 + group).min(rows.end);
        let mut t = 0;
        while t < t_rows {
            let (tr, nr) = if t + tiles.tr <= t_rows { (tiles.tr, tiles.nr_t) } else { (1, tiles.nr_1) };
            let mut n = g0;
            while n < g1 {
                let nr = if n + nr <= g1 { nr } else { 1 };
                tile(n, nr, t, tr);
                n += nr;
            }
            t += tr;
        }
        g0 = g1;
    }
}

/// Const-generic tags naming the weight format a SIMD tile function is instantiated for (the `DType`'s index),
/// one list for every SIMD module.
#[cfg(target_arch = "x86_64")]
pub(crate) mod tag {
    use crate::DType;
    pub const F32: u8 = DType::F32 as u8;
    pub const F16: u8 = DType::F16 as u8;
    pub const BF16: u8 = DType::BF16 as u8;
    pub const Q8_0: u8 = DType::Q8_0 as u8;
    pub const Q4_0: u8 = DType::Q4_0 as u8;
    pub const Q4_1: u8 = DType::Q4_1 as u8;
    pub const Q5_0: u8 = DType::Q5_0 as u8;
    pub const Q5_1: u8 = DType::Q5_1 as u8;
    pub const IQ4_NL: u8 = DType::IQ4_NL as u8;
    pub const Q2_K: u8 = DType::Q2_K as u8;
    pub const Q3_K: u8 = DType::Q3_K as u8;
    pub const Q4_K: u8 = DType::Q4_K as u8;
    pub const Q5_K: u8 = DType::Q5_K as u8;
    pub const Q6_K: u8 = DType::Q6_K as u8;
    pub const IQ4_XS: u8 = DType::IQ4_XS as u8;
}

/// Runs `$step!(b, full)` over the blocks `0..$nb` two at a time (`full` = both blocks of the pair exist), the
/// loop of the kernels that take a block pair per 512-bit register.
#[cfg(target_arch = "x86_64")]
macro_rules! block_pairs {
    ($nb:expr, $step:ident) => {{
        let nb = $nb;
        let mut b = 0;
        while b + 2 <= nb {
            $step!(b, true);
            b += 2;
        }
        if b < nb {
            $step!(b, false);
        }
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use block_pairs;

/// The tile set of the float weight types (F16, BF16, F32) for tiles `$nt x $tr` and `$n1 x 1`.
#[cfg(target_arch = "x86_64")]
macro_rules! float_tile_set {
    ($dtype:expr, $nt:literal x $tr:literal, $n1:literal) => {
        match $dtype {
            $crate::DType::F16 => tile_set!(float_tile, super::tag::F16, $nt x $tr, $n1),
            $crate::DType::BF16 => tile_set!(float_tile, super::tag::BF16, $nt x $tr, $n1),
            _ => tile_set!(float_tile, super::tag::F32, $nt x $tr, $n1),
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use float_tile_set;

/// The tile shapes and the four tile functions of one kernel, `(Tiles, [TileFn; 4])`, written from one set of
/// numbers so the shapes the walk uses and the functions it calls cannot disagree:
/// `tile_set!(kernel, KIND, NT x TR, N1)` instantiates `kernel::<KIND, NT, TR>`, `<KIND, 1, TR>`, `<KIND, N1, 1>`
/// and `<KIND, 1, 1>`.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_set {
    ($f:ident, $k:expr, $nt:literal x $tr:literal, $n1:literal) => {
        (
            super::Tiles { nr_t: $nt, tr: $tr, nr_1: $n1 },
            [
                $f::<{ $k }, $nt, $tr> as super::TileFn<_>,
                $f::<{ $k }, 1, $tr> as super::TileFn<_>,
                $f::<{ $k }, $n1, 1> as super::TileFn<_>,
                $f::<{ $k }, 1, 1> as super::TileFn<_>,
            ],
        )
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use tile_set;

/// Everything a tile needs, shared by the tiles of one task.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
pub(crate) struct Ctx<'a, X> {
    pub w: &'a Weights<'a>,
    pub x: X,
    pub out: Out,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
pub(crate) type TileFn<X> = unsafe fn(&Ctx<'_, X>, usize, usize);

/// Runs `fns` = tiles `(nr_t × tr, 1 × tr, nr_1 × 1, 1 × 1)` over the outputs.
///
/// # Safety
/// The tile functions must be callable on this CPU and `ctx` must satisfy [`gemm`]'s size contract.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // used by the x86-64 kernels only
pub(crate) unsafe fn drive<X>(ctx: &Ctx<'_, X>, rows: Range<usize>, t_rows: usize, set: (Tiles, [TileFn<X>; 4])) {
    let (tiles, fns) = set;
    for_each_tile(rows, t_rows, ctx.w.row_bytes, tiles, |n, nr, t, tr| {
        let f = match (nr == 1, tr == 1) {
            (false, false) => fns[0],
            (true, false) => fns[1],
            (false, true) => fns[2],
            (true, true) => fns[3],
        };
        // SAFETY: the tile lies inside the output (for_each_tile) and the CPU supports the kernels (caller).
        unsafe { f(ctx, n, t) }
    });
}

/// Computes `out[t, n]` for `n` in `rows` and `t < t_rows` with the kernels of `level`.
///
/// # Safety
/// The kernels index without bounds checks, so the caller must have checked every size: `w` holds `rows.end` rows,
/// `x` holds `t_rows` rows of `w.k` values (quantised as `act_plan(level, w.dtype)` says for quantised weights),
/// `out` has `t_rows × stride` elements with `rows.end <= stride`, and `level` is supported by this CPU.
pub(crate) unsafe fn gemm(level: SimdLevel, w: &Weights<'_>, x: Rhs<'_>, t_rows: usize, rows: Range<usize>, out: Out) {
    let level = kernel_level(level, w.dtype);
    match level {
        SimdLevel::Scalar => scalar::gemm(w, x, t_rows, rows, out),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::AvxVnni => {
            // SAFETY: the caller guarantees the sizes and that the CPU supports `level`.
            unsafe { avx2::gemm(level == SimdLevel::AvxVnni, w, x, t_rows, rows, out) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni => match x {
            // SAFETY: as above; the super-block formats' activations are in the `Super` layout (`act_plan`).
            Rhs::Quant(a) if w.dtype.is_super_block() => unsafe { avx512_super::gemm(w, a, t_rows, rows, out) },
            // SAFETY: as above.
            _ => unsafe { avx512::gemm(w, x, t_rows, rows, out) },
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::gemm(w, x, t_rows, rows, out),
    }
}
