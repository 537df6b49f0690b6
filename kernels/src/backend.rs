//! The compute interface: device-resident tensors, explicit uploads/downloads and the ops of a Llama block.
//! The shard forward pass is written once against this trait; the CPU backend is the reference and the CUDA backend
//! mirrors it op for op, so every kernel is tested against its CPU twin.

use std::fmt;
use std::ops::Range;

use crate::DType;
use crate::error::Result;
use crate::tensor::{HostBytes, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF/llama.cpp "normal" layout (Q/K rows permuted by the converter).
    Interleaved,
    /// Halves `(i, i + d/2)`: Hugging Face / NeoX layout (`rotate_half`).
    Neox,
}

/// Llama 3 frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position: f32,
}

/// Rotary embedding parameters of a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    pub head_dim: usize,
    /// Rotated dimensions per head (normally `head_dim`).
    pub rotary_dim: usize,
    pub theta: f32,
    pub style: RopeStyle,
    pub llama3: Option<Llama3Scaling>,
    /// Linear position scaling (positions are multiplied by this; 1.0 = none).
    pub linear_factor: f32,
}

impl RopeConfig {
    /// Inverse frequencies, `rotary_dim / 2` of them, with Llama 3 scaling applied when configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let half = self.rotary_dim / 2;
        (0..half)
            .map(|i| {
                let base = 1.0 / (self.theta as f64).powf(2.0 * i as f64 / self.rotary_dim as f64);
                let f = match self.llama3 {
                    None => base,
                    Some(s) => {
                        let wavelen = 2.0 * std::f64::consts::PI / base;
                        let low_wavelen = s.original_max_position as f64 / s.low_freq_factor as f64;
                        let high_wavelen = s.original_max_position as f64 / s.high_freq_factor as f64;
                        if wavelen < high_wavelen {
                            base
                        } else if wavelen > low_wavelen {
                            base / s.factor as f64
                        } else {
                            let smooth = (s.original_max_position as f64 / wavelen - s.low_freq_factor as f64)
                                / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                            (1.0 - smooth) * base / s.factor as f64 + smooth * base
                        }
                    }
                };
                (f * self.linear_factor as f64) as f32
            })
            .collect()
    }
}

/// One sequence's share of a batched attention call.
#[derive(Clone, Debug)]
pub struct AttnSeq<'a> {
    /// Rows of `q` (and of `out`) that belong to this sequence.
    pub rows: Range<usize>,
    /// Position of the first of those rows; row `r` attends to positions `0..=pos0 + (r - rows.start)`.
    pub pos0: usize,
    /// KV-cache blocks of this sequence in position order (block `i` holds positions `i*block_tokens..`).
    pub block_table: &'a [u32],
}

/// Attention geometry shared by every sequence of a call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Token slots per KV-cache block.
    pub block_tokens: usize,
    /// Softmax scale, normally `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// How the next token is drawn from the logits. `temperature <= 0` is greedy (argmax).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1.0 = off).
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub const GREEDY: SamplingParams = SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
}

/// A drawn token with its log-probability under the unmodified (temperature 1) distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// The `n_top` most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One draw of [`Backend::sample_many`]: what [`Backend::sample`] takes.
#[derive(Clone, Copy, Debug)]
pub struct Draw<'a> {
    pub logits: &'a Tensor,
    pub row: usize,
    pub params: &'a SamplingParams,
    pub position: u64,
    pub n_top: usize,
}

/// The compute interface. All ops write into preallocated outputs and may run asynchronously on the backend's
/// stream; `download_*` and `sample` synchronise.
pub trait Backend: Send + Sync + fmt::Debug {
    fn kind(&self) -> DeviceKind;

    /// Human-readable device description for logs (e.g. CPU model and threads, GPU name).
    fn describe(&self) -> String;

    /// dtype of activations, hidden states and the KV cache on this backend.
    fn act_dtype(&self) -> DType;

    /// Makes weights of any dtype available to the device. On the CPU this borrows the bytes (no copy).
    fn upload_weight(&self, dtype: DType, shape: &[usize], bytes: HostBytes) -> Result<Tensor>;

    /// Uploads activations given as f32 (converted to `act_dtype`).
    fn upload_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor>;

    /// Uploads activations given as raw little-endian bytes of `dtype` (f32, f16 or bf16): the wire format.
    fn upload_raw(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor>;

    /// Copies a tensor to the host as f32.
    fn download_f32(&self, t: &Tensor) -> Result<Vec<f32>>;

    /// Copies activations to the host as raw little-endian bytes of `dtype` (f32, f16 or bf16).
    fn download_raw(&self, t: &Tensor, dtype: DType) -> Result<Vec<u8>>;

    /// A new activation tensor of `act_dtype`; contents are unspecified until written.
    fn alloc(&self, shape: &[usize]) -> Result<Tensor>;

    /// dtype of the KV cache: `act_dtype` unless the backend was configured otherwise (the CPU backend may keep an
    /// f16 cache while computing in f32, `CpuBackend::with_kv_dtype`).
    fn kv_dtype(&self) -> DType {
        self.act_dtype()
    }

    /// A new KV-cache tensor of `kv_dtype`, the only kind [`Backend::kv_store`] and [`Backend::attention`] take as
    /// caches besides activation tensors.
    fn alloc_kv(&self, shape: &[usize]) -> Result<Tensor> {
        self.alloc(shape)
    }

    /// Waits for every queued op.
    fn synchronize(&self) -> Result<()>;

    /// `out[t] = table[ids[t]]` for a table of any dtype, `out: [ids.len(), width]`.
    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()>;

    /// `out = x / rms(x) * weight` per row.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32, out: &mut Tensor) -> Result<()>;

    /// Fused residual add + RMSNorm: `residual += x; out = rms_norm(residual) * weight`.
    fn add_rms_norm(
        &self,
        residual: &mut Tensor,
        x: &Tensor,
        weight: &Tensor,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()>;

    /// `out[t, n] = Σ_k x[t, k] · w[n, k]` for weights of any dtype; `x: [T, K]`, `w: [N, K]`, `out: [T, N]`.
    fn matmul(&self, x: &Tensor, w: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `outs[i] = x · wᵢᵀ` for several weights applied to the same input (a block's q/k/v projections). Every
    /// backend's result is that of [`Backend::matmul`] per pair, in order; the CUDA backend quantises `x` to Q8 once
    /// for all of them rather than once per GEMV (docs/CUDA.md, "Quantised GEMV").
    fn matmul_many(&self, x: &Tensor, outs: &mut [(&Tensor, &mut Tensor)]) -> Result<()> {
        for (w, out) in outs.iter_mut() {
            self.matmul(x, w, out)?;
        }
        Ok(())
    }

    /// `out = silu(x · w_gateᵀ) ⊙ (x · w_upᵀ)`: the gate and up projections of a feed-forward block and its
    /// SwiGLU. Every backend's result is that of `matmul` into `gate`, `matmul` into `up` and [`Backend::swiglu`]
    /// (`gate` and `up`, `[T, N]`, are scratch the default uses and a fused kernel may leave untouched). The CUDA
    /// backend runs one GEMV over both weights that stores the product (docs/CUDA.md, "Fusion").
    fn matmul_swiglu(
        &self,
        x: &Tensor,
        (w_gate, w_up): (&Tensor, &Tensor),
        (gate, up): (&mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> Result<()> {
        self.matmul(x, w_gate, gate)?;
        self.matmul(x, w_up, up)?;
        self.swiglu(gate, up, out)
    }

    /// Rotates `x: [T, n_heads * head_dim]` in place; row `t` is at position `positions[t]`; the angle of pair `i`
    /// is `positions[t] · inv_freq[i]` (computed in f32). `inv_freq` comes from [`Backend::rope_table`].
    fn rope(
        &self,
        x: &mut Tensor,
        positions: &[u32],
        n_heads: usize,
        inv_freq: &Tensor,
        cfg: &RopeConfig,
    ) -> Result<()>;

    /// Uploads the inverse frequencies (`rotary_dim / 2` of them, see [`RopeConfig::inv_freq`]) once per model,
    /// always kept in f32 whatever `act_dtype` is.
    fn rope_table(&self, inv_freq: &[f32]) -> Result<Tensor>;

    /// `out = silu(gate) * up`, element-wise.
    fn swiglu(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `acc += x`, element-wise.
    fn add(&self, acc: &mut Tensor, x: &Tensor) -> Result<()>;

    /// `x[t, n] += bias[n]` for every row `t` of `x: [T, N]`; `bias` is a weight of `N` values (f32, f16 or bf16).
    /// The bias of a linear layer (Qwen2's Q/K/V projections), added after [`Backend::matmul`].
    fn add_bias(&self, x: &mut Tensor, bias: &Tensor) -> Result<()>;

    /// Copies `n` rows from `src[src_row..]` into `dst[dst_row..]` (same width).
    fn copy_rows(&self, src: &Tensor, src_row: usize, dst: &mut Tensor, dst_row: usize, n: usize) -> Result<()>;

    /// Copies consecutive rows of `src` into several tensors: each `(src_row, dst)` takes all of `dst`'s rows from
    /// `src[src_row..]` (a batched step's logits handed out item by item). Exactly [`Backend::copy_rows`] for each
    /// part; a backend may run them in parallel. Nothing is written unless every part fits.
    fn split_rows(&self, src: &Tensor, parts: &mut [(usize, &mut Tensor)]) -> Result<()> {
        for (at, dst) in parts.iter_mut() {
            let n = dst.rows();
            self.copy_rows(src, *at, dst, 0, n)?;
        }
        Ok(())
    }

    /// Writes row `t` of `k`/`v` (`[T, n_kv_heads * head_dim]`) into token slot `slots[t]` of the paged caches
    /// (`[n_slots, n_kv_heads * head_dim]`, slot = block · block_tokens + offset).
    fn kv_store(&self, k_cache: &mut Tensor, v_cache: &mut Tensor, k: &Tensor, v: &Tensor, slots: &[u32])
    -> Result<()>;

    /// [`Backend::rope`] on `q` (`n_heads`) and `k` (`n_kv_heads`), then [`Backend::kv_store`] of `k` and `v`: the
    /// three ops of a block between the K/V projections and attention. The CUDA backend runs them as one kernel
    /// (docs/CUDA.md, "Fusion"); every backend's result is that of the three ops in that order.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_store(
        &self,
        q: &mut Tensor,
        k: &mut Tensor,
        v: &Tensor,
        positions: &[u32],
        heads: (usize, usize),
        inv_freq: &Tensor,
        cfg: &RopeConfig,
        caches: (&mut Tensor, &mut Tensor),
        slots: &[u32],
    ) -> Result<()> {
        self.rope(q, positions, heads.0, inv_freq, cfg)?;
        self.rope(k, positions, heads.1, inv_freq, cfg)?;
        self.kv_store(caches.0, caches.1, k, v, slots)
    }

    /// Causal grouped-query attention of `q: [rows, n_heads * head_dim]` over the paged KV cache, for one or many
    /// sequences at once; `out` has the shape of `q`. The current rows' keys/values must already be stored.
    fn attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut Tensor,
    ) -> Result<()>;

    /// Draws a token from row `row` of `logits: [rows, vocab]` at sequence `position`, with `n_top` top log-probs.
    fn sample(
        &self,
        logits: &Tensor,
        row: usize,
        params: &SamplingParams,
        position: u64,
        n_top: usize,
    ) -> Result<Sampled>;

    /// [`Backend::sample`] for each draw (one per session of a batched step), in order, each result exactly what
    /// that call gives; a backend may run them in parallel.
    fn sample_many(&self, draws: &[Draw<'_>]) -> Vec<Result<Sampled>> {
        draws.iter().map(|d| self.sample(d.logits, d.row, d.params, d.position, d.n_top)).collect()
    }

    /// Runs one decode step as the CUDA graph of `key` (its batch-size bucket and layer span) where the backend has
    /// graphs, eagerly otherwise (kernels/src/step_graph.rs has the policy). `step` drives this backend through the
    /// trait; it may run twice for one step (a replay that no longer matches, then a capture), so it must reset
    /// any host state it changes first. Tensors allocated inside it belong to the graph: read them before the next
    /// step of the same key. With `inputs` (the step's per-step inputs, [`crate::step_graph::StepInputs`]) a replay
    /// may write the step's staged arguments from them and launch the graph without running `step` at all
    /// ([`crate::step_graph::StepRun::ReplayedDirect`]): the caller then advances its own host state (KV lengths)
    /// and reads the outputs the step produced when it was captured, which the replay rewrote in place.
    fn graph_step(
        &self,
        key: Option<crate::step_graph::GraphKey>,
        inputs: Option<&crate::step_graph::StepInputs<'_>>,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<crate::step_graph::StepRun> {
        let _ = (key, inputs);
        step()?;
        Ok(crate::step_graph::StepRun::Eager)
    }

    /// Whether [`Backend::graph_step`] replays graphs (so padding a decode batch to its bucket pays off).
    fn has_graphs(&self) -> bool {
        false
    }
}
