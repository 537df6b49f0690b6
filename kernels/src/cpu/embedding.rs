//! Token embedding gather from a table of any dtype.

use crate::DType;
use crate::error::{Result, shape_err};
use crate::quant;

/// `out[t] = table[ids[t]]`, decoding each row from `dtype`; `table` holds `vocab` rows of `width` values.
pub(crate) fn gather(
    dtype: DType,
    table: &[u8],
    vocab: usize,
    width: usize,
    ids: &[u32],
    out: &mut [f32],
) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(shape_err("embedding", format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(width.max(1))) {
        quant::dequantize_row(dtype, table, width, id as usize, o)?;
    }
    Ok(())
}
