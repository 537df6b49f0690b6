"""Writes ggml_blocks.bin: f32 inputs and their GGUF encodings made by gguf-py (pip `gguf`), whose quantisers
mirror ggml's quantize_row_*_ref. The Rust test `cpu_quant.rs` checks that `quant::quantize` writes the same bytes.

Layout (little-endian): u32 n, n f32 inputs, then the encodings of all n values as q8_0, q4_0, q4_1, f16, bf16,
each preceded by its u32 byte length.
"""
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants

rng = np.random.default_rng(20240607)
blocks = [
    rng.normal(0.0, 1.0, 32),
    rng.uniform(-3.0, 7.0, 32),
    rng.normal(0.0, 1e-3, 32),
    np.full(32, 0.75),  # constant: Q4_1 scale 0
    np.zeros(32),  # zero: every scale 0
    np.arange(32) * 0.5 - 8.0,  # exact halves: rounding ties
    rng.standard_cauchy(32) * 10.0,  # outliers
    -np.abs(rng.normal(0.0, 5.0, 32)),  # all negative
]
x = np.concatenate(blocks).astype(np.float32)
out = bytearray(struct.pack("<I", x.size))
out += x.tobytes()
for t in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
          GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
    enc = quants.quantize(x.reshape(1, -1), t).tobytes()
    out += struct.pack("<I", len(enc)) + enc
Path(__file__).with_name("ggml_blocks.bin").write_bytes(bytes(out))
print(f"{x.size} values, {len(out)} bytes")
