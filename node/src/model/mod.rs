//! Model description and weights: configuration, the weight-source interface over file formats, and shards.

pub mod config;
pub mod kv_cache;
pub mod layers;
pub mod shard;
pub mod source;

pub use config::ModelConfig;
pub use layers::LayerRange;
pub use shard::{Shard, ShardInput, ShardOptions, ShardOutput, ShardSession};
pub use source::{TensorEntry, TensorMeta, WeightSource};
