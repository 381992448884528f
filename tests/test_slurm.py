"""Slurm scripts: the arrays cover every cell once, the scripts pass `bash -n`, and the cell mapping works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selftrain.cli import main
from selftrain.cli.slurm import render
from selftrain.config import ConfigError


def _study(tmp_path: Path, seeds: list[int]) -> Path:
    f = tmp_path / "grid.yaml"
    body = {"name": "grid", "models": ["tiny", "smollm2-135m"], "methods": ["baseline", "central", "drop-low"]}
    f.write_text(yaml.safe_dump({"study": {**body, "seeds": seeds}}))
    return f


def _table(script: str) -> str:
    """The task table of a script (its bash arrays), to evaluate without running anything."""
    return "models=(" + script.split("models=(", 1)[1].split("i=$SLURM_ARRAY_TASK_ID")[0]


def _parse_all(files: dict[str, str], folder: Path, prefix: str = "") -> None:
    """Every script written out passes `bash -n`."""
    for name, text in files.items():
        p = folder / f"{prefix}{name}"
        p.write_text(text)
        assert subprocess.run(["bash", "-n", str(p)], capture_output=True).returncode == 0, name


@pytest.mark.parametrize("seeds", [[], [1, 2]])
def test_scripts_cover_every_cell_and_parse(tmp_path: Path, seeds: list[int]) -> None:
    files = render(str(_study(tmp_path, seeds)), gpus_per_node=4, partition="gpu")
    n_seeds = max(len(seeds), 1)
    assert f"--array=0-{2 * n_seeds - 1}" in files["generate.sbatch"]
    assert f"--array=0-{2 * 3 * n_seeds - 1}" in files["cells.sbatch"]
    assert "--gpus-per-node=4" in files["cells.sbatch"] and "#SBATCH --partition=gpu" in files["cells.sbatch"]
    assert "afterok" in files["submit.sh"]
    _parse_all(files, tmp_path)
    # Evaluate the cell table of task 4 (bash arrays as written) without running selftrain.
    show = '\ni=4; echo "${models[$i]} ${methods[$i]} ${seeds[$i]}"'
    got = subprocess.run(["bash", "-c", _table(files["cells.sbatch"]) + show], capture_output=True, text=True)
    got = got.stdout.split()
    assert got[:2] == ["smollm2-135m", "central"] and got[2:] == ([] if not seeds else ["1"])


def test_multi_node_cells_need_launch_and_render(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"--nodes 2: cells tiny/central, .* train in one process"):
        render(str(_study(tmp_path, [])), nodes=2)
    f = tmp_path / "multi.yaml"
    body = {"name": "multi", "models": ["tiny"], "methods": ["baseline", "central"]}
    f.write_text(yaml.safe_dump({"study": body, "training": {"launch": "ddp"}}))
    for nodes in (1, 2):
        files = render(str(f), gpus_per_node=8, nodes=nodes)
        assert f"#SBATCH --nodes={nodes} --ntasks-per-node=1 --gpus-per-node=8" in files["cells.sbatch"]
        assert "#SBATCH --nodes=1 " in files["generate.sbatch"]  # generation: one node per task
        _parse_all(files, tmp_path, f"{nodes}-")
    assert main(["slurm", "--study", str(f), "--nodes", "2", "--dry-run"]) == 0
    assert "# ---- cells.sbatch" in capsys.readouterr().out


def test_sharded_generation_gets_one_task_per_shard(tmp_path: Path) -> None:
    f = tmp_path / "sharded.yaml"
    body = {"name": "sharded", "models": ["tiny", "smollm2-135m"], "methods": ["central"], "seeds": [1, 2]}
    f.write_text(yaml.safe_dump({"study": body, "generation": {"shards": 3}}))
    files = render(str(f))
    assert "--array=0-11" in files["generate.sbatch"]  # 2 models x 2 seeds x 3 shards
    p = tmp_path / "generate.sbatch"
    p.write_text(files["generate.sbatch"])
    assert subprocess.run(["bash", "-n", str(p)], capture_output=True).returncode == 0
    show = '\ni=5; echo "${models[$i]} ${seeds[$i]} ${shards[$i]}"'
    got = subprocess.run(["bash", "-c", _table(files["generate.sbatch"]) + show], capture_output=True, text=True)
    got = got.stdout.split()
    assert got == ["smollm2-135m", "1", "2"]
    assert "selftrain shard --study" in files["generate.sbatch"]


def test_sharded_inference_adds_a_shard_array_and_a_finishing_array(tmp_path: Path) -> None:
    f = tmp_path / "inf.yaml"
    body = {"name": "inf", "models": ["tiny"], "methods": ["baseline", "central"], "seeds": [1, 2]}
    f.write_text(yaml.safe_dump({"study": body, "judge": {"answers": {"shards": 3}}, "eval": {"shards": 2}}))
    files = render(str(f), gpus_per_node=1)
    assert set(files) == {"generate.sbatch", "cells.sbatch", "infer.sbatch", "finish.sbatch", "submit.sh"}
    # cells stop after training; the finishing array runs stages 05 and 06 (which merge the shards)
    assert "--stages generate select sft dpo" in files["cells.sbatch"]
    assert "--array=0-3" in files["finish.sbatch"] and "--stages judge eval" in files["finish.sbatch"]
    assert "--array=0-19" in files["infer.sbatch"]  # 2 methods x 2 seeds x (3 judge + 2 eval shards)
    _parse_all(files, tmp_path)
    table = _table(files["infer.sbatch"])
    rows = [subprocess.run(["bash", "-c", table + f'\ni={i}; echo "${{models[$i]}} ${{methods[$i]}} ${{seeds[$i]}} '
                            '${stages[$i]} ${shards[$i]}"'], capture_output=True, text=True).stdout.split()
            for i in range(20)]  # fmt: skip
    assert len({tuple(r) for r in rows}) == 20  # every (cell, stage, shard) once
    assert sorted(r[4] for r in rows if r[3] == "judge") == sorted(["0", "1", "2"] * 4)
    assert sorted(r[4] for r in rows if r[3] == "eval") == sorted(["0", "1"] * 4)
    assert "selftrain shard --study" in files["infer.sbatch"] and '--stage "${stages[$i]}"' in files["infer.sbatch"]
    submit = files["submit.sh"]
    assert 'cells=$(sbatch --parsable --kill-on-invalid-dep=yes --dependency=afterok:"$gen"' in submit
    assert 'inf=$(sbatch --parsable --dependency=afterany:"$cells"' in submit
    assert 'fin=$(sbatch --parsable --dependency=afterany:"$inf" results/inf/slurm/finish.sbatch)' in submit
    # without sharded inference the cells run every stage and there are three files, as before
    f.write_text(yaml.safe_dump({"study": body}))
    plain = render(str(f))
    assert set(plain) == {"generate.sbatch", "cells.sbatch", "submit.sh"} and "--stages" not in plain["cells.sbatch"]


def _header(script: str) -> str:
    """A script's lines before its task table: the environment it sets up."""
    return script.split("models=(", 1)[0]


def test_every_script_sets_up_its_environment_offline_with_the_tasks_threads(tmp_path: Path) -> None:
    """Issue 28: the scripts called a bare `python` with neither an environment nor HF_HUB_OFFLINE, and torch took the
    node's CPU count. Every script now runs the --setup line first, keeps a compute node offline unless the submitter
    said otherwise, and gives OMP_NUM_THREADS the task's CPUs."""
    f = tmp_path / "inf.yaml"
    body = {"name": "inf", "models": ["tiny"], "methods": ["baseline", "central"], "seeds": [1]}
    f.write_text(yaml.safe_dump({"study": body, "judge": {"answers": {"shards": 2}}, "generation": {"shards": 2},
                                 "output": {"results_dir": str(tmp_path / "out")}}))  # fmt: skip
    files = render(str(f), gpus_per_node=0, cpus_per_task=3, setup="source .venv/bin/activate")
    scripts = [n for n in files if n.endswith(".sbatch")]
    assert sorted(scripts) == ["cells.sbatch", "finish.sbatch", "generate.sbatch", "infer.sbatch"]
    for name in scripts:
        text = files[name]
        head = _header(text)
        assert "source .venv/bin/activate" in head and "HF_HUB_OFFLINE" in head and "OMP_NUM_THREADS" in head, name
        assert "--cpus-per-task=3" in head and "--gpus-per-node" not in head, name  # a CPU cluster: no GPU request
        assert f"#SBATCH --output={tmp_path / 'out' / 'inf' / 'slurm'}/%x-%A_%a.out" in head, name
        for env, want in (({"SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "8"}, "3 1"),
                          ({"SLURM_CPUS_ON_NODE": "8", "HF_HUB_OFFLINE": "0"}, "8 0"), ({}, "1 1")):  # fmt: skip
            lines = [x for x in head.splitlines() if x.startswith("export ")]
            script = "\n".join([*lines, 'echo "$OMP_NUM_THREADS $HF_HUB_OFFLINE"'])
            clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HF_HUB", "OMP_"))}
            out = subprocess.run(["bash", "-c", script], env={**clean, **env}, capture_output=True, text=True).stdout
            assert out.strip() == want, (name, env, out)
    # the default environment line: the virtualenv running the command (this test's, if it is one)
    default = render(str(f))["cells.sbatch"]
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.is_file():
        assert f"source {activate}  # the environment" in default
    assert "--gpus-per-node=1" in default
    with pytest.raises(ConfigError, match="--setup must be one line"):
        render(str(f), setup="a\nb")
    with pytest.raises(ConfigError, match="--gpus-per-node must be 0 or more"):
        render(str(f), gpus_per_node=-1)
    # written where the study's results go, and submit.sh says which jobs it submitted
    assert main(["slurm", "--study", str(f), "--setup", "true"]) == 0
    written = tmp_path / "out" / "inf" / "slurm"
    assert (written / "submit.sh").is_file() and 'echo "generate job $gen, cells job $cells, infer job $inf, finish ' \
        'job $fin"' in (written / "submit.sh").read_text()  # fmt: skip


# ------------------------------------------------------------------------------------------------ status


def test_status_names_each_stages_state_and_cause(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`selftrain status`: done (with the training steps), running (who holds the run), interrupted (running in the
    manifest but no process holds it), failed with its cause, not started; a cell never run says so."""
    from selftrain.config import resolve_run_config
    from selftrain.runs import create_run
    from selftrain.schema import METRICS_FILES

    f = tmp_path / "st.yaml"
    body = {"name": "st", "models": ["tiny"], "methods": ["central"], "seeds": [1, 2],
            "stages": ["generate", "select", "sft", "judge"]}  # fmt: skip
    f.write_text(yaml.safe_dump({"study": body, "output": {"results_dir": str(tmp_path / "res")}}))
    run = create_run(resolve_run_config("tiny", "central", f, replicate=1), hold=True)
    for stage, metrics in (("generate", {"candidates": 3}), ("sft", {"global_steps": 12, "train_loss": 1.0,
                                                                      "resumed_from": "/x/checkpoint-4"})):  # fmt: skip
        with run.stage(stage) as info:
            path = run.metrics_dir / METRICS_FILES[stage][0]
            path.write_text(json.dumps(metrics))
            info["outputs"] = [path]
    with pytest.raises(ValueError), run.stage("select"):
        raise ValueError("no candidates for prompt p3")
    run._update_manifest(lambda m: m["stages"].update(judge={"status": "running", "started": "2026-01-01T10:00:00"}))
    assert main(["status", "--study", str(f)]) == 0
    out = capsys.readouterr().out
    cell = out.split("tiny/central.seed1:")[1].split("tiny/central.seed2:")[0]
    assert f"running (pid {os.getpid()} on" in cell.splitlines()[0]
    assert re.search(r"generate +done\n", cell) and re.search(
        r"sft +done \(12 steps, resumed from checkpoint-4\)", cell
    )
    assert re.search(r"select +failed: ValueError: no candidates for prompt p3", cell)
    assert re.search(r"judge +running \(pid \d+ on", cell)
    assert "tiny/central.seed2: not started" in out
    run.release()  # the runner is gone (killed): its stage was interrupted, not running
    main(["status", "--study", str(f), "--seeds", "1"])
    out = capsys.readouterr().out
    assert re.search(r"judge +interrupted \(started 2026-01-01T10:00:00; no run holds it: a rerun resumes it\)", out)
    assert "tiny/central.seed1: failed at select" in out and "seed2" not in out
    # a changed output is no longer "done"
    (run.metrics_dir / "generate.json").write_text("{}")
    main(["status", "--study", str(f), "--seeds", "1"])
    assert re.search(r"generate +damaged: metrics/generate.json \(changed\)", capsys.readouterr().out)
