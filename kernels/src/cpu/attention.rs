//! Causal grouped-query attention over the paged KV cache, for several sequences in one call.
//!
//! Work is split over (row, KV head) pairs: the query heads that share a KV head are done together, so each key and
//! value row is loaded once for the whole group. Every output value is computed by the same sequence of operations
//! whichever thread runs it and whatever else is in the call, so a sequence batched with others gives exactly the
//! result it gives alone.

use super::math;
use super::parallel::Exec;
use super::simd::avx2_variant;
use crate::backend::{AttnSeq, AttnShape};
use crate::error::{KernelError, Result, shape_err};

const OP: &str = "attention";

/// Below this many multiply-adds the call runs on the calling thread.
const SERIAL_MACS: usize = 256 * 1024;

/// One (row, KV head) work item.
#[derive(Clone, Copy, Debug)]
struct Item {
    row: usize,
    kv_head: usize,
    /// Last position the row attends to (inclusive).
    pos: usize,
    seq: usize,
}

/// Checks the call and returns the work items, or an error before anything is written.
fn plan(q_rows: usize, n_slots: usize, seqs: &[AttnSeq<'_>], s: &AttnShape) -> Result<Vec<Item>> {
    let mut ranges: Vec<_> = seqs.iter().map(|q| q.rows.clone()).filter(|r| !r.is_empty()).collect();
    ranges.sort_by_key(|r| r.start);
    for pair in ranges.windows(2) {
        if pair[0].end > pair[1].start {
            return Err(shape_err(OP, format!("sequences claim overlapping rows {:?} and {:?}", pair[0], pair[1])));
        }
    }
    let bt = s.block_tokens;
    let mut items = Vec::new();
    for (si, seq) in seqs.iter().enumerate() {
        if seq.rows.start > seq.rows.end || seq.rows.end > q_rows {
            return Err(shape_err(OP, format!("sequence rows {:?} outside the {q_rows} query rows", seq.rows)));
        }
        if seq.rows.is_empty() {
            continue;
        }
        let last_pos = seq.pos0.checked_add(seq.rows.len() - 1).ok_or_else(|| shape_err(OP, "position overflows"))?;
        let blocks = last_pos / bt + 1;
        if blocks > seq.block_table.len() {
            return Err(shape_err(
                OP,
                format!("position {last_pos} needs {blocks} KV blocks, the table has {}", seq.block_table.len()),
            ));
        }
        for (j, &blk) in seq.block_table[..blocks].iter().enumerate() {
            let used = if j + 1 == blocks { last_pos - j * bt } else { bt - 1 };
            let slot = (blk as usize).saturating_mul(bt).saturating_add(used);
            if slot >= n_slots {
                return Err(KernelError::KvSlot { slot, capacity: n_slots });
            }
        }
        for (i, row) in seq.rows.clone().enumerate() {
            for kv_head in 0..s.n_kv_heads {
                items.push(Item { row, kv_head, pos: seq.pos0 + i, seq: si });
            }
        }
    }
    Ok(items)
}

/// Computes the attention; `q`/`out` are `[q_rows, n_heads · head_dim]`, the caches `[n_slots, n_kv · head_dim]`.
/// Rows that belong to no sequence are left as they are.
pub(crate) fn attention(
    ex: Exec<'_>,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[AttnSeq<'_>],
    s: &AttnShape,
    out: &mut [f32],
) -> Result<()> {
    if s.n_heads == 0 || s.n_kv_heads == 0 || s.head_dim == 0 || s.block_tokens == 0 {
        return Err(shape_err(OP, format!("empty geometry {s:?}")));
    }
    if !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(shape_err(OP, format!("{} heads do not group over {} KV heads", s.n_heads, s.n_kv_heads)));
    }
    let width = s.n_heads * s.head_dim;
    let kv_width = s.n_kv_heads * s.head_dim;
    if !q.len().is_multiple_of(width)
        || out.len() != q.len()
        || !k_cache.len().is_multiple_of(kv_width)
        || v_cache.len() != k_cache.len()
    {
        return Err(shape_err(OP, "q/out or cache lengths do not match the head geometry"));
    }
    let q_rows = q.len() / width;
    let n_slots = k_cache.len() / kv_width;
    let items = plan(q_rows, n_slots, seqs, s)?;
    let group = s.n_heads / s.n_kv_heads;
    let chunk = group * s.head_dim;
    // Output chunk of (row, kv_head): the `group` query heads of that KV head, contiguous in the row.
    let mut slots: Vec<Option<&mut [f32]>> = out.chunks_exact_mut(chunk).map(Some).collect();
    let work: Vec<(Item, &mut [f32])> =
        items.iter().filter_map(|it| slots[it.row * s.n_kv_heads + it.kv_head].take().map(|o| (*it, o))).collect();
    let macs: usize = items.iter().map(|it| (it.pos + 1) * chunk * 2).sum();
    let parts = if macs <= SERIAL_MACS { 1 } else { ex.pool.threads() * 4 };
    let mut batches: Vec<Vec<(Item, &mut [f32])>> = (0..parts.min(work.len()).max(1)).map(|_| Vec::new()).collect();
    let n_batches = batches.len();
    let per = work.len().div_ceil(n_batches);
    for (i, w) in work.into_iter().enumerate() {
        batches[i / per.max(1)].push(w);
    }
    ex.pool.run_each(batches, |batch| {
        let mut scores = Vec::new();
        for (it, o) in batch {
            head_group(ex.avx2, q, k_cache, v_cache, &seqs[it.seq], s, it, &mut scores, o);
        }
    });
    Ok(())
}

avx2_variant! {
    /// Attention of the `group` query heads that share KV head `it.kv_head`, for one row.
    fn head_group(
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        seq: &AttnSeq<'_>,
        s: &AttnShape,
        it: Item,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) => head_group_impl
}

/// Scores of every query head of the group against each cached key (each key row is read once for the group),
/// softmax per head with max subtraction (f32, 8-lane max and sum), then the weighted sum of the value rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn head_group_impl(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seq: &AttnSeq<'_>,
    s: &AttnShape,
    it: Item,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, bt) = (s.head_dim, s.block_tokens);
    let width = s.n_heads * hd;
    let kv_width = s.n_kv_heads * hd;
    let group = s.n_heads / s.n_kv_heads;
    let n = it.pos + 1;
    let slot = |p: usize| seq.block_table[p / bt] as usize * bt + p % bt;
    let kv_off = it.kv_head * hd;
    let q_group = &q[it.row * width + it.kv_head * group * hd..][..group * hd];
    scores.clear();
    scores.resize(group * n, 0.0);
    for p in 0..n {
        let k0 = slot(p) * kv_width + kv_off;
        let krow = &k_cache[k0..k0 + hd];
        for (h, qh) in q_group.chunks_exact(hd).enumerate() {
            scores[h * n + p] = math::dot8(qh, krow) * s.scale;
        }
    }
    let mut inv = [0.0f32; 8];
    let mut inv_heap = Vec::new();
    let inv: &mut [f32] = if group <= 8 {
        &mut inv[..group]
    } else {
        inv_heap.resize(group, 0.0);
        &mut inv_heap
    };
    for (h, sc) in scores.chunks_exact_mut(n).enumerate() {
        let max = math::max8(sc);
        for v in sc.iter_mut() {
            *v = math::exp(*v - max);
        }
        inv[h] = 1.0 / math::sum8(sc);
    }
    out.fill(0.0);
    for p in 0..n {
        let v0 = slot(p) * kv_width + kv_off;
        let vrow = &v_cache[v0..v0 + hd];
        for (h, o) in out.chunks_exact_mut(hd).enumerate() {
            let e = scores[h * n + p];
            for (ov, &vv) in o.iter_mut().zip(vrow) {
                *ov += e * vv;
            }
        }
    }
    for (o, &f) in out.chunks_exact_mut(hd).zip(inv.iter()) {
        for ov in o.iter_mut() {
            *ov *= f;
        }
    }
}
