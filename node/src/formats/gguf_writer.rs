//! Writes GGUF files (version 3 by default, or 2): metadata, tensor table, and tensor data padded to the alignment.
//! Used to build test models and fixtures; it checks what it is given so that it never writes a file the reader
//! would refuse.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use shardline_kernels::DType;

use crate::error::{ModelError, Result};
use crate::formats::gguf::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GgmlType, GgufValue, MAX_DIMS};

struct PendingTensor {
    name: String,
    ggml_type: GgmlType,
    ne: Vec<u64>,
    data: Vec<u8>,
}

/// Builds a GGUF image in memory and writes it out.
pub struct GgufWriter {
    version: u32,
    alignment: usize,
    metadata: Vec<(String, GgufValue)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// A version-3 writer with the default alignment of 32 bytes.
    pub fn new() -> Self {
        Self {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// Writes a version-2 file instead (the layout is the same; only the version field differs).
    pub fn version(mut self, version: u32) -> Result<Self> {
        if version != 2 && version != 3 {
            return Err(ModelError::Invalid(format!("GGUF version {version} cannot be written (2 or 3)")));
        }
        self.version = version;
        Ok(self)
    }

    /// Aligns tensor data to `alignment` bytes (a power of two) and records it as `general.alignment` when it is
    /// not the default.
    pub fn alignment(mut self, alignment: usize) -> Result<Self> {
        if !alignment.is_power_of_two() || u32::try_from(alignment).is_err() {
            return Err(ModelError::Invalid(format!("alignment {alignment} is not a power of two that fits u32")));
        }
        self.alignment = alignment;
        if alignment != DEFAULT_ALIGNMENT {
            self.add(ALIGNMENT_KEY, alignment as u32)?;
        }
        Ok(self)
    }

    /// Adds a metadata entry; keys are unique and arrays must hold only their declared element type.
    pub fn add(&mut self, key: &str, value: impl Into<GgufValue>) -> Result<&mut Self> {
        let value = value.into();
        check_value(key, &value)?;
        if key == ALIGNMENT_KEY && self.keys.contains(key) {
            // Set by `alignment()`: the explicit value must agree with it.
            let same = self.metadata.iter().any(|(k, v)| k == key && v.as_u64() == value.as_u64());
            return if same { Ok(self) } else { Err(ModelError::Invalid(format!("{key} is already set"))) };
        }
        if !self.keys.insert(key.to_owned()) {
            return Err(ModelError::Invalid(format!("metadata key {key} is added twice")));
        }
        self.metadata.push((key.to_owned(), value));
        Ok(self)
    }

    /// Adds a tensor of a shardline dtype with a row-major `shape` (`[out, in]`); `data` must hold exactly
    /// `shape` elements of `dtype`.
    pub fn add_tensor(&mut self, name: &str, dtype: DType, shape: &[usize], data: Vec<u8>) -> Result<&mut Self> {
        let ne = shape.iter().rev().map(|&d| d as u64).collect();
        self.add_raw_tensor(name, GgmlType::from_dtype(dtype), ne, data)
    }

    /// Adds a tensor of any known ggml type with dimensions in ggml order (`ne[0]` innermost). Lets tests write
    /// types shardline does not compute with, such as IQ2_XXS.
    pub fn add_raw_tensor(
        &mut self,
        name: &str,
        ggml_type: GgmlType,
        ne: Vec<u64>,
        data: Vec<u8>,
    ) -> Result<&mut Self> {
        if ne.len() > MAX_DIMS {
            return Err(ModelError::Invalid(format!("tensor {name} has {} dimensions (at most {MAX_DIMS})", ne.len())));
        }
        let (block_elems, _) = ggml_type
            .block()
            .ok_or_else(|| ModelError::UnsupportedTensorType { tensor: name.into(), type_name: ggml_type.name() })?;
        if ne.first().copied().unwrap_or(1) % block_elems as u64 != 0 {
            return Err(ModelError::Invalid(format!(
                "tensor {name}: inner dimension of {ne:?} is not a multiple of the {ggml_type} block of {block_elems}"
            )));
        }
        let elems = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let expected = elems.and_then(|e| ggml_type.bytes_for(e));
        if expected != Some(data.len() as u64) {
            return Err(ModelError::Invalid(format!(
                "tensor {name}: {} bytes given, {expected:?} needed for {ggml_type} {ne:?}",
                data.len()
            )));
        }
        if !self.names.insert(name.to_owned()) {
            return Err(ModelError::Invalid(format!("tensor {name} is added twice")));
        }
        self.tensors.push(PendingTensor { name: name.to_owned(), ggml_type, ne, data });
        Ok(self)
    }

    /// The complete file image.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Writes the file to `path` (created or truncated).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io_err = |source| ModelError::Io { path: path.display().to_string(), source };
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io_err)?);
        self.write_to(&mut f).map_err(io_err)?;
        f.flush().map_err(io_err)
    }

    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(&GGUF_MAGIC);
        header.extend_from_slice(&self.version.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut header, key);
            header.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut header, &t.name);
            header.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ggml_type.0.to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment as u64);
        }
        let pad = header.len().next_multiple_of(self.alignment) - header.len();
        header.resize(header.len() + pad, 0);
        w.write_all(&header)?;
        let zeros = vec![0u8; self.alignment];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            let pad = t.data.len().next_multiple_of(self.alignment) - t.data.len();
            w.write_all(&zeros[..pad])?;
        }
        Ok(())
    }
}

fn check_value(key: &str, value: &GgufValue) -> Result<()> {
    if let GgufValue::Array(elem, items) = value {
        for item in items {
            if item.value_type() != *elem {
                return Err(ModelError::Invalid(format!(
                    "metadata {key}: array of {elem:?} holds a {:?}",
                    item.value_type()
                )));
            }
            check_value(key, item)?;
        }
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(elem, items) => {
            out.extend_from_slice(&(*elem as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}
