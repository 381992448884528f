#!/usr/bin/env bash
# Do the locks still resolve? Usage: bash locks/check.sh [PIP] (default .venv/bin/pip). Nothing is installed.
# - The CPU lock (what `make setup` installs): pip's resolver on this machine, every pin together with the
#   dependencies they declare (metadata only).
# - The CUDA 12, CUDA 13 and COMET locks: uv resolves each for Linux x86_64 (glibc 2.31), CPython 3.11, from
#   wheels only (a pin without a wheel for that platform fails), in the background meanwhile.
# Exits 1 naming the lock that does not resolve. CI runs it under `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${1:-.venv/bin/pip}
source locks/uv.sh                # UV_VERSION, UV, ensure_uv: the uv that writes the locks
SDIST_ONLY=ipadic                 # on PyPI as a source archive only (pure Python): allowed to build
ensure_uv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gpu_locks() {
    local f rc=0
    for f in locks/cuda12-linux-x86_64.txt locks/cuda13-linux-x86_64.txt locks/comet-linux-x86_64.txt; do
        if "$UV" pip install --quiet --dry-run --python-version 3.11 --python-platform x86_64-manylinux_2_31 \
            --only-binary :all: --no-binary "$SDIST_ONLY" --target "$work/target" -r "$f" > "$work/uv.log" 2>&1; then
            echo "$f: resolves"
        else
            cat "$work/uv.log"
            echo "$f: does NOT resolve (above)"
            rc=1
        fi
    done
    return $rc
}
gpu_locks > "$work/gpu.out" 2>&1 &
gpu=$!
status=0
if "$PIP" install -q --dry-run --ignore-installed -r locks/cpu-linux-x86_64.txt; then
    echo "locks/cpu-linux-x86_64.txt: resolves"
else
    echo "locks/cpu-linux-x86_64.txt: does NOT resolve (above)"
    status=1
fi
wait "$gpu" || status=1
cat "$work/gpu.out"
exit $status
