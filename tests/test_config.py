"""Params: every YAML loads, merge order holds, and bad params name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selftrain.config import ConfigError, load_study, resolve_run_config, validate_params_file
from selftrain.schema import METHODS

ROOT = Path(__file__).resolve().parents[1]
ALL_YAML = sorted((ROOT / "params").rglob("*.yaml"))


def test_there_are_params() -> None:
    names = {p.relative_to(ROOT / "params").as_posix() for p in ALL_YAML}
    for want in (
        "base.yaml",
        "models/smollm2-135m.yaml",
        "models/tiny.yaml",
        "studies/demo.yaml",
        "studies/poster.yaml",
        *(f"methods/{m}.yaml" for m in METHODS),
        *(f"models/llm-jp-3-{s}.yaml" for s in ("150m", "980m", "1.8b", "3.7b")),
    ):
        assert want in names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(ROOT / "params").as_posix())
def test_every_params_file_validates(path: Path) -> None:
    validate_params_file(path)


@pytest.mark.parametrize("study", sorted((ROOT / "params" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_cell_resolves(study: Path) -> None:
    st, _, _ = load_study(study)
    for model in st.models:
        for method in st.methods:
            cfg = resolve_run_config(model, method, study)
            assert cfg.model.name == model and cfg.method == method and cfg.study == st.name
            # A method file names its selection method; a variant (central-chrf) names another file's method.
            named = yaml.safe_load((ROOT / "params" / "methods" / f"{method}.yaml").read_text())["selection"]["method"]
            assert cfg.selection.method == named


def test_merge_order_base_model_method_study_cli() -> None:
    base = resolve_run_config("tiny", "central")
    assert base.generation.n == 3  # tiny.yaml overrides base's 4
    demo = resolve_run_config("smollm2-135m", "drop-low", "params/studies/demo.yaml")
    study_limit = yaml.safe_load((ROOT / "params" / "studies" / "demo.yaml").read_text())["prompts"]["limit"]
    assert base.prompts.limit is None and demo.prompts.limit == study_limit  # the study's value, not base's
    assert demo.selection.method == "drop-low"
    cli = resolve_run_config(
        "smollm2-135m", "drop-low", "params/studies/demo.yaml", ["generation.n=2", "selection.low_fraction=0.25"]
    )
    assert cli.generation.n == 2 and cli.selection.low_fraction == 0.25
    assert cli.generation.temperature == 1.0  # untouched keys keep the study's value


def test_poster_uses_the_llm_jp_models() -> None:
    cfg = resolve_run_config("llm-jp-3-1.8b", "central", "params/studies/poster.yaml")
    assert cfg.model.path == "llm-jp/llm-jp-3-1.8b-instruct3"
    assert cfg.prompts.path == "llm-jp/magpie-sft-v1.0"


def _tmp_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of params/ in a temp project root so tests can plant bad files."""
    import shutil

    shutil.copytree(ROOT / "params", tmp_path / "params")
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setenv("SELFTRAIN_ROOT", str(tmp_path))
    return tmp_path / "params"


def test_unknown_key_names_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _tmp_params(tmp_path, monkeypatch)
    (params / "methods" / "central.yaml").write_text("selection:\n  method: central\n  temprature: 0.7\n")
    with pytest.raises(ConfigError) as e:
        resolve_run_config("tiny", "central")
    assert "methods/central.yaml" in str(e.value) and "selection.temprature" in str(e.value)


def test_wrong_type_names_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _tmp_params(tmp_path, monkeypatch)
    (params / "models" / "tiny.yaml").write_text(
        (params / "models" / "tiny.yaml").read_text().replace("n: 3", "n: three")
    )
    with pytest.raises(ConfigError) as e:
        resolve_run_config("tiny", "central")
    assert "models/tiny.yaml" in str(e.value) and "generation.n" in str(e.value)


def test_cli_override_errors_name_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"command line \(generation.top_p=2\).*generation.top_p"):
        resolve_run_config("tiny", "central", overrides=["generation.top_p=2"])
    with pytest.raises(ConfigError, match="section.key=value"):
        resolve_run_config("tiny", "central", overrides=["generation.n"])


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no model params named 'nope'"):
        resolve_run_config("nope", "central")
    with pytest.raises(ConfigError, match="params file not found"):
        load_study(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(bad)
    nostudy = tmp_path / "nostudy.yaml"
    nostudy.write_text("generation: {n: 2}\n")
    with pytest.raises(ConfigError, match="missing required key 'study'"):
        load_study(nostudy)


def test_override_values_parse_scientific_notation() -> None:
    from selftrain.config import parse_override

    assert parse_override("training.sft.learning_rate=2e-4") == ("training.sft.learning_rate", 2e-4)
    assert parse_override("x=1.5E3") == ("x", 1500.0)
    assert parse_override('x="no"') == ("x", "no") and parse_override("x=e5") == ("x", "e5")


def test_one_line_errors_for_overrides_files_and_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"command line: override 'generation.n=\[1,': the value is not valid YAML"):
        resolve_run_config("tiny", "central", overrides=["generation.n=[1,"])
    bad = tmp_path / "study.yaml"
    bad.write_bytes(b"study:\n  name: x\n  models: [tiny]\n  methods: [caf\xe9]\n")
    with pytest.raises(ConfigError, match=r"study.yaml:4: not UTF-8 \(byte 0xe9"):
        load_study(bad)
    for override, key in (("study=../../x", "study"), ("model.name=../../x", "model.name"), ("method=", "method")):
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            resolve_run_config("tiny", "central", overrides=[override])
    with pytest.raises(ConfigError, match="is a folder"):
        load_study(tmp_path)


def test_yaml_numbers_are_numbers_and_yes_no_stay_strings(tmp_path: Path) -> None:
    from selftrain.config import parse_yaml

    assert parse_yaml("a: 2e-4\nb: 1E3\nc: no\nd: on\ne: true\nf: 5\ng: 0.5") == {
        "a": 2e-4, "b": 1000.0, "c": "no", "d": "on", "e": True, "f": 5, "g": 0.5,
    }  # fmt: skip
    study = tmp_path / "s.yaml"
    study.write_text(
        "study: {name: s, models: [tiny], methods: [central]}\n"
        "training:\n  sft: {learning_rate: 2e-4, save_strategy: no}\n"
    )
    cfg = resolve_run_config("tiny", "central", study, check_trainer=True)
    assert cfg.training.sft["learning_rate"] == 2e-4 and cfg.training.sft["save_strategy"] == "no"


def test_a_protocol_without_its_checkout_is_refused_when_params_are_read() -> None:
    with pytest.raises(ConfigError, match=r"command line \(eval.protocol=llm-jp-eval-1.3\).*set eval.llm_jp_eval_dir"):
        resolve_run_config("tiny", "central", overrides=["eval.protocol=llm-jp-eval-1.3"])
    with pytest.raises(ConfigError, match="set judge.llm_jp_judge.path"):
        resolve_run_config("tiny", "central", overrides=["judge.protocol=llm-jp-judge"])
