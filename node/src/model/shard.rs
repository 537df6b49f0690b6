//! A shard: exactly the blocks `a..b` of a model, plus the token embeddings when `a == 0` and the final norm and LM
//! head when `b == N`. It reads no other layer's weights. The forward pass is written once against [`Backend`], for
//! every architecture: the optional parts of a block (Q/K/V biases, per-head Q/K norms) are present or not as the
//! model's [`BlockLayout`](crate::model::BlockLayout) says.

use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;

use shardline_kernels::{AttnSeq, AttnShape, Backend, Draw, Sampled, SamplingParams, Tensor};
use tracing::debug;

use crate::error::{ModelError, Result};
use crate::model::kv_cache::{BlockAllocator, BlockReservation, KvPool};
use crate::model::{ModelConfig, WeightSource};
use shardline_proto::LayerRange;

mod graph_step;

/// Tunables of a loaded shard.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    /// Bytes of device memory for the KV-cache pool of this shard (all sessions together).
    pub kv_budget_bytes: usize,
    /// Token slots per KV-cache block.
    pub block_tokens: usize,
}

impl Default for ShardOptions {
    fn default() -> Self {
        Self { kv_budget_bytes: 256 << 20, block_tokens: 16 }
    }
}

/// What a shard consumes: token ids (first stage only) or the hidden states of the previous stage `[T, hidden]`.
#[derive(Clone, Copy)]
pub enum ShardInput<'a> {
    Tokens(&'a [u32]),
    Hidden(&'a Tensor),
}

/// What a shard produces: hidden states `[T, hidden]` for the next stage, or logits (last stage).
#[derive(Debug)]
pub enum ShardOutput {
    Hidden(Tensor),
    /// `[1, vocab]` for the last position, or `[T, vocab]` when every position was asked for.
    Logits(Tensor),
}

/// A projection `y = x·Wᵀ (+ b)`.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// One transformer block; the optional parts are those its [`BlockLayout`](crate::model::BlockLayout) names.
struct Block {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Tensor,
    /// Per-head RMSNorm weights of Q and K (`head_dim` each), applied before RoPE.
    qk_norm: Option<(Tensor, Tensor)>,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

impl Block {
    /// Tensors a block of this layout loads.
    fn tensor_count(layout: crate::model::BlockLayout) -> usize {
        9 + 3 * usize::from(layout.qkv_bias) + 2 * usize::from(layout.qk_norm)
    }
}

struct Head {
    norm: Tensor,
    lm_head: Tensor,
}

/// A session's state on this shard: its KV-cache blocks and how many positions are filled.
#[derive(Debug)]
pub struct ShardKv {
    reservation: BlockReservation,
    capacity: usize,
    len: usize,
}

impl ShardKv {
    /// Positions already in the KV cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this session reserved.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

pub struct Shard {
    config: ModelConfig,
    layers: LayerRange,
    backend: Arc<dyn Backend>,
    embeddings: Option<Tensor>,
    blocks: Vec<Block>,
    head: Option<Head>,
    inv_freq: Tensor,
    kv: Mutex<KvPool>,
    allocator: Arc<Mutex<BlockAllocator>>,
    block_tokens: usize,
    /// Padding sessions of the decode step's CUDA graphs (`graph_step.rs`).
    steps: graph_step::DecodeSteps,
    /// The logits of the last batch whose rows were copied out item by item, kept for the next one of the same
    /// shape: a fresh multi-megabyte buffer per decode step is mapped anew by the allocator each time, and its page
    /// faults cost about as much as the LM head's multiply over it (CPU, 16 rows). At most [`KEEP_LOGITS_ROWS`] rows.
    logits_scratch: Mutex<Option<Tensor>>,
    /// One-row logits of items handed back after their token was drawn ([`Shard::recycle_logits`]), reused for the
    /// next batch's per-item copies: 16 fresh `[1, vocab]` buffers a decode step were mapped, zeroed and faulted in
    /// anew each time (docs/PERFORMANCE.md, "the 16-row AVX2 kernel"). At most [`KEEP_LOGITS_ROWS`] of them.
    row_logits: Mutex<Vec<Tensor>>,
}

/// Largest batch of logit rows whose buffer a shard keeps between forwards (3 MiB for SmolLM2 at 16 rows).
const KEEP_LOGITS_ROWS: usize = 64;

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("layers", &self.layers).field("backend", &self.backend.kind()).finish()
    }
}

fn upload(backend: &dyn Backend, source: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let entry = source.tensor(name)?;
    if entry.shape != shape {
        return Err(ModelError::TensorShape { name: name.to_string(), expected: shape.to_vec(), found: entry.shape });
    }
    Ok(backend.upload_weight(entry.dtype, &entry.shape, entry.bytes)?)
}

impl Shard {
    /// Loads the blocks `layers` (and embeddings / head when the range touches either end) onto `backend`.
    pub fn load(
        source: &dyn WeightSource,
        layers: LayerRange,
        backend: Arc<dyn Backend>,
        opts: ShardOptions,
    ) -> Result<Self> {
        Self::load_with_progress(source, layers, backend, opts, &mut |_, _| {})
    }

    /// As [`Shard::load`], reporting `(tensors loaded, tensors total)` as it goes.
    pub fn load_with_progress(
        source: &dyn WeightSource,
        layers: LayerRange,
        backend: Arc<dyn Backend>,
        opts: ShardOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let c = source.config().clone();
        layers.check(c.n_layers)?;
        if c.head_dim == 0 || c.n_heads == 0 || c.hidden == 0 {
            return Err(ModelError::Invalid("the model has zero-sized heads or hidden state".into()));
        }
        let (h, q_w, kv_w, ffn) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn);
        if c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(ModelError::Invalid(format!(
                "{} attention heads cannot be grouped over {} KV heads",
                c.n_heads, c.n_kv_heads
            )));
        }
        let has_embeddings = layers.start == 0;
        let has_head = layers.end == c.n_layers;
        let layout = c.architecture.layout();
        let total =
            layers.len() * Block::tensor_count(layout) + usize::from(has_embeddings) + 2 * usize::from(has_head);
        let mut done = 0;
        let mut step = |progress: &mut dyn FnMut(usize, usize)| {
            done += 1;
            progress(done, total);
        };
        let b = backend.as_ref();
        let embeddings = if has_embeddings {
            let t = upload(b, source, "token_embd.weight", &[c.vocab, h])?;
            step(progress);
            Some(t)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(layers.len());
        for i in layers.start..layers.end {
            let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
                let t = upload(b, source, &format!("blk.{i}.{name}"), shape)?;
                step(progress);
                Ok(t)
            };
            let mut linear = |stem: &str, out_w: usize| -> Result<Linear> {
                let weight = get(&format!("{stem}.weight"), &[out_w, h])?;
                let bias = layout.qkv_bias.then(|| get(&format!("{stem}.bias"), &[out_w])).transpose()?;
                Ok(Linear { weight, bias })
            };
            let (wq, wk, wv) = (linear("attn_q", q_w)?, linear("attn_k", kv_w)?, linear("attn_v", kv_w)?);
            let qk_norm = match layout.qk_norm {
                true => Some((get("attn_q_norm.weight", &[c.head_dim])?, get("attn_k_norm.weight", &[c.head_dim])?)),
                false => None,
            };
            blocks.push(Block {
                attn_norm: get("attn_norm.weight", &[h])?,
                wq,
                wk,
                wv,
                wo: get("attn_output.weight", &[h, q_w])?,
                qk_norm,
                ffn_norm: get("ffn_norm.weight", &[h])?,
                w_gate: get("ffn_gate.weight", &[ffn, h])?,
                w_up: get("ffn_up.weight", &[ffn, h])?,
                w_down: get("ffn_down.weight", &[h, ffn])?,
            });
        }
        let head = if has_head {
            let norm = upload(b, source, "output_norm.weight", &[h])?;
            step(progress);
            let name = if c.tied_embeddings { "token_embd.weight" } else { "output.weight" };
            let lm_head = upload(b, source, name, &[c.vocab, h])?;
            step(progress);
            Some(Head { norm, lm_head })
        } else {
            None
        };
        let mut inv_freq = c.rope.inv_freq();
        if let Some(factors) = &c.rope_freq_factors {
            if factors.len() != inv_freq.len() {
                return Err(ModelError::BadMetadata {
                    key: "rope_freqs.weight".into(),
                    detail: format!("{} factors for {} frequencies", factors.len(), inv_freq.len()),
                });
            }
            inv_freq.iter_mut().zip(factors).for_each(|(f, d)| *f /= d);
        }
        let inv_freq = b.rope_table(&inv_freq)?;
        let block_tokens = opts.block_tokens.max(1);
        let (kv, allocator) = KvPool::new(b, layers.len(), kv_w, block_tokens, opts.kv_budget_bytes)?;
        debug!(%layers, kv_blocks = kv.n_blocks, block_tokens, "shard loaded");
        Ok(Self {
            config: c,
            layers,
            backend,
            embeddings,
            blocks,
            head,
            inv_freq,
            kv: Mutex::new(kv),
            allocator,
            block_tokens,
            steps: graph_step::DecodeSteps::default(),
            logits_scratch: Mutex::new(None),
            row_logits: Mutex::new(Vec::new()),
        })
    }

    pub fn layers(&self) -> LayerRange {
        self.layers
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn has_embeddings(&self) -> bool {
        self.embeddings.is_some()
    }

    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// Free KV-cache capacity in tokens (whole blocks).
    pub fn free_kv_tokens(&self) -> usize {
        self.allocator.lock().free_blocks() * self.block_tokens
    }

    /// Total KV-cache capacity in tokens.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.allocator.lock().total_blocks() * self.block_tokens
    }

    /// Admits a session that will hold at most `max_tokens` positions, reserving its KV-cache blocks now.
    pub fn open_session(&self, max_tokens: usize) -> Result<ShardKv> {
        if max_tokens > self.config.context_length {
            return Err(ModelError::ContextOverflow {
                tokens: max_tokens,
                max_new: 0,
                context: self.config.context_length,
            });
        }
        let reservation = BlockReservation::reserve(&self.allocator, max_tokens, self.block_tokens)?;
        Ok(ShardKv { capacity: reservation.blocks().len() * self.block_tokens, reservation, len: 0 })
    }

    /// Runs the shard on `T` new positions of a session, appending them to its KV cache. The last stage returns the
    /// logits of the last position only.
    /// On the CUDA backend a one-token step is replayed as a graph (`forward_batch_stepped`): read its output before
    /// the shard's next one-token step.
    pub fn forward(&self, s: &mut ShardKv, input: ShardInput<'_>) -> Result<ShardOutput> {
        self.forward_inner(s, input, self.layers, false)
    }

    /// As [`Shard::forward`], but runs only the blocks `span` (inside this shard's layers). A pipeline stage may run
    /// a suffix of its shard when the route joins it midway (overlapping layouts such as `0..16` + `10..30`); a
    /// session must use the same span for all its positions. Tokens go in only when `span` starts at layer 0, and
    /// logits come out only when it ends at the model's last layer.
    pub fn forward_span(&self, s: &mut ShardKv, input: ShardInput<'_>, span: LayerRange) -> Result<ShardOutput> {
        self.forward_inner(s, input, span, false)
    }

    /// As [`Shard::forward`], but the last stage returns logits for every position (teacher forcing, evaluation).
    pub fn forward_all_logits(&self, s: &mut ShardKv, input: ShardInput<'_>) -> Result<ShardOutput> {
        self.forward_inner(s, input, self.layers, true)
    }

    /// Hands back the logits of an item's output ([`ShardOutput::Logits`]) once they have been read, so that a later
    /// batched forward copies an item's row into this buffer instead of a new one. Only one-row logits of this
    /// shard's shape in memory of their own are kept (never a CUDA graph's buffer, which a replay rewrites), at most
    /// [`KEEP_LOGITS_ROWS`]; anything else is dropped. Every row of a reused buffer is overwritten before it is read.
    pub fn recycle_logits(&self, logits: Tensor) {
        let vocab = self.config.vocab;
        if logits.shape() != [1, vocab] || logits.share().is_some() {
            return;
        }
        let mut kept = self.row_logits.lock();
        if kept.len() < KEEP_LOGITS_ROWS {
            kept.push(logits);
        }
    }

    /// Draws the next token from `logits` (row 0 when there is one row, else the last row).
    pub fn sample(&self, logits: &Tensor, params: &SamplingParams, position: u64, n_top: usize) -> Result<Sampled> {
        let row = logits.rows().saturating_sub(1);
        Ok(self.backend.sample(logits, row, params, position, n_top)?)
    }

    /// [`Shard::sample`] for several outputs at once (the sessions of one batched step), on the backend's threads
    /// where it has several; each result is what `sample` gives for that output alone.
    pub fn sample_many(&self, draws: &[(&Tensor, SamplingParams, u64, usize)]) -> Vec<Result<Sampled>> {
        let draws: Vec<Draw<'_>> = draws
            .iter()
            .map(|(logits, params, position, n_top)| Draw {
                logits,
                row: logits.rows().saturating_sub(1),
                params,
                position: *position,
                n_top: *n_top,
            })
            .collect();
        self.backend.sample_many(&draws).into_iter().map(|r| r.map_err(ModelError::from)).collect()
    }

    fn forward_inner(
        &self,
        s: &mut ShardKv,
        input: ShardInput<'_>,
        span: LayerRange,
        all_logits: bool,
    ) -> Result<ShardOutput> {
        let head = if all_logits { HeadRows::All } else { HeadRows::Last };
        let mut items = [BatchItem { kv: s, input, head }];
        // A one-token decode step runs as the backend's CUDA graph for batches of one (graph_step.rs); on the CUDA
        // backend its outputs then live in the graph's buffers until this shard's next decode step.
        let mut out = self.forward_batch_stepped(&mut items, span)?;
        out.pop().ok_or_else(|| ModelError::Invalid("a batch of one gave no output".into()))
    }

    /// Runs the blocks `span` over the new positions of several sessions at once: their rows are concatenated into
    /// one `[Σ T_i, hidden]` activation, every projection is one matmul over all of them, and attention is one call
    /// with one [`AttnSeq`] per session over the shared paged KV pool. Returns one output per item, in order: hidden
    /// states `[T_i, hidden]` when `span` stops before the model's end, else what the item's [`HeadRows`] asks for.
    ///
    /// A session's output does not depend on its batch mates: on the CPU every kernel quantises and reduces each
    /// row on its own, in a fixed order (docs/ARCHITECTURE.md, "Determinism"), so the rows are bit-identical to a
    /// forward of that session alone. The KV pool is locked once for the whole batch. Every item is checked before
    /// anything runs, so an error leaves every session's KV cache as it was.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>], span: LayerRange) -> Result<Vec<ShardOutput>> {
        let c = &self.config;
        if span.start < self.layers.start || span.end > self.layers.end || span.is_empty() {
            return Err(ModelError::Invalid(format!("span {span} is not inside shard {}", self.layers)));
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let b = self.backend.as_ref();
        // Rows of each item in the concatenated activation.
        let mut ranges = Vec::with_capacity(items.len());
        let mut total = 0usize;
        for item in items.iter() {
            let t = match &item.input {
                ShardInput::Tokens(ids) => {
                    if self.embeddings.is_none() || span.start != 0 {
                        return Err(ModelError::Invalid(format!("span {span} takes hidden states, not tokens")));
                    }
                    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab) {
                        return Err(ModelError::Invalid(format!(
                            "token id {bad} is outside the vocabulary of {}",
                            c.vocab
                        )));
                    }
                    ids.len()
                }
                ShardInput::Hidden(h) => {
                    if h.cols() != c.hidden {
                        return Err(ModelError::Invalid(format!(
                            "hidden states of width {} for a model of width {}",
                            h.cols(),
                            c.hidden
                        )));
                    }
                    if span.start == 0 {
                        return Err(ModelError::Invalid(format!("span {span} takes tokens, not hidden states")));
                    }
                    h.rows()
                }
            };
            if t == 0 {
                return Err(ModelError::Invalid("forward called with no positions".into()));
            }
            let s = &item.kv;
            if s.len + t > s.capacity {
                return Err(ModelError::ContextOverflow { tokens: s.len + t, max_new: 0, context: s.capacity });
            }
            ranges.push(total..total + t);
            total += t;
        }
        let t = total;
        let mut x = b.alloc(&[t, c.hidden])?;
        let ids: Vec<u32> = items
            .iter()
            .filter_map(|i| match &i.input {
                ShardInput::Tokens(ids) => Some(ids.iter().copied()),
                ShardInput::Hidden(_) => None,
            })
            .flatten()
            .collect();
        match &self.embeddings {
            Some(table) if span.start == 0 => b.embedding(table, &ids, &mut x)?,
            _ => {
                for (item, r) in items.iter().zip(&ranges) {
                    if let ShardInput::Hidden(h) = &item.input {
                        b.copy_rows(h, 0, &mut x, r.start, r.len())?;
                    }
                }
            }
        }
        let bt = self.block_tokens;
        let mut positions = Vec::with_capacity(t);
        let mut slots = Vec::with_capacity(t);
        for (item, r) in items.iter().zip(&ranges) {
            let pos0 = item.kv.len;
            let blocks = item.kv.reservation.blocks();
            for p in pos0..pos0 + r.len() {
                positions.push(p as u32);
                slots.push(kv_slot(blocks, p, bt).ok_or_else(|| {
                    ModelError::Invalid(format!("position {p} is past the session's {} KV blocks", blocks.len()))
                })?);
            }
        }
        let seqs: Vec<AttnSeq<'_>> = items
            .iter()
            .zip(&ranges)
            .map(|(item, r)| AttnSeq { rows: r.clone(), pos0: item.kv.len, block_table: item.kv.reservation.blocks() })
            .collect();
        let (q_w, kv_w) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let shape = AttnShape {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            block_tokens: bt,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let mut h = b.alloc(&[t, c.hidden])?;
        let mut q = b.alloc(&[t, q_w])?;
        let mut k = b.alloc(&[t, kv_w])?;
        let mut v = b.alloc(&[t, kv_w])?;
        let mut att = b.alloc(&[t, q_w])?;
        let mut o = b.alloc(&[t, c.hidden])?;
        let mut gate = b.alloc(&[t, c.ffn])?;
        let mut up = b.alloc(&[t, c.ffn])?;
        let mut act = b.alloc(&[t, c.ffn])?;
        // Scratch for the per-head Q/K norms (Qwen3), swapped with `q`/`k` by `head_rms_norm`.
        let mut qk_scratch = None;
        let mut kv = self.kv.lock();
        let (lo, hi) = (span.start - self.layers.start, span.end - self.layers.start);
        let blocks = &self.blocks[lo..hi];
        // The first block's attention norm; every later one is fused with the residual add before it (below).
        if let Some(first) = blocks.first() {
            b.rms_norm(&x, &first.attn_norm, c.rms_eps, &mut h)?;
        }
        for (i, (blk, (k_cache, v_cache))) in blocks.iter().zip(kv.layers[lo..hi].iter_mut()).enumerate() {
            // q, k, v read the same normalised rows: one activation quantisation for the three on CUDA.
            b.matmul_many(&h, &mut [(&blk.wq.weight, &mut q), (&blk.wk.weight, &mut k), (&blk.wv.weight, &mut v)])?;
            for (lin, out) in [(&blk.wq, &mut q), (&blk.wk, &mut k), (&blk.wv, &mut v)] {
                if let Some(bias) = &lin.bias {
                    b.add_bias(out, bias)?;
                }
            }
            if let Some((q_norm, k_norm)) = &blk.qk_norm {
                if qk_scratch.is_none() {
                    qk_scratch = Some((b.alloc(&[t, q_w])?, b.alloc(&[t, kv_w])?));
                }
                if let Some((q_scratch, k_scratch)) = qk_scratch.as_mut() {
                    head_rms_norm(b, &mut q, q_scratch, c.n_heads, q_norm, c.rms_eps)?;
                    head_rms_norm(b, &mut k, k_scratch, c.n_kv_heads, k_norm, c.rms_eps)?;
                }
            }
            // rope(q), rope(k), kv_store: one kernel on CUDA (docs/CUDA.md, "Fusion").
            let heads = (c.n_heads, c.n_kv_heads);
            let caches = (&mut *k_cache, &mut *v_cache);
            b.rope_kv_store(&mut q, &mut k, &v, &positions, heads, &self.inv_freq, &c.rope, caches, &slots)?;
            b.attention(&q, k_cache, v_cache, &seqs, &shape, &mut att)?;
            b.matmul(&att, &blk.wo, &mut o)?;
            b.add_rms_norm(&mut x, &o, &blk.ffn_norm, c.rms_eps, &mut h)?;
            // gate, up and SwiGLU: one GEMV on CUDA (docs/CUDA.md, "Fusion").
            b.matmul_swiglu(&h, (&blk.w_gate, &blk.w_up), (&mut gate, &mut up), &mut act)?;
            b.matmul(&act, &blk.w_down, &mut o)?;
            match blocks.get(i + 1) {
                // The residual add and the next block's attention norm in one kernel (the same values).
                Some(next) => b.add_rms_norm(&mut x, &o, &next.attn_norm, c.rms_eps, &mut h)?,
                None => b.add(&mut x, &o)?,
            }
        }
        drop(kv);
        drop(seqs);
        for (item, r) in items.iter_mut().zip(&ranges) {
            item.kv.len += r.len();
        }
        let head = if span.end == c.n_layers { self.head.as_ref() } else { None };
        let Some(head) = head else {
            return split_rows(b, x, &ranges, c.hidden, ShardOutput::Hidden);
        };
        // Rows of `x` that go through the head, item by item.
        let wanted: Vec<Range<usize>> = items
            .iter()
            .zip(&ranges)
            .map(|(item, r)| match item.head {
                HeadRows::None => r.end..r.end,
                HeadRows::Last => r.end - 1..r.end,
                HeadRows::All => r.clone(),
            })
            .collect();
        let rows: usize = wanted.iter().map(Range::len).sum();
        let mut logits = None;
        if rows > 0 {
            let mut last = b.alloc(&[rows, c.hidden])?;
            let mut at = 0;
            for w in &wanted {
                b.copy_rows(&x, w.start, &mut last, at, w.len())?;
                at += w.len();
            }
            let mut normed = b.alloc(&[rows, c.hidden])?;
            b.rms_norm(&last, &head.norm, c.rms_eps, &mut normed)?;
            // Every row is overwritten by the matmul, so a kept buffer of this shape serves as well as a new one.
            let kept = self.logits_scratch.lock().take().filter(|t| t.shape() == [rows, c.vocab]);
            let mut l = match kept {
                Some(t) => t,
                None => b.alloc(&[rows, c.vocab])?,
            };
            b.matmul(&normed, &head.lm_head, &mut l)?;
            logits = Some(l);
        }
        let mut out = Vec::with_capacity(items.len());
        // Where each item's logits start in `logits` (in the order of the `Logits` outputs), copied out together
        // below.
        let mut starts = Vec::with_capacity(items.len());
        let mut at = 0;
        for (w, r) in wanted.iter().zip(&ranges) {
            if w.is_empty() {
                // No head rows asked for: the item's final hidden states (before the output norm).
                let mut hid = b.alloc(&[r.len(), c.hidden])?;
                b.copy_rows(&x, r.start, &mut hid, 0, r.len())?;
                out.push(ShardOutput::Hidden(hid));
                continue;
            }
            if logits.is_none() {
                return Err(ModelError::Invalid("head rows without logits".into()));
            }
            if wanted.len() == 1 {
                return Ok(vec![ShardOutput::Logits(
                    logits.take().ok_or_else(|| ModelError::Invalid("head rows without logits".into()))?,
                )]);
            }
            let kept = if w.len() == 1 { self.row_logits.lock().pop() } else { None };
            let mine = match kept {
                Some(t) => t,
                None => b.alloc(&[w.len(), c.vocab])?,
            };
            starts.push(at);
            at += w.len();
            out.push(ShardOutput::Logits(mine));
        }
        if let Some(l) = logits.as_ref() {
            let mine = out.iter_mut().filter_map(|o| match o {
                ShardOutput::Logits(t) => Some(t),
                ShardOutput::Hidden(_) => None,
            });
            let mut parts: Vec<(usize, &mut Tensor)> = starts.into_iter().zip(mine).collect();
            b.split_rows(l, &mut parts)?;
        }
        if let Some(l) = logits.filter(|l| l.rows() <= KEEP_LOGITS_ROWS) {
            *self.logits_scratch.lock() = Some(l);
        }
        Ok(out)
    }
}

/// The KV-cache slot of position `p` of a session whose blocks are `blocks` (`block_tokens` slots each): what
/// `Shard::forward_batch` stores the position's keys and values in (and `graph_step.rs` hands a graph backend).
fn kv_slot(blocks: &[u32], p: usize, block_tokens: usize) -> Option<u32> {
    let block = *blocks.get(p / block_tokens)?;
    u32::try_from(block as usize * block_tokens + p % block_tokens).ok()
}

impl ShardOutput {
    /// A second handle to the output's tensor where its memory is a CUDA graph's buffer ([`Tensor::share`]).
    fn share(&self) -> Option<ShardOutput> {
        Some(match self {
            ShardOutput::Hidden(t) => ShardOutput::Hidden(t.share()?),
            ShardOutput::Logits(t) => ShardOutput::Logits(t.share()?),
        })
    }
}

/// How much of the LM head an item of a batched forward wants when its span ends at the model's last layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadRows {
    /// No logits (a prefill chunk that samples nothing): the output is the item's final hidden states.
    None,
    /// Logits of the item's last position, `[1, vocab]`.
    Last,
    /// Logits of every position of the item, `[T, vocab]` (teacher forcing, evaluation).
    All,
}

/// One session's part of [`Shard::forward_batch`]: its KV cache, its new positions, and what it wants of the head.
pub struct BatchItem<'a> {
    pub kv: &'a mut ShardKv,
    pub input: ShardInput<'a>,
    pub head: HeadRows,
}

/// Splits `x` into one tensor per range of rows (no copy when there is a single range covering it).
fn split_rows(
    b: &dyn Backend,
    x: Tensor,
    ranges: &[Range<usize>],
    width: usize,
    wrap: fn(Tensor) -> ShardOutput,
) -> Result<Vec<ShardOutput>> {
    if let [only] = ranges
        && only.start == 0
        && only.end == x.rows()
    {
        return Ok(vec![wrap(x)]);
    }
    ranges
        .iter()
        .map(|r| {
            let mut part = b.alloc(&[r.len(), width])?;
            b.copy_rows(&x, r.start, &mut part, 0, r.len())?;
            Ok(wrap(part))
        })
        .collect()
}

/// RMSNorm of each head of `x: [T, heads·head_dim]` over its `head_dim` values with the shared `weight`, seen as
/// rows of a `[T·heads, head_dim]` tensor (the reshape moves no data). The result ends in `x`; `scratch` (same shape
/// as `x`) receives the old values.
fn head_rms_norm(
    b: &dyn Backend,
    x: &mut Tensor,
    scratch: &mut Tensor,
    heads: usize,
    weight: &Tensor,
    eps: f32,
) -> Result<()> {
    let shape = x.shape().to_vec();
    let head_dim = weight.elem_count();
    let by_head = [x.rows() * heads, head_dim];
    x.reshape(&by_head)?;
    scratch.reshape(&by_head)?;
    b.rms_norm(x, weight, eps, scratch)?;
    x.reshape(&shape)?;
    scratch.reshape(&shape)?;
    std::mem::swap(x, scratch);
    Ok(())
}
