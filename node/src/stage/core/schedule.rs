//! Continuous batching: which waiting chunks go into the next compute batch, and how many of their rows.
//!
//! Every step takes all waiting decode rows first (a decode is one position of a session that is generating: delaying
//! it delays a user's next token), then prefill chunks, oldest session first, until the batch holds
//! [`StageConfig::batch_tokens`](super::StageConfig::batch_tokens) rows. A prefill chunk larger than what is left is
//! cut: the rest stays at the head of its session's queue for the next step (chunked prefill, as in Sarathi-Serve and
//! vLLM). So a long prompt delays the sessions that decode beside it by at most one budget's worth of rows per step,
//! and sessions join and leave between steps. When the decode rows alone fill the budget, the oldest prefill still
//! gets [`min_prefill`] rows, so a prompt is never starved by a crowd of decoders.
//!
//! The policy is a pure function of the candidates, tested on its own and through the core with scripted arrivals.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use shardline_proto::wire::{HiddenStates, SessionId, StageData};

/// One session with a chunk ready for compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub session: SessionId,
    /// A decode step (one generated token going through) rather than part of a prompt.
    pub decode: bool,
    /// Positions in the chunk.
    pub rows: usize,
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

/// The next batch: every decode candidate whole, in arrival order, then prefill candidates oldest first, cut to what
/// is left of `budget` rows. Never empty when `candidates` is not.
pub fn plan(candidates: &[Candidate], budget: usize) -> Vec<Pick> {
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
        }
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
    use super::*;

    fn c(session: SessionId, decode: bool, rows: usize, arrival: u64) -> Candidate {
        Candidate { session, decode, rows, arrival }
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
