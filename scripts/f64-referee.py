#!/usr/bin/env python3
"""An independent float64 forward of a SmolLM2 (llama-architecture) GGUF, the referee between shardline and llama.cpp.

The weights are dequantised with gguf-py (`pip install gguf`; the decoders kernels/tests/cpu_formats.rs checks ours
against) and everything else is computed in float64. Two roundings can be switched on to mirror llama.cpp's CPU path:
  --act q8   activations rounded before every quantised matmul as llama.cpp's vec_dot types do (Q8_0 blocks of 32 with
             an f16 scale; Q8_K blocks of 256 with an f32 scale for the K-quants and IQ4_XS); the products are then exact
  --kv f16   K, V and the query rounded to f16, and the normalised softmax probabilities rounded to f16 before the
             product with V (llama.cpp's non-flash attention over its default f16 KV cache)

  scripts/f64-referee.py --preset Q4_0 --tokens 44,17,4326,296,2611,18883,46,198      # top-3 of every row
  scripts/f64-referee.py --preset Q2_K --cases node/tests/fixtures/llamacpp_presets/Q2_K.json --out /tmp/ref
      # every case of a compact fixture: float32 logits [T, vocab] per case in /tmp/ref/<case>.npy

docs/REFERENCE.md ("Against a float64 referee") says what it showed.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

PRESETS_DIR = Path(os.environ.get("SHARDLINE_CACHE", Path.home() / ".cache" / "shardline")) / "presets"


class Model:
    """The tensors of a GGUF file dequantised to float64, and the llama.* hyper-parameters."""

    def __init__(self, path):
        r = GGUFReader(path)
        self.meta = {k: (f.parts[f.data[0]][0] if f.data else None) for k, f in r.fields.items() if k.startswith("llama.")}
        self.W, self.types = {}, {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type).astype(np.float64)
            self.W[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if len(t.shape) > 1 else a.reshape(-1)
            self.types[t.name] = t.tensor_type.name
        m = self.meta
        self.L = int(m["llama.block_count"]); self.H = int(m["llama.attention.head_count"]); self.KVH = int(m["llama.attention.head_count_kv"])
        self.eps = float(m["llama.attention.layer_norm_rms_epsilon"]); self.base = float(m["llama.rope.freq_base"])
        self.hid = int(m["llama.embedding_length"]); self.hd = self.hid // self.H

def q8(x):
    x32 = x.astype(np.float32); sh = x32.shape
    b = x32.reshape(sh[0], -1, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.round(b * idv)
    return (q.astype(np.float64) * d.astype(np.float16).astype(np.float64)).reshape(sh)

KQ = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}

def q8k(x):
    """Q8_K activation rounding (256-value blocks, f32 scale -127/max of the signed value of largest magnitude)."""
    x32 = x.astype(np.float32); sh = x32.shape
    b = x32.reshape(sh[0], -1, 256)
    idx = np.abs(b).argmax(axis=2)[..., None]
    mx = np.take_along_axis(b, idx, axis=2)
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
    q = np.minimum(np.round(b * iscale), 127)
    d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(sh)

def forward(M, toks, act="f64", kv="f64"):
    T = len(toks); hd, H, KVH, hid = M.hd, M.H, M.KVH, M.hid
    W, types = M.W, M.types
    def mm(x, name):
        if act == "q8" and types[name] not in ("F32", "F16"):
            xa = q8k(x) if types[name] in KQ else q8(x)
        else:
            xa = x
        return xa @ W[name].T
    def rms(x, w):
        return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + M.eps) * w
    inv = M.base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    def rope(x, nh):
        x = x.reshape(T, nh, hd // 2, 2); a, b = x[..., 0], x[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(T, nh * hd)
    f16 = lambda a: a.astype(np.float16).astype(np.float64)
    x = W["token_embd.weight"][toks].copy()
    mask = np.triu(np.full((T, T), -np.inf), 1)
    grp = H // KVH
    for l in range(M.L):
        p = f"blk.{l}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope(mm(h, p + "attn_q.weight"), H); k = rope(mm(h, p + "attn_k.weight"), KVH); v = mm(h, p + "attn_v.weight")
        if kv == "f16":
            k, v, q = f16(k), f16(v), f16(q)
        o = np.empty((T, hid))
        for hh in range(H):
            g = hh // grp
            s = q[:, hh * hd:(hh + 1) * hd] @ k[:, g * hd:(g + 1) * hd].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True)); pr = s / s.sum(axis=1, keepdims=True)
            if kv == "f16":
                pr = f16(pr)
            o[:, hh * hd:(hh + 1) * hd] = pr @ v[:, g * hd:(g + 1) * hd]
        x = x + mm(o, p + "attn_output.weight")
        h = rms(x, W[p + "ffn_norm.weight"])
        g_ = mm(h, p + "ffn_gate.weight"); u = mm(h, p + "ffn_up.weight")
        x = x + mm(g_ / (1 + np.exp(-g_)) * u, p + "ffn_down.weight")
    h = rms(x, W["output_norm.weight"])
    return mm(h, "output.weight" if "output.weight" in W else "token_embd.weight")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="a preset of scripts/make-presets (file in $SHARDLINE_CACHE/presets)")
    ap.add_argument("--model", type=Path, help="a GGUF file instead of --preset")
    ap.add_argument("--tokens", help="comma-separated token ids: print each row's top-3")
    ap.add_argument("--cases", type=Path, help="a compact fixture: evaluate each of its cases")
    ap.add_argument("--out", type=Path, help="folder for the per-case logits of --cases")
    ap.add_argument("--act", choices=["f64", "q8"], default="f64")
    ap.add_argument("--kv", choices=["f64", "f16"], default="f64")
    a = ap.parse_args()
    path = a.model or PRESETS_DIR / f"SmolLM2-135M-Instruct.{a.preset}.gguf"
    m = Model(str(path))
    if a.tokens:
        lg = forward(m, [int(t) for t in a.tokens.split(",")], a.act, a.kv)
        for i, row in enumerate(lg):
            o = np.argsort(-row)[:3]
            print(i, [(int(j), round(float(row[j]), 3)) for j in o], f"margin {row[o[0]] - row[o[1]]:.3f}")
        return 0
    if not (a.cases and a.out):
        ap.error("--tokens, or --cases with --out")
    a.out.mkdir(parents=True, exist_ok=True)
    for c in json.loads(a.cases.read_text(encoding="utf-8"))["cases"]:
        lg = forward(m, c["prompt_tokens"] + c["continuation_tokens"], a.act, a.kv)
        np.save(a.out / f"{c['name']}.npy", lg.astype(np.float32))
        print(c["name"], lg.shape[0], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
