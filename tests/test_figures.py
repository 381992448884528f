"""Stage 07 on a synthetic results tree: version choice and pins, tables equal to the inputs, missing runs
reported (never crashed on), every figure/table file written, the CLI and the notebook under papermill."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from selftrain import figures
from selftrain.cli import main
from selftrain.config import ConfigError, dump_config, load_figures_spec, resolve_run_config
from selftrain.schema import METHODS, QUALITY

ROOT = Path(__file__).resolve().parents[1]
STUDY = "synthfig"  # no params/studies or params/figures file of this name exists: the test passes its own
MODELS = ["tiny-150m", "tiny-1.8b"]  # study order; sorted by name would put 1.8b first
STAGES = ["generate", "select", "sft", "dpo", "judge", "eval"]
DECISIONS = {
    "original": {"original": 100},
    "central": {"central": 100},
    "drop-low": {"central": 60, "dropped": 40},
    "fallback-original": {"central": 60, "fallback": 40},
}


def quality(i: int, j: int, k: int) -> float:
    return round(2.0 + 0.5 * i + 0.1 * j + 0.01 * k, 4)


def safety(i: int, j: int) -> float:
    return round(3.0 + 0.2 * i + 0.1 * j, 4)


def eval_avg(i: int, j: int) -> float:
    return round(0.3 + 0.1 * i + 0.01 * j, 4)


def write_run(
    parent: Path, version: str, model: str, method: str, i: int, j: int, done: list[str], stages_run: list[str] = STAGES
) -> Path:
    """One run folder as the stages write it: params, manifest, markers, metrics (stages in `done` only) for a study
    of the stages `stages_run`."""
    d = parent / model / method / version
    for sub in ("data", "metrics", "figures", "notebooks", "stages"):
        (d / sub).mkdir(parents=True)
    cfg = resolve_run_config("tiny", method)
    cfg.model.name, cfg.study, cfg.stages = model, STUDY, stages_run
    (d / "params.resolved.yaml").write_text(dump_config(cfg))
    stages: dict = {}
    for s in stages_run:
        if s not in done:
            stages[s] = {"status": "pending"}
            continue
        skipped = method == "baseline" and s in ("select", "sft", "dpo")
        rec = {"status": "done", "finished": "2026-11-26T00:00:00+00:00", "seconds": 1.0, "inputs": {}, "outputs": {}}
        rec["metrics"] = {"skipped": "baseline: no retraining"} if skipped else {}
        stages[s] = rec
        (d / "stages" / s).mkdir()
        (d / "stages" / s / "_SUCCESS").write_text(json.dumps(rec))
        if skipped:
            continue
        metrics = d / "metrics"
        if s == "select":
            dec = {k: 0 for k in ("central", "original", "fallback", "dropped", "no_candidates")}
            dec.update(DECISIONS[method])
            sft = 100 - dec["dropped"]
            sel = {"method": method, "prompts": 100, "decisions": dec, "sft_examples": sft, "dpo_pairs": sft - 2}
            sel.update({"dpo_skipped_identical": 2, "original_rank_mean": 2.1 + 0.5 * i, "original_in_low_part": 40})
            (metrics / "select.json").write_text(json.dumps(sel))
        elif s in ("sft", "dpo"):
            (metrics / f"{s}.json").write_text(json.dumps({"train_loss": 1.5, "global_steps": 5}))
            rows = [{"loss": 2.0 - 0.1 * t + 0.05 * j, "step": t, "epoch": t / 5} for t in range(1, 6)]
            if s == "dpo":
                for t, r in enumerate(rows, 1):
                    r.update({"rewards/margins": 0.1 * t * j, "rewards/accuracies": 0.5 + 0.05 * t})
            rows.append({"train_loss": 1.7, "step": 5})  # the Trainer's summary row
            (metrics / f"{s}_log.json").write_text(json.dumps(rows))
        elif s == "judge":
            crit = {
                c: {
                    "mean": quality(i, j, k),
                    "ci_low": quality(i, j, k) - 0.2,
                    "ci_high": quality(i, j, k) + 0.2,
                    "n": 50,
                }
                for k, c in enumerate(QUALITY)
            }
            sm = safety(i, j)
            judge = {
                "quality": {"items": 50, "api_error_rate": 0.0, "parse_failure_rate": 0.02, "criteria": crit},
                "safety": {
                    "items": 40,
                    "api_error_rate": 0.0,
                    "parse_failure_rate": 0.0,
                    "criteria": {"safety": {"mean": sm, "ci_low": sm - 0.3, "ci_high": sm + 0.3, "n": 40}},
                    "violation_rate": {"value": 0.1 + 0.02 * j, "ci_low": 0.05, "ci_high": 0.2},
                    "acceptable_rate": {"value": 0.6 - 0.02 * j, "ci_low": 0.5, "ci_high": 0.7},
                },
            }
            (metrics / "judge.json").write_text(json.dumps(judge))
        elif s == "eval":
            avg = eval_avg(i, j)
            cats = {"QA": {"score": avg + 0.05, "datasets": ["q"], "missing": []}}
            cats["MC"] = {"score": avg - 0.05, "datasets": ["m"], "missing": []}
            (metrics / "eval.json").write_text(json.dumps({"avg": avg, "categories": cats, "datasets": {}}))
    if "judge" in stages_run and "judge" not in done and "select" in done:
        stages["judge"] = {"status": "failed", "error": "APIError: judge endpoint down", "seconds": 2.0}
    manifest = {"study": STUDY, "model": model, "method": method, "version": version, "stages": stages}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def build_tree(root: Path) -> tuple[Path, Path]:
    """results/<STUDY>/: 2 models x 5 methods; tiny-1.8b/drop-low lacks its judge stage, tiny-1.8b/central
    its eval.json, tiny-150m/central has v001 complete and v002 incomplete. Returns (results dir, study file)."""
    study_dir = root / "results" / STUDY
    for i, model in enumerate(MODELS):
        for j, method in enumerate(METHODS):
            done = [s for s in STAGES if not (model == "tiny-1.8b" and method == "drop-low" and s == "judge")]
            write_run(study_dir, "v001", model, method, i, j, done)
    (study_dir / "tiny-1.8b" / "central" / "v001" / "metrics" / "eval.json").unlink()
    v2 = write_run(study_dir, "v002", "tiny-150m", "central", 0, 1, ["generate", "select"])
    sel = json.loads((v2 / "metrics" / "select.json").read_text())
    (v2 / "metrics" / "select.json").write_text(json.dumps({**sel, "sft_examples": 77}))
    study_file = root / "synthfig.yaml"
    block = {"name": STUDY, "models": MODELS, "methods": list(METHODS), "stages": STAGES}
    study_file.write_text(yaml.safe_dump({"study": block}))
    return root / "results", study_file


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tree(tmp_path_factory.mktemp("fig"))


def test_collect_values_order_versions_and_missing(tree: tuple[Path, Path]) -> None:
    results, study_file = tree
    res = figures.collect(results / STUDY, study_file=study_file)
    assert res.models == MODELS and res.methods == list(METHODS)
    assert res.runs[("tiny-150m", "central")].name == "v001"  # the newest COMPLETE version, not v002
    t = res.table.set_index(["model", "method"])
    assert len(t) == 10
    for i, model in enumerate(MODELS):
        for j, method in enumerate(METHODS):
            row = t.loc[(model, method)]
            if (model, method) != ("tiny-1.8b", "drop-low"):
                assert row["overall"] == pytest.approx(quality(i, j, 4))
                assert row["overall_ci_low"] == pytest.approx(quality(i, j, 4) - 0.2)
                assert row["accuracy"] == pytest.approx(quality(i, j, 0))
                assert row["relevance"] == pytest.approx(quality(i, j, 3))
                assert row["safety"] == pytest.approx(safety(i, j))
                assert row["violation_rate"] == pytest.approx(0.1 + 0.02 * j)
                assert row["acceptable_rate"] == pytest.approx(0.6 - 0.02 * j)
            if (model, method) != ("tiny-1.8b", "central"):
                assert row["eval_avg"] == pytest.approx(eval_avg(i, j))
                assert row["eval_QA"] == pytest.approx(eval_avg(i, j) + 0.05)
                assert row["eval_MC"] == pytest.approx(eval_avg(i, j) - 0.05)
            if method == "baseline":
                assert math.isnan(row["sft_examples"]) and math.isnan(row["dpo_pairs"])
            else:
                want = 60 if method == "drop-low" else 100
                assert row["sft_examples"] == want and row["dpo_pairs"] == want - 2
    # The run without its judge stage keeps its eval numbers and shows blanks for the judge.
    bad = t.loc[("tiny-1.8b", "drop-low")]
    assert math.isnan(bad["overall"]) and math.isnan(bad["safety"]) and bad["state"] == "incomplete: judge"
    assert math.isnan(t.loc[("tiny-1.8b", "central"), "eval_avg"])
    got = {(r["model"], r["method"], r["version"], r["what"].split(":")[0]) for r in res.missing}
    assert got == {
        ("tiny-1.8b", "drop-low", "v001", "stage judge failed"),
        ("tiny-1.8b", "central", "v001", "metrics/eval.json missing"),
    }  # baseline's skipped select/sft/dpo are not missing
    sel = res.selection.set_index(["model", "method"])
    assert "baseline" not in sel.index.get_level_values("method")
    assert sel.loc[("tiny-150m", "drop-low"), "dropped_share"] == pytest.approx(0.4)
    assert sel.loc[("tiny-150m", "fallback-original"), "replaced_share"] == pytest.approx(0.4)
    assert sel.loc[("tiny-150m", "original"), "replaced_share"] == pytest.approx(1.0)
    assert sel.loc[("tiny-1.8b", "central"), "original_rank_mean"] == pytest.approx(2.6)
    assert sel.loc[("tiny-1.8b", "central"), "pool_size"] == 4  # tiny.yaml: n = 3 candidates + the original
    logs = res.logs
    sft = logs[(logs["model"] == "tiny-150m") & (logs["method"] == "central") & (logs["kind"] == "sft")]
    assert list(sft["step"]) == [1, 2, 3, 4, 5]  # the summary row (train_loss only) is not a point
    dpo = logs[(logs["kind"] == "dpo") & (logs["method"] == "original") & (logs["model"] == "tiny-1.8b")]
    assert dpo["rewards/margins"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])  # method 1


def test_figures_draw_panels_only_for_what_was_scored(tree: tuple[Path, Path]) -> None:
    """plot_eval leaves out categories no run scored (NLI, a column here, has no score); plot_paired draws a panel
    only for metrics with paired items, and the usual three (saying so) when none has any."""
    import dataclasses

    import matplotlib.pyplot as plt

    results, study_file = tree
    res = figures.collect(results / STUDY, study_file=study_file)
    fig = figures.plot_eval(dataclasses.replace(res, table=res.table.assign(eval_NLI=math.nan)))  # listed, unscored
    assert [ax.get_title() for ax in fig.axes if ax.axison] == ["AVG", "QA", "MC"]
    plt.close(fig)
    rows = [{"model": "tiny-150m", "method": m, "metric": metric, "items": n, "difference": 0.01, "ci_low": -0.01,
             "ci_high": 0.03, "p": 0.5, "p_holm": 0.5}
            for m in ("central", "original") for metric, n in (("quality", 0), ("eval_sampled", 40))]  # fmt: skip
    fig = figures.plot_paired(dataclasses.replace(res, paired=pd.DataFrame(rows)))
    assert [ax.get_title() for ax in fig.axes] == ["sampled exact match: method - baseline"]
    plt.close(fig)
    empty = pd.DataFrame([{**r, "items": 0} for r in rows])
    fig = figures.plot_paired(dataclasses.replace(res, paired=empty))
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["judge quality (overall)", "judge safety",
                                                                "benchmark exact match"]  # fmt: skip
    plt.close(fig)


def test_a_study_without_a_judge_stage_gets_no_empty_judge_figures(tmp_path: Path) -> None:
    """An eval-only study (the positive control) draws its other figures, but no judge or length figure of empty
    panels; one run with judge scores brings both back."""
    import matplotlib.pyplot as plt

    results = tmp_path / "results"
    study_dir = results / STUDY
    no_judge = [s for s in STAGES if s != "judge"]
    for j, method in enumerate(("baseline", "central")):
        write_run(study_dir, "v001", "tiny-150m", method, 0, j, no_judge, stages_run=no_judge)
    res = figures.collect(study_dir)
    assert not res.missing and len(res.table) == 2  # complete runs of an eval-only study
    assert figures.plot_judge(res) is None and figures.plot_length(res) is None
    assert figures.plot_eval(res) is not None
    figures.make_figures(STUDY, results, verbose=False)
    drawn = {p.name for p in (study_dir / "figures").iterdir()}
    assert "eval.png" in drawn and not drawn & {"judge.png", "judge.pdf", "length.png", "length.pdf"}
    v2 = write_run(study_dir, "v002", "tiny-150m", "central", 0, 1, STAGES)
    items = [
        {"id": k, "set": "quality", "answer": "x" * (20 + 7 * k), "scores": {"overall": 1 + k % 5}} for k in range(6)
    ]
    (v2 / "data" / "judge_items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    res = figures.collect(study_dir)
    judge_fig, length_fig = figures.plot_judge(res), figures.plot_length(res)
    assert judge_fig is not None and length_fig is not None
    plt.close(judge_fig)
    plt.close(length_fig)


def test_pins_choose_the_version_and_bad_pins_fail(tree: tuple[Path, Path], tmp_path: Path) -> None:
    results, study_file = tree
    spec = tmp_path / "spec.yaml"
    spec.write_text("figures:\n  pins:\n    tiny-150m/central: v002\n")
    res = figures.collect(results / STUDY, spec, study_file)
    assert res.runs[("tiny-150m", "central")].name == "v002"
    row = res.table.set_index(["model", "method"]).loc[("tiny-150m", "central")]
    assert row["sft_examples"] == 77 and math.isnan(row["overall"]) and row["version"] == "v002"
    what = {r["what"].split(":")[0] for r in res.missing if r["version"] == "v002"}
    assert what == {"stage sft pending", "stage dpo pending", "stage judge failed", "stage eval pending"}
    spec.write_text("figures:\n  pins:\n    tiny-150m/central: v009\n")
    with pytest.raises(ConfigError, match=r"spec\.yaml: key 'figures\.pins\.tiny-150m/central': version v009 not"):
        figures.collect(results / STUDY, spec, study_file)
    spec.write_text("figures:\n  pinz: {}\n")
    with pytest.raises(ConfigError, match=r"spec\.yaml: unknown key 'figures\.pinz'"):
        figures.collect(results / STUDY, spec)
    spec.write_text("figures:\n  pins:\n    tiny-150m: v001\n")
    with pytest.raises(ConfigError, match="must look like 'model/method'"):
        load_figures_spec(spec)
    assert load_figures_spec(ROOT / "params" / "figures" / "demo.yaml") == {}


def test_a_run_with_no_folder_is_a_blank_row(tmp_path: Path) -> None:
    results, study_file = build_tree(tmp_path)
    shutil.rmtree(results / STUDY / "tiny-1.8b" / "original")
    res = figures.collect(results / STUDY, study_file=study_file)
    row = res.table.set_index(["model", "method"]).loc[("tiny-1.8b", "original")]
    assert row["state"] == "no run" and math.isnan(row["overall"]) and math.isnan(row["sft_examples"])
    assert {"model": "tiny-1.8b", "method": "original", "version": "-", "what": "no run folder"} in res.missing
    # Without a study file: models sorted by name and only the runs found.
    res = figures.collect(results / STUDY)
    rows = set(zip(res.table["model"], res.table["method"], strict=True))
    assert res.models == sorted(MODELS) and ("tiny-1.8b", "original") not in rows and len(rows) == 9


def test_cli_figures_and_index(tree: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results, _ = tree
    (results / STUDY / "README.md").unlink(missing_ok=True)
    assert main(["index", "--study-dir", str(results / STUDY)]) == 0
    assert (results / STUDY / "README.md").is_file()
    assert main(["figures", "--study", "nosuchstudy", "--results-dir", str(results)]) == 2
    assert "no such study folder" in capsys.readouterr().err
    spec = tmp_path / "bad.yaml"
    spec.write_text("figures:\n  pins:\n    tiny-150m/central: v009\n")
    assert main(["figures", "--study", STUDY, "--results-dir", str(results), "--spec", str(spec)]) == 2
    assert "v009 not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def executed(tree: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """notebooks/07_figures.ipynb run by papermill on the tree: it calls make_figures once for the tests below."""
    import papermill as pm

    results, _ = tree
    out = tmp_path_factory.mktemp("nb") / "07_figures.ipynb"
    # The kernel is started as `python`: make that this interpreter, as the study runner does.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    try:
        pm.execute_notebook(
            str(ROOT / "notebooks" / "07_figures.ipynb"),
            str(out),
            parameters={"study": STUDY, "results_dir": str(results)},
            cwd=str(ROOT),
            kernel_name="python3",
            progress_bar=False,
        )
    finally:
        os.environ["PATH"] = path
    return nbformat.read(out, as_version=4)


@pytest.mark.notebook
def test_notebook_07_executes_and_shows_results(executed: nbformat.NotebookNode) -> None:
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    text = json.dumps([c.outputs for c in code])
    assert "missing: tiny-1.8b/drop-low v001: stage judge failed" in text  # printed by make_figures
    assert "drew tiny-150m: baseline v001, central v001, " in text  # which version of each run it drew
    assert "stage judge failed" in text and "metrics/eval.json missing" in text  # the missing table
    assert text.count("image/png") == 6  # the six figures, each shown once


@pytest.mark.notebook
def test_make_figures_writes_every_file(executed: nbformat.NotebookNode, tree: tuple[Path, Path]) -> None:
    results, _ = tree
    study_dir = results / STUDY
    for name in (n for n in figures.PLOTS if n != "sweep"):  # the sweep figure: only for a study with sweep axes
        for ext in ("png", "pdf"):
            p = study_dir / "figures" / f"{name}.{ext}"
            assert p.is_file() and p.stat().st_size > 1000, p
    for name in ("results", "judge", "selection"):
        for ext in ("csv", "md", "tex"):
            assert (study_dir / "tables" / f"{name}.{ext}").stat().st_size > 100
    back = pd.read_csv(study_dir / "tables" / "results.csv")
    assert len(back) == 10 and list(back["model"].unique()) == sorted(MODELS)  # no study file: sorted names
    row = back[(back["model"] == "tiny-150m") & (back["method"] == "central")].iloc[0]
    assert row["overall"] == pytest.approx(quality(0, 2, 4)) and row["version"] == "v001"
    assert row["eval_QA"] == pytest.approx(eval_avg(0, 2) + 0.05) and row["sft_examples"] == 100
    md = (study_dir / "tables" / "results.md").read_text()
    assert f"| {quality(1, 4, 4):.2f} [{quality(1, 4, 4) - 0.2:.2f}, {quality(1, 4, 4) + 0.2:.2f}] |" in md
    tex = (study_dir / "tables" / "results.tex").read_text()
    assert r"\toprule" in tex and "fallback-original" in tex and r"quality (95\% CI)" in tex
    missing = (study_dir / "tables" / "missing.md").read_text()
    assert "stage judge failed" in missing and "metrics/eval.json missing" in missing
    readme = (study_dir / "README.md").read_text()
    assert "tiny-150m" in readme and "[v002]" in readme  # the per-study index, every version listed


@pytest.mark.integration
def test_regenerating_from_unchanged_results_gives_identical_bytes(tmp_path: Path) -> None:
    """No wall-clock time in any written file (PDF creation dates, the index): a rerun changes nothing."""
    results, study_file = build_tree(tmp_path)
    study_dir = results / STUDY

    def snapshot() -> dict[str, bytes]:
        return {
            str(p.relative_to(study_dir)): p.read_bytes()
            for p in sorted(study_dir.rglob("*"))
            if p.is_file() and p.parent.name in ("figures", "tables", STUDY)
        }

    figures.make_figures(STUDY, results, study_file=study_file, verbose=False)
    first = snapshot()
    assert any(k.endswith(".pdf") for k in first) and "README.md" in first
    assert "tables/paired.csv" in first and "tables/controls.csv" not in first  # a baseline, no control arms
    stale = [study_dir / "tables" / f"controls{x}" for x in (".csv", ".md", ".tex")]  # from an earlier grid
    for f in stale:
        f.write_text("an old table\n")
    time.sleep(1.1)  # timestamps have one-second resolution: a clock in any file would now differ
    figures.make_figures(STUDY, results, study_file=study_file, verbose=False)
    second = snapshot()
    assert not any(f.exists() for f in stale)  # a table the study no longer produces does not stay behind
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


@pytest.mark.integration
def test_07_refuses_to_redraw_a_committed_reference_from_other_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A study whose tables are committed (as results/demo is): with redraw_reference=False (notebook 07's default)
    figures come only from the runs those tables were drawn from; a newer complete run is named and refused, and
    nothing is written; the runs drawn are printed; redraw_reference=True (the command line) redraws."""
    import subprocess

    proj = tmp_path / "proj"
    results, study_file = build_tree(proj)
    shutil.copytree(ROOT / "params", proj / "params")
    shutil.copy(ROOT / "pyproject.toml", proj / "pyproject.toml")
    monkeypatch.setenv("SELFTRAIN_ROOT", str(proj))
    figures.make_figures(STUDY, results, study_file=study_file, redraw_reference=False)  # not committed: drawn
    assert "drew tiny-150m: baseline v001, central v001, " in capsys.readouterr().out
    git = ["git", "-C", str(proj), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "reference"], check=True)
    study_dir = results / STUDY
    tables = {p: p.read_bytes() for p in (study_dir / "tables").iterdir()}
    figures.make_figures(STUDY, results, study_file=study_file, redraw_reference=False)  # the same runs: fine
    write_run(study_dir, "v003", "tiny-150m", "central", 0, 1, STAGES)  # a newer complete run (a later `make demo`)
    with pytest.raises(ConfigError) as e:
        figures.make_figures(STUDY, results, study_file=study_file, redraw_reference=False)
    assert "committed reference" in str(e.value) and "new: tiny-150m/central/v003" in str(e.value)
    assert "not drawn: tiny-150m/central/v001" in str(e.value) and "redraw_reference = True" in str(e.value)
    assert {p: p.read_bytes() for p in (study_dir / "tables").iterdir()} == tables  # nothing written
    res = figures.make_figures(STUDY, results, study_file=study_file)  # the command line redraws
    assert res.runs[("tiny-150m", "central")].name == "v003"
    assert "tiny-150m/central/v003" in figures.drawn_runs(pd.read_csv(study_dir / "tables" / "results.csv"))
