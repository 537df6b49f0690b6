//! shardline node: model formats, tokenizer, and the shard forward pass.

pub mod announce;
pub mod default_model;
pub mod dht;
pub mod engine;
pub mod error;
pub mod formats;
pub mod generate;
pub mod model;
pub mod stage;
pub mod test_models;
pub mod tls;
pub mod tokenizer;
pub mod wire;

pub use error::{ModelError, Result};
