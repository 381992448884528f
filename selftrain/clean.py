"""Disk housekeeping: find what no run references (`python -m selftrain clean`, `make clean-unused`).

Freed: checkpoint folders of runs that no longer exist; Trainer checkpoints (weights + optimizer state) of
stages whose final model is written; generation and embedding cache entries that no run's metrics name.
Kept: final models of existing runs, Trainer checkpoints of unfinished stages (they resume), the converted
models, the judge request cache (small, and what makes a rerun free of API costs) and shards not merged yet
(a generation entry with shards but no `_SUCCESS`, and everything under answers/ and predictions/: array tasks may
still be filling them, and their stage removes them once merged).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from selftrain.io import DataError, read_json
from selftrain.paths import resolve_path
from selftrain.runs import open_run


@dataclass
class Item:
    path: Path
    bytes: int
    why: str


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _metric(run_dir: Path, name: str, key: str) -> str | None:
    try:
        value = read_json(run_dir / "metrics" / name).get(key)
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
    ck_root = resolve_path(checkpoints_dir)
    cache = resolve_path(cache_dir)
    keep_roots: set[Path] = set()
    out: list[Item] = []
    gen_keys, emb_keys = set(), set()
    for manifest in sorted(results.glob("*/*/*/v*/manifest.json")):
        run_dir = manifest.parent
        gen_keys.add(_metric(run_dir, "generate.json", "key"))
        emb_keys.add(_metric(run_dir, "select.json", "embedding_cache"))
        try:
            run = open_run(run_dir)
            root = run.checkpoints_root()
        except Exception:  # an unreadable run folder references nothing we can name
            continue
        if resolve_path(run.config.output.checkpoints_dir) != ck_root:
            continue
        keep_roots.add(root)
        for stage in ("sft", "dpo"):
            trainer = root / stage / "trainer"
            if trainer.is_dir() and (root / stage / "final" / "_SUCCESS").is_file() and run.is_done(stage):
                out.append(Item(trainer, _size(trainer), f"Trainer checkpoints of a finished stage ({run_dir.name})"))
    if ck_root.is_dir():
        for version_dir in sorted(ck_root.glob("*/*/*/*")):
            if version_dir.is_dir() and version_dir not in keep_roots:
                out.append(Item(version_dir, _size(version_dir), "no run folder references it"))
    for entry in sorted((cache / "generations").glob("*")) if (cache / "generations").is_dir() else []:
        merging = (entry / "shards").is_dir() and not (entry / "_SUCCESS").is_file()
        if entry.is_dir() and entry.name not in gen_keys and not merging:
            out.append(Item(entry, _size(entry), "generation cache no run's generate.json names"))
    for entry in sorted((cache / "embeddings").glob("*.npy")) if (cache / "embeddings").is_dir() else []:
        if entry.stem not in emb_keys:
            out.append(Item(entry, _size(entry), "embedding cache no run's select.json names"))
    return out


def clean(items: list[Item], dry_run: bool = False) -> int:
    """Delete the items (unless dry_run); returns the bytes freed (or that would be)."""
    total = 0
    for it in items:
        total += it.bytes
        if dry_run:
            continue
        if it.path.is_dir():
            shutil.rmtree(it.path, ignore_errors=True)
        else:
            it.path.unlink(missing_ok=True)
    return total


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
