//! RMSNorm, alone and fused with the residual add.

use super::parallel::{Exec, split_mut};
use super::simd::avx2_variant;

/// Below this many values a norm runs on the calling thread.
const SERIAL_ELEMS: usize = 64 * 1024;

/// `Σ x²` in f64, element `i` into lane `i % 8`, lanes added in order.
#[inline(always)]
fn sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i] as f64 * c[i] as f64;
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        acc[i] += v as f64 * v as f64;
    }
    acc.iter().sum()
}

/// `out = x · (1 / sqrt(mean(x²) + eps)) · w` for one row; the scale is computed in f64 and rounded once.
#[inline(always)]
fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mean = sum_squares(x) / x.len().max(1) as f64;
    let scale = (1.0 / (mean + eps as f64).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

avx2_variant! {
    /// Rows `first..` of `x` normalised into `out` (as many rows as `out` holds).
    fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], width: usize, first: usize) => norm_rows_body
}

#[inline(always)]
fn norm_rows_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], width: usize, first: usize) {
    for (r, o) in (first..).zip(out.chunks_exact_mut(width)) {
        norm_row(&x[r * width..(r + 1) * width], w, eps, o);
    }
}

avx2_variant! {
    /// `res += x` for rows `first..` (as many as `res` holds), then each row normalised into `out`.
    fn add_norm_rows(res: &mut [f32], x: &[f32], w: &[f32], eps: f32, out: &mut [f32], width: usize, first: usize)
        => add_norm_rows_body
}

#[inline(always)]
fn add_norm_rows_body(res: &mut [f32], x: &[f32], w: &[f32], eps: f32, out: &mut [f32], width: usize, first: usize) {
    for ((r, o), h) in (first..).zip(out.chunks_exact_mut(width)).zip(res.chunks_exact_mut(width)) {
        for (hv, &xv) in h.iter_mut().zip(&x[r * width..(r + 1) * width]) {
            *hv += xv;
        }
        norm_row(h, w, eps, o);
    }
}

/// Row-wise RMSNorm of `x: [rows, width]` into `out`; sizes checked by the caller.
pub(crate) fn rms_norm(ex: Exec<'_>, x: &[f32], w: &[f32], eps: f32, out: &mut [f32], width: usize) {
    let rows = x.len().checked_div(width).unwrap_or(0);
    let chunks = ex.pool.row_chunks(rows, width, SERIAL_ELEMS);
    let items: Vec<_> = split_mut(out, &chunks, width);
    ex.pool.run_each(items, |(range, out)| norm_rows(ex.avx2, x, w, eps, out, width, range.start));
}

/// `residual += x; out = rms_norm(residual) · w`, row-wise; sizes checked by the caller.
pub(crate) fn add_rms_norm(
    ex: Exec<'_>,
    residual: &mut [f32],
    x: &[f32],
    w: &[f32],
    eps: f32,
    out: &mut [f32],
    width: usize,
) {
    let rows = x.len().checked_div(width).unwrap_or(0);
    let chunks = ex.pool.row_chunks(rows, width, SERIAL_ELEMS);
    let outs = split_mut(out, &chunks, width);
    let res = split_mut(residual, &chunks, width);
    let items: Vec<_> = outs.into_iter().zip(res).collect();
    ex.pool.run_each(items, |((range, out), (_, res))| add_norm_rows(ex.avx2, res, x, w, eps, out, width, range.start));
}
