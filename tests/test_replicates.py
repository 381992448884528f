"""Replicate seeds (study.seeds), the across-seed spread in stage 07's tables and figures, the reference check
(`selftrain compare`), the hardware and numerics recorded per stage, and `numerics: exact` byte for byte."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from selftrain import figures, generate, select, train
from selftrain.cli import main
from selftrain.config import ConfigError, dump_config, load_study, resolve_run_config
from selftrain.figures.compare import BAND, compare
from selftrain.inference import inference_dtype
from selftrain.io import read_jsonl
from selftrain.runner import run_study
from selftrain.runs import create_run, run_parent
from selftrain.schema import QUALITY, split_run_folder

STAGES = ["generate", "select", "sft", "dpo", "judge", "eval"]


# ------------------------------------------------------------------------------------------- config


def test_replicate_seed_sets_every_seed_and_names_the_folder() -> None:
    cfg = resolve_run_config("tiny", "central", replicate=7)
    assert (cfg.seed, cfg.generation.seed, cfg.judge.answers.seed, cfg.replicate) == (7, 7, 7, 7)
    assert run_parent(cfg).name == "central.seed7"
    own = resolve_run_config("tiny", "central", replicate=1234)  # the params' own seeds: the plain run
    assert own.replicate is None and run_parent(own).name == "central"
    assert dump_config(own) == dump_config(resolve_run_config("tiny", "central"))
    assert split_run_folder("drop-low.seed12") == ("drop-low", 12) and split_run_folder("drop-low") == (
        "drop-low",
        None,
    )


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ({"sweep": {"n": [1, 2]}}, "not a dotted param name"),
        ({"sweep": {"selection.n": []}}, "distinct values"),
        ({"sweep": {"selection.method": ["a/b"]}}, "cannot name a folder"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"seeds": [-3]}, "distinct"),
        ({"seeds": "x"}, "study.seeds"),
        ({"seeds": [1], "methods": ["central.seed3"]}, "cannot end in .seed"),
    ],
)
def test_bad_seeds_are_named(tmp_path: Path, block: dict, needle: str) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"study": {"name": "s", "models": ["tiny"], "methods": ["central"], **block}}))
    with pytest.raises(ConfigError, match=needle) as e:
        load_study(f)
    assert str(f) in str(e.value)


# ------------------------------------------------------------------------------------------- running


@pytest.mark.notebook
def test_a_study_with_two_seeds_and_a_sweep_runs_four_cells(tiny_overrides: list[str], tmp_path: Path) -> None:
    study = tmp_path / "seeds.yaml"
    body = {"name": "seeds", "models": ["tiny"], "methods": ["central"], "stages": ["generate", "select"]}
    body |= {"seeds": [1234, 7], "sweep": {"selection.n": [1, 3]}}
    study.write_text(yaml.safe_dump({"study": body, "prompts": {"limit": 4}}))
    res = run_study(str(study), overrides=tiny_overrides, log=lambda _: None)
    assert [r.ok for r in res] == [True] * 4, [r.error for r in res]
    names = [
        "central@selection.n=1",
        "central@selection.n=3",
        "central@selection.n=1.seed7",
        "central@selection.n=3.seed7",
    ]
    assert [r.run_dir.parent.name for r in res] == names
    a, b = (read_jsonl(res[i].run_dir / "data" / "candidates.jsonl") for i in (1, 3))
    assert [x["seed"] for x in b] == [7] * len(b) and [x["text"] for x in a] != [x["text"] for x in b]
    assert read_jsonl(res[0].run_dir / "data" / "candidates.jsonl") == a  # one generation serves every n
    one = read_jsonl(res[0].run_dir / "data" / "selection.jsonl")
    assert all(len(r["centrality"]) == 2 for r in one)  # n=1: one candidate + the original
    cfg = yaml.safe_load((res[2].run_dir / "params.resolved.yaml").read_text())
    assert cfg["sweep"] == {"selection.n": 1} and cfg["selection"]["n"] == 1 and cfg["replicate"] == 7
    res = [res[1], res[3]]
    m = json.loads((res[1].run_dir / "manifest.json").read_text())
    assert m["seeds"] == {"seed": 7, "generation": 7, "judge_answers": 7, "replicate": 7}
    for stage in ("generate", "select"):  # what changes numbers across machines, per stage
        num = m["stages"][stage]["numerics"]
        assert num["mode"] == "default" and num["backend"] == "transformers"
        assert num["dtype"] == inference_dtype("float32", "transformers") == "float32"  # tiny pins float32
    # --seeds picks a subset: only the seed-7 cells, already done.
    again = run_study(str(study), overrides=tiny_overrides, seeds=[7], log=lambda _: None)
    assert len(again) == 2 and again[1].run_dir == res[1].run_dir and again[1].executed == []


# ------------------------------------------------------------------------------------------- numerics


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.notebook
def test_numerics_exact_is_float32_and_byte_identical_twice(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = resolve_run_config("tiny", "central", overrides=[*tiny_overrides, "numerics=exact", "prompts.limit=4"])
    assert cfg.model.dtype == "float32" and cfg.generation.backend == "transformers"
    assert cfg.training.sft["bf16"] is False and cfg.eval.backend == "transformers"
    with pytest.raises(ConfigError, match="numerics 'exact' runs float32"):
        resolve_run_config("tiny", "central", overrides=["numerics=exact", "training.sft.bf16=true"])
    digests = []
    for attempt in range(2):
        ov = [
            *tiny_overrides, "numerics=exact", "prompts.limit=4", "generation.seed=4321",
            f"output.results_dir={tmp_path / f'r{attempt}'}", f"output.checkpoints_dir={tmp_path / f'c{attempt}'}",
        ]  # fmt: skip
        run = create_run(resolve_run_config("tiny", "central", overrides=ov))
        shutil.rmtree(Path(run.config.output.cache_dir) / "generations", ignore_errors=True)  # computed, not cached
        shutil.rmtree(Path(run.config.output.cache_dir) / "embeddings", ignore_errors=True)
        generate.run(run, progress=False)
        select.run(run, progress=False)
        train.train_stage(run, "sft", progress=False)
        stages = run.manifest()["stages"]
        assert stages["sft"]["numerics"]["dtype"] == "float32" and stages["sft"]["numerics"]["mode"] == "exact"
        numerics = {"mode": "exact", "dtype": "float32", "backend": "transformers", "top_p": "transformers"}
        assert stages["generate"]["numerics"] == numerics
        files = [
            run.data_dir / "candidates.jsonl",
            run.data_dir / "selection.jsonl",
            run.final_model() / "model.safetensors",
        ]
        digests.append([_digest(f) for f in files])
    assert digests[0] == digests[1]


# ------------------------------------------------------------------------------------------- stage 07


def _run_folder(root: Path, model: str, folder: str, version: str, q: float, s: float, avg: float,
                cpu: str = "AMD EPYC") -> Path:  # fmt: skip
    """A complete synthetic run folder with judge quality/safety means q/s and eval AVG `avg`."""
    method, rep = split_run_folder(folder)
    d = root / model / folder / version
    for sub in ("data", "metrics", "figures", "notebooks", "stages"):
        (d / sub).mkdir(parents=True)
    cfg = resolve_run_config("tiny", method, replicate=rep)
    cfg.model.name, cfg.study, cfg.stages = model, root.name, STAGES
    (d / "params.resolved.yaml").write_text(dump_config(cfg))
    stages = {}
    for st in STAGES:
        rec = {"status": "done", "seconds": 1.0, "metrics": {}}
        stages[st] = rec
        (d / "stages" / st).mkdir()
        (d / "stages" / st / "_SUCCESS").write_text(json.dumps(rec))
    crit = {c: {"mean": q, "ci_low": q - 0.3, "ci_high": q + 0.3, "n": 16} for c in QUALITY}
    judge = {
        "quality": {"items": 16, "criteria": crit},
        "safety": {"items": 16, "criteria": {"safety": {"mean": s, "ci_low": s - 0.2, "ci_high": s + 0.2, "n": 16}}},
    }
    (d / "metrics" / "judge.json").write_text(json.dumps(judge))
    cats = {"QA": {"score": avg}, "MC": {"score": avg}}
    (d / "metrics" / "eval.json").write_text(json.dumps({"avg": avg, "categories": cats, "datasets": {}}))
    sel = {"prompts": 10, "decisions": {"central": 10}, "sft_examples": 10, "dpo_pairs": 9}
    (d / "metrics" / "select.json").write_text(json.dumps(sel))
    hw = {"cpu": {"model": cpu, "flags": ["avx512_bf16"]}, "gpus": []}
    (d / "manifest.json").write_text(json.dumps({"stages": stages, "hardware": hw}))
    return d


SEEDS = {"central": (2.0, 3.0, 0.30), "central.seed1": (2.4, 3.2, 0.34), "central.seed2": (2.2, 3.4, 0.32)}


def _seeded_study(root: Path) -> Path:
    study = root / "rep"
    for folder, (q, s, a) in SEEDS.items():
        _run_folder(study, "m", folder, "v001", q, s, a)
    _run_folder(study, "m", "baseline", "v001", 1.5, 3.1, 0.2)
    return study


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_tables_and_figures_show_the_mean_and_spread_over_seeds(tmp_path: Path) -> None:
    study = _seeded_study(tmp_path / "results")
    res = figures.make_figures("rep", tmp_path / "results", verbose=False)
    row = res.table.set_index("method").loc["central"]
    qs = [v[0] for v in SEEDS.values()]
    assert row["seeds"] == 3 and row["overall"] == pytest.approx(np.mean(qs))
    assert row["seed_sd_overall"] == pytest.approx(np.std(qs, ddof=1))
    assert row["seed_sd_eval_avg"] == pytest.approx(np.std([v[2] for v in SEEDS.values()], ddof=1))
    assert row["seed_sd_eval_QA"] == pytest.approx(row["seed_sd_eval_avg"])  # QA = avg in this tree
    assert res.table.set_index("method").loc["baseline", "seeds"] == 1
    assert math.isnan(res.table.set_index("method").loc["baseline", "seed_sd_overall"])
    j = res.judge[(res.judge["method"] == "central") & (res.judge["criterion"] == "safety")].iloc[0]
    assert j["seeds"] == 3 and j["seed_sd"] == pytest.approx(np.std([v[1] for v in SEEDS.values()], ddof=1))
    assert j["ci_low"] == pytest.approx(np.mean([v[1] - 0.2 for v in SEEDS.values()]))  # the item-level interval
    assert sorted(res.replicates[res.replicates["method"] == "central"]["seed"]) == [1, 2, 1234]
    md = (study / "tables" / "results.md").read_text()
    assert "quality sd (seeds)" in md and "Hardware differs" not in md
    assert (study / "tables" / "replicates.csv").is_file()
    # The judge figure marks each seed on the central bar: three dots per panel that has them.
    fig = figures.plot_judge(res)
    dots = [c for ax in fig.axes for c in ax.collections if len(c.get_offsets()) == 3]
    assert len(dots) == len(QUALITY) + 1  # five quality criteria + the safety mean


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_tables_say_when_hardware_differs(tmp_path: Path) -> None:
    study = tmp_path / "results" / "hw"
    _run_folder(study, "m", "central", "v001", 2.0, 3.0, 0.3, cpu="Intel Xeon (AMX)")
    _run_folder(study, "m", "baseline", "v001", 2.0, 3.0, 0.3, cpu="AMD EPYC")
    res = figures.make_figures("hw", tmp_path / "results", verbose=False)
    assert "Hardware differs between these rows" in (study / "tables" / "results.md").read_text()
    assert "hardware" in figures.main_display(res.table).columns


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_compare_flags_differences_outside_the_reference_spread(tmp_path: Path) -> None:
    study = _seeded_study(tmp_path / "results")
    sd = np.std([v[0] for v in SEEDS.values()], ddof=1)
    # A fresh plain run: quality moved by less than the band, safety by far more; baseline has one seed.
    _run_folder(study, "m", "central", "v002", 2.0 + 0.5 * BAND * sd, 3.0 + 10.0, 0.30)
    _run_folder(study, "m", "baseline", "v002", 1.6, 3.1, 0.2)
    cmp = compare("rep", tmp_path / "results")
    t = cmp.table.set_index(["method", "metric"])
    assert t.loc[("central", "overall"), "verdict"] == "inside"
    assert t.loc[("central", "overall"), "band"] == pytest.approx(BAND * sd)
    assert t.loc[("central", "safety"), "verdict"] == "outside"
    assert t.loc[("central", "eval_avg"), "verdict"] == "inside"  # no difference
    assert t.loc[("baseline", "overall"), "verdict"] == "no spread"
    assert t.loc[("central", "overall"), "reference_run"] == "m/central/v001"
    assert any("central.seed1: only v001, the reference itself" in n for n in cmp.notes)
    assert "outside: m/central seed 1234 safety" in cmp.summary()
    assert (study / "tables" / "compare.md").is_file()
    alone = tmp_path / "alone" / "rep"
    _run_folder(alone, "m", "central", "v001", 2.0, 3.0, 0.3)
    assert compare("rep", tmp_path / "alone").paths == [] and not (alone / "tables").exists()
    assert main(["compare", "--study", "rep", "--results-dir", str(tmp_path / "results")]) == 0
    assert main(["compare", "--study", "rep", "--results-dir", str(tmp_path / "results"), "--strict"]) == 1
    # A separate reference folder: its newest is irrelevant, its first complete version is the reference.
    ref = tmp_path / "ref" / "rep"
    shutil.copytree(study, ref)
    shutil.rmtree(ref / "m" / "central" / "v002")
    out = compare("rep", tmp_path / "results", ref).table
    out = out[out["seed"] == 1234].set_index(["method", "metric"])
    assert out.loc[("central", "safety"), "verdict"] == "outside"
    assert out.loc[("central", "overall"), "fresh_run"] == "m/central/v002"


def test_compare_says_where_another_dtype_ran(tmp_path: Path) -> None:
    """A fresh run on a CPU without native bf16 runs float32 where the reference ran bfloat16: compare names the
    stages, on the rows and in its summary, so an outside-band difference is read as possibly numerics."""
    study = _seeded_study(tmp_path / "results")
    fresh = _run_folder(study, "m", "central", "v002", 2.0, 3.0 + 10.0, 0.30)
    for d, dtype in ((study / "m" / "central" / "v001", "bfloat16"), (fresh, "float32")):
        m = json.loads((d / "manifest.json").read_text())
        for st in ("generate", "judge"):
            m["stages"][st]["numerics"] = {"mode": "default", "dtype": dtype, "backend": "vllm"}
        (d / "manifest.json").write_text(json.dumps(m))
    cmp = compare("rep", tmp_path / "results")
    row = cmp.table.set_index(["method", "metric"]).loc[("central", "safety")]
    assert row["verdict"] == "outside"
    assert row["dtype_changes"] == "generate bfloat16 -> float32; judge bfloat16 -> float32"
    text = cmp.summary()
    assert "[ran generate bfloat16 -> float32; judge bfloat16 -> float32]" in text
    assert "1 fresh run(s) ran another dtype than their reference" in text


# ------------------------------------------------------------------------------------------- paired, length


def _items(d: Path, quality: list[float], lengths: list[int], exact: list[bool]) -> None:
    rows = [{"set": "quality", "id": f"q{i}", "answer": "x" * n, "status": "ok", "scores": {"overall": q}}
            for i, (q, n) in enumerate(zip(quality, lengths, strict=True))]  # fmt: skip
    rows += [
        {"set": "safety", "id": f"s{i}", "answer": "", "status": "ok", "scores": {"safety": 3.0}} for i in range(5)
    ]
    (d / "data" / "judge_items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = [{"dataset": "qa", "index": i, "exact": e} for i, e in enumerate(exact)]
    preds.append({"dataset": "sts", "index": 0, "exact": None})  # a dataset without exact match: not paired
    (d / "data" / "eval_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_paired_differences_and_length_control(tmp_path: Path) -> None:
    """central = baseline + 0.5 on 40 shared items (plus noise): a clear paired effect, though each run's own
    interval is wide; drop-low = baseline exactly: p = 1. Length: central's lead is pure length here."""
    study = tmp_path / "results" / "pair"
    rng = np.random.default_rng(0)
    base_q = rng.uniform(1, 5, 40)
    runs = {
        "baseline": (base_q, [100] * 40, [True, False] * 10),
        "central": (base_q + 0.5 + rng.normal(0, 0.1, 40), [200] * 40, [True] * 20),
        "drop-low": (base_q, [100] * 40, [True, False] * 10),
    }
    for method, (q, n, e) in runs.items():
        d = _run_folder(study, "m", method, "v001", 2.0, 3.0, 0.3)
        _items(d, list(q), n, e)
    res = figures.make_figures("pair", tmp_path / "results", verbose=False)
    t = res.paired.set_index(["method", "metric"])
    c = t.loc[("central", "quality")]
    assert c["items"] == 40 and c["difference"] == pytest.approx(0.5, abs=0.05) and c["ci_low"] > 0.4
    assert c["p"] < 0.001 and c["p_holm"] >= c["p"]
    assert t.loc[("drop-low", "quality"), "difference"] == 0 and t.loc[("drop-low", "quality"), "p"] == 1.0
    assert t.loc[("central", "eval_exact"), "items"] == 20  # the sts sample has no exact match
    assert t.loc[("central", "eval_exact"), "difference"] == pytest.approx(0.5)
    assert t.loc[("central", "safety"), "difference"] == 0
    lt = res.lengths.set_index("method")
    assert lt.loc["central", "answer_chars"] == 200 and lt.loc["baseline", "answer_chars"] == 100
    # Every answer of central is longer, so the pooled slope takes its lead: controlled means come closer.
    raw_gap = lt.loc["central", "quality"] - lt.loc["baseline", "quality"]
    adj_gap = lt.loc["central", "quality_length_controlled"] - lt.loc["baseline", "quality_length_controlled"]
    assert abs(adj_gap) < abs(raw_gap)
    for name in ("paired", "length"):
        assert (study / "tables" / f"{name}.csv").is_file() and (study / "figures" / f"{name}.png").is_file()
    assert not res.controls.size and not (study / "tables" / "controls.csv").exists()  # no control arm here


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_control_arms_are_paired_against_central(tmp_path: Path) -> None:
    """random = central - 0.4 on the same 30 items: the controls table (control arm minus central, Holm across
    the arms) finds it; first = central exactly: p = 1; the baseline is not a control arm."""
    study = tmp_path / "results" / "ctl"
    rng = np.random.default_rng(3)
    central_q = rng.uniform(1, 5, 30)
    runs = {"baseline": central_q - 1.0, "central": central_q, "random": central_q - 0.4 + rng.normal(0, 0.05, 30),
            "first": central_q}  # fmt: skip
    for method, q in runs.items():
        d = _run_folder(study, "m", method, "v001", 2.0, 3.0, 0.3)
        _items(d, list(q), [100] * 30, [True] * 10)
    res = figures.make_figures("ctl", tmp_path / "results", verbose=False)
    t = res.controls.set_index(["method", "metric"])
    assert set(t.index.get_level_values("method")) == {"random", "first"}
    r = t.loc[("random", "quality")]
    assert r["difference"] == pytest.approx(-0.4, abs=0.05) and r["ci_high"] < -0.3 and r["p"] < 0.001
    assert t.loc[("first", "quality"), "difference"] == 0 and t.loc[("first", "quality"), "p"] == 1.0
    assert (study / "tables" / "controls.md").is_file()


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_sweep_points_become_rows_and_a_figure(tmp_path: Path) -> None:
    study = tmp_path / "results" / "sw"
    values = {1: (2.0, 2.2), 2: (2.5, 2.7), 4: (3.0, 3.2)}  # n -> quality of seeds 1234 and 1
    for n, (q0, q1) in values.items():
        _run_folder(study, "m", f"central@selection.n={n}", "v001", q0, 3.0, 0.3)
        _run_folder(study, "m", f"central@selection.n={n}.seed1", "v001", q1, 3.0, 0.3)
    _run_folder(study, "m", "baseline", "v001", 1.5, 3.0, 0.2)
    res = figures.make_figures("sw", tmp_path / "results", verbose=False)
    c = res.table[res.table["method"] == "central"]
    assert list(c["sweep"]) == ["selection.n=1", "selection.n=2", "selection.n=4"]  # numeric order
    assert list(c["overall"]) == pytest.approx([2.1, 2.6, 3.1]) and list(c["seeds"]) == [2, 2, 2]
    assert (study / "figures" / "sweep.png").is_file()
    fig = figures.plot_sweep(res)
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [1.0, 2.0, 4.0] and list(line.get_ydata()) == pytest.approx([2.1, 2.6, 3.1])
    # The bar figures show the plain runs: the baseline, and for central (sweep only) its first point.
    assert figures.plot_sweep(figures.collect(_seeded_study(tmp_path / "other"))) is None


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_sweep_points_get_their_own_rows_in_every_table(tmp_path: Path) -> None:
    """Per-item tables (paired, length) and the selection table have a row per sweep point, named in a `sweep`
    column (as the main Markdown table does); the pool the original is ranked in follows selection.n."""
    study = tmp_path / "results" / "swp"
    rng = np.random.default_rng(5)
    base_q = rng.uniform(1, 5, 20)
    for n, shift in ((2, 0.0), (4, 0.6)):
        d = _run_folder(study, "m", f"central@selection.n={n}", "v001", 2.0, 3.0, 0.3)
        params = yaml.safe_load((d / "params.resolved.yaml").read_text())
        params["selection"]["n"], params["generation"]["n"] = n, 4
        (d / "params.resolved.yaml").write_text(yaml.safe_dump(params))
        _items(d, list(base_q + shift), [100 + 50 * n] * 20, [True] * 5)
    _items(_run_folder(study, "m", "baseline", "v001", 1.5, 3.0, 0.2), list(base_q), [100] * 20, [True] * 5)
    res = figures.make_figures("swp", tmp_path / "results", verbose=False)
    paired = res.paired[res.paired["metric"] == "quality"].set_index("sweep")
    assert list(paired.index) == ["selection.n=2", "selection.n=4"]
    assert paired.loc["selection.n=2", "difference"] == 0 and paired.loc["selection.n=4", "difference"] == (
        pytest.approx(0.6)
    )
    lengths = res.lengths.set_index("sweep")
    assert lengths.loc["selection.n=4", "answer_chars"] == 300 and lengths.loc["selection.n=2", "items"] == 20
    sel = res.selection[res.selection["method"] == "central"]
    assert list(sel["sweep"]) == ["selection.n=2", "selection.n=4"] and list(sel["pool_size"]) == [3, 5]
    md = (study / "tables" / "results.md").read_text()
    assert "| sweep |" in md and "selection.n=4" in md
    assert "sweep" not in figures.collect(_seeded_study(tmp_path / "plain")).selection.columns
    shutil.rmtree(study / "m" / "baseline")  # without a baseline there is nothing to pair against
    res = figures.make_figures("swp", tmp_path / "results", verbose=False)
    assert not len(res.paired) and len(res.lengths) == 2


def test_a_rule_across_sections_names_the_sources_of_its_keys() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_run_config("smollm2-135m", "central", "params/studies/demo.yaml", ["selection.n=9"])
    msg = str(e.value)
    assert "command line (selection.n=9)" in msg and "demo.yaml" in msg  # generation.n comes from the study
    assert "base.yaml" not in msg and "methods/central.yaml" not in msg
