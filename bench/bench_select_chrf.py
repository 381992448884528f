"""chrF selection (lexical MBR, selection.utility: chrf): 10,000 prompts x n=16 synthetic English-like answers
of about 300 characters, pools of 17 (candidates + original).

Baseline in the same run: sacrebleu's sentence chrF pair by pair (the obvious implementation) on a subset,
scaled to the full size. Writes bench/out/select_chrf.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sacrebleu.metrics import CHRF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _backends import save_result  # noqa: E402

from selftrain.select import select  # noqa: E402
from selftrain.select.similarity import chrf_sim  # noqa: E402

WORDS = ("the model answers each prompt several times and the most central answer becomes the training target "
         "while a judge scores quality and safety on held out prompts with reasons first").split()  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--baseline-prompts", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = [[" ".join(rng.choice(WORDS, size=50)) for _ in range(args.n + 1)] for _ in range(args.prompts)]
    valid = np.ones((args.prompts, args.n), bool)

    t = time.perf_counter()
    sim = chrf_sim(rows)
    sel = select(None, valid, "central", sim=sim)
    ours = time.perf_counter() - t

    chrf = CHRF()
    sub = rows[: args.baseline_prompts]
    t = time.perf_counter()
    ref = np.array([[[chrf.sentence_score(h, [r]).score / 100 for r in row] for h in row] for row in sub])
    base = (time.perf_counter() - t) * args.prompts / args.baseline_prompts
    assert np.allclose(ref, sim[: args.baseline_prompts], atol=1e-6), "vectorised chrF differs from sacrebleu"
    save_result(ROOT, "select_chrf", {
        "prompts": args.prompts, "n": args.n, "seconds": round(ours, 1),
        "sacrebleu_pairwise_seconds_scaled": round(base, 1), "speedup_vs_sacrebleu": round(base / ours, 2),
        "targets_chosen": int((sel["target"] >= 0).sum()),
    })  # fmt: skip


if __name__ == "__main__":
    main()
