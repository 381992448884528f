"""Training through accelerate (training.launch) against the in-kernel path, through the real stages 03/04.

GPU mode (the default; one CUDA GPU is enough, more are used):
  1. SFT of a randomly initialised llm-jp-3-1.8b-shaped model (bench_train_gpu's shape and tokenizer) on
     synthetic conversations: in the kernel, then `training.launch` fsdp and zero3 (zero3 only where deepspeed
     imports) with one process per GPU: tokens/s (the stage's own figure) as a ratio to the in-kernel run, and
     the peak GPU memory of rank 0;
  2. DPO of a randomly initialised llm-jp-3-3.7b-shaped model on one GPU, with and without
     `precompute_ref_log_probs`: peak GPU memory (what `selftrain plan --precompute-ref` estimates).
CPU mode (--tiny): the same code paths on the tiny model with `ddp` over two gloo processes, so the script is
known to run before a GPU session spends its minutes on it.

Each configuration runs in its own run folder under a temporary results dir; a failing one is recorded with its
error and the rest go on. Prints and writes bench/out/launch_gpu.json ($OUT/launch_gpu.json when $OUT is set).

    python bench/bench_launch_gpu.py [--steps 6] [--batch 4]      # GPU
    python bench/bench_launch_gpu.py --tiny                        # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPE_37B = dict(vocab_size=99_584, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                 num_attention_heads=24, num_key_value_heads=24, max_position_embeddings=4096,
                 tie_word_embeddings=False)  # fmt: skip


def _stage_run(results: Path, ckpt: Path, model_dir: Path, model_name: str, overrides: list[str], records: list[dict],
               kind: str):  # noqa: ANN202  # fmt: skip
    """A run folder whose stage 02 outputs are the given records (the bench skips generation and selection)."""
    from selftrain.config import resolve_run_config
    from selftrain.io import write_jsonl
    from selftrain.runs import create_run

    cfg = resolve_run_config(model_name, "central", overrides=[
        f"model.path={model_dir}", f"output.results_dir={results}", f"output.checkpoints_dir={ckpt}",
        f"training.order={kind}", 'training.sft.save_strategy="no"', 'training.dpo.save_strategy="no"',
        *overrides,
    ], check_trainer=True)  # fmt: skip
    run = create_run(cfg, new_version=True)
    with run.stage("select") as info:  # stage 02's outputs, written as the stage would
        name = "sft.jsonl" if kind == "sft" else "dpo.jsonl"
        info["outputs"] = [write_jsonl(run.data_dir / name, records)]
    return run


def _one(name: str, make_run, kind: str, out: dict) -> None:  # noqa: ANN001
    from selftrain import train

    print(f"--- {name}", flush=True)
    t = time.perf_counter()
    try:
        run = make_run()
        train.train_stage(run, kind, progress=False)
        m = json.loads((run.metrics_dir / f"{kind}.json").read_text())
        numerics = run.manifest()["stages"][kind]["numerics"]
        keep = ("tokens_per_second", "train_seconds", "processes")
        out[name] = {**{k: m[k] for k in keep}, "peak_gpu_gib": numerics.get("peak_gpu_gib"),
                     "sharding": numerics.get("sharding")}  # fmt: skip
        out[name]["wall_seconds"] = round(time.perf_counter() - t, 1)
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"[:600], "trace": traceback.format_exc()[-1500:]}
    print(f"    {out[name]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny model (ddp over gloo)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="rows per process per step")
    args = ap.parse_args()
    from bench_train_gpu import SEQ, save_random_model, synthetic_sft
    from transformers import AutoTokenizer

    gpus = torch.cuda.device_count()
    out: dict = {"device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        results, ckpt = tmp_path / "results", tmp_path / "ckpt"
        if args.tiny:
            from selftrain.models import build_tiny_model

            sft_model, model_name, seq = build_tiny_model(tmp_path / "tiny"), "tiny", 96
            presets = [("ddp", ["training.launch=ddp", "training.launch_processes=2"])]
        else:
            if not gpus:
                sys.exit("no CUDA GPU: run with --tiny on a CPU")
            sft_model, model_name, seq = save_random_model(tmp_path / "m18"), "llm-jp-3-1.8b", SEQ
            presets = [("fsdp", ["training.launch=fsdp", f"training.launch_processes={gpus}"])]
            try:
                import deepspeed  # noqa: F401

                presets.append(("zero3", ["training.launch=zero3", f"training.launch_processes={gpus}"]))
            except ImportError:
                out["zero3"] = {"skipped": "deepspeed is not installed"}
        import bench_train_gpu

        bench_train_gpu.SEQ = seq  # synthetic_sft sizes its examples to this (they must fit max_length whole)
        tok = AutoTokenizer.from_pretrained(sft_model)
        rows = args.batch * max(gpus, 2) * args.steps
        sft = synthetic_sft(rows, tok)
        common = [f"training.sft.per_device_train_batch_size={args.batch}", f"training.sft.max_length={seq}",
                  f"training.sft.max_steps={args.steps}", "training.sft.gradient_accumulation_steps=1"]  # fmt: skip
        out["sft"] = {}
        for name, extra in [("in_kernel", []), *presets]:
            _one(name, lambda extra=extra: _stage_run(results, ckpt, sft_model, model_name, [*common, *extra], sft,
                                                      "sft"), "sft", out["sft"])  # fmt: skip
        base = out["sft"].get("in_kernel", {}).get("tokens_per_second")
        for name, _ in presets:
            r = out["sft"].get(name, {})
            if base and r.get("tokens_per_second"):
                r["ratio_vs_in_kernel"] = round(r["tokens_per_second"] / base, 3)

        # DPO with and without precomputed reference log-probs: peak memory on one GPU (the tiny model on CPU).
        if args.tiny:
            dpo_model = sft_model
        else:
            bench_train_gpu.SHAPE.update(SHAPE_37B)
            dpo_model = save_random_model(tmp_path / "m37")  # build_model reads the shape just set
        pairs = [{"prompt": r["prompt"], "chosen": r["completion"],
                  "rejected": [{"role": "assistant", "content": r["completion"][0]["content"][::-1]}]}
                 for r in sft[: args.steps * 2]]  # fmt: skip
        dpo_common = [f"training.dpo.max_length={seq}", "training.dpo.per_device_train_batch_size=2",
                      f"training.dpo.max_steps={args.steps}", "training.dpo.gradient_accumulation_steps=1",
                      "training.dpo.gradient_checkpointing=true"]  # fmt: skip
        out["dpo"] = {}
        for name, extra in [
            ("reference_model", []),
            ("precomputed_reference", ["training.dpo.precompute_ref_log_probs=true"]),
        ]:
            _one(name, lambda extra=extra: _stage_run(results, ckpt, dpo_model, "llm-jp-3-3.7b" if not args.tiny
                 else "tiny", [*dpo_common, *extra], pairs, "dpo"), "dpo", out["dpo"])  # fmt: skip
    from _backends import save_result

    dest = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT
    if os.environ.get("OUT"):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "launch_gpu.json").write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
    else:
        save_result(ROOT, "launch_gpu" if not args.tiny else "launch_tiny", out)


if __name__ == "__main__":
    main()
