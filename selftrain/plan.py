"""Memory planner: `python -m selftrain plan --model <params> --gpus G --gpu-mem 80`.

An estimate per GPU of what SFT and DPO hold, for each way of spreading a run over G GPUs, and which fit. The
assumptions are the project's GPU path (stage 03/04 load the model in bf16 and train it with AdamW):

- weights 2 bytes/param, gradients 2, AdamW's two moments 2 + 2 (bf16 like the weights): 8 bytes/param;
  `precision="mixed"` (float32 master weights under bf16 autocast, as the Trainer's `bf16: true` on a model
  loaded in float32, and DeepSpeed / FSDP mixed precision): 4 + 4 + 8 = 16 bytes/param;
- DPO's reference model: 2 bytes/param, none with `precompute_ref_log_probs: true` (its log-probs are computed
  once before training and the model released);
- activations per micro-batch of T tokens (DPO: chosen + rejected, 2x the rows): without checkpointing
  34 * T * hidden bytes per layer (Korthikanti et al. 2022 with flash attention, whose s^2 term is gone); with
  `gradient_checkpointing` 2 * T * hidden per layer (the saved layer inputs) plus one layer's 34 * T * hidden;
  plus the logits in float32: 4 * T * vocab (the loss upcasts them);
- presets: `single` (one GPU holds everything), `ddp` (every GPU a full copy; per GPU as single), `fsdp` and
  `zero3` (weights, gradients, optimizer states and the reference model sharded over the G GPUs; activations
  stay per GPU). A preset fits when its total is at most 90% of the GPU's memory (CUDA context, allocator
  fragmentation and temporary buffers take the rest).

These are estimates for choosing a preset, not a guarantee: measure the chosen one (bench/bench_train_gpu.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
HEADROOM = 0.9
PRESETS = ("single", "ddp", "fsdp", "zero3")

# Public config.json facts of the llm-jp-3 models (hidden, layers, intermediate, vocab, heads), used when the
# model's own config.json is not on this machine. 150m: its model card (12 layers, 512 hidden, 8 heads, FFN 2048;
# untied embeddings: 2 x 99,487 x 512 embedding parameters) and the vocabulary padded to 99,584 as in every
# llm-jp-3 config.json (the 305 MB bf16 safetensors file fits that count).
KNOWN_SHAPES: dict[str, dict[str, int]] = {
    "llm-jp/llm-jp-3-150m": {"hidden_size": 512, "num_hidden_layers": 12, "intermediate_size": 2048,
                             "vocab_size": 99584, "num_attention_heads": 8, "num_key_value_heads": 8},
    "llm-jp/llm-jp-3-980m": {"hidden_size": 1536, "num_hidden_layers": 20, "intermediate_size": 5376,
                             "vocab_size": 99584, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 192},
    "llm-jp/llm-jp-3-1.8b": {"hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 7168,
                             "vocab_size": 99584, "num_attention_heads": 16, "num_key_value_heads": 16},
    "llm-jp/llm-jp-3-3.7b": {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192,
                             "vocab_size": 99584, "num_attention_heads": 24, "num_key_value_heads": 24},
    "llm-jp/llm-jp-3-13b": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 13824,
                            "vocab_size": 99584, "num_attention_heads": 40, "num_key_value_heads": 40},
}  # fmt: skip


@dataclass
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Shape:
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(
            hidden=h, layers=int(cfg["num_hidden_layers"]), intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]), heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads), tied=bool(cfg.get("tie_word_embeddings", False)),
        )  # fmt: skip

    def params(self) -> int:
        """Llama-style parameter count: embeddings (+ an untied head), attention, SwiGLU MLP, RMSNorms."""
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return emb + self.layers * per_layer + self.hidden


def model_shape(path: str) -> Shape:
    """The shape of a model: its config.json (a local folder or the Hugging Face cache), else KNOWN_SHAPES."""
    base = path.removesuffix("-instruct3").removesuffix("-instruct2").removesuffix("-instruct")
    folder = Path(path)
    candidates = [folder / "config.json"]
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(path, "config.json")
        if isinstance(hit, str):
            candidates.append(Path(hit))
    except (ImportError, ValueError):
        pass
    for c in candidates:
        if c.is_file():
            return Shape.from_config(json.loads(c.read_text()))
    if base in KNOWN_SHAPES:
        return Shape.from_config(KNOWN_SHAPES[base])
    raise FileNotFoundError(
        f"{path}: no config.json found (local folder or Hugging Face cache) and no known shape; download the "
        "model's config.json (huggingface-cli download <id> config.json) or point model.path at its folder"
    )


def estimate(
    shape: Shape,
    kind: str,
    preset: str,
    gpus: int,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    precompute_ref: bool = False,
    precision: str = "bf16",
) -> dict[str, float]:
    """Bytes per GPU of one preset: weights, gradients, optimizer, reference, activations, total."""
    if precision not in ("bf16", "mixed"):
        raise ValueError(f"precision must be bf16 or mixed, got {precision!r}")
    n = shape.params()
    w = 2 if precision == "bf16" else 4
    shard = gpus if preset in ("fsdp", "zero3") else 1
    rows = micro_batch * (2 if kind == "dpo" else 1)
    t = rows * seq_len
    layer_full = 34 * t * shape.hidden
    acts = (2 * t * shape.hidden * shape.layers + layer_full) if checkpointing else layer_full * shape.layers
    acts += 4 * t * shape.vocab
    out = {
        "weights": w * n / shard,
        "gradients": w * n / shard,
        "optimizer": 2 * w * n / shard,
        "reference": (0 if precompute_ref else 2 * n / shard) if kind == "dpo" else 0.0,
        "activations": float(acts),
    }
    out["total"] = sum(out.values())
    return out


def plan(
    shape: Shape,
    gpus: int,
    gpu_mem_gb: float,
    micro_batch: int = 1,
    seq_len: int = 4096,
    checkpointing: bool = True,
    precompute_ref: bool = False,
    precision: str = "bf16",
) -> list[dict[str, Any]]:
    """One row per (kind, preset): GiB per component, the total, and whether it fits."""
    rows = []
    for kind in ("sft", "dpo"):
        for preset in PRESETS:
            if preset == "single" and gpus != 1:
                continue
            est = estimate(shape, kind, preset, gpus, micro_batch, seq_len, checkpointing, precompute_ref, precision)
            row = {"kind": kind, "preset": preset, **{k: round(v / GIB, 1) for k, v in est.items()}}
            row["fits"] = est["total"] <= HEADROOM * gpu_mem_gb * GIB
            rows.append(row)
    return rows


def format_plan(rows: list[dict[str, Any]], shape: Shape, gpus: int, gpu_mem_gb: float) -> str:
    head = (f"{shape.params() / 1e9:.2f}B parameters on {gpus} GPU(s) of {gpu_mem_gb:g} GB "
            f"(fits: total <= {HEADROOM:.0%} of a GPU); GiB per GPU")  # fmt: skip
    cols = ["kind", "preset", "weights", "gradients", "optimizer", "reference", "activations", "total", "fits"]
    lines = [head, "  ".join(f"{c:>11}" for c in cols)]
    for r in rows:
        lines.append("  ".join(f"{('yes' if r[c] else 'no') if c == 'fits' else r[c]!s:>11}" for c in cols))
    for kind in ("sft", "dpo"):
        ok = [r["preset"] for r in rows if r["kind"] == kind and r["fits"]]
        lines.append(f"{kind}: " + (f"fits with {', '.join(ok)}" if ok else "fits with no preset: more GPUs, LoRA, "
                                    "or a shorter sequence"))  # fmt: skip
    return "\n".join(lines)
