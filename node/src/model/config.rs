use serde::Deserialize;
use serde::de::DeserializeOwned;
use shardline_kernels::{Llama3Scaling, RopeConfig, RopeStyle};

use crate::error::{ModelError, Result};
use crate::formats::gguf::{GgufFile, GgufValue};
use crate::model::arch::Architecture;

/// Architecture and hyper-parameters of a model, read from GGUF metadata or a Hugging Face `config.json` (each
/// through its own serde struct below) and converted once into this runtime form.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture name as the file states it (`llama`, `mistral`, `qwen2`, `qwen3`); the model id hashes it.
    pub arch: String,
    /// The family `arch` belongs to, which decides the block layout (a function of `arch`, so the model id covers
    /// it).
    pub architecture: Architecture,
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

fn bad(key: &str, detail: impl Into<String>) -> ModelError {
    ModelError::BadMetadata { key: key.to_owned(), detail: detail.into() }
}

fn required<T>(key: impl Into<String>, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| ModelError::MissingMetadata(key.into()))
}

/// Deserialises `value` into `T`; a field of the wrong type is a [`ModelError::BadMetadata`] naming the field by its
/// path, prefixed with `prefix` (the GGUF architecture, so the key reads as the file spells it).
fn deserialize<T: DeserializeOwned>(value: serde_json::Value, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| bad(&format!("{prefix}{}", e.path()), e.inner().to_string()))
}

/// `head_dim` when the file does not state it: `hidden / n_heads`, which must divide.
fn derived_head_dim(key: &str, hidden: usize, n_heads: usize) -> Result<usize> {
    if n_heads > 0 && hidden.is_multiple_of(n_heads) {
        Ok(hidden / n_heads)
    } else {
        Err(bad(key, format!("{n_heads} heads do not divide {hidden}")))
    }
}

/// The `{arch}.*` hyper-parameters of a GGUF file as llama.cpp's converter writes them, keys without the prefix.
/// Every field is optional here; which are required, and the defaults, are decided in [`ModelConfig::from_gguf`].
#[derive(Debug, Default, Deserialize)]
struct GgufHparams {
    block_count: Option<usize>,
    context_length: Option<usize>,
    embedding_length: Option<usize>,
    feed_forward_length: Option<usize>,
    vocab_size: Option<usize>,
    #[serde(rename = "attention.head_count")]
    head_count: Option<usize>,
    #[serde(rename = "attention.head_count_kv")]
    head_count_kv: Option<usize>,
    #[serde(rename = "attention.key_length")]
    key_length: Option<usize>,
    #[serde(rename = "attention.value_length")]
    value_length: Option<usize>,
    #[serde(rename = "attention.layer_norm_rms_epsilon")]
    rms_eps: Option<f32>,
    #[serde(rename = "rope.dimension_count")]
    rope_dimension_count: Option<usize>,
    #[serde(rename = "rope.freq_base")]
    rope_freq_base: Option<f32>,
    #[serde(rename = "rope.scaling.type")]
    rope_scaling_type: Option<String>,
    #[serde(rename = "rope.scaling.factor")]
    rope_scaling_factor: Option<f32>,
    /// Older files record linear scaling as a bare factor.
    #[serde(rename = "rope.scale_linear")]
    rope_scale_linear: Option<f32>,
}

/// A GGUF value as JSON, so that serde can read the metadata into [`GgufHparams`]. A non-finite float becomes its
/// text, which no numeric field accepts (JSON has no NaN, and `null` would read as "absent").
fn gguf_to_json(v: &GgufValue) -> serde_json::Value {
    use serde_json::Value;
    let float = |x: f64| serde_json::Number::from_f64(x).map_or_else(|| Value::String(x.to_string()), Value::Number);
    match v {
        GgufValue::F32(x) => float(f64::from(*x)),
        GgufValue::F64(x) => float(*x),
        GgufValue::Bool(b) => Value::Bool(*b),
        GgufValue::String(s) => Value::String(s.clone()),
        GgufValue::Array(_, items) => Value::Array(items.iter().map(gguf_to_json).collect()),
        other => match (other.as_u64(), other.as_i64()) {
            (Some(u), _) => Value::from(u),
            (None, Some(i)) => Value::from(i),
            (None, None) => Value::Null,
        },
    }
}

/// Hugging Face `config.json` of the architectures shardline runs. Llama, Mistral, Qwen2 and Qwen3 share these
/// names; the fields one family alone has are marked. Absent and `null` fields are `None`.
#[derive(Debug, Default, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_attention_heads: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    /// Llama, Qwen3: biases on all four attention projections (Qwen2 always has Q/K/V biases and no such key).
    attention_bias: Option<bool>,
    /// Llama: biases in the MLP.
    mlp_bias: Option<bool>,
    /// Mistral, Qwen2, Qwen3: attention window in tokens.
    sliding_window: Option<usize>,
    /// Qwen2, Qwen3: whether `sliding_window` is used at all.
    use_sliding_window: Option<bool>,
}

/// `config.json` `rope_scaling`; the kind is `rope_type` (newer files) or `type` (older ones).
#[derive(Debug, Default, Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<f32>,
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata (`{arch}.block_count`, `{arch}.embedding_length`, ...), as
    /// llama.cpp writes it. RoPE pairs are [`Architecture::gguf_rope_style`]; the embeddings are tied when the file
    /// has no `output.weight`; `rope_freqs.weight` (Llama 3 scaling) becomes [`ModelConfig::rope_freq_factors`].
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.architecture()?.to_owned();
        let architecture =
            Architecture::from_name(&arch).ok_or_else(|| ModelError::UnsupportedArchitecture(arch.clone()))?;
        let prefix = format!("{arch}.");
        let k = |name: &str| format!("{prefix}{name}");
        let fields: serde_json::Map<String, serde_json::Value> = file
            .metadata()
            .filter_map(|(key, v)| Some((key.strip_prefix(&prefix)?.to_owned(), gguf_to_json(v))))
            .collect();
        let p: GgufHparams = deserialize(serde_json::Value::Object(fields), &prefix)?;

        let n_layers = required(k("block_count"), p.block_count)?;
        let hidden = required(k("embedding_length"), p.embedding_length)?;
        let ffn = required(k("feed_forward_length"), p.feed_forward_length)?;
        let n_heads = required(k("attention.head_count"), p.head_count)?;
        let n_kv_heads = p.head_count_kv.unwrap_or(n_heads);
        let head_dim = match p.key_length {
            Some(d) => d,
            None => derived_head_dim(&k("attention.head_count"), hidden, n_heads)?,
        };
        if let Some(v) = p.value_length
            && v != head_dim
        {
            return Err(bad(&k("attention.value_length"), format!("{v} differs from the key length {head_dim}")));
        }
        let context_length = required(k("context_length"), p.context_length)?;

        let vocab = match p.vocab_size {
            Some(v) => v,
            None => match file.opt_array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => file
                    .tensor_info("token_embd.weight")
                    .and_then(|t| t.shape().first().copied())
                    .ok_or_else(|| ModelError::MissingMetadata(k("vocab_size")))?,
            },
        };

        let linear_factor = match p.rope_scaling_type.as_deref() {
            None | Some("none") => p.rope_scale_linear.map_or(1.0, |f| 1.0 / f),
            Some("linear") => 1.0 / required(k("rope.scaling.factor"), p.rope_scaling_factor)?,
            Some(other) => {
                return Err(bad(&k("rope.scaling.type"), format!("RoPE scaling {other:?} is not supported")));
            }
        };

        let rope_freq_factors = match file.tensor_info("rope_freqs.weight") {
            None => None,
            Some(_) => Some(file.tensor_f32("rope_freqs.weight")?),
        };

        ModelConfig {
            arch,
            architecture,
            n_layers,
            hidden,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            context_length,
            rms_eps: p.rms_eps.unwrap_or(1e-5),
            rope: RopeConfig {
                head_dim,
                rotary_dim: p.rope_dimension_count.unwrap_or(head_dim),
                theta: p.rope_freq_base.unwrap_or(10_000.0),
                style: architecture.gguf_rope_style(),
                llama3: None,
                linear_factor,
            },
            rope_freq_factors,
            tied_embeddings: file.tensor_info("output.weight").is_none(),
        }
        .validated()
    }

    /// Reads the configuration from a Hugging Face `config.json` of a `LlamaForCausalLM`, `MistralForCausalLM`,
    /// `Qwen2ForCausalLM` or `Qwen3ForCausalLM`. RoPE is [`RopeStyle::Neox`] (Hugging Face keeps Q/K rows
    /// unpermuted). A sliding window that the model uses (Mistral's; Qwen's only with `use_sliding_window`) is
    /// honoured by capping the context at the window, inside which sliding-window attention equals full causal
    /// attention.
    pub fn from_hf_config(json: &serde_json::Value) -> Result<Self> {
        if !json.is_object() {
            return Err(bad("config.json", "not a JSON object"));
        }
        let c: HfConfig = deserialize(json.clone(), "")?;

        let architectures = c.architectures.unwrap_or_default();
        let known_class = architectures.iter().find_map(|a| Architecture::model_type_of_hf_class(a));
        let arch = match (architectures.first(), known_class, c.model_type) {
            (Some(first), None, _) => return Err(ModelError::UnsupportedArchitecture(first.clone())),
            (_, _, Some(t)) => t,
            (_, Some(t), None) => t.to_owned(),
            (None, None, None) => return Err(ModelError::MissingMetadata("architectures or model_type".into())),
        };
        let architecture =
            Architecture::from_name(&arch).ok_or_else(|| ModelError::UnsupportedArchitecture(arch.clone()))?;

        match architecture {
            // Qwen2 always has Q/K/V biases (and no output bias); the key is not in its config.
            Architecture::Qwen2 => {}
            Architecture::Llama | Architecture::Qwen3 => {
                if c.attention_bias == Some(true) {
                    return Err(bad("attention_bias", format!("{arch} with attention biases is not supported")));
                }
            }
        }
        if c.mlp_bias == Some(true) {
            return Err(bad("mlp_bias", "MLP biases are not supported"));
        }
        if let Some(act) = c.hidden_act
            && act != "silu"
        {
            return Err(bad("hidden_act", format!("{act:?} is not supported (silu only)")));
        }

        let hidden = required("hidden_size", c.hidden_size)?;
        let n_heads = required("num_attention_heads", c.num_attention_heads)?;
        let head_dim = match c.head_dim {
            Some(d) => d,
            None => derived_head_dim("num_attention_heads", hidden, n_heads)?,
        };

        let mut llama3 = None;
        let mut linear_factor = 1.0;
        if let Some(s) = c.rope_scaling {
            let factor = || required("rope_scaling.factor", s.factor);
            match s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("default") {
                "default" => {}
                "linear" => linear_factor = 1.0 / factor()?,
                "llama3" => {
                    llama3 = Some(Llama3Scaling {
                        factor: factor()?,
                        low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                        original_max_position: s.original_max_position_embeddings.unwrap_or(8192.0),
                    })
                }
                other => return Err(bad("rope_scaling", format!("RoPE scaling {other:?} is not supported"))),
            }
        }

        let mut context_length = c.max_position_embeddings.unwrap_or(2048);
        if let Some(window) = c.sliding_window
            && c.use_sliding_window.unwrap_or(architecture.sliding_window_by_default())
        {
            context_length = context_length.min(window);
        }

        ModelConfig {
            arch,
            architecture,
            n_layers: required("num_hidden_layers", c.num_hidden_layers)?,
            hidden,
            ffn: required("intermediate_size", c.intermediate_size)?,
            n_heads,
            n_kv_heads: c.num_key_value_heads.unwrap_or(n_heads),
            head_dim,
            vocab: required("vocab_size", c.vocab_size)?,
            context_length,
            rms_eps: c.rms_norm_eps.unwrap_or(1e-6),
            rope: RopeConfig {
                head_dim,
                rotary_dim: head_dim,
                theta: c.rope_theta.unwrap_or(10_000.0),
                style: RopeStyle::Neox,
                llama3,
                linear_factor,
            },
            rope_freq_factors: None,
            tied_embeddings: c.tie_word_embeddings.unwrap_or(false),
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
