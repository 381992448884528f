"""Stage 02: embed the candidates with the target model itself, score centrality, apply a method.

Centrality of pool member j: ``c_j = mean_{k in pool, k != j} cos(e_j, e_k)``, with e the L2-normalised
pooled hidden state over the response tokens. Pool layout per prompt: columns 0..n-1 are the generated
candidates, column n is the original response. Empty (whitespace-only) candidates are left out of every
pool: they can be neither a target nor a rejected answer.

Ties (centralities within ``tie_tolerance``): the target is the lowest-index most-central candidate,
the rejected is the lowest-index least-central one, and the original's rank counts only pool members
strictly more central, so a tie never pushes the original down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selftrain import drift
from selftrain.config import EmbedderConfig, RunConfig
from selftrain.data import run_prompt_set
from selftrain.inference import prompt_token_counter
from selftrain.io import (
    DataError,
    read_jsonl,
    write_json,
    write_jsonl,
)
from selftrain.models import resolve_model_path
from selftrain.plotting import plt
from selftrain.runs import Run
from selftrain.schema import CONTROLS, DECISIONS
from selftrain.select.similarity import chrf_sim, cosine_sim, embedder_embeddings
from selftrain.select.utilities import UTILITIES, Pools

STAGE = "select"


# ------------------------------------------------------------------------------------------- maths


def centrality(emb: np.ndarray, mask: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Mean cosine of each pool member to the other members: `centrality_from_sim` of the cosines, in chunks of
    prompts so the (P, K, K) matrix is never held whole.

    emb: (P, K, d) L2-normalised embeddings; mask: (P, K) bool, True where the member is in the pool.
    Returns (P, K) float32: NaN outside the pool, 0.0 for a pool of one (nothing to compare with).
    """
    out = np.full(mask.shape, np.nan, dtype=np.float32)
    for s in range(0, emb.shape[0], chunk):
        e = emb[s : s + chunk].astype(np.float32, copy=False)
        out[s : s + chunk] = centrality_from_sim(np.matmul(e, e.transpose(0, 2, 1)), mask[s : s + chunk])
    return out


def centrality_from_sim(sim: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`centrality` for a given pairwise utility sim (P, K, K): member j's mean of sim[j, k] over the other pool
    members k (NaN outside the pool, 0.0 for a pool of one)."""
    s = sim.astype(np.float32, copy=True) * mask[:, None, :]
    idx = np.arange(s.shape[1])
    s[:, idx, idx] = 0.0
    others = mask.sum(1, keepdims=True).astype(np.float32) - 1.0
    c = s.sum(2) / np.maximum(others, 1.0)
    c[others[:, 0] <= 0] = 0.0
    return np.where(mask, c, np.nan).astype(np.float32)


def _without_original(
    emb: np.ndarray | None, c_full: np.ndarray, cand_valid: np.ndarray, to_orig: np.ndarray | None = None
) -> np.ndarray:
    """Centrality in the candidates-only pool, derived from the candidates + original pool without a
    second batched matmul: remove each candidate's utility against the original from its sum."""
    n = cand_valid.shape[1]
    n_valid = cand_valid.sum(1, keepdims=True).astype(np.float32)
    if to_orig is None:
        assert emb is not None  # without the utilities against the original, the embeddings give them
        to_orig = np.einsum("pkd,pd->pk", emb[:, :n].astype(np.float32, copy=False), emb[:, n].astype(np.float32))
    c = (c_full[:, :n] * n_valid - to_orig) / np.maximum(n_valid - 1.0, 1.0)
    c = np.where(n_valid > 1, c, 0.0)  # a pool of one has nobody to compare with
    out = np.full_like(c_full, np.nan)
    out[:, :n] = np.where(cand_valid, c, np.nan)
    return out


def _first_within(values: np.ndarray, valid: np.ndarray, tol: float, best: bool) -> np.ndarray:
    """Index of the first valid entry within tol of the row's max (best) or min; -1 for empty rows."""
    fill = -np.inf if best else np.inf
    v = np.where(valid, values, fill)
    ext = v.max(1) if best else v.min(1)
    hit = (v >= ext[:, None] - tol) if best else (v <= ext[:, None] + tol)
    hit &= valid
    idx = hit.argmax(1)
    idx[~valid.any(1)] = -1
    return idx


def control_pick(
    method: str, cand_valid: np.ndarray, lengths: np.ndarray | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Target and DPO-rejected candidate of a control arm (no utility), -1 where a prompt has no candidate:

    - random: a uniformly drawn valid candidate (numpy's default_rng(seed)); rejected: another drawn one;
    - longest: the most characters (first on ties); rejected: the shortest;
    - shortest: the fewest characters; rejected: the longest;
    - first: the first valid sample (sample 0 unless it is empty); rejected: the last valid sample.
    A prompt with one valid candidate gets no rejected answer (no pair)."""
    P, n = cand_valid.shape
    idx = np.arange(n)
    target, rejected = np.full(P, -1), np.full(P, -1)
    if method == "random":
        rng = np.random.default_rng(seed)
        keys = rng.random((P, n))  # one draw per (prompt, candidate): a random order of the pool
        order = np.argsort(np.where(cand_valid, keys, np.inf), axis=1, kind="stable")
        target, rejected = order[:, 0], order[:, 1] if n > 1 else np.full(P, -1)
    elif method in ("longest", "shortest"):
        if lengths is None:
            raise ValueError(f"method '{method}' needs the candidates' lengths")
        big = np.where(cand_valid, lengths, -1)
        small = np.where(cand_valid, lengths, np.iinfo(np.int64).max)
        longest, shortest = big.argmax(1), small.argmin(1)
        target, rejected = (longest, shortest) if method == "longest" else (shortest, longest)
    elif method == "first":
        target = np.where(cand_valid, idx, n).min(1)
        rejected = np.where(cand_valid, idx, -1).max(1)
    else:
        raise ValueError(f"unknown control method '{method}'")
    n_valid = cand_valid.sum(1)
    target = np.where(n_valid > 0, target, -1)
    rejected = np.where((n_valid > 1) & (rejected != target), rejected, -1)
    return target.astype(int), rejected.astype(int)


def select(
    emb: np.ndarray | None,
    cand_valid: np.ndarray,
    method: str,
    low_fraction: float = 0.5,
    tol: float = 1e-6,
    lengths: np.ndarray | None = None,
    seed: int = 0,
    sim: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Vectorised decisions for P prompts.

    emb: (P, n+1, d) normalised, last column = original; cand_valid: (P, n) bool (non-empty candidates);
    lengths: (P, n) characters (the length controls); seed: the random control's seed; sim: (P, n+1, n+1)
    pairwise utilities (selftrain.select.similarity) used instead of the embeddings' cosines (emb may then be None).
    Returns arrays: decision (str), target (candidate index, -1 = original or none), rejected
    (candidate index or -1), original_rank (1 = most central in candidates + original), pool_size,
    centrality (P, n+1) of the pool the method uses (original column NaN for candidate-only pools).
    """
    pool = sim if sim is not None else emb
    if pool is None:
        raise ValueError("select needs the embeddings (emb) or the pairwise utilities (sim)")
    P, K = pool.shape[:2]
    n = K - 1
    if cand_valid.shape != (P, n):
        raise ValueError(f"cand_valid has shape {cand_valid.shape}, expected {(P, n)}")
    with_orig = np.concatenate([cand_valid, np.ones((P, 1), bool)], axis=1)
    c_full = centrality_from_sim(sim, with_orig) if sim is not None else centrality(pool, with_orig)
    # The original's rank among candidates + original is a diagnostic for every method.
    n_valid = cand_valid.sum(1)
    higher = (np.where(cand_valid, c_full[:, :n], -np.inf) > c_full[:, n : n + 1] + tol).sum(1)
    original_rank = higher + 1
    pool_full = n_valid + 1
    low = original_rank > pool_full - np.floor(pool_full * low_fraction).astype(int)

    if method in ("drop-low", "fallback-original"):
        c = c_full
    elif method in ("central", "original", "baseline", *CONTROLS):
        c = _without_original(emb, c_full, cand_valid, None if sim is None else sim[:, :n, n])
    else:
        raise ValueError(f"unknown selection method '{method}'")
    best = _first_within(c[:, :n], cand_valid, tol, best=True)
    worst = _first_within(c[:, :n], cand_valid, tol, best=False)

    decision = np.full(P, "central", dtype=object)
    target = best.copy()
    if method == "original" or method == "baseline":
        decision[:] = "original"
        target[:] = -1
    elif method == "drop-low":
        decision[low] = "dropped"
        target[low] = -1
    elif method == "fallback-original":
        decision[low] = "fallback"
        target[low] = -1
    if method in CONTROLS:
        decision[:] = "control"
        target, worst = control_pick(method, cand_valid, lengths, seed)
    none = n_valid == 0
    if method != "original":
        decision[none] = "no_candidates"
        target[none] = -1
    rejected = np.where(np.isin(decision, ["dropped", "no_candidates"]), -1, worst)
    return {
        "decision": decision,
        "target": target,
        "rejected": rejected,
        "original_rank": original_rank,
        "pool_size": pool_full if method in ("drop-low", "fallback-original") else n_valid,
        "original_low": low,
        "centrality": c,
    }


# ------------------------------------------------------------------------------------------- stage


def _candidate_matrix(prompts: list[dict], cands: list[dict], n: int, path: Path) -> list[list[str]]:
    by_id: dict[str, dict[int, str]] = {}
    for r in cands:
        for key in ("prompt_id", "candidate_index", "text"):
            if key not in r:
                raise DataError(f"{path}: a record is missing field '{key}': {str(r)[:120]}")
        by_id.setdefault(str(r["prompt_id"]), {})[int(r["candidate_index"])] = r["text"]
    out = []
    for p in prompts:
        got = by_id.get(p["id"], {})
        if sorted(got) != list(range(n)):
            raise DataError(f"{path}: prompt '{p['id']}' has candidates {sorted(got)}, expected 0..{n - 1}")
        out.append([got[j] for j in range(n)])
    return out


def run(run: Run, progress: bool = True) -> pd.DataFrame:
    """Stage 02 for a run folder: selection table, sft.jsonl, dpo.jsonl, metrics and plots."""
    table_file = run.data_dir / "selection.jsonl"
    cfg = run.config
    if cfg.selection.method == "baseline":
        if not run.is_done(STAGE):
            run.skip_stage(STAGE, "baseline: no retraining, nothing to select")
        return pd.DataFrame()
    if run.is_done(STAGE):
        return pd.DataFrame(read_jsonl(table_file))
    cand_file = run.data_dir / "candidates.jsonl"
    run.require("generate")
    # rounds.start m0: round r trains on rounds 1..r-1's data again with its own (from M0), so they are inputs too
    earlier = {name: run.earlier_rounds(name) for name in ("sft.jsonl", "dpo.jsonl")}
    with run.stage(STAGE, inputs=[cand_file, *(p for _, p in earlier.values() if p is not None)]) as info:
        # The prompts stage 01 generated for: the same loading and context guard.
        folder = resolve_model_path(cfg.model.path, cfg.output.cache_dir)
        prompts = run_prompt_set(cfg, prompt_token_counter(folder))[0]
        n_all = cfg.generation.n
        texts = _candidate_matrix(prompts, read_jsonl(cand_file), n_all, cand_file)
        # The n-prefix: candidates 0..n-1 of each prompt (i.i.d. samples), then the original's column.
        n = cfg.selection.n or n_all
        valid = np.array([[bool(t.strip()) for t in row[:n]] for row in texts], dtype=bool).reshape(len(prompts), n)
        pool_valid = np.concatenate([valid, np.ones((len(prompts), 1), bool)], axis=1)
        pools = [[*row[:n], p["original"]] for p, row in zip(prompts, texts, strict=True)]
        utility = cfg.selection.utility
        scored = UTILITIES[utility](Pools(cfg, prompts, texts, pools, pool_valid, n, cand_file, progress))
        emb, sim = scored.emb, scored.sim
        info["numerics"] = scored.numerics
        texts = [row[:n] for row in texts]
        lengths = np.array([[len(t) for t in row] for row in texts], dtype=np.int64).reshape(len(prompts), n)
        sel = select(
            emb, valid, cfg.selection.method, cfg.selection.low_fraction, cfg.selection.tie_tolerance, lengths,
            cfg.seed, sim,
        )  # fmt: skip
        rows, sft, dpo, identical = _records(prompts, texts, sel)
        sft, dpo = earlier["sft.jsonl"][0] + sft, earlier["dpo.jsonl"][0] + dpo
        outputs = [
            write_jsonl(table_file, rows),
            write_jsonl(run.data_dir / "sft.jsonl", sft),
            write_jsonl(run.data_dir / "dpo.jsonl", dpo),
        ]
        df = pd.DataFrame(rows)
        metrics = summarise(df, cfg.selection.method, len(sft), len(dpo), identical)
        metrics["embedding_cache"] = scored.cache_key  # lets `selftrain clean` tell used cache entries from stale ones
        metrics["utility"] = utility
        metrics.update(scored.metrics)
        metrics["pool_candidates"] = n
        if cfg.round is not None:  # study.rounds: the drift monitors of this round's candidates
            metrics["drift"] = pool_drift(cfg, texts, valid, sel, progress)
            before = {"sft_examples": len(earlier["sft.jsonl"][0]), "dpo_pairs": len(earlier["dpo.jsonl"][0])}
            metrics["earlier_rounds"] = before  # rounds.start m0: what of sft_examples / dpo_pairs came before
        outputs.append(write_json(run.metrics_dir / "select.json", metrics))
        run.save_figure(plot_selection(df, cfg.selection.method, utility), "select_overview")
        info["outputs"] = outputs
        info["metrics"] = {k: metrics[k] for k in ("sft_examples", "dpo_pairs", "dpo_skipped_identical")}
    return df


def pool_drift(
    cfg: RunConfig, texts: list[list[str]], valid: np.ndarray, sel: dict[str, np.ndarray], progress: bool = False
) -> dict[str, Any]:
    """Diversity of a round's candidates and the margin of its selected ones (selftrain.drift): cosines under the
    embedded WordLlama embedder whatever `selection.utility` is (one fixed geometry across rounds), sentence chrF."""
    emb, _ = embedder_embeddings(texts, EmbedderConfig(), cfg.output.cache_dir, progress)
    n = valid.shape[1]
    monitors = drift.pool_monitors(
        texts, valid, cosine_sim(emb), chrf_sim(texts, progress), sel["centrality"][:, :n], sel["target"]
    )
    return {"embedder": EmbedderConfig().path, **monitors}


def _records(prompts: list[dict], texts: list[list[str]], sel: dict[str, np.ndarray]) -> tuple[list, list, list, int]:
    rows, sft, dpo, identical = [], [], [], 0
    for i, (p, cands) in enumerate(zip(prompts, texts, strict=True)):
        dec, t, r = sel["decision"][i], int(sel["target"][i]), int(sel["rejected"][i])
        target_text = None
        if dec in ("central", "control"):
            target_text = cands[t]
        elif dec in ("original", "fallback"):
            target_text = p["original"]
        c = sel["centrality"][i]
        lengths = [len(x) for x in cands if x.strip()]
        rows.append(
            {
                "id": p["id"],
                "decision": dec,
                "target": "original" if dec in ("original", "fallback") else (t if t >= 0 else None),
                "rejected": r if r >= 0 else None,
                "original_rank": int(sel["original_rank"][i]),
                "original_low": bool(sel["original_low"][i]),
                "pool_size": int(sel["pool_size"][i]),
                "valid_candidates": len(lengths),
                "centrality": [None if np.isnan(x) else round(float(x), 5) for x in c],
                "target_chars": len(target_text) if target_text is not None else None,
                "mean_candidate_chars": round(float(np.mean(lengths)), 1) if lengths else None,
                "original_chars": len(p["original"]),
            }
        )
        if target_text is None:
            continue
        prompt_msgs = p["messages"]
        sft.append(
            {"id": p["id"], "prompt": prompt_msgs, "completion": [{"role": "assistant", "content": target_text}]}
        )
        if r >= 0:
            if cands[r] == target_text:
                identical += 1
            else:
                dpo.append(
                    {
                        "id": p["id"],
                        "prompt": prompt_msgs,
                        "chosen": [{"role": "assistant", "content": target_text}],
                        "rejected": [{"role": "assistant", "content": cands[r]}],
                    }
                )
    return rows, sft, dpo, identical


def summarise(df: pd.DataFrame, method: str, n_sft: int, n_dpo: int, identical: int) -> dict[str, Any]:
    counts = df["decision"].value_counts().to_dict()
    sel_len = df["target_chars"].dropna()
    return {
        "method": method,
        "prompts": len(df),
        "decisions": {d: int(counts.get(d, 0)) for d in DECISIONS},
        "sft_examples": n_sft,
        "dpo_pairs": n_dpo,
        "dpo_skipped_identical": identical,
        "original_rank_mean": round(float(df["original_rank"].mean()), 3),
        "original_in_low_part": int(df["original_low"].sum()),
        "mean_selected_chars": round(float(sel_len.mean()), 1) if len(sel_len) else None,
        "mean_candidate_chars": round(float(df["mean_candidate_chars"].dropna().mean()), 1),
        "mean_original_chars": round(float(df["original_chars"].mean()), 1),
    }


UTILITY_TITLES = {
    "self-embedding": "Centrality (mean cosine to the pool)",
    "embedder": "Centrality (mean embedder cosine to the pool)",
    "chrf": "Centrality (mean chrF to the pool)",
    "judge": "Judge utility (score, or mean win rate)",
}


def plot_selection(df: pd.DataFrame, method: str, utility: str = "self-embedding") -> Any:
    """2x2 overview: centrality distribution, rank of the original, decisions, selected vs all lengths.
    None for an empty table (`baseline` selects nothing)."""
    if not len(df):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    n = len(df["centrality"].iloc[0]) - 1
    cmat = np.array([[np.nan if x is None else x for x in row] for row in df["centrality"]], dtype=float)
    cand = cmat[:, :n][~np.isnan(cmat[:, :n])]
    bins = np.histogram_bin_edges(cand, bins=30) if len(cand) else 10
    ax.hist(cand, bins=bins, alpha=0.7, label="all candidates")
    # target holds a candidate index, "original" or None (a float column when it mixes ints and None)
    tgt = [cmat[i, int(t)] for i, t in enumerate(df["target"]) if isinstance(t, (int, float)) and not pd.isna(t)]
    if tgt:
        ax.hist(tgt, bins=bins, alpha=0.7, label="selected")
    ax.set_title(UTILITY_TITLES.get(utility, "Centrality"))
    ax.set_xlabel("centrality")
    ax.legend()

    ax = axes[0, 1]
    ranks = df["original_rank"].value_counts().sort_index()
    ax.bar(ranks.index.astype(str), ranks.values, color="tab:purple")
    ax.set_title("Rank of the original among candidates + original")
    ax.set_xlabel("rank (1 = most central)")
    ax.set_ylabel("prompts")

    ax = axes[1, 0]
    counts = df["decision"].value_counts().reindex(list(DECISIONS), fill_value=0)
    bars = ax.bar(counts.index, counts.values, color=["tab:green", "tab:blue", "tab:orange", "tab:red", "tab:gray"])
    ax.bar_label(bars)
    ax.set_title(f"Decisions ({method})")
    ax.tick_params(axis="x", rotation=20)

    ax = axes[1, 1]
    data = [df["mean_candidate_chars"].dropna(), df["target_chars"].dropna(), df["original_chars"]]
    ax.boxplot([d for d in data], tick_labels=["all candidates\n(mean per prompt)", "selected", "original"])
    ax.set_title("Length: does centrality favour long answers?")
    ax.set_ylabel("characters")
    fig.tight_layout()
    return fig
