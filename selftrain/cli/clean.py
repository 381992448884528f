"""Disk housekeeping: find what no run references (`python -m selftrain clean`, `make clean-unused`).

Freed: checkpoint folders of runs that no longer exist; Trainer checkpoints (weights + optimizer state) of
stages whose final model is written; generation and embedding cache entries that no run's metrics name.
Kept: final models of existing runs, Trainer checkpoints of unfinished stages (they resume), the converted
models, the judge request cache (small, and what makes a rerun free of API costs) and shards not merged yet
(a generation entry with shards but no `_SUCCESS`, and everything under answers/ and predictions/: array tasks may
still be filling them, and their stage removes them once merged). Stray shards (left in a generation entry that is
merged: a task that finished after the merge, a merging process that died before removing them) are freed.

Only what the project names its own is ever touched: a checkpoints folder `<study>/<model>/<method>/v<N>-<id>`, a
generation entry named by its 16-hex-digit key, an embedding file `<key>.npy`; an entry another process holds (its
lock) is left alone. The checkpoints and cache folders must not be source folders of the repository
(`paths.output_folder`), so `--checkpoints-dir data` or `/` is refused rather than searched.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from selftrain.io import DataError, FileLock, read_json, remove_recorded
from selftrain.paths import output_folder, resolve_path
from selftrain.runs import open_run
from selftrain.schema import metrics_path
from selftrain.shards import lock_path, stray_shards

# What `Run.checkpoints_root`, the generation key and the embedding keys look like: nothing else is freed.
CHECKPOINT_VERSION = re.compile(r"^v\d{3,}-[0-9a-f]{8}$")
CACHE_KEY = re.compile(r"^[0-9a-f]{16}$")
EMBEDDING_KEY = re.compile(r"^(embedder-)?[0-9a-f]{16}$")


@dataclass
class Item:
    path: Path
    bytes: int
    why: str
    lock: Path | None = None  # held (without waiting) while it is freed: skipped when another process holds it


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _metric(run_dir: Path, stage: str, key: str) -> str | None:
    """One key of a stage's metrics file, however partial the file (a cache key keeps its entry)."""
    try:
        value = read_json(metrics_path(run_dir, stage)).get(key)
    except (OSError, DataError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def unreferenced(
    results_dir: str | Path = "results",
    checkpoints_dir: str | Path = "checkpoints",
    cache_dir: str | Path = ".cache/selftrain",
) -> list[Item]:
    """What can be freed, with its size and why; nothing is deleted here."""
    results = resolve_path(results_dir)
    ck_root = output_folder(checkpoints_dir, "--checkpoints-dir", below=False)
    cache = output_folder(cache_dir, "--cache-dir", below=False)
    keep_roots: set[Path] = set()
    out: list[Item] = []
    gen_keys, emb_keys = set(), set()
    for manifest in sorted(results.glob("*/*/*/v*/manifest.json")):
        run_dir = manifest.parent
        gen_keys.add(_metric(run_dir, "generate", "key"))
        emb_keys.add(_metric(run_dir, "select", "embedding_cache"))
        try:
            run = open_run(run_dir)
            root = run.checkpoints_root()
        except Exception:  # an unreadable run folder references nothing we can name
            continue
        if resolve_path(run.config.output.checkpoints_dir).resolve() != ck_root:
            continue
        keep_roots.add(root)
        for stage in ("sft", "dpo"):
            trainer = root / stage / "trainer"
            if trainer.is_dir() and (root / stage / "final" / "_SUCCESS").is_file() and run.is_done(stage):
                out.append(Item(trainer, _size(trainer), f"Trainer checkpoints of a finished stage ({run_dir.name})"))
    keep_roots = {r.resolve() for r in keep_roots}
    if ck_root.is_dir():
        for version_dir in sorted(ck_root.glob("*/*/*/*")):
            mine = version_dir.is_dir() and not version_dir.is_symlink() and CHECKPOINT_VERSION.match(version_dir.name)
            if mine and version_dir.resolve() not in keep_roots:
                out.append(Item(version_dir, _size(version_dir), "no run folder references it"))
    for entry in sorted((cache / "generations").glob("*")) if (cache / "generations").is_dir() else []:
        if not (entry.is_dir() and CACHE_KEY.match(entry.name)) or _busy(entry):
            continue
        merging = (entry / "shards").is_dir() and not (entry / "_SUCCESS").is_file()
        if entry.name not in gen_keys and not merging:
            out.append(Item(entry, _size(entry), "generation cache no run's generate.json names", lock_path(entry)))
        elif stray_shards(entry):
            out.append(Item(entry / "shards", _size(entry / "shards"), "stray shards of a merged generation",
                            lock_path(entry)))  # fmt: skip
    for entry in sorted((cache / "embeddings").glob("*.npy")) if (cache / "embeddings").is_dir() else []:
        if EMBEDDING_KEY.match(entry.stem) and entry.stem not in emb_keys:
            out.append(Item(entry, _size(entry), "embedding cache no run's select.json names", lock_path(entry)))
    return out


def _busy(entry: Path) -> bool:
    """Another process holds the entry (generating it, or merging or filling its shards)."""
    lock = FileLock(lock_path(entry))
    if not lock_path(entry).exists():
        return False
    if lock.acquire(wait=False):
        lock.release()
        return False
    return True


def clean(items: list[Item], dry_run: bool = False) -> int:
    """Delete the items (unless dry_run); returns the bytes freed (or that would be)."""
    total = 0
    for it in items:
        total += it.bytes
        if dry_run:
            continue
        lock = FileLock(it.lock) if it.lock is not None else None
        if lock is not None and not lock.acquire(wait=False):
            total -= it.bytes  # taken up by a run since it was listed
            continue
        try:
            if it.path.is_dir():
                shutil.rmtree(it.path, ignore_errors=True)
            else:
                remove_recorded(it.path)  # and its recorded sha256, if any
        finally:
            if lock is not None:
                lock.release()
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
