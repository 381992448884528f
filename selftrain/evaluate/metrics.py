"""Benchmark metrics computed the way llm-jp-eval computes them, so our scores compare with published ones.

Reference: llm-jp-eval v1.3.0, ``src/llm_jp_eval/utils.py`` (``normalize``, ``parse_float`` and the metric
branches of ``get_evaluation_result``), read in the copy vendored by swallow-llm/swallow-evaluation
(commit 78de0db). The code here is written from those definitions, not copied.

What llm-jp-eval does to a sample before any metric:

* prediction: keep the text before the first blank line (``split("\\n\\n")[0]``), then NFKC-normalise;
  we also strip surrounding whitespace, as later versions do (v2's answer extraction strips; v1.3.0 did
  not). Of the metrics here only exact match and the out-of-label rate can tell the difference;
* gold: NFKC-normalise, nothing else.

Every metric below applies that itself by default, so it takes raw generations or answers extracted that
way alike (both steps are idempotent). A protocol that extracts answers its own way (stage 06's
llm-jp-eval protocols: v1.3 does not strip, v2 uses patterns) passes ``prepared=True``: the metric then
scores the strings as given. Scores are means over samples (correlations for pearson / spearman) on
llm-jp-eval's own scales: 0-1, except the BLEU pair, which is 0-100 as sacrebleu reports it.

Metrics that need a model (comet_wmt22, bert_score_*) run through their real packages (bert-score: the
``metrics`` extra; unbabel-comet: only in its own environment, locks/comet-linux-x86_64.txt) and read the
model from the local Hugging Face cache; when the package or the model is missing they raise
MetricUnavailable, which says what to install or download, and stage 06 then reports the dataset "not
comparable" instead of scoring it with something else.
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


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (package or model missing); the message says what to install or download."""


def _prepared(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> list[tuple[str, str]]:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold answers")
    if not preds:
        raise ValueError("no samples to score")
    if prepared:
        return list(zip(preds, golds, strict=True))
    return [(prepare_prediction(p), prepare_gold(g)) for p, g in zip(preds, golds, strict=True)]


# ---------------------------------------------------------------------------------------------- metrics


def exact_match(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Share of predictions equal to their gold (llm-jp-eval: sklearn accuracy_score)."""
    return mean(float(p == g) for p, g in _prepared(preds, golds, prepared))


def mawps_exact_match(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """MAWPS score: plain exact match.

    llm-jp-eval has no metric of this name: ``mawps_exact_match`` is the score key of dataset ``mawps``
    under metric ``exact_match``, so "5.0" does not match a gold "5" (see exact_match_figure for that).
    """
    return exact_match(preds, golds, prepared)


def exact_match_figure(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Share of predictions numerically equal to their gold (float(pred) == float(gold)).

    A side that float() cannot read scores 0. The Nejumi leaderboard scores mawps / mgsm this way;
    llm-jp-eval v1.3.0 has no such metric (later versions have one by this name).
    """
    scores = []
    for p, g in _prepared(preds, golds, prepared):
        try:
            scores.append(float(float(p) == float(g)))
        except ValueError:
            scores.append(0.0)
    return mean(scores)


def char_f1(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Mean fuzzywuzzy token_sort_ratio / 100: llm-jp-eval's "char_f1" (not a true character F1)."""
    return mean(token_sort_ratio(p, g) / 100 for p, g in _prepared(preds, golds, prepared))


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


def set_f1(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Mean F1 between the newline-separated items of each prediction and its gold."""
    return mean(_set_f1_one(p, g) for p, g in _prepared(preds, golds, prepared))


def _correlation(kind: Callable, preds: Sequence[str], golds: Sequence[str], prepared: bool) -> float:
    pairs = _prepared(preds, golds, prepared)
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


def pearson(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Pearson r between gold floats and parse_float(predictions); 0.0 where undefined."""
    return _correlation(pearsonr, preds, golds, prepared)


def spearman(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Spearman rho between gold floats and parse_float(predictions); 0.0 where undefined."""
    return _correlation(spearmanr, preds, golds, prepared)


@cache
def _bleu_scorer(lang: str) -> BLEU:
    # trg_lang="ja" makes sacrebleu pick its ja-mecab tokenizer (MeCab + ipadic); "en" keeps 13a.
    return BLEU(trg_lang=lang, effective_order=True)


def _bleu(preds: Sequence[str], golds: Sequence[str], lang: str, prepared: bool) -> float:
    scorer = _bleu_scorer(lang)
    scores = []
    for p, g in _prepared(preds, golds, prepared):
        if not prepared:
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


def bleu_en(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Mean per-sample sacrebleu score, English tokenizer (13a), 0-100, as llm-jp-eval computes it."""
    return _bleu(preds, golds, "en", prepared)


def bleu_ja(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Mean per-sample sacrebleu score, Japanese tokenizer (ja-mecab), 0-100, as llm-jp-eval computes it."""
    return _bleu(preds, golds, "ja", prepared)


@cache
def _ja_tokenizer() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

    return TokenizerJaMecab()


def _bigrams(tokens: list[str]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for pair in zip(tokens, tokens[1:], strict=False):
        out[pair] = out.get(pair, 0) + 1
    return out


def rouge2(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """Mean ROUGE-2 F-measure over samples, 0-1, on MeCab tokens (sacrebleu's ja-mecab tokenizer).

    As llm-jp-eval's Japanese ROUGE is described (Google's rouge-score with sacrebleu's Japanese tokenizer):
    clipped bigram overlap, precision over the prediction's bigrams, recall over the gold's. Its
    aggregation and scale (0-1 or 0-100) could not be read in source; see README.
    """
    tok = _ja_tokenizer()
    scores = []
    for p, g in _prepared(preds, golds, prepared):
        bp, bg = _bigrams(tok(p).split()), _bigrams(tok(g).split())
        overlap = sum(min(n, bg.get(k, 0)) for k, n in bp.items())
        if not overlap:
            scores.append(0.0)
            continue
        precision, recall = overlap / sum(bp.values()), overlap / sum(bg.values())
        scores.append(2 * precision * recall / (precision + recall))
    return mean(scores)


def _cached_model(repo: str, metric: str) -> str:
    """The local Hugging Face cache folder of `repo`; MetricUnavailable saying what to download otherwise."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError and friends: the model is not in the cache
        raise MetricUnavailable(
            f"{metric} needs the model {repo} in the local Hugging Face cache "
            f"(`huggingface-cli download {repo}` on a machine with hub access): {type(e).__name__}"
        ) from None


def comet_gpus(device: str) -> int:
    """COMET's `gpus` for a device setting: cpu -> 0 (llm-jp-eval v1.3 passes gpus=0); auto -> 1 when CUDA is there."""
    if device == "cpu":
        return 0
    import torch

    return 1 if torch.cuda.is_available() else 0


def comet_wmt22(
    preds: Sequence[str],
    golds: Sequence[str],
    prepared: bool = False,
    inputs: Sequence[str] | None = None,
    device: str = "auto",
) -> float:
    """COMET (Unbabel/wmt22-comet-da) system score, as llm-jp-eval v1.3 calls it: src = the sample's input,
    mt = the prediction, ref = the gold; batch size 8; the mean of the segment scores. device: cpu (v1.3's
    gpus=0) or auto (a GPU when there is one)."""
    pairs = _prepared(preds, golds, prepared)
    if inputs is None or len(inputs) != len(preds):
        raise ValueError("comet_wmt22 needs the source inputs, one per prediction")
    try:
        from comet import load_from_checkpoint
    except ImportError:
        raise MetricUnavailable(
            "comet_wmt22 needs the unbabel-comet package, which cannot share this environment (numpy<2, "
            "transformers<5): its own environment from locks/comet-linux-x86_64.txt (README, Installing)"
        ) from None
    folder = _cached_model("Unbabel/wmt22-comet-da", "comet_wmt22")
    model = load_from_checkpoint(f"{folder}/checkpoints/model.ckpt")
    data = [{"src": s, "mt": p, "ref": g} for s, (p, g) in zip(inputs, pairs, strict=True)]
    out = model.predict(data, batch_size=8, gpus=comet_gpus(device), progress_bar=False)
    return float(out.system_score)


_BERT_SCORE_MODELS = {"en": "roberta-large", "ja": "bert-base-multilingual-cased"}  # bert-score's lang defaults


def _bert_score(preds: Sequence[str], golds: Sequence[str], lang: str, prepared: bool) -> float:
    pairs = _prepared(preds, golds, prepared)
    try:
        import bert_score
    except ImportError:
        raise MetricUnavailable(
            f"bert_score_{lang}_f1 needs the bert-score package (`pip install -e .[metrics]`)"
        ) from None
    _cached_model(_BERT_SCORE_MODELS[lang], f"bert_score_{lang}_f1")
    _, _, f1 = bert_score.score([p for p, _ in pairs], [g for _, g in pairs], lang=lang)
    return float(f1.mean())


def bert_score_en_f1(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """BERTScore F1 with bert-score's English default (roberta-large, no idf, no rescaling), mean over samples."""
    return _bert_score(preds, golds, "en", prepared)


def bert_score_ja_f1(preds: Sequence[str], golds: Sequence[str], prepared: bool = False) -> float:
    """BERTScore F1 with bert-score's Japanese default (bert-base-multilingual-cased), mean over samples."""
    return _bert_score(preds, golds, "ja", prepared)


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

METRICS: dict[str, Callable[[Sequence[str], Sequence[str], bool], float]] = {  # (preds, golds, prepared)
    "exact_match": exact_match,
    "exact_match_figure": exact_match_figure,
    "char_f1": char_f1,
    "set_f1": set_f1,
    "pearson": pearson,
    "spearman": spearman,
    "bleu_en": bleu_en,
    "bleu_ja": bleu_ja,
    "mawps_exact_match": mawps_exact_match,  # a score key in llm-jp-eval, kept so either name works
    "rouge2": rouge2,
    "comet_wmt22": comet_wmt22,
    "bert_score_en_f1": bert_score_en_f1,
    "bert_score_ja_f1": bert_score_ja_f1,
}


def score(
    metric: str,
    preds: Sequence[str],
    golds: Sequence[str],
    prepared: bool = False,
    inputs: Sequence[str] | None = None,
    comet_device: str = "auto",
) -> float:
    """Compute the named llm-jp-eval metric (prepared=True: the strings are already extracted answers and
    normalised golds; comet_device: where COMET runs, cpu or auto). MetricUnavailable when it cannot run here."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(sorted(METRICS))}") from None
    if metric == "comet_wmt22":  # the one metric that reads the samples' inputs too (the translation source)
        return comet_wmt22(preds, golds, prepared, inputs=inputs, device=comet_device)
    return fn(preds, golds, prepared)
