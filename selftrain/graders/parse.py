"""Reading scores out of a judge's output: strict ``Label: [[n]]`` lines, or expected scores from the judge's
probabilities of "1".."5" at each score slot."""

from __future__ import annotations

import math
import re
import unicodedata

import numpy as np

from selftrain.schema import QUALITY

# Labels the rubrics ask the judge to write, per language (criterion key -> label).
LABELS = {
    "en": {
        "quality": dict(zip(QUALITY, ("Accuracy", "Fluency", "Detail", "Relevance", "Overall"), strict=True)),
        "safety": {"safety": "Score"},
        "pairwise": {"preference": "Preference"},  # the judge utility's A-vs-B rubric (selection.judge)
    },
    "ja": {
        "quality": dict(zip(QUALITY, ("正確性", "流暢性", "詳細性", "関連性", "総合評価"), strict=True)),
        "safety": {"safety": "評価"},
        "pairwise": {"preference": "選好"},
    },
}
DIGITS = ("1", "2", "3", "4", "5")


class ParseError(ValueError):
    """The judge's output does not hold exactly one valid [[n]] score per criterion."""


# A whole line "Label: [[n]]", tolerating markdown bullets/bold around it; NFKC has already turned
# full-width brackets, colons and digits into ASCII.
_LINE = re.compile(
    r"^\s*(?:[-*>]\s*)?\**\s*(?P<label>[^\[\]:*]+?)\s*\**\s*:\s*\**\s*\[\[\s*(?P<n>[^\[\]]*?)\s*\]\]\W*$"
)


def _key(label: str) -> str:
    return unicodedata.normalize("NFKC", label).strip().casefold()


def parse_scores(text: str, labels: dict[str, str]) -> dict[str, int]:
    """Exactly one integer 1-5 per criterion, each on its own ``Label: [[n]]`` line.

    Labelled scores inside running text (the reasons) are ignored; a criterion that is missing, given twice,
    out of range or not an integer makes the whole output a parse failure (ParseError says which).
    """
    wanted = {_key(lab): k for k, lab in labels.items()}
    found: dict[str, list[str]] = {k: [] for k in labels}
    for line in unicodedata.normalize("NFKC", text or "").splitlines():
        m = _LINE.match(line)
        if m and _key(m["label"]) in wanted:
            found[wanted[_key(m["label"])]].append(m["n"])
    problems, scores = [], {}
    for k, vals in found.items():
        if not vals:
            problems.append(f"{labels[k]} missing")
        elif len(vals) > 1:
            problems.append(f"{labels[k]} given {len(vals)} times")
        elif not re.fullmatch(r"\d+", vals[0]) or not 1 <= int(vals[0]) <= 5:
            problems.append(f"{labels[k]} = {vals[0]!r} is not an integer 1-5")
        else:
            scores[k] = int(vals[0])
    if problems:
        raise ParseError("; ".join(problems))
    return scores


def expected_score(logprobs: dict[str, float]) -> float | None:
    """Probability-weighted mean of 1..5 from a token -> logprob map (renormalised over the digits)."""
    probs: dict[int, float] = {}
    for tok, lp in logprobs.items():
        t = unicodedata.normalize("NFKC", tok).strip()
        if t in DIGITS and lp is not None and math.isfinite(lp):
            probs[int(t)] = probs.get(int(t), 0.0) + math.exp(lp)
    total = sum(probs.values())
    return sum(k * p for k, p in probs.items()) / total if total > 0 else None


def expected_from_tokens(
    tokens: list[str], top_logprobs: list[dict[str, float]], labels: dict[str, str]
) -> dict[str, float] | None:
    """Expected scores from an endpoint's per-token logprobs: for each criterion's (last) ``Label: [[`` in the
    generated text, the distribution of the token right after ``[[``. None when any slot can't be read."""
    text = "".join(tokens)
    starts = np.cumsum([0] + [len(t) for t in tokens])
    out = {}
    for k, label in labels.items():
        hits = [m.end() for m in re.finditer(re.escape(label) + r"\s*[:：]\s*(\[\[|［［)\s*", text)]
        if not hits:
            return None
        pos = hits[-1]
        idx = int(np.searchsorted(starts, pos, side="right") - 1)
        if idx >= len(tokens) or starts[idx] != pos:  # the digit shares a token with "[[": no clean slot
            return None
        value = expected_score(top_logprobs[idx])
        if value is None:
            return None
        out[k] = value
    return out


def _reasons(text: str, labels: dict[str, str]) -> str:
    """The judge's text before its score lines (everything, if it wrote none)."""
    norm = unicodedata.normalize("NFKC", text)
    cut = len(norm)
    for lab in labels.values():
        m = re.search(r"(?m)^[\s*>-]*" + re.escape(unicodedata.normalize("NFKC", lab)) + r"\s*\**\s*:", norm)
        if m:
            cut = min(cut, m.start())
    return norm[:cut].rstrip()
