//! Paged KV cache: a node-wide pool of fixed-size blocks shared by every session of a shard, sized by a byte budget.
//! A session reserves all the blocks it may need when it is admitted, so a running session never fails for memory.

use std::sync::Arc;

use parking_lot::Mutex;

use shardline_kernels::{Backend, Tensor};

use crate::error::{ModelError, Result};

/// Free-list of block ids of one pool.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    fn new(total: usize) -> Self {
        Self { free: (0..total as u32).rev().collect(), total }
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }
}

/// Per-layer key and value caches of one shard, `[n_blocks · block_tokens, n_kv_heads · head_dim]` each.
#[derive(Debug)]
pub struct KvPool {
    pub block_tokens: usize,
    pub n_blocks: usize,
    /// `(k, v)` per layer of the shard, in layer order.
    pub layers: Vec<(Tensor, Tensor)>,
}

impl KvPool {
    /// Allocates as many blocks as `budget_bytes` allows (at least one) for `n_layers` layers.
    pub fn new(
        backend: &dyn Backend,
        n_layers: usize,
        kv_width: usize,
        block_tokens: usize,
        budget_bytes: usize,
    ) -> Result<(Self, Arc<Mutex<BlockAllocator>>)> {
        let elem = backend.kv_dtype().block_bytes();
        let per_block = 2 * n_layers * block_tokens * kv_width * elem;
        let n_blocks = (budget_bytes / per_block.max(1)).max(1);
        let slots = n_blocks * block_tokens;
        let layers = (0..n_layers)
            .map(|_| Ok((backend.alloc_kv(&[slots, kv_width])?, backend.alloc_kv(&[slots, kv_width])?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((Self { block_tokens, n_blocks, layers }, Arc::new(Mutex::new(BlockAllocator::new(n_blocks)))))
    }
}

/// The blocks a session holds; they return to the pool when this is dropped (session closed or abandoned).
#[derive(Debug)]
pub struct BlockReservation {
    blocks: Vec<u32>,
    allocator: Arc<Mutex<BlockAllocator>>,
}

impl BlockReservation {
    /// Reserves enough blocks for `tokens` positions.
    pub fn reserve(allocator: &Arc<Mutex<BlockAllocator>>, tokens: usize, block_tokens: usize) -> Result<Self> {
        let needed = tokens.div_ceil(block_tokens).max(1);
        let mut a = allocator.lock();
        if a.free.len() < needed {
            return Err(ModelError::KvCacheFull { needed, free: a.free.len() });
        }
        let at = a.free.len() - needed;
        let blocks = a.free.split_off(at);
        Ok(Self { blocks, allocator: allocator.clone() })
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

impl Drop for BlockReservation {
    fn drop(&mut self) {
        let mut a = self.allocator.lock();
        a.free.append(&mut self.blocks);
    }
}
