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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need a CUDA device: skipped, with the reason, elsewhere (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
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
