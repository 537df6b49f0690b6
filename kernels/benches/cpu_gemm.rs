//! CPU matmul of the SmolLM2-135M decode shapes at 1 to 16 activation rows, timed in **thread CPU time** (one
//! compute thread, the minimum over many calls), so that an A/B of kernel code stays readable on a shared, loaded
//! machine where wall-clock figures are not: a thread that waits for a core does not accumulate CPU time. (It still
//! shares caches and memory bandwidth with whatever else runs, and the clock may differ; compare builds back to back.)
//!
//! Each line: weight format and shape `n × k`, activation rows `t`, microseconds per call, and nanoseconds per
//! (weight row, activation row, 64-value block pair). Two cases per shape: `hot` repeats one input, so the quantised
//! activations are reused between calls (the kernel alone, weights in L2 when they fit); `fresh` changes the input
//! every call (kernel plus activation quantisation, as between the layers of a forward).
//!
//! `cargo bench -p shardline-kernels --bench cpu_gemm` (`SHARDLINE_GEMM_REPS=200` sets the calls per case,
//! `SHARDLINE_GEMM_ROWS=8,16` the activation row counts).
//! `SHARDLINE_GEMM_CASES=prefill` times the prefill shapes instead: the matrices of the SmolLM2 Q6_K preset (Q8_0
//! for the 576-wide ones, Q6_K for the down projection), and a 1536 × 576 matrix of Q4_1, Q4_0, Q5_0 and IQ4_NL (the
//! 576-wide types of the other presets), at 16 and 128 activation rows; `SHARDLINE_GEMM_CASES=kquant`
//! the K-quant down projection (Q4_K and Q6_K, random blocks) at 1 to 384 activation rows.
//! `SHARDLINE_GEMM_CASES=stream` times one-row decode matmuls over about 100 MB of distinct weights (more than the
//! L3), as a decode step streams the model: GB/s of weight bytes, one thread in thread CPU time
//! (`SHARDLINE_GEMM_THREADS=2`: wall clock).
//! `SHARDLINE_GEMM_LEVEL=avx2` (or `avx-vnni`, `scalar`) runs a lower SIMD level than the CPU's best, so that an AVX2
//! kernel change can be timed on an AVX-512 machine.

use shardline_kernels::cpu::{CpuBackend, SimdLevel};
use shardline_kernels::{Backend, DType, HostBytes, Tensor, quant, rng};

/// The SIMD level to time: `SHARDLINE_GEMM_LEVEL` when set (a level this CPU supports), else the CPU's best.
fn level() -> SimdLevel {
    let Ok(name) = std::env::var("SHARDLINE_GEMM_LEVEL") else { return SimdLevel::detect() };
    let level = SimdLevel::ALL.into_iter().find(|l| l.name() == name).expect("SHARDLINE_GEMM_LEVEL: unknown level");
    assert!(level.is_supported(), "SHARDLINE_GEMM_LEVEL: this CPU cannot run {level}");
    level
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    shardline_kernels::cpu_time::thread().expect("thread CPU clock").as_secs_f64()
}

fn weight(be: &CpuBackend, dtype: DType, n: usize, k: usize) -> Tensor {
    let bytes = if dtype.is_super_block() || dtype == DType::IQ4_NL {
        // No quantiser for the K-quants and IQ4_NL: random codes and scales, the f16 scales (Q6_K: its last two
        // bytes; IQ4_NL: `d`, its first two; the other K-quants: `d` and `dmin`, their first four) small.
        let bb = dtype.block_bytes();
        let blocks = n * k / dtype.block_elems();
        let mut b: Vec<u8> = (0..(blocks * bb) as u64).map(|i| (rng::uniform(7, i) * 256.0) as u8).collect();
        let fields: &[usize] = match dtype {
            DType::Q6_K => &[208],
            DType::IQ4_NL => &[0],
            _ => &[0, 2],
        };
        for blk in b.chunks_exact_mut(bb) {
            for &at in fields {
                blk[at..at + 2].copy_from_slice(&half::f16::from_f32(0.001).to_le_bytes());
            }
        }
        b
    } else {
        let v: Vec<f32> = (0..(n * k) as u64).map(|i| rng::uniform(7, i) * 2.0 - 1.0).collect();
        quant::quantize(dtype, &v).expect("quantise")
    };
    be.upload_weight(dtype, &[n, k], HostBytes::from_vec(bytes)).expect("upload")
}

fn main() {
    let reps: usize = std::env::var("SHARDLINE_GEMM_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    // One compute thread: the calling thread does all the work, so its CPU time is the call's.
    let be = CpuBackend::with_simd(1, level()).expect("backend");
    println!("level {}, {} calls per case, thread CPU time (min)", level(), reps);
    let cases = std::env::var("SHARDLINE_GEMM_CASES").unwrap_or_default();
    if cases == "stream" {
        stream(reps);
        return;
    }
    let shapes: &[(DType, usize, usize)] = match cases.as_str() {
        "prefill" => &[
            (DType::Q8_0, 576, 576),
            (DType::Q8_0, 1536, 576),
            (DType::Q6_K, 576, 1536),
            (DType::Q4_1, 1536, 576),
            (DType::Q4_0, 1536, 576),
            (DType::Q5_0, 1536, 576),
            (DType::IQ4_NL, 1536, 576),
        ],
        "kquant" => &[(DType::Q4_K, 576, 1536), (DType::Q6_K, 576, 1536)],
        _ => &[(DType::Q4_1, 576, 576), (DType::Q4_1, 1536, 576), (DType::Q4_1, 576, 1536), (DType::Q8_0, 2048, 576)],
    };
    let default_rows: &[usize] = match cases.as_str() {
        "prefill" => &[16, 128],
        "kquant" => &[1, 2, 4, 5, 16, 64, 384],
        _ => &[1, 4, 8, 16],
    };
    let rows: Vec<usize> = match std::env::var("SHARDLINE_GEMM_ROWS") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => default_rows.to_vec(),
    };
    for &(dtype, n, k) in shapes {
        let w = weight(&be, dtype, n, k);
        for &t in &rows {
            let inputs: Vec<Tensor> = (0..2u64)
                .map(|s| {
                    let x: Vec<f32> = (0..(t * k) as u64).map(|i| rng::uniform(11 + s, i) * 2.0 - 1.0).collect();
                    be.upload_f32(&[t, k], &x).expect("input")
                })
                .collect();
            let mut out = be.alloc(&[t, n]).expect("output");
            for (case, alternate) in [("hot", false), ("fresh", true)] {
                let mut best = f64::MAX;
                for i in 0..reps {
                    let x = &inputs[if alternate { i % 2 } else { 0 }];
                    let t0 = thread_cpu();
                    be.matmul(x, &w, &mut out).expect("matmul");
                    best = best.min(thread_cpu() - t0);
                }
                let units = (n * t * k.div_ceil(64)) as f64;
                println!(
                    "{dtype} {n}x{k} t={t:<2} {case:<5} {:9.1} us  {:.3} ns per (row, act row, pair)",
                    best * 1e6,
                    best * 1e9 / units
                );
            }
        }
    }
}

/// `SHARDLINE_GEMM_CASES=stream`: one-row decode over many distinct weights (about 100 MB, more than the L3), as a
/// decode step streams the model: GB/s of weight bytes, the best of `reps` (at most 20) passes over all of them
/// (`SHARDLINE_GEMM_THREADS` compute threads, default 1; one thread is timed in its CPU time, more by wall clock).
fn stream(reps: usize) {
    let threads: usize = std::env::var("SHARDLINE_GEMM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let be = CpuBackend::with_simd(threads, level()).expect("backend");
    let reps = reps.min(20);
    for &(dtype, n, k, copies) in &[
        (DType::Q8_0, 1536, 576, 100),
        (DType::Q6_K, 576, 1536, 100),
        (DType::Q4_K, 576, 1536, 140),
        (DType::Q5_0, 1536, 576, 100),
        (DType::Q4_1, 1536, 576, 100),
    ] {
        let ws: Vec<Tensor> = (0..copies).map(|_| weight(&be, dtype, n, k)).collect();
        let bytes: usize = copies * n * dtype.bytes_for(k).expect("row bytes");
        let x: Vec<f32> = (0..k as u64).map(|i| rng::uniform(11, i) * 2.0 - 1.0).collect();
        let xs: Vec<Tensor> = (0..2)
            .map(|s| {
                let x: Vec<f32> = x.iter().map(|v| v + s as f32 * 1e-3).collect();
                be.upload_f32(&[1, k], &x).expect("input")
            })
            .collect();
        let mut out = be.alloc(&[1, n]).expect("output");
        let mut best = f64::MAX;
        for r in 0..reps {
            let t0 = std::time::Instant::now();
            let c0 = thread_cpu();
            for (i, w) in ws.iter().enumerate() {
                be.matmul(&xs[(r + i) % 2], w, &mut out).expect("matmul");
            }
            // One thread: its CPU time (a preempted pass is not charged for the wait); more: wall clock.
            let took = if threads == 1 { thread_cpu() - c0 } else { t0.elapsed().as_secs_f64() };
            best = best.min(took);
        }
        println!(
            "stream {dtype} {n}x{k} x{copies} threads={threads}: {:.2} ms per pass, {:.2} GB/s",
            best * 1e3,
            bytes as f64 / best / 1e9
        );
    }
}
