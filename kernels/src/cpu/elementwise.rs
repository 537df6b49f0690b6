//! Element-wise ops of a transformer block: SwiGLU, the residual add and the bias add.

use super::math;
use super::parallel::{Exec, Pool};
use super::simd::avx2_variant;

/// Below this many values an element-wise op runs on the calling thread.
const SERIAL_ELEMS: usize = 256 * 1024;

/// Below this many values SwiGLU runs on the calling thread. An exponential per value makes it several times
/// costlier per value than an add, so a prefill's gate (128 rows × 1536 for SmolLM2, under [`SERIAL_ELEMS`]) is
/// split over the threads instead of leaving the other threads waiting (about 1.4% of a 2-thread Q6_K prefill's
/// samples ran here on the calling thread alone).
const SWIGLU_SERIAL_ELEMS: usize = 32 * 1024;

/// `out = silu(gate) · up`; equal lengths checked by the caller.
pub(crate) fn swiglu(ex: Exec<'_>, gate: &[f32], up: &[f32], out: &mut [f32]) {
    let ranges = ex.pool.row_chunks(out.len(), 1, SWIGLU_SERIAL_ELEMS);
    let items = super::parallel::split_mut(out, &ranges, 1);
    ex.pool.run_each(items, |(range, o)| swiglu_chunk(ex.avx2, &gate[range.start..], &up[range.start..], o));
}

/// `out = silu(gate) · up` on one slice, on the calling thread (the fused gate/up matmul's epilogue).
pub(crate) fn swiglu_slice(avx2: bool, gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_chunk(avx2, gate, up, out);
}

avx2_variant! {
    fn swiglu_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) => swiglu_body
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((ov, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *ov = math::silu(g) * u;
    }
}

/// `acc += x`; equal lengths checked by the caller.
pub(crate) fn add(pool: &Pool, acc: &mut [f32], x: &[f32]) {
    for_chunks(pool, acc, |start, a| {
        for (av, &xv) in a.iter_mut().zip(&x[start..]) {
            *av += xv;
        }
    });
}

/// `x[r, n] += bias[n]` for every row `r`; `x.len()` a multiple of `bias.len()` (checked by the caller).
pub(crate) fn add_bias(pool: &Pool, x: &mut [f32], bias: &[f32]) {
    let width = bias.len();
    if width == 0 {
        return;
    }
    let rows = x.len() / width;
    let ranges = pool.row_chunks(rows, width, SERIAL_ELEMS);
    let items = super::parallel::split_mut(x, &ranges, width);
    pool.run_each(items, |(_, chunk)| {
        for row in chunk.chunks_exact_mut(width) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// Runs `f(start, chunk)` over chunks of `out`, in parallel when `out` is large.
fn for_chunks(pool: &Pool, out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    let ranges = pool.row_chunks(out.len(), 1, SERIAL_ELEMS);
    let items = super::parallel::split_mut(out, &ranges, 1);
    pool.run_each(items, |(range, chunk)| f(range.start, chunk));
}
