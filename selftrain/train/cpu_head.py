"""A faster LM head for TRL's SFT and DPO trainers when they train on a CPU.

TRL (>= 1.x) patches the model's forward with a "fused LM head": per-token log-probabilities computed in vocabulary
chunks so that the full ``[tokens, vocab]`` logits are never held at once. On a GPU it runs a Triton kernel and
scores only the labelled positions. Without Triton (a CPU) it scores every position, prompt and padding included,
folds each tile with a dozen element-wise torch ops, recomputes the tiles in the backward pass and accumulates the
gradient GEMMs in fp32 outside autocast. On the 2-core demo machine that head took over a third of each SFT step.

A 135M model's logits for one micro-batch's labelled positions fit in memory easily (500 positions x 49k vocab x
4 bytes = 100 MB), so on a CPU ``plain_lm_head()`` (around the trainer's construction) swaps in the direct
computation: the head's GEMM on the labelled positions only (in bf16 under autocast), one fp32 log-softmax, and
the logged-only statistics (entropy, top-1, mean logit) under ``no_grad``. It returns TRL's
``FusedCausalLMOutput`` with the same fields and the same loss normalisation; a test checks both against TRL's
own head.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch


def supported(model: Any) -> bool:
    """Dense causal LMs without logit scaling, soft-capping or MoE routing: what the plain head reproduces."""
    cfg = model.config.get_text_config()
    return (
        getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) in (None, 1.0)
        and not getattr(cfg, "output_router_logits", False)
        and model.get_output_embeddings() is not None
    )


def use_plain_cpu_head(model: Any, temperature: float = 1.0, outputs: tuple[str, ...] = ("log_probs",)) -> bool:
    """Replace TRL's fused LM head on ``model`` (already patched by a TRL trainer) by the plain one.

    ``outputs`` are the per-token fields the trainer asked TRL's head for; the others stay None, as there.
    Returns False, leaving the model as it is, where the plain head would differ (see ``supported``).
    """
    from trl.trainer.utils import FusedCausalLMOutput

    if not supported(model):
        return False
    wanted = set(outputs)
    fused_forward = model.forward  # TRL's patch; it calls the original forward when fused_lm_head=False

    def forward(
        self: Any,
        *args: Any,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head:
            return fused_forward(
                *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            assert labels is not None  # TRL's fused head is always called with labels or shift_labels
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        targets = labels[mask]
        # Only the labelled positions go through the head; autocast (if on) runs this GEMM in bf16.
        logits = self.get_output_embeddings()(hidden[mask]).float()
        if temperature != 1.0:
            logits = logits / temperature
        log_p = torch.log_softmax(logits, dim=-1)  # one fused pass forward and backward
        fields: dict[str, torch.Tensor] = {"log_probs": log_p.gather(1, targets[:, None])[:, 0]}
        with torch.no_grad():  # logged only: TRL's SFT and DPO losses take no gradient through these
            if wanted & {"entropy", "log_sum_sq_probs"}:
                p = log_p.exp()
                if "entropy" in wanted:
                    fields["entropy"] = -torch.linalg.vecdot(p, log_p)
                if "log_sum_sq_probs" in wanted:
                    fields["log_sum_sq_probs"] = torch.log(torch.linalg.vecdot(p, p))
                del p
            if "mean_logits" in wanted:
                fields["mean_logits"] = logits.mean(-1)
            if "is_top1" in wanted:
                fields["is_top1"] = logits.argmax(-1) == targets
        del logits, log_p

        def spread(values: torch.Tensor) -> torch.Tensor:
            # Back to (batch, positions), zero where the label is ignored, as TRL's head returns them.
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        per_token = {k: spread(v) for k, v in fields.items()}
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / denom, **per_token, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True


@contextlib.contextmanager
def plain_lm_head() -> Iterator[None]:
    """While a TRL SFT/DPO trainer is constructed, follow each of its ``add_fused_lm_head`` calls by the plain head.

    Patching at construction (not afterwards) matters: DPO's ``precompute_ref_log_probs`` pass runs inside the
    trainer's ``__init__``, and its reference log-probs must come from the same head as the policy's.
    """
    from trl.trainer import dpo_trainer, sft_trainer

    modules: tuple[Any, ...] = (sft_trainer, dpo_trainer)  # their module-level add_fused_lm_head is replaced
    originals = [m.add_fused_lm_head for m in modules]

    def patched(original: Any) -> Any:
        def add_fused_lm_head(model: Any, temperature: float = 1.0, **kwargs: Any) -> None:
            original(model, temperature=temperature, **kwargs)
            if not kwargs.get("cast_lm_head_to_fp32"):
                use_plain_cpu_head(model, temperature, kwargs.get("outputs", ("log_probs",)))

        return add_fused_lm_head

    for m, original in zip(modules, originals, strict=True):
        m.add_fused_lm_head = patched(original)
    try:
        yield
    finally:
        for m, original in zip(modules, originals, strict=True):
            m.add_fused_lm_head = original
