//! The model id: a SHA-256 digest of the architecture configuration, the tensor table (canonical names, shapes,
//! dtypes, byte sizes) and every tensor's own SHA-256 (`tensor_hashes.rs`), so a node whose weights differ in one
//! byte derives another id and cannot join the swarm of the real model (docs/PROTOCOL.md, "Model id"). The tensor
//! digests of a file are computed once and cached; [`ModelId::of_files`] uses that cache, [`ModelId::of`] hashes.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::model::config::ModelConfig;
use crate::model::open::ModelFiles;
use crate::model::source::WeightSource;
use crate::model::tensor_hashes::{self, TensorHashes};

/// Version tag of the canonical encoding; changing the encoding changes the tag. Version 1 covered the
/// configuration and tensor table only.
const DOMAIN: &[u8] = b"shardline/model-id/2";

/// A model id: 32 bytes, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub [u8; 32]);

impl ModelId {
    /// The id of a model, hashing every tensor now (reads all weights). For a model opened from files prefer
    /// [`ModelId::of_files`], which reads the cached tensor digests.
    pub fn of(source: &dyn WeightSource) -> Result<Self> {
        let hashes = tensor_hashes::hash_tensors(source)?;
        Self::from_parts(source, &hashes)
    }

    /// The id of a model opened from files, with the per-tensor digests from the cache beside the file (computed
    /// and cached on first use).
    pub fn of_files(files: &ModelFiles) -> Result<Self> {
        let weights = files.weights();
        let meta = metadata_digest(weights.as_ref());
        let hashes = tensor_hashes::tensor_hashes(files, &meta)?;
        Self::from_parts(weights.as_ref(), &hashes)
    }

    /// The id from the configuration and table of `source` and the given tensor digests, which must name exactly
    /// the tensors of the table (a stale or foreign table is refused).
    pub fn from_parts(source: &dyn WeightSource, hashes: &TensorHashes) -> Result<Self> {
        let mut table = source.tensor_table();
        table.sort_by(|a, b| a.name.cmp(&b.name));
        if table.len() != hashes.len() || table.iter().zip(hashes).any(|(t, (n, _))| &t.name != n) {
            return Err(ModelError::Invalid("the tensor digests do not match the tensor table".into()));
        }
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(metadata_digest(source));
        for (name, digest) in hashes {
            put_str(&mut h, name);
            h.update(digest);
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

/// SHA-256 of the configuration and the tensor table (names, dtypes, shapes, byte sizes): what the id covers
/// besides the weights, and part of the tensor-digest cache key.
pub fn metadata_digest(source: &dyn WeightSource) -> [u8; 32] {
    let mut h = Sha256::new();
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
    h.finalize().into()
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
