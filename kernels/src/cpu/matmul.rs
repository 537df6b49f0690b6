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
use crate::backend::Backend;
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::Tensor;

const OP: &str = "matmul";

/// Weight bytes × activation rows below which a matmul runs on the calling thread.
const SERIAL_WORK: usize = 32 * 1024;

/// Most tasks per thread, to even out uneven progress on large matmuls.
const TASKS_PER_THREAD: usize = 4;

/// Least work of a task beyond one per thread, in weight bytes × activation rows. A task costs more than its claim:
/// it starts on weight rows whose first lines nothing has prefetched. In a SmolLM2 decode step (Intel Xeon, 2
/// threads) four tasks per thread for every matmul made the one-row step ~10% and the 16-row step ~6% slower than
/// one per thread (so the decode matmuls get one per thread, the LM head more), while a 17 MB matrix ran the same
/// with 1 to 64 tasks per thread.
const MIN_TASK_WORK: usize = 16 << 20;

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

/// A checked matmul: its weights, input rows and output, ready for [`gemm`].
struct Checked<'a> {
    weights: Weights<'a>,
    n: usize,
    t_rows: usize,
    xs: &'a [f32],
}

fn check<'a>(x: &'a Tensor, w: &'a Tensor, out: &Tensor) -> Result<Checked<'a>> {
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
    Ok(Checked { weights: Weights { dtype, bytes, k, row_bytes }, n, t_rows, xs })
}

/// Runs `run` with the activation side of `xs` (`t_rows × k`) for weights of `dtype`: quantised into the calling
/// thread's buffer (reused, values included, when the input bits and plan are those of the last call) or as floats.
fn with_rhs(be: &CpuBackend, dtype: crate::DType, xs: &[f32], t_rows: usize, k: usize, run: impl FnOnce(Rhs<'_>)) {
    if !dtype.is_quantized() {
        return run(Rhs::Float(xs));
    }
    let plan = act_plan(be.simd, dtype);
    ACT.with_borrow_mut(|cache| {
        let bits: &[u32] = bytemuck::cast_slice(xs);
        let same = matches!(&cache.key, Some((b, kk, p)) if *kk == k && *p == plan && b[..] == *bits);
        if !same {
            cache.act.fill(xs, t_rows, k, plan, &be.pool);
            let mut key = cache.key.take().map(|(b, _, _)| b).unwrap_or_default();
            key.clear();
            key.extend_from_slice(bits);
            cache.key = Some((key, k, plan));
        }
        run(Rhs::Quant(&cache.act));
    });
}

/// Output row ranges of a matmul of `n` rows over `t_rows` inputs: one when the work is small, else one per
/// thread, and more (up to [`TASKS_PER_THREAD`] per thread) only when each still gets [`MIN_TASK_WORK`].
fn ranges(be: &CpuBackend, w: &Weights<'_>, n: usize, t_rows: usize) -> Vec<std::ops::Range<usize>> {
    let work = n.saturating_mul(w.row_bytes.max(1)).saturating_mul(t_rows);
    let threads = be.pool.threads();
    let parts = if work <= SERIAL_WORK { 1 } else { (work / MIN_TASK_WORK).clamp(threads, threads * TASKS_PER_THREAD) };
    split_range(n, parts, 4)
}

pub(crate) fn matmul(be: &CpuBackend, x: &Tensor, w: &Tensor, out: &mut Tensor) -> Result<()> {
    let Checked { weights, n, t_rows, xs } = check(x, w, out)?;
    let level = be.simd;
    let out_data = act_mut(OP, out)?;
    if n == 0 || t_rows == 0 {
        return Ok(());
    }
    let o = Out::new(out_data, n);
    let ranges = ranges(be, &weights, n, t_rows);
    with_rhs(be, weights.dtype, xs, t_rows, weights.k, |rhs| {
        be.pool.run(ranges.len(), |i| {
            // SAFETY: every size was checked (`check`: weights of `n` rows of `row_bytes`, `t_rows` activation rows
            // of `k`, an output of `t_rows × n`), `ranges` splits `0..n`, the activations are quantised with
            // `act_plan(level, dtype)` (`with_rhs`), and `level` is the backend's probed SIMD level.
            unsafe { gemm(level, &weights, rhs, t_rows, ranges[i].clone(), o) }
        })
    });
    Ok(())
}

/// Several matmuls of the same input (the Q, K and V projections) as one parallel call: the tasks of every weight
/// in one fork, the activations quantised once. Each output is computed exactly as [`matmul`] computes it; weights
/// of different formats or widths run one by one.
pub(crate) fn matmul_many(be: &CpuBackend, x: &Tensor, outs: &mut [(&Tensor, &mut Tensor)]) -> Result<()> {
    let same =
        outs.windows(2).all(|p| p[0].0.dtype() == p[1].0.dtype() && p[0].0.shape().get(1) == p[1].0.shape().get(1));
    if !same || outs.len() < 2 {
        for (w, out) in outs.iter_mut() {
            matmul(be, x, w, out)?;
        }
        return Ok(());
    }
    let mut parts = Vec::with_capacity(outs.len());
    for (w, out) in outs.iter_mut() {
        let c = check(x, w, out)?;
        let o = Out::new(act_mut(OP, out)?, c.n);
        parts.push((c, o));
    }
    let Some((first, _)) = parts.first() else { return Ok(()) };
    let (t_rows, k, dtype, xs) = (first.t_rows, first.weights.k, first.weights.dtype, first.xs);
    if t_rows == 0 {
        return Ok(());
    }
    let level = be.simd;
    let tasks: Vec<(usize, std::ops::Range<usize>)> = parts
        .iter()
        .enumerate()
        .flat_map(|(j, (c, _))| ranges(be, &c.weights, c.n, t_rows).into_iter().map(move |r| (j, r)))
        .collect();
    with_rhs(be, dtype, xs, t_rows, k, |rhs| {
        be.pool.run(tasks.len(), |i| {
            let (j, r) = &tasks[i];
            let (c, o) = &parts[*j];
            // SAFETY: as in `matmul`: each weight and output was checked, the ranges split `0..n` of their weight,
            // and every weight has the dtype and width the activations were quantised for.
            unsafe { gemm(level, &c.weights, rhs, t_rows, r.clone(), *o) }
        })
    });
    Ok(())
}

/// `out = silu(x · w_gateᵀ) ⊙ (x · w_upᵀ)` as one parallel call: each task computes its rows of `gate` and `up`,
/// then those columns of `out` for every input row, so the SwiGLU runs on every thread and no fork separates the
/// three. The same operations as `matmul`, `matmul`, `swiglu`, so the same bits. Weights of different formats or
/// shapes run as those three calls.
pub(crate) fn matmul_swiglu(
    be: &CpuBackend,
    x: &Tensor,
    (w_gate, w_up): (&Tensor, &Tensor),
    (gate, up): (&mut Tensor, &mut Tensor),
    out: &mut Tensor,
) -> Result<()> {
    if w_gate.dtype() != w_up.dtype() || w_gate.shape() != w_up.shape() || out.shape() != gate.shape() {
        matmul(be, x, w_gate, gate)?;
        matmul(be, x, w_up, up)?;
        return be.swiglu(gate, up, out);
    }
    let g = check(x, w_gate, gate)?;
    let u = check(x, w_up, up)?;
    let (n, t_rows) = (g.n, g.t_rows);
    let (og, ou) = (Out::new(act_mut(OP, gate)?, n), Out::new(act_mut(OP, up)?, n));
    let oo = Out::new(act_mut(OP, out)?, n);
    if n == 0 || t_rows == 0 {
        return Ok(());
    }
    let level = be.simd;
    let avx2 = be.exec().avx2;
    let ranges = ranges(be, &g.weights, 2 * n, t_rows);
    let ranges = split_range(n, ranges.len(), 4);
    with_rhs(be, g.weights.dtype, g.xs, t_rows, g.weights.k, |rhs| {
        be.pool.run(ranges.len(), |i| {
            let r = ranges[i].clone();
            // SAFETY: as in `matmul` (both weights checked, same dtype and shape); the task owns columns `r` of
            // `gate`, `up` and `out`, so the rows it reads back are its own, written just before.
            unsafe {
                gemm(level, &g.weights, rhs, t_rows, r.clone(), og);
                gemm(level, &u.weights, rhs, t_rows, r.clone(), ou);
                for t in 0..t_rows {
                    super::elementwise::swiglu_slice(
                        avx2,
                        og.row(t, r.clone()),
                        ou.row(t, r.clone()),
                        oo.row_mut(t, r.clone()),
                    );
                }
            }
        })
    });
    Ok(())
}
