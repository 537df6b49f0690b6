//! The model side of a stage: a [`Shard`] checked against opens, reserving KV cache, and running compute batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::core::{ComputeBatch, ComputeItem, ComputeOutput, ComputeResult, Failure, Sample, StageCompute, StageModel};
use crate::error::ModelError;
use crate::model::{BatchItem, HeadRows, Shard, ShardInput, ShardKv, ShardOutput};
use crate::wire_convert::compute_dtype;
use shardline_proto::wire::{ErrorCode, HiddenStates, SessionOpen, StageData, TokenResult};

/// One shard serving model `model_id` (the digest owners name in `Open`).
pub struct ShardStage {
    shard: Arc<Shard>,
    model_id: String,
    /// Test-only fault injection (switched through `StageServer::tamper` with the `test-support` feature): the
    /// stage then computes as if its weights were tampered with — token ids are shifted by one before the
    /// embedding, hidden states entering it get 0.5 added — so trust checks can be tested against real processes.
    tampered: Arc<AtomicBool>,
    /// Test-only fault injection (`StageServer::poison_logits`): every third logit of the last stage becomes NaN
    /// before sampling, as a broken forward or a malicious node's would, so the refusal and its blame can be tested.
    poisoned: Arc<AtomicBool>,
}

impl ShardStage {
    pub fn new(shard: Arc<Shard>, model_id: String) -> Self {
        Self { shard, model_id, tampered: Arc::new(AtomicBool::new(false)), poisoned: Arc::new(AtomicBool::new(false)) }
    }

    /// The logit-poisoning switch (see the field).
    pub fn poison_switch(&self) -> &Arc<AtomicBool> {
        &self.poisoned
    }

    /// The fault-injection switch (see the field).
    pub fn tamper_switch(&self) -> &Arc<AtomicBool> {
        &self.tampered
    }

    pub fn shard(&self) -> &Arc<Shard> {
        &self.shard
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Turns the items' shard outputs into what the core sends on; each `kv` already holds its item's positions.
    /// The draws of every item that samples are made together ([`Shard::sample_many`]), each as it would be alone.
    fn outputs(
        &self,
        items: &[ComputeItem<ShardKv>],
        outs: Vec<ShardOutput>,
    ) -> Vec<Result<ComputeOutput, ModelError>> {
        let shard = &self.shard;
        let n_layers = shard.config().n_layers;
        let mut results: Vec<Option<Result<ComputeOutput, ModelError>>> = Vec::with_capacity(items.len());
        // Logits to draw from: the item's index, its logits and its draw.
        let mut draws: Vec<(usize, shardline_kernels::Tensor, Sample)> = Vec::new();
        for (i, (item, out)) in items.iter().zip(outs).enumerate() {
            let at_head = item.span.end == n_layers;
            results.push(match (out, item.sample) {
                (ShardOutput::Hidden(_), _) if at_head => Some(Ok(ComputeOutput::Nothing)),
                (ShardOutput::Hidden(t), _) => Some(self.hidden(item, &t)),
                (ShardOutput::Logits(l), Some(sample)) => {
                    // Non-finite logits are refused by the sampler (`KernelError::NonFiniteLogits`): this stage then
                    // fails the session with `Compute` and the owner blames this stage (docs/SECURITY.md).
                    match if self.poisoned.load(Ordering::Relaxed) { self.poison(&l) } else { Ok(l) } {
                        Ok(l) => {
                            draws.push((i, l, sample));
                            None
                        }
                        Err(e) => Some(Err(e)),
                    }
                }
                (ShardOutput::Logits(_), None) => Some(Ok(ComputeOutput::Nothing)),
            });
        }
        let args: Vec<_> = draws.iter().map(|(i, l, s)| (l, s.params, items[*i].kv.len() as u64, s.n_top)).collect();
        let sampled = shard.sample_many(&args);
        for ((i, l, _), s) in draws.into_iter().zip(sampled) {
            results[i] =
                Some(s.map(|s| ComputeOutput::Token(TokenResult { token: s.token, logprob: s.logprob, top: s.top })));
            shard.recycle_logits(l);
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(ModelError::Invalid("no output".into())))).collect()
    }

    /// An item's hidden states as the next stage takes them.
    fn hidden(&self, item: &ComputeItem<ShardKv>, t: &shardline_kernels::Tensor) -> Result<ComputeOutput, ModelError> {
        let wire = item.wire_dtype;
        let bytes = self.shard.backend().download_raw(t, compute_dtype(wire))?;
        let hidden = HiddenStates::from_bytes(wire, t.rows(), self.shard.config().hidden, &bytes)
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
        Ok(ComputeOutput::Hidden(hidden))
    }

    /// The fault injection of [`ShardStage::poison_switch`]: every third logit set to NaN.
    fn poison(&self, logits: &shardline_kernels::Tensor) -> Result<shardline_kernels::Tensor, ModelError> {
        let backend = self.shard.backend();
        let mut host = backend.download_f32(logits)?;
        host.iter_mut().step_by(3).for_each(|v| *v = f32::NAN);
        Ok(backend.upload_f32(logits.shape(), &host)?)
    }

    /// Runs items that share one span as one batched forward (`Shard::forward_batch`): one set of matmuls over all
    /// their rows, one attention call. Each session's rows come out as they would alone (see `forward_batch`).
    /// The outer error is a refused forward (no session's KV cache changed); the inner ones are each item's own
    /// (a refused draw, say), after its positions were computed, so that item alone fails and is not run again.
    fn run_group(
        &self,
        items: &mut [ComputeItem<ShardKv>],
    ) -> Result<Vec<Result<ComputeOutput, ModelError>>, ModelError> {
        let Some(span) = items.first().map(|i| i.span) else { return Ok(Vec::new()) };
        let backend = self.shard.backend().clone();
        let tampered = self.tampered.load(Ordering::Relaxed);
        let uploaded = items
            .iter()
            .map(|i| match &i.input {
                StageData::Tokens(_) => Ok(None),
                StageData::Hidden(h) => {
                    let x =
                        backend.upload_raw(&[h.n_tokens(), h.width()], compute_dtype(i.wire_dtype), h.as_bytes())?;
                    if !tampered {
                        return Ok(Some(x));
                    }
                    let mut host = backend.download_f32(&x)?;
                    host.iter_mut().for_each(|v| *v += 0.5);
                    backend.upload_f32(&[h.n_tokens(), h.width()], &host).map(Some)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab = self.shard.config().vocab.max(1) as u32;
        let shifted: Vec<Option<Vec<u32>>> = items
            .iter()
            .map(|i| match &i.input {
                StageData::Tokens(t) if tampered => Some(t.iter().map(|&x| (x + 1) % vocab).collect()),
                _ => None,
            })
            .collect();
        let outs = {
            let mut batch: Vec<BatchItem<'_>> = items
                .iter_mut()
                .zip(&uploaded)
                .zip(&shifted)
                .map(|((ComputeItem { kv, input, sample, .. }, x), shifted)| {
                    let input = match (x, &*input) {
                        (Some(x), _) => ShardInput::Hidden(x),
                        (None, StageData::Tokens(_)) if shifted.is_some() => {
                            ShardInput::Tokens(shifted.as_deref().unwrap_or(&[]))
                        }
                        (None, StageData::Tokens(t)) => ShardInput::Tokens(t),
                        // Every hidden-state input was uploaded above; were one not, the forward would refuse
                        // the empty item with an error.
                        (None, StageData::Hidden(_)) => ShardInput::Tokens(&[]),
                    };
                    let head = if sample.is_some() { HeadRows::Last } else { HeadRows::None };
                    BatchItem { kv, input, head }
                })
                .collect();
            // Decode batches go through the backend's CUDA graph per batch-size bucket (model/shard/graph_step.rs).
            self.shard.forward_batch_stepped(&mut batch, span)?
        };
        Ok(self.outputs(items, outs))
    }

    /// Runs one item alone (after its batch was refused, so each item gets its own error).
    fn run_one(&self, item: &mut ComputeItem<ShardKv>) -> Result<ComputeOutput, ModelError> {
        let mut out = self.run_group(std::slice::from_mut(item))?;
        out.pop().ok_or_else(|| ModelError::Invalid("no output".into()))?
    }
}

fn failure(e: ModelError) -> Failure {
    match e {
        ModelError::ContextOverflow { .. } => Failure::new(ErrorCode::BadRequest, e.to_string()),
        other => Failure::new(ErrorCode::Compute, other.to_string()),
    }
}

impl StageModel for ShardStage {
    type Kv = ShardKv;

    fn check_open(&self, open: &SessionOpen) -> Result<(), String> {
        let c = self.shard.config();
        if open.model_id != self.model_id {
            return Err(format!("this stage serves model {}, not {}", self.model_id, open.model_id));
        }
        if open.n_layers as usize != c.n_layers || open.hidden as usize != c.hidden {
            return Err(format!(
                "model shape {} layers x {} does not match {} x {}",
                open.n_layers, open.hidden, c.n_layers, c.hidden
            ));
        }
        let l = self.shard.layers();
        if open.span.start < l.start || open.span.end > l.end {
            return Err(format!("span {} is not inside this stage's layers {l}", open.span));
        }
        if open.max_tokens == 0 || open.max_tokens as usize > c.context_length {
            return Err(format!("max_tokens {} outside 1..={}", open.max_tokens, c.context_length));
        }
        Ok(())
    }

    fn reserve(&self, max_tokens: usize) -> Result<ShardKv, Failure> {
        self.shard.open_session(max_tokens).map_err(|e| match e {
            ModelError::KvCacheFull { .. } => Failure::new(ErrorCode::Busy, e.to_string()),
            other => Failure::new(ErrorCode::BadRequest, other.to_string()),
        })
    }
}

impl StageCompute for ShardStage {
    /// Runs the batch as one forward per span (normally one: every session of a stage uses the same span). When a
    /// forward refuses its items (one asked for more positions than it reserved, say), they run one by one so only
    /// the faulty one fails; a refused forward has changed no session's KV cache.
    fn compute(&self, batch: ComputeBatch<ShardKv>) -> Vec<ComputeResult<ShardKv>> {
        let mut groups: Vec<Vec<ComputeItem<ShardKv>>> = Vec::new();
        for item in batch.items {
            match groups.iter_mut().find(|g| g[0].span == item.span) {
                Some(g) => g.push(item),
                None => groups.push(vec![item]),
            }
        }
        let mut results = Vec::new();
        for mut group in groups {
            match self.run_group(&mut group) {
                Ok(outs) => results.extend(group.into_iter().zip(outs).map(|(i, o)| i.finish(o.map_err(failure)))),
                Err(e) if group.len() == 1 => {
                    let f = failure(e);
                    results.extend(group.into_iter().map(|i| i.finish(Err(f.clone()))));
                }
                Err(_) => {
                    for mut item in group {
                        let out = self.run_one(&mut item).map_err(failure);
                        results.push(item.finish(out));
                    }
                }
            }
        }
        results
    }
}
