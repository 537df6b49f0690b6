use shardline_kernels::{DType, HostBytes};

use crate::error::Result;
use crate::model::config::ModelConfig;

/// One weight tensor as stored: dtype, row-major shape (`[out_features, in_features]` for matrices, the GGUF `ne`
/// order reversed) and its bytes, borrowed from the memory-mapped file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: HostBytes,
}

/// Name, dtype, shape and byte size of a tensor, without touching its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub byte_len: usize,
}

/// A model file (GGUF) or directory (Hugging Face safetensors) seen through canonical tensor names
/// (the GGUF ones: `token_embd.weight`, `blk.{i}.attn_q.weight`, `output_norm.weight`, `output.weight`, ...).
/// Looking a tensor up maps nothing: only the bytes a caller reads become resident.
pub trait WeightSource: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// The tensor table in canonical names, sorted by name.
    fn tensor_table(&self) -> Vec<TensorMeta>;
    fn tensor(&self, name: &str) -> Result<TensorEntry>;
}
