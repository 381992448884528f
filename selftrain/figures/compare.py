"""Stage 07, compare: a fresh run of a study set beside a reference (the committed demo, a colleague's results),
per run, metric and seed, with a verdict on whether each difference lies inside the spread the reference's
replicate seeds show.

Which runs: in the reference folder, the *first* complete version of each run folder (on a fresh clone, the
committed one); in the study's results folder, the *newest* complete version. When both folders are the same
and a run has a single version, there is nothing fresh to compare for it.

The band: the reference's replicates (the plain run folder and its ``<method>.seed<N>`` folders) give a standard
deviation ``sd`` per (model, method, metric) over seeds. A fresh value and a reference value are two draws of
that spread, so their difference has a standard deviation of ``sqrt(2) * sd``; a difference counts as inside
when ``|difference| <= 2 * sqrt(2) * sd`` (about 95% under normality). With fewer than two reference seeds
there is no spread to judge by: the verdict says so. Two or three seeds estimate ``sd`` roughly; read the
verdicts as a screen, not a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from selftrain.figures.collect import _num, _row, _seed_of
from selftrain.figures.tables import write_table
from selftrain.io import DataError, read_json
from selftrain.paths import resolve_path, study_folder
from selftrain.report import hardware_label
from selftrain.schema import QUALITY, VERSION, run_state, split_run_folder

BAND = 2 * math.sqrt(2)  # in units of the reference's across-seed sd (see the module docstring)
COLUMNS = ["model", "method", "seed", "metric", "reference", "fresh", "difference", "seed_sd", "seeds", "band",
           "verdict", "reference_run", "fresh_run", "same_hardware", "dtype_changes"]  # fmt: skip


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per (run, metric), COLUMNS
    notes: list[str]  # runs that could not be compared, and why
    paths: list[Path]  # the written tables/compare.{csv,md,tex}

    def counts(self) -> dict[str, int]:
        return self.table["verdict"].value_counts().to_dict() if len(self.table) else {}

    def summary(self) -> str:
        c = self.counts()
        judged = c.get("inside", 0) + c.get("outside", 0)
        head = f"compare: {c.get('inside', 0)} of {judged} differences inside the reference's across-seed band"
        if not len(self.table):
            head = "compare: no fresh run to set beside the reference yet (a run folder needs a newer version)"
        if c.get("no spread"):
            head += f"; {c['no spread']} without a spread (the reference has one seed)"
        lines = [head]
        out = self.table[self.table["verdict"] == "outside"]
        for r in out.itertuples(index=False):
            ran = f" [ran {r.dtype_changes}]" if r.dtype_changes else ""
            lines.append(
                f"  outside: {r.model}/{r.method} seed {r.seed} {r.metric}: {r.reference:.3f} -> {r.fresh:.3f} "
                f"(difference {r.difference:+.3f}, band +-{r.band:.3f}){ran}"
            )
        if len(self.table) and not self.table["same_hardware"].all():
            lines.append("  note: fresh and reference runs come from different hardware (bf16 numerics differ)")
        changed = self.table[self.table["dtype_changes"].astype(bool)] if len(self.table) else self.table
        if len(changed):
            runs = changed.drop_duplicates("fresh_run")
            example = runs["dtype_changes"].iloc[0]
            lines.append(
                f"  note: {len(runs)} fresh run(s) ran another dtype than their reference (e.g. {example}; `dtype: "
                "auto` runs float32 on a CPU without native bf16): a difference outside the band there may be the "
                "numerics, not the code"
            )
        alone = [n for n in self.notes if n.endswith("(nothing fresh to compare)")]
        if len(alone) > 3:  # the reference's replicate folders, typically: one line, not one per folder
            lines.append(f"  {len(alone)} run folders have only their reference version (nothing fresh to compare)")
        lines += [f"  {n}" for n in self.notes if n not in alone or len(alone) <= 3]
        return "\n".join(lines)


def _versions(folder: Path) -> list[Path]:
    vs = [p for p in folder.iterdir() if p.is_dir() and VERSION.match(p.name)] if folder.is_dir() else []
    return sorted((v for v in vs if run_state(v) == "complete"), key=lambda p: int(p.name[1:]))


def _dtypes(run_dir: Path) -> dict[str, str]:
    """The dtype each stage of a run actually ran in, as its manifest records it."""
    try:
        stages = read_json(run_dir / "manifest.json").get("stages") or {}
    except (OSError, DataError, AttributeError):
        return {}
    return {s: v["numerics"]["dtype"] for s, v in stages.items()
            if isinstance(v, dict) and isinstance(v.get("numerics"), dict) and v["numerics"].get("dtype")}  # fmt: skip


def dtype_changes(reference: Path, fresh: Path) -> str:
    """'stage ref-dtype -> fresh-dtype' for every stage whose dtype differs between two runs ('' when none)."""
    a, b = _dtypes(reference), _dtypes(fresh)
    return "; ".join(f"{s} {a[s]} -> {b[s]}" for s in a if s in b and a[s] != b[s])


def _metrics(row: dict) -> dict[str, float]:
    names = ["overall", *(c for c in QUALITY if c != "overall"), "safety", "violation_rate", "acceptable_rate",
             "eval_avg", *sorted(k for k in row if k.startswith("eval_") and k != "eval_avg")]  # fmt: skip
    return {k: _num(row.get(k)) for k in names}


def compare(study: str, results_dir: str | Path = "results", reference: str | Path | None = None) -> Comparison:
    """Fresh runs of `study` under `results_dir` beside the reference folder (default: the same study folder).
    Writes ``tables/compare.{csv,md,tex}`` into the study folder when anything was compared; returns the table,
    notes and paths."""
    fresh_dir = study_folder(results_dir, study)  # a folder name where results may be written: tables go there
    ref_dir = resolve_path(reference) if reference else fresh_dir
    for d, what in ((fresh_dir, "study"), (ref_dir, "reference")):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such {what} folder")
    ref_runs: dict[tuple[str, str], Path] = {}
    for folder in sorted(p for p in ref_dir.glob("*/*") if p.is_dir()):
        vs = _versions(folder)
        if vs:
            ref_runs[(folder.parent.name, folder.name)] = vs[0]
    # The spread: per (model, method), the reference value of every seed's run.
    spread: dict[tuple[str, str], list[dict[str, float]]] = {}
    for (model, name), d in ref_runs.items():
        method = split_run_folder(name)[0]
        spread.setdefault((model, method), []).append(_metrics(_row(model, method, d, "")[0]))
    rows, notes = [], []
    for folder in sorted(p for p in fresh_dir.glob("*/*") if p.is_dir()):
        model, name = folder.parent.name, folder.name
        method = split_run_folder(name)[0]
        vs = _versions(folder)
        ref = ref_runs.get((model, name))
        if not vs:
            notes.append(f"{model}/{name}: no complete fresh run")
            continue
        if ref is None:
            notes.append(f"{model}/{name}: not in the reference {ref_dir}")
            continue
        fresh = vs[-1]
        if fresh.resolve() == ref.resolve():
            notes.append(f"{model}/{name}: only {ref.name}, the reference itself (nothing fresh to compare)")
            continue
        a, b = _metrics(_row(model, method, ref, "")[0]), _metrics(_row(model, method, fresh, "")[0])
        reps = spread.get((model, method), [])
        same_hw = hardware_label(ref) == hardware_label(fresh)
        changes = dtype_changes(ref, fresh)
        for metric, rv in a.items():
            fv = b.get(metric, math.nan)
            if math.isnan(rv) and math.isnan(fv):
                continue
            vals = [x for r in reps if not math.isnan(x := r.get(metric, math.nan))]
            sd = float(np.std(vals, ddof=1)) if len(vals) >= 2 else math.nan
            diff = fv - rv
            band = BAND * sd
            if math.isnan(diff):
                verdict = "missing"
            elif math.isnan(sd):
                verdict = "no spread"
            else:
                verdict = "inside" if abs(diff) <= band + 1e-12 else "outside"
            rows.append({
                "model": model, "method": method, "seed": _seed_of(fresh, name), "metric": metric,
                "reference": rv, "fresh": fv, "difference": diff, "seed_sd": sd, "seeds": len(vals), "band": band,
                "verdict": verdict, "reference_run": str(ref.relative_to(ref_dir)),
                "fresh_run": str(fresh.relative_to(fresh_dir)), "same_hardware": same_hw, "dtype_changes": changes,
            })  # fmt: skip
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    paths = []  # nothing compared (a reference alone): no empty tables in the study folder
    if len(table):
        paths = write_table(table, fresh_dir / "tables" / "compare", caption=f"Study {study}: fresh runs vs reference")
    return Comparison(table, notes, paths)
