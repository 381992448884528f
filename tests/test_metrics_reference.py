"""Each llm-jp-eval metric, after each version's answer extraction, against an independent reference written
here from the version's definition, on 400 generated (prediction, gold) pairs per metric: whitespace,
full-width characters, multi-line answers, empty answers, Japanese, newline-separated lists, non-numeric
answers for the correlations. The references call the libraries llm-jp-eval calls (fuzzywuzzy, scipy,
sacrebleu) the way it calls them, or spell the definition out (exact match, set F1, ROUGE-2)."""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter

import pytest
from fuzzywuzzy import fuzz
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab
from scipy.stats import pearsonr, spearmanr

from selftrain.config import EvalConfig, load_eval_protocol
from selftrain.evaluate.datasets import Dataset
from selftrain.evaluate.metrics import score
from selftrain.evaluate.protocols import Protocol

N = 400
WORDS = ["東京", "大阪", "猫", "犬", "今日は", "天気", "良い", "です", "Tokyo", "cat", "the", "A", "b", "42", "3.5"]
FULL = ["１２", "ＡＢＣ", "ｶﾀｶﾅ", "　", "！"]
SPACES = ["", " ", "  ", "\t", "\u3000"]


def _text(rng: random.Random, numeric: bool = False) -> str:
    if numeric and rng.random() < 0.7:
        return rng.choice(["", " ", "\u3000"]) + rng.choice(["1", "2.5", "４", "3点", "-1", "5.0", "abc", ""])
    parts = [rng.choice(WORDS + FULL) for _ in range(rng.randint(0, 5))]
    text = rng.choice(SPACES) + rng.choice([" ", "", "\n"]).join(parts) + rng.choice(SPACES)
    r = rng.random()
    if r < 0.2:
        text += "\n\n" + rng.choice(WORDS)  # chatter after a blank line
    elif r < 0.3:
        text = "\n\n" + text  # nothing before the blank line
    return text


def pairs(seed: int, numeric: bool = False) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(N):
        gold = _text(rng, numeric).split("\n\n")[0] if not numeric else rng.choice(["1", "2.5", "4", "0.0", "5"])
        pred = gold if rng.random() < 0.25 else _text(rng, numeric)
        out.append((pred, gold))
    return out


def protocol(name: str) -> Protocol:
    spec = load_eval_protocol(name)
    return Protocol(name, spec, EvalConfig(protocol=name, llm_jp_eval_dir="unused"))


DS = Dataset("d", None, "x", 8, ["exact_match"], [], [{"input": "i", "output": "o"}])  # type: ignore[arg-type]


def extracted(name: str, data: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    p = protocol(name)
    return [p.extract(DS, a) for a, _ in data], [p.gold(g) for _, g in data]


# ------------------------------------------------------------------------------------------- references


def ref_extract(raw: str, strip: bool) -> str:
    text = unicodedata.normalize("NFKC", raw.split("\n\n")[0])
    return text.strip() if strip else text


def ref_parse_float(text: str) -> float:
    try:
        return float(re.sub(r"[^0-9.]", "", text))
    except ValueError:
        return -2.0


def ref_set_f1(pred: str, gold: str) -> float:
    ps = {x.strip() for x in pred.split("\n")}
    gs = [x.strip() for x in gold.split("\n")]
    hit = sum(1 for x in ps if x in gs)
    prec, rec = hit / len(ps), hit / len(gs)
    return 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)


def ref_rouge2(pred: str, gold: str, tok: TokenizerJaMecab) -> float:
    def grams(s: str) -> Counter:
        t = tok(s).split()
        return Counter(zip(t, t[1:], strict=False))

    a, b = grams(pred), grams(gold)
    hit = sum((a & b).values())
    if hit == 0:
        return 0.0
    prec, rec = hit / sum(a.values()), hit / sum(b.values())
    return 2 * prec * rec / (prec + rec)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


VERSIONS = [("llm-jp-eval-1.3", False), ("llm-jp-eval-1.4", True)]


@pytest.mark.parametrize(("name", "strip"), VERSIONS)
def test_extraction_matches_the_version(name: str, strip: bool) -> None:
    data = pairs(1)
    preds, golds = extracted(name, data)
    assert preds == [ref_extract(a, strip) for a, _ in data]
    assert golds == [unicodedata.normalize("NFKC", g) for _, g in data]
    assert any(p != p.strip() for p in preds) != strip  # the difference between the versions is exercised


@pytest.mark.parametrize(("name", "strip"), VERSIONS)
def test_exact_match_char_f1_set_f1(name: str, strip: bool) -> None:
    for seed, metric in ((2, "exact_match"), (3, "char_f1"), (4, "set_f1")):
        data = pairs(seed)
        preds, golds = extracted(name, data)
        got = score(metric, preds, golds, prepared=True)
        if metric == "exact_match":
            want = mean([float(p == g) for p, g in zip(preds, golds, strict=True)])
        elif metric == "char_f1":
            want = mean([fuzz.token_sort_ratio(p, g) / 100 for p, g in zip(preds, golds, strict=True)])
        else:
            want = mean([ref_set_f1(p, g) for p, g in zip(preds, golds, strict=True)])
        assert got == pytest.approx(want, abs=1e-12), (name, metric)
        assert 0 < got < 1  # neither degenerate


@pytest.mark.parametrize(("name", "strip"), VERSIONS)
def test_correlations(name: str, strip: bool) -> None:
    for chunk in range(8):  # 8 datasets of 50 pairs: correlations are per dataset
        data = pairs(10 + chunk, numeric=True)[:50]
        preds, golds = extracted(name, data)
        g = [float(x) for x in golds]
        p = [ref_parse_float(x) for x in preds]
        for metric, fn in (("pearson", pearsonr), ("spearman", spearmanr)):
            want = fn(g, p)[0]
            want = 0.0 if math.isnan(want) else want
            assert score(metric, preds, golds, prepared=True) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(("name", "strip"), VERSIONS)
def test_bleu_as_llm_jp_eval_calls_sacrebleu(name: str, strip: bool) -> None:
    for metric, lang in (("bleu_ja", "ja"), ("bleu_en", "en")):
        data = [(a, g) for a, g in pairs(20) + pairs(21) if ref_extract(a, strip) and g][:N]  # v1.3 crashes on ""
        preds, golds = extracted(name, data)
        scorer = BLEU(trg_lang=lang, effective_order=True)
        want = mean([scorer.corpus_score(p, [g]).score for p, g in zip(preds, golds, strict=True)])
        assert len(data) >= 300 and score(metric, preds, golds, prepared=True) == pytest.approx(want, abs=1e-9)


def test_rouge2_on_japanese_sentences() -> None:
    rng = random.Random(30)
    tok = TokenizerJaMecab()
    sents = [
        "今日は良い天気です。",
        "東京の猫は大阪の犬が好きだ。",
        "明日は雨が降るでしょう。",
        "本を読むのが好きです。",
    ]
    data = []
    for _ in range(N):
        gold = "".join(rng.sample(sents, 2))
        pred = gold if rng.random() < 0.2 else "".join(rng.sample(sents, rng.randint(0, 3)))
        data.append((pred, gold))
    want = mean([ref_rouge2(p, g, tok) for p, g in data])
    assert score("rouge2", [p for p, _ in data], [g for _, g in data], prepared=True) == pytest.approx(want)
    assert 0 < want < 1
