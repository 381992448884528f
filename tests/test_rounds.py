"""Self-training in rounds (study.rounds): the params of each round and of a one-round study, prompt slices, the
chain through the runner on the tiny model (round 2's candidates from round 1's model, a killed round 2 resumed,
rounds.start m0), every drift monitor against an independent computation, stage 07's rounds table and collapse
flag, and the Slurm chain."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from selftrain import drift, figures
from selftrain.cli.status import status_lines
from selftrain.config import ConfigError, dump_config, resolve_run_config
from selftrain.data import run_prompt_set
from selftrain.figures.collect import plain_rows
from selftrain.figures.rounds import BAND, collapse_flags
from selftrain.generate import generation_key
from selftrain.io import DataError, read_jsonl, sha256_json
from selftrain.models import model_fingerprint
from selftrain.runner import _chain, run_study
from selftrain.runs import create_run, round_config, run_parent
from selftrain.schema import split_round

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, name: str = "r", extra: dict | None = None, **study: object) -> Path:
    body = {"name": name, "models": ["tiny"], "methods": ["baseline", "central"], **study}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"study": body, "prompts": {"limit": 2}, **(extra or {})}))
    return path


# ------------------------------------------------------------------------------------------- params


def test_one_round_leaves_params_and_folders_as_they_were(tmp_path: Path) -> None:
    plain = _study(tmp_path, "p")
    one = _study(tmp_path, "p1", {"rounds": {"prompts": "disjoint", "start": "m0"}}, rounds=1)
    for method in ("baseline", "central"):
        a = resolve_run_config("tiny", method, plain)
        b = resolve_run_config("tiny", method, one)
        text = dump_config(b)
        assert "round" not in yaml.safe_load(text) and "rounds" not in yaml.safe_load(text)
        assert text.replace("study: p1", "study: p") == dump_config(a)
        assert run_parent(b).name == method and b.round is None
        assert sha256_json(a.model_dump(mode="json")) == sha256_json(
            resolve_run_config("tiny", method, plain).model_dump(mode="json")
        )


def test_each_round_has_its_folder_stages_and_model(tmp_path: Path) -> None:
    study = _study(tmp_path, extra={"rounds": {"assess": "last"}}, rounds=3)
    base = resolve_run_config("tiny", "baseline", study)
    assert base.round is None and run_parent(base).name == "baseline"  # baseline is not retrained: no rounds
    one = resolve_run_config("tiny", "central", study)
    assert (one.round.index, one.round.of, one.round.m0, one.round.previous) == (1, 3, "tiny:", None)
    assert run_parent(one).name == "central@round=1" and split_round("round=1") == (1, "")
    assert "judge" not in one.stages and "eval" not in one.stages  # assess: last
    prev = (str(tmp_path / "central@round=2" / "v001"), str(tmp_path / "final"))
    three = resolve_run_config("tiny", "central", study, round_index=3, previous=prev)
    assert three.model.path == prev[1] and three.round.previous == prev[0] and three.round.m0 == "tiny:"
    assert three.stages[-2:] == ["judge", "eval"]  # the last round is assessed
    closing = resolve_run_config("tiny", "central", study, round_index=4, previous=prev)
    assert closing.stages == ["generate", "select"] and run_parent(closing).name == "central@round=4"
    assert yaml.safe_load(dump_config(closing))["round"]["index"] == 4
    with pytest.raises(ConfigError, match="rounds 1..3"):
        resolve_run_config("tiny", "central", study, round_index=5, previous=prev)
    with pytest.raises(ConfigError, match="round 2's run"):
        resolve_run_config("tiny", "central", study, round_index=3)
    with pytest.raises(ConfigError, match="baseline is not retrained"):
        resolve_run_config("tiny", "baseline", study, round_index=2, previous=prev)
    with pytest.raises(ConfigError, match="needs prompts.limit"):
        resolve_run_config("tiny", "central", study, overrides=["prompts.limit=null"])
    with pytest.raises(ConfigError, match="starts from round 1's final model, which is not there"):
        round_config(2, "tiny", "central", study, [f"output.results_dir={tmp_path / 'none'}"])


def test_prompt_slices_and_the_held_out_slice(prompts_file: Path, tmp_path: Path) -> None:
    ov = [f"prompts.path={prompts_file}", "rounds.heldout=1"]
    study = _study(tmp_path, rounds=2)
    ids = lambda cfg, held=False: [p["id"] for p in run_prompt_set(cfg, heldout=held)[0]]  # noqa: E731
    same = resolve_run_config("tiny", "central", study, ov)
    assert ids(same) == ["p1", "p2"] and ids(same, True) == ["p3"]
    disjoint = [*ov, "rounds.prompts=disjoint", "prompts.limit=1"]
    one = resolve_run_config("tiny", "central", study, disjoint)
    two = resolve_run_config("tiny", "central", study, disjoint, round_index=2, previous=("a", "tiny:"))
    assert ids(one) == ["p1"] and ids(two) == ["p2"]
    assert ids(one, True) == ids(two, True) == ["p4"]  # after round 1, round 2 and the closing generation's slices
    with pytest.raises(DataError, match="5 records; records 6..6 are asked for"):
        run_prompt_set(resolve_run_config("tiny", "central", study, [*ov, "rounds.prompts=disjoint"]), heldout=True)
    assert ids(resolve_run_config("tiny", "central", overrides=ov)) == ["p1", "p2", "p3", "p4", "p5"]


def test_chain_order_and_the_rounds_asked_for() -> None:
    assert _chain(1, None) == [None] and _chain(1, [1]) == [None] and _chain(1, [2]) == []
    assert _chain(3, None) == [1, 2, 3, 4]
    assert _chain(3, [2]) == [2] and _chain(3, [3]) == [3, 4] and _chain(3, [1, 2]) == [1, 2]


# ------------------------------------------------------------------------------------------- monitors


def test_distinct_n_counts_by_hand() -> None:
    # words a b a b | a c: 1-grams a b a b a c (3 distinct of 6); 2-grams ab ba ab | ac (3 of 4, none across texts)
    assert drift.distinct_n(["a b a b", "a c"], 1) == 3 / 6
    assert drift.distinct_n(["a b a b", "a c"], 2) == 3 / 4
    assert drift.distinct_n(["x", ""], 2) is None


def test_pool_monitors_against_independent_computations() -> None:
    import sacrebleu

    from selftrain.select.similarity import chrf_sim

    texts = [
        ["the cat sat on the mat", "a cat sat on a mat", "dogs run fast in parks"],
        ["one two three", "", "one two four five"],
        ["only one", "", ""],  # a pool of one: left out of every pool mean
    ]
    valid = np.array([[bool(t.strip()) for t in row] for row in texts])
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(3, 3, 5))
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    cos = np.einsum("pjd,pkd->pjk", vec, vec)
    cent = rng.random((3, 3))
    target = np.array([1, 2, -1])
    got = drift.pool_monitors(texts, valid, cos, chrf_sim(texts), cent, target)

    pools = [[j for j in range(3) if valid[p, j]] for p in range(3)]
    scored = [p for p in range(3) if len(pools[p]) >= 2]
    pairs = {p: [(j, k) for j in pools[p] for k in pools[p] if j != k] for p in scored}

    def words(p: int, n: int) -> tuple[int, int]:
        grams = []
        for j in pools[p]:
            w = texts[p][j].split()
            grams += [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]
        return len(set(grams)), len(grams)

    for n in (1, 2):
        want = np.mean([words(p, n)[0] / words(p, n)[1] for p in scored])
        assert got[f"distinct_{n}"] == pytest.approx(want, abs=1e-5)
    want_cos = np.mean([np.mean([float(vec[p, j] @ vec[p, k]) for j, k in pairs[p]]) for p in scored])
    assert got["pool_cosine"] == pytest.approx(want_cos, abs=1e-5)
    chrf = sacrebleu.metrics.CHRF()
    want_chrf = np.mean(
        [np.mean([chrf.sentence_score(texts[p][j], [texts[p][k]]).score for j, k in pairs[p]]) for p in scored]
    )
    assert got["self_chrf"] == pytest.approx(want_chrf, abs=1e-3)
    margins = [cent[0, 1] - np.mean([cent[0, 0], cent[0, 2]]), cent[1, 2] - cent[1, 0]]  # prompt 2: no candidate target
    assert got["centrality_margin"] == pytest.approx(np.mean(margins), abs=1e-5)
    assert got["pools"] == 2


def test_length_and_eos_share_against_the_records() -> None:
    from selftrain.generate import summarise

    recs = pd.DataFrame(
        {"finish_reason": ["stop", "length", "stop", "stop"], "num_tokens": [3, 12, 5, 8], "text": ["a", "b", " ", "c"]}
    )
    s = summarise(recs)
    assert s["eos_share"] == 3 / 4 and s["mean_tokens"] == (3 + 12 + 5 + 8) / 4 and s["empty_candidates"] == 1


def test_perplexity_against_the_model_loss(tiny_model: Path, prompts_file: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selftrain.data import load_prompts

    prompts = load_prompts(prompts_file)
    got = drift.perplexity(tiny_model, prompts, 512)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for p in prompts:
        prompt = tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        resp = tok(p["original"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([list(prompt) + resp])
        labels = torch.tensor([[-100] * len(prompt) + resp])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss  # transformers' own shifted cross-entropy
        total += float(loss) * len(resp)
        count += len(resp)
    assert got["tokens"] == count and got["prompts"] == len(prompts) and got["skipped_long"] == 0
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert drift.perplexity(tiny_model, prompts, 20)["skipped_long"] == len(prompts)


# ------------------------------------------------------------------------------------------- stage 07


def test_collapse_flag_by_diversity_and_by_quality() -> None:
    rows = [
        {"round": 0, "distinct_1": 0.8, "distinct_2": 0.9, "pool_cosine": 0.6, "self_chrf": 30.0, "overall": 2.0},
        {"round": 1, "distinct_1": 0.7, "distinct_2": 0.8, "pool_cosine": 0.65, "self_chrf": 35.0, "overall": 1.9},
        {"round": 2, "distinct_1": 0.7, "distinct_2": 0.44, "pool_cosine": 0.85, "self_chrf": 36.0, "overall": 1.5},
        {"round": 3, "distinct_1": 0.7, "distinct_2": 0.8, "pool_cosine": 0.7, "self_chrf": 40.0, "overall": 1.4},
    ]
    df = pd.DataFrame([{"model": "m", "method": "central", "sweep": "", "seed": None, **r} for r in rows])
    params = {("m", "central", "", None): {"rounds": {"collapse_fraction": 0.5, "quality_sd": 0.2}}}
    flags = collapse_flags(df, params)
    assert flags[0] == "" and flags[1] == ""
    # distinct-2 0.44 < 0.5 x 0.9; 1 - 0.85 = 0.15 < 0.5 x 0.4; quality 1.5 is within 2.0 - 2.83 x 0.2 = 1.43
    assert "distinct_2" in flags[2] and "pool_cosine" in flags[2] and "quality" not in flags[2]
    assert flags[3].startswith("quality 1.40 < round 0's 2.00") and f"{BAND:.2f}" in flags[3]
    none = {("m", "central", "", None): {"rounds": {"collapse_fraction": 0.5, "quality_sd": None}}}
    assert "quality" not in collapse_flags(df, none)[3]  # no spread: quality is not flagged
    # with seeds, round 0's own spread: sd(2.0, 2.6) = 0.42, band 1.2: 1.4 inside the first chain's, 1.3 outside
    seeds = pd.concat([df.assign(seed=1.0), df.assign(seed=2.0, overall=[2.6, 2.5, 2.1, 1.3])], ignore_index=True)
    flags = collapse_flags(seeds, {("m", "central", "", s): none[("m", "central", "", None)] for s in (1, 2)})
    assert "quality" not in flags[3] and "quality" in flags[7]


def _fake_run(d: Path, stages: list[str], metrics: dict[str, dict], round_: dict | None = None) -> None:
    for sub in ("metrics", "stages"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    params = {"study": "fx", "stages": stages, "seed": 1234, **({"round": round_} if round_ else {})}
    if round_:
        params["rounds"] = {"collapse_fraction": 0.5, "quality_sd": 0.1}
    (d / "params.resolved.yaml").write_text(yaml.safe_dump(params))
    (d / "manifest.json").write_text(json.dumps({"stages": {s: {"status": "done"} for s in stages}}))
    for s in stages:
        (d / "stages" / s).mkdir(exist_ok=True)
        (d / "stages" / s / "_SUCCESS").write_text("{}")
    for name, data in metrics.items():
        (d / "metrics" / name).write_text(json.dumps(data))


def _judge(q: float) -> dict:
    return {"quality": {"criteria": {"overall": {"mean": q, "ci_low": q - 0.1, "ci_high": q + 0.1, "n": 4}}},
            "safety": {"criteria": {"safety": {"mean": 3.0, "ci_low": 2.9, "ci_high": 3.1, "n": 4}}}}  # fmt: skip


def _cands(tokens: float, d2: float) -> dict[str, dict]:
    gen = {"candidates": 8, "mean_tokens": tokens, "eos_share": 0.5, "drift": {"perplexity": tokens * 2}}
    sel = {"prompts": 2, "decisions": {}, "sft_examples": 2, "dpo_pairs": 2,
           "drift": {"distinct_1": 0.9, "distinct_2": d2, "pool_cosine": 0.5, "self_chrf": 20.0,
                     "centrality_margin": 0.01}}  # fmt: skip
    return {"generate.json": gen, "select.json": sel}


@pytest.mark.integration  # a whole study's figure set drawn and saved (stage 07 end to end): seconds
def test_rounds_table_reads_each_model_from_its_two_runs(tmp_path: Path) -> None:
    study = tmp_path / "results" / "fx"
    m = study / "tiny"
    full = ["generate", "select", "sft", "judge", "eval"]
    _fake_run(m / "baseline" / "v001", ["generate", "judge", "eval"],
              {"judge.json": _judge(2.0), "eval.json": {"avg": 0.3, "categories": {}}})  # fmt: skip
    for r, (tokens, d2, q) in enumerate([(10, 0.8, 1.9), (20, 0.3, 1.2)], start=1):
        metrics = {**_cands(tokens, d2), "judge.json": _judge(q), "eval.json": {"avg": 0.3 - r / 10, "categories": {}}}
        _fake_run(m / f"central@round={r}" / "v001", full, metrics, {"index": r, "of": 2, "m0": "tiny:"})
    _fake_run(m / "central@round=3" / "v001", ["generate", "select"], _cands(30, 0.2), {"index": 3, "of": 2})
    res = figures.make_figures("fx", tmp_path / "results", verbose=False)
    t = res.rounds
    assert list(t["round"]) == [0, 1, 2] and set(t["method"]) == {"central"}
    assert list(t["mean_tokens"]) == [10, 20, 30] and list(t["heldout_perplexity"]) == [20, 40, 60]
    assert list(t["overall"]) == [2.0, 1.9, 1.2] and list(t["eval_avg"]) == pytest.approx([0.3, 0.2, 0.1])
    assert list(t["candidates_from"]) == [f"tiny/central@round={r}/v001" for r in (1, 2, 3)]
    assert list(t["scores_from"]) == ["tiny/baseline/v001", "tiny/central@round=1/v001", "tiny/central@round=2/v001"]
    # M_1: distinct-2 0.3 < 0.5 x 0.8, quality 1.9 within 2.0 - 2.83 x 0.1; M_2: both below
    assert t["collapse"].iloc[0] == "" and t["collapse"].iloc[1].startswith("distinct_2 0.3 ")
    assert "quality" not in t["collapse"].iloc[1] and "quality 1.20" in t["collapse"].iloc[2]
    assert list(t["quality_floor"]) == pytest.approx([2.0 - BAND * 0.1] * 3)
    assert set(res.table["sweep"]) == {"", "round=1", "round=2"}  # the closing generation is no results row
    assert list(plain_rows(res.table)["sweep"]) == ["", "round=2"]  # the bars: baseline and each last round
    assert (study / "tables" / "rounds.csv").is_file() and (study / "figures" / "rounds.png").is_file()
    assert "collapse" in (study / "tables" / "rounds.md").read_text()


# ------------------------------------------------------------------------------------------- the chain, for real


def test_two_rounds_on_the_tiny_model_chain_resume_after_a_kill(tiny_overrides: list[str], tmp_path: Path) -> None:
    study = tmp_path / "chain.yaml"
    study.write_text(yaml.safe_dump({
        "study": {"name": "chain", "models": ["tiny"], "methods": ["central"], "rounds": 2,
                  "stages": ["generate", "select", "sft"]},
        "prompts": {"limit": 3}, "rounds": {"heldout": 2}, "training": {"order": "sft"},
    }))  # fmt: skip
    root = tmp_path / "results" / "chain" / "tiny"
    r1, r2, r3 = (root / f"central@round={r}" / "v001" for r in (1, 2, 3))
    cmd = [sys.executable, "-m", "selftrain", "run", "--study", str(study), "--quiet"]
    cmd += [x for o in tiny_overrides for x in ("--set", o)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 480
    while not (r2 / "stages" / "generate" / "_SUCCESS").is_file():
        assert proc.poll() is None and time.time() < deadline, "the study ended or stalled before round 2's stage 01"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # runner and kernel, in round 2
    proc.wait()
    assert not (r2 / "stages" / "sft" / "_SUCCESS").is_file()
    # `selftrain status` follows the chain: round 1 done, round 2 cut off in training, the closing one waiting
    report = "\n".join(status_lines(str(study), tiny_overrides))
    assert "tiny/central@round=1: complete" in report and "tiny/central@round=2: incomplete" in report, report
    assert "tiny/central@round=3: not started (round 2 has not finished training)" in report, report

    res = run_study(str(study), overrides=tiny_overrides, log=lambda _: None)
    report = "\n".join(status_lines(str(study), tiny_overrides))
    assert [f"tiny/central@round={r}: complete" in report for r in (1, 2, 3)] == [True] * 3, report
    assert [r.run_dir for r in res] == [r1, r2, r3] and all(r.ok for r in res), [r.error for r in res]
    assert res[0].executed == [] and res[1].skipped == ["generate"] and res[1].executed == ["select", "sft"]
    assert res[2].executed == ["generate", "select"]  # the closing generation: the last model's candidates
    assert not (root / "central@round=2" / "v002").exists()  # the killed round resumed its own version

    final1 = Path(json.loads((r1 / "metrics" / "sft.json").read_text())["model_path"])
    final2 = Path(json.loads((r2 / "metrics" / "sft.json").read_text())["model_path"])
    assert "central@round=1" in str(final1) and final1.is_dir()
    cfg2 = round_config(2, "tiny", "central", study, tiny_overrides)
    assert cfg2.model.path == str(final1) and cfg2.round.previous == str(r1)
    g1, g2, g3 = (json.loads((d / "metrics" / "generate.json").read_text()) for d in (r1, r2, r3))
    assert g2["drift"]["model"] == str(final1) == g2["model_folder"]
    assert g2["drift"]["model_fingerprint"] == sha256_json(model_fingerprint(final1))
    prompts = run_prompt_set(cfg2)[0]
    key = generation_key(final1, prompts, cfg2.generation, "transformers", cfg2.model.max_model_len, 1, "float32")
    assert g2["key"] == key != g1["key"]  # round 2's generation is cached under round 1's model
    assert g3["drift"]["model"] == str(final2)
    assert read_jsonl(r2 / "data" / "candidates.jsonl") != read_jsonl(r1 / "data" / "candidates.jsonl")
    assert json.loads((r2 / "metrics" / "sft.json").read_text())["started_from"] == str(final1)
    for d in (r1, r2, r3):  # every monitor is there
        assert g1["drift"]["perplexity"] > 0 and g1["drift"]["prompts"] == 2
        sel = json.loads((d / "metrics" / "select.json").read_text())["drift"]
        assert set(sel) >= {"distinct_1", "distinct_2", "pool_cosine", "self_chrf", "centrality_margin"}
    t = figures.make_figures("chain", tmp_path / "results", study_file=study, verbose=False).rounds
    assert list(t["round"]) == [0, 1, 2] and t["heldout_perplexity"].notna().all()


def test_start_m0_trains_m0_on_the_accumulated_data(
    tiny_overrides: list[str], tiny_model: Path, tmp_path: Path
) -> None:
    from selftrain import generate, select, train

    study = _study(tmp_path, "acc", {"rounds": {"start": "m0", "heldout": 1}, "training": {"order": "sft"}},
                   methods=["central"], rounds=2, stages=["generate", "select", "sft"])  # fmt: skip
    ov = [*tiny_overrides, "prompts.limit=2"]
    runs = []
    for index in (1, 2):
        run = create_run(round_config(index, "tiny", "central", study, ov))
        generate.run(run, progress=False)
        select.run(run, progress=False)
        train.sft(run, progress=False)
        runs.append(run)
    one, two = (json.loads((r.metrics_dir / "sft.json").read_text()) for r in runs)
    assert two["started_from"] == str(tiny_model) == one["started_from"]  # M0 both times
    assert json.loads((runs[1].metrics_dir / "generate.json").read_text())["drift"]["model"] == one["model_path"]
    own = read_jsonl(runs[0].data_dir / "sft.jsonl")
    both = read_jsonl(runs[1].data_dir / "sft.jsonl")
    assert two["examples"] == len(both) == 2 * len(own) and both[: len(own)] == own
    sel = json.loads((runs[1].metrics_dir / "select.json").read_text())
    assert sel["earlier_rounds"]["sft_examples"] == len(own) and sel["sft_examples"] == len(both)
    assert str(runs[0].data_dir / "sft.jsonl") in runs[1].stage_record("select")["inputs"]


# ------------------------------------------------------------------------------------------- Slurm


def test_slurm_chains_the_rounds(tmp_path: Path) -> None:
    from selftrain.cli.slurm import render

    files = render(str(_study(tmp_path, "sl", rounds=3)))
    submit = files["submit.sh"].splitlines()
    assert (
        'cells=$(sbatch --parsable --kill-on-invalid-dep=yes --dependency=afterok:"$gen" '
        "results/sl/slurm/cells.sbatch 1)"
    ) in submit
    assert 'cells=$(sbatch --parsable --dependency=aftercorr:"$cells" results/sl/slurm/cells.sbatch 2)' in submit
    assert 'cells=$(sbatch --parsable --dependency=aftercorr:"$cells" results/sl/slurm/cells.sbatch 3)' in submit
    assert '--rounds "$round"' in files["cells.sbatch"] and "--stages generate" in files["generate.sbatch"]
    assert files["generate.sbatch"].rstrip().splitlines()[-2].endswith("--rounds 1")
    for name, text in files.items():
        p = tmp_path / name
        p.write_text(text)
        assert subprocess.run(["bash", "-n", str(p)]).returncode == 0, name
    task = files["cells.sbatch"].split("set -eo pipefail")[1].replace("python -m selftrain", "echo")
    out = subprocess.run(["bash", "-c", task, "cells", "2"], env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"},
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert out.stdout.split()[-3:] == ["central", "--rounds", "2"], out.stdout + out.stderr
    plain = render(str(_study(tmp_path, "pl")))
    assert "--rounds" not in plain["cells.sbatch"] and "aftercorr" not in plain["submit.sh"]
    sharded = _study(tmp_path, "sh", {"eval": {"shards": 2}}, rounds=2)
    with pytest.raises(ConfigError, match="sharded judge / eval"):
        render(str(sharded))
