"""Stage 07, figures: the study's figures and tables, regenerated from its run folders alone (no model is loaded).

Modules: ``collect`` (run folders -> tables, with version pins and missing runs), ``plots`` (figures),
``tables`` (CSV, Markdown, LaTeX), ``paired`` (each method minus the baseline on shared items, answer length),
``rounds`` (a study with rounds: drift monitors by round, the collapse flag), ``power`` (what each paired comparison
could detect), ``compare`` (fresh runs against a reference). :func:`make_figures` runs them and refreshes the study
index.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from selftrain.config import ConfigError
from selftrain.figures.collect import StudyResults, collect
from selftrain.figures.paired import controls_table, length_table, paired_table, plot_length, plot_paired
from selftrain.figures.plots import PLOTS as _BASE_PLOTS
from selftrain.figures.plots import plot_eval, plot_judge, plot_selection, plot_sweep, plot_training
from selftrain.figures.power import power_table
from selftrain.figures.rounds import plot_rounds, rounds_table
from selftrain.figures.tables import main_display, to_latex, to_markdown, views, write_tables
from selftrain.paths import study_folder
from selftrain.plotting import save_figure
from selftrain.provenance import committed_text
from selftrain.report import write_study_index

__all__ = [
    "PLOTS", "StudyResults", "collect", "controls_table", "drawn_runs", "length_table", "main_display",
    "make_figures", "paired_table", "plot_eval", "plot_judge", "plot_length", "plot_paired", "plot_rounds",
    "plot_selection", "plot_sweep", "plot_training", "power_table", "rounds_table", "to_latex", "to_markdown",
    "views", "write_tables",
]  # fmt: skip

PLOTS = {**_BASE_PLOTS, "paired": plot_paired, "length": plot_length}


def make_figures(
    study: str,
    results_dir: str | Path = "results",
    spec_path: str | Path | None = None,
    study_file: str | Path | None = None,
    verbose: bool = True,
    redraw_reference: bool = True,
) -> StudyResults:
    """Collect a study's results, write every figure (PNG + PDF) and table, refresh the study README. The study must
    be a folder name and its folder one where results may be written (paths.study_folder), or nothing is written.
    redraw_reference=False (notebook 07): a study whose tables are committed (the demo) is redrawn only from the
    runs its committed tables were drawn from; other runs are refused, naming them, and nothing is written."""
    res = collect(study_folder(results_dir, study), spec_path, study_file)
    if not redraw_reference:
        _keep_reference(res, study)
    res.paired, res.lengths, res.controls = paired_table(res), length_table(res), controls_table(res)
    res.power = power_table(res)
    res.rounds = rounds_table(res)
    for name, plot in {**PLOTS, "rounds": plot_rounds}.items():  # rounds: only for a study with rounds
        fig = plot(res)
        if fig is not None:  # the sweep figure exists only for a study with sweep axes
            res.figures += save_figure(fig, res.study_dir / "figures" / name)
    res.tables = write_tables(res)
    res.index = write_study_index(res.study_dir)
    if verbose:
        src = f"pins from {res.spec_path}" if res.pins else "newest complete version of each run"
        print(f"study {res.study}: {len(res.runs)} runs ({src}); {len(res.figures)} figure and "
              f"{len(res.tables)} table files -> {res.study_dir}")  # fmt: skip
        for model in res.models:  # which version of each run folder the figures and tables show
            runs = [f"{folder} {path.name}" for (m, folder), path in sorted(res.runs.items()) if m == model]
            print(f"  drew {model}: {', '.join(runs) or 'no run'}")
        for r in res.missing:
            print(f"  missing: {r['model']}/{r['method']} {r['version']}: {r['what']}")
    return res


def drawn_runs(table: pd.DataFrame) -> set[str]:
    """The runs a results table was drawn from, as "<model>/<run folder>/<version>": its `version` column holds the
    version ("v001") or, with replicate seeds or sweep points, "<run folder>/<version>" joined by commas."""
    runs = set()
    for model, method, versions in zip(table["model"], table["method"], table["version"], strict=True):
        if not isinstance(versions, str):
            continue  # a (model, method) with no run: a blank row
        for v in versions.split(","):
            runs.add(f"{model}/{v}" if "/" in v else f"{model}/{method}/{v}")
    return runs


def _keep_reference(res: StudyResults, study: str) -> None:
    """Refuse to redraw a committed reference study (its tables/results.csv in the project's HEAD) from runs other
    than the ones it was drawn from, naming them and the ways on."""
    text = committed_text(res.study_dir / "tables" / "results.csv")
    if text is None:
        return
    committed = drawn_runs(pd.read_csv(io.StringIO(text), dtype={"version": str}))
    now = drawn_runs(res.table)
    if now == committed:
        return
    other = ", ".join(sorted(now - committed)) or "none"
    gone = ", ".join(sorted(committed - now)) or "none"
    raise ConfigError(
        f"{res.study_dir} is a committed reference, drawn from {len(committed)} runs; this clone's newest complete "
        f"runs differ (new: {other}; not drawn: {gone}), so its committed figures and tables would be redrawn from "
        f"them. Nothing was written. To see the reference, pin its versions in params/figures/{study}.yaml; to "
        f"redraw it from these runs, set redraw_reference = True; `python -m selftrain compare --study {study}` "
        "sets fresh runs beside it."
    )
