//! Writes of new keys and values into the paged KV cache.

use crate::error::{KernelError, Result};

/// Copies row `t` of `k`/`v` (`width` values each) into slot `slots[t]` of the caches (`[n_slots, width]`).
/// Every slot is checked before anything is written, so a bad slot leaves the caches untouched.
pub(crate) fn store(
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    width: usize,
) -> Result<()> {
    let capacity = k_cache.len().checked_div(width).unwrap_or(0);
    if let Some(&slot) = slots.iter().find(|&&s| s as usize >= capacity) {
        return Err(KernelError::KvSlot { slot: slot as usize, capacity });
    }
    for (t, &slot) in slots.iter().enumerate() {
        let (dst, src) = (slot as usize * width, t * width);
        k_cache[dst..dst + width].copy_from_slice(&k[src..src + width]);
        v_cache[dst..dst + width].copy_from_slice(&v[src..src + width]);
    }
    Ok(())
}
