"""selftrain.evaluate.metrics against hand-computed values and against fuzzywuzzy itself (the reference for char_f1)."""

from __future__ import annotations

import math
import random

import pytest
from fuzzywuzzy import fuzz

from selftrain.evaluate import metrics
from selftrain.evaluate.metrics import (
    METRICS,
    UNPARSABLE_FLOAT,
    bleu_en,
    bleu_ja,
    char_f1,
    exact_match,
    exact_match_figure,
    mawps_exact_match,
    normalize,
    out_of_label_rate,
    parse_float,
    pearson,
    prepare_gold,
    prepare_prediction,
    score,
    set_f1,
    spearman,
    token_sort_ratio,
)

# ------------------------------------------------------------------------------------------ preprocessing


def test_normalize_is_nfkc():
    assert normalize("１２３") == "123"  # full-width digits
    assert normalize("ＡＢＣ") == "ABC"
    assert normalize("ｶﾀｶﾅ") == "カタカナ"  # half-width katakana
    assert normalize("①") == "1"
    assert normalize("東京") == "東京"


def test_prepare_prediction_keeps_first_block_normalised_and_stripped():
    assert prepare_prediction("neutral\n\nThe premise says ...") == "neutral"
    assert prepare_prediction("  entailment \n") == "entailment"
    assert prepare_prediction("ａ\nｂ\n\nｃ") == "a\nb"  # single newlines stay: set_f1 needs them
    assert prepare_prediction("") == ""
    assert prepare_prediction("\n\nanswer") == ""  # nothing before the blank line
    assert prepare_gold(" １２ ") == " 12 "  # golds are only normalised


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3.0), ("3.5点", 3.5), ("類似度は4です", 4.0), ("-1", 1.0), (" 2.0 ", 2.0), (".5", 0.5)],
)
def test_parse_float_reads_digits_and_dots(text, value):
    assert parse_float(text) == value


@pytest.mark.parametrize("text", ["", "abc", ".", "1.2.3", "４"])  # full-width digits need NFKC first
def test_parse_float_falls_back(text):
    assert parse_float(text) == UNPARSABLE_FLOAT == -2.0


# ------------------------------------------------------------------------------------------- exact match


def test_exact_match():
    preds = ["entailment", "neutral\n\nbecause ...", "１２", " 東京 ", "", "contradiction"]
    golds = ["entailment", "neutral", "12", "東京", "x", "neutral"]
    assert exact_match(preds, golds) == pytest.approx(4 / 6)
    assert exact_match(["Entailment"], ["entailment"]) == 0.0  # case matters


def test_mawps_is_plain_exact_match_and_figure_is_numeric():
    preds, golds = ["5.0", "12", "five", "７"], ["5", "12", "5", "7"]
    assert mawps_exact_match(preds, golds) == pytest.approx(2 / 4)  # "12" and NFKC "７"
    assert exact_match_figure(preds, golds) == pytest.approx(3 / 4)  # "5.0" == "5" numerically


# ---------------------------------------------------------------------------------------------- char_f1


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("東京タワー", "東京タワー", 1.0),
        ("abcd", "abce", 0.75),  # Indel: 2 edits over 8 characters
        ("東京都", "東京", 0.8),
        ("b a", "a b", 1.0),  # tokens are sorted
        ("ABC!", "abc", 1.0),  # lowercased, punctuation dropped
        ("ＡＢＣ", "abc", 1.0),  # NFKC first (fuzzywuzzy alone says 0)
        ("", "東京", 0.0),
        ("!!", "?", 1.0),  # both clean to nothing: fuzzywuzzy calls them equal
        ("café", "caf", 1.0),  # code points 128-255 are deleted
        ("abcdefgh", "abcdexyz", 0.62),  # 62.5 rounds half to even
        ("abcdefgh", "abcdefgx", 0.88),  # 87.5 rounds half to even
    ],
)
def test_char_f1_hand_computed(pred, gold, expected):
    assert char_f1([pred], [gold]) == pytest.approx(expected)


def test_char_f1_is_a_mean():
    assert char_f1(["abcd", "東京", "x"], ["abce", "東京", "y"]) == pytest.approx((0.75 + 1.0 + 0.0) / 3)


ASCII_LETTERS = list("abcxyzABCXYZ_")
ASCII_WORDS = ["the", "Cat", "RUN", "a", "b2", "x_y", "hello", "Tokyo", "ENTAILMENT", "neutral"]
LATIN1 = [chr(c) for c in range(0xA0, 0x100)]
KANA_KANJI = list("あいうえおかきくけこアイウエオカキクケコ東京都大阪日本語学校先生猫犬")
PUNCT = list("!?.,;:-()[]{}'\"/\\@#$%&*+=~。、！？「」・…")
DIGITS = list("0123456789０１２３")
SPACES = [" ", " ", " ", "\t", "\u3000"]


def _random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 7)):
        pool = rng.choice([ASCII_WORDS, LATIN1, KANA_KANJI, PUNCT, DIGITS])
        pieces.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 4))))
        pieces.append(rng.choice(SPACES))
    return "".join(pieces)


def _random_pair(rng: random.Random) -> tuple[str, str]:
    a = _random_text(rng)
    roll = rng.random()
    if roll < 0.35:  # a close variant, so mid-range ratios get exercised too
        chars = list(a)
        for _ in range(rng.randint(0, 3)):
            if chars:
                chars[rng.randrange(len(chars))] = rng.choice(KANA_KANJI + ASCII_LETTERS + PUNCT + LATIN1)
        return a, "".join(chars)
    if roll < 0.5:  # the same tokens in another order
        tokens = a.split()
        rng.shuffle(tokens)
        return a, " ".join(tokens)
    return a, _random_text(rng)


def test_token_sort_ratio_equals_fuzzywuzzy_on_random_pairs():
    rng = random.Random(20240607)
    pairs = [_random_pair(rng) for _ in range(1000)]
    mismatches = [(a, b) for a, b in pairs if token_sort_ratio(a, b) != fuzz.token_sort_ratio(a, b)]
    assert not mismatches, mismatches[:5]
    # the sample is not degenerate: it covers 0, 100 and plenty in between
    values = {fuzz.token_sort_ratio(a, b) for a, b in pairs}
    assert {0, 100} <= values and len(values) > 30


def test_char_f1_equals_fuzzywuzzy_after_llm_jp_eval_preprocessing():
    rng = random.Random(7)
    pairs = [_random_pair(rng) for _ in range(1000)]
    preds, golds = [a for a, _ in pairs], [b for _, b in pairs]
    expected = sum(
        fuzz.token_sort_ratio(prepare_prediction(p), prepare_gold(g)) / 100 for p, g in zip(preds, golds, strict=True)
    ) / len(pairs)
    assert char_f1(preds, golds) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------- set_f1


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("a\nb", "b\na", 1.0),
        ("a\na\nb", "a\nb", 1.0),  # predicted duplicates collapse
        ("a", "a\nb", 2 / 3),  # p=1, r=1/2
        ("a\nb\nc\nd", "a\nb", 2 / 3),  # p=1/2, r=1
        ("a", "a\na", 2 / 3),  # gold duplicates are kept, so recall stays at 1/2
        (" a \nb", "a\nb", 1.0),  # each line is stripped
        ("a\nb\n\nextra lines", "a\nb", 1.0),  # cut at the blank line
        ("", "a", 0.0),
        ("x\ny", "a\nb", 0.0),
        ("売上高 positive\n利益 negative", "利益 negative\n売上高 positive", 1.0),
        ("売上高 positive", "売上高 negative\n利益 negative", 0.0),
        ("１\n２", "1\n2\n3", 0.8),  # NFKC; p=1, r=2/3
    ],
)
def test_set_f1_hand_computed(pred, gold, expected):
    assert set_f1([pred], [gold]) == pytest.approx(expected)


def test_set_f1_is_a_mean():
    assert set_f1(["a\nb", "x"], ["a\nb", "a"]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------- pearson / spearman


def test_correlations_perfect_and_reversed():
    golds = ["1.0", "2.0", "3.0", "4.0"]
    assert pearson(["1", "2", "3", "4"], golds) == pytest.approx(1.0)
    assert spearman(["1", "2", "3", "4"], golds) == pytest.approx(1.0)
    assert pearson(["4", "3", "2", "1"], golds) == pytest.approx(-1.0)
    assert spearman(["４", "３", "２", "１"], golds) == pytest.approx(-1.0)  # full-width, read after NFKC


def test_correlations_with_an_unparsable_prediction():
    # "abc" reads -2.0, so the predictions are [1, 2, -2, 4] against [1, 2, 3, 4]
    preds, golds = ["1", "2点", "abc", "4\n\nreason"], ["1", "2", "3", "4"]
    assert pearson(preds, golds) == pytest.approx(2.5 / math.sqrt(5 * 18.75))
    assert spearman(preds, golds) == pytest.approx(1 - 6 * 6 / (4 * 15))  # rank differences -1,-1,2,0


def test_undefined_correlations_are_zero():
    golds = ["1", "2", "3"]
    assert pearson(["2", "2", "2"], golds) == 0.0  # constant predictions
    assert spearman(["2", "2", "2"], golds) == 0.0
    assert pearson(["x", "", "?"], golds) == 0.0  # all unparsable: constant -2.0
    assert pearson(["1"], ["1"]) == 0.0  # one sample
    assert spearman(["1"], ["1"]) == 0.0


def test_correlation_rejects_a_non_numeric_gold():
    with pytest.raises(ValueError, match="not a number"):
        pearson(["1", "2"], ["1", "two"])


# ------------------------------------------------------------------------------------------------- bleu


JA = "今日は良い天気です。"


def test_bleu_ja_identical_disjoint_and_partial():
    assert bleu_ja([JA], [JA]) == pytest.approx(100.0)
    assert bleu_ja(["猫が好きだ"], [JA]) == 0.0  # no character in common
    # llm-jp-eval's call pairs characters by position: 9 of 10 agree, nothing longer is counted
    assert bleu_ja(["今日は悪い天気です。"], [JA]) == pytest.approx(90.0)
    assert bleu_ja([JA, "猫が好きだ"], [JA, JA]) == pytest.approx(50.0)


def test_bleu_en_identical_and_disjoint():
    assert bleu_en(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu_en(["xyz"], ["abc"]) == 0.0


def test_bleu_empty_strings():
    assert bleu_ja([""], [JA]) == 0.0
    assert bleu_ja(["\n\n" + JA], [JA]) == 0.0  # the answer is cut away: empty
    assert bleu_en([" "], [""]) == 1.0  # both empty count as equal, 1.0 on the 0-100 scale


# ------------------------------------------------------------------------------------------ out of label


def test_out_of_label_rate():
    labels = {"entailment", "contradiction", "neutral"}
    preds = ["entailment", "Entailment", "neutral\n\nbecause ...", "ｎｅｕｔｒａｌ", "maybe"]
    assert out_of_label_rate(preds, labels) == pytest.approx(2 / 5)
    assert out_of_label_rate(["０", "1", "2"], {"0", "1"}) == pytest.approx(1 / 3)


def test_out_of_label_rate_without_labels_counts_empty_answers():
    assert out_of_label_rate(["", "東京", "  \n\nlater text"], set()) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------ registry, errors


def test_registry_names_and_score():
    assert {"exact_match", "char_f1", "set_f1", "pearson", "spearman", "bleu_ja", "bleu_en"} <= set(METRICS)
    assert METRICS["mawps_exact_match"] is metrics.mawps_exact_match
    assert score("char_f1", ["東京都"], ["東京"]) == pytest.approx(0.8)
    assert score("exact_match", ["１"], ["1"]) == 1.0


def test_unknown_metric_names_it_and_lists_known_ones():
    with pytest.raises(ValueError, match="unknown metric 'rouge9'") as err:
        score("rouge9", ["a"], ["a"])
    assert "char_f1" in str(err.value) and "bleu_ja" in str(err.value)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_rejects_bad_input(name):
    with pytest.raises(ValueError, match="no samples"):
        score(name, [], [])
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        score(name, ["1", "2"], ["1"])
