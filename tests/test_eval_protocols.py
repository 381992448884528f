"""Stage 06 protocols: llm-jp-eval v1.3, v1.4 and v2 trees through the stage, each by its version's rules.

The fixture checkouts and trees are written here in llm-jp-eval's layout with this project's own text (its
prompt texts stay in a user's checkout): a v1.x checkout's ``src/llm_jp_eval/utils.py`` with a
``get_evaluation_prompt`` of the same shape, a v2 checkout's Jinja ``prompts.py`` and ``answer_parser.py``,
and ``<dir>/<version>/evaluation/{test,train}/<name>.json`` trees.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selftrain import evaluate
from selftrain.config import ConfigError, EvalConfig, load_eval_protocol, resolve_run_config
from selftrain.evaluate.protocols import ProtocolError, V1Layout, load_protocol, read_v1_layout, tree_version
from selftrain.io import read_jsonl
from selftrain.runs import create_run

HEAD = "A made-up preamble for tests.\n\n## Task:\n"
SHOT = "\n\n## Question:\n{in}\n\n## Answer:\n{out}"
TAIL = "\n\n## Question:\n{input}\n\n## Answer:\n"

V1_UTILS = """
def get_evaluation_prompt(instruction, few_shots, custom_prompt_template=None, custom_fewshots_template=None):
    if custom_prompt_template is not None:
        system_message = custom_prompt_template.format(instruction=instruction, input="{input}")
    else:
        system_message = f"A made-up preamble for tests.\\n\\n## Task:\\n{instruction}"
        for few_shot in few_shots:
            system_message += f"\\n\\n## Question:\\n{few_shot.input}\\n\\n## Answer:\\n{few_shot.output}"
        system_message += "\\n\\n## Question:\\n{input}\\n\\n## Answer:\\n"
    return system_message
"""

V2_PROMPTS = '''
evaluation_prompt_template = """Task: {{ dataset_instruction }}
{%- if answer_pattern %}
Format: {{ answer_pattern }}{% endif %}
{%- for shot in few_shots %}
Q: {{ shot.input }}
A: {{ shot.output }}{% endfor %}
Q: {{ input }}
A:"""
evaluation_prompt_template_en = evaluation_prompt_template
'''

V2_PARSER = """
ANSWER_PATTERNS = {
    AnswerPatternId.ANSWER_TAGS_JP: AnswerPatternConfig(pattern_text="Answer inside <ans></ans>.",
                                                        extract_regex=r"<ans>(.*?)</ans>"),
}
"""


def write_checkout(root: Path, version: str) -> Path:
    co = root / f"llm-jp-eval-{version}"
    (co / "src" / "llm_jp_eval").mkdir(parents=True)
    (co / "pyproject.toml").write_text(f'[tool.poetry]\nname = "llm-jp-eval"\nversion = "{version}"\n')
    if version.startswith("2"):
        (co / "pyproject.toml").write_text(f'[project]\nname = "llm-jp-eval"\nversion = "{version}"\n')
        (co / "src" / "llm_jp_eval" / "prompts.py").write_text(V2_PROMPTS)
        (co / "src" / "llm_jp_eval" / "answer_parser.py").write_text(V2_PARSER)
    else:
        (co / "src" / "llm_jp_eval" / "utils.py").write_text(V1_UTILS)
    return co


def _samples(prefix: str, n: int, answer=lambda i: str(i)) -> list[dict[str, str]]:
    return [{"input": f"{prefix} question {i}", "output": answer(i)} for i in range(n)]


def write_tree(root: Path, version: str, datasets: dict[str, dict], v2: bool = False) -> Path:
    """<root>/<version>/evaluation/{test,train}/<name>.json; test files carry few_shots: [] (v1) as
    llm-jp-eval writes them; train files hold distinct samples so the few-shots can be recognised."""
    test = root / version / "evaluation" / "test"
    train = root / version / "evaluation" / "train"
    test.mkdir(parents=True)
    train.mkdir(parents=True)
    for name, extra in datasets.items():
        body = {"instruction": f"Answer the {name} question.", "output_length": 8, "metrics": ["exact_match"]}
        body.update({k: v for k, v in extra.items() if k != "train"})
        if not v2:
            body.setdefault("few_shots", [])
        body.setdefault("samples", _samples(name, 6))
        (test / f"{name}.json").write_text(json.dumps(body, ensure_ascii=False))
        if extra.get("train", True):
            tr = {**body, "samples": _samples(f"{name}-train", 6, lambda i: f"t{i}")}
            (train / f"{name}.json").write_text(json.dumps(tr, ensure_ascii=False))
    return test


def oracle_backend(answers: dict[str, str], calls: list) -> object:
    """A backend that answers each prompt from its last question: `answers[question]` (default the gold)."""

    def gen(folder, model_cfg, g, prompts, backend, progress, chat=True, max_new_tokens=None, **kw):
        calls.append({"prompts": list(prompts), "caps": max_new_tokens, **kw})
        out = []
        for k, p in enumerate(prompts):
            q = re.findall(r"(?:## Question:\n|Q: )(.*?)(?:\n|$)", p)[-1]
            out.append({"prompt_index": k, "candidate_index": 0, "text": answers[q], "finish_reason": "stop",
                        "num_tokens": 3, "seed": 0})  # fmt: skip
        return out

    return gen


def _run(tiny_overrides: list[str], tmp_path: Path, extra: list[str]):
    ov = [*tiny_overrides, "eval.backend=transformers", "model.max_model_len=4096", *extra]
    return create_run(resolve_run_config("tiny", "baseline", overrides=ov))


# ------------------------------------------------------------------------------------------- reading the checkout


def test_v1_layout_is_read_from_the_checkout(tmp_path: Path) -> None:
    layout = read_v1_layout(write_checkout(tmp_path, "1.3.0"))
    assert layout == V1Layout(
        HEAD + "{instruction}", SHOT.replace("{in}", "{input}").replace("{out}", "{output}"), TAIL
    )
    got = layout.render("Do {this}.", [{"input": "a", "output": "b"}], "c {x}")
    assert got == HEAD + "Do {this}." + SHOT.replace("{in}", "a").replace("{out}", "b") + TAIL.replace(
        "{input}", "c {x}"
    )


def test_checkout_and_tree_mismatches_are_one_line_errors(tmp_path: Path) -> None:
    co13 = write_checkout(tmp_path, "1.3.0")
    tree = write_tree(tmp_path / "data", "1.3.0", {"jamp": {}})
    cfg = EvalConfig(protocol="llm-jp-eval-1.3", llm_jp_eval_dir=str(co13), datasets_dir=str(tree))
    assert load_protocol(cfg).tree_version == "1.3.0"
    with pytest.raises(ConfigError, match="eval.llm_jp_eval_dir"):
        load_protocol(cfg.model_copy(update={"llm_jp_eval_dir": None}))
    with pytest.raises(ProtocolError, match=r"pyproject.toml: version 1.3.0 is not on llm-jp-eval's 1.4 line"):
        load_protocol(cfg.model_copy(update={"protocol": "llm-jp-eval-1.4"}))
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(ProtocolError, match="cannot tell the llm-jp-eval version of this tree"):
        load_protocol(cfg.model_copy(update={"datasets_dir": str(flat)}))
    (co13 / "src" / "llm_jp_eval" / "utils.py").write_text("def something_else():\n    pass\n")
    with pytest.raises(ProtocolError, match="no function get_evaluation_prompt"):
        load_protocol(cfg)
    assert tree_version(Path("/x/2.1.2/evaluation/dev")) == "2.1.2" and tree_version(Path("/x/test")) is None


def test_every_protocol_file_is_valid_and_maps_each_dataset_once() -> None:
    for name in ("llm-jp-eval-1.3", "llm-jp-eval-1.4", "llm-jp-eval-2"):
        spec = load_eval_protocol(name)
        listed = [d for c in spec.categories.values() for d in c] + list(spec.uncategorised)
        assert len(listed) == len(set(listed)), name
    v13 = load_eval_protocol("llm-jp-eval-1.3")
    assert list(v13.categories) == ["NLI", "QA", "RC", "MC", "HE", "EL", "FA", "MR", "MT"]
    assert "mmluen" in v13.categories["HE"] and "jsts" in v13.uncategorised and v13.empty_category == "zero"
    assert {"CG", "SUM"} <= set(load_eval_protocol("llm-jp-eval-1.4").categories)


# ------------------------------------------------------------------------------------------- v1.3 through the stage


def test_v13_tree_few_shots_extraction_categories_and_avg(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    co = write_checkout(tmp_path, "1.3.0")
    tree = write_tree(
        tmp_path / "data",
        "1.3.0",
        {
            "jamp": {},
            "jnli": {},
            "jsquad": {"metrics": ["char_f1"]},
            "jsts": {"metrics": ["pearson", "spearman"]},
            "alt-e-to-j": {"metrics": ["bleu_ja", "comet_wmt22"]},
            "mystery": {},
        },
    )
    answers = {}
    for name in ("jamp", "jnli", "jsquad", "jsts", "alt-e-to-j", "mystery"):
        for i in range(6):
            answers[f"{name} question {i}"] = f"{i}"
    answers["jamp question 1"] = " 1"  # v1.3 does not strip: a leading space is a wrong answer
    answers["jamp question 2"] = "2\n\nbecause"  # cut at the blank line: right
    answers["jnli question 0"] = "０"  # NFKC: right
    calls: list = []
    monkeypatch.setattr(evaluate.stage, "generate_candidates", oracle_backend(answers, calls))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = _run(tiny_overrides, tmp_path, [
        "eval.protocol=llm-jp-eval-1.3", f"eval.llm_jp_eval_dir={co}", f"eval.datasets_dir={tree}",
        "eval.num_few_shots=4", "eval.max_samples=5",
    ])  # fmt: skip
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    assert m["protocol"] == "llm-jp-eval-1.3" and m["llm_jp_eval_version"] == "1.3.0" and m["tree_version"] == "1.3.0"
    assert calls[0]["add_special_tokens"] is False  # v1.3 sends no BOS
    # Few-shots: the first 4 samples of ../train/<name>.json, in order, in the checkout's layout.
    prompt = calls[0]["prompts"][0]
    name = re.search(r"Answer the (\S+) question", prompt)[1]
    shots = "".join(SHOT.replace("{in}", f"{name}-train question {i}").replace("{out}", f"t{i}") for i in range(4))
    assert prompt.startswith(HEAD + f"Answer the {name} question." + shots + "\n\n## Question:\n")
    d = m["datasets"]
    assert all(v["few_shots"] == 4 and v["few_shots_wanted"] == 4 for v in d.values())
    assert d["jamp"]["score"] == pytest.approx(4 / 5)  # " 1" is wrong, "2\n\nbecause" right
    assert d["jnli"]["score"] == 1.0 and d["jsquad"]["main_metric"] == "char_f1"
    assert d["jsts"]["main_metric"] == "pearson" and d["jsts"]["category"] == "-"
    # MT's main metric is comet_wmt22: without its package/model the dataset is not comparable, not BLEU.
    assert d["alt-e-to-j"]["comparable"] is False and d["alt-e-to-j"]["score"] is None
    assert "comet" in d["alt-e-to-j"]["not_comparable_reason"] and "bleu_ja" in d["alt-e-to-j"]["metrics"]
    cats = m["categories"]
    assert cats["NLI"]["score"] == pytest.approx((0.8 + 1.0) / 2) and cats["RC"]["score"] == 1.0
    # v1.3: a category with no dataset scores 0.0 and counts; MT (not comparable) stays out and flags AVG.
    assert cats["QA"]["score"] == 0.0 and cats["MT"]["score"] is None and cats["MT"]["not_comparable"]
    assert m["avg_categories"] == ["NLI", "QA", "RC", "MC", "HE", "EL", "FA", "MR"]
    assert m["avg"] == pytest.approx((0.9 + 1.0) / 8) and m["avg_comparable"] is False
    assert m["uncategorised"] == ["jsts", "mystery"]
    recs = read_jsonl(run.data_dir / "eval_predictions.jsonl")
    jamp = {r["index"]: r for r in recs if r["dataset"] == "jamp"}
    assert jamp[1]["prediction"] == " 1" and jamp[2]["prediction"] == "2"


def test_v1_protocol_refuses_v2_files_and_missing_train(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    co = write_checkout(tmp_path, "1.3.0")
    tree = write_tree(tmp_path / "data", "1.3.0", {"jamp": {"num_few_shots": 0, "language": "ja"}, "jnli": {}})
    monkeypatch.setattr(evaluate.stage, "generate_candidates", oracle_backend({}, []))
    base = [f"eval.llm_jp_eval_dir={co}", f"eval.datasets_dir={tree}", "eval.protocol=llm-jp-eval-1.3"]
    run = _run(tiny_overrides, tmp_path, base)
    with pytest.raises(ProtocolError, match=r"jamp.json: fields \[.*'language'.*\] are not llm-jp-eval v1.x's"):
        evaluate.run(run, progress=False)
    assert run.manifest()["stages"]["eval"]["status"] == "failed"
    tree2 = write_tree(tmp_path / "data2", "1.3.0", {"jnli": {"train": False}})
    run = _run(tiny_overrides, tmp_path, [*base, f"eval.datasets_dir={tree2}"])
    with pytest.raises(ProtocolError, match=r"jnli.json: 4 few-shots wanted but .*train/jnli.json does not exist"):
        evaluate.run(run, progress=False)


# ------------------------------------------------------------------------------------------- v1.4


def test_v14_strips_runs_zero_shot_datasets_and_flags_cg(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    co = write_checkout(tmp_path, "1.4.1")
    tree = write_tree(
        tmp_path / "data",
        "1.4.1",
        {
            "jamp": {},
            "xlsum_ja": {
                "metrics": ["rouge2"],
                "samples": _samples("xlsum_ja", 6, lambda i: f"今日は{i}月の良い天気です"),
            },
            "mbpp": {"metrics": ["code_exec", "pylint_check"]},
        },
    )
    answers = {f"{n} question {i}": f" {i} " for n in ("jamp", "mbpp") for i in range(6)}
    answers.update({f"xlsum_ja question {i}": f"今日は{i}月の良い天気です" for i in range(6)})
    calls: list = []
    monkeypatch.setattr(evaluate.stage, "generate_candidates", oracle_backend(answers, calls))
    run = _run(tiny_overrides, tmp_path, [
        "eval.protocol=llm-jp-eval-1.4", f"eval.llm_jp_eval_dir={co}", f"eval.datasets_dir={tree}",
        "eval.max_samples=3", "eval.avg_excludes=[CG]",
    ])  # fmt: skip
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    d = m["datasets"]
    assert d["jamp"]["score"] == 1.0  # " 0 " stripped matches "0"
    assert d["xlsum_ja"]["few_shots"] == 0 and d["jamp"]["few_shots"] == 4  # xlsum_ja is 0-shot in v1.4
    assert d["xlsum_ja"]["main_metric"] == "rouge2" and d["xlsum_ja"]["score"] == 1.0
    assert d["mbpp"]["comparable"] is False and "code_exec" in d["mbpp"]["not_comparable_reason"]
    assert "CG" in m["avg_excludes"] and "CG" not in m["avg_categories"] and m["avg_comparable"] is True
    xl = next(p for p in calls[0]["prompts"] if "xlsum_ja" in p)
    assert "## Answer:\n" not in xl.split("## Task:")[1].split("## Question:\nxlsum_ja question")[0]


# ------------------------------------------------------------------------------------------- v2


def test_v2_tree_with_patterns_and_per_file_k(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    co = write_checkout(tmp_path, "2.1.2")
    tree = write_tree(
        tmp_path / "data",
        "2.1.2",
        {
            "jamp": {"num_few_shots": 2, "answer_pattern_id": "answer_tags_jp", "language": "ja"},
            "jnli": {"num_few_shots": None, "answer_extract_pattern": r"Label: (\w+)", "language": "en"},
            "jsquad": {"num_few_shots": 0, "metrics": ["char_f1"], "language": "ja"},
        },
        v2=True,
    )
    answers = {}
    for i in range(6):
        answers[f"jamp question {i}"] = f"I think <ans>{i}</ans>." if i != 3 else f"{i}"  # no tags: empty
        answers[f"jnli question {i}"] = f"Label: {i}\n"
        answers[f"jsquad question {i}"] = f"{i}\n\nmore"
    calls: list = []
    monkeypatch.setattr(evaluate.stage, "generate_candidates", oracle_backend(answers, calls))
    run = _run(tiny_overrides, tmp_path, [
        "eval.protocol=llm-jp-eval-2", f"eval.llm_jp_eval_dir={co}", f"eval.datasets_dir={tree}",
        "eval.max_samples=5",
    ])  # fmt: skip
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    d = m["datasets"]
    assert (d["jamp"]["few_shots"], d["jnli"]["few_shots"], d["jsquad"]["few_shots"]) == (2, 4, 0)
    assert d["jamp"]["score"] == pytest.approx(4 / 5) and d["jnli"]["score"] == 1.0 and d["jsquad"]["score"] == 1.0
    assert calls[0]["add_special_tokens"] is True  # v2 tokenises with special tokens (BOS)
    jamp = next(p for p in calls[0]["prompts"] if "jamp question" in p)
    assert jamp.startswith("Task: Answer the jamp question.\nFormat: Answer inside <ans></ans>.\nQ: jamp-train")
    assert jamp.endswith("Q: jamp question 0\nA:")
    recs = read_jsonl(run.data_dir / "eval_predictions.jsonl")
    assert next(r for r in recs if r["dataset"] == "jamp" and r["index"] == 3)["prediction"] == ""
    # A v1.x tree under the v2 protocol names the file and the fields it found.
    tree1 = write_tree(tmp_path / "data1", "2.1.2", {"jamp": {}})
    run = _run(tiny_overrides, tmp_path, [
        "eval.protocol=llm-jp-eval-2", f"eval.llm_jp_eval_dir={co}", f"eval.datasets_dir={tree1}",
    ])  # fmt: skip
    with pytest.raises(ProtocolError, match=r"jamp.json: fields \[.*'few_shots'.*\] have none of llm-jp-eval v2"):
        evaluate.run(run, progress=False)


# ------------------------------------------------------------------------------------------- the real model


@pytest.mark.parametrize(
    ("protocol", "version", "v2", "bos"),
    [("llm-jp-eval-1.3", "1.3.0", False, False), ("llm-jp-eval-1.4", "1.4.1", False, False),
     ("llm-jp-eval-2", "2.1.2", True, True)],
)  # fmt: skip
def test_each_version_tree_on_the_tiny_model(
    tiny_overrides: list[str], tmp_path: Path, protocol: str, version: str, v2: bool, bos: bool
) -> None:
    """The real generation path under each protocol: k shots in every prompt in the checkout's layout."""
    co = write_checkout(tmp_path, version)
    extra = {"language": "en", "num_few_shots": None} if v2 else {}
    tree = write_tree(tmp_path / "data", version, {"jamp": extra, "jsquad": {**extra, "metrics": ["char_f1"]}}, v2=v2)
    run = _run(tiny_overrides, tmp_path, [
        f"eval.protocol={protocol}", f"eval.llm_jp_eval_dir={co}", f"eval.datasets_dir={tree}",
        "eval.max_samples=2", "eval.num_few_shots=3",
    ])  # fmt: skip
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    assert m["protocol"] == protocol and m["tree_version"] == version and m["add_bos"] is bos
    assert {v["few_shots"] for v in m["datasets"].values()} == {3}
    for name, v in m["datasets"].items():
        ex = v["prompt_example"]
        if v2:
            assert ex.startswith(f"Task: Answer the {name} question.") and ex.count("\nQ: ") == 4, name
        else:
            assert ex.startswith(HEAD) and ex.count("## Question:") == 4 and ex.endswith("## Answer:\n"), name
    assert m["avg"] is not None and len(read_jsonl(run.data_dir / "eval_predictions.jsonl")) == 4
