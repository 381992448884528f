"""Per-study index: ``results/<study>/README.md`` lists every run with its stages, their times, the key
metrics and links to the executed notebooks and figures. Built from the run folders alone."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

from selftrain.io import DataError, atomic_write_text, read_json
from selftrain.schema import criterion, metrics_or_empty, planned_stages, run_state


def fmt(x: Any, digits: int = 3, blank: str = "") -> str:
    """A table cell: numbers with `digits` decimals, `blank` for None/NaN, anything else as text."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return blank
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return f"{float(x):.{digits}f}"
    return str(x)


def _fmt(x: Any, digits: int = 3) -> str:
    # The index shows counts as integers and floats with `digits`; "-" where there is nothing.
    return fmt(x, 0 if isinstance(x, int) and not isinstance(x, bool) else digits, "-")


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Status, per-stage seconds and the headline metrics of one run folder."""
    m = read_json(run_dir / "manifest.json")
    stages = m.get("stages", {})
    planned = planned_stages(run_dir)
    failed = [s for s in planned if stages.get(s, {}).get("status") == "failed"]
    sel, sft, dpo = (metrics_or_empty(run_dir, s) for s in ("select", "sft", "dpo"))
    judge, ev = metrics_or_empty(run_dir, "judge"), metrics_or_empty(run_dir, "eval")
    q = criterion(judge, "quality", "overall")
    return {
        "dir": run_dir,
        "state": run_state(run_dir),
        "seconds": {k: stages[k].get("seconds") for k in planned if k in stages},
        "sft_examples": sel.get("sft_examples"),
        "dpo_pairs": sel.get("dpo_pairs"),
        "sft_loss": sft.get("train_loss"),
        "dpo_loss": dpo.get("train_loss"),
        "quality": q.get("mean"),
        "quality_ci": (q.get("ci_low"), q.get("ci_high")),
        "safety": criterion(judge, "safety", "safety").get("mean"),
        "violation_rate": criterion(judge, "safety", "violation_rate").get("mean"),
        "eval_avg": ev.get("avg"),
        "error": next((stages[f].get("error") for f in failed), None),
    }


def hardware_label(run_dir: Path) -> str:
    """A short name of the hardware a run used: CPU model + its native-bf16 sets, or the GPUs."""
    try:
        hw = read_json(run_dir / "manifest.json").get("hardware") or {}
    except DataError:
        return "unknown"
    if hw.get("gpus"):
        return f"{', '.join(hw['gpus'])} (CUDA {hw.get('cuda_version')})"
    cpu = hw.get("cpu") or {}
    flags = [f for f in cpu.get("flags", []) if f in ("amx_tile", "avx512_bf16")]
    return f"{cpu.get('model') or hw.get('platform', 'unknown')}" + (f" [{', '.join(flags)}]" if flags else "")


def write_study_index(study_dir: str | Path) -> Path:
    """Write ``<study_dir>/README.md`` from the run folders under it; returns its path."""
    study_dir = Path(study_dir)
    runs = sorted(p.parent for p in study_dir.glob("*/*/v*/manifest.json"))
    lines = [
        f"# Study `{study_dir.name}`",
        "",
        "Index of every run under this folder, written from the run folders alone "
        "(`python -m selftrain index --study-dir ...` rewrites it). Figures of the whole study: `figures/` "
        "(`make figures`).",
        "",
        "| model | method | run | state | SFT ex. | DPO pairs | SFT loss | DPO loss | quality (overall) "
        "| safety | violations | eval AVG |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for d in runs:
        try:
            r = run_summary(d)
        except DataError as e:
            lines.append(f"| {d.parts[-3]} | {d.parts[-2]} | {d.name} | unreadable manifest: {e} |||||||||")
            continue
        rel = d.relative_to(study_dir).as_posix()
        lo, hi = r["quality_ci"]
        quality = _fmt(r["quality"], 2) + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")
        lines.append(
            f"| {d.parts[-3]} | {d.parts[-2]} | [{d.name}]({rel}) | {r['state']} | {_fmt(r['sft_examples'])} "
            f"| {_fmt(r['dpo_pairs'])} | {_fmt(r['sft_loss'])} | {_fmt(r['dpo_loss'])} | {quality} "
            f"| {_fmt(r['safety'], 2)} | {_fmt(r['violation_rate'], 2)} | {_fmt(r['eval_avg'])} |"
        )
        secs = ", ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items() if isinstance(v, int | float))
        nbs = " ".join(f"[{p.stem}]({rel}/notebooks/{p.name})" for p in sorted((d / "notebooks").glob("*.ipynb")))
        figs = " ".join(f"[{p.stem}]({rel}/figures/{p.name})" for p in sorted((d / "figures").glob("*.png")))
        details += [f"### {rel}", "", f"- state: {r['state']}", f"- stage times: {secs or '-'}"]
        if r["error"]:
            details.append(f"- error: `{r['error'].splitlines()[0][:300]}`")
        details += [f"- notebooks: {nbs or '-'}", f"- figures: {figs or '-'}", ""]
    setups = sorted({hardware_label(d) for d in runs})
    if len(setups) > 1:  # bf16 rounding differs between CPUs with and without AMX / AVX-512 BF16, GPUs, drivers
        lines += ["", f"**Hardware differs between these runs** ({len(setups)} setups: {'; '.join(setups)}): "
                  "differences between them may come from numerics, not from the methods."]  # fmt: skip
    text = "\n".join([*lines, "", "## Runs", "", *details])
    return atomic_write_text(study_dir / "README.md", text + "\n")
