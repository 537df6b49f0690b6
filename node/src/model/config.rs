use shardline_kernels::{Llama3Scaling, RopeConfig, RopeStyle};

use crate::error::{ModelError, Result};
use crate::formats::gguf::GgufFile;

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

/// Architecture names (GGUF `general.architecture`, Hugging Face `model_type`) with the Llama block layout:
/// RMSNorm, GQA attention with RoPE and no biases, SwiGLU MLP.
pub const LLAMA_FAMILY: [&str; 2] = ["llama", "mistral"];

/// Hugging Face `architectures` entries shardline runs.
pub const HF_ARCHITECTURES: [&str; 2] = ["LlamaForCausalLM", "MistralForCausalLM"];

fn bad(key: &str, detail: impl Into<String>) -> ModelError {
    ModelError::BadMetadata { key: key.to_owned(), detail: detail.into() }
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata (`{arch}.block_count`, `{arch}.embedding_length`, ...), as
    /// llama.cpp writes it. RoPE is [`RopeStyle::Interleaved`] because llama.cpp's converter permutes the Q/K rows;
    /// the embeddings are tied when the file has no `output.weight`; `rope_freqs.weight` (Llama 3 scaling) becomes
    /// [`ModelConfig::rope_freq_factors`].
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.architecture()?.to_owned();
        if !LLAMA_FAMILY.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let k = |name: &str| format!("{arch}.{name}");

        let n_layers = file.get_usize(&k("block_count"))?;
        let hidden = file.get_usize(&k("embedding_length"))?;
        let ffn = file.get_usize(&k("feed_forward_length"))?;
        let n_heads = file.get_usize(&k("attention.head_count"))?;
        let n_kv_heads = file.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(n_heads);
        let head_dim = match file.opt_usize(&k("attention.key_length"))? {
            Some(d) => d,
            None if n_heads > 0 && hidden % n_heads == 0 => hidden / n_heads,
            None => return Err(bad(&k("attention.head_count"), format!("{n_heads} heads do not divide {hidden}"))),
        };
        if let Some(v) = file.opt_usize(&k("attention.value_length"))?
            && v != head_dim
        {
            return Err(bad(&k("attention.value_length"), format!("{v} differs from the key length {head_dim}")));
        }
        let rotary_dim = file.opt_usize(&k("rope.dimension_count"))?.unwrap_or(head_dim);
        let theta = file.opt_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0);
        let rms_eps = file.opt_f32(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5);
        let context_length = file.get_usize(&k("context_length"))?;

        let vocab = match file.opt_usize(&k("vocab_size"))? {
            Some(v) => v,
            None => match file.opt_array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => file
                    .tensor_info("token_embd.weight")
                    .and_then(|t| t.shape().first().copied())
                    .ok_or_else(|| ModelError::MissingMetadata(k("vocab_size")))?,
            },
        };

        let scaling_key = k("rope.scaling.type");
        let linear_factor = match file.opt_str(&scaling_key)? {
            None | Some("none") => match file.opt_f32(&k("rope.scale_linear"))? {
                // Older files record linear scaling as a bare factor.
                Some(f) => 1.0 / f,
                None => 1.0,
            },
            Some("linear") => 1.0 / file.get_f32(&k("rope.scaling.factor"))?,
            Some(other) => return Err(bad(&scaling_key, format!("RoPE scaling {other:?} is not supported"))),
        };

        let rope_freq_factors = match file.tensor_info("rope_freqs.weight") {
            None => None,
            Some(_) => Some(file.tensor_f32("rope_freqs.weight")?),
        };

        ModelConfig {
            arch,
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            context_length,
            rms_eps,
            rope: RopeConfig {
                head_dim,
                rotary_dim,
                theta,
                style: RopeStyle::Interleaved,
                llama3: None,
                linear_factor,
            },
            rope_freq_factors,
            tied_embeddings: file.tensor_info("output.weight").is_none(),
        }
        .validated()
    }

    /// Reads the configuration from a Hugging Face `config.json` of a `LlamaForCausalLM` or `MistralForCausalLM`.
    /// RoPE is [`RopeStyle::Neox`] (Hugging Face keeps Q/K rows unpermuted). Mistral's sliding window is honoured
    /// by capping the context at the window, inside which sliding-window attention equals full causal attention.
    pub fn from_hf_config(json: &serde_json::Value) -> Result<Self> {
        let obj = json.as_object().ok_or_else(|| bad("config.json", "not a JSON object"))?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let usize_of = |key: &str| -> Result<Option<usize>> {
            get(key)
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| usize::try_from(x).ok())
                        .ok_or_else(|| bad(key, format!("{v} is not a count")))
                })
                .transpose()
        };
        let req_usize = |key: &str| usize_of(key)?.ok_or_else(|| ModelError::MissingMetadata(key.to_owned()));
        let f32_of = |key: &str| -> Result<Option<f32>> {
            get(key)
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| bad(key, format!("{v} is not a number"))))
                .transpose()
        };
        let bool_of = |key: &str| -> Result<Option<bool>> {
            get(key).map(|v| v.as_bool().ok_or_else(|| bad(key, format!("{v} is not a bool")))).transpose()
        };

        let model_type = get("model_type").and_then(|v| v.as_str());
        let architectures: Vec<&str> = get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let arch = match (architectures.first(), model_type) {
            (Some(&first), _) if !architectures.iter().any(|a| HF_ARCHITECTURES.contains(a)) => {
                return Err(ModelError::UnsupportedArchitecture(first.to_owned()));
            }
            (_, Some(t)) if !LLAMA_FAMILY.contains(&t) => {
                return Err(ModelError::UnsupportedArchitecture(t.to_owned()));
            }
            (_, Some(t)) => t.to_owned(),
            (Some(a), None) if a.starts_with("Mistral") => "mistral".to_owned(),
            (Some(_), None) => "llama".to_owned(),
            (None, None) => return Err(ModelError::MissingMetadata("architectures or model_type".into())),
        };

        for key in ["attention_bias", "mlp_bias"] {
            if bool_of(key)? == Some(true) {
                return Err(bad(key, "biases are not supported"));
            }
        }
        if let Some(act) = get("hidden_act")
            && act.as_str() != Some("silu")
        {
            return Err(bad("hidden_act", format!("{act} is not supported (silu only)")));
        }

        let hidden = req_usize("hidden_size")?;
        let n_heads = req_usize("num_attention_heads")?;
        let n_kv_heads = usize_of("num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = match usize_of("head_dim")? {
            Some(d) => d,
            None if n_heads > 0 && hidden % n_heads == 0 => hidden / n_heads,
            None => return Err(bad("num_attention_heads", format!("{n_heads} heads do not divide {hidden}"))),
        };
        let theta = f32_of("rope_theta")?.unwrap_or(10_000.0);

        let mut llama3 = None;
        let mut linear_factor = 1.0;
        if let Some(scaling) = get("rope_scaling") {
            let s = scaling.as_object().ok_or_else(|| bad("rope_scaling", "not an object"))?;
            let field = |name: &str| s.get(name).and_then(|v| v.as_f64()).map(|x| x as f32);
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
            let factor = || field("factor").ok_or_else(|| bad("rope_scaling.factor", "missing or not a number"));
            match kind {
                "default" => {}
                "linear" => linear_factor = 1.0 / factor()?,
                "llama3" => {
                    llama3 = Some(Llama3Scaling {
                        factor: factor()?,
                        low_freq_factor: field("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: field("high_freq_factor").unwrap_or(4.0),
                        original_max_position: field("original_max_position_embeddings").unwrap_or(8192.0),
                    })
                }
                other => return Err(bad("rope_scaling", format!("RoPE scaling {other:?} is not supported"))),
            }
        }

        let mut context_length = usize_of("max_position_embeddings")?.unwrap_or(2048);
        if let Some(window) = usize_of("sliding_window")? {
            context_length = context_length.min(window);
        }

        ModelConfig {
            arch,
            n_layers: req_usize("num_hidden_layers")?,
            hidden,
            ffn: req_usize("intermediate_size")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab: req_usize("vocab_size")?,
            context_length,
            rms_eps: f32_of("rms_norm_eps")?.unwrap_or(1e-6),
            rope: RopeConfig { head_dim, rotary_dim: head_dim, theta, style: RopeStyle::Neox, llama3, linear_factor },
            rope_freq_factors: None,
            tied_embeddings: bool_of("tie_word_embeddings")?.unwrap_or(false),
        }
        .validated()
    }

    /// Checks the numbers against each other so that later shape arithmetic cannot divide by zero or overflow.
    fn validated(self) -> Result<Self> {
        let positive = [
            ("block_count", self.n_layers),
            ("embedding_length", self.hidden),
            ("feed_forward_length", self.ffn),
            ("head_count", self.n_heads),
            ("head_count_kv", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab),
            ("context_length", self.context_length),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(bad(key, "must be positive"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(bad(
                "head_count_kv",
                format!("{} KV heads do not divide {} heads", self.n_kv_heads, self.n_heads),
            ));
        }
        let r = &self.rope;
        if r.rotary_dim == 0 || !r.rotary_dim.is_multiple_of(2) || r.rotary_dim > self.head_dim {
            return Err(bad(
                "rope.dimension_count",
                format!("{} rotated of {} dimensions", r.rotary_dim, self.head_dim),
            ));
        }
        let wide = [self.n_heads, self.n_kv_heads].map(|h| h.checked_mul(self.head_dim));
        let products = [wide[0], wide[1], self.vocab.checked_mul(self.hidden), self.ffn.checked_mul(self.hidden)];
        if products.iter().any(Option::is_none) {
            return Err(bad("embedding_length", "tensor sizes overflow"));
        }
        if !(r.theta.is_finite() && r.theta > 0.0) {
            return Err(bad("rope.freq_base", format!("{} is not a positive number", r.theta)));
        }
        if !(r.linear_factor.is_finite() && r.linear_factor > 0.0) {
            return Err(bad("rope.scaling.factor", format!("1/{} is not a positive number", r.linear_factor)));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err(bad("layer_norm_rms_epsilon", format!("{} is not a positive number", self.rms_eps)));
        }
        if let Some(f) = &self.rope_freq_factors
            && (f.len() != r.rotary_dim / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)))
        {
            return Err(bad(
                "rope_freqs.weight",
                format!("{} factors for {} frequencies, all must be positive", f.len(), r.rotary_dim / 2),
            ));
        }
        Ok(self)
    }
}
