#!/usr/bin/env bash
# Re-measures the headline figures of docs/PERFORMANCE.md; meant for an IDLE machine (it prints the load average
# before and after every step, so a busy run shows itself). Budget: about 10 minutes of measuring once built.
#
#   1. CPU decode/prefill vs llama.cpp: scripts/compare-llamacpp, 2 threads (3 reps) and 1 thread (2 reps).
#   2. Pipeline: decode step in one process vs 2- and 3-stage loopback swarms (SmolLM2 Q4_1; benches/pipeline.rs).
#   3. QUIC hop vs bare quinn vs TCP echo, paired rounds (benches/quic.rs).
#
# Usage: scripts/idle-figures.sh            (builds what it needs first; the build is not part of the budget)
#        SKIP_BUILD=1 scripts/idle-figures.sh
# Needs the default model (bash scripts/fetch-model.sh) and llama-cpp-python. Raw output goes to $OUT_DIR
# (default target/idle-figures); the table at the end is what goes into docs/PERFORMANCE.md, with the date and load.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
out=${OUT_DIR:-$target/idle-figures}
mkdir -p "$out"
if [ -z "${LD_LIBRARY_PATH:-}" ] && nvrtc=$(python3 -c 'import nvidia.cuda_nvrtc as m; print(list(m.__path__)[0])' 2>/dev/null); then
  export LD_LIBRARY_PATH="$nvrtc/lib"
fi

load() { cut -d' ' -f1-3 /proc/loadavg; }
log() { printf '%s  load %s  %s\n' "$(date -u +%H:%M:%S)" "$(load)" "$*" | tee -a "$out/log.txt"; }

if [ -z "${SKIP_BUILD:-}" ]; then
  log "building (release binary, pipeline and quic benches)"
  cargo build --release --quiet
  cargo bench --quiet --no-run --bench pipeline --bench quic
fi

start=$(date -u +%s)
log "start: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), commit $(git rev-parse --short HEAD)"

# 1. llama.cpp comparison (about 2-3 minutes).
log "compare-llamacpp --threads 2 --reps 3"
python3 scripts/compare-llamacpp --bin "$target/release/shardline" --threads 2 --reps 3 --json "$out/llamacpp-2t.json" \
  | tee "$out/llamacpp-2t.txt"
log "compare-llamacpp --threads 1 --reps 2"
python3 scripts/compare-llamacpp --bin "$target/release/shardline" --threads 1 --reps 2 --json "$out/llamacpp-1t.json" \
  | tee "$out/llamacpp-1t.txt"

# 2. Pipeline, SmolLM2 group only (about 3 minutes: 3 configurations x (2 s warm-up + 20 s), plus swarm start-up).
log "pipeline bench (pipeline/decode)"
cargo bench --quiet --bench pipeline -- --warm-up-time 2 --measurement-time 20 'pipeline/decode/' \
  2>&1 | tee "$out/pipeline.txt" | grep -E '^pipeline/|time:|thrpt:' || true

# 3. QUIC hop (about 1-2 minutes; the paired comparison is printed on stderr).
log "quic bench"
cargo bench --quiet --bench quic -- --warm-up-time 1 --measurement-time 5 2>&1 | tee "$out/quic.txt" \
  | grep -E 'paired|^quic/' || true
log "done in $(( $(date -u +%s) - start )) s"

# Summary table from criterion's estimates and the scripts' outputs.
python3 - "$target/criterion" "$out" <<'EOF'
import json, re, sys
from pathlib import Path

crit, out = Path(sys.argv[1]), Path(sys.argv[2])

def median_s(group, bench):
    p = crit / group / bench / "new" / "estimates.json"
    try:
        return json.loads(p.read_text())["median"]["point_estimate"] / 1e9
    except (OSError, KeyError, ValueError):
        return None

print()
print(f"| figure | value | ratio | target |")
print(f"|---|---:|---:|---|")
for t in (2, 1):
    try:
        runs = json.loads((out / f"llamacpp-{t}t.json").read_text())
    except (OSError, ValueError):
        print(f"| decode vs llama.cpp, {t} thread(s) | (no result) | | >= 1.0x |")
        continue
    txt = (out / f"llamacpp-{t}t.txt").read_text()
    m = re.search(r"^decode.*$", txt, re.M)
    print(f"| decode vs llama.cpp, {t} thread(s) | `{m.group(0).strip() if m else '?'}` | see line | >= 1.0x |")
single = median_s("pipeline_decode", "stages/1_single_process") or median_s("pipeline/decode", "stages/1_single_process")
for k in (2, 3):
    t = median_s("pipeline_decode", f"stages/{k}_loopback") or median_s("pipeline/decode", f"stages/{k}_loopback")
    if single and t:
        target = ">= 0.9x" if k == 3 else ""
        print(f"| pipeline {k} stages (tok/s) | {1 / t:.1f} vs single {1 / single:.1f} | {single / t:.2f}x | {target} |")
    else:
        print(f"| pipeline {k} stages | (no result) | | |")
qtxt = (out / "quic.txt").read_text() if (out / "quic.txt").exists() else ""
for m in re.finditer(r"quic/(\S+) paired .*?framed ([\d.]+) µs, quinn ([\d.]+) µs, tcp ([\d.]+) µs; "
                     r"per-round ratio framed/quinn ([\d.]+)x", qtxt):
    name, fr, qu, tc, r = m.groups()
    print(f"| QUIC hop {name}: framed / quinn / tcp RTT (µs) | {fr} / {qu} / {tc} | {r}x | <= 1.5x |")
EOF
log "raw output in $out"
