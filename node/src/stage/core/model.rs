//! The model side as the core sees it: check an `Open`, reserve KV cache. Running a batch is the driver's business
//! ([`StageCompute`]); the core only builds it.

use std::sync::Arc;

use super::batch::{ComputeBatch, ComputeResult, Failure};
use shardline_proto::wire::SessionOpen;

/// What the core needs from the shard to admit a session. Tests use a fake; the server uses
/// [`crate::stage::ShardStage`].
pub trait StageModel {
    /// A session's KV cache reservation. Dropping it frees the cache, so the core frees it by dropping the session.
    type Kv: Send + 'static;

    /// Whether this stage can serve `open` at all (model, shape, span, `max_tokens`); the message goes to the owner
    /// with `BadRequest`.
    fn check_open(&self, open: &SessionOpen) -> Result<(), String>;

    /// Reserves KV cache for `max_tokens` positions (`Busy` when the cache is full).
    fn reserve(&self, max_tokens: usize) -> Result<Self::Kv, Failure>;
}

/// Runs compute batches; used by drivers, never by the core.
pub trait StageCompute: StageModel {
    /// Runs every item and returns one result per item, each with its KV handle. Blocks for the whole forward.
    fn compute(&self, batch: ComputeBatch<Self::Kv>) -> Vec<ComputeResult<Self::Kv>>;
}

/// A shared model (drivers hand the core one `Arc` and run compute with another).
impl<T: StageModel + ?Sized> StageModel for Arc<T> {
    type Kv = T::Kv;

    fn check_open(&self, open: &SessionOpen) -> Result<(), String> {
        (**self).check_open(open)
    }

    fn reserve(&self, max_tokens: usize) -> Result<T::Kv, Failure> {
        (**self).reserve(max_tokens)
    }
}

impl<T: StageCompute + ?Sized> StageCompute for Arc<T> {
    fn compute(&self, batch: ComputeBatch<T::Kv>) -> Vec<ComputeResult<T::Kv>> {
        (**self).compute(batch)
    }
}
