"""Quiet cells: third-party logs and warnings go to a run's logs/<stage>.log instead of the notebook."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

# Libraries whose logs (engine configs, a warning per weight, HTTP lines) would bury a cell's output.
QUIET_LOGGERS = (
    "vllm", "transformers", "torch", "accelerate", "datasets", "trl", "peft", "gguf", "httpx", "openai",
    "huggingface_hub", "filelock", "urllib3",
)  # fmt: skip
# Warnings raised inside installed packages go to the log; the project's own (a skipped dataset, ...) stay visible.
_THIRD_PARTY = ("site-packages", "dist-packages")


@contextlib.contextmanager
def quiet_logs(log_file: Path, verbose: bool = False) -> Iterator[None]:
    """Third-party logs and the warnings raised inside installed packages go to `log_file` (created on the first
    record) instead of the cell; progress bars, what the stage prints and selftrain's own warnings stay.
    verbose=True leaves everything as it is."""
    if verbose:
        yield
        return
    import logging

    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM would add its own stdout handler on import
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = {}
    for name in QUIET_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate)
        lg.handlers = [handler]
        lg.propagate = False
    shown = warnings.showwarning
    library = logging.getLogger("py.warnings.libraries")
    library.handlers, library.propagate = [handler], False

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if any(part in str(filename) for part in _THIRD_PARTY):
            library.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
        for name, (handlers, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()
