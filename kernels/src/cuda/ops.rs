//! The [`Backend`] ops on CUDA: validation on the host (shapes, dtypes, every index the kernels will follow), then
//! one or two kernel launches on the backend's stream. Launch shapes are documented in each `.cu` file.

use half::{bf16, f16};

use super::backend::{Arg, CudaBackend, Exec, cuda_storage, i32_arg};
use super::gemm_plan;
use super::gemv_plan::{GEMV_ROWS_PER_BLOCK, split_k, xs_plan};
use super::step_record::{Role, decode_attention_args};
use super::storage::{CudaStorage, Layout, cuda_err};
use super::{names, repack};
use crate::DType;
use crate::backend::{AttnSeq, AttnShape, Backend, DeviceKind, RopeConfig, RopeStyle, Sampled, SamplingParams};
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::{HostBytes, Tensor};

/// Bytes of attention workspace one decode launch may use; longer batches are split into several launches.
const ATTN_WORKSPACE_BYTES: usize = 256 << 20;
/// Head dimensions one `attn_combine` block merges (`ATT_CMB_COLS * 4` in attention.cu): grid z = ⌈D / 32⌉.
const ATTN_COMBINE_DIMS: usize = 32;
/// Largest grid y/z dimension.
const GRID_YZ: usize = 65_535;

/// f32 values to little-endian bytes of `dtype` (f32, f16 or bf16), rounding to nearest even.
pub(crate) fn encode(dtype: DType, data: &[f32]) -> Result<Vec<u8>> {
    Ok(match dtype {
        DType::F32 => bytemuck::cast_slice(data).to_vec(),
        DType::F16 => data.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => data.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        other => return Err(KernelError::UnsupportedDType { op: "activation transfer", dtype: other }),
    })
}

/// Little-endian bytes of `dtype` (f32, f16 or bf16) to f32.
pub(crate) fn decode(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => return Err(KernelError::UnsupportedDType { op: "activation transfer", dtype: other }),
    })
}

fn elems_of(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| shape_err(op, format!("{shape:?} overflows")))
}

impl CudaBackend {
    /// The device address of an activation tensor of this backend.
    fn act_ptr(&self, op: &'static str, t: &Tensor) -> Result<u64> {
        if t.dtype() != self.act {
            return Err(KernelError::UnsupportedDType { op, dtype: t.dtype() });
        }
        Ok(cuda_storage(t)?.ptr())
    }

    /// Quant (or plain) and scale addresses of a weight tensor (scales 0 for plain weights).
    fn weight_ptrs(t: &Tensor) -> Result<(u64, u64)> {
        let s = cuda_storage(t)?;
        Ok(match s.layout() {
            Layout::Plain => (s.ptr(), 0),
            Layout::Split { scales_at } => (s.ptr(), s.ptr() + scales_at as u64),
        })
    }

    /// Host bytes to a new device allocation.
    fn upload_bytes(&self, bytes: &[u8], layout: Layout) -> Result<CudaStorage> {
        let ex = self.exec()?;
        self.require_eager(&ex, "upload")?;
        drop(ex);
        // Empty tensors still get a (one-byte) allocation, so every tensor has a valid address.
        let data: &[u8] = if bytes.is_empty() { &[0] } else { bytes };
        let slice = self.stream.clone_htod(data).map_err(cuda_err)?;
        Ok(CudaStorage::owned(slice, bytes.len(), &self.stream, layout))
    }

    /// The raw bytes of a plain tensor, after every queued op.
    fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        let ex = self.exec()?;
        self.require_eager(&ex, "download")?;
        drop(ex);
        let s = cuda_storage(t)?;
        if s.layout() != Layout::Plain {
            return Err(KernelError::UnsupportedDType { op: "download", dtype: t.dtype() });
        }
        let mut out = vec![0u8; s.byte_len()];
        if !out.is_empty() {
            // A raw driver call: make the context current first (a fresh thread's first call may be a download).
            self.ctx.bind_to_thread().map_err(cuda_err)?;
            // SAFETY: `out` has exactly the tensor's byte length, which the allocation holds.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out, s.ptr(), self.stream.cu_stream()) }
                .map_err(cuda_err)?;
        }
        self.stream.synchronize().map_err(cuda_err)?;
        Ok(out)
    }

    fn elementwise_grid(&self, n: usize) -> u32 {
        let chunks = (n / 8).max(1);
        let cap = self.info.multiprocessors as usize * 16;
        chunks.div_ceil(256).clamp(1, cap.max(1)) as u32
    }

    fn attention_prefill(
        &self,
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut Tensor,
    ) -> Result<()> {
        let mut info = Vec::with_capacity(seqs.len() * 4);
        let mut tables = Vec::new();
        let mut max_rows = 0;
        for s in seqs.iter().filter(|s| !s.rows.is_empty()) {
            info.extend_from_slice(&[s.rows.start as u32, s.rows.len() as u32, s.pos0 as u32, tables.len() as u32]);
            tables.extend_from_slice(s.block_table);
            max_rows = max_rows.max(s.rows.len());
        }
        let n_seqs = info.len() / 4;
        if n_seqs > GRID_YZ {
            return Err(shape_err("attention", format!("{n_seqs} sequences in one call (at most {GRID_YZ})")));
        }
        let (qp, kp, vp) =
            (self.act_ptr("attention", q)?, self.act_ptr("attention", kc)?, self.act_ptr("attention", vc)?);
        let outp = self.act_ptr("attention", out)?;
        let mut ex = self.exec()?;
        let info_p = self.stage_u32(&mut ex, Role::Other, &info)?;
        let tables_p = self.stage_u32(&mut ex, Role::Other, &tables)?;
        let name = names::attn_prefill(self.act, shape.head_dim);
        let grid = (max_rows.div_ceil(64) as u32, shape.n_heads as u32, n_seqs as u32);
        self.launch(
            &mut ex,
            "attention",
            &name,
            grid,
            128,
            &[
                Arg::Ptr(qp),
                Arg::Ptr(kp),
                Arg::Ptr(vp),
                Arg::Ptr(info_p),
                Arg::Ptr(tables_p),
                Arg::Ptr(outp),
                i32_arg("attention", shape.n_heads)?,
                i32_arg("attention", shape.n_kv_heads)?,
                i32_arg("attention", shape.block_tokens)?,
                Arg::F32(shape.scale),
            ],
        )
    }

    fn attention_decode(
        &self,
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut Tensor,
    ) -> Result<()> {
        let rows = q.rows();
        let d = shape.head_dim;
        // Per query row: visible keys and the offset of its sequence's block table; rows of no sequence see none
        // and are left untouched. (The same function builds them for a direct graph replay, step_record.rs.)
        let args = decode_attention_args(rows, seqs);
        let (row_info, tables, n_splits) = (args.row_info, args.tables, args.n_splits);
        let per_row = shape.n_heads * n_splits * (d + 2) * 4;
        let chunk = (ATTN_WORKSPACE_BYTES / per_row).clamp(1, GRID_YZ);
        let group = shape.n_heads / shape.n_kv_heads;
        let (qp, kp, vp) =
            (self.act_ptr("attention", q)?, self.act_ptr("attention", kc)?, self.act_ptr("attention", vc)?);
        let outp = self.act_ptr("attention", out)?;
        let row_bytes = (shape.n_heads * d * self.act.block_bytes()) as u64;
        let mut ex = self.exec()?;
        Self::note(&mut ex, |r| r.note_attention(n_splits, kc.rows(), shape.block_tokens));
        let info_p = self.stage_u32(&mut ex, Role::RowInfo, &row_info)?;
        let tables_p = self.stage_u32(&mut ex, Role::Tables, &tables)?;
        let mut r0 = 0;
        while r0 < rows {
            let n = chunk.min(rows - r0);
            let ws = self.scratch(&mut ex, n * per_row)?;
            let part_o = ws;
            let part_ml = ws + (n * shape.n_heads * n_splits * d * 4) as u64;
            let info_c = info_p + (r0 * 8) as u64;
            self.launch(
                &mut ex,
                "attention",
                &names::attn_decode(self.act),
                (n_splits as u32, (shape.n_kv_heads * group.div_ceil(8)) as u32, n as u32),
                128,
                &[
                    Arg::Ptr(qp + r0 as u64 * row_bytes),
                    Arg::Ptr(kp),
                    Arg::Ptr(vp),
                    Arg::Ptr(info_c),
                    Arg::Ptr(tables_p),
                    Arg::Ptr(part_o),
                    Arg::Ptr(part_ml),
                    i32_arg("attention", shape.n_heads)?,
                    i32_arg("attention", shape.n_kv_heads)?,
                    i32_arg("attention", d)?,
                    i32_arg("attention", shape.block_tokens)?,
                    Arg::F32(shape.scale),
                    i32_arg("attention", n_splits)?,
                ],
            )?;
            self.launch(
                &mut ex,
                "attention",
                &names::attn_combine(self.act),
                (shape.n_heads as u32, n as u32, d.div_ceil(ATTN_COMBINE_DIMS) as u32),
                128,
                &[
                    Arg::Ptr(part_o),
                    Arg::Ptr(part_ml),
                    Arg::Ptr(info_c),
                    Arg::Ptr(outp + r0 as u64 * row_bytes),
                    i32_arg("attention", shape.n_heads)?,
                    i32_arg("attention", d)?,
                    i32_arg("attention", n_splits)?,
                ],
            )?;
            r0 += n;
        }
        Ok(())
    }
}

/// Checks everything the attention kernels will index: geometry, tensor shapes, and that every block a sequence
/// touches exists in its table and in the cache.
fn check_attention(
    q: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
    seqs: &[AttnSeq<'_>],
    shape: &AttnShape,
    out: &Tensor,
) -> Result<()> {
    let op = "attention";
    let (h, kvh, d, bt) = (shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.block_tokens);
    if kvh == 0 || h % kvh != 0 || bt == 0 || d == 0 {
        return Err(shape_err(op, format!("{h} heads over {kvh} KV heads, head_dim {d}, {bt} tokens per block")));
    }
    if d % 8 != 0 || d > 256 {
        return Err(shape_err(op, format!("head_dim {d}: the CUDA kernels need a multiple of 8 up to 256")));
    }
    if q.cols() != h * d || out.shape() != q.shape() {
        return Err(shape_err(op, format!("q {:?}, out {:?} for {h} heads of {d}", q.shape(), out.shape())));
    }
    if kc.cols() != kvh * d || kc.shape() != vc.shape() {
        return Err(shape_err(op, format!("caches {:?} / {:?} for {kvh} KV heads of {d}", kc.shape(), vc.shape())));
    }
    let n_slots = kc.rows();
    for s in seqs {
        if s.rows.start > s.rows.end || s.rows.end > q.rows() {
            return Err(shape_err(op, format!("rows {:?} of a {}-row query", s.rows, q.rows())));
        }
        let end = s.pos0 + s.rows.len();
        if end > u32::MAX as usize {
            return Err(shape_err(op, format!("position {end} does not fit 32 bits")));
        }
        let needed = end.div_ceil(bt);
        if needed > s.block_table.len() {
            return Err(shape_err(
                op,
                format!("{end} positions need {needed} blocks, the table has {}", s.block_table.len()),
            ));
        }
        if let Some(&b) = s.block_table[..needed].iter().find(|&&b| (b as usize + 1) * bt > n_slots) {
            return Err(KernelError::KvSlot { slot: b as usize * bt, capacity: n_slots });
        }
    }
    Ok(())
}

impl Backend for CudaBackend {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cuda(self.info.ordinal)
    }

    fn describe(&self) -> String {
        let i = &self.info;
        format!(
            "{} (cuda:{}, sm_{}{}, {} SMs, {:.1} GiB, {} activations)",
            i.name,
            i.ordinal,
            i.compute.0,
            i.compute.1,
            i.multiprocessors,
            i.total_memory as f64 / (1u64 << 30) as f64,
            self.act
        )
    }

    fn act_dtype(&self) -> DType {
        self.act
    }

    fn upload_weight(&self, dtype: DType, shape: &[usize], bytes: HostBytes) -> Result<Tensor> {
        if !names::weight_supported(dtype) {
            return Err(KernelError::NotOnCuda { dtype });
        }
        let elems = elems_of("upload_weight", shape)?;
        let expected = dtype.bytes_for(elems).ok_or(KernelError::PartialBlock {
            dtype,
            len: elems,
            block: dtype.block_elems(),
        })?;
        if bytes.len() != expected {
            return Err(KernelError::ByteLength {
                what: format!("{dtype} weight {shape:?}"),
                expected,
                got: bytes.len(),
            });
        }
        let storage = if dtype.is_quantized() {
            let (split, scales_at) = repack::split_blocks(dtype, bytes.as_slice())?;
            self.upload_bytes(&split, Layout::Split { scales_at })?
        } else {
            self.upload_bytes(bytes.as_slice(), Layout::Plain)?
        };
        self.tensor(dtype, shape, storage)
    }

    fn upload_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let elems = elems_of("upload_f32", shape)?;
        if data.len() != elems {
            return Err(shape_err("upload_f32", format!("{} values for shape {shape:?}", data.len())));
        }
        let storage = self.upload_bytes(&encode(self.act, data)?, Layout::Plain)?;
        self.tensor(self.act, shape, storage)
    }

    fn upload_raw(&self, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        let elems = elems_of("upload_raw", shape)?;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(KernelError::UnsupportedDType { op: "upload_raw", dtype });
        }
        let expected = elems * dtype.block_bytes();
        if bytes.len() != expected {
            return Err(KernelError::ByteLength {
                what: format!("{dtype} activations {shape:?}"),
                expected,
                got: bytes.len(),
            });
        }
        let storage = if dtype == self.act {
            self.upload_bytes(bytes, Layout::Plain)?
        } else {
            self.upload_bytes(&encode(self.act, &decode(dtype, bytes)?)?, Layout::Plain)?
        };
        self.tensor(self.act, shape, storage)
    }

    fn download_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        decode(t.dtype(), &self.read_bytes(t)?)
    }

    fn download_raw(&self, t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
        let bytes = self.read_bytes(t)?;
        if dtype == t.dtype() {
            return Ok(bytes);
        }
        encode(dtype, &decode(t.dtype(), &bytes)?)
    }

    fn alloc(&self, shape: &[usize]) -> Result<Tensor> {
        let elems = elems_of("alloc", shape)?;
        let bytes = elems.checked_mul(self.act.block_bytes()).ok_or_else(|| shape_err("alloc", "size overflows"))?;
        let mut ex = self.exec()?;
        let storage = self.alloc_storage(&mut ex, bytes)?;
        drop(ex);
        self.tensor(self.act, shape, storage)
    }

    fn synchronize(&self) -> Result<()> {
        let ex = self.exec()?;
        self.require_eager(&ex, "synchronize")?;
        drop(ex);
        self.stream.synchronize().map_err(cuda_err)
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()> {
        let (vocab, width) = (table.rows(), table.cols());
        if out.rows() != ids.len() || out.cols() != width {
            return Err(shape_err("embedding", format!("{} ids of width {width} into {:?}", ids.len(), out.shape())));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(shape_err("embedding", format!("token id {bad} outside a table of {vocab} rows")));
        }
        let outp = self.act_ptr("embedding", out)?;
        let (qs, sc) = Self::weight_ptrs(table)?;
        let mut ex = self.exec()?;
        Self::note(&mut ex, |r| r.note_vocab(vocab));
        let idp = self.stage_u32(&mut ex, Role::Ids, ids)?;
        let name = names::embedding(self.act, table.dtype());
        self.launch(
            &mut ex,
            "embedding",
            &name,
            (ids.len() as u32, 1, 1),
            128,
            &[Arg::Ptr(idp), Arg::Ptr(qs), Arg::Ptr(sc), Arg::Ptr(outp), i32_arg("embedding", width)?],
        )
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        check_norm(x, weight, out)?;
        let (xp, op) = (self.act_ptr("rms_norm", x)?, self.act_ptr("rms_norm", out)?);
        let (wp, _) = Self::weight_ptrs(weight)?;
        let mut ex = self.exec()?;
        let name = names::rms_norm(self.act, weight.dtype());
        self.launch(
            &mut ex,
            "norm",
            &name,
            (x.rows() as u32, 1, 1),
            256,
            &[Arg::Ptr(xp), Arg::Ptr(wp), Arg::Ptr(op), i32_arg("rms_norm", x.cols())?, Arg::F32(eps)],
        )
    }

    fn add_rms_norm(
        &self,
        residual: &mut Tensor,
        x: &Tensor,
        weight: &Tensor,
        eps: f32,
        out: &mut Tensor,
    ) -> Result<()> {
        check_norm(x, weight, out)?;
        if residual.shape() != x.shape() {
            return Err(shape_err("add_rms_norm", format!("residual {:?} vs x {:?}", residual.shape(), x.shape())));
        }
        let rp = self.act_ptr("add_rms_norm", residual)?;
        let (xp, op) = (self.act_ptr("add_rms_norm", x)?, self.act_ptr("add_rms_norm", out)?);
        let (wp, _) = Self::weight_ptrs(weight)?;
        let mut ex = self.exec()?;
        let name = names::add_rms_norm(self.act, weight.dtype());
        self.launch(
            &mut ex,
            "norm",
            &name,
            (x.rows() as u32, 1, 1),
            256,
            &[
                Arg::Ptr(rp),
                Arg::Ptr(xp),
                Arg::Ptr(wp),
                Arg::Ptr(op),
                i32_arg("add_rms_norm", x.cols())?,
                Arg::F32(eps),
            ],
        )
    }

    fn matmul(&self, x: &Tensor, w: &Tensor, out: &mut Tensor) -> Result<()> {
        let (t, k, n) = (x.rows(), x.cols(), w.rows());
        if w.cols() != k || out.rows() != t || out.cols() != n {
            return Err(shape_err("matmul", format!("x {:?} · w {:?}ᵀ into {:?}", x.shape(), w.shape(), out.shape())));
        }
        let (xp, op) = (self.act_ptr("matmul", x)?, self.act_ptr("matmul", out)?);
        let (qs, sc) = Self::weight_ptrs(w)?;
        let (act, wd) = (self.act, w.dtype());
        if t == 1
            && names::one_row_on_act(wd)
            && let Some(plan) = xs_plan(n, k, self.info.multiprocessors as usize)
        {
            return self.matmul_xs(MatmulPtrs { x: xp, qs, sc, out: op }, (k, n), wd, plan);
        }
        if names::Q8_ACT_WEIGHT_DTYPES.contains(&wd) && !(t == 1 && names::one_row_on_act(wd)) {
            return self.matmul_q8(MatmulPtrs { x: xp, qs, sc, out: op }, (t, k, n), wd);
        }
        let chunk = match w.dtype() {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 8,
            // One row of these whose K range is too long for matmul_xs (gemv.cu, 16-bit activations); more rows and
            // the other quantised formats went to matmul_q8 above.
            DType::Q8_0 => 16,
            DType::Q4_0 | DType::Q4_1 => 32,
            // upload_weight refuses the rest.
            dtype => return Err(KernelError::NotOnCuda { dtype }),
        };
        let (ti, ki, ni) = (i32_arg("matmul", t)?, i32_arg("matmul", k)?, i32_arg("matmul", n)?);
        let mut ex = self.exec()?;
        if t == 0 || n == 0 {
            return Ok(());
        }
        let gemv_args = [Arg::Ptr(qs), Arg::Ptr(sc), Arg::Ptr(xp), Arg::Ptr(op), ni, ki, ti];
        if k % chunk != 0 {
            let grid = (n.div_ceil(4) as u32, t.div_ceil(8) as u32, 1);
            return self.launch(&mut ex, "gemv", &names::gemv_scalar(act, wd), grid, 128, &gemv_args);
        }
        if t <= 8 || k % 8 != 0 {
            // One row and a short output: split K across blocks, then add the partial sums in a fixed order.
            let (splits, cps) = split_k(n, k / chunk, self.info.multiprocessors as usize);
            if t == 1 && splits > 1 {
                let ws = self.scratch(&mut ex, splits * n * 4)?;
                let grid = (n.div_ceil(GEMV_ROWS_PER_BLOCK) as u32, 1, splits as u32);
                let args =
                    [Arg::Ptr(qs), Arg::Ptr(sc), Arg::Ptr(xp), Arg::Ptr(ws), ni, ki, ti, i32_arg("matmul", cps)?];
                self.launch(&mut ex, "gemv", &names::gemv_splitk(act, wd), grid, 128, &args)?;
                let args = [Arg::Ptr(ws), Arg::Ptr(op), Arg::I64(n as i64), Arg::I32(splits as i32)];
                return self.launch(
                    &mut ex,
                    "gemv",
                    &names::gemv_reduce(act),
                    (n.div_ceil(256) as u32, 1, 1),
                    256,
                    &args,
                );
            }
            let nt = t.next_power_of_two().min(8);
            let grid = (n.div_ceil(8) as u32, t.div_ceil(nt) as u32, 1);
            return self.launch(&mut ex, "gemv", &names::gemv(act, wd, nt), grid, 128, &gemv_args);
        }
        self.gemm(&mut ex, MatmulPtrs { x: xp, qs, sc, out: op }, (t, k, n), wd)
    }

    fn rope(
        &self,
        x: &mut Tensor,
        positions: &[u32],
        n_heads: usize,
        inv_freq: &Tensor,
        cfg: &RopeConfig,
    ) -> Result<()> {
        let (d, rot) = (cfg.head_dim, cfg.rotary_dim);
        if x.cols() != n_heads * d || positions.len() != x.rows() {
            return Err(shape_err(
                "rope",
                format!("x {:?} with {} positions for {n_heads} heads of {d}", x.shape(), positions.len()),
            ));
        }
        if rot == 0 || rot % 2 != 0 || rot > d || inv_freq.elem_count() != rot / 2 || inv_freq.dtype() != DType::F32 {
            return Err(shape_err(
                "rope",
                format!(
                    "rotary_dim {rot} of head_dim {d} with a {} table of {}",
                    inv_freq.dtype(),
                    inv_freq.elem_count()
                ),
            ));
        }
        let xp = self.act_ptr("rope", x)?;
        let fp = cuda_storage(inv_freq)?.ptr();
        let total = x.rows() * n_heads * (rot / 2);
        let mut ex = self.exec()?;
        let pp = self.stage_u32(&mut ex, Role::Positions, positions)?;
        let neox = i32::from(cfg.style == RopeStyle::Neox);
        self.launch(
            &mut ex,
            "rope",
            &names::rope(self.act),
            (total.div_ceil(256) as u32, 1, 1),
            256,
            &[
                Arg::Ptr(xp),
                Arg::Ptr(pp),
                Arg::Ptr(fp),
                i32_arg("rope", x.rows())?,
                i32_arg("rope", n_heads)?,
                i32_arg("rope", d)?,
                i32_arg("rope", rot / 2)?,
                Arg::I32(neox),
            ],
        )
    }

    fn rope_table(&self, inv_freq: &[f32]) -> Result<Tensor> {
        let storage = self.upload_bytes(bytemuck::cast_slice(inv_freq), Layout::Plain)?;
        self.tensor(DType::F32, &[inv_freq.len()], storage)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        if gate.shape() != up.shape() || gate.shape() != out.shape() {
            return Err(shape_err("swiglu", format!("{:?}, {:?} -> {:?}", gate.shape(), up.shape(), out.shape())));
        }
        let (gp, upp, op) = (self.act_ptr("swiglu", gate)?, self.act_ptr("swiglu", up)?, self.act_ptr("swiglu", out)?);
        let n = gate.elem_count();
        let mut ex = self.exec()?;
        let grid = (self.elementwise_grid(n), 1, 1);
        let args = [Arg::Ptr(gp), Arg::Ptr(upp), Arg::Ptr(op), Arg::I64(n as i64)];
        self.launch(&mut ex, "elementwise", &names::swiglu(self.act), grid, 256, &args)
    }

    fn add(&self, acc: &mut Tensor, x: &Tensor) -> Result<()> {
        if acc.shape() != x.shape() {
            return Err(shape_err("add", format!("{:?} += {:?}", acc.shape(), x.shape())));
        }
        let (ap, xp) = (self.act_ptr("add", acc)?, self.act_ptr("add", x)?);
        let n = x.elem_count();
        let mut ex = self.exec()?;
        let grid = (self.elementwise_grid(n), 1, 1);
        let args = [Arg::Ptr(ap), Arg::Ptr(xp), Arg::I64(n as i64)];
        self.launch(&mut ex, "elementwise", &names::add(self.act), grid, 256, &args)
    }

    fn add_bias(&self, x: &mut Tensor, bias: &Tensor) -> Result<()> {
        if bias.elem_count() != x.cols() {
            return Err(shape_err("add_bias", format!("x {:?}, bias {:?}", x.shape(), bias.shape())));
        }
        if !matches!(bias.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(KernelError::UnsupportedDType { op: "add_bias bias", dtype: bias.dtype() });
        }
        let xp = self.act_ptr("add_bias", x)?;
        let (bp, _) = Self::weight_ptrs(bias)?;
        let n = x.elem_count();
        let mut ex = self.exec()?;
        let grid = (self.elementwise_grid(n.saturating_mul(8)), 1, 1);
        let args = [Arg::Ptr(xp), Arg::Ptr(bp), i32_arg("add_bias", x.cols())?, Arg::I64(n as i64)];
        self.launch(&mut ex, "elementwise", &names::add_bias(self.act, bias.dtype()), grid, 256, &args)
    }

    fn copy_rows(&self, src: &Tensor, src_row: usize, dst: &mut Tensor, dst_row: usize, n: usize) -> Result<()> {
        if src.cols() != dst.cols() || src.dtype() != dst.dtype() || src.dtype().is_quantized() {
            return Err(shape_err(
                "copy_rows",
                format!("{} {:?} -> {} {:?}", src.dtype(), src.shape(), dst.dtype(), dst.shape()),
            ));
        }
        if src_row + n > src.rows() || dst_row + n > dst.rows() {
            return Err(shape_err(
                "copy_rows",
                format!("rows {src_row}+{n} of {} -> {dst_row}+{n} of {}", src.rows(), dst.rows()),
            ));
        }
        let row = (src.cols() * src.dtype().block_bytes()) as u64;
        let (sp, dp) = (cuda_storage(src)?.ptr(), cuda_storage(dst)?.ptr());
        let mut ex = self.exec()?;
        self.copy_d2d(&mut ex, dp + dst_row as u64 * row, sp + src_row as u64 * row, n * row as usize)
    }

    fn kv_store(
        &self,
        k_cache: &mut Tensor,
        v_cache: &mut Tensor,
        k: &Tensor,
        v: &Tensor,
        slots: &[u32],
    ) -> Result<()> {
        let width = k.cols();
        if v.shape() != k.shape()
            || k_cache.cols() != width
            || k_cache.shape() != v_cache.shape()
            || slots.len() != k.rows()
        {
            return Err(shape_err(
                "kv_store",
                format!(
                    "k {:?}, v {:?}, {} slots into caches {:?}",
                    k.shape(),
                    v.shape(),
                    slots.len(),
                    k_cache.shape()
                ),
            ));
        }
        let capacity = k_cache.rows();
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= capacity) {
            return Err(KernelError::KvSlot { slot: bad as usize, capacity });
        }
        let (kcp, vcp) = (self.act_ptr("kv_store", k_cache)?, self.act_ptr("kv_store", v_cache)?);
        let (kp, vp) = (self.act_ptr("kv_store", k)?, self.act_ptr("kv_store", v)?);
        let mut ex = self.exec()?;
        Self::note(&mut ex, |r| r.note_slot_capacity(capacity));
        let sp = self.stage_u32(&mut ex, Role::Slots, slots)?;
        self.launch(
            &mut ex,
            "kv_cache",
            names::KV_STORE,
            (slots.len() as u32, 1, 1),
            128,
            &[Arg::Ptr(kcp), Arg::Ptr(vcp), Arg::Ptr(kp), Arg::Ptr(vp), Arg::Ptr(sp), i32_arg("kv_store", width)?],
        )
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
        check_attention(q, k_cache, v_cache, seqs, shape, out)?;
        let max_rows = seqs.iter().map(|s| s.rows.len()).max().unwrap_or(0);
        if max_rows == 0 {
            return Ok(());
        }
        if matches!(shape.head_dim, 64 | 128) && max_rows > 1 {
            self.attention_prefill(q, k_cache, v_cache, seqs, shape, out)
        } else {
            self.attention_decode(q, k_cache, v_cache, seqs, shape, out)
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
        super::sampling::sample(self, logits, row, params, position, n_top)
    }

    fn matmul_many(&self, x: &Tensor, outs: &mut [(&Tensor, &mut Tensor)]) -> Result<()> {
        self.matmul_many_impl(x, outs)
    }

    fn matmul_swiglu(
        &self,
        x: &Tensor,
        weights: (&Tensor, &Tensor),
        scratch: (&mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> Result<()> {
        self.matmul_swiglu_impl(x, weights, scratch, out)
    }

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
        super::fused::rope_kv_store(self, q, k, v, positions, heads, inv_freq, cfg, caches, slots)
    }

    fn graph_step(
        &self,
        key: Option<crate::step_graph::GraphKey>,
        inputs: Option<&crate::step_graph::StepInputs<'_>>,
        step: &mut dyn FnMut() -> Result<()>,
    ) -> Result<crate::step_graph::StepRun> {
        self.step_graphs.lock().run(self, key, inputs, step)
    }

    fn has_graphs(&self) -> bool {
        true
    }
}

fn check_norm(x: &Tensor, weight: &Tensor, out: &Tensor) -> Result<()> {
    if out.shape() != x.shape() || weight.elem_count() != x.cols() {
        return Err(shape_err(
            "rms_norm",
            format!("x {:?}, weight {:?}, out {:?}", x.shape(), weight.shape(), out.shape()),
        ));
    }
    if !matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(KernelError::UnsupportedDType { op: "rms_norm weight", dtype: weight.dtype() });
    }
    Ok(())
}

/// Device addresses of one matmul's operands.
pub(crate) struct MatmulPtrs {
    pub(crate) x: u64,
    pub(crate) qs: u64,
    pub(crate) sc: u64,
    pub(crate) out: u64,
}

/// Outputs of one `gemv_swiglu_*` block (`GEMV_WARPS` in gemv.cu / `GEMVQ_WARPS` in gemv_q8.cu: one output per warp).
const GLU_OUTPUTS_PER_BLOCK: usize = 4;

/// The kernel family of a fused gate|up GEMV (`matmul_swiglu_impl`): gemv.cu on 16-bit activations, gemv_q8.cu after
/// `quantize_q8`, or gemv_q8.cu's one-row kernel quantising in shared memory (its dynamic shared memory bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
enum GluPath {
    Act,
    Q8,
    Xs(usize),
}

/// Whether a decode GEMV of `t` rows over weights `wd` reads Q8 activations (`quantize_q8_*` + gemv_q8.cu).
fn on_q8(t: usize, wd: DType) -> bool {
    names::Q8_ACT_WEIGHT_DTYPES.contains(&wd) && (1..=8).contains(&t) && !(t == 1 && names::one_row_on_act(wd))
}

/// The 16-byte chunk of gemv.cu's GEMV for weights `wd` (elements per lane step), for the formats it runs.
fn act_chunk(wd: DType) -> Option<usize> {
    match wd {
        DType::F32 => Some(4),
        DType::F16 | DType::BF16 => Some(8),
        DType::Q8_0 => Some(16),
        DType::Q4_0 | DType::Q4_1 => Some(32),
        _ => None,
    }
}

/// The chunk of gemv_q8.cu's GEMV for weights `wd` (two 16-byte vectors for Q2_K/Q3_K).
fn q8_chunk(wd: DType) -> usize {
    if matches!(wd, DType::Q2_K | DType::Q3_K) { 64 } else { 32 }
}

/// Where a step's Q8 activations live in the scratch buffer: `[t * k int8 codes][t * k / 32 metas of 16 bytes]`,
/// then the split-K partial sums.
#[derive(Clone, Copy)]
struct Q8Act {
    xq: u64,
    xm: u64,
    ws: u64,
}

/// Bytes of the codes and metas of `t` rows of `k` activations (the split-K workspace starts there).
fn q8_bytes(t: usize, k: usize) -> (usize, usize) {
    let meta_at = (t * k).next_multiple_of(16);
    (meta_at, meta_at + t * k / 32 * 16)
}

impl CudaBackend {
    /// Takes a scratch buffer of the Q8 layout plus `ws_bytes` of split-K workspace and quantises `x` (`t` rows of
    /// `k`, a multiple of 32) into it: one `quantize_q8_*` launch.
    fn quantize_q8(
        &self,
        ex: &mut super::backend::Exec,
        x: u64,
        (t, k): (usize, usize),
        ws_bytes: usize,
    ) -> Result<Q8Act> {
        let (meta_at, ws_at) = q8_bytes(t, k);
        let base = self.scratch(ex, ws_at + ws_bytes)?;
        let q = Q8Act { xq: base, xm: base + meta_at as u64, ws: base + ws_at as u64 };
        let nblocks = t * k / 32;
        let args = [Arg::Ptr(x), Arg::Ptr(q.xq), Arg::Ptr(q.xm), Arg::I64(nblocks as i64)];
        let grid = (nblocks.div_ceil(128) as u32, 1, 1);
        self.launch(ex, "gemv_q8", &names::quantize_q8(self.act), grid, 128, &args)?;
        Ok(q)
    }

    /// Split-K plan of a Q8-activation GEMV: `(splits, chunks per split)`, one split unless `t` is 1.
    fn q8_splits(&self, (t, k, n): (usize, usize, usize), wd: DType) -> (usize, usize) {
        let (splits, cps) = split_k(n, k / q8_chunk(wd), self.info.multiprocessors as usize);
        if t == 1 { (splits, cps) } else { (1, cps) }
    }

    /// The tensor-core GEMM for T > 8: on a compute capability 9.0 device with weights of the activation type the
    /// Hopper kernel when `wgmma_plan::use_wgmma` picks it and its self-check passed (kernels/src/cuda/wgmma.rs),
    /// else the mma.sync kernel (`gemm_mma`).
    fn gemm(&self, ex: &mut Exec, p: MatmulPtrs, (t, k, n): (usize, usize, usize), wd: DType) -> Result<()> {
        if wd == self.act && self.try_gemm_wgmma(ex, &p, (t, k, n))? {
            return Ok(());
        }
        self.gemm_mma(ex, p, (t, k, n), wd)
    }

    /// The mma.sync GEMM for T > 8 (kernels/cuda/gemm.cu): the variant, split-K and shared memory of
    /// `gemm_plan::plan`; a split writes f32 partial sums to the scratch buffer and `gemv_reduce_*` adds them in
    /// split order. Requires K % 8 == 0 (and whole 32-blocks for the quantised formats, checked by the callers).
    pub(crate) fn gemm_mma(
        &self,
        ex: &mut Exec,
        p: MatmulPtrs,
        (t, k, n): (usize, usize, usize),
        wd: DType,
    ) -> Result<()> {
        let op = "matmul";
        let act = self.act;
        let plan = gemm_plan::plan(t, n, k, self.info.multiprocessors as usize, gemm_plan::FillMode::of(act, wd));
        let ws = if plan.splits > 1 { self.scratch(ex, plan.workspace_bytes(t, n))? } else { 0 };
        let args = [
            Arg::Ptr(p.qs),
            Arg::Ptr(p.sc),
            Arg::Ptr(p.x),
            Arg::Ptr(p.out),
            Arg::Ptr(ws),
            i32_arg(op, t)?,
            i32_arg(op, n)?,
            i32_arg(op, k)?,
            i32_arg(op, plan.kts)?,
        ];
        let name = if plan.small { names::gemm_small(act, wd) } else { names::gemm(act, wd) };
        self.launch_smem(ex, "gemm", &name, plan.grid, plan.threads, plan.smem, &args)?;
        if plan.splits > 1 {
            let args = [Arg::Ptr(ws), Arg::Ptr(p.out), Arg::I64((t * n) as i64), Arg::I32(plan.splits as i32)];
            let grid = ((t * n).div_ceil(256).min(65_535 * 4) as u32, 1, 1);
            self.launch(ex, "gemv", &names::gemv_reduce(act), grid, 256, &args)?;
        }
        Ok(())
    }

    /// `matmul` for the formats whose GEMV reads Q8 activations (`names::Q8_ACT_WEIGHT_DTYPES`,
    /// kernels/cuda/gemv_q8.cu): T <= 8 quantises the activation rows once (int8 per value, a 16-byte meta per
    /// 32 values, in the scratch buffer) and runs the dp4a GEMV (split-K for one row and a short output, as
    /// `matmul` does); longer T runs the tensor-core GEMM on weights dequantised into shared memory.
    fn matmul_q8(&self, p: MatmulPtrs, (t, k, n): (usize, usize, usize), wd: DType) -> Result<()> {
        let op = "matmul";
        if !k.is_multiple_of(wd.block_elems()) {
            return Err(shape_err(op, format!("rows of {k} {wd} values are not whole blocks of {}", wd.block_elems())));
        }
        // The sizes must fit the kernels' 32-bit arguments.
        for v in [t, k, n] {
            i32_arg(op, v)?;
        }
        let mut ex = self.exec()?;
        if t == 0 || n == 0 {
            return Ok(());
        }
        if t > 8 {
            return self.gemm(&mut ex, p, (t, k, n), wd);
        }
        let (splits, _) = self.q8_splits((t, k, n), wd);
        let q = self.quantize_q8(&mut ex, p.x, (t, k), if splits > 1 { splits * n * 4 } else { 0 })?;
        self.gemv_q8(&mut ex, &p, (t, k, n), wd, q)
    }

    /// One row of Q8_0/Q4_0/Q4_1 (`names::one_row_on_act`) by the gemv_q8.cu kernels that quantise the activations
    /// inside each block, into `smem` bytes of shared memory (`xs_plan`: no `quantize_q8` launch); split-K as
    /// `matmul`, with the partial sums added by `gemv_reduce_*` in split order.
    fn matmul_xs(
        &self,
        p: MatmulPtrs,
        (k, n): (usize, usize),
        wd: DType,
        (splits, cps, smem): (usize, usize, usize),
    ) -> Result<()> {
        let op = "matmul";
        let (ki, ni) = (i32_arg(op, k)?, i32_arg(op, n)?);
        let act = self.act;
        let mut ex = self.exec()?;
        if n == 0 {
            return Ok(());
        }
        let rows = n.div_ceil(GEMV_ROWS_PER_BLOCK) as u32;
        if splits > 1 {
            let ws = self.scratch(&mut ex, splits * n * 4)?;
            let args = [Arg::Ptr(p.qs), Arg::Ptr(p.sc), Arg::Ptr(p.x), Arg::Ptr(ws), ni, ki, i32_arg(op, cps)?];
            let name = names::gemv_splitk_xs(act, wd);
            self.launch_smem(&mut ex, "gemv_q8", &name, (rows, 1, splits as u32), 128, smem as u32, &args)?;
            let args = [Arg::Ptr(ws), Arg::Ptr(p.out), Arg::I64(n as i64), Arg::I32(splits as i32)];
            return self.launch(&mut ex, "gemv", &names::gemv_reduce(act), (n.div_ceil(256) as u32, 1, 1), 256, &args);
        }
        let args = [Arg::Ptr(p.qs), Arg::Ptr(p.sc), Arg::Ptr(p.x), Arg::Ptr(p.out), ni, ki];
        self.launch_smem(&mut ex, "gemv_q8", &names::gemv_xs(act, wd), (rows, 1, 1), 128, smem as u32, &args)
    }

    /// The dp4a GEMV of `p` on activations already quantised into `q` (whose workspace holds this GEMV's split-K
    /// partial sums, if it splits).
    fn gemv_q8(
        &self,
        ex: &mut super::backend::Exec,
        p: &MatmulPtrs,
        (t, k, n): (usize, usize, usize),
        wd: DType,
        q: Q8Act,
    ) -> Result<()> {
        let op = "matmul";
        let (ti, ki, ni) = (i32_arg(op, t)?, i32_arg(op, k)?, i32_arg(op, n)?);
        let act = self.act;
        let (splits, cps) = self.q8_splits((t, k, n), wd);
        if splits > 1 {
            let grid = (n.div_ceil(GEMV_ROWS_PER_BLOCK) as u32, 1, splits as u32);
            let args = [
                Arg::Ptr(p.qs),
                Arg::Ptr(p.sc),
                Arg::Ptr(q.xq),
                Arg::Ptr(q.xm),
                Arg::Ptr(q.ws),
                ni,
                ki,
                ti,
                i32_arg(op, cps)?,
            ];
            self.launch(ex, "gemv_q8", &names::gemv_splitk(act, wd), grid, 128, &args)?;
            let args = [Arg::Ptr(q.ws), Arg::Ptr(p.out), Arg::I64(n as i64), Arg::I32(splits as i32)];
            return self.launch(ex, "gemv", &names::gemv_reduce(act), (n.div_ceil(256) as u32, 1, 1), 256, &args);
        }
        let nt = t.next_power_of_two().min(8);
        let grid = (n.div_ceil(GEMV_ROWS_PER_BLOCK) as u32, t.div_ceil(nt) as u32, 1);
        let args = [Arg::Ptr(p.qs), Arg::Ptr(p.sc), Arg::Ptr(q.xq), Arg::Ptr(q.xm), Arg::Ptr(p.out), ni, ki, ti];
        self.launch(ex, "gemv_q8", &names::gemv(act, wd, nt), grid, 128, &args)
    }

    /// `Backend::matmul_many`: the pairs whose GEMV reads Q8 activations share one quantisation of `x` (when two
    /// or more do); the others run as `matmul`. Results are those of `matmul` per pair: the codes and metas one
    /// `quantize_q8` launch writes are the ones each GEMV's own launch would write.
    pub(crate) fn matmul_many_impl(&self, x: &Tensor, outs: &mut [(&Tensor, &mut Tensor)]) -> Result<()> {
        let op = "matmul";
        let (t, k) = (x.rows(), x.cols());
        let shared = |w: &Tensor| on_q8(t, w.dtype()) && k.is_multiple_of(w.dtype().block_elems());
        if outs.iter().filter(|(w, _)| shared(w)).count() < 2 {
            for (w, out) in outs.iter_mut() {
                self.matmul(x, w, out)?;
            }
            return Ok(());
        }
        let xp = self.act_ptr(op, x)?;
        let mut group = Vec::with_capacity(outs.len());
        let mut ws_bytes = 0;
        for (w, out) in outs.iter_mut() {
            if !shared(w) {
                self.matmul(x, w, out)?;
                continue;
            }
            let n = w.rows();
            if w.cols() != k || out.rows() != t || out.cols() != n {
                return Err(shape_err(op, format!("x {:?} · w {:?}ᵀ into {:?}", x.shape(), w.shape(), out.shape())));
            }
            let (qs, sc) = Self::weight_ptrs(w)?;
            let p = MatmulPtrs { x: xp, qs, sc, out: self.act_ptr(op, out)? };
            let (splits, _) = self.q8_splits((t, k, n), w.dtype());
            if splits > 1 {
                ws_bytes = ws_bytes.max(splits * n * 4);
            }
            group.push((p, n, w.dtype()));
        }
        let mut ex = self.exec()?;
        if group.iter().all(|&(_, n, _)| n == 0) {
            return Ok(());
        }
        let q = self.quantize_q8(&mut ex, xp, (t, k), ws_bytes)?;
        for (p, n, wd) in &group {
            if *n > 0 {
                self.gemv_q8(&mut ex, p, (t, k, *n), *wd, q)?;
            }
        }
        Ok(())
    }

    /// `Backend::matmul_swiglu`: one `gemv_swiglu_*` launch (after the activations' quantisation for the formats on
    /// Q8 activations) when T <= 8, both weights have one dtype and shape, and the separate GEMVs would run one
    /// unsplit kernel each; then the result is bit for bit that of the separate GEMVs and `swiglu_*` (the fused
    /// kernel sums each row as they do and rounds gate and up to the activation type before SwiGLU). Anything else
    /// runs the three ops.
    pub(crate) fn matmul_swiglu_impl(
        &self,
        x: &Tensor,
        (wg, wu): (&Tensor, &Tensor),
        (gate, up): (&mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> Result<()> {
        let op = "matmul_swiglu";
        let (t, k, n) = (x.rows(), x.cols(), wg.rows());
        let wd = wg.dtype();
        let sms = self.info.multiprocessors as usize;
        // The path `matmul` takes for each weight, when it is one unsplit launch.
        let xs = if t == 1 && names::one_row_on_act(wd) { xs_plan(n, k, sms) } else { None };
        let fused = if wu.dtype() != wd || wu.shape() != wg.shape() || wg.cols() != k || !(1..=8).contains(&t) {
            None
        } else if let Some((splits, _, smem)) = xs {
            (splits == 1).then_some(GluPath::Xs(smem))
        } else if on_q8(t, wd) {
            let whole = k.is_multiple_of(wd.block_elems());
            (whole && (t > 1 || split_k(n, k / q8_chunk(wd), sms).0 == 1)).then_some(GluPath::Q8)
        } else {
            act_chunk(wd)
                .filter(|&c| k.is_multiple_of(c) && (t > 1 || split_k(n, k / c, sms).0 == 1))
                .map(|_| GluPath::Act)
        };
        let Some(path) = fused else {
            self.matmul(x, wg, gate)?;
            self.matmul(x, wu, up)?;
            return self.swiglu(gate, up, out);
        };
        if out.rows() != t || out.cols() != n {
            return Err(shape_err(op, format!("x {:?} · w {:?}ᵀ into {:?}", x.shape(), wg.shape(), out.shape())));
        }
        let (xp, op_) = (self.act_ptr(op, x)?, self.act_ptr(op, out)?);
        let ((qg, sg), (qu, su)) = (Self::weight_ptrs(wg)?, Self::weight_ptrs(wu)?);
        let (ti, ki, ni) = (i32_arg(op, t)?, i32_arg(op, k)?, i32_arg(op, n)?);
        let act = self.act;
        let nt = t.next_power_of_two().min(8);
        let grid = (n.div_ceil(GLU_OUTPUTS_PER_BLOCK) as u32, t.div_ceil(nt) as u32, 1);
        let name = names::gemv_swiglu(act, wd, nt);
        let mut ex = self.exec()?;
        if n == 0 {
            return Ok(());
        }
        if let GluPath::Xs(smem) = path {
            let args = [Arg::Ptr(qg), Arg::Ptr(sg), Arg::Ptr(qu), Arg::Ptr(su), Arg::Ptr(xp), Arg::Ptr(op_), ni, ki];
            let name = names::gemv_swiglu_xs(act, wd);
            return self.launch_smem(&mut ex, "gemv_q8", &name, grid, 128, smem as u32, &args);
        }
        if path == GluPath::Q8 {
            let q = self.quantize_q8(&mut ex, xp, (t, k), 0)?;
            let args = [
                Arg::Ptr(qg),
                Arg::Ptr(sg),
                Arg::Ptr(qu),
                Arg::Ptr(su),
                Arg::Ptr(q.xq),
                Arg::Ptr(q.xm),
                Arg::Ptr(op_),
                ni,
                ki,
                ti,
            ];
            return self.launch(&mut ex, "gemv_q8", &name, grid, 128, &args);
        }
        let args = [Arg::Ptr(qg), Arg::Ptr(sg), Arg::Ptr(qu), Arg::Ptr(su), Arg::Ptr(xp), Arg::Ptr(op_), ni, ki, ti];
        self.launch(&mut ex, "gemv", &name, grid, 128, &args)
    }
}
