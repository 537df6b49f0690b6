//! CPU reference backend: f32 activations and KV cache, weights borrowed in their file dtype, quantised matmuls on
//! integer SIMD dot products, all work on the backend's own thread pool.
//!
//! Results are bit-identical whatever the thread count, the instruction set ([`SimdLevel`]) and the number of rows
//! a call holds, so a model run whole or split into shards gives the same numbers on any x86-64 CPU (docs/ARCHITECTURE.md, determinism).
//! Other targets run the same portable arithmetic; only RoPE's sine and cosine come from the platform's libm.

mod access;
mod attention;
mod dot;
mod elementwise;
mod embedding;
mod kv_cache;
mod math;
mod matmul;
mod norm;
mod parallel;
mod rope;
pub(crate) mod sample;
mod simd;

pub use simd::SimdLevel;

use crate::backend::{AttnSeq, AttnShape, Backend, DeviceKind, Draw, RopeConfig, Sampled, SamplingParams};
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::{HostBytes, Storage, Tensor};
use crate::{DType, quant};
use access::{KvMut, KvRef, act, act_mut, check_2d, kv, kv_mut, weight_bytes, weight_f32};
use parallel::Pool;

/// Values below which [`Backend::split_rows`] copies on the calling thread.
const SERIAL_COPY: usize = 64 * 1024;

/// The CPU backend. Cheap to share (`&self` everywhere); each call uses the backend's threads.
#[derive(Debug)]
pub struct CpuBackend {
    pool: Pool,
    simd: SimdLevel,
    cpu_name: String,
    /// f32 (default) or f16 ([`CpuBackend::with_kv_dtype`]).
    kv_dtype: DType,
    /// The rotary angles of the last rope call's positions ([`rope::Angles`]).
    angles: parking_lot::Mutex<rope::Angles>,
}

impl CpuBackend {
    /// A backend computing on `threads` threads in total (the calling thread is one of them; 0 counts as 1), with the
    /// fastest instruction set of this CPU. If the OS refuses to start worker threads it computes on the calling
    /// thread alone (and logs why).
    pub fn new(threads: usize) -> Self {
        Self::build(threads, SimdLevel::detect())
    }

    /// Like [`CpuBackend::new`] with a chosen instruction set; `None` if this CPU cannot run it. Results are the same
    /// at every level, only speed differs (used to test exactly that).
    pub fn with_simd(threads: usize, level: SimdLevel) -> Option<Self> {
        level.is_supported().then(|| Self::build(threads, level))
    }

    fn build(threads: usize, simd: SimdLevel) -> Self {
        let pool = Pool::new(threads).unwrap_or_else(|e| {
            tracing::warn!(error = %e, threads, "cannot start CPU worker threads, computing on the caller only");
            Pool::single()
        });
        Self { pool, simd, cpu_name: cpu_name(), kv_dtype: DType::F32, angles: Default::default() }
    }

    /// The same backend with its KV cache kept in `dtype`: f32 (the default) or f16, which halves the cache and
    /// rounds keys, values, the query (for `K·q`) and the softmax weights (for the product with `V`) to f16, as
    /// llama.cpp's CPU path does with its default f16 cache (docs/REFERENCE.md). Other dtypes are refused.
    pub fn with_kv_dtype(mut self, dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 | DType::F16 => {
                self.kv_dtype = dtype;
                Ok(self)
            }
            _ => Err(KernelError::UnsupportedDType { op: "CPU KV cache", dtype }),
        }
    }

    /// Compute threads, the caller included.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    pub fn simd_level(&self) -> SimdLevel {
        self.simd
    }

    /// The threads, and whether element-wise loops may be compiled for AVX2 (same results, wider vectors).
    fn exec(&self) -> parallel::Exec<'_> {
        parallel::Exec { pool: &self.pool, avx2: self.simd >= SimdLevel::Avx2 }
    }
}

impl Default for CpuBackend {
    /// One compute thread per available core.
    fn default() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// The CPU model as the OS names it, or the architecture.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn f32_tensor(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
    Tensor::new(DType::F32, shape, Storage::CpuF32(data))
}

fn elems(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| shape_err(op, format!("{shape:?} overflows")))
}

fn check_wire_dtype(op: &'static str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        _ => Err(KernelError::UnsupportedDType { op, dtype }),
    }
}

/// Reads one byte of every 4 KiB page of `bytes`. A weight is a view into the memory-mapped model file; without this
/// its pages are faulted in by the first forward, which then pays the file's page faults (about a tenth of a 128-token
/// prefill on the SmolLM2 Q6_K preset: docs/PERFORMANCE.md, "Session 10"). llama.cpp maps its file with
/// `MAP_POPULATE` for the same reason; here only the tensors a shard serves are touched, not the whole file.
fn make_resident(bytes: &[u8]) {
    let mut x = 0u8;
    for i in (0..bytes.len()).step_by(4096) {
        x ^= bytes[i];
    }
    std::hint::black_box(x);
}

fn same_len(op: &'static str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(shape_err(op, format!("{a} values vs {b}")));
    }
    Ok(())
}

impl Backend for CpuBackend {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cpu
    }

    fn describe(&self) -> String {
        match self.kv_dtype {
            DType::F32 => format!("cpu: {} ({} threads, {})", self.cpu_name, self.threads(), self.simd),
            kv => format!("cpu: {} ({} threads, {}, {kv} KV cache)", self.cpu_name, self.threads(), self.simd),
        }
    }

    fn act_dtype(&self) -> DType {
        DType::F32
    }

    fn upload_weight(&self, dtype: DType, shape: &[usize], bytes: HostBytes) -> Result<Tensor> {
        let t = Tensor::new(dtype, shape, Storage::CpuBytes(bytes))?;
        if let Storage::CpuBytes(b) = t.storage() {
            make_resident(b.as_slice());
        }
        Ok(t)
    }

    fn upload_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        f32_tensor(shape, data.to_vec())
    }

    fn upload_raw(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        check_wire_dtype("upload_raw", dtype)?;
        let mut data = vec![0.0; elems("upload_raw", shape)?];
        quant::dequantize(dtype, bytes, &mut data)?;
        f32_tensor(shape, data)
    }

    fn download_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        match t.storage() {
            Storage::CpuF32(v) => Ok(v.clone()),
            _ => {
                let bytes = weight_bytes(t)?;
                let mut out = vec![0.0; t.elem_count()];
                quant::dequantize(t.dtype(), bytes, &mut out)?;
                Ok(out)
            }
        }
    }

    fn download_raw(&self, t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
        check_wire_dtype("download_raw", dtype)?;
        match t.storage() {
            Storage::CpuF32(v) => quant::quantize(dtype, v),
            _ => quant::quantize(dtype, &self.download_f32(t)?),
        }
    }

    fn alloc(&self, shape: &[usize]) -> Result<Tensor> {
        f32_tensor(shape, vec![0.0; elems("alloc", shape)?])
    }

    fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    fn alloc_kv(&self, shape: &[usize]) -> Result<Tensor> {
        match self.kv_dtype {
            DType::F16 => {
                Tensor::new(DType::F16, shape, Storage::CpuF16(vec![half::f16::ZERO; elems("alloc_kv", shape)?]))
            }
            _ => self.alloc(shape),
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()> {
        const OP: &str = "embedding";
        if table.shape().len() != 2 {
            return Err(shape_err(OP, format!("table must be 2-D [vocab, width], got {:?}", table.shape())));
        }
        let (vocab, width) = (table.shape()[0], table.shape()[1]);
        check_2d(OP, "out", out, Some(ids.len()), Some(width))?;
        let bytes = weight_bytes(table)?;
        let out = act_mut(OP, out)?;
        embedding::gather(table.dtype(), bytes, vocab, width, ids, out)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        const OP: &str = "rms_norm";
        let (rows, width) = check_2d(OP, "x", x, None, None)?;
        check_2d(OP, "out", out, Some(rows), Some(width))?;
        same_len(OP, weight.elem_count(), width)?;
        let w = weight_f32(weight)?;
        let xs = act(OP, x)?;
        norm::rms_norm(self.exec(), xs, &w, eps, act_mut(OP, out)?, width);
        Ok(())
    }

    fn add_rms_norm(
        &self,
        residual: &mut Tensor,
        x: &Tensor,
        weight: &Tensor,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        const OP: &str = "add_rms_norm";
        let (rows, width) = check_2d(OP, "residual", residual, None, None)?;
        check_2d(OP, "x", x, Some(rows), Some(width))?;
        check_2d(OP, "out", out, Some(rows), Some(width))?;
        same_len(OP, weight.elem_count(), width)?;
        let w = weight_f32(weight)?;
        let xs = act(OP, x)?;
        let res = act_mut(OP, residual)?;
        norm::add_rms_norm(self.exec(), res, xs, &w, eps, act_mut(OP, out)?, width);
        Ok(())
    }

    fn matmul(&self, x: &Tensor, w: &Tensor, out: &mut Tensor) -> Result<()> {
        matmul::matmul(self, x, w, out)
    }

    fn matmul_many(&self, x: &Tensor, outs: &mut [(&Tensor, &mut Tensor)]) -> Result<()> {
        matmul::matmul_many(self, x, outs)
    }

    fn matmul_swiglu(
        &self,
        x: &Tensor,
        ws: (&Tensor, &Tensor),
        scratch: (&mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> Result<()> {
        matmul::matmul_swiglu(self, x, ws, scratch, out)
    }

    fn rope(
        &self,
        x: &mut Tensor,
        positions: &[u32],
        n_heads: usize,
        inv_freq: &Tensor,
        cfg: &RopeConfig,
    ) -> Result<()> {
        const OP: &str = "rope";
        let (hd, rd) = (cfg.head_dim, cfg.rotary_dim);
        if hd == 0 || rd == 0 || rd % 2 != 0 || rd > hd {
            return Err(shape_err(OP, format!("rotary_dim {rd} must be even and in 1..={hd} (head_dim)")));
        }
        check_2d(OP, "x", x, Some(positions.len()), Some(n_heads * hd))?;
        same_len(OP, inv_freq.elem_count(), rd / 2)?;
        let freqs = weight_f32(inv_freq)?;
        let shape = rope::RopeShape { n_heads, head_dim: hd, rotary_dim: rd, style: cfg.style };
        rope::rope(&self.pool, &self.angles, act_mut(OP, x)?, positions, &freqs, shape);
        Ok(())
    }

    fn rope_table(&self, inv_freq: &[f32]) -> Result<Tensor> {
        f32_tensor(&[inv_freq.len()], inv_freq.to_vec())
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        const OP: &str = "swiglu";
        let (g, u) = (act(OP, gate)?, act(OP, up)?);
        if gate.shape() != up.shape() || gate.shape() != out.shape() {
            return Err(shape_err(OP, format!("gate {:?}, up {:?}, out {:?}", gate.shape(), up.shape(), out.shape())));
        }
        elementwise::swiglu(self.exec(), g, u, act_mut(OP, out)?);
        Ok(())
    }

    fn add(&self, acc: &mut Tensor, x: &Tensor) -> Result<()> {
        const OP: &str = "add";
        if acc.shape() != x.shape() {
            return Err(shape_err(OP, format!("acc {:?} vs x {:?}", acc.shape(), x.shape())));
        }
        let xs = act(OP, x)?;
        elementwise::add(&self.pool, act_mut(OP, acc)?, xs);
        Ok(())
    }

    fn add_bias(&self, x: &mut Tensor, bias: &Tensor) -> Result<()> {
        const OP: &str = "add_bias";
        let (_, width) = check_2d(OP, "x", x, None, None)?;
        same_len(OP, bias.elem_count(), width)?;
        let b = weight_f32(bias)?;
        elementwise::add_bias(&self.pool, act_mut(OP, x)?, &b);
        Ok(())
    }

    fn copy_rows(&self, src: &Tensor, src_row: usize, dst: &mut Tensor, dst_row: usize, n: usize) -> Result<()> {
        const OP: &str = "copy_rows";
        let (src_rows, width) = check_2d(OP, "src", src, None, None)?;
        let (dst_rows, _) = check_2d(OP, "dst", dst, None, Some(width))?;
        let fits = |start: usize, rows: usize| start.checked_add(n).is_some_and(|end| end <= rows);
        if !fits(src_row, src_rows) || !fits(dst_row, dst_rows) {
            return Err(shape_err(OP, format!("{n} rows from {src_row} of {src_rows} into {dst_row} of {dst_rows}")));
        }
        let s = &act(OP, src)?[src_row * width..(src_row + n) * width];
        act_mut(OP, dst)?[dst_row * width..(dst_row + n) * width].copy_from_slice(s);
        Ok(())
    }

    fn split_rows(&self, src: &Tensor, parts: &mut [(usize, &mut Tensor)]) -> Result<()> {
        const OP: &str = "split_rows";
        let (src_rows, width) = check_2d(OP, "src", src, None, None)?;
        for (at, dst) in parts.iter() {
            let (n, _) = check_2d(OP, "dst", dst, None, Some(width))?;
            if at.checked_add(n).is_none_or(|end| end > src_rows) {
                return Err(shape_err(OP, format!("{n} rows from {at} of {src_rows}")));
            }
        }
        let s = act(OP, src)?;
        let mut jobs = Vec::with_capacity(parts.len());
        for (at, dst) in parts.iter_mut() {
            let d = act_mut(OP, dst)?;
            jobs.push((&s[*at * width..*at * width + d.len()], d));
        }
        if jobs.iter().map(|(s, _)| s.len()).sum::<usize>() <= SERIAL_COPY {
            jobs.into_iter().for_each(|(s, d)| d.copy_from_slice(s));
        } else {
            self.pool.run_each(jobs, |(s, d)| d.copy_from_slice(s));
        }
        Ok(())
    }

    fn kv_store(
        &self,
        k_cache: &mut Tensor,
        v_cache: &mut Tensor,
        k: &Tensor,
        v: &Tensor,
        slots: &[u32],
    ) -> Result<()> {
        const OP: &str = "kv_store";
        let (n_slots, width) = check_2d(OP, "k_cache", k_cache, None, None)?;
        check_2d(OP, "v_cache", v_cache, Some(n_slots), Some(width))?;
        check_2d(OP, "k", k, Some(slots.len()), Some(width))?;
        check_2d(OP, "v", v, Some(slots.len()), Some(width))?;
        let (ks, vs) = (act(OP, k)?, act(OP, v)?);
        match (kv_mut(OP, k_cache)?, kv_mut(OP, v_cache)?) {
            (KvMut::F32(kc), KvMut::F32(vc)) => kv_cache::store(kc, vc, ks, vs, slots, width),
            (KvMut::F16(kc), KvMut::F16(vc)) => kv_cache::store(kc, vc, ks, vs, slots, width),
            _ => Err(shape_err(OP, "the K and V caches differ in dtype")),
        }
    }

    fn attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut Tensor,
    ) -> Result<()> {
        const OP: &str = "attention";
        let (rows, _) = check_2d(OP, "q", q, None, Some(shape.n_heads * shape.head_dim))?;
        check_2d(OP, "out", out, Some(rows), Some(shape.n_heads * shape.head_dim))?;
        let (n_slots, _) = check_2d(OP, "k_cache", k_cache, None, Some(shape.n_kv_heads * shape.head_dim))?;
        check_2d(OP, "v_cache", v_cache, Some(n_slots), Some(shape.n_kv_heads * shape.head_dim))?;
        let qs = act(OP, q)?;
        match (kv(OP, k_cache)?, kv(OP, v_cache)?) {
            (KvRef::F32(ks), KvRef::F32(vs)) => {
                attention::attention(self.exec(), qs, ks, vs, seqs, shape, act_mut(OP, out)?)
            }
            (KvRef::F16(ks), KvRef::F16(vs)) => {
                attention::attention(self.exec(), qs, ks, vs, seqs, shape, act_mut(OP, out)?)
            }
            _ => Err(shape_err(OP, "the K and V caches differ in dtype")),
        }
    }

    fn sample(
        &self,
        logits: &Tensor,
        row: usize,
        params: &SamplingParams,
        position: u64,
        n_top: usize,
    ) -> Result<Sampled> {
        const OP: &str = "sample";
        let (rows, vocab) = check_2d(OP, "logits", logits, None, None)?;
        if row >= rows {
            return Err(shape_err(OP, format!("row {row} of {rows}")));
        }
        sample::sample(self.exec().avx2, &act(OP, logits)?[row * vocab..(row + 1) * vocab], params, position, n_top)
    }

    /// The draws on the backend's threads (each is a pure function of its row, so which thread runs it changes
    /// nothing): at 16 sessions a step, drawing one after another was ~3% of the step on the calling thread while
    /// the others waited.
    fn sample_many(&self, draws: &[Draw<'_>]) -> Vec<Result<Sampled>> {
        let mut out: Vec<Option<Result<Sampled>>> = draws.iter().map(|_| None).collect();
        let work: Vec<_> = draws.iter().zip(out.iter_mut()).collect();
        self.pool.run_each(work, |(d, slot)| {
            *slot = Some(self.sample(d.logits, d.row, d.params, d.position, d.n_top));
        });
        // `run_each` runs every item (a panic would have been re-raised above), so each slot is filled.
        out.into_iter().map(|r| r.unwrap_or_else(|| Err(shape_err("sample", "draw not run")))).collect()
    }
}
