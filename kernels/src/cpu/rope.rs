//! Rotary position embedding, in place, for both pair layouts and partial rotation (`rotary_dim < head_dim`).

use super::parallel::{Pool, split_mut};
use crate::backend::RopeStyle;

const SERIAL_ELEMS: usize = 64 * 1024;

/// Geometry of one rope call, checked by the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RopeShape {
    pub n_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub style: RopeStyle,
}

/// Rotates each row of `x: [positions.len(), n_heads · head_dim]`. The angle of pair `i` is
/// `positions[t] as f32 · inv_freq[i]` (one f32 multiply); its sine and cosine are evaluated in f64 and rounded.
pub(crate) fn rope(pool: &Pool, x: &mut [f32], positions: &[u32], inv_freq: &[f32], s: RopeShape) {
    let width = s.n_heads * s.head_dim;
    let chunks = pool.row_chunks(positions.len(), width, SERIAL_ELEMS);
    let items = split_mut(x, &chunks, width);
    let half = s.rotary_dim / 2;
    pool.run_each(items, |(range, rows)| {
        let mut cs = vec![(0.0f32, 0.0f32); half];
        for (t, row) in range.zip(rows.chunks_exact_mut(width)) {
            let pos = positions[t] as f32;
            for (c, &f) in cs.iter_mut().zip(inv_freq) {
                let (sin, cos) = ((pos * f) as f64).sin_cos();
                *c = (cos as f32, sin as f32);
            }
            for head in row.chunks_exact_mut(s.head_dim) {
                for (i, &(cos, sin)) in cs.iter().enumerate() {
                    let (a, b) = match s.style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos - x1 * sin;
                    head[b] = x0 * sin + x1 * cos;
                }
            }
        }
    });
}
