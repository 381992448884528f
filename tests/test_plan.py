"""The memory and disk planner: parameter counts against transformers' own, activation bytes against what autograd
really saves, the shipped model files against one 80 GB GPU, the stage's refusal, the CLI and its bounds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from selftrain import plan as P
from selftrain.cli import main
from selftrain.config import resolve_run_config
from selftrain.plan import GIB, KNOWN_SHAPES, Setting, Shape, estimate, model_shape, plan
from selftrain.train import stage as train_stage_mod

ROOT = Path(__file__).resolve().parents[1]
# An "80 GB" H100 SXM as torch reports it (nvidia-smi: 81,559 MiB): what stage 03/04 passes to the check.
H100_80GB = 81559 * 1024**2
# The shipped effective batches (per_device_train_batch_size x gradient_accumulation_steps) before the planner
# modelled padded DPO batches: the settings were re-chosen to fit, not to train on other batches.
EFFECTIVE = {"sft": 8, "dpo": 64}


def gpu_model_files() -> list[str]:
    """Every params/models file that names a GPU model (the project's own CPU models, tiny: and embedded:, aside)."""
    import yaml

    names = []
    for f in sorted((ROOT / "params" / "models").glob("*.yaml")):
        path = str(yaml.safe_load(f.read_text())["model"]["path"])
        if not path.startswith(("tiny:", "embedded:")):
            names.append(f.stem)
    return names


@pytest.mark.parametrize("name", sorted(KNOWN_SHAPES))
def test_parameter_count_equals_transformers(name: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in KNOWN_SHAPES[name].items() if k != "torch_dtype"}
    with torch.device("meta"):  # shapes only: no memory
        model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    shape = Shape.from_config(KNOWN_SHAPES[name])
    assert shape.params() == sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n and p.dim() == 2)
    assert shape.layer_linear() == linear and shape.dtype_bytes == 2


@pytest.mark.parametrize(
    "name,non_embedding", [("llm-jp/llm-jp-3-150m", 50_344_448), ("llm-jp/llm-jp-3-980m", 684_258_816)]
)
def test_built_in_shapes_match_the_model_cards_non_embedding_parameters(name: str, non_embedding: int) -> None:
    # The llm-jp-3 model cards list non-embedding parameters per size; the untied input and output embeddings are
    # the rest (2 x vocab x hidden), whatever the vocabulary padding.
    shape = Shape.from_config(KNOWN_SHAPES[name])
    assert shape.params() - 2 * shape.vocab * shape.hidden == non_embedding


def _measured_saved_bytes(precision: str, checkpointing: bool, attn: str, packed: bool = False) -> tuple[int, Shape]:
    """Bytes of every tensor autograd saves for the backward pass of a small Llama (GQA, padded rows) under the
    planner's precision, through TRL's fused LM head as the trainers call it; parameters themselves excluded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    cfg = dict(
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=attn))
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    add_fused_lm_head(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, cfg["vocab_size"], (1, 256) if packed else (2, 128))
    kwargs: dict = {"use_cache": False}
    if packed:  # two documents in one padding-free row, as TRL's BFD packing hands them over
        kwargs["position_ids"] = torch.cat([torch.arange(100), torch.arange(156)]).unsqueeze(0)
    else:  # the second row padded: DPO's batches, padded to their longest pair
        mask = torch.ones_like(ids)
        mask[1, 64:] = 0
        kwargs["attention_mask"] = mask
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
            model(input_ids=ids, labels=ids, fused_lm_head=True, **kwargs)
    return sum(saved.values()), Shape.from_config({**cfg, "dtype": "float32"})


@pytest.mark.parametrize(
    "precision,checkpointing,attn,packed",
    [
        ("mixed", False, "sdpa", False),
        ("mixed", True, "sdpa", False),
        ("bf16", False, "sdpa", False),
        ("bf16", True, "sdpa", False),
        ("fp32", False, "sdpa", False),
        ("mixed", False, "eager", False),
        ("mixed", False, "sdpa", True),
    ],
)
def test_saved_activations_equal_what_autograd_saves(
    precision: str, checkpointing: bool, attn: str, packed: bool
) -> None:
    measured, shape = _measured_saved_bytes(precision, checkpointing, attn, packed)
    s = Setting(
        "sft",
        micro_batch=2,
        seq_len=128,
        checkpointing=checkpointing,
        precision=precision,
        attn=attn,
        padding_free=packed,
    )
    planned = P.saved_bytes(shape, s)["saved"]
    assert planned == pytest.approx(measured, rel=0.03), (planned, measured)


def test_accounting_per_preset() -> None:
    shape = Shape.from_config(KNOWN_SHAPES["llm-jp/llm-jp-3-3.7b"])
    n = shape.params()
    one = estimate(shape, "dpo", "single", 1, 1, 4096, True)  # the default precision: mixed
    assert one["weights"] == 4 * n and one["gradients"] == 4 * n and one["optimizer"] == 8 * n
    assert one["reference"] == 2 * n  # the reference, loaded apart in bf16
    pure = estimate(shape, "dpo", "single", 1, 1, 4096, True, precision="bf16")
    assert pure["weights"] == 2 * n and pure["optimizer"] == 4 * n and pure["reference"] == 2 * n
    assert pure["activations"] < one["activations"]  # float32 residual stream and norms under mixed
    z3 = estimate(shape, "dpo", "zero3", 8, 1, 4096, True)
    assert z3["weights"] == one["weights"] / 8
    assert estimate(shape, "dpo", "ddp", 8, 1, 4096, True)["total"] == one["total"]  # ddp: a full copy each
    assert estimate(shape, "dpo", "single", 1, 1, 4096, True, precompute_ref=True)["reference"] == 0
    no_ckpt = estimate(shape, "sft", "single", 1, 1, 4096, False)["activations"]
    assert no_ckpt > 3 * estimate(shape, "sft", "single", 1, 1, 4096, True)["activations"]
    # DPO's micro-batch holds chosen + rejected rows, padded with a mask: more than twice SFT's packed rows
    flex = estimate(shape, "sft", "single", 1, 4, 4096, False, attn="flex_attention", padding_free=True)
    assert (
        estimate(shape, "dpo", "single", 1, 4, 4096, False, precompute_ref=True)["activations"]
        > 2 * (flex["activations"])
    )
    rows = plan(Shape.from_config(KNOWN_SHAPES["llm-jp/llm-jp-3-13b"]), 1, 80)
    assert not any(r["fits"] for r in rows)  # 13.7B x 16 bytes alone is over 200 GiB
    rows8 = plan(Shape.from_config(KNOWN_SHAPES["llm-jp/llm-jp-3-13b"]), 8, 80)
    fits = {(r["kind"], r["preset"]) for r in rows8 if r["fits"]}
    assert ("sft", "zero3") in fits and ("sft", "ddp") not in fits
    assert all(r["total"] * GIB <= 0.9 * 80 * GIB for r in rows8 if r["fits"])


def test_trl_defaults_are_trls_own() -> None:
    from trl import DPOConfig, SFTConfig

    defaults = {f.name: f.default for cls in (SFTConfig, DPOConfig) for f in dataclasses.fields(cls)}
    for key, value in P.TRL_DEFAULTS.items():
        assert defaults[key] == value or str(defaults[key]).lower().endswith(str(value)), key


@pytest.mark.parametrize("name", gpu_model_files())
def test_every_shipped_gpu_model_file_fits_one_80gb_gpu(name: str) -> None:
    cfg = resolve_run_config(name, "central")
    for kind in ("sft", "dpo"):
        s = P.stage_setting(cfg, kind)
        assert s.precision == "mixed" and s.seq_len == cfg.model.max_model_len == 4096  # planned at max_length
        assert s.micro_batch * s.accumulation == EFFECTIVE[kind], f"{name} {kind}: the effective batch changed"
        got = P.check_fits(cfg, kind, 1, H100_80GB)  # raises DoesNotFit otherwise
        assert got["gib"] <= 0.9 * H100_80GB / GIB


def test_gpu_model_files_are_found() -> None:
    assert {"llm-jp-3-150m", "llm-jp-3-980m", "llm-jp-3-1.8b", "llm-jp-3-3.7b"} <= set(gpu_model_files())
    assert "tiny" not in gpu_model_files() and "smollm2-135m" not in gpu_model_files()


def test_a_stage_that_does_not_fit_is_refused_in_one_line_naming_the_setting() -> None:
    # The 1.8b DPO settings shipped before the planner modelled padded pairs: 8 pairs, no checkpointing.
    old = [
        "training.dpo.per_device_train_batch_size=8",
        "training.dpo.gradient_accumulation_steps=8",
        "training.dpo.gradient_checkpointing=false",
    ]
    cfg = resolve_run_config("llm-jp-3-1.8b", "central", overrides=old)
    with pytest.raises(P.DoesNotFit) as e:
        P.check_fits(cfg, "dpo", 1, H100_80GB)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("llm-jp-3-1.8b dpo: training.dpo.per_device_train_batch_size 8")
    assert "of a 79.6 GiB GPU" in msg and "set training.dpo.gradient_checkpointing: true (-> " in msg
    # or the same effective batch in smaller micro-batches, without checkpointing
    assert " or set training.dpo.per_device_train_batch_size: 1 with gradient_accumulation_steps: 64 (-> " in msg
    need = float(msg.split(" needs ")[1].split(" GiB")[0])
    assert need > 0.9 * 79.6
    # the change it names does fit
    fixed = resolve_run_config(
        "llm-jp-3-1.8b", "central", overrides=[*old[:2], "training.dpo.gradient_checkpointing=true"]
    )
    assert P.check_fits(fixed, "dpo", 1, H100_80GB)["gib"] < 0.9 * 79.6
    # one pair per micro-batch would not fit a 40 GB GPU even precomputed and checkpointed: it says what then
    with pytest.raises(P.DoesNotFit, match="no micro-batch fits one GPU: shorten max_length"):
        P.check_fits(resolve_run_config("llm-jp-3-3.7b", "central"), "dpo", 1, 40 * GIB)
    with pytest.raises(ValueError, match="GPUs must be at least 1"):
        P.check_fits(cfg, "dpo", 0, H100_80GB)


def test_the_training_stage_checks_its_plan_before_loading_on_a_gpu() -> None:
    # CI has no GPU: the call itself is read from train_stage, guarded by CUDA and ahead of any model loading.
    import inspect

    from selftrain import train

    lines = [x.strip() for x in inspect.getsource(train.train_stage).splitlines() if x.strip()]
    at = next(i for i, x in enumerate(lines) if x.startswith("plan.check_fits(cfg, kind, torch.cuda.device_count()"))
    assert lines[at - 1].startswith("if torch.cuda.is_available():")
    loads = [i for i, x in enumerate(lines) if "resolve_model_path(" in x or "train_in_process(" in x]
    assert loads and at < min(loads)


def test_disk_per_cell() -> None:
    cfg = resolve_run_config("llm-jp-3-3.7b", "central", "params/studies/poster.yaml")
    shape = P.run_shape(cfg)
    n = shape.params()
    d = P.cell_disk(cfg, shape)
    assert d["checkpoint"] == 12 * n  # float32 weights + two float32 AdamW moments under mixed
    assert d["final_models"] == 2 * 2 * n  # SFT and DPO, saved in the model's bf16
    assert d["checkpoints_peak"] == 3 * d["checkpoint"]  # save_total_limit 2, and the next one before rotation
    assert d["kept_checkpoints"] == 0
    kept = resolve_run_config(
        "llm-jp-3-3.7b", "central", "params/studies/poster.yaml", ["training.keep_trainer_checkpoints=true"]
    )
    assert P.cell_disk(kept, shape)["kept_checkpoints"] == 2 * 2 * d["checkpoint"]
    assert P.generation_bytes(cfg) == 10000 * 8 * (1024 * P.TEXT_BYTES_PER_TOKEN + P.RECORD_BYTES)
    assert P.embedding_bytes(cfg, shape) == 10000 * 9 * 3072 * 4
    base = resolve_run_config("llm-jp-3-3.7b", "baseline", "params/studies/poster.yaml")
    assert P.cell_disk(base, shape)["final_models"] == 0 and P.cell_disk(base, shape)["checkpoints_peak"] == 0


def test_a_trainer_checkpoint_and_final_model_have_the_planned_size(
    tiny_overrides: list[str], tmp_path: Path, tiny_model: Path
) -> None:
    """One real Trainer checkpoint of the tiny model (float32 weights, as every CPU run and `mixed` on a GPU) and
    its saved model, against the planner's bytes."""
    from datasets import Dataset

    one_step = ["training.sft.max_steps=1", "training.sft.save_steps=1", "training.sft.max_length=64"]
    cfg = resolve_run_config("tiny", "central", overrides=[*tiny_overrides, *one_step])
    example = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hi."}]}
    data = Dataset.from_list([example] * 4)
    trainer, tok = train_stage_mod._build_trainer(
        cfg, "sft", tiny_model, data, tmp_path / "trainer", [], progress=False
    )
    trainer.train()
    ckpt = tmp_path / "trainer" / "checkpoint-1"
    size = sum(f.stat().st_size for f in ckpt.iterdir() if f.name in ("model.safetensors", "optimizer.pt"))
    shape = P.model_shape(str(tiny_model))
    assert size == pytest.approx(P.checkpoint_bytes(shape, "mixed"), rel=0.05)
    # a float32 model file (the tiny model's, as a CPU run or precision fp32 saves one)
    assert (tiny_model / "model.safetensors").stat().st_size == pytest.approx(
        P.final_model_bytes(shape, "fp32"), rel=0.05
    )


def test_shape_from_a_local_config_and_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(json.dumps(KNOWN_SHAPES["llm-jp/llm-jp-3-1.8b"]))
    assert model_shape(str(tmp_path)).hidden == 2048
    assert model_shape("llm-jp/llm-jp-3-1.8b-instruct3").layers == 24  # the known shape, without a download
    with pytest.raises(FileNotFoundError, match="no config.json found"):
        model_shape(str(tmp_path / "nothing"))
    assert main(["plan", "--model", "llm-jp-3-3.7b", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "3.78B parameters on 8 GPU(s)" in out and "zero3" in out and "  single  " not in out
    assert "llm-jp-3-3.7b's own training settings" in out and "reference precomputed" in out
    assert main(["plan", "--model", str(tmp_path / "nothing")]) == 2


def test_plan_sizes_the_projects_own_models_from_their_folders(
    tiny_model: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model))
    count = sum(p.numel() for p in real.parameters())
    assert model_shape("tiny:", str(cache_dir)).params() == count  # tied embeddings, float32 weights
    assert model_shape("tiny:", str(cache_dir)).dtype_bytes == 4
    # the CLI by params name and by path, from the built folder (issue 29: "download config.json" before)
    monkeypatch.setenv("SELFTRAIN_MODELS_DIR", str(tiny_model.parent))
    for name in ("tiny", "tiny:"):
        assert main(["plan", "--model", name]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{count / 1e9:.2f}B parameters on 1 GPU(s)") and "sft: fits with single" in out
        assert ("tiny's own training settings" in out) == (name == "tiny")  # a params model: its settings too


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus", "0"], "plan --gpus must be at least 1, got 0"),
        (["--gpus", "-2"], "plan --gpus must be at least 1"),
        (["--gpu-mem", "-1"], "plan --gpu-mem must be more than 0, got -1"),
        (["--gpu-mem", "0"], "more than 0"),
        (["--seq-len", "0"], "plan --seq-len must be at least 1, got 0"),
        (["--micro-batch", "0"], "--micro-batch"),
    ],
)
def test_plan_bounds_are_one_line_errors(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    for what in (["--model", "llm-jp-3-1.8b"], ["--study", "params/studies/poster.yaml"]):
        assert main(["plan", *what, *args]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip().startswith("error: ") and message in captured.err
        assert len(captured.err.strip().splitlines()) == 1 and not captured.out


def test_plan_a_study(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--study", "params/studies/poster.yaml"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    stage_lines = [x for x in lines if " sft " in x or " dpo " in x]
    assert len(stage_lines) == 4 * 4 * 2  # four models x four trained methods x (SFT, DPO); baseline trains nothing
    assert all(x.rstrip().endswith("yes") for x in stage_lines)
    assert sum("no training" in x for x in lines) == 4
    assert "llm-jp-3-3.7b" in out and "ref pre" in out and lines[-1] == "fits: yes"
    assert any(x.startswith("disk: ") and " GB kept " in x for x in lines)
    # a smaller GPU: the same study does not fit, and each stage that does not says what to change
    assert main(["plan", "--study", "params/studies/poster.yaml", "--gpu-mem", "40"]) == 0
    small = capsys.readouterr().out.splitlines()
    assert small[-1].startswith("fits: no: ") and any("no: set training." in x for x in small)


def test_the_planner_against_the_last_gpu_measurement() -> None:
    """bench/bench_train_gpu.py's saved run (one GPU, the 1.8b shape, packed padding-free SFT rows): the planner's
    worst case (every row full) is at least the measured peak and at most 15% above it. The run saved before mixed
    precision became the default trained in pure bf16 with checkpointing off; later runs record their setting."""
    saved = json.loads((ROOT / "bench" / "out" / "train_gpu.json").read_text())
    shape = Shape.from_config(saved["shape"])
    checked = 0
    for name, entry in saved["sft"].items():
        if "peak_gb" not in entry or "padding_free" not in name:
            continue
        legacy = {
            "micro_batch": saved["batch"],
            "seq_len": saved["seq"],
            "checkpointing": False,
            "precision": saved.get("precision", "bf16"),
            "attn": entry["attn"],
            "padding_free": True,
        }
        s = Setting(**{**entry.get("plan_setting", legacy), "kind": "sft"})
        planned = P.estimate_setting(shape, s)["total"] / GIB
        assert entry["peak_gb"] <= planned <= 1.15 * entry["peak_gb"], (name, planned, entry["peak_gb"])
        checked += 1
    assert checked >= 1


def test_lora_is_planned_as_frozen_weights_without_a_reference_copy() -> None:
    # A LoRA run must not be refused for the full fine-tuning's optimizer: 3.7b DPO with 4 pairs in memory does
    # not fit as full fine-tuning, and does with adapters (peft turns them off for the reference).
    over = [
        "training.dpo.per_device_train_batch_size=4",
        "training.dpo.gradient_accumulation_steps=16",
        "training.dpo.precompute_ref_log_probs=false",
    ]
    with pytest.raises(P.DoesNotFit):
        P.check_fits(resolve_run_config("llm-jp-3-3.7b", "central", overrides=over), "dpo", 1, H100_80GB)
    lora = resolve_run_config("llm-jp-3-3.7b", "central", overrides=[*over, "training.use_lora=true"])
    assert P.check_fits(lora, "dpo", 1, H100_80GB)["gib"] < 0.9 * 79.6
    est = P.estimate_setting(P.run_shape(lora), P.stage_setting(lora, "dpo"))
    assert est["gradients"] == est["optimizer"] == est["reference"] == 0
    assert est["weights"] == 4 * P.run_shape(lora).params()
