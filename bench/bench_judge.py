"""Judge throughput: 200 requests against the local fake OpenAI server with a fixed latency per request.

Concurrency 1 (the sequential baseline) and concurrency 8 in the same run, no cache. With latency L the ideal
is about requests*L seconds at concurrency 1 and requests*L/8 at 8. Writes bench/out/judge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fake server lives with the tests

from openai_server import FakeJudgeServer  # noqa: E402

from selftrain.graders.api import EndpointJudge, EndpointSettings  # noqa: E402


def timed_batch(base_url: str, convs: list[list[dict]], concurrency: int) -> float:
    settings = EndpointSettings(
        model="bench-judge", base_url=base_url, api_key_env="BENCH_JUDGE_KEY", concurrency=concurrency
    )
    with EndpointJudge(settings, cache_dir=None) as judge:
        t = time.perf_counter()
        replies = judge.complete(convs, progress=False)
        seconds = time.perf_counter() - t
    assert all(r.error is None for r in replies), judge.stats(replies)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.05, help="server-side seconds per request")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    os.environ.pop("BENCH_JUDGE_KEY", None)  # local endpoint: the dummy key

    convs = [[{"role": "user", "content": f"Rate answer {i} from 1 to 5."}] for i in range(args.requests)]
    with FakeJudgeServer(latency_s=args.latency) as srv:
        timed_batch(srv.base_url, convs[:8], args.concurrency)  # warm-up: imports, first connections
        c1 = timed_batch(srv.base_url, convs, 1)
        c8 = timed_batch(srv.base_url, convs, args.concurrency)
    res = {
        "requests": args.requests,
        "latency_s": args.latency,
        "concurrency": args.concurrency,
        "seconds_c1": round(c1, 3),
        "seconds_c8": round(c8, 3),
        "requests_per_s_c1": round(args.requests / c1, 1),
        "requests_per_s_c8": round(args.requests / c8, 1),
        "speedup": round(c1 / c8, 2),
        "ideal_speedup": args.concurrency,
    }
    print(json.dumps(res, indent=2))
    out = Path(__file__).parent / "out" / "judge.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
