//! shardline node: model formats, tokenizer, and the shard forward pass.

pub mod announcer;
pub mod batched;
pub mod default_model;
pub mod engine;
pub mod error;
pub mod formats;
pub mod generate;
pub mod model;
pub mod stage;
/// Tiny random models and the default-model lookup for tests and benches; not part of the shipped library.
#[cfg(feature = "test-support")]
pub mod test_models;
pub mod tokenizer;
pub mod wire_convert;

pub use error::{ModelError, Result};
