"""Stage 06 (eval): aggregation, prompt layout, dataset validation, the stage on the tiny model, the notebook."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from selftrain import evaluate
from selftrain.config import EvalConfig, EvalMarkers, resolve_run_config
from selftrain.evaluate import Dataset, aggregate, build_prompt, fit_prompt, load_dataset, load_datasets
from selftrain.evaluate.metrics import out_of_label_rate, prepare_prediction, score
from selftrain.evaluate.protocols import ProtocolError, load_protocol
from selftrain.io import DataError, read_jsonl
from selftrain.runner import execute_stage
from selftrain.runs import Run, create_run

ROOT = Path(__file__).resolve().parents[1]
EN = ROOT / "data" / "eval" / "en"
EN_MARKERS = EvalMarkers(instruction="### Instruction:", input="### Input:", response="### Response:")


# ------------------------------------------------------------------------------------------- aggregation


def test_aggregate_on_a_hand_made_table() -> None:
    table = pd.DataFrame(
        {
            "dataset": ["a1", "a2", "b1", "c1", "s1", "extra", "broken"],
            "score": [0.2, 0.6, 0.9, 0.3, 0.8, 0.5, float("nan")],
        }
    )
    cats = {"A": ["a1", "a2"], "B": ["b1", "b2"], "C": ["c1", "broken"], "STS": ["s1"], "D": ["d1"]}
    agg = aggregate(table, cats, ["STS"])
    c = agg["categories"]
    assert c["A"]["score"] == pytest.approx(0.4) and c["A"]["missing"] == []
    assert c["B"]["score"] == pytest.approx(0.9) and c["B"]["missing"] == ["b2"]  # mean of those present
    assert c["C"]["score"] == pytest.approx(0.3) and c["C"]["missing"] == ["broken"]  # NaN counts as missing
    assert c["STS"]["score"] == pytest.approx(0.8)
    assert c["D"]["score"] is None and c["D"]["datasets"] == []
    assert agg["avg_categories"] == ["A", "B", "C"]  # STS excluded, D has no score
    assert agg["avg"] == pytest.approx((0.4 + 0.9 + 0.3) / 3)
    assert agg["avg_excludes"] == ["STS"] and agg["uncategorised"] == ["extra"]
    assert agg["avg_complete"] is False
    # A mapping gives the same result; a complete table is flagged complete.
    assert aggregate(dict(zip(table["dataset"], table["score"], strict=True)), cats, ["STS"]) == agg
    full = aggregate({"a1": 1.0, "a2": 0.0, "s1": -0.5}, {"A": ["a1", "a2"], "STS": ["s1"]}, [])
    assert full["avg"] == pytest.approx((0.5 - 0.5) / 2) and full["avg_complete"] is True
    assert aggregate({}, {}, [])["avg"] is None


# ------------------------------------------------------------------------------------------- prompts


def test_prompt_layout_matches_llm_jp_eval() -> None:
    shots = [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}, {"input": "3+3", "output": "6"}]
    got = build_prompt("Add.", shots[:2], "5+5", "Be helpful.", EN_MARKERS)
    assert got == (
        "Be helpful.\n\n### Instruction:\nAdd."
        "\n\n### Input:\n1+1\n\n### Response:\n2"
        "\n\n### Input:\n2+2\n\n### Response:\n4"
        "\n\n### Input:\n5+5\n\n### Response:\n"
    )
    # Zero-shot, the default (Japanese, llm-jp-eval's) markers, no preamble paragraph when it is empty.
    assert (
        build_prompt("足して。", [], "5+5", "", EvalMarkers()) == "### 指示:\n足して。\n\n### 入力:\n5+5\n\n### 応答:\n"
    )
    # The own protocol: the first k few-shots of the file, in order.
    ds = Dataset("d", Path("d.json"), "Add.", 2, ["exact_match"], shots, [{"input": "5+5", "output": "10"}])
    cfg = EvalConfig(num_few_shots=2, preamble="P", markers=EN_MARKERS)
    proto = load_protocol(cfg)
    picked = proto.few_shots(ds)
    assert picked == shots[:2]

    def render(sh):
        return proto.prompt(ds, sh, "5+5")

    prompt, k, fits = fit_prompt(render, picked, 2, len, 10_000)
    assert (k, fits) == (2, True) and prompt == build_prompt("Add.", shots[:2], "5+5", "P", EN_MARKERS)
    # Wanting more than the file has, with no train split beside it: an error, never fewer in silence.
    with pytest.raises(ProtocolError, match=r"9 few-shots wanted but the file has 3 few_shots and .*train"):
        load_protocol(cfg.model_copy(update={"num_few_shots": 9})).few_shots(ds)
    # Too long for the context: few-shots are dropped from the end until prompt + output_length fits.
    one_shot = len(build_prompt("Add.", shots[:1], "5+5", "P", EN_MARKERS))
    prompt, k, fits = fit_prompt(render, picked, 2, len, one_shot + 2)
    assert (k, fits) == (1, True) and prompt.count("### Input:") == 2
    assert fit_prompt(render, picked, 2, len, 5)[1:] == (0, False)
    assert fit_prompt(render, picked, 2, len, one_shot + 2, shorten=False)[1:] == (2, False)  # llm-jp-eval


# ------------------------------------------------------------------------------------------- malformed files


def _good() -> dict:
    return json.loads((EN / "nli.json").read_text())


BAD = {
    "no_samples": (lambda d: d.pop("samples"), "field 'samples': missing"),
    "bad_output": (lambda d: d["samples"][3].update(output=1), "field 'samples[3].output': expected a string"),
    "no_input": (lambda d: d["few_shots"][1].pop("input"), "field 'few_shots[1].input': missing"),
    "bad_length": (lambda d: d.update(output_length="3"), "field 'output_length'"),
    "bool_length": (lambda d: d.update(output_length=True), "field 'output_length'"),
    "no_metric": (lambda d: d.update(metrics=["code_exec"]), "field 'metrics': none of ['code_exec'] is implemented"),
    "empty_metrics": (lambda d: d.update(metrics=[]), "field 'metrics'"),
    "bad_labels": (lambda d: d.update(label_list="entailment"), "field 'label_list'"),
    "empty_samples": (lambda d: d.update(samples=[]), "field 'samples': empty list"),
    "sts_gold": (lambda d: d.update(metrics=["pearson"]), "field 'samples[0].output': 'entailment' is not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_dataset_names_path_and_field(case: str, tmp_path: Path) -> None:
    data = _good()
    change, message = BAD[case]
    change(data)
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        load_dataset(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_bad_files_are_reported_and_the_others_load(tmp_path: Path) -> None:
    shutil.copy(EN / "nli.json", tmp_path / "nli.json")
    (tmp_path / "broken.json").write_text('{"instruction": "x", ')
    (tmp_path / "list.json").write_text("[1, 2]")
    data = _good()
    data["metrics"] = ["code_exec", "exact_match"]  # an unimplemented metric besides a known one
    (tmp_path / "partial.json").write_text(json.dumps(data))
    good, errors = load_datasets(tmp_path)
    assert [d.name for d in good] == ["nli", "partial"]
    assert good[1].main_metric == "exact_match" and good[1].unsupported_metrics == ["code_exec"]
    assert good[0].label_list == ["entailment", "contradiction", "neutral"]
    assert {e["dataset"] for e in errors} == {"broken", "list"}
    assert all(e["path"] in e["error"] for e in errors)
    assert "not valid JSON" in next(e["error"] for e in errors if e["dataset"] == "broken")
    # Names pick files in that order; a missing name is an error of its own, not a crash.
    good, errors = load_datasets(tmp_path, ["partial", "nope"])
    assert [d.name for d in good] == ["partial"] and "nope.json: dataset file not found" in errors[0]["error"]
    with pytest.raises(DataError, match="folder not found"):
        load_datasets(tmp_path / "missing")


def test_bench_files_are_valid() -> None:
    for lang in ("en", "ja"):
        good, errors = load_datasets(ROOT / "data" / "eval" / lang)
        assert not errors and len(good) == 6
        labelled = {d.name for d in good if d.label_list}
        assert labelled == {"nli", "commonsense_mc"}
        for d in good:
            if d.label_list:  # every gold answer of a label task is a label
                assert {s["output"] for s in d.samples} <= set(d.label_list)


# ------------------------------------------------------------------------------------------- the stage


def _eval_run(tiny_overrides: list[str], tmp_path: Path, extra: list[str] = ()) -> Run:
    folder = tmp_path / "bench"
    shutil.copytree(EN, folder)
    (folder / "zz_bad.json").write_text(json.dumps({**_good(), "samples": [{"input": "x"}]}))
    ov = [
        *tiny_overrides,
        f"eval.datasets_dir={folder}",
        "eval.backend=transformers",
        "eval.max_samples=4",
        "eval.num_few_shots=2",
        "model.max_model_len=2048",  # the tiny tokenizer spends many tokens on English text
        *extra,
    ]
    return create_run(resolve_run_config("tiny", "baseline", overrides=ov))


def test_stage_end_to_end_on_tiny_model(tiny_overrides: list[str], tmp_path: Path, tiny_model: Path) -> None:
    run = _eval_run(tiny_overrides, tmp_path)
    with pytest.warns(UserWarning, match="zz_bad.json: field 'samples\\[0\\].output': missing"):
        df = evaluate.run(run, progress=False)
    assert run.is_done("eval") and len(df) == 6
    recs = read_jsonl(run.data_dir / "eval_predictions.jsonl")
    assert len(recs) == 24 and {r["dataset"] for r in recs} == set(df["dataset"])
    text = (run.metrics_dir / "eval.json").read_text()
    assert "NaN" not in text  # strict JSON: missing values are null
    m = json.loads(text)
    assert m["model_under_test"] == str(tiny_model) and m["backend"] == "transformers"
    assert m["samples"] == 24 and m["samples_per_second"] > 0
    assert [e["dataset"] for e in m["errors"]] == ["zz_bad"] and "zz_bad.json" in m["errors"][0]["error"]
    saved = pd.read_csv(run.metrics_dir / "eval_scores.csv")
    cats = run.config.eval.categories
    for name, d in m["datasets"].items():
        ds = load_dataset(Path(run.config.eval.datasets_dir) / f"{name}.json")
        rs = [r for r in recs if r["dataset"] == name]
        assert [r["index"] for r in rs] == [0, 1, 2, 3] and [r["gold"] for r in rs] == [
            s["output"] for s in ds.samples[:4]
        ]
        for r in rs:
            assert r["prediction"] == prepare_prediction(r["raw"]) and r["few_shots"] == 2
            assert 1 <= r["num_tokens"] <= ds.output_length and r["finish_reason"] in ("stop", "length")
        # Scores recomputed from the saved predictions with the metrics module.
        raw, gold = [r["raw"] for r in rs], [r["gold"] for r in rs]
        for metric in ds.metrics:
            assert d["metrics"][metric] == pytest.approx(score(metric, raw, gold))
        assert d["main_metric"] == ds.metrics[0] and d["score"] == pytest.approx(d["metrics"][ds.metrics[0]])
        if ds.label_list:
            assert d["out_of_label_rate"] == pytest.approx(out_of_label_rate(raw, set(ds.label_list)))
            assert d["out_of_label_rate"] == pytest.approx(1 - sum(r["in_labels"] for r in rs) / 4)
        else:
            assert d["out_of_label_rate"] is None
        assert d["category"] == next(c for c, names in cats.items() if name in names)
        assert d["prompt_example"].endswith(f"### Input:\n{ds.samples[0]['input']}\n\n### Response:\n")
        row = saved[saved["dataset"] == name].iloc[0]
        assert row["score"] == pytest.approx(d["score"]) and row["category"] == d["category"]
    agg = evaluate.aggregate(saved, cats, run.config.eval.avg_excludes)
    assert m["avg"] == pytest.approx(agg["avg"]) and m["categories"] == agg["categories"]
    table = evaluate.category_table(run)
    assert list(table["category"]) == [*cats, "AVG"]
    assert math.isclose(table.iloc[-1]["score"], m["avg"])
    assert len(evaluate.errors_table(run)) == 1 and len(evaluate.predictions_table(run, "nli")) == 4
    assert len(evaluate.errors_table(run)) == 1
    assert (run.figures_dir / "eval_categories.png").is_file() and (run.figures_dir / "eval_categories.pdf").is_file()
    stage = run.manifest()["stages"]["eval"]
    assert stage["status"] == "done" and stage["metrics"]["errors"] == 1
    assert any(k.endswith("nli.json") for k in stage["inputs"])
    # Done: a second call reads the saved table instead of generating again.
    again = evaluate.run(run, progress=False)
    assert list(again["dataset"]) == list(df["dataset"])


def test_scores_of_an_oracle_backend(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake backend that answers from the gold (wrong label on every other NLI sample): exact numbers.

    The random tiny model only ever writes newlines, so this is what checks that every answer lands on its
    own sample (the transformers path reorders prompts by length) and that scores and AVG add up.
    """
    golds, caps = {}, {}
    for path in EN.glob("*.json"):
        data = json.loads(path.read_text())
        caps[path.stem] = data["output_length"]
        for i, smp in enumerate(data["samples"]):
            golds[smp["input"]] = (path.stem, i, smp["output"])
    calls = []

    def oracle(folder, model_cfg, gen, prompts, backend, progress, chat=True, max_new_tokens=None, **kw) -> list[dict]:
        calls.append((len(prompts), chat, max_new_tokens))
        out = []
        for k, prompt in enumerate(prompts):
            sample_input = prompt.rsplit("### Input:\n", 1)[1].split("\n\n### Response:\n")[0]
            name, i, gold = golds[sample_input]
            assert max_new_tokens[k] == caps[name]  # each prompt capped at its own dataset's output_length
            answer = "maybe" if name == "nli" and i % 2 else gold
            text = answer + "\n\nand some chatter after a blank line"
            out.append({"prompt_index": k, "candidate_index": 0, "text": text, "finish_reason": "length",
                        "num_tokens": 5, "seed": 0})  # fmt: skip
        return out[::-1]  # order must not matter: prompt_index does

    monkeypatch.setattr(evaluate.stage, "generate_candidates", oracle)
    run = _eval_run(tiny_overrides, tmp_path, ["eval.max_samples=10", "eval.avg_excludes=[STS]"])
    with pytest.warns(UserWarning):
        evaluate.run(run, progress=False)
    assert len(calls) == 1 and calls[0][0] == 60 and calls[0][1] is False  # one backend call for all datasets
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    d = m["datasets"]
    assert d["nli"]["score"] == 0.5 and d["nli"]["out_of_label_rate"] == 0.5 and d["nli"]["empty_rate"] == 0.0
    assert d["commonsense_mc"]["out_of_label_rate"] == 0.0
    for name in ("arithmetic", "commonsense_mc", "reading_comp", "short_qa", "sts"):
        assert d[name]["score"] == pytest.approx(1.0), name
    assert d["sts"]["metrics"]["spearman"] == pytest.approx(1.0) and d["short_qa"]["metrics"]["exact_match"] == 1.0
    assert m["categories"]["NLI"]["score"] == 0.5 and m["avg_excludes"] == ["STS"]
    assert m["avg_categories"] == ["NLI", "QA", "RC", "MC", "MR"] and m["avg"] == pytest.approx(4.5 / 5)
    recs = read_jsonl(run.data_dir / "eval_predictions.jsonl")
    for r in recs:
        want = "maybe" if r["dataset"] == "nli" and r["index"] % 2 else r["gold"]
        assert r["prediction"] == want and r["raw"].startswith(want + "\n\n")
        assert r["exact"] == (want == r["gold"])
    assert [r["in_labels"] for r in recs if r["dataset"] == "nli"] == [True, False] * 5


def test_chat_template_and_context_limit(tiny_overrides: list[str], tmp_path: Path) -> None:
    """chat_template wraps the prompt as one user turn; a context too small drops few-shots, then samples."""
    run = _eval_run(
        tiny_overrides,
        tmp_path,
        ["eval.chat_template=true", "eval.datasets=[short_qa, reading_comp]", "model.max_model_len=400"],
    )
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    assert list(m["datasets"]) == ["short_qa", "reading_comp"] and m["errors"] == []
    recs = read_jsonl(run.data_dir / "eval_predictions.jsonl")
    # Counted through the tiny tokenizer's chat template, short_qa fits with one few-shot (of two) in 400 tokens
    # (without the template two would fit);
    # reading_comp does not fit even zero-shot: its samples score as empty answers and are counted.
    qa, rc = m["datasets"]["short_qa"], m["datasets"]["reading_comp"]
    assert (qa["shortened"], qa["too_long"], qa["few_shots"]) == (4, 0, 1)
    assert (rc["shortened"], rc["too_long"], rc["empty_rate"]) == (4, 4, 1.0)
    assert [r["finish_reason"] for r in recs if r["dataset"] == "reading_comp"] == ["too_long"] * 4
    assert all(r["raw"] == "" for r in recs if r["dataset"] == "reading_comp")
    assert m["generated_samples"] == 4 and m["samples"] == 8
    assert qa["prompt_example"].count("### Input:") == 2


def test_training_methods_need_their_model(tiny_overrides: list[str], tmp_path: Path) -> None:
    from selftrain.runs import StageNotDone

    run = create_run(resolve_run_config("tiny", "central", overrides=tiny_overrides))
    with pytest.raises(StageNotDone, match="not done"):
        evaluate.run(run, progress=False)
    assert not run.is_done("eval")


@pytest.mark.notebook
def test_notebook_under_papermill(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = _eval_run(tiny_overrides, tmp_path, ["eval.max_samples=2", "eval.datasets=[nli, sts]"])
    out = execute_stage(run, "eval")
    nb = nbformat.read(out, as_version=4)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    assert any(o.get("output_type") == "display_data" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert run.is_done("eval") and (run.figures_dir / "eval_categories.png").is_file()
    assert len(read_jsonl(run.data_dir / "eval_predictions.jsonl")) == 4
