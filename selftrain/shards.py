"""Sharded work with a success marker per shard: the item list split into contiguous shards, each produced on
its own (one per GPU or per Slurm array task, or one after another in the stage) and merged in order.

Shard ``i`` of ``N`` lives in ``<folder>/shards/<i>-of-<N>/``: ``records.jsonl``, ``meta.json`` (its item range
and the records' sha256) and ``_SUCCESS``, written last. A shard counts as done only when its marker exists and
its records still match the recorded hash, so a lost or damaged shard is produced again, alone. Shard boundaries
fall on multiples of ``align`` (transformers' batch size), so per-batch seeds and padding are those of the
unsharded run and the merged records equal it byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from selftrain.io import read_json, read_jsonl, sha256_file, write_json, write_jsonl


def shard_ranges(n_items: int, shards: int, align: int = 1) -> list[range]:
    """`shards` contiguous ranges covering 0..n_items-1, as even as `align` allows (some may be empty)."""
    if shards < 1 or align < 1:
        raise ValueError(f"shards and align must be at least 1, got {shards} and {align}")
    blocks = -(-n_items // align)  # aligned blocks, the last one possibly short
    bounds = [min(n_items, align * (blocks * s // shards)) for s in range(shards + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(shards)]


def shard_dir(folder: Path, shard: int, shards: int) -> Path:
    return folder / "shards" / f"{shard}-of-{shards}"


def shard_done(folder: Path, shard: int, shards: int, items: range) -> bool:
    """Marker present, the recorded range is this one and the records match their recorded hash."""
    d = shard_dir(folder, shard, shards)
    if not (d / "_SUCCESS").is_file() or not (d / "meta.json").is_file() or not (d / "records.jsonl").is_file():
        return False
    try:
        meta = read_json(d / "meta.json")
    except ValueError:
        return False
    return meta.get("range") == [items.start, items.stop] and meta.get("sha256") == sha256_file(d / "records.jsonl")


def produce_shard(
    folder: Path, shard: int, shards: int, items: range, produce: Callable[[range], list[dict[str, Any]]]
) -> bool:
    """Produce one shard unless it is done; True when it had to be produced."""
    if shard_done(folder, shard, shards, items):
        return False
    d = shard_dir(folder, shard, shards)
    (d / "_SUCCESS").unlink(missing_ok=True)
    records = produce(items) if len(items) else []
    write_jsonl(d / "records.jsonl", records)
    write_json(d / "meta.json", {"range": [items.start, items.stop], "sha256": sha256_file(d / "records.jsonl"),
                                 "records": len(records)})  # fmt: skip
    (d / "_SUCCESS").write_text("ok\n")
    return True


def run_sharded(
    folder: Path,
    n_items: int,
    shards: int,
    produce: Callable[[range], list[dict[str, Any]]],
    align: int = 1,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Every shard produced (those not done yet, in order) and merged: (records, indices of the shards this call
    produced)."""
    made = []
    ranges = shard_ranges(n_items, shards, align)
    for s, items in enumerate(ranges):
        if produce_shard(folder, s, shards, items, produce):
            made.append(s)
    merged: list[dict[str, Any]] = []
    for s in range(shards):
        merged += read_jsonl(shard_dir(folder, s, shards) / "records.jsonl")
    return merged, made
