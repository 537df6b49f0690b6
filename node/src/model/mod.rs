//! Model description and weights: configuration, the weight-source interface over file formats, and shards.

pub mod config;
pub mod source;

pub use config::ModelConfig;
pub use source::{TensorEntry, TensorMeta, WeightSource};
