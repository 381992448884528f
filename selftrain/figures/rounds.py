"""Stage 07, rounds: a study with rounds (study.rounds) read as a chain of models, with its drift monitors and a
collapse flag (``tables/rounds.*``, ``figures/rounds``).

Round k of the table is the model M_k: M_0 the original model, M_k the final model of the run folder
``<method>@round=<k>``. Its row holds what that model did, from two run folders:

- its candidates, generated in round k+1 (``<method>@round=<k+1>``, the closing generation for the last model):
  answer length (tokens) and share ending at EOS (generate.json), the perplexity of the held-out original responses
  under it (generate.json ``drift``), the diversity of each prompt's pool and the selected target's centrality
  margin (select.json ``drift``; definitions in selftrain.drift);
- its scores: judge quality and safety, benchmark AVG of round k's run (M_0: the study's `baseline` run).

Collapse flag of round k >= 1, against round 0 of the same chain (model, method, seed): a diversity monitor (distinct-1,
distinct-2, 1 - pool cosine, 100 - self-chrF) below `rounds.collapse_fraction` of round 0's, or judge quality more
than 2*sqrt(2)*sd below round 0's (the band `selftrain compare` uses: two draws of one spread), sd the across-seed
standard deviation of round 0's quality where the study has seeds, else `rounds.quality_sd`; neither: quality
is not flagged, and the table says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from selftrain.figures.collect import StudyResults, _num
from selftrain.figures.plots import COLORS
from selftrain.plotting import plt
from selftrain.schema import criterion, folder_sweep, metrics_or_empty, run_folder, split_round, split_run_folder

# Monitors, each with the label of its panel; diversity ones say which way is "more diverse".
MONITORS = {
    "mean_tokens": "answer length (tokens)",
    "eos_share": "share ending at EOS",
    "distinct_1": "distinct-1 (higher: more diverse)",
    "distinct_2": "distinct-2 (higher: more diverse)",
    "pool_cosine": "mean pairwise cosine (higher: more alike)",
    "self_chrf": "self-chrF (higher: more alike)",
    "centrality_margin": "target's centrality margin",
    "heldout_perplexity": "perplexity of held-out originals",
    "overall": "judge quality (overall)",
    "safety": "judge safety",
    "eval_avg": "benchmark AVG",
}
# Diversity as "higher = more diverse", for the collapse flag.
DIVERSITY = {
    "distinct_1": lambda v: v,
    "distinct_2": lambda v: v,
    "pool_cosine": lambda v: 1.0 - v,
    "self_chrf": lambda v: 100.0 - v,
}
ROUNDS_COLUMNS = [
    *("model", "method", "sweep", "seed", "round"),
    *MONITORS,
    *("overall_ci_low", "overall_ci_high", "quality_floor", "candidates_from", "scores_from", "collapse"),
]
BAND = 2 * math.sqrt(2)


def _params(d: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load((d / "params.resolved.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def round_chains(runs: dict[tuple[str, str], Path]) -> dict[tuple[str, str, str, int | None], dict[int, Path]]:
    """(model, method, other sweep label, seed) -> {round: run folder} of every round folder."""
    out: dict[tuple[str, str, str, int | None], dict[int, Path]] = {}
    for (model, folder), d in runs.items():
        index, rest = split_round(folder_sweep(folder))
        if index is None:
            continue
        method, seed = split_run_folder(folder)
        out.setdefault((model, method, rest, seed), {})[index] = d
    return out


def _candidates(d: Path | None) -> dict[str, float]:
    gen, sel = (metrics_or_empty(d, s) if d is not None else {} for s in ("generate", "select"))
    drift = sel.get("drift") or {}
    return {
        "mean_tokens": _num(gen.get("mean_tokens")),
        "eos_share": _num(gen.get("eos_share")),
        **{k: _num(drift.get(k)) for k in ("distinct_1", "distinct_2", "pool_cosine", "self_chrf")},
        "centrality_margin": _num(drift.get("centrality_margin")),
        "heldout_perplexity": _num((gen.get("drift") or {}).get("perplexity")),
    }


def _scores(d: Path | None) -> dict[str, float]:
    judge = metrics_or_empty(d, "judge") if d is not None else {}
    q = criterion(judge, "quality", "overall")
    return {
        "overall": _num(q.get("mean")),
        "overall_ci_low": _num(q.get("ci_low")),
        "overall_ci_high": _num(q.get("ci_high")),
        "safety": _num(criterion(judge, "safety", "safety").get("mean")),
        "eval_avg": _num((metrics_or_empty(d, "eval") if d is not None else {}).get("avg")),
    }


def _name(d: Path | None, study_dir: Path) -> str:
    return str(d.relative_to(study_dir)) if d is not None and d.is_relative_to(study_dir) else ""


def rounds_table(res: StudyResults) -> pd.DataFrame:
    """One row per (model, method, sweep point, seed, round k = 0..R): model M_k's monitors and scores, and the
    collapse flag. Empty for a study without rounds."""
    runs = {**res.runs, **res.closing}
    chains = round_chains(runs)
    rows = []
    for (model, method, rest, seed), chain in sorted(chains.items(), key=lambda x: (*x[0][:3], x[0][3] or -1)):
        cfg = _params(chain[min(chain)])
        count = int((cfg.get("round") or {}).get("of") or max(chain) - 1)
        point = dict(p.split("=", 1) for p in rest.split("@")) if rest else None
        baseline = runs.get((model, run_folder("baseline", seed, point)))
        for k in range(count + 1):
            scores_from = baseline if k == 0 else chain.get(k)
            row: dict[str, Any] = {"model": model, "method": method, "sweep": rest, "seed": seed, "round": k}
            row |= _candidates(chain.get(k + 1)) | _scores(scores_from)
            row["candidates_from"] = _name(chain.get(k + 1), res.study_dir)
            row["scores_from"] = _name(scores_from, res.study_dir)
            rows.append(row)
    df = pd.DataFrame(rows).reindex(columns=ROUNDS_COLUMNS)
    if len(df):
        df["collapse"], df["quality_floor"] = _assess(
            df, {key: _params(chain[min(chain)]) for key, chain in chains.items()}
        )
    return df


def quality_spread(df: pd.DataFrame, rounds_params: dict[str, Any]) -> float:
    """The sd of judge quality drift is read against: the across-seed sd of round 0's quality where the chain's
    (model, method, sweep) has two or more seeds, else rounds.quality_sd of its params, else NaN."""
    zero = df[df["round"] == 0]["overall"].map(_num).dropna()
    if len(zero) >= 2:
        return float(np.std(zero, ddof=1))
    sd = rounds_params.get("quality_sd")
    return float(sd) if isinstance(sd, int | float) else math.nan


def collapse_flags(df: pd.DataFrame, params: dict[tuple[str, str, str, int | None], dict[str, Any]]) -> list[str]:
    """The collapse flag of every row of a rounds table (in its row order): '' where nothing tripped, else each
    monitor that did, with its value and its bound. params: each chain's params (their `rounds` section)."""
    return _assess(df, params)[0]


def _assess(
    df: pd.DataFrame, params: dict[tuple[str, str, str, int | None], dict[str, Any]]
) -> tuple[list[str], list[float]]:
    """(collapse flags, quality floors: round 0's quality - 2*sqrt(2)*sd, NaN without a spread) of every row."""
    flags, floors = [""] * len(df), [math.nan] * len(df)
    seeds_of = df.groupby(["model", "method", "sweep"], dropna=False)
    for (model, method, rest), group in seeds_of:
        for seed, chain in group.groupby(group["seed"].fillna(-1)):
            key = (model, method, rest, None if seed == -1 else int(seed))
            rp = (params.get(key) or {}).get("rounds") or {}
            frac = float(rp.get("collapse_fraction", 0.5))
            sd = quality_spread(group, rp)
            zero = chain[chain["round"] == 0]
            if not len(zero):
                continue
            z = zero.iloc[0]
            for i in chain.index:
                floors[df.index.get_loc(i)] = _num(z["overall"]) - BAND * sd
            for i, r in chain[chain["round"] > 0].iterrows():
                hits = []
                for m, div in DIVERSITY.items():
                    v0, v = _num(z[m]), _num(r[m])
                    if not (math.isnan(v0) or math.isnan(v)) and div(v) < frac * div(v0):
                        hits.append(f"{m} {v:.3g} (diversity {div(v):.3g} < {frac:g} x round 0's {div(v0):.3g})")
                q0, q = _num(z["overall"]), _num(r["overall"])
                if not (math.isnan(q0) or math.isnan(q) or math.isnan(sd)) and q < q0 - BAND * sd:
                    hits.append(f"quality {q:.2f} < round 0's {q0:.2f} - {BAND:.2f} x sd {sd:.2f}")
                flags[df.index.get_loc(i)] = "; ".join(hits)
    return flags, floors


def rounds_display(df: pd.DataFrame) -> pd.DataFrame:
    """The rounds table for Markdown / LaTeX: the monitors, quality with its interval, the flag."""
    out = df.drop(columns=["candidates_from", "scores_from", "overall_ci_low", "overall_ci_high", "quality_floor"])
    if not df["sweep"].fillna("").astype(bool).any():
        out = out.drop(columns=["sweep"])
    if df["seed"].isna().all():
        out = out.drop(columns=["seed"])
    return out


def plot_rounds(res: StudyResults) -> Any:
    """Each monitor against the round (0 = the original model), a line per (model, method) (the mean over seeds,
    bars: their sd); rounds with a collapse flag ringed in red, the quality floor of the flag dotted. None for a study
    without rounds."""
    df = res.rounds
    if not len(df):
        return None
    names = list(MONITORS)
    cols, lines = 4, math.ceil((len(MONITORS) + 1) / 4)
    fig, axes = plt.subplots(lines, cols, figsize=(3.6 * cols, 2.7 * lines), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for (model, method), d in df.groupby(["model", "method"], sort=False):
            agg = d.groupby("round")[name].agg(["mean", "std", "count"])
            ys = agg["mean"].to_numpy(dtype=float)
            if not np.isfinite(ys).any():
                continue
            err = np.where(agg["count"] > 1, agg["std"].fillna(0.0), 0.0)
            label = f"{model}: {method}" if df["model"].nunique() > 1 else method
            style = {"marker": "o", "ms": 3, "lw": 1, "capsize": 2, "color": COLORS.get(method), "label": label}
            ax.errorbar(agg.index, ys, yerr=err, **style)
            hit = d[d["collapse"].fillna("").astype(bool)].groupby("round")[name].mean()
            ax.scatter(hit.index, hit.values, s=60, facecolors="none", edgecolors="red", zorder=3)
            floor = d["quality_floor"].mean()
            if name == "overall" and np.isfinite(floor):  # below it, quality counts as collapsed
                ax.axhline(floor, color=COLORS.get(method), ls=":", lw=0.8)
        ax.set_title(MONITORS[name], fontsize=8)
        ax.set_xlabel("round", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        axes.flat[-1].legend(handles, labels, fontsize=7, frameon=False, loc="center")
    fig.suptitle(f"Study {res.study}: drift monitors by round (red rings: collapse flag)", fontsize=9)
    fig.tight_layout()
    return fig
