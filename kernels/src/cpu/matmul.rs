//! `out[t, n] = Σ_k x[t, k] · w[n, k]` for weights of every dtype.
//!
//! Quantised weights are used as they are stored (no dequantised copy): the activation rows are quantised once to
//! 8-bit blocks and multiplied with integer block dot products, as llama.cpp does. Output rows `n` are split into
//! tasks for the thread pool; small matmuls (under about 32 KB of weights) stay on the calling thread, since a
//! fork costs about as much as the work. The split never changes a result (see [`super::dot`]).

use std::cell::RefCell;

use super::CpuBackend;
use super::access::{act, act_mut, check_2d, weight_bytes};
use super::dot::act::{ActPlan, QuantAct};
use super::dot::{Out, Rhs, Weights, act_plan, gemm};
use super::parallel::split_range;
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::Tensor;

const OP: &str = "matmul";

/// Weight bytes × activation rows below which a matmul runs on the calling thread.
const SERIAL_WORK: usize = 32 * 1024;

/// Tasks per thread: enough to even out uneven progress, few enough to keep the per-task cost negligible.
const TASKS_PER_THREAD: usize = 4;

/// The calling thread's quantised activations, and what they were made from.
#[derive(Default)]
struct ActCache {
    act: QuantAct,
    /// The input rows (as bits), `k` and plan of `act`; `None` after a failed or float matmul.
    key: Option<(Vec<u32>, usize, ActPlan)>,
}

thread_local! {
    /// Quantised activations of the calling thread's last matmul; the buffers are reused across calls, and so are
    /// the values when the next matmul has the same input and plan (the Q, K and V projections of a block, the
    /// gate and up projections: quantising is a pure function of the input bits, so reusing it changes nothing).
    static ACT: RefCell<ActCache> = RefCell::new(ActCache::default());
}

pub(crate) fn matmul(be: &CpuBackend, x: &Tensor, w: &Tensor, out: &mut Tensor) -> Result<()> {
    if w.shape().len() != 2 {
        return Err(shape_err(OP, format!("weight must be 2-D [n, k], got {:?}", w.shape())));
    }
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let dtype = w.dtype();
    let (t_rows, _) = check_2d(OP, "x", x, None, Some(k))?;
    check_2d(OP, "out", out, Some(t_rows), Some(n))?;
    let xs = act(OP, x)?;
    let row_bytes =
        dtype.bytes_for(k).ok_or(KernelError::PartialBlock { dtype, len: k, block: dtype.block_elems() })?;
    let bytes = weight_bytes(w)?;
    if bytes.len() != n * row_bytes {
        return Err(KernelError::ByteLength {
            what: format!("{dtype} weight [{n}, {k}]"),
            expected: n * row_bytes,
            got: bytes.len(),
        });
    }
    let weights = Weights { dtype, bytes, k, row_bytes };
    let level = be.simd;
    let out_data = act_mut(OP, out)?;
    if n == 0 || t_rows == 0 {
        return Ok(());
    }
    let o = Out::new(out_data, n);
    let work = n.saturating_mul(row_bytes.max(1)).saturating_mul(t_rows);
    let parts = if work <= SERIAL_WORK { 1 } else { be.pool.threads() * TASKS_PER_THREAD };
    let ranges = split_range(n, parts, 4);
    let run = |rhs: Rhs<'_>| {
        be.pool.run(ranges.len(), |i| {
            // SAFETY: every size was checked above (weights of `n` rows of `row_bytes`, `t_rows` activation rows of
            // `k`, an output of `t_rows × n`), `ranges` splits `0..n`, the activations are quantised with
            // `act_plan(level, dtype)` below, and `level` is the backend's probed SIMD level.
            unsafe { gemm(level, &weights, rhs, t_rows, ranges[i].clone(), o) }
        })
    };
    match dtype {
        _ if dtype.is_quantized() => {
            let plan = act_plan(level, dtype);
            // The quantised activations live in a buffer of the calling thread, reused from call to call.
            ACT.with_borrow_mut(|cache| {
                let bits: &[u32] = bytemuck::cast_slice(xs);
                let same = matches!(&cache.key, Some((b, kk, p)) if *kk == k && *p == plan && b[..] == *bits);
                if !same {
                    cache.act.fill(xs, t_rows, k, plan);
                    let mut key = cache.key.take().map(|(b, _, _)| b).unwrap_or_default();
                    key.clear();
                    key.extend_from_slice(bits);
                    cache.key = Some((key, k, plan));
                }
                run(Rhs::Quant(&cache.act));
            });
        }
        _ => run(Rhs::Float(xs)),
    }
    Ok(())
}
