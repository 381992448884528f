"""The positive control: its task set (data/positive-control/make.py: disjoint splits, no training answer anywhere,
training prompts = the prompts stage 06 asks), its study file, and stage 06's exact match on k sampled answers
(eval.sampled) at the judge's answer sampling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selftrain import evaluate
from selftrain.config import ConfigError, load_study, resolve_run_config
from selftrain.evaluate import chat_turns, load_datasets
from selftrain.evaluate.protocols import load_protocol
from selftrain.io import read_jsonl
from selftrain.runs import create_run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "positive-control"
STUDY = ROOT / "params" / "studies" / "positive-control.yaml"


# ------------------------------------------------------------------------------------------- the task set


def test_the_generator_rewrites_the_committed_files_byte_for_byte(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(DATA / "make.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    have = [p.relative_to(DATA) for p in DATA.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert made == sorted(have)
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel


def test_splits_are_disjoint_and_the_training_split_carries_no_answer() -> None:
    sys.path.insert(0, str(DATA))
    import make

    train = read_jsonl(DATA / "train.jsonl")
    datasets, errors = load_datasets(DATA / "eval", [])
    assert not errors and {d.name for d in datasets} == set(make.KINDS)
    eval_inputs = {(d.name, s["input"]) for d in datasets for s in d.samples}
    shot_inputs = {(d.name, s["input"]) for d in datasets for s in d.few_shots}
    train_inputs = {(r["kind"], r["messages"][-2]["content"]) for r in train}
    assert len(train) == len(train_inputs) == make.TRAIN * len(make.KINDS)
    assert len(eval_inputs) == make.EVAL * len(make.KINDS)
    assert not (train_inputs & eval_inputs) and not (train_inputs & shot_inputs) and not (eval_inputs & shot_inputs)
    # The training answers are written nowhere: every record's assistant turn is the placeholder, and no training
    # item's gold appears as an assistant turn or in the evaluation files' answers for that input.
    assert {r["messages"][-1]["content"] for r in train} == {make.PLACEHOLDER}
    rng = __import__("random").Random(make.SEED)
    for kind, (_, _, template) in make.KINDS.items():
        got = make.items(kind, rng)
        for q, a in got[make.SHOTS : make.SHOTS + make.TRAIN]:
            ds = next(d for d in datasets if d.name == kind)
            assert template.format(q) not in {s["input"] for s in ds.samples}
            assert all(a != r["messages"][-1]["content"] for r in train)


def test_train_answers_are_each_training_prompts_own_answer() -> None:
    """make.train_answers() (for after-run checks only) pairs every training prompt id with the answer of the item
    that prompt asks: recomputed here from the prompt's own text for arithmetic, from the lists for the rest."""
    sys.path.insert(0, str(DATA))
    import make

    answers = make.train_answers()
    train = read_jsonl(DATA / "train.jsonl")
    assert set(answers) == {r["id"] for r in train}
    lists = {"capitals": dict(make._pairs(make.CAPITALS, False)), "antonyms": dict(make._pairs(make.ANTONYMS, True)),
             "past_tense": dict(make._pairs(make.VERBS, True))}  # fmt: skip
    for r in train:
        asked = r["messages"][-2]["content"]
        if r["kind"] in ("sums", "differences"):
            a, op, b = asked.split()
            assert answers[r["id"]] == str(int(a) + int(b) if op == "+" else int(a) - int(b)), r["id"]
        else:
            assert answers[r["id"]] == lists[r["kind"]][asked.split(": ", 1)[1]], r["id"]
        assert answers[r["id"]] not in json.dumps(r["messages"][-1]), r["id"]  # still written nowhere


def test_the_targets_bench_scores_targets_samples_and_the_majority(tmp_path: Path) -> None:
    """bench/positive_control_targets.py on a run folder written here: right shares by hand."""
    sys.path.insert(0, str(ROOT / "bench"))
    import positive_control_targets as pct

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    gold = {"sums-000": "80", "capitals-000": "Oslo"}
    texts = {"sums-000": ["80", "81", "80\n\nmore", "7"], "capitals-000": ["Bergen", "Oslo", "Bergen", "Oslo"]}
    (run / "data" / "candidates.jsonl").write_text("".join(
        json.dumps({"prompt_id": pid, "candidate_index": j, "text": t}) + "\n"
        for pid, row in texts.items() for j, t in enumerate(row)))  # fmt: skip
    (run / "data" / "selection.jsonl").write_text(
        json.dumps({"id": "sums-000", "target": 3}) + "\n" + json.dumps({"id": "capitals-000", "target": 1}) + "\n"
    )
    got = pct.score_run(run, gold)
    assert list(got["sample"]) == [0.5, 0.5]  # "80\n\nmore" is scored as "80", as stage 06 extracts it
    assert list(got["majority"]) == [1.0, 0.5]  # a tie between a right and a wrong answer counts half
    assert list(got["target"]) == [0.0, 1.0] and got["kind"] == ["sums", "capitals"]
    (run / "data" / "selection.jsonl").write_text(json.dumps({"id": "sums-000", "target": 4}) + "\n")
    with pytest.raises(SystemExit, match=r"selection.jsonl:1: target 4 is not one of the 4 candidates"):
        pct.score_run(run, gold)


def test_training_prompts_are_what_stage_06_asks_under_the_study(tiny_model: Path) -> None:
    """The training prompts are the evaluation prompts of other items: the same chat turns (the instruction as the
    system turn, the files' few-shots as earlier turns), so selection sharpens the very format the benchmark scores."""
    from selftrain.evaluate.stage import plan_predictions

    cfg = resolve_run_config("smollm2-135m", "central", STUDY)
    assert cfg.eval.chat_template and cfg.eval.chat_layout == "turns" and cfg.eval.protocol == "own"
    assert cfg.eval.sampled.k > 0
    protocol = load_protocol(cfg.eval)
    datasets, _ = load_datasets(cfg.eval.datasets_dir, cfg.eval.datasets)
    cfg.model.max_model_len = 4096  # the tiny tokenizer spends more tokens than SmolLM2's: nothing is shortened
    p = plan_predictions(tiny_model, cfg.model, cfg.eval, datasets, "transformers", 1234, protocol)
    asked = {(j["ds"].name, j["sample"]["input"]): turns for j, turns in zip(p.todo, p.inputs, strict=True)}
    assert len(asked) == sum(min(len(d.samples), cfg.eval.max_samples) for d in datasets)
    by_kind = {d.name: d for d in datasets}
    for (name, sample_input), turns in asked.items():
        assert turns == chat_turns(by_kind[name].instruction, by_kind[name].few_shots, sample_input)
    for r in read_jsonl(DATA / "train.jsonl"):
        ds, turns = by_kind[r["kind"]], r["messages"][:-1]
        assert turns == chat_turns(ds.instruction, protocol.few_shots(ds), turns[-1]["content"])


def test_the_study_file_names_its_arms_seeds_and_sizes() -> None:
    study, extra, _ = load_study(STUDY)
    assert study.methods == ["baseline", "central", "central-chrf", "random", "first"] and len(study.seeds) == 3
    assert "judge" not in study.stages and "eval" in study.stages
    chrf = resolve_run_config("smollm2-135m", "central-chrf", STUDY)
    assert (chrf.selection.method, chrf.selection.utility) == ("central", "chrf")
    cfg = resolve_run_config("smollm2-135m", "baseline", STUDY)
    assert cfg.prompts.path == "data/positive-control/train.jsonl"
    assert cfg.eval.datasets_dir == "data/positive-control/eval"


# ------------------------------------------------------------------------------------------- eval.sampled


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["eval.sampled.k=4", "eval.protocol=llm-jp-eval-1.3", "eval.llm_jp_eval_dir=/x"], "own only"),
        (["eval.sampled.k=4", "eval.shards=2"], "not sharded"),
        (["eval.sampled.k=-1"], "eval.sampled.k"),
        (["eval.sampled.n=3"], "unknown key 'eval.sampled.n'"),
        (["eval.chat_layout=turns"], "needs eval.chat_template true"),
    ],
)
def test_bad_sampled_settings_are_refused(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_run_config("tiny", "baseline", overrides=overrides)


def _eval_run(tiny_overrides: list[str], tmp_path: Path, bench: Path, name: str, extra: list[str]) -> object:
    """Stage 06 on the tiny model over `bench` (3 samples of each kind, 2 few-shots, asked as chat turns)."""
    ov = [*tiny_overrides, f"output.results_dir={tmp_path / name}", f"eval.datasets_dir={bench}",
          "eval.backend=transformers", "eval.max_samples=3", "eval.num_few_shots=2", "eval.chat_template=true",
          "eval.chat_layout=turns", *extra]  # fmt: skip
    run = create_run(resolve_run_config("tiny", "baseline", overrides=ov))
    evaluate.run(run, progress=False)
    return run


def test_sampled_answers_are_drawn_at_the_judges_sampling_and_scored(tiny_overrides: list[str], tmp_path: Path) -> None:
    """The real path (transformers, the tiny model). The benchmark's golds are set to the model's own greedy answers
    on half the samples, so exact match is not all 0. At judge.answers.temperature 0 the k sampled answers are the
    greedy one (the sampling comes from judge.answers, not stage 01's generation); at temperature 1 they follow
    judge.answers.seed; each record's share is the share of its k answers equal to the gold; without k, records and
    eval.json keep their shape."""
    bench = tmp_path / "bench"
    shutil.copytree(DATA / "eval", bench)
    plain = _eval_run(tiny_overrides, tmp_path, bench, "plain", ["eval.sampled.k=0"])
    recs = read_jsonl(plain.data_dir / "eval_predictions.jsonl")
    assert len(recs) == 15 and not any("sampled_exact" in r for r in recs)
    assert "sampled" not in json.loads((plain.metrics_dir / "eval.json").read_text())
    made_right = set()
    for path in bench.glob("*.json"):
        data = json.loads(path.read_text())
        for r in recs:
            if r["dataset"] == path.stem:  # even samples: the greedy answer ("" included); odd: one never given
                right = r["index"] % 2 == 0
                data["samples"][r["index"]]["output"] = r["prediction"] if right else "(never answered)"
                if right:
                    made_right.add((r["dataset"], r["index"]))
        path.write_text(json.dumps(data))

    greedy = _eval_run(tiny_overrides, tmp_path, bench, "t0", ["eval.sampled.k=3", "judge.answers.temperature=0"])
    recs = read_jsonl(greedy.data_dir / "eval_predictions.jsonl")
    assert {(r["dataset"], r["index"]) for r in recs if r["exact"]} == made_right
    for r in recs:
        assert r["sampled_predictions"] == [r["prediction"]] * 3
        assert r["sampled_exact"] == float(r["exact"])
    s = json.loads((greedy.metrics_dir / "eval.json").read_text())["sampled"]
    assert s["k"] == 3 and s["temperature"] == 0 and s["source"] == "judge.answers" and s["items"] == 15
    assert s["exact"] == s["greedy_exact"] == pytest.approx(len(made_right) / 15)
    for name, v in s["datasets"].items():
        assert v == pytest.approx(sum((name, i) in made_right for i in range(3)) / 3)
    assert greedy.manifest()["stages"]["eval"]["metrics"]["sampled_exact"] == s["exact"]

    def sampled(name: str, seed: int) -> list[dict]:
        drawn = ["eval.sampled.k=3", "judge.answers.temperature=1.0", "judge.answers.top_p=0.9",
                 f"judge.answers.seed={seed}"]  # fmt: skip
        run = _eval_run(tiny_overrides, tmp_path, bench, name, drawn)
        s = json.loads((run.metrics_dir / "eval.json").read_text())["sampled"]
        assert (s["temperature"], s["top_p"], s["seed"]) == (1.0, 0.9, seed)
        recs = read_jsonl(run.data_dir / "eval_predictions.jsonl")
        assert s["exact"] == pytest.approx(sum(r["sampled_exact"] for r in recs) / 15)
        return recs

    first, again, other = sampled("s99", 99), sampled("s99b", 99), sampled("s100", 100)
    for r in first:
        assert len(r["sampled_predictions"]) == 3
        assert r["sampled_exact"] == pytest.approx(sum(x == r["gold"] for x in r["sampled_predictions"]) / 3)
    assert [r["sampled_predictions"] for r in first] == [r["sampled_predictions"] for r in again]
    assert [r["sampled_predictions"] for r in first] != [r["sampled_predictions"] for r in other]
    assert [r["sampled_predictions"] for r in first] != [[r["prediction"]] * 3 for r in first]  # sampled, not greedy
