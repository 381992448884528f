"""Stages 03 (SFT) and 04 (DPO): TRL trainers on the selected data, with resumable checkpoints.

The `training.sft` / `training.dpo` blocks of the params are passed to TRL's `SFTConfig` / `DPOConfig`
unchanged (TRL field names). Checkpoints live outside the run folder, under
``<checkpoints_dir>/<study>/<model>/<method>/<version>/<stage>/``: ``trainer/checkpoint-N`` while training
(each marked ``_COMPLETE`` once fully written, so a half-written one is never resumed from) and
``final/`` (safetensors, tokenizer, chat template, ``_SUCCESS``) at the end.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from selftrain import plan
from selftrain.config import RunConfig, check_trainer_keys
from selftrain.inference import cpu_has_bf16
from selftrain.io import follow_umask, read_jsonl, sha256_file, write_json
from selftrain.plotting import plt
from selftrain.runs import Run
from selftrain.schema import read_log
from selftrain.train import cpu_head, launch


class TrainingError(RuntimeError):
    """Training cannot start or went wrong; the message says why and what to change."""


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Device:
    """The hardware a trainer is built for: a CUDA GPU or not, and whether it multiplies bf16 natively. Tests
    build the GPU configuration on a CPU with `Device(cuda=True, bf16=True)`; runs take `Device.here()`."""

    cuda: bool
    bf16: bool

    @classmethod
    def here(cls) -> Device:
        import torch

        if torch.cuda.is_available():
            return cls(cuda=True, bf16=torch.cuda.is_bf16_supported())
        return cls(cuda=False, bf16=cpu_has_bf16())


def precision_plan(precision: str, block: dict[str, Any], device: Device) -> dict[str, Any]:
    """How a stage trains: the dtype its weights are loaded (and updated) in, the Trainer's precision flags, and
    the dtype of DPO's separate reference model.

    `mixed` (the default): float32 master weights and AdamW states, matmuls under bf16 autocast where the device
    multiplies bf16 natively (fp16 with loss scaling on an older GPU), as LLM-jp's bf16-mixed and transformers'
    AMP. Pure bf16 weights would lose every update below half a bf16 step: at DPO's 5e-7 about 1% of the weights
    move at all. `bf16`: pure bf16 weights and optimizer, only when asked (recorded). `fp32`: no autocast. The
    params' own `bf16`/`fp16` keys win for the autocast flags. On a GPU under `mixed` DPO's reference model (never
    updated) is held in bf16, half the memory, as the 16-bit weights the autocast matmuls use."""
    import torch

    if precision not in ("mixed", "bf16", "fp32"):
        raise TrainingError(f"training.precision must be mixed, bf16 or fp32, got {precision!r}")
    if precision == "bf16" and device.cuda and not device.bf16:
        raise TrainingError("training.precision bf16: this GPU has no bf16; use mixed (fp16 autocast) or fp32")
    flags: dict[str, Any] = {}
    if precision == "mixed":
        flags = {"bf16": device.bf16, "fp16": device.cuda and not device.bf16}
    elif precision == "bf16":
        flags = {"bf16": True, "fp16": False}
    else:
        flags = {"bf16": False, "fp16": False}
    if "bf16" in block or "fp16" in block:
        flags = {}
    if not device.cuda:
        # A CPU run says so: transformers refuses bf16 without a GPU otherwise, and accelerate's launched processes
        # then form a gloo group (MULTI_CPU) instead of looking for NCCL.
        flags["use_cpu"] = True
        if "dataloader_pin_memory" not in block:
            flags["dataloader_pin_memory"] = False  # nothing to pin to on a CPU-only machine
    weights = torch.bfloat16 if precision == "bf16" else torch.float32
    half = precision == "mixed" and device.cuda and device.bf16
    # On a GPU the final model is saved in bf16, what stages 05/06 run it in there (and half the disk); on a CPU
    # in the float32 it trained in, so the CPU path's numbers stay what they were.
    return {"precision": precision, "weights": weights, "flags": flags,
            "reference": torch.bfloat16 if half else weights, "save": torch.bfloat16 if half else weights}  # fmt: skip


# ------------------------------------------------------------------------------------------- paths


def checkpoints_dir(run: Run, stage: str) -> Path:
    """Where a stage's trainer state and final model live (see Run.checkpoints_dir)."""
    return run.checkpoints_dir(stage)


def _complete_checkpoints(trainer_dir: Path) -> list[Path]:
    if not trainer_dir.is_dir():
        return []
    cks = [p for p in trainer_dir.glob("checkpoint-*") if (p / "_COMPLETE").is_file()]
    return sorted(cks, key=lambda p: int(p.name.split("-")[1]))


def _completion_callback() -> Any:
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        """Runs after the Trainer has written a checkpoint in full: mark it usable for resuming."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ck.is_dir() and state.is_world_process_zero:
                (ck / "_COMPLETE").write_text(f"{state.global_step}\n")

    return MarkComplete()


# ------------------------------------------------------------------------------------------- batch checks


def check_batch(batch: dict[str, Any], tok: Any) -> dict[str, Any]:
    """The end-of-turn token is trained on and no sequence starts with two BOS tokens.

    Works on SFT batches (labels; padded or padding-free) and DPO batches (completion_mask). A batch where
    no sequence has the end-of-turn token in its labels is a systematic bug (pad == eos, a template
    without it): an error.
    """
    import torch

    ids = batch["input_ids"]
    if "labels" in batch:
        labels = batch["labels"]
    else:
        labels = torch.where(batch["completion_mask"].bool(), ids, torch.full_like(ids, -100))
    if "attention_mask" not in batch and "position_ids" in batch:
        # Padding-free: one flattened row; each sequence starts where its position id is 0.
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        spans = list(zip(starts[:-1], starts[1:], strict=True))
        ids = torch.nn.utils.rnn.pad_sequence([ids[0, a:b] for a, b in spans], batch_first=True)
        labels = torch.nn.utils.rnn.pad_sequence(
            [labels[0, a:b] for a, b in spans], batch_first=True, padding_value=-100
        )
        first = torch.zeros(ids.shape[0], dtype=torch.long)
    else:
        first = batch["attention_mask"].long().argmax(1)  # works for left or right padding
    eos = tok.eos_token_id
    rows_with_eos = int(((labels == eos).sum(dim=1) > 0).sum())
    double_bos = 0
    if tok.bos_token_id is not None and ids.shape[1] > 1:
        rows = torch.arange(ids.shape[0])
        nxt = (first + 1).clamp(max=ids.shape[1] - 1)
        double_bos = int(((ids[rows, first] == tok.bos_token_id) & (ids[rows, nxt] == tok.bos_token_id)).sum())
    report = {"rows": int(ids.shape[0]), "rows_with_eos_label": rows_with_eos, "double_bos_rows": double_bos}
    if rows_with_eos == 0:
        raise TrainingError(
            f"the end-of-turn token {tok.eos_token!r} is in the labels of none of the {ids.shape[0]} sequences "
            "of the first batch: the model would never learn to stop (pad == eos, or a chat template that "
            "does not close the assistant turn with eos)"
        )
    if double_bos:
        raise TrainingError(f"{double_bos} sequences start with two BOS tokens (chat template + tokenizer)")
    return report


# ------------------------------------------------------------------------------------------- training


def _load_dataset(path: Path, kind: str) -> Any:
    from datasets import Dataset

    recs = read_jsonl(path)
    cols = ("prompt", "completion") if kind == "sft" else ("prompt", "chosen", "rejected")
    return Dataset.from_list([{c: r[c] for c in cols} for r in recs]), len(recs)


def _peft_config(cfg: RunConfig) -> Any:
    if not cfg.training.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **cfg.training.lora)


def _save_final(trainer: Any, tok: Any, out: Path) -> Path:
    """Save merged weights (LoRA merged in) + tokenizer + chat template, atomically via rename.

    Under several processes only rank 0 writes; a sharded model (FSDP, ZeRO-3) is first gathered whole by every
    rank through the Trainer's own save_model."""
    tmp = out.parent / f".{out.name}.tmp"
    main = trainer.args.process_index == 0
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    if sharded:
        trainer.save_model(str(tmp))  # every rank takes part in the gather; rank 0 writes
    elif main:
        model = trainer.model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        save_dtype = getattr(trainer, "selftrain_precision", {}).get("save")
        if save_dtype is not None and model.dtype != save_dtype:
            model = model.to(save_dtype)  # training is over: the float32 masters have served
        model.save_pretrained(tmp, safe_serialization=True)
    if main:
        tok.save_pretrained(tmp)
        (tmp / "_SUCCESS").write_text("ok\n")
        follow_umask(tmp)  # safetensors writes 0600: a group sharing checkpoints could not read the model
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    trainer.accelerator.wait_for_everyone()
    return out


def train_stage(run: Run, kind: str, callbacks: list[Any] | None = None, progress: bool = True) -> pd.DataFrame:
    """Run SFT (kind='sft') or DPO (kind='dpo') for a run folder; returns the trainer's log history.

    In the kernel by default; with `training.launch` in a child process group started by `accelerate launch`
    (selftrain.train.launch), whose rank 0 hands back the same result; only this process writes the run folder."""
    stage = kind
    log_file = run.metrics_dir / f"{kind}_log.json"
    cfg = run.config
    order = cfg.training.order
    if cfg.selection.method == "baseline" or (kind == "sft" and order == "dpo") or (kind == "dpo" and order == "sft"):
        if not run.is_done(stage):
            why = "baseline: no retraining" if cfg.selection.method == "baseline" else f"training.order is {order}"
            run.skip_stage(stage, why)
        return pd.DataFrame()
    if run.is_done(stage):
        return pd.DataFrame(read_log(run.dir, kind))
    run.require("select")
    if kind == "dpo" and order == "sft+dpo":
        run.require("sft", " (DPO starts from the SFT model)")
    data_file = run.data_dir / ("sft.jsonl" if kind == "sft" else "dpo.jsonl")
    check_trainer_keys(cfg, default_source=str(run.dir / "params.resolved.yaml"))

    with run.stage(stage, inputs=[data_file]) as info:
        import torch

        if torch.cuda.is_available():  # a stage its plan says will not fit is refused before anything is loaded
            plan.check_fits(cfg, kind, torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory)
        n = len(read_jsonl(data_file))
        if n == 0:
            raise TrainingError(
                f"{data_file}: no {'examples' if kind == 'sft' else 'preference pairs'} to train on "
                f"(method '{cfg.selection.method}' kept none; see metrics/select.json)"
            )
        # DPO starts from (and is referenced to) the SFT model of this run, else the run's starting model (M0; in a
        # round the previous round's final model, or M0 under rounds.start m0): TRL's reference is that start.
        start = run.final_model() if kind == "dpo" else run.start_model()
        base = checkpoints_dir(run, stage)
        if cfg.training.launch:
            if callbacks:
                raise TrainingError("callbacks cannot cross into processes started by accelerate (training.launch)")
            res = launch.launch(run, kind, start, base, progress)
        else:
            res = train_in_process(cfg, kind, start, data_file, base, callbacks, progress)
        out = base / "final"
        if not cfg.training.keep_trainer_checkpoints:
            # The final model is written: the resumable states (weights + optimizer, GBs) have served.
            shutil.rmtree(base / "trainer", ignore_errors=True)
        history = [h for h in res["log_history"] if "loss" in h or "train_loss" in h]
        write_json(log_file, history)
        info["numerics"] = res["numerics"]
        seconds, tokens = res["seconds"], res["tokens"]
        metrics = {
            "model_path": str(out),
            "model_sha256": sha256_file(out / "model.safetensors"),
            "started_from": str(start),
            "examples": n,
            "global_steps": res["global_step"],
            "resumed_from": res["resumed_from"],
            # From the whole log, not the Trainer's result: after a resume that averages the remaining steps only.
            "train_loss": whole_run_loss(res["log_history"], res["training_loss"]),
            "train_seconds": round(seconds, 1),
            "tokens_per_second": round(tokens / seconds, 1) if tokens and seconds else None,
            "batch_check": res["batch_check"],
            "lora": cfg.training.use_lora,
            "processes": res["numerics"].get("processes", 1),
        }
        write_json(run.metrics_dir / f"{kind}.json", metrics)
        df = pd.DataFrame(history)
        run.save_figure(plot_training(df, kind), f"{kind}_curves")
        info["outputs"] = [log_file, run.metrics_dir / f"{kind}.json"]
        info["metrics"] = {
            k: metrics[k]
            for k in ("model_path", "model_sha256", "global_steps", "train_loss", "tokens_per_second", "resumed_from")
        }
    return df


def train_in_process(
    cfg: RunConfig, kind: str, start: Path, data_file: Path, base: Path, callbacks: list[Any] | None, progress: bool
) -> dict[str, Any]:
    """Build the trainer, resume from the last complete checkpoint, train, save the final model whole under
    ``base/final``. The same in the kernel and in every process accelerate starts (each rank runs it; rank 0
    saves, or all ranks gather a sharded model). Returns what the stage records."""
    import torch

    dataset, _ = _load_dataset(data_file, kind)
    trainer_dir = base / "trainer"
    trainer_dir.mkdir(parents=True, exist_ok=True)
    trainer, tok = _build_trainer(
        cfg, kind, start, dataset, trainer_dir, [_completion_callback(), *(callbacks or [])], progress
    )
    batch_report = check_batch(next(iter(trainer.get_train_dataloader())), tok)
    args = trainer.args
    prec = trainer.selftrain_precision
    ref = getattr(trainer, "ref_model", None)
    numerics = {
        # mixed: float32 master weights under bf16/fp16 autocast; bf16: the weights and AdamW states themselves bf16.
        "precision": prec["precision"],
        "dtype": "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32",
        "weights": str(trainer.model.dtype).removeprefix("torch."),
        "pure_bf16": prec["precision"] == "bf16",
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
        "reference": str(ref.dtype).removeprefix("torch.") if ref is not None else None,
        "device": str(args.device),
        "processes": args.world_size,
        "launch": cfg.training.launch,
        "sharding": "fsdp" if getattr(trainer, "is_fsdp_enabled", False)
        else "deepspeed" if getattr(trainer, "is_deepspeed_enabled", False) else None,
    }  # fmt: skip
    resume = _complete_checkpoints(trainer_dir)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume[-1]) if resume else None)
    seconds = time.time() - t0
    if torch.cuda.is_available():  # this process's peak (rank 0's under a launch): what the memory planner estimates
        numerics["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    _save_final(trainer, tok, base / "final")
    # After a resume only the remaining steps ran in `seconds`: count only their share of tokens.
    done_before = int(resume[-1].name.split("-")[1]) if resume else 0
    share = (trainer.state.global_step - done_before) / max(trainer.state.global_step, 1)
    return {
        "log_history": trainer.state.log_history,
        "training_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "seconds": seconds,
        "tokens": _count_tokens(trainer, kind) * share,
        "numerics": numerics,
        "batch_check": batch_report,
        "resumed_from": str(resume[-1]) if resume else None,
    }


def whole_run_loss(log_history: list[dict[str, Any]], fallback: float | None = None) -> float | None:
    """Mean training loss over every step of the run, resumed sessions included: each logged loss is the mean
    of the steps since the previous log, so it is weighted by that many steps."""
    rows = sorted((int(h["step"]), float(h["loss"])) for h in log_history if "loss" in h and "step" in h)
    total, steps, prev = 0.0, 0, 0
    for step, loss in rows:
        if step <= prev:
            continue
        total += loss * (step - prev)
        steps += step - prev
        prev = step
    if steps:
        return round(total / steps, 5)
    return round(float(fallback), 5) if fallback is not None else None


def _count_tokens(trainer: Any, kind: str) -> int:
    """Non-pad tokens of all epochs, for a tokens/s figure (DPO: prompt + chosen + rejected per pair)."""
    ds = trainer.train_dataset
    epochs = math.ceil(trainer.args.num_train_epochs) if trainer.args.max_steps <= 0 else 1
    if kind == "sft":
        per_epoch = sum(len(x) for x in ds["input_ids"])
    else:
        cols = ds.column_names
        per_epoch = (
            sum(
                len(p) + len(c) + len(r)
                for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)
            )
            if "prompt_ids" in cols
            else 0
        )
    return per_epoch * epochs


def _build_trainer(
    cfg: RunConfig,
    kind: str,
    start: Path,
    dataset: Any,
    out_dir: Path,
    callbacks: list[Any],
    progress: bool,
    device: Device | None = None,
) -> tuple[Any, Any]:
    """The TRL trainer of a stage and its tokenizer. `device`: the hardware to build for (None: this machine's);
    a test passes the GPU's to check, on a CPU, what a GPU run would update."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or Device.here()
    block = dict(getattr(cfg.training, kind))
    prec = precision_plan(cfg.training.precision, block, device)
    common = {
        "output_dir": str(out_dir),
        "report_to": "none",
        "seed": cfg.seed,
        "disable_tqdm": not progress,
        **prec["flags"],
    }
    tok = AutoTokenizer.from_pretrained(start)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        raise TrainingError(
            f"{start}: the tokenizer's pad token is missing or equals eos ({tok.eos_token!r}); set a distinct "
            "pad token in the model folder so the end-of-turn token stays in the labels"
        )
    attn = getattr(cfg.training, f"{kind}_attn_implementation")
    if attn == "flex_attention" and not device.cuda:
        # FlexAttention has no backward pass on a CPU (torch raises); sdpa masks packed rows by their position ids.
        attn = "sdpa"
    extra = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_pretrained(start, dtype=prec["weights"], **extra)
    peft = _peft_config(cfg)
    ref = None
    own_ref = kind == "dpo" and peft is None and not block.get("precompute_ref_log_probs")
    if own_ref and prec["reference"] != prec["weights"]:
        # TRL would build the reference in the policy's float32; it is never updated, so bf16 holds it.
        ref = AutoModelForCausalLM.from_pretrained(start, dtype=prec["reference"], **extra)
    # On a CPU, TRL's chunked LM head is the slow part of a step: swap in the plain one (selftrain/train/cpu_head.py).
    head = contextlib.nullcontext() if device.cuda else cpu_head.plain_lm_head()
    with head:
        trainer = _make_trainer(kind, model, common, block, dataset, tok, callbacks, peft, ref)
    trainer.selftrain_precision = prec  # what train_in_process records
    return trainer, tok


def _make_trainer(
    kind: str,
    model: Any,
    common: dict,
    block: dict,
    dataset: Any,
    tok: Any,
    callbacks: list[Any],
    peft: Any,
    ref: Any = None,
) -> Any:
    shared = {"model": model, "train_dataset": dataset, "processing_class": tok, "callbacks": callbacks}
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(args=SFTConfig(**{**common, **block}), peft_config=peft, **shared)
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(ref_model=ref, args=DPOConfig(**{**common, **block}), peft_config=peft, **shared)


# ------------------------------------------------------------------------------------------- views


def plot_training(df: pd.DataFrame, kind: str) -> Any:
    """SFT: loss per step. DPO: loss, reward margin and reward accuracy per step. None for an empty log
    (a skipped stage)."""
    if not len(df):
        return None
    keys = ["loss"] if kind == "sft" else ["loss", "rewards/margins", "rewards/accuracies"]
    keys = [k for k in keys if k in df.columns] or ["loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        if key in df.columns and "step" in df.columns:
            d = df.dropna(subset=[key])
            ax.plot(d["step"], d[key], marker="o", ms=3)
        ax.set_title(f"{kind.upper()} {key}")
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------- evaluation helpers


def completion_logprobs(model_dir: Path, prompts: list[list[dict]], completions: list[list[dict]]) -> list[float]:
    """Mean per-token log-likelihood of each completion given its prompt (chat template applied)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p, c in zip(prompts, completions, strict=True):
        prefix = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(p + c, tokenize=False)
        p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([f_ids])
        with torch.inference_mode():
            logits = model(ids).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        out.append(float(lp[len(p_ids) - 1 :].mean()))
    return out


# ------------------------------------------------------------------------------------------- launched worker


def _worker(argv: list[str]) -> None:
    """One rank of a stage started by accelerate (selftrain.train.launch): ``python -m selftrain.train --worker RUN_DIR
    KIND START RESULT``. It reads the run folder and writes nothing there; rank 0 writes RESULT, a failing rank
    ``error-rank<N>.txt`` beside it."""
    import traceback

    from selftrain.runs import open_run

    run_dir, kind, start, result = argv
    rank = int(os.environ.get("RANK", "0"))
    result_path = Path(result)
    launch.watch_parent()
    try:
        run = open_run(run_dir)
        data_file = run.data_dir / ("sft.jsonl" if kind == "sft" else "dpo.jsonl")
        res = train_in_process(run.config, kind, Path(start), data_file, checkpoints_dir(run, kind), None, True)
        if rank == 0:
            launch.worker_result(result_path, res)
    except BaseException as e:
        err = result_path.parent / f"error-rank{rank}.txt"
        err.write_text(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n\n{traceback.format_exc()}")
        raise
