"""Pairwise utilities over each prompt's pool (candidates + original) for MBR-style selection (stage 02).

Every utility returns ``sim`` of shape (P, K, K) with ``sim[p, j, k]`` the utility of member j measured against
member k (for an asymmetric one such as chrF: j the hypothesis, k the reference); the selection methods then take
a member's mean utility against the rest of its pool (`select.centrality_from_sim`).

- ``self-embedding``: cosine of the model's own pooled hidden states, optionally centred first: raw cosines of
  a decoder's states sit in a narrow band (0.74-0.99 on the demo), one common direction dominating. ``pool``
  subtracts each prompt's pool mean (valid members only), ``corpus`` the mean over every valid member of every
  prompt; the vectors are L2-normalised again after.
- ``embedder``: cosine of an external sentence embedder's vectors of the answers alone (`selection.embedder`):
  WordLlama's English token embeddings shipped in the PyPI package ``wordllama`` (the embedded default), or any
  sentence-transformers model saved in a local folder; centring as above.
- ``chrf``: sentence chrF (character n-grams 1..6, beta 2, whitespace removed: sacrebleu's defaults), the lexical
  MBR utility, in [0, 1].
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from selftrain.config import EmbedderConfig
from selftrain.io import load_cached_npy, sha256_file, sha256_json, write_npy
from selftrain.models import ModelNotAvailable
from selftrain.paths import resolve_path

CENTERING = ("none", "pool", "corpus")


def centre(emb: np.ndarray, valid: np.ndarray, mode: str) -> np.ndarray:
    """emb (P, K, d) normalised, valid (P, K): subtract the pool's or the corpus's mean of valid members, then
    L2-normalise again (a zero vector stays zero). 'none' returns emb unchanged."""
    if mode == "none":
        return emb
    if mode not in CENTERING:
        raise ValueError(f"unknown centring '{mode}' (known: {', '.join(CENTERING)})")
    e = emb.astype(np.float32, copy=True)
    w = valid[..., None].astype(np.float32)
    if mode == "pool":
        mean = (e * w).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1.0)
    else:
        mean = (e * w).sum((0, 1), keepdims=True) / max(float(w.sum()), 1.0)
    e = (e - mean) * w
    norm = np.linalg.norm(e, axis=-1, keepdims=True)
    return np.divide(e, norm, out=np.zeros_like(e), where=norm > 0)


def cosine_sim(emb: np.ndarray) -> np.ndarray:
    """(P, K, d) normalised -> (P, K, K) cosines."""
    e = emb.astype(np.float32, copy=False)
    return np.matmul(e, e.transpose(0, 2, 1))


def chrf_pool(texts: list[str], order: int = 6, beta: float = 2.0) -> np.ndarray:
    """(K, K) sentence chrF / 100 with texts[j] as hypothesis and texts[k] as reference, as sacrebleu's CHRF()
    computes it (effective-order averaging of precision and recall over the orders both sides have)."""
    lines = ["".join(t.split()) for t in texts]
    K = len(lines)
    hyp = np.zeros((order, K))
    match = np.zeros((order, K, K))
    for n in range(1, order + 1):
        counts = [Counter(s[i : i + n] for i in range(len(s) - n + 1)) for s in lines]
        vocab: dict[str, int] = {}
        for c in counts:
            for g in c:
                vocab.setdefault(g, len(vocab))
        m = np.zeros((K, max(len(vocab), 1)), dtype=np.int32)
        for j, c in enumerate(counts):
            for g, v in c.items():
                m[j, vocab[g]] = v
        hyp[n - 1] = m.sum(1)
        match[n - 1] = np.minimum(m[:, None, :], m[None, :, :]).sum(-1)
    h = hyp[:, :, None]  # the hypothesis (row j) side
    r = hyp[:, None, :]  # the reference (column k) side
    both = (h > 0) & (r > 0)
    prec = np.where(both, match / np.maximum(h, 1), 0.0)
    rec = np.where(both, match / np.maximum(r, 1), 0.0)
    eff = both.sum(0)
    avg_p = np.divide(prec.sum(0), eff, out=np.zeros((K, K)), where=eff > 0)
    avg_r = np.divide(rec.sum(0), eff, out=np.zeros((K, K)), where=eff > 0)
    f2 = beta**2
    den = f2 * avg_p + avg_r
    return np.divide((1 + f2) * avg_p * avg_r, den, out=np.zeros((K, K)), where=den > 0)


def chrf_sim(texts: list[list[str]], progress: bool = False) -> np.ndarray:
    """(P, K, K) chrF utilities of every prompt's pool (texts: P rows of K strings)."""
    from tqdm.auto import tqdm

    return np.stack([chrf_pool(row) for row in tqdm(texts, desc="chrF", disable=not progress)]).astype(np.float32)


# ------------------------------------------------------------------------------------------- embedder

Encoder = Callable[[list[str], int], np.ndarray]


def _wordllama() -> tuple[Callable[[], Encoder], dict[str, Any]]:
    try:
        import wordllama
        from safetensors import safe_open
        from tokenizers import Tokenizer
        from wordllama.inference import WordLlamaInference
    except ImportError as e:
        raise ModelNotAvailable(
            f"selection.embedder.path embedded:wordllama needs `pip install wordllama` ({e})"
        ) from None
    root = Path(wordllama.__file__).parent
    weights, tok = (
        root / "weights" / "l2_supercat_256.safetensors",
        root / "tokenizers" / "l2_supercat_tokenizer_config.json",
    )
    for f in (weights, tok):
        if not f.is_file():
            raise ModelNotAvailable(f"{f}: missing from the installed wordllama package (reinstall it)")

    def build() -> Encoder:
        # Built from the package's own files: WordLlama.load() looks for the tokenizer under a folder name the
        # wheel does not have and then downloads it from the hub.
        with safe_open(str(weights), framework="np") as f:
            table = f.get_tensor("embedding.weight")
        model = WordLlamaInference(table, Tokenizer.from_file(str(tok)))
        return lambda texts, batch_size: model.embed(texts, norm=True, batch_size=batch_size)

    from importlib.metadata import version

    return build, {"embedder": "wordllama", "version": version("wordllama"), "weights": sha256_file(weights)}


def _sentence_transformers(folder: Path) -> tuple[Callable[[], Encoder], dict[str, Any]]:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ModelNotAvailable(
            f"selection.embedder.path {folder} needs `pip install sentence-transformers` ({e})"
        ) from None

    def build() -> Encoder:
        model = SentenceTransformer(str(folder), local_files_only=True)
        return lambda texts, batch_size: model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
        )

    files = sorted(f for f in folder.rglob("*") if f.is_file())
    fp = [(str(f.relative_to(folder)), f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    return build, {"embedder": "sentence-transformers", "files": fp}


def load_embedder(cfg: EmbedderConfig) -> tuple[Callable[[], Encoder], dict[str, Any]]:
    """(build() -> encode(texts, batch_size) -> L2-normalised (N, d), fingerprint) of `selection.embedder.path`:
    the fingerprint is cheap, the model is built only when something is to be embedded."""
    if cfg.path.startswith("embedded:"):  # the params check allows embedded:wordllama only
        return _wordllama()
    folder = resolve_path(cfg.path)
    if not folder.is_dir():
        raise ModelNotAvailable(
            f"selection.embedder.path: {folder} is not a folder; give a sentence-transformers model saved locally "
            "(nothing is downloaded at run time) or embedded:wordllama"
        )
    return _sentence_transformers(folder)


def embedder_embeddings(
    texts: list[list[str]], cfg: EmbedderConfig, cache_dir: str, progress: bool = False
) -> tuple[np.ndarray, str]:
    """(P, K, d) normalised embeddings of every pool member's text (a zero vector for a blank one) and the cache
    key; cached under <cache_dir>/embeddings by the embedder's fingerprint and the texts."""
    from tqdm.auto import tqdm

    P, K = len(texts), len(texts[0]) if texts else 0
    flat = [t for row in texts for t in row]
    build, fingerprint = load_embedder(cfg)
    key = "embedder-" + sha256_json({"embedder": fingerprint, "texts": sha256_json(flat)})[:16]
    cache = resolve_path(cache_dir) / "embeddings" / f"{key}.npy"  # the stem is the key `selftrain clean` reads
    cached = load_cached_npy(cache, "embedder")  # None: none, or not the file written (computed again, replaced)
    if cached is not None:
        return cached.reshape(P, K, -1), key
    unique = sorted({t for t in flat if t.strip()})  # each distinct answer once
    encode = build()  # only on a cache miss: a cached pool loads no model
    chunk = max(cfg.batch_size * 16, 256)
    parts = [encode(unique[s : s + chunk], cfg.batch_size) for s in tqdm(
        range(0, len(unique), chunk), desc="embedder", unit="chunk", disable=not progress
    )]  # fmt: skip
    vecs = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 1), np.float32)
    vecs = np.nan_to_num(vecs)
    where = {t: i for i, t in enumerate(unique)}
    emb = np.zeros((len(flat), vecs.shape[1]), dtype=np.float32)
    for i, t in enumerate(flat):
        if t in where:
            emb[i] = vecs[where[t]]
    write_npy(cache, emb, record=True)
    return emb.reshape(P, K, -1), key
