"""Stage 07, collect: read every (model, method) run of a study into tables; nothing is written.

For every (model, method) of ``results/<study>/`` one run version is chosen: the newest complete one, or the
version pinned in ``params/figures/<study>.yaml``::

    figures:
      pins:
        smollm2-135m/central: v001

so a figure never silently changes source. A run without a complete version, a stage that is not done or
a metrics file that is not there is listed in ``missing`` (and in ``tables/missing.md``) and leaves
blanks; it never stops the figures. Outputs: ``results/<study>/figures/*.png|pdf`` and
``results/<study>/tables/*.csv|md|tex``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from selftrain.config import ConfigError, load_figures_spec, load_study
from selftrain.io import DataError, read_json
from selftrain.paths import project_root, resolve_path
from selftrain.report import hardware_label
from selftrain.schema import (
    CONTROLS,
    DECISIONS,
    METHODS,
    QUALITY,
    STAGE_TABLE,
    VERSION,
    folder_sweep,
    judge_rows,
    metrics_or_empty,
    planned_stages,
    read_log,
    run_state,
    split_round,
    split_run_folder,
)

# The main table: these columns, with eval_<category> columns between eval_avg and sft_examples.
MAIN_HEAD = [
    "model", "method", "version", "state",
    "overall", "overall_ci_low", "overall_ci_high", *(c for c in QUALITY if c != "overall"),
    "safety", "safety_ci_low", "safety_ci_high", "violation_rate", "acceptable_rate", "eval_avg",
]  # fmt: skip
# seeds: replicate runs behind the row (study.seeds); *_seed_sd: their standard deviation (ddof 1) of a
# headline score, beside the bootstrap interval over items; hardware: where the runs ran.
MAIN_TAIL = [
    "sft_examples", "dpo_pairs", "sweep", "seeds", "seed_sd_overall", "seed_sd_safety", "seed_sd_eval_avg", "hardware",
]  # fmt: skip
SEED_SD = {"seed_sd_overall": "overall", "seed_sd_safety": "safety", "seed_sd_eval_avg": "eval_avg"}
JUDGE_COLUMNS = ["model", "method", "set", "criterion", "mean", "ci_low", "ci_high", "n", "sweep", "seeds", "seed_sd"]
SELECTION_COLUMNS = [
    "model", "method", "version", "prompts", *DECISIONS, "dropped_share", "replaced_share",
    "original_low_share", "original_rank_mean", "pool_size", "sft_examples", "dpo_pairs",
]  # fmt: skip
TEXT_COLUMNS = {"model", "method", "version", "state", "set", "criterion", "what", "hardware", "metric", "sweep",
                "versus"}  # fmt: skip
COUNT_COLUMNS = {"n", "prompts", *DECISIONS, "pool_size", "sft_examples", "dpo_pairs", "seeds", "seed", "items",
                 "family", "items_needed", "seeds_needed"} | {
    "round"  # the rounds table (figures/rounds.py)
}  # fmt: skip


@dataclass
class StudyResults:
    """What `collect` read and `make_figures` wrote for one study."""

    study: str
    study_dir: Path
    models: list[str]
    methods: list[str]
    table: pd.DataFrame  # the main results table: one row per (model, method), the mean over its seeds
    judge: pd.DataFrame  # long: model, method, set, criterion, mean, ci_low, ci_high, n, seeds, seed_sd
    selection: pd.DataFrame  # one row per retrained (model, method): decision counts and shares
    logs: pd.DataFrame  # long: model, method, seed, kind (sft|dpo), step, loss, rewards/...
    runs: dict[tuple[str, str], Path]  # the chosen version folder of each (model, run folder)
    missing: list[dict[str, str]]  # model, method, version, what
    spec_path: Path | None = None
    pins: dict[tuple[str, str], str] = field(default_factory=dict)
    replicates: pd.DataFrame = field(default_factory=pd.DataFrame)  # the main table, one row per seed's run
    judge_replicates: pd.DataFrame = field(default_factory=pd.DataFrame)  # the judge table, one row per seed
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)  # method - baseline on shared items (paired.py)
    controls: pd.DataFrame = field(default_factory=pd.DataFrame)  # control arm - central on shared items
    lengths: pd.DataFrame = field(default_factory=pd.DataFrame)  # answer length and length-controlled quality
    # A study with rounds: the closing generations (<method>@round=<R+1>: stages 01-02 of the last model), kept out
    # of the results tables, and the rounds table (figures/rounds.py).
    closing: dict[tuple[str, str], Path] = field(default_factory=dict)
    rounds: pd.DataFrame = field(default_factory=pd.DataFrame)
    power: pd.DataFrame = field(default_factory=pd.DataFrame)  # each paired comparison's power (power.py)
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    index: Path | None = None  # the refreshed study README

    def missing_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.missing, columns=["model", "method", "version", "what"])

    @property
    def judged(self) -> bool:
        """Whether any run of the study has judge scores: an eval-only study (the positive control) draws no judge
        or length figure, rather than panels that all say "no results"."""
        return bool(len(self.judge) or len(self.judge_replicates))


# ------------------------------------------------------------------------------------------- spec


def default_spec_path(study: str) -> Path | None:
    p = project_root() / "params" / "figures" / f"{study}.yaml"
    return p if p.is_file() else None


def _study_grid(study: str, study_file: str | Path | None) -> tuple[list[str], list[str]]:
    """The study YAML's models (in its order: small to large in this project) and methods, if it is known."""
    path = Path(study_file) if study_file else project_root() / "params" / "studies" / f"{study}.yaml"
    if not path.is_file():
        return [], []
    st, _, _ = load_study(path)
    return list(st.models), list(st.methods)


def _method_key(m: str) -> tuple[int, str]:
    order = (*METHODS, *CONTROLS)
    return (order.index(m), "") if m in order else (len(order), m)


# ------------------------------------------------------------------------------------------- collect


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path) if path.is_file() else None
    except DataError:
        return None


def _pool_size(d: Path) -> int | None:
    """Candidates + original: the pool the original is ranked in (selection.n, the n-prefix, where it is set)."""
    p = d / "params.resolved.yaml"
    try:
        cfg = (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}
    except yaml.YAMLError:
        return None
    n = (cfg.get("selection") or {}).get("n") or (cfg.get("generation") or {}).get("n")
    return n + 1 if isinstance(n, int) else None


def _choose(
    study_dir: Path, pins: dict[tuple[str, str], str], spec_path: Path | None
) -> tuple[dict[tuple[str, str], Path], list[dict[str, str]]]:
    chosen, notes = {}, []
    found = {(p.parent.parent.name, p.parent.name) for p in study_dir.glob("*/*/v*") if VERSION.match(p.name)}
    for key, version in pins.items():
        if not (study_dir / key[0] / key[1] / version / "manifest.json").is_file():
            have = sorted(p.name for p in (study_dir / key[0] / key[1]).glob("v*") if (p / "manifest.json").is_file())
            raise ConfigError(
                f"{spec_path}: key 'figures.pins.{key[0]}/{key[1]}': version {version} not found under "
                f"{study_dir / key[0] / key[1]} (have: {', '.join(have) or 'none'})"
            )
    for model, method in sorted(found):
        if (model, method) in pins:
            chosen[(model, method)] = study_dir / model / method / pins[(model, method)]
            continue
        versions = sorted(
            (p for p in (study_dir / model / method).iterdir() if VERSION.match(p.name) and p.is_dir()),
            key=lambda p: int(p.name[1:]),
        )
        versions = [v for v in versions if (v / "manifest.json").is_file()]
        if not versions:
            notes.append({"model": model, "method": method, "version": "-", "what": "no run folder with a manifest"})
            continue
        complete = [v for v in versions if run_state(v) == "complete"]
        # No complete version: show the newest one's partial results (its missing stages get reported).
        chosen[(model, method)] = complete[-1] if complete else versions[-1]
    return chosen, notes


def _missing_of(model: str, method: str, d: Path) -> list[dict[str, str]]:
    """Stages not done and metrics files absent in one run folder (skipped stages are not missing)."""
    out = []
    manifest = _read(d / "manifest.json") or {}
    stages = manifest.get("stages", {})
    for s in planned_stages(d):
        rec = stages.get(s, {})
        if not (d / "stages" / s / "_SUCCESS").is_file():
            status = rec.get("status", "not run")
            err = f": {str(rec['error']).splitlines()[0][:200]}" if rec.get("error") else ""
            out.append({"model": model, "method": method, "version": d.name, "what": f"stage {s} {status}{err}"})
            continue
        if (rec.get("metrics") or {}).get("skipped"):
            continue
        for f in STAGE_TABLE[s].metrics if s != "generate" else ():  # no figure reads generate's metrics
            p = d / "metrics" / f
            if f.endswith(".json") and _read(p) is None:
                why = "unreadable" if p.is_file() else "missing"
                out.append({"model": model, "method": method, "version": d.name, "what": f"metrics/{f} {why}"})
    return out


def _num(x: Any) -> float:
    """A number as float (numpy scalars included), anything else (None, text, bool) as NaN."""
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_) else math.nan


def _row(model: str, method: str, d: Path | None, state: str) -> tuple[dict, list[dict], dict | None, list[dict]]:
    """The main-table row, judge rows, selection row and log rows of one run folder (None: no folder)."""
    row: dict[str, Any] = {"model": model, "method": method, "version": d.name if d else "", "state": state}
    if d is None:
        return row, [], None, []
    metric = {k: metrics_or_empty(d, k) for k in ("select", "judge", "eval")}
    judge = [{"model": model, "method": method, **_ci(r)} for r in judge_rows(metric["judge"])]
    crit = {(r["set"], r["criterion"]): r for r in judge}
    q = crit.get(("quality", "overall"), {})
    row.update({"overall": q.get("mean", math.nan), "overall_ci_low": q.get("ci_low", math.nan)})
    row["overall_ci_high"] = q.get("ci_high", math.nan)
    for c in QUALITY:
        if c != "overall":
            row[c] = crit.get(("quality", c), {}).get("mean", math.nan)
    s = crit.get(("safety", "safety"), {})
    row.update({"safety": s.get("mean", math.nan), "safety_ci_low": s.get("ci_low", math.nan)})
    row["safety_ci_high"] = s.get("ci_high", math.nan)
    for name in ("violation_rate", "acceptable_rate"):
        row[name] = crit.get(("safety", name), {}).get("mean", math.nan)
    ev = metric["eval"]
    row["eval_avg"] = _num(ev.get("avg"))
    for cat, v in (ev.get("categories") or {}).items():
        # eval.json holds {cat: {"score": ...}}; a bare number is accepted too.
        row[f"eval_{cat}"] = _num(v.get("score") if isinstance(v, dict) else v)
    if isinstance(ev.get("sampled"), dict):  # eval.sampled.k > 0: exact match over items, greedy and sampled
        row["eval_greedy_exact"] = _num(ev["sampled"].get("greedy_exact"))
        row["eval_sampled_exact"] = _num(ev["sampled"].get("exact"))
    sel = metric["select"]
    row["sft_examples"] = _num(sel.get("sft_examples"))
    row["dpo_pairs"] = _num(sel.get("dpo_pairs"))
    sel_row = None
    if sel:
        dec = sel.get("decisions", {})
        n = _num(sel.get("prompts"))
        sel_row = {"model": model, "method": method, "version": d.name, "prompts": n}
        sel_row.update({k: _num(dec.get(k)) for k in DECISIONS})
        sel_row["dropped_share"] = _num(dec.get("dropped")) / n if n else math.nan
        # "Replaced by the original": the fallback of fallback-original, or every prompt of `original`.
        sel_row["replaced_share"] = (_num(dec.get("fallback", 0)) + _num(dec.get("original", 0))) / n if n else math.nan
        sel_row["original_rank_mean"] = _num(sel.get("original_rank_mean"))
        sel_row["pool_size"] = _pool_size(d) or math.nan
        sel_row["original_low_share"] = _num(sel.get("original_in_low_part")) / n if n else math.nan
        sel_row["sft_examples"] = row["sft_examples"]
        sel_row["dpo_pairs"] = row["dpo_pairs"]
    logs = []
    for kind in ("sft", "dpo"):
        try:
            hist = read_log(d, kind)
        except DataError:
            hist = []  # reported by _missing_of
        for h in hist:
            if "loss" in h:  # the last row is the Trainer's summary (train_loss only)
                logs.append({"model": model, "method": method, "kind": kind, **h})
    return row, judge, sel_row, logs


def _ci(r: dict[str, Any]) -> dict[str, Any]:
    """A schema judge row with every number as float (NaN where absent), as the tables and plots expect."""
    return {**r, **{k: _num(r.get(k)) for k in ("mean", "ci_low", "ci_high", "n")}}


def collect(
    study_dir: str | Path, spec_path: str | Path | None = None, study_file: str | Path | None = None
) -> StudyResults:
    """Read every (model, method) of a study folder into tables; nothing is written.

    spec_path: the figures spec (default params/figures/<study>.yaml if it exists); study_file: the study
    YAML giving the model order and the grid (default params/studies/<study>.yaml if it exists; without
    one, models are sorted by name and only the runs found are shown).
    """
    study_dir = resolve_path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"{study_dir}: no such study folder (run the study first: python -m selftrain run)")
    study = study_dir.name
    spec = Path(spec_path) if spec_path else default_spec_path(study)
    pins = load_figures_spec(spec) if spec else {}
    chosen, missing = _choose(study_dir, pins, spec)
    closing = {key: d for key, d in chosen.items() if _closing(d)}
    chosen = {key: d for key, d in chosen.items() if key not in closing}
    grid_models, grid_methods = _study_grid(study, study_file)
    seen = {(m, split_run_folder(f)[0]) for m, f in chosen} | {(r["model"], split_run_folder(r["method"])[0])
                                                                for r in missing}  # fmt: skip
    models = grid_models + sorted({m for m, _ in seen} - set(grid_models))
    methods = sorted({m for _, m in seen} | set(grid_methods), key=_method_key)

    rows, judge_all, sel_rows, log_rows, rep_rows, rep_judge = [], [], [], [], [], []
    for model in models:
        for method in methods:
            # The plain <method> folder first, then the replicate folders by seed.
            folders = sorted(
                (f for m, f in chosen if m == model and split_run_folder(f)[0] == method),
                key=lambda f: (split_run_folder(f)[1] is not None, split_run_folder(f)[1] or 0),
            )
            if not folders:
                in_grid = model in grid_models and method in grid_methods
                if in_grid and (model, method) not in seen:
                    missing.append({"model": model, "method": method, "version": "-", "what": "no run folder"})
                if in_grid or (model, method) in seen:
                    rows.append(_row(model, method, None, "no run")[0])  # a blank row keeps the grid visible
                continue
            groups: dict[str, list[str]] = {}  # sweep point -> its seeds' folders (a study without sweep: one)
            for f in folders:
                groups.setdefault(folder_sweep(f), []).append(f)
            for label in sorted(groups, key=_sweep_key):
                per = []
                for f in groups[label]:
                    d = chosen[(model, f)]
                    run_missing = _missing_of(model, f, d)
                    missing += run_missing
                    not_done = [r["what"].split()[1] for r in run_missing if r["what"].startswith("stage ")]
                    state = "incomplete: " + ", ".join(not_done) if not_done else "complete"
                    row, jr, sr, lr = _row(model, method, d, state)
                    seed = _seed_of(d, f)
                    row.update({"seeds": 1, "hardware": hardware_label(d), "sweep": label})
                    rep_rows.append({**row, "seed": seed})
                    rep_judge += [{**r, "seed": seed, "sweep": label} for r in jr]
                    log_rows += [{**r, "seed": seed, "sweep": label} for r in lr]
                    per.append((f, row, jr, sr))
                row, jr, sr = _combine(per)
                row["sweep"] = label
                rows.append(row)
                judge_all += [{**r, "sweep": label} for r in jr]
                if sr is not None:
                    sel_rows.append({**sr, "sweep": label})
    cats = list(dict.fromkeys(c for r in rows for c in r if c.startswith("eval_") and c != "eval_avg"))
    sd_cats = [f"seed_sd_{c}" for c in cats] if any(r.get("seeds", 1) > 1 for r in rows) else []
    missing.sort(key=lambda r: (_index(models, r["model"]), _method_key(r["method"])))  # stable: stage order kept
    return StudyResults(
        study=study,
        study_dir=study_dir,
        models=models,
        methods=methods,
        table=pd.DataFrame(rows).reindex(columns=[*MAIN_HEAD, *cats, *MAIN_TAIL, *sd_cats]),
        judge=pd.DataFrame(judge_all).reindex(columns=JUDGE_COLUMNS),
        selection=pd.DataFrame(sel_rows).reindex(columns=with_sweep(SELECTION_COLUMNS, sel_rows)),
        logs=pd.DataFrame(log_rows),
        runs=chosen,
        missing=missing,
        spec_path=spec,
        pins=pins,
        closing=closing,
        replicates=pd.DataFrame(rep_rows).reindex(columns=["seed", *MAIN_HEAD, *cats, *MAIN_TAIL]),
        judge_replicates=pd.DataFrame(rep_judge).reindex(columns=["seed", *JUDGE_COLUMNS[:-2]]),
    )


def _closing(d: Path) -> bool:
    """The closing generation of a chain of rounds: its params' round.index is past round.of."""
    if "@" not in d.parent.name:
        return False
    try:
        r = (yaml.safe_load((d / "params.resolved.yaml").read_text()) or {}).get("round") or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(r.get("index"), int) and isinstance(r.get("of"), int) and r["index"] > r["of"]


def sweep_value(v: str) -> float | str:
    """A sweep value from a folder label: a number where it reads as one, else the text."""
    try:
        return float(v)
    except ValueError:
        return v


def _sweep_key(label: str) -> tuple:
    """The plain run first, then sweep points by their values (numbers numerically, before text)."""
    vals = [sweep_value(p.split("=", 1)[-1]) for p in label.split("@")]
    return (bool(label), *((isinstance(v, str), v) for v in vals))


def with_sweep(columns: list[str], rows: list[dict]) -> list[str]:
    """`columns` with a `sweep` column after `method` when any row is a sweep point (tables of studies without
    sweep axes keep their shape)."""
    if not any(r.get("sweep") for r in rows):
        return [c for c in columns if c != "sweep"]
    rest = [c for c in columns if c != "sweep"]
    at = rest.index("method") + 1
    return [*rest[:at], "sweep", *rest[at:]]


def point_runs(res: StudyResults, model: str, method: str) -> list[tuple[str, Path]]:
    """(sweep label, run folder) of a (model, method): its plain run, or each sweep point's; replicate-seed
    folders are left out (the per-item tables pair one run per point)."""
    out = []
    for (m, f), d in res.runs.items():
        if m == model and split_run_folder(f) == (method, None):
            out.append((folder_sweep(f), d))
    return sorted(out, key=lambda x: _sweep_key(x[0]))


def plain_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the bar figures show: the runs without a sweep point, or, in a study that only sweeps, its first
    point (the sweep figure shows the others); of a chain of rounds, its last round (figures/rounds shows all)."""
    if "sweep" not in df or not len(df):
        return df
    split = df["sweep"].fillna("").map(split_round)
    label = split.map(lambda x: x[1])  # a study with rounds: each method's last round stands for it
    index = split.map(lambda x: x[0] or 0)
    last = index == index.groupby([df["model"], df["method"], label]).transform("max")
    first = "" if (label == "").any() else sorted(set(label), key=_sweep_key)[0]
    return df[(label == first) & last]


def _seed_of(d: Path, folder: str) -> int | None:
    """A run's seed: the replicate seed of its folder, else the params' own `seed`."""
    rep = split_run_folder(folder)[1]
    if rep is not None:
        return rep
    try:
        seed = (yaml.safe_load((d / "params.resolved.yaml").read_text()) or {}).get("seed")
    except (OSError, yaml.YAMLError):
        return None
    return seed if isinstance(seed, int) else None


def _sd(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.std(v, ddof=1)) if len(v) >= 2 else math.nan


def _mean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def _combine(per: list[tuple[str, dict, list[dict], dict | None]]) -> tuple[dict, list[dict], dict | None]:
    """One (model, method)'s seeds as one row: every number the mean over seeds; the judge's interval the mean
    of the seeds' bootstrap bounds (an item-level interval); *_seed_sd and seed_sd the spread across seeds."""
    if len(per) == 1:
        _, row, jr, sr = per[0]
        return row, [{**r, "seeds": 1, "seed_sd": math.nan} for r in jr], sr
    rows = [p[1] for p in per]
    out: dict[str, Any] = {"model": rows[0]["model"], "method": rows[0]["method"]}
    out["version"] = ",".join(f"{f}/{r['version']}" for (f, r, _, _) in per)
    bad = [f"{f}: {r['state']}" for (f, r, _, _) in per if r["state"] != "complete"]
    out["state"] = "incomplete: " + "; ".join(bad) if bad else "complete"
    for k in dict.fromkeys(k for r in rows for k in r):
        if k not in out and k not in TEXT_COLUMNS:
            out[k] = _mean([_num(r.get(k)) for r in rows])
    out["seeds"] = len(rows)
    for sd, col in SEED_SD.items():
        out[sd] = _sd([_num(r.get(col)) for r in rows])
    for col in [k for k in out if k.startswith("eval_") and k != "eval_avg"]:  # every benchmark category too
        out[f"seed_sd_{col}"] = _sd([_num(r.get(col)) for r in rows])
    out["hardware"] = "; ".join(sorted({r["hardware"] for r in rows}))
    judge: dict[tuple[str, str], list[dict]] = {}
    for _, _, jr, _ in per:
        for r in jr:
            judge.setdefault((r["set"], r["criterion"]), []).append(r)
    jout = [
        {"model": out["model"], "method": out["method"], "set": s, "criterion": c,
         **{k: _mean([r[k] for r in rs]) for k in ("mean", "ci_low", "ci_high", "n")},
         "seeds": len(rs), "seed_sd": _sd([r["mean"] for r in rs])}
        for (s, c), rs in judge.items()
    ]  # fmt: skip
    sels = [p[3] for p in per if p[3] is not None]
    sel = None
    if sels:
        sel = {"model": out["model"], "method": out["method"], "version": out["version"]}
        sel.update({k: _mean([_num(s.get(k)) for s in sels]) for k in SELECTION_COLUMNS[3:]})
    return out, jout, sel


def _index(items: list[str], x: str) -> int:
    return items.index(x) if x in items else len(items)
