"""Sharded generation (generation.shards): shard ranges, three shards merged equal the unsharded run byte for
byte (tiny model, transformers, seeded), a deleted or damaged shard is generated again alone, and
`python -m selftrain shard` fills one shard of the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from selftrain import generate
from selftrain.__main__ import main
from selftrain.config import resolve_run_config
from selftrain.runs import create_run
from selftrain.shards import shard_dir, shard_ranges


@pytest.mark.parametrize("n,shards,align", [(5, 3, 1), (5, 3, 2), (100, 7, 16), (3, 5, 1), (0, 2, 4), (17, 1, 8)])
def test_shard_ranges_cover_the_items_in_order_on_aligned_bounds(n: int, shards: int, align: int) -> None:
    ranges = shard_ranges(n, shards, align)
    assert len(ranges) == shards and [i for r in ranges for i in r] == list(range(n))
    assert all(r.start % align == 0 for r in ranges if len(r))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= align  # as even as the alignment allows


def _cfg(overrides: list[str], shards: int):
    extra = ["generation.batch_size=2", "generation.seed=5150", f"generation.shards={shards}"]
    return resolve_run_config("tiny", "central", overrides=[*overrides, *extra])


def test_three_shards_equal_the_unsharded_run_and_a_lost_shard_is_regenerated_alone(
    tiny_overrides: list[str], cache_dir: Path
) -> None:
    one = create_run(_cfg(tiny_overrides, 1))
    generate.run(one, progress=False)
    want = (one.data_dir / "candidates.jsonl").read_bytes()
    meta = json.loads((one.metrics_dir / "generate.json").read_text())
    cache = cache_dir / "generations" / meta["key"]
    shutil.rmtree(cache)  # transformers' shards share the unsharded key: start the cache entry afresh

    cfg = _cfg(tiny_overrides, 3)
    for s in range(3):  # three array tasks (or three GPUs), each one shard
        assert generate.run_shard(cfg, s, progress=False)["generated"]
    assert not generate.run_shard(cfg, 0, progress=False)["generated"]  # done: not produced twice
    shutil.rmtree(shard_dir(cache, 1, 3))  # a lost shard...
    (shard_dir(cache, 2, 3) / "records.jsonl").write_text('{"damaged": true}\n')  # ...and a damaged one
    run = create_run(cfg)
    generate.run(run, progress=False)
    got = json.loads((run.metrics_dir / "generate.json").read_text())
    assert got["shards"] == 3 and got["shards_generated_here"] == [1, 2] and got["key"] == meta["key"]
    assert (run.data_dir / "candidates.jsonl").read_bytes() == want
    assert (cache / "_SUCCESS").is_file() and not (cache / "shards").exists()  # merged, shards removed


def test_shard_command_fills_one_shard_and_names_bad_input(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"study": {"name": "sharded", "models": ["tiny"], "methods": ["central"]},
                                     "generation": {"shards": 2, "seed": 6060}}))  # fmt: skip
    args = ["--study", str(study), "--model", "tiny"] + [a for o in tiny_overrides for a in ("--set", o)]
    assert main(["shard", *args, "--shard", "1"]) == 0
    out = capsys.readouterr().out
    assert "shard 1 of 2" in out and "generated in" in out
    cache = Path(out.strip().rsplit(" in ", 1)[1])
    assert (shard_dir(cache, 1, 2) / "_SUCCESS").is_file() and not shard_dir(cache, 0, 2).exists()
    assert main(["shard", *args, "--shard", "2"]) == 2
    assert "shard 2 is outside 0..1 (generation.shards is 2)" in capsys.readouterr().err
    assert main(["shard", "--study", str(study), "--model", "nosuch", "--shard", "0"]) == 2
    assert "model 'nosuch' is not in the study" in capsys.readouterr().err
