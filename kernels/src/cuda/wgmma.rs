//! The Hopper GEMM path (kernels/cuda/gemm_sm90.cu, docs/CUDA.md "GEMM on Hopper"): TMA tensor maps, the launch,
//! and the self-check that guards it. The kernel has not run on a GPU yet, so on a compute capability 9.0 device the
//! first GEMM that would take it first runs a small GEMM through both this kernel and the mma.sync kernel
//! (gemm.cu) on deterministic inputs and compares them within the parity tolerance; on a mismatch, a launch error
//! or a timed-out pipeline it logs one warning and the backend uses mma.sync from then on.

use cudarc::driver::{CudaSlice, DevicePtr, sys};
use half::{bf16, f16};
use tracing::{info, warn};

use super::backend::{Arg, CudaBackend, Exec, i32_arg};
use super::graph::Mode;
use super::names;
use super::ops::MatmulPtrs;
use super::storage::cuda_err;
use super::wgmma_plan::{self, TensorMapSpec, WG_BM, WG_BN, WG_SMEM_BYTES, WG_THREADS};
use crate::DType;
use crate::error::{KernelError, Result};

/// How the backend chooses the Hopper GEMM (`CudaBackend::set_wgmma_mode`; `SHARDLINE_WGMMA=0` starts in `Never`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaMode {
    /// For the shapes `wgmma_plan::use_wgmma` picks, once the self-check passed.
    Auto,
    /// For every GEMM the kernel can run (same-type 16-bit weights, T > 8, K a multiple of 8, 16-byte aligned
    /// operands), once the self-check passed (for tests of the kernel on small shapes).
    Always,
    /// Never: mma.sync only.
    Never,
}

/// Where the Hopper GEMM stands on this backend.
#[derive(Clone, Debug, PartialEq)]
pub enum WgmmaStatus {
    /// Not a compute capability 9.0 device (wgmma exists only on sm_90a).
    Unavailable,
    /// Not yet checked: the first GEMM that would take it runs the self-check first.
    Unchecked,
    /// The self-check passed: the largest difference from the mma.sync kernel, relative to the largest output.
    Verified { rel_err: f32 },
    /// The self-check failed (the reason, also logged once); mma.sync is used from then on.
    Disabled(String),
}

/// Per-backend state of the path.
pub(crate) struct WgmmaState {
    pub(crate) mode: WgmmaMode,
    pub(crate) status: WgmmaStatus,
    /// The kernels' status word (bit 0: a pipeline wait timed out), written only by a broken kernel.
    flag: Option<CudaSlice<u32>>,
    /// Launches of the kernel so far (the self-check's included), for tests that must know which path ran.
    launches: u64,
}

impl WgmmaState {
    pub(crate) fn new(compute: (i32, i32)) -> Self {
        let mode =
            if std::env::var("SHARDLINE_WGMMA").is_ok_and(|v| v == "0") { WgmmaMode::Never } else { WgmmaMode::Auto };
        let status = if compute == (9, 0) { WgmmaStatus::Unchecked } else { WgmmaStatus::Unavailable };
        Self { mode, status, flag: None, launches: 0 }
    }
}

/// The self-check's GEMM: rows, columns and K with tails in every dimension (T = 200: a full and a partial 128-row
/// tile; N = 520: two full 256-column tiles and 8 columns; K = 328: five 64-wide k-tiles and 8 more, more k-tiles
/// than stages so the pipeline wraps).
pub(crate) const CHECK_SHAPE: (usize, usize, usize) = (200, 520, 328);
/// The parity tolerance (kernels/tests/parity.rs: 1e-2 of the largest reference magnitude for 16-bit activations).
pub(crate) const CHECK_TOL: f32 = 1e-2;

/// Deterministic inputs of the self-check: values in [-1, 1) with 7 significant bits (exact in f16 and bf16),
/// weights scaled by 1/8 so outputs stay near 1.
pub(crate) fn check_inputs() -> (Vec<f32>, Vec<f32>) {
    let (t, n, k) = CHECK_SHAPE;
    let val = |i: usize, salt: u64| {
        let h = (i as u64 ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 57) as f32 - 64.0) / 64.0
    };
    let x = (0..t * k).map(|i| val(i, 1)).collect();
    let w = (0..n * k).map(|i| val(i, 2) / 8.0).collect();
    (x, w)
}

/// The largest |a − b| relative to the largest |b|; infinite when any value is not finite.
pub(crate) fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn to_bits(act: DType, v: &[f32]) -> Vec<u16> {
    match act {
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect(),
        _ => v.iter().map(|&x| f16::from_f32(x).to_bits()).collect(),
    }
}

fn from_bits(act: DType, v: &[u16]) -> Vec<f32> {
    match act {
        DType::BF16 => v.iter().map(|&x| bf16::from_bits(x).to_f32()).collect(),
        _ => v.iter().map(|&x| f16::from_bits(x).to_f32()).collect(),
    }
}

/// `cuTensorMapEncodeTiled` for a row-major `[rows, k]` matrix of the activation type at `addr`, read in boxes of
/// `box_rows` × 64 with the 128-byte swizzle; out-of-range elements read as zero.
fn encode_map(act: DType, spec: &TensorMapSpec, addr: u64) -> Result<[u64; 16]> {
    let dtype = match act {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every pointer refers to a live local array of the length the rank (2) requires (`globalStrides`
    // has rank − 1 entries); the driver only writes the 128-byte `map`. `addr` is a device address of this
    // context, 16-byte aligned, with `dims` and `strides` inside its allocation (checked by the caller and by
    // `TensorMapSpec::new`); encoding reads no device memory.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            2,
            addr as *mut std::ffi::c_void,
            spec.dims.as_ptr(),
            spec.strides.as_ptr(),
            spec.box_dim.as_ptr(),
            spec.elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|e| KernelError::Cuda(format!("cuTensorMapEncodeTiled: {e:?}")))?;
    Ok(map.opaque)
}

impl CudaBackend {
    /// How the Hopper GEMM is chosen from now on (`Always` for tests on small shapes, `Never` for mma.sync only).
    pub fn set_wgmma_mode(&self, mode: WgmmaMode) {
        self.wgmma.lock().mode = mode;
    }

    /// Where the Hopper GEMM stands (unavailable, unchecked, verified, disabled by its self-check).
    pub fn wgmma_status(&self) -> WgmmaStatus {
        self.wgmma.lock().status.clone()
    }

    /// How many times the Hopper GEMM kernel was launched (the self-check's launch included).
    pub fn wgmma_launches(&self) -> u64 {
        self.wgmma.lock().launches
    }

    /// Runs the self-check now (on a compute capability 9.0 device; `Unavailable` elsewhere) unless it already ran,
    /// and returns the resulting status.
    pub fn wgmma_self_check(&self) -> Result<WgmmaStatus> {
        let mut ex = self.exec()?;
        self.require_eager(&ex, "the wgmma self-check")?;
        self.wgmma_ready(&mut ex)?;
        Ok(self.wgmma_status())
    }

    /// Runs `p` (same-type weights, `t` > 8) through the Hopper GEMM when the device, the mode, the shape and the
    /// self-check allow it; `Ok(false)` means the caller runs the mma.sync GEMM.
    pub(crate) fn try_gemm_wgmma(
        &self,
        ex: &mut Exec,
        p: &MatmulPtrs,
        (t, k, n): (usize, usize, usize),
    ) -> Result<bool> {
        let mode = {
            let st = self.wgmma.lock();
            if matches!(st.status, WgmmaStatus::Unavailable | WgmmaStatus::Disabled(_)) {
                return Ok(false);
            }
            st.mode
        };
        let wanted = match mode {
            WgmmaMode::Never => false,
            WgmmaMode::Always => k.is_multiple_of(8),
            WgmmaMode::Auto => wgmma_plan::use_wgmma(t, n, k, self.info.multiprocessors as usize),
        };
        // Both operands must be valid tensor-map sources (16-byte aligned, K % 8 == 0).
        let (Ok(sa), Ok(sb)) = (TensorMapSpec::new(p.x, t, k, WG_BM), TensorMapSpec::new(p.qs, n, k, WG_BN)) else {
            return Ok(false);
        };
        if !wanted || !self.wgmma_ready(ex)? {
            return Ok(false);
        }
        self.launch_wgmma(ex, p, (t, k, n), (&sa, &sb))?;
        Ok(true)
    }

    /// Whether the path may be used now: verified, or checked now (eagerly; inside a captured step an unchecked
    /// path is not used, and the check waits for a later eager GEMM).
    fn wgmma_ready(&self, ex: &mut Exec) -> Result<bool> {
        match self.wgmma.lock().status {
            WgmmaStatus::Verified { .. } => return Ok(true),
            WgmmaStatus::Unchecked => {}
            _ => return Ok(false),
        }
        if !matches!(ex.mode, Mode::Eager) {
            return Ok(false);
        }
        let status = match self.run_self_check(ex) {
            Ok(rel) if rel <= CHECK_TOL => {
                info!(device = %self.info.name, rel_err = rel, "wgmma GEMM self-check passed; using it for prefill");
                WgmmaStatus::Verified { rel_err: rel }
            }
            Ok(rel) => WgmmaStatus::Disabled(format!(
                "its result differs from the mma.sync GEMM by {rel:e} of the largest output (tolerance {CHECK_TOL:e})"
            )),
            Err(e) => WgmmaStatus::Disabled(format!("{e}")),
        };
        if let WgmmaStatus::Disabled(why) = &status {
            warn!(
                device = %self.info.name,
                "the Hopper (wgmma + TMA) GEMM failed its self-check: {why}; using the mma.sync GEMM from now on \
                 (docs/CUDA.md, \"GEMM on Hopper\"; SHARDLINE_WGMMA=0 skips the check)"
            );
        }
        let ok = matches!(status, WgmmaStatus::Verified { .. });
        self.wgmma.lock().status = status;
        Ok(ok)
    }

    /// The self-check: `CHECK_SHAPE` through both GEMMs; the relative difference, or why the wgmma kernel could not
    /// run (launch error, timed-out pipeline). An error of the mma.sync reference or of the transfers is an error
    /// of the check too (the path is then disabled, which is the safe side).
    fn run_self_check(&self, ex: &mut Exec) -> Result<f32> {
        let (t, n, k) = CHECK_SHAPE;
        let act = self.act;
        let (x, w) = check_inputs();
        let s = &self.stream;
        let xd = s.clone_htod(&to_bits(act, &x)).map_err(cuda_err)?;
        let wd = s.clone_htod(&to_bits(act, &w)).map_err(cuda_err)?;
        let ref_out = s.alloc_zeros::<u16>(t * n).map_err(cuda_err)?;
        let wg_out = s.alloc_zeros::<u16>(t * n).map_err(cuda_err)?;
        let (xp, _g1) = xd.device_ptr(s);
        let (wp, _g2) = wd.device_ptr(s);
        let (rp, _g3) = ref_out.device_ptr(s);
        let (op, _g4) = wg_out.device_ptr(s);
        self.gemm_mma(ex, MatmulPtrs { x: xp, qs: wp, sc: 0, out: rp }, (t, k, n), act)?;
        let p = MatmulPtrs { x: xp, qs: wp, sc: 0, out: op };
        let sa = TensorMapSpec::new(xp, t, k, WG_BM).map_err(|e| KernelError::Cuda(format!("tensor map: {e:?}")))?;
        let sb = TensorMapSpec::new(wp, n, k, WG_BN).map_err(|e| KernelError::Cuda(format!("tensor map: {e:?}")))?;
        self.launch_wgmma(ex, &p, (t, k, n), (&sa, &sb))?;
        s.synchronize().map_err(|e| KernelError::Cuda(format!("running the wgmma GEMM: {e}")))?;
        let flag = {
            let st = self.wgmma.lock();
            match &st.flag {
                Some(f) => s.clone_dtoh(f).map_err(cuda_err)?[0],
                None => 0,
            }
        };
        if flag != 0 {
            return Err(KernelError::Cuda(format!("its pipeline timed out (status {flag:#x})")));
        }
        let want = from_bits(act, &s.clone_dtoh(&ref_out).map_err(cuda_err)?);
        let got = from_bits(act, &s.clone_dtoh(&wg_out).map_err(cuda_err)?);
        Ok(rel_err(&got, &want))
    }

    /// Launches `gemm_wgmma_<act>_<act>` on `p` (tensor maps from `specs`: activations, weights).
    fn launch_wgmma(
        &self,
        ex: &mut Exec,
        p: &MatmulPtrs,
        (t, k, n): (usize, usize, usize),
        (sa, sb): (&TensorMapSpec, &TensorMapSpec),
    ) -> Result<()> {
        let op = "matmul";
        // Encoding is host-only, but it is a driver call: make the context current as for every raw call.
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        let (ma, mb) = (encode_map(self.act, sa, p.x)?, encode_map(self.act, sb, p.qs)?);
        let flag = self.wgmma_flag()?;
        let args = [
            Arg::TensorMap(ma),
            Arg::TensorMap(mb),
            Arg::Ptr(p.out),
            Arg::Ptr(flag),
            i32_arg(op, t)?,
            i32_arg(op, n)?,
            i32_arg(op, k)?,
        ];
        let grid = (n.div_ceil(WG_BN) as u32, t.div_ceil(WG_BM) as u32, 1);
        let name = names::gemm_wgmma(self.act);
        self.launch_smem(ex, "gemm_sm90", &name, grid, WG_THREADS, WG_SMEM_BYTES as u32, &args)?;
        self.wgmma.lock().launches += 1;
        Ok(())
    }

    /// Device address of the kernels' status word, made (zeroed) on first use; it lives as long as the backend, so
    /// a captured graph may hold it.
    fn wgmma_flag(&self) -> Result<u64> {
        let mut st = self.wgmma.lock();
        if st.flag.is_none() {
            st.flag = Some(self.stream.alloc_zeros::<u32>(1).map_err(cuda_err)?);
        }
        let f = st.flag.as_ref().expect("set above");
        let (p, _sync) = f.device_ptr(&self.stream);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_inputs_are_exact_in_both_types_and_cover_tails() {
        let (x, w) = check_inputs();
        let (t, n, k) = CHECK_SHAPE;
        assert_eq!((x.len(), w.len()), (t * k, n * k));
        for act in [DType::F16, DType::BF16] {
            assert_eq!(from_bits(act, &to_bits(act, &x)), x);
            assert_eq!(from_bits(act, &to_bits(act, &w)), w);
        }
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        assert!(x.iter().any(|&v| v != x[0]));
        // Tails in every dimension, and more k-tiles than stages.
        assert_ne!(t % WG_BM, 0);
        assert!(t > WG_BM);
        assert_ne!(n % WG_BN, 0);
        assert_ne!(k % wgmma_plan::WG_BK, 0);
        assert!(k / wgmma_plan::WG_BK > wgmma_plan::WG_STAGES);
    }

    #[test]
    fn rel_err_refuses_non_finite_values() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 2.02], &[1.0, 2.0]) - 0.01).abs() < 1e-6);
        assert_eq!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f32::INFINITY);
    }
}
