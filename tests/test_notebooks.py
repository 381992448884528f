"""The notebooks under papermill: the study runner end to end, resume, failures, default parameters."""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from selftrain.config import ConfigError
from selftrain.io import read_jsonl
from selftrain.runner import run_study

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _literal(node: ast.expr) -> bool:
    """A plain value: a string, number, bool or None, or a list of those (`overrides`)."""
    if isinstance(node, ast.Constant):
        return node.value is None or isinstance(node.value, str | int | float | bool)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, int | float)
    return isinstance(node, ast.List) and all(isinstance(e, ast.Constant) and _literal(e) for e in node.elts)


def parameters_problems(source: str) -> list[str]:
    """What in a parameters cell is not `name = literal`, one statement per line (comments and blank lines aside),
    plus what papermill's own reading of the cell warns about (a second "=" on a line, even in its comment)."""
    from papermill.translators import PythonTranslator

    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"line {e.lineno}: not Python ({e.msg})"]
    problems = []
    for node in tree.body:
        plain = (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and _literal(node.value)
            and node.lineno == node.end_lineno
        )
        if not plain:
            problems.append(f"line {node.lineno}: not name = literal: {ast.get_source_segment(source, node)}")
    if len({n.lineno for n in tree.body}) != len(tree.body):
        problems.append("two statements on one line")
    warned = _Messages()
    logger = logging.getLogger("papermill")
    logger.addHandler(warned)
    try:
        params = PythonTranslator.inspect(nbformat.v4.new_code_cell(source))
    finally:
        logger.removeHandler(warned)
    problems += [f"papermill: {w}" for w in warned.messages]
    names = [n.targets[0].id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)]
    if [p.name for p in params] != names:
        problems.append(f"papermill reads the parameters {[p.name for p in params]}, the cell sets {names}")
    return problems


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.unit
@pytest.mark.parametrize(
    "source",
    [
        "x = 1 if y else 2\n",
        "import os\n",
        "x = f()\n",
        "a = b = 1\n",
        "x = [f()]\n",
        "x = 1; y = 2\n",
        "x = {'a': 1}\n",
        'x = 1  # e.g. "n=2"\n',  # papermill: "Unable to parse line 1"
        "x = (\n    1\n)\n",
    ],
)
def test_the_parameters_check_refuses_what_is_not_a_plain_value(source: str) -> None:
    assert parameters_problems(source), source
    assert not parameters_problems('# a comment, "a=b"\nx = 1  # why\ny = -0.5\nz = ["a", "b"]\nw = None\n')


@pytest.mark.unit
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_thin_and_stripped(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    if path.name == "00_index.ipynb":  # the start page: text and links only
        assert not code and "07_figures.ipynb" in nb.cells[0].source
        return
    assert "parameters" in code[0].metadata.get("tags", [])
    assert parameters_problems(code[0].source) == [], path.name  # plain values only, as papermill reads them
    md = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert "What to look at" in "".join(md) or path.name == "07_figures.ipynb" and "look at" in "".join(md)
    if path.name != "07_figures.ipynb":  # each step links the next one
        assert re.search(r"\(0\d_\w+\.ipynb\)", md[-1]), path.name
    for c in code:
        assert not c.outputs and c.execution_count is None
        for bad in ("def ", "class ", "%cd", "!pip", "import os"):
            assert bad not in c.source, f"{path.name}: '{bad}' in a cell"


@pytest.mark.unit
def test_every_link_in_the_notebooks_opens_a_file_and_the_index_links_every_params_file() -> None:
    """JupyterLab opens a relative link of a rendered markdown cell as a document: a folder gives an "is a
    directory" error (issue 27: 00_index's models/methods/studies links). Every such link names a file that exists;
    the start page links every YAML of params/models, methods and studies, so a new one is not left out."""
    bad, linked = [], set()
    for path in NOTEBOOKS:
        md = "".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
        for target in re.findall(r"\]\(([^)\s]+)\)", md):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = (path.parent / target.split("#")[0]).resolve()
            if not file.is_file():
                bad.append(f"{path.name}: ({target}) {'is a folder' if file.is_dir() else 'does not exist'}")
            if path.name == "00_index.ipynb":
                linked.add(file)
    assert not bad, bad
    wanted = {f.resolve() for d in ("models", "methods", "studies") for f in (ROOT / "params" / d).glob("*.yaml")}
    assert wanted - linked == set(), sorted(str(f.relative_to(ROOT)) for f in wanted - linked)


@pytest.mark.unit
def test_notebooks_carry_the_metadata_jupyterlab_writes() -> None:
    """Opening a notebook in JupyterLab starts its kernel, which reports its kernelspec and language_info; where the
    file already holds them (and JupyterLab's serialisation), autosave has nothing to write and git stays clean.
    The Python patch version is compared on major.minor only: another 3.11.x rewrites it on a first save."""
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    lang = dict(IPythonKernel.language_info)
    for path in NOTEBOOKS:
        text = path.read_text(encoding="utf-8")
        nb = nbformat.reads(text, as_version=4)
        assert text == nbformat.writes(nb) + "\n", f"{path.name}: not as Jupyter writes it (nbformat.write)"
        meta = nb.metadata
        assert meta["kernelspec"] == {"display_name": spec.display_name, "language": "python", "name": "python3"}
        shown = dict(meta["language_info"])
        assert shown.pop("version").split(".")[:2] == lang.pop("version").split(".")[:2], path.name
        assert shown == lang, path.name
        lang = dict(IPythonKernel.language_info)


@pytest.mark.unit
def test_the_runners_line_per_stage_and_closing_table() -> None:
    """The key number of each stage of a committed demo run, as the runner's line shows it; a cell without a stage's
    metrics shows nothing; the closing table has a row per cell, counts and seconds aligned right."""
    from selftrain.runner import CellResult, StageFailed, _failure, summary_table
    from selftrain.schema import key_number

    run = ROOT / "results" / "demo" / "smollm2-135m" / "central" / "v001"
    assert [key_number(run, s) for s in ("generate", "select", "sft", "dpo", "judge", "eval")] == [
        "192 candidates, 22% ended by themselves",
        "48 SFT examples, 48 DPO pairs",
        "loss 2.091 after 6 steps",
        "loss 0.685 after 12 steps",
        "quality 1.64, safety 3.46",
        "AVG 0.199",
    ]
    assert key_number(ROOT / "results" / "demo" / "smollm2-135m" / "baseline" / "v001", "sft") == ""
    ok = CellResult("tiny", "central", ROOT / "results" / "x", ["generate", "select"], ["sft"], 12.34)
    bad = CellResult("tiny", "fallback-original", None, [], [], 0.5, "generate", "boom")
    lines = summary_table([ok, bad]).splitlines()
    assert lines[0].split() == ["cell", "result", "ran", "skipped", "seconds", "run", "folder"]
    assert lines[1].split() == ["tiny/central", "ok", "2", "1", "12.3", "results/x"]
    assert lines[2].split() == ["tiny/fallback-original", "FAILED", "at", "generate", "0", "0", "0.5", "-"]
    right = lines[0].index("seconds") + len("seconds")  # counts and seconds align right under their header
    assert lines[1][:right].endswith(" 12.3") and lines[2][:right].endswith(" 0.5")
    head = "notebook notebooks/01_generate.ipynb failed in cell 3 (executed copy: x.ipynb):\n  "
    two = StageFailed(head + "DataError: p.jsonl:2: missing field 'response'\np.jsonl:5: missing field 'prompt'")
    assert _failure(two) == "DataError: p.jsonl:2: missing field 'response' (+1 more lines)"  # the stage's line
    assert _failure(ConfigError("a.yaml: unknown key 'x'")) == "a.yaml: unknown key 'x'"


def test_selftrain_run_is_quiet_with_one_line_per_stage(tiny_overrides: list[str], tmp_path: Path) -> None:
    """`selftrain run` prints one line per stage and the closing table, nothing on stderr (no papermill lines, no
    kernel or library warnings): those go to the run's logs/<stage>.log. --verbose brings them back."""
    sets = [x for o in tiny_overrides for x in ("--set", o)]
    base = [sys.executable, "-m", "selftrain", "run", "--study", "params/studies/tiny.yaml", "--methods", "central"]
    cmd = [*base, "--stages", "generate", "select", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout.splitlines()
    stages = [line for line in out if line.startswith("tiny/central  ") and " s  " in line]  # not the table's row
    assert len(stages) == 2, proc.stdout
    assert re.fullmatch(r"tiny/central  generate +[0-9.]+ s  \d+ candidates, \d+% ended by themselves", stages[0])
    assert re.fullmatch(r"tiny/central  select +[0-9.]+ s  \d+ SFT examples, \d+ DPO pairs", stages[1])
    assert "Executing" not in proc.stdout and any(line.startswith("study index: ") for line in out)
    assert out[-2].split()[:5] == ["cell", "result", "ran", "skipped", "seconds"]
    assert out[-1].split()[:4] == ["tiny/central", "ok", "2", "0"] and float(out[-1].split()[4]) > 0
    run_dir = tmp_path / "results" / "tiny" / "tiny" / "central" / "v001"
    log = (run_dir / "logs" / "generate.log").read_text()
    assert "Executing Cell 1" in log and "Executing notebook with kernel: python3" in log
    verbose = subprocess.run(
        [*base, "--stages", "generate", "--new-version", "--verbose", *sets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert verbose.returncode == 0, verbose.stderr
    assert "Executing Cell 1" in verbose.stderr
    assert "v002" in verbose.stdout  # a new version, whose log has the same lines
    assert "Executing Cell 1" in (run_dir.parent / "v002" / "logs" / "generate.log").read_text()


def test_study_runner_end_to_end_and_resume(tiny_overrides: list[str], tmp_path: Path) -> None:
    logs: list[str] = []
    res = run_study("params/studies/tiny.yaml", overrides=tiny_overrides, log=logs.append)
    assert [(r.model, r.method) for r in res] == [("tiny", "central"), ("tiny", "fallback-original")]
    for r in res:
        assert r.executed == ["generate", "select", "sft", "dpo", "judge", "eval"]
        for nb in (
            "01_generate.ipynb",
            "02_select.ipynb",
            "03_sft.ipynb",
            "04_dpo.ipynb",
            "05_judge.ipynb",
            "06_eval.ipynb",
        ):
            executed = nbformat.read(r.run_dir / "notebooks" / nb, as_version=4)
            assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        m = json.loads((r.run_dir / "manifest.json").read_text())
        assert {s["status"] for s in m["stages"].values()} == {"done"}
        assert len(read_jsonl(r.run_dir / "data" / "selection.jsonl")) == 5
        assert (r.run_dir / "figures" / "dpo_curves.png").is_file()
        judged = json.loads((r.run_dir / "metrics" / "judge.json").read_text())
        assert judged["model_under_test"] == m["stages"]["dpo"]["metrics"]["model_path"]  # the trained model
    again = run_study("params/studies/tiny.yaml", overrides=tiny_overrides, log=logs.append)
    assert [r.executed for r in again] == [[], []] and [r.run_dir for r in again] == [r.run_dir for r in res]
    assert any("already done" in line for line in logs)


@pytest.mark.vllm
def test_study_runner_with_vllm_backend(tiny_overrides: list[str]) -> None:
    pytest.importorskip("vllm")
    res = run_study(
        "params/studies/tiny.yaml", methods=["central"], overrides=[*tiny_overrides, "generation.backend=vllm"]
    )
    run_dir = res[0].run_dir
    meta = json.loads((run_dir / "metrics" / "generate.json").read_text())
    assert meta["backend"] == "vllm"
    recs = read_jsonl(run_dir / "data" / "candidates.jsonl")
    assert len(recs) == 15 and set(recs[0]) == {
        "prompt_id",
        "candidate_index",
        "text",
        "finish_reason",
        "num_tokens",
        "seed",
    }
    # generation.seeding engine (the default): every candidate drew from the engine seeded with 1234.
    assert [r["seed"] for r in recs] == [1234] * 15
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 12 for r in recs)
    assert (run_dir / "stages" / "dpo" / "_SUCCESS").is_file()


def test_failing_cell_names_notebook_cell_and_error(tiny_overrides: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q2"}\n')
    ov = [*tiny_overrides, f"prompts.path={bad}"]
    res = run_study("params/studies/tiny.yaml", overrides=ov)  # both cells fail; neither stops the other
    assert [(r.method, r.failed_stage, r.executed) for r in res] == [
        ("central", "generate", []),
        ("fallback-original", "generate", []),
    ]
    msg = res[0].error
    assert "notebooks/01_generate.ipynb" in msg and "cell" in msg
    assert "DataError" in msg and "bad.jsonl:2: missing field 'response'" in msg
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "selftrain",
            "run",
            "--study",
            "params/studies/tiny.yaml",
            "--methods",
            "central",
            *[x for o in ov for x in ("--set", o)],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "FAILED" in proc.stderr and "01_generate.ipynb" in proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("tiny/central  generate"))  # the stage's line
    assert "FAILED: DataError" in line and "bad.jsonl:2" in line
    assert line.endswith(
        f"(log: {tmp_path / 'results' / 'tiny' / 'tiny' / 'central' / 'v001' / 'logs' / 'generate.log'})"
    )


def test_cli_rejects_unknown_names(tiny_overrides: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "selftrain", "run", "--study", "params/studies/tiny.yaml", "--methods", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "nope" in proc.stderr and "tiny.yaml" in proc.stderr


def test_notebooks_run_with_default_parameters(tmp_path: Path) -> None:
    """As in JupyterLab: empty run_dir makes a scratch run; only the model/study scalars are changed."""
    import papermill as pm

    params = {"model": "tiny", "study": "params/studies/tiny.yaml", "results_dir": str(tmp_path)}
    for name in ("01_generate.ipynb", "02_select.ipynb", "03_sft.ipynb", "04_dpo.ipynb", "05_judge.ipynb"):
        pm.execute_notebook(
            str(ROOT / "notebooks" / name),
            str(tmp_path / name),
            parameters=params,
            cwd=str(ROOT / "notebooks"),
            kernel_name="python3",
            progress_bar=False,
        )
    run_dir = tmp_path / "scratch" / "tiny" / "central" / "v001"  # scratch runs never mix with a study's
    assert (run_dir / "stages" / "dpo" / "_SUCCESS").is_file()
    # 05 defaults to method baseline: M0 is judged without any training
    assert (tmp_path / "scratch" / "tiny" / "baseline" / "v001" / "stages" / "judge" / "_SUCCESS").is_file()


def test_one_failing_cell_does_not_stop_the_others(tiny_overrides: list[str], tmp_path: Path) -> None:
    """central fails in 03_sft (a learning rate TRL can't use); baseline (no training) still runs to the end."""
    study = tmp_path / "iso.yaml"
    study.write_text(
        "study:\n  name: iso\n  models: [tiny]\n  methods: [central, baseline]\n"
        "  stages: [generate, select, sft, dpo, judge]\nprompts:\n  limit: 4\n"
    )
    logs: list[str] = []
    res = run_study(str(study), overrides=[*tiny_overrides, "training.sft.learning_rate=fast"], log=logs.append)
    central, baseline = res
    assert not central.ok and central.failed_stage == "sft" and central.executed == ["generate", "select"]
    assert "03_sft.ipynb" in central.error and "TypeError" in central.error
    assert baseline.ok and baseline.executed == ["generate", "select", "sft", "dpo", "judge"]
    assert any("1 of 2 cells failed" in line for line in logs)
    index = (tmp_path / "results" / "iso" / "README.md").read_text()
    assert "failed at sft" in index and "| baseline | [v001](tiny/baseline/v001) | complete |" in index


def test_killed_study_resumes_without_redoing_done_stages(tiny_overrides: list[str], tmp_path: Path) -> None:
    import os
    import signal
    import time

    cmd = [sys.executable, "-m", "selftrain", "run", "--study", "params/studies/tiny.yaml", "--methods", "central"]
    cmd += [x for o in tiny_overrides for x in ("--set", o)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = tmp_path / "results" / "tiny" / "tiny" / "central" / "v001"
    deadline = time.time() + 240
    while not (run_dir / "stages" / "select" / "_SUCCESS").is_file():
        assert proc.poll() is None and time.time() < deadline, "the study ended or stalled before select finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: runner and notebook kernel
    proc.wait()
    assert not (run_dir / "stages" / "judge" / "_SUCCESS").is_file()

    res = run_study("params/studies/tiny.yaml", methods=["central"], overrides=tiny_overrides)
    assert res[0].run_dir == run_dir and res[0].ok
    assert res[0].skipped[:2] == ["generate", "select"] and "generate" not in res[0].executed
    assert res[0].executed[-1] == "eval"
    m = json.loads((run_dir / "manifest.json").read_text())
    assert {s["status"] for s in m["stages"].values()} == {"done"}


def test_a_dead_kernel_fails_only_its_cell(tiny_overrides: list[str], tmp_path: Path) -> None:
    """A kernel killed mid-stage (as the OOM killer would) is that cell's failure, recorded with its cause;
    the other cell runs on, and the index says where the first one failed."""
    import threading
    import time

    import psutil

    study = tmp_path / "dead.yaml"
    study.write_text(
        "study:\n  name: dead\n  models: [tiny]\n  methods: [central, baseline]\n"
        "  stages: [generate, select, sft, dpo]\nprompts:\n  limit: 4\n"
    )
    manifest = tmp_path / "results" / "dead" / "tiny" / "central" / "v001" / "manifest.json"
    killed: list[int] = []

    def sft_running() -> bool:
        try:
            return json.loads(manifest.read_text())["stages"]["sft"]["status"] == "running"
        except (OSError, ValueError, KeyError):
            return False

    def killer() -> None:
        deadline = time.time() + 300
        while not killed and time.time() < deadline:
            if sft_running():  # 03_sft's kernel is training
                for child in psutil.Process().children(recursive=True):
                    if "ipykernel" in " ".join(child.cmdline()):
                        child.kill()
                        killed.append(child.pid)
                        break
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    logs: list[str] = []
    res = run_study(str(study), overrides=tiny_overrides, log=logs.append)
    t.join(timeout=1)
    central, baseline = res
    assert killed, "no kernel was running during sft"
    assert not central.ok and central.failed_stage == "sft" and "kernel died" in central.error
    m = json.loads((central.run_dir / "manifest.json").read_text())
    assert m["stages"][central.failed_stage]["status"] == "failed"
    assert "kernel died" in m["stages"][central.failed_stage]["error"]
    assert baseline.ok and baseline.executed == ["generate", "select", "sft", "dpo"]
    index = (tmp_path / "results" / "dead" / "README.md").read_text()
    assert f"failed at {central.failed_stage}" in index


def test_every_cells_params_are_checked_before_any_cell_runs(tiny_overrides: list[str], tmp_path: Path) -> None:
    study = tmp_path / "typo.yaml"
    study.write_text("study:\n  name: typo\n  models: [tiny]\n  methods: [central, centrl, baseline]\n")
    with pytest.raises(ConfigError) as e:
        run_study(str(study), overrides=[*tiny_overrides, "training.sft.learning_rat=1"])
    msg = str(e.value)
    assert msg.startswith("invalid params (no cell was run):")
    assert (
        "no method params named 'centrl'" in msg and msg.count("unknown key 'training.sft.learning_rat'") == 1
    )  # once, not per cell
    assert not (tmp_path / "results" / "typo").exists()
