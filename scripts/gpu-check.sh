#!/usr/bin/env bash
# GPU verification of the CUDA backend, in two halves (docs/CUDA.md, "Checking on a GPU"):
#
#   scripts/gpu-check.sh stage     here, without a GPU: build release test and bench binaries with the CUDA feature,
#                                  compile every kernel with NVRTC for sm_80/sm_90 (the GPU machine then needs no
#                                  NVRTC), pack both with xz, cut SmolLM2 to its first layers so it fits the 64 MiB
#                                  transfer, and put it all in the git-ignored folder .stage/ (checked to fit);
#   scripts/gpu-check.sh run       on the GPU machine, from the repository root, with .stage/ carried along: runs the
#                                  kernel parity tests, the whole-shard parity test and the roofline benchmark, keeps
#                                  every log in $OUT (or .stage/out), prints a short table last, and writes
#                                  $OUT/summary.md (card, driver, every figure, and the static predictions of
#                                  scripts/sass-report made at stage time) for docs/PERFORMANCE.md;
#   scripts/gpu-check.sh dry-run   stage, then run the staged binaries here: every GPU case must report that it was
#                                  skipped, which proves the plumbing without a GPU.
#
# Device call (one command, e.g. timeout_s 480):  bash scripts/gpu-check.sh run      with carry: [".stage"]
#
# Environment: STAGE_LAYERS (layers kept of SmolLM2, default 12 of 30), STAGE_PTX=1 (also stage PTX for non-sm_80/sm_90
# cards), SHARDLINE_MODEL (the full GGUF; else the default cache path), CARGO_TARGET_DIR (honoured).
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=.stage
LIMIT_MIB=62 # of the 64 MiB the working tree may take; the tracked sources take under 2

stage() {
    command -v python3 >/dev/null || { echo "python3 is needed to stage" >&2; exit 1; }
    rm -rf "$STAGE"
    mkdir -p "$STAGE/bin" "$STAGE/kernels"
    local layers="${STAGE_LAYERS:-12}"

    echo "== building release test and bench binaries (CUDA feature on)"
    local json
    json=$(mktemp)
    cargo test --release -p shardline-kernels -p shardline-node --features shardline-kernels/cuda \
        --test parity --test nvrtc_compile --test cuda_shard_parity --test step_graphs --no-run --message-format=json >"$json"
    cargo bench -p shardline-kernels --bench cuda_roofline --features cuda --no-run --message-format=json >>"$json"
    python3 - "$json" "$STAGE/bin" <<'EOF'
import json, shutil, subprocess, sys
src, dst = sys.argv[1], sys.argv[2]
want = {"parity", "nvrtc_compile", "cuda_shard_parity", "step_graphs", "cuda_roofline"}
found = {}
for line in open(src):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["target"]["name"] in want:
        found[msg["target"]["name"]] = msg["executable"]
missing = want - set(found)
if missing:
    sys.exit(f"binaries not built: {sorted(missing)}")
for name, exe in sorted(found.items()):
    out = f"{dst}/{name}"
    shutil.copy(exe, out)
    subprocess.run(["strip", "--strip-debug", out], check=True)
    print(f"  {name}: {exe}")
EOF
    rm -f "$json"

    echo "== compiling the kernels with NVRTC (sm_80, sm_90) into $STAGE/kernels"
    local nvrtc_lib
    nvrtc_lib=$(python3 -c 'import nvidia.cuda_nvrtc as m; print(list(m.__path__)[0] + "/lib")' 2>/dev/null || true)
    LD_LIBRARY_PATH="${nvrtc_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" SHARDLINE_REQUIRE_NVRTC=1 \
        SHARDLINE_KERNEL_OUT="$STAGE/kernels" "$STAGE/bin/nvrtc_compile" --quiet >"$STAGE/nvrtc.log" 2>&1 \
        || { cat "$STAGE/nvrtc.log"; exit 1; }
    rm "$STAGE/bin/nvrtc_compile"
    # Machine code for sm_80 (A100, also runs on sm_86/sm_89) and sm_90 (H100, H200) is what the lent cards need;
    # the PTX (6.5 MB, for other cards) only with STAGE_PTX=1, as it does not fit beside the model otherwise.
    [ "${STAGE_PTX:-0}" = 1 ] || rm -f "$STAGE"/kernels/*.ptx
    echo "  $(ls "$STAGE/kernels" | wc -l) files, $(du -sh "$STAGE/kernels" | cut -f1)"

    echo "== static predictions (scripts/sass-report) into $STAGE/sass-report.txt"
    # Needs nvdisasm (pip install nvidia-cuda-nvdisasm); its absence only loses the predictions, not the check.
    if ! timeout 1200 scripts/sass-report >"$STAGE/sass-report.txt" 2>&1; then
        echo "  sass-report did not run: $(tail -1 "$STAGE/sass-report.txt")"
    fi

    echo "== packing binaries and kernels (xz)"
    tar -cf - -C "$STAGE" bin kernels | xz -9 -T2 >"$STAGE/payload.tar.xz"
    rm -rf "$STAGE/bin" "$STAGE/kernels"

    echo "== cutting SmolLM2 to $layers layers"
    local model="${SHARDLINE_MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/shardline/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
    [ -f "$model" ] || { echo "model not found at $model: run scripts/fetch-model.sh" >&2; exit 1; }
    python3 - "$model" "$STAGE/smollm2-cut.gguf" "$layers" <<'EOF'
# Keeps token_embd, output_norm (output if present) and blk.0..L-1, with llama.block_count = L; every other
# metadata entry is copied byte for byte.
import struct, sys
import numpy as np
from gguf import GGUFReader
src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = GGUFReader(src)
align = 32
if "general.alignment" in r.fields:
    align = int(r.fields["general.alignment"].parts[-1][0])
kvs = []
for f in r.fields.values():
    if f.name.startswith("GGUF."):
        continue
    raw = b"".join(np.asarray(p).tobytes() for p in f.parts)
    if f.name == "llama.block_count":
        key = f.name.encode()
        raw = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, keep)  # type 4 = UINT32
    kvs.append(raw)
def kept(name):
    if not name.startswith("blk."):
        return True
    return int(name.split(".")[1]) < keep
tensors = [t for t in r.tensors if kept(t.name)]
infos, offset, blobs = [], 0, []
for t in tensors:
    data = np.asarray(t.data).tobytes()
    name = t.name.encode()
    dims = [int(d) for d in t.shape]
    infos.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
                 + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", int(t.tensor_type), offset))
    blobs.append(data)
    offset += len(data)
    offset += (-offset) % align
with open(dst, "wb") as out:
    out.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for kv in kvs:
        out.write(kv)
    for info in infos:
        out.write(info)
    out.write(b"\0" * ((-out.tell()) % align))
    for data in blobs:
        out.write(data)
        out.write(b"\0" * ((-len(data)) % align))
print(f"  {dst}: {len(tensors)} tensors, {keep} layers")
EOF

    local glibc
    local probe
    probe=$(mktemp)
    tar -xJOf "$STAGE/payload.tar.xz" bin/cuda_shard_parity >"$probe"
    glibc=$(objdump -T "$probe" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)
    rm -f "$probe"
    {
        echo "built: $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
        echo "needs: ${glibc:-?} or newer on the GPU machine; a CUDA driver for sm_80+"
    } >"$STAGE/manifest.txt"
    cat "$STAGE/manifest.txt"
    local size
    size=$(du -sm "$STAGE" | cut -f1)
    echo "== $STAGE is ${size} MiB (limit ${LIMIT_MIB})"
    du -sh "$STAGE"/* | sed 's/^/  /'
    if [ "$size" -gt "$LIMIT_MIB" ]; then
        echo "too large for the transfer: lower STAGE_LAYERS" >&2
        exit 1
    fi
}

run() {
    [ -f "$STAGE/payload.tar.xz" ] || { echo "no $STAGE/payload.tar.xz: run 'scripts/gpu-check.sh stage' first and carry .stage" >&2; exit 1; }
    local out="${OUT:-$STAGE/out}"
    mkdir -p "$out"
    local root=$PWD
    local unpacked="$STAGE/unpacked"
    rm -rf "$unpacked"
    mkdir -p "$unpacked"
    # Removed again at the end, so a later transfer of .stage stays within its limit.
    trap "rm -rf '$unpacked'" EXIT
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$STAGE/payload.tar.xz" "$unpacked" \
        || tar -xJf "$STAGE/payload.tar.xz" -C "$unpacked"
    export SHARDLINE_KERNEL_DIR="$root/$unpacked/kernels"
    export SHARDLINE_MODEL="$root/$STAGE/smollm2-cut.gguf"
    export SHARDLINE_REQUIRE_MODEL=1
    export RUST_LOG="${RUST_LOG:-info}"
    if [ "${DRY_RUN:-0}" != 1 ]; then
        export SHARDLINE_REQUIRE_GPU=1
    fi
    {
        cat "$STAGE/manifest.txt" 2>/dev/null || true
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    } | tee "$out/device.log"

    local summary=()
    step() { # name, log file, command...
        local name=$1 log=$2
        shift 2
        local t0=$SECONDS status
        if "$@" >"$out/$log" 2>&1; then status=ok; else status="FAILED ($?)"; fi
        local result
        result=$(grep -h "^test result:" "$out/$log" | tail -1 | sed 's/^test result: //; s/; finished.*//' || true)
        local skipped
        skipped=$(grep -c "skipped" "$out/$log" || true)
        [ -n "$result" ] || result="-"
        [ "$skipped" -gt 0 ] && result="$result; $skipped cases skipped"
        summary+=("$(printf '%-22s %-12s %5ss  %s' "$name" "$status" "$((SECONDS - t0))" "$result")")
    }
    step "kernel parity" parity.log "$unpacked/bin/parity" --test-threads=4 --nocapture
    step "shard parity" shard_parity.log "$unpacked/bin/cuda_shard_parity" --nocapture
    step "graph steps" step_graphs.log "$unpacked/bin/step_graphs" --nocapture
    step "roofline bench" roofline.log "$unpacked/bin/cuda_roofline" --bench
    if [ "${DRY_RUN:-0}" != 1 ] && command -v python3 >/dev/null; then
        step "torch ceilings" torch.log python3 - <<'EOF'
import torch, time
assert torch.cuda.is_available()
def bench(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
s = bench(lambda: b.copy_(a)); print(f"torch d2d copy: {2 * a.numel() / s / 1e9:.0f} GB/s (read + write)")
for dt in (torch.bfloat16, torch.float16):
    x = torch.randn(4096, 4096, dtype=dt, device="cuda"); w = torch.randn(4096, 4096, dtype=dt, device="cuda")
    s = bench(lambda: x @ w.T); print(f"cuBLAS {dt} 4096^3: {2 * 4096**3 / s / 1e12:.1f} TFLOP/s")
EOF
    fi

    echo
    echo "== logs in $out"
    grep -h "overall teacher-forced\|teacher-forced top-1\|greedy continuation" "$out/shard_parity.log" 2>/dev/null | sed 's/^/  /' || true
    # The Hopper GEMM (docs/CUDA.md, "GEMM on Hopper"): its self-check and which shapes ran it.
    grep -h "wgmma" "$out/parity.log" 2>/dev/null | grep -v "^test " | sed 's/^/  /' || true
    sed -n '/^kernel  /,$p' "$out/roofline.log" 2>/dev/null || true
    cat "$out/torch.log" 2>/dev/null || true
    grep -h "panicked\|FAILED\|^error" "$out"/*.log 2>/dev/null | head -20 | sed 's/^/  /' || true
    echo
    printf '%-22s %-12s %6s  %s\n' "check" "status" "time" "tests"
    printf '%s\n' "${summary[@]}"

    # One file to paste from into docs/PERFORMANCE.md: card, driver, date, commit, figures, predictions.
    {
        echo "# GPU check $(date -u +%FT%TZ)"
        echo
        echo '```'
        cat "$out/device.log"
        echo
        printf '%-22s %-12s %6s  %s\n' "check" "status" "time" "tests"
        printf '%s\n' "${summary[@]}"
        echo
        grep -h "overall teacher-forced\|teacher-forced top-1\|greedy continuation" "$out/shard_parity.log" 2>/dev/null || true
        grep -h "wgmma" "$out/parity.log" 2>/dev/null | grep -v "^test " || true
        sed -n '/^kernel  /,$p' "$out/roofline.log" 2>/dev/null || true
        cat "$out/torch.log" 2>/dev/null || true
        echo '```'
        echo
        echo "Static predictions made at stage time (scripts/sass-report, docs/CUDA.md \"What the SASS shows\"):"
        echo
        echo '```'
        sed -n '/^Analytic model/,$p' "$STAGE/sass-report.txt" 2>/dev/null || echo "(not staged)"
        echo '```'
    } >"$out/summary.md"
    echo "== $out/summary.md written"
}

case "${1:-}" in
    stage) stage ;;
    run) run ;;
    dry-run)
        stage
        DRY_RUN=1 run
        ;;
    *)
        echo "usage: $0 stage | run | dry-run" >&2
        exit 2
        ;;
esac
