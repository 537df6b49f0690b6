//! Model description and weights: configuration, the weight-source interface over file formats, and shards.

pub mod config;
pub mod id;
pub mod kv_cache;
pub mod open;
pub mod shard;
pub mod source;

pub use config::ModelConfig;
pub use id::{IdScope, ModelId};
pub use open::{ModelFiles, open_model};
pub use shard::{Shard, ShardInput, ShardOptions, ShardOutput, ShardSession};
pub use shardline_proto::LayerRange;
pub use source::{TensorEntry, TensorMeta, WeightSource};
