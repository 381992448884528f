"""What a CPU training step costs under the demo's settings, arm against arm in one process (issue 30).

TRL's SFTConfig and DPOConfig turn gradient checkpointing on by default: every backward pass first runs the
forward again, which saves activation memory a 135M model on a CPU never needed. The arms train the demo's
`central` selection of SmolLM2-135M for a few steps each, from the same start and data:

- `trl-default`: the stage as TRL's defaults would run it (gradient checkpointing on);
- `no-checkpointing`: `gradient_checkpointing: false` (no difference beyond the spread on AVX2: docs/numbers.md);
- `no-checkpointing-sdpa`: that, with SDPA attention instead of eager.

Per arm: seconds of SFT and DPO training (stage overhead apart; each arm run `--rounds` times, the order reversed
every round, the mean kept), and the per-step losses, which must equal the default arm's (recomputing a
deterministic fp32 forward gives the same numbers), so a saving would cost nothing. Prints and writes
bench/out/train_cpu.json; `--steps N` (default 3) steps of each stage, `--prompts N` (default 24).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _backends import cpu_flags

from selftrain import generate, select, train
from selftrain.config import resolve_run_config
from selftrain.runs import create_run

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "trl-default": ["gradient_checkpointing=true"],
    "no-checkpointing": ["gradient_checkpointing=false"],
    "no-checkpointing-sdpa": ["gradient_checkpointing=false"],
}


def _arm(arm: str, sets: list[str], base: list[str], steps: int) -> dict:
    """One arm's SFT and DPO from the same start and data: seconds and per-step losses."""
    ov = [*base]
    for kind in ("sft", "dpo"):
        ov += [f"training.{kind}.{s}" for s in sets] + [f"training.{kind}.max_steps={steps}"]
        if arm.endswith("sdpa"):
            ov.append(f"training.{kind}_attn_implementation=sdpa")
    cfg = resolve_run_config("smollm2-135m", "central", "params/studies/demo.yaml", ov, check_trainer=True)
    run = create_run(cfg, new_version=True)
    generate.run(run, progress=False)  # cached after the first arm
    select.run(run, progress=False)
    out: dict = {"overrides": ov[len(base) :], "run_dir": str(run.dir.relative_to(ROOT))}
    for kind in ("sft", "dpo"):
        t = time.perf_counter()
        train.train_stage(run, kind, progress=False)
        m = json.loads((run.metrics_dir / f"{kind}.json").read_text())
        log = json.loads((run.metrics_dir / f"{kind}_log.json").read_text())
        out[kind] = {
            "train_seconds": m["train_seconds"],
            "stage_seconds": round(time.perf_counter() - t, 1),
            "losses": [h["loss"] for h in log if "loss" in h],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps of each stage per arm")
    ap.add_argument("--prompts", type=int, default=24, help="demo prompts to generate and select from")
    ap.add_argument("--rounds", type=int, default=2, help="each arm this many times, the order reversed every round")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="which arms (trl-default always)")
    args = ap.parse_args()
    base = [
        "output.results_dir=bench/out/results",
        "output.checkpoints_dir=bench/out/checkpoints",
        f"prompts.limit={args.prompts}",
    ]
    res: dict = {"cpu": cpu_flags(), "steps": args.steps, "prompts": args.prompts, "rounds": args.rounds, "arms": {}}
    # The first training of a process pays one-time costs (allocator, thread pools, page cache): alternating the
    # order (A B C, C B A, ...) spreads them over the arms instead of charging the first.
    names = ["trl-default", *(a for a in args.arms if a != "trl-default")]
    for r in range(args.rounds):
        for arm in names if r % 2 == 0 else names[::-1]:
            out = _arm(arm, ARMS[arm], base, args.steps)
            res["arms"].setdefault(arm, {"runs": []})["runs"].append(out)
            print(f"round {r + 1}", arm, {k: out[k]["train_seconds"] for k in ("sft", "dpo")}, flush=True)
    ref = res["arms"]["trl-default"]
    for arm in res["arms"].values():
        for k in ("sft", "dpo"):
            arm[f"{k}_mean_seconds"] = round(sum(o[k]["train_seconds"] for o in arm["runs"]) / len(arm["runs"]), 2)
    for arm in res["arms"].values():
        arm["speedup"] = {k: round(ref[f"{k}_mean_seconds"] / arm[f"{k}_mean_seconds"], 3) for k in ("sft", "dpo")}
        first, other = ref["runs"][0], arm["runs"][0]
        arm["losses_equal_default"] = all(other[k]["losses"] == first[k]["losses"] for k in ("sft", "dpo"))
        arm["largest_loss_difference"] = max(
            abs(a - b) for k in ("sft", "dpo") for a, b in zip(other[k]["losses"], first[k]["losses"], strict=True)
        )
    keys = ("sft_mean_seconds", "dpo_mean_seconds", "speedup", "losses_equal_default", "largest_loss_difference")
    print(json.dumps({a: {k: o[k] for k in keys} for a, o in res["arms"].items()}, indent=2))
    (ROOT / "bench" / "out" / "train_cpu.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
