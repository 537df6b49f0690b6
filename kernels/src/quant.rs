//! ggml/GGUF block formats and their reference (de)quantisers.
//!
//! The block structs have exactly the byte layout of ggml (`block_q8_0`, `block_q4_0`, `block_q4_1`), so a
//! memory-mapped GGUF file is read as it is. The quantisers reproduce ggml's `quantize_row_*_ref` bit for bit, so
//! weights quantised here equal the ones `llama-quantize` writes. Input byte slices may start at any address: blocks
//! are read with [`bytemuck::pod_read_unaligned`], never by casting a possibly misaligned slice.
//!
//! The formats without a block struct here (Q5_0, Q5_1, IQ4_NL and the 256-value super-blocks) are decoded byte by
//! byte in [`crate::superblock`].
//!
//! Values are little-endian, as in GGUF; the crate assumes a little-endian host.

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

use crate::error::{KernelError, Result};
use crate::{DType, superblock};

/// Elements per quantisation block (`QK8_0 == QK4_0 == QK4_1 == 32` in ggml).
pub const QK: usize = 32;

/// 32 signed bytes with one scale: `x = d · q`. 34 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// 32 four-bit values with one scale: `x = d · (q − 8)`. Byte `j` holds element `j` in its low nibble and element
/// `j + 16` in its high nibble. 18 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// 32 four-bit values with a scale and a minimum: `x = d · q + m`. Nibble order as in [`BlockQ4_0`]. 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

impl BlockQ8_0 {
    /// ggml `quantize_row_q8_0_ref`: scale `amax / 127`, values rounded half away from zero.
    pub fn quantize(x: &[f32; QK]) -> Self {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
        Self { d: f16::from_f32(d), qs }
    }

    pub fn dequantize(&self, out: &mut [f32; QK]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
}

impl BlockQ4_0 {
    /// ggml `quantize_row_q4_0_ref`: the value of largest magnitude maps to −8, `q = min(15, trunc(x/d + 8.5))`.
    pub fn quantize(x: &[f32; QK]) -> Self {
        let d = signed_absmax(x) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
            let hi = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
            *q = lo | (hi << 4);
        }
        Self { d: f16::from_f32(d), qs }
    }

    pub fn dequantize(&self, out: &mut [f32; QK]) {
        let d = self.d.to_f32();
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

impl BlockQ4_1 {
    /// ggml `quantize_row_q4_1_ref`: `d = (max − min) / 15`, `m = min`, `q = min(15, trunc((x − min)/d + 0.5))`.
    pub fn quantize(x: &[f32; QK]) -> Self {
        let mut min = f32::MAX;
        let mut max = -f32::MAX;
        for &v in x {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            let lo = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
            let hi = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
            *q = lo | (hi << 4);
        }
        Self { d: f16::from_f32(d), m: f16::from_f32(min), qs }
    }

    pub fn dequantize(&self, out: &mut [f32; QK]) {
        let d = self.d.to_f32();
        let m = self.m.to_f32();
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = (q & 0x0f) as f32 * d + m;
            out[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
}

/// Checks that `elems` values of `dtype` occupy exactly `bytes` bytes.
/// The value of largest magnitude in `x` (the first one on ties), with its sign: ggml's reference quantisers scale a
/// block so that this value maps to the most negative code.
pub(crate) fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn check_len(op: &'static str, dtype: DType, elems: usize, bytes: usize) -> Result<()> {
    let expected =
        dtype.bytes_for(elems).ok_or(KernelError::PartialBlock { dtype, len: elems, block: dtype.block_elems() })?;
    if expected != bytes {
        return Err(KernelError::ByteLength { what: format!("{op} of {elems} {dtype} values"), expected, got: bytes });
    }
    Ok(())
}

/// Encodes `src` as GGUF bytes of `dtype`: plain little-endian floats for f32/f16/bf16 (f16 and bf16 rounded to
/// nearest even), ggml blocks for the quantised types. Quantised types need a multiple of 32 values. Only the types
/// of [`DType::ENCODABLE`] can be written; the others are an [`KernelError::UnsupportedDType`] error.
pub fn quantize(dtype: DType, src: &[f32]) -> Result<Vec<u8>> {
    let len = dtype.bytes_for(src.len()).ok_or(KernelError::PartialBlock {
        dtype,
        len: src.len(),
        block: dtype.block_elems(),
    })?;
    let mut out = Vec::with_capacity(len);
    match dtype {
        DType::F32 => src.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => src.iter().for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        DType::BF16 => src.iter().for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        DType::Q8_0 => quantize_blocks(src, &mut out, BlockQ8_0::quantize),
        DType::Q4_0 => quantize_blocks(src, &mut out, BlockQ4_0::quantize),
        DType::Q4_1 => quantize_blocks(src, &mut out, BlockQ4_1::quantize),
        DType::Q5_0 => src.chunks_exact(QK).for_each(|b| superblock::quantize_q5_0(b, &mut out)),
        DType::Q5_1 => src.chunks_exact(QK).for_each(|b| superblock::quantize_q5_1(b, &mut out)),
        DType::IQ4_NL | DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
            return Err(KernelError::UnsupportedDType { op: "quantize", dtype });
        }
    }
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

fn quantize_blocks<B: Pod>(src: &[f32], out: &mut Vec<u8>, f: impl Fn(&[f32; QK]) -> B) {
    for chunk in src.chunks_exact(QK) {
        let block: &[f32; QK] = chunk.try_into().expect("chunks_exact yields QK elements");
        out.extend_from_slice(bytemuck::bytes_of(&f(block)));
    }
}

/// Decodes GGUF bytes of `dtype` into `dst`; `src` must hold exactly `dst.len()` values and may be unaligned.
pub fn dequantize(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_len("dequantize", dtype, dst.len(), src.len())?;
    match dtype {
        DType::F32 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
            Ok(halves) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(halves, dst),
            Err(_) => {
                for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        DType::BF16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::Q8_0 => dequantize_blocks::<BlockQ8_0>(src, dst, BlockQ8_0::dequantize),
        DType::Q4_0 => dequantize_blocks::<BlockQ4_0>(src, dst, BlockQ4_0::dequantize),
        DType::Q4_1 => dequantize_blocks::<BlockQ4_1>(src, dst, BlockQ4_1::dequantize),
        DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => {
            for (blk, out) in src.chunks_exact(dtype.block_bytes()).zip(dst.chunks_exact_mut(QK)) {
                superblock::dequantize32(dtype, blk, out);
            }
        }
        DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
            for (blk, out) in src.chunks_exact(dtype.block_bytes()).zip(dst.chunks_exact_mut(superblock::QK_K)) {
                superblock::dequantize(dtype, blk, out);
            }
        }
    }
    Ok(())
}

fn dequantize_blocks<B: Pod>(src: &[u8], dst: &mut [f32], f: impl Fn(&B, &mut [f32; QK])) {
    let size = std::mem::size_of::<B>();
    for (bytes, out) in src.chunks_exact(size).zip(dst.chunks_exact_mut(QK)) {
        let block: B = bytemuck::pod_read_unaligned(bytes);
        f(&block, out.try_into().expect("chunks_exact_mut yields QK elements"));
    }
}

/// Decodes row `row` of a row-major matrix of `cols` columns stored as `dtype` (e.g. one embedding vector).
pub fn dequantize_row(dtype: DType, src: &[u8], cols: usize, row: usize, dst: &mut [f32]) -> Result<()> {
    let row_bytes =
        dtype.bytes_for(cols).ok_or(KernelError::PartialBlock { dtype, len: cols, block: dtype.block_elems() })?;
    let start = row.checked_mul(row_bytes).filter(|s| s + row_bytes <= src.len()).ok_or_else(|| {
        crate::error::shape_err("dequantize_row", format!("row {row} of {cols} columns is outside {} bytes", src.len()))
    })?;
    dequantize(dtype, &src[start..start + row_bytes], dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_ggml() {
        for dt in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let size = match dt {
                DType::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
                DType::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
                _ => std::mem::size_of::<BlockQ4_1>(),
            };
            assert_eq!(size, dt.block_bytes());
        }
    }

    #[test]
    fn partial_blocks_are_refused() {
        assert!(matches!(quantize(DType::Q4_1, &[1.0; 33]), Err(KernelError::PartialBlock { .. })));
        let mut out = [0.0; 32];
        assert!(matches!(dequantize(DType::Q8_0, &[0; 33], &mut out), Err(KernelError::ByteLength { .. })));
    }
}
