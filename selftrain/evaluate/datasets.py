"""llm-jp-eval's preprocessed dataset files: one JSON per dataset, read and validated with errors that name the
file and the field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftrain.evaluate.metrics import METRICS, prepare_gold
from selftrain.io import DataError, read_json
from selftrain.paths import resolve_path

# Correlation metrics read the gold answers as numbers; a gold that is not one is a malformed file.
NUMERIC_GOLD_METRICS = {"pearson", "spearman"}
REQUIRED_FIELDS = ("instruction", "output_length", "metrics", "samples")
# Keys only llm-jp-eval v2's files carry (its DATASET.md); v1.x files carry `few_shots` (always [] in
# llm-jp-eval's own trees: few-shots come from the train split).
V2_FIELDS = ("num_few_shots", "answer_extract_pattern", "answer_pattern_id", "language", "custom_prompt_template")


@dataclass
class Dataset:
    """One llm-jp-eval preprocessed dataset file, validated."""

    name: str
    path: Path
    instruction: str
    output_length: int
    metrics: list[str]
    few_shots: list[dict[str, str]]
    samples: list[dict[str, str]]
    label_list: list[str] | None = None
    unsupported_metrics: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)  # the top-level keys the file has
    num_few_shots: int | None = None  # v2: the file's own k
    answer_extract_pattern: str | None = None  # v2
    answer_pattern_id: str | None = None  # v2
    language: str | None = None  # v2
    custom_prompt_template: str | None = None  # v2

    @property
    def scored_metrics(self) -> list[str]:
        return [m for m in self.metrics if m in METRICS]

    @property
    def main_metric(self) -> str | None:
        return self.scored_metrics[0] if self.scored_metrics else None


def _pairs(value: Any, key: str, path: Path, non_empty: bool) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"{path}: field '{key}': expected a list, got {type(value).__name__}")
    if non_empty and not value:
        raise DataError(f"{path}: field '{key}': empty list")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: field '{key}[{i}]': expected an object, got {type(item).__name__}")
        for sub in ("input", "output"):
            if sub not in item:
                raise DataError(f"{path}: field '{key}[{i}].{sub}': missing")
            if not isinstance(item[sub], str):
                raise DataError(f"{path}: field '{key}[{i}].{sub}': expected a string, got {type(item[sub]).__name__}")
        out.append({"input": item["input"], "output": item["output"]})
    return out


def load_dataset(path: str | Path, require_metric: bool = True) -> Dataset:
    """Read and validate one dataset file; DataError names the path and the offending field.

    require_metric=False accepts a file none of whose metrics is implemented here (an llm-jp-eval protocol
    then reports the dataset "not comparable" rather than refusing the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    data = read_json(path)  # DataError with the position for invalid JSON
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in data:
            raise DataError(f"{path}: field '{key}': missing")
    if not isinstance(data["instruction"], str):
        raise DataError(f"{path}: field 'instruction': expected a string, got {type(data['instruction']).__name__}")
    length = data["output_length"]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise DataError(f"{path}: field 'output_length': expected a positive integer, got {length!r}")
    metrics = data["metrics"]
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise DataError(f"{path}: field 'metrics': expected a non-empty list of metric names, got {metrics!r}")
    if require_metric and not any(m in METRICS for m in metrics):
        raise DataError(
            f"{path}: field 'metrics': none of {metrics} is implemented (known: {', '.join(sorted(METRICS))})"
        )
    few_shots = _pairs(data["few_shots"], "few_shots", path, non_empty=False) if "few_shots" in data else []
    samples = _pairs(data["samples"], "samples", path, non_empty=True)
    v2: dict[str, Any] = {}
    for key, kind in (("num_few_shots", int), ("answer_extract_pattern", str), ("answer_pattern_id", str),
                      ("language", str), ("custom_prompt_template", str)):  # fmt: skip
        value = data.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise DataError(f"{path}: field '{key}': expected {kind.__name__} or null, got {value!r}")
        v2[key] = value
    labels = data.get("label_list")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise DataError(f"{path}: field 'label_list': expected a list of strings, got {labels!r}")
    if NUMERIC_GOLD_METRICS & set(metrics):
        for i, s in enumerate(samples):
            try:
                float(prepare_gold(s["output"]))
            except ValueError:
                raise DataError(
                    f"{path}: field 'samples[{i}].output': {s['output']!r} is not a number, "
                    f"which metric(s) {sorted(NUMERIC_GOLD_METRICS & set(metrics))} need"
                ) from None
    return Dataset(
        name=path.stem,
        path=path,
        instruction=data["instruction"],
        output_length=length,
        metrics=list(metrics),
        few_shots=few_shots,
        samples=samples,
        label_list=list(labels) if labels else None,
        unsupported_metrics=[m for m in metrics if m not in METRICS],
        fields=sorted(data),
        **v2,
    )


def dataset_paths(datasets_dir: str | Path, names: Sequence[str] = ()) -> list[Path]:
    """The dataset files a run reads: `names` in that order (existing or not), else every *.json, sorted."""
    folder = resolve_path(datasets_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: benchmark datasets folder not found (eval.datasets_dir)")
    paths = [folder / f"{n}.json" for n in names] if names else sorted(folder.glob("*.json"))
    if not paths:
        raise DataError(f"{folder}: no *.json dataset files (eval.datasets_dir)")
    return paths


def load_datasets(
    datasets_dir: str | Path, names: Sequence[str] = (), require_metric: bool = True
) -> tuple[list[Dataset], list[dict[str, str]]]:
    """The valid datasets of a folder (all *.json, or `names` in that order) and one error record per bad one.

    A bad file does not stop the others: it becomes ``{"dataset", "path", "error"}``. A missing folder does.
    """
    good, errors = [], []
    for p in dataset_paths(datasets_dir, names):
        try:
            good.append(load_dataset(p, require_metric))
        except DataError as e:
            errors.append({"dataset": p.stem, "path": str(p), "error": str(e)})
    return good, errors
