"""Stage 07, tables: the collected study as CSV (raw numbers), Markdown and LaTeX (display), and missing.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain.config import load_figures_power
from selftrain.figures.collect import COUNT_COLUMNS, TEXT_COLUMNS, StudyResults
from selftrain.figures.power import power_display, power_markdown_note
from selftrain.figures.rounds import rounds_display
from selftrain.io import atomic_write_text, write_csv
from selftrain.report import fmt
from selftrain.schema import QUALITY


def _strings(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text: counts without decimals, other numbers with 3, NaN blank."""
    return pd.DataFrame({c: df[c].map(lambda x, d=0 if c in COUNT_COLUMNS else 3: fmt(x, d)) for c in df.columns})


def main_display(table: pd.DataFrame) -> pd.DataFrame:
    """The main table as text for Markdown/LaTeX: overall with its CI in one cell, blanks for missing."""

    def with_ci(m: float, lo: float, hi: float) -> str:
        s = fmt(m, 2)
        return f"{s} [{fmt(lo, 2)}, {fmt(hi, 2)}]" if s and not (math.isnan(lo) or math.isnan(hi)) else s

    def col(c: str, digits: int = 3) -> pd.Series:
        return table[c].map(lambda x: fmt(x, digits))

    out = pd.DataFrame({"model": table["model"], "method": table["method"], "version": table["version"]})
    if "sweep" in table and table["sweep"].fillna("").astype(str).str.len().gt(0).any():
        out.insert(2, "sweep", table["sweep"].fillna(""))  # which point of a sweep axis each row is
    cis = table[["overall", "overall_ci_low", "overall_ci_high"]].astype(float).itertuples(index=False)
    out["quality (95% CI)"] = [with_ci(*v) for v in cis]
    for c in QUALITY[:-1]:
        out[c] = col(c, 2)
    out["safety"] = col("safety", 2)
    out["violation"] = col("violation_rate")
    out["acceptable"] = col("acceptable_rate")
    out["eval AVG"] = col("eval_avg")
    for c in [c for c in table.columns if c.startswith("eval_") and c != "eval_avg"]:
        out[c[len("eval_") :]] = col(c)
    out["SFT ex."] = col("sft_examples", 0)
    out["DPO pairs"] = col("dpo_pairs", 0)
    if "seeds" in table and (table["seeds"].fillna(1) > 1).any():  # replicates: their spread beside the CI
        out["seeds"] = col("seeds", 0)
        out["quality sd (seeds)"] = col("seed_sd_overall", 2)
        out["safety sd (seeds)"] = col("seed_sd_safety", 2)
        out["eval AVG sd (seeds)"] = col("seed_sd_eval_avg")
    if "hardware" in table and table["hardware"].dropna().nunique() > 1:
        out["hardware"] = table["hardware"].fillna("")
    return out


def hardware_note(table: pd.DataFrame) -> str:
    """A warning line when the rows come from different hardware (bf16 numerics differ across CPU kinds)."""
    labels = sorted({h for v in table.get("hardware", pd.Series(dtype=str)).dropna() for h in str(v).split("; ")})
    if len(labels) < 2:
        return ""
    return (
        f"**Hardware differs between these rows** ({'; '.join(labels)}): differences may come from numerics, "
        "not from the methods; compare them with their across-seed spread.\n"
    )


def to_markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in _strings(df).itertuples(index=False)]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def _tex(s: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(df: pd.DataFrame, caption: str = "") -> str:
    """A booktabs table, hand-written (no jinja2 needed): text columns left, numbers right."""
    align = "".join("l" if c in TEXT_COLUMNS else "r" for c in df.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(_tex(c) for c in df.columns) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(_tex(v) for v in r) + r" \\" for r in _strings(df).itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, stem: Path, display: pd.DataFrame | None = None, caption: str = "") -> list[Path]:
    """`stem`.csv holds the raw numbers; `stem`.md and `stem`.tex the display version (default: df)."""
    shown = df if display is None else display
    return [
        write_csv(stem.with_suffix(".csv"), df),
        atomic_write_text(stem.with_suffix(".md"), to_markdown(shown)),
        atomic_write_text(stem.with_suffix(".tex"), to_latex(shown, caption)),
    ]


def missing_markdown(res: StudyResults) -> str:
    lines = [f"# Missing results of study `{res.study}`", ""]
    if not res.missing:
        return "\n".join([*lines, "Nothing missing: every chosen run is complete.", ""])
    lines += ["Rows of these runs show blanks in the tables and figures.", ""]
    return "\n".join(lines) + "\n" + to_markdown(res.missing_frame())


OPTIONAL_TABLES = (
    "replicates",
    "paired",
    "controls",
    "length",
    "rounds",
    "power",
)  # written only where a study has what they need


def write_tables(res: StudyResults, out_dir: Path | None = None) -> list[Path]:
    """results.*, judge.*, selection.* (CSV, Markdown, LaTeX), missing.md and, where the study has what they need,
    replicates.*, paired.*, controls.*, length.*, power.* (also appended to results.md) under tables/; an optional
    table not produced now is removed."""
    out_dir = out_dir or res.study_dir / "tables"
    paths = write_table(
        res.table, out_dir / "results", main_display(res.table), f"Study {res.study}: judge and benchmark results"
    )
    note = hardware_note(res.table)
    if note:
        md = out_dir / "results.md"
        atomic_write_text(md, md.read_text() + "\n" + note)
    if len(res.replicates) and (res.table["seeds"].fillna(1) > 1).any():
        paths += write_table(res.replicates, out_dir / "replicates", caption=f"Study {res.study}: every seed's run")
    paths += write_table(res.judge, out_dir / "judge", caption=f"Study {res.study}: judge scores with 95% CIs")
    paths += write_table(res.selection, out_dir / "selection", caption=f"Study {res.study}: selection diagnostics")
    if len(res.paired):
        cap = f"Study {res.study}: method minus baseline on shared items (paired bootstrap 95% CI, Holm-adjusted p)"
        paths += write_table(res.paired, out_dir / "paired", caption=cap)
    if len(res.controls):
        cap = f"Study {res.study}: control arm minus central on shared items (paired bootstrap 95% CI, Holm-adjusted p)"
        paths += write_table(res.controls, out_dir / "controls", caption=cap)
    if len(res.lengths):
        cap = f"Study {res.study}: answer length and length-controlled judge quality"
        paths += write_table(res.lengths, out_dir / "length", caption=cap)
    if len(res.rounds):
        cap = f"Study {res.study}: drift monitors by round (round k: the model trained k times) and the collapse flag"
        paths += write_table(res.rounds, out_dir / "rounds", rounds_display(res.rounds), cap)
    if len(res.power):
        settings = load_figures_power(res.spec_path)
        cap = (f"Study {res.study}: minimum detectable difference (mdd, {settings.power:.0%} power at the Holm level "
               "used) and the items and seeds a named difference needs")  # fmt: skip
        paths += write_table(res.power, out_dir / "power", power_display(res.power), cap)
        # results.md: the main table as before, then the power of every comparison (its own section)
        md = out_dir / "results.md"
        text = f"\n## Power of the paired comparisons\n\n{to_markdown(power_display(res.power))}\n"
        atomic_write_text(md, md.read_text() + text + power_markdown_note(settings))
    paths.append(atomic_write_text(out_dir / "missing.md", missing_markdown(res)))
    # A table this study no longer produces (no baseline any more, one seed, ...) must not stay behind looking
    # current: its files from an earlier run of 07 go.
    for stem in OPTIONAL_TABLES:
        for suffix in (".csv", ".md", ".tex"):
            stale = out_dir / f"{stem}{suffix}"
            if stale not in paths:
                stale.unlink(missing_ok=True)
    return paths


def views(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The main table split into views a person can read in a notebook (each about ten columns): judge quality,
    judge safety, benchmark categories, training data."""
    key = ["model", "method", "version", "state"]
    quality = ["overall", "overall_ci_low", "overall_ci_high", *(c for c in QUALITY if c != "overall")]
    safety = ["safety", "safety_ci_low", "safety_ci_high", "violation_rate", "acceptable_rate"]
    evals = [c for c in table.columns if c.startswith("eval_")]
    if "seeds" in table and (table["seeds"].fillna(1) > 1).any():  # replicates: the spread beside each score
        quality += ["seeds", "seed_sd_overall"]
        safety += ["seeds", "seed_sd_safety"]
        evals += ["seeds", *(c for c in table.columns if c.startswith("seed_sd_eval"))]
    out = {
        "judge: quality": [*key, *quality],
        "judge: safety": [*key, *safety],
        "benchmark": [*key, *evals],
        "training data": [*key, "sft_examples", "dpo_pairs"],
    }
    return {name: table[[c for c in cols if c in table.columns]] for name, cols in out.items()}
