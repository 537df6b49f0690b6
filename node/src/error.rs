use shardline_kernels::KernelError;

/// Errors of loading and running models. Messages name the file, tensor, type or range at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not a GGUF file (magic {found:?})")]
    BadMagic { path: String, found: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: String, version: u32 },
    #[error("{path} is truncated or corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("unsupported tensor type {type_name} for tensor {tensor}")]
    UnsupportedTensorType { tensor: String, type_name: String },
    #[error("unsupported architecture {0:?} (supported: llama and its family: Llama 2/3, Mistral, SmolLM, TinyLlama)")]
    UnsupportedArchitecture(String),
    #[error("model metadata is missing {0}")]
    MissingMetadata(String),
    #[error("model metadata {key} is invalid: {detail}")]
    BadMetadata { key: String, detail: String },
    #[error("tensor {0} is not in the model")]
    MissingTensor(String),
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("layer range {start}..{end} is not inside the model's 0..{n_layers} layers")]
    LayerRange { start: usize, end: usize, n_layers: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("prompt of {tokens} tokens plus {max_new} new tokens exceeds the context of {context} tokens")]
    ContextOverflow { tokens: usize, max_new: usize, context: usize },
    #[error("KV cache is full: {needed} blocks needed, {free} free")]
    KvCacheFull { needed: usize, free: usize },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

impl From<shardline_proto::SpanError> for ModelError {
    fn from(e: shardline_proto::SpanError) -> Self {
        match e {
            shardline_proto::SpanError::OutOfRange { start, end, n_layers } => {
                ModelError::LayerRange { start, end, n_layers }
            }
            other => ModelError::Invalid(other.to_string()),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
