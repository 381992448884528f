"""Quiet cells and a quiet runner: third-party logs and warnings go to a run's logs/<stage>.log instead of the
notebook (quiet_logs, in the kernel), and papermill's lines, the cells' output and the kernel's own stderr go there
instead of the terminal of `python -m selftrain run` (notebook_log, in the runner)."""

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


@contextlib.contextmanager
def notebook_log(log_file: Path, verbose: bool = False) -> Iterator[type | None]:
    """While the runner executes a stage notebook: papermill's lines and the cells' output (log_output) are appended
    to `log_file` and, unless verbose, reach the terminal nowhere else. Yields the kernel manager class to start the
    kernel with: it appends the kernel process's own stdout and stderr (its startup warnings, what C++ libraries
    print, vLLM's engine processes) to the same file; None when verbose (the kernel writes to the terminal)."""
    import logging

    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("papermill")
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the cells' output is logged at INFO
    logger.propagate = saved[1] and verbose  # quiet: no root handler (a caller's basicConfig) prints them either
    try:
        yield None if verbose else _kernel_to(log_file)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        handler.close()


def _kernel_to(log_file: Path) -> type:
    from jupyter_client.manager import AsyncKernelManager

    class KernelToLog(AsyncKernelManager):
        """A kernel whose process writes its stdout and stderr to the stage's log."""

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: object) -> None:
            with log_file.open("ab") as out:  # the kernel keeps its own copy of the descriptor
                await super()._async_launch_kernel(kernel_cmd, **{**kw, "stdout": out, "stderr": out})

    return KernelToLog
