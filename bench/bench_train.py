"""SFT + DPO of the embedded SmolLM2 on the demo's `central` selection (about 100 examples, 1 epoch).

Prints and saves wall time, tokens/s of each stage and the peak RSS of the process (the target on the
2-core CPU machine: at most 6 minutes and 8 GB together). Writes bench/out/train.json.
Generation and embeddings come from the cache when `make demo` ran before (else they are computed).
Extra arguments are params overrides, e.g. `python bench/bench_train.py training.use_lora=true`.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from selftrain import generate, select, train
from selftrain.config import resolve_run_config
from selftrain.runs import create_run


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = resolve_run_config(
        "smollm2-135m",
        "central",
        "params/studies/demo.yaml",
        ["output.results_dir=bench/out/results", "output.checkpoints_dir=bench/out/checkpoints", *sys.argv[1:]],
        check_trainer=True,
    )
    run = create_run(cfg, new_version=True)
    generate.run(run, progress=False)
    select.run(run, progress=False)
    res: dict = {"run_dir": str(run.dir.relative_to(root)), "method": "central", "overrides": sys.argv[1:]}
    t0 = time.perf_counter()
    for kind in ("sft", "dpo"):
        t = time.perf_counter()
        train.train_stage(run, kind, progress=False)
        m = json.loads((run.metrics_dir / f"{kind}.json").read_text())
        res[kind] = {k: m[k] for k in ("examples", "global_steps", "train_loss", "train_seconds", "tokens_per_second")}
        res[kind]["stage_seconds"] = round(time.perf_counter() - t, 1)
        print(kind, res[kind], flush=True)
    res["sft_plus_dpo_seconds"] = round(time.perf_counter() - t0, 1)
    res["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    res["targets"] = {"seconds": 360, "peak_rss_gb": 8}
    print(json.dumps(res, indent=2))
    (root / "bench" / "out" / "train.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
