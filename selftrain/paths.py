"""Where the project lives, so notebooks (cwd = notebooks/) and the CLI (cwd = anywhere) agree on paths."""

from __future__ import annotations

import os
import re
from pathlib import Path


def project_root() -> Path:
    """The folder holding params/ and pyproject.toml; SELFTRAIN_ROOT overrides the search."""
    env = os.environ.get("SELFTRAIN_ROOT")
    if env:
        return Path(env).resolve()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for cand in (start, *start.parents):
            if (cand / "params" / "base.yaml").is_file() and (cand / "pyproject.toml").is_file():
                return cand
    raise FileNotFoundError(
        "cannot find the selftrain project root (a folder with params/base.yaml and pyproject.toml); "
        "run from inside the repository or set SELFTRAIN_ROOT"
    )


def resolve_path(path: str | os.PathLike) -> Path:
    """Relative paths in params are relative to the project root, not to the current folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


# Names that become folders (study, model, method): a letter or digit first, then letters, digits, '.', '_', '-';
# never '..', '/', or empty, so a name cannot lead outside the folder it is joined to.
SLUG = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"

# Inside the repository only these folders are written (git-ignored, but for results/' committed studies); anything
# else there (params/, data/, notebooks/, the root itself) is source that no command may overwrite.
WRITABLE = ("results", "checkpoints", ".cache", "bench/out")


class UnsafePath(ValueError):
    """A folder a command would write into lies where nothing may be written; the message says which and why."""


def output_folder(path: str | os.PathLike, what: str, below: bool = True) -> Path:
    """The resolved folder `path` (relative: to the project root) that a command writes into, or UnsafePath.

    Outside the repository any folder is taken (a cluster's scratch disk, a temp folder), except one that holds the
    repository ('/', '..'); inside it, only a folder under results/, checkpoints/, .cache/ or bench/out/ (below:
    strictly under, as a study's folder must be; else the folder itself may be one of them)."""
    p = resolve_path(path).resolve()
    root = project_root().resolve()
    if root.is_relative_to(p):
        raise UnsafePath(f"{what} {str(path)!r} is {p}, which holds the project {root}: refused")
    if not p.is_relative_to(root):
        return p
    for name in WRITABLE:
        base = (root / name).resolve()
        if p.is_relative_to(base) and (p != base or not below):
            return p
    where = " or ".join(f"{w}/" for w in WRITABLE)
    raise UnsafePath(f"{what} {str(path)!r} is {p}: inside the repository only {where} are written, refused")


def study_dir(path: str | os.PathLike, what: str) -> Path:
    """A study's folder that a command writes its figures, tables or index into: a place where results may be
    written (output_folder) and, outside the project's results/, a folder that already holds run folders
    (<model>/<method>/v<N>/manifest.json), so `--results-dir /etc --study ssl` writes nothing."""
    p = output_folder(path, what)
    if p.is_dir() and not p.is_relative_to((project_root() / "results").resolve()):
        if next(p.glob("*/*/v*/manifest.json"), None) is None:
            raise UnsafePath(f"{what} {str(path)!r} is {p}, which holds no run folders (<model>/<method>/v<N>/"
                             "manifest.json): not a study folder, refused")  # fmt: skip
    return p


def study_folder(results_dir: str | os.PathLike, study: str) -> Path:
    """results/<study> for a command that writes a study's figures, tables or index: the name must be a folder name
    (letters, digits, . _ -; no '/', no '..') and the folder a study folder where results may be written."""
    if not re.fullmatch(SLUG, study):
        raise UnsafePath(f"study name {study!r} is not a folder name (letters, digits, . _ -): refused")
    return study_dir(Path(resolve_path(results_dir)) / study, "study folder")
