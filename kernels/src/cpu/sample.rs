//! Token sampling: greedy, or temperature → top-k → top-p followed by one inverse-CDF draw whose uniform number is
//! `rng::uniform(seed, position)`, so a replayed session draws the same tokens (docs/ARCHITECTURE.md, determinism).
//!
//! Candidates are ordered by logit, highest first, ties by lower token id. Only as much of that order as a call
//! needs is sorted (a growing prefix), so a draw costs O(vocab) for peaked distributions rather than a full sort.

use std::cmp::Ordering;

use super::math;
use super::simd::avx2_variant;
use crate::backend::{Sampled, SamplingParams};
use crate::error::{KernelError, Result, shape_err};
use crate::rng;

const OP: &str = "sample";

/// Draws a token from one row of logits. Every logit must be finite ([`KernelError::NonFiniteLogits`] otherwise): a
/// NaN or infinity means the forward went wrong, and drawing among the finite rest would hide that.
pub(crate) fn sample(
    avx2: bool,
    logits: &[f32],
    params: &SamplingParams,
    position: u64,
    n_top: usize,
) -> Result<Sampled> {
    if params.temperature.is_nan() {
        return Err(shape_err(OP, "temperature is NaN"));
    }
    if params.top_p.is_nan() {
        return Err(shape_err(OP, "top_p is NaN"));
    }
    check_finite(logits)?;
    let (best, max) = argmax(logits).ok_or_else(|| shape_err(OP, "no finite logit"))?;
    if max == f32::INFINITY {
        return Err(shape_err(OP, "infinite logit"));
    }
    // log Σ e^(l − max), the untempered normaliser.
    let log_z = sum_exp(avx2, logits, max, 1.0).ln();
    let logprob = |i: usize| ((logits[i] - max) as f64 - log_z) as f32;

    let mut order = SortedPrefix::new(logits);
    let token = if params.temperature <= 0.0 {
        best
    } else {
        draw(avx2, logits, max, &mut order, params, rng::uniform(params.seed, position))
    };
    let n_top = n_top.min(logits.len());
    order.ensure(n_top);
    let top = order.idx[..n_top].iter().map(|&i| (i, logprob(i as usize))).collect();
    Ok(Sampled { token, logprob: logprob(token as usize), top })
}

/// Refuses a row with any NaN or infinite logit: one pass over the vocabulary (a compare per logit, vectorised),
/// small beside the LM head's matmul that produced the row; the counting pass runs only on a bad row.
fn check_finite(logits: &[f32]) -> Result<()> {
    if logits.iter().all(|l| l.is_finite()) {
        return Ok(());
    }
    let nan = logits.iter().filter(|l| l.is_nan()).count();
    let infinite = logits.iter().filter(|l| l.is_infinite()).count();
    let first = logits.iter().position(|l| !l.is_finite()).unwrap_or(0);
    Err(KernelError::NonFiniteLogits { nan, infinite, vocab: logits.len(), first })
}

/// First index of the largest logit and that logit; `None` when no logit is above −inf (all −inf or NaN).
/// The largest value first (over 8 lanes, a loop the compiler vectorises; NaN never wins), then the first index
/// holding it: the index a scan keeping the first strictly larger value finds (−0 and +0 are equal in both).
fn argmax(v: &[f32]) -> Option<(u32, f32)> {
    let max = math::max8(v);
    if max == f32::NEG_INFINITY || max.is_nan() {
        return None;
    }
    let best = v.iter().position(|&x| x == max)?;
    Some((best as u32, v[best]))
}

avx2_variant! {
    /// `Σ e^((l − max)·scale)` over the non-NaN logits: exponentials in f32, sums in f64 over 8 interleaved lanes.
    fn sum_exp_into(logits: &[f32], max: f32, scale: f32, total: &mut f64) => sum_exp_body
}

fn sum_exp(avx2: bool, logits: &[f32], max: f32, scale: f32) -> f64 {
    let mut total = 0.0;
    sum_exp_into(avx2, logits, max, scale, &mut total);
    total
}

#[inline(always)]
fn sum_exp_body(logits: &[f32], max: f32, scale: f32, total: &mut f64) {
    // The exponentials of a block first (NaN counts as 0), then their sum into 8 f64 lanes (element `i` into lane
    // `i % 8`): the same values added in the same order as one loop over both, which the compiler left scalar.
    const BLOCK: usize = 512;
    let mut acc = [0.0f64; 8];
    let mut buf = [0.0f32; BLOCK];
    for block in logits.chunks(BLOCK) {
        let e = &mut buf[..block.len()];
        for (o, &l) in e.iter_mut().zip(block) {
            let x = math::exp((l - max) * scale);
            *o = if x.is_nan() { 0.0 } else { x };
        }
        let mut chunks = e.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                acc[i] += c[i] as f64;
            }
        }
        for (i, &x) in chunks.remainder().iter().enumerate() {
            acc[i] += x as f64;
        }
    }
    *total = acc.iter().sum();
}

/// Temperature, top-k, top-p, then the inverse-CDF draw at `u ∈ [0, 1)`.
fn draw(avx2: bool, logits: &[f32], max: f32, order: &mut SortedPrefix<'_>, p: &SamplingParams, u: f32) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let weight = |i: u32| math::exp((key(logits, i) - max) * inv_t) as f64;
    let vocab = logits.len();
    let k = if p.top_k == 0 { vocab } else { p.top_k.min(vocab) };
    // Mass of the top-k set: in token order over the whole vocabulary, or in sorted order over a top-k prefix.
    let mass_k = if k == vocab {
        sum_exp(avx2, logits, max, inv_t)
    } else {
        order.ensure(k);
        order.idx[..k].iter().map(|&i| weight(i)).sum()
    };
    // Top-p: the shortest sorted prefix (within the top k) whose mass reaches top_p of the top-k mass; at least one
    // token (top_p ≤ 0 keeps only the most likely one, as the CUDA sampler does).
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

/// The logit of token `i` as the ordering sees it: NaN counts as −inf.
#[inline]
fn key(logits: &[f32], i: u32) -> f32 {
    let l = logits[i as usize];
    // NaN never wins; -0 ranks as +0 (they are equal logits: the lower id wins the tie, as in `argmax` and on CUDA).
    if l.is_nan() {
        f32::NEG_INFINITY
    } else if l == 0.0 {
        0.0
    } else {
        l
    }
}

/// Token ids whose first `sorted` entries are the largest logits in order (logit descending, id ascending), the
/// rest unordered; extended on demand (the id list is only built when first needed).
struct SortedPrefix<'a> {
    logits: &'a [f32],
    idx: Vec<u32>,
    sorted: usize,
}

impl<'a> SortedPrefix<'a> {
    fn new(logits: &'a [f32]) -> Self {
        Self { logits, idx: Vec::new(), sorted: 0 }
    }

    fn cmp(logits: &[f32], a: u32, b: u32) -> Ordering {
        key(logits, b).total_cmp(&key(logits, a)).then(a.cmp(&b))
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
        let k = k.min(self.logits.len());
        if k <= self.sorted {
            return;
        }
        if self.idx.is_empty() {
            self.idx = (0..self.logits.len() as u32).collect();
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
