//! Host side of device sampling (kernels/cuda/sampling.cu): one launch per drawn token; only the token, its
//! log-probability and the top list come back (through a small page-locked buffer).

use super::backend::{Arg, CudaBackend, cuda_storage, i32_arg};
use super::staging::PinnedBuf;
use super::storage::{RawDeviceBuf, cuda_err};
use crate::backend::{Sampled, SamplingParams};
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::Tensor;

/// Most top log-probabilities one draw can return (`SAMPLE_MAX_TOP` in sampling.cu).
pub const MAX_TOP: usize = 256;

/// Device result buffer and its page-locked host mirror: `[token, logprob, (id, logprob) x MAX_TOP]` as u32 words.
pub(crate) struct SampleIo {
    dev: RawDeviceBuf,
    host: PinnedBuf,
}

const IO_BYTES: usize = (2 + 2 * MAX_TOP) * 4;

pub(crate) fn sample(
    b: &CudaBackend,
    logits: &Tensor,
    row: usize,
    params: &SamplingParams,
    position: u64,
    n_top: usize,
) -> Result<Sampled> {
    let vocab = logits.cols();
    if row >= logits.rows() || vocab == 0 {
        return Err(shape_err("sample", format!("row {row} of logits {:?}", logits.shape())));
    }
    if n_top > MAX_TOP {
        return Err(shape_err("sample", format!("{n_top} top log-probabilities (the CUDA sampler returns {MAX_TOP})")));
    }
    if params.temperature.is_nan() {
        return Err(shape_err("sample", "temperature is NaN"));
    }
    // top_p ≤ 0 keeps only the most likely token, as on the CPU (kernels/src/cpu/sample.rs); only NaN is refused.
    if params.top_p.is_nan() {
        return Err(shape_err("sample", "top_p is NaN"));
    }
    if logits.dtype() != b.act {
        return Err(KernelError::UnsupportedDType { op: "sample", dtype: logits.dtype() });
    }
    let row_ptr = cuda_storage(logits)?.ptr() + (row * vocab * b.act.block_bytes()) as u64;
    let mut ex = b.exec()?;
    b.require_eager(&ex, "sample")?;
    if ex.sample_io.is_none() {
        ex.sample_io = Some(SampleIo {
            dev: RawDeviceBuf::new(&b.ctx, IO_BYTES)?,
            host: PinnedBuf::new(&b.ctx, IO_BYTES, false)?,
        });
    }
    let dev =
        ex.sample_io.as_ref().map(|io| io.dev.ptr()).ok_or_else(|| KernelError::Cuda("sampler buffer lost".into()))?;
    let top_k = i32::try_from(params.top_k).unwrap_or(i32::MAX);
    b.launch(
        &mut ex,
        "sampling",
        &super::names::sample(b.act),
        (1, 1, 1),
        1024,
        &[
            Arg::Ptr(row_ptr),
            i32_arg("sample", vocab)?,
            Arg::F32(params.temperature),
            Arg::I32(top_k),
            Arg::F32(params.top_p),
            Arg::U64(params.seed),
            Arg::U64(position),
            Arg::I32(n_top as i32),
            Arg::Ptr(dev),
        ],
    )?;
    let io = ex.sample_io.as_mut().ok_or_else(|| KernelError::Cuda("sampler buffer lost".into()))?;
    let n_top = n_top.min(vocab);
    let words = 2 + 2 * n_top;
    let host = io.host.as_mut_slice(0, words * 4);
    // A raw driver call: the context must be current on this thread.
    b.ctx.bind_to_thread().map_err(cuda_err)?;
    // SAFETY: `host` is page-locked memory of `words * 4` bytes, read only after the synchronisation below; the
    // device buffer holds at least that many bytes.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(host, dev, b.stream.cu_stream()) }.map_err(cuda_err)?;
    b.stream.synchronize().map_err(cuda_err)?;
    let bytes = io.host.read(0, words * 4);
    let w: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if w[0] == u32::MAX {
        let max = f32::from_bits(w[1]);
        return Err(shape_err("sample", if max > 0.0 { "infinite logit" } else { "no finite logit" }));
    }
    let top = (0..n_top).map(|j| (w[2 + 2 * j], f32::from_bits(w[3 + 2 * j]))).collect();
    Ok(Sampled { token: w[0], logprob: f32::from_bits(w[1]), top })
}
