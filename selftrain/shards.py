"""Sharded work with a success marker per shard: the items split into contiguous shards, each produced on its own
(one per GPU or per Slurm array task, or one after another in the stage) and merged in order.

Items may come in groups that the backend batches apart (stage 05's answers per sampling setting, stage 06's
prompts per token cap); shard ``s`` then holds the ``s``-th contiguous range of every group. Shard ``i`` of ``N``
lives in ``<folder>/shards/<i>-of-<N>/``: ``records.jsonl``, ``meta.json`` (its ranges and the records' sha256)
and ``_SUCCESS``, written last. A shard counts as done only when its marker exists, its recorded ranges are the
ones asked for and its records still match the recorded hash, so a lost or damaged shard is produced again, alone.
Range boundaries fall on multiples of ``align`` (transformers' batch size), so batches, per-batch seeds and
padding are those of the unsharded run and the merged records equal it byte for byte.

Processes that share a folder (array tasks, two cells' stages) take its lock, ``<parent>/.<folder>.lock`` (an flock:
released by the kernel when a holder dies): a shard task holds it shared while it fills its shard (and that shard's
own lock exclusively), the merging stage holds it exclusively while it produces what is missing, merges and removes
the shards, so shards vanish only under the process that merged them, when no one else is reading or writing them;
whoever waited then finds the merged result.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from selftrain.config import ConfigError
from selftrain.io import FileLock, atomic_write_text, read_json, read_jsonl, sha256_file, write_json, write_jsonl

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


def lock_path(folder: Path) -> Path:
    """The lock file of a shared cache folder (beside it, so removing the folder never removes a held lock)."""
    return folder.parent / f".{folder.name}.lock"


_HELD: dict[Path, FileLock] = {}  # folders this process holds, so a stage that holds one may call what takes it


@contextlib.contextmanager
def holding(folder: Path, shared: bool = False) -> Iterator[None]:
    """Hold a cache folder's lock (exclusive: to merge or remove its shards, or to fill an unsharded entry; shared:
    to fill one shard beside other tasks). Re-entrant within a process."""
    key = lock_path(folder).resolve()
    if key in _HELD:
        yield
        return
    lock = FileLock(key, shared)
    lock.acquire()
    _HELD[key] = lock
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


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
    folder: Path,
    shard: int,
    shards: int,
    parts: list[Part],
    produce: Callable[[list[Part]], list[dict[str, Any]]],
    merged: Callable[[], bool] | None = None,
) -> bool:
    """Produce one shard unless it is done (or `merged()` says the stage has merged them already: asked under the
    folder's lock, so a merge cannot slip in between); True when it had to be produced."""
    with holding(folder, shared=True):
        if merged is not None and merged():
            return False
        d = shard_dir(folder, shard, shards)
        with FileLock(lock_path(d)):  # two tasks given the same shard: one produces it, the other finds it done
            if shard_done(folder, shard, shards, parts):
                return False
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
    order, indices of the shards this call produced). Holds the folder exclusively: shard tasks still filling a
    shard are waited for (and their shard used), and no one removes a shard while it is read."""
    with holding(folder):
        made = [s for s, parts in enumerate(plan) if produce_shard(folder, s, len(plan), parts, produce)]
        merged: list[dict[str, Any]] = []
        for s in range(len(plan)):
            merged += read_jsonl(shard_dir(folder, s, len(plan)) / "records.jsonl")
    return merged, made


def remove_shards(folder: Path) -> None:
    """The shards have served once merged (and their merged result is written): free them, and `folder` too when
    nothing else is in it (stage 05/06's shard folders; stage 01's keeps the merged generation). Under the folder's
    exclusive lock: never while a shard task or another merging stage holds it."""
    if not folder.exists():  # unsharded, or removed by whoever merged it
        return
    with holding(folder):
        shutil.rmtree(folder / "shards", ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty, or already gone
            folder.rmdir()
        if not folder.exists():  # nothing left to guard: the lock file goes too (a waiter then locks a fresh one)
            _HELD[lock_path(folder).resolve()].remove()


def stray_shards(folder: Path) -> bool:
    """Shards left in a folder whose merged result exists (`_SUCCESS`): a task that finished after the merge, or a
    merging process that died before removing them. False while anyone holds the folder."""
    if not ((folder / "shards").is_dir() and (folder / "_SUCCESS").is_file()):
        return False
    lock = FileLock(lock_path(folder))
    if not lock.acquire(wait=False):
        return False
    lock.release()
    return True
