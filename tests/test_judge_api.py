"""The judge's HTTP path against a real local server with injected faults (tests/openai_server.py).

Every test has a short timeout and tiny backoff, so a retry bug fails fast instead of hanging.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from openai_server import FakeJudgeServer, score_of

from selftrain.graders.api import EndpointJudge, EndpointSettings, JudgeReply, request_key

KEY_ENV = "SELFTRAIN_TEST_JUDGE_KEY"
SECRET = "sk-test-CANARY-7f3a9c1e5b"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def conv(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a strict judge."}, {"role": "user", "content": f"answer {i}"}]


def make_judge(srv: FakeJudgeServer, cache_dir: Path | None = None, **kw) -> EndpointJudge:
    opts = {"timeout_s": 2.0, "backoff_s": 0.01, "max_retry_after_s": 5.0, "concurrency": 4} | kw
    return EndpointJudge(
        EndpointSettings(model="judge-model", base_url=srv.base_url, api_key_env=KEY_ENV, **opts), cache_dir
    )


def run(srv: FakeJudgeServer, n: int = 1, cache_dir: Path | None = None, **kw) -> tuple[list[JudgeReply], dict]:
    with make_judge(srv, cache_dir, **kw) as judge:
        replies = judge.complete([conv(i) for i in range(n)], progress=False)
        return replies, judge.stats(replies)


@pytest.mark.timeout(10)
def test_success_in_input_order():
    # later items answer faster, so completion order is the reverse of input order
    def slow_first(req: dict) -> str:
        i = int(req["messages"][-1]["content"].split()[-1])
        time.sleep(0.01 * (12 - i))
        return f"{score_of(req['messages'][-1]['content'])}\necho: {req['messages'][-1]['content']}"

    with FakeJudgeServer(reply_fn=slow_first) as srv:
        replies, stats = run(srv, n=12, concurrency=6)
    assert [r.text for r in replies] == [f"{score_of(f'answer {i}')}\necho: answer {i}" for i in range(12)]
    assert all(r.error is None and r.attempts == 1 and not r.cached and r.finish_reason == "stop" for r in replies)
    assert all(r.top_logprobs is None for r in replies)  # not requested
    assert stats == {
        "requests": 12, "ok": 12, "http_calls": 12, "retries": 0, "cached": 0,
        "api_errors": {}, "failed": 0, "refused": 0,
    }  # fmt: skip
    assert srv.requests[0]["model"] == "judge-model" and srv.requests[0]["temperature"] == 0.0
    assert "logprobs" not in srv.requests[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "fault,expect_wait",
    [({"status": 429, "retry_after": 1}, 1.0), ({"status": 429, "retry_after_ms": 300}, 0.3)],
)
def test_429_honours_retry_after(fault, expect_wait):
    with FakeJudgeServer(script=[fault]) as srv:
        (reply,), stats = run(srv, backoff_s=0.001)
    assert reply.error is None and reply.attempts == 2 and stats["retries"] == 1
    gap = srv.call_times[1] - srv.call_times[0]
    assert expect_wait <= gap < expect_wait + 1.0


@pytest.mark.timeout(10)
def test_retry_after_is_capped():
    with FakeJudgeServer(script=[{"status": 429, "retry_after": 3600}]) as srv:
        t = time.perf_counter()
        (reply,), _ = run(srv, max_retry_after_s=0.3)
        elapsed = time.perf_counter() - t
    assert reply.error is None and reply.attempts == 2
    assert 0.3 <= srv.call_times[1] - srv.call_times[0] and elapsed < 2.0


@pytest.mark.timeout(10)
@pytest.mark.parametrize("status", [500, 502, 503, 408, 409])
def test_transient_status_then_success(status):
    with FakeJudgeServer(script=[status]) as srv:
        (reply,), stats = run(srv)
    assert reply.error is None and reply.text is not None and reply.attempts == 2
    assert srv.calls == 2 and stats["retries"] == 1 and stats["http_calls"] == 2


@pytest.mark.timeout(10)
def test_timeout_then_success():
    with FakeJudgeServer(script=[{"kind": "timeout", "sleep": 5}]) as srv:
        t = time.perf_counter()
        (reply,), _ = run(srv, timeout_s=0.3)
        elapsed = time.perf_counter() - t
    assert reply.error is None and reply.attempts == 2
    assert 0.3 <= elapsed < 2.0  # waited for the client timeout, not the server's 5 s


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "fault,kind",
    [
        ("garbage", "bad response"),
        ("html", "bad response"),
        ("wrong_json", "bad response"),
        ("empty_choices", "empty choices"),
        ("disconnect", "connection error"),
        ({"kind": "timeout", "sleep": 5}, "timeout"),
    ],
)
def test_bad_replies_are_retried_then_recorded(fault, kind):
    with FakeJudgeServer(script=[fault]) as srv:  # once, then fine
        (reply,), _ = run(srv, timeout_s=0.3)
    assert reply.error is None and reply.attempts == 2 and reply.text
    with FakeJudgeServer(default_fault=fault) as srv:  # always
        (reply,), stats = run(srv, timeout_s=0.3, max_attempts=2)
    assert reply.text is None and reply.error == kind and reply.attempts == 2 and not reply.refused
    assert srv.calls == 2 and stats["api_errors"] == {kind: 1} and stats["failed"] == 1


@pytest.mark.timeout(10)
def test_persistent_500_stops_after_max_attempts():
    with FakeJudgeServer(default_fault=500) as srv:
        (reply,), stats = run(srv, max_attempts=3)
    assert reply.error == "HTTP 500" and reply.text is None and reply.attempts == 3
    assert srv.calls == 3
    assert stats["http_calls"] == 3 and stats["retries"] == 2 and stats["api_errors"] == {"HTTP 500": 1}
    assert stats["ok"] == 0 and stats["failed"] == 1


@pytest.mark.timeout(15)
def test_retry_budget_caps_retries_across_batch():
    with FakeJudgeServer(default_fault=500) as srv:
        replies, stats = run(srv, n=20, max_attempts=4, retry_budget=5, concurrency=4)
    assert len(replies) == 20 and all(r.error == "HTTP 500" and r.text is None for r in replies)
    assert stats["retries"] == 5 and srv.calls == 20 + 5 and stats["http_calls"] == 25
    assert stats["failed"] == 20 and stats["api_errors"] == {"HTTP 500": 20}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_not_retried(status):
    with FakeJudgeServer(default_fault=status) as srv:
        (reply,), stats = run(srv)
    assert reply.error == f"HTTP {status}" and reply.attempts == 1 and srv.calls == 1 and stats["retries"] == 0


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "fault,error",
    [
        ("content_filter", "refusal: content_filter"),
        ("refusal", "refusal: I can't help with that."),
        ({"status": 400, "code": "content_filter"}, "refusal: content_filter (prompt)"),  # Azure prompt filter
    ],
)
def test_refusal_is_reported_not_retried(tmp_path, fault, error):
    with FakeJudgeServer(default_fault=fault) as srv:
        (reply,), stats = run(srv, cache_dir=tmp_path)
        assert reply.refused and reply.error == error and reply.text is None and reply.attempts == 1
        assert srv.calls == 1 and stats["refused"] == 1 and stats["api_errors"] == {}
        run(srv, cache_dir=tmp_path)
        assert srv.calls == 2  # refusals are not cached


@pytest.mark.timeout(10)
def test_cache_second_run_makes_no_http_calls(tmp_path):
    with FakeJudgeServer(script={3: 400}) as srv:  # call 3 fails: not cached
        first, _ = run(srv, n=6, cache_dir=tmp_path, concurrency=1, logprobs=True, top_logprobs=5)
        assert srv.calls == 6 and sum(r.error is not None for r in first) == 1
        files = sorted(tmp_path.glob("*/*.json"))
        assert len(files) == 5 and all(f.parent.name == f.stem[:2] for f in files)
        assert not list(tmp_path.rglob("*.tmp"))

        second, stats = run(srv, n=6, cache_dir=tmp_path, logprobs=True, top_logprobs=5)
        assert srv.calls == 7  # only the failed one again
        assert stats["cached"] == 5 and stats["http_calls"] == 1
        third, stats = run(srv, n=6, cache_dir=tmp_path, logprobs=True, top_logprobs=5)
        assert srv.calls == 7 and stats["cached"] == 6 and stats["http_calls"] == 0
    assert [r.text for r in third] == [r.text for r in second]
    assert [r.top_logprobs for r in third] == [r.top_logprobs for r in second]
    assert all(r.cached and r.attempts == 0 for r in third)
    ok_first = [r for r in first if r.error is None]
    assert [r.text for r in ok_first] == [r.text for i, r in enumerate(third) if first[i].error is None]


@pytest.mark.timeout(10)
def test_cache_key_depends_on_request_and_ignores_unreadable_files(tmp_path):
    with FakeJudgeServer() as srv:
        run(srv, cache_dir=tmp_path)
        run(srv, cache_dir=tmp_path, temperature=0.7)  # different sampling: a different entry
        assert srv.calls == 2
        for f in tmp_path.glob("*/*.json"):
            f.write_text("{ truncated")
        (reply,), _ = run(srv, cache_dir=tmp_path)
        assert srv.calls == 3 and reply.error is None and not reply.cached


def test_request_key():
    base = EndpointSettings(model="m", base_url="http://localhost:8000/v1")
    k = request_key(base, conv(0))
    assert k == request_key(EndpointSettings(model="m", base_url="http://localhost:8000/v1"), conv(0))
    assert len(k) == 64 and SECRET not in k
    others = [
        request_key(base, conv(1)),
        request_key(EndpointSettings(model="m2", base_url=base.base_url), conv(0)),
        request_key(EndpointSettings(model="m", base_url="http://other:8000/v1"), conv(0)),
        request_key(EndpointSettings(model="m", base_url=base.base_url, temperature=1.0), conv(0)),
        request_key(EndpointSettings(model="m", base_url=base.base_url, max_tokens=5), conv(0)),
        request_key(EndpointSettings(model="m", base_url=base.base_url, seed=1), conv(0)),
        request_key(EndpointSettings(model="m", base_url=base.base_url, logprobs=True, top_logprobs=5), conv(0)),
        request_key(base, conv(0), extra={"template": "v2"}),
    ]
    assert len({k, *others}) == len(others) + 1
    # concurrency / retry settings don't change what the model answers
    assert k == request_key(EndpointSettings(model="m", base_url=base.base_url, concurrency=1, max_attempts=9), conv(0))


@pytest.mark.timeout(10)
def test_requests_overlap():
    with FakeJudgeServer(latency_s=0.2) as srv:
        t = time.perf_counter()
        replies, _ = run(srv, n=8, concurrency=8)
        elapsed = time.perf_counter() - t
    assert all(r.error is None for r in replies)
    assert elapsed < 1.0, f"8 requests of 0.2 s at concurrency 8 took {elapsed:.2f}s: not concurrent"


@pytest.mark.timeout(10)
def test_logprobs_returned_when_requested():
    with FakeJudgeServer() as srv:
        replies, _ = run(srv, n=3, logprobs=True, top_logprobs=5)
    assert srv.requests[0]["logprobs"] is True and srv.requests[0]["top_logprobs"] == 5
    for i, r in enumerate(replies):
        first = r.top_logprobs[0]
        assert set(first) == {"1", "2", "3", "4", "5"}
        assert max(first, key=first.get) == str(score_of(f"answer {i}")) == r.text[0]


@pytest.mark.timeout(15)
def test_api_key_never_leaks(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # openai / httpx debug logging included
    script = [{"status": 401, "echo_auth": True}, {"status": 500, "echo_auth": True}, "garbage"]
    with FakeJudgeServer(script=script) as srv:
        with make_judge(srv, tmp_path, concurrency=1) as judge:
            replies = judge.complete([conv(i) for i in range(3)], progress=True)
            text = repr(replies) + repr(judge.settings) + repr(judge.stats(replies))
    assert f"Bearer {SECRET}" in srv.auth_headers  # the key was really sent...
    assert replies[0].error == "HTTP 401" and replies[1].error is None and replies[2].error is None
    out = capsys.readouterr()
    cache = "".join(f.read_text() for f in tmp_path.rglob("*") if f.is_file())
    assert cache  # ...and nothing we wrote or logged contains it
    for where, s in {
        "replies": text,
        "logs": caplog.text,
        "stdout": out.out,
        "stderr": out.err,
        "cache": cache,
    }.items():
        assert SECRET not in s, f"API key leaked into {where}"


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RuntimeError, match=KEY_ENV):
        EndpointJudge(EndpointSettings(model="m", base_url="https://judge.example.com/v1", api_key_env=KEY_ENV), None)
    with pytest.raises(RuntimeError, match="SOME_OTHER_KEY"):
        EndpointJudge(EndpointSettings(model="m", api_key_env="SOME_OTHER_KEY"), None)


@pytest.mark.timeout(10)
def test_local_endpoint_without_key_uses_dummy(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with FakeJudgeServer() as srv:
        (reply,), _ = run(srv)
    assert reply.error is None and srv.auth_headers == ["Bearer EMPTY"]


@pytest.mark.timeout(10)
def test_azure_endpoint():
    with FakeJudgeServer() as srv:
        settings = EndpointSettings(
            model="my-deployment", base_url=srv.root_url, api_key_env=KEY_ENV, azure_api_version="2024-10-21"
        )
        with EndpointJudge(settings, None) as judge:
            (reply,) = judge.complete([conv(0)], progress=False)
    assert reply.error is None and reply.text.endswith("answer 0")
    assert srv.paths == ["/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"]
    assert srv.auth_headers == [SECRET]  # Azure sends the key in the api-key header


def test_settings_help_and_validation():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(EndpointSettings))
    with pytest.raises(ValueError):
        EndpointSettings(model="m", concurrency=0)
