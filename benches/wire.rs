//! Frame encode/decode of hidden states: 1 and 512 positions × hidden 576 (SmolLM2) and 4096 (7B), in f32 and f16,
//! reported in bytes/s of frame. A plain copy of the same number of bytes runs in the same group: encode and decode
//! each copy the payload once, so the copy is the limit they can approach. `encode` returns a new buffer per frame;
//! `encode_into` reuses one output buffer.
//! `SHARDLINE_BENCH_QUICK=1` shortens the measurement for smoke runs.

mod common;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shardline_proto::wire::{Frame, HiddenStates, Limits, StageData, WireDType};

fn config() -> Criterion {
    common::config(common::Timing { samples: 20, full_ms: (3000, 3000), quick_ms: (200, 500) })
}

/// Deterministic hidden-state bytes in `dtype`: `n_tokens × width` values in roughly `-1..1`.
fn hidden(dtype: WireDType, n_tokens: usize, width: usize) -> Vec<u8> {
    let values: Vec<f32> = (0..n_tokens * width).map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 1000.0).collect();
    match dtype {
        WireDType::F32 => bytemuck::cast_slice(&values).to_vec(),
        WireDType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        WireDType::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

/// The frame a stage sends for `n_tokens` positions: a decode frame for one, a prefill chunk for more.
fn frame(dtype: WireDType, n_tokens: usize, width: usize, bytes: &[u8]) -> Frame {
    let data = StageData::Hidden(HiddenStates::from_bytes(dtype, n_tokens, width, bytes).expect("hidden states"));
    if n_tokens == 1 {
        Frame::Decode { session: 42, position: 1000, data }
    } else {
        Frame::Prefill { session: 42, position: 0, last: true, data }
    }
}

fn bench_wire(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("wire");
    for width in [576usize, 4096] {
        for n_tokens in [1usize, 512] {
            for dtype in [WireDType::F32, WireDType::F16] {
                let bytes = hidden(dtype, n_tokens, width);
                let f = frame(dtype, n_tokens, width, &bytes);
                let encoded = f.encode();
                let (back, used) = Frame::decode(&encoded, &limits).expect("decode");
                assert_eq!(used, encoded.len());
                assert_eq!(back, f, "round trip");
                let label = format!("{dtype:?}/{n_tokens}x{width}").to_lowercase();
                g.throughput(Throughput::Bytes(encoded.len() as u64));
                // Encode from the stage's raw bytes: wrap them as hidden states (one copy) and serialise (one copy).
                g.bench_with_input(BenchmarkId::new("encode", &label), &bytes, |b, bytes| {
                    b.iter(|| frame(dtype, n_tokens, width, black_box(bytes)).encode())
                });
                // The same into one output buffer reused across frames, as a client streaming prefill chunks would.
                let mut out = Vec::new();
                g.bench_with_input(BenchmarkId::new("encode_into", &label), &bytes, |b, bytes| {
                    b.iter(|| {
                        frame(dtype, n_tokens, width, black_box(bytes)).encode_into(&mut out);
                        black_box(out.len())
                    })
                });
                g.bench_with_input(BenchmarkId::new("decode", &label), &encoded, |b, encoded| {
                    b.iter(|| Frame::decode(black_box(encoded), &limits).expect("decode"))
                });
                g.bench_with_input(BenchmarkId::new("memcpy", &label), &encoded, |b, encoded| {
                    b.iter(|| black_box(encoded).to_vec())
                });
            }
        }
    }
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = bench_wire }
criterion_main!(benches);
