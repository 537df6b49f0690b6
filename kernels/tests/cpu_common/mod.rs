//! Helpers shared by the CPU backend tests: a seeded generator and tensor builders.
#![allow(dead_code)]

#[path = "../common/close.rs"]
mod close;
#[allow(unused_imports)]
pub use close::{Tol, assert_close};

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

/// Random blocks of a quantised `dtype` as a model file holds them: random bytes (valid codes and sub-scales in every
/// format), with the f16 super-scales set so that |x| stays around `scale`. For the formats `quant::quantize` cannot
/// write.
pub fn file_blocks(rng: &mut Rng, dtype: DType, elems: usize, scale: f32) -> Vec<u8> {
    let mut out: Vec<u8> = (0..dtype.bytes_for(elems).unwrap()).map(|_| rng.next_u64() as u8).collect();
    let (d_at, dmin_at, span) = match dtype {
        DType::Q8_0 => (0, None, 127.0),
        DType::Q4_0 => (0, None, 8.0),
        DType::Q4_1 => (0, Some(2), 15.0),
        DType::Q5_0 => (0, None, 16.0),
        DType::Q5_1 => (0, Some(2), 31.0),
        DType::IQ4_NL => (0, None, 127.0),
        DType::Q2_K => (80, Some(82), 45.0),
        DType::Q3_K => (108, None, 128.0),
        DType::Q4_K => (0, Some(2), 945.0),
        DType::Q5_K => (0, Some(2), 1953.0),
        DType::Q6_K => (208, None, 4064.0),
        DType::IQ4_XS => (0, None, 4064.0),
        other => panic!("{other} is not a quantised dtype"),
    };
    for blk in out.chunks_exact_mut(dtype.block_bytes()) {
        let d = half::f16::from_f32(scale * (0.5 + rng.unit() as f32) / span);
        blk[d_at..d_at + 2].copy_from_slice(&d.to_le_bytes());
        if let Some(at) = dmin_at {
            let m = if dtype.is_super_block() { scale * 2.0 / span } else { -scale * 0.5 };
            blk[at..at + 2].copy_from_slice(&half::f16::from_f32(m).to_le_bytes());
        }
    }
    out
}

/// The formats read from files only (no quantiser here).
pub const FILE_ONLY: [DType; 7] =
    [DType::IQ4_NL, DType::Q2_K, DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::IQ4_XS];

/// Every quantised format, 32-value and super-block.
pub const ALL_QUANTISED: [DType; 12] = [
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::IQ4_NL,
    DType::Q2_K,
    DType::Q3_K,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
    DType::IQ4_XS,
];
