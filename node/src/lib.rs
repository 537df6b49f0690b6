//! shardline node: model formats, tokenizer, and the shard forward pass.

pub mod announce;
pub mod dht;
pub mod error;
pub mod formats;
pub mod model;
pub mod test_models;
pub mod tls;
pub mod tokenizer;
pub mod wire;

pub use error::{ModelError, Result};
