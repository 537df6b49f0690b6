//! Compute requests as they leave the core: a batch of chunks from many sessions, each with its positions, its input
//! and its KV handle, picked by the scheduler (`schedule.rs`). `ShardStage` runs it as one forward over the
//! concatenated rows (`Shard::forward_batch`); every item comes back as a [`ComputeResult`], in any order.

use shardline_kernels::SamplingParams;

use crate::model::LayerRange;
use shardline_proto::wire::{ErrorCode, HiddenStates, SessionId, StageData, TokenResult, WireDType};

/// Every session's next ready chunk at one moment. At most one item per session, so items of one batch never depend
/// on each other and may be merged into one forward (rows `start..start + n` of each session's sequence).
#[derive(Debug)]
pub struct ComputeBatch<K> {
    pub items: Vec<ComputeItem<K>>,
}

impl<K> ComputeBatch<K> {
    /// Positions (rows) over all items: what a batched forward multiplies at once.
    pub fn rows(&self) -> usize {
        self.items.iter().map(ComputeItem::n_positions).sum()
    }
}

/// One session's chunk: positions `start..start + n_positions()` through the layers `span`.
#[derive(Debug)]
pub struct ComputeItem<K> {
    pub session: SessionId,
    /// Position of the first row; the KV handle holds exactly `start` positions before this chunk runs.
    pub start: u64,
    /// Token ids (the stage runs the model's first layer) or hidden states `[n, width]` in `wire_dtype`.
    pub input: StageData,
    /// Layers to run for this session (inside the shard; sessions may use different spans of one shard).
    pub span: LayerRange,
    /// Sample a token from the last row's logits afterwards, when the span ends at the model's head (`None` on
    /// prefill chunks but the last).
    pub sample: Option<Sample>,
    /// Element type of the hidden states to return when the span does not end at the head.
    pub wire_dtype: WireDType,
    /// The session's KV cache, lent for this chunk and returned in the result.
    pub kv: K,
}

impl<K> ComputeItem<K> {
    pub fn n_positions(&self) -> usize {
        self.input.n_tokens()
    }

    /// The result for this item, handing its KV handle back.
    pub fn finish(self, output: Result<ComputeOutput, Failure>) -> ComputeResult<K> {
        ComputeResult { session: self.session, kv: self.kv, output }
    }
}

/// How to draw the token after the chunk.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub params: SamplingParams,
    /// Alternatives returned with their log-probabilities (0 = none).
    pub n_top: usize,
}

/// What one chunk produced.
#[derive(Debug)]
pub enum ComputeOutput {
    /// Hidden states for the next stage, one row per position of the chunk.
    Hidden(HiddenStates),
    /// The drawn token (last stage, when the item asked for a sample).
    Token(TokenResult),
    /// A last-stage prefill chunk that did not ask for a sample.
    Nothing,
}

/// One item back from compute, with its KV handle (whose positions now include the chunk's on success).
#[derive(Debug)]
pub struct ComputeResult<K> {
    pub session: SessionId,
    pub kv: K,
    pub output: Result<ComputeOutput, Failure>,
}

/// Why a session (or one request) failed, as the owner will read it in an `Error` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}
