"""The Slurm path on a real two-node Slurm cluster started on this host (tests/slurm_cluster.py): the grid written by
`selftrain slurm`, submitted with submit.sh, cut by a cancelled task and a dead node, resubmitted, equal to a local
`selftrain run`; a training stage over `srun` on both nodes; two identical runs and two methods of one model at
the same moment. Marked `slurm`: skipped only where the Slurm and munge programs are not installed; where they are
and the cluster does not come up, the tests fail with the daemons' log tails."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from slurm_cluster import Cluster, ClusterError, missing_binaries

from selftrain.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}; Debian: apt-get install slurmctld slurmd "
                    "slurm-client munge)")  # fmt: skip
    c = Cluster(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        c.start(timeout_s=90)
    except (ClusterError, OSError, subprocess.SubprocessError) as e:
        c.stop()
        pytest.fail(f"the Slurm programs are installed but the two-node cluster did not come up: {e}", pytrace=False)
    print(f"Slurm cluster up under {c.root}; {c.hosts_note}")
    yield c
    c.stop()


def _setup_line() -> str:
    """The environment line the scripts start with: this interpreter's virtualenv."""
    activate = Path(PY).parent / "activate"
    return f"source {shlex.quote(str(activate))}" if activate.is_file() else f"export PATH={Path(PY).parent}:$PATH"


def _write_study(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _scripts(study: Path, *extra: str) -> Path:
    """`selftrain slurm` for the study on a CPU cluster, one CPU a task; returns the scripts' folder."""
    assert main(["slurm", "--study", str(study), "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "30:00",
                 "--setup", _setup_line(), *extra]) == 0  # fmt: skip
    name = yaml.safe_load(study.read_text())["study"]["name"]
    out = Path(yaml.safe_load(study.read_text())["output"]["results_dir"]) / name / "slurm"
    assert (out / "submit.sh").is_file()
    return out


def _submit(cluster: Cluster, scripts: Path) -> dict[str, str]:
    """bash submit.sh; the job id of each array it submitted."""
    p = subprocess.run(["bash", str(scripts / "submit.sh")], env=cluster.env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr + cluster.log_tails()
    jobs = dict(re.findall(r"(\w+) job (\d+)", p.stdout))
    assert jobs, p.stdout
    return jobs


def _wait(what: str, cond: Callable[[], object], timeout_s: float, cluster: Cluster) -> object:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s; queue {cluster.squeue()}\n{cluster.log_tails()}")


def _sft_checkpoints(run_dir: Path) -> list[Path]:
    """The complete Trainer checkpoints of a run's SFT so far; fails if the SFT already finished (too late to cut)."""
    from selftrain.runs import open_run

    if not (run_dir / "manifest.json").is_file():
        return []
    sft = open_run(run_dir).checkpoints_dir("sft")
    assert not (sft / "final" / "_SUCCESS").is_file(), f"{run_dir}: SFT finished before it could be cut"
    return sorted((sft / "trainer").glob("checkpoint-*/_COMPLETE"))


def _cell_block(status: str, cell: str) -> str:
    """A cell's lines in `selftrain status`'s report: its own line and the indented ones below it."""
    lines = status.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(f"{cell}:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


def _task_logs(scripts: Path) -> str:
    return "\n".join(f"=== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(scripts.glob("*.out")))


# ------------------------------------------------------------------------------------------------ comparisons

TIMING = re.compile(r"(seconds|_per_second|runtime)$")
# Which shards a stage made itself, the rest having come from `selftrain shard` (array tasks): all of them on a local
# run, none on the grid's; the grid test checks its side.
HERE = {"shards_generated_here", "shards_answered_here", "shards_predicted_here"}
RUN_ID = re.compile(r"v\d{3}-[0-9a-f]{8}")  # the checkpoints folder's run id (hash of run folder + creation time)


def _normalised(text: str, base: Path) -> str:
    return RUN_ID.sub("vNNN-ID", text.replace(str(base), "<base>"))


def _drop(obj: object, keys: set[str]) -> object:
    """JSON without timing keys (and the named ones), at every depth."""
    if isinstance(obj, dict):
        return {k: _drop(v, keys) for k, v in obj.items() if not TIMING.search(k) and k not in keys}
    if isinstance(obj, list):
        return [_drop(v, keys) for v in obj]
    return obj


def _values(metrics: Path, keys: set[str]) -> dict[str, list[object]]:
    """Every value of these keys, at any depth, in a run's metrics JSON files."""
    out: dict[str, list[object]] = {}

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in keys:
                    out.setdefault(k, []).append(v)
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for f in sorted(metrics.glob("*.json")):
        walk(json.loads(f.read_text()))
    return out


def _without_weights_key(obj: object, at: tuple[str, ...] | None) -> object:
    """The judge answers' cache `key` (at that path) hashes the trained weights' file sizes and mtimes
    (`models.model_fingerprint`): two trainings write them at different moments, so it differs with equal answers."""
    if at is None or not isinstance(obj, dict):
        return obj
    if not at:
        return {k: v for k, v in obj.items() if k != "key"}
    return {k: (_without_weights_key(v, at[1:]) if k == at[0] else v) for k, v in obj.items()}


def compare_runs(a: Path, base_a: Path, b: Path, base_b: Path, resumed: tuple[str, ...] = ()) -> list[str]:
    """Every data file byte for byte, every metrics file as JSON (CSV as text) without timing keys, paths made
    relative to each side's base folder. A training stage in `resumed` was resumed from a checkpoint on one side:
    its log's last row's `train_loss` (the Trainer's mean over the steps run since the resume) and its log's
    `num_tokens` (TRL's counter restarts) are left out, not the stage's own `train_loss` (over every logged step);
    `resumed_from` is always left out, and so is which shards a stage made itself (HERE); the judge answers' cache
    key is left out where it is recorded (data/judge_answers.meta.json, judge.json's answers). Returns what
    differs."""
    diffs = []
    data = sorted(p.name for p in (a / "data").iterdir())
    if data != sorted(p.name for p in (b / "data").iterdir()):
        diffs.append(f"data files differ: {data} vs {sorted(p.name for p in (b / 'data').iterdir())}")
    for name in data:
        ta, tb = (_normalised((d / "data" / name).read_text(), base) for d, base in ((a, base_a), (b, base_b)))
        if name.endswith(".meta.json"):  # a cache's record of the data beside it, not data: compared as JSON
            ja, jb = (_drop(_without_weights_key(json.loads(t), ()), HERE) for t in (ta, tb))
            if ja != jb:
                diffs.append(f"data/{name}")
        elif ta != tb:
            diffs.append(f"data/{name}")
    metrics = sorted(p.name for p in (a / "metrics").iterdir())
    if metrics != sorted(p.name for p in (b / "metrics").iterdir()):
        diffs.append(f"metrics files differ: {metrics}")
    for name in metrics:
        ta, tb = (_normalised((d / "metrics" / name).read_text(), base) for d, base in ((a, base_a), (b, base_b)))
        stage = name.removesuffix(".json").removesuffix("_log")
        resumed_log = stage in resumed and name.endswith("_log.json")
        skip = {"resumed_from", *HERE} | ({"train_loss", "num_tokens"} if resumed_log else set())
        if name.endswith(".json"):
            at = ("answers",) if name == "judge.json" else None
            ja, jb = (_drop(_without_weights_key(json.loads(t), at), skip) for t in (ta, tb))
            if ja != jb:
                diffs.append(f"metrics/{name}")
        elif ta != tb:
            diffs.append(f"metrics/{name}")
    return diffs


# ------------------------------------------------------------------------------------------------ the cluster


def test_the_cluster_runs_arrays_dependencies_and_two_node_steps(cluster: Cluster, tmp_path: Path) -> None:
    """What the rest relies on: a two-node step gets node ids 0 and 1 on n1 and n2 (names that resolve), an array
    runs before an afterok job that depends on it."""
    p = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME"],
                       env=cluster.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0 and sorted(p.stdout.split("\n")[:2]) == ["0 n1", "1 n2"], p.stdout + p.stderr
    arr = cluster.sbatch("--array=0-2", "-o", str(tmp_path / "a-%a.txt"), "--wrap", "date +%s.%N; sleep 1")
    after = cluster.sbatch(f"--dependency=afterok:{arr}", "-o", str(tmp_path / "b.txt"), "--wrap", "date +%s.%N")
    cluster.wait_jobs(120)
    ends = [float((tmp_path / f"a-{i}.txt").read_text()) for i in range(3)]
    assert float((tmp_path / "b.txt").read_text()) > max(ends) + 1, cluster.job_states(after)


# ------------------------------------------------------------------------------------------------ the grid


def test_grid_through_slurm_resumes_after_a_cancelled_task_and_a_dead_node_and_equals_a_local_run(
    cluster: Cluster, tmp_path: Path, tiny_model: Path
) -> None:
    """The tiny model, two seeds, stages 01 and 05/06 sharded (two shards each): submit.sh runs the generation shards,
    the cells, the answer/prediction shards and the finishing array on the two nodes. During SFT one cell's array task
    is cancelled (scancel) and the other cell's node dies (its slurmd and every process of its jobs killed); `status`
    says both SFTs were interrupted and names the queued tasks; submit.sh again resumes both SFTs from their last
    complete checkpoint and skips every finished stage. Then `selftrain figures`, and every data and metrics file of
    both cells equals a local `selftrain run` of the same study (compare_runs says exactly what is compared)."""
    sl, local = tmp_path / "slurm", tmp_path / "local"
    body = {
        "study": {"name": "grid", "models": ["tiny"], "methods": ["central"], "seeds": [1, 2],
                  "stages": ["generate", "select", "sft", "judge", "eval"]},
        "model": {"path": str(tiny_model)},
        "prompts": {"path": "data/demo/prompts.jsonl", "limit": 6},
        # shards hold whole batches: batches of half the items, so each shard task has half the work
        "generation": {"backend": "transformers", "shards": 2, "batch_size": 3},
        # 18 steps, a checkpoint every 2: room to cut a running SFT after its first complete checkpoint
        "training": {"sft": {"num_train_epochs": 6, "save_steps": 2, "logging_steps": 1}},
        "judge": {"limit": 2, "local_model": str(tiny_model), "answers": {"shards": 2, "batch_size": 2}},
        "eval": {"shards": 2, "datasets": ["short_qa", "arithmetic"], "max_samples": 4, "num_few_shots": 1,
                 "batch_size": 2},
        "output": {"results_dir": str(sl / "results"), "cache_dir": str(sl / "cache"),
                   "checkpoints_dir": str(sl / "checkpoints")},
    }  # fmt: skip
    study = _write_study(tmp_path / "grid.yaml", body)
    scripts = _scripts(study)
    for name in ("generate.sbatch", "cells.sbatch", "infer.sbatch", "finish.sbatch"):
        text = (scripts / name).read_text()
        assert _setup_line() in text and "export HF_HUB_OFFLINE=" in text and "--cpus-per-task=1" in text, name
        assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK" in text and "--gpus-per-node" not in text, name

    # The local run of the same study, beside the grid (one thread, as each one-CPU task has).
    overrides = [f"--set=output.{k}={local / v}" for k, v in
                 (("results_dir", "results"), ("cache_dir", "cache"), ("checkpoints_dir", "checkpoints"))]  # fmt: skip
    local_run = subprocess.Popen([PY, "-m", "selftrain", "run", "--study", str(study), "--quiet", *overrides],
                                 cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        t0 = time.time()
        jobs = _submit(cluster, scripts)
        assert set(jobs) == {"generate", "cells", "infer", "finish"}
        cells = jobs["cells"]
        seen: dict[int, list[Path]] = {}
        # The faults, each as soon as its cell's SFT has a complete checkpoint (the two cells train at the same time,
        # on the two nodes): seed 1's array task is cancelled, seed 2's node dies.
        deadline = time.time() + 900
        while len(seen) < 2:
            assert time.time() < deadline, f"no SFT checkpoint within 900 s\n{_task_logs(scripts)}"
            for seed in {1, 2} - set(seen):
                found = _sft_checkpoints(sl / "results" / "grid" / "tiny" / f"central.seed{seed}" / "v001")
                if not found:
                    continue
                seen[seed] = found
                if seed == 1:
                    subprocess.run(["scancel", f"{cells}_0"], env=cluster.env, check=True, timeout=60)
                else:
                    where = {r["id"]: r["nodes"] for r in cluster.squeue()}
                    node = where[f"{cells}_1"]
                    assert node != where.get(f"{cells}_0"), where  # LLN: one cell a node
                    assert cluster.kill_node(node)
            time.sleep(0.1)
        from selftrain.cli.status import holder_of

        runs = [sl / "results" / "grid" / "tiny" / f"central.seed{seed}" / "v001" for seed in (1, 2)]
        _wait("the cut runs' processes gone", lambda: not any(holder_of(r) for r in runs), 60, cluster)
        # What a cluster user asks first: both SFTs interrupted, the earlier stages done, the later ones queued.
        out = subprocess.run([PY, "-m", "selftrain", "status", "--study", str(study)], cwd=ROOT, env=cluster.env,
                             capture_output=True, text=True, timeout=120).stdout  # fmt: skip
        for seed in (1, 2):
            cell = _cell_block(out, f"tiny/central.seed{seed}")
            assert re.search(r"generate +done", cell) and re.search(r"select +done", cell), out
            assert re.search(r"sft +interrupted \(started .*no run holds it", cell), out
            assert re.search(r"judge +not started", cell) and re.search(r"eval +not started", cell), out
            assert re.search(rf"slurm: .*{jobs['finish']}_{seed - 1} finish PENDING", cell), out
            assert re.search(rf"{jobs['infer']}_\d+ infer judge shard \d PENDING", cell), out
        # The user clears what is left of the first submission; the dead node is declared down, then comes back.
        subprocess.run(["scancel", jobs["infer"], jobs["finish"]], env=cluster.env, check=True, timeout=60)
        _wait(f"{node} marked down", lambda: cluster.node_states().get(node, "").startswith("down"), 120, cluster)
        cluster.wait_jobs(120)
        states = cluster.job_states(cells)
        assert states[f"{cells}_0"] == "CANCELLED" and states[f"{cells}_1"] == "NODE_FAIL", states
        cluster.start_node(node)  # ReturnToService=2: up again once its slurmd registers
        cluster.wait_idle(90)
        first_pass = time.time() - t0
        # Submit again: every finished stage is skipped, both SFTs resume from their last complete checkpoint.
        again = _submit(cluster, scripts)
        cluster.wait_jobs(900)
        second_pass = time.time() - t0 - first_pass
        for kind, job in again.items():
            bad = {t: s for t, s in cluster.job_states(job).items() if s != "COMPLETED"}
            assert not bad, f"{kind}: {bad}\n{_task_logs(scripts)}"
    except BaseException:
        local_run.kill()
        raise
    local_out = local_run.communicate(timeout=1200)[0]
    assert local_run.returncode == 0, local_out[-5000:]
    print(f"grid on Slurm: first submission and faults {first_pass:.0f} s, resubmission {second_pass:.0f} s")

    logs = "\n".join(p.read_text(errors="replace") for p in sorted(scripts.glob("*.out")))
    for stage in ("generate", "select"):  # the runner's line per stage: cell, stage, what happened
        assert len(re.findall(rf"^\S+\s+{stage}\s+already done \(v001\), skipped$", logs, re.M)) == 2, logs
    # every shard task had its half: 3 prompts (stage 01), 2 judge items, 4 benchmark prompts
    shards = re.findall(r"(generate|judge|eval) shard (\d) of 2 \((\d+) prompts\): (generated|already there)", logs)
    assert sorted(set(shards)) == sorted({(st, k, n, how) for st, n in (("generate", "3"), ("judge", "2"),
                                          ("eval", "4")) for k in "01" for how in ("generated", "already there")
                                          if st == "generate" or how == "generated"}), shards  # fmt: skip
    assert len(shards) == 4 + 4 + 8  # generation twice (the second time found done), then judge and eval once
    for seed in (1, 2):
        run = sl / "results" / "grid" / "tiny" / f"central.seed{seed}"
        assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["v001"]  # resumed, never a new version
        sft = json.loads((run / "v001" / "metrics" / "sft.json").read_text())
        step = int(str(sft["resumed_from"]).rsplit("-", 1)[1])
        assert step >= int(seen[seed][-1].parent.name.split("-")[1]) and sft["global_steps"] == 18, sft

    assert main(["figures", "--study", "grid", "--results-dir", str(sl / "results")]) == 0
    assert list((sl / "results" / "grid" / "figures").glob("*.png"))
    for seed in (1, 2):
        cell = f"grid/tiny/central.seed{seed}/v001"
        # every shard of stages 01, 05 and 06 came from an array task: the cells and the finishing tasks made none
        here = _values(sl / "results" / cell / "metrics", HERE)
        assert here and set(here) == HERE and all(v == [] for vs in here.values() for v in vs), here
        diffs = compare_runs(sl / "results" / cell, sl, local / "results" / cell, local, resumed=("sft",))
        assert diffs == [], (seed, diffs)


# ------------------------------------------------------------------------------------------------ srun


def test_ddp_over_srun_on_two_nodes_matches_one_process(cluster: Cluster, tmp_path: Path, tiny_model: Path) -> None:
    """`training.launch: ddp`, `launch_nodes: 2`, one process a node: `selftrain slurm --nodes 2` gives the cell
    both nodes, and its SFT runs accelerate on n1 and n2 through srun (gloo); the loss at every step is within 1e-3
    relative of one in-kernel process at the same global batch (2)."""
    from selftrain import generate, select, train
    from selftrain.config import resolve_run_config
    from selftrain.runs import create_run

    sft = {"num_train_epochs": 3, "dataloader_drop_last": True, "logging_steps": 1}  # 5 examples: 2 steps an epoch
    body = {
        "study": {"name": "ddp2", "models": ["tiny"], "methods": ["central"], "stages": ["generate", "select", "sft"]},
        "model": {"path": str(tiny_model)},
        "prompts": {"path": "data/demo/prompts.jsonl", "limit": 5},
        "generation": {"backend": "transformers"},
        "training": {"launch": "ddp", "launch_nodes": 2, "launch_processes": 1,
                     "sft": {**sft, "per_device_train_batch_size": 1}},
        "output": {"results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
                   "checkpoints_dir": str(tmp_path / "checkpoints")},
    }  # fmt: skip
    study = _write_study(tmp_path / "ddp2.yaml", body)
    scripts = _scripts(study, "--nodes", "2")
    assert "#SBATCH --nodes=2 --ntasks-per-node=1" in (scripts / "cells.sbatch").read_text()
    job = cluster.sbatch(str(scripts / "cells.sbatch"), cwd=ROOT)  # one cell: its own stage 01, then SFT on both

    # Meanwhile the reference: one process in this kernel at per-device batch 2 (the same global batch).
    ref_cfg = resolve_run_config("tiny", "central", study, [
        f"output.results_dir={tmp_path / 'ref'}", "training.launch=null", "training.launch_nodes=null",
        "training.launch_processes=null", "training.sft.per_device_train_batch_size=2"])  # fmt: skip
    ref = create_run(ref_cfg)
    generate.run(ref, progress=False)
    select.run(ref, progress=False)
    train.train_stage(ref, "sft", progress=False)

    cluster.wait_jobs(600)
    assert set(cluster.job_states(job).values()) == {"COMPLETED"}, _task_logs(scripts)
    run = tmp_path / "results" / "ddp2" / "tiny" / "central" / "v001"
    m = json.loads((run / "metrics" / "sft.json").read_text())
    assert m["processes"] == 2 and m["global_steps"] == 6, m
    launch_log = (run / "logs" / "sft-launch.log").read_text()
    assert launch_log.startswith("$ srun --nodes=2 --ntasks-per-node=1") and "--num_machines 2" in launch_log
    port = re.search(r"--main_process_port (\d+)", launch_log)
    assert port and int(port.group(1)) == 20000 + int(job) % 10000  # the job's own port
    assert (ref.data_dir / "sft.jsonl").read_bytes() == (run / "data" / "sft.jsonl").read_bytes()
    a = [h["loss"] for h in json.loads((ref.metrics_dir / "sft_log.json").read_text()) if "loss" in h]
    b = [h["loss"] for h in json.loads((run / "metrics" / "sft_log.json").read_text()) if "loss" in h]
    assert len(a) == len(b) == 6 and np.allclose(a, b, rtol=1e-3, atol=0), (a, b)


# ------------------------------------------------------------------------------------------------ concurrency


def test_identical_runs_and_two_methods_at_the_same_moment_equal_a_serial_run(
    cluster: Cluster, tmp_path: Path, tiny_model: Path
) -> None:
    """cells.sbatch (central and drop-low of one model) submitted twice at once, without the generation array: four
    tasks start together on the two nodes, so each cell runs twice at the same moment and the two methods fill one
    generation entry and one embedding entry at the same moment. Each cell gets one version, run by one task and
    skipped by the other (which waited for it); the cache holds one entry of each, complete, nothing half-written;
    the candidates, selections and training sets equal a serial run's."""
    from selftrain import generate, select
    from selftrain.config import resolve_run_config
    from selftrain.runs import create_run

    body = {
        "study": {"name": "conc", "models": ["tiny"], "methods": ["central", "drop-low"],
                  "stages": ["generate", "select"]},
        "model": {"path": str(tiny_model)},
        "prompts": {"path": "data/demo/prompts.jsonl", "limit": 6},
        "generation": {"backend": "transformers"},
        "output": {"results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
                   "checkpoints_dir": str(tmp_path / "checkpoints")},
    }  # fmt: skip
    study = _write_study(tmp_path / "conc.yaml", body)
    scripts = _scripts(study)
    jobs = [cluster.sbatch(str(scripts / "cells.sbatch"), cwd=ROOT) for _ in range(2)]
    running = lambda: len([r for r in cluster.squeue() if r["state"] == "RUNNING"]) == 4  # noqa: E731
    assert _wait("the four tasks running at once", running, 120, cluster)
    cluster.wait_jobs(600)
    for job in jobs:
        assert set(cluster.job_states(job).values()) == {"COMPLETED"}, _task_logs(scripts)
    logs = [p.read_text() for p in sorted(scripts.glob("conc-cells-*.out"))]
    assert len(logs) == 4
    for method in ("central", "drop-low"):
        cell = tmp_path / "results" / "conc" / "tiny" / method
        assert sorted(p.name for p in cell.iterdir() if p.is_dir()) == ["v001"]
        mine = [t for t in logs if re.search(rf"^tiny/{method} ", t, re.M)]
        # the closing table's row: result, stages run, stages skipped
        ran = [t for t in mine if re.search(rf"^tiny/{method}\s+ok\s+2\s+0\s", t, re.M)]
        waited = [
            t for t in mine
            if "in use by another run of this cell" in t and re.search(rf"^tiny/{method}\s+ok\s+0\s+2\s", t, re.M)
        ]  # fmt: skip
        assert len(mine) == 2 and len(ran) == 1 and len(waited) == 1, mine
    cache = tmp_path / "cache"
    entries = [p for p in (cache / "generations").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "_SUCCESS").is_file() and not (entries[0] / "shards").exists()
    emb = sorted(p.name for p in (cache / "embeddings").iterdir() if not p.name.endswith(".lock"))
    assert len(emb) == 2 and emb[0].endswith(".npy") and emb[1] == emb[0] + ".sha256", emb  # one entry, recorded
    leftovers = [p for p in cache.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]
    assert not leftovers, leftovers
    metas = {m: json.loads((tmp_path / "results" / "conc" / "tiny" / m / "v001" / "metrics" / f).read_text())
             for m in ("central", "drop-low") for f in ("select.json",)}  # fmt: skip
    # generated once and embedded once: exactly one of the two methods filled each entry
    gen = [json.loads((tmp_path / "results" / "conc" / "tiny" / m / "v001" / "metrics" / "generate.json").read_text())
           for m in ("central", "drop-low")]  # fmt: skip
    assert sorted(g["cache_hit"] for g in gen) == [False, True]
    assert sorted(m["embedding_cache_hit"] for m in metas.values()) == [False, True]

    # The serial run: the same stages one after the other in this process, one thread as in each task.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in ("central", "drop-low"):
            ov = [f"output.results_dir={tmp_path / 'serial'}", f"output.cache_dir={tmp_path / 'serial-cache'}"]
            cfg = resolve_run_config("tiny", method, study, ov)
            run = create_run(cfg)
            generate.run(run, progress=False)
            select.run(run, progress=False)
            for name in ("candidates.jsonl", "selection.jsonl", "sft.jsonl", "dpo.jsonl"):
                got = (tmp_path / "results" / "conc" / "tiny" / method / "v001" / "data" / name).read_bytes()
                assert got == (run.data_dir / name).read_bytes(), (method, name)
    finally:
        torch.set_num_threads(threads)
