"""Stage 05 on the demo: SmolLM2 answers the English judge sets and judges them itself (a mechanics demo,
not a meaningful judge). Prints and saves wall time and the stage's own timings to bench/out/judge_demo.json
(target on the 2-core CPU machine: at most 5 minutes). Uses the `baseline` method (M0: no training needed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from selftrain import judge
from selftrain.config import resolve_run_config
from selftrain.runs import create_run


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    # A cold judge cache (every judge call made), but the converted model of the usual cache.
    os.environ.setdefault("SELFTRAIN_MODELS_DIR", str(root / ".cache" / "selftrain" / "models"))
    shutil.rmtree(root / "bench" / "out" / "cache", ignore_errors=True)
    cfg = resolve_run_config(
        "smollm2-135m",
        "baseline",
        "params/studies/demo.yaml",
        ["output.results_dir=bench/out/results", "output.cache_dir=bench/out/cache", "stages=[judge]"],
    )
    run = create_run(cfg, new_version=True)
    t0 = time.perf_counter()
    judge.run(run, progress=False)
    seconds = time.perf_counter() - t0
    m = json.loads((run.metrics_dir / "judge.json").read_text())
    res = {
        "run_dir": str(run.dir.relative_to(root)),
        "items": {k: m[k]["items"] for k in judge.SETS},
        "scoring": m["scoring"],
        "answers_seconds": m["answers"]["seconds"],
        "answers_tokens_per_second": m["answers"]["tokens_per_second"],
        "answers_backend": m["answers"]["backend"],
        "judge_seconds": m["judge_seconds"],
        "stage_seconds": round(seconds, 1),
        "quality_overall_mean": m["quality"]["criteria"]["overall"]["mean"],
        "safety_mean": m["safety"]["criteria"]["safety"]["mean"],
        "target_seconds": 300,
    }
    print(json.dumps(res, indent=2))
    (root / "bench" / "out" / "judge_demo.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
