//! Helpers shared by the CPU backend tests: a seeded generator and tensor builders.
#![allow(dead_code)]

#[path = "../common/shared.rs"]
mod shared;
#[allow(unused_imports)]
pub use shared::{Tol, assert_close};

use shardline_kernels::cpu::{CpuBackend, SimdLevel};
use shardline_kernels::{Backend, DType, HostBytes, Tensor, quant, rng};

/// Seeded SplitMix64 stream (`rng::SplitMix64`): reproducible inputs.
pub struct Rng(rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(rng::SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0.unit_f64()
    }

    /// Uniform in [-scale, scale], never exactly zero.
    pub fn value(&mut self, scale: f32) -> f32 {
        loop {
            let v = ((self.unit() * 2.0 - 1.0) * scale as f64) as f32;
            if v != 0.0 {
                return v;
            }
        }
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.value(scale)).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub const QUANTISED: [DType; 3] = [DType::Q8_0, DType::Q4_0, DType::Q4_1];

/// Every instruction-set level this CPU can run.
pub fn levels() -> Vec<SimdLevel> {
    SimdLevel::ALL.into_iter().filter(|l| l.is_supported()).collect()
}

pub fn backend(threads: usize) -> CpuBackend {
    CpuBackend::new(threads)
}

/// A weight tensor of `dtype` holding `values` (quantised when needed), borrowed from an owned byte buffer.
pub fn weight(be: &dyn Backend, dtype: DType, shape: &[usize], values: &[f32]) -> Tensor {
    let bytes = quant::quantize(dtype, values).unwrap();
    be.upload_weight(dtype, shape, HostBytes::from_vec(bytes)).unwrap()
}

/// The same bytes placed at an odd address (offset 1 inside a larger buffer).
pub fn weight_unaligned(be: &dyn Backend, dtype: DType, shape: &[usize], values: &[f32]) -> Tensor {
    let bytes = quant::quantize(dtype, values).unwrap();
    let mut buf = vec![0xAAu8; bytes.len() + 3];
    buf[1..1 + bytes.len()].copy_from_slice(&bytes);
    let owner: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = std::sync::Arc::new(buf);
    let window = HostBytes::try_new(owner, 1..1 + bytes.len()).unwrap();
    be.upload_weight(dtype, shape, window).unwrap()
}

/// What the weight tensor actually holds, as f32 (after quantisation).
pub fn dequantised(dtype: DType, values: &[f32]) -> Vec<f32> {
    let bytes = quant::quantize(dtype, values).unwrap();
    let mut out = vec![0.0; values.len()];
    quant::dequantize(dtype, &bytes, &mut out).unwrap();
    out
}

pub fn act(be: &dyn Backend, shape: &[usize], data: &[f32]) -> Tensor {
    be.upload_f32(shape, data).unwrap()
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Random blocks of a quantised `dtype` as a model file holds them (see `shared::file_blocks`).
pub fn file_blocks(rng: &mut Rng, dtype: DType, elems: usize, scale: f32) -> Vec<u8> {
    shared::file_blocks(|| rng.next_u64(), dtype, elems, scale)
}

/// Blocks of `dtype` whose bytes are all `byte`, except the f16 super-scales (set as in [`file_blocks`]).
pub fn uniform_blocks(byte: u8, dtype: DType, elems: usize, scale: f32) -> Vec<u8> {
    shared::file_blocks(|| u64::from(byte) * 0x0101_0101_0101_0101, dtype, elems, scale)
}

/// The formats read from files only (no quantiser here).
pub const FILE_ONLY: [DType; 7] =
    [DType::IQ4_NL, DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::IQ4_XS];

/// Every quantised format, 32-value and super-block.
pub fn all_quantised() -> impl Iterator<Item = DType> {
    DType::ALL.into_iter().filter(|d| d.is_quantized())
}

/// `x: [t, k]` times the weight `w: [n, k]` on `be`, downloaded.
pub fn matmul(be: &CpuBackend, w: &Tensor, x: &[f32], t: usize, k: usize, n: usize) -> Vec<f32> {
    let xt = act(be, &[t, k], x);
    let mut out = be.alloc(&[t, n]).unwrap();
    be.matmul(&xt, w, &mut out).unwrap();
    be.download_f32(&out).unwrap()
}

/// Runs `f` on a two-thread backend of every SIMD level this CPU has and asserts that all give the same bits.
pub fn assert_same_bits_on_every_level(what: &str, f: impl Fn(&CpuBackend) -> Vec<f32>) {
    let levels = levels();
    let results: Vec<Vec<u32>> = levels.iter().map(|&l| bits(&f(&CpuBackend::with_simd(2, l).unwrap()))).collect();
    for (l, r) in levels.iter().zip(&results) {
        assert_eq!(r, &results[0], "{what}: {l} differs from {}", levels[0]);
    }
}
