"""GPU throughput of the project's SFT path against a plain PyTorch loop (needs one CUDA GPU).

A randomly initialised llm-jp-3-1.8b-shaped Llama (selftrain.plan.KNOWN_SHAPES: 24 layers, hidden 2048, FFN 7168,
16 heads, vocab 99,584) is trained for a few steps at 2048 tokens per sequence, in the precision stage 03 uses on
a GPU (`--precision mixed`, the default: float32 master weights under bf16 autocast; `bf16`: pure bf16 weights
and optimizer, the project's GPU path before mixed precision became its default):
  1. the card's bf16 matmul rate (8192^3 products), the MFU denominator;
  2. a plain PyTorch loop on random tokens (no padding anywhere) in that precision: autocast + fused AdamW over
     float32 weights (mixed), or bf16 weights (bf16): the baseline;
  3. the project's SFT path (selftrain.train: the TRL SFTTrainer built from params/models/llm-jp-3-1.8b.yaml with
     training.precision set to the same) on conversational examples of mixed length (100-1800 tokens), in several
     batching modes: packed + padding-free (block-diagonal attention), packed rows without document masking, and
     plain padded batches (what the packing saves).
tokens/s counts real tokens only (no padding); MFU uses 6 N + 12 L d S FLOPs per token (PaLM appendix B),
N = parameters without the input embedding. Each SFT entry records its peak GPU memory beside the planner's
estimate (selftrain.plan) for the same setting. Prints and writes bench/out/train_gpu.json (or $OUT).

    python bench/bench_train_gpu.py [--steps 8] [--warmup 3] [--batch 8] [--precision mixed|bf16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selftrain.plan import KNOWN_SHAPES  # noqa: E402  (after the path insert)
from selftrain.train import stage as train_stage_mod  # noqa: E402

SHAPE = {
    **{k: v for k, v in KNOWN_SHAPES["llm-jp/llm-jp-3-1.8b"].items() if k != "torch_dtype"},
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
SEQ = 2048
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_token(model: torch.nn.Module) -> float:
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    c = model.config
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * SEQ


def build_model(attn: str = "sdpa", dtype: torch.dtype = torch.float32, shape: dict | None = None) -> torch.nn.Module:
    """A randomly initialised Llama of `shape` (default SHAPE) on the device, in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**(shape or SHAPE), attn_implementation=attn)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def plain_loop(batch: int, warmup: int, steps: int, precision: str = "mixed") -> dict:
    """The baseline: random tokens, no padding, no trainer; `mixed`: float32 weights and fused AdamW with the
    forward under bf16 autocast (what stage 03 runs on a GPU); `bf16`: bf16 weights and optimizer states."""
    model = build_model(dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    fpt = flops_per_token(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device=DEV).manual_seed(0)
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, SHAPE["vocab_size"], (batch, SEQ), device=DEV, generator=gen)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=precision == "mixed"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter())
        if i == 0:
            print(f"  plain step 0 loss {loss.item():.3f}", flush=True)
    secs = times[-1] - times[warmup - 1]
    tps = batch * SEQ * steps / secs
    out = {"precision": precision, "tokens_per_second": round(tps), "flops_per_token": fpt, "peak_gb": _peak_gb()}
    del model, opt
    _free()
    return out


def _peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else 0.0


def _free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def save_random_model(folder: Path, shape: dict | None = None) -> Path:
    """A random model of `shape` (default SHAPE) as a HF folder in bf16 (as llm-jp-3 ships) with a ChatML
    tokenizer (the tiny model's: its ids fit any vocabulary of 512 or more)."""
    from selftrain.models import build_tiny_model

    tiny = build_tiny_model(folder.parent / "tiny-tokenizer")
    model = build_model(dtype=torch.bfloat16, shape=shape)
    model.config.eos_token_id = 2  # <|im_end|> in the tiny tokenizer
    model.config.pad_token_id = 0
    model.save_pretrained(folder, safe_serialization=True)
    for f in tiny.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, folder / f.name)
    del model
    _free()
    return folder


def synthetic_sft(n: int, tok, seed: int = 0) -> list[dict]:
    """Conversational prompt/completion pairs of 5-88% of a sequence (100-1800 tokens: gaps for packing to fill)."""
    rng = random.Random(seed)
    words = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
    words += "from or had by word but what some we can out other were all there when up use your how".split()
    per_word = len(tok(" " + " ".join(words))["input_ids"]) / len(words)
    recs = []
    for _ in range(n):
        total = rng.randint(SEQ // 20, SEQ * 7 // 8)
        p = max(5, int(total * rng.uniform(0.1, 0.4) / per_word))
        c = max(5, int((total - 24) / per_word) - p)  # 24: chat-template tokens
        recs.append(
            {
                "prompt": [{"role": "user", "content": " ".join(rng.choices(words, k=p))}],
                "completion": [{"role": "assistant", "content": " ".join(rng.choices(words, k=c))}],
            }
        )
    return recs


def _robust_fingerprints() -> None:
    """The GPU image's Python 3.12 + carried dill/pyarrow could not pickle an Arrow table for datasets'
    fingerprint (MonthDayNano); fall back to a random one (a benchmark needs no dataset-cache reuse)."""
    import uuid

    import datasets.arrow_dataset as ad

    orig = ad.generate_fingerprint

    def safe(ds):  # noqa: ANN001, ANN202
        try:
            return orig(ds)
        except Exception:
            return uuid.uuid4().hex

    ad.generate_fingerprint = safe


def sft_path(
    model_dir: Path, name: str, overrides: list[str], batch: int, warmup: int, steps: int, precision: str = "mixed"
) -> dict:
    """Steps of selftrain's own trainer construction (what train.train_stage runs) on synthetic data."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from selftrain import plan, train
    from selftrain.config import resolve_run_config

    cfg = resolve_run_config(
        "llm-jp-3-1.8b",
        "central",
        overrides=[
            f"model.path={model_dir}",
            f"training.sft.per_device_train_batch_size={batch}",
            "training.sft.gradient_accumulation_steps=1",
            f"training.sft.max_length={SEQ}",
            f"training.sft.max_steps={warmup + steps}",
            'training.sft.save_strategy="no"',
            "training.sft.logging_steps=1",
            f"training.precision={precision}",
            *overrides,
        ],
        check_trainer=True,
    )
    setting = plan.stage_setting(cfg, "sft")
    planned = plan.estimate_setting(plan.model_shape(str(model_dir)), setting)["total"] / plan.GIB
    _robust_fingerprints()
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list(synthetic_sft(1500, tok))

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            sync()
            times.append(time.perf_counter())

    out_dir = Path("/tmp/selftrain-bench") / name
    trainer, _ = train_stage_mod._build_trainer(cfg, "sft", model_dir, data, out_dir, [], progress=False)
    trainer.add_callback(Clock())  # after the dataset map: a __main__ class must not reach datasets' hasher
    batch0 = train.check_batch(next(iter(trainer.get_train_dataloader())), tok)
    fpt = flops_per_token(trainer.model)
    trainer.train()
    hist = {h["step"]: h for h in trainer.state.log_history if "num_tokens" in h}
    tokens = hist[warmup + steps]["num_tokens"] - hist[warmup]["num_tokens"]
    secs = times[warmup + steps - 1] - times[warmup - 1]
    res = {
        "overrides": overrides,
        "tokens_per_second": round(tokens / secs),
        "tokens_per_step": round(tokens / steps),
        "flops_per_token": fpt,
        "peak_gb": _peak_gb(),
        # the planner's worst case (every row full) for the same setting, GiB like peak_gb
        "planned_gib": round(planned, 1),
        "plan_setting": {k: v for k, v in vars(setting).items() if k != "accumulation"},
        "loss_last": hist[warmup + steps].get("loss"),
        "batch_check": batch0,
        "attn": trainer.model.config._attn_implementation,
    }
    del trainer
    _free()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", nargs="*", default=None, help="SFT variants to run (default: all)")
    ap.add_argument(
        "--precision", choices=["mixed", "bf16"], default="mixed", help="mixed (stage 03's GPU default) or bf16"
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on CPU: checks the script, not the numbers")
    a = ap.parse_args()
    global SEQ
    if a.smoke:
        SHAPE.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        SHAPE.update(num_key_value_heads=4)
        SEQ = 256
    out_dir = Path(os.environ.get("OUT", ROOT / "bench" / "out"))
    out_file = out_dir / ("train_gpu_smoke.json" if a.smoke else "train_gpu.json")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "shape": SHAPE,
        "seq": SEQ,
        "batch": a.batch,
        "steps": a.steps,
        "precision": a.precision,
    }

    def save() -> None:
        out_file.write_text(json.dumps(res, indent=2, default=str) + "\n")

    import transformers
    import trl

    res["transformers"], res["trl"] = transformers.__version__, trl.__version__
    peak = matmul_tflops(256 if a.smoke else 8192)
    res["matmul_tflops"] = round(peak, 1)
    print(f"bf16 matmul: {peak:.0f} TFLOP/s", flush=True)

    base = plain_loop(a.batch, a.warmup, a.steps, a.precision)
    base["mfu"] = round(base["tokens_per_second"] * base["flops_per_token"] / 1e12 / peak, 3)
    res["plain"] = base
    print("plain loop:", base, flush=True)
    save()

    model_dir = save_random_model(Path("/tmp/selftrain-bench/llm-jp-3-1.8b-random"))
    variants = {
        "packed_padding_free_flex": ["training.sft.packing=true", "training.sft_attn_implementation=flex_attention"],
        "packed_padding_free_sdpa": ["training.sft.packing=true", "training.sft_attn_implementation=sdpa"],
        "packed_wrapped_sdpa": [
            "training.sft.packing=true",
            "training.sft.packing_strategy=wrapped",
            "training.sft_attn_implementation=sdpa",
        ],
        "padded_sdpa": ["training.sft.packing=false", "training.sft_attn_implementation=sdpa"],
    }
    res["sft"] = {}
    for name, ov in variants.items():
        if a.only and name not in a.only:
            continue
        print(f"SFT path, {name} ...", flush=True)
        t = time.perf_counter()
        try:
            r = sft_path(model_dir, name, ov, a.batch, a.warmup, a.steps, a.precision)
            r["mfu"] = round(r["tokens_per_second"] * r["flops_per_token"] / 1e12 / peak, 3)
            r["vs_plain"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3)
        except Exception as e:  # one failing mode must not lose the others' numbers
            traceback.print_exc()
            r = {"overrides": ov, "error": f"{type(e).__name__}: {e}"[:500]}
            _free()
        r["wall_seconds"] = round(time.perf_counter() - t, 1)
        res["sft"][name] = r
        print(f"  {name}: {json.dumps({k: v for k, v in r.items() if k != 'batch_check'})}", flush=True)
        save()
    print(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
