"""Writes format_blocks.bin: random valid blocks of the formats shardline reads from files but cannot write (Q5_0,
Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) and their values as decoded by gguf-py (pip `gguf`), whose numpy
dequantisers are an independent port of ggml's dequantize_row_*. The Rust test `cpu_formats.rs` decodes the same
bytes and compares.

Every byte of a block is random (any bit pattern is a valid code or sub-scale) except the f16 super-scales, which
are set to finite values of both signs, zero, subnormal and large, so no value overflows to infinity.

Layout (little-endian), per format: u32 ggml type id, u32 byte length, the blocks, u32 value count, the f32 values.
"""
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, quants
from gguf.constants import GGML_QUANT_SIZES

# (type, offsets of its f16 scale fields, blocks)
FORMATS = [
    (T.Q5_0, [0], 24),
    (T.Q5_1, [0, 2], 24),
    (T.IQ4_NL, [0], 24),
    (T.Q2_K, [80, 82], 6),
    (T.Q3_K, [108], 6),
    (T.Q4_K, [0, 2], 6),
    (T.Q5_K, [0, 2], 6),
    (T.Q6_K, [208], 6),
    (T.IQ4_XS, [0], 6),
]
SCALES = [1e-3, -2e-3, 0.0, 3.5e-6, 0.25, -1.5e-4, 6e-8, 1e-2]

rng = np.random.default_rng(20261201)
out = bytearray()
for qtype, offsets, n in FORMATS:
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    for b in range(n):
        for j, at in enumerate(offsets):
            raw[b, at:at + 2] = np.frombuffer(np.float16(SCALES[(b + 3 * j) % len(SCALES)]).tobytes(), np.uint8)
    values = quants.dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)
    assert values.size == n * block_elems and np.isfinite(values).all()
    out += struct.pack("<II", int(qtype), raw.size) + raw.tobytes()
    out += struct.pack("<I", values.size) + values.tobytes()
Path(__file__).with_name("format_blocks.bin").write_bytes(bytes(out))
print(f"{len(out)} bytes")
