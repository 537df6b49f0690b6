//! The CUDA backend: one context and one stream per device, a lazily filled kernel-module cache, the staging of
//! small per-op arguments, and the launch path shared by every op (eager, or recorded for a CUDA graph).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::thread::ThreadId;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use tracing::info;

use super::graph::{Mode, Recording};
use super::modules;
use super::nvrtc;
use super::sampling::SampleIo;
use super::staging::StageArea;
use super::step_record::{Role, StepRecording};
use super::storage::{CudaStorage, Layout, RawDeviceBuf, cuda_err};
use crate::DType;
use crate::error::{KernelError, Result};
use crate::tensor::{Storage, Tensor};

/// Bytes of the eager staging ring for per-op arguments (ids, positions, slots, block tables).
const STAGING_BYTES: usize = 8 << 20;

/// One kernel argument, as passed by value to `cuLaunchKernel`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    U64(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    /// A `CUtensorMap` passed by value (`__grid_constant__`, kernels/cuda/gemm_sm90.cu).
    TensorMap([u64; 16]),
}

impl Arg {
    /// The argument's bits, for the signature of a recorded step.
    fn bits(self) -> u64 {
        match self {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::I64(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
            // The map encodes the tensor's address, shape and box: fold all of it into the signature.
            Arg::TensorMap(m) => m.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| (h ^ w).wrapping_mul(0x100_0000_01b3)),
        }
    }
}

/// A `usize` dimension as a 32-bit kernel argument, refusing sizes the kernels cannot index.
pub(crate) fn i32_arg(what: &'static str, v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| crate::error::shape_err(what, format!("{v} does not fit the kernels' 32-bit indices")))
}

/// What a device can do, read once at start-up.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub compute: (i32, i32),
    pub multiprocessors: u32,
    /// Device memory in bytes.
    pub total_memory: usize,
}

/// Mutable per-backend state: the argument staging ring, the attention workspace and the graph mode.
pub(crate) struct Exec {
    ring: StageArea,
    scratch: Option<CudaSlice<u8>>,
    pub(crate) mode: Mode,
    /// Result buffers of the sampler, made on first use.
    pub(crate) sample_io: Option<SampleIo>,
    /// The thread that runs a captured or replayed step; ops from other threads are refused meanwhile.
    pub(crate) step_thread: Option<ThreadId>,
}

/// The CUDA backend of one device.
pub struct CudaBackend {
    pub(crate) info: DeviceInfo,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) act: DType,
    nvrtc_arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Dynamic shared memory each function has been allowed (`launch_smem`), so the limit is raised once per
    /// function, on its first launch, not on every one (nor inside a graph capture once it ran eagerly).
    smem_allowed: Mutex<HashMap<String, u32>>,
    pub(crate) exec: Mutex<Exec>,
    /// The Hopper GEMM's mode and self-check status (kernels/src/cuda/wgmma.rs).
    pub(crate) wgmma: Mutex<super::wgmma::WgmmaState>,
    /// Decode-step graphs per batch-size bucket (`Backend::graph_step`, kernels/src/step_graph.rs).
    pub(crate) step_graphs: Mutex<crate::step_graph::StepGraphs<super::graph::DecodeGraph>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.info).field("act", &self.act).finish()
    }
}

/// Number of CUDA devices this process can use, or why there are none. Never panics: the driver library (and NVRTC
/// when a kernel module was not prebuilt) are probed before cudarc touches them.
/// What [`probe`] answers on a machine without the CUDA driver: a CPU machine, not a broken GPU setup.
pub const NO_DRIVER: &str = "the CUDA driver library (libcuda.so) was not found";

pub fn probe() -> std::result::Result<usize, String> {
    // SAFETY: only tries to dlopen libcuda by its usual names; no symbol is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(NO_DRIVER.into());
    }
    if !modules::all_prebuilt() && !nvrtc::available() {
        return Err("NVRTC (libnvrtc.so) was not found and the kernels were not prebuilt with nvcc".into());
    }
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))?;
    let n = CudaContext::device_count().map_err(|e| format!("cannot count CUDA devices: {e}"))?;
    if n <= 0 { Err("no CUDA device is visible".into()) } else { Ok(n as usize) }
}

impl CudaBackend {
    /// Opens device `ordinal` with activations (and the KV cache) in `act` (f16 or bf16). Needs compute
    /// capability 8.0 or newer (tensor-core bf16, cp.async, ldmatrix).
    pub fn new(ordinal: usize, act: DType) -> Result<Arc<Self>> {
        if !matches!(act, DType::F16 | DType::BF16) {
            return Err(KernelError::UnsupportedDType { op: "CUDA activations", dtype: act });
        }
        let count = probe().map_err(KernelError::CudaUnavailable)?;
        if ordinal >= count {
            return Err(KernelError::CudaUnavailable(format!("no device cuda:{ordinal} ({count} visible)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err)?;
        // SAFETY: called before any allocation or stream of this backend exists. All work goes to one stream, so
        // cudarc's per-buffer events (multi-stream tracking) are not needed; they would also break graph capture.
        unsafe { ctx.disable_event_tracking() };
        let compute = ctx.compute_capability().map_err(cuda_err)?;
        let name = ctx.name().map_err(cuda_err)?;
        if compute.0 < 8 {
            return Err(KernelError::CudaUnavailable(format!(
                "{name} has compute capability {}.{}; shardline's kernels need 8.0 or newer",
                compute.0, compute.1
            )));
        }
        let multiprocessors = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err)? as u32;
        let total_memory = ctx.total_mem().map_err(cuda_err)?;
        let stream = ctx.new_stream().map_err(cuda_err)?;
        let ring = StageArea::new(&ctx, STAGING_BYTES, true)?;
        let info = DeviceInfo { ordinal, name, compute, multiprocessors, total_memory };
        let nvrtc_arch = format!("sm_{}{}", compute.0, compute.1);
        Ok(Arc::new(Self {
            info,
            ctx,
            stream,
            act,
            nvrtc_arch,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            smem_allowed: Mutex::new(HashMap::new()),
            wgmma: Mutex::new(super::wgmma::WgmmaState::new(compute)),
            exec: Mutex::new(Exec { ring, scratch: None, mode: Mode::Eager, sample_io: None, step_thread: None }),
            step_graphs: Mutex::new(crate::step_graph::StepGraphs::new()),
        }))
    }

    /// The device this backend runs on.
    pub fn device_info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Loads every kernel module now (compiling with NVRTC where no PTX was prebuilt), so that the first step does
    /// not pay for it. Modules for another architecture than this device's (`gemm_sm90` off compute 9.0) are
    /// skipped: they never run here.
    pub fn preload(&self) -> Result<()> {
        for m in modules::MODULES {
            if !modules::runs_on(m.name, self.info.compute) {
                continue;
            }
            self.module(m.name)?;
        }
        Ok(())
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        let mut cache = self.modules.lock();
        if let Some(m) = cache.get(name) {
            return Ok(m.clone());
        }
        let m = modules::module(name).ok_or_else(|| KernelError::Cuda(format!("no kernel module {name}")))?;
        if !modules::runs_on(name, self.info.compute) {
            return Err(KernelError::Cuda(format!("kernel module {name} does not run on {}", self.nvrtc_arch)));
        }
        // Most modules compile for the device's own sm_XY; gemm_sm90 for sm_90a (wgmma, TMA), with no fallback.
        let arch = modules::required_arch(name).unwrap_or(&self.nvrtc_arch);
        let ptx = match m.ptx {
            Some(ptx) => Ptx::from_src(ptx),
            None => match self.prebuilt(m, arch) {
                Some(ptx) => ptx,
                None => {
                    info!(module = name, arch = %arch, "compiling CUDA kernels with NVRTC (once per process)");
                    let compiled = match nvrtc::compile(m, arch, &[]) {
                        Ok(c) => c,
                        Err(e) if modules::required_arch(name).is_some() => return Err(e),
                        // An NVRTC older than the card knows no `sm_XY` for it: PTX for sm_80 runs on it too.
                        Err(first) => nvrtc::compile(m, "compute_80", &[]).map_err(|_| first)?,
                    };
                    match compiled.cubin {
                        Some(bin) => Ptx::from_binary(bin),
                        None => Ptx::from_src(compiled.ptx),
                    }
                }
            },
        };
        let module = self.ctx.load_module(ptx).map_err(|e| KernelError::Cuda(format!("loading {name}: {e}")))?;
        cache.insert(name, module.clone());
        Ok(module)
    }

    /// The module from `$SHARDLINE_KERNEL_DIR` when it holds an artifact compiled from exactly this source: machine
    /// code for this device's architecture, else PTX (JIT-compiled by the driver). Written by the NVRTC test with
    /// `SHARDLINE_KERNEL_OUT` (see scripts/gpu-check.sh), for machines without a matching NVRTC.
    fn prebuilt(&self, m: &modules::KernelModule, arch: &str) -> Option<Ptx> {
        let dir = std::path::PathBuf::from(std::env::var_os("SHARDLINE_KERNEL_DIR")?);
        let stem = modules::artifact_stem(m);
        let cubin = dir.join(format!("{stem}-{arch}.cubin"));
        if let Ok(bin) = std::fs::read(&cubin) {
            info!(module = m.name, file = %cubin.display(), "loading prebuilt CUDA kernels");
            return Some(Ptx::from_binary(bin));
        }
        let ptx = dir.join(format!("{stem}.ptx"));
        if let Ok(text) = std::fs::read_to_string(&ptx) {
            info!(module = m.name, file = %ptx.display(), "loading prebuilt CUDA kernels (PTX)");
            return Some(Ptx::from_src(text));
        }
        tracing::warn!(module = m.name, dir = %dir.display(), "SHARDLINE_KERNEL_DIR has no kernels for this source");
        None
    }

    fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().get(name) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(name).map_err(|e| KernelError::Cuda(format!("kernel {module}::{name}: {e}")))?;
        self.functions.lock().insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Locks the per-backend state. While another thread captures or replays a step (the node's decode steps are
    /// graphs, `Backend::graph_step`), an op of this thread waits for that step to end: enqueued during a capture it
    /// would become part of the other thread's graph. Waits at most `STEP_WAIT` before failing.
    pub(crate) fn exec(&self) -> Result<MutexGuard<'_, Exec>> {
        const STEP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
        let started = std::time::Instant::now();
        loop {
            let guard = self.exec.lock();
            match guard.step_thread {
                Some(owner) if owner != std::thread::current().id() => {
                    drop(guard);
                    if started.elapsed() > STEP_WAIT {
                        return Err(KernelError::Cuda(
                            "another thread has been capturing or replaying a CUDA graph step on this device for 5 s"
                                .into(),
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
                _ => return Ok(guard),
            }
        }
    }

    /// Copies small host data (an argument of role `role`) to the device in stream order and returns its device
    /// address (see `staging.rs`).
    pub(crate) fn stage(&self, ex: &mut Exec, role: Role, bytes: &[u8]) -> Result<u64> {
        match &mut ex.mode {
            Mode::Eager => {
                let at = ex.ring.reserve(&self.stream, bytes.len())?;
                ex.ring.write(at, bytes);
                ex.ring.upload(&self.stream, at, bytes.len())
            }
            // A captured step stages each distinct argument once (kernels/src/cuda/stage_plan.rs); the placement is
            // signed, so a replay reuses regions exactly where the capture did or is not launched.
            // Neither captures a copy: the bytes go to the graph's host half, and one copy of all of them precedes
            // each launch of the graph (kernels/src/cuda/graph.rs).
            // The role is checked against the step's inputs when it was captured with them (step_record.rs).
            Mode::Capture(rec) | Mode::Replay(rec) => {
                let area = &mut rec.area;
                let placed = rec.host.stage(role, bytes, &mut |at, b| area.write(at, b))?;
                Ok(rec.area.device_addr(placed.offset()))
            }
        }
    }

    /// Stages a slice of u32 (ids, positions, slots, tables).
    pub(crate) fn stage_u32(&self, ex: &mut Exec, role: Role, data: &[u32]) -> Result<u64> {
        self.stage(ex, role, bytemuck::cast_slice(data))
    }

    /// While a step is captured: records a fact an op checked its arguments against (a bound, the attention split
    /// count), so that a direct replay checks the same (step_record.rs).
    pub(crate) fn note(ex: &mut Exec, f: impl FnOnce(&mut StepRecording)) {
        if let Mode::Capture(rec) = &mut ex.mode {
            f(&mut rec.host);
        }
    }

    /// Launches `module::name` on the stream, or only records it while a captured step is replayed.
    pub(crate) fn launch(
        &self,
        ex: &mut Exec,
        module: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.launch_smem(ex, module, name, grid, block, 0, args)
    }

    /// `launch` with `smem` bytes of dynamic shared memory (the GEMM's pipeline stages); above the default 48 KiB
    /// the function's limit is raised first (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_smem(
        &self,
        ex: &mut Exec,
        module: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        if grid.1 > 65_535 || grid.2 > 65_535 {
            return Err(KernelError::Cuda(format!("{name}: grid {grid:?} exceeds the y/z limit of 65535")));
        }
        let func = self.function(module, name)?;
        let sig = |rec: &mut Recording| {
            rec.sign_str(name);
            rec.sign(&[grid.0 as u64, grid.1 as u64, grid.2 as u64, block as u64 | (smem as u64) << 32]);
            for a in args {
                rec.sign(&[a.bits()]);
            }
        };
        match &mut ex.mode {
            Mode::Replay(rec) => {
                sig(rec);
                return Ok(());
            }
            Mode::Capture(rec) => sig(rec),
            Mode::Eager => {}
        }
        if smem > 48 * 1024 {
            let mut allowed = self.smem_allowed.lock();
            if allowed.get(name).is_none_or(|&a| a < smem) {
                // A raw driver call on the function: the context must be current on this thread.
                self.ctx.bind_to_thread().map_err(cuda_err)?;
                func.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(|e| KernelError::Cuda(format!("{name}: {smem} bytes of shared memory: {e}")))?;
                allowed.insert(name.to_string(), smem);
            }
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem };
        let mut b = self.stream.launch_builder(&func);
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::TensorMap(m) => b.arg(m),
            };
        }
        // SAFETY: every kernel of kernels/cuda takes exactly the arguments its op passes (pointers as u64 device
        // addresses, then i32/i64/f32 scalars in declaration order); the ops validate shapes, dtypes and indices
        // against the buffers' sizes before launching, and the buffers outlive the queued work because device
        // memory is freed stream-ordered (or, for graph buffers, with the graph).
        unsafe { b.launch(cfg) }.map_err(|e| KernelError::Cuda(format!("launching {name}: {e}")))?;
        Ok(())
    }

    /// Device-to-device copy in stream order (or recorded while replaying).
    pub(crate) fn copy_d2d(&self, ex: &mut Exec, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        match &mut ex.mode {
            Mode::Replay(rec) => {
                rec.sign(&[0x4432_4432, dst, src, bytes as u64]);
                return Ok(());
            }
            Mode::Capture(rec) => rec.sign(&[0x4432_4432, dst, src, bytes as u64]),
            Mode::Eager => {}
        }
        // A raw driver call: the context must be current on this thread (cudarc's safe calls bind it themselves).
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        // SAFETY: the caller checked that both ranges lie inside live device allocations of this context.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(cuda_err)
    }

    /// A new device buffer of `bytes` for an activation tensor. While a step is captured or replayed the buffer
    /// belongs to the graph (the same buffers, in the same order, on every replay).
    pub(crate) fn alloc_storage(&self, ex: &mut Exec, bytes: usize) -> Result<CudaStorage> {
        match &mut ex.mode {
            Mode::Eager => {
                // SAFETY: the memory is uninitialised; the `alloc` contract says contents are unspecified until
                // written, and every reader of a tensor reads only what an op wrote.
                let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(cuda_err)?;
                Ok(CudaStorage::owned(slice, bytes, &self.stream, Layout::Plain))
            }
            Mode::Capture(rec) => {
                let buf = Arc::new(RawDeviceBuf::new(&self.ctx, bytes)?);
                rec.bufs.push(buf.clone());
                rec.sign(&[0x414c_4c43, bytes as u64]);
                Ok(CudaStorage::graph(buf, bytes))
            }
            Mode::Replay(rec) => {
                rec.sign(&[0x414c_4c43, bytes as u64]);
                let buf = rec.next_buf(bytes)?;
                Ok(CudaStorage::graph(buf, bytes))
            }
        }
    }

    /// Device workspace of at least `bytes` (attention partial results), valid until the next call.
    pub(crate) fn scratch(&self, ex: &mut Exec, bytes: usize) -> Result<u64> {
        if matches!(ex.mode, Mode::Eager) {
            let big_enough = ex.scratch.as_ref().is_some_and(|s| s.len() >= bytes);
            if !big_enough {
                // The old buffer is freed in stream order, after the kernels that still use it.
                // SAFETY: workspace contents are always written by a kernel before they are read.
                let s = unsafe { self.stream.alloc::<u8>(bytes.next_power_of_two().max(1 << 16)) }.map_err(cuda_err)?;
                ex.scratch = Some(s);
            }
            let s = ex.scratch.as_ref().expect("set above");
            let (p, _sync) = cudarc::driver::DevicePtr::device_ptr(s, &self.stream);
            return Ok(p);
        }
        // A graph buffer: the recording keeps it alive after this handle is dropped.
        Ok(self.alloc_storage(ex, bytes)?.ptr())
    }

    /// Fails when called inside a captured or replayed step (host transfers and synchronisation cannot be part of
    /// a CUDA graph).
    pub(crate) fn require_eager(&self, ex: &Exec, op: &'static str) -> Result<()> {
        if matches!(ex.mode, Mode::Eager) {
            Ok(())
        } else {
            Err(KernelError::Cuda(format!("{op} cannot run inside a captured CUDA graph step")))
        }
    }

    /// Wraps a device allocation into a tensor.
    pub(crate) fn tensor(&self, dtype: DType, shape: &[usize], storage: CudaStorage) -> Result<Tensor> {
        Tensor::new(dtype, shape, Storage::Cuda(storage))
    }
}

/// The device storage of `t`, or an error naming where it lives instead.
pub(crate) fn cuda_storage(t: &Tensor) -> Result<&CudaStorage> {
    match t.storage() {
        Storage::Cuda(c) => Ok(c),
        other => Err(KernelError::WrongDevice { backend: "cuda", found: other.location() }),
    }
}
