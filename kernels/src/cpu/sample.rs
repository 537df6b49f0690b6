//! Token sampling: greedy, or temperature → top-k → top-p followed by one inverse-CDF draw whose uniform number is
//! `rng::uniform(seed, position)`, so a replayed session draws the same tokens (DESIGN.md, determinism).
//!
//! Candidates are ordered by logit, highest first, ties by lower token id. Only as much of that order as a call
//! needs is sorted (a growing prefix), so a draw costs O(vocab) for peaked distributions rather than a full sort.

use std::cmp::Ordering;

use super::math;
use crate::backend::{Sampled, SamplingParams};
use crate::error::{Result, shape_err};
use crate::rng;

const OP: &str = "sample";

/// Draws a token from one row of logits.
pub(crate) fn sample(logits: &[f32], params: &SamplingParams, position: u64, n_top: usize) -> Result<Sampled> {
    if logits.is_empty() {
        return Err(shape_err(OP, "empty vocabulary"));
    }
    if params.temperature.is_nan() {
        return Err(shape_err(OP, "temperature is NaN"));
    }
    if params.top_p.is_nan() || params.top_p <= 0.0 {
        return Err(shape_err(OP, format!("top_p must be in (0, 1], got {}", params.top_p)));
    }
    // NaN logits never win: they count as −inf.
    let clean: Vec<f32> = logits.iter().map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }).collect();
    let max = clean.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return Err(shape_err(OP, "no finite logit"));
    }
    if max == f32::INFINITY {
        return Err(shape_err(OP, "infinite logit"));
    }
    // log Σ e^(l − max), the untempered normaliser.
    let log_z = sum_lanes(clean.iter().map(|&l| math::exp(l - max) as f64)).ln();
    let logprob = |i: usize| ((clean[i] - max) as f64 - log_z) as f32;

    let mut order = SortedPrefix::new(&clean);
    let token = if params.temperature <= 0.0 {
        argmax(&clean)
    } else {
        draw(&clean, max, &mut order, params, rng::uniform(params.seed, position))
    };
    let n_top = n_top.min(clean.len());
    order.ensure(n_top);
    let top = order.idx[..n_top].iter().map(|&i| (i, logprob(i as usize))).collect();
    Ok(Sampled { token, logprob: logprob(token as usize), top })
}

/// First index of the largest value.
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Sum in f64 with 8 interleaved lanes (vectorises; fixed order).
fn sum_lanes(it: impl Iterator<Item = f64>) -> f64 {
    let mut acc = [0.0f64; 8];
    for (i, v) in it.enumerate() {
        acc[i % 8] += v;
    }
    acc.iter().sum()
}

/// Temperature, top-k, top-p, then the inverse-CDF draw at `u ∈ [0, 1)`.
fn draw(logits: &[f32], max: f32, order: &mut SortedPrefix<'_>, p: &SamplingParams, u: f32) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let weight = |i: u32| math::exp((logits[i as usize] - max) * inv_t) as f64;
    let vocab = logits.len();
    let k = if p.top_k == 0 { vocab } else { p.top_k.min(vocab) };
    // Mass of the top-k set: in token order over the whole vocabulary, or in sorted order over a top-k prefix.
    let mass_k = if k == vocab {
        sum_lanes((0..vocab as u32).map(weight))
    } else {
        order.ensure(k);
        order.idx[..k].iter().map(|&i| weight(i)).sum()
    };
    // Top-p: the shortest sorted prefix (within the top k) whose mass reaches top_p of the top-k mass.
    let (kept, mass) = if p.top_p < 1.0 {
        let goal = p.top_p as f64 * mass_k;
        let mut cum = 0.0;
        let mut n = 0;
        while n < k {
            order.reach(n, k);
            cum += weight(order.idx[n]);
            n += 1;
            if cum >= goal {
                break;
            }
        }
        (n, cum)
    } else {
        (k, mass_k)
    };
    let target = u as f64 * mass;
    let mut cum = 0.0;
    for n in 0..kept {
        order.reach(n, kept);
        let i = order.idx[n];
        cum += weight(i);
        if cum > target {
            return i;
        }
    }
    order.ensure(kept);
    order.idx[kept - 1]
}

/// Token ids whose first `sorted` entries are the largest logits in order (logit descending, id ascending), the
/// rest unordered; extended on demand.
struct SortedPrefix<'a> {
    logits: &'a [f32],
    idx: Vec<u32>,
    sorted: usize,
}

impl<'a> SortedPrefix<'a> {
    fn new(logits: &'a [f32]) -> Self {
        Self { logits, idx: (0..logits.len() as u32).collect(), sorted: 0 }
    }

    fn cmp(logits: &[f32], a: u32, b: u32) -> Ordering {
        logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
    }

    /// Makes entry `n` (`< limit`) sorted, extending the sorted prefix geometrically (at least 64, doubling) so a walk
    /// down the order costs O(vocab) selections in total.
    fn reach(&mut self, n: usize, limit: usize) {
        if n >= self.sorted {
            self.ensure((2 * self.sorted).max(64).max(n + 1).min(limit));
        }
    }

    /// Makes the first `k` entries the `k` best, in order.
    fn ensure(&mut self, k: usize) {
        let k = k.min(self.idx.len());
        if k <= self.sorted {
            return;
        }
        let logits = self.logits;
        let rest = &mut self.idx[self.sorted..];
        let want = k - self.sorted;
        if want < rest.len() {
            rest.select_nth_unstable_by(want - 1, |&a, &b| Self::cmp(logits, a, b));
        }
        rest[..want].sort_unstable_by(|&a, &b| Self::cmp(logits, a, b));
        self.sorted = k;
    }
}
