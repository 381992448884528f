"""The spread of the rounds study's diversity monitors: is a round's shift more than prompt-to-prompt noise?

Stage 02 records each round's monitors as means over the prompts' pools (select.json `drift`); this script computes
the same monitors per pool from a finished rounds study's candidates (data/candidates.jsonl, kept in the run
folders of a study run here, not committed) and, for every chain and round k, the paired difference M_k - M_0
over the same prompts with its 95% bootstrap interval (selftrain.stats.paired_bootstrap). M_k's candidates are those
of round k+1's folder (round 1's for M_0, the closing generation's for the last model), as in stage 07.

Each per-pool mean is checked against the stage's own select.json value (the script fails when they disagree), so
the intervals are about exactly the numbers in tables/rounds.*. Writes bench/out/rounds_spread.json.

    python bench/rounds_spread.py --study-dir results/rounds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _backends import collect_study, save_result  # noqa: E402

from selftrain import drift  # noqa: E402
from selftrain.config import EmbedderConfig  # noqa: E402
from selftrain.figures.rounds import round_chains  # noqa: E402
from selftrain.io import read_json, read_jsonl  # noqa: E402
from selftrain.select.similarity import chrf_sim, cosine_sim, embedder_embeddings  # noqa: E402
from selftrain.stats import paired_bootstrap  # noqa: E402

MONITORS = ("distinct_1", "distinct_2", "pool_cosine", "self_chrf")


def pools(run: Path) -> tuple[list[str], list[list[str]]]:
    """(prompt ids, texts per prompt in candidate order) of a run's candidates."""
    path = run / "data" / "candidates.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (candidates are not committed: run the study here first)")
    by_prompt: dict[str, dict[int, str]] = {}
    for rec in read_jsonl(path):
        by_prompt.setdefault(rec["prompt_id"], {})[rec["candidate_index"]] = rec["text"]
    ids = list(by_prompt)
    return ids, [[row[j] for j in sorted(row)] for row in by_prompt.values()]


def per_pool(texts: list[list[str]], cache_dir: str) -> dict[str, np.ndarray]:
    """Each monitor per pool (NaN where a pool has fewer than two non-empty candidates), as stage 02 computes it
    (`selftrain.drift.pool_values`, self-chrF on select.json's 0-100 scale)."""
    valid = np.array([[bool(t.strip()) for t in row] for row in texts])
    emb, _ = embedder_embeddings(texts, EmbedderConfig(), cache_dir)
    values = drift.pool_values(texts, valid, cosine_sim(emb), chrf_sim(texts))
    return {**values, "self_chrf": values["self_chrf"] * 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study-dir", default="results/rounds", help="a rounds study's results folder")
    ap.add_argument("--cache-dir", default=".cache/selftrain", help="where the embedder's cache lives")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    args = ap.parse_args()
    res = collect_study(args.study_dir)
    chains = round_chains({**res.runs, **res.closing})
    if not chains:
        raise SystemExit(f"{args.study_dir}: no chain of rounds (a study with study.rounds > 1; nothing written)")
    out: dict[str, list[dict]] = {}
    for (model, method, rest, seed), rounds in sorted(chains.items()):
        chain = "/".join(x for x in (model, method, rest, None if seed is None else f"seed{seed}") if x)
        per_model: dict[int, dict[str, np.ndarray]] = {}
        ids0: list[str] | None = None
        for k in sorted(rounds):
            run = rounds[k]
            ids, texts = pools(run)
            if ids0 is None:
                ids0 = ids
            elif ids != ids0:
                raise SystemExit(f"{run}: other prompts than round 1 (rounds.prompts disjoint is not paired)")
            values = per_pool(texts, args.cache_dir)
            recorded = read_json(run / "metrics" / "select.json")["drift"]
            for name in MONITORS:
                mean = float(np.nanmean(values[name]))
                if abs(mean - recorded[name]) > 1e-3 * max(1.0, abs(recorded[name])):
                    raise SystemExit(f"{run}: {name} per pool averages {mean:.5f}, select.json says {recorded[name]}")
            per_model[k - 1] = values  # round k's candidates are M_{k-1}'s
        rows = []
        for k in sorted(per_model)[1:]:
            for name in MONITORS:
                d = per_model[k][name] - per_model[0][name]
                d = d[np.isfinite(d)]
                mean, lo, hi = paired_bootstrap(d, args.boot)
                rows.append({"model_round": k, "monitor": name, "m0": float(np.nanmean(per_model[0][name])),
                             "mk": float(np.nanmean(per_model[k][name])), "diff": mean, "ci_low": lo,
                             "ci_high": hi, "pools": int(len(d))})  # fmt: skip
                print(f"{chain} M{k}-M0 {name:>12}: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] over {len(d)} pools")
        out[chain] = rows
    print(f"saved {save_result(ROOT, 'rounds_spread', {'study_dir': args.study_dir, 'chains': out}, quiet=True)}")


if __name__ == "__main__":
    main()
