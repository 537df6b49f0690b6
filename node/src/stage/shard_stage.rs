//! The model side of a stage: a [`Shard`] checked against opens, reserving KV cache, and running compute batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::core::{ComputeBatch, ComputeItem, ComputeOutput, ComputeResult, Failure, Sample, StageCompute, StageModel};
use crate::error::ModelError;
use crate::model::{Shard, ShardInput, ShardKv, ShardOutput};
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
}

impl ShardStage {
    pub fn new(shard: Arc<Shard>, model_id: String) -> Self {
        Self { shard, model_id, tampered: Arc::new(AtomicBool::new(false)) }
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

    /// Runs one item through its span; `kv` holds `item.start` positions before and `start + n` after.
    fn run(&self, item: &mut ComputeItem<ShardKv>) -> Result<ComputeOutput, ModelError> {
        let shard = &self.shard;
        let backend = shard.backend().clone();
        let wire = item.wire_dtype;
        let tampered = self.tampered.load(Ordering::Relaxed);
        let out = match &item.input {
            StageData::Tokens(t) if tampered => {
                let vocab = shard.config().vocab.max(1) as u32;
                let shifted: Vec<u32> = t.iter().map(|&x| (x + 1) % vocab).collect();
                shard.forward_span(&mut item.kv, ShardInput::Tokens(&shifted), item.span)?
            }
            StageData::Tokens(t) => shard.forward_span(&mut item.kv, ShardInput::Tokens(t), item.span)?,
            StageData::Hidden(h) if tampered => {
                let mut v = backend.upload_raw(&[h.n_tokens(), h.width()], compute_dtype(wire), h.as_bytes())?;
                let mut host = backend.download_f32(&v)?;
                host.iter_mut().for_each(|x| *x += 0.5);
                v = backend.upload_f32(&[h.n_tokens(), h.width()], &host)?;
                shard.forward_span(&mut item.kv, ShardInput::Hidden(&v), item.span)?
            }
            StageData::Hidden(h) => {
                let x = backend.upload_raw(&[h.n_tokens(), h.width()], compute_dtype(wire), h.as_bytes())?;
                shard.forward_span(&mut item.kv, ShardInput::Hidden(&x), item.span)?
            }
        };
        Ok(match (out, item.sample) {
            (ShardOutput::Hidden(t), _) => {
                let rows = t.rows();
                let bytes = backend.download_raw(&t, compute_dtype(wire))?;
                let hidden = HiddenStates::from_bytes(wire, rows, shard.config().hidden, &bytes)
                    .map_err(|e| ModelError::Invalid(e.to_string()))?;
                ComputeOutput::Hidden(hidden)
            }
            (ShardOutput::Logits(l), Some(Sample { params, n_top })) => {
                let s = shard.sample(&l, &params, item.kv.len() as u64, n_top)?;
                ComputeOutput::Token(TokenResult { token: s.token, logprob: s.logprob, top: s.top })
            }
            (ShardOutput::Logits(_), None) => ComputeOutput::Nothing,
        })
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
    /// Runs the items one after another (`Shard` has no batched forward yet).
    fn compute(&self, batch: ComputeBatch<ShardKv>) -> Vec<ComputeResult<ShardKv>> {
        batch
            .items
            .into_iter()
            .map(|mut item| {
                let output = self.run(&mut item).map_err(|e| match e {
                    ModelError::ContextOverflow { .. } => Failure::new(ErrorCode::BadRequest, e.to_string()),
                    other => Failure::new(ErrorCode::Compute, other.to_string()),
                });
                item.finish(output)
            })
            .collect()
    }
}
