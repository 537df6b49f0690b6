//! Host-to-device staging of the small per-op arguments (token ids, positions, KV slots, block tables).
//!
//! A copy from pageable host memory may make the driver wait for the stream, a host round trip per op. These bytes
//! are therefore written into page-locked memory and copied with `cuMemcpyHtoDAsync` into a device ring of the same
//! size, in stream order before the kernel that reads them. Regions are handed out in order; only when the ring wraps
//! does the host wait for the stream (so a region is never rewritten while its copy is still pending), which happens
//! once per `capacity` bytes of arguments, i.e. every few thousand decode steps.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, result};

use super::storage::{RawDeviceBuf, cuda_err};
use crate::error::{KernelError, Result};

use super::stage_plan::ALIGN;

/// Page-locked host memory (write-combined: the host only writes it, the copy engine reads it).
pub(crate) struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl PinnedBuf {
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize, write_combined: bool) -> Result<Self> {
        ctx.bind_to_thread().map_err(cuda_err)?;
        let flags = if write_combined { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
        // SAFETY: plain page-locked allocation of `len` bytes in the bound context; freed in Drop.
        let ptr = unsafe { result::malloc_host(len.max(1), flags) }.map_err(cuda_err)? as *mut u8;
        Ok(Self { ptr, len, ctx: ctx.clone() })
    }

    /// Writes `bytes` at `offset`. The caller guarantees that no pending copy reads this region.
    pub(crate) fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len, "pinned write out of bounds");
        // SAFETY: the range is inside the allocation (checked above) and `bytes` cannot overlap pinned memory that
        // only this type hands out.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
    }

    /// The bytes at `offset..offset + len` (only for reading results back after a synchronisation).
    pub(crate) fn read(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len, "pinned read out of bounds");
        // SAFETY: in bounds; the memory is initialised by the device copy the caller waited for.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) }
    }

    pub(crate) fn as_mut_slice(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "pinned slice out of bounds");
        // SAFETY: in bounds and exclusively borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `malloc_host` and is freed exactly once.
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }
}

// SAFETY: the pointer is owned by this value and only touched through `&self`/`&mut self`.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for PinnedBuf {}

/// A pinned host buffer mirrored by a device buffer, handed out front to back.
pub(crate) struct StageArea {
    host: PinnedBuf,
    dev: RawDeviceBuf,
    head: usize,
    /// Whether the area may wrap around (eager ring) or must fail when full (a captured graph's fixed area).
    ring: bool,
}

impl StageArea {
    pub(crate) fn new(ctx: &Arc<CudaContext>, capacity: usize, ring: bool) -> Result<Self> {
        Ok(Self { host: PinnedBuf::new(ctx, capacity, true)?, dev: RawDeviceBuf::new(ctx, capacity)?, head: 0, ring })
    }

    /// Reserves the next region of `len` bytes and returns its byte offset; in a ring, waits for `stream` first
    /// when the ring wraps.
    pub(crate) fn reserve(&mut self, stream: &CudaStream, len: usize) -> Result<usize> {
        let cap = self.host.len();
        if len > cap {
            return Err(KernelError::Cuda(format!(
                "{len} bytes of kernel arguments exceed the {cap}-byte staging area"
            )));
        }
        if self.head + len > cap {
            if !self.ring {
                return Err(KernelError::Cuda(format!(
                    "the captured step stages more than its {cap} bytes of kernel arguments"
                )));
            }
            stream.synchronize().map_err(cuda_err)?;
            self.head = 0;
        }
        let at = self.head;
        self.head = (at + len).next_multiple_of(ALIGN);
        Ok(at)
    }

    /// Writes `bytes` at `offset` of the host side (see [`StageArea::reserve`]).
    pub(crate) fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.host.write(offset, bytes);
    }

    /// Queues the copy of `offset..offset + len` to the device on `stream`; returns the device address.
    pub(crate) fn upload(&self, stream: &CudaStream, offset: usize, len: usize) -> Result<u64> {
        let dst = self.dev.ptr() + offset as u64;
        if len > 0 {
            let src = self.host.read(offset, len);
            // A raw driver call: the stream's context must be current on this thread.
            stream.context().bind_to_thread().map_err(cuda_err)?;
            // SAFETY: `src` is page-locked memory that stays allocated and unmodified until the copy completed (the
            // ring wraps only after synchronising the stream); `dst` is inside the device mirror of the same size.
            unsafe { result::memcpy_htod_async(dst, src, stream.cu_stream()) }.map_err(cuda_err)?;
        }
        Ok(dst)
    }
}
