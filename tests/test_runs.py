"""Run folders, manifests, atomic writes and stage markers, including failures mid-stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selftrain import io
from selftrain.config import resolve_run_config
from selftrain.io import atomic_write_text
from selftrain.runs import create_run, open_run


def test_atomic_write_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")

    class Boom:
        def encode(self, _: str) -> bytes:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_text(target, Boom())  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp files left behind


def test_versions_resume_or_advance(tmp_path: Path) -> None:
    ov = [f"output.results_dir={tmp_path}"]
    cfg = resolve_run_config("tiny", "central", overrides=ov)
    a = create_run(cfg)
    assert a.dir == tmp_path / "scratch" / "tiny" / "central" / "v001"
    assert create_run(cfg).dir == a.dir  # same params: the unfinished version is resumed
    b = create_run(resolve_run_config("tiny", "central", overrides=[*ov, "generation.n=2"]))
    assert b.dir.name == "v002"  # different params never touch v001
    c = create_run(cfg, new_version=True)
    assert c.dir.name == "v003"
    assert open_run(a.dir).config == cfg


def test_manifest_content(tmp_path: Path) -> None:
    run = create_run(resolve_run_config("tiny", "central", overrides=[f"output.results_dir={tmp_path}"]))
    m = json.loads((run.dir / "manifest.json").read_text())
    for key in ("git", "packages", "hardware", "seeds", "stages", "params_sha256", "created"):
        assert key in m
    assert set(m["git"]) == {"sha", "dirty"}
    assert m["packages"]["torch"] and m["hardware"]["cpu_count"] >= 1
    hw = m["hardware"]
    assert hw["cpu"]["model"] and isinstance(hw["cpu"]["flags"], list) and hw["torch_cpu_capability"]
    assert isinstance(hw["bf16_native_cpu"], bool) and hw["cuda"] in (True, False)
    assert m["stages"] == {s: {"status": "pending"} for s in ("generate", "select", "sft", "dpo", "judge", "eval")}
    assert (run.dir / "params.resolved.yaml").is_file()


def test_stage_success_marker_is_written_last_and_failures_leave_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = create_run(resolve_run_config("tiny", "central", overrides=[f"output.results_dir={tmp_path}"]))
    written: list[Path] = []  # every file the run writes, in order
    real = io.atomic_write_bytes

    def spy(path: str | Path, data: bytes) -> Path:
        written.append(Path(path))
        return real(path, data)

    monkeypatch.setattr(io, "atomic_write_bytes", spy)
    with pytest.raises(KeyError):
        with run.stage("generate") as info:
            out = atomic_write_text(run.data_dir / "candidates.jsonl", "partial\n")
            info["outputs"].append(out)
            raise KeyError("killed mid-stage")
    assert not run.is_done("generate")
    st = run.manifest()["stages"]["generate"]
    assert st["status"] == "failed" and "killed mid-stage" in st["error"]
    with run.stage("generate") as info:
        info["outputs"].append(atomic_write_text(run.data_dir / "candidates.jsonl", "full\n"))
        info["metrics"]["x"] = 1
    assert run.is_done("generate")
    st = run.manifest()["stages"]["generate"]
    assert st["status"] == "done" and st["outputs"]["data/candidates.jsonl"] and st["seconds"] >= 0
    assert written[-1] == run.marker("generate")  # the marker is the stage's last write
    assert written[-2] == run.manifest_path and run.marker("generate") not in written[:-1]


def test_an_edited_input_or_a_lost_output_never_resumes(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour.", "response": "Blue."}\n')
    ov = [f"output.results_dir={tmp_path / 'r'}", f"prompts.path={prompts}"]
    cfg = resolve_run_config("tiny", "central", overrides=ov)
    a = create_run(cfg)
    assert a.manifest()["inputs"][str(prompts)] == io.sha256_file(prompts)
    with a.stage("generate") as info:
        info["outputs"].append(atomic_write_text(a.data_dir / "candidates.jsonl", "x\n"))
    assert create_run(cfg).dir == a.dir and a.is_done("generate")  # same params, same inputs: resumed
    # An edited prompt file: the same params never reuse the old version's outputs.
    prompts.write_text('{"prompt": "Name a fruit.", "response": "Pear."}\n')
    b = create_run(cfg)
    assert b.dir.name == "v002" and "inputs changed since v001" in b.note and str(prompts) in b.note
    # A finished stage whose output is gone (a committed reference keeps no candidates): not done, not resumed.
    with b.stage("generate") as info:
        info["outputs"].append(atomic_write_text(b.data_dir / "candidates.jsonl", "y\n"))
    (b.data_dir / "candidates.jsonl").unlink()
    assert not b.is_done("generate") and b.damaged_outputs("generate") == ["data/candidates.jsonl (missing)"]
    c = create_run(cfg)
    assert c.dir.name == "v003" and "missing or changed outputs" in c.note
    assert create_run(cfg).dir == c.dir  # and that one resumes


def test_files_honour_the_umask_and_json_is_strict(tmp_path: Path) -> None:
    import os

    old = os.umask(0o002)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
        assert p.stat().st_mode & 0o777 == 0o664  # group-writable, as a shared results folder needs
        os.umask(0o077)
        assert atomic_write_text(tmp_path / "b.txt", "x").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    out = io.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [float("inf"), 1.0]})
    assert json.loads(out.read_text()) == {"a": None, "b": [None, 1.0]} and "NaN" not in out.read_text()


def test_a_write_error_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot write .*file/x.json"):
        io.write_json(tmp_path / "file" / "x.json", {})


def test_the_study_index_says_when_runs_come_from_different_hardware(tmp_path: Path) -> None:
    from selftrain.report import write_study_index

    ov = [f"output.results_dir={tmp_path}", "study=hw"]
    a = create_run(resolve_run_config("tiny", "central", overrides=ov))
    b = create_run(resolve_run_config("tiny", "baseline", overrides=ov))
    assert "Hardware differs" not in write_study_index(tmp_path / "hw").read_text()
    m = json.loads(b.manifest_path.read_text())
    m["hardware"]["cpu"] = {"model": "Another CPU", "flags": ["amx_tile", "avx512_bf16"]}
    b.manifest_path.write_text(json.dumps(m))
    text = write_study_index(tmp_path / "hw").read_text()
    assert "Hardware differs between these runs** (2 setups" in text and "Another CPU [amx_tile, avx512_bf16]" in text
    assert a.dir.name == "v001"


def test_library_logs_go_to_the_run_log_and_own_warnings_stay(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import logging
    import warnings

    from selftrain.quiet import quiet_logs

    log = tmp_path / "logs" / "generate.log"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_logs(log):
            logging.getLogger("transformers.modeling_utils").warning("a dtype warning per weight")
            warnings.warn_explicit("a library's deprecation", FutureWarning, "/x/site-packages/lib/mod.py", 3)
            warnings.warn("dataset skipped: bad.json", UserWarning, stacklevel=1)
        logging.getLogger("transformers.modeling_utils").warning("after the stage")
    text = log.read_text()
    assert "a dtype warning per weight" in text and "a library's deprecation" in text
    assert "after the stage" not in text
    assert [str(w.message) for w in seen] == ["dataset skipped: bad.json"]  # the project's own stays visible
    assert "a dtype warning per weight" not in capsys.readouterr().err
