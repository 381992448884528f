"""The package's layout rules: stage modules are leaves over the shared core, no import cycle, one name per
stage through notebook, module, params and outputs (the README's stage table is schema.STAGE_TABLE), and the
repository refers to nothing outside itself."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from selftrain.schema import STAGE_TABLE, STAGES

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "selftrain"
STAGE_UNITS = {"generate", "select", "train", "judge", "evaluate", "figures"}
TOP = {"runner", "__main__", "cli"}  # the runner and the command line sit on top of the stages
# A core module serves two floors or more; these serve one, for the reason given.
ONE_USER: dict[str, str] = {}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in the file (function-level imports included)."""
    modules = {_module_name(p, pkg.parent): p for p in pkg.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_stage_modules_import_no_other_stage_and_the_core_imports_no_stage() -> None:
    bad = []
    for mod, deps in import_graph().items():
        unit = _unit(mod)
        for d in deps:
            target = _unit(d)
            if target in STAGE_UNITS and target != unit and unit not in TOP:
                bad.append(f"{mod} imports {d}")
    assert not bad, "stage modules must be leaves over the core:\n" + "\n".join(sorted(bad))


def test_no_import_cycle() -> None:
    graph = import_graph()
    # A package's __init__ importing its own submodules is not a cycle back through the package.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_root_shows_two_floors() -> None:
    """Each stage is one module or package named after it; every other module at the root is shared core, imported
    from at least two places (stages, other core modules, the runner or the command line), or says why not."""
    graph = import_graph()
    users: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        for d in deps:
            users.setdefault(_unit(d), set()).add(_unit(mod))
    root = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    core = root - STAGE_UNITS - TOP - {"__init__"}
    lonely = {m: sorted(users.get(m, set()) - {m}) for m in core if len(users.get(m, set()) - {m, ""}) < 2}
    assert set(lonely) == set(ONE_USER), f"core modules with fewer than two users: {lonely}"
    helpers = {p.stem for p in PKG.glob("*.py")} & {"cpu_head", "launch", "similarity", "metrics", "slurm", "clean"}
    assert not helpers, f"a stage's (or the command line's) helpers belong in its package: {helpers}"


def test_the_graph_sees_function_level_and_package_imports(tmp_path: Path) -> None:
    """The checker itself, on a planted package: a lazy stage-to-stage import and a module import are seen."""
    pkg = tmp_path / "selftrain"
    (pkg / "judge").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("X = 1\n")
    (pkg / "judge" / "__init__.py").write_text("")
    (pkg / "judge" / "stage.py").write_text("def f():\n    from selftrain.train import X\n    return X\n")
    (pkg / "judge" / "other.py").write_text("import selftrain.judge.stage\n")
    graph = import_graph(pkg)
    assert graph["selftrain.judge.stage"] == {"selftrain.train"}
    assert graph["selftrain.judge.other"] == {"selftrain.judge.stage"}


def test_stage_table_names_real_notebooks_modules_and_params() -> None:
    from selftrain.config import RunConfig

    assert list(STAGE_TABLE) == list(STAGES)
    for s in STAGE_TABLE.values():
        assert (ROOT / "notebooks" / s.notebook).is_file(), s.notebook
        importlib.import_module(s.module)
        section = s.params.split()[0].split(".")
        assert section[0] in RunConfig.model_fields, s.params


def test_readme_stage_table_and_layout_match_the_schema() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\d\d) \| `(\w+)` \| `([\w.]+)` \| `([\w.]+)` \| `([^`]+)` \| (.+) \|$", readme, re.M)
    assert [r[1] for r in rows] == [*STAGES, "figures"], "README's stage table must list every stage, in order"
    for _, name, notebook, module, params, outputs in rows[:-1]:
        s = STAGE_TABLE[name]
        assert (notebook, module, params) == (s.notebook, s.module, s.params), name
        for f in (*s.metrics, *s.data, *s.figures):
            assert f in outputs, f"README's stage table: {name} does not list {f}"
    layout = readme[readme.index("## Layout") :]
    for nb in (*(s.notebook for s in STAGE_TABLE.values()), "07_figures.ipynb"):
        assert nb.removesuffix(".ipynb") in layout


def test_no_reference_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        p = ROOT / f
        if p.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".ipynb", ".txt"} or f.startswith("results/"):
            continue
        text = p.read_text(errors="replace")
        for bad in ("../" + "shared", "DESIGN" + ".md"):  # spelt in parts so this file does not match itself
            if bad in text:
                hits.append(f"{f}: {bad}")
    assert not hits, "the repository must stand on its own:\n" + "\n".join(hits)


# Lists, for the collected session, each test's markers (one JSON line per test) into the file named by argv[1].
_COLLECT = """
import json, sys, pytest
class Dump:
    def pytest_collection_finish(self, session):
        with open(sys.argv[1], "w") as f:
            for it in session.items:
                f.write(json.dumps([it.nodeid, sorted({m.name for m in it.iter_markers()})]) + "\\n")
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[2:]], plugins=[Dump()]))
"""


def _collect(root: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _COLLECT, str(out), *args], cwd=root, capture_output=True, text=True, timeout=600
    )


def test_every_test_lands_in_exactly_one_tier(tmp_path: Path) -> None:
    """The whole suite as pytest collects it: one tier marker per test; the unit tier (make test-fast) holds no
    slow or vLLM test; every tier but slurm's has tests here (gpu tests are skipped without CUDA, still collected).
    This session's collection when it took every test file (make test, make test-fast), else a fresh one."""
    from conftest import COLLECTED, TIERS

    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")}
    items = [[node, marks] for node, marks in COLLECTED.items()]
    if {node.split("::")[0] for node, _ in items} != files:
        out = tmp_path / "items.jsonl"
        proc = _collect(ROOT, out, "tests")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        items = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(items) > 300
    bad = [f"{node}: {sorted(set(marks) & set(TIERS))}" for node, marks in items if len(set(marks) & set(TIERS)) != 1]
    assert not bad, "tests not in exactly one tier:\n" + "\n".join(bad)
    heavy = [node for node, marks in items if "unit" in marks and {"slow", "vllm"} & set(marks)]
    assert not heavy, f"slow or vLLM tests in the unit tier: {heavy}"
    per_tier = {t: sum(t in marks for _, marks in items) for t in TIERS}
    assert all(per_tier[t] for t in ("unit", "integration", "notebook", "browser", "gpu", "rehearsal")), per_tier


def test_a_test_without_a_tier_or_with_two_is_refused(tmp_path: Path) -> None:
    """The conftest hook itself, on planted tests: a file it has no default for, and a test marked twice."""
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "test_planted.py").write_text("def test_no_tier():\n    pass\n")
    (tests / "test_layout.py").write_text(
        "import pytest\n\n\n@pytest.mark.notebook\ndef test_two_tiers():\n    pass\n\n\ndef test_one():\n    pass\n"
    )
    proc = _collect(tmp_path, tmp_path / "items.jsonl", "tests")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "tests/test_planted.py::test_no_tier: no tier" in text
    assert "tests/test_layout.py::test_two_tiers: tiers notebook, unit" not in text  # a marker replaces the default
    twice = "import pytest\n\n\n@pytest.mark.unit\n@pytest.mark.notebook\ndef test_two():\n    pass\n"
    (tests / "test_layout.py").write_text(twice)
    (tests / "test_planted.py").unlink()
    proc = _collect(tmp_path, tmp_path / "items.jsonl", "tests")
    assert proc.returncode != 0 and "tests/test_layout.py::test_two: tiers notebook, unit" in proc.stdout + proc.stderr


def test_ci_fails_the_browser_tier_when_chromium_was_expected(tmp_path: Path) -> None:
    """.ci/run runs lint and every tier; once Chromium is installed (SELFTRAIN_REQUIRE_BROWSER=1) a missing browser
    fails the browser tests instead of skipping them; without it they skip, saying why."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make lint" in ci and "make test" in ci and "SELFTRAIN_REQUIRE_BROWSER=1" in ci
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_browser.py"]
    env = {**os.environ, "SELFTRAIN_CHROMIUM": str(tmp_path / "no-chromium")}
    expected = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "SELFTRAIN_REQUIRE_BROWSER": "1"}
    )
    assert expected.returncode == 1, expected.stdout[-2000:]
    summary = expected.stdout.splitlines()[-1]  # a failing fixture: the tests end as errors, none skipped
    assert re.search(r"\d+ (failed|errors?)", summary) and "skipped" not in summary, summary
    assert "no-chromium not found" in expected.stdout
    optional = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "SELFTRAIN_REQUIRE_BROWSER": "0"}
    )
    assert optional.returncode == 0 and "skipped" in optional.stdout and "no-chromium not found" in optional.stdout
