"""Integration: stages 01 and 02 on the tiny random Llama, both generation backends, caches, faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from selftrain import generate, inference, select
from selftrain.config import EmbeddingConfig, resolve_run_config
from selftrain.data import load_prompts
from selftrain.inference import load_hf
from selftrain.io import DataError, read_jsonl
from selftrain.runs import StageNotDone, create_run
from selftrain.select import stage as select_stage_mod

KEYS = {"prompt_id": str, "candidate_index": int, "text": str, "finish_reason": str, "num_tokens": int, "seed": int}


def _run(overrides: list[str], method: str = "central", extra: list[str] | None = None):
    return create_run(resolve_run_config("tiny", method, overrides=[*overrides, *(extra or [])]))


def _check_records(recs: list[dict], n_prompts: int, n: int, max_new: int) -> None:
    assert len(recs) == n_prompts * n
    for r in recs:
        assert set(r) == set(KEYS) and all(isinstance(r[k], t) for k, t in KEYS.items())
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= r["num_tokens"] <= max_new
        if r["finish_reason"] == "length":
            assert r["num_tokens"] == max_new
    by_prompt: dict[str, list[int]] = {}
    for r in recs:
        by_prompt.setdefault(r["prompt_id"], []).append(r["candidate_index"])
    assert all(sorted(v) == list(range(n)) for v in by_prompt.values())


def test_generate_transformers_and_cache(tiny_overrides: list[str]) -> None:
    tiny_overrides = [*tiny_overrides, "generation.seed=777"]  # a cache entry no other test made
    run = _run(tiny_overrides)
    df = generate.run(run, progress=False)
    recs = read_jsonl(run.data_dir / "candidates.jsonl")
    _check_records(recs, 5, 3, 12)
    assert len(df) == 15 and run.is_done("generate")
    meta = json.loads((run.metrics_dir / "generate.json").read_text())
    assert meta["backend"] == "transformers" and not meta["cache_hit"] and 0 <= meta["eos_share"] <= 1
    assert (run.figures_dir / "generate_tokens.png").is_file()
    # Another method with the same model/prompts/sampling reuses the generations.
    other = _run(tiny_overrides, method="drop-low")
    generate.run(other, progress=False)
    assert json.loads((other.metrics_dir / "generate.json").read_text())["cache_hit"]
    assert read_jsonl(other.data_dir / "candidates.jsonl") == recs
    # Changing a sampling param is a different cache entry.
    third = _run(tiny_overrides, extra=["generation.temperature=0.5"])  # a new cache entry
    generate.run(third, progress=False)
    assert not json.loads((third.metrics_dir / "generate.json").read_text())["cache_hit"]
    # So is the dtype the model runs in (a GPU's bfloat16 samples are not a CPU's float32 ones).
    fourth = _run(tiny_overrides, extra=["model.dtype=bfloat16"])
    generate.run(fourth, progress=False)
    got = json.loads((fourth.metrics_dir / "generate.json").read_text())
    assert not got["cache_hit"] and got["key"] != meta["key"]


def test_greedy_transformers_does_not_depend_on_padding(tiny_overrides: list[str], tiny_model: Path) -> None:
    from selftrain.config import GenerationConfig, ModelConfig

    gen = GenerationConfig(n=2, temperature=0, max_new_tokens=8, batch_size=2)
    mc = ModelConfig(name="tiny", path=str(tiny_model))
    convs = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "a much longer question here"}]]
    a = inference.generate_transformers(tiny_model, mc, gen, convs, progress=False)
    b = inference.generate_transformers(tiny_model, mc, gen.model_copy(update={"batch_size": 1}), convs, progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]  # left padding does not change greedy output


def test_embeddings_pool_only_response_tokens(tiny_model: Path) -> None:
    model, tok = load_hf(tiny_model, "float32", padding_side="right")
    cfg1 = EmbeddingConfig(batch_size=1)
    cfg4 = EmbeddingConfig(batch_size=4)
    convs = [[{"role": "user", "content": "What is the capital of France?"}]] * 3 + [
        [{"role": "user", "content": "hi"}]
    ]
    resps = ["Paris is the capital.", "", "It is Paris, the capital of France, of course.", "Paris is the capital."]
    e1 = select.embed_responses(model, tok, convs, resps, cfg1, progress=False)
    e4 = select.embed_responses(model, tok, convs, resps, cfg4, progress=False)
    np.testing.assert_allclose(e1, e4, atol=1e-4)  # padding and batching do not leak into the pooled vector
    norms = np.linalg.norm(e1, axis=1)
    assert np.allclose(norms[[0, 2, 3]], 1.0, atol=1e-5) and norms[1] == 0.0  # empty response -> zero vector
    assert not np.allclose(e1[0], e1[3])  # same response, different prompt: context matters
    last = select.embed_responses(model, tok, convs, resps, EmbeddingConfig(pooling="last", layer=1), progress=False)
    assert not np.allclose(last[0], e1[0]) and np.linalg.norm(last[1]) == 0.0


def test_select_stage_outputs(tiny_overrides: list[str]) -> None:
    for method in ("central", "original", "drop-low", "fallback-original"):
        run = _run(tiny_overrides, method=method)
        generate.run(run, progress=False)
        df = select.run(run, progress=False)
        assert len(df) == 5 and run.is_done("select")
        sft = read_jsonl(run.data_dir / "sft.jsonl")
        dpo = read_jsonl(run.data_dir / "dpo.jsonl")
        m = json.loads((run.metrics_dir / "select.json").read_text())
        assert m["sft_examples"] == len(sft) and m["dpo_pairs"] == len(dpo)
        assert sum(m["decisions"].values()) == 5
        for r in sft:
            assert r["prompt"][-1]["role"] == "user" and r["completion"][0]["role"] == "assistant"
        for r in dpo:
            assert r["chosen"] != r["rejected"]
        assert (run.figures_dir / "select_overview.png").is_file()
        if method == "original":
            originals = {json.dumps(x["completion"]) for x in sft}
            assert len(sft) == 5 and json.dumps([{"role": "assistant", "content": "Eight."}]) in originals
        if method == "drop-low":
            assert len(sft) == m["decisions"]["central"]


def test_baseline_skips_selection(tiny_overrides: list[str]) -> None:
    run = _run(tiny_overrides, method="baseline")
    generate.run(run, progress=False)
    assert select.run(run, progress=False).empty
    assert run.is_done("select") and run.manifest()["stages"]["select"]["metrics"]["skipped"]


def test_select_refuses_partial_generation(tiny_overrides: list[str]) -> None:
    run = _run(tiny_overrides)
    (run.data_dir / "candidates.jsonl").write_text('{"prompt_id": "p1"}\n')  # a killed run's leftovers
    with pytest.raises(RuntimeError, match="'generate' is not done"):
        select.run(run, progress=False)
    generate.run(run, progress=False)  # the rerun redoes generate and replaces the leftovers
    assert len(read_jsonl(run.data_dir / "candidates.jsonl")) == 15
    select.run(run, progress=False)
    assert run.is_done("select")


def test_bad_candidates_file_is_named(tiny_overrides: list[str]) -> None:
    run = _run(tiny_overrides)
    generate.run(run, progress=False)
    path = run.data_dir / "candidates.jsonl"
    recs = read_jsonl(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:-1]))  # one candidate missing
    # An output edited after its stage finished is never consumed: the stage is no longer done.
    with pytest.raises(StageNotDone, match=r"'generate' outputs no longer match: data/candidates.jsonl \(changed\)"):
        select.run(run, progress=False)
    assert not run.is_done("generate") and not run.is_done("select")
    assert not (run.data_dir / "sft.jsonl").exists()
    # The file itself, malformed, is named with the prompt whose candidates are incomplete.
    prompts = load_prompts(run.config.prompts.path)
    with pytest.raises(DataError, match=r"candidates.jsonl: prompt 'p5' has candidates \[0, 1\]"):
        select_stage_mod._candidate_matrix(prompts, read_jsonl(path), 3, path)


def test_bad_prompt_file_fails_generate_cleanly(tiny_overrides: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q2"}\n')
    run = _run(tiny_overrides, extra=[f"prompts.path={bad}"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'response'"):
        generate.run(run, progress=False)
    assert not run.is_done("generate") and not (run.data_dir / "candidates.jsonl").exists()


def test_an_interrupted_generation_releases_the_model(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt deep inside generate (as Jupyter's stop button raises it) leaves no model alive, even while
    the traceback is held (a notebook keeps the last one)."""
    import gc
    import weakref

    from selftrain.config import GenerationConfig, ModelConfig

    refs: list[weakref.ref] = []
    real = inference.load_hf

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        refs.append(weakref.ref(model))
        calls = {"n": 0}

        def interrupt(module, inputs):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt("stop button")

        model.model.layers[0].register_forward_pre_hook(interrupt)
        return model, tok

    monkeypatch.setattr(inference, "load_hf", spy)
    gen = GenerationConfig(n=2, max_new_tokens=50, backend="transformers")
    with pytest.raises(KeyboardInterrupt) as held:
        inference.generate_transformers(
            tiny_model, ModelConfig(name="tiny", path=str(tiny_model)), gen, [[{"role": "user", "content": "hi"}]]
        )
    gc.collect()
    assert held.value is not None and refs and refs[0]() is None  # freed, though the traceback is held


def test_an_interrupted_stage_ends_in_one_line_and_releases_its_model(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 01 interrupted mid-generation: what IPython shows in the notebook (the exception's _render_traceback_) is
    one line saying the model was released, and it is: nothing the traceback holds keeps it alive."""
    import gc
    import weakref

    refs: list[weakref.ref] = []
    real = inference.load_hf

    def interrupt(module, inputs):
        raise KeyboardInterrupt  # as Jupyter's stop button does

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        refs.append(weakref.ref(model))
        model.model.layers[0].register_forward_pre_hook(interrupt)
        return model, tok

    monkeypatch.setattr(inference, "load_hf", spy)
    run = _run(tiny_overrides, "central", ["generation.seed=41"])
    with pytest.raises(KeyboardInterrupt) as held:
        generate.run(run, progress=False)
    shown = held.value._render_traceback_()
    assert len(shown) == 1 and "released" in shown[0]
    assert shown[0].startswith("KeyboardInterrupt: stage generate stopped")
    gc.collect()
    assert refs and refs[0]() is None
    assert run.manifest()["stages"]["generate"]["status"] == "failed" and not run.is_done("generate")


def test_selection_n_uses_a_prefix_of_the_generation(tiny_overrides: list[str]) -> None:
    """generation.n=3 once; selection.n=2 selects among candidates 0 and 1 only (plus the original), reusing the
    same candidates file and embeddings; a control arm runs on the same pool."""
    from selftrain.config import ConfigError

    full = _run(tiny_overrides, "central", ["generation.seed=31"])
    generate.run(full, progress=False)
    select.run(full, progress=False)
    two = _run(tiny_overrides, "drop-low", ["generation.seed=31", "selection.n=2"])
    generate.run(two, progress=False)
    rows = select.run(two, progress=False)
    assert read_jsonl(two.data_dir / "candidates.jsonl") == read_jsonl(full.data_dir / "candidates.jsonl")
    assert all(len(c) == 3 for c in rows["centrality"])  # 2 candidates + the original
    assert set(rows["target"].dropna()) <= {0, 1, "original"}
    rnd = _run(tiny_overrides, "random", ["generation.seed=31", "selection.n=2"])
    generate.run(rnd, progress=False)
    r = select.run(rnd, progress=False)
    assert set(r["decision"]) <= {"control", "no_candidates"} and set(r["target"].dropna()) <= {0, 1}
    with pytest.raises(ConfigError, match=r"selection.n \(4\) exceeds generation.n \(3\)"):
        _run(tiny_overrides, "central", ["selection.n=4"])
    # One candidate leaves DPO no rejected answer: refused before any stage runs, unless DPO is not trained.
    with pytest.raises(ConfigError, match="selection.n = 1 .* leaves method 'random' no rejected candidate for DPO"):
        resolve_run_config("tiny", "random", overrides=[*tiny_overrides, "selection.n=1"])
    for ok in (["training.order=sft"], ["stages=[generate,select,sft]"]):
        assert resolve_run_config("tiny", "central", overrides=[*tiny_overrides, "selection.n=1", *ok])
    assert resolve_run_config("tiny", "original", overrides=[*tiny_overrides, "generation.n=1"])


def test_chrf_utility_selects_without_loading_the_model(tiny_overrides: list[str]) -> None:
    from sacrebleu.metrics import CHRF

    run = _run(tiny_overrides, "central", ["generation.seed=32", "selection.utility=chrf"])
    generate.run(run, progress=False)
    rows = select.run(run, progress=False)
    m = json.loads((run.metrics_dir / "select.json").read_text())
    assert m["utility"] == "chrf" and m["embedding_cache"] is None
    assert run.manifest()["stages"]["select"]["numerics"]["utility"] == "chrf"
    cands: dict[str, list[str]] = {}
    for r in sorted(read_jsonl(run.data_dir / "candidates.jsonl"), key=lambda r: r["candidate_index"]):
        cands.setdefault(r["prompt_id"], []).append(r["text"])
    chrf = CHRF()
    for r in rows.itertuples(index=False):
        texts = cands[r.id]
        pool = [k for k, t in enumerate(texts) if t.strip()]
        if len(pool) < 2:
            continue
        means = [np.mean([chrf.sentence_score(texts[j], [texts[k]]).score for k in pool if k != j]) for j in pool]
        assert r.target in [pool[i] for i, v in enumerate(means) if abs(v - max(means)) < 1e-4]


def test_stages_01_02_on_llm_jp_shaped_rows_with_system_shuffle_and_a_too_long_prompt(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """magpie-shaped rows as LLM-jp ships them, a system line read from a file of the user's, a shuffle before the
    limit, and one prompt longer than the model's context: stage 01 skips and counts it (never a failed stage), and
    stage 02 selects over exactly the prompts stage 01 generated for."""
    rows = [{"id": i, "conversations": [{"role": "user", "content": f"Question number {i} about the weather?"},
                                        {"role": "assistant", "content": f"Answer {i}: it is sunny."}]}
            for i in range(8)]  # fmt: skip
    rows[2]["conversations"][0]["content"] = "very long " * 400  # far beyond the tiny model's 512 tokens
    src = tmp_path / "magpie.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = tmp_path / "prep.py"
    line.write_text('SYSTEM = "Answer the question below."\n')
    extra = [f"prompts.path={src}", f"prompts.system_from={line}:SYSTEM", "prompts.shuffle=true", "prompts.limit=6"]
    run = _run(tiny_overrides, extra=extra)
    generate.run(run, progress=False)
    meta = json.loads((run.metrics_dir / "generate.json").read_text())
    facts = meta["prompt_set"]
    assert facts["records"] == 8 and facts["used"] == 6 and facts["system_added"] == 8 and facts["shuffle_seed"] == 42
    import random

    order = [str(i) for i in range(8)]
    random.Random(42).shuffle(order)
    assert "2" in order[:6] and order[:6] != [str(i) for i in range(6)]  # the shuffle keeps the long one
    want = [i for i in order[:6] if i != "2"]
    assert facts["skipped_long"] == ["2"]
    recs = read_jsonl(run.data_dir / "candidates.jsonl")
    assert sorted({r["prompt_id"] for r in recs}) == sorted(want)
    stage = run.stage_record("generate")
    assert stage["metrics"]["system_added"] == 8 and str(line) in stage["inputs"]
    select.run(run, progress=False)
    sft = read_jsonl(run.data_dir / "sft.jsonl")
    assert {r["prompt"][0]["content"] for r in sft} == {"Answer the question below."}
    assert len(read_jsonl(run.data_dir / "selection.jsonl")) == len(want)
