//! One `.safetensors` file over a memory map. The header is parsed and validated by the `safetensors` crate
//! (offsets contiguous, sizes matching shapes, header and data inside the file); tensor bytes are windows of the
//! map and are never read here.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ::safetensors::{Dtype, SafeTensors};
use shardline_kernels::{DType, HostBytes};

use crate::error::{ModelError, Result};
use crate::formats::mapped::{MappedFile, SharedBytes};

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StTensor {
    pub dtype: Dtype,
    /// Row-major shape as stored (`[out_features, in_features]` for a matrix).
    pub shape: Vec<usize>,
    /// Absolute byte range of the data in the file.
    pub range: Range<usize>,
}

impl StTensor {
    /// The compute dtype, or [`ModelError::UnsupportedTensorType`] naming `name` and the safetensors dtype.
    pub fn dtype_for(&self, name: &str) -> Result<DType> {
        match self.dtype {
            Dtype::F32 => Ok(DType::F32),
            Dtype::F16 => Ok(DType::F16),
            Dtype::BF16 => Ok(DType::BF16),
            other => {
                Err(ModelError::UnsupportedTensorType { tensor: name.to_owned(), type_name: format!("{other:?}") })
            }
        }
    }
}

/// A mapped safetensors file with its tensor table.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: SharedBytes,
    tensors: HashMap<String, StTensor>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl MappedFile for SafetensorsFile {
    fn parse(path: &Path, bytes: SharedBytes) -> Result<Self> {
        let buf: &[u8] = (*bytes).as_ref();
        let (header_len, metadata) = SafeTensors::read_metadata(buf)
            .map_err(|e| ModelError::Corrupt { path: path.display().to_string(), detail: e.to_string() })?;
        // `read_metadata` checked that the header and every tensor's data lie inside the buffer.
        let data_start = 8 + header_len;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (s, e) = info.data_offsets;
                (name, StTensor { dtype: info.dtype, shape: info.shape.clone(), range: data_start + s..data_start + e })
            })
            .collect();
        Ok(Self { path: path.to_path_buf(), bytes, tensors })
    }
}

impl SafetensorsFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names as stored, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&str, &StTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, name: &str) -> Option<&StTensor> {
        self.tensors.get(name)
    }

    /// The bytes of a tensor, borrowed from the map.
    pub fn bytes(&self, name: &str) -> Result<HostBytes> {
        let t = self.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        Ok(HostBytes::try_new(self.bytes.clone(), t.range.clone())?)
    }
}
