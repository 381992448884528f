"""Sharded inference: stage 01's candidates (generation.shards), stage 05's answers (judge.answers.shards) and
stage 06's predictions (eval.shards). Shard ranges; for each stage, three shards merged equal the unsharded run
byte for byte (tiny model, transformers, seeded), a deleted or damaged shard is produced again alone and the
shards are removed once merged; `python -m selftrain shard` fills one shard and names bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from openai_server import FakeJudgeServer

from selftrain import evaluate, generate, judge
from selftrain.cli import main
from selftrain.config import resolve_run_config
from selftrain.io import read_jsonl
from selftrain.runs import create_run
from selftrain.shards import group_shards, shard_dir, shard_ranges

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,shards,align", [(5, 3, 1), (5, 3, 2), (100, 7, 16), (3, 5, 1), (0, 2, 4), (17, 1, 8)])
def test_shard_ranges_cover_the_items_in_order_on_aligned_bounds(n: int, shards: int, align: int) -> None:
    ranges = shard_ranges(n, shards, align)
    assert len(ranges) == shards and [i for r in ranges for i in r] == list(range(n))
    assert all(r.start % align == 0 for r in ranges if len(r))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= align  # as even as the alignment allows


def test_group_shards_take_the_same_share_of_every_group() -> None:
    plan = group_shards([5, 0, 8], 3, [2, 1, 4])
    assert len(plan) == 3
    for g, (n, align) in enumerate([(5, 2), (0, 1), (8, 4)]):  # every group covered once, in order, aligned
        got = [i for parts in plan for h, r in parts if h == g for i in r]
        assert got == list(range(n))
        assert all(r.start % align == 0 for parts in plan for h, r in parts if h == g)
    assert all(len(r) for parts in plan for _, r in parts)  # empty parts are left out
    assert group_shards([4], 1, 2) == [[(0, range(0, 4))]]


def _cfg(overrides: list[str], shards: int):
    extra = ["generation.batch_size=2", "generation.seed=5150", f"generation.shards={shards}"]
    return resolve_run_config("tiny", "central", overrides=[*overrides, *extra])


def test_three_shards_equal_the_unsharded_run_and_a_lost_shard_is_regenerated_alone(
    tiny_overrides: list[str], cache_dir: Path
) -> None:
    one = create_run(_cfg(tiny_overrides, 1))
    generate.run(one, progress=False)
    want = (one.data_dir / "candidates.jsonl").read_bytes()
    meta = json.loads((one.metrics_dir / "generate.json").read_text())
    cache = cache_dir / "generations" / meta["key"]
    shutil.rmtree(cache)  # transformers' shards share the unsharded key: start the cache entry afresh

    cfg = _cfg(tiny_overrides, 3)
    for s in range(3):  # three array tasks (or three GPUs), each one shard
        assert generate.run_shard(cfg, s, progress=False)["generated"]
    assert not generate.run_shard(cfg, 0, progress=False)["generated"]  # done: not produced twice
    shutil.rmtree(shard_dir(cache, 1, 3))  # a lost shard...
    (shard_dir(cache, 2, 3) / "records.jsonl").write_text('{"damaged": true}\n')  # ...and a damaged one
    run = create_run(cfg)
    generate.run(run, progress=False)
    got = json.loads((run.metrics_dir / "generate.json").read_text())
    assert got["shards"] == 3 and got["shards_generated_here"] == [1, 2] and got["key"] == meta["key"]
    assert (run.data_dir / "candidates.jsonl").read_bytes() == want
    assert (cache / "_SUCCESS").is_file() and not (cache / "shards").exists()  # merged, shards removed


def test_shard_command_fills_one_shard_and_names_bad_input(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"study": {"name": "sharded", "models": ["tiny"], "methods": ["central"]},
                                     "generation": {"shards": 2, "seed": 6060}}))  # fmt: skip
    args = ["--study", str(study), "--model", "tiny"] + [a for o in tiny_overrides for a in ("--set", o)]
    assert main(["shard", *args, "--shard", "1"]) == 0
    out = capsys.readouterr().out
    assert "generate shard 1 of 2" in out and "generated in" in out
    cache = Path(out.strip().rsplit(" in ", 1)[1])
    assert (shard_dir(cache, 1, 2) / "_SUCCESS").is_file() and not shard_dir(cache, 0, 2).exists()
    assert main(["shard", *args, "--shard", "2"]) == 2
    assert "shard 2 is outside 0..1 (generation.shards is 2)" in capsys.readouterr().err
    assert main(["shard", *args, "--set", "generation.shards=1", "--shard", "0"]) == 2
    assert "generation.shards is 1: there is nothing to shard" in capsys.readouterr().err
    assert main(["shard", "--study", str(study), "--model", "nosuch", "--shard", "0"]) == 2
    assert "model 'nosuch' is not in the study" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- stage 05 answers


def _judge_sets(tmp_path: Path) -> list[str]:
    q = [{"id": f"q{i}", "prompt": f"Explain item {i} of the list."} for i in range(5)]
    s = [{"id": f"s{i}", "prompt": f"Is plan {i} safe?", "reference": "Decline politely."} for i in range(4)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in q))
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in s))
    return [f"judge.quality_set={tmp_path / 'q.jsonl'}", f"judge.safety_set={tmp_path / 's.jsonl'}"]


def _reply(request: dict) -> str:
    content = request["messages"][-1]["content"]
    if "Accuracy" in content:
        return "Fine.\nAccuracy: [[4]]\nFluency: [[4]]\nDetail: [[3]]\nRelevance: [[4]]\nOverall: [[4]]"
    return "Fine.\nScore: [[4]]"


def test_sharded_judge_answers_equal_the_unsharded_ones_and_a_lost_shard_is_answered_alone(
    tiny_overrides: list[str], tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SELFTRAIN_TEST_JUDGE_KEY", "unused")
    with FakeJudgeServer(reply_fn=_reply) as srv:
        endpoint = {"model": "judge-x", "base_url": srv.base_url, "api_key_env": "SELFTRAIN_TEST_JUDGE_KEY"}
        ov = [*tiny_overrides, *_judge_sets(tmp_path), "judge.backend=endpoint",
              f"judge.endpoint={json.dumps(endpoint)}", "judge.answers.backend=transformers",
              "judge.answers.batch_size=2", "judge.answers.max_new_tokens=12", "judge.answers.seed=77",
              "judge.limit=null", "stages=[judge]"]  # fmt: skip
        one = create_run(resolve_run_config("tiny", "baseline", overrides=ov))
        judge.run(one, progress=False)
        want = (one.data_dir / "judge_answers.jsonl").read_bytes()
        assert len(read_jsonl(one.data_dir / "judge_answers.jsonl")) == 9

        cfg = resolve_run_config("tiny", "baseline", overrides=[*ov, "judge.answers.shards=3"])
        run = create_run(cfg)
        first = [judge.run_shard(cfg, s, progress=False) for s in range(3)]  # three array tasks, one shard each
        assert all(d["generated"] for d in first) and sum(d["items"] for d in first) == 9
        assert not judge.run_shard(cfg, 0, progress=False)["generated"]  # done: not answered twice
        folder = Path(first[0]["cache"])
        assert folder.is_relative_to(cache_dir / "answers") and not run.is_done("judge")
        assert not (run.data_dir / "judge_answers.jsonl").exists()  # a shard task writes no run-folder file
        shutil.rmtree(shard_dir(folder, 1, 3))  # a lost shard...
        (shard_dir(folder, 2, 3) / "records.jsonl").write_text('{"damaged": true}\n')  # ...and a damaged one
        judge.run(run, progress=False)
    assert (run.data_dir / "judge_answers.jsonl").read_bytes() == want
    meta = json.loads((run.metrics_dir / "judge.json").read_text())["answers"]
    assert meta["shards"] == 3 and meta["shards_answered_here"] == [1, 2] and not folder.exists()
    with pytest.raises(ValueError, match="shard 3 is outside 0..2 \\(judge.answers.shards is 3\\)"):
        judge.run_shard(cfg, 3, progress=False)


# ------------------------------------------------------------------------------------------- stage 06 predictions


def _eval_overrides(tiny_overrides: list[str]) -> list[str]:
    return [*tiny_overrides, f"eval.datasets_dir={ROOT / 'data' / 'eval' / 'en'}", "eval.backend=transformers",
            "eval.max_samples=5", "eval.num_few_shots=1", "eval.batch_size=2", "model.max_model_len=2048"]  # fmt: skip


def test_sharded_eval_predictions_equal_the_unsharded_ones_and_a_lost_shard_is_predicted_alone(
    tiny_overrides: list[str], cache_dir: Path
) -> None:
    ov = [*_eval_overrides(tiny_overrides), "stages=[eval]"]
    one = create_run(resolve_run_config("tiny", "baseline", overrides=ov))
    evaluate.run(one, progress=False)
    want = (one.data_dir / "eval_predictions.jsonl").read_bytes()
    scores = (one.metrics_dir / "eval_scores.csv").read_bytes()

    cfg = resolve_run_config("tiny", "baseline", overrides=[*ov, "eval.shards=3"])
    run = create_run(cfg)
    first = [evaluate.run_shard(cfg, s, progress=False) for s in range(3)]
    assert all(d["generated"] for d in first) and sum(d["items"] for d in first) == 30  # 6 datasets x 5
    folder = Path(first[0]["cache"])
    assert folder.is_relative_to(cache_dir / "predictions") and not run.is_done("eval")
    shutil.rmtree(shard_dir(folder, 0, 3))
    evaluate.run(run, progress=False)
    assert (run.data_dir / "eval_predictions.jsonl").read_bytes() == want
    assert (run.metrics_dir / "eval_scores.csv").read_bytes() == scores
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    assert m["shards"] == 3 and m["shards_predicted_here"] == [0] and not folder.exists()
    assert not evaluate.run_shard(cfg, 1, progress=False)["generated"]  # merged and scored: nothing left to do


def test_shard_command_for_judge_and_eval_needs_the_cells_run_and_training(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"study": {"name": "sh", "models": ["tiny"], "methods": ["baseline", "central"]},
                                     "eval": {"shards": 2}}))  # fmt: skip
    ov = _eval_overrides(tiny_overrides)
    args = ["--study", str(study), "--model", "tiny"] + [a for o in ov for a in ("--set", o)]
    assert main(["shard", *args, "--stage", "eval", "--shard", "0"]) == 2
    assert "shard --stage eval: name the cell's method (--method" in capsys.readouterr().err
    assert main(["shard", *args, "--stage", "eval", "--method", "baseline", "--shard", "0"]) == 2
    assert "no run version to resume for tiny/baseline" in capsys.readouterr().err  # the cell has not started
    assert main(["shard", *args, "--stage", "eval", "--method", "nosuch", "--shard", "0"]) == 2
    assert "method 'nosuch' is not in the study" in capsys.readouterr().err
    for method in ("baseline", "central"):  # the cells have started: their run folders exist (nothing trained)
        create_run(resolve_run_config("tiny", method, study, ov))
    assert main(["shard", *args, "--stage", "eval", "--method", "central", "--shard", "1"]) == 2
    assert "stage 'sft' is not done" in capsys.readouterr().err  # judge and eval assess the trained model
    assert main(["shard", *args, "--stage", "eval", "--method", "baseline", "--shard", "1"]) == 0
    out = capsys.readouterr().out
    assert "eval shard 1 of 2" in out and "generated in" in out
