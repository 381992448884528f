"""The plain CPU LM head (selftrain/train/cpu_head.py) gives what TRL's fused head gives: loss, per-token fields and
gradients, on a batch with prompt (-100) and padding positions; selftrain's CPU trainers carry it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from selftrain import train
from selftrain.config import resolve_run_config
from selftrain.inference import cpu_has_bf16
from selftrain.train import cpu_head
from selftrain.train import stage as train_stage_mod

# On a CUDA machine the trainers keep TRL's own head and bf16 comes from the GPU: these checks are CPU-only.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only training path; CUDA is present")
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0  # right padding
    attn[2, 5:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[attn == 0] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _patched(tiny_model: Path, plain: bool, outputs: tuple[str, ...] = ALL) -> torch.nn.Module:
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    add_fused_lm_head(model, outputs=outputs)
    if plain:
        assert cpu_head.use_plain_cpu_head(model, outputs=outputs)
    return model


@pytest.mark.parametrize("num_items", [None, 7])
def test_plain_head_matches_trl(tiny_model: Path, num_items: int | None) -> None:
    trl_model, plain_model = _patched(tiny_model, False), _patched(tiny_model, True)
    batch = _batch(trl_model.config.vocab_size)
    outs = []
    for model in (trl_model, plain_model):
        out = model(**batch, fused_lm_head=True, num_items_in_batch=num_items)
        out.loss.backward()
        outs.append(out)
    ref, got = outs
    assert torch.allclose(got.loss, ref.loss, atol=1e-5)
    for f in FIELDS:
        a, b = getattr(ref, f), getattr(got, f)
        assert a.shape == b.shape, f
        if a.dtype == torch.bool:
            assert torch.equal(a, b), f
        else:
            assert torch.allclose(a.float(), b.float(), atol=1e-4), f
    assert (got.log_probs[:, :3] == 0).all()  # prompt positions are zero, as TRL returns them
    for (name, p), q in zip(trl_model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_plain_head_fills_only_the_requested_fields(tiny_model: Path) -> None:
    trl_model, plain_model = _patched(tiny_model, False, ("log_probs",)), _patched(tiny_model, True, ("log_probs",))
    batch = _batch(trl_model.config.vocab_size)
    ref, got = trl_model(**batch, fused_lm_head=True), plain_model(**batch, fused_lm_head=True)
    assert torch.allclose(got.log_probs, ref.log_probs, atol=1e-5)
    assert got.entropy is None and got.is_top1 is None and ref.entropy is None


def test_plain_head_keeps_the_plain_forward(tiny_model: Path) -> None:
    """Without fused_lm_head the model is the model: logits as usual (generation, the plain path)."""
    plain = _patched(tiny_model, True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = _batch(base.config.vocab_size)
    with torch.no_grad():
        a, b = plain(**batch), base(**batch)
    assert torch.allclose(a.logits, b.logits) and torch.allclose(a.loss, b.loss)


@cpu_only
def test_cpu_trainers_use_the_plain_head(tiny_overrides: list[str], tmp_path: Path, tiny_model: Path) -> None:
    from datasets import Dataset

    cfg = resolve_run_config("tiny", "central", overrides=tiny_overrides, check_trainer=True)
    msgs = [{"role": "user", "content": "hi"}]
    sft = Dataset.from_list([{"prompt": msgs, "completion": [{"role": "assistant", "content": "hello"}]}] * 2)
    trainer, _ = train_stage_mod._build_trainer(cfg, "sft", tiny_model, sft, tmp_path / "sft", [], False)
    assert "use_plain_cpu_head" in trainer.model.forward.__qualname__
    answer = [{"role": "assistant", "content": "a"}]
    pairs = Dataset.from_list([{"prompt": msgs, "chosen": answer, "rejected": answer}] * 2)
    trainer, _ = train_stage_mod._build_trainer(cfg, "dpo", tiny_model, pairs, tmp_path / "dpo", [], False)
    assert "use_plain_cpu_head" in trainer.model.forward.__qualname__
    # The patch is undone once the trainers are built: TRL's own function is back for anyone else.
    from trl.trainer import dpo_trainer, sft_trainer
    from trl.trainer.utils import add_fused_lm_head

    assert sft_trainer.add_fused_lm_head is add_fused_lm_head and dpo_trainer.add_fused_lm_head is add_fused_lm_head


def test_precision_follows_the_hardware() -> None:
    here = train.Device.here()
    cpu = train.Device(cuda=False, bf16=cpu_has_bf16())
    got = train.precision_plan("mixed", {}, cpu)["flags"]
    # A CPU run always says so (launched processes then form a gloo group); bf16 autocast where the CPU multiplies it.
    assert got["bf16"] == cpu_has_bf16() and got["use_cpu"] and not got["fp16"]
    assert "bf16" not in train.precision_plan("mixed", {"bf16": False}, cpu)["flags"]  # the params' word wins
    flags = train.precision_plan("mixed", {"bf16": True}, cpu)["flags"]
    assert flags["use_cpu"] and "bf16" not in flags
    assert "dataloader_pin_memory" not in train.precision_plan("mixed", {"dataloader_pin_memory": True}, cpu)["flags"]
    if not torch.cuda.is_available():
        assert here == cpu
    # A bf16 GPU under `mixed`: float32 masters, bf16 autocast, a bf16 reference; an older GPU: fp16 autocast.
    gpu = train.precision_plan("mixed", {}, train.Device(cuda=True, bf16=True))
    assert gpu["flags"] == {"bf16": True, "fp16": False} and gpu["weights"] == torch.float32
    assert gpu["reference"] == gpu["save"] == torch.bfloat16
    old = train.precision_plan("mixed", {}, train.Device(cuda=True, bf16=False))
    assert old["flags"] == {"bf16": False, "fp16": True} and old["reference"] == torch.float32
    pure = train.precision_plan("bf16", {}, train.Device(cuda=True, bf16=True))
    assert pure["weights"] == torch.bfloat16 and pure["flags"]["bf16"]
    with pytest.raises(train.TrainingError, match="this GPU has no bf16"):
        train.precision_plan("bf16", {}, train.Device(cuda=True, bf16=False))


@pytest.mark.gpu
def test_gpu_precision_and_trl_head() -> None:
    """On a CUDA GPU: bf16 where the GPU supports it, no CPU flag, and TRL's own fused head is kept."""
    bf16 = torch.cuda.is_bf16_supported()
    got = train.precision_plan("mixed", {}, train.Device.here())
    assert got["flags"] == {"bf16": bf16, "fp16": not bf16} and got["weights"] == torch.float32
