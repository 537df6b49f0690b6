//! shardline node: model formats, tokenizer, and the shard forward pass.

pub mod error;
pub mod model;

pub use error::{ModelError, Result};
