//! Host side of device sampling (kernels/cuda/sampling.cu): two launches per drawn token (a grid-wide histogram of
//! the row's 16-bit logits, then one block that picks from it); only the token, its log-probability and the top list
//! come back (through a small page-locked buffer).

use super::backend::{Arg, CudaBackend, cuda_storage, i32_arg};
use super::staging::PinnedBuf;
use super::storage::{RawDeviceBuf, cuda_err};
use crate::backend::{Sampled, SamplingParams};
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::Tensor;

/// Most top log-probabilities one draw can return (`SAMPLE_MAX_TOP` in sampling.cu).
pub const MAX_TOP: usize = 256;

/// Device result buffer and its page-locked host mirror: `[token, logprob, (id, logprob) x MAX_TOP]` as u32 words;
/// and the histogram the two kernels share (zeroed once here; the pick kernel leaves it zeroed after each row).
pub(crate) struct SampleIo {
    dev: RawDeviceBuf,
    host: PinnedBuf,
    state: RawDeviceBuf,
}

const IO_BYTES: usize = (2 + 2 * MAX_TOP) * 4;

/// `[65536 counts, one per 16-bit logit value][largest key][non-finite count][NaN count][~first non-finite index]`
/// as u32 words (`SAMPLE_BINS`, `SAMPLE_NONFINITE` … in sampling.cu).
const STATE_BYTES: usize = (65_536 + 4) * 4;

/// Threads per block of `sample_hist_*` (`SAMPLE_HIST_THREADS`); each reads 8 logits per 16-byte load.
const HIST_THREADS: usize = 256;

/// Largest vocabulary: a bin's mass (count × 2⁴⁰) and the row's total mass must fit in u64 (sampling.cu).
pub const MAX_VOCAB: usize = 1 << 23;

/// Blocks of `sample_hist_*` for a row of `vocab` logits: one 16-byte load per thread, at most 8 blocks per SM
/// (grid-stride beyond).
pub(crate) fn hist_blocks(vocab: usize, multiprocessors: usize) -> u32 {
    vocab.div_ceil(8 * HIST_THREADS).clamp(1, 8 * multiprocessors.max(1)) as u32
}

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
    if vocab > MAX_VOCAB {
        return Err(shape_err("sample", format!("vocabulary of {vocab} (the CUDA sampler takes up to {MAX_VOCAB})")));
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
        let state = RawDeviceBuf::new(&b.ctx, STATE_BYTES)?;
        // A raw driver call: the context must be current on this thread (RawDeviceBuf::new bound it).
        // SAFETY: `state` is a live allocation of STATE_BYTES bytes; the memset is ordered before every kernel that
        // reads it because all of them run on this stream.
        unsafe { cudarc::driver::result::memset_d8_async(state.ptr(), 0, STATE_BYTES, b.stream.cu_stream()) }
            .map_err(cuda_err)?;
        ex.sample_io = Some(SampleIo {
            dev: RawDeviceBuf::new(&b.ctx, IO_BYTES)?,
            host: PinnedBuf::new(&b.ctx, IO_BYTES, false)?,
            state,
        });
    }
    let (dev, state) = ex
        .sample_io
        .as_ref()
        .map(|io| (io.dev.ptr(), io.state.ptr()))
        .ok_or_else(|| KernelError::Cuda("sampler buffer lost".into()))?;
    let top_k = i32::try_from(params.top_k).unwrap_or(i32::MAX);

    b.launch(
        &mut ex,
        "sampling",
        &super::names::sample_hist(b.act),
        (hist_blocks(vocab, b.info.multiprocessors as usize), 1, 1),
        HIST_THREADS as u32,
        &[Arg::Ptr(row_ptr), i32_arg("sample", vocab)?, Arg::Ptr(state)],
    )?;
    b.launch(
        &mut ex,
        "sampling",
        &super::names::sample_pick(b.act),
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
            Arg::Ptr(state),
            Arg::Ptr(dev),
        ],
    )?;
    let io = ex.sample_io.as_mut().ok_or_else(|| KernelError::Cuda("sampler buffer lost".into()))?;
    let n_top = n_top.min(vocab);
    // A refused row's answer takes 5 words (sampling.cu, `pick_impl`).
    let words = (2 + 2 * n_top).max(5);
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
        if w[2] > 0 {
            // NaN or infinite logits: refused as on the CPU (kernels/src/cpu/sample.rs), whatever the finite rest.
            let (bad, nan) = (w[2] as usize, w[3] as usize);
            return Err(KernelError::NonFiniteLogits {
                nan,
                infinite: bad.saturating_sub(nan),
                vocab,
                first: !w[4] as usize,
            });
        }
        let max = f32::from_bits(w[1]);
        return Err(shape_err("sample", if max > 0.0 { "infinite logit" } else { "no finite logit" }));
    }
    let top = (0..n_top).map(|j| (w[2 + 2 * j], f32::from_bits(w[3 + 2 * j]))).collect();
    Ok(Sampled { token: w[0], logprob: f32::from_bits(w[1]), top })
}
