"""Sharded work with a success marker per shard: the items split into contiguous shards, each produced on its own
(one per GPU or per Slurm array task, or one after another in the stage) and merged in order.

Items may come in groups that the backend batches apart (stage 05's answers per sampling setting, stage 06's
prompts per token cap); shard ``s`` then holds the ``s``-th contiguous range of every group. Shard ``i`` of ``N``
lives in ``<folder>/shards/<i>-of-<N>/``: ``records.jsonl``, ``meta.json`` (its ranges and the records' sha256)
and ``_SUCCESS``, written last. A shard counts as done only when its marker exists, its recorded ranges are the
ones asked for and its records still match the recorded hash, so a lost or damaged shard is produced again, alone.
Range boundaries fall on multiples of ``align`` (transformers' batch size), so batches, per-batch seeds and
padding are those of the unsharded run and the merged records equal it byte for byte.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selftrain.config import ConfigError
from selftrain.io import atomic_write_text, read_json, read_jsonl, sha256_file, write_json, write_jsonl

Part = tuple[int, range]  # (group, a contiguous range of that group's items)


def shard_ranges(n_items: int, shards: int, align: int = 1) -> list[range]:
    """`shards` contiguous ranges covering 0..n_items-1, as even as `align` allows (some may be empty)."""
    if shards < 1 or align < 1:
        raise ValueError(f"shards and align must be at least 1, got {shards} and {align}")
    blocks = -(-n_items // align)  # aligned blocks, the last one possibly short
    bounds = [min(n_items, align * (blocks * s // shards)) for s in range(shards + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(shards)]


def group_shards(sizes: Sequence[int], shards: int, aligns: Sequence[int] | int = 1) -> list[list[Part]]:
    """Per shard, the non-empty (group, range) parts it holds: the s-th aligned range of every group, in group
    order. `aligns`: one alignment for all groups, or one per group."""
    per_group = [aligns] * len(sizes) if isinstance(aligns, int) else list(aligns)
    ranges = [shard_ranges(n, shards, a) for n, a in zip(sizes, per_group, strict=True)]
    return [[(g, rs[s]) for g, rs in enumerate(ranges) if len(rs[s])] for s in range(shards)]


def _spec(parts: list[Part]) -> list[list[int]]:
    return [[g, r.start, r.stop] for g, r in parts]


def check_shard(shard: int, shards: int, key: str) -> None:
    """Refuse a shard index the params do not split into (`key`: the params key that sets the count)."""
    if shards == 1:
        raise ConfigError(f"{key} is 1: there is nothing to shard (set it to the number of GPUs or array tasks)")
    if not 0 <= shard < shards:
        raise ConfigError(f"shard {shard} is outside 0..{shards - 1} ({key} is {shards})")


def shard_dir(folder: Path, shard: int, shards: int) -> Path:
    return folder / "shards" / f"{shard}-of-{shards}"


def shard_done(folder: Path, shard: int, shards: int, parts: list[Part]) -> bool:
    """Marker present, the recorded ranges are these and the records match their recorded hash."""
    d = shard_dir(folder, shard, shards)
    if not (d / "_SUCCESS").is_file() or not (d / "meta.json").is_file() or not (d / "records.jsonl").is_file():
        return False
    try:
        meta = read_json(d / "meta.json")
    except ValueError:
        return False
    return meta.get("parts") == _spec(parts) and meta.get("sha256") == sha256_file(d / "records.jsonl")


def produce_shard(
    folder: Path, shard: int, shards: int, parts: list[Part], produce: Callable[[list[Part]], list[dict[str, Any]]]
) -> bool:
    """Produce one shard unless it is done; True when it had to be produced."""
    if shard_done(folder, shard, shards, parts):
        return False
    d = shard_dir(folder, shard, shards)
    (d / "_SUCCESS").unlink(missing_ok=True)
    records = produce(parts) if parts else []
    write_jsonl(d / "records.jsonl", records)
    write_json(d / "meta.json", {"parts": _spec(parts), "sha256": sha256_file(d / "records.jsonl"),
                                 "records": len(records)})  # fmt: skip
    atomic_write_text(d / "_SUCCESS", "ok\n")
    return True


def run_sharded(
    folder: Path, plan: list[list[Part]], produce: Callable[[list[Part]], list[dict[str, Any]]]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Every shard of `plan` (from `group_shards`) produced unless done, in order, and merged: (records in shard
    order, indices of the shards this call produced)."""
    made = [s for s, parts in enumerate(plan) if produce_shard(folder, s, len(plan), parts, produce)]
    merged: list[dict[str, Any]] = []
    for s in range(len(plan)):
        merged += read_jsonl(shard_dir(folder, s, len(plan)) / "records.jsonl")
    return merged, made


def remove_shards(folder: Path) -> None:
    """The shards have served once merged (and their merged result is written): free them, and `folder` too when
    nothing else is in it (stage 05/06's shard folders; stage 01's keeps the merged generation)."""
    shutil.rmtree(folder / "shards", ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()
