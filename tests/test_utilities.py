"""The embedder and judge selection utilities against brute-force references: the embedded WordLlama and a local
sentence-transformers model against their definitions, the judge utility (pointwise and pairwise) against a real
local OpenAI-compatible server whose scores the test controls, its request count and its cache, and both wired
into stage 02 on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from openai_server import FakeJudgeServer

from selftrain import generate, select
from selftrain.config import EmbedderConfig, JudgeConfig, JudgeUtilityConfig, resolve_run_config
from selftrain.graders.clients import make_judge
from selftrain.io import read_jsonl, write_npy
from selftrain.models import ModelNotAvailable
from selftrain.runs import create_run
from selftrain.select import centrality_from_sim
from selftrain.select.judge_utility import judge_sim, request_count
from selftrain.select.similarity import cosine_sim, embedder_embeddings, load_embedder

POOLS = [
    ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock prices fell sharply today.", ""],
    ["Boil water, add pasta, cook ten minutes.", "Cook the pasta in boiling water.", "", "Paris is in France."],
]


def test_wordllama_embedder_is_the_mean_of_its_token_vectors(tmp_path: Path) -> None:
    import wordllama
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    root = Path(wordllama.__file__).parent
    table = load_file(str(root / "weights" / "l2_supercat_256.safetensors"))["embedding.weight"].astype(np.float32)
    tok = Tokenizer.from_file(str(root / "tokenizers" / "l2_supercat_tokenizer_config.json"))
    emb, key = embedder_embeddings(POOLS, EmbedderConfig(), str(tmp_path))
    assert emb.shape == (2, 4, 256) and key.startswith("embedder-")
    for p, row in enumerate(POOLS):
        for k, text in enumerate(row):
            if not text.strip():
                assert not emb[p, k].any()  # a blank answer is a zero vector, never NaN
                continue
            want = table[tok.encode(text, add_special_tokens=False).ids].mean(0)  # WordLlama: no BOS
            assert np.allclose(emb[p, k], want / np.linalg.norm(want), atol=2e-3)
    sim = cosine_sim(emb)
    assert sim[0, 0, 1] > 0.8 > sim[0, 0, 2]  # paraphrases close, an unrelated sentence far
    cache = tmp_path / "embeddings" / f"{key}.npy"
    assert cache.is_file()
    write_npy(cache, np.zeros_like(emb).reshape(8, -1), record=True)  # a second call reads the cache...
    assert not embedder_embeddings(POOLS, EmbedderConfig(), str(tmp_path))[0].any()
    cache.write_bytes(cache.read_bytes()[:100])  # ...and recomputes an entry that is not the one written
    assert np.allclose(embedder_embeddings(POOLS, EmbedderConfig(), str(tmp_path))[0], emb)
    np.save(cache, np.zeros_like(emb).reshape(8, -1))  # a valid array, but not the one written: recomputed too
    assert np.allclose(embedder_embeddings(POOLS, EmbedderConfig(), str(tmp_path))[0], emb)


def _sentence_transformer(folder: Path) -> Path:
    """A tiny random BERT with its own word-level vocabulary, saved as a sentence-transformers model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for row in POOLS for t in row for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "bert").mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder / "bert")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(folder / "bert")
    word = Transformer(str(folder / "bert"), max_seq_length=64)
    st = SentenceTransformer(modules=[word, Pooling(32, pooling_mode="mean")], device="cpu")
    st.save(str(folder / "st"))
    return folder / "st"


def test_local_sentence_transformers_embedder_matches_mean_pooled_bert(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    st_dir = _sentence_transformer(tmp_path)
    emb, _ = embedder_embeddings(POOLS, EmbedderConfig(path=str(st_dir)), str(tmp_path / "cache"))
    model, tok = AutoModel.from_pretrained(tmp_path / "bert").eval(), AutoTokenizer.from_pretrained(tmp_path / "bert")
    for p, row in enumerate(POOLS):
        for k, text in enumerate(row):
            if not text.strip():
                assert not emb[p, k].any()
                continue
            enc = tok(text, return_tensors="pt")
            with torch.no_grad():
                h = model(**enc).last_hidden_state[0]
            want = h.mean(0).numpy()
            assert np.allclose(emb[p, k], want / np.linalg.norm(want), atol=1e-4)
    # One line naming the key for a path that is no folder; nothing is downloaded.
    with pytest.raises(ModelNotAvailable, match=r"selection.embedder.path: .*nosuch is not a folder"):
        load_embedder(EmbedderConfig.model_construct(path=str(tmp_path / "nosuch"), batch_size=8))
    # ...and the params check refuses the same before any stage runs.
    from selftrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"command line \(selection.embedder.path=.*nosuch\): path .* not a folder"):
        resolve_run_config("tiny", "central", overrides=[f"selection.embedder.path={tmp_path / 'nosuch'}"])
    with pytest.raises(ConfigError, match="the embedded embedder is embedded:wordllama"):
        resolve_run_config("tiny", "central", overrides=["selection.embedder.path=embedded:minilm"])


# ------------------------------------------------------------------------------------------- judge utility

QUALITY = {"alpha": 5, "bravo": 2, "charlie": 4, "delta": 1, "echo": 3}


def _hidden(text: str) -> int:
    return next(v for k, v in QUALITY.items() if k in text)


def _reply(request: dict) -> str:
    """Pointwise: every criterion = the answer's hidden quality; pairwise: prefer the better hidden quality
    (3 on a tie), except that a position-biased judge ("biased" in the question) always says A."""
    content = request["messages"][-1]["content"]
    if "Preference: [[n]]" in content:
        a = _hidden(content.split("[Answer A]")[1].split("[End of answer A]")[0])
        b = _hidden(content.split("[Answer B]")[1].split("[End of answer B]")[0])
        pref = 1 if "biased" in content.split("[Answer A]")[0] else (3 if a == b else (1 if a > b else 5))
        return f"They differ.\nPreference: [[{pref}]]"
    q = _hidden(content.split("[Answer]")[1].split("[End of answer]")[0])
    return "Fine.\n\n" + _scores(q)


def _scores(q: int) -> str:
    return "\n".join(f"{lab}: [[{q}]]" for lab in ("Accuracy", "Fluency", "Detail", "Relevance", "Overall"))


def _judge_cfg(srv: FakeJudgeServer) -> JudgeConfig:
    endpoint = {"model": "j", "base_url": srv.base_url, "api_key_env": "SELFTRAIN_TEST_UTILITY_KEY", "concurrency": 4}
    return JudgeConfig(backend="endpoint", endpoint=endpoint, reask=0)


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_judge_utility_ranks_by_the_judge_counts_requests_and_caches(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SELFTRAIN_TEST_UTILITY_KEY", "x")
    pools = [["alpha one", "bravo two", "charlie three", "original delta"],
             ["echo a", "", "bravo b", "original alpha"]]  # fmt: skip
    valid = np.array([[True, True, True, True], [True, False, True, True]])
    with FakeJudgeServer(reply_fn=_reply) as srv:
        cfg = _judge_cfg(srv)
        ucfg = JudgeUtilityConfig(mode=mode)
        sim, stats = judge_sim(make_judge(cfg, str(tmp_path)), cfg, ucfg, ["q1", "q2"], pools, valid, False)
        assert srv.calls == request_count(valid, mode) == stats["requests"] == (7 if mode == "pointwise" else 12 + 6)
        assert stats["unscored"] == 0 and stats["cached_calls"] == 0
        c = centrality_from_sim(sim, valid)
        for p, row in enumerate(pools):
            members = [k for k in range(4) if valid[p, k]]
            q = {k: _hidden(row[k]) for k in members}
            if mode == "pointwise":
                assert all(c[p, k] == pytest.approx(q[k]) for k in members)
            else:  # the mean win probability against the rest of the pool (Borda)
                for k in members:
                    wins = [1.0 if q[k] > q[o] else 0.5 if q[k] == q[o] else 0.0 for o in members if o != k]
                    assert c[p, k] == pytest.approx(np.mean(wins))
                assert np.allclose(sim[p][np.ix_(members, members)] + sim[p][np.ix_(members, members)].T, 1.0)
        calls = srv.calls
        # The same pools again: every request is answered from the judge cache.
        sim2, stats2 = judge_sim(make_judge(cfg, str(tmp_path)), cfg, ucfg, ["q1", "q2"], pools, valid, False)
        assert srv.calls == calls and stats2["cached_calls"] == stats2["requests"] and np.array_equal(sim, sim2)
        if mode == "pairwise":
            # A judge that always prefers the answer shown first: asking both orders cancels it out.
            sim3, _ = judge_sim(make_judge(cfg, str(tmp_path)), cfg, ucfg, ["biased"] * 2, pools, valid, False)
            assert np.allclose(centrality_from_sim(sim3, valid)[valid], 0.5)


def test_judge_utility_counts_unscored_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFTRAIN_TEST_UTILITY_KEY", "x")
    pools = [["alpha", "bravo", "original charlie"]]
    with FakeJudgeServer(reply_fn=lambda r: "no scores at all") as srv:
        cfg = _judge_cfg(srv).model_copy(update={"reask": 1})
        sim, stats = judge_sim(make_judge(cfg, str(tmp_path)), cfg, JudgeUtilityConfig(), ["q"], pools,
                               np.ones((1, 3), bool), False)  # fmt: skip
        assert stats["unscored"] == 3 and stats["status"] == {"parse_failure": 3}
        assert stats["judge_calls"] == 6 and srv.calls == 6  # each asked twice (one re-ask)
        assert np.all(sim == 1.0)  # the lowest score: an unscored answer is never preferred


# ------------------------------------------------------------------------------------------- stage 02


def test_stage_select_with_embedder_and_judge_utilities(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SELFTRAIN_TEST_UTILITY_KEY", "x")
    base = [*tiny_overrides, "generation.seed=41"]
    run = create_run(resolve_run_config("tiny", "central", overrides=[*base, "selection.utility=embedder"]))
    generate.run(run, progress=False)
    rows = select.run(run, progress=False)
    m = json.loads((run.metrics_dir / "select.json").read_text())
    assert m["utility"] == "embedder" and m["embedding_cache"].startswith("embedder-")
    numerics = run.manifest()["stages"]["select"]["numerics"]
    assert numerics["utility"] == "embedder" and numerics["embedder"] == "embedded:wordllama"
    assert len(rows) == 5 and set(rows["decision"]) <= {"central", "no_candidates"}

    # The judge utility through stage 02: pointwise, the server scores by answer length so the longest
    # non-empty candidate must win.
    def by_length(request: dict) -> str:
        content = request["messages"][-1]["content"]
        answer = content.split("[Answer]\n")[1].split("\n\n[End of answer]")[0]
        return _scores(min(5, 1 + len(answer) // 10))

    with FakeJudgeServer(reply_fn=by_length) as srv:
        endpoint = {"model": "j", "base_url": srv.base_url, "api_key_env": "SELFTRAIN_TEST_UTILITY_KEY"}
        ov = [*base, "selection.utility=judge", "judge.backend=endpoint", f"judge.endpoint={json.dumps(endpoint)}"]
        jrun = create_run(resolve_run_config("tiny", "central", overrides=ov))
        generate.run(jrun, progress=False)
        jrows = select.run(jrun, progress=False)
        jm = json.loads((jrun.metrics_dir / "select.json").read_text())
        assert jm["utility"] == "judge" and jm["judge_utility"]["requests"] == srv.calls > 0
    cands: dict[str, list[str]] = {}
    for r in sorted(read_jsonl(jrun.data_dir / "candidates.jsonl"), key=lambda r: r["candidate_index"]):
        cands.setdefault(r["prompt_id"], []).append(r["text"])
    for r in jrows.itertuples(index=False):
        texts = cands[r.id]
        if r.decision != "central" or sum(bool(t.strip()) for t in texts) < 2:
            continue
        q = [min(5, 1 + len(t) // 10) if t.strip() else -1 for t in texts]
        assert q[int(r.target)] == max(q)
    assert "quality.txt" in " ".join(jrun.manifest()["inputs"])  # the rubric is an input of the run
