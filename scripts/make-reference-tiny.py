#!/usr/bin/env python3
"""Produces node/tests/fixtures/llamacpp_tiny.json: llama.cpp's logits on tiny random-weight Qwen2 and Qwen3 GGUF
files, the reference of node/tests/engine_llamacpp_tiny.rs.

The GGUF files are written by shardline's own test-model writer (the ignored test `write_tiny_models_for_llama_cpp`,
run here through cargo), so the fixture is about exactly the files the Rust test writes again; each file's SHA-256
is recorded and checked there. For each file this records
  * llama.cpp's logits (float32, rounded to 5 decimals) after every prefix of a fixed token sequence, evaluated in
    one batch with an f32 KV cache (llama.cpp's default f16 cache would add its own rounding to the comparison),
  * llama.cpp's tokens for a short text (special tokens parsed), which exercises the file's pre-tokenizer.

Usage:
  scripts/make-reference-tiny.py               # builds the files with cargo, writes the fixture
  scripts/make-reference-tiny.py --models DIR  # uses GGUF files already written into DIR

Needs llama-cpp-python (docs/REFERENCE.md says how to build it) and numpy.
"""

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "node" / "tests" / "fixtures" / "llamacpp_tiny.json"
# Ids of the tiny vocabulary (3 specials, 256 byte tokens, 16 merges, reserved specials up to 288).
TOKENS = [5, 77, 140, 3, 255, 31, 200, 274, 100, 41]
TEXT = "hello world, the winter of 2024!\n\n  hello\tworld 1234567 <|im_start|>x"
DECIMALS = 5


def write_models(out: Path) -> None:
    env = dict(os.environ, SHARDLINE_TINY_DIR=str(out))
    cmd = [
        "cargo", "test", "--release", "-p", "shardline-node", "--test", "engine_llamacpp_tiny", "--",
        "--ignored", "--exact", "write_tiny_models_for_llama_cpp",
    ]
    subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True)


def evaluate(path: Path, threads: int) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=len(TOKENS),
        n_batch=len(TOKENS),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        seed=0,
        verbose=False,
    )
    llm.eval(TOKENS)
    scores = np.array(llm.scores[: len(TOKENS)], dtype=np.float32, copy=True)
    text_tokens = llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=True)
    arch = llm.metadata.get("general.architecture")
    llm.close()
    return {
        "name": path.stem,
        "architecture": arch,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "text": TEXT,
        "text_tokens": [int(t) for t in text_tokens],
        "logits": [[round(float(v), DECIMALS) for v in row] for row in scores],
    }


def dumps(value, indent: int = 0) -> str:
    """JSON with objects indented and every list of scalars on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{dumps(v, indent + 1)}" for v in value) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=None, help="folder with the GGUF files already written")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.models or Path(tmp)
        if args.models is None:
            write_models(folder)
        files = sorted(folder.glob("*.gguf"))
        if not files:
            print(f"no GGUF files in {folder}", file=sys.stderr)
            return 2
        models = []
        for f in files:
            models.append(evaluate(f, args.threads))
            print(f"{f.name}: {models[-1]['architecture']}, text -> {models[-1]['text_tokens']}", file=sys.stderr)
    data = {
        "format": "shardline-llamacpp-tiny/1",
        "generator": {
            "command": " ".join(["scripts/make-reference-tiny.py"] + sys.argv[1:]),
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "settings": {"kv_cache": "f32", "batch": "all tokens in one llama_decode", "logit_decimals": DECIMALS},
        "tokens": TOKENS,
        "models": models,
    }
    args.out.write_text(dumps(data) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
