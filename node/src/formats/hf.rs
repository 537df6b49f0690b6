//! A Hugging Face model directory: `config.json` plus `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Tensor names are mapped to the canonical (GGUF) ones; Q/K rows stay in the
//! Hugging Face (NeoX RoPE) layout, which [`ModelConfig::rope`](crate::model::ModelConfig) records.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use shardline_kernels::DType;

use crate::error::{ModelError, Result};
use crate::formats::mapped::MappedFile;
use crate::formats::safetensors::SafetensorsFile;
use crate::model::config::ModelConfig;
use crate::model::source::{TensorEntry, TensorMeta, WeightSource};

/// File names inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Whole-model tensors: Hugging Face stem → canonical stem.
const GLOBAL_NAMES: [(&str, &str); 3] =
    [("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output")];

/// Per-layer tensors below `model.layers.{i}.` → below `blk.{i}.` (biases keep their `.bias` suffix).
const LAYER_NAMES: [(&str, &str); 11] = [
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    // Qwen3's per-head norms.
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Splits `stem.weight` / `stem.bias`.
fn split_suffix(name: &str) -> Option<(&str, &str)> {
    ["weight", "bias"].into_iter().find_map(|s| Some((name.strip_suffix(s)?.strip_suffix('.')?, s)))
}

/// Splits `{prefix}{i}.{rest}` into `(i, rest)`.
fn split_layer<'a>(stem: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let (idx, rest) = stem.strip_prefix(prefix)?.split_once('.')?;
    if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) || (idx.len() > 1 && idx.starts_with('0')) {
        return None;
    }
    Some((idx.parse().ok()?, rest))
}

/// The canonical name of a Hugging Face Llama/Qwen tensor name (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`); `None` for names shardline does not use (for example `rotary_emb.inv_freq`).
pub fn hf_to_canonical(name: &str) -> Option<String> {
    translate(name, true)
}

/// The Hugging Face name of a canonical tensor name; the inverse of [`hf_to_canonical`].
pub fn canonical_to_hf(name: &str) -> Option<String> {
    translate(name, false)
}

/// Translates `name` through the `(hf, canonical)` name tables, from Hugging Face to canonical or back.
fn translate(name: &str, to_canonical: bool) -> Option<String> {
    let oriented = |&(h, c): &(&'static str, &'static str)| if to_canonical { (h, c) } else { (c, h) };
    let (from_layers, to_layers) = if to_canonical { ("model.layers.", "blk") } else { ("blk.", "model.layers") };
    let (stem, suffix) = split_suffix(name)?;
    if let Some((_, to)) = GLOBAL_NAMES.iter().map(oriented).find(|(from, _)| *from == stem) {
        return Some(format!("{to}.{suffix}"));
    }
    let (i, rest) = split_layer(stem, from_layers)?;
    let (_, to) = LAYER_NAMES.iter().map(oriented).find(|(from, _)| *from == rest)?;
    Some(format!("{to_layers}.{i}.{to}.{suffix}"))
}

#[derive(Clone, Debug)]
struct HfTensor {
    shard: usize,
    hf_name: String,
    dtype: DType,
    shape: Vec<usize>,
    byte_len: usize,
}

/// A Hugging Face model directory seen as a [`WeightSource`].
#[derive(Debug)]
pub struct HfWeights {
    dir: PathBuf,
    config_json: serde_json::Value,
    config: ModelConfig,
    shards: Vec<SafetensorsFile>,
    /// Canonical name → tensor.
    tensors: BTreeMap<String, HfTensor>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Corrupt { path: path.display().to_string(), detail: format!("invalid JSON: {e}") })
}

/// A shard file name from the index must name a file directly inside the model directory.
fn shard_path(dir: &Path, index: &Path, file: &str) -> Result<PathBuf> {
    let mut components = Path::new(file).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) => Ok(dir.join(file)),
        _ => Err(ModelError::Corrupt {
            path: index.display().to_string(),
            detail: format!("shard {file:?} is not a file name inside the model directory"),
        }),
    }
}

impl HfWeights {
    /// Opens a model directory: reads `config.json`, maps the safetensors file(s) and builds the canonical tensor
    /// table. Fails on a mapped tensor whose dtype is not F32, F16 or BF16.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_json = read_json(&dir.join(CONFIG_FILE))?;
        let mut config = ModelConfig::from_hf_config(&config_json)?;

        // (Hugging Face name, shard index) for every tensor, from the index or from the single file.
        let mut shards = Vec::new();
        let mut located: Vec<(String, usize)> = Vec::new();
        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        if single.exists() || !index_path.exists() {
            let file = SafetensorsFile::open(&single)?;
            located.extend(file.names().map(|n| (n.to_owned(), 0)));
            shards.push(file);
        } else {
            let index = read_json(&index_path)?;
            let weight_map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                ModelError::Corrupt { path: index_path.display().to_string(), detail: "no weight_map object".into() }
            })?;
            let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
            for (name, file) in weight_map {
                let file = file.as_str().ok_or_else(|| ModelError::Corrupt {
                    path: index_path.display().to_string(),
                    detail: format!("weight_map entry {name} is not a file name"),
                })?;
                let shard = match shard_of_file.get(file) {
                    Some(&s) => s,
                    None => {
                        shards.push(SafetensorsFile::open(shard_path(&dir, &index_path, file)?)?);
                        shard_of_file.insert(file, shards.len() - 1);
                        shards.len() - 1
                    }
                };
                if shards[shard].get(name).is_none() {
                    return Err(ModelError::Corrupt {
                        path: shards[shard].path().display().to_string(),
                        detail: format!("tensor {name} listed in {INDEX_FILE} is not in this shard"),
                    });
                }
                located.push((name.clone(), shard));
            }
        }

        let mut tensors = BTreeMap::new();
        for (hf_name, shard) in located {
            let Some(canonical) = hf_to_canonical(&hf_name) else {
                tracing::debug!(tensor = %hf_name, "ignoring a tensor shardline does not use");
                continue;
            };
            // Present in the shard: the single file lists its own names, and index entries were checked above.
            let Some(t) = shards[shard].get(&hf_name) else { continue };
            let dtype = t.dtype_for(&hf_name)?;
            let entry = HfTensor { shard, dtype, shape: t.shape.clone(), byte_len: t.range.len(), hf_name };
            if let Some(prev) = tensors.insert(canonical.clone(), entry) {
                return Err(ModelError::Corrupt {
                    path: dir.display().to_string(),
                    detail: format!("{} and another tensor both map to {canonical}", prev.hf_name),
                });
            }
        }

        // A missing LM head means the embeddings are tied (as llama.cpp does); a tied model exposes no
        // `output.weight` even if the checkpoint stores a copy, since transformers would overwrite it.
        if !tensors.contains_key("output.weight") {
            config.tied_embeddings = true;
        }
        if config.tied_embeddings {
            tensors.remove("output.weight");
        }
        Ok(Self { dir, config_json, config, shards, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config_json
    }

    /// Number of safetensors files mapped.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The Hugging Face name a canonical tensor was read from.
    pub fn hf_name(&self, canonical: &str) -> Option<&str> {
        self.tensors.get(canonical).map(|t| t.hf_name.as_str())
    }
}

impl WeightSource for HfWeights {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor_table(&self) -> Vec<TensorMeta> {
        self.tensors
            .iter()
            .map(|(name, t)| TensorMeta {
                name: name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                byte_len: t.byte_len,
            })
            .collect()
    }

    fn tensor(&self, name: &str) -> Result<TensorEntry> {
        let t = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let bytes = self.shards[t.shard].bytes(&t.hf_name)?;
        Ok(TensorEntry { name: name.to_owned(), dtype: t.dtype, shape: t.shape.clone(), bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
            ("model.layers.12.self_attn.q_proj.weight", "blk.12.attn_q.weight"),
            ("model.layers.3.self_attn.k_proj.weight", "blk.3.attn_k.weight"),
            ("model.layers.3.self_attn.v_proj.weight", "blk.3.attn_v.weight"),
            ("model.layers.3.self_attn.o_proj.weight", "blk.3.attn_output.weight"),
            ("model.layers.7.post_attention_layernorm.weight", "blk.7.ffn_norm.weight"),
            ("model.layers.7.mlp.gate_proj.weight", "blk.7.ffn_gate.weight"),
            ("model.layers.7.mlp.up_proj.weight", "blk.7.ffn_up.weight"),
            ("model.layers.7.mlp.down_proj.weight", "blk.7.ffn_down.weight"),
            ("model.layers.7.self_attn.q_proj.bias", "blk.7.attn_q.bias"),
            ("model.layers.2.self_attn.q_norm.weight", "blk.2.attn_q_norm.weight"),
            ("model.layers.2.self_attn.k_norm.weight", "blk.2.attn_k_norm.weight"),
        ];
        for (hf, canonical) in pairs {
            assert_eq!(hf_to_canonical(hf).as_deref(), Some(canonical), "{hf}");
            assert_eq!(canonical_to_hf(canonical).as_deref(), Some(hf), "{canonical}");
        }
        for unused in [
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.01.mlp.up_proj.weight",
            "model.layers..mlp.up_proj.weight",
            "model.embed_tokens",
            "weight",
        ] {
            assert_eq!(hf_to_canonical(unused), None, "{unused}");
        }
    }
}
