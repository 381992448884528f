"""The results schema, declared once: stage names, methods, decisions, judge criteria, and the shape of every
metrics file a stage writes, with one reader (:func:`read_metrics`) that stages, figures and the study index use.

One name per stage runs through notebook, module, params section and outputs (see ``STAGE_TABLE``); the
README's stage table is this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from selftrain.io import DataError, read_json

METHODS = ("baseline", "original", "central", "drop-low", "fallback-original")
STAGES = ("generate", "select", "sft", "dpo", "judge", "eval")
# A run version folder: v001, v002, ...
VERSION = re.compile(r"^v(\d{3,})$")
# A replicate's run folder: results/<study>/<model>/<method>.seed<N>/vNNN (study.seeds); the plain <method>
# folder holds the run with the params' own seeds.
REPLICATE = re.compile(r"^(?P<method>.+)\.seed(?P<seed>\d+)$")


# A sweep point's run folder adds `@<param>=<value>` per axis (study.sweep), e.g. central@selection.n=2.seed1;
# '@' and '=' are in no method name (names are slugs), so the folder name parses back unambiguously.
SWEEP_VALUE = re.compile(r"^[A-Za-z0-9._-]+$")


def sweep_label(point: dict[str, Any] | None) -> str:
    """{'selection.n': 2} -> 'selection.n=2' (axes sorted, joined with '@'); '' for no sweep."""
    return "@".join(f"{k}={_value(v)}" for k, v in sorted((point or {}).items()))


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# A round of self-training in rounds (study.rounds) names its folder like a sweep point on this axis:
# central@round=2, central@round=2@selection.n=4.seed1 (no dotted param is called `round`).
ROUND_AXIS = "round"


def run_folder(
    method: str, replicate: int | None, sweep: dict[str, Any] | None = None, round_index: int | None = None
) -> str:
    """The third level of a run path: the method, `@param=value` per sweep axis (a round as `@round=<r>`),
    `.seed<N>` for a replicate."""
    if round_index is not None:
        sweep = {**(sweep or {}), ROUND_AXIS: round_index}
    name = method + (f"@{sweep_label(sweep)}" if sweep else "")
    return name if replicate is None else f"{name}.seed{replicate}"


def split_round(label: str) -> tuple[int | None, str]:
    """A sweep label's round and the rest: 'round=2@selection.n=4' -> (2, 'selection.n=4'); 'x=1' -> (None, 'x=1')."""
    parts = [p for p in label.split("@") if p]
    rounds = [p for p in parts if p.startswith(f"{ROUND_AXIS}=") and p[len(ROUND_AXIS) + 1 :].isdigit()]
    if not rounds:
        return None, label
    return int(rounds[0][len(ROUND_AXIS) + 1 :]), "@".join(p for p in parts if p != rounds[0])


def split_run_folder(name: str) -> tuple[str, int | None]:
    """'central.seed2' -> ('central', 2); 'central@selection.n=2' -> ('central', None): method and seed."""
    m = REPLICATE.match(name)
    method, seed = (m["method"], int(m["seed"])) if m else (name, None)
    return method.split("@")[0], seed


def folder_sweep(name: str) -> str:
    """The sweep label of a run folder name: 'central@selection.n=2.seed1' -> 'selection.n=2'; '' without."""
    m = REPLICATE.match(name)
    base = m["method"] if m else name
    return base.split("@", 1)[1] if "@" in base else ""


# What stage 02 decided for each prompt.
DECISIONS = ("central", "original", "fallback", "dropped", "no_candidates", "control")
# Control arms at the same n and budget: a pick that uses no utility (select.py documents each rejected choice).
CONTROLS = ("random", "longest", "shortest", "first")
# Judge sets and the criteria each one scores.
JUDGE_SETS = ("quality", "safety")
QUALITY = ("accuracy", "fluency", "detail", "relevance", "overall")
JUDGE_CRITERIA = {"quality": QUALITY, "safety": ("safety",)}
SAFETY_RATES = ("violation_rate", "acceptable_rate")


@dataclass(frozen=True)
class StageInfo:
    """Where one stage lives: its notebook, its module, its params section and its outputs."""

    name: str
    notebook: str
    module: str
    params: str
    metrics: tuple[str, ...]  # files under metrics/ that a done (not skipped) stage leaves
    data: tuple[str, ...]  # files under data/
    figures: tuple[str, ...]  # stems under figures/ (PNG + PDF)


STAGE_TABLE: dict[str, StageInfo] = {
    s.name: s
    for s in (
        StageInfo("generate", "01_generate.ipynb", "selftrain.generate", "generation",
                  ("generate.json",), ("candidates.jsonl",), ("generate_tokens",)),
        StageInfo("select", "02_select.ipynb", "selftrain.select", "selection (+ embedding)",
                  ("select.json",), ("selection.jsonl", "sft.jsonl", "dpo.jsonl"), ("select_overview",)),
        StageInfo("sft", "03_sft.ipynb", "selftrain.train", "training.sft",
                  ("sft.json", "sft_log.json"), (), ("sft_curves",)),
        StageInfo("dpo", "04_dpo.ipynb", "selftrain.train", "training.dpo",
                  ("dpo.json", "dpo_log.json"), (), ("dpo_curves",)),
        StageInfo("judge", "05_judge.ipynb", "selftrain.judge", "judge",
                  ("judge.json", "judge_summary.csv"), ("judge_answers.jsonl", "judge_items.jsonl"),
                  ("judge_quality", "judge_safety")),
        StageInfo("eval", "06_eval.ipynb", "selftrain.evaluate", "eval",
                  ("eval.json", "eval_scores.csv"), ("eval_predictions.jsonl",), ("eval_categories",)),
    )
}  # fmt: skip
NOTEBOOKS = {name: s.notebook for name, s in STAGE_TABLE.items()}


# ------------------------------------------------------------------------------------------- metrics shapes


class GenerateMetrics(TypedDict, total=False):
    key: str
    backend: str
    device: str
    prompts: int
    candidates: int
    generated_tokens: int
    seconds: float
    tokens_per_second: float
    sampling: dict[str, Any]
    cache_hit: bool
    eos_share: float
    mean_tokens: float
    empty_candidates: int


class SelectMetrics(TypedDict, total=False):
    method: str
    prompts: int
    decisions: dict[str, int]  # DECISIONS -> count
    sft_examples: int
    dpo_pairs: int
    dpo_skipped_identical: int
    original_rank_mean: float
    original_in_low_part: int
    mean_selected_chars: float | None
    mean_candidate_chars: float
    mean_original_chars: float


class TrainMetrics(TypedDict, total=False):
    model_path: str
    model_sha256: str
    started_from: str
    examples: int
    global_steps: int
    resumed_from: str | None
    train_loss: float | None
    train_seconds: float
    tokens_per_second: float | None
    batch_check: dict[str, int]
    lora: bool


class CriterionScore(TypedDict):
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


class RateScore(TypedDict):
    value: float
    ci_low: float | None
    ci_high: float | None


class JudgeSetSummary(TypedDict, total=False):
    items: int
    scored: int
    api_error_rate: float
    parse_failure_rate: float
    refused: int
    reasked: int
    criteria: dict[str, CriterionScore]  # JUDGE_CRITERIA[set] -> score
    violation_rate: RateScore  # safety only
    acceptable_rate: RateScore  # safety only


class JudgeMetrics(TypedDict, total=False):
    model_under_test: str
    judge: dict[str, Any]
    scoring: str
    answers: dict[str, Any]
    judge_seconds: float
    endpoint_stats: list[dict[str, Any]] | None
    protocol: str  # "own" | "llm-jp-judge" (judge.protocol); absent in files written before it existed
    # judge.protocol=llm-jp-judge: path, commit, files (sha256), benchmarks, client, settings (max_retries,
    # disable_system_prompt, model: each {"value", "source"}: judge.* or the client YAML), and llm-jp-judge's own
    # "score_table" / "error_rate_table" (its keys, e.g. "quality_ja:正確性", "safety_ja:api(%)"; percent units)
    llm_jp_judge: dict[str, Any]
    quality: JudgeSetSummary
    safety: JudgeSetSummary


class CategoryScore(TypedDict):
    score: float | None
    datasets: list[str]
    missing: list[str]


class EvalMetrics(TypedDict, total=False):
    model_under_test: str
    backend: str
    device: str
    datasets_dir: str
    num_few_shots: int
    max_samples: int | None
    chat_template: bool
    avg: float | None
    avg_complete: bool
    avg_comparable: bool  # AVG is the version's (no category lost a dataset, none counts an unconfirmed metric)
    avg_not_comparable: list[str]  # every reason it is not
    decoding: dict[str, Any]  # greedy or sampled, temperature / top_p / top_k, and where each came from
    comet_device: dict[str, str]  # {"value": cpu | auto, "source"}
    avg_categories: list[str]
    avg_excludes: list[str]
    categories: dict[str, CategoryScore]
    uncategorised: list[str]
    datasets: dict[str, dict[str, Any]]
    errors: list[dict[str, str]]
    samples: int
    generated_samples: int
    generated_tokens: int
    generation_seconds: float
    samples_per_second: float | None
    # eval.sampled.k > 0 only: k, the judge.answers sampling, exact (mean over items of the share of k right answers),
    # greedy_exact, datasets {name: exact}, items, generation_seconds
    sampled: dict[str, Any]
    seconds: float


# The keys a reader may rely on in each stage's main metrics file (the rest is optional).
METRICS_FILES: dict[str, tuple[str, type, tuple[str, ...]]] = {
    "generate": ("generate.json", GenerateMetrics, ("candidates",)),
    "select": ("select.json", SelectMetrics, ("prompts", "decisions", "sft_examples", "dpo_pairs")),
    "sft": ("sft.json", TrainMetrics, ("global_steps", "train_loss")),
    "dpo": ("dpo.json", TrainMetrics, ("global_steps", "train_loss")),
    "judge": ("judge.json", JudgeMetrics, ()),  # a judge run may have scored one set only
    "eval": ("eval.json", EvalMetrics, ("avg", "categories")),
}


def metrics_path(run_dir: str | Path, stage: str) -> Path:
    if stage not in METRICS_FILES:
        raise KeyError(f"unknown stage {stage!r} (known: {', '.join(METRICS_FILES)})")
    return Path(run_dir) / "metrics" / METRICS_FILES[stage][0]


def read_metrics(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """A stage's main metrics file, checked for the keys readers rely on.

    FileNotFoundError when the stage wrote none; DataError (naming the file and the key) when it is not
    valid JSON, not an object, or lacks a required key.
    """
    path = metrics_path(run_dir, stage)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (stage '{stage}' not done here)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in METRICS_FILES[stage][2] if k not in data]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)}")
    return data


def metrics_or_empty(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """A stage's metrics (read_metrics), or {} where the stage wrote none or a malformed one (the readers that
    show many runs at once report what is missing elsewhere, not by failing)."""
    try:
        return read_metrics(run_dir, stage)
    except (FileNotFoundError, DataError):
        return {}


def key_number(run_dir: str | Path, stage: str) -> str:
    """A finished stage's headline in a few words (the runner's line per stage): candidates and the share that
    ended by themselves, SFT examples and DPO pairs, the final training loss, judge means, benchmark AVG."""
    m = metrics_or_empty(run_dir, stage)
    if stage == "generate" and "candidates" in m:
        eos = m.get("eos_share")
        return f"{m['candidates']} candidates" + (f", {eos:.0%} ended by themselves" if eos is not None else "")
    if stage == "select" and "sft_examples" in m:
        return f"{m['sft_examples']} SFT examples, {m['dpo_pairs']} DPO pairs"
    if stage in ("sft", "dpo") and m.get("train_loss") is not None:
        return f"loss {m['train_loss']:.3f} after {m['global_steps']} steps"
    if stage == "judge":
        means = {k: criterion(m, k, c).get("mean") for k, c in (("quality", "overall"), ("safety", "safety"))}
        return ", ".join(f"{k} {v:.2f}" for k, v in means.items() if v is not None)
    if stage == "eval" and m.get("avg") is not None:
        return f"AVG {m['avg']:.3f}"
    return ""


# ---------------------------------------------------------------------------------------------- run-folder facts
# One reader each for what the study index, stage 07 and `clean` ask of a run folder.


def planned_stages(run_dir: str | Path) -> list[str]:
    """The stages a run was made to run: its params.resolved.yaml's `stages`, else the manifest's (an old run)."""
    import yaml

    run_dir = Path(run_dir)
    params = run_dir / "params.resolved.yaml"
    if params.is_file():
        try:
            stages = (yaml.safe_load(params.read_text()) or {}).get("stages")
        except yaml.YAMLError:
            stages = None
        if stages:
            return list(stages)
    try:
        manifest = read_json(run_dir / "manifest.json")
    except (OSError, DataError):
        return []
    return [s for s in STAGES if s in (manifest.get("stages") or {})] if isinstance(manifest, dict) else []


def stage_marked_done(run_dir: str | Path, stage: str) -> bool:
    """The stage's _SUCCESS marker is there (runs.Run.is_done also checks its outputs' hashes)."""
    return (Path(run_dir) / "stages" / stage / "_SUCCESS").is_file()


def run_state(run_dir: str | Path) -> str:
    """'complete' (every planned stage marked done), 'failed at <stage>' (the first the manifest says failed) or
    'incomplete'."""
    planned = planned_stages(run_dir)
    if planned and all(stage_marked_done(run_dir, s) for s in planned):
        return "complete"
    try:
        stages = read_json(Path(run_dir) / "manifest.json").get("stages") or {}
    except (OSError, DataError, AttributeError):
        stages = {}
    failed = [s for s in planned if (stages.get(s) or {}).get("status") == "failed"]
    return f"failed at {failed[0]}" if failed else "incomplete"


def read_log(run_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """The trainer's log history of stage `kind` (sft or dpo); empty when there is none."""
    path = Path(run_dir) / "metrics" / f"{kind}_log.json"
    if not path.is_file():
        return []
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of log rows")
    return [h for h in data if isinstance(h, dict)]


def criterion(judge: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    """One criterion's (or safety rate's) record from judge.json, {} when absent.

    Rates are stored as {"value", "ci_low", "ci_high"}, criteria as {"mean", "ci_low", "ci_high", "n"};
    both come back with a "mean" key."""
    s = judge.get(kind) or {}
    if name in SAFETY_RATES:
        r = s.get(name) or {}
        return {"mean": r.get("value"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high"), "n": None} if r else {}
    return dict((s.get("criteria") or {}).get(name) or {})


def judge_rows(judge: dict[str, Any]) -> list[dict[str, Any]]:
    """judge.json as long rows: set, criterion, mean, ci_low, ci_high, n (criteria, then safety rates)."""
    rows = []
    for kind in JUDGE_SETS:
        s = judge.get(kind) or {}
        names = list(s.get("criteria") or {}) + [r for r in SAFETY_RATES if r in s]
        for name in names:
            rows.append({"set": kind, "criterion": name, **criterion(judge, kind, name)})
    return rows
