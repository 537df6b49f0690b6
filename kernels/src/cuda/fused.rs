//! Host side of fused kernels (docs/CUDA.md, "Fusion"): the same checks as the ops they replace, one launch.

use super::backend::{Arg, CudaBackend, cuda_storage, i32_arg};
use super::names;
use super::step_record::Role;
use crate::DType;
use crate::backend::{RopeConfig, RopeStyle};
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::Tensor;

const OP: &str = "rope_kv_store";

fn act_ptr(b: &CudaBackend, t: &Tensor) -> Result<u64> {
    if t.dtype() != b.act {
        return Err(KernelError::UnsupportedDType { op: OP, dtype: t.dtype() });
    }
    Ok(cuda_storage(t)?.ptr())
}

/// `rope(q)`, `rope(k)`, `kv_store(k, v)` as one kernel (`rope_kv_store_*` in kernels/cuda/rope.cu): one block per
/// row. Checked like the three ops: shapes, the rotary table, every slot against the caches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_kv_store(
    b: &CudaBackend,
    q: &mut Tensor,
    k: &mut Tensor,
    v: &Tensor,
    positions: &[u32],
    (n_heads, n_kv_heads): (usize, usize),
    inv_freq: &Tensor,
    cfg: &RopeConfig,
    (k_cache, v_cache): (&mut Tensor, &mut Tensor),
    slots: &[u32],
) -> Result<()> {
    let (d, rot) = (cfg.head_dim, cfg.rotary_dim);
    let t = q.rows();
    let width = n_kv_heads * d;
    if q.cols() != n_heads * d
        || k.cols() != width
        || k.rows() != t
        || v.shape() != k.shape()
        || positions.len() != t
        || slots.len() != t
        || k_cache.cols() != width
        || k_cache.shape() != v_cache.shape()
    {
        return Err(shape_err(
            OP,
            format!(
                "q {:?}, k {:?}, v {:?}, {} positions, {} slots, caches {:?} for {n_heads}/{n_kv_heads} heads of {d}",
                q.shape(),
                k.shape(),
                v.shape(),
                positions.len(),
                slots.len(),
                k_cache.shape()
            ),
        ));
    }
    if rot == 0 || rot % 2 != 0 || rot > d || inv_freq.elem_count() != rot / 2 || inv_freq.dtype() != DType::F32 {
        return Err(shape_err(
            OP,
            format!("rotary_dim {rot} of head_dim {d} with a {} table of {}", inv_freq.dtype(), inv_freq.elem_count()),
        ));
    }
    let capacity = k_cache.rows();
    if let Some(&bad) = slots.iter().find(|&&s| s as usize >= capacity) {
        return Err(KernelError::KvSlot { slot: bad as usize, capacity });
    }
    let (qp, kp, vp) = (act_ptr(b, q)?, act_ptr(b, k)?, act_ptr(b, v)?);
    let (kcp, vcp) = (act_ptr(b, k_cache)?, act_ptr(b, v_cache)?);
    let fp = cuda_storage(inv_freq)?.ptr();
    let mut ex = b.exec()?;
    CudaBackend::note(&mut ex, |r| r.note_slot_capacity(capacity));
    let pp = b.stage_u32(&mut ex, Role::Positions, positions)?;
    let sp = b.stage_u32(&mut ex, Role::Slots, slots)?;
    b.launch(
        &mut ex,
        "rope",
        &names::rope_kv_store(b.act),
        (u32::try_from(t).map_err(|_| shape_err(OP, format!("{t} rows")))?, 1, 1),
        128,
        &[
            Arg::Ptr(qp),
            Arg::Ptr(kp),
            Arg::Ptr(vp),
            Arg::Ptr(kcp),
            Arg::Ptr(vcp),
            Arg::Ptr(pp),
            Arg::Ptr(sp),
            Arg::Ptr(fp),
            i32_arg(OP, n_heads)?,
            i32_arg(OP, n_kv_heads)?,
            i32_arg(OP, d)?,
            i32_arg(OP, rot / 2)?,
            Arg::I32(i32::from(cfg.style == RopeStyle::Neox)),
        ],
    )
}
