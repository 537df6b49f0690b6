//! The decode step as a CUDA graph per batch-size bucket (docs/CUDA.md, "CUDA graphs per batch bucket"): a batch of
//! decode rows (one new token per session, tokens in) is padded with idle sessions to the smallest bucket of
//! `shardline_kernels::step_graph::BUCKETS` that holds it, so every batch size of a bucket replays one graph; the
//! backend decides capture, replay or eager (`Backend::graph_step`). Prefill chunks, hidden-state inputs (their
//! upload gives a new device buffer every step) and batches above the largest bucket run eagerly, unpadded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use shardline_kernels::KernelError;
use shardline_kernels::step_graph::{GraphKey, StepRun, bucket};

use super::{BatchItem, HeadRows, Shard, ShardInput, ShardKv, ShardOutput};
use crate::error::{ModelError, Result};
use crate::model::LayerRange;

/// A shard's padding sessions and what its last padded step did.
pub(crate) struct DecodeSteps {
    /// Idle sessions of one KV block each, fed token 0 at position 0 every step (their rows are discarded).
    pads: Mutex<Vec<ShardKv>>,
    /// Pad and go through `graph_step` even on a backend without graphs (tests of the padded path on the CPU).
    forced: AtomicBool,
    last: Mutex<Option<(GraphKey, StepRun)>>,
    /// This shard's id in the backend's graph keys (unique in the process).
    owner: u64,
}

impl Default for DecodeSteps {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            pads: Mutex::default(),
            forced: AtomicBool::new(false),
            last: Mutex::default(),
            owner: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Shard {
    /// As [`Shard::forward_batch`], but a batch of decode rows runs padded to its bucket through the backend's
    /// step graphs (see the module). The outputs are the items', in order; on a backend with graphs they live in
    /// the graph's buffers, so read them before the next step.
    pub fn forward_batch_stepped(&self, items: &mut [BatchItem<'_>], span: LayerRange) -> Result<Vec<ShardOutput>> {
        let n = items.len();
        // Every item one new token, and all wanting the same of the head (pads copy it), never every row's logits.
        let head = items.first().map_or(HeadRows::All, |i| i.head);
        let decode = span.start == 0
            && self.embeddings.is_some()
            && head != HeadRows::All
            && items.iter().all(|i| i.head == head && matches!(i.input, ShardInput::Tokens(t) if t.len() == 1));
        let graphs = self.backend.has_graphs() || self.steps.forced.load(Ordering::Relaxed);
        let Some(bucket) = bucket(n).filter(|_| decode && graphs) else {
            return self.forward_batch(items, span);
        };
        let mut pads = self.steps.pads.lock();
        while pads.len() < bucket - n {
            match self.open_session(1) {
                Ok(kv) => pads.push(kv),
                // No KV block left for a pad: this step runs eagerly, unpadded.
                Err(_) => return self.forward_batch(items, span),
            }
        }
        let key = GraphKey { owner: self.steps.owner, bucket, span: (span.start, span.end) };
        let lens: Vec<usize> = items.iter().map(|i| i.kv.len).collect();
        let pad_token = [0u32];
        let mut result: Option<Result<Vec<ShardOutput>>> = None;
        let run = self.backend.graph_step(Some(key), &mut || {
            // The step may run twice (a replay that no longer matched, then a capture): start from the same state.
            let mut batch: Vec<BatchItem<'_>> = items
                .iter_mut()
                .zip(&lens)
                .map(|(i, &len)| {
                    i.kv.len = len;
                    BatchItem { kv: &mut *i.kv, input: i.input, head: i.head }
                })
                .collect();
            for p in pads.iter_mut().take(bucket - n) {
                p.len = 0;
                batch.push(BatchItem { kv: p, input: ShardInput::Tokens(&pad_token), head });
            }
            match self.forward_batch(&mut batch, span) {
                Ok(out) => {
                    result = Some(Ok(out));
                    Ok(())
                }
                Err(e) => {
                    let msg = e.to_string();
                    result = Some(Err(e));
                    Err(KernelError::Cuda(format!("decode step: {msg}")))
                }
            }
        });
        let run = match (run, result) {
            (_, Some(Err(e))) => return Err(e),
            (Err(e), _) => return Err(e.into()),
            (Ok(run), Some(Ok(mut out))) => {
                out.truncate(n);
                *self.steps.last.lock() = Some((key, run));
                return Ok(out);
            }
            (Ok(run), None) => run,
        };
        Err(ModelError::Invalid(format!("the decode step ran as {run:?} but produced nothing")))
    }

    /// Pads decode batches and sends them through `Backend::graph_step` even on a backend without graphs, so the
    /// padded path can be tested on the CPU (where `graph_step` runs the step eagerly).
    pub fn force_step_graphs(&self, on: bool) {
        self.steps.forced.store(on, Ordering::Relaxed);
    }

    /// This shard's id in graph keys ([`GraphKey::owner`]).
    pub fn graph_owner(&self) -> u64 {
        self.steps.owner
    }

    /// The key and outcome of the last padded step (`None` before the first).
    pub fn last_graph_step(&self) -> Option<(GraphKey, StepRun)> {
        *self.steps.last.lock()
    }
}
