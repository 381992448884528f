"""Stage 06, eval: the model under test on llm-jp-eval-format benchmark datasets.

Modules: ``datasets`` (reading and validating dataset files), ``prompts`` (llm-jp-eval's prompt layout),
``scoring`` (dataset, category and AVG scores), ``stage`` (generation, the stage function and its views).
The names a notebook or a test needs are re-exported here.
"""

from selftrain.evaluate.datasets import Dataset, dataset_paths, load_dataset, load_datasets
from selftrain.evaluate.prompts import build_prompt, chat_turns, fit_prompt
from selftrain.evaluate.scoring import aggregate, score_dataset
from selftrain.evaluate.stage import (
    STAGE,
    category_table,
    errors_table,
    evaluate,
    plot_categories,
    predictions_table,
    run,
    run_shard,
)

__all__ = [
    "STAGE", "Dataset", "aggregate", "build_prompt", "category_table", "chat_turns", "dataset_paths", "errors_table",
    "evaluate", "fit_prompt", "load_dataset", "load_datasets", "plot_categories", "predictions_table", "run",
    "run_shard", "score_dataset",
]  # fmt: skip
