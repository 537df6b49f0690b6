//! Model description and weights: configuration, the weight-source interface over file formats, and shards.

pub mod arch;
pub mod config;
pub mod id;
pub mod kv_cache;
pub mod open;
pub mod shard;
pub mod source;
pub mod tensor_hashes;

pub use arch::{Architecture, BlockLayout};
pub use config::ModelConfig;
pub use id::ModelId;
pub use open::{ModelFiles, display_name, open_model};
pub use shard::{BatchItem, HeadRows, Shard, ShardInput, ShardKv, ShardOptions, ShardOutput};
pub use shardline_proto::LayerRange;
pub use source::{TensorEntry, TensorMeta, WeightSource};
