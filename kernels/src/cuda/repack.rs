//! Device layout of quantised weights. ggml blocks interleave scales with the quants, so a row's quants are neither
//! contiguous nor 16-byte aligned. At upload the blocks are split into a quant region (every block's quant bytes in
//! block order) followed by a scale region (the rest of every block — `d`, `d, m`, `qh`, the packed sub-block scales
//! — in block order, each block's rest in ggml's byte order); the kernels (`kernels/cuda/weights.cuh`) then read a
//! row's quants with 16-byte loads. The quant part of every format is a multiple of 16 bytes, so the scale region
//! starts 16-byte aligned. The size is unchanged.

use rayon::prelude::*;

use crate::DType;
use crate::error::{KernelError, Result};

/// The byte range of a ggml block of `dtype` that goes to the quant region (the rest of the block goes to the scale
/// region), or `None` for plain dtypes. Offsets follow `block_*` of ggml-common.h (`superblock.rs` decodes them).
pub fn quant_range(dtype: DType) -> Option<std::ops::Range<usize>> {
    Some(match dtype {
        DType::Q8_0 => 2..34,    // d | qs[32]
        DType::Q4_0 => 2..18,    // d | qs[16]
        DType::Q4_1 => 4..20,    // d, m | qs[16]
        DType::IQ4_NL => 2..18,  // d | qs[16]
        DType::Q5_0 => 6..22,    // d, qh[4] | qs[16]
        DType::Q5_1 => 8..24,    // d, m, qh[4] | qs[16]
        DType::Q2_K => 16..80,   // scales[16] | qs[64] | d, dmin
        DType::Q3_K => 0..96,    // hmask[32], qs[64] | scales[12], d
        DType::Q4_K => 16..144,  // d, dmin, scales[12] | qs[128]
        DType::Q5_K => 16..176,  // d, dmin, scales[12] | qh[32], qs[128]
        DType::Q6_K => 0..192,   // ql[128], qh[64] | scales[16], d
        DType::IQ4_XS => 8..136, // d, scales_h, scales_l[4] | qs[128]
        _ => return None,
    })
}

/// Bytes of quants and of scales in one block of `dtype`, or `None` for plain dtypes.
pub fn block_parts(dtype: DType) -> Option<(usize, usize)> {
    quant_range(dtype).map(|r| (r.len(), dtype.block_bytes() - r.len()))
}

fn parts_or_err(dtype: DType, len: usize) -> Result<(usize, usize, usize)> {
    let (q, s) = block_parts(dtype).ok_or(KernelError::UnsupportedDType { op: "block split", dtype })?;
    if !len.is_multiple_of(q + s) {
        return Err(KernelError::ByteLength {
            what: format!("{dtype} blocks"),
            expected: len.div_ceil(q + s) * (q + s),
            got: len,
        });
    }
    Ok((q, s, len / (q + s)))
}

/// Splits ggml blocks into `[quants of every block][scales of every block]`; returns the bytes and the offset of
/// the scale region.
pub fn split_blocks(dtype: DType, ggml: &[u8]) -> Result<(Vec<u8>, usize)> {
    let (q, s, n) = parts_or_err(dtype, ggml.len())?;
    let r = quant_range(dtype).ok_or(KernelError::UnsupportedDType { op: "block split", dtype })?;
    let mut out = vec![0u8; ggml.len()];
    let (qs, sc) = out.split_at_mut(n * q);
    qs.par_chunks_mut(q).zip(sc.par_chunks_mut(s)).zip(ggml.par_chunks(q + s)).with_min_len(4096).for_each(
        |((qd, sd), block)| {
            qd.copy_from_slice(&block[r.clone()]);
            sd[..r.start].copy_from_slice(&block[..r.start]);
            sd[r.start..].copy_from_slice(&block[r.end..]);
        },
    );
    Ok((out, n * q))
}

/// The inverse of [`split_blocks`]: back to ggml blocks.
pub fn merge_blocks(dtype: DType, split: &[u8]) -> Result<Vec<u8>> {
    let (q, s, n) = parts_or_err(dtype, split.len())?;
    let r = quant_range(dtype).ok_or(KernelError::UnsupportedDType { op: "block merge", dtype })?;
    let (qs, sc) = split.split_at(n * q);
    let mut out = vec![0u8; split.len()];
    out.par_chunks_mut(q + s).zip(qs.par_chunks(q)).zip(sc.par_chunks(s)).with_min_len(4096).for_each(
        |((block, qd), sd)| {
            block[r.clone()].copy_from_slice(qd);
            block[..r.start].copy_from_slice(&sd[..r.start]);
            block[r.end..].copy_from_slice(&sd[r.start..]);
        },
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        (0..n as u64).map(|i| (crate::rng::mix64(seed ^ i) >> 24) as u8).collect()
    }

    #[test]
    fn split_puts_quants_first_and_scales_after_in_block_order() {
        // Two Q4_1 blocks: [d0 d0 m0 m0 q0 x16] [d1 d1 m1 m1 q1 x16].
        let mut ggml = Vec::new();
        for b in 0..2u8 {
            ggml.extend_from_slice(&[10 + b, 20 + b, 30 + b, 40 + b]);
            ggml.extend((0..16).map(|j| b * 100 + j));
        }
        let (split, off) = split_blocks(DType::Q4_1, &ggml).unwrap();
        assert_eq!(off, 32);
        assert_eq!(&split[..16], &(0..16).collect::<Vec<u8>>()[..]);
        assert_eq!(&split[16..32], &(100..116).collect::<Vec<u8>>()[..]);
        assert_eq!(&split[32..], &[10, 20, 30, 40, 11, 21, 31, 41]);
    }

    #[test]
    fn split_and_merge_round_trip_for_every_quantised_type() {
        for dtype in DType::ALL.into_iter().filter(|d| d.is_quantized()) {
            let blocks = 10_007;
            let ggml = pseudo_random(blocks * dtype.block_bytes(), dtype.block_bytes() as u64);
            let (split, off) = split_blocks(dtype, &ggml).unwrap();
            assert_eq!(split.len(), ggml.len());
            assert_eq!(off, blocks * block_parts(dtype).unwrap().0);
            assert_eq!(off % 16, 0, "the scale region must start 16-byte aligned");
            assert_eq!(merge_blocks(dtype, &split).unwrap(), ggml, "{dtype}");
        }
    }

    #[test]
    fn every_quantised_file_type_has_a_split_with_16_byte_quant_parts() {
        for dtype in DType::ALL.into_iter().filter(|d| d.is_quantized()) {
            let (q, s) = block_parts(dtype).unwrap_or_else(|| panic!("{dtype} has no device layout"));
            assert_eq!(q + s, dtype.block_bytes(), "{dtype}");
            assert_eq!(q % 16, 0, "{dtype}: quants of a block must be whole 16-byte vectors");
        }
    }

    #[test]
    fn partial_blocks_and_plain_types_are_refused() {
        assert!(matches!(split_blocks(DType::Q8_0, &[0u8; 35]), Err(KernelError::ByteLength { .. })));
        assert!(matches!(split_blocks(DType::F16, &[0u8; 64]), Err(KernelError::UnsupportedDType { .. })));
    }
}
