"""The embedder and judge selection utilities.

1. Embedder throughput (selection.utility: embedder, the embedded WordLlama): 10,000 prompts x (n=16 + the
   original) synthetic answers of about 300 characters, embedded and selected; baseline in the same run: the
   default self-embedding utility (the model's own hidden states, SmolLM2-135M in transformers) on a subset,
   scaled to the full size.
2. Judge-utility request count: pointwise and pairwise over --judge-prompts pools of n candidates against the
   local fake OpenAI-compatible server (fixed latency per request): requests the server received, seconds, and
   a second pass served from the judge cache (0 requests). Pointwise sends K = n + 1 requests a prompt,
   pairwise K * (K - 1).

Writes bench/out/select_utilities.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the fake server lives with the tests

from _backends import save_result  # noqa: E402
from openai_server import FakeJudgeServer  # noqa: E402

from selftrain.config import EmbedderConfig, EmbeddingConfig, JudgeConfig, JudgeUtilityConfig  # noqa: E402
from selftrain.graders.clients import make_judge  # noqa: E402
from selftrain.inference import load_hf  # noqa: E402
from selftrain.models import resolve_model_path  # noqa: E402
from selftrain.select import embed_responses, select  # noqa: E402
from selftrain.select.judge_utility import judge_sim, request_count  # noqa: E402
from selftrain.select.similarity import cosine_sim, embedder_embeddings  # noqa: E402

WORDS = ("the model answers each prompt several times and the most central answer becomes the training target "
         "while a judge scores quality and safety on held out prompts with reasons first").split()  # fmt: skip


def _scores(request: dict) -> str:
    content = request["messages"][-1]["content"]
    if "Preference: [[n]]" in content:
        return f"Differ.\nPreference: [[{1 + len(content) % 5}]]"
    q = 1 + len(content) % 5
    return "\n".join(f"{lab}: [[{q}]]" for lab in ("Accuracy", "Fluency", "Detail", "Relevance", "Overall"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--baseline-texts", type=int, default=256, help="texts the self-embedding baseline embeds")
    ap.add_argument("--judge-prompts", type=int, default=20)
    ap.add_argument("--judge-n", type=int, default=4)
    ap.add_argument("--latency", type=float, default=0.01, help="fake judge server seconds per request")
    args = ap.parse_args()
    for name in ("httpx", "httpx2"):  # one INFO line per judge request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    rng = np.random.default_rng(0)
    rows = [[" ".join(rng.choice(WORDS, size=50)) for _ in range(args.n + 1)] for _ in range(args.prompts)]
    valid = np.ones((args.prompts, args.n), bool)
    out: dict = {"prompts": args.prompts, "n": args.n}

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        emb, _ = embedder_embeddings(rows, EmbedderConfig(), tmp)
        sel = select(None, valid, "central", sim=cosine_sim(emb))
        ours = time.perf_counter() - t
    texts = args.prompts * (args.n + 1)
    folder = resolve_model_path("embedded:smollm2-135m")
    model, tok = load_hf(folder, "auto", padding_side="right")
    sub = [r for row in rows for r in row][: args.baseline_texts]
    conv = [[{"role": "user", "content": "Answer the question."}]] * len(sub)
    t = time.perf_counter()
    embed_responses(model, tok, conv, sub, EmbeddingConfig(), progress=False)
    base = (time.perf_counter() - t) * texts / len(sub)
    out["embedder"] = {
        "texts": texts, "seconds": round(ours, 1), "texts_per_s": round(texts / ours),
        "self_embedding_seconds_scaled": round(base, 1), "speedup_vs_self_embedding": round(base / ours, 1),
        "targets_chosen": int((sel["target"] >= 0).sum()),
    }  # fmt: skip

    os.environ.setdefault("BENCH_JUDGE_KEY", "x")
    P, n = args.judge_prompts, args.judge_n
    pools = [[" ".join(rng.choice(WORDS, size=20)) for _ in range(n + 1)] for _ in range(P)]
    pool_valid = np.ones((P, n + 1), bool)
    out["judge"] = {"prompts": P, "n": n, "latency_s": args.latency}
    for mode in ("pointwise", "pairwise"):
        with FakeJudgeServer(reply_fn=_scores, latency_s=args.latency) as srv, tempfile.TemporaryDirectory() as tmp:
            endpoint = {"model": "bench", "base_url": srv.base_url, "api_key_env": "BENCH_JUDGE_KEY", "concurrency": 8}
            cfg = JudgeConfig(backend="endpoint", endpoint=endpoint)
            ucfg = JudgeUtilityConfig(mode=mode)
            t = time.perf_counter()
            judge_sim(make_judge(cfg, tmp), cfg, ucfg, ["q"] * P, pools, pool_valid, progress=False)
            seconds = time.perf_counter() - t
            first = srv.calls
            judge_sim(make_judge(cfg, tmp), cfg, ucfg, ["q"] * P, pools, pool_valid, progress=False)
            out["judge"][mode] = {
                "requests": first, "expected": request_count(pool_valid, mode), "seconds": round(seconds, 2),
                "requests_per_prompt": first / P, "second_pass_requests": srv.calls - first,
            }  # fmt: skip
    save_result(ROOT, "select_utilities", out)


if __name__ == "__main__":
    main()
