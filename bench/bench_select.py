"""Selection speed: 100,000 prompts x n=16 synthetic 576-d embeddings (SmolLM2's hidden size).

Baseline in the same run: a per-prompt Python loop (the obvious implementation) on a subset,
scaled to the full size. Target: the vectorised path under 10 s. Writes bench/out/select.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from selftrain.select import select


def loop_select(emb: np.ndarray) -> list[int]:
    """Reference: per prompt, per candidate, mean cosine to the others; argmax."""
    out = []
    for e in emb:
        cands = e[:-1]
        sims = cands @ cands.T
        c = [(sims[j].sum() - sims[j, j]) / (len(cands) - 1) for j in range(len(cands))]
        out.append(int(np.argmax(c)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--baseline-prompts", type=int, default=5_000)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.prompts, args.n + 1, args.dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    valid = np.ones((args.prompts, args.n), bool)
    res = {"prompts": args.prompts, "n": args.n, "dim": args.dim}
    for method in ("central", "drop-low"):
        t = time.perf_counter()
        sel = select(emb, valid, method)
        res[f"{method}_seconds"] = round(time.perf_counter() - t, 3)
    sub = emb[: args.baseline_prompts]
    t = time.perf_counter()
    ref = loop_select(sub)
    loop_s = (time.perf_counter() - t) * args.prompts / args.baseline_prompts
    central = select(sub, valid[: args.baseline_prompts], "central")["target"]
    assert (np.asarray(ref) == central).mean() > 0.999, "vectorised and loop choices disagree"
    res["loop_baseline_seconds_scaled"] = round(loop_s, 3)
    res["speedup_vs_loop"] = round(loop_s / res["central_seconds"], 1)
    res["target_seconds"] = 10
    res["within_target"] = max(res["central_seconds"], res["drop-low_seconds"]) <= 10
    print(json.dumps(res, indent=2))
    out = Path(__file__).parent / "out" / "select.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    del sel


if __name__ == "__main__":
    main()
