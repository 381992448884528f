"""Figure helpers: every stage saves PNG + PDF into the run's figures/ folder, atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

if matplotlib.get_backend().lower() not in {"module://matplotlib_inline.backend_inline", "inline"}:
    matplotlib.use("Agg")  # headless unless a notebook has already chosen the inline backend

import matplotlib.pyplot as plt  # noqa: E402

from selftrain.io import atomic_write_bytes  # noqa: E402


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """Write `stem`.png and `stem`.pdf, then close the figure (a saved figure is never shown twice in a notebook)."""
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        # No creation date in the PDF: the same figure gives the same bytes, so regenerating committed
        # figures from unchanged results leaves git status clean.
        fig.savefig(buf, format=ext, dpi=120, metadata={"CreationDate": None} if ext == "pdf" else None)
        paths.append(atomic_write_bytes(Path(stem).with_suffix(f".{ext}"), buf.getvalue()))
    plt.close(fig)
    return paths


__all__ = ["plt", "save_figure"]
