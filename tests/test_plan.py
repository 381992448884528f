"""The memory planner: parameter counts against transformers' own, the accounting per preset, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selftrain.__main__ import main
from selftrain.plan import GIB, KNOWN_SHAPES, Shape, estimate, model_shape, plan


@pytest.mark.parametrize("name", sorted(KNOWN_SHAPES))
def test_parameter_count_equals_transformers(name: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = KNOWN_SHAPES[name]
    with torch.device("meta"):  # shapes only: no memory
        model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    assert Shape.from_config(cfg).params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,non_embedding", [("llm-jp/llm-jp-3-150m", 50_344_448), ("llm-jp/llm-jp-3-980m", 684_258_816)]
)
def test_built_in_shapes_match_the_model_cards_non_embedding_parameters(name: str, non_embedding: int) -> None:
    # The llm-jp-3 model cards list non-embedding parameters per size; the untied input and output embeddings are
    # the rest (2 x vocab x hidden), whatever the vocabulary padding.
    shape = Shape.from_config(KNOWN_SHAPES[name])
    assert shape.params() - 2 * shape.vocab * shape.hidden == non_embedding


def test_accounting_per_preset() -> None:
    shape = Shape.from_config(KNOWN_SHAPES["llm-jp/llm-jp-3-3.7b"])
    n = shape.params()
    one = estimate(shape, "dpo", "single", 1, 1, 4096, True)
    assert one["weights"] == 2 * n and one["optimizer"] == 4 * n and one["reference"] == 2 * n
    mixed = estimate(shape, "dpo", "single", 1, 1, 4096, True, precision="mixed")
    assert mixed["weights"] == 4 * n and mixed["optimizer"] == 8 * n and mixed["reference"] == 2 * n
    z3 = estimate(shape, "dpo", "zero3", 8, 1, 4096, True)
    assert z3["weights"] == one["weights"] / 8 and z3["activations"] == one["activations"]  # activations per GPU
    assert estimate(shape, "dpo", "ddp", 8, 1, 4096, True)["total"] == one["total"]  # ddp: a full copy each
    assert estimate(shape, "sft", "single", 1, 1, 4096, True)["activations"] * 2 == pytest.approx(one["activations"])
    assert estimate(shape, "dpo", "single", 1, 1, 4096, True, precompute_ref=True)["reference"] == 0
    no_ckpt = estimate(shape, "sft", "single", 1, 1, 4096, False)["activations"]
    assert no_ckpt > estimate(shape, "sft", "single", 1, 1, 4096, True)["activations"]
    rows = plan(Shape.from_config(KNOWN_SHAPES["llm-jp/llm-jp-3-13b"]), 1, 80, precision="mixed")
    assert not any(r["fits"] for r in rows)  # 13.7B x 16 bytes alone is over 200 GiB
    rows8 = plan(Shape.from_config(KNOWN_SHAPES["llm-jp/llm-jp-3-13b"]), 8, 80, precision="mixed")
    fits = {(r["kind"], r["preset"]) for r in rows8 if r["fits"]}
    assert ("sft", "zero3") in fits and ("sft", "ddp") not in fits
    assert all(r["total"] * GIB <= 0.9 * 80 * GIB for r in rows8 if r["fits"])


def test_shape_from_a_local_config_and_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(json.dumps(KNOWN_SHAPES["llm-jp/llm-jp-3-1.8b"]))
    assert model_shape(str(tmp_path)).hidden == 2048
    assert model_shape("llm-jp/llm-jp-3-1.8b-instruct3").layers == 24  # the known shape, without a download
    with pytest.raises(FileNotFoundError, match="no config.json found"):
        model_shape(str(tmp_path / "nothing"))
    assert main(["plan", "--model", "llm-jp-3-3.7b", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "3.78B parameters on 8 GPU(s)" in out and "zero3" in out and "single" not in out
    assert main(["plan", "--model", str(tmp_path / "nothing")]) == 2
