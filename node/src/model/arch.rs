//! The architectures shardline runs, each described by how its transformer block differs from Llama's. There is one
//! forward pass ([`Shard`](crate::model::Shard)); an architecture only says which extra tensors a block holds and how
//! its files lay out the rotary pairs.
//!
//! | architecture | files say | block beyond Llama's | RoPE pairs in GGUF |
//! | --- | --- | --- | --- |
//! | Llama | `llama`, `mistral` (`LlamaForCausalLM`, `MistralForCausalLM`) | nothing | interleaved |
//! | Qwen2 | `qwen2` (`Qwen2ForCausalLM`; Qwen2 and Qwen2.5) | biases on the Q, K and V projections | halves (NeoX) |
//! | Qwen3 | `qwen3` (`Qwen3ForCausalLM`) | RMSNorm of each Q and K head before RoPE | halves (NeoX) |

use std::fmt;

use shardline_kernels::RopeStyle;

/// A family of models sharing one block layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

/// The optional parts of a block. Every block has the Llama core: RMSNorm, grouped-query attention with RoPE,
/// RMSNorm, SwiGLU MLP, two residual adds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockLayout {
    /// The Q, K and V projections add a bias (`blk.{i}.attn_{q,k,v}.bias`, of widths `n_heads·head_dim`,
    /// `n_kv_heads·head_dim`, `n_kv_heads·head_dim`).
    pub qkv_bias: bool,
    /// Each head of Q and of K is RMS-normalised over its `head_dim` values, with the weights
    /// `blk.{i}.attn_q_norm.weight` / `attn_k_norm.weight` (`head_dim` each, shared by the heads), before RoPE.
    pub qk_norm: bool,
}

/// Names a GGUF file (`general.architecture`) or a `config.json` (`model_type`) gives each family.
const NAMES: [(&str, Architecture); 4] = [
    ("llama", Architecture::Llama),
    ("mistral", Architecture::Llama),
    ("qwen2", Architecture::Qwen2),
    ("qwen3", Architecture::Qwen3),
];

/// Hugging Face `architectures` classes with the `model_type` each implies.
const HF_CLASSES: [(&str, &str); 4] = [
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"),
];

impl Architecture {
    /// The family of an architecture name as GGUF (`general.architecture`) or `config.json` (`model_type`) spell it.
    pub fn from_name(name: &str) -> Option<Self> {
        NAMES.iter().find(|(n, _)| *n == name).map(|&(_, a)| a)
    }

    /// The `model_type` a Hugging Face model class implies (`Qwen2ForCausalLM` → `qwen2`).
    pub fn model_type_of_hf_class(class: &str) -> Option<&'static str> {
        HF_CLASSES.iter().find(|(c, _)| *c == class).map(|&(_, t)| t)
    }

    /// Every architecture name shardline accepts, for error messages.
    pub fn supported_names() -> impl Iterator<Item = &'static str> {
        NAMES.iter().map(|(n, _)| *n)
    }

    pub const fn layout(self) -> BlockLayout {
        match self {
            Architecture::Llama => BlockLayout { qkv_bias: false, qk_norm: false },
            Architecture::Qwen2 => BlockLayout { qkv_bias: true, qk_norm: false },
            Architecture::Qwen3 => BlockLayout { qkv_bias: false, qk_norm: true },
        }
    }

    /// How a GGUF file of this family pairs the dimensions RoPE rotates. llama.cpp's converter permutes the Q/K rows
    /// of Llama models into adjacent pairs (its "normal" RoPE); Qwen models keep Hugging Face's halves (its NeoX
    /// RoPE). Hugging Face files always use halves.
    pub const fn gguf_rope_style(self) -> RopeStyle {
        match self {
            Architecture::Llama => RopeStyle::Interleaved,
            Architecture::Qwen2 | Architecture::Qwen3 => RopeStyle::Neox,
        }
    }

    /// Whether `config.json` applies `sliding_window` when it does not say `use_sliding_window`: Mistral does,
    /// Qwen's configs carry a window they do not use unless `use_sliding_window` is true.
    pub const fn sliding_window_by_default(self) -> bool {
        matches!(self, Architecture::Llama)
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_layouts() {
        assert_eq!(Architecture::from_name("mistral"), Some(Architecture::Llama));
        assert_eq!(Architecture::from_name("qwen2"), Some(Architecture::Qwen2));
        assert_eq!(Architecture::from_name("qwen2moe"), None);
        assert_eq!(Architecture::model_type_of_hf_class("Qwen3ForCausalLM"), Some("qwen3"));
        assert_eq!(Architecture::model_type_of_hf_class("Qwen3MoeForCausalLM"), None);
        assert_eq!(Architecture::Llama.layout(), BlockLayout::default());
        assert!(Architecture::Qwen2.layout().qkv_bias && !Architecture::Qwen2.layout().qk_norm);
        assert!(Architecture::Qwen3.layout().qk_norm && !Architecture::Qwen3.layout().qkv_bias);
        for (name, arch) in NAMES {
            assert_eq!(Architecture::from_name(&arch.to_string()), Some(arch), "{name}");
        }
    }
}
