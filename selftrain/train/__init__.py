"""Stages 03 (sft) and 04 (dpo): TRL's trainers on the selected data, in the kernel or launched by accelerate.

Modules: ``stage`` (the trainer, its precision and checks, the stage functions and views), ``launch`` (training in
a child process group started by `accelerate launch`, one node or several through srun), ``cpu_head`` (a plain LM
head for TRL's trainers on a CPU). ``python -m selftrain.train --worker ...`` is one launched rank. The names a
notebook or a test needs are re-exported here; notebooks call ``train.sft(run)`` and ``train.dpo(run)``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from selftrain.runs import Run
from selftrain.train.stage import (
    Device,
    TrainingError,
    check_batch,
    checkpoints_dir,
    completion_logprobs,
    plot_training,
    precision_plan,
    train_in_process,
    train_stage,
    whole_run_loss,
)


def sft(run: Run, callbacks: list[Any] | None = None, progress: bool = True) -> pd.DataFrame:
    """Stage 03: SFT on the run's sft.jsonl from M0; returns the trainer's log (empty for a skipped stage)."""
    return train_stage(run, "sft", callbacks, progress)


def dpo(run: Run, callbacks: list[Any] | None = None, progress: bool = True) -> pd.DataFrame:
    """Stage 04: DPO on the run's dpo.jsonl from the SFT model (or M0); returns the trainer's log."""
    return train_stage(run, "dpo", callbacks, progress)


__all__ = [
    "Device", "TrainingError", "check_batch", "checkpoints_dir", "completion_logprobs", "dpo", "plot_training",
    "precision_plan", "sft", "train_in_process", "train_stage", "whole_run_loss",
]  # fmt: skip
