//! Rotary position embedding, in place, for both pair layouts and partial rotation (`rotary_dim < head_dim`).

use std::sync::Arc;

use parking_lot::Mutex;

use super::parallel::{Pool, split_mut};
use crate::backend::RopeStyle;

const SERIAL_ELEMS: usize = 64 * 1024;

/// Below this many angles a new table is made on the calling thread.
const SERIAL_ANGLES: usize = 4 * 1024;

/// Geometry of one rope call, checked by the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RopeShape {
    pub n_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub style: RopeStyle,
}

/// The cosines and sines of the last call's positions: every layer of a step rotates the same positions (the query
/// and the key heads alike), so they are computed once a step instead of twice a layer. Holds one call's rows.
#[derive(Debug, Default)]
pub(crate) struct Angles {
    positions: Vec<u32>,
    /// Bits of the frequencies the table was made with.
    freqs: Vec<u32>,
    /// `(cos, sin)` of pair `i` of row `t` at `t · freqs.len() + i`.
    table: Arc<Vec<(f32, f32)>>,
}

impl Angles {
    /// The table for `positions` and `inv_freq`, made anew only when either differs from the last call's.
    fn table(&mut self, pool: &Pool, positions: &[u32], inv_freq: &[f32]) -> Arc<Vec<(f32, f32)>> {
        let same_freqs = self.freqs.iter().copied().eq(inv_freq.iter().map(|f| f.to_bits()));
        if self.positions != positions || !same_freqs {
            let half = inv_freq.len();
            let mut table = vec![(0.0f32, 0.0f32); positions.len() * half];
            let chunks = pool.row_chunks(positions.len(), half, SERIAL_ANGLES);
            pool.run_each(split_mut(&mut table, &chunks, half), |(range, rows)| {
                for (t, row) in range.zip(rows.chunks_exact_mut(half)) {
                    let pos = positions[t] as f32;
                    for (c, &f) in row.iter_mut().zip(inv_freq) {
                        let (sin, cos) = ((pos * f) as f64).sin_cos();
                        *c = (cos as f32, sin as f32);
                    }
                }
            });
            self.positions = positions.to_vec();
            self.freqs = inv_freq.iter().map(|f| f.to_bits()).collect();
            self.table = Arc::new(table);
        }
        Arc::clone(&self.table)
    }
}

/// Rotates each row of `x: [positions.len(), n_heads · head_dim]`. The angle of pair `i` is
/// `positions[t] as f32 · inv_freq[i]` (one f32 multiply); its sine and cosine are evaluated in f64 and rounded.
pub(crate) fn rope(
    pool: &Pool,
    angles: &Mutex<Angles>,
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    s: RopeShape,
) {
    let width = s.n_heads * s.head_dim;
    let half = s.rotary_dim / 2;
    let table = angles.lock().table(pool, positions, &inv_freq[..half]);
    let chunks = pool.row_chunks(positions.len(), width, SERIAL_ELEMS);
    let items = split_mut(x, &chunks, width);
    pool.run_each(items, |(range, rows)| {
        for (t, row) in range.zip(rows.chunks_exact_mut(width)) {
            let cs = &table[t * half..(t + 1) * half];
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
