use shardline_kernels::RopeConfig;

/// Architecture of a Llama-family model, read from GGUF metadata or a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture name as the file states it (`llama`, `mistral`, ...).
    pub arch: String,
    /// Number of transformer blocks `N`.
    pub n_layers: usize,
    /// Width of the hidden state (`d_model`).
    pub hidden: usize,
    /// Width of the SwiGLU inner layer.
    pub ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Maximum context the model was trained for, in tokens.
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope: RopeConfig,
    /// Per-frequency divisors of the inverse frequencies (GGUF `rope_freqs.weight`, how llama.cpp stores Llama 3
    /// scaling); `None` when the file has none.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// The LM head reuses the token embedding matrix (no `output.weight`).
    pub tied_embeddings: bool,
}
