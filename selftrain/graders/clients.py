"""Judges: a model run in-process (LocalJudge) or any OpenAI-compatible endpoint (RemoteJudge), behind one
`complete(requests, attempt, progress)` that returns the judge's text, expected scores and errors; `ask` adds
the re-asks after parse failures. Shared by stage 05 (judging answers) and stage 02 (the judge utility)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from selftrain.config import GenerationConfig, JudgeConfig, ModelConfig, SamplingConfig
from selftrain.graders.api import EndpointJudge, EndpointSettings
from selftrain.graders.parse import DIGITS, ParseError, _reasons, expected_from_tokens, parse_scores
from selftrain.hardware import require_vllm_expected_scoring
from selftrain.inference import (
    free_memory,
    generate_candidates,
    load_hf,
    next_token_logprobs,
    pick_backend,
    vllm_engine,
)
from selftrain.io import DataError, read_json, sha256_json, write_json
from selftrain.models import model_fingerprint, resolve_model_path
from selftrain.paths import resolve_path

RUBRIC_PLACEHOLDERS = ("question", "answer", "reference")


def load_rubric(
    rubric_dir: str | Path, language: str, kind: str, placeholders: tuple[str, ...] = RUBRIC_PLACEHOLDERS
) -> str:
    """The rubric ``<rubric_dir>/<language>/<kind>.txt``, checked to format with exactly these placeholders."""
    path = resolve_path(rubric_dir) / language / f"{kind}.txt"
    if not path.is_file():
        raise DataError(f"{path}: rubric not found (judge.rubric_dir / judge.language)")
    text = path.read_text(encoding="utf-8")
    try:
        text.format(**{k: k[0] for k in placeholders})
    except (KeyError, IndexError, ValueError) as e:
        use = ", ".join(f"{{{k}}}" for k in placeholders)
        raise DataError(f"{path}: bad placeholder ({e}); use {use}") from None
    return text


def judge_messages(rubric: str, item: dict[str, Any], answer: str) -> list[dict[str, str]]:
    content = rubric.format(question=item["prompt"], answer=answer, reference=item.get("reference", ""))
    return [{"role": "user", "content": content}]


class LocalJudge:
    """A judge model run in-process: generation through stage 01's backends, and for scoring='expected'
    one transformers forward pass per score slot (the probabilities of "1".."5" after ``Label: [[``)."""

    def __init__(self, cfg: JudgeConfig, cache_dir: str):
        self.cfg = cfg
        self.folder = resolve_model_path(cfg.local_model, cache_dir)
        self.model_cfg = ModelConfig(name="judge", path=str(self.folder), max_model_len=cfg.local_max_model_len)
        self.backend = pick_backend(cfg.local_backend)
        if self.backend == "vllm" and cfg.scoring == "expected":
            require_vllm_expected_scoring()  # before any answer is judged: vLLM < 0.21 returns no such log-probs
        self.cache = resolve_path(cache_dir) / "judge" / "local"
        self.fingerprint = model_fingerprint(self.folder)
        self._hf: tuple[Any, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "model": self.cfg.local_model, "generation_backend": self.backend}

    def _key(self, messages: list[dict], attempt: int, sampling: SamplingConfig | None = None) -> str:
        key = {
            "model": self.fingerprint,
            "messages": messages,
            "max_new_tokens": self.cfg.max_new_tokens,
            "attempt": attempt,
            "scoring": self.cfg.scoring,
            # Expected scores are read through the generation backend (vLLM's or transformers' forward pass).
            "expected_via": self.backend if self.cfg.scoring == "expected" else None,
        }
        if sampling is not None:
            key["sampling"] = sampling.model_dump(exclude={"backend", "batch_size"})
        return sha256_json(key)

    def complete(
        self,
        requests: list[tuple[list[dict], dict[str, str]]],
        attempt: int,
        progress: bool,
        sampling: SamplingConfig | None = None,
    ) -> list:
        """One judge output per (messages, labels): {"text", "expected", "error", "cached"}.

        sampling: fixed sampling settings (judge.protocol=llm-jp-judge); a re-ask then only moves the seed on,
        since the same seed would give the same text. None: greedy first, sampled re-asks."""
        keys = [self._key(m, attempt, sampling) for m, _ in requests]
        out: list[dict[str, Any] | None] = []
        for k in keys:
            path = self.cache / k[:2] / f"{k}.json"
            out.append({**read_json(path), "cached": True} if path.is_file() else None)
        todo = [i for i, r in enumerate(out) if r is None]
        if todo:
            # Greedy first; a re-ask samples (a greedy re-ask would repeat the same output).
            if sampling is not None:
                gen = GenerationConfig(**{**sampling.model_dump(), "n": 1, "seed": sampling.seed + attempt})
            else:
                gen = GenerationConfig(
                    n=1,
                    temperature=0.0 if attempt == 0 else 0.7,
                    top_p=1.0 if attempt == 0 else 0.95,
                    max_new_tokens=self.cfg.max_new_tokens,
                    seed=1234 + attempt,
                )
            # One vLLM engine writes the judge's reasons and then reads its score slots (prefix-cached prefills).
            engine = vllm_engine(self.folder, self.model_cfg, gen.seed) if self.backend == "vllm" else None
            try:
                raw = generate_candidates(
                    self.folder, self.model_cfg, gen, [requests[i][0] for i in todo], self.backend, progress,
                    engine=engine,
                )  # fmt: skip
                texts = {todo[r["prompt_index"]]: r["text"] for r in raw}
                expected: dict[int, dict[str, float]] = {}
                if self.cfg.scoring == "expected":
                    jobs = [(requests[i][0], texts[i], requests[i][1]) for i in todo]
                    if engine is not None:
                        got = self._expected_vllm(engine, jobs)
                    else:
                        got = [self._expected(*job) for job in jobs]
                    expected = dict(zip(todo, got, strict=True))
            finally:
                if engine is not None:
                    engine = None  # the last reference: collected by free_memory
                    free_memory()
            for i in todo:
                rec: dict[str, Any] = {"text": texts[i], "expected": expected.get(i), "error": None}
                path = self.cache / keys[i][:2] / f"{keys[i]}.json"
                write_json(path, rec)
                out[i] = {**rec, "cached": False}
        return out

    def _expected_vllm(self, engine: Any, jobs: list[tuple[list[dict], str, dict[str, str]]]) -> list[dict[str, float]]:
        """`_expected` for many items on a vLLM engine: the same token pieces (the head with reasons and the
        first ``Label: [[``, then ``n]]\nLabel: [[`` per further criterion), the probabilities of "1".."5" as
        a softmax over their log-probabilities; one batched call per score slot."""
        import numpy as np

        tok = engine.get_tokenizer()
        digit_ids = self._digit_ids(tok)
        ids: list[list[int]] = [[] for _ in jobs]
        pending, labels, out = [], [], [dict[str, float]() for _ in jobs]
        for messages, text, lab in jobs:
            head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            pending.append(head + _reasons(text, lab) + "\n\n")  # tokenised with the first label, as _expected
            labels.append(list(lab.items()))
        for step in range(max((len(x) for x in labels), default=0)):
            live = [j for j in range(len(jobs)) if step < len(labels[j])]
            for j in live:
                ids[j] = ids[j] + tok(pending[j] + f"{labels[j][step][1]}: [[", add_special_tokens=False)["input_ids"]
            lps = next_token_logprobs(engine, [ids[j] for j in live], digit_ids)
            for j, lp in zip(live, lps, strict=True):
                p = np.exp(np.array(lp) - max(lp))
                p /= p.sum()
                out[j][labels[j][step][0]] = float((p * np.arange(1, 6)).sum())
                pending[j] = f"{int(p.argmax()) + 1}]]\n"
        return out

    def _digit_ids(self, tok: Any) -> list[int]:
        ids = [tok.convert_tokens_to_ids(d) for d in DIGITS]
        if any(i is None or i == tok.unk_token_id for i in ids):
            raise RuntimeError(f"{self.folder}: the judge's tokenizer has no single tokens for '1'..'5'")
        return ids

    def _expected(self, messages: list[dict], text: str, labels: dict[str, str]) -> dict[str, float]:
        """Score slots filled one by one: after the judge's reasons each criterion's line is opened at ``[[``
        and the next-token probabilities of "1".."5" read; the most likely digit closes the line. One long
        forward pass per item, then a few tokens per criterion on the KV cache."""
        import torch

        if self._hf is None:
            self._hf = load_hf(self.folder, "auto", padding_side="left")
        model, tok = self._hf
        digit_ids = self._digit_ids(tok)
        head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        piece = head + _reasons(text, labels) + "\n\n"
        past, out = None, {}
        with torch.inference_mode():
            for k, label in labels.items():
                ids = tok(piece + f"{label}: [[", return_tensors="pt", add_special_tokens=False)["input_ids"]
                res = model(input_ids=ids.to(model.device), past_key_values=past, use_cache=True, logits_to_keep=1)
                past = res.past_key_values
                p = torch.softmax(res.logits[0, -1, digit_ids].float(), -1)
                out[k] = float((p * torch.arange(1, 6, device=p.device)).sum())
                piece = f"{int(p.argmax()) + 1}]]\n"
        return out


class RemoteJudge:
    """Any OpenAI-compatible endpoint (selftrain.graders.api); the key comes from the environment only."""

    def __init__(self, cfg: JudgeConfig, cache_dir: str):

        self.cfg = cfg
        fields = {f.name for f in dataclasses.fields(EndpointSettings)}
        bad = sorted(set(cfg.endpoint) - fields)
        if bad:
            raise ValueError(f"judge.endpoint: unknown key(s) {bad} (known: {', '.join(sorted(fields))})")
        if "model" not in cfg.endpoint:
            raise ValueError("judge.endpoint: key 'model' is required for judge.backend=endpoint")
        settings = EndpointSettings(**{"max_tokens": cfg.max_new_tokens, **cfg.endpoint})
        if cfg.scoring == "expected":
            settings = dataclasses.replace(settings, logprobs=True, top_logprobs=max(settings.top_logprobs, 10))
        self.settings = settings
        self.cache = resolve_path(cache_dir) / "judge" / "endpoint"
        self._make = lambda s: EndpointJudge(s, self.cache)
        self.stats: list[dict[str, Any]] = []

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"backend": "endpoint", "model": s.model, "base_url": s.base_url, "api_key_env": s.api_key_env}

    def complete(
        self,
        requests: list[tuple[list[dict], dict[str, str]]],
        attempt: int,
        progress: bool,
        sampling: dict[str, Any] | None = None,
    ) -> list:
        """One judge output per (messages, labels): {"text", "expected", "error", "refused", "cached",
        "completed", "http_status"}.

        sampling: EndpointSettings sampling fields that replace the configured ones (judge.protocol=llm-jp-judge);
        every attempt then sends the identical request, as llm-jp-judge does, and only the cache key tells the
        attempts apart. None: re-asks at temperature >= 0.7 and a new seed."""
        s = self.settings
        extra: dict[str, Any] = {"reask": attempt}
        if sampling is not None:
            s = dataclasses.replace(s, **sampling)
            extra["protocol"] = "llm-jp-judge"
        elif attempt:  # a re-ask must not be answered from the cache with the same unparsable text
            s = dataclasses.replace(s, temperature=max(s.temperature or 0.0, 0.7), seed=(s.seed or 0) + attempt)
        with self._make(s) as client:
            replies = client.complete([m for m, _ in requests], progress=progress, extra=extra)
            self.stats.append(client.stats(replies))
        out = []
        for (_, labels), r in zip(requests, replies, strict=True):
            expected = None
            if self.cfg.scoring == "expected" and r.ok and r.tokens and r.top_logprobs:
                expected = expected_from_tokens(r.tokens, r.top_logprobs, labels)
            out.append(
                {
                    "text": r.text,
                    "expected": expected,
                    "error": r.error,
                    "refused": r.refused,
                    "cached": r.cached,
                    "completed": r.completed,
                    "http_status": r.http_status,
                }
            )
        return out


def make_judge(cfg: JudgeConfig, cache_dir: str) -> LocalJudge | RemoteJudge:
    return RemoteJudge(cfg, cache_dir) if cfg.backend == "endpoint" else LocalJudge(cfg, cache_dir)


def ask(
    judge: LocalJudge | RemoteJudge,
    requests: list[tuple[list[dict], dict[str, str]]],
    reask: int,
    expected: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """Judge every (messages, labels) request; parse failures are re-asked up to `reask` times (API errors and
    refusals are not: the client already retried within its caps). Per request: {"status" ("ok" |
    "parse_failure" | "api_error" | "refused"), "scores" {criterion: value}, "outputs" [{"text", "error",
    "cached"}], "parse_error" (the last failure's reason, when there was one)}."""
    res: list[dict[str, Any]] = [{"status": "pending", "scores": {}, "outputs": []} for _ in requests]
    pending = list(range(len(requests)))
    for attempt in range(reask + 1):
        if not pending:
            break
        outs = judge.complete([requests[i] for i in pending], attempt, progress)
        retry = []
        for i, o in zip(pending, outs, strict=True):
            r = res[i]
            r["outputs"].append({k: o.get(k) for k in ("text", "error", "cached")})
            if o.get("refused"):
                r["status"] = "refused"
            elif o.get("error"):
                r["status"] = "api_error"
            elif expected and o.get("expected"):
                r["status"], r["scores"] = "ok", {k: round(v, 4) for k, v in o["expected"].items()}
            else:
                try:
                    parsed = parse_scores(o.get("text") or "", requests[i][1])
                    r["status"], r["scores"] = "ok", {k: float(v) for k, v in parsed.items()}
                except ParseError as e:
                    r["status"], r["parse_error"] = "parse_failure", str(e)
                    retry.append(i)
        pending = retry
    return res
