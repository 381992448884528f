"""Benchmark metrics computed the way llm-jp-eval computes them, so our scores compare with published ones.

Reference: llm-jp-eval v1.3.0, ``src/llm_jp_eval/utils.py`` (``normalize``, ``parse_float`` and the metric
branches of ``get_evaluation_result``), read in the copy vendored by swallow-llm/swallow-evaluation
(commit 78de0db). The code here is written from those definitions, not copied.

What llm-jp-eval does to a sample before any metric:

* prediction: keep the text before the first blank line (``split("\\n\\n")[0]``), then NFKC-normalise;
  we also strip surrounding whitespace, as later versions do (v2's answer extraction strips; v1.3.0 did
  not). Of the metrics here only exact match and the out-of-label rate can tell the difference;
* gold: NFKC-normalise, nothing else.

Every metric below applies that itself, so it takes raw generations or already-extracted answers alike
(both steps are idempotent). Scores are means over samples (correlations for pearson / spearman) on
llm-jp-eval's own scales: 0-1, except the BLEU pair, which is 0-100 as sacrebleu reports it.
"""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from statistics import mean

from rapidfuzz.distance import Indel
from sacrebleu.metrics import BLEU
from scipy.stats import pearsonr, spearmanr

# Score llm-jp-eval's parse_float gives a prediction with no readable number: far below any STS score.
UNPARSABLE_FLOAT = -2.0

_NOT_DIGIT_OR_DOT = re.compile(r"[^0-9.]")

# fuzzywuzzy's default preprocessing (full_process with force_ascii=True): it deletes code points
# 128-255 only (its "ascii dammit" table; kana, kanji and other scripts survive), turns every
# non-word character into a space, lowercases and strips.
_LATIN1_HIGH = dict.fromkeys(range(128, 256))
_NON_WORD = re.compile(r"\W")


# --------------------------------------------------------------------------------------- preprocessing


def normalize(text: str) -> str:
    """llm-jp-eval's answer normalisation: Unicode NFKC (full-width digits and letters become ASCII)."""
    return unicodedata.normalize("NFKC", text)


def prepare_prediction(text: str) -> str:
    """A generation as llm-jp-eval scores it: the part before the first blank line, NFKC, stripped."""
    return normalize(text.split("\n\n")[0]).strip()


def prepare_gold(text: str) -> str:
    """A gold answer as llm-jp-eval scores it: NFKC only."""
    return normalize(text)


def parse_float(text: str) -> float:
    """llm-jp-eval's lenient number reading: drop every character but ASCII digits and dots.

    "3.5点" reads 3.5 and "-1" reads 1.0 (the sign is dropped too); anything left that float() refuses
    ("", ".", "1.2.3") gives UNPARSABLE_FLOAT.
    """
    try:
        return float(_NOT_DIGIT_OR_DOT.sub("", text))
    except ValueError:
        return UNPARSABLE_FLOAT


def _fuzzy_sorted_tokens(text: str) -> str:
    # Same order of steps as fuzzywuzzy: the non-word pass runs before lowercasing.
    cleaned = _NON_WORD.sub(" ", text.translate(_LATIN1_HIGH)).lower().strip()
    return " ".join(sorted(cleaned.split()))


def token_sort_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 ``fuzz.token_sort_ratio(a, b)`` with python-Levenshtein, computed with rapidfuzz.

    Both strings are cleaned as fuzzywuzzy does, split on whitespace, sorted and rejoined, then compared
    with the Indel similarity (what Levenshtein.ratio is) and rounded to an int 0-100 by Python's round().
    Two strings that clean to the same text score 100, even when both clean to nothing ("!!" vs "?");
    otherwise one empty side scores 0.
    """
    a, b = _fuzzy_sorted_tokens(a), _fuzzy_sorted_tokens(b)
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * Indel.normalized_similarity(a, b)))


def _prepared(preds: Sequence[str], golds: Sequence[str]) -> list[tuple[str, str]]:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold answers")
    if not preds:
        raise ValueError("no samples to score")
    return [(prepare_prediction(p), prepare_gold(g)) for p, g in zip(preds, golds, strict=True)]


# ---------------------------------------------------------------------------------------------- metrics


def exact_match(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Share of predictions equal to their gold (llm-jp-eval: sklearn accuracy_score)."""
    return mean(float(p == g) for p, g in _prepared(preds, golds))


def mawps_exact_match(preds: Sequence[str], golds: Sequence[str]) -> float:
    """MAWPS score: plain exact match.

    llm-jp-eval has no metric of this name: ``mawps_exact_match`` is the score key of dataset ``mawps``
    under metric ``exact_match``, so "5.0" does not match a gold "5" (see exact_match_figure for that).
    """
    return exact_match(preds, golds)


def exact_match_figure(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Share of predictions numerically equal to their gold (float(pred) == float(gold)).

    A side that float() cannot read scores 0. The Nejumi leaderboard scores mawps / mgsm this way;
    llm-jp-eval v1.3.0 has no such metric (later versions have one by this name).
    """
    scores = []
    for p, g in _prepared(preds, golds):
        try:
            scores.append(float(float(p) == float(g)))
        except ValueError:
            scores.append(0.0)
    return mean(scores)


def char_f1(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Mean fuzzywuzzy token_sort_ratio / 100: llm-jp-eval's "char_f1" (not a true character F1)."""
    return mean(token_sort_ratio(p, g) / 100 for p, g in _prepared(preds, golds))


def _set_f1_one(pred: str, gold: str) -> float:
    # As llm-jp-eval: predicted lines are deduplicated, gold lines are not, so a repeated gold line
    # can never be fully recalled; blank lines count as items on both sides.
    pred_items = {line.strip() for line in pred.split("\n")}
    gold_items = [line.strip() for line in gold.split("\n")]
    hits = sum(item in gold_items for item in pred_items)
    precision = hits / len(pred_items)
    recall = hits / len(gold_items)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def set_f1(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Mean F1 between the newline-separated items of each prediction and its gold."""
    return mean(_set_f1_one(p, g) for p, g in _prepared(preds, golds))


def _correlation(kind: Callable, preds: Sequence[str], golds: Sequence[str]) -> float:
    pairs = _prepared(preds, golds)
    gold_values = []
    for _, g in pairs:
        try:
            gold_values.append(float(g))
        except ValueError as err:
            raise ValueError(f"gold answer {g!r} is not a number") from err
    pred_values = [parse_float(p) for p, _ in pairs]
    # Undefined correlations count as 0, as in llm-jp-eval (its NaN check). That covers constant
    # inputs and, for spearman, a single sample; scipy's pearsonr refuses a single sample outright
    # (llm-jp-eval would crash there), so we give it the same 0.
    if len(pairs) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input; the NaN it returns is handled
        value = float(kind(gold_values, pred_values)[0])
    return 0.0 if math.isnan(value) else value


def pearson(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Pearson r between gold floats and parse_float(predictions); 0.0 where undefined."""
    return _correlation(pearsonr, preds, golds)


def spearman(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Spearman rho between gold floats and parse_float(predictions); 0.0 where undefined."""
    return _correlation(spearmanr, preds, golds)


@cache
def _bleu_scorer(lang: str) -> BLEU:
    # trg_lang="ja" makes sacrebleu pick its ja-mecab tokenizer (MeCab + ipadic); "en" keeps 13a.
    return BLEU(trg_lang=lang, effective_order=True)


def _bleu(preds: Sequence[str], golds: Sequence[str], lang: str) -> float:
    scorer = _bleu_scorer(lang)
    scores = []
    for p, g in _prepared(preds, golds):
        p, g = p.strip(), g.strip()
        if not p or not g:
            # sacrebleu cannot take an empty string here (v1.3.0 crashed with an IndexError). Later
            # llm-jp-eval versions, as we recall them (not checked against source), score such a pair
            # 1.0 if both are empty, else 0.0, on the 0-100 scale all the same.
            scores.append(float(p == g))
            continue
        # llm-jp-eval passes the bare strings, not [p] and [[g]]. sacrebleu then reads each string as a
        # corpus of one-character segments, pairs them by position (up to the shorter length) and ends up
        # with a position-aligned character precision times a brevity penalty, not sentence BLEU.
        # Reproduced on purpose so our numbers match theirs.
        scores.append(scorer.corpus_score(p, [g]).score)
    return mean(scores)


def bleu_en(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Mean per-sample sacrebleu score, English tokenizer (13a), 0-100, as llm-jp-eval computes it."""
    return _bleu(preds, golds, "en")


def bleu_ja(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Mean per-sample sacrebleu score, Japanese tokenizer (ja-mecab), 0-100, as llm-jp-eval computes it."""
    return _bleu(preds, golds, "ja")


def out_of_label_rate(preds: Sequence[str], labels: set[str]) -> float:
    """Share of prepared predictions outside the label set (NFKC applies to the labels too).

    With an empty label set (free-form tasks) an empty prediction is what counts as out of label,
    as the ``{dataset}_ool`` score of later llm-jp-eval versions does (recalled, not checked against
    source; v1.3.0 has no such score).
    """
    if not preds:
        raise ValueError("no samples to score")
    allowed = {normalize(label) for label in labels}
    prepared = [prepare_prediction(p) for p in preds]
    if allowed:
        return mean(float(p not in allowed) for p in prepared)
    return mean(float(p == "") for p in prepared)


# --------------------------------------------------------------------------------------------- registry

METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match,
    "exact_match_figure": exact_match_figure,
    "char_f1": char_f1,
    "set_f1": set_f1,
    "pearson": pearson,
    "spearman": spearman,
    "bleu_en": bleu_en,
    "bleu_ja": bleu_ja,
    "mawps_exact_match": mawps_exact_match,  # a score key in llm-jp-eval, kept so either name works
}


def score(metric: str, preds: Sequence[str], golds: Sequence[str]) -> float:
    """Compute the named llm-jp-eval metric."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(sorted(METRICS))}") from None
    return fn(preds, golds)
