use std::ops::Range;
use std::sync::Arc;

use crate::DType;
use crate::error::{KernelError, Result};

/// Host bytes that a tensor may borrow without copying: typically a window of a memory-mapped model file, so a shard
/// touches (and keeps resident) only the pages of its own layers.
#[derive(Clone)]
pub struct HostBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl HostBytes {
    /// A window `range` of `owner`. Panics never: an out-of-bounds window is clamped to an error by `try_new`.
    pub fn try_new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Result<Self> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(KernelError::ByteLength {
                what: format!("byte window {range:?}"),
                expected: len,
                got: range.end,
            });
        }
        Ok(Self { owner, range })
    }

    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self { owner: Arc::new(bytes), range: 0..len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl std::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBytes({} bytes)", self.len())
    }
}

/// Where a tensor's data lives. The CPU variant is the reference; the CUDA variant is a stand-in type that cannot be
/// constructed when the crate is built without the `cuda` feature, so no `cfg` leaks into callers.
#[derive(Debug)]
pub enum Storage {
    /// Activations and caches computed on the host (always f32 on the CPU backend).
    CpuF32(Vec<f32>),
    /// A KV cache kept in f16 on the host (`CpuBackend::with_kv_dtype`).
    CpuF16(Vec<half::f16>),
    /// Weights in their file dtype, borrowed from the model file or owned.
    CpuBytes(HostBytes),
    Cuda(crate::cuda::CudaStorage),
}

impl Storage {
    pub fn location(&self) -> &'static str {
        match self {
            Storage::CpuF32(_) | Storage::CpuF16(_) | Storage::CpuBytes(_) => "cpu",
            Storage::Cuda(_) => "cuda",
        }
    }
}

/// A dense row-major tensor. For 2-D weights the shape is `[out_features, in_features]` (the GGUF `ne` order
/// reversed) and quantised blocks run along the last dimension.
#[derive(Debug)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// Builds a tensor after checking that the storage holds exactly `shape` elements of `dtype`.
    pub fn new(dtype: DType, shape: &[usize], storage: Storage) -> Result<Self> {
        let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let elems = elems.ok_or_else(|| crate::error::shape_err("Tensor::new", format!("{shape:?} overflows")))?;
        let last = shape.last().copied().unwrap_or(1);
        if dtype.is_quantized() && !last.is_multiple_of(dtype.block_elems()) {
            return Err(KernelError::PartialBlock { dtype, len: last, block: dtype.block_elems() });
        }
        let expected = dtype.bytes_for(elems).ok_or(KernelError::PartialBlock {
            dtype,
            len: elems,
            block: dtype.block_elems(),
        })?;
        let got = match &storage {
            Storage::CpuF32(v) => {
                if dtype != DType::F32 {
                    return Err(KernelError::UnsupportedDType { op: "CpuF32 storage", dtype });
                }
                v.len() * 4
            }
            Storage::CpuF16(v) => {
                if dtype != DType::F16 {
                    return Err(KernelError::UnsupportedDType { op: "CpuF16 storage", dtype });
                }
                v.len() * 2
            }
            Storage::CpuBytes(b) => b.len(),
            Storage::Cuda(c) => c.byte_len(),
        };
        if got != expected {
            return Err(KernelError::ByteLength { what: format!("{dtype} tensor {shape:?}"), expected, got });
        }
        Ok(Self { dtype, shape: shape.to_vec(), storage })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A second handle to this tensor's memory where that memory is shared: a CUDA graph's buffer, which every
    /// replay of the graph rewrites (a directly replayed decode step hands out its captured outputs again,
    /// `Backend::graph_step`). `None` for any other storage.
    pub fn share(&self) -> Option<Tensor> {
        match &self.storage {
            Storage::Cuda(c) => {
                Some(Tensor { dtype: self.dtype, shape: self.shape.clone(), storage: Storage::Cuda(c.share()?) })
            }
            _ => None,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of a 2-D view: every dimension but the last.
    pub fn rows(&self) -> usize {
        let last = self.cols().max(1);
        self.elem_count() / last
    }

    /// Length of the last dimension.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// Reinterprets the shape without moving data (same element count).
    pub fn reshape(&mut self, shape: &[usize]) -> Result<()> {
        let elems: usize = shape.iter().product();
        if elems != self.elem_count() {
            return Err(crate::error::shape_err("reshape", format!("{:?} -> {shape:?}", self.shape)));
        }
        self.shape = shape.to_vec();
        Ok(())
    }

    /// Size in bytes of the stored data.
    pub fn byte_len(&self) -> usize {
        self.dtype.bytes_for(self.elem_count()).unwrap_or(0)
    }
}
