"""Where the project lives, so notebooks (cwd = notebooks/) and the CLI (cwd = anywhere) agree on paths."""

from __future__ import annotations

import os
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
