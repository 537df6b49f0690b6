//! CPU matmul per weight dtype at the SmolLM2-135M decode shapes and at 4096 × 4096.
//!
//! - `matmul_decode/<dtype>/<k>x<n>`: one activation row (T = 1), the decode case. Throughput is the weight bytes
//!   streamed per call, so criterion's rate reads as GB/s of weights (memory-bound when the weights exceed the caches).
//! - `matmul_prefill/<dtype>/<k>x<n>x<t>`: T = 64 activation rows. Throughput counts `2·T·K·N` floating-point
//!   operations as "elements", so criterion's `Gelem/s` reads as GFLOP/s.
//!
//! The formats that `quant::quantize` cannot write (K-quants, IQ4) get random blocks; shapes whose K is not a
//! whole number of their 256-value super-blocks are left out.
//!
//! - `matmul_level/<dtype>/<level>/<k>x<n>x<t>`: the same matmul on each SIMD level this CPU has (AVX2 and AVX-512
//!   side by side: the AVX2 row is what an AVX-512 CPU ran before that format had AVX-512 kernels), at T = 1, 4, 16
//!   and 64 activation rows; throughput in activation rows, so `elem/s` reads as rows per second. Filter with e.g.
//!   `cargo bench --bench kernels -- matmul_level/Q6_K`.
//!
//! Threads: all cores (`SHARDLINE_BENCH_THREADS` overrides). `SHARDLINE_BENCH_QUICK=1` shortens the measurement.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shardline_kernels::cpu::{CpuBackend, SimdLevel};
use shardline_kernels::{Backend, DType, HostBytes, Tensor, quant, rng};

fn config() -> Criterion {
    common::config(common::Timing { samples: 20, full_ms: (1000, 3000), quick_ms: (200, 600) })
}

fn threads() -> Option<usize> {
    std::env::var("SHARDLINE_BENCH_THREADS").ok().and_then(|v| v.parse().ok())
}

fn backend() -> CpuBackend {
    match threads() {
        Some(threads) => CpuBackend::new(threads),
        None => CpuBackend::default(),
    }
}

/// Deterministic values in [-1, 1) (never all zero, so quantisation scales are realistic).
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64).map(|i| rng::uniform(seed, i) * 2.0 - 1.0).collect()
}

fn weight(be: &CpuBackend, dtype: DType, n: usize, k: usize) -> Tensor {
    let bytes = if DType::ENCODABLE.contains(&dtype) {
        quant::quantize(dtype, &values(n * k, 7)).expect("quantise bench weights")
    } else {
        file_blocks(dtype, n * k)
    };
    be.upload_weight(dtype, &[n, k], HostBytes::from_vec(bytes)).expect("upload bench weights")
}

/// Blocks of a format read from files only: deterministic random bytes (valid codes and sub-scales), with the f16
/// super-scales set to small values so that the results stay finite.
fn file_blocks(dtype: DType, elems: usize) -> Vec<u8> {
    let len = dtype.bytes_for(elems).expect("whole blocks");
    let mut out: Vec<u8> = (0..len as u64).map(|i| rng::mix64(i ^ 0x5eed) as u8).collect();
    let fields: &[usize] = match dtype {
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        DType::Q4_K | DType::Q5_K => &[0, 2],
        _ => &[0],
    };
    for blk in out.chunks_exact_mut(dtype.block_bytes()) {
        for &at in fields {
            blk[at..at + 2].copy_from_slice(&half::f16::from_f32(1e-3).to_le_bytes());
        }
    }
    out
}

/// SmolLM2-135M matmuls at T = 1 as `(k, n)`: attention q/o, k/v, MLP gate/up, MLP down, and 4096² for scale.
const DECODE_SHAPES: [(usize, usize); 5] = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096)];

fn bench_decode(c: &mut Criterion) {
    let be = backend();
    eprintln!("kernels bench on {}", be.describe());
    let mut group = c.benchmark_group("matmul_decode");
    let mut cases: Vec<(DType, usize, usize)> = DType::ALL
        .iter()
        .flat_map(|&d| DECODE_SHAPES.iter().map(move |&(k, n)| (d, k, n)))
        .filter(|&(d, k, _)| k % d.block_elems() == 0)
        .collect();
    // The tied LM head of SmolLM2 (token_embd, Q8_0).
    cases.push((DType::Q8_0, 576, 49152));
    for (dtype, k, n) in cases {
        let w = weight(&be, dtype, n, k);
        let x = be.upload_f32(&[1, k], &values(k, 3)).expect("upload x");
        let mut out = be.alloc(&[1, n]).expect("alloc out");
        group.throughput(Throughput::Bytes(w.byte_len() as u64));
        group.bench_function(BenchmarkId::new(dtype.name(), format!("{k}x{n}")), |b| {
            b.iter(|| be.matmul(&x, &w, &mut out).expect("matmul"))
        });
    }
    group.finish();
}

fn bench_prefill(c: &mut Criterion) {
    let be = backend();
    let mut group = c.benchmark_group("matmul_prefill");
    let t = 64;
    for dtype in DType::ALL {
        for (k, n) in [(576, 1536), (1536, 576), (4096, 4096)] {
            if k % dtype.block_elems() != 0 {
                continue;
            }
            let w = weight(&be, dtype, n, k);
            let x = be.upload_f32(&[t, k], &values(t * k, 3)).expect("upload x");
            let mut out = be.alloc(&[t, n]).expect("alloc out");
            group.throughput(Throughput::Elements((2 * t * k * n) as u64));
            group.bench_function(BenchmarkId::new(dtype.name(), format!("{k}x{n}x{t}")), |b| {
                b.iter(|| be.matmul(&x, &w, &mut out).expect("matmul"))
            });
        }
    }
    group.finish();
}

/// The formats whose kernels differ between the x86-64 levels, at the SmolLM2 shapes they take in the preset files
/// (Q5_0, Q8_0 and IQ4_NL for the 576-wide matrices, the super-blocks for the MLP down projection), against T
/// activation rows.
fn bench_levels(c: &mut Criterion) {
    let threads = threads().unwrap_or_else(|| CpuBackend::default().threads());
    let levels: Vec<SimdLevel> =
        [SimdLevel::Avx2, SimdLevel::Avx512Vnni].into_iter().filter(|l| l.is_supported()).collect();
    let mut group = c.benchmark_group("matmul_level");
    let cases = [
        (DType::Q4_1, 576, 1536),
        (DType::Q8_0, 576, 1536),
        (DType::Q5_0, 576, 1536),
        (DType::IQ4_NL, 576, 1536),
        (DType::Q4_K, 1536, 576),
        (DType::Q5_K, 1536, 576),
        (DType::Q6_K, 1536, 576),
        (DType::Q2_K, 1536, 576),
        (DType::Q3_K, 1536, 576),
        (DType::IQ4_XS, 1536, 576),
    ];
    for (dtype, k, n) in cases {
        for &level in &levels {
            let Some(be) = CpuBackend::with_simd(threads, level) else { continue };
            let w = weight(&be, dtype, n, k);
            for t in [1, 4, 16, 64] {
                let x = be.upload_f32(&[t, k], &values(t * k, 3)).expect("upload x");
                let mut out = be.alloc(&[t, n]).expect("alloc out");
                group.throughput(Throughput::Elements(t as u64));
                group.bench_function(
                    BenchmarkId::new(format!("{}/{level}", dtype.name()), format!("{k}x{n}x{t}")),
                    |b| b.iter(|| be.matmul(&x, &w, &mut out).expect("matmul")),
                );
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_decode, bench_prefill, bench_levels
}
criterion_main!(benches);
