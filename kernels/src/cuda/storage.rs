//! Device memory of CUDA tensors.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, result, sys};

use crate::error::{KernelError, Result};

/// How a tensor's bytes are arranged on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Exactly the host layout (plain floats; activations).
    Plain,
    /// Quantised blocks split into quants then scales (see `repack.rs`); the scale region starts at this byte.
    Split { scales_at: usize },
}

/// A device allocation made with `cuMemAlloc` outside the stream allocator, so that it can be created while a stream
/// is being captured into a CUDA graph and lives exactly as long as the graph that uses it.
pub(crate) struct RawDeviceBuf {
    ptr: sys::CUdeviceptr,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl RawDeviceBuf {
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(cuda_err)?;
        // SAFETY: plain allocation of `len.max(1)` bytes in the current (bound) context; freed in Drop.
        let ptr = unsafe { result::malloc_sync(len.max(1)) }.map_err(cuda_err)?;
        Ok(Self { ptr, len, ctx: ctx.clone() })
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for RawDeviceBuf {
    fn drop(&mut self) {
        // The graph that used this buffer has been destroyed or synchronised before its buffers are released.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `malloc_sync` in this context and is freed exactly once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

// SAFETY: a device address is a plain integer; the allocation is freed only in Drop, under its context.
unsafe impl Send for RawDeviceBuf {}
// SAFETY: no interior mutability on the host side.
unsafe impl Sync for RawDeviceBuf {}

/// Owns a tensor's device memory; the kernels use the cached address, and the memory is freed when this drops.
#[allow(dead_code)] // the payloads are held for their Drop only
pub(crate) enum DeviceMem {
    /// Stream-ordered allocation, freed on drop after the work queued before it.
    Owned(CudaSlice<u8>),
    /// A buffer owned by a captured CUDA graph (see `graph.rs`).
    Graph(Arc<RawDeviceBuf>),
}

/// Device memory of a CUDA tensor.
pub struct CudaStorage {
    _mem: DeviceMem,
    len: usize,
    layout: Layout,
    /// Cached device address (stable for the lifetime of the allocation).
    ptr: u64,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage({} bytes at {:#x}, {:?})", self.len, self.ptr, self.layout)
    }
}

impl CudaStorage {
    /// Wraps `slice`, of which the tensor uses the first `len` bytes (allocations are at least one byte).
    pub(crate) fn owned(slice: CudaSlice<u8>, len: usize, stream: &CudaStream, layout: Layout) -> Self {
        debug_assert!(len <= slice.len());
        let ptr = {
            let (p, _sync) = slice.device_ptr(stream);
            p
        };
        Self { _mem: DeviceMem::Owned(slice), len, layout, ptr }
    }

    pub(crate) fn graph(buf: Arc<RawDeviceBuf>, len: usize) -> Self {
        let ptr = buf.ptr();
        Self { _mem: DeviceMem::Graph(buf), len, layout: Layout::Plain, ptr }
    }

    /// A second handle to a CUDA graph's buffer (which every replay of the graph rewrites); `None` for other
    /// memory.
    pub fn share(&self) -> Option<CudaStorage> {
        match &self._mem {
            DeviceMem::Graph(buf) => {
                Some(Self { _mem: DeviceMem::Graph(buf.clone()), len: self.len, layout: self.layout, ptr: self.ptr })
            }
            DeviceMem::Owned(_) => None,
        }
    }

    /// Size in bytes.
    pub fn byte_len(&self) -> usize {
        self.len
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }
}

pub(crate) fn cuda_err(e: result::DriverError) -> KernelError {
    KernelError::Cuda(e.to_string())
}
