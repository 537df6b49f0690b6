//! Portable kernels: the literal form of the arithmetic defined in [`super`], which the SIMD levels must match.
// Register tiles and lanes are fixed-size arrays indexed by row, activation row and lane; index loops
// mirror the definitions in `super` most directly.
#![allow(clippy::needless_range_loop)]

use std::ops::Range;

use half::{bf16, f16};

use super::act::QuantAct;
use super::{Out, Rhs, Weights, fold8};
use crate::DType;
use crate::quant::QK;
use crate::superblock;

pub(super) fn gemm(w: &Weights<'_>, x: Rhs<'_>, t_rows: usize, rows: Range<usize>, out: Out) {
    for n in rows {
        let row = w.row(n);
        for t in 0..t_rows {
            let v = match x {
                Rhs::Float(x) => dot_float(w.dtype, row, &x[t * w.k..(t + 1) * w.k]),
                Rhs::Quant(a) if w.dtype.is_super_block() => dot_super(w.dtype, row, a, t),
                Rhs::Quant(a) => dot_quant(w.dtype, row, a, t),
            };
            // SAFETY: `gemm`'s caller guarantees `out` covers `t_rows × rows.end` and gives this task these columns.
            unsafe { out.put(t, n, v) };
        }
    }
}

#[inline]
fn weight_at(dtype: DType, row: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F16 => f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
        DType::BF16 => bf16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
        _ => f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]]),
    }
}

/// Float weights: 32 fused multiply-add lanes, folded in halves.
fn dot_float(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    for (i, &xv) in x.iter().enumerate() {
        acc[i % 32] = weight_at(dtype, row, i).mul_add(xv, acc[i % 32]);
    }
    let mut v16 = [0.0f32; 16];
    for i in 0..16 {
        v16[i] = acc[i] + acc[i + 16];
    }
    let mut v8 = [0.0f32; 8];
    for i in 0..8 {
        v8[i] = v16[i] + v16[i + 8];
    }
    fold8(v8)
}

/// Quantised weights: exact integer lane sums per block, scaled and accumulated by block parity.
fn dot_quant(dtype: DType, row: &[u8], a: &QuantAct, t: usize) -> f32 {
    let block_bytes = dtype.block_bytes();
    let mut acc = [[0.0f32; 8]; 2];
    let mut macc = [0.0f32; 2];
    for b in 0..a.nb {
        let blk = &row[b * block_bytes..(b + 1) * block_bytes];
        let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let mut wq = [0i32; QK];
        match dtype {
            DType::Q8_0 => {
                for (o, &v) in wq.iter_mut().zip(&blk[2..]) {
                    *o = v as i8 as i32;
                }
            }
            DType::Q4_0 | DType::Q4_1 => {
                let (offset, zero) = if dtype == DType::Q4_0 { (2, 8) } else { (4, 0) };
                for (j, &v) in blk[offset..offset + 16].iter().enumerate() {
                    wq[j] = (v & 0x0f) as i32 - zero;
                    wq[j + 16] = (v >> 4) as i32 - zero;
                }
            }
            DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => {
                let (_, _, codes) = superblock::decode32(dtype, blk);
                for (o, &c) in wq.iter_mut().zip(&codes) {
                    *o = c as i32;
                }
            }
            _ => unreachable!("dot_quant is only called for 32-value quantised weights"),
        }
        let aq = a.block_values(t, b);
        let scale = dw * a.d[t * a.blocks + b];
        let h = b % 2;
        for l in 0..8 {
            let p: i32 = (4 * l..4 * l + 4).map(|i| wq[i] * aq[i] as i32).sum();
            acc[h][l] = scale.mul_add(p as f32, acc[h][l]);
        }
        if matches!(dtype, DType::Q4_1 | DType::Q5_1) {
            let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
            macc[h] = m.mul_add(a.s[t * a.blocks + b], macc[h]);
        }
    }
    let mut v8 = [0.0f32; 8];
    for l in 0..8 {
        v8[l] = acc[0][l] + acc[1][l];
    }
    let r = fold8(v8);
    if matches!(dtype, DType::Q4_1 | DType::Q5_1) { r + (macc[0] + macc[1]) } else { r }
}

/// Super-block weights against Q8_K activations: per super-block, exact integer lane sums of scale · code · a
/// (lane `l` of each 32-value chunk holds its values `4l..4l+4`), one fused multiply-add per lane with `d_w · d_a`,
/// and for formats with minimums one running `fma(dmin_w · d_a, Σ min · bsum, macc)`, subtracted at the end.
fn dot_super(dtype: DType, row: &[u8], a: &QuantAct, t: usize) -> f32 {
    let block_bytes = dtype.block_bytes();
    let mut acc = [0.0f32; 8];
    let mut macc = 0.0f32;
    for b in 0..a.nb {
        let sb = superblock::decode(dtype, &row[b * block_bytes..(b + 1) * block_bytes]);
        let aq = a.super_values(t, b);
        let mut lanes = [0i32; 8];
        for (e, (&c, &v)) in sb.codes.iter().zip(aq).enumerate() {
            lanes[(e % 32) / 4] += sb.scales[e / 16] as i32 * (c as i32 * v as i32);
        }
        let da = a.d[t * a.blocks + b];
        let scale = sb.d * da;
        for l in 0..8 {
            acc[l] = scale.mul_add(lanes[l] as f32, acc[l]);
        }
        if superblock::has_mins(dtype) {
            let m: i32 = sb.mins.iter().zip(a.super_bsums(t, b)).map(|(&m, &s)| m as i32 * s as i32).sum();
            macc = (sb.dmin * da).mul_add(m as f32, macc);
        }
    }
    let r = fold8(acc);
    if superblock::has_mins(dtype) { r - macc } else { r }
}
