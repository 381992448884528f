"""Shared fixtures: a tiny random Llama and small prompt files, all under pytest's temp folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    {
        "id": "p1",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ],
    },
    {
        "id": "p2",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Give three tips for sleeping well."},
            {"role": "assistant", "content": "Keep a schedule, avoid screens, keep it cool."},
        ],
    },
    {"id": "p3", "instruction": "Add the numbers.", "input": "12 and 30", "output": "42"},
    {"id": "p4", "prompt": "Name a colour of the sky.", "response": "Blue."},
    {
        "id": "p5",
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How many legs does a spider have?"},
            {"role": "assistant", "content": "Eight."},
        ],
    },
]


# Test tiers (README: Testing). Every test lands in exactly one: its own tier marker, else its file's default in
# FILE_TIERS, where a unit file's test that loads the tiny model (it takes the `tiny_model` fixture, directly or
# through `tiny_overrides`) is integration.
# `make test-fast` runs the unit tier; `pytest -m notebook` (or any tier) runs one.
TIERS = {
    "unit": "no model, no kernel: maths, parsing, params, file handling, command lines (make test-fast)",
    "integration": "a stage's functions on the tiny model, vLLM, the embedded model, child processes",
    "notebook": "the stage notebooks executed by papermill, through the runner or directly",
    "browser": "JupyterLab in Debian's Chromium through Playwright",
    "gpu": "needs a CUDA GPU (skipped elsewhere; bench/gpu_check.py covers the GPU paths)",
    "rehearsal": "the poster study's own params on the CPU, sizes and paths swapped",
    "slurm": "a real Slurm cluster started by the tests",
}
MODEL_FIXTURES = {"tiny_model"}
FILE_TIERS = {
    "test_browser.py": "browser",
    "test_config.py": "unit",
    "test_cpu_head.py": "unit",
    "test_cpu_sampler.py": "unit",
    "test_data.py": "unit",
    "test_dtype_rule.py": "unit",
    "test_embedded.py": "unit",
    "test_eval_protocols.py": "unit",
    "test_evaluate.py": "unit",
    "test_figures.py": "unit",
    "test_gpu_check.py": "integration",
    "test_hardware.py": "unit",
    "test_integrity.py": "unit",
    "test_judge.py": "unit",
    "test_judge_api.py": "unit",
    "test_judge_protocol.py": "unit",
    "test_launch.py": "integration",
    "test_layout.py": "unit",
    "test_locks.py": "unit",
    "test_metrics.py": "unit",
    "test_metrics_reference.py": "unit",
    "test_notebooks.py": "notebook",
    "test_plan.py": "unit",
    "test_positive_control.py": "unit",
    "test_poster_rehearsal.py": "rehearsal",
    "test_power.py": "unit",
    "test_replicates.py": "unit",
    "test_runs.py": "unit",
    "test_rounds.py": "unit",
    "test_seeding.py": "unit",
    "test_select_math.py": "unit",
    "test_shards.py": "unit",
    "test_similarity.py": "unit",
    "test_slurm.py": "unit",
    "test_slurm_cluster.py": "slurm",
    "test_stages.py": "integration",
    "test_stats.py": "unit",
    "test_train.py": "integration",
    "test_utilities.py": "unit",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, what in TIERS.items():
        config.addinivalue_line("markers", f"{name}: tier: {what}")


def tier_of(item: pytest.Item) -> list[str]:
    """The tiers a test lands in (exactly one unless something is wrong): its own markers, else its file's default
    (integration instead of unit when it loads the tiny model)."""
    own = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
    if own:
        return own
    default = FILE_TIERS.get(item.path.name)
    if default == "unit" and MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        return ["integration"]
    return [default] if default else []


# Every test this session collected (before `-m` deselects), with its tiers and other markers: tests/test_layout.py
# reads it rather than collecting the suite again.
COLLECTED: dict[str, list[str]] = {}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    bad = []
    for item in items:
        tiers = tier_of(item)
        COLLECTED[item.nodeid] = sorted(set(tiers) | {m.name for m in item.iter_markers()})
        if len(tiers) != 1:
            bad.append(f"{item.nodeid}: {'tiers ' + ', '.join(tiers) if tiers else 'no tier'}")
        elif not item.get_closest_marker(tiers[0]):
            item.add_marker(tiers[0])
    if bad:
        raise pytest.UsageError(
            "every test lands in exactly one tier (a tier marker, or its file in tests/conftest.py's FILE_TIERS):\n  "
            + "\n  ".join(bad)
        )
    # Tests of the gpu tier need a CUDA device: skipped, with the reason, elsewhere (CI has none).
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tier gpu); run on a GPU machine")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_model(cache_dir: Path) -> Path:
    from selftrain.models import build_tiny_model, models_dir

    return build_tiny_model(models_dir(str(cache_dir)) / "tiny-llama")


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return p


@pytest.fixture()
def tiny_overrides(tmp_path: Path, cache_dir: Path, prompts_file: Path, tiny_model: Path) -> list[str]:
    """Params overrides that keep a run on the tiny model and inside temp folders."""
    return [
        f"prompts.path={prompts_file}",
        f"output.results_dir={tmp_path / 'results'}",
        f"output.cache_dir={cache_dir}",
        f"output.checkpoints_dir={tmp_path / 'checkpoints'}",
        "generation.backend=transformers",
    ]
