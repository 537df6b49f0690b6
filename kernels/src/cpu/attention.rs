//! Causal grouped-query attention over the paged KV cache, for several sequences in one call.
//!
//! Work is split over (row, chunk of [`CHUNK`] positions): a chunk goes through its KV heads one after another, the
//! query heads that share a KV head together, so each key and value row is read once for the whole group, and a
//! long context is cut into chunks so a single decoded row still keeps every thread busy. A chunk takes all KV heads
//! (the cache stores a position's heads side by side) so that its positions' cache offsets are found once for all of
//! them. Each chunk yields, per head, its maximum score, its sum of exponentials and its unnormalised weighted sum of
//! values; the chunks of a row are then merged in order (`M = max m_c`, `L = Σ l_c·e^(m_c−M)`,
//! `O = Σ o_c·e^(m_c−M)`, `out = O / L`), rows on the pool's threads. A row with at most `CHUNK` positions is one
//! chunk, and the merge leaves its values unchanged.
//!
//! The chunks of a row depend only on its position, and every value is computed by the same sequence of operations
//! whichever thread runs it and whatever else is in the call, so a sequence batched with others gives exactly the
//! result it gives alone.
//!
//! The cache holds f32 or f16 ([`KvElem`]); with f16 the query and the softmax weights are rounded to f16 too, as
//! llama.cpp does with its f16 KV cache (`kv_cache.rs`).

use super::kv_cache::KvElem;
use super::math;
use super::parallel::Exec;
use crate::backend::{AttnSeq, AttnShape};
use crate::error::{KernelError, Result, shape_err};

const OP: &str = "attention";

/// Positions per chunk of work.
const CHUNK: usize = 64;

/// Below this many multiply-adds the call runs on the calling thread.
const SERIAL_MACS: usize = 32 * 1024;

/// One row: its positions `0..=pos` are split into `chunks` work items. `kv_head` is the head a chunk is working on
/// (0 in the plan).
#[derive(Clone, Copy, Debug)]
struct Item {
    row: usize,
    kv_head: usize,
    /// Last position the row attends to (inclusive).
    pos: usize,
    seq: usize,
}

impl Item {
    fn chunks(&self) -> usize {
        self.pos / CHUNK + 1
    }

    /// Positions `p0..p1` of chunk `c`.
    fn chunk(&self, c: usize) -> (usize, usize) {
        (c * CHUNK, ((c + 1) * CHUNK).min(self.pos + 1))
    }
}

/// The query heads of `it`'s KV head, as the scores take them: rounded to the cache's type (into `buf`) when the
/// cache is f16.
#[inline(always)]
fn query_group<'a, E: KvElem>(q: &'a [f32], s: &AttnShape, it: Item, buf: &'a mut Vec<f32>) -> &'a [f32] {
    let group = s.n_heads / s.n_kv_heads;
    let q_group = &q[it.row * s.n_heads * s.head_dim + it.kv_head * group * s.head_dim..][..group * s.head_dim];
    if E::IS_F32 {
        return q_group;
    }
    buf.clear();
    buf.extend(q_group.iter().map(|&x| E::round(x)));
    buf
}

/// Per head (`n` scores each): the maximum and the exponentials with it subtracted, in place, written to the head's
/// `[max, sum, …]` part with their 8-lane sum.
#[inline(always)]
fn softmax_heads(scores: &mut [f32], n: usize, hd: usize, part: &mut [f32]) {
    for (h, sc) in scores.chunks_exact_mut(n).enumerate() {
        let max = math::max8(sc);
        for v in sc.iter_mut() {
            *v = math::exp(*v - max);
        }
        part[h * (hd + 2)] = max;
        part[h * (hd + 2) + 1] = math::sum8(sc);
    }
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
            items.push(Item { row, kv_head: 0, pos: seq.pos0 + i, seq: si });
        }
    }
    Ok(items)
}

/// Computes the attention; `q`/`out` are `[q_rows, n_heads · head_dim]`, the caches `[n_slots, n_kv · head_dim]`.
/// Rows that belong to no sequence are left as they are.
pub(crate) fn attention<E: KvElem>(
    ex: Exec<'_>,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
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
    // Per chunk and head: max score, sum of exponentials, then head_dim unnormalised output values; the heads of
    // KV head `j` start at `j · group · (head_dim + 2)`.
    let head_part = group * (s.head_dim + 2);
    let part_len = s.n_heads * (s.head_dim + 2);
    let n_parts: usize = items.iter().map(Item::chunks).sum();
    let mut parts = vec![0.0f32; n_parts * part_len];
    let mut work: Vec<(Item, usize, &mut [f32])> = Vec::with_capacity(n_parts);
    let mut slices = parts.chunks_exact_mut(part_len);
    for it in &items {
        for c in 0..it.chunks() {
            work.push((*it, c, slices.next().expect("one slice per chunk")));
        }
    }
    let macs: usize = items.iter().map(|it| (it.pos + 1) * s.n_heads * s.head_dim * 2).sum();
    let batches = if macs <= SERIAL_MACS { 1 } else { ex.pool.threads() * 4 };
    let groups = in_runs(work, batches);
    ex.pool.run_each(groups, |batch| {
        let mut scratch = Scratch::default();
        for (it, c, part) in batch {
            scratch.find_rows(&seqs[it.seq], s, it, c);
            for (kv_head, head) in part.chunks_exact_mut(head_part).enumerate() {
                let it = Item { kv_head, ..it };
                chunk_part::<E>(ex.avx2, q, k_cache, v_cache, s, it, c, &mut scratch, head);
            }
        }
    });
    // Merge the chunks of each row into its output, in chunk order (rows on the pool's threads when there is
    // enough of them).
    let mut rows: Vec<Option<&mut [f32]>> = out.chunks_exact_mut(width).map(Some).collect();
    let mut merges = Vec::with_capacity(items.len());
    let mut next = 0;
    for it in &items {
        let n = it.chunks();
        // `plan` refused sequences that share a row, so each row is taken once.
        let o = rows[it.row].take().ok_or_else(|| shape_err(OP, format!("row {} claimed twice", it.row)))?;
        merges.push((&parts[next * part_len..(next + n) * part_len], o));
        next += n;
    }
    let tasks = if n_parts * part_len <= SERIAL_MERGE { 1 } else { ex.pool.threads() * 2 };
    ex.pool.run_each(in_runs(merges, tasks), |task| {
        for (p, o) in task {
            merge(p, s.n_heads, s.head_dim, o);
        }
    });
    Ok(())
}

/// `items` cut into at most `tasks` runs of consecutive items, of equal length but the last.
fn in_runs<T>(items: Vec<T>, tasks: usize) -> Vec<Vec<T>> {
    let per = items.len().div_ceil(tasks.max(1)).max(1);
    let mut runs: Vec<Vec<T>> = Vec::new();
    for item in items {
        match runs.last_mut() {
            Some(r) if r.len() < per => r.push(item),
            _ => runs.push(vec![item]),
        }
    }
    runs
}

/// Chunk-part values below which the merge stays on the calling thread.
const SERIAL_MERGE: usize = 16 * 1024;

/// `out[h] = Σ_c o_c·e^(m_c−M) / Σ_c l_c·e^(m_c−M)` for each of the `heads` heads of a row, chunks in order.
fn merge(parts: &[f32], heads: usize, hd: usize, out: &mut [f32]) {
    let part_len = heads * (hd + 2);
    for (h, o) in out.chunks_exact_mut(hd).enumerate() {
        let head = |c: usize| &parts[c * part_len + h * (hd + 2)..][..hd + 2];
        let chunks = parts.len() / part_len;
        let max = (0..chunks).fold(f32::NEG_INFINITY, |m, c| if head(c)[0] > m { head(c)[0] } else { m });
        let mut sum = 0.0f32;
        o.fill(0.0);
        for c in 0..chunks {
            let p = head(c);
            let f = math::exp(p[0] - max);
            sum += p[1] * f;
            for (ov, &pv) in o.iter_mut().zip(&p[2..]) {
                *ov += pv * f;
            }
        }
        let inv = 1.0 / sum;
        for ov in o.iter_mut() {
            *ov *= inv;
        }
    }
}

/// Per-thread buffers of [`chunk_part`]: the scores of a chunk, and the query group and one key row as f32 when the
/// cache is f16.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    q: Vec<f32>,
    row: Vec<f32>,
    /// The chunk's value rows as f32 (f16 cache, [`simd::chunk_part`]).
    vals: Vec<f32>,
    /// Where each position of the chunk starts in the caches (`slot · kv_width`), found once for all KV heads.
    bases: Vec<usize>,
    /// The chunk's key and value rows of one KV head as f32 ([`simd::chunk_part`]).
    keys: Vec<*const f32>,
    rows: Vec<*const f32>,
}

impl Scratch {
    /// Fills [`Scratch::bases`] for chunk `c` of `it`, walking the block table a block at a time.
    fn find_rows(&mut self, seq: &AttnSeq<'_>, s: &AttnShape, it: Item, c: usize) {
        let (p0, p1) = it.chunk(c);
        let (bt, kv_width) = (s.block_tokens, s.n_kv_heads * s.head_dim);
        self.bases.clear();
        let mut p = p0;
        while p < p1 {
            let b = p / bt;
            let end = ((b + 1) * bt).min(p1);
            let first = seq.block_table[b] as usize * bt;
            self.bases.extend((p..end).map(|q| (first + q - b * bt) * kv_width));
            p = end;
        }
    }
}

/// [`chunk_part_body`] compiled for AVX2 when `avx2` is set (same results).
#[allow(clippy::too_many_arguments)]
fn chunk_part<E: KvElem>(
    avx2: bool,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    s: &AttnShape,
    it: Item,
    c: usize,
    scratch: &mut Scratch,
    part: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn wide<E: KvElem>(
            q: &[f32],
            k_cache: &[E],
            v_cache: &[E],
            s: &AttnShape,
            it: Item,
            c: usize,
            scratch: &mut Scratch,
            part: &mut [f32],
        ) {
            chunk_part_body(q, k_cache, v_cache, s, it, c, scratch, part)
        }
        if s.head_dim.is_multiple_of(8) {
            // SAFETY: as below.
            return unsafe { simd::chunk_part(q, k_cache, v_cache, s, it, c, scratch, part) };
        }
        // SAFETY: callers set `avx2` only when the CPU supports AVX2.
        return unsafe { wide(q, k_cache, v_cache, s, it, c, scratch, part) };
    }
    let _ = avx2;
    chunk_part_body(q, k_cache, v_cache, s, it, c, scratch, part)
}

/// Scores of every query head of the group against each key of the chunk (each key row read once for the group),
/// then per head the max, the exponentials (max subtracted, f32) and their 8-lane sum, and the weighted sum of the
/// value rows, written as `[max, sum, values…]` per head. With an f16 cache the query enters `K·q` rounded to f16 and
/// each exponential enters the value sum rounded to f16 (their sum is taken unrounded), as in llama.cpp.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn chunk_part_body<E: KvElem>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    s: &AttnShape,
    it: Item,
    c: usize,
    scratch: &mut Scratch,
    part: &mut [f32],
) {
    let hd = s.head_dim;
    let (p0, p1) = it.chunk(c);
    let n = p1 - p0;
    let kv_off = it.kv_head * hd;
    let Scratch { scores, q: q_buf, row, bases, .. } = scratch;
    let q_group = query_group::<E>(q, s, it, q_buf);
    scores.clear();
    scores.resize(q_group.len() / hd * n, 0.0);
    for p in p0..p1 {
        let k0 = bases[p - p0] + kv_off;
        let krow = E::row_f32(&k_cache[k0..k0 + hd], row);
        for (h, qh) in q_group.chunks_exact(hd).enumerate() {
            scores[h * n + p - p0] = math::dot8(qh, krow) * s.scale;
        }
    }
    softmax_heads(scores, n, hd, part);
    for p in p0..p1 {
        let v0 = bases[p - p0] + kv_off;
        let vrow = E::row_f32(&v_cache[v0..v0 + hd], row);
        for (h, o) in part.chunks_exact_mut(hd + 2).enumerate() {
            let e = E::round(scores[h * n + p - p0]);
            for (ov, &vv) in o[2..].iter_mut().zip(vrow) {
                *ov += e * vv;
            }
        }
    }
}

/// [`chunk_part_body`] written with explicit 8-lane vectors, for head dims that are a multiple of 8. The same
/// operations on the same values in the same order, so the same bits as the portable code: each score is
/// [`math::dot8`] (lane `i % 8` accumulates `q·k` products, unfused, then [`super::dot::fold8`]); the softmax part is
/// the portable code itself; the weighted sum of the value rows accumulates each output value over the positions in
/// order (`o += e·v`, unfused), held in registers for a head's 64 values at a time instead of in memory.
/// The compiler left to itself turned `dot8` into 2-lane pieces here (~15% of an engine step at 16 rows).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{AttnShape, Item, KvElem, Scratch, query_group, softmax_heads};

    /// The canonical fold of 8 lanes ([`super::super::dot::fold8`]): `v[i] + v[i+4]`, then `u[j] + u[j+2]`, then the
    /// two halves.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fold8(v: __m256) -> f32 {
        let u = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<1>(w, w)))
    }

    /// `dot8(a, b)` for `a.len() == b.len()`, a multiple of 8.
    ///
    /// # Safety
    /// Both slices hold `8 · lanes` values.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot8(a: *const f32, b: *const f32, lanes: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for j in 0..lanes {
            // SAFETY: the caller's contract.
            let (x, y) = unsafe { (_mm256_loadu_ps(a.add(8 * j)), _mm256_loadu_ps(b.add(8 * j))) };
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
        }
        fold8(acc)
    }

    /// [`dot8`] of `a` with each of the eight rows `b`, side by side.
    ///
    /// # Safety
    /// `a` and every row of `b` hold `8 · lanes` values.
    #[inline]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn dot8_x8(a: *const f32, b: &[*const f32], lanes: usize) -> [f32; 8] {
        let b: [*const f32; 8] = std::array::from_fn(|i| b[i]);
        let mut acc = [_mm256_setzero_ps(); 8];
        for j in 0..lanes {
            // SAFETY: the caller's contract.
            unsafe {
                let x = _mm256_loadu_ps(a.add(8 * j));
                for i in 0..8 {
                    acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(x, _mm256_loadu_ps(b[i].add(8 * j))));
                }
            }
        }
        let mut out = [0.0; 8];
        for i in 0..8 {
            out[i] = fold8(acc[i]);
        }
        out
    }

    /// `o[8·(d + i) ..][..8] += w[p] · rows[p][8·(d + i) ..][..8]` for `i < M`, over the positions `p` in order.
    ///
    /// # Safety
    /// `o` and every row hold at least `8·(d + M)` values; `rows` and `w` have the same length.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn weighted_rows<const M: usize>(o: *mut f32, w: &[f32], rows: &[*const f32], d: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); M];
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(o.add(8 * (d + i)));
            }
            for (&e, &r) in w.iter().zip(rows) {
                let e = _mm256_set1_ps(e);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(e, _mm256_loadu_ps(r.add(8 * (d + i)))));
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * (d + i)), *a);
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX2; `s.head_dim` is a multiple of 8; the arguments are those [`super::chunk_part`] gets
    /// (checked by [`super::plan`]).
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk_part<E: KvElem>(
        q: &[f32],
        k_cache: &[E],
        v_cache: &[E],
        s: &AttnShape,
        it: Item,
        c: usize,
        scratch: &mut Scratch,
        part: &mut [f32],
    ) {
        let hd = s.head_dim;
        let lanes = hd / 8;
        let (p0, p1) = it.chunk(c);
        let n = p1 - p0;
        let kv_off = it.kv_head * hd;
        let Scratch { scores, q: q_buf, row, vals, bases, keys, rows } = scratch;
        let q_group = query_group::<E>(q, s, it, q_buf);
        scores.clear();
        scores.resize(q_group.len() / hd * n, 0.0);
        // Pointers to the chunk's key rows as f32 (the cache itself, or its rows converted once for every head).
        keys.clear();
        if E::IS_F32 {
            keys.extend(bases.iter().map(|&b| E::row_f32(&k_cache[b + kv_off..][..hd], row).as_ptr()));
        } else {
            vals.clear();
            for &b in bases.iter() {
                let k0 = b + kv_off;
                vals.extend_from_slice(E::row_f32(&k_cache[k0..k0 + hd], row));
            }
            keys.extend(vals.chunks_exact(hd).map(<[f32]>::as_ptr));
        }
        for (h, qh) in q_group.chunks_exact(hd).enumerate() {
            let sc = &mut scores[h * n..(h + 1) * n];
            let mut p = 0;
            // Eight keys at a time: eight independent accumulators hide the latency of each dot product's chain.
            while p + 8 <= n {
                // SAFETY: `qh` and the key rows hold `hd = 8 · lanes` values; `p + 8 <= n` keys exist.
                let d = unsafe { dot8_x8(qh.as_ptr(), &keys[p..p + 8], lanes) };
                for (o, v) in sc[p..p + 8].iter_mut().zip(d) {
                    *o = v * s.scale;
                }
                p += 8;
            }
            for (o, &k) in sc[p..].iter_mut().zip(&keys[p..]) {
                // SAFETY: as above.
                *o = unsafe { dot8(qh.as_ptr(), k, lanes) } * s.scale;
            }
        }
        softmax_heads(scores, n, hd, part);
        // The value sum takes each weight rounded as the cache's type (after the unrounded sum above).
        if !E::IS_F32 {
            scores.iter_mut().for_each(|v| *v = E::round(*v));
        }
        // Pointers to the chunk's value rows (as f32: the cache itself, or its rows converted once for every head).
        rows.clear();
        if E::IS_F32 {
            rows.extend(bases.iter().map(|&b| E::row_f32(&v_cache[b + kv_off..][..hd], row).as_ptr()));
        } else {
            vals.clear();
            for &b in bases.iter() {
                let v0 = b + kv_off;
                vals.extend_from_slice(E::row_f32(&v_cache[v0..v0 + hd], row));
            }
            rows.extend(vals.chunks_exact(hd).map(<[f32]>::as_ptr));
        }
        for (h, o) in part.chunks_exact_mut(hd + 2).enumerate() {
            let w = &scores[h * n..(h + 1) * n];
            let o = o[2..].as_mut_ptr();
            let mut d = 0;
            // SAFETY: `o` and every row hold `hd = 8 · lanes` values; `w` and `rows` hold `n` entries.
            unsafe {
                while d + 8 <= lanes {
                    weighted_rows::<8>(o, w, rows, d);
                    d += 8;
                }
                while d < lanes {
                    weighted_rows::<1>(o, w, rows, d);
                    d += 1;
                }
            }
        }
    }
}
