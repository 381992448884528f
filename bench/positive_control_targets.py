"""The first link of the positive control's mechanism, measured on its training prompts: how often is each arm's
chosen training target right, against one sampled answer and the majority of the n samples?

Selecting the most central of n sampled answers can only sharpen the model if the central answer is right more
often than one sample is. This script scores, for every training prompt of a finished positive-control run, the
n candidates (exact match as stage 06 extracts an answer), the majority answer and each arm's target
(selection.jsonl) against the training split's answers, which `data/positive-control/make.py` recomputes in memory
(`train_answers()`: no arm trains on them, and they are written to no file). Per arm and seed: the share of right
targets, its paired difference from one sampled answer (the mean share of right candidates of the same prompt) with
a bootstrap 95% interval over prompts, and per task kind. Writes bench/out/positive_control_targets.json.

It needs the candidates (data/candidates.jsonl), which are not committed: run the study here first.

    python bench/positive_control_targets.py --study-dir results/positive-control
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "data" / "positive-control"))

from _backends import collect_study, save_result  # noqa: E402
from make import train_answers  # noqa: E402

from selftrain.evaluate.metrics import normalize, prepare_prediction  # noqa: E402
from selftrain.io import read_jsonl  # noqa: E402
from selftrain.schema import split_run_folder  # noqa: E402
from selftrain.stats import paired_bootstrap  # noqa: E402


def majority_right(preds: list[str], gold: str) -> float:
    """1 when the most frequent non-empty answer is right; a tie among the most frequent counts as the share of
    the tied answers that are right (the expected value of breaking it at random)."""
    counts = Counter(p for p in preds if p)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [p for p, c in counts.items() if c == top]
    return sum(p == gold for p in tied) / len(tied)


def score_run(run: Path, gold: dict[str, str]) -> dict[str, np.ndarray | list[str]]:
    """Per prompt of a run: the share of right candidates, whether the majority and the target are right, its kind."""
    cand_path, sel_path = run / "data" / "candidates.jsonl", run / "data" / "selection.jsonl"
    for path in (cand_path, sel_path):
        if not path.is_file():
            raise SystemExit(f"{path}: missing (candidates are not committed: run the study here first)")
    texts: dict[str, dict[int, str]] = {}
    for rec in read_jsonl(cand_path):
        texts.setdefault(rec["prompt_id"], {})[rec["candidate_index"]] = rec["text"]
    sample, major, target, kinds = [], [], [], []
    for line, rec in enumerate(read_jsonl(sel_path), 1):
        pid = rec["id"]
        if pid not in gold or pid not in texts:
            raise SystemExit(f"{sel_path}:{line}: prompt {pid!r}: no such training prompt with candidates")
        want = normalize(gold[pid])
        row = texts[pid]
        preds = [prepare_prediction(row[j]) for j in sorted(row)]
        right = [p == want for p in preds]
        t = rec.get("target")
        if t is None or not 0 <= t < len(preds):  # dropped, or the original (a placeholder here): not a candidate
            raise SystemExit(f"{sel_path}:{line}: target {t!r} is not one of the {len(preds)} candidates")
        sample.append(float(np.mean(right)))
        major.append(majority_right(preds, want))
        target.append(float(right[t]))
        kinds.append(pid.rsplit("-", 1)[0])
    return {"sample": np.array(sample), "majority": np.array(major), "target": np.array(target), "kind": kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study-dir", default="results/positive-control", help="a positive-control study's results folder")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    args = ap.parse_args()
    res = collect_study(args.study_dir)
    gold = train_answers()
    rows = []
    for (model, folder), run in sorted(res.runs.items()):
        method, seed = split_run_folder(folder)
        if method == "baseline":
            continue
        s = score_run(Path(run), gold)
        sample, major, target = s["sample"], s["majority"], s["target"]
        assert isinstance(sample, np.ndarray) and isinstance(major, np.ndarray) and isinstance(target, np.ndarray)
        diff, lo, hi = paired_bootstrap(target - sample, args.boot)
        kind = np.array(s["kind"])
        by_kind = {k: {"prompts": int((kind == k).sum()), "sample": float(sample[kind == k].mean()),
                       "majority": float(major[kind == k].mean()), "target": float(target[kind == k].mean())}
                   for k in sorted(set(s["kind"]))}  # fmt: skip
        rows.append({"model": model, "method": method, "seed": seed, "run": str(run), "prompts": len(sample),
                     "sample": float(sample.mean()), "majority": float(major.mean()), "target": float(target.mean()),
                     "target_minus_sample": diff, "ci_low": lo, "ci_high": hi, "kinds": by_kind})  # fmt: skip
        print(
            f"{model}/{folder:<20} {len(sample)} prompts: one sample right {sample.mean():.3f}, majority "
            f"{major.mean():.3f}, target {target.mean():.3f} (target - sample {diff:+.3f} [{lo:+.3f}, {hi:+.3f}])"
        )
        for k, v in by_kind.items():
            print(
                f"    {k:<12} {v['prompts']:>3}: sample {v['sample']:.3f}  majority {v['majority']:.3f}  "
                f"target {v['target']:.3f}"
            )
    if not rows:
        raise SystemExit(f"{args.study_dir}: no trained arm with a selection (nothing written)")
    out = {"study_dir": args.study_dir, "runs": rows}
    print(f"saved {save_result(ROOT, 'positive_control_targets', out, quiet=True)}")


if __name__ == "__main__":
    main()
