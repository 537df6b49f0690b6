//! Views of tensors as the CPU kernels need them, with the device and dtype checks every op shares.

use std::borrow::Cow;

use half::f16;

use crate::error::{KernelError, Result, shape_err};
use crate::tensor::{Storage, Tensor};
use crate::{DType, quant};

const BACKEND: &str = "cpu";

fn wrong_device(t: &Tensor) -> KernelError {
    KernelError::WrongDevice { backend: BACKEND, found: t.storage().location() }
}

/// The f32 data of an activation tensor (`Storage::CpuF32`).
pub(crate) fn act<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    match t.storage() {
        Storage::CpuF32(v) => Ok(v),
        Storage::CpuBytes(_) => Err(shape_err(op, format!("expected an f32 activation, got a {} weight", t.dtype()))),
        Storage::CpuF16(_) => Err(shape_err(op, "expected an f32 activation, got an f16 KV cache")),
        Storage::Cuda(_) => Err(wrong_device(t)),
    }
}

/// The rows of a KV cache, in the dtype the backend keeps them in (f32 or f16).
pub(crate) enum KvRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// The mutable rows of a KV cache.
pub(crate) enum KvMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
}

/// A KV cache tensor (`Storage::CpuF32` or `Storage::CpuF16`).
pub(crate) fn kv<'a>(op: &'static str, t: &'a Tensor) -> Result<KvRef<'a>> {
    match t.storage() {
        Storage::CpuF32(v) => Ok(KvRef::F32(v)),
        Storage::CpuF16(v) => Ok(KvRef::F16(v)),
        Storage::CpuBytes(_) => Err(shape_err(op, format!("expected a KV cache, got a {} weight", t.dtype()))),
        Storage::Cuda(_) => Err(wrong_device(t)),
    }
}

/// A KV cache tensor, mutable.
pub(crate) fn kv_mut<'a>(op: &'static str, t: &'a mut Tensor) -> Result<KvMut<'a>> {
    let dtype = t.dtype();
    let location = t.storage().location();
    match t.storage_mut() {
        Storage::CpuF32(v) => Ok(KvMut::F32(v)),
        Storage::CpuF16(v) => Ok(KvMut::F16(v)),
        Storage::CpuBytes(_) => Err(shape_err(op, format!("cannot write into a {dtype} weight tensor"))),
        Storage::Cuda(_) => Err(KernelError::WrongDevice { backend: BACKEND, found: location }),
    }
}

/// The mutable f32 data of an activation tensor.
pub(crate) fn act_mut<'a>(op: &'static str, t: &'a mut Tensor) -> Result<&'a mut [f32]> {
    let dtype = t.dtype();
    let location = t.storage().location();
    match t.storage_mut() {
        Storage::CpuF32(v) => Ok(v),
        Storage::CpuF16(_) => Err(shape_err(op, "expected an f32 activation, got an f16 KV cache")),
        Storage::CpuBytes(_) => Err(shape_err(op, format!("cannot write into a {dtype} weight tensor"))),
        Storage::Cuda(_) => Err(KernelError::WrongDevice { backend: BACKEND, found: location }),
    }
}

/// Raw bytes of a weight in its own dtype: borrowed weights as they are, f32 activations as their bytes.
pub(crate) fn weight_bytes(t: &Tensor) -> Result<&[u8]> {
    match t.storage() {
        Storage::CpuBytes(b) => Ok(b.as_slice()),
        Storage::CpuF32(v) => Ok(bytemuck::cast_slice(v)),
        Storage::CpuF16(v) => Ok(bytemuck::cast_slice(v)),
        Storage::Cuda(_) => Err(wrong_device(t)),
    }
}

/// A weight vector (norm weights, RoPE table) as f32: borrowed when it already is aligned f32, converted otherwise.
pub(crate) fn weight_f32(t: &Tensor) -> Result<Cow<'_, [f32]>> {
    if let Storage::CpuF32(v) = t.storage() {
        return Ok(Cow::Borrowed(v));
    }
    let bytes = weight_bytes(t)?;
    if t.dtype() == DType::F32
        && let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes)
    {
        return Ok(Cow::Borrowed(v));
    }
    let mut out = vec![0.0; t.elem_count()];
    quant::dequantize(t.dtype(), bytes, &mut out)?;
    Ok(Cow::Owned(out))
}

/// Checks that `t` is a 2-D view `[rows, cols]` with the given sizes (`None` = any).
pub(crate) fn check_2d(
    op: &'static str,
    what: &str,
    t: &Tensor,
    rows: Option<usize>,
    cols: Option<usize>,
) -> Result<(usize, usize)> {
    let shape = t.shape();
    // Computed from the shape rather than `Tensor::rows`, which cannot tell `[2, 0]` from `[0, 0]`.
    let (r, c) = match shape.split_last() {
        Some((&c, lead)) => (lead.iter().product(), c),
        None => (0, 0),
    };
    if shape.is_empty() || rows.is_some_and(|x| x != r) || cols.is_some_and(|x| x != c) {
        return Err(shape_err(
            op,
            format!("{what} has shape {:?}, expected [{}, {}]", t.shape(), fmt_dim(rows), fmt_dim(cols)),
        ));
    }
    Ok((r, c))
}

fn fmt_dim(d: Option<usize>) -> String {
    d.map_or_else(|| "_".to_string(), |d| d.to_string())
}
