"""Stage 06 protocols: llm-jp-eval v1.3, v1.4 and v2 trees through the stage, each by its version's rules.

The fixture checkouts and trees are written here in llm-jp-eval's layout with this project's own text (its
prompt texts stay in a user's checkout): a v1.x checkout's ``src/llm_jp_eval/utils.py`` with a
``get_evaluation_prompt`` of the same shape, a v2 checkout's Jinja ``prompts.py`` and ``answer_parser.py``,
and ``<dir>/<version>/evaluation/{test,train}/<name>.json`` trees.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_judge_protocol import git_repo

from selftrain import evaluate
from selftrain.config import ConfigError, EvalConfig, load_eval_protocol, resolve_run_config
from selftrain.evaluate import metrics
from selftrain.evaluate.protocols import ProtocolError, V1Layout, load_protocol, read_v1_layout, tree_version
from selftrain.io import read_jsonl
from selftrain.provenance import git_commit, git_state
from selftrain.runs import create_run

ROOT = Path(__file__).resolve().parents[1]

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


# v2's eval dataset config (eval_configs/all_datasets.yaml) in the layout LLM-jp's v2 scripts edit: `datasets` and
# `categories` {NAME: {description, default_metric, metrics: {dataset: metric}, datasets}}; our own categories.
V2_DATASET_CONFIG = {
    "datasets": ["jamp", "jnli", "jsquad"],
    "categories": {
        "INF": {"description": "Made-up inference group", "default_metric": "exact_match", "metrics": {},
                "datasets": ["jamp", "jnli"]},
        "READ": {"description": "Made-up reading group", "default_metric": "exact_match",
                 "metrics": {"jsquad": "char_f1"}, "datasets": ["jsquad"]},
    },
}  # fmt: skip


def write_checkout(root: Path, version: str, dataset_config: dict | None = None) -> Path:
    """An llm-jp-eval checkout of `version` in its layout with this file's texts; v2 with `dataset_config` as its
    eval_configs/all_datasets.yaml when given."""
    co = root / f"llm-jp-eval-{version}"
    (co / "src" / "llm_jp_eval").mkdir(parents=True)
    if dataset_config is not None:
        (co / "eval_configs").mkdir()
        (co / "eval_configs" / "all_datasets.yaml").write_text(yaml.safe_dump(dataset_config, sort_keys=False))
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
        calls.append({"prompts": list(prompts), "caps": max_new_tokens, "gen": g, **kw})
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


def test_one_commit_reader_only_trusts_the_top_of_a_repository(tmp_path: Path) -> None:
    """provenance.git_commit serves the project and every checkout: a plain folder and a folder nested inside
    another repository have no commit of their own (None), the top of a repository has its HEAD."""
    plain = write_checkout(tmp_path / "plain", "1.3.0")
    tree = write_tree(tmp_path / "data", "1.3.0", {"jamp": {}})
    cfg = EvalConfig(protocol="llm-jp-eval-1.3", llm_jp_eval_dir=str(plain), datasets_dir=str(tree))
    assert git_commit(plain) is None and load_protocol(cfg).checkout_commit is None
    outer = tmp_path / "project"
    nested = write_checkout(outer / "third_party", "1.3.0")
    outer_sha = git_repo(outer)
    nested_cfg = cfg.model_copy(update={"llm_jp_eval_dir": str(nested)})
    assert git_commit(outer) == outer_sha and git_commit(outer / "third_party") is None
    assert git_commit(nested) is None and load_protocol(nested_cfg).checkout_commit is None  # not the project's
    own = git_repo(nested)
    assert git_commit(nested) == own != outer_sha and load_protocol(nested_cfg).checkout_commit == own
    assert load_protocol(nested_cfg).describe()["llm_jp_eval_commit"] == own
    assert git_commit(tmp_path / "nowhere") is None
    # the project's own manifest entry comes from the same reader
    assert git_state()["sha"] == git_commit(ROOT)


def test_top_k_reaches_the_transformers_backend(tiny_model: Path) -> None:
    """Sampling with top_k 1 is greedy: the top_k stage 06 passes under v1.3's decoding reaches generate."""
    from selftrain.config import GenerationConfig, ModelConfig
    from selftrain.inference import generate_candidates

    model_cfg = ModelConfig(name="tiny", path=str(tiny_model), max_model_len=512)
    prompts = ["alpha beta", "gamma delta epsilon"]
    greedy = GenerationConfig(n=1, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=3, backend="transformers")
    sampled = greedy.model_copy(update={"temperature": 1.5})

    def run(g: GenerationConfig, k: int) -> list[str]:
        outs = generate_candidates(tiny_model, model_cfg, g, prompts, "transformers", False, chat=False, top_k=k)
        return [o["text"] for o in outs]

    assert run(sampled, 1) == run(greedy, 0)
    assert run(sampled, 0) != run(greedy, 0)  # without the cap the random model's draws differ


def test_every_protocol_file_is_valid_and_maps_each_dataset_once() -> None:
    for name in ("llm-jp-eval-1.3", "llm-jp-eval-1.4", "llm-jp-eval-2"):
        spec = load_eval_protocol(name)
        listed = [d for c in spec.categories.values() for d in c] + list(spec.uncategorised)
        assert len(listed) == len(set(listed)), name
    v13 = load_eval_protocol("llm-jp-eval-1.3")
    assert list(v13.categories) == ["NLI", "QA", "RC", "MC", "HE", "EL", "FA", "MR", "MT"]
    assert "mmluen" in v13.categories["HE"] and "jsts" in v13.uncategorised and v13.empty_category == "zero"
    assert {"CG", "SUM"} <= set(load_eval_protocol("llm-jp-eval-1.4").categories)


def test_each_version_names_its_empty_category_rule_evidence_and_unconfirmed_rules() -> None:
    """The empty-category rule of every version is written with where it was read, or "assumed"; v1.4's SUM
    metric is listed as unconfirmed; v2 keeps no category map of its own (the checkout's only)."""
    v13, v14, v2 = (load_eval_protocol(f"llm-jp-eval-{v}") for v in ("1.3", "1.4", "2"))
    assert v13.empty_category == "zero" and "utils.py post_process_score_results" in v13.empty_category_evidence
    assert v14.empty_category_evidence.startswith("assumed") and v2.empty_category_evidence.startswith("assumed")
    assert set(v14.unconfirmed_metrics) == {"rouge2"} and not v13.unconfirmed_metrics
    assert v2.categories == {} and v2.categories_from_checkout is True and not v13.categories_from_checkout
    for spec in (v13, v14, v2):
        for evidence in (spec.empty_category_evidence, spec.decoding_evidence, spec.comet_device_evidence):
            assert evidence.startswith(("assumed", "as LLM-jp ran it")) or ".py" in evidence, (spec.name, evidence)


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


def test_v13_decodes_as_the_models_generation_config_says_and_runs_comet_on_the_cpu(
    tiny_overrides: list[str], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llm-jp-eval 1.3.0 hands transformers' pipeline only top_p 1.0 and repetition_penalty 1.0: the model's
    generation_config.json decides whether it samples (and at which temperature and top-k). COMET runs on the
    CPU (predict(gpus=0)). Both recorded per run in eval.json."""
    co = write_checkout(tmp_path, "1.3.0")
    tree = write_tree(tmp_path / "data", "1.3.0", {"jamp": {}, "alt-e-to-j": {"metrics": ["comet_wmt22"]}})
    model = tmp_path / "sampling-model"
    shutil.copytree(tiny_model, model)
    own = json.loads((model / "generation_config.json").read_text())
    settings = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.8, "repetition_penalty": 1.05}
    (model / "generation_config.json").write_text(json.dumps({**own, **settings}))
    comet_devices: list[str] = []

    def comet_stand_in(preds, golds, prepared=False, inputs=None, device="auto"):  # no COMET weights here
        comet_devices.append(device)
        return 0.5

    monkeypatch.setattr(metrics, "comet_wmt22", comet_stand_in)
    answers = {f"{n} question {i}": f"{i}" for n in ("jamp", "alt-e-to-j") for i in range(6)}
    calls: list = []
    monkeypatch.setattr(evaluate.stage, "generate_candidates", oracle_backend(answers, calls))
    base = ["eval.protocol=llm-jp-eval-1.3", f"eval.llm_jp_eval_dir={co}", f"eval.datasets_dir={tree}",
            "eval.max_samples=3"]  # fmt: skip
    run = _run(tiny_overrides, tmp_path, [*base, f"model.path={model}"])
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    g = calls[0]["gen"]
    # sampled at the model's temperature and top-k; top_p and repetition_penalty are the version's generator's
    assert (g.temperature, g.top_p, calls[0]["top_k"]) == (0.7, 1.0, 5)
    dec = m["decoding"]
    assert {k: dec[k] for k in ("greedy", "temperature", "top_p", "top_k", "repetition_penalty")} == {
        "greedy": False, "temperature": 0.7, "top_p": 1.0, "top_k": 5, "repetition_penalty": 1.0
    }  # fmt: skip
    gc = str(model / "generation_config.json")
    assert dec["from"] == {"do_sample": gc, "temperature": gc, "top_k": gc, "top_p": "generator",
                           "repetition_penalty": "generator"}  # fmt: skip
    assert dec["model_settings"] == settings and dec["generator"] == {"top_p": 1.0, "repetition_penalty": 1.0}
    assert dec["source"].startswith("params/eval/llm-jp-eval-1.3.yaml: evaluator.py")
    # COMET on the CPU, as v1.3's utils.py calls it, and recorded
    assert comet_devices == ["cpu"] and m["datasets"]["alt-e-to-j"]["score"] == 0.5
    evidence = "utils.py: comet_model.predict(..., batch_size=8, gpus=0)"
    assert m["comet_device"] == {"value": "cpu", "source": f"params/eval/llm-jp-eval-1.3.yaml: {evidence}"}

    # the tiny model's own generation_config says nothing of sampling: greedy (transformers' default do_sample)
    calls.clear()
    run = _run(tiny_overrides, tmp_path, [*base, "eval.comet_device=auto"])
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    assert m["decoding"]["greedy"] is True and calls[0]["gen"].temperature == 0.0 and calls[0]["top_k"] == 0
    assert m["decoding"]["from"]["do_sample"] == "transformers' default"
    assert m["comet_device"] == {"value": "auto", "source": "eval.comet_device"} and comet_devices[-1] == "auto"

    # v1.4 decodes greedily whatever the model says (LLM-jp's vLLM settings: temperature 0.0)
    co14 = write_checkout(tmp_path / "v14", "1.4.1")
    tree14 = write_tree(tmp_path / "data14", "1.4.1", {"jamp": {}})
    calls.clear()
    run = _run(tiny_overrides, tmp_path, [
        "eval.protocol=llm-jp-eval-1.4", f"eval.llm_jp_eval_dir={co14}", f"eval.datasets_dir={tree14}",
        f"model.path={model}", "eval.max_samples=3",
    ])  # fmt: skip
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    assert m["decoding"]["greedy"] is True and calls[0]["gen"].temperature == 0.0
    assert "temperature 0.0" in m["decoding"]["source"]

    # a setting the inference layer cannot reproduce is refused, naming the file and the key
    (model / "generation_config.json").write_text(json.dumps({**own, "num_beams": 4}))
    run = _run(tiny_overrides, tmp_path, [*base, f"model.path={model}"])
    with pytest.raises(ProtocolError, match=r"generation_config.json: key 'num_beams': 4"):
        evaluate.run(run, progress=False)


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
    assert "CG" in m["avg_excludes"] and "CG" not in m["avg_categories"]
    # SUM: v1.4's ROUGE-2 aggregation and scale are unconfirmed: xlsum_ja keeps its score and SUM counts, but the
    # dataset and the AVG it counts in are marked not comparable, with the rules file's reason
    why = load_eval_protocol("llm-jp-eval-1.4").unconfirmed_metrics["rouge2"]
    assert d["xlsum_ja"]["comparable"] is False and d["xlsum_ja"]["not_comparable_reason"] == why
    assert "SUM" in m["avg_categories"] and m["categories"]["SUM"]["unconfirmed"] == ["xlsum_ja"]
    assert m["avg_comparable"] is False and m["avg_not_comparable"] == [f"SUM: xlsum_ja: {why}"]
    assert m["not_comparable"]["xlsum_ja"] == why and "rouge2" in why and "v1.4" in why
    assert m["avg"] == pytest.approx(sum(c["score"] for c in m["categories"].values() if c["score"] is not None
                                         and c is not m["categories"]["CG"]) / len(m["avg_categories"]))  # fmt: skip
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
            # answer_parser's precedence: an id other than custom uses its own pattern, whatever the file says;
            # the file's pattern only under custom; custom without one: the default pattern
            "jsem": {"answer_pattern_id": "answer_tags_jp", "answer_extract_pattern": r"Label: (\w+)"},
            "janli": {"answer_pattern_id": "custom", "answer_extract_pattern": r"Label: (\w+)"},
            "jsick": {"answer_pattern_id": "custom", "language": "en"},
        },
        v2=True,
    )
    answers = {}
    for i in range(6):
        answers[f"jamp question {i}"] = f"I think <ans>{i}</ans>." if i != 3 else f"{i}"  # no tags: empty
        answers[f"jnli question {i}"] = f"Label: {i}\n"
        answers[f"jsquad question {i}"] = f"{i}\n\nmore"
        answers[f"jsem question {i}"] = f"Label: x{i}\n<ans>{i}</ans>"  # the file's pattern would read "x{i}"
        answers[f"janli question {i}"] = f"<ans>x</ans> Label: {i}"  # the tags would read "x"
        answers[f"jsick question {i}"] = f"{i}\n\nLabel: x"
    calls: list = []
    monkeypatch.setattr(evaluate.stage, "generate_candidates", oracle_backend(answers, calls))
    base = ["eval.protocol=llm-jp-eval-2", f"eval.llm_jp_eval_dir={co}", f"eval.datasets_dir={tree}",
            "eval.max_samples=5"]  # fmt: skip
    run = _run(tiny_overrides, tmp_path, base)
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    d = m["datasets"]
    assert (d["jamp"]["few_shots"], d["jnli"]["few_shots"], d["jsquad"]["few_shots"]) == (2, 4, 0)
    assert d["jamp"]["score"] == pytest.approx(4 / 5) and d["jnli"]["score"] == 1.0 and d["jsquad"]["score"] == 1.0
    assert (d["jsem"]["score"], d["janli"]["score"], d["jsick"]["score"]) == (1.0, 1.0, 1.0)
    assert calls[0]["add_special_tokens"] is True  # v2 tokenises with special tokens (BOS)
    jamp = next(p for p in calls[0]["prompts"] if "jamp question" in p)
    assert jamp.startswith("Task: Answer the jamp question.\nFormat: Answer inside <ans></ans>.\nQ: jamp-train")
    assert jamp.endswith("Q: jamp question 0\nA:")
    recs = read_jsonl(run.data_dir / "eval_predictions.jsonl")
    assert next(r for r in recs if r["dataset"] == "jamp" and r["index"] == 3)["prediction"] == ""
    # No category definition in the checkout: the datasets are scored, AVG is null with the reason, and no other
    # version's map stands in under v2's name.
    assert m["avg"] is None and m["avg_comparable"] is False and m["categories"] == {}
    assert m["categories_source"] is None and len(m["avg_not_comparable"]) == 1
    assert "eval_configs/all_datasets.yaml: not found" in m["avg_not_comparable"][0]
    assert all(v["category"] == "-" for v in d.values())

    # With the checkout's eval dataset config: its categories, its metrics, and AVG over them.
    (co / "eval_configs").mkdir()
    (co / "eval_configs" / "all_datasets.yaml").write_text(yaml.safe_dump(V2_DATASET_CONFIG, sort_keys=False))
    run = _run(tiny_overrides, tmp_path, base)
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    assert m["categories_source"] == str(co / "eval_configs" / "all_datasets.yaml")
    assert list(m["categories"]) == ["INF", "READ"] and m["categories"]["INF"]["datasets"] == ["jamp", "jnli"]
    assert m["avg"] == pytest.approx(((4 / 5 + 1.0) / 2 + 1.0) / 2) and m["avg_comparable"] is True
    assert m["datasets"]["jsquad"]["main_metric"] == "char_f1" and m["uncategorised"] == ["janli", "jsem", "jsick"]
    # ... or another file of the checkout, named by eval.dataset_config
    (co / "eval_configs" / "only_jamp.yaml").write_text(
        yaml.safe_dump({"datasets": ["jamp"], "categories": {"ONE": {"default_metric": "exact_match",
                                                                     "datasets": ["jamp"]}}})
    )  # fmt: skip
    run = _run(tiny_overrides, tmp_path, [*base, "eval.dataset_config=eval_configs/only_jamp.yaml"])
    evaluate.run(run, progress=False)
    m = json.loads((run.metrics_dir / "eval.json").read_text())
    assert list(m["categories"]) == ["ONE"] and m["avg"] == pytest.approx(4 / 5)

    # An id the checkout's answer_parser.py does not define is refused even when the file has its own pattern.
    tree2 = write_tree(tmp_path / "data2", "2.1.2", {
        "jamp": {"answer_pattern_id": "choice_only_jp", "answer_extract_pattern": r"(\w+)", "language": "ja"},
    }, v2=True)  # fmt: skip
    run = _run(tiny_overrides, tmp_path, [*base[:2], f"eval.datasets_dir={tree2}"])
    with pytest.raises(ProtocolError, match=r"jamp.json: field 'answer_pattern_id': 'choice_only_jp' has no pattern"):
        evaluate.run(run, progress=False)
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
    co = write_checkout(tmp_path, version, V2_DATASET_CONFIG if v2 else None)
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
