//! The model id: a SHA-256 digest of the architecture configuration and the tensor table (canonical names,
//! shapes, dtypes, byte sizes), so every node serving a shard of the same file derives the same id at start-up
//! without reading gigabytes of weights. Hashing the weight bytes as well is an option for operators who want ids
//! that distinguish fine-tunes with identical tables.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::model::config::ModelConfig;
use crate::model::source::WeightSource;

/// Version tag of the canonical encoding; changing the encoding changes the tag.
const DOMAIN: &[u8] = b"shardline/model-id/1";

/// A model id: 32 bytes, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub [u8; 32]);

/// Whether [`ModelId::compute`] also hashes the weight bytes (reads the whole model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IdScope {
    /// Configuration and tensor table only (the default, instant).
    #[default]
    Metadata,
    /// Also every tensor's bytes, in table order.
    WithWeights,
}

impl ModelId {
    /// The id of a model's configuration and tensor table.
    pub fn of(source: &dyn WeightSource) -> Result<Self> {
        Self::compute(source, IdScope::Metadata)
    }

    pub fn compute(source: &dyn WeightSource, scope: IdScope) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update([matches!(scope, IdScope::WithWeights) as u8]);
        hash_config(&mut h, source.config());
        let mut table = source.tensor_table();
        table.sort_by(|a, b| a.name.cmp(&b.name));
        put_u64(&mut h, table.len() as u64);
        for t in &table {
            put_str(&mut h, &t.name);
            put_str(&mut h, t.dtype.name());
            put_u64(&mut h, t.shape.len() as u64);
            for &d in &t.shape {
                put_u64(&mut h, d as u64);
            }
            put_u64(&mut h, t.byte_len as u64);
        }
        if scope == IdScope::WithWeights {
            for t in &table {
                let entry = source.tensor(&t.name)?;
                h.update(entry.bytes.as_slice());
            }
        }
        Ok(ModelId(h.finalize().into()))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// All 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 16 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

fn put_u64(h: &mut Sha256, v: u64) {
    h.update(v.to_le_bytes());
}

fn put_f32(h: &mut Sha256, v: f32) {
    h.update(v.to_bits().to_le_bytes());
}

fn put_str(h: &mut Sha256, s: &str) {
    put_u64(h, s.len() as u64);
    h.update(s.as_bytes());
}

/// Every field of the configuration in a fixed order with fixed-width encodings (floats by their bits).
fn hash_config(h: &mut Sha256, c: &ModelConfig) {
    put_str(h, &c.arch);
    for v in [c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab, c.context_length] {
        put_u64(h, v as u64);
    }
    put_f32(h, c.rms_eps);
    let r = &c.rope;
    put_u64(h, r.head_dim as u64);
    put_u64(h, r.rotary_dim as u64);
    put_f32(h, r.theta);
    put_str(h, &format!("{:?}", r.style));
    match r.llama3 {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            for v in [s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position] {
                put_f32(h, v);
            }
        }
    }
    put_f32(h, r.linear_factor);
    match &c.rope_freq_factors {
        None => h.update([0u8]),
        Some(f) => {
            h.update([1u8]);
            put_u64(h, f.len() as u64);
            f.iter().for_each(|&x| put_f32(h, x));
        }
    }
    h.update([c.tied_embeddings as u8]);
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({})", self.short())
    }
}

impl FromStr for ModelId {
    type Err = ModelError;

    /// Parses the 64 hex digits of [`ModelId::to_hex`].
    fn from_str(s: &str) -> Result<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| ModelError::Invalid(format!("model id {s:?}: {e}")))?;
        Ok(ModelId(out))
    }
}

impl serde::Serialize for ModelId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ModelId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
