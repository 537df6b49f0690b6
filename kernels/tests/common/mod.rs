//! Shared parts of the device parity tests: the devices a test body runs on, deterministic random inputs (never
//! zeros), NaN-poisoned outputs, and the comparison with stated tolerances.
//!
//! A test body is written once as `fn body(d: &Device)` and instantiated per device with [`device_tests!`]: on the
//! CPU always, and on CUDA with f16 and with bf16 activations when a usable GPU is present (otherwise those cases
//! print "skipped: no CUDA device" and return). Every body runs the op on `d.backend` and on the CPU reference
//! backend with identical inputs and compares the results.

#![allow(dead_code)] // each test binary uses its own subset

mod shared;
#[allow(unused_imports)]
pub use shared::{Tol, assert_close};

use std::sync::Arc;

use half::{bf16, f16};
use shardline_kernels::cpu::CpuBackend;
use shardline_kernels::cuda::CudaBackend;
use shardline_kernels::{Backend, DType, HostBytes, Tensor};

/// A device under test and the CPU reference it is compared with.
pub struct Device {
    pub backend: Arc<dyn Backend>,
    pub reference: CpuBackend,
    pub label: &'static str,
    /// The same backend as `backend` when it is CUDA (for its own knobs, e.g. the Hopper GEMM's mode).
    pub cuda: Option<Arc<CudaBackend>>,
}

impl Device {
    pub fn cpu() -> Self {
        Self { backend: Arc::new(CpuBackend::new(2)), reference: CpuBackend::new(2), label: "cpu", cuda: None }
    }

    /// CUDA device 0 with `act` activations, or `None` when no usable GPU is present (a failure when
    /// `SHARDLINE_REQUIRE_GPU=1`, as on the GPU check machine). A GPU that is present but fails to open is an error.
    pub fn cuda(act: DType) -> Option<Self> {
        if let Err(reason) = shardline_kernels::cuda::probe() {
            let required = std::env::var("SHARDLINE_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(!required, "SHARDLINE_REQUIRE_GPU=1 but no usable CUDA device: {reason}");
            return None;
        }
        let backend = CudaBackend::new(0, act).expect("a CUDA device is visible but the backend failed to open");
        let label = if act == DType::F16 { "cuda-f16" } else { "cuda-bf16" };
        Some(Self { backend: backend.clone(), reference: CpuBackend::new(2), label, cuda: Some(backend) })
    }

    /// Activation dtype of the device under test.
    pub fn act(&self) -> DType {
        self.backend.act_dtype()
    }

    /// Largest accepted error relative to the largest reference magnitude: f32 1e-5 (identical algorithms give 0),
    /// f16/bf16 1e-2.
    pub fn tol(&self) -> Tol {
        Tol::OfMax(if self.act() == DType::F32 { 1e-5 } else { 1e-2 })
    }

    /// `v` rounded to the device's activation dtype, so both devices start from exactly the same numbers and only
    /// the op's own error is measured.
    pub fn exact(&self, v: &[f32]) -> Vec<f32> {
        round_to(self.act(), v)
    }
}

pub fn round_to(dtype: DType, v: &[f32]) -> Vec<f32> {
    match dtype {
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

/// Deterministic generator (SplitMix64); each test seeds its own.
pub struct Rng(shardline_kernels::rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(shardline_kernels::rng::SplitMix64::new(seed ^ 0x5eed_5eed_5eed_5eed))
    }

    pub fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }

    /// Uniform in [-scale, scale), never exactly zero.
    pub fn f32(&mut self, scale: f32) -> f32 {
        let u = (self.u64() >> 40) as f32 / (1u64 << 24) as f32;
        let v = (2.0 * u - 1.0) * scale;
        if v == 0.0 { scale * 0.5 } else { v }
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(scale)).collect()
    }

    /// `n` distinct values below `bound`, in random order.
    pub fn distinct(&mut self, n: usize, bound: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..bound as u32).collect();
        for i in (1..all.len()).rev() {
            all.swap(i, self.below(i + 1));
        }
        all.truncate(n);
        all
    }
}

/// Random weights of `dtype` as they sit in a model file (`shape = [rows, cols]`), never all zero. Quantised
/// blocks get random quants and small positive scales.
pub fn weight_bytes(rng: &mut Rng, dtype: DType, rows: usize, cols: usize, scale: f32) -> Vec<u8> {
    let n = rows * cols;
    match dtype {
        DType::F32 => rng.vec(n, scale).iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => rng.vec(n, scale).iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => rng.vec(n, scale).iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        _ => shared::file_blocks(|| rng.u64(), dtype, n, scale),
    }
}

/// Uploads activations given as f32 (the caller made them exact in the device dtype).
pub fn act(b: &dyn Backend, shape: &[usize], data: &[f32]) -> Tensor {
    b.upload_f32(shape, data).expect("upload activations")
}

/// An output tensor filled with NaN, so any element an op fails to write is caught.
pub fn poisoned(b: &dyn Backend, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    b.upload_f32(shape, &vec![f32::NAN; n]).expect("upload poison")
}

pub fn weight(b: &dyn Backend, dtype: DType, shape: &[usize], bytes: &[u8]) -> Tensor {
    b.upload_weight(dtype, shape, HostBytes::from_vec(bytes.to_vec())).expect("upload weight")
}

pub fn download(b: &dyn Backend, t: &Tensor) -> Vec<f32> {
    b.download_f32(t).expect("download")
}

/// Instantiates each test body once per device: `cpu`, and `cuda_f16` / `cuda_bf16` when a GPU is usable.
#[macro_export]
macro_rules! device_tests {
    ($($name:ident),* $(,)?) => {
        mod cpu {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::common::Device::cpu());
                }
            )*
        }
        mod cuda_f16 {
            $(
                #[test]
                fn $name() {
                    match super::common::Device::cuda(shardline_kernels::DType::F16) {
                        Some(d) => super::$name(&d),
                        None => println!("skipped: no CUDA device"),
                    }
                }
            )*
        }
        mod cuda_bf16 {
            $(
                #[test]
                fn $name() {
                    match super::common::Device::cuda(shardline_kernels::DType::BF16) {
                        Some(d) => super::$name(&d),
                        None => println!("skipped: no CUDA device"),
                    }
                }
            )*
        }
    };
}
