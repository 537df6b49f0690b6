//! Continuous batching: which waiting chunks go into the next compute batch, and how many of their rows.
//!
//! Every step takes all waiting decode rows first (a decode is one position of a session that is generating: delaying
//! it delays a user's next token), then prefill chunks, oldest session first, until the batch holds
//! [`StageConfig::batch_tokens`](super::StageConfig::batch_tokens) rows. A prefill chunk larger than what is left is
//! cut: the rest stays at the head of its session's queue for the next step (chunked prefill, as in Sarathi-Serve and
//! vLLM). Sessions join and leave between steps. When the decode rows alone fill the budget, the oldest prefill still
//! gets [`min_prefill`] rows, so a prompt is never starved by a crowd of decoders.
//!
//! A budget in rows does not bound what the decoders wait: on a CPU, 8 decode rows and 120 prompt rows cost many
//! decode steps. So when decode rows are in a step and the stage has measured its steps ([`StepCost`], learned from
//! the compute times the driver reports), the prompt rows are cut further, to what keeps the step's predicted time
//! within [`StageConfig::max_step_stretch`](super::StageConfig::max_step_stretch) times that of the decode rows alone
//! (Sarathi-Serve's stall-free batching, with a budget from a cost model instead of a fixed one). A step without
//! decode rows takes the whole budget: no one waits on it. Until the measured steps differ enough in size to tell a
//! row's cost ([`StepCost::ready`]), a step beside decoders takes [`min_prefill`] prompt rows (the probe the model
//! learns from); a driver that reports no times gets the fixed budget.
//!
//! The policy is a pure function of the candidates and the cost model, tested on its own and through the core with
//! scripted arrivals and scripted step times.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use shardline_proto::wire::{HiddenStates, SessionId, StageData};

use super::cost::{StepCost, StepShape};

/// One session with a chunk ready for compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub session: SessionId,
    /// A decode step (one generated token going through) rather than part of a prompt.
    pub decode: bool,
    /// Positions in the chunk.
    pub rows: usize,
    /// Position of the chunk's first row (the positions the session's KV cache holds before it).
    pub start: u64,
    /// Admission order of the session on this stage: lower is older.
    pub arrival: u64,
}

/// A chunk taken into the batch: all of it, or its first `rows` positions when `rows` is less than the chunk's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub session: SessionId,
    pub rows: usize,
}

/// Rows the oldest waiting prefill gets in a step whose decode rows already fill the budget.
pub fn min_prefill(budget: usize) -> usize {
    (budget / 8).max(1)
}

/// The next batch with the fixed budget only: every decode candidate whole, in arrival order, then prefill candidates
/// oldest first, cut to what is left of `budget` rows. Never empty when `candidates` is not.
#[cfg(test)]
pub fn plan(candidates: &[Candidate], budget: usize) -> Vec<Pick> {
    plan_with(candidates, budget, None)
}

/// The next batch, as [`plan`], with the prompt rows beside decode rows bounded by `cost`: `Some((model, stretch))`
/// cuts them to what keeps the step's predicted time within `stretch` times the decode rows' alone (at least one
/// row, so a prompt always moves), or to [`min_prefill`] rows while the model is not [`StepCost::ready`]; a model
/// that has measured no step, or `None`, leaves the fixed budget.
pub fn plan_with(candidates: &[Candidate], budget: usize, cost: Option<(&StepCost, f64)>) -> Vec<Pick> {
    let budget = budget.max(1);
    let mut decodes: Vec<&Candidate> = candidates.iter().filter(|c| c.decode).collect();
    let mut prefills: Vec<&Candidate> = candidates.iter().filter(|c| !c.decode).collect();
    decodes.sort_by_key(|c| (c.arrival, c.session));
    prefills.sort_by_key(|c| (c.arrival, c.session));
    let mut picks: Vec<Pick> = decodes.iter().map(|c| Pick { session: c.session, rows: c.rows }).collect();
    let used: usize = picks.iter().map(|p| p.rows).sum();
    let mut left = budget.saturating_sub(used);
    if left == 0 && !prefills.is_empty() {
        left = min_prefill(budget);
    }
    if let Some((model, stretch)) = cost
        && !decodes.is_empty()
        && !prefills.is_empty()
        && model.steps() > 0
    {
        left = if model.ready() {
            let decode = decodes.iter().fold(StepShape::default(), |s, c| s.with(c.start, c.rows));
            prefill_cap(model, decode, &prefills, left, stretch)
        } else {
            left.min(min_prefill(budget))
        };
    }
    for c in prefills {
        if left == 0 {
            break;
        }
        let rows = c.rows.min(left);
        picks.push(Pick { session: c.session, rows });
        left -= rows;
    }
    picks
}

/// The most prompt rows (at most `left`, at least 1), taken from `prefills` in order, whose step beside the decode
/// rows `decode` is predicted to take at most `stretch` times the decode rows alone.
fn prefill_cap(model: &StepCost, decode: StepShape, prefills: &[&Candidate], left: usize, stretch: f64) -> usize {
    let limit = model.predict(&decode) * stretch.max(1.0);
    let with = |p: usize| {
        let mut shape = decode;
        let mut rest = p;
        for c in prefills {
            if rest == 0 {
                break;
            }
            let n = c.rows.min(rest);
            shape.add(c.start, n);
            rest -= n;
        }
        model.predict(&shape)
    };
    let available = prefills.iter().map(|c| c.rows).sum::<usize>().min(left);
    // The predicted time grows with the rows taken (every coefficient is ≥ 0): the largest that fits, by bisection.
    let (mut lo, mut hi) = (1, available.max(1));
    if with(hi) <= limit {
        return hi;
    }
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if with(mid) <= limit {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Cuts `data` after its first `rows` positions: `(first rows, the rest)`, or the whole of it and `None` when it holds
/// no more than `rows` (or, which cannot happen for data the core accepted, its bytes do not divide into rows).
pub fn split_front(data: StageData, rows: usize) -> (StageData, Option<StageData>) {
    if rows == 0 || data.n_tokens() <= rows {
        return (data, None);
    }
    match data {
        StageData::Tokens(mut ids) => {
            let rest = ids.split_off(rows);
            (StageData::Tokens(ids), Some(StageData::Tokens(rest)))
        }
        StageData::Hidden(h) => {
            let (n, width, dtype) = (h.n_tokens(), h.width(), h.dtype());
            let bytes = h.as_bytes();
            let cut = bytes.len() / n * rows;
            match (
                HiddenStates::from_bytes(dtype, rows, width, &bytes[..cut]),
                HiddenStates::from_bytes(dtype, n - rows, width, &bytes[cut..]),
            ) {
                (Ok(a), Ok(b)) => (StageData::Hidden(a), Some(StageData::Hidden(b))),
                _ => (StageData::Hidden(h), None),
            }
        }
    }
}

/// What the scheduler did last, shared with load probes and `/metrics` on other threads.
#[derive(Clone, Debug, Default)]
pub struct BatchGauge {
    inner: Arc<GaugeInner>,
}

#[derive(Debug, Default)]
struct GaugeInner {
    sessions: AtomicUsize,
    rows: AtomicUsize,
    waiting: AtomicUsize,
    batches: AtomicUsize,
    peak: AtomicUsize,
    opens: AtomicUsize,
    total_rows: AtomicUsize,
    total_sessions: AtomicUsize,
    compute_ns: AtomicU64,
    compute_cpu_ns: AtomicU64,
}

/// A reading of [`BatchGauge`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Sessions in the last batch sent to compute.
    pub batch_sessions: usize,
    /// Positions (rows) in the last batch.
    pub batch_rows: usize,
    /// Input chunks waiting in the sessions' queues when that batch left (what did not fit, or came behind).
    pub queued_chunks: usize,
    /// Batches computed since the stage started.
    pub batches: usize,
    /// Most sessions ever in one batch.
    pub peak_sessions: usize,
    /// Opens waiting for KV-cache blocks now.
    pub waiting_opens: usize,
    /// Rows over every batch since the stage started (with `batches`: the mean batch size in rows).
    pub total_rows: usize,
    /// Session chunks over every batch since the stage started (with `batches`: the mean sessions per batch, which
    /// shows whether sessions stay together or drift apart into smaller batches).
    pub total_sessions: usize,
    /// Wall time of every batch's compute since the stage started, as the driver reported it (with the time between
    /// two readings: how busy the stage was).
    pub compute_ns: u64,
    /// CPU time the compute thread spent in those batches, where the driver measures it (the QUIC server on Linux;
    /// zero elsewhere): below `compute_ns` when the thread was preempted or waited.
    pub compute_cpu_ns: u64,
}

impl BatchGauge {
    pub fn read(&self) -> BatchStats {
        let i = &self.inner;
        BatchStats {
            batch_sessions: i.sessions.load(Ordering::Relaxed),
            batch_rows: i.rows.load(Ordering::Relaxed),
            queued_chunks: i.waiting.load(Ordering::Relaxed),
            batches: i.batches.load(Ordering::Relaxed),
            peak_sessions: i.peak.load(Ordering::Relaxed),
            waiting_opens: i.opens.load(Ordering::Relaxed),
            total_rows: i.total_rows.load(Ordering::Relaxed),
            total_sessions: i.total_sessions.load(Ordering::Relaxed),
            compute_ns: i.compute_ns.load(Ordering::Relaxed),
            compute_cpu_ns: i.compute_cpu_ns.load(Ordering::Relaxed),
        }
    }

    /// Adds the CPU time a batch's compute took on its thread (the driver measures it; the core has no clock).
    pub fn add_compute_cpu(&self, cpu: Duration) {
        self.inner.compute_cpu_ns.fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
    }

    pub(super) fn add_compute(&self, took: Duration) {
        self.inner.compute_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    pub(super) fn record(&self, sessions: usize, rows: usize, queued: usize) {
        let i = &self.inner;
        i.sessions.store(sessions, Ordering::Relaxed);
        i.rows.store(rows, Ordering::Relaxed);
        i.waiting.store(queued, Ordering::Relaxed);
        i.batches.fetch_add(1, Ordering::Relaxed);
        i.peak.fetch_max(sessions, Ordering::Relaxed);
        i.total_rows.fetch_add(rows, Ordering::Relaxed);
        i.total_sessions.fetch_add(sessions, Ordering::Relaxed);
    }

    pub(super) fn set_waiting_opens(&self, n: usize) {
        self.inner.opens.store(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn c(session: SessionId, decode: bool, rows: usize, arrival: u64) -> Candidate {
        Candidate { session, decode, rows, arrival, start: 0 }
    }

    fn p(session: SessionId, rows: usize) -> Pick {
        Pick { session, rows }
    }

    #[test]
    fn decodes_first_then_oldest_prefills_cut_to_the_budget() {
        let cands = [c(7, false, 64, 0), c(3, true, 1, 2), c(9, false, 64, 1), c(5, true, 1, 3), c(1, false, 8, 4)];
        // Budget 100: both decodes (2 rows), then session 7 (arrived first) whole, then 34 rows of session 9.
        assert_eq!(plan(&cands, 100), vec![p(3, 1), p(5, 1), p(7, 64), p(9, 34)]);
        // A larger budget takes everything, prefills in arrival order.
        assert_eq!(plan(&cands, 1000), vec![p(3, 1), p(5, 1), p(7, 64), p(9, 64), p(1, 8)]);
    }

    #[test]
    fn a_prompt_is_not_starved_by_decoders() {
        let mut cands: Vec<Candidate> = (0..20).map(|i| c(i, true, 1, i)).collect();
        cands.push(c(100, false, 500, 50));
        let picks = plan(&cands, 16);
        assert_eq!(picks.len(), 21, "every decode row goes, whatever the budget");
        assert_eq!(picks.last(), Some(&p(100, min_prefill(16))));
    }

    /// A cost model fitted to steps that cost 4 ms + 1 ms a row + 2 µs per attended pair.
    fn learned() -> StepCost {
        let truth = |s: &StepShape| Duration::from_secs_f64(4e-3 + 1e-3 * s.rows as f64 + 2e-6 * s.attended);
        let mut cost = StepCost::default();
        for k in 0..30u64 {
            let d = (0..8).fold(StepShape::default(), |s, _| s.with(20 + k, 1));
            cost.observe(&d, truth(&d));
            let m = d.with(k * 50, 1 + (k as usize * 13) % 64);
            cost.observe(&m, truth(&m));
        }
        assert!(cost.ready());
        cost
    }

    fn prefill_rows(picks: &[Pick], session: SessionId) -> usize {
        picks.iter().filter(|p| p.session == session).map(|p| p.rows).sum()
    }

    #[test]
    fn beside_decoders_a_prompt_gets_what_keeps_the_step_within_the_stretch() {
        let cost = learned();
        let mut cands: Vec<Candidate> = (0..8).map(|i| Candidate { start: 40, ..c(i, true, 1, i) }).collect();
        cands.push(Candidate { start: 0, ..c(100, false, 1500, 50) });
        // Decode rows alone: 4 + 8 + 2e-3·8·41 ≈ 12.7 ms; 3× is ≈ 38 ms, so about 25 more rows at the prompt's start.
        let picks = plan_with(&cands, 128, Some((&cost, 3.0)));
        assert_eq!(picks.len(), 9, "every decode row, then the prompt");
        let rows = prefill_rows(&picks, 100);
        let decode = cands[..8].iter().fold(StepShape::default(), |s, c| s.with(c.start, 1));
        let limit = cost.predict(&decode) * 3.0;
        assert!(cost.predict(&decode.with(0, rows)) <= limit, "{rows} rows break the bound");
        assert!(cost.predict(&decode.with(0, rows + 1)) > limit, "{rows} rows: one more would fit too");
        assert!((20..=30).contains(&rows), "{rows}");
        // Deeper into the prompt a row attends more positions: fewer rows fit.
        cands[8].start = 1400;
        let deep = prefill_rows(&plan_with(&cands, 128, Some((&cost, 3.0))), 100);
        assert!(deep < rows, "{deep} rows at position 1400, {rows} at 0");
        // A looser stretch lets more through, up to the budget.
        assert!(prefill_rows(&plan_with(&cands, 128, Some((&cost, 6.0))), 100) > deep);
        assert_eq!(prefill_rows(&plan_with(&cands, 128, Some((&cost, 1000.0))), 100), 120);
        // A stretch of 1 still moves the prompt by a row.
        assert_eq!(prefill_rows(&plan_with(&cands, 128, Some((&cost, 1.0))), 100), 1);
    }

    #[test]
    fn without_decoders_or_without_times_the_budget_is_whole() {
        let cost = learned();
        // No decoder waits: the whole budget goes to the prompts, oldest first.
        let cands = [Candidate { start: 0, ..c(1, false, 100, 0) }, Candidate { start: 0, ..c(2, false, 100, 1) }];
        assert_eq!(plan_with(&cands, 128, Some((&cost, 3.0))), vec![p(1, 100), p(2, 28)]);
        // With decoders but no measured step (a driver that reports no times): the fixed budget, as `plan`.
        let mut cands: Vec<Candidate> = (0..8).map(|i| c(i, true, 1, i)).collect();
        cands.push(c(100, false, 1500, 50));
        let fixed = plan(&cands, 128);
        assert_eq!(prefill_rows(&fixed, 100), 120);
        assert_eq!(plan_with(&cands, 128, Some((&StepCost::default(), 3.0))), fixed);
        assert_eq!(plan_with(&cands, 128, None), fixed);
        // Steps measured, all of one size: the probe of `min_prefill` rows, from which the model learns a row's cost.
        let mut same = StepCost::default();
        for _ in 0..10 {
            same.observe(&StepShape::default().with(30, 8), Duration::from_millis(10));
        }
        assert!(!same.ready());
        assert_eq!(prefill_rows(&plan_with(&cands, 128, Some((&same, 3.0))), 100), min_prefill(128));
    }

    #[test]
    fn split_keeps_every_row_in_order() {
        let (a, b) = split_front(StageData::Tokens(vec![1, 2, 3, 4, 5]), 2);
        assert!(matches!((a, b), (StageData::Tokens(x), Some(StageData::Tokens(y))) if x == [1, 2] && y == [3, 4, 5]));
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let h = HiddenStates::from_f32(4, 3, &values).unwrap();
        let (a, b) = split_front(StageData::Hidden(h), 3);
        let (StageData::Hidden(a), Some(StageData::Hidden(b))) = (a, b) else { panic!("hidden states split in two") };
        assert_eq!((a.n_tokens(), b.n_tokens(), a.width()), (3, 1, 3));
        assert_eq!(a.as_bytes(), bytemuck::cast_slice::<f32, u8>(&values[..9]));
        assert_eq!(b.as_bytes(), bytemuck::cast_slice::<f32, u8>(&values[9..]));
        let (whole, none) = split_front(StageData::Tokens(vec![1, 2]), 2);
        assert!(none.is_none() && whole.n_tokens() == 2);
    }

    #[test]
    fn empty_in_empty_out_and_a_zero_budget_still_moves() {
        assert!(plan(&[], 64).is_empty());
        assert_eq!(plan(&[c(1, false, 10, 0)], 0), vec![p(1, 1)]);
    }
}
