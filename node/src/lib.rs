//! shardline node: model formats, tokenizer, and the shard forward pass.

pub mod error;
pub mod formats;
pub mod model;
pub mod test_models;

pub use error::{ModelError, Result};
