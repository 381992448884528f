"""Memory and disk planner: `python -m selftrain plan --model M | --study FILE [--gpus G --gpu-mem GB]`.

What one GPU holds while stage 03 (SFT) or 04 (DPO) trains, modelled on what runs there (TRL 1.16's trainers,
transformers' Llama, PyTorch autocast), and what a study leaves on disk. Three parts, each checked where it can be:

Model state, bytes per parameter N (`training.precision`):
- `mixed` (the default on a GPU): float32 master weights 4, float32 gradients 4, AdamW's two float32 moments 8:
  16 bytes/param; plus, while a forward pass runs under bf16 autocast, the bf16 copy of every layer weight that
  autocast casts and caches (2 bytes per linear-layer parameter, kept to the backward pass when the layer's
  activations are kept: autocast's cache holds casts of leaf tensors that require grad until the autocast region
  ends, and each linear layer saves its bf16 weight for its input gradient);
- `bf16` (pure bf16, only when asked): 2 + 2 + 4 = 8 bytes/param, no copies;
- `fp32` (no autocast): 16 bytes/param, no copies;
- DPO's reference model: 2 bytes/param (loaded apart in bf16; float32 under `fp32`), 0 with
  `precompute_ref_log_probs: true`;
- LoRA (`training.use_lora`): the frozen weights only (the adapters, their gradients and AdamW moments are well
  under 1% of the model and not counted), no reference copy (peft turns the adapters off for it).
- `fsdp` / `zero3` shard all of it over the G GPUs; `single` / `ddp` hold a full copy per GPU.

Activations of one micro-batch: R rows of S tokens, T = R * S (DPO: chosen + rejected, R = 2 x the micro-batch,
every row padded to the longest pair of the batch, planned at `max_length`; SFT with `packing: true`: padding-free
rows of `max_length` tokens flattened into one). Bytes saved for the backward pass, per token and layer, with h the
hidden size, I the MLP width, q / kv the query / key-value widths (heads x head_dim) and a the heads:
- `mixed`: 26h + 4q + 4kv + 8I + 4a + 8 (the residual stream and both RMSNorms stay float32 because the weights
  are float32; each of q/k/v and gate/up casts its float32 input to bf16 separately; q, k, v, the attention
  output and the SwiGLU intermediates are bf16; 4a: the attention's float32 log-sum-exp; 8: the norms' rsqrt);
- `bf16`: 16h + 4q + 4kv + 8I + 4a + 8; `fp32`: 24h + 8q + 8kv + 16I + 4a + 8.
  For llm-jp-3 (q = kv = h, I = 3.5h) `mixed` is 62h, `bf16` 52h: Korthikanti et al. 2022 count 34h for GPT's
  blocks in 16 bits (flash attention, no dropout masks); SwiGLU's wider MLP and the float32 norms are the
  difference. The constants are measured, not assumed: tests/test_plan.py sums the tensors autograd saves for
  the backward pass of a small Llama on the CPU and compares them with this formula.
- attention masks: with `sdpa` and padded rows (DPO) transformers passes a boolean (R, 1, S, S) mask, which
  SDPA converts per layer into a bias of the query's dtype that its kernel saves: 2 * S^2 bytes per row and layer
  (4 under fp32); padding-free SFT rows under `sdpa` get one block-diagonal (T x T) mask (transformers'
  find_packed_sequence_indices); `eager` keeps each head's attention weights (6 * a * S^2 bytes per row and
  layer, 4 under fp32); with a mask, or under `eager`, transformers repeats k and v to every head first (kv = q
  above); `flex_attention` and `flash_attention_2` hold no mask;
- gradient checkpointing keeps each layer's input (4h bytes per token, 2h in bf16) and recomputes one layer at
  a time in the backward pass;
- the last norm (8h, 6h in bf16) and TRL's fused LM head: the head never materialises the (T x vocab) logits: it
  saves its input rows (4h, 2h in bf16) and two float32 numbers per token, and works in tiles of 4,096 tokens x
  32,768 vocabulary entries (bf16 under autocast); its backward adds a float32 gradient of its input (4h per
  token) and of its weight (4 * vocab * h) (trl/kernels/chunked_logprob.py, `ChunkedLogProbFunction`);
- transient working sets: the backward pass of one layer, T * (8h + 6I) bytes (4h + 6I in bf16, 8h + 12I in fp32),
  and DPO's reference forward (no grad, bf16) T * (12h + 4q + 4kv + 6I) plus its masks and head tile, on top of
  the policy's saved activations.
The peak is the largest of: the end of the forward pass (saved activations + autocast's weight copies), DPO's
reference forward, the LM head's backward and one layer's backward.

A stage fits when its peak is at most 90% of the GPU's memory (CUDA context, allocator fragmentation and
cuBLAS / NCCL workspaces take the rest). These are estimates: `bench/gpu_check.py` measures DPO's peak on a GPU
against them.

Disk (rough): a Trainer checkpoint holds the weights in the training dtype (float32 under `mixed`) and the AdamW
moments (8 bytes/param; 4 in bf16): 12 bytes/param under `mixed`; the Trainer writes the next one before it
removes the oldest, so a stage holds up to `save_total_limit` + 1 while it trains (removed once its final model
is written unless `training.keep_trainer_checkpoints`); a GPU run saves its final model in bf16 (float32 under
`fp32`; a CPU run in the float32 it trained in); the generation cache holds n candidates per prompt (planned at
`max_new_tokens`, about 4 bytes of UTF-8 JSON a token, Japanese text included), each run folder a copy of them,
the embedding cache (n + 1) float32 vectors of the hidden size per prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from selftrain.config import RunConfig

GIB = 1024**3
GB = 1000**3
HEADROOM = 0.9
PRESETS = ("single", "ddp", "fsdp", "zero3")
PRECISIONS = ("mixed", "bf16", "fp32")
# TRL's fused LM head (trl/kernels/chunked_logprob.py): token rows and vocabulary columns of one projection tile.
HEAD_TOKEN_TILE = 4096
HEAD_VOCAB_TILE = 32768
# TRL 1.16's SFTConfig / DPOConfig defaults for what a trainer block may leave out (tests/test_plan.py checks them
# against TRL's own dataclasses).
TRL_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": 1024,
    "gradient_checkpointing": True,
    "packing": False,
    "padding_free": False,
    "packing_strategy": "bfd",
    "precompute_ref_log_probs": False,
    "save_total_limit": None,
    "save_strategy": "steps",
    "save_steps": 500,
    "num_train_epochs": 3.0,
    "max_steps": -1,
}
# Stage 01's cache: bytes of a candidate record beyond its text, and of JSON text per generated token (rough: UTF-8
# Japanese is 3 bytes a character, llm-jp-3's tokenizer averages one to two characters a token).
RECORD_BYTES = 160
TEXT_BYTES_PER_TOKEN = 4

# Public config.json facts of the llm-jp-3 models (hidden, layers, intermediate, vocab, heads, dtype), used when the
# model's own config.json is not on this machine. 150m: its model card (12 layers, 512 hidden, 8 heads, FFN 2048;
# untied embeddings: 2 x 99,487 x 512 embedding parameters) and the vocabulary padded to 99,584 as in every
# llm-jp-3 config.json (the 305 MB bf16 safetensors file fits that count).
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "llm-jp/llm-jp-3-150m": {"hidden_size": 512, "num_hidden_layers": 12, "intermediate_size": 2048,
                             "vocab_size": 99584, "num_attention_heads": 8, "num_key_value_heads": 8,
                             "torch_dtype": "bfloat16"},
    "llm-jp/llm-jp-3-980m": {"hidden_size": 1536, "num_hidden_layers": 20, "intermediate_size": 5376,
                             "vocab_size": 99584, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 192,
                             "torch_dtype": "bfloat16"},
    "llm-jp/llm-jp-3-1.8b": {"hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 7168,
                             "vocab_size": 99584, "num_attention_heads": 16, "num_key_value_heads": 16,
                             "torch_dtype": "bfloat16"},
    "llm-jp/llm-jp-3-3.7b": {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192,
                             "vocab_size": 99584, "num_attention_heads": 24, "num_key_value_heads": 24,
                             "torch_dtype": "bfloat16"},
    "llm-jp/llm-jp-3-13b": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 13824,
                            "vocab_size": 99584, "num_attention_heads": 40, "num_key_value_heads": 40,
                            "torch_dtype": "bfloat16"},
}  # fmt: skip
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class DoesNotFit(RuntimeError):
    """A training stage's plan needs more GPU memory than the GPU has; the message names the setting to change."""


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
    dtype_bytes: int = 2  # of the weights as config.json says they are stored (M0's files)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Shape:
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        return cls(
            hidden=h, layers=int(cfg["num_hidden_layers"]), intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]), heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads), tied=bool(cfg.get("tie_word_embeddings", False)),
            dtype_bytes=DTYPE_BYTES.get(dtype, 4),
        )  # fmt: skip

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linear(self) -> int:
        """Parameters of one decoder layer's linear projections (what autocast casts to bf16)."""
        return self.hidden * (2 * self.q + 2 * self.kv) + 3 * self.hidden * self.intermediate

    def params(self) -> int:
        """Llama-style parameter count: embeddings (+ an untied head), attention, SwiGLU MLP, RMSNorms."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return emb + self.layers * (self.layer_linear() + 2 * self.hidden) + self.hidden


@dataclass
class Setting:
    """What one training stage runs, as far as memory goes (read from a trainer block by `stage_setting`)."""

    kind: str  # sft | dpo
    micro_batch: int = 1
    seq_len: int = 4096
    checkpointing: bool = True
    precompute_ref: bool = False
    precision: str = "mixed"
    attn: str = "sdpa"  # transformers' attn_implementation (None = its default for Llama, sdpa)
    padding_free: bool = False  # SFT rows flattened into one, no padding
    accumulation: int = 1
    lora: bool = False  # training.use_lora: frozen weights, no reference copy (peft turns the adapters off)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.kind not in ("sft", "dpo"):
            raise ValueError(f"kind must be sft or dpo, got {self.kind!r}")
        if self.micro_batch < 1 or self.seq_len < 1:
            raise ValueError(
                f"micro-batch and sequence length must be at least 1, got {self.micro_batch}, {self.seq_len}"
            )


def model_shape(path: str, cache_dir: str = ".cache/selftrain") -> Shape:
    """The shape of a model: its config.json (the project's own models, a local folder, the Hugging Face cache),
    else KNOWN_SHAPES."""
    if path.startswith(("tiny:", "embedded:")):  # built or converted here (a second / about 30 s, once)
        from selftrain.models import resolve_model_path

        return Shape.from_config(json.loads((resolve_model_path(path, cache_dir) / "config.json").read_text()))
    base = path.removesuffix("-instruct3").removesuffix("-instruct2").removesuffix("-instruct")
    from selftrain.paths import resolve_path

    candidates = [resolve_path(path) / "config.json"]
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


# ------------------------------------------------------------------------------------------- memory


def _act_bytes(shape: Shape, s: Setting) -> dict[str, int]:
    """Per-token bytes: a layer's saved set, a checkpointed layer's input, the last norm + the LM head's input and
    its per-token numbers (token ids, targets, rsqrt, log-sum-exp, entropy: 32), one layer's backward working set
    (see the module docstring)."""
    h, q, i, a = shape.hidden, shape.q, shape.intermediate, shape.heads
    # With a mask (sdpa on padded rows) or eager attention transformers repeats k/v to every head first.
    kv = q if s.attn == "eager" or (s.attn == "sdpa" and _has_mask(s)) else shape.kv
    lse = 0 if s.attn == "eager" else 4 * a
    if s.precision == "mixed":
        layer, inp, tail, ws = 26 * h + 4 * q + 4 * kv + 8 * i, 4 * h, 12 * h, 8 * h + 6 * i
    elif s.precision == "bf16":
        layer, inp, tail, ws = 16 * h + 4 * q + 4 * kv + 8 * i, 2 * h, 8 * h, 4 * h + 6 * i
    else:
        layer, inp, tail, ws = 24 * h + 8 * q + 8 * kv + 16 * i, 4 * h, 12 * h, 8 * h + 12 * i
    return {"layer": layer + lse + 8, "input": inp, "tail": tail + 32, "ws": ws}


FLASH_LIKE = ("flex_attention", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def _has_mask(s: Setting) -> bool:
    return s.attn not in FLASH_LIKE


def _mask_bytes(shape: Shape, s: Setting) -> tuple[float, float]:
    """(bytes a layer saves for its attention scores or mask, bytes of the boolean mask the model holds once)."""
    if not _has_mask(s):
        return 0.0, 0.0
    rows = s.micro_batch * (2 if s.kind == "dpo" else 1)
    if s.padding_free:  # one row of every token: a block-diagonal mask over all of them
        sq, n = float(rows * s.seq_len) ** 2, 1
    else:  # worst case: some rows padded, so every row gets a mask
        sq, n = float(s.seq_len) ** 2, rows
    if s.attn == "eager":  # each head's float32 softmax output and the copy the value product casts or keeps
        return n * sq * shape.heads * (4 if s.precision == "fp32" else 6), n * sq
    return n * sq * (4 if s.precision == "fp32" else 2), n * sq  # sdpa: the mask as an additive bias, per layer


def saved_bytes(shape: Shape, s: Setting, preset: str = "single") -> dict[str, float]:
    """What a micro-batch keeps from its forward pass to its backward pass: `saved` (every tensor autograd saves,
    the bf16 weight copies of a layer included: what tests/test_plan.py measures on the CPU), `copies` (autocast's
    bf16 weight copies, of which `saved` holds all without checkpointing), `mask` (what checkpointed layers hold
    outside autograd: their mask and rotary cos/sin arguments), `one_layer` (a checkpointed layer's recomputed
    set)."""
    L, t = shape.layers, float(s.micro_batch * (2 if s.kind == "dpo" else 1) * s.seq_len)
    c = _act_bytes(shape, s)
    mask_layer, mask_once = _mask_bytes(shape, s)
    # Autocast's bf16 copies of the layer weights (ZeRO-3 runs a bf16 engine instead: gathered bf16 weights).
    copies = 2.0 * L * shape.layer_linear() if s.precision == "mixed" and preset != "zero3" else 0.0
    rope = 2.0 * s.seq_len * shape.head_dim * (4 if s.precision != "bf16" else 2)  # cos and sin, per position
    tail = t * c["tail"]
    if s.checkpointing:  # the mask and cos/sin are the checkpointed layers' arguments, held outside autograd
        return {
            "saved": L * t * c["input"] + tail,
            "copies": copies,
            "mask": mask_once + rope,
            "one_layer": t * c["layer"] + mask_layer + copies / L,
            "mask_layer": mask_layer,
        }
    return {
        "saved": L * (t * c["layer"] + mask_layer) + copies + tail + rope,
        "copies": copies,
        "mask": 0.0,
        "one_layer": 0.0,
        "mask_layer": mask_layer,
    }


def estimate(
    shape: Shape,
    kind: str,
    preset: str,
    gpus: int,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    precompute_ref: bool = False,
    precision: str = "mixed",
    attn: str = "sdpa",
    padding_free: bool = False,
) -> dict[str, float]:
    """Bytes per GPU of one stage under one preset: weights, gradients, optimizer, reference, activations (the
    peak of everything that depends on the batch), total."""
    return estimate_setting(
        shape,
        Setting(kind, micro_batch, seq_len, checkpointing, precompute_ref, precision, attn, padding_free),
        preset,
        gpus,
    )


def estimate_setting(shape: Shape, s: Setting, preset: str = "single", gpus: int = 1) -> dict[str, Any]:
    """`estimate` for a Setting; `peak_phase` names the moment of the peak."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if gpus < 1:
        raise ValueError(f"GPUs must be at least 1, got {gpus}")
    n = shape.params()
    shard = gpus if preset in ("fsdp", "zero3") else 1
    w = 2 if s.precision == "bf16" else 4
    t = float(s.micro_batch * (2 if s.kind == "dpo" else 1) * s.seq_len)
    sv = saved_bytes(shape, s, preset)
    held = sv["saved"] + sv["mask"]
    gathered = 2 * 2.0 * shape.layer_linear() if shard > 1 else 0.0  # sharded presets: two layers gathered
    tile = min(t, HEAD_TOKEN_TILE) * min(shape.vocab, HEAD_VOCAB_TILE) * (4 if s.precision == "fp32" else 2)
    phases = {
        # checkpointed: autocast's cache holds every layer's copy until the forward's autocast region ends
        "forward": held + (sv["copies"] if s.checkpointing else 0.0),
        # the head's float32 input gradient, and its weight gradient unless the weights are frozen (LoRA)
        "head backward": held + 4 * t * shape.hidden + (0.0 if s.lora else 4.0 * shape.vocab * shape.hidden) + tile,
        "layer backward": held + sv["one_layer"] + t * _act_bytes(shape, s)["ws"],
    }
    if s.kind == "dpo" and not s.precompute_ref and not s.lora:  # the bf16 reference, one layer at a time, no grad
        ref = t * (12 * shape.hidden + 4 * shape.q + 4 * shape.kv + 6 * shape.intermediate)
        phases["reference forward"] = held + ref + sv["mask_layer"] + tile
    peak_phase = max(phases, key=lambda k: phases[k])
    out: dict[str, Any] = {
        "weights": w * n / shard,
        # LoRA: the adapters' weights, gradients and AdamW moments are not counted (well under 1% of the model)
        "gradients": 0.0 if s.lora else w * n / shard,
        "optimizer": 0.0 if s.lora else 2 * w * n / shard,
        # DPO's reference: bf16 under mixed and bf16 (selftrain.train.precision_plan), float32 under fp32
        "reference": (0.0 if s.precompute_ref or s.lora else (4 if s.precision == "fp32" else 2) * n / shard)
        if s.kind == "dpo"
        else 0.0,
        "activations": phases[peak_phase] + gathered,
    }
    out["total"] = sum(out.values())
    out["peak_phase"] = peak_phase
    return out


def plan(
    shape: Shape,
    gpus: int,
    gpu_mem_gb: float,
    micro_batch: int = 1,
    seq_len: int = 4096,
    checkpointing: bool = True,
    precompute_ref: bool = False,
    precision: str = "mixed",
) -> list[dict[str, Any]]:
    """One row per (kind, preset): GiB per component, the total, and whether it fits."""
    _check_gpus(gpus, gpu_mem_gb * GIB)
    rows = []
    for kind in ("sft", "dpo"):
        for preset in PRESETS:
            if preset == "single" and gpus != 1:
                continue
            est = estimate(shape, kind, preset, gpus, micro_batch, seq_len, checkpointing, precompute_ref, precision)
            row = {
                "kind": kind,
                "preset": preset,
                **{k: round(v / GIB, 1) for k, v in est.items() if k != "peak_phase"},
            }
            row["fits"] = est["total"] <= HEADROOM * gpu_mem_gb * GIB
            rows.append(row)
    return rows


def format_plan(rows: list[dict[str, Any]], shape: Shape, gpus: int, gpu_mem_gb: float) -> str:
    head = (f"{shape.params() / 1e9:.2f}B parameters on {gpus} GPU(s) of {gpu_mem_gb:g} GiB "
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


def _check_gpus(gpus: int, gpu_mem_bytes: float) -> None:
    if gpus < 1:
        raise ValueError(f"GPUs must be at least 1, got {gpus}")
    if not gpu_mem_bytes > 0:
        raise ValueError(f"GPU memory must be more than 0, got {gpu_mem_bytes / GIB:g} GiB")


# ------------------------------------------------------------------------------------------- a run's own stages


def _block_value(block: dict[str, Any], key: str) -> Any:
    return block[key] if key in block and block[key] is not None else TRL_DEFAULTS[key]


def stage_setting(cfg: RunConfig, kind: str) -> Setting:
    """What a run's training.sft / training.dpo block asks of the GPU."""
    block = dict(getattr(cfg.training, kind))
    packing = kind == "sft" and bool(_block_value(block, "packing"))
    wrapped = _block_value(block, "packing_strategy") == "wrapped"  # TRL: BFD packing is padding-free, wrapped not
    if "max_length" in block:  # None: TRL truncates nothing, so rows reach the model's context length
        seq_len = int(block["max_length"] or cfg.model.max_model_len)
    else:
        seq_len = int(TRL_DEFAULTS["max_length"])
    return Setting(
        kind=kind,
        micro_batch=int(_block_value(block, "per_device_train_batch_size")),
        seq_len=seq_len,
        checkpointing=bool(_block_value(block, "gradient_checkpointing")),
        precompute_ref=kind == "dpo" and bool(_block_value(block, "precompute_ref_log_probs")),
        precision=cfg.training.precision,
        attn=getattr(cfg.training, f"{kind}_attn_implementation") or "sdpa",
        padding_free=kind == "sft" and (bool(_block_value(block, "padding_free")) or (packing and not wrapped)),
        accumulation=int(_block_value(block, "gradient_accumulation_steps")),
        lora=cfg.training.use_lora,
    )


def launch_preset(cfg: RunConfig) -> str:
    """The sharding of a run's training: `single` in the kernel, else what its accelerate config says."""
    if not cfg.training.launch:
        return "single"
    from selftrain.config import accelerate_config, load_yaml

    acc = load_yaml(accelerate_config(cfg.training.launch))
    dist = str(acc.get("distributed_type", "NO")).upper()
    if dist == "FSDP":
        return "fsdp"
    if dist == "DEEPSPEED" and int((acc.get("deepspeed_config") or {}).get("zero_stage", 0)) == 3:
        return "zero3"
    return "ddp" if dist in ("MULTI_GPU", "MULTI_CPU", "DEEPSPEED") else "single"


def processes(cfg: RunConfig, gpus: int) -> int:
    """GPUs a training stage spreads over: one in the kernel; launch_processes (else every GPU) x nodes."""
    if not cfg.training.launch:
        return 1
    return (cfg.training.launch_processes or gpus) * (cfg.training.launch_nodes or 1)


def run_shape(cfg: RunConfig) -> Shape:
    return model_shape(cfg.model.path, cfg.output.cache_dir)


def _fixes(shape: Shape, s: Setting, preset: str, world: int, limit: float) -> list[tuple[str, float]]:
    """Changes that make a stage fit, as words and the new bytes: the switches alone (checkpointing, then a
    precomputed reference), a smaller micro-batch alone (more accumulation, the same effective batch), and only
    when neither fits both together. Empty when nothing fits one GPU."""
    k = f"training.{s.kind}"

    def first(tries: list[tuple[list[str], Setting]]) -> tuple[str, float] | None:
        for words, t in tries:
            total = estimate_setting(shape, t, preset, world)["total"]
            if total <= limit:
                return "set " + " and ".join(words), total
        return None

    switches: list[tuple[list[str], Setting]] = []
    on: list[str] = []
    if not s.checkpointing:
        on.append(f"{k}.gradient_checkpointing: true")
        switches.append((list(on), replace(s, checkpointing=True)))
    if s.kind == "dpo" and not s.precompute_ref:
        on.append(f"{k}.precompute_ref_log_probs: true")
        switches.append((list(on), replace(s, checkpointing=True, precompute_ref=True)))

    def smaller(base: Setting, extra: list[str]) -> list[tuple[list[str], Setting]]:
        out, mb = [], s.micro_batch
        while mb > 1:
            mb //= 2
            words = [
                f"{k}.per_device_train_batch_size: {mb} with gradient_accumulation_steps: "
                f"{s.accumulation * s.micro_batch // mb}"
            ]
            out.append((words + extra, replace(base, micro_batch=mb)))
        return out

    found = [x for x in (first(switches), first(smaller(s, []))) if x]
    if found or not on:
        return found
    both = first(smaller(replace(s, checkpointing=True, precompute_ref=s.kind == "dpo"), on))
    return [both] if both else []


def _describe_setting(s: Setting, preset: str) -> str:
    ref = f", reference {'precomputed' if s.precompute_ref else 'in memory'}" if s.kind == "dpo" else ""
    return (
        f"per_device_train_batch_size {s.micro_batch} x gradient_accumulation_steps {s.accumulation} at max_length "
        f"{s.seq_len} ({s.precision}, checkpointing {'on' if s.checkpointing else 'off'}{ref}, {s.attn}, {preset})"
    )


def _short_setting(s: Setting, preset: str) -> str:
    ref = f", ref {'pre' if s.precompute_ref else 'bf16'}" if s.kind == "dpo" else ""
    ckpt = "on" if s.checkpointing else "off"
    return f"{s.micro_batch} x {s.accumulation} at {s.seq_len}, {s.precision}, ckpt {ckpt}{ref}, {preset}"


def stage_plan(cfg: RunConfig, kind: str, gpus: int, gpu_mem_bytes: float) -> dict[str, Any]:
    """A run's training stage against a GPU: its setting, preset, bytes per GPU, the usable limit, whether it fits
    and, when it does not, the changes that make it fit (words, bytes)."""
    _check_gpus(gpus, gpu_mem_bytes)
    shape, s = run_shape(cfg), stage_setting(cfg, kind)
    preset, world = launch_preset(cfg), processes(cfg, gpus)
    total = estimate_setting(shape, s, preset, world)["total"]
    limit = HEADROOM * gpu_mem_bytes
    fixes = [] if total <= limit else _fixes(shape, s, preset, world, limit)
    return {"setting": s, "preset": preset, "bytes": total, "limit": limit, "fits": total <= limit, "fixes": fixes}


def _fix_words(p: dict[str, Any]) -> str:
    if p["fixes"]:
        return " or ".join(f"{words} (-> {total / GIB:.1f} GiB)" for words, total in p["fixes"])
    return (
        "no micro-batch fits one GPU: shorten max_length, train LoRA adapters (training.use_lora) or shard over "
        "more GPUs (training.launch: zero3)"
    )


def describe(cfg: RunConfig, kind: str, gpus: int, gpu_mem_bytes: float) -> str:
    """One line: a run's training stage, what it needs per GPU and whether it fits."""
    p = stage_plan(cfg, kind, gpus, gpu_mem_bytes)
    verdict = "fits" if p["fits"] else f"does not fit: {_fix_words(p)}"
    return (
        f"{kind}: {_describe_setting(p['setting'], p['preset'])}: {p['bytes'] / GIB:.1f} GiB of "
        f"{p['limit'] / GIB:.1f} GiB usable: {verdict}"
    )


def check_fits(cfg: RunConfig, kind: str, gpus: int, gpu_mem_bytes: float) -> dict[str, Any]:
    """Refuse (DoesNotFit, one line) a training stage whose plan needs more than HEADROOM of a GPU of
    `gpu_mem_bytes`, naming the model, the stage and the setting to change; else return the plan's figures.
    Stage 03/04 calls it on a GPU before anything is loaded there. A model whose shape cannot be read (no
    config.json, not a Llama-like config) is not planned: the stage goes on and says so."""
    try:
        p = stage_plan(cfg, kind, gpus, gpu_mem_bytes)
    except (FileNotFoundError, KeyError) as e:
        return {"skipped": f"no memory plan: {e}"}
    if not p["fits"]:
        raise DoesNotFit(
            f"{cfg.model.name} {kind}: training.{kind}.{_describe_setting(p['setting'], p['preset'])} needs "
            f"{p['bytes'] / GIB:.1f} GiB of a {gpu_mem_bytes / GIB:.1f} GiB GPU ({HEADROOM:.0%} usable: "
            f"{p['limit'] / GIB:.1f} GiB): {_fix_words(p)}"
        )
    return {"gib": round(p["bytes"] / GIB, 2), "usable_gib": round(p["limit"] / GIB, 2), "preset": p["preset"]}


# ------------------------------------------------------------------------------------------- disk


def checkpoint_bytes(shape: Shape, precision: str) -> float:
    """One Trainer checkpoint: weights in the training dtype + AdamW's two moments (scheduler, RNG: small)."""
    w = 2 if precision == "bf16" else 4
    return float(shape.params() * 3 * w)


def final_model_bytes(shape: Shape, precision: str = "mixed") -> float:
    """A final model as a GPU run saves it: bf16 under mixed and bf16, float32 under fp32 (a CPU run saves the
    float32 it trained in)."""
    return float(shape.params() * (4 if precision == "fp32" else 2))


def trained_kinds(cfg: RunConfig) -> list[str]:
    if cfg.selection.method == "baseline":
        return []
    order = {"sft+dpo": ["sft", "dpo"], "sft": ["sft"], "dpo": ["dpo"]}[cfg.training.order]
    return [k for k in order if k in cfg.stages]


def _checkpoints(cfg: RunConfig, kind: str, world: int) -> tuple[int, int] | None:
    """Trainer checkpoints of a stage: (at most at once while it trains, left when it ends); None when no bound can
    be read. The Trainer saves every save_steps steps and at the end, and removes the oldest beyond
    save_total_limit only after it has written the next one."""
    block = dict(getattr(cfg.training, kind))
    if str(_block_value(block, "save_strategy")).lower().endswith("no"):
        return 0, 0
    limit = _block_value(block, "save_total_limit")
    steps: int | None = None
    if int(_block_value(block, "max_steps")) > 0:
        steps = int(_block_value(block, "max_steps"))
    elif cfg.prompts.limit:  # at most one example per prompt
        rows = int(_block_value(block, "per_device_train_batch_size")) * world
        per_step = rows * int(_block_value(block, "gradient_accumulation_steps"))
        steps = math.ceil(cfg.prompts.limit / per_step) * math.ceil(float(_block_value(block, "num_train_epochs")))
    saves = None if steps is None else steps // max(int(_block_value(block, "save_steps")), 1) + 1
    if saves is None:
        return None if limit is None else (int(limit) + 1, int(limit))
    if limit is None:
        return saves, saves
    return min(int(limit) + 1, saves), min(int(limit), saves)


def generation_bytes(cfg: RunConfig) -> float | None:
    """Stage 01's candidates for a model (rough: every candidate at max_new_tokens); None without prompts.limit."""
    if not cfg.prompts.limit:
        return None
    per = cfg.generation.max_new_tokens * TEXT_BYTES_PER_TOKEN + RECORD_BYTES
    return float(cfg.prompts.limit * cfg.generation.n * per)


def embedding_bytes(cfg: RunConfig, shape: Shape) -> float | None:
    """Stage 02's embeddings: n candidates + the original per prompt, float32 vectors of the hidden size."""
    if not cfg.prompts.limit:
        return None
    return float(cfg.prompts.limit * (cfg.generation.n + 1) * shape.hidden * 4)


def cell_disk(cfg: RunConfig, shape: Shape, world: int = 1) -> dict[str, Any]:
    """Bytes one cell leaves on disk (final models, its copy of the candidates and its training data, kept
    checkpoints) and holds at most while one of its stages trains."""
    kinds = trained_kinds(cfg)
    ckpt = checkpoint_bytes(shape, cfg.training.precision)
    peak, kept, unbounded = 0.0, 0.0, False
    for k in kinds:
        counts = _checkpoints(cfg, k, world)
        if counts is None:
            unbounded = True
            continue
        peak = max(peak, counts[0] * ckpt)
        if cfg.training.keep_trainer_checkpoints:
            kept += counts[1] * ckpt
    gen = generation_bytes(cfg) or 0.0
    # sft.jsonl holds one target per prompt, dpo.jsonl two: about 3 / n of the candidates
    data = gen * (1 + 3 / max(cfg.generation.n, 1)) if kinds else gen
    return {
        "final_models": len(kinds) * final_model_bytes(shape, cfg.training.precision),
        "run_data": data,
        "kept_checkpoints": kept,
        "checkpoints_peak": peak,
        "checkpoint": ckpt,
        "unbounded": unbounded,
    }


# ------------------------------------------------------------------------------------------- a study


def plan_study(study_path: str, gpus: int = 1, gpu_mem_gb: float = 80.0) -> dict[str, Any]:
    """Every cell of a study (model x method x sweep point x seed): memory per GPU of its training stages and the
    disk it needs, the caches per model, totals, and whether it fits."""
    from selftrain.config import load_study, resolve_run_config
    from selftrain.io import sha256_json

    _check_gpus(gpus, gpu_mem_gb * GIB)
    study, _, path = load_study(study_path)
    cells: list[dict[str, Any]] = []
    caches: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    seeds: list[int | None] = [*study.seeds] or [None]
    for model in study.models:
        for method in study.methods:
            for seed in seeds:
                for point in study.points():
                    cfg = resolve_run_config(model, method, path, replicate=seed, point=point)
                    if model not in models:
                        shape = run_shape(cfg)
                        models[model] = {"shape": shape, "weights": float(shape.params() * shape.dtype_bytes)}
                    shape = models[model]["shape"]
                    name = method + (f".seed{seed}" if seed is not None else "")
                    name += "".join(f"@{k}={v}" for k, v in point.items())
                    stages = {kind: stage_plan(cfg, kind, gpus, gpu_mem_gb * GIB) for kind in trained_kinds(cfg)}
                    disk = cell_disk(cfg, shape, processes(cfg, gpus))
                    cells.append({"model": model, "cell": name, "stages": stages, "disk": disk})
                    # one generation (and embedding) cache per model, prompts and sampling, shared by the methods
                    sampling = cfg.generation.model_dump(exclude={"backend", "batch_size", "shards"})
                    key = sha256_json([cfg.model.path, cfg.prompts.model_dump(), sampling])
                    entry = {
                        "model": model,
                        "generation": generation_bytes(cfg),
                        "embedding": embedding_bytes(cfg, shape),
                    }
                    caches.setdefault(key, entry)
    limit = HEADROOM * gpu_mem_gb * GIB
    return {
        "study": study.name,
        "path": str(path),
        "gpus": gpus,
        "gpu_mem_gb": gpu_mem_gb,
        "limit": limit,
        "cells": cells,
        "caches": list(caches.values()),
        "models": models,
    }


def _gb(x: float | None) -> str:
    return "?" if x is None else f"{x / GB:.1f}"


def format_study(p: dict[str, Any]) -> str:
    """The study plan as text: a memory line per cell and trained stage, disk per cell and model, totals, verdict."""
    limit = p["limit"] / GIB
    lines = [
        f"plan for {p['path']} (study {p['study']}): {p['gpus']} GPU(s) of {p['gpu_mem_gb']:g} GiB; a stage fits when "
        f"it needs at most {HEADROOM:.0%} of one: {limit:.1f} GiB",
        "",
        "GPU memory per GPU (GiB): micro-batch x accumulation at max_length, precision, checkpointing, DPO reference",
        f"  {'model':<16}{'cell':<20}{'stage':<6}{'setting':<50}{'GiB':>6}  fits",
    ]
    for c in p["cells"]:
        if not c["stages"]:
            lines.append(f"  {c['model']:<16}{c['cell']:<20}{'-':<6}no training")
        for kind, st in c["stages"].items():
            verdict = "yes" if st["fits"] else f"no: {_fix_words(st)}"
            setting = _short_setting(st["setting"], st["preset"])
            lines.append(f"  {c['model']:<16}{c['cell']:<20}{kind:<6}{setting:<50}{st['bytes'] / GIB:>6.1f}  {verdict}")
    lines += [
        "",
        "Disk (GB, rough): final models as a GPU run saves them (bf16; float32 under precision fp32 or on a CPU);",
        "Trainer checkpoints in the training dtype with AdamW's moments, removed once the stage's final model is",
        "written (training.keep_trainer_checkpoints keeps them); M0 weights in their own dtype",
        f"  {'model':<16}{'cell':<20}{'final models':>13}{'run data':>10}{'kept ckpts':>11}"
        f"{'ckpts while training':>22}",
    ]
    kept, peak, unbounded = 0.0, 0.0, False
    for c in p["cells"]:
        d = c["disk"]
        during = "unbounded" if d["unbounded"] else _gb(d["checkpoints_peak"])
        lines.append(
            f"  {c['model']:<16}{c['cell']:<20}{_gb(d['final_models']):>13}{_gb(d['run_data']):>10}"
            f"{_gb(d['kept_checkpoints']):>11}{during:>22}"
        )
        kept += d["final_models"] + d["run_data"] + d["kept_checkpoints"]
        peak = max(peak, d["checkpoints_peak"])
        unbounded |= d["unbounded"]
    lines += ["", f"  {'model':<16}{'M0 weights':>12}{'generations':>13}{'embeddings':>12}{'one checkpoint':>16}"]
    for name, m in p["models"].items():
        mine = [x for x in p["caches"] if x["model"] == name]
        unknown = any(x["generation"] is None for x in mine)
        gen = sum(x["generation"] or 0.0 for x in mine)
        emb = sum(x["embedding"] or 0.0 for x in mine)
        ckpt = next(c["disk"]["checkpoint"] for c in p["cells"] if c["model"] == name)
        gen_s, emb_s = ("?", "?") if unknown else (_gb(gen), _gb(emb))
        lines.append(f"  {name:<16}{_gb(m['weights']):>12}{gen_s:>13}{emb_s:>12}{_gb(ckpt):>16}")
        kept += m["weights"] + gen + emb
    stages = [st for c in p["cells"] for st in c["stages"].values()]
    bad = [f"{c['model']}/{c['cell']} {k}" for c in p["cells"] for k, st in c["stages"].items() if not st["fits"]]
    worst = max((st["bytes"] for st in stages), default=0.0)
    more = " (more: some stages set no save_total_limit)" if unbounded else ""
    lines += [
        "",
        f"total: {len(p['cells'])} cells, {len(stages)} training stages; the largest needs {worst / GIB:.1f} GiB a GPU",
        f"disk: {kept / GB:.1f} GB kept (M0 weights, caches, run data, final models) + up to {peak / GB:.1f} GB of "
        f"Trainer checkpoints while a stage trains{more}; cells running at once (Slurm) each add their own",
    ]
    if bad:
        listed = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        lines.append(f"fits: no: {len(bad)} stage(s) need more than {limit:.1f} GiB: {listed}")
    else:
        lines.append("fits: yes")
    return "\n".join(lines)
