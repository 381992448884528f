"""Power of the paired comparisons: the paired t power against statsmodels, a known shift injected into synthetic
paired scores detected at the stated rate (the t test and the project's own permutation test), Holm's levels,
stage 07's tables/power on a study with seeds and sampled exact match, the figures spec's power settings and
`python -m selftrain power` before a study runs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from test_replicates import _run_folder

from selftrain import figures
from selftrain.cli import main
from selftrain.config import ConfigError, load_figures_power
from selftrain.stats import (
    holm,
    holm_levels,
    items_needed,
    min_detectable_difference,
    paired_t_power,
    permutation_p,
)

CASES = [(0.3, 1.0, 16, 0.05), (0.05, 0.18, 120, 0.0125), (0.1, 0.3, 300, 0.01), (1.0, 0.5, 3, 0.05)]


# ------------------------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize(("diff", "sd", "n", "alpha"), CASES)
def test_power_agrees_with_statsmodels_paired_t(diff: float, sd: float, n: int, alpha: float) -> None:
    """statsmodels' TTestPower is the one-sample (paired) t test's power with the noncentral t: the same
    assumptions, so the same numbers: power, the minimum detectable effect and the items needed."""
    sm = pytest.importorskip("statsmodels.stats.power")
    tp = sm.TTestPower()
    assert paired_t_power(diff, sd, n, alpha) == pytest.approx(tp.power(diff / sd, n, alpha), abs=1e-9)
    mdd = min_detectable_difference(sd, n, alpha)
    assert mdd / sd == pytest.approx(tp.solve_power(nobs=n, alpha=alpha, power=0.8), rel=1e-5)
    assert paired_t_power(mdd, sd, n, alpha) == pytest.approx(0.8, abs=1e-8)
    need = items_needed(diff, sd, alpha)
    assert need == math.ceil(tp.solve_power(effect_size=diff / sd, alpha=alpha, power=0.8) - 1e-9)
    assert paired_t_power(diff, sd, need, alpha) >= 0.8
    assert need == 2 or paired_t_power(diff, sd, need - 1, alpha) < 0.8


def test_no_answer_is_nan() -> None:
    assert math.isnan(min_detectable_difference(0.0, 50))  # every difference equal: no spread to read power from
    assert math.isnan(min_detectable_difference(1.0, 1))  # one item: no t test
    assert math.isnan(items_needed(0.1, 0.0)) and math.isnan(items_needed(0.0, 1.0))
    assert math.isnan(paired_t_power(0.1, 1.0, 30, alpha=0.0))
    assert items_needed(10.0, 0.1) == 2  # a difference far above the spread: the fewest a t test can use


def test_holm_levels_are_the_thresholds_holm_compares_with() -> None:
    p = [0.04, 0.001, math.nan, 0.03, 0.5]
    assert holm_levels(p) == pytest.approx([0.025, 0.0125, math.nan, 1 / 60, 0.05], nan_ok=True)
    # Rejected by Holm (adjusted p <= 0.05) exactly where every smaller p passed its level.
    rng = np.random.default_rng(1)
    for _ in range(200):
        ps = list(rng.uniform(0, 0.08, 5))
        levels, adj = holm_levels(ps), holm(ps)
        order = np.argsort(ps)
        passed = np.cumprod([ps[i] <= levels[i] for i in order]).astype(bool)
        assert [adj[i] <= 0.05 for i in order] == list(passed)


# ------------------------------------------------------------------------------------------- simulation

REPS = 4000


def _mc_band(rate: float, reps: int) -> float:
    return 3.5 * math.sqrt(rate * (1 - rate) / reps)  # Monte-Carlo error: 3.5 standard errors


@pytest.mark.parametrize(("sd", "n", "alpha"), [(1.0, 16, 0.0125), (0.25, 60, 0.05), (0.9, 8, 0.05)])
def test_a_shift_of_the_mdd_is_detected_at_the_stated_power(sd: float, n: int, alpha: float) -> None:
    """Synthetic paired scores (normal item differences: the t test's own assumptions) with the minimum detectable
    difference injected: the paired t test at the level detects it in 80% of the draws, within Monte-Carlo error;
    half of it far less often, and no shift at the level itself."""
    rng = np.random.default_rng(7)
    mdd = min_detectable_difference(sd, n, alpha)
    for shift, want in ((mdd, 0.8), (mdd / 2, paired_t_power(mdd / 2, sd, n, alpha)), (0.0, alpha)):
        base = rng.uniform(1, 5, size=(REPS, n))  # item difficulty: cancels in the pairs
        method = base + shift + rng.normal(0, sd, size=(REPS, n))
        p = sps.ttest_rel(method, base, axis=1).pvalue
        rate = float((p <= alpha).mean())
        assert abs(rate - want) <= _mc_band(want, REPS), (shift, rate, want)


def _permutation_rate(draw, n: int, alpha: float, reps: int, rng: np.random.Generator) -> tuple[float, float]:
    """(detection rate of stats.permutation_p at `alpha` over `reps` draws of n item differences, the power the
    paired t formula states from the differences' population mean and sd, read off a large draw)."""
    big = draw(rng, 200_000)
    stated = paired_t_power(float(big.mean()), float(big.std()), n, alpha)
    hits = sum(permutation_p(draw(rng, n), n_perm=2000, seed=i) <= alpha for i in range(reps))
    return hits / reps, stated


def test_the_projects_permutation_test_detects_at_the_stated_rate() -> None:
    """What the paired tables run: the sign-flip permutation p (stats.permutation_p), at the strictest Holm level of
    a family of four. Judge-like scores (expected scores in 1-5, as `judge.scoring: expected` gives) with a shift
    injected, and the sampled-exact shares of k = 8 answers (the positive control's measure): detected at the power
    the paired t formula states, within Monte-Carlo error."""
    rng = np.random.default_rng(11)
    alpha, reps = 0.05 / 4, 600

    def judge(rng: np.random.Generator, n: int) -> np.ndarray:
        base = rng.uniform(1, 5, n)
        return np.clip(base + 0.45 + rng.normal(0, 0.9, n), 1, 5) - base

    def shares(rng: np.random.Generator, n: int) -> np.ndarray:
        p = rng.uniform(0, 1, n)
        return rng.binomial(8, np.clip(p + 0.12, 0, 1)) / 8 - rng.binomial(8, p) / 8

    for draw, n in ((judge, 40), (shares, 40)):
        rate, stated = _permutation_rate(draw, n, alpha, reps, rng)
        assert 0.6 < stated < 0.95  # near the detectable edge, so the check can fail either way
        assert abs(rate - stated) <= _mc_band(stated, reps), (draw.__name__, rate, stated)


def test_coarse_exact_match_is_detected_near_the_stated_rate_at_the_demos_size() -> None:
    """Exact match of one greedy answer: per-item differences in {-1, 0, 1}. The permutation test is exact on them,
    hence conservative, so the t formula can overstate its power; at 120 items (the demo's benchmark) the detection
    rate lies at most 0.05 below the stated power and not above it, within Monte-Carlo error (README: Power)."""
    rng = np.random.default_rng(12)
    alpha, reps = 0.05 / 4, 600

    def ternary(rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.uniform(size=n)
        return np.where(u < 0.30, 1.0, np.where(u < 0.40, -1.0, 0.0))

    rate, stated = _permutation_rate(ternary, 120, alpha, reps, rng)
    assert stated - 0.05 - _mc_band(stated, reps) <= rate <= stated + _mc_band(stated, reps), (rate, stated)


# ------------------------------------------------------------------------------------------- stage 07


def _run(study: Path, folder: str, quality: np.ndarray, exact: np.ndarray, sampled: np.ndarray | None) -> Path:
    """A complete run folder (test_replicates' synthetic one) with per-item judge quality, benchmark exact match and
    (optionally) the share of k sampled answers that are right."""
    d = _run_folder(study, "m", folder, "v001", float(np.mean(quality)), 3.0, float(np.mean(exact)))
    ev: dict = {"avg": float(np.mean(exact)), "categories": {"QA": {"score": float(np.mean(exact))}}, "datasets": {}}
    if sampled is not None:
        ev["sampled"] = {"k": 4, "exact": float(np.mean(sampled)), "greedy_exact": float(np.mean(exact))}
    (d / "metrics" / "eval.json").write_text(json.dumps(ev))
    items = [{"set": "quality", "id": f"q{i}", "answer": "x", "status": "ok", "scores": {"overall": float(v)}}
             for i, v in enumerate(quality)]  # fmt: skip
    (d / "data" / "judge_items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    preds = []
    for i, e in enumerate(exact):
        rec = {"dataset": "qa", "index": i, "exact": bool(e)}
        if sampled is not None:
            rec["sampled_exact"] = float(sampled[i])
        preds.append(rec)
    (d / "data" / "eval_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    return d


def _study(root: Path, sampled: bool = True) -> tuple[Path, dict]:
    """baseline, central (+0.5 quality, +0.25 sampled), random (+0.1), first (= baseline) at seeds 1234, 1, 2."""
    rng = np.random.default_rng(5)
    study = root / "results" / "pc"
    n = 60
    base_q, base_e = rng.integers(1, 6, n).astype(float), rng.integers(0, 2, n).astype(float)
    base_s = rng.integers(0, 5, n) / 4
    shift = {"baseline": (0.0, 0.0), "central": (0.5, 0.25), "random": (0.1, 0.05), "first": (0.0, 0.0)}
    seed_shift = {"": 0.0, ".seed1": 0.05, ".seed2": -0.05}
    made = {}
    for method, (sq, ss) in shift.items():
        for suffix, ds in seed_shift.items():
            noise = 0.0 if method in ("baseline", "first") else 1.0
            q = base_q + sq + ds + noise * rng.normal(0, 0.6, n)
            s = np.clip(base_s + ss + ds + noise * rng.normal(0, 0.2, n), 0, 1) if sampled else None
            made[method + suffix] = (q, s)
            _run(study, method + suffix, q, base_e, s)
    return study, made


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_power_table_of_a_study_with_seeds_and_sampled_exact(tmp_path: Path) -> None:
    study, made = _study(tmp_path)
    spec = tmp_path / "pc.yaml"
    spec.write_text(yaml.safe_dump({"figures": {"power": {"difference": {"eval_sampled": 0.1}}}}))
    res = figures.make_figures("pc", tmp_path / "results", spec_path=spec, verbose=False)
    t = res.power
    assert set(t["metric"]) == {"quality", "eval_exact", "eval_sampled"}  # no safety item: no row
    assert set(res.paired["metric"]) == {*t["metric"], "safety"}  # eval_sampled is paired too, once a run has it
    got = t.set_index(["versus", "method", "metric"])
    # central minus baseline on the sampled share: the numbers from the items themselves.
    diff = made["central"][1] - made["baseline"][1]
    row = got.loc[("baseline", "central", "eval_sampled")]
    assert row["items"] == 60 and row["observed"] == pytest.approx(diff.mean())
    assert row["sd"] == pytest.approx(diff.std(ddof=1))
    fam = res.paired[res.paired["metric"] == "eval_sampled"]
    levels = dict(zip(fam["method"], holm_levels(list(fam["p"])), strict=True))
    assert row["family"] == 3 and row["alpha"] == pytest.approx(levels["central"])
    assert row["mdd"] == pytest.approx(min_detectable_difference(row["sd"], 60, row["alpha"]))
    assert row["named"] == 0.1 and row["items_needed"] == items_needed(0.1, row["sd"], row["alpha"])
    # Seeds: each seed's central run minus the baseline run at the same seed.
    per_seed = [np.mean(made["central" + s][1] - made["baseline" + s][1]) for s in ("", ".seed1", ".seed2")]
    assert row["seeds"] == 3 and row["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert row["seeds_needed"] == items_needed(0.1, row["seed_sd"], row["alpha"])
    # The spec named only eval_sampled: the other metrics keep the defaults.
    assert got.loc[("baseline", "central", "quality"), "named"] == 0.25
    # Control arms against central: their own family of two.
    ctl = got.loc["central"]
    assert set(ctl.index.get_level_values("method")) == {"random", "first"} and (ctl["family"] == 2).all()
    # No shift at all (first = baseline exactly): sd 0, nothing to read power from.
    assert math.isnan(got.loc[("baseline", "first", "quality"), "mdd"])
    tables = study / "tables"
    for ext in ("csv", "md", "tex"):
        assert (tables / f"power.{ext}").is_file()
    back = pd.read_csv(tables / "power.csv")
    assert len(back) == len(t) and back["alpha"].iloc[0] == pytest.approx(t["alpha"].iloc[0])
    # counts are whole numbers in the CSV (a float column wrote "8.0"), blank where there is no answer
    cells = [line.split(",")[-4::3] for line in (tables / "power.csv").read_text().splitlines()[1:]]
    assert all(re.fullmatch(r"\d*", c) for pair in cells for c in pair), cells
    assert any(c == "" for pair in cells for c in pair) and any(c for pair in cells for c in pair)
    md = (tables / "results.md").read_text()
    assert "## Power of the paired comparisons" in md and "eval_sampled" in md and "0.0125" not in md.split("##")[0]
    assert res.table.set_index("method").loc["central", "eval_sampled_exact"] == pytest.approx(
        np.mean([np.mean(made[f"central{s}"][1]) for s in ("", ".seed1", ".seed2")])
    )


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_a_study_without_sampled_answers_keeps_its_tables(tmp_path: Path) -> None:
    """No eval_sampled rows where no run drew sampled answers (the demo's tables stay as they were); a study with
    neither a baseline nor central has no power table, and a stale one is removed."""
    study, _ = _study(tmp_path, sampled=False)
    res = figures.make_figures("pc", tmp_path / "results", verbose=False)
    assert "eval_sampled" not in set(res.paired["metric"]) and "eval_sampled" not in set(res.power["metric"])
    assert "eval_sampled_exact" not in res.table.columns
    assert (study / "tables" / "power.csv").is_file()
    for folder in ("baseline", "central", "baseline.seed1", "central.seed1", "baseline.seed2", "central.seed2"):
        shutil.rmtree(study / "m" / folder)
    res = figures.make_figures("pc", tmp_path / "results", verbose=False)
    assert not len(res.power) and not (study / "tables" / "power.csv").exists()


@pytest.mark.parametrize(
    ("power", "needle"),
    [
        ({"difference": {"accuracy": 0.1}}, "figures.power.difference.accuracy"),
        ({"difference": {"quality": -0.1}}, "differences must be above 0"),
        ({"alpha": 0.9, "power": 0.8}, "must exceed"),
        ({"powr": 0.9}, "unknown key 'figures.power.powr'"),
    ],
)
def test_bad_power_settings_name_the_file_and_key(tmp_path: Path, power: dict, needle: str) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"figures": {"power": power}}))
    with pytest.raises(ConfigError, match=needle) as e:
        load_figures_power(spec)
    assert str(spec) in str(e.value)


# ------------------------------------------------------------------------------------------- the command


def _study_file(tmp_path: Path, **extra: object) -> Path:
    f = tmp_path / "plan.yaml"
    body = {"name": "plan", "models": ["tiny"], "methods": ["baseline", "central", "random", "first"],
            "stages": ["generate", "select", "sft", "dpo", "eval"], "seeds": [1, 2, 3]}  # fmt: skip
    f.write_text(yaml.safe_dump({"study": body, "eval": {"max_samples": 5, "sampled": {"k": 4}}, **extra}))
    return f


def test_power_command_from_given_sds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = _study_file(tmp_path)
    assert main(["power", "--study", str(f), "--sd", "eval_exact=0.2", "eval_sampled=0.3", "--seed-sd",
                 "eval_sampled=0.02", "--difference", "eval_sampled=0.1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    from selftrain.cli.power import plan_power

    table, settings, _ = plan_power(f, sds={"eval_exact": 0.2, "eval_sampled": 0.3}, seed_sds={"eval_sampled": 0.02},
                                    differences={"eval_sampled": 0.1})  # fmt: skip
    # tiny's default benchmark: every dataset of data/eval/en, 5 samples each (eval.max_samples)
    n = 5 * len(list((Path(__file__).resolve().parents[1] / "data" / "eval" / "en").glob("*.json")))
    row = table.set_index(["versus", "method", "metric"]).loc[("baseline", "central", "eval_sampled")]
    assert row["items"] == n and row["family"] == 3 and row["alpha"] == pytest.approx(0.05 / 3)
    assert row["mdd"] == pytest.approx(min_detectable_difference(0.3, n, 0.05 / 3))
    assert row["items_needed"] == items_needed(0.1, 0.3, 0.05 / 3) and row["seeds"] == 3
    assert row["seeds_needed"] == items_needed(0.1, 0.02, 0.05 / 3)
    ctl = table[table["versus"] == "central"]
    assert set(ctl["method"]) == {"random", "first"} and (ctl["alpha"] == 0.025).all()
    assert f"{row['mdd']:.3f}" in out and "Bonferroni" in out and "eval_sampled 0.1" in out


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_power_command_reads_a_pilot_and_refuses_what_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    study, _ = _study(tmp_path)
    pilot = figures.make_figures("pc", tmp_path / "results", verbose=False).power
    f = _study_file(tmp_path)
    from selftrain.cli.power import plan_power

    table, _, source = plan_power(f, pilot=study)
    row = table.set_index(["versus", "method", "metric"]).loc[("baseline", "central", "eval_sampled")]
    want = pilot.set_index(["versus", "method", "metric"]).loc[("baseline", "central", "eval_sampled")]
    assert row["sd"] == pytest.approx(want["sd"]) and row["sd_from"] == "pilot: same comparison, other model"
    assert row["seed_sd"] == pytest.approx(want["seed_sd"]) and str(study) in source
    # Nothing to read the SDs from: one line naming what to give.
    assert main(["power", "--study", str(f)]) == 2
    assert "give --sd metric=value or --pilot" in capsys.readouterr().err
    # An SD for a metric the study does not score (no judge stage) stands in for none of those it does.
    assert main(["power", "--study", str(f), "--sd", "quality=1", "eval_exact=0.2"]) == 2
    assert "no standard deviation for eval_sampled" in capsys.readouterr().err
    assert main(["power", "--study", str(f), "--sd", "eval_exact=-1", "nonsense=2"]) == 2
    err = capsys.readouterr().err
    assert "eval_exact=-1 nonsense=2" in err and err.count("\n") == 1
    alone = tmp_path / "alone.yaml"
    alone.write_text(yaml.safe_dump({"study": {"name": "a", "models": ["tiny"], "methods": ["central", "original"]}}))
    assert main(["power", "--study", str(alone), "--sd", "quality=1"]) == 2
    assert "no paired comparison" in capsys.readouterr().err
