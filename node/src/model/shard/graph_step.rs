//! The decode step as a CUDA graph per batch-size bucket (docs/CUDA.md, "CUDA graphs per batch bucket"): a batch of
//! decode rows (one new position per session) is padded with idle sessions to the smallest bucket of
//! `shardline_kernels::step_graph::BUCKETS` that holds it, so every batch size of a bucket replays one graph; the
//! backend decides capture, replay or eager (`Backend::graph_step`). A stage fed hidden states (one row per
//! session) copies them into per-slot input tensors first, so the graph always reads the same buffers. Prefill
//! chunks and batches above the largest bucket run eagerly, unpadded.
//!
//! The step hands the backend its per-step inputs (`StepInputs`: token ids, positions, KV slots and the attention's
//! sequences of the padded batch, computed as `Shard::forward_batch` computes them), so a graph backend replays it
//! without running the forward at all (`StepRun::ReplayedDirect`): the shard then advances the KV lengths itself and
//! hands out the outputs the step produced when it was captured (the graph's buffers, rewritten by the replay).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use shardline_kernels::step_graph::{GraphKey, StepInputs, StepRun, bucket};
use shardline_kernels::{AttnSeq, KernelError, Tensor};

use super::{BatchItem, HeadRows, Shard, ShardInput, ShardKv, ShardOutput, kv_slot};
use crate::error::{ModelError, Result};
use crate::model::LayerRange;

/// A shard's padding sessions and what its last padded step did.
pub(crate) struct DecodeSteps {
    /// Idle sessions of one KV block each, fed token 0 at position 0 every step (their rows are discarded).
    pads: Mutex<Vec<ShardKv>>,
    /// One `[1, hidden]` input per batch slot for stages fed hidden states (see `forward_batch_stepped`).
    inputs: Mutex<Vec<Tensor>>,
    /// Pad and go through `graph_step` even on a backend without graphs (tests of the padded path on the CPU).
    forced: AtomicBool,
    last: Mutex<Option<(GraphKey, StepRun)>>,
    /// Per key, the outputs of the padded step as the graph's capture (or a replay that ran the step) produced
    /// them: second handles to the graph's buffers, handed out again after a direct replay rewrote them.
    outputs: Mutex<HashMap<GraphKey, Vec<ShardOutput>>>,
    /// This shard's id in the backend's graph keys (unique in the process).
    owner: u64,
}

impl Default for DecodeSteps {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            pads: Mutex::default(),
            inputs: Mutex::default(),
            forced: AtomicBool::new(false),
            last: Mutex::default(),
            outputs: Mutex::default(),
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
        // Every item one new position (a token on the first stage, a hidden row after it), and all wanting the same
        // of the head (pads copy it), never every row's logits.
        let head = items.first().map_or(HeadRows::All, |i| i.head);
        let tokens_in = span.start == 0 && self.embeddings.is_some();
        let one_row = |i: &BatchItem<'_>| match i.input {
            ShardInput::Tokens(t) => tokens_in && t.len() == 1,
            ShardInput::Hidden(h) => !tokens_in && h.rows() == 1,
        };
        let decode = head != HeadRows::All && items.iter().all(|i| i.head == head && one_row(i));
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
        // Hidden-state inputs are copied (eagerly, before the step) into one tensor per batch slot that lives as long
        // as the shard, so the graph reads the same buffers every step; pads read zeros.
        let mut inputs = self.steps.inputs.lock();
        if !tokens_in {
            let hidden = self.config.hidden;
            while inputs.len() < bucket {
                inputs.push(self.backend.upload_f32(&[1, hidden], &vec![0.0; hidden])?);
            }
            for (item, slot) in items.iter().zip(inputs.iter_mut()) {
                if let ShardInput::Hidden(h) = item.input {
                    self.backend.copy_rows(h, 0, slot, 0, 1)?;
                }
            }
        }
        let inputs = &*inputs;
        let key = GraphKey { owner: self.steps.owner, bucket, span: (span.start, span.end) };
        let lens: Vec<usize> = items.iter().map(|i| i.kv.len).collect();
        let pad_token = [0u32];
        // The padded batch's per-step inputs, as forward_batch derives its ops' arguments from it. A batch it
        // would refuse (a token outside the vocabulary, a full session) runs eagerly, unpadded, to get its error.
        let Some(step) = self.step_indices(items, &pads[..bucket - n], tokens_in) else {
            return self.forward_batch(items, span);
        };
        let seqs = step.seqs();
        let step_inputs = StepInputs {
            ids: tokens_in.then_some(&step.ids[..]),
            positions: &step.positions,
            slots: &step.slots,
            seqs: &seqs,
            // What the launches depend on besides the key: which rows go through the head.
            tag: head as u64,
        };
        let mut result: Option<Result<Vec<ShardOutput>>> = None;
        let run = self.backend.graph_step(Some(key), Some(&step_inputs), &mut || {
            // The step may run twice (a replay that no longer matched, then a capture): start from the same state.
            let mut batch: Vec<BatchItem<'_>> = items
                .iter_mut()
                .zip(&lens)
                .enumerate()
                .map(|(j, (i, &len))| {
                    i.kv.len = len;
                    let input = if tokens_in { i.input } else { ShardInput::Hidden(&inputs[j]) };
                    BatchItem { kv: &mut *i.kv, input, head: i.head }
                })
                .collect();
            for (j, p) in pads.iter_mut().take(bucket - n).enumerate() {
                p.len = 0;
                let input = if tokens_in { ShardInput::Tokens(&pad_token) } else { ShardInput::Hidden(&inputs[n + j]) };
                batch.push(BatchItem { kv: p, input, head });
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
                let mut kept = self.steps.outputs.lock();
                match run {
                    // Outputs in a graph's buffers: kept for the direct replays of this graph.
                    StepRun::Captured | StepRun::Recaptured | StepRun::Replayed => {
                        match out.iter().map(ShardOutput::share).collect::<Option<Vec<_>>>() {
                            Some(shared) => kept.insert(key, shared),
                            None => kept.remove(&key),
                        };
                    }
                    StepRun::Eager | StepRun::ReplayedDirect => {
                        kept.remove(&key);
                    }
                }
                drop(kept);
                out.truncate(n);
                *self.steps.last.lock() = Some((key, run));
                return Ok(out);
            }
            (Ok(run), None) => run,
        };
        if run == StepRun::ReplayedDirect {
            // The graph ran from the step's inputs: advance the KV lengths as forward_batch would, and hand out the
            // captured step's outputs, which the replay rewrote.
            let kept = self.steps.outputs.lock();
            let out: Option<Vec<ShardOutput>> =
                kept.get(&key).and_then(|o| o.iter().take(n).map(ShardOutput::share).collect());
            drop(kept);
            let Some(out) = out.filter(|o| o.len() == n) else {
                return Err(ModelError::Invalid("a direct graph replay without the captured step's outputs".into()));
            };
            for (item, &len) in items.iter_mut().zip(&lens) {
                item.kv.len = len + 1;
            }
            for p in pads.iter_mut().take(bucket - n) {
                p.len = 1;
            }
            *self.steps.last.lock() = Some((key, run));
            return Ok(out);
        }
        Err(ModelError::Invalid(format!("the decode step ran as {run:?} but produced nothing")))
    }

    /// The per-step inputs of a padded decode batch: the real items (one new position each, at their KV lengths)
    /// then `pads` (token 0 at position 0). `None` when `forward_batch` would refuse the batch.
    fn step_indices(&self, items: &[BatchItem<'_>], pads: &[ShardKv], tokens_in: bool) -> Option<StepIndices> {
        let bt = self.block_tokens;
        let mut s = StepIndices::default();
        let rows = items
            .iter()
            .map(|i| {
                let token = match i.input {
                    ShardInput::Tokens(t) => t.first().copied(),
                    ShardInput::Hidden(_) => Some(0),
                };
                (&*i.kv, token, i.kv.len)
            })
            // Pads restart at position 0 every step.
            .chain(pads.iter().map(|p| (p, Some(0), 0)));
        for (kv, token, pos) in rows {
            let token = token.filter(|&t| !tokens_in || (t as usize) < self.config.vocab)?;
            let blocks = kv.reservation.blocks();
            if pos + 1 > kv.capacity {
                return None;
            }
            s.ids.push(token);
            s.positions.push(u32::try_from(pos).ok()?);
            s.slots.push(kv_slot(blocks, pos, bt)?);
            s.tables.push(s.table.len()..s.table.len() + blocks.len());
            s.table.extend_from_slice(blocks);
        }
        Some(s)
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

/// A padded decode batch's per-step inputs, owned (the block tables copied, since the step borrows the sessions
/// mutably while the backend reads these).
#[derive(Default)]
struct StepIndices {
    ids: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    /// Each row's block table, a range of `table`.
    tables: Vec<std::ops::Range<usize>>,
    table: Vec<u32>,
}

impl StepIndices {
    /// The attention's sequences, one row each, as `forward_batch` builds them.
    fn seqs(&self) -> Vec<AttnSeq<'_>> {
        self.tables
            .iter()
            .enumerate()
            .map(|(r, t)| AttnSeq {
                rows: r..r + 1,
                pos0: self.positions[r] as usize,
                block_table: &self.table[t.clone()],
            })
            .collect()
    }
}
